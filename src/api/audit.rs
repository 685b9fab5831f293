//! The `Audit` service: export, tail and verify the decision trail.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{caller, convert};
use crate::audit::AuditRecord;
use crate::grant::{Engine, GrantError};
use crate::identity::Identity;
use crate::pb;
use crate::pb::audit_server::Audit;

const PAGE: usize = 500;
const MAX_PAGE: usize = 5000;

/// `Audit` over an [`Engine`].
pub struct AuditService {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

impl AuditService {
    /// A service; tails end when `shutdown` fires.
    pub fn new(engine: Arc<Engine>, shutdown: CancellationToken) -> Self {
        Self { engine, shutdown }
    }

    fn auditor<T>(&self, req: &Request<T>) -> Result<Identity, Status> {
        let who = caller(&self.engine, req)?;
        if self.engine.policy().is_auditor(&who) {
            Ok(who)
        } else {
            Err(GrantError::NotAllowed(
                "reading the audit trail needs an admin or auditor identity".into(),
            )
            .into())
        }
    }
}

/// A stored record to proto (the canonical bytes travel with it, so a
/// client can re-check the chain itself).
pub fn record(r: &AuditRecord, bytes: &[u8]) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        at: Some(convert::ts(r.at)),
        actor: r.actor.clone(),
        action: r.action.clone(),
        target: r.target.clone(),
        scopes: r.scopes.clone(),
        outcome: r.outcome.clone(),
        reason: r.reason.clone(),
        rule: r.rule.clone(),
        peer: r.peer.clone(),
        call_id: r.call_id.clone(),
        prev: r.prev.clone(),
        canonical_json: String::from_utf8_lossy(bytes).into_owned(),
    }
}

type TailStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

#[tonic::async_trait]
impl Audit for AuditService {
    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        self.auditor(&req)?;
        let m = req.into_inner();
        let size = match m.page_size as usize {
            0 => PAGE,
            n if n > MAX_PAGE => {
                return Err(GrantError::Invalid {
                    field: "page_size",
                    reason: format!("at most {MAX_PAGE}"),
                }
                .into());
            }
            n => n,
        };
        let since = m.since.map_or(0, |t| {
            u64::try_from(t.seconds).unwrap_or(0).saturating_mul(1000)
        });
        let wants = |r: &AuditRecord| {
            r.at >= since
                && (m.actor.is_empty() || r.actor == m.actor)
                && (m.target.is_empty() || r.target == m.target)
                && (m.action.is_empty()
                    || r.action == m.action
                    || (m.action.ends_with('.') && r.action.starts_with(&m.action)))
        };
        let store = self.engine.store();
        let mut out = Vec::new();
        let mut after = (m.after_seq > 0).then_some(m.after_seq);
        loop {
            let page = store.audit_after(after, 4096).map_err(GrantError::from)?;
            let done = page.len() < 4096;
            for (seq, bytes) in page {
                after = Some(seq);
                let r: AuditRecord = serde_json::from_slice(&bytes).map_err(|_| {
                    Status::data_loss(format!(
                        "audit record {seq} does not decode; run `portcullis audit verify`"
                    ))
                })?;
                if wants(&r) {
                    out.push(record(&r, &bytes));
                    if out.len() == size {
                        return Ok(Response::new(pb::ExportResponse {
                            records: out,
                            next_after_seq: seq,
                        }));
                    }
                }
            }
            if done {
                return Ok(Response::new(pb::ExportResponse {
                    records: out,
                    next_after_seq: 0,
                }));
            }
        }
    }

    type TailStream = TailStream;

    async fn tail(
        &self,
        req: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        self.auditor(&req)?;
        let after = req.into_inner().after_seq;
        // Subscribe first, then replay: a record appended in between shows
        // up in both and is skipped by sequence number.
        let mut live = self.engine.audit().subscribe();
        let store = self.engine.store().clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut last = after;
            if after > 0 {
                loop {
                    let page = match store.audit_after(Some(last), 1024) {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(GrantError::from(e).into())).await;
                            return;
                        }
                    };
                    if page.is_empty() {
                        break;
                    }
                    for (seq, bytes) in page {
                        last = seq;
                        if let Ok(r) = serde_json::from_slice::<AuditRecord>(&bytes)
                            && tx.send(Ok(record(&r, &bytes))).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    n = live.recv() => n,
                };
                match next {
                    Ok((r, bytes)) if r.seq > last || last == 0 => {
                        last = r.seq;
                        if tx.send(Ok(record(&r, &bytes))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "tail fell {n} records behind; resume with after_seq = {last}"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        self.auditor(&req)?;
        let store = self.engine.store().clone();
        let keys = self.engine.keys().current();
        let report =
            tokio::task::spawn_blocking(move || crate::audit::verify(store.as_ref(), &keys))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(GrantError::from)?;
        let (first_bad_seq, problem) = report.problem.clone().unwrap_or_default();
        Ok(Response::new(pb::VerifyResponse {
            ok: report.problem.is_none(),
            records: report.records,
            checkpoints: report.checkpoints,
            first_bad_seq,
            problem,
        }))
    }
}
