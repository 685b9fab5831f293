//! Prometheus metrics, served at `/metrics` on the HTTP listener.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Notification counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotifyCounts {
    /// Deliveries answered with 2xx.
    pub delivered: u64,
    /// Deliveries that failed every attempt.
    pub failed: u64,
    /// Events dropped on a full queue.
    pub dropped: u64,
}

/// Figures read from elsewhere when the page is rendered.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sampled {
    /// Group-commit syncs so far.
    pub syncs: u64,
    /// Writes covered by them.
    pub writes: u64,
    /// Webhook delivery counters.
    pub notify: NotifyCounts,
    /// Age of the active signing key, seconds.
    pub key_age_secs: Option<u64>,
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The broker's metrics.
pub struct Metrics {
    registry: Registry,
    /// Token requests by outcome (`granted`, `parked`, `refused`, `invalid`, `error`, `break_glass`).
    pub requests: Family<Labels, Counter>,
    outcomes: Vec<(&'static str, Counter)>,
    /// Approver decisions by kind (`approve`, `deny`, `acknowledge`, and `refused`: a decision refused because of who tried it).
    pub decisions: Family<Labels, Counter>,
    /// Expiries by kind (`lease`, `request`).
    pub expiries: Family<Labels, Counter>,
    /// Token exchanges by outcome (`granted`, `parked`, `refused`,
    /// `invalid`, `error`).
    pub exchanges: Family<Labels, Counter>,
    /// Leases revoked (one, bulk, undelivered).
    pub revocations: Counter,
    /// Database logins by step done (`created`, `disabled`, `dropped`,
    /// `kept`, `reconciled`).
    pub db_logins: Family<Labels, Counter>,
    /// Database login steps that failed (and are retried) by step.
    pub db_login_failures: Family<Labels, Counter>,
    /// Renewals.
    pub renewals: Counter,
    /// Platform-token sign-ins (issue 24) by issuer and outcome
    /// (`signed_in`, or the check that refused).
    pub federation: Family<Vec<(String, String)>, Counter>,
    /// Fetches of issuers' keys by issuer and outcome (`ok`, `failed`).
    pub jwks_fetches: Family<Vec<(String, String)>, Counter>,
    /// Active leases (maintained incrementally; recounted at start).
    pub active_leases: Gauge,
    /// Open requests (pending, approved-unclaimed, break-glass under review).
    pub open_requests: Gauge,
    /// Auto-tier issuance latency, seconds (handler entry to reply).
    pub issuance: Histogram,
    syncs: Gauge,
    writes: Gauge,
    notify_delivered: Gauge,
    notify_failed: Gauge,
    notify_dropped: Gauge,
    key_age: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let requests: Family<Labels, Counter> = Family::default();
        let outcomes = [
            "granted",
            "parked",
            "refused",
            "invalid",
            "error",
            "break_glass",
        ]
        .into_iter()
        .map(|o| (o, requests.get_or_create(&vec![("outcome", o)]).clone()))
        .collect();
        let mut m = Self {
            outcomes,
            requests,
            decisions: Family::default(),
            expiries: Family::default(),
            exchanges: Family::default(),
            revocations: Counter::default(),
            db_logins: Family::default(),
            db_login_failures: Family::default(),
            renewals: Counter::default(),
            federation: Family::default(),
            jwks_fetches: Family::default(),
            active_leases: Gauge::default(),
            open_requests: Gauge::default(),
            issuance: Histogram::new(exponential_buckets(0.0002, 2.0, 14)),
            syncs: Gauge::default(),
            writes: Gauge::default(),
            notify_delivered: Gauge::default(),
            notify_failed: Gauge::default(),
            notify_dropped: Gauge::default(),
            key_age: Gauge::default(),
            registry: Registry::with_prefix("portcullis"),
        };
        m.register();
        m.register_internals();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "federation_sign_ins",
            "Platform-token sign-ins by issuer and outcome (signed_in, or the check that refused)",
            self.federation.clone(),
        );
        r.register(
            "federation_jwks_fetches",
            "Fetches of trusted issuers' keys by issuer and outcome",
            self.jwks_fetches.clone(),
        );
        r.register(
            "token_requests",
            "Token requests by outcome",
            self.requests.clone(),
        );
        r.register(
            "decisions",
            "Approver decisions by kind",
            self.decisions.clone(),
        );
        r.register(
            "expiries",
            "Leases and requests expired",
            self.expiries.clone(),
        );
        r.register(
            "token_exchanges",
            "Token exchanges (delegations) by outcome",
            self.exchanges.clone(),
        );
        r.register("revocations", "Leases revoked", self.revocations.clone());
        r.register("renewals", "Leases renewed", self.renewals.clone());
        r.register(
            "db_logins",
            "Database login steps done, by step",
            self.db_logins.clone(),
        );
        r.register(
            "db_login_failures",
            "Database login steps that failed (retried), by step",
            self.db_login_failures.clone(),
        );
        r.register("active_leases", "Active leases", self.active_leases.clone());
        r.register(
            "open_requests",
            "Requests awaiting a decision, claim or review",
            self.open_requests.clone(),
        );
        r.register(
            "issuance_seconds",
            "Auto-tier issuance latency",
            self.issuance.clone(),
        );
    }

    /// The machinery's own counters: commits, notifications, keys.
    fn register_internals(&mut self) {
        let r = &mut self.registry;
        r.register(
            "group_commit_syncs",
            "Group-commit syncs (flush + fsync) so far",
            self.syncs.clone(),
        );
        r.register(
            "group_commit_writes",
            "Writes covered by group commits so far (batch size = writes / syncs)",
            self.writes.clone(),
        );
        r.register(
            "notifications_delivered",
            "Webhook deliveries that succeeded",
            self.notify_delivered.clone(),
        );
        r.register(
            "notification_failures",
            "Webhook deliveries that failed every attempt",
            self.notify_failed.clone(),
        );
        r.register(
            "notifications_dropped",
            "Events dropped on a full notification queue",
            self.notify_dropped.clone(),
        );
        r.register(
            "signing_key_age_seconds",
            "Age of the active signing key",
            self.key_age.clone(),
        );
    }

    /// Count one outcome. The common ones are looked up without touching
    /// the family's lock or allocating a label set (this runs per grant).
    pub fn request(&self, outcome: &'static str) {
        match self.outcomes.iter().find(|(name, _)| *name == outcome) {
            Some((_, c)) => c.inc(),
            None => self
                .requests
                .get_or_create(&vec![("outcome", outcome)])
                .inc(),
        };
    }

    /// Count an approver decision (`approve`, `deny`, `acknowledge`).
    pub fn decision(&self, kind: &'static str) {
        self.decisions.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// Count a token exchange by outcome.
    pub fn exchange(&self, outcome: &'static str) {
        self.exchanges
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Count a platform-token sign-in: `outcome` is `signed_in` or the
    /// name of the check that refused; `issuer` empty when none was found.
    pub fn sign_in(&self, issuer: &str, outcome: &str) {
        self.federation
            .get_or_create(&vec![
                ("issuer".to_owned(), issuer.to_owned()),
                ("outcome".to_owned(), outcome.to_owned()),
            ])
            .inc();
    }

    /// Count an expiry (`lease`, `request`).
    pub fn expiry(&self, kind: &'static str) {
        self.expiries.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// Render the text exposition format with the sampled gauges set.
    pub fn render(&self, s: &Sampled) -> String {
        self.syncs.set(gauge_value(s.syncs));
        self.writes.set(gauge_value(s.writes));
        self.notify_delivered.set(gauge_value(s.notify.delivered));
        self.notify_failed.set(gauge_value(s.notify.failed));
        self.notify_dropped.set(gauge_value(s.notify.dropped));
        if let Some(age) = s.key_age_secs {
            self.key_age.set(gauge_value(age));
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
