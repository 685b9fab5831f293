#![forbid(unsafe_code)]
// Functions stay short enough to read at once (threshold in clippy.toml).
#![deny(clippy::too_many_lines)]
//! portcullis: a short-lived credential broker. Workloads authenticate with
//! mTLS (SPIFFE-style URI identities) and receive ephemeral scoped JWTs;
//! routine scopes are granted at once by policy, privileged ones wait for
//! named humans; every grant is a durable lease that expires, renews and can
//! be revoked. `docs/architecture.md` draws the modules and the paths of a
//! grant and of an approval.
//!
//! # Layout (each module uses only the ones listed before it)
//! - [`text`], [`vocab`], [`clock`], [`identity`]: leaves — limits and
//!   checks on outside text, the trail's typed vocabularies, time, who is
//!   calling.
//! - [`model`]: the domain records (leases, requests, approvals, keys).
//! - [`store`]: remembers — the contract (reads, and one atomic batch per
//!   operation), the sled, in-memory and PostgreSQL backends, group commit.
//! - [`jose`], [`keys`], [`token`], [`rotation`]: sign — the sealed key
//!   ring and JWKS, the RFC 9068 access tokens, the pure rotation plan.
//! - [`policy`]: decides — grant, park for approval, or refuse.
//! - [`audit`]: the hash-chained, checkpointed decision trail.
//! - [`metrics`], [`notify`]: counters and webhooks, off the request path.
//! - [`engine`]: moves state — one file per job over a private core.
//! - [`console`]: the approver console on the HTTP listener (OpenID or
//!   one-time-link sign-in, server-rendered pages over the same engine
//!   calls as the `Approvals` service).
//! - [`api`]: translates gRPC to the engine and back (one error table).
//! - [`server`]: wires it all up (TLS, listeners, tasks, shutdown).
//! - [`fsutil`], [`dev`]: atomic private files; the zero-config dev CA,
//!   identities and policy.
//! - [`client`], [`agent`], [`bench`], [`cli`]: the command-line side,
//!   speaking to the broker only through the generated gRPC client.

pub mod agent;
pub mod api;
pub mod audit;
pub mod bench;
pub mod chain;
pub mod cli;
pub mod client;
pub mod clock;
pub mod console;
pub mod dev;
pub mod engine;
pub mod fsutil;
pub mod identity;
pub mod jose;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod rotation;
pub mod server;
pub mod store;
pub mod text;
pub mod token;
pub mod vocab;

/// Generated gRPC types (`proto/portcullis/v1`).
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("portcullis.v1");

    /// Encoded descriptors of every portcullis proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/portcullis_descriptor.bin"));
}
