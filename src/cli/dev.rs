//! `dev`: stand-ins the walkthrough needs on a machine with no CI system.
//! `dev id-token` signs a token as the dev directory's CI issuer (the dev
//! policy's `[[issuer]] dev_ci`), shaped like a GitHub Actions OIDC token.

use clap::Subcommand;

use super::exit::{Failure, OK, failure, usage};
use crate::client::ClientOpts;
use crate::dev::DevDir;

/// `dev` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Print a CI job's OIDC token signed by the dev CI issuer (valid for
    /// five minutes; usable once). Defaults: repository 4242 of owner
    /// 1001, environment `prod`.
    IdToken {
        /// A claim to set or replace, `NAME=VALUE` (repeat), e.g.
        /// `--claim environment=staging`.
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
    },
}

/// Run a `dev` subcommand (offline).
pub fn run(cmd: DevCmd, opts: &ClientOpts) -> Result<i32, Failure> {
    let dir = opts
        .dev_dir
        .as_ref()
        .map(DevDir::new)
        .ok_or_else(|| usage("dev commands need --dev-dir (or PORTCULLIS_DEV_DIR)"))?;
    match cmd {
        DevCmd::IdToken { claims } => {
            let mut set = serde_json::Map::new();
            for c in claims {
                let (name, value) = c
                    .split_once('=')
                    .filter(|(n, _)| !n.is_empty())
                    .ok_or_else(|| usage(format!("--claim `{c}`: write NAME=VALUE")))?;
                set.insert(name.to_owned(), serde_json::Value::String(value.to_owned()));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let token = dir.ci_token(set, now).map_err(|e| failure(e.to_string()))?;
            println!("{token}");
            Ok(OK)
        }
    }
}
