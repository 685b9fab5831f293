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
        #[arg(
            long,
            required_unless_present = "id_token",
            conflicts_with = "id_token"
        )]
        identity: Option<String>,
        /// A platform token (GitHub Actions, Kubernetes, JWT-SVID) instead
        /// of an identity: which `[[issuer]]` and key verify it, the
        /// identity it maps to, and what that identity gets. Offline: the
        /// keys come from `--jwks`, or the entry's inline or file keys.
        #[arg(long, value_name = "FILE")]
        id_token: Option<PathBuf>,
        /// The issuer's keys (a JWKS file), for `--id-token`.
        #[arg(long, value_name = "FILE", requires = "id_token")]
        jwks: Option<PathBuf>,
        /// Scope (repeat). With `--id-token` and none: every scope the
        /// identity may ask for.
        #[arg(long = "scope", required_unless_present = "id_token")]
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
            id_token,
            jwks,
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
            let who = match (identity, id_token) {
                (Some(i), _) => {
                    Identity::parse(&i).map_err(|e| usage(format!("--identity: {e}")))?
                }
                (None, Some(file)) => match signed_in(out, &p, &file, jwks.as_deref())? {
                    Ok(who) => who,
                    Err(code) => return Ok(code),
                },
                (None, None) => return Err(usage("give --identity or --id-token")),
            };
            if scopes.is_empty() {
                return Ok(open_to(out, &p, &who));
            }
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

/// Verify the platform token in `file` as the broker would (now, offline)
/// and print which issuer, key and identity: `Ok(identity)`, or the exit
/// code after saying which check failed.
fn signed_in(
    out: Output,
    p: &Policy,
    file: &std::path::Path,
    jwks: Option<&std::path::Path>,
) -> Result<Result<Identity, i32>, Failure> {
    use crate::federation::verify::Parsed;
    let text = std::fs::read_to_string(file)
        .map_err(|e| usage(format!("--id-token {}: {e}", file.display())))?;
    let refuse = |what: String| {
        print(
            out,
            &format!("refuse: the token does not sign in: {what}\n"),
            json!({"decision": "refuse", "sign_in": what}),
        );
        Ok(Err(exit::DENIED))
    };
    let parsed = match Parsed::new(text.trim()) {
        Ok(t) => t,
        Err(r) => return refuse(r.check.name()),
    };
    let Some(issuer) = parsed.issuer(p.issuers.values()) else {
        return refuse("no [[issuer]] entry names its `iss` (or its `sub`'s trust domain)".into());
    };
    let (kid, alg) = match parsed.header(issuer) {
        Ok(h) => h,
        Err(r) => return refuse(format!("issuer `{}`: {}", issuer.name, r.check.name())),
    };
    let keys = offline_keys(issuer, jwks)?;
    let Some(key) = keys.find(&kid) else {
        return refuse(format!(
            "issuer `{}`: no key `{}` in its keys",
            issuer.name,
            clean(&kid)
        ));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match parsed.verify(issuer, &alg, key, now) {
        Ok(v) => {
            if out == Output::Text {
                println!(
                    "signed in: issuer `{}` (policy line {}), key `{}` ({alg}), identity {}",
                    issuer.name,
                    issuer.line,
                    clean(&kid),
                    v.identity
                );
            }
            Ok(Ok(v.identity))
        }
        Err(r) => refuse(format!("issuer `{}`: {}", issuer.name, r.check.name())),
    }
}

/// An issuer's keys without the network: `--jwks`, or the entry's own.
fn offline_keys(
    issuer: &crate::policy::Issuer,
    jwks: Option<&std::path::Path>,
) -> Result<jsonwebtoken::jwk::JwkSet, Failure> {
    use crate::policy::KeySource;
    let file = match &issuer.keys {
        KeySource::JwksFile(f) => jwks.or(Some(f.as_path())),
        _ => jwks,
    };
    let text = match (file, &issuer.keys) {
        (Some(f), _) => {
            std::fs::read_to_string(f).map_err(|e| usage(format!("--jwks {}: {e}", f.display())))?
        }
        (None, KeySource::Inline(j)) => j.clone(),
        (None, _) => {
            return Err(usage(format!(
                "issuer `{}` publishes its keys on the network: save them and give --jwks FILE",
                issuer.name
            )));
        }
    };
    serde_json::from_str(&text).map_err(|e| usage(format!("the issuer's keys: {e}")))
}

/// Every scope `who` is a workload of, with its tier.
fn open_to(out: Output, p: &Policy, who: &Identity) -> i32 {
    let open: Vec<_> = p
        .scopes
        .values()
        .filter(|s| {
            s.workloads
                .iter()
                .any(|w| crate::policy::glob_match(w, who.as_str()))
        })
        .collect();
    let text: String = if open.is_empty() {
        format!("{who} may ask for no scope\n")
    } else {
        open.iter()
            .map(|s| {
                let tier = match s.tier {
                    crate::policy::Tier::Auto => "auto: granted at once",
                    crate::policy::Tier::Approval => "approval: parked for approvers",
                };
                format!("  {} ({tier})\n", s.name)
            })
            .collect::<String>()
    };
    let names: Vec<&str> = open.iter().map(|s| s.name.as_str()).collect();
    print(
        out,
        &format!("{who} may ask for:\n{text}"),
        json!({"identity": who.as_str(), "scopes": names}),
    );
    exit::OK
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
