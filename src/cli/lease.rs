//! `lease`: list, show, tree, renew, revoke, revoke-all.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure};
use super::render::{
    clean, confirm, count, fmt_ts, lease_json, lease_state_name, page_footer, print, print_grant,
    table,
};
use crate::client::convert;
use crate::pb;
use crate::pb::broker_client::BrokerClient;

/// `lease` subcommands.
#[derive(Debug, Subcommand)]
pub enum LeaseCmd {
    /// List leases (yours, or `--subject` as admin).
    List {
        /// Whose leases.
        #[arg(long)]
        subject: Option<String>,
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
    },
    /// Show one lease, where it was delegated from and what was delegated
    /// from it.
    Show {
        /// Lease id.
        id: String,
    },
    /// Print the delegation tree below a lease (token exchanges).
    Tree {
        /// Lease id of the root (any lease you hold, delegated or admin).
        id: String,
    },
    /// Renew a lease and print the fresh token.
    Renew {
        /// Lease id.
        id: String,
        /// Extension from now (default: the original TTL).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke a lease.
    Revoke {
        /// Lease id.
        id: String,
        /// Why it is revoked, recorded in the trail
        #[arg(long)]
        reason: Option<String>,
    },
    /// Revoke every active lease of a subject (admin; incident response),
    /// and what was delegated from them. Asks to confirm on a terminal.
    RevokeAll {
        /// Identity whose leases to revoke.
        #[arg(long)]
        subject: String,
        /// Why they are revoked, recorded in the trail
        #[arg(long)]
        reason: Option<String>,
        /// Do not ask to confirm.
        #[arg(long)]
        yes: bool,
    },
}

/// Lease states for filters.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StateArg {
    /// Live.
    Active,
    /// Ran out.
    Expired,
    /// Ended early.
    Revoked,
}

impl From<StateArg> for pb::LeaseState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Active => Self::Active,
            StateArg::Expired => Self::Expired,
            StateArg::Revoked => Self::Revoked,
        }
    }
}

/// Run a `lease` subcommand over `channel`.
pub async fn run(out: Output, cmd: LeaseCmd, channel: Channel) -> Result<i32, Failure> {
    let mut b = BrokerClient::new(channel);
    match cmd {
        LeaseCmd::List {
            subject,
            state,
            limit,
            page_token,
        } => {
            let req = pb::ListLeasesRequest {
                parent_id: String::new(),
                subject: subject.unwrap_or_default(),
                state: state.map_or(pb::LeaseState::Unspecified, Into::into) as i32,
                page_size: limit,
                page_token: page_token.unwrap_or_default(),
            };
            list(out, &mut b, req).await
        }
        LeaseCmd::Renew { id, ttl } => {
            let req = pb::RenewLeaseRequest {
                lease_id: id,
                ttl: ttl.map(convert::duration),
            };
            let g = b.renew_lease(req).await?.into_inner().grant;
            let g = g.unwrap_or_default();
            match (out, &g.lease) {
                (Output::Text, Some(l)) => {
                    eprintln!("{}", renewed_line(l, ttl));
                    println!("{}", g.token);
                }
                _ => print_grant(out, &g),
            }
            Ok(exit::OK)
        }
        LeaseCmd::RevokeAll {
            subject,
            reason,
            yes,
        } => revoke_all(out, &mut b, subject, reason, yes).await,
        LeaseCmd::Show { id } => show(out, &mut b, id).await,
        LeaseCmd::Tree { id } => tree(out, &mut b, id).await,
        LeaseCmd::Revoke { id, reason } => revoke(out, &mut b, id, reason).await,
    }
}

/// `lease revoke-all`: confirmed on a terminal, then the counts.
async fn revoke_all(
    out: Output,
    b: &mut BrokerClient<Channel>,
    subject: String,
    reason: Option<String>,
    yes: bool,
) -> Result<i32, Failure> {
    let who = clean(&subject).into_owned();
    confirm(
        &format!("This revokes every active lease of {who}, and every lease delegated from them."),
        yes,
    )?;
    let req = pb::RevokeLeasesRequest {
        subject: subject.clone(),
        reason: reason.unwrap_or_default(),
    };
    let r = b.revoke_leases(req).await?.into_inner();
    print(
        out,
        &format!(
            "revoked {} of {who}, and {} delegated from them\n",
            count(r.revoked, "active lease"),
            count(r.descendants_revoked, "lease")
        ),
        json!({"subject": subject, "revoked": r.revoked, "descendants_revoked": r.descendants_revoked}),
    );
    Ok(exit::OK)
}

/// `lease revoke`: the lease, and how many delegated from it ended.
async fn revoke(
    out: Output,
    b: &mut BrokerClient<Channel>,
    id: String,
    reason: Option<String>,
) -> Result<i32, Failure> {
    let req = pb::RevokeLeaseRequest {
        lease_id: id,
        reason: reason.unwrap_or_default(),
    };
    let r = b.revoke_lease(req).await?.into_inner();
    let l = r.lease.unwrap_or_default();
    let mut text = lease_text(&l);
    let mut value = lease_json(&l);
    if r.descendants_revoked > 0 {
        text.push_str(&format!(
            "ended with it: {} delegated from it\n",
            count(r.descendants_revoked, "lease")
        ));
    }
    value["descendants_revoked"] = json!(r.descendants_revoked);
    print(out, &text, value);
    Ok(exit::OK)
}

async fn list(
    out: Output,
    b: &mut BrokerClient<Channel>,
    req: pb::ListLeasesRequest,
) -> Result<i32, Failure> {
    let r = b.list_leases(req).await?.into_inner();
    let rows: Vec<Vec<String>> = r
        .leases
        .iter()
        .map(|l| {
            vec![
                l.id.clone(),
                lease_state_name(l.state).to_owned(),
                l.scopes.join(" "),
                format!("expires {}", fmt_ts(&l.expires_at)),
            ]
        })
        .collect();
    let mut text = table(&rows);
    page_footer(
        &mut text,
        r.leases.is_empty(),
        "no leases",
        &r.next_page_token,
    );
    print(
        out,
        &text,
        json!({"leases": r.leases.iter().map(lease_json).collect::<Vec<_>>(), "next_page_token": r.next_page_token}),
    );
    Ok(exit::OK)
}

/// One lease, with the ids of its children.
async fn show(out: Output, b: &mut BrokerClient<Channel>, id: String) -> Result<i32, Failure> {
    let l = b
        .get_lease(pb::GetLeaseRequest {
            lease_id: id.clone(),
        })
        .await?;
    let children = children(b, &id, 100).await?;
    let l = l.into_inner().lease.unwrap_or_default();
    let mut text = lease_text(&l);
    if !children.is_empty() {
        let ids: Vec<&str> = children.iter().map(|c| c.id.as_str()).collect();
        text.push_str(&format!("children   {}\n", ids.join(" ")));
    }
    let mut j = lease_json(&l);
    j["children"] = json!(children.iter().map(|c| c.id.clone()).collect::<Vec<_>>());
    print(out, &text, j);
    Ok(exit::OK)
}

/// The leases delegated directly from `parent`, every page, at most `max`.
async fn children(
    b: &mut BrokerClient<Channel>,
    parent: &str,
    max: usize,
) -> Result<Vec<pb::Lease>, Failure> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = b
            .list_leases(pb::ListLeasesRequest {
                parent_id: parent.to_owned(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(r.leases);
        if r.next_page_token.is_empty() || out.len() >= max {
            out.truncate(max);
            return Ok(out);
        }
        page_token = r.next_page_token;
    }
}

/// Most leases `lease tree` prints.
const TREE_MAX: usize = 10_000;

/// Print the tree below `id`, depth first, one lease a line.
async fn tree(out: Output, b: &mut BrokerClient<Channel>, id: String) -> Result<i32, Failure> {
    let root = b
        .get_lease(pb::GetLeaseRequest { lease_id: id })
        .await?
        .into_inner()
        .lease
        .unwrap_or_default();
    let mut text = String::new();
    let mut nodes = Vec::new();
    let mut stack = vec![(root, 0usize)];
    while let Some((l, level)) = stack.pop() {
        text.push_str(&format!(
            "{}{}  {}  {}  {}  expires {}\n",
            "  ".repeat(level),
            l.id,
            lease_state_name(l.state),
            l.subject,
            l.scopes.join(" "),
            fmt_ts(&l.expires_at)
        ));
        if nodes.len() < TREE_MAX {
            let below = children(b, &l.id, TREE_MAX - nodes.len()).await?;
            stack.extend(below.into_iter().rev().map(|c| (c, level + 1)));
        }
        nodes.push(lease_json(&l));
    }
    print(out, &text, json!({ "leases": nodes }));
    Ok(exit::OK)
}

fn lease_text(l: &pb::Lease) -> String {
    let mut s = format!(
        "lease      {}\nstate      {}\nsubject    {}\nscopes     {}\naudience   {}\nissued     {}\nexpires    {}\nmax expiry {}\nrenewals   {}\nkid        {}\n",
        l.id,
        lease_state_name(l.state),
        l.subject,
        l.scopes.join(" "),
        l.audience,
        fmt_ts(&l.issued_at),
        fmt_ts(&l.expires_at),
        fmt_ts(&l.max_expires_at),
        l.renewals,
        l.kid
    );
    if !l.parent_id.is_empty() {
        s.push_str(&format!(
            "parent     {} (depth {})\nactors     {}\n",
            l.parent_id,
            l.depth,
            l.actors.join(" <- ")
        ));
    }
    if !l.cnf_x5t_s256.is_empty() {
        s.push_str(&format!("bound to   x5t#S256 {}\n", l.cnf_x5t_s256));
    }
    if !l.login_role.is_empty() {
        s.push_str(&format!(
            "login      {} on database {} (ended with the lease)\n",
            clean(&l.login_role),
            clean(&l.login_target)
        ));
    }
    if l.revoked_at.is_some() {
        s.push_str(&format!(
            "revoked    {} by {} ({})\n",
            fmt_ts(&l.revoked_at),
            l.revoked_by,
            clean(&l.revoke_reason)
        ));
    }
    s
}

/// What a renewal gave: until when, and — when less than asked — why.
fn renewed_line(l: &pb::Lease, asked: Option<Duration>) -> String {
    let until = convert::until(l.expires_at.as_ref());
    let mut line = format!("renewed lease {} until {}", l.id, fmt_ts(&l.expires_at));
    // A second of slack for the time the call took.
    if let Some(asked) = asked.filter(|a| until + Duration::from_secs(2) < *a) {
        line.push_str(&format!(
            ", not the {} asked: capped at the lease's max expiry {} (first issue + the scope's max_ttl, what approvers allowed, or its parent's end)",
            convert::fmt_dur(asked),
            fmt_ts(&l.max_expires_at)
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 27, item 8: a renewal shorter than asked says why.
    #[test]
    fn a_capped_renewal_says_what_capped_it() {
        let in_secs = |s: u64| {
            Some(convert::timestamp(
                std::time::SystemTime::now() + Duration::from_secs(s),
            ))
        };
        let lease = pb::Lease {
            id: "l_1".into(),
            expires_at: in_secs(60),
            max_expires_at: in_secs(60),
            ..Default::default()
        };
        let line = renewed_line(&lease, Some(Duration::from_secs(600)));
        assert!(line.starts_with("renewed lease l_1 until "), "{line}");
        assert!(line.contains("not the 10m asked: capped at"), "{line}");
        let line = renewed_line(&lease, Some(Duration::from_secs(60)));
        assert!(!line.contains("capped"), "{line}");
        assert!(!renewed_line(&lease, None).contains("capped"));
    }
}
