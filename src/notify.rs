//! Notifications: request events announced to webhooks (generic JSON, or a
//! Slack-compatible `{"text": …}` body). A background task delivers them
//! with bounded retries and backoff; the request path only drops an event
//! into a bounded queue and never waits or fails because of it. Events never
//! contain a token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::model::TokenRequest;
use crate::policy::{Policy, Webhook, WebhookFormat};
use crate::store::Millis;

/// Queue length; beyond it events are dropped (and counted), never waited on.
const QUEUE: usize = 4096;
/// Delivery attempts per webhook and event.
const ATTEMPTS: u32 = 4;
/// First retry delay; doubles each time.
const BACKOFF: Duration = Duration::from_millis(250);
/// Per-attempt timeout.
const TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::vocab::EventKind;

/// One thing that happened to a request.
#[derive(Clone, Debug)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The request after the change.
    pub request: TokenRequest,
    /// Who caused it.
    pub actor: String,
    /// When.
    pub at: Millis,
    /// Why.
    pub reason: String,
    /// Everyone who may act on it (approvers of its scopes).
    pub approvers: Vec<String>,
}

/// Counters of the notification path.
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries answered with 2xx.
    pub delivered: AtomicU64,
    /// Deliveries that failed every attempt.
    pub failed: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Signalled after every delivery outcome (tests and watchers).
    pub changed: tokio::sync::Notify,
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> crate::metrics::NotifyCounts {
        crate::metrics::NotifyCounts {
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The sending half, held by the engine.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Event>,
    stats: Arc<Stats>,
}

impl Notifier {
    /// A notifier and the receiver its delivery task reads.
    pub fn new() -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                stats: Arc::new(Stats::default()),
            },
            rx,
        )
    }

    /// Queue an event; never blocks.
    pub fn emit(&self, ev: Event) {
        if self.tx.try_send(ev).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("notification queue full; event dropped");
        }
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

/// Text from a request as Slack shows it literally: `&`, `<` and `>` are
/// escaped (so `<!channel>` or `<https://evil|docs>` stay text, not a
/// mention or a disguised link) and display controls are written out.
pub fn slack_text(s: &str) -> String {
    crate::text::escape_controls(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The console page of request `id` under the console's public base URL.
pub fn console_link(base: &str, id: &str) -> String {
    format!("{}/ui/requests/{id}", base.trim_end_matches('/'))
}

/// The document a webhook receives; with the console's public base URL,
/// it links the request's console page.
pub fn body(ev: &Event, format: WebhookFormat, console: Option<&str>) -> serde_json::Value {
    let r = &ev.request;
    let link = console.map(|base| console_link(base, &r.id));
    match format {
        WebhookFormat::Json => json!({
            "console_url": link,
            "event": ev.kind.as_str(),
            "at_ms": ev.at,
            "actor": ev.actor,
            "reason": ev.reason,
            "request": {
                "id": r.id,
                "requester": r.requester,
                "scopes": r.scopes,
                "ttl_seconds": r.ttl_ms / 1000,
                "audience": r.audience,
                "justification": r.justification,
                "state": r.state,
                "deadline_ms": r.deadline,
                "digest": r.digest,
                "break_glass": r.break_glass,
                "lease_id": r.lease_id,
                "waiting_for": r.waiting_for.iter().map(|w| json!({
                    "scope": w.scope, "approver_groups": w.approver_groups, "approvals_required": w.approvals_required,
                    "description": w.description,
                })).collect::<Vec<_>>(),
                "approvals": r.approvals.iter().map(|a| json!({"approver": a.approver, "reason": a.reason})).collect::<Vec<_>>(),
            },
            "approvers": ev.approvers,
        }),
        WebhookFormat::Slack => {
            let what = ev.kind.phrase();
            let mut text = format!(
                "*portcullis*: request `{}` by `{}` for `{}` {what}",
                slack_text(&r.id),
                slack_text(&r.requester),
                slack_text(&r.scopes.join(" "))
            );
            if !ev.reason.is_empty() {
                let (actor, reason) = (slack_text(&ev.actor), slack_text(&ev.reason));
                text.push_str(&format!(" — {actor}: {reason}"));
            } else if !r.justification.is_empty() {
                let why = slack_text(&r.justification);
                text.push_str(&format!(" — justification: {why}"));
            }
            for w in r.waiting_for.iter().filter(|w| !w.description.is_empty()) {
                let (scope, what) = (slack_text(&w.scope), slack_text(&w.description));
                text.push_str(&format!("\n• `{scope}` allows: {what}"));
            }
            if let Some(url) = link {
                text.push_str(&format!(" <{}|Open in the console>", slack_text(&url)));
            }
            json!({ "text": text })
        }
    }
}

fn wants(w: &Webhook, kind: EventKind) -> bool {
    w.events.is_empty() || w.events.contains(&kind)
}

/// Deliver queued events until `cancel` fires. `policy` is read per event, so
/// reloaded webhook settings apply to the next event.
pub async fn run(
    mut rx: mpsc::Receiver<Event>,
    stats: Arc<Stats>,
    policy: impl Fn() -> Arc<Policy> + Send + 'static,
    console: Option<String>,
    cancel: CancellationToken,
) {
    let client = match https_client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no TLS roots for webhooks; notifications disabled");
            return;
        }
    };
    let deliveries = TaskTracker::new();
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => break,
            ev = rx.recv() => match ev { Some(ev) => ev, None => break },
        };
        for hook in policy().webhooks.iter().filter(|w| wants(w, ev.kind)) {
            let payload = body(&ev, hook.format, console.as_deref()).to_string();
            let (client, stats, url, kind) =
                (client.clone(), stats.clone(), hook.url.clone(), ev.kind);
            let cancel = cancel.clone();
            deliveries.spawn(async move {
                for attempt in 0..ATTEMPTS {
                    if attempt > 0 {
                        let wait = BACKOFF * 2u32.pow(attempt - 1);
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                    match send(&client, &url, &payload).await {
                        Ok(()) => {
                            stats.delivered.fetch_add(1, Ordering::Relaxed);
                            stats.changed.notify_waiters();
                            return;
                        }
                        Err(e) => tracing::warn!(url = %url, event = %kind, attempt = attempt + 1, error = %e, "webhook delivery failed"),
                    }
                }
                stats.failed.fetch_add(1, Ordering::Relaxed);
                stats.changed.notify_waiters();
                tracing::error!(url = %url, event = %kind, "webhook gave up after {ATTEMPTS} attempts");
            });
        }
    }
    deliveries.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), deliveries.wait()).await;
}

/// An HTTP(S) client with the system's roots.
pub(crate) type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// The webhook client: HTTPS with the system's roots, or plain HTTP.
pub(crate) fn https_client() -> Result<HttpsClient, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| e.to_string())?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// POST one JSON document to `url` with the webhooks' retries and backoff
/// (the audit witness uses it). The last error when every attempt failed.
pub async fn deliver(url: &str, payload: &str) -> Result<(), String> {
    let client = https_client()?;
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
        }
        match send(&client, url, payload).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn send<C>(client: &Client<C, Full<Bytes>>, url: &str, payload: &str) -> Result<(), String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let req = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("portcullis/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(payload.to_owned())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}
