//! The `Audit` service: export, tail and verify the decision trail.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{caller, convert};
use crate::audit::AuditRecord;
use crate::engine::Engine;
use crate::engine::trail::{Filter, Tail};
use crate::pb;
use crate::pb::audit_server::Audit;

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
        let who = caller(&req)?;
        let m = req.into_inner();
        let filter = Filter {
            since: m.since.map_or(0, |t| {
                u64::try_from(t.seconds).unwrap_or(0).saturating_mul(1000)
            }),
            actor: m.actor,
            target: m.target,
            action: m.action,
        };
        // Records noted just before (a refusal) are in the page.
        self.engine.settled().await?;
        let page = self
            .engine
            .export_audit(&who, &filter, m.after_seq, m.page_size as usize)
            .await?;
        Ok(Response::new(pb::ExportResponse {
            records: page.records.iter().map(|(r, b)| record(r, b)).collect(),
            next_after_seq: page.next,
            checkpoints: page.checkpoints,
        }))
    }

    type TailStream = TailStream;

    async fn tail(
        &self,
        req: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let who = caller(&req)?;
        self.engine.settled().await?;
        let tail = self.engine.tail_audit(&who, req.get_ref().after_seq)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(follow(tail, tx, self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        self.engine.settled().await?;
        let accept = (m.accept_unsigned_compaction > 0).then_some(m.accept_unsigned_compaction);
        let report = self.engine.verify_audit(&who, m.witnessed, accept).await?;
        let problem = report.judged(m.strict, m.allow_uncovered);
        let (first_bad_seq, problem_text) = problem.clone().unwrap_or_default();
        Ok(Response::new(pb::VerifyResponse {
            ok: problem.is_none(),
            records: report.records,
            checkpoints: report.checkpoints,
            first_bad_seq,
            problem: problem_text,
            proved: report.proved(),
            first_seq: report.first,
            last_seq: report.last,
            covered_seq: report.covered,
            notes: report.notes,
        }))
    }
}

/// Send records as the tail yields them until the client goes away or the
/// broker stops.
async fn follow(
    mut tail: Tail,
    tx: mpsc::Sender<Result<pb::AuditRecord, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            n = tail.next() => n,
        };
        let sent = match next {
            Ok(Some((r, bytes))) => tx.send(Ok(record(&r, &bytes))).await,
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
