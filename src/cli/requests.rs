//! `requests`: list, show, approve, deny, acknowledge, watch and withdraw
//! parked requests; the request renderers; the waiting loop shared with
//! `token request --wait`.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use tonic::transport::Channel;

use super::Output;
use super::exit::{self, Failure, failure};
use super::render::{
    clean, fmt_dur, fmt_ts, page_footer, print, print_grant, request_state_name, table, ts_json,
};
use crate::client::convert;
use crate::pb;
use crate::pb::approvals_client::ApprovalsClient;
use crate::pb::broker_client::BrokerClient;

/// `requests` subcommands.
#[derive(Debug, Subcommand)]
pub enum RequestsCmd {
    /// Requests you may decide now (approvers), oldest first.
    List {
        /// Page size.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
        /// Your own open requests (as a requester), instead of what you may
        /// decide (as an approver).
        #[arg(long)]
        mine: bool,
    },
    /// Approve a request (as an approver).
    Approve {
        /// Request id.
        id: String,
        /// Why you approve, recorded in the trail and shown to the
        /// requester (required when the scope's approval rule says so)
        #[arg(long)]
        reason: Option<String>,
        /// Grant a shorter TTL than requested.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// The digest you reviewed (from `requests show`); refused if the request differs.
        #[arg(long)]
        digest: Option<String>,
    },
    /// Deny a request (as an approver). A reason is required.
    Deny {
        /// Request id.
        id: String,
        /// Why you deny (required), recorded in the trail and shown to the
        /// requester
        #[arg(long)]
        reason: String,
    },
    /// Acknowledge a break-glass grant after the fact (as an approver).
    Ack {
        /// Request id.
        id: String,
        /// What the review found, recorded in the trail (required with
        /// --revoke)
        #[arg(long)]
        reason: Option<String>,
        /// Also revoke the break-glass lease.
        #[arg(long)]
        revoke: bool,
    },
    /// Show one request.
    Show {
        /// Request id.
        id: String,
    },
    /// Follow a request until it ends.
    Watch {
        /// Request id.
        id: String,
        /// The claim secret of a request made with a platform token
        /// (`token request --id-token`; `@FILE` reads it from a file, `-`
        /// from stdin): no certificate is used, the federation listener is.
        #[arg(long, env = "PORTCULLIS_CLAIM_SECRET", hide_env_values = true)]
        claim_secret: Option<String>,
    },
    /// Withdraw your pending request.
    Withdraw {
        /// Request id.
        id: String,
        /// Why you withdraw it, recorded in the trail
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Run a `requests` subcommand; the broker and approvals clients share
/// `channel`.
pub async fn run(out: Output, cmd: RequestsCmd, channel: Channel) -> Result<i32, Failure> {
    let mut a = ApprovalsClient::new(channel.clone());
    let mut b = BrokerClient::new(channel);
    match cmd {
        RequestsCmd::List {
            limit,
            page_token,
            mine: false,
        } => list(out, &mut a, limit, page_token).await,
        RequestsCmd::List {
            limit,
            page_token,
            mine: true,
        } => list_mine(out, &mut b, limit, page_token).await,
        RequestsCmd::Watch { id, .. } => {
            watch(out, &mut b, &id, Duration::from_secs(24 * 3600), None).await
        }
        RequestsCmd::Show { id } => {
            // The reviewer's view: reading never claims a token.
            let r = a
                .get_request(pb::GetRequestRequest { request_id: id })
                .await?
                .into_inner()
                .request
                .unwrap_or_default();
            print(out, &request_detail(&r), request_json(&r));
            Ok(exit::OK)
        }
        cmd => {
            let r = change(&mut a, &mut b, cmd).await?.unwrap_or_default();
            print(out, &request_text(&r), request_json(&r));
            Ok(exit::OK)
        }
    }
}

/// The subcommands that move a request: approve, deny, ack, withdraw.
async fn change(
    a: &mut ApprovalsClient<Channel>,
    b: &mut BrokerClient<Channel>,
    cmd: RequestsCmd,
) -> Result<Option<pb::TokenRequest>, Failure> {
    Ok(match cmd {
        RequestsCmd::Approve {
            id,
            reason,
            ttl,
            digest,
        } => {
            let req = pb::ApproveRequest {
                request_id: id,
                reason: reason.unwrap_or_default(),
                ttl: ttl.map(convert::duration),
                digest: digest.unwrap_or_default(),
            };
            a.approve(req).await?.into_inner().request
        }
        RequestsCmd::Deny { id, reason } => {
            let req = pb::DenyRequest {
                request_id: id,
                reason,
            };
            a.deny(req).await?.into_inner().request
        }
        RequestsCmd::Ack { id, reason, revoke } => {
            let req = pb::AcknowledgeRequest {
                request_id: id,
                reason: reason.unwrap_or_default(),
                revoke,
            };
            a.acknowledge(req).await?.into_inner().request
        }
        RequestsCmd::Withdraw { id, reason } => {
            let req = pb::WithdrawRequestRequest {
                request_id: id,
                reason: reason.unwrap_or_default(),
            };
            b.withdraw_request(req).await?.into_inner().request
        }
        RequestsCmd::List { .. } | RequestsCmd::Show { .. } | RequestsCmd::Watch { .. } => None,
    })
}

async fn list(
    out: Output,
    a: &mut ApprovalsClient<Channel>,
    limit: u32,
    page_token: Option<String>,
) -> Result<i32, Failure> {
    let r = a
        .list_pending(pb::ListPendingRequest {
            page_size: limit,
            page_token: page_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_list(out, &r.requests, &r.next_page_token, "nothing to decide");
    Ok(exit::OK)
}

async fn list_mine(
    out: Output,
    b: &mut BrokerClient<Channel>,
    limit: u32,
    page_token: Option<String>,
) -> Result<i32, Failure> {
    let r = b
        .list_my_requests(pb::ListMyRequestsRequest {
            page_size: limit,
            page_token: page_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_list(
        out,
        &r.requests,
        &r.next_page_token,
        "no open requests of yours",
    );
    Ok(exit::OK)
}

/// One line per request: id, what it waits for, requester, scopes, why.
fn print_list(out: Output, requests: &[pb::TokenRequest], next: &str, when_empty: &str) {
    let rows: Vec<Vec<String>> = requests
        .iter()
        .map(|q| {
            let kind = if q.review_pending {
                "break-glass review"
            } else {
                request_state_name(q.state)
            };
            vec![
                q.id.clone(),
                kind.to_owned(),
                q.requester.clone(),
                q.scopes.join(" "),
                format!("\"{}\"", clean(&q.justification)),
            ]
        })
        .collect();
    let mut text = table(&rows);
    page_footer(&mut text, requests.is_empty(), when_empty, next);
    print(
        out,
        &text,
        json!({"requests": requests.iter().map(request_json).collect::<Vec<_>>(), "next_page_token": next}),
    );
}

/// A request as JSON.
pub fn request_json(r: &pb::TokenRequest) -> serde_json::Value {
    json!({
        "id": r.id, "requester": r.requester, "scopes": r.scopes, "audience": r.audience,
        "ttl_seconds": r.ttl.as_ref().map(|d| d.seconds), "state": request_state_name(r.state),
        "created_at": ts_json(&r.created_at), "expires_at": ts_json(&r.expires_at),
        "justification": r.justification, "digest": r.digest, "lease_id": r.lease_id,
        "waiting_for": r.waiting_for.iter().map(|w| json!({
            "scope": w.scope, "approver_groups": w.approver_groups,
            "approvals_required": w.approvals_required, "approvals_received": w.approvals_received, "rule": w.rule, "description": w.description,
        })).collect::<Vec<_>>(),
        "history": r.history.iter().map(|t| json!({
            "from": request_state_name(t.from), "to": request_state_name(t.to), "actor": t.actor,
            "at": ts_json(&t.at), "reason": t.reason,
        })).collect::<Vec<_>>(),
        "sign_in": r.sign_in.as_ref().map(|si| json!({
            "issuer": si.issuer, "subject": si.subject, "claims_digest": si.claims_digest,
            "evidence": si.evidence,
        })),
    })
}

fn is_pending(r: &pb::TokenRequest) -> bool {
    r.state == pb::RequestState::Pending as i32
}

/// One requirement: received against required, and from whom.
fn requirement_line(r: &pb::TokenRequest, w: &pb::Requirement) -> String {
    let count = format!(
        "{} of {} approvals for `{}` from {}",
        w.approvals_received,
        w.approvals_required,
        w.scope,
        w.approver_groups.join(", ")
    );
    if w.approvals_received >= w.approvals_required {
        format!("received   {count}: complete\n")
    } else if is_pending(r) {
        format!("waits for  {count}\n")
    } else {
        format!("received   {count}\n")
    }
}

/// The summary of a request: state, what it has and what it still needs.
pub fn request_text(r: &pb::TokenRequest) -> String {
    let mut s = format!(
        "request    {}\nstate      {}\nrequester  {}\nscopes     {}\nexpires    {}\n",
        r.id,
        request_state_name(r.state),
        r.requester,
        r.scopes.join(" "),
        fmt_ts(&r.expires_at)
    );
    for w in &r.waiting_for {
        s.push_str(&requirement_line(r, w));
    }
    match pb::RequestState::try_from(r.state) {
        Ok(pb::RequestState::Approved) => {
            s.push_str("next       nothing more needed: the requester claims the token\n");
        }
        Ok(pb::RequestState::Issued) if !r.lease_id.is_empty() => {
            s.push_str(&format!("lease      {}\n", r.lease_id));
        }
        Ok(pb::RequestState::Denied | pb::RequestState::Withdrawn | pb::RequestState::Expired) => {
            if let Some(t) = r.history.last() {
                s.push_str(&format!("ended      {}\n", ended_by(t)));
            }
        }
        _ => {}
    }
    s
}

/// `by ACTOR: REASON` of the transition that ended a request.
fn ended_by(t: &pb::Transition) -> String {
    let mut s = request_state_name(t.to).to_owned();
    if t.at.is_some() {
        s.push_str(&format!(" at {}", fmt_ts(&t.at)));
    }
    if !t.actor.is_empty() {
        s.push_str(&format!(" by {}", t.actor));
    }
    if !t.reason.is_empty() {
        s.push_str(&format!(": {}", clean(&t.reason)));
    }
    s
}

/// One line of history; the first transition has no `from`: the creation.
fn history_line(t: &pb::Transition) -> String {
    let from = match pb::RequestState::try_from(t.from) {
        Ok(pb::RequestState::Unspecified) | Err(_) => "created",
        Ok(_) => request_state_name(t.from),
    };
    let mut s = format!(
        "history    {} {from} -> {}",
        fmt_ts(&t.at),
        request_state_name(t.to)
    );
    if !t.actor.is_empty() {
        s.push_str(&format!(" by {}", t.actor));
    }
    if !t.reason.is_empty() {
        s.push_str(&format!(" ({})", clean(&t.reason)));
    }
    s.push('\n');
    s
}

/// Everything an approver needs to decide.
fn request_detail(r: &pb::TokenRequest) -> String {
    let mut s = request_text(r);
    s.push_str(&format!(
        "audience   {}\nttl        {}\ncreated    {}\nreason     {}\ndigest     {}\n",
        r.audience,
        fmt_dur(
            r.ttl
                .as_ref()
                .map(convert::from_duration)
                .unwrap_or_default()
        ),
        fmt_ts(&r.created_at),
        clean(&r.justification),
        r.digest
    ));
    if let Some(si) = &r.sign_in {
        s.push_str(&sign_in_lines(si));
    }
    for w in &r.waiting_for {
        if !w.description.is_empty() {
            s.push_str(&format!(
                "allows     {}: {}\n",
                clean(&w.scope),
                clean(&w.description)
            ));
        }
        s.push_str(&format!("rule       {}\n", clean(&w.rule)));
    }
    for a in &r.approvals {
        s.push_str(&format!(
            "approved   by {} at {} ({})\n",
            a.approver,
            fmt_ts(&a.at),
            clean(&a.reason)
        ));
    }
    for t in &r.history {
        s.push_str(&history_line(t));
    }
    if r.break_glass {
        s.push_str(&format!(
            "break-glass {}\n",
            if r.review_pending {
                "awaiting review".to_owned()
            } else {
                format!("acknowledged by {} ({})", r.reviewed_by, r.review_reason)
            }
        ));
    }
    s
}

/// A requester that signed in with its platform's token: which issuer, its
/// `sub`, and the verified claims naming the run or pod (escaped: they
/// come from the platform, not from us).
fn sign_in_lines(si: &pb::SignIn) -> String {
    let mut evidence: Vec<_> = si.evidence.iter().collect();
    evidence.sort();
    let evidence: Vec<String> = evidence
        .into_iter()
        .map(|(k, v)| format!("{}={:?}", clean(k), clean(v).as_ref()))
        .collect();
    format!(
        "signed in  with a token of issuer `{}` (sub {}; claims sha256:{})\nevidence   {}\n",
        clean(&si.issuer),
        clean(&si.subject),
        clean(&si.claims_digest),
        evidence.join(" ")
    )
}

/// One line of status while waiting, with the time left as of now.
fn status_line(r: &pb::TokenRequest) -> String {
    match pb::RequestState::try_from(r.state) {
        Ok(pb::RequestState::Pending) => {
            let needs: Vec<String> = r
                .waiting_for
                .iter()
                .filter(|w| w.approvals_received < w.approvals_required)
                .map(|w| {
                    format!(
                        "`{}` has {} of {} approvals (from {})",
                        w.scope,
                        w.approvals_received,
                        w.approvals_required,
                        w.approver_groups.join(" or ")
                    )
                })
                .collect();
            let left = fmt_dur(convert::until(r.expires_at.as_ref()));
            format!("[{}] pending: {}; {left} left", r.id, needs.join("; "))
        }
        Ok(pb::RequestState::Approved) => format!("[{}] approved; claiming the token", r.id),
        _ => match r.history.last() {
            Some(t) if t.to == r.state => format!("[{}] {}", r.id, ended_by(t)),
            _ => format!("[{}] {}", r.id, request_state_name(r.state)),
        },
    }
}

/// Where waiting shows its progress: a live, redrawn line on a terminal;
/// plain lines on each change otherwise; JSON documents with `--output json`.
struct Progress {
    out: Output,
    live: bool,
    last: Option<pb::TokenRequest>,
    drawn: bool,
}

impl Progress {
    fn new(out: Output) -> Self {
        Self {
            out,
            live: out == Output::Text && std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    fn update(&mut self, r: pb::TokenRequest) {
        match (self.out, self.live) {
            (Output::Json, _) => println!("{}", json!({"request": request_json(&r)})),
            (Output::Text, false) => eprintln!("{}", status_line(&r)),
            (Output::Text, true) => {
                self.last = Some(r);
                self.redraw();
            }
        }
    }

    /// Redraw the live line (carriage return, clear line).
    fn redraw(&mut self) {
        if let Some(r) = &self.last {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{}", status_line(r));
            let _ = err.flush();
            self.drawn = true;
        }
    }

    /// End the live line so what follows starts on a fresh one.
    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// Follow request `id` until it ends or `timeout` passes: print the token
/// when it is delivered (exit 0), exit 2 when denied, 3 when it expires, is
/// withdrawn or the wait times out.
pub async fn watch(
    out: Output,
    b: &mut BrokerClient<Channel>,
    id: &str,
    timeout: Duration,
    claim_secret: Option<&str>,
) -> Result<i32, Failure> {
    let mut progress = Progress::new(out);
    let r = follow(&mut progress, b, id, timeout, claim_secret).await;
    progress.finish();
    r
}

async fn follow(
    progress: &mut Progress,
    b: &mut BrokerClient<Channel>,
    id: &str,
    timeout: Duration,
    claim_secret: Option<&str>,
) -> Result<i32, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = open_watch(b, id, claim_secret).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let msg = tokio::select! {
            m = stream.message() => match m {
                Ok(m) => m,
                // The connection ended under the watch (the federation
                // listener's connections live 5 minutes; a broker
                // restarted): watch again, which reads the request afresh.
                Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled) => None,
                Err(s) => return Err(s.into()),
            },
            () = tokio::time::sleep_until(deadline) => {
                progress.finish();
                eprintln!("timed out waiting for request {id}");
                return Ok(exit::PENDING);
            }
            _ = tick.tick(), if progress.live => {
                progress.redraw();
                continue;
            }
        };
        let Some(msg) = msg else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stream = open_watch(b, id, claim_secret).await?;
            continue;
        };
        if let Some(code) = step(progress, id, msg)? {
            return Ok(code);
        }
    }
}

/// A watch of request `id` (with its claim secret, for a request made with
/// a platform token).
async fn open_watch(
    b: &mut BrokerClient<Channel>,
    id: &str,
    claim_secret: Option<&str>,
) -> Result<tonic::Streaming<pb::WatchRequestResponse>, Failure> {
    let mut call = tonic::Request::new(pb::WatchRequestRequest {
        request_id: id.to_owned(),
    });
    if let Some(secret) = claim_secret {
        let value = secret
            .parse()
            .map_err(|_| exit::usage("--claim-secret: not a claim secret"))?;
        call.metadata_mut().insert(pb::CLAIM_SECRET_METADATA, value);
    }
    Ok(b.watch_request(call).await?.into_inner())
}

/// Act on one watch message: `Some(exit code)` once the wait is over.
fn step(
    progress: &mut Progress,
    id: &str,
    msg: pb::WatchRequestResponse,
) -> Result<Option<i32>, Failure> {
    if let Some(g) = &msg.grant {
        progress.finish();
        print_grant(progress.out, g);
        return Ok(Some(exit::OK));
    }
    let Some(r) = msg.request else {
        return Ok(None);
    };
    let state = pb::RequestState::try_from(r.state).unwrap_or(pb::RequestState::Unspecified);
    progress.update(r);
    match state {
        pb::RequestState::Denied => Ok(Some(exit::DENIED)),
        pb::RequestState::Expired | pb::RequestState::Withdrawn => Ok(Some(exit::PENDING)),
        pb::RequestState::Issued => {
            progress.finish();
            Err(failure(format!(
                "request {id} was issued, but its token went to another session (a token is delivered once)"
            )))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(
        from: pb::RequestState,
        to: pb::RequestState,
        actor: &str,
        reason: &str,
    ) -> pb::Transition {
        pb::Transition {
            from: from as i32,
            to: to as i32,
            actor: actor.into(),
            at: None,
            reason: reason.into(),
        }
    }

    fn requirement(received: u32) -> pb::Requirement {
        pb::Requirement {
            scope: "orders.admin".into(),
            approver_groups: vec!["approvers".into()],
            approvals_required: 1,
            approvals_received: received,
            rule: "scope \"orders.admin\"".into(),
            description: String::new(),
        }
    }

    #[test]
    fn the_first_transition_is_the_creation() {
        let t = transition(
            pb::RequestState::Unspecified,
            pb::RequestState::Pending,
            "w",
            "",
        );
        let line = history_line(&t);
        assert!(line.contains("created -> pending by w"), "{line}");
        assert!(!line.contains("unknown"), "{line}");
    }

    #[test]
    fn an_approved_request_needs_nothing_more() {
        let r = pb::TokenRequest {
            state: pb::RequestState::Approved as i32,
            waiting_for: vec![requirement(1)],
            ..Default::default()
        };
        let text = request_text(&r);
        assert!(
            text.contains("1 of 1 approvals for `orders.admin` from approvers: complete"),
            "{text}"
        );
        assert!(text.contains("nothing more needed"), "{text}");
        assert!(!text.contains("waits for"), "{text}");
        let pending = pb::TokenRequest {
            state: pb::RequestState::Pending as i32,
            waiting_for: vec![requirement(0)],
            ..Default::default()
        };
        assert!(request_text(&pending).contains("waits for  0 of 1 approvals"));
    }

    #[test]
    fn a_denial_names_who_and_why() {
        let r = pb::TokenRequest {
            id: "r1".into(),
            state: pb::RequestState::Denied as i32,
            history: vec![
                transition(
                    pb::RequestState::Unspecified,
                    pb::RequestState::Pending,
                    "w",
                    "",
                ),
                transition(
                    pb::RequestState::Pending,
                    pb::RequestState::Denied,
                    "alice",
                    "not today",
                ),
            ],
            ..Default::default()
        };
        let line = status_line(&r);
        assert!(line.starts_with("[r1] denied"), "{line}");
        assert!(line.contains("by alice: not today"), "{line}");
    }

    #[test]
    fn a_pending_line_says_what_it_has_and_how_long_is_left() {
        let r = pb::TokenRequest {
            id: "r2".into(),
            state: pb::RequestState::Pending as i32,
            waiting_for: vec![requirement(0)],
            expires_at: Some(convert::timestamp(
                std::time::SystemTime::now() + Duration::from_secs(90),
            )),
            ..Default::default()
        };
        let line = status_line(&r);
        assert!(line.starts_with("[r2] pending: "), "{line}");
        assert!(line.contains("0 of 1 approvals"), "{line}");
        assert!(line.contains("; 1m ") && line.ends_with("s left"), "{line}");
    }

    /// Issue 9, finding 2: stored text with escape sequences (written
    /// before the broker refused them, or by someone with the store's
    /// files) reaches the approver's screen escaped, never interpreted.
    #[test]
    fn a_review_screen_shows_control_characters_escaped() {
        let r = pb::TokenRequest {
            id: "r_1".into(),
            justification: "x\r\u{1b}[2Kscopes     orders.read\nttl 60s".into(),
            approvals: vec![pb::Approval {
                approver: "spiffe://t/a".into(),
                reason: "ok\u{1b}[1A".into(),
                ..Default::default()
            }],
            history: vec![transition(
                pb::RequestState::Unspecified,
                pb::RequestState::Pending,
                "w",
                "a\u{202e}b",
            )],
            ..Default::default()
        };
        let shown = request_detail(&r);
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\r'),
            "{shown:?}"
        );
        assert!(!shown.contains('\u{202e}'), "{shown:?}");
        assert!(shown.contains("x\\u{d}\\u{1b}[2Kscopes"), "{shown}");
        let lines = shown.lines().filter(|l| l.starts_with("reason")).count();
        assert_eq!(lines, 1, "no forged line: {shown}");
    }
}
