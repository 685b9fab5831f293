//! `audit`: tail, export and verify the decision trail.

use clap::{Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure, usage};
use super::render::{clean, count, fmt_ts, print};
use crate::client::convert;
use crate::pb;
use crate::pb::audit_client::AuditClient;

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Follow new records as they are written.
    Tail {
        /// Replay records after this sequence number first.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// `jsonl` prints each record's canonical JSON (what the chain
        /// hashes); the same as `--output json`. Default: text.
        #[arg(long, value_enum)]
        format: Option<AuditFormat>,
    },
    /// Print records, filtered.
    Export {
        /// Only records this recent (e.g. `1h`) or since this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only this actor.
        #[arg(long)]
        actor: Option<String>,
        /// Only this action, or a prefix ending in `.` (e.g. `lease.`).
        #[arg(long)]
        action: Option<String>,
        /// Only this target (lease, request or key id).
        #[arg(long)]
        target: Option<String>,
        /// `jsonl` prints each record's canonical JSON (what the chain
        /// hashes); the same as `--output json`. Default: text.
        #[arg(long, value_enum)]
        format: Option<AuditFormat>,
    },
    /// Walk the hash chain and the signed checkpoints; say what was proved.
    Verify {
        /// Fail when records after the newest checkpoint are not signed yet.
        #[arg(long)]
        strict: bool,
        /// The broker's external witness file (`serve --audit-witness`), or
        /// a saved `audit export --format jsonl`: its newest checkpoints must
        /// still be matched by the store.
        #[arg(long)]
        witness: Option<std::path::PathBuf>,
        /// Accept a trail no signed checkpoint covers (the chain alone
        /// proves nothing against someone who can rewrite it whole).
        #[arg(long)]
        allow_uncovered: bool,
        /// Accept a compaction to record N whose record carries no
        /// signature: trails compacted by a build before signed compactions.
        #[arg(long, value_name = "N")]
        accept_unsigned_compaction: Option<u64>,
    },
}

/// Audit output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuditFormat {
    /// One line per record for people.
    Text,
    /// JSON Lines: each record's canonical JSON, for a SIEM.
    Jsonl,
}

/// The format of a stream of records: `--output json` asks for JSON, which
/// for a stream is JSON Lines (as `--format jsonl`); `--output json` with
/// `--format text` is refused rather than one of them ignored.
fn stream_format(out: Output, format: Option<AuditFormat>) -> Result<AuditFormat, Failure> {
    match (out, format) {
        (Output::Json, Some(AuditFormat::Text)) => Err(usage(
            "--output json and --format text ask for different things: give one",
        )),
        (Output::Json, _) => Ok(AuditFormat::Jsonl),
        (Output::Text, f) => Ok(f.unwrap_or(AuditFormat::Text)),
    }
}

/// Run an `audit` subcommand over `channel`.
pub async fn run(out: Output, cmd: AuditCmd, channel: Channel) -> Result<i32, Failure> {
    let mut a = AuditClient::new(channel);
    match cmd {
        AuditCmd::Verify {
            strict,
            witness,
            allow_uncovered,
            accept_unsigned_compaction,
        } => {
            let witnessed = match witness {
                Some(path) => newest_lines(&path, WITNESS_SENT)?,
                None => Vec::new(),
            };
            let asked = pb::VerifyRequest {
                strict,
                witnessed,
                allow_uncovered,
                accept_unsigned_compaction: accept_unsigned_compaction.unwrap_or(0),
            };
            verify(out, &mut a, asked).await
        }
        AuditCmd::Export {
            since,
            actor,
            action,
            target,
            format,
        } => {
            let filter = pb::ExportRequest {
                since: since.as_deref().map(parse_since).transpose()?,
                actor: actor.unwrap_or_default(),
                action: action.unwrap_or_default(),
                target: target.unwrap_or_default(),
                after_seq: 0,
                page_size: 5000,
            };
            export(&mut a, filter, stream_format(out, format)?).await
        }
        AuditCmd::Tail { after, format } => {
            let format = stream_format(out, format)?;
            let mut stream = a
                .tail(pb::TailRequest { after_seq: after })
                .await?
                .into_inner();
            while let Some(r) = stream.message().await? {
                print!("{}", audit_line(&r, format));
            }
            Ok(exit::OK)
        }
    }
}

/// Witnessed checkpoints sent with a verify: the newest are what a
/// truncation or rollback would contradict.
const WITNESS_SENT: usize = 16;

/// The last `n` non-empty lines of `path`.
fn newest_lines(path: &std::path::Path, n: usize) -> Result<Vec<String>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| super::exit::failure(format!("`{}`: {e}", path.display())))?;
    // A witness file holds one JWS per line; a JSON Lines export holds
    // `{"checkpoint": JWS}` lines among the records.
    let lines: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            match serde_json::from_str::<serde_json::Value>(l) {
                Ok(v) => v["checkpoint"].as_str().map(str::to_owned),
                Err(_) => (!l.is_empty()).then(|| l.to_owned()),
            }
        })
        .collect();
    Ok(lines[lines.len().saturating_sub(n)..].to_vec())
}

async fn verify(
    out: Output,
    a: &mut AuditClient<Channel>,
    asked: pb::VerifyRequest,
) -> Result<i32, Failure> {
    let r = a.verify(asked).await?.into_inner();
    let mut text = if r.ok {
        format!(
            "verified {} and {}: {}\n",
            count(r.records, "record"),
            count(r.checkpoints, "signed checkpoint"),
            r.proved
        )
    } else {
        format!(
            "BROKEN at record {}: {} ({} records verified before it)\n",
            r.first_bad_seq, r.problem, r.records
        )
    };
    for n in &r.notes {
        text.push_str(&format!("note: {}\n", clean(n)));
    }
    print(
        out,
        &text,
        json!({"ok": r.ok, "records": r.records, "checkpoints": r.checkpoints, "first_bad_seq": r.first_bad_seq, "problem": r.problem, "notes": r.notes, "proved": r.proved, "first_seq": r.first_seq, "last_seq": r.last_seq, "covered_seq": r.covered_seq}),
    );
    Ok(if r.ok { exit::OK } else { exit::FAILURE })
}

/// Page through the export, printing as it goes.
async fn export(
    a: &mut AuditClient<Channel>,
    mut filter: pb::ExportRequest,
    format: AuditFormat,
) -> Result<i32, Failure> {
    loop {
        let page = a.export(filter.clone()).await?.into_inner();
        let mut text: String = page.records.iter().map(|r| audit_line(r, format)).collect();
        for jws in &page.checkpoints {
            text.push_str(&checkpoint_line(jws, format));
        }
        print!("{text}");
        if page.next_after_seq == 0 {
            return Ok(exit::OK);
        }
        filter.after_seq = page.next_after_seq;
    }
}

/// A signed checkpoint in an export: JSON Lines carry it whole, so the
/// export itself can serve as a witness (`audit verify --witness FILE`);
/// people get one line — what it covers, which key signed it, when (read
/// from the JWS, not verified here: `audit verify` does that).
fn checkpoint_line(jws: &str, format: AuditFormat) -> String {
    match format {
        AuditFormat::Jsonl => format!("{}\n", json!({ "checkpoint": jws })),
        AuditFormat::Text => match checkpoint_summary(jws) {
            Some((seq, kid, at)) => format!(
                "     - checkpoint over records ..{seq}, signed by key {} at {}\n",
                clean(&kid),
                fmt_ts(&Some(convert::timestamp(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(at)
                )))
            ),
            None => "     - checkpoint (unreadable: run `audit verify`)\n".to_owned(),
        },
    }
}

/// The sequence number, signing key and time a checkpoint JWS states.
fn checkpoint_summary(jws: &str) -> Option<(u64, String, u64)> {
    use base64::Engine as _;
    let decode = |part: &str| -> Option<serde_json::Value> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let mut parts = jws.split('.');
    let (header, claims) = (decode(parts.next()?)?, decode(parts.next()?)?);
    Some((
        claims["seq"].as_u64()?,
        header["kid"].as_str()?.to_owned(),
        claims["at"].as_u64()?,
    ))
}

fn audit_line(r: &pb::AuditRecord, format: AuditFormat) -> String {
    match format {
        AuditFormat::Jsonl => format!("{}\n", r.canonical_json),
        AuditFormat::Text => format!(
            "{:>6} {} {:<24} {:<8} {} {} {}{}\n",
            r.seq,
            fmt_ts(&r.at),
            r.action,
            r.outcome,
            clean(&r.actor),
            clean(&r.target),
            r.scopes.join(" "),
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(" — {}", clean(&r.reason))
            }
        ),
    }
}

/// `--since`: a duration ago (`1h`) or an RFC 3339 time.
fn parse_since(s: &str) -> Result<prost_types::Timestamp, Failure> {
    let t = match humantime::parse_duration(s) {
        Ok(ago) => std::time::SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(std::time::UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            usage(format!(
                "--since: `{s}` is neither a duration nor an RFC 3339 time"
            ))
        })?,
    };
    let mut ts = convert::timestamp(t);
    ts.nanos = 0;
    Ok(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 27, item 9: people read a checkpoint as one short line; the
    /// JSON Lines export keeps the whole JWS for `audit verify --witness`.
    #[test]
    fn a_checkpoint_is_one_readable_line_for_people() {
        use base64::Engine as _;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let jws = format!(
            "{}.{}.c2ln",
            b64(serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "audit-checkpoint+jwt"})),
            b64(
                serde_json::json!({"iss": "x", "seq": 26, "hash": "h", "at": 1_796_656_717_000_u64, "prev": "p"})
            )
        );
        assert_eq!(
            checkpoint_line(&jws, AuditFormat::Text),
            "     - checkpoint over records ..26, signed by key k1 at 2026-12-07T15:18:37Z\n"
        );
        assert!(checkpoint_line(&jws, AuditFormat::Jsonl).contains(&jws));
        assert!(checkpoint_line("garbage", AuditFormat::Text).contains("unreadable"));
    }

    /// Issue 9, finding 2: a newline in a stored reason cannot forge a
    /// whole record line in `audit export` text output.
    #[test]
    fn one_record_is_one_line() {
        let r = pb::AuditRecord {
            seq: 7,
            action: "request.parked".into(),
            actor: "spiffe://t/w".into(),
            reason: "fine\n     8 2026-01-01T00:00:00Z request.approved ok alice".into(),
            ..Default::default()
        };
        let line = audit_line(&r, AuditFormat::Text);
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(line.contains("fine\\u{a}     8"), "{line}");
    }

    /// A witness file and a JSON Lines export both yield their checkpoints.
    #[test]
    fn witnessed_checkpoints_come_from_a_witness_file_or_an_export() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w");
        std::fs::write(&file, "eyJa.b.c\n\neyJd.e.f\n").unwrap();
        assert_eq!(newest_lines(&file, 16).unwrap(), ["eyJa.b.c", "eyJd.e.f"]);
        assert_eq!(newest_lines(&file, 1).unwrap(), ["eyJd.e.f"]);
        let export = format!(
            "{}\n{}\n",
            r#"{"seq":1,"action":"token.granted"}"#,
            checkpoint_line("eyJx.y.z", AuditFormat::Jsonl).trim()
        );
        std::fs::write(&file, export).unwrap();
        assert_eq!(newest_lines(&file, 16).unwrap(), ["eyJx.y.z"]);
    }
}
