//! The approver console: server-rendered pages on the HTTP listener under
//! `/ui/` where people see what they may decide and decide it — through the
//! very engine calls the `Approvals` gRPC service makes, so every rule
//! (no self-approval, no double approval, deadlines, digests, reasons)
//! holds the same way. The console never shows a token.
//!
//! Sign-in: OpenID Connect against the organisation's provider
//! ([`oidc`]), or a one-time link made over mTLS (`portcullis ui login`).
//! Sessions, links and CSRF tokens: [`session`]. Pages: [`pages`]. Design:
//! docs/design-console.md.

pub mod oidc;
mod pages;
mod routes;
pub mod session;

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use self::oidc::{Oidc, OidcConfig};
use self::session::{Secrets, Session};
use crate::engine::{Engine, EngineError, ErrorKind};
use crate::identity::Identity;
use crate::store::Millis;

/// How the console is served.
#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    /// The base URL people reach the broker's HTTP listener at
    /// (`https://broker.example.org`): one-time links, the OpenID
    /// redirect and notification links are made from it.
    pub public_url: String,
    /// Sign-in with the organisation's OpenID provider.
    pub oidc: Option<OidcConfig>,
    /// Cookies carry `Secure` and the `__Host-` prefix (false only when
    /// the console is plain HTTP on loopback, in development).
    pub secure: bool,
}

/// The console's state.
pub struct Console {
    engine: Arc<Engine>,
    /// Policy swaps, taken by [`Console::follow_policy`].
    swaps: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<crate::engine::PolicySwap>>>,
    secrets: Secrets,
    /// `CreateConsoleLink` calls per identity.
    links: crate::engine::Throttle,
    /// Sign-ins per peer address.
    sign_ins: crate::engine::Throttle,
    oidc: Option<Arc<Oidc>>,
    public_url: String,
    /// `scheme://host[:port]` of `public_url`: what `Origin` must say.
    origin: String,
    secure: bool,
}

/// Why no one-time link was made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The caller reviews nothing.
    #[error(
        "`{0}` approves no scope and is not an admin: the console has nothing for it (add it to an approver group)"
    )]
    NotAReviewer(String),
    /// The request id is malformed.
    #[error("request_id: {0}")]
    BadRequestId(String),
    /// No secret could be made.
    #[error(transparent)]
    Secret(#[from] session::SecretError),
    /// The caller asked for too many links lately.
    #[error("too many console links; try again in {} s", .0.as_millis().div_ceil(1000).max(1))]
    TooFast(std::time::Duration),
}

impl Console {
    /// The console over `engine`.
    pub fn new(engine: Arc<Engine>, cfg: ConsoleConfig) -> Result<Arc<Self>, String> {
        let public_url = cfg.public_url.trim_end_matches('/').to_owned();
        let https = public_url.starts_with("https://");
        if !(https || loopback_http(&public_url)) {
            return Err(format!(
                "--public-url `{public_url}` must be https:// (http:// only on loopback): the console's cookies and decisions must not cross a network in the clear"
            ));
        }
        let origin = match public_url.find("://").map(|i| i + 3) {
            Some(start) => {
                let end = public_url[start..]
                    .find('/')
                    .map_or(public_url.len(), |e| start + e);
                public_url[..end].to_owned()
            }
            None => public_url.clone(),
        };
        if origin != public_url {
            return Err(format!(
                "--public-url `{public_url}` must be scheme://host[:port] with no path (the console lives at /ui/)"
            ));
        }
        let oidc = cfg
            .oidc
            .map(|o| Oidc::new(o, format!("{public_url}/ui/oidc/callback")))
            .transpose()?;
        let secrets = Secrets::new(
            engine.store().clone(),
            engine
                .keys()
                .console_seal_key()
                .map_err(|e| e.to_string())?,
        );
        Ok(Arc::new(Self {
            swaps: std::sync::Mutex::new(Some(engine.policy_swaps())),
            links: crate::engine::Throttle::new(engine.limits().console_links),
            sign_ins: crate::engine::Throttle::new(engine.limits().sign_ins),
            engine,
            secrets,
            oidc,
            public_url,
            origin,
            // People reach it over HTTPS (at the listener or a proxy in
            // front): cookies are `Secure` and `__Host-`.
            secure: cfg.secure || https,
        }))
    }

    /// Forget ended sessions and links every minute until `cancel` (on a
    /// shared store, only the broker that leads the time-driven work).
    pub async fn sweep(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        while self.engine.until_leading(&cancel).await {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            }
            match self.secrets.sweep(self.now()).await {
                Ok(n) if n > 0 => {
                    tracing::debug!(n, "ended console sessions and links forgotten")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "console sweep failed"),
            }
        }
    }

    /// End the console sessions of everyone a policy swap took away, until
    /// `cancel`; on every broker (each swaps its own policy). A person
    /// removed and added back later signs in again.
    pub async fn follow_policy(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        use tokio::sync::broadcast::error::RecvError;
        let taken = self.swaps.lock().ok().and_then(|mut r| r.take());
        let Some(mut swaps) = taken else {
            return;
        };
        loop {
            let swap = tokio::select! {
                () = cancel.cancelled() => return,
                swap = swaps.recv() => swap,
            };
            let removed: Vec<Option<String>> = match &swap {
                Ok(s) => {
                    let now = s.new.reviewers();
                    s.old
                        .reviewers()
                        .into_iter()
                        .filter(|who| !now.contains(who))
                        .map(|who| Some(who.to_owned()))
                        .collect()
                }
                // Some swaps went unseen: anyone may have been removed.
                Err(RecvError::Lagged(_)) => vec![None],
                Err(RecvError::Closed) => return,
            };
            for who in removed {
                let reason = "no longer an approver or admin in the policy";
                if let Err(e) = self
                    .end_sessions(who.as_deref(), crate::engine::SYSTEM_ACTOR, reason)
                    .await
                {
                    tracing::error!(error = %e, "console sessions of a removed person could not be ended");
                }
            }
        }
    }

    /// End every console session of `who` (`None`: everyone's), on every
    /// broker, recorded in the trail as `by`'s act.
    async fn end_sessions(
        &self,
        who: Option<&str>,
        by: &str,
        reason: &str,
    ) -> Result<(), EngineError> {
        // The sessions end first: a failure to record leaves access taken
        // away, never granted.
        self.secrets
            .end_sessions_of(who, self.now())
            .await
            .map_err(EngineError::Store)?;
        let whose = who.unwrap_or("everyone");
        tracing::info!(who = %whose, by = %by, "console sessions ended");
        self.engine
            .record(vec![crate::audit::Entry::ok(
                by,
                crate::vocab::Action::ConsoleSessionsEnded,
                whose,
                &[],
                reason,
            )])
            .await
    }

    /// An admin ends every console session of `identity` now (for a person
    /// who left, or a device lost), with a reason for the trail.
    pub async fn end_sessions_of(
        &self,
        admin: &Identity,
        identity: &str,
        reason: &str,
    ) -> Result<(), EngineError> {
        if !self.engine.policy().is_admin(admin) {
            return Err(EngineError::NotAllowed(format!(
                "`{admin}` is not an admin: only admins end other people's console sessions"
            )));
        }
        let who = Identity::parse_member(identity)
            .map_err(|e| crate::text::FieldError::new("identity", e.to_string()))?;
        crate::text::check_reason("reason", reason, true)?;
        self.end_sessions(Some(who.as_str()), admin.as_str(), reason)
            .await
    }

    /// The base URL pages are reached at.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    fn now(&self) -> Millis {
        self.engine.clock().now()
    }

    /// A single-use sign-in link for `who` (an identity that reviews
    /// something), valid 60 s, opening `request_id` when given.
    pub async fn link(
        &self,
        who: &Identity,
        request_id: &str,
    ) -> Result<(String, Millis), LinkError> {
        if !self.engine.policy().may_review(who) {
            return Err(LinkError::NotAReviewer(who.to_string()));
        }
        self.links
            .admit(who.as_str(), self.now())
            .map_err(LinkError::TooFast)?;
        let next = if request_id.is_empty() {
            None
        } else {
            crate::text::require_id("request_id", request_id)
                .map_err(|e| LinkError::BadRequestId(e.to_string()))?;
            Some(request_id.to_owned())
        };
        let (secret, expires_at) = self.secrets.make_link(who, next, self.now()).await?;
        tracing::info!(who = %who, "console sign-in link made");
        Ok((
            format!("{}/ui/login/link?t={secret}", self.public_url),
            expires_at,
        ))
    }

    fn session_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-portcullis_session"
        } else {
            "portcullis_session"
        }
    }

    fn sign_in_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-portcullis_signin"
        } else {
            "portcullis_signin"
        }
    }

    /// `Set-Cookie` for `name=value` living `max_age` seconds (0 clears).
    fn cookie(&self, name: &str, value: &str, max_age: u64, same_site: &str) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let v = format!(
            "{name}={value}; Path=/; HttpOnly; SameSite={same_site}; Max-Age={max_age}{secure}"
        );
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The live session the request's cookie names, if any. A person the
    /// policy no longer names as an approver or admin is signed out at
    /// once (a policy change revokes console access on the next click).
    async fn signed_in(&self, headers: &HeaderMap) -> Option<Session> {
        let cookie = cookie_value(headers, self.session_cookie())?;
        let s = self.secrets.session(&cookie, self.now()).await?;
        if self.engine.policy().may_review(&s.who) {
            Some(s)
        } else {
            if let Err(e) = self.secrets.end_session(&s, self.now()).await {
                tracing::error!(error = %e, who = %s.who, "console session could not be ended");
            }
            tracing::info!(who = %s.who, "console session ended: no longer an approver or admin");
            None
        }
    }
}

/// The value of cookie `name` in the request.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Is `url` plain HTTP to a loopback host (`127.0.0.1`, `localhost`,
/// `[::1]`, any port and path)?
pub(crate) fn loopback_http(url: &str) -> bool {
    ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| {
            url.strip_prefix(p)
                .is_some_and(|r| r.is_empty() || r.starts_with([':', '/']))
        })
}

impl Console {
    /// Does a state-changing request come from a page of the console? Its
    /// `Origin` (browsers send one with every POST) must be the public
    /// URL's origin exactly — not whatever `Host` the request names, which
    /// a rebinding attacker controls and HTTP/2 does not send.
    fn same_origin(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|o| o == self.origin)
    }

    /// Why a POST from another origin was refused.
    fn wrong_origin(&self) -> String {
        format!(
            "This form did not come from the console at {} (open the console there). Nothing was changed.",
            self.origin
        )
    }
}

/// A 303 to `to`, or an error page if `to` cannot be a header (never a
/// panic, whatever a provider's discovery document says).
fn see_other(to: &str) -> Response {
    match HeaderValue::from_str(to) {
        Ok(v) => harden((StatusCode::SEE_OTHER, [(header::LOCATION, v)]).into_response()),
        Err(_) => {
            tracing::warn!("refused to redirect to a location that is not a valid header");
            page(
                StatusCode::BAD_GATEWAY,
                pages::error(None, "The sign-in could not continue (bad redirect)."),
            )
        }
    }
}

/// Headers every console answer carries: no caching, no framing, a
/// referrer only to the console itself (a link's secret never leaves in
/// one), scripts and styles from the console itself only.
fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // `same-origin`, not `no-referrer`: with `no-referrer` browsers send
    // `Origin: null` on form posts, and the origin check needs the real one.
    set(h, header::REFERRER_POLICY, "same-origin");
    resp
}

/// An engine refusal as a page status and the message shown (the same
/// classification as the gRPC codes, `EngineError::kind`).
fn status_of(e: &EngineError) -> (StatusCode, String) {
    let code = match e.kind() {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Denied => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::WrongState | ErrorKind::Conflict | ErrorKind::Contended => StatusCode::CONFLICT,
        ErrorKind::Exhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DataLoss | ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
    };
    if code.is_server_error() {
        tracing::error!(error = %e, "console request failed");
    }
    (code, e.public_message())
}

/// A page answer with the console's headers.
fn page(code: StatusCode, markup: maud::Markup) -> Response {
    harden((code, markup).into_response())
}

/// The router for `/ui/…`.
pub fn router(console: Arc<Console>) -> axum::Router {
    routes::router(console)
}
