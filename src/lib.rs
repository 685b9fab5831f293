#![forbid(unsafe_code)]
//! portcullis: a short-lived credential broker. Workloads authenticate with
//! mTLS (SPIFFE-style URI identities) and receive ephemeral scoped JWTs;
//! routine scopes are granted at once by policy, privileged ones wait for
//! named humans; every grant is a durable lease that expires, renews and can
//! be revoked.
//!
//! # Layout
//! - [`identity`]: who is calling (URI SAN of the client certificate).
//! - [`policy`]: decides — grant, park for approval, or refuse.
//! - [`store`]: remembers — the storage trait, sled and in-memory backends,
//!   group commit.
//! - [`keys`], [`jose`]: sign — the sealed key ring, JWKS, the ring-backed
//!   jsonwebtoken provider.
//! - [`token`]: mint and verify the RFC 9068 access tokens.
//! - [`grant`]: moves state — issuance, parking, renew, revoke, introspect.
//! - [`approval`]: moves parked requests — approve, deny, review, claim once.
//! - [`audit`]: the hash-chained, checkpointed decision trail.
//! - [`notify`]: webhooks for request events, off the request path.
//! - [`expiry`]: time-driven work (lease and request deadlines).
//! - [`api`]: translates gRPC to the domain and back (one error table).
//! - [`server`]: wires it all up (TLS, listeners, tasks, shutdown).
//! - [`dev`]: the zero-config dev CA, identities and policy.
//! - [`client`], [`cli`], [`bench`]: the command-line side, speaking only
//!   through the generated gRPC client.

pub mod agent;
pub mod api;
pub mod approval;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod dev;
pub mod expiry;
pub mod fsutil;
pub mod grant;
pub mod identity;
pub mod jose;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod rotation;
pub mod server;
pub mod store;
pub mod token;

/// Generated gRPC types (`proto/portcullis/v1`).
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("portcullis.v1");

    /// Encoded descriptors of every portcullis proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/portcullis_descriptor.bin"));
}
