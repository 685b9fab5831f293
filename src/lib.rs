#![forbid(unsafe_code)]
// Functions stay short enough to read at once (threshold in clippy.toml).
#![deny(clippy::too_many_lines)]
//! portcullis: a short-lived credential broker. Workloads authenticate with
//! mTLS (SPIFFE-style URI identities) and receive ephemeral scoped JWTs;
//! routine scopes are granted at once by policy, privileged ones wait for
//! named humans; every grant is a durable lease that expires, renews and can
//! be revoked.
//!
//! The map of the modules — what each holds, which it uses, the files of
//! each directory — is `docs/architecture.md`, "Modules and their
//! direction"; `tests/layering.rs` fails when the code and that map
//! disagree.

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
pub mod federation;
pub mod fsutil;
pub mod identity;
pub mod jose;
pub mod keys;
pub mod logins;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod rotation;
pub mod server;
pub mod store;
pub mod text;
pub mod tls;
pub mod token;
pub mod vocab;

/// Generated gRPC types (`proto/portcullis/v1`).
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("portcullis.v1");

    /// Encoded descriptors of every portcullis proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/portcullis_descriptor.bin"));

    /// Metadata carrying a parked request's claim secret (a caller signed
    /// in with a platform token, on the federation listener).
    pub const CLAIM_SECRET_METADATA: &str = "x-portcullis-claim-secret";
    /// RFC 8693's token type of a signed JWT: a platform token in
    /// `ExchangeTokenRequest.subject_token_type`.
    pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
}
