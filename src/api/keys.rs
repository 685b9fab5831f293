//! The `Keys` service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{caller, convert};
use crate::engine::Engine;
use crate::engine::rotate::Rotation;
use crate::model::KeyState;
use crate::pb;
use crate::pb::keys_server::Keys;
use crate::rotation::Schedule;

/// `Keys` over the key ring.
pub struct KeysService {
    engine: Arc<Engine>,
    schedule: Schedule,
    wake: Arc<tokio::sync::Notify>,
}

impl KeysService {
    /// A service over the engine's key ring; `wake` nudges the rotation task.
    pub fn new(engine: Arc<Engine>, schedule: Schedule, wake: Arc<tokio::sync::Notify>) -> Self {
        Self {
            engine,
            schedule,
            wake,
        }
    }

    fn infos(&self) -> Vec<pb::KeyInfo> {
        self.engine
            .keys()
            .current()
            .records
            .iter()
            .map(|r| pb::KeyInfo {
                kid: r.kid.clone(),
                alg: r.alg.clone(),
                state: match r.state {
                    KeyState::Next => pb::KeyState::Next,
                    KeyState::Active => pb::KeyState::Active,
                    KeyState::Retired => pb::KeyState::Retired,
                    KeyState::Removed => pb::KeyState::Removed,
                    KeyState::Withdrawn => pb::KeyState::Withdrawn,
                } as i32,
                created_at: Some(convert::ts(r.created_at)),
                activated_at: r.activated_at.map(convert::ts),
                retire_at: r.retire_at.map(convert::ts),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Keys for KeysService {
    async fn get_jwks(
        &self,
        req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        caller(&req)?;
        Ok(Response::new(pb::GetJwksResponse {
            jwks_json: self.engine.keys().current().jwks_json.clone(),
        }))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        caller(&req)?;
        Ok(Response::new(pb::ListKeysResponse { keys: self.infos() }))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let ask = Rotation {
            emergency: m.emergency,
            kid: m.kid,
            reason: m.reason,
        };
        let done = self.engine.rotate_now(&who, ask, &self.schedule).await?;
        self.wake.notify_one();
        Ok(Response::new(pb::RotateResponse {
            keys: self.infos(),
            withdrawn: done.withdrawn,
            leases_revoked: done.leases,
            descendants_revoked: done.descendants,
        }))
    }

    async fn rotate_database_root(
        &self,
        req: Request<pb::RotateDatabaseRootRequest>,
    ) -> Result<Response<pb::RotateDatabaseRootResponse>, Status> {
        let who = caller(&req)?;
        let m = req.into_inner();
        let at = self
            .engine
            .rotate_db_root(&who, &m.database, &m.reason)
            .await?;
        Ok(Response::new(pb::RotateDatabaseRootResponse {
            database: m.database,
            rotated_at: Some(convert::ts(at)),
        }))
    }
}
