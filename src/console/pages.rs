//! The console's pages (maud: every spliced value is HTML-escaped, so a
//! justification or reason holding markup shows as text).

use std::time::Duration;

use maud::{DOCTYPE, Markup, html};

use crate::audit::AuditRecord;
use crate::model::{RequestState, TokenRequest};
use crate::store::Millis;

/// Who is signed in, and the token their forms carry.
pub struct Viewer<'a> {
    pub who: &'a str,
    pub csrf: &'a str,
}

fn ago(now: Millis, at: Millis) -> String {
    human(Duration::from_millis(now.saturating_sub(at)))
}

/// A duration to the second, the largest two units (`3m 20s`).
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{sec}s"),
        (0, _) if sec == 0 => format!("{m}m"),
        (0, _) => format!("{m}m {sec}s"),
        (_, 0) => format!("{h}h"),
        _ => format!("{h}h {m}m"),
    }
}

fn left(now: Millis, deadline: Millis) -> String {
    if deadline <= now {
        "past its deadline".into()
    } else {
        human(Duration::from_millis(deadline - now))
    }
}

/// The frame around every page.
pub fn layout(title: &str, viewer: Option<&Viewer<'_>>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · portcullis" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                header {
                    strong { "portcullis" } " approver console"
                    @if let Some(v) = viewer {
                        nav {
                            a href="/ui/pending" { "Pending" }
                            a href="/ui/reviews" { "Break-glass review" }
                            a href="/ui/history" { "History" }
                        }
                        form.signout method="post" action="/ui/logout" {
                            span.who { (v.who) }
                            input type="hidden" name="csrf" value=(v.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// Sign-in choices.
pub fn login(oidc: Option<&str>, message: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            @if let Some(m) = message { p.error { (m) } }
            @if let Some(name) = oidc {
                p { a.button #signin href="/ui/oidc/start" { "Sign in with " (name) } }
            }
            p {
                "Have a client certificate? Run "
                code { "portcullis ui login" }
                " and open the link it prints (it works once, within a minute)."
            }
        },
    )
}

/// A page that moves on to `to` (a same-site navigation, so the
/// `SameSite=Strict` session cookie set with it is sent).
pub fn moving_on(to: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content={ "0;url=" (to) };
                title { "Signed in · portcullis" }
            }
            body { p { "Signed in. " a href=(to) { "Continue" } } }
        }
    }
}

/// A decision on request `id` that was refused: what went wrong, what the
/// person typed (so it is not lost), and the way back to the request.
pub fn decision_error(
    viewer: &Viewer<'_>,
    message: &str,
    id: &str,
    ttl: &str,
    reason: &str,
) -> Markup {
    layout(
        "Not done",
        Some(viewer),
        html! {
            p.error #error { (message) }
            @if !ttl.trim().is_empty() || !reason.trim().is_empty() {
                p #typed {
                    "You entered"
                    @if !ttl.trim().is_empty() { " TTL " code { (ttl) } }
                    @if !reason.trim().is_empty() { " reason " q { (reason) } }
                    "; nothing was decided."
                }
            }
            p { a #back href={ "/ui/requests/" (id) } { "Back to the request" } }
        },
    )
}

/// A refusal or failure.
pub fn error(viewer: Option<&Viewer<'_>>, message: &str) -> Markup {
    layout(
        "Not done",
        viewer,
        html! {
            p.error #error { (message) }
            p { a href="/ui/pending" { "Back to pending requests" } }
        },
    )
}

/// The rows of a request list (also the live-update fragment).
pub fn request_rows(reqs: &[TokenRequest], now: Millis, empty: &str) -> Markup {
    html! {
        div #live {
            @if reqs.is_empty() {
                p.empty { (empty) }
            } @else {
                table {
                    thead { tr {
                        th { "Request" } th { "Requester" } th { "Scopes" } th { "Why" }
                        th { "Asked" } th { "Time left" } th { "" }
                    } }
                    tbody {
                        @for r in reqs {
                            tr data-request=(r.id) {
                                td { a href={ "/ui/requests/" (r.id) } { code { (r.id) } } }
                                td { (r.requester) }
                                td { (r.scopes.join(" ")) }
                                td.why { (short(&r.justification, 80)) }
                                td { (ago(now, r.created_at)) " ago" }
                                td {
                                    @if r.review_pending { "—" } @else { (left(now, r.deadline)) }
                                }
                                td {
                                    @if r.review_pending { span.badge.glass { "break-glass: review" } }
                                    @if r.delegation.is_some() { span.badge { "delegated" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Everything being asked, and what the viewer may do about it.
pub fn request(v: &Viewer<'_>, r: &TokenRequest, now: Millis, may_decide: bool) -> Markup {
    let decidable = may_decide && r.state == RequestState::Pending && !r.review_pending;
    let reviewable = may_decide && r.review_pending;
    html! {
        @if let Some(d) = yours(r, v.who) { p.done #done { (d) } }
        (facts(r, now))
        (needs(r, now))
        @if decidable { (decide_forms(v, r)) }
        @if reviewable { (review_form(v, r)) }
    }
}

/// What the viewer decided about `r`, read from the request itself.
fn yours(r: &TokenRequest, who: &str) -> Option<&'static str> {
    if r.reviewed_by.as_deref() == Some(who) {
        Some("You reviewed this break-glass grant.")
    } else if r
        .history
        .iter()
        .any(|t| t.to == RequestState::Denied && t.actor == who)
    {
        Some("You denied this request.")
    } else if r.approvals.iter().any(|a| a.approver == who) {
        Some("You approved this request.")
    } else {
        None
    }
}

/// Asks to continue with a one-time link (a POST uses it).
pub fn confirm_link(who: &str, secret: &str) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            form #link method="post" action="/ui/login/link" {
                p { "This link signs you in as " strong #as { (who) } "." }
                input type="hidden" name="t" value=(secret);
                button #continue type="submit" { "Continue as " (who) }
            }
        },
    )
}

/// `text` cut to `max` characters, with an ellipsis when cut.
fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max).collect();
    cut.push('…');
    cut
}

/// Text where `x` marks a name: the name in `code`, no literal backticks.
fn named(text: &str) -> Markup {
    html! {
        @for (i, part) in text.split('`').enumerate() {
            @if i % 2 == 1 { code { (part) } } @else { (part) }
        }
    }
}

/// The TTL the token will have: the request's, or the shortest an
/// approver granted.
fn granted_ttl(r: &TokenRequest) -> u64 {
    r.approvals
        .iter()
        .filter_map(|a| a.ttl_ms)
        .fold(r.ttl_ms, u64::min)
}

/// The TTL, and by how much approvers shortened it.
fn ttl_text(r: &TokenRequest) -> String {
    let granted = granted_ttl(r);
    let text = human(Duration::from_millis(granted));
    if granted < r.ttl_ms {
        format!(
            "{text} (shortened by an approver from {})",
            human(Duration::from_millis(r.ttl_ms))
        )
    } else {
        text
    }
}

/// What is asked, by whom, and through which chain.
fn facts(r: &TokenRequest, now: Millis) -> Markup {
    html! {
        dl.facts {
            dt { "State" } dd #state { (r.state.name()) @if r.break_glass { " (break-glass)" } }
            dt { "Requester" } dd #requester { (r.requester) }
            dt { "Scopes" } dd #scopes {
                @for (i, s) in r.scopes.iter().enumerate() {
                    @if i > 0 { br; }
                    code { (s) }
                    @if let Some(w) = r.waiting_for.iter().find(|w| &w.scope == s && !w.description.is_empty()) {
                        " — " span.description { (w.description) }
                    }
                }
            }
            dt { "TTL" } dd #ttl { (ttl_text(r)) }
            dt { "Audience" } dd { (r.audience) }
            dt { "Justification" } dd #justification { (r.justification) }
            @if let Some(si) = &r.sign_in {
                dt { "Signed in" } dd #sign-in {
                    "with a token of issuer " code { (si.issuer) } " (sub " code { (si.subject) } ")"
                    ul.evidence {
                        @for (k, v) in &si.evidence { li { code { (k) } " = " (v) } }
                    }
                }
            }
            dt { "Asked" } dd { (ago(now, r.created_at)) " ago" }
            @if r.state == RequestState::Pending {
                dt { "Time left" } dd { (left(now, r.deadline)) }
            }
            dt { "Digest" } dd { code #digest { (r.digest) } }
            @if let Some(d) = &r.delegation {
                dt { "Delegated from" } dd { "lease " code { (d.parent_id) } " (depth " (d.depth) ")" }
                dt { "Chain" } dd #chain {
                    @for (i, a) in d.actors.iter().enumerate() {
                        @if i > 0 { " → " }
                        (a)
                    }
                    " → " (r.requester)
                }
            }
        }
    }
}

/// The rules that parked it, who approved so far, and what happened.
fn needs(r: &TokenRequest, now: Millis) -> Markup {
    html! {
        h2 { "What it needs" }
        table {
            thead { tr { th { "Scope" } th { "Rule" } th { "Approver groups" } th { "Approvals" } } }
            tbody {
                @for w in &r.waiting_for {
                    tr {
                        td { code { (w.scope) } }
                        td { (named(&w.rule)) }
                        td { (w.approver_groups.join(", ")) }
                        td { (crate::engine::approvals::received(r, &w.scope)) " of " (w.approvals_required) }
                    }
                }
            }
        }
        @if !r.approvals.is_empty() {
            h2 { "Approved so far" }
            ul #approvals {
                @for a in &r.approvals {
                    li { (a.approver) ", " (ago(now, a.at)) " ago" @if !a.reason.is_empty() { ": " (a.reason) } }
                }
            }
        }
        @for t in r.history.iter().filter(|t| t.to != RequestState::Pending) {
            p.transition { (t.to.name()) " by " (t.actor) @if !t.reason.is_empty() { ": " (t.reason) } }
        }
        @if let Some(by) = &r.reviewed_by {
            p.transition { "Reviewed by " (by) @if let Some(why) = &r.review_reason { ": " (why) } }
        }
    }
}

/// Approve (with the digest reviewed) and deny.
fn decide_forms(v: &Viewer<'_>, r: &TokenRequest) -> Markup {
    html! {
        div.decide {
            form #approve method="post" action={ "/ui/requests/" (r.id) "/approve" } {
                h2 { "Approve" }
                p #grants {
                    "Approving grants " code { (r.scopes.join(" ")) } " to " code { (r.requester) }
                    " for at most " (human(Duration::from_millis(granted_ttl(r))))
                    " (less if you give a shorter TTL), once every approval it needs is in. "
                    "The token is delivered once, to the requester only; it is never shown here."
                }
                input type="hidden" name="csrf" value=(v.csrf);
                input type="hidden" name="digest" value=(r.digest);
                label { "Shorter TTL (optional, e.g. 10m) " input name="ttl" type="text"; }
                label { "Reason " input name="reason" type="text"; }
                button type="submit" { "Approve" }
            }
            form #deny method="post" action={ "/ui/requests/" (r.id) "/deny" } {
                h2 { "Deny" }
                input type="hidden" name="csrf" value=(v.csrf);
                label { "Reason (required) " input name="reason" type="text" required; }
                button.danger type="submit" { "Deny" }
            }
        }
    }
}

/// Acknowledge a break-glass grant, or acknowledge and revoke it.
fn review_form(v: &Viewer<'_>, r: &TokenRequest) -> Markup {
    html! {
        form #acknowledge method="post" action={ "/ui/requests/" (r.id) "/acknowledge" } {
            h2 { "Review this break-glass grant" }
            input type="hidden" name="csrf" value=(v.csrf);
            label { "Reason " input name="reason" type="text"; }
            label { input type="checkbox" name="revoke" value="true"; " also revoke its lease (reason required)" }
            button type="submit" { "Acknowledge" }
        }
    }
}

/// How a decision was made, without the address it came from.
fn via(peer: &str) -> &'static str {
    if peer.starts_with("via console") {
        "console"
    } else if peer.is_empty() {
        "broker"
    } else {
        "gRPC"
    }
}

/// Decisions from the trail.
pub fn history(records: &[AuditRecord], now: Millis) -> Markup {
    html! {
        @if records.is_empty() {
            p.empty { "No decisions yet." }
        } @else {
            table #history {
                thead { tr { th { "When" } th { "Who" } th { "Decision" } th { "Request" } th { "Why" } th { "Via" } } }
                tbody {
                    @for r in records {
                        tr {
                            td { (ago(now, r.at)) " ago" }
                            td { (r.actor) }
                            td { (r.action) }
                            td { a href={ "/ui/requests/" (r.target) } { code { (r.target) } } }
                            td { (r.reason) }
                            td { (via(&r.peer)) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delegated() -> TokenRequest {
        serde_json::from_value(serde_json::json!({
            "id": "r_1", "requester": "spiffe://t/tool/<t>", "scopes": ["deploy"],
            "ttl_ms": 60_000, "max_ttl_ms": 60_000, "audience": "a",
            "justification": "<img src=x onerror=alert(1)>", "state": "pending",
            "created_at": 0, "deadline": 600_000,
            "waiting_for": [{"scope": "deploy", "approver_groups": ["owners"],
                             "approvals_required": 1, "rule": "delegation rule 3"}],
            "digest": "d1", "delegation": {"parent_id": "l_9", "depth": 2,
                "actors": ["spiffe://t/agent/a", "spiffe://t/tool/x"]},
        }))
        .unwrap()
    }

    #[test]
    fn a_delegated_request_shows_its_whole_chain_as_text_and_the_digest_it_approves() {
        let v = Viewer {
            who: "oidc:alice@example.org",
            csrf: "c",
        };
        let html = request(&v, &delegated(), 1_000, true).into_string();
        assert!(
            html.contains("spiffe://t/agent/a → spiffe://t/tool/x → spiffe://t/tool/&lt;t&gt;"),
            "{html}"
        );
        assert!(html.contains("lease <code>l_9</code> (depth 2)"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains(r#"name="digest" value="d1""#), "{html}");
        assert!(html.contains("delegation rule 3"), "{html}");
        // Nothing to decide for someone who may not.
        let html = request(&v, &delegated(), 1_000, false).into_string();
        assert!(!html.contains("id=\"approve\""), "{html}");
    }

    /// Issue 27, items 3 and 4: approvers read what the scope allows, the
    /// TTL as approvers left it, names without backticks, and what
    /// approving does; a refused decision keeps what was typed and leads
    /// back to the request.
    #[test]
    fn approvers_see_what_they_grant_and_a_refusal_keeps_what_they_typed() {
        let v = Viewer {
            who: "oidc:alice@example.org",
            csrf: "c",
        };
        let mut r = delegated();
        r.ttl_ms = 900_000;
        r.waiting_for[0].description = "ship <builds> to production".into();
        r.waiting_for[0].rule = "scope `deploy` (policy line 3)".into();
        r.approvals.push(crate::model::Approval {
            approver: "spiffe://t/human/bob".into(),
            at: 0,
            reason: String::new(),
            ttl_ms: Some(600_000),
            counted_for: vec![],
        });
        let html = request(&v, &r, 1_000, true).into_string();
        assert!(html.contains("ship &lt;builds&gt; to production"), "{html}");
        assert!(
            html.contains("10m (shortened by an approver from 15m)"),
            "{html}"
        );
        assert!(
            html.contains("scope <code>deploy</code> (policy line 3)"),
            "{html}"
        );
        assert!(!html.contains('`'), "{html}");
        assert!(
            html.contains("for at most 10m")
                && html.contains("delivered once, to the requester only"),
            "{html}"
        );
        let html = decision_error(&v, "ttl: too long", "r_1", "20m", "fine <b>").into_string();
        assert!(html.contains("href=\"/ui/requests/r_1\""), "{html}");
        assert!(
            html.contains("<code>20m</code>") && html.contains("fine &lt;b&gt;"),
            "{html}"
        );
    }
}
