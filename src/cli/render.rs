//! Shared rendering: text or JSON output, timestamps, durations, state
//! names, aligned columns, page footers, grants and leases.

use serde_json::json;

use super::Output;
use crate::client::convert;
use crate::pb;

/// Print `text` (text output) or `value` as one JSON document.
pub fn print(out: Output, text: &str, value: serde_json::Value) {
    match out {
        Output::Text => print!("{text}"),
        Output::Json => println!("{value}"),
    }
}

/// An RFC 3339 time to the second, or `-` when absent.
pub fn fmt_ts(t: &Option<prost_types::Timestamp>) -> String {
    match t {
        Some(t) => humantime::format_rfc3339_seconds(convert::system_time(t)).to_string(),
        None => "-".into(),
    }
}

/// [`fmt_ts`] for JSON: the string, or `null` when absent.
pub fn ts_json(t: &Option<prost_types::Timestamp>) -> serde_json::Value {
    t.as_ref()
        .map_or(serde_json::Value::Null, |_| fmt_ts(t).into())
}

pub use crate::client::convert::fmt_dur;

/// Text that came from someone else (a justification, a reason, an actor),
/// with anything that could move the cursor, erase or reorder the screen
/// written as an escape instead: what reaches a terminal is what was sent.
pub fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    crate::text::escape_controls(text)
}

/// A lease state's name.
pub fn lease_state_name(v: i32) -> &'static str {
    match pb::LeaseState::try_from(v) {
        Ok(pb::LeaseState::Active) => "active",
        Ok(pb::LeaseState::Expired) => "expired",
        Ok(pb::LeaseState::Revoked) => "revoked",
        _ => "unknown",
    }
}

/// A request state's name.
pub fn request_state_name(v: i32) -> &'static str {
    match pb::RequestState::try_from(v) {
        Ok(pb::RequestState::Pending) => "pending",
        Ok(pb::RequestState::Approved) => "approved",
        Ok(pb::RequestState::Issued) => "issued",
        Ok(pb::RequestState::Denied) => "denied",
        Ok(pb::RequestState::Withdrawn) => "withdrawn",
        Ok(pb::RequestState::Expired) => "expired",
        _ => "unknown",
    }
}

/// Rows as aligned columns (two spaces apart; the last column is not
/// padded), one line each.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 < row.len() {
                let pad = widths[c].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            } else {
                line.push_str(cell);
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// The end of a listed page: a word when it is empty, how to go on.
pub fn page_footer(text: &mut String, empty: bool, when_empty: &str, next: &str) {
    if empty {
        text.push_str(when_empty);
        text.push('\n');
    }
    if !next.is_empty() {
        text.push_str(&format!("more: --page-token {next}\n"));
    }
}

/// A granted token: the token alone on stdout, the lease summary on stderr
/// (text), or both as one JSON document.
///
/// With a database login (a login scope) the text form puts the login on
/// stdout instead, as `PG*` lines a shell can `eval` and libpq reads.
pub fn print_grant(out: Output, g: &pb::Grant) {
    match out {
        Output::Text => {
            if let Some(l) = &g.lease {
                eprintln!(
                    "granted lease {} ({}) until {}",
                    l.id,
                    l.scopes.join(" "),
                    fmt_ts(&l.expires_at)
                );
            }
            match &g.login {
                Some(login) => {
                    eprintln!(
                        "database login `{}` on `{}` (ends with the lease; the password is shown once)",
                        login.user, login.target
                    );
                    print!("{}", crate::client::login::env(login));
                }
                None => println!("{}", g.token),
            }
        }
        Output::Json => println!(
            "{}",
            json!({
                "token": g.token,
                "lease": g.lease.as_ref().map(lease_json),
                "login": g.login.as_ref().map(|l| json!({
                    "user": l.user, "password": l.password, "host": l.host, "port": l.port,
                    "dbname": l.dbname, "target": l.target, "sslmode": l.sslmode, "url": crate::client::login::url(l),
                })),
            })
        ),
    }
}

/// A lease as JSON.
pub fn lease_json(l: &pb::Lease) -> serde_json::Value {
    json!({
        "id": l.id, "subject": l.subject, "client_id": l.client_id, "scopes": l.scopes,
        "audience": l.audience, "state": lease_state_name(l.state), "kid": l.kid,
        "issued_at": ts_json(&l.issued_at), "expires_at": ts_json(&l.expires_at),
        "max_expires_at": ts_json(&l.max_expires_at), "renewals": l.renewals,
        "revoked_at": ts_json(&l.revoked_at), "revoked_by": l.revoked_by, "revoke_reason": l.revoke_reason,
        "justification": l.justification, "request_id": l.request_id,
        "break_glass": l.break_glass, "approved_by": l.approved_by,
        "parent_id": l.parent_id, "depth": l.depth, "actors": l.actors,
        "cnf_x5t_s256": l.cnf_x5t_s256,
        "login_target": l.login_target, "login_role": l.login_role,
    })
}

/// Ask the person at the terminal to confirm `what` (a destructive act)
/// unless `yes`; with no terminal on stdin (a script, a pipe) there is no
/// one to ask and the command goes on, as `--yes` says.
pub fn confirm(what: &str, yes: bool) -> Result<(), super::exit::Failure> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if yes || !std::io::stdin().is_terminal() {
        return Ok(());
    }
    eprint!("{what}\nType `yes` to go on (or pass --yes): ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| super::exit::failure(format!("reading the answer: {e}")))?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(super::exit::failure("not confirmed: nothing was done"))
    }
}

/// `n` and `word`, with an `s` unless `n` is 1: "1 lease", "2 leases".
pub fn count(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_are_compact() {
        let s = Duration::from_secs;
        assert_eq!(fmt_dur(s(86_400)), "1d");
        assert_eq!(fmt_dur(s(9_000)), "2h 30m");
        assert_eq!(fmt_dur(s(45)), "45s");
        assert_eq!(fmt_dur(s(1_799)), "29m 59s");
        assert_eq!(fmt_dur(s(3_630)), "1h");
        assert_eq!(fmt_dur(s(300)), "5m");
        assert_eq!(fmt_dur(Duration::ZERO), "0s");
        assert_eq!(fmt_dur(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["a".to_owned(), "active".to_owned(), "x".to_owned()],
            vec!["bbb".to_owned(), "revoked".to_owned(), "y".to_owned()],
        ];
        assert_eq!(table(&rows), "a    active   x\nbbb  revoked  y\n");
    }
}
