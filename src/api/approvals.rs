//! The `Approvals` service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{caller, convert};
use crate::console::Console;
use crate::engine::Engine;
use crate::pb;
use crate::pb::approvals_server::Approvals;

/// `Approvals` over an [`Engine`].
pub struct ApprovalsService {
    engine: Arc<Engine>,
    console: Option<Arc<Console>>,
}

impl ApprovalsService {
    /// A service over `engine`, making sign-in links for `console` if the
    /// broker serves one.
    pub fn new(engine: Arc<Engine>, console: Option<Arc<Console>>) -> Self {
        Self { engine, console }
    }
}

#[tonic::async_trait]
impl Approvals for ApprovalsService {
    async fn list_pending(
        &self,
        req: Request<pb::ListPendingRequest>,
    ) -> Result<Response<pb::ListPendingResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let (reqs, next) = self
            .engine
            .list_pending(&who, m.page_size as usize, &m.page_token)
            .await?;
        Ok(Response::new(pb::ListPendingResponse {
            requests: reqs.iter().map(convert::request).collect(),
            next_page_token: next,
        }))
    }

    async fn get_request(
        &self,
        req: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::GetRequestResponse>, Status> {
        let who = caller(&req)?;
        // Never a token here: this is the reviewer's view.
        let r = self
            .engine
            .get_request(&who, &req.get_ref().request_id)
            .await?;
        Ok(Response::new(pb::GetRequestResponse {
            request: Some(convert::request(&r)),
            grant: None,
        }))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApproveResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let ttl = convert::ttl(m.ttl, "ttl")?;
        let r = self
            .engine
            .approve(&who, &m.request_id, &m.reason, ttl, &m.digest)
            .await?;
        Ok(Response::new(pb::ApproveResponse {
            request: Some(convert::request(&r)),
        }))
    }

    async fn deny(
        &self,
        req: Request<pb::DenyRequest>,
    ) -> Result<Response<pb::DenyResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let r = self.engine.deny(&who, &m.request_id, &m.reason).await?;
        Ok(Response::new(pb::DenyResponse {
            request: Some(convert::request(&r)),
        }))
    }

    async fn acknowledge(
        &self,
        req: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::AcknowledgeResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let r = self
            .engine
            .acknowledge(&who, &m.request_id, &m.reason, m.revoke)
            .await?;
        Ok(Response::new(pb::AcknowledgeResponse {
            request: Some(convert::request(&r)),
        }))
    }

    async fn create_console_link(
        &self,
        req: Request<pb::CreateConsoleLinkRequest>,
    ) -> Result<Response<pb::CreateConsoleLinkResponse>, Status> {
        let who = caller(&req)?;
        let Some(console) = &self.console else {
            return Err(super::status::no_console());
        };
        let (url, expires_at) = console.link(&who, &req.get_ref().request_id).await?;
        Ok(Response::new(pb::CreateConsoleLinkResponse {
            url,
            expires_at: Some(convert::ts(expires_at)),
        }))
    }

    async fn end_console_sessions(
        &self,
        req: Request<pb::EndConsoleSessionsRequest>,
    ) -> Result<Response<pb::EndConsoleSessionsResponse>, Status> {
        let who = caller(&req)?;
        let Some(console) = &self.console else {
            return Err(super::status::no_console());
        };
        let m = req.get_ref();
        console
            .end_sessions_of(&who, &m.identity, &m.reason)
            .await?;
        Ok(Response::new(pb::EndConsoleSessionsResponse {}))
    }
}
