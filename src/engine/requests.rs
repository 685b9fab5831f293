//! Requests as their requester (and their approvers) see them: read,
//! withdraw, and watch — the watch protocol claims an approved request's
//! token on the way, exactly once among every watcher and reader.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::{Cas, Engine, EngineError, Holder, may_decide};
use crate::audit::{Action, Entry as AuditEntry};
use crate::identity::Identity;
use crate::model::{Lease, RequestState, TokenRequest};
use crate::notify::EventKind;
use crate::text::{FieldError, REQUEST_PAGE, check_reason, page_size, require_id};

/// Open requests read per store scan.
const SCAN: usize = 256;

/// A token handed over with its lease (the token is a secret: never log it).
pub type Delivered = (String, Lease, Option<Box<crate::logins::Issued>>);

impl Engine {
    /// Request `id` if `who` may see it; otherwise NOT_FOUND (never hint
    /// that someone else's request exists).
    async fn visible_request(&self, who: &Identity, id: &str) -> Result<TokenRequest, EngineError> {
        let req = self
            .store()
            .request(id)
            .await?
            .ok_or_else(|| EngineError::not_found("request", id))?;
        let policy = self.policy();
        // The identity that delegated a parked exchange follows it too.
        let delegator = req
            .delegation
            .as_ref()
            .and_then(|d| d.actors.first())
            .is_some_and(|a| a == who.as_str());
        if req.requester == who.as_str()
            || delegator
            || policy.is_admin(who)
            || may_decide(&policy, who, &req)
        {
            Ok(req)
        } else {
            Err(EngineError::not_found("request", id))
        }
    }

    /// Read a request (requester, eligible approver or admin).
    pub async fn get_request(&self, who: &Identity, id: &str) -> Result<TokenRequest, EngineError> {
        require_id("request_id", id)?;
        self.visible_request(who, id).await
    }

    /// Withdraw one's own pending or approved request.
    pub async fn withdraw_request(
        &self,
        who: &Identity,
        id: &str,
        reason: &str,
    ) -> Result<TokenRequest, EngineError> {
        require_id("request_id", id)?;
        check_reason("reason", reason, false)?;
        self.visible_request(who, id).await?;
        let out = self
            .commit(|mut op| async move {
                let now = self.clock.now();
                let out = self
                    .records
                    .edit_request(&mut op, id, |req| {
                        if req.requester != who.as_str() {
                            return Err(EngineError::NotAllowed(format!(
                                "only the requester may withdraw request `{id}`"
                            )));
                        }
                        super::end_request(req, RequestState::Withdrawn, who, now, reason)
                    })
                    .await?;
                if let Cas::Swapped { new, .. } = &out {
                    op.record(vec![AuditEntry::ok(
                        who.as_str(),
                        Action::RequestWithdrawn,
                        id,
                        &new.scopes,
                        reason,
                    )])?;
                }
                Ok((op, out))
            })
            .await?;
        let Cas::Swapped { new, .. } = out else {
            return Err(EngineError::not_found("request", id));
        };
        self.announce(EventKind::Withdrawn, &new, who.as_str(), reason);
        tracing::info!(request_id = %id, sub = %who, "withdrawn");
        Ok(new)
    }

    /// The request as `holder` may see it. For its requester an APPROVED
    /// request is claimed on the way, and the token comes back exactly once
    /// (to whichever caller's claim wins), bound to the holder's
    /// certificate where its scopes say so.
    pub async fn read_and_claim(
        &self,
        holder: &Holder,
        id: &str,
    ) -> Result<(TokenRequest, Option<Delivered>), EngineError> {
        let who = &holder.who;
        let r = self.get_request(who, id).await?;
        if r.state != RequestState::Approved || r.requester != who.as_str() {
            return Ok((r, None));
        }
        match self.claim(who, holder.x5t.as_deref(), id).await? {
            Some((token, lease, issued, login)) => Ok((issued, Some((token, lease, login)))),
            // Another call claimed it first: report what is stored now.
            None => Ok((self.get_request(who, id).await?, None)),
        }
    }

    /// `who`'s own open requests, oldest first, after `page_token`.
    pub async fn list_my_requests(
        &self,
        who: &Identity,
        page_size_asked: usize,
        page_token: &str,
    ) -> Result<(Vec<TokenRequest>, String), EngineError> {
        self.page_open_requests(Some(who), page_size_asked, page_token, |r| {
            r.requester == who.as_str()
        })
        .await
    }

    /// A page of the open requests `keep` selects, oldest first, after
    /// `page_token`, and the token of the next page (empty: no more).
    /// `party`: only requests it is a party to are read (through the
    /// store's index), else every open request.
    pub(super) async fn page_open_requests(
        &self,
        party: Option<&Identity>,
        page_size_asked: usize,
        page_token: &str,
        keep: impl Fn(&TokenRequest) -> bool,
    ) -> Result<(Vec<TokenRequest>, String), EngineError> {
        let size = page_size(page_size_asked, REQUEST_PAGE)?;
        if !page_token.is_empty() {
            require_id("page_token", page_token)
                .map_err(|_| FieldError::new("page_token", "not a valid token"))?;
        }
        let mut out = Vec::new();
        let mut after = (!page_token.is_empty()).then(|| page_token.to_owned());
        loop {
            let chunk = match party {
                Some(who) => {
                    self.store()
                        .open_requests_of(who.as_str(), after.as_deref(), SCAN)
                        .await?
                }
                None => self.store().open_requests(after.as_deref(), SCAN).await?,
            };
            let exhausted = chunk.len() < SCAN;
            for r in chunk {
                after = Some(r.id.clone());
                if !keep(&r) {
                    continue;
                }
                if out.len() == size {
                    let next = out.last().map(|l: &TokenRequest| l.id.clone());
                    return Ok((out, next.unwrap_or_default()));
                }
                out.push(r);
            }
            if exhausted {
                return Ok((out, String::new()));
            }
        }
    }

    /// Follow request `id` as `holder`: fails now if it is not visible.
    pub async fn watch(self: &Arc<Self>, holder: &Holder, id: &str) -> Result<Watch, EngineError> {
        // Subscribe before the first read so no change can slip between.
        let events = self.request_events();
        self.get_request(&holder.who, id).await?;
        let permit = self.watch_permit(&holder.who)?;
        Ok(Watch {
            _permit: permit,
            engine: self.clone(),
            holder: holder.clone(),
            id: id.to_owned(),
            events,
            last: None,
        })
    }
}

/// One change a watcher is told about.
#[derive(Debug)]
pub struct Update {
    /// The request now.
    pub request: TokenRequest,
    /// The token, when this read claimed it. If it cannot be handed over,
    /// pass its lease to [`Engine::revoke_undelivered`].
    pub grant: Option<Delivered>,
}

/// The watch protocol: [`Watch::read`] the request (claiming it for its
/// requester), then [`Watch::changed`] to wait for the next change, until
/// [`Watch::finished`].
pub struct Watch {
    /// Counts against the identity's watch streams until dropped.
    _permit: super::WatchPermit,
    engine: Arc<Engine>,
    holder: Holder,
    id: String,
    events: broadcast::Receiver<String>,
    last: Option<TokenRequest>,
}

impl Watch {
    /// Read the request now: `Some` when it differs from what was last
    /// returned or carries a token. Not cancel-safe (a claim may be under
    /// way): await it to completion.
    pub async fn read(&mut self) -> Result<Option<Update>, EngineError> {
        let (current, grant) = self.engine.read_and_claim(&self.holder, &self.id).await?;
        if self.last.as_ref() == Some(&current) && grant.is_none() {
            return Ok(None);
        }
        self.last = Some(current.clone());
        Ok(Some(Update {
            request: current,
            grant,
        }))
    }

    /// A token [`Watch::read`] returned could not be handed over: revoke its
    /// lease so no copy can ever be used.
    pub async fn undelivered(&self, lease: &Lease) {
        self.engine.revoke_undelivered(lease).await;
    }

    /// Has the request reached a state that will not change again?
    pub fn finished(&self) -> bool {
        self.last.as_ref().is_some_and(|r| r.state.is_terminal())
    }

    /// Wait until this request may have changed (others' events are skipped
    /// without a read). `false` when the broker stops announcing. Cancel-safe.
    pub async fn changed(&mut self) -> bool {
        loop {
            match self.events.recv().await {
                Ok(changed) if changed == self.id || changed == super::shared::ANY_REQUEST => {
                    return true;
                }
                Ok(_) => {}
                // Missed events: re-read to be safe.
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{POLICY, id, parked, rig, workload};

    #[tokio::test]
    async fn only_the_requester_withdraws_and_strangers_see_nothing() {
        let r = rig(POLICY).await;
        let req = parked(&r, &["admin"]).await;
        let eve = id("spiffe://t/human/eve");
        let err = r.engine.get_request(&eve, &req.id).await.unwrap_err();
        assert!(matches!(err, EngineError::NotFound { .. }), "{err}");
        let alice = id("spiffe://t/human/alice");
        let err = r
            .engine
            .withdraw_request(&alice, &req.id, "")
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::NotAllowed(_)), "{err}");
        let w = r
            .engine
            .withdraw_request(&workload(), &req.id, "changed my mind")
            .await
            .unwrap();
        assert_eq!(w.state, RequestState::Withdrawn);
        let err = r
            .engine
            .withdraw_request(&workload(), &req.id, "")
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::WrongState(_)), "{err}");
    }

    #[tokio::test]
    async fn a_requester_lists_their_own_open_requests_only() {
        let r = rig(POLICY).await;
        let mine = parked(&r, &["admin"]).await;
        let gone = parked(&r, &["admin", "read"]).await;
        r.engine
            .withdraw_request(&workload(), &gone.id, "")
            .await
            .unwrap();
        let (list, next) = r.engine.list_my_requests(&workload(), 0, "").await.unwrap();
        assert_eq!(
            list.iter().map(|q| q.id.as_str()).collect::<Vec<_>>(),
            [mine.id.as_str()]
        );
        assert!(next.is_empty());
        let alice = id("spiffe://t/human/alice");
        assert!(
            r.engine
                .list_my_requests(&alice, 0, "")
                .await
                .unwrap()
                .0
                .is_empty()
        );
        let err = r
            .engine
            .list_my_requests(&workload(), 501, "")
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Invalid(ref f) if f.field == "page_size"));
    }

    #[tokio::test]
    async fn a_watch_reports_each_change_and_delivers_the_token_once() {
        let r = rig(POLICY).await;
        let req = parked(&r, &["admin"]).await;
        let mut watch = r.engine.watch(&workload().into(), &req.id).await.unwrap();
        let first = watch.read().await.unwrap().unwrap();
        assert_eq!(first.request.state, RequestState::Pending);
        assert!(watch.read().await.unwrap().is_none(), "unchanged");
        for who in ["spiffe://t/human/alice", "spiffe://t/human/bob"] {
            r.engine
                .approve(&id(who), &req.id, "", None, "")
                .await
                .unwrap();
        }
        assert!(watch.changed().await);
        let done = watch.read().await.unwrap().unwrap();
        assert_eq!(done.request.state, RequestState::Issued);
        assert!(done.grant.is_some(), "claimed on the way");
        assert!(watch.finished());
        let (_, again) = r
            .engine
            .read_and_claim(&workload().into(), &req.id)
            .await
            .unwrap();
        assert!(again.is_none(), "exactly once");
    }
}
