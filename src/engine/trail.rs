//! Reading the decision trail (auditors and admins only): export pages with
//! filters, follow new records live, verify the chain and its checkpoints.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::{Engine, EngineError};
use crate::audit::{Action, AuditRecord, Report};
use crate::identity::Identity;
use crate::store::Millis;
use crate::text::{AUDIT_PAGE, page_size};

/// Records read per store scan.
const SCAN: usize = 4096;
/// Canonical bytes per export page. Each record travels twice (its fields
/// and its canonical JSON), so a page stays near 2 MiB, well inside the
/// 4 MiB a gRPC client accepts by default, whatever the records hold.
const PAGE_BYTES: usize = 1024 * 1024;

/// A stored record with its canonical bytes (clients can re-check the chain).
pub type Stored = (AuditRecord, Vec<u8>);

/// One page of an export.
#[derive(Debug, Default)]
pub struct ExportPage {
    /// The records `filter` wants.
    pub records: Vec<Stored>,
    /// The sequence to continue after (0: no more).
    pub next: u64,
    /// Checkpoints (JWS) over records in the page's range.
    pub checkpoints: Vec<String>,
}

/// Which records an export wants.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// At or after this time.
    pub since: Millis,
    /// This actor only (empty: any).
    pub actor: String,
    /// This target only (empty: any).
    pub target: String,
    /// This action, or a prefix ending in `.` (empty: any).
    pub action: String,
}

impl Filter {
    fn wants(&self, r: &AuditRecord) -> bool {
        r.at >= self.since
            && (self.actor.is_empty() || r.actor == self.actor)
            && (self.target.is_empty() || r.target == self.target)
            && (self.action.is_empty()
                || r.action == self.action
                || (self.action.ends_with('.') && r.action.starts_with(&self.action)))
    }
}

fn decode(seq: u64, bytes: &[u8]) -> Result<AuditRecord, EngineError> {
    serde_json::from_slice(bytes).map_err(|_| {
        EngineError::DataLoss(format!(
            "audit record {seq} does not decode; run `portcullis audit verify`"
        ))
    })
}

/// Trail actions that are a person's decision on a request.
const DECISIONS: [&str; 5] = [
    Action::RequestApproval.as_str(),
    Action::RequestApproved.as_str(),
    Action::RequestDenied.as_str(),
    Action::BreakGlassAcknowledged.as_str(),
    Action::BreakGlassRevoked.as_str(),
];
/// How far back (in records) the console's history looks.
const HISTORY_SCAN: u64 = 20_000;

impl Engine {
    /// Decisions (approvals, denials, break-glass reviews) on requests
    /// `who` may decide, or made by `who`, newest first, at most `limit`,
    /// from the newest [`HISTORY_SCAN`] trail records: the approver
    /// console's history. Anyone who may review may read it; it shows
    /// what the trail says about requests they could see anyway.
    pub async fn decision_history(
        &self,
        who: &Identity,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, EngineError> {
        let Some((last, _)) = self.store().audit_last().await? else {
            return Ok(Vec::new());
        };
        let policy = self.policy();
        let admin = policy.is_admin(who);
        let mut after = last.checked_sub(HISTORY_SCAN).filter(|s| *s > 0);
        let mut out = Vec::new();
        // Each request is read once, however many decisions it had.
        let mut may_see = std::collections::HashMap::<String, bool>::new();
        loop {
            // An embedded store answers at once: let other tasks run
            // between pages of a long scan.
            tokio::task::yield_now().await;
            let page = self.store().audit_after(after, SCAN).await?;
            let done = page.len() < SCAN;
            for (seq, bytes) in page {
                after = Some(seq);
                let r = decode(seq, &bytes)?;
                if !DECISIONS.contains(&r.action.as_str()) {
                    continue;
                }
                let visible = admin
                    || r.actor == who.as_str()
                    || match may_see.get(&r.target) {
                        Some(v) => *v,
                        None => {
                            let v = self
                                .store()
                                .request(&r.target)
                                .await?
                                .is_some_and(|req| super::may_decide(&policy, who, &req));
                            may_see.insert(r.target.clone(), v);
                            v
                        }
                    };
                if visible {
                    out.push(r);
                }
            }
            if done {
                break;
            }
        }
        out.reverse();
        out.truncate(limit);
        Ok(out)
    }

    /// Refuse unless `who` may read the trail.
    pub fn require_auditor(&self, who: &Identity) -> Result<(), EngineError> {
        if self.policy().is_auditor(who) {
            Ok(())
        } else {
            Err(EngineError::NotAllowed(
                "reading the audit trail needs an admin or auditor identity".into(),
            ))
        }
    }

    /// Up to `page_size` records after `after_seq` that `filter` wants (and
    /// at most about [`PAGE_BYTES`] of them), the sequence to continue after
    /// (0: no more), and the checkpoints over the range the page read.
    pub async fn export_audit(
        &self,
        who: &Identity,
        filter: &Filter,
        after_seq: u64,
        page_size_asked: usize,
    ) -> Result<ExportPage, EngineError> {
        self.require_auditor(who)?;
        let size = page_size(page_size_asked, AUDIT_PAGE)?;
        let (records, next, read_to) = self.read_page(filter, after_seq, size).await?;
        let checkpoints = self
            .store()
            .checkpoints(after_seq, read_to)
            .await?
            .into_iter()
            .map(|(_, jws)| String::from_utf8_lossy(&jws).into_owned())
            .collect();
        Ok(ExportPage {
            records,
            next,
            checkpoints,
        })
    }

    /// The records of one export page, the next token, and the highest
    /// sequence read.
    async fn read_page(
        &self,
        filter: &Filter,
        after_seq: u64,
        size: usize,
    ) -> Result<(Vec<Stored>, u64, u64), EngineError> {
        let mut out = Vec::new();
        let mut bytes_out = 0;
        let mut after = (after_seq > 0).then_some(after_seq);
        loop {
            let page = self.store().audit_after(after, SCAN).await?;
            let done = page.len() < SCAN;
            for (seq, bytes) in page {
                after = Some(seq);
                let r = decode(seq, &bytes)?;
                if filter.wants(&r) {
                    bytes_out += bytes.len();
                    out.push((r, bytes));
                    if out.len() == size || bytes_out >= PAGE_BYTES {
                        return Ok((out, seq, seq));
                    }
                }
            }
            if done {
                return Ok((out, 0, after.unwrap_or(after_seq)));
            }
        }
    }

    /// Walk the whole chain and every checkpoint.
    pub async fn verify_audit(
        &self,
        who: &Identity,
        witnessed: Vec<String>,
        accept_unsigned_compaction: Option<u64>,
    ) -> Result<Report, EngineError> {
        self.require_auditor(who)?;
        let keys = self.keys.current();
        Ok(crate::audit::verify_witnessed(
            self.store().as_ref(),
            &keys,
            &witnessed,
            accept_unsigned_compaction,
        )
        .await?)
    }

    /// Follow the trail from after `after_seq` (0: only new records).
    pub fn tail_audit(
        self: &Arc<Self>,
        who: &Identity,
        after_seq: u64,
    ) -> Result<Tail, EngineError> {
        self.require_auditor(who)?;
        // Subscribe first, then replay: a record appended in between shows
        // up in both and is skipped by sequence number.
        Ok(Tail {
            engine: self.clone(),
            live: self.audit.subscribe(),
            last: after_seq,
            replaying: after_seq > 0,
            backlog: Vec::new(),
        })
    }
}

/// A live follower of the trail: stored records after the start point, then
/// new ones as they are appended.
pub struct Tail {
    engine: Arc<Engine>,
    live: broadcast::Receiver<Stored>,
    /// Highest sequence handled: read from the store (sent or skipped) or
    /// sent live.
    last: u64,
    replaying: bool,
    backlog: Vec<Stored>,
}

impl Tail {
    /// The next record; `None` when the broker stops. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Stored>, EngineError> {
        while self.replaying {
            if let Some(rec) = self.backlog.pop() {
                return Ok(Some(rec));
            }
            let page = self
                .engine
                .store()
                .audit_after(Some(self.last), 1024)
                .await?;
            match page.last() {
                // Everything read counts as handled, decodable or not, so a
                // run of undecodable records is passed, never re-read.
                Some((seq, _)) => self.last = *seq,
                None => self.replaying = false,
            }
            // Undecodable records are skipped here; `verify` reports them.
            self.backlog = page
                .into_iter()
                .rev()
                .filter_map(|(seq, b)| decode(seq, &b).ok().map(|r| (r, b)))
                .collect();
        }
        loop {
            match self.live.recv().await {
                Ok((r, bytes)) if r.seq > self.last || self.last == 0 => {
                    self.last = r.seq;
                    return Ok(Some((r, bytes)));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Err(EngineError::DataLoss(format!(
                        "tail fell {n} records behind; resume with after_seq = {}",
                        self.last
                    )));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{POLICY, ask, id, rig, workload};
    #[allow(unused_imports)]
    use crate::store::conformance::TestWrites as _;

    /// Issue 21, finding 2: a trail no signed checkpoint covers is not
    /// verified unless the chain alone is asked for; signed, it is.
    #[tokio::test]
    async fn a_trail_no_checkpoint_covers_is_not_verified() {
        let r = rig(POLICY).await;
        for _ in 0..3 {
            r.engine
                .request_token(&workload(), ask(&["read"]))
                .await
                .unwrap();
        }
        let carol = id("spiffe://t/human/carol");
        let report = r.engine.verify_audit(&carol, vec![], None).await.unwrap();
        assert!(report.problem.is_none(), "the chain itself is whole");
        let (seq, why) = report.judged(false, false).unwrap();
        assert_eq!(seq, report.first);
        assert!(why.contains("no signed checkpoint covers"), "{why}");
        assert!(
            report.judged(false, true).is_none(),
            "the chain alone, asked for"
        );
        assert!(
            report.judged(true, true).is_some(),
            "strict still wants signatures"
        );
        r.engine.sign_checkpoint().await.unwrap().unwrap();
        let report = r.engine.verify_audit(&carol, vec![], None).await.unwrap();
        assert!(report.judged(true, false).is_none(), "{report:?}");
    }

    #[tokio::test]
    async fn auditors_export_filtered_pages_and_tail_new_records() {
        let r = rig(POLICY).await;
        for _ in 0..3 {
            r.engine
                .request_token(&workload(), ask(&["read"]))
                .await
                .unwrap();
        }
        super::super::testing::parked(&r, &["admin"]).await;
        let err = r
            .engine
            .export_audit(&workload(), &Filter::default(), 0, 0)
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::NotAllowed(_)));
        let carol = id("spiffe://t/human/carol");
        let token_only = Filter {
            action: "token.".into(),
            ..Filter::default()
        };
        let p = r
            .engine
            .export_audit(&carol, &token_only, 0, 2)
            .await
            .unwrap();
        assert_eq!((p.records.len(), p.next), (2, 2));
        let rest = r
            .engine
            .export_audit(&carol, &token_only, p.next, 2)
            .await
            .unwrap();
        assert_eq!((rest.records.len(), rest.next), (1, 0));
        assert!(
            r.engine
                .export_audit(&carol, &Filter::default(), 0, 5001)
                .await
                .is_err()
        );

        let mut tail = r.engine.tail_audit(&carol, 3).unwrap();
        let (rec, _) = tail.next().await.unwrap().unwrap();
        assert_eq!((rec.seq, rec.action.as_str()), (4, "request.parked"));
        r.engine
            .request_token(&workload(), ask(&["read"]))
            .await
            .unwrap();
        let (rec, _) = tail.next().await.unwrap().unwrap();
        assert_eq!(rec.seq, 5, "live after the replay");
        let report = r
            .engine
            .verify_audit(&carol, Vec::new(), None)
            .await
            .unwrap();
        assert_eq!((report.records, report.problem), (5, None));
    }

    #[tokio::test]
    async fn a_tail_passes_undecodable_records_instead_of_reading_them_again() {
        let r = rig(POLICY).await;
        for _ in 0..4 {
            r.engine
                .request_token(&workload(), ask(&["read"]))
                .await
                .unwrap();
        }
        // The newest two records no longer decode.
        r.store.append_audit(3, b"garbage").await.unwrap();
        r.store.append_audit(4, b"garbage").await.unwrap();
        let carol = id("spiffe://t/human/carol");
        let mut tail = r.engine.tail_audit(&carol, 1).unwrap();
        assert_eq!(tail.next().await.unwrap().unwrap().0.seq, 2);
        let engine = r.engine.clone();
        let more = tokio::spawn(async move {
            engine
                .request_token(&workload(), ask(&["read"]))
                .await
                .unwrap();
        });
        let (rec, _) = tokio::time::timeout(std::time::Duration::from_secs(10), tail.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(rec.seq, 5, "past the undecodable records, then live");
        more.await.unwrap();
    }

    #[tokio::test]
    async fn export_pages_are_bounded_by_bytes_as_well_as_count() {
        use crate::audit::{Action, Entry};
        let r = rig(POLICY).await;
        let long = "x".repeat(4000);
        for _ in 0..600 {
            let e = Entry::ok("spiffe://t/w", Action::TokenRefused, "", &[], &long);
            r.engine.note(vec![e]).unwrap();
        }
        let carol = id("spiffe://t/human/carol");
        let first = r
            .engine
            .export_audit(&carol, &Filter::default(), 0, 5000)
            .await
            .unwrap();
        let (page, next) = (first.records, first.next);
        let bytes: usize = page.iter().map(|(_, b)| b.len()).sum();
        assert!(next != 0 && page.len() < 600, "{} records", page.len());
        assert!(bytes < PAGE_BYTES + 8192, "{bytes} bytes");
        let (mut total, mut after) = (page.len(), next);
        while after != 0 {
            let more = r
                .engine
                .export_audit(&carol, &Filter::default(), after, 5000)
                .await
                .unwrap();
            total += more.records.len();
            after = more.next;
        }
        assert_eq!(total, 600, "paging reaches every record");
    }
}
