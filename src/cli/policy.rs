//! `policy check` and `policy explain`: offline, straight from the file.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;

use super::Output;
use super::exit::{self, Failure, failure, usage};
use super::render::{clean, count, fmt_dur, print};
use crate::client::ClientOpts;
use crate::identity::Identity;
use crate::policy::{Decision, Policy, PolicyError};

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy file and report every problem.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Say what the policy decides for an identity and scopes.
    Explain {
        /// Policy file (default: `policy.toml` in `--dev-dir` /
        /// `$PORTCULLIS_DEV_DIR`, else `./portcullis-dev/policy.toml`).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Asking identity.
        #[arg(long)]
        identity: String,
        /// Scope (repeat).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Wanted TTL.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

/// Run a `policy` subcommand (no connection; `opts` only for `--dev-dir`).
pub fn run(out: Output, cmd: PolicyCmd, opts: &ClientOpts) -> Result<i32, Failure> {
    match cmd {
        PolicyCmd::Check { file } => check(out, &file),
        PolicyCmd::Explain {
            policy,
            identity,
            scopes,
            ttl,
        } => {
            let path = policy.unwrap_or_else(|| {
                opts.dev_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("portcullis-dev"))
                    .join("policy.toml")
            });
            let p = Policy::load(&path).map_err(|e| failure(e.to_string()))?;
            let who = Identity::parse(&identity).map_err(|e| usage(format!("--identity: {e}")))?;
            Ok(explain(out, &p, &who, &scopes, ttl))
        }
    }
}

fn check(out: Output, file: &std::path::Path) -> Result<i32, Failure> {
    match Policy::load(file) {
        Ok(p) => {
            let mut text = format!(
                "ok: {}, {}\n",
                count(p.scopes.len() as u64, "scope"),
                count(p.groups.len() as u64, "group")
            );
            if !p.issuers.is_empty() {
                text.push_str(&format!(
                    "{} whose tokens workloads sign in with on the federation listener (serve --federation-listen)\n",
                    count(p.issuers.len() as u64, "issuer")
                ));
            }
            print(
                out,
                &text,
                json!({"ok": true, "scopes": p.scopes.len(), "groups": p.groups.len(), "issuers": p.issuers.len()}),
            );
            Ok(exit::OK)
        }
        Err(PolicyError::Invalid(problems)) => {
            let text: String = problems
                .iter()
                // Policy text (a name, a URL) may hold terminal controls.
                .map(|p| format!("{}: {}\n", file.display(), clean(&p.to_string())))
                .collect();
            let problems_json: Vec<_> = problems
                .iter()
                .map(|p| json!({"line": p.line, "message": p.message}))
                .collect();
            match out {
                Output::Text => eprint!("{text}"),
                Output::Json => println!("{}", json!({"ok": false, "problems": problems_json})),
            }
            Ok(exit::FAILURE)
        }
        Err(e) => Err(failure(e.to_string())),
    }
}

/// Print the decision: exit 0 for grant or park (an answer, not a waiting
/// request), 2 for refuse.
fn explain(
    out: Output,
    p: &Policy,
    who: &Identity,
    scopes: &[String],
    ttl: Option<Duration>,
) -> i32 {
    match p.decide(who, scopes, ttl) {
        Ok(Decision::Grant {
            ttl,
            max_ttl,
            rules,
        }) => {
            let text = format!(
                "grant at once: ttl {}, renewable to {}\nallowed by: {}\n",
                fmt_dur(ttl),
                fmt_dur(max_ttl),
                rules.join("; ")
            );
            print(
                out,
                &text,
                json!({"decision": "grant", "ttl_seconds": ttl.as_secs(), "max_ttl_seconds": max_ttl.as_secs(), "rules": rules}),
            );
            exit::OK
        }
        Ok(park @ Decision::Park { .. }) => {
            // An offline answer, not a pending request: exit 3 is for
            // requests that are waiting.
            explain_park(out, p, &park);
            exit::OK
        }
        Err(r) => {
            print(
                out,
                &format!("refuse: {r}\n"),
                json!({"decision": "refuse", "scope": r.scope, "reason": r.reason}),
            );
            exit::DENIED
        }
    }
}

fn explain_park(out: Output, p: &Policy, park: &Decision) {
    let Decision::Park {
        ttl,
        pending_ttl,
        requirements,
        ..
    } = park
    else {
        return;
    };
    let (ttl, pending_ttl) = (*ttl, *pending_ttl);
    let mut text = format!(
        "park for approval (waits up to {}), then ttl {}\n",
        fmt_dur(pending_ttl),
        fmt_dur(ttl)
    );
    for r in requirements {
        let members: Vec<String> = r
            .approver_groups
            .iter()
            .flat_map(|g| p.groups.get(g).cloned().unwrap_or_default())
            .collect();
        text.push_str(&format!(
            "  `{}` needs {} from {} ({}) — {}\n",
            r.scope,
            count(u64::from(r.approvals_required), "approval"),
            r.approver_groups.join(", "),
            members.join(", "),
            r.rule
        ));
    }
    let reqs: Vec<_> = requirements.iter().map(|r| json!({"scope": r.scope, "approver_groups": r.approver_groups, "approvals_required": r.approvals_required, "rule": r.rule})).collect();
    print(
        out,
        &text,
        json!({"decision": "park", "ttl_seconds": ttl.as_secs(), "pending_ttl_seconds": pending_ttl.as_secs(), "requirements": reqs}),
    );
}
