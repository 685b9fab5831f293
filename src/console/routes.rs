//! The console's routes. Reads need a session; every POST also needs the
//! session's CSRF token and an `Origin` of this host. Decisions run inside
//! the audit call context "via console from <address>", so the trail says
//! who decided, how, and from where.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::pages::{self, Viewer};
use super::session::{SIGN_IN_TTL, SignIn, Via, random_secret};
use super::{Console, cookie_value, harden, page, see_other, status_of};
use crate::audit::{CALL, CallCtx};
use crate::engine::EngineError;
use crate::model::TokenRequest;

type Shared = State<Arc<Console>>;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
/// Largest form body read.
const MAX_FORM: usize = 16 * 1024;
/// Most rows a list shows.
const LIST_MAX: usize = 500;

pub(super) fn router(console: Arc<Console>) -> axum::Router {
    axum::Router::new()
        .route("/ui", get(home))
        .route("/ui/", get(home))
        .route("/ui/login", get(login))
        .route("/ui/login/link", get(confirm_link).post(use_link))
        .route("/ui/oidc/start", get(oidc_start))
        .route("/ui/oidc/callback", get(oidc_callback))
        .route("/ui/logout", post(logout))
        .route("/ui/pending", get(pending))
        .route("/ui/reviews", get(reviews))
        .route("/ui/history", get(history))
        .route("/ui/requests/{id}", get(request))
        .route("/ui/requests/{id}/{verb}", post(decision))
        .route("/ui/assets/console.css", get(|| asset("text/css", CSS)))
        .route(
            "/ui/assets/console.js",
            get(|| asset("text/javascript", JS)),
        )
        // Forms are a few fields: nothing larger is read.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .with_state(console)
}

async fn asset(kind: &'static str, body: &'static str) -> Response {
    harden(([(header::CONTENT_TYPE, kind)], body).into_response())
}

fn to_login() -> Response {
    see_other("/ui/login")
}

impl Console {
    fn viewer_error(&self, s: &super::Session, code: StatusCode, msg: &str) -> Response {
        let csrf = self.secrets.csrf(s);
        let v = Viewer {
            who: s.who.as_str(),
            csrf,
        };
        page(code, pages::error(Some(&v), msg))
    }

    fn engine_error(&self, s: &super::Session, e: &EngineError) -> Response {
        let (code, msg) = status_of(e);
        self.viewer_error(s, code, &msg)
    }

    /// Open a session for `who` and move on to `to`.
    async fn start_session(&self, who: crate::identity::Identity, via: Via, to: &str) -> Response {
        if !self.engine.policy().may_review(&who) {
            tracing::warn!(who = %who, "console sign-in of someone who reviews nothing refused");
            let msg = format!("`{who}` is not an approver or admin in this broker's policy.");
            return page(
                StatusCode::FORBIDDEN,
                pages::login(self.oidc_name(), Some(&msg)),
            );
        }
        match self
            .secrets
            .open_session(who.clone(), via, self.now())
            .await
        {
            Ok((cookie, _)) => {
                tracing::info!(who = %who, via = ?via, "console sign-in");
                let max_age = super::session::SESSION_TTL.as_secs();
                let mut resp = page(StatusCode::OK, pages::moving_on(to));
                let h = resp.headers_mut();
                h.append(
                    header::SET_COOKIE,
                    self.cookie(self.session_cookie(), &cookie, max_age, "Strict"),
                );
                h.append(
                    header::SET_COOKIE,
                    self.cookie(self.sign_in_cookie(), "", 0, "Lax"),
                );
                resp
            }
            Err(e) => page(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::login(self.oidc_name(), Some(&e.to_string())),
            ),
        }
    }

    fn oidc_name(&self) -> Option<&str> {
        self.oidc.as_ref().map(|o| o.display_name())
    }

    /// Every request this person may decide or review now, newest first
    /// (exactly what `ListPending` returns for them).
    async fn pending_for(&self, s: &super::Session) -> Result<Vec<TokenRequest>, EngineError> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = self.engine.list_pending(&s.who, LIST_MAX, &token).await?;
            all.extend(page);
            if next.is_empty() || all.len() >= LIST_MAX {
                break;
            }
            token = next;
        }
        all.reverse();
        Ok(all)
    }
}

async fn home(State(c): Shared, headers: HeaderMap) -> Response {
    if c.signed_in(&headers).await.is_some() {
        see_other("/ui/pending")
    } else {
        to_login()
    }
}

async fn login(State(c): Shared) -> Response {
    page(StatusCode::OK, pages::login(c.oidc_name(), None))
}

#[derive(Deserialize)]
struct LinkQuery {
    #[serde(default)]
    t: String,
}

fn link_used_up(c: &Console) -> Response {
    page(
        StatusCode::UNAUTHORIZED,
        pages::login(
            c.oidc_name(),
            Some(
                "This sign-in link is used up or expired (links work once, within a minute). Run `portcullis ui login` again.",
            ),
        ),
    )
}

/// GET of a one-time link: says whom it signs in as and asks to continue.
/// Opening it uses nothing, so a link scanner cannot spend it and nobody
/// is signed in as someone else by just following a link.
async fn confirm_link(State(c): Shared, Query(q): Query<LinkQuery>) -> Response {
    match c.secrets.peek_link(&q.t, c.now()).await {
        Some(who) => page(StatusCode::OK, pages::confirm_link(who.as_str(), &q.t)),
        None => link_used_up(&c),
    }
}

/// POST of a one-time link (from the confirmation page): uses it.
async fn use_link(
    State(c): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(q): Form<LinkQuery>,
) -> Response {
    if let Some(refused) = too_many_sign_ins(&c, peer) {
        return refused;
    }
    if !c.same_origin(&headers) {
        tracing::info!("sign-in link POST from another origin refused");
        return page(
            StatusCode::FORBIDDEN,
            pages::login(c.oidc_name(), Some(&c.wrong_origin())),
        );
    }
    match c.secrets.use_link(&q.t, c.now()).await {
        Some((who, next)) => {
            let to = next.map_or_else(
                || "/ui/pending".to_owned(),
                |id| format!("/ui/requests/{id}"),
            );
            c.start_session(who, Via::Link, &to).await
        }
        None => link_used_up(&c),
    }
}

/// 429 with `Retry-After` when `peer` has started or finished too many
/// sign-ins lately: each OpenID start leaves a mark in the store and each
/// callback costs a call to the provider with the client secret.
fn too_many_sign_ins(c: &Console, peer: SocketAddr) -> Option<Response> {
    let key = crate::engine::peer_key(peer.ip()).to_string();
    let wait = c.sign_ins.admit(&key, c.now()).err()?;
    tracing::info!(peer = %key, "console sign-in refused: too many from this address");
    let secs = wait.as_millis().div_ceil(1000).max(1);
    let mut resp = page(
        StatusCode::TOO_MANY_REQUESTS,
        pages::login(
            c.oidc_name(),
            Some(&format!(
                "Too many sign-ins from your address; try again in {secs} s."
            )),
        ),
    );
    if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Some(resp)
}

async fn oidc_start(State(c): Shared, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let fail = |code: StatusCode, msg: &str| page(code, pages::login(c.oidc_name(), Some(msg)));
    let Some(oidc) = c.oidc.clone() else {
        return fail(StatusCode::NOT_FOUND, "No identity provider is configured.");
    };
    if let Some(refused) = too_many_sign_ins(&c, peer) {
        return refused;
    }
    let made = (|| {
        Ok::<_, crate::text::NoRandomness>((random_secret()?, random_secret()?, random_secret()?))
    })();
    let Ok((state, nonce, verifier)) = made else {
        return fail(StatusCode::INTERNAL_SERVER_ERROR, "no randomness");
    };
    let url = match oidc.authorize_url(&state, &nonce, &verifier).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "OpenID sign-in could not start");
            return fail(StatusCode::BAD_GATEWAY, &e.to_string());
        }
    };
    let expires_at = c.now().saturating_add(crate::clock::millis(SIGN_IN_TTL));
    // And a one-time mark on the server: the callback works once.
    if let Err(e) = c.secrets.begin_sign_in(&state, expires_at).await {
        tracing::warn!(error = %e, "OpenID sign-in could not be remembered");
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is unavailable; try again.",
        );
    }
    let sign_in = SignIn {
        state,
        verifier,
        nonce,
        expires_at,
    };
    // Sealed into a cookie of this browser: the server keeps nothing, and a
    // callback that arrives in another browser (login CSRF) has no match.
    let sealed = match c.secrets.seal(&sign_in) {
        Ok(s) => s,
        Err(e) => return fail(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let mut resp = see_other(&url);
    resp.headers_mut().append(
        header::SET_COOKIE,
        c.cookie(c.sign_in_cookie(), &sealed, SIGN_IN_TTL.as_secs(), "Lax"),
    );
    resp
}

#[derive(Deserialize)]
struct Callback {
    #[serde(default)]
    code: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    error: String,
}

async fn oidc_callback(
    State(c): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Response {
    let fail = |code: StatusCode, msg: &str| page(code, pages::login(c.oidc_name(), Some(msg)));
    let Some(oidc) = c.oidc.clone() else {
        return fail(StatusCode::NOT_FOUND, "No identity provider is configured.");
    };
    if let Some(refused) = too_many_sign_ins(&c, peer) {
        return refused;
    }
    if !q.error.is_empty() {
        // The provider's words are not shown (a crafted link could put any
        // text there); an OAuth error code is.
        let code = Some(q.error.as_str())
            .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .unwrap_or("unknown");
        tracing::info!(code, "OpenID sign-in refused by the provider");
        return fail(
            StatusCode::UNAUTHORIZED,
            &format!("The identity provider refused the sign-in ({code})."),
        );
    }
    let sealed = cookie_value(&headers, c.sign_in_cookie()).unwrap_or_default();
    let Some(sign_in) = c.secrets.unseal(&sealed, &q.state, c.now()) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "This sign-in was not started in this browser, or took too long; start again.",
        );
    };
    if !c.secrets.take_sign_in(&q.state, c.now()).await {
        return fail(
            StatusCode::BAD_REQUEST,
            "This sign-in was used already, or took too long; start again.",
        );
    }
    match oidc
        .redeem(&q.code, &sign_in.verifier, &sign_in.nonce)
        .await
    {
        Ok(who) => c.start_session(who, Via::Oidc, "/ui/pending").await,
        Err(e) => {
            tracing::warn!(error = %e, "OpenID sign-in refused");
            fail(StatusCode::UNAUTHORIZED, &e.to_string())
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// The session of a state-changing request, or the refusal: signed in,
/// same origin, and the session's CSRF token.
async fn checked(
    c: &Console,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<super::Session, Box<Response>> {
    let Some(s) = c.signed_in(headers).await else {
        return Err(Box::new(to_login()));
    };
    if !c.same_origin(headers) {
        tracing::warn!(who = %s.who, "console POST from another origin refused");
        return Err(Box::new(c.viewer_error(
            &s,
            StatusCode::FORBIDDEN,
            &c.wrong_origin(),
        )));
    }
    if !c.secrets.csrf_ok(&s, csrf) {
        tracing::warn!(who = %s.who, "console POST without a valid CSRF token refused");
        return Err(Box::new(c.viewer_error(
            &s,
            StatusCode::FORBIDDEN,
            "This form did not come from this console (missing or wrong CSRF token). Nothing was changed.",
        )));
    }
    Ok(s)
}

async fn logout(State(c): Shared, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    let s = match checked(&c, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let ended = c.secrets.end_session(&s, c.now()).await;
    let mut resp = match &ended {
        Ok(()) => {
            tracing::info!(who = %s.who, "console sign-out");
            to_login()
        }
        Err(e) => {
            // The cookie goes anyway, but the session may still work
            // elsewhere until it ends: say so rather than pretend.
            tracing::error!(error = %e, who = %s.who, "console sign-out could not end the session");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::error(
                    None,
                    "You could not be signed out everywhere (the broker's store is unavailable); the session ends on its own within 30 minutes. Try again.",
                ),
            )
        }
    };
    resp.headers_mut().append(
        header::SET_COOKIE,
        c.cookie(c.session_cookie(), "", 0, "Strict"),
    );
    resp
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    fragment: Option<String>,
}

async fn list(c: &Console, headers: &HeaderMap, q: &ListQuery, reviews_only: bool) -> Response {
    let Some(s) = c.signed_in(headers).await else {
        return to_login();
    };
    let reqs = match c.pending_for(&s).await {
        Ok(r) => r,
        Err(e) => return c.engine_error(&s, &e),
    };
    let reqs: Vec<_> = reqs
        .into_iter()
        .filter(|r| !reviews_only || r.review_pending)
        .collect();
    let (title, empty) = if reviews_only {
        (
            "Break-glass review",
            "No break-glass grant is waiting for your review.",
        )
    } else {
        ("Pending", "Nothing is waiting for you.")
    };
    let rows = pages::request_rows(&reqs, c.now(), empty);
    if q.fragment.is_some() {
        return page(StatusCode::OK, rows);
    }
    let csrf = c.secrets.csrf(&s);
    let v = Viewer {
        who: s.who.as_str(),
        csrf,
    };
    page(StatusCode::OK, pages::layout(title, Some(&v), rows))
}

async fn pending(State(c): Shared, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    list(&c, &headers, &q, false).await
}

async fn reviews(State(c): Shared, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    list(&c, &headers, &q, true).await
}

async fn history(State(c): Shared, headers: HeaderMap) -> Response {
    let Some(s) = c.signed_in(&headers).await else {
        return to_login();
    };
    let records = match c.engine.decision_history(&s.who, LIST_MAX).await {
        Ok(r) => r,
        Err(e) => return c.engine_error(&s, &e),
    };
    let csrf = c.secrets.csrf(&s);
    let v = Viewer {
        who: s.who.as_str(),
        csrf,
    };
    page(
        StatusCode::OK,
        pages::layout("History", Some(&v), pages::history(&records, c.now())),
    )
}

async fn request(State(c): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(s) = c.signed_in(&headers).await else {
        return to_login();
    };
    let r = match c.engine.get_request(&s.who, &id).await {
        Ok(r) => r,
        Err(e) => return c.engine_error(&s, &e),
    };
    let may = crate::engine::may_decide(&c.engine.policy(), &s.who, &r);
    let csrf = c.secrets.csrf(&s);
    let v = Viewer {
        who: s.who.as_str(),
        csrf,
    };
    let body = pages::request(&v, &r, c.now(), may);
    page(
        StatusCode::OK,
        pages::layout(&format!("Request {id}"), Some(&v), body),
    )
}

#[derive(Deserialize)]
struct Decision {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    revoke: Option<String>,
}

/// Run one decision as `s` in the console's audit context; on success go
/// back to the request page (which says what this person decided, from
/// the request itself); on failure say why, keep what was typed, and lead
/// back to the request.
async fn decide<F>(
    c: &Console,
    s: &super::Session,
    peer: SocketAddr,
    (id, f): (&str, &Decision),
    fut: F,
) -> Response
where
    F: std::future::Future<Output = Result<TokenRequest, EngineError>>,
{
    let ctx = CallCtx {
        peer: format!("via console from {peer}"),
        call_id: random_secret()
            .map(|r| r.chars().take(16).collect())
            .unwrap_or_default(),
    };
    match CALL.scope(ctx, fut).await {
        Ok(_) => see_other(&format!("/ui/requests/{id}")),
        Err(e) => {
            let (code, msg) = status_of(&e);
            let v = Viewer {
                who: s.who.as_str(),
                csrf: c.secrets.csrf(s),
            };
            page(code, pages::decision_error(&v, &msg, id, &f.ttl, &f.reason))
        }
    }
}

/// POST `/ui/requests/{id}/{verb}`: approve, deny or acknowledge.
async fn decision(
    State(c): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path((id, verb)): Path<(String, String)>,
    Form(f): Form<Decision>,
) -> Response {
    let s = match checked(&c, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match verb.as_str() {
        "approve" => {
            let ttl = match f.ttl.trim() {
                "" => None,
                t => match humantime::parse_duration(t) {
                    Ok(d) => Some(d),
                    Err(_) => {
                        let msg = format!("ttl: `{t}` is not a duration like 10m");
                        let v = Viewer {
                            who: s.who.as_str(),
                            csrf: c.secrets.csrf(&s),
                        };
                        let body = pages::decision_error(&v, &msg, &id, &f.ttl, &f.reason);
                        return page(StatusCode::BAD_REQUEST, body);
                    }
                },
            };
            let fut = c.engine.approve(&s.who, &id, &f.reason, ttl, &f.digest);
            decide(&c, &s, peer, (&id, &f), fut).await
        }
        "deny" => {
            let fut = c.engine.deny(&s.who, &id, &f.reason);
            decide(&c, &s, peer, (&id, &f), fut).await
        }
        "acknowledge" => {
            let fut = c
                .engine
                .acknowledge(&s.who, &id, &f.reason, f.revoke.is_some());
            decide(&c, &s, peer, (&id, &f), fut).await
        }
        _ => c.viewer_error(&s, StatusCode::NOT_FOUND, "no such action"),
    }
}
