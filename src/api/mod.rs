//! `api` translates gRPC to the domain and back. It authenticates the caller
//! (identity from the channel), converts messages, and maps every domain
//! error to a status in one table ([`status`]).

pub mod approvals;
pub mod broker;
pub mod convert;
pub mod keys;
pub mod status;

use tonic::{Request, Status};

use crate::identity::{self, Identity};

/// The caller's identity, from the verified client certificate. Failures are
/// generic on the wire and detailed in the log.
pub fn caller<T>(req: &Request<T>) -> Result<Identity, Status> {
    let certs = req.peer_certs();
    let chain: &[tonic::transport::CertificateDer<'static>] =
        certs.as_deref().map_or(&[], |c| c.as_slice());
    identity::from_peer_certs(chain).map_err(|e| {
        tracing::warn!(peer = ?req.remote_addr(), error = %e, "unauthenticated call");
        Status::unauthenticated("a client certificate with one spiffe:// URI SAN is required")
    })
}
