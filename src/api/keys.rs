//! The `Keys` service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{caller, convert};
use crate::grant::Engine;
use crate::pb;
use crate::pb::keys_server::Keys;
use crate::store::KeyState;

/// `Keys` over the key ring.
pub struct KeysService {
    engine: Arc<Engine>,
}

impl KeysService {
    /// A service over the engine's key ring.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl Keys for KeysService {
    async fn get_jwks(
        &self,
        req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        caller(&self.engine, &req)?;
        Ok(Response::new(pb::GetJwksResponse {
            jwks_json: self.engine.keys().current().jwks_json.clone(),
        }))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        caller(&self.engine, &req)?;
        let set = self.engine.keys().current();
        let keys = set
            .records
            .iter()
            .map(|r| pb::KeyInfo {
                kid: r.kid.clone(),
                alg: r.alg.clone(),
                state: match r.state {
                    KeyState::Next => pb::KeyState::Next,
                    KeyState::Active => pb::KeyState::Active,
                    KeyState::Retired => pb::KeyState::Retired,
                } as i32,
                created_at: Some(convert::ts(r.created_at)),
                activated_at: r.activated_at.map(convert::ts),
                retire_at: r.retire_at.map(convert::ts),
            })
            .collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }
}
