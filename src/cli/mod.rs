//! The command line: `serve`, and client commands that talk to the broker
//! only through the generated gRPC client, one file per command group.
//!
//! Connection flags (`--dev-dir`, `--as`, `--server`, `--cert`, `--key`,
//! `--ca`) and `--output` are global: they go before or after the
//! subcommand. A client command opens one connection per invocation.
//!
//! Exit codes ([`exit`]): 0 success, 1 failure, 2 denied by policy, 3
//! pending or timed out waiting, 64 usage error (bad flags or a field the
//! broker refused).

use clap::{Parser, Subcommand, ValueEnum};

use crate::client::ClientOpts;

mod agent;
mod audit;
mod bench;
mod db;
mod dev;
pub mod exit;
mod keys;
mod lease;
mod policy;
mod render;
mod requests;
mod serve;
mod store;
mod token;
mod ui;

pub use agent::AgentArgs;
pub use audit::{AuditCmd, AuditFormat};
pub use bench::BenchArgs;
pub use exit::Failure;
pub use keys::KeysCmd;
pub use lease::{LeaseCmd, StateArg};
pub use policy::PolicyCmd;
pub use render::fmt_dur;
pub use requests::RequestsCmd;
pub use serve::{AlgArg, DataDirLock, ServeArgs, dev_banner, lock_data_dir, serve_config};
pub use token::TokenCmd;
pub use ui::UiCmd;

/// portcullis: a short-lived credential broker.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about, propagate_version = true)]
pub struct Cli {
    /// Output format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        help_heading = "Output (every command)"
    )]
    pub output: Output,
    /// Log format.
    #[arg(
        long,
        global = true,
        help_heading = "Output (every command)",
        value_enum,
        default_value = "text",
        env = "PORTCULLIS_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// How to reach the broker (client commands).
    #[command(flatten)]
    pub client: ClientOpts,
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document.
    Json,
}

/// Log formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// JSON lines.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Ask for and inspect tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// List, show, renew and revoke leases.
    Lease {
        #[command(subcommand)]
        cmd: LeaseCmd,
    },
    /// Follow your parked requests.
    Requests {
        #[command(subcommand)]
        cmd: RequestsCmd,
    },
    /// Read the published signing keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// The databases login scopes make logins on (admins).
    Db {
        #[command(subcommand)]
        cmd: db::DbCmd,
    },
    /// Read and verify the decision trail (admins and auditors).
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Reach the approver console (a one-time sign-in link).
    Ui {
        #[command(subcommand)]
        cmd: UiCmd,
    },
    /// Check a policy file or explain a decision (offline).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Keep a fresh token in a file (renews at ~2/3 of its life; waits for
    /// approval when needed; runs until interrupted).
    Agent(AgentArgs),
    /// Load-test a running broker with auto-tier token requests.
    Bench(BenchArgs),
    /// Move a broker's state to another store (offline).
    Store {
        #[command(subcommand)]
        cmd: store::StoreCmd,
    },
    /// Stand-ins for the walkthrough (offline, with `--dev-dir`).
    Dev {
        #[command(subcommand)]
        cmd: dev::DevCmd,
    },
}

/// Run a client or offline command (everything except `serve`).
pub async fn run_client(cli: Cli) -> Result<i32, Failure> {
    let out = cli.output;
    let opts = cli.client;
    let command = match cli.command {
        Command::Serve(_) => return Err(exit::usage("serve is run by the binary's main")),
        Command::Policy { cmd } => return policy::run(out, cmd, &opts),
        Command::Agent(args) => return agent::run(args, opts).await,
        Command::Bench(args) => return bench::run(out, args, &opts).await,
        Command::Store { cmd } => return store::run(out, cmd).await,
        Command::Dev { cmd } => return dev::run(cmd, &opts),
        Command::Token { cmd } if cmd.signs_in_with_id_token() => {
            let channel = opts.connect_federation().await?;
            return token::request_with_id_token(out, cmd, channel).await;
        }
        Command::Requests {
            cmd:
                RequestsCmd::Watch {
                    id,
                    claim_secret: Some(secret),
                },
        } => {
            let channel = opts.connect_federation().await?;
            return token::watch_with_claim_secret(out, &id, secret, channel).await;
        }
        other => other,
    };
    // One connection for the whole invocation; every client is made from it.
    let channel = opts.connect().await?;
    match command {
        Command::Token { cmd } => token::run(out, cmd, channel).await,
        Command::Lease { cmd } => lease::run(out, cmd, channel).await,
        Command::Requests { cmd } => requests::run(out, cmd, channel).await,
        Command::Keys { cmd } => keys::run(out, cmd, channel).await,
        Command::Db { cmd } => db::run(out, cmd, channel).await,
        Command::Audit { cmd } => audit::run(out, cmd, channel).await,
        Command::Ui { cmd } => ui::run(out, cmd, channel).await,
        Command::Serve(_)
        | Command::Policy { .. }
        | Command::Agent(_)
        | Command::Bench(_)
        | Command::Store { .. }
        | Command::Dev { .. } => Err(exit::usage("not a client command")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("portcullis").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn connection_flags_go_before_or_after_the_subcommand() {
        for args in [
            &[
                "--dev-dir",
                "D",
                "--as",
                "approver",
                "--output",
                "json",
                "requests",
                "list",
            ][..],
            &[
                "requests",
                "list",
                "--dev-dir",
                "D",
                "--as",
                "approver",
                "--output",
                "json",
            ][..],
            &[
                "requests",
                "--dev-dir",
                "D",
                "list",
                "--as",
                "approver",
                "--output",
                "json",
            ][..],
        ] {
            let cli = parse(args);
            assert_eq!(
                cli.client.dev_dir.as_deref(),
                Some(std::path::Path::new("D")),
                "{args:?}"
            );
            assert_eq!(cli.client.as_, crate::dev::As::Approver, "{args:?}");
            assert_eq!(cli.output, Output::Json, "{args:?}");
        }
        let cli = parse(&[
            "lease", "list", "--server", "h:1", "--cert", "c", "--key", "k", "--ca", "a",
        ]);
        assert_eq!(cli.client.server.as_deref(), Some("h:1"));
        assert!(cli.client.cert.is_some() && cli.client.key.is_some() && cli.client.ca.is_some());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
