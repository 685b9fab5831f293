//! `policy` decides: which identity may have which scope, at once, after
//! approval, or not at all.
//!
//! The policy is a TOML file validated as a whole: every problem is reported
//! with its line, unknown keys are refused, and anything not granted by a
//! rule is refused (deny by default). See DESIGN.md section 5 and the README.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::identity::Identity;
use crate::text::{valid_scope_name, valid_token_text};
use crate::vocab::EventKind;

/// Hard cap on any TTL unless `[broker] max_ttl` says otherwise.
pub const DEFAULT_HARD_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_PENDING_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(600);

/// One problem found while loading a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file (0 when unknown).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Errors of policy loading.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy `{path}`: {detail}")]
    Read {
        /// Path.
        path: String,
        /// OS error.
        detail: String,
    },
    /// The policy has problems; every one is listed.
    #[error("invalid policy ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Whether a scope is granted by machine or needs humans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Granted at once.
    Auto,
    /// Parked until enough approvals.
    Approval,
}

/// How an approval-tier scope is approved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRule {
    /// Groups whose members may approve.
    pub approvers: Vec<String>,
    /// Distinct approvals needed.
    pub required: u32,
    /// How long a request may wait.
    pub pending_ttl: Duration,
    /// Break-glass cap, when allowed.
    pub break_glass_max_ttl: Option<Duration>,
    /// How long an approved request waits to be claimed.
    pub claim_ttl: Duration,
    /// Approvals must carry a reason.
    pub require_reason: bool,
}

/// A scope's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeRule {
    /// Scope name.
    pub name: String,
    /// Tier.
    pub tier: Tier,
    /// Identity patterns allowed to ask (`*` matches any run of characters).
    pub workloads: Vec<String>,
    /// TTL when the request names none.
    pub default_ttl: Duration,
    /// Longest life, renewals included.
    pub max_ttl: Duration,
    /// Approval settings (approval tier only).
    pub approval: Option<ApprovalRule>,
    /// Line of the `[[scope]]` table.
    pub line: usize,
}

impl ScopeRule {
    /// Human name of the rule, used in refusals and records.
    pub fn rule_name(&self) -> String {
        format!("scope `{}` (policy line {})", self.name, self.line)
    }
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Audience when a request names none.
    pub default_audience: String,
    /// Groups whose members are admins.
    pub admin_groups: Vec<String>,
    /// Groups whose members may read the audit trail.
    pub auditor_groups: Vec<String>,
    /// No TTL may exceed this.
    pub hard_max_ttl: Duration,
    /// Group name → member identities.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Scope name → rule.
    pub scopes: BTreeMap<String, ScopeRule>,
    /// Where to announce request events.
    pub webhooks: Vec<Webhook>,
}

/// Body format of a webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookFormat {
    /// A generic JSON event document.
    Json,
    /// A Slack-compatible incoming-webhook body (`{"text": ...}`).
    Slack,
}

/// One notification target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Body format.
    pub format: WebhookFormat,
    /// Events to send (empty: all).
    pub events: Vec<EventKind>,
}

/// What policy says about a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every scope is auto for this identity.
    Grant {
        /// TTL to grant.
        ttl: Duration,
        /// Renewal bound.
        max_ttl: Duration,
        /// Rules that allowed it.
        rules: Vec<String>,
    },
    /// Some scopes need approval.
    Park {
        /// TTL once issued.
        ttl: Duration,
        /// Renewal bound.
        max_ttl: Duration,
        /// How long it may wait.
        pending_ttl: Duration,
        /// One entry per approval scope.
        requirements: Vec<crate::store::Requirement>,
    },
}

/// Why policy refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("scope `{scope}`: {reason}")]
pub struct Refusal {
    /// The first scope refused.
    pub scope: String,
    /// Why.
    pub reason: String,
}

/// Does `identity` match `pattern`? `*` matches any run (including `/`).
pub fn glob_match(pattern: &str, identity: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == identity;
    };
    let Some(mut rest) = identity.strip_prefix(first) else {
        return false;
    };
    for m in middle {
        match rest.find(m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl Policy {
    /// May `who` read the audit trail (admins and auditors)?
    pub fn is_auditor(&self, who: &Identity) -> bool {
        self.is_admin(who)
            || self
                .auditor_groups
                .iter()
                .any(|g| self.is_member(g, who.as_str()))
    }

    /// Is `who` a member of any admin group?
    pub fn is_admin(&self, who: &Identity) -> bool {
        self.admin_groups
            .iter()
            .any(|g| self.is_member(g, who.as_str()))
    }

    /// Is `who` a member of group `g`?
    pub fn is_member(&self, g: &str, who: &str) -> bool {
        self.groups
            .get(g)
            .is_some_and(|m| m.iter().any(|x| x == who))
    }

    /// Decide for `identity` asking `scopes` (already syntax-checked) with an
    /// optional wanted TTL. The TTL is clamped to the smallest `max_ttl`.
    pub fn decide(
        &self,
        identity: &Identity,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<Decision, Refusal> {
        let mut rules = Vec::new();
        for s in scopes {
            let rule = self.scopes.get(s).ok_or_else(|| Refusal {
                scope: s.clone(),
                reason: "not defined in policy".into(),
            })?;
            if !rule
                .workloads
                .iter()
                .any(|p| glob_match(p, identity.as_str()))
            {
                return Err(Refusal {
                    scope: s.clone(),
                    reason: format!(
                        "`{}` is not among its allowed workloads ({})",
                        identity.as_str(),
                        rule.rule_name()
                    ),
                });
            }
            rules.push(rule);
        }
        let max_ttl = rules
            .iter()
            .map(|r| r.max_ttl)
            .min()
            .unwrap_or(DEFAULT_MAX_TTL);
        let default_ttl = rules.iter().map(|r| r.default_ttl).min().unwrap_or(max_ttl);
        let ttl = ttl.unwrap_or(default_ttl).min(max_ttl);
        let approvals: Vec<&ScopeRule> = rules
            .iter()
            .copied()
            .filter(|r| r.tier == Tier::Approval)
            .collect();
        if approvals.is_empty() {
            return Ok(Decision::Grant {
                ttl,
                max_ttl,
                rules: rules.iter().map(|r| r.rule_name()).collect(),
            });
        }
        let mut pending_ttl = DEFAULT_PENDING_TTL;
        let mut requirements = Vec::new();
        for r in approvals {
            if let Some(a) = &r.approval {
                pending_ttl = pending_ttl.min(a.pending_ttl);
                requirements.push(crate::store::Requirement {
                    scope: r.name.clone(),
                    approver_groups: a.approvers.clone(),
                    approvals_required: a.required,
                    rule: r.rule_name(),
                });
            }
        }
        Ok(Decision::Park {
            ttl,
            max_ttl,
            pending_ttl,
            requirements,
        })
    }

    /// Load and validate a policy file.
    pub fn load(path: &std::path::Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// Parse and validate policy text, reporting every problem.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            PolicyError::Invalid(vec![Problem {
                line,
                message: e.message().to_owned(),
            }])
        })?;
        let mut problems = Vec::new();
        let mut p = |span: std::ops::Range<usize>, message: String| {
            problems.push(Problem {
                line: line_of(text, span.start),
                message,
            });
        };

        let hard_max_ttl = match &raw.broker.max_ttl {
            Some(s) => duration(s, "broker.max_ttl", &mut p).unwrap_or(DEFAULT_HARD_MAX_TTL),
            None => DEFAULT_HARD_MAX_TTL,
        };
        let mut groups = BTreeMap::new();
        for (name, members) in &raw.groups {
            let mut list = Vec::new();
            for m in members.get_ref() {
                if let Err(e) = Identity::parse(m.get_ref()) {
                    p(
                        m.span(),
                        format!("group `{name}`: member `{}`: {e}", m.get_ref()),
                    );
                }
                list.push(m.get_ref().clone());
            }
            if list.is_empty() {
                p(members.span(), format!("group `{name}` has no members"));
            }
            groups.insert(name.clone(), list);
        }
        let mut admin_groups = Vec::new();
        for g in &raw.broker.admins {
            if !groups.contains_key(g.get_ref()) {
                p(
                    g.span(),
                    format!("broker.admins: unknown group `{}`", g.get_ref()),
                );
            }
            admin_groups.push(g.get_ref().clone());
        }
        let mut auditor_groups = Vec::new();
        for g in &raw.broker.auditors {
            if !groups.contains_key(g.get_ref()) {
                p(
                    g.span(),
                    format!("broker.auditors: unknown group `{}`", g.get_ref()),
                );
            }
            auditor_groups.push(g.get_ref().clone());
        }

        let mut scopes = BTreeMap::new();
        for entry in &raw.scopes {
            let line = line_of(text, entry.span().start);
            let s = entry.get_ref();
            let name = s.name.get_ref().clone();
            let here = |field: &str| format!("scope `{name}`: {field}");
            if !valid_scope_name(&name) {
                p(
                    s.name.span(),
                    format!(
                        "scope name `{name}` must be 1-128 printable ASCII characters without spaces"
                    ),
                );
            }
            if scopes.contains_key(&name) {
                p(s.name.span(), format!("scope `{name}` is defined twice"));
            }
            let tier = match s.tier.get_ref().as_str() {
                "auto" => Tier::Auto,
                "approval" => Tier::Approval,
                other => {
                    p(
                        s.tier.span(),
                        format!(
                            "{}: unknown tier `{other}` (expected `auto` or `approval`)",
                            here("tier")
                        ),
                    );
                    Tier::Auto
                }
            };
            if s.workloads.is_empty() {
                p(
                    s.name.span(),
                    format!(
                        "{}: no workloads may ask for it; list at least one identity pattern",
                        here("workloads")
                    ),
                );
            }
            for w in &s.workloads {
                if !w.get_ref().starts_with("spiffe://") {
                    p(
                        w.span(),
                        format!(
                            "{}: pattern `{}` must start with `spiffe://`",
                            here("workloads"),
                            w.get_ref()
                        ),
                    );
                }
            }
            let dur = |v: &Option<Spanned<String>>,
                       field: &str,
                       p: &mut dyn FnMut(std::ops::Range<usize>, String)| {
                v.as_ref()
                    .and_then(|v| match humantime::parse_duration(v.get_ref()) {
                        Ok(d) if !d.is_zero() => Some(d),
                        Ok(_) => {
                            p(
                                v.span(),
                                format!("{}: must be greater than zero", here(field)),
                            );
                            None
                        }
                        Err(e) => {
                            p(
                                v.span(),
                                format!(
                                    "{}: `{}` is not a duration ({e})",
                                    here(field),
                                    v.get_ref()
                                ),
                            );
                            None
                        }
                    })
            };
            let max_ttl =
                dur(&s.max_ttl, "max_ttl", &mut p).unwrap_or(DEFAULT_MAX_TTL.min(hard_max_ttl));
            let default_ttl = dur(&s.default_ttl, "default_ttl", &mut p).unwrap_or(max_ttl);
            if max_ttl > hard_max_ttl {
                p(
                    entry.span(),
                    format!(
                        "{}: {} exceeds broker.max_ttl {}",
                        here("max_ttl"),
                        humantime::format_duration(max_ttl),
                        humantime::format_duration(hard_max_ttl)
                    ),
                );
            }
            if default_ttl > max_ttl {
                p(
                    entry.span(),
                    format!(
                        "{}: default_ttl is longer than max_ttl",
                        here("default_ttl")
                    ),
                );
            }
            let approval = match tier {
                Tier::Auto => {
                    if !s.approvers.is_empty()
                        || s.approvals_required.is_some()
                        || s.pending_ttl.is_some()
                        || s.break_glass.is_some()
                        || s.claim_ttl.is_some()
                        || s.require_approval_reason
                    {
                        p(
                            entry.span(),
                            format!(
                                "{}: approvers/approvals_required/pending_ttl/break_glass only apply to tier `approval`",
                                here("tier")
                            ),
                        );
                    }
                    None
                }
                Tier::Approval => {
                    let mut members = BTreeSet::new();
                    if s.approvers.is_empty() {
                        p(
                            entry.span(),
                            format!(
                                "{}: an approval scope needs at least one approver group",
                                here("approvers")
                            ),
                        );
                    }
                    for g in &s.approvers {
                        match groups.get(g.get_ref()) {
                            Some(m) => members.extend(m.iter().cloned()),
                            None => p(
                                g.span(),
                                format!("{}: unknown group `{}`", here("approvers"), g.get_ref()),
                            ),
                        }
                    }
                    let required = s.approvals_required.as_ref().map_or(1, |r| *r.get_ref());
                    if required == 0 {
                        p(
                            entry.span(),
                            format!("{}: must be at least 1", here("approvals_required")),
                        );
                    } else if !members.is_empty() && required as usize > members.len() {
                        p(
                            entry.span(),
                            format!(
                                "{}: needs {required} approvals but its groups have only {} members",
                                here("approvals_required"),
                                members.len()
                            ),
                        );
                    }
                    let pending_ttl =
                        dur(&s.pending_ttl, "pending_ttl", &mut p).unwrap_or(DEFAULT_PENDING_TTL);
                    let claim_ttl =
                        dur(&s.claim_ttl, "claim_ttl", &mut p).unwrap_or(DEFAULT_CLAIM_TTL);
                    let break_glass_max_ttl = match &s.break_glass {
                        Some(b) if b.allowed => {
                            let d = dur(&b.max_ttl, "break_glass.max_ttl", &mut p)
                                .unwrap_or(max_ttl.min(Duration::from_secs(300)));
                            if d > max_ttl {
                                p(
                                    entry.span(),
                                    format!("{}: longer than max_ttl", here("break_glass.max_ttl")),
                                );
                            }
                            Some(d)
                        }
                        _ => None,
                    };
                    Some(ApprovalRule {
                        approvers: s.approvers.iter().map(|g| g.get_ref().clone()).collect(),
                        required,
                        pending_ttl,
                        break_glass_max_ttl,
                        claim_ttl,
                        require_reason: s.require_approval_reason,
                    })
                }
            };
            scopes.insert(
                name.clone(),
                ScopeRule {
                    name,
                    tier,
                    workloads: s.workloads.iter().map(|w| w.get_ref().clone()).collect(),
                    default_ttl,
                    max_ttl,
                    approval,
                    line,
                },
            );
        }
        let mut webhooks = Vec::new();
        for w in &raw.webhooks {
            let url = w.url.get_ref();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                p(
                    w.url.span(),
                    format!("webhook url `{url}` must start with http:// or https://"),
                );
            }
            let format = match w.format.as_ref().map(|f| f.get_ref().as_str()) {
                None | Some("json") => WebhookFormat::Json,
                Some("slack") => WebhookFormat::Slack,
                Some(other) => {
                    if let Some(f) = &w.format {
                        p(
                            f.span(),
                            format!("webhook format `{other}` (expected `json` or `slack`)"),
                        );
                    }
                    WebhookFormat::Json
                }
            };
            let mut events = Vec::new();
            for e in &w.events {
                match EventKind::parse(e.get_ref()) {
                    Some(kind) => events.push(kind),
                    None => p(
                        e.span(),
                        format!(
                            "webhook event `{}` (expected one of {})",
                            e.get_ref(),
                            EventKind::ALL
                                .iter()
                                .map(|k| k.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                }
            }
            webhooks.push(Webhook {
                url: url.clone(),
                format,
                events,
            });
        }
        let default_audience = raw
            .broker
            .default_audience
            .clone()
            .unwrap_or_else(|| "portcullis".into());
        if !valid_token_text(&default_audience, 256) {
            problems.push(Problem {
                line: 0,
                message: "broker.default_audience must be 1-256 printable characters".into(),
            });
        }
        if !problems.is_empty() {
            return Err(PolicyError::Invalid(problems));
        }
        Ok(Self {
            default_audience,
            admin_groups,
            auditor_groups,
            hard_max_ttl,
            groups,
            scopes,
            webhooks,
        })
    }
}

fn duration(
    s: &Spanned<String>,
    field: &str,
    p: &mut dyn FnMut(std::ops::Range<usize>, String),
) -> Option<Duration> {
    match humantime::parse_duration(s.get_ref()) {
        Ok(d) if !d.is_zero() => Some(d),
        _ => {
            p(
                s.span(),
                format!("{field}: `{}` is not a positive duration", s.get_ref()),
            );
            None
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |t| t.matches('\n').count() + 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    broker: RawBroker,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default, rename = "scope")]
    scopes: Vec<Spanned<RawScope>>,
    #[serde(default, rename = "webhook")]
    webhooks: Vec<RawWebhook>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    default_audience: Option<String>,
    #[serde(default)]
    admins: Vec<Spanned<String>>,
    #[serde(default)]
    auditors: Vec<Spanned<String>>,
    max_ttl: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    name: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for humans reading the policy")]
    description: Option<String>,
    tier: Spanned<String>,
    #[serde(default)]
    workloads: Vec<Spanned<String>>,
    default_ttl: Option<Spanned<String>>,
    max_ttl: Option<Spanned<String>>,
    #[serde(default)]
    approvers: Vec<Spanned<String>>,
    approvals_required: Option<Spanned<u32>>,
    pending_ttl: Option<Spanned<String>>,
    claim_ttl: Option<Spanned<String>>,
    #[serde(default)]
    require_approval_reason: bool,
    break_glass: Option<RawBreakGlass>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    #[serde(default)]
    format: Option<Spanned<String>>,
    #[serde(default)]
    events: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreakGlass {
    allowed: bool,
    max_ttl: Option<Spanned<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[broker]
default_audience = "internal"
admins = ["admins"]

[groups]
db-owners = ["spiffe://example.org/human/alice", "spiffe://example.org/human/bob"]
admins = ["spiffe://example.org/human/root"]

[[scope]]
name = "orders.read"
tier = "auto"
workloads = ["spiffe://example.org/ns/billing/*"]
default_ttl = "5m"
max_ttl = "1h"

[[scope]]
name = "orders.admin"
tier = "approval"
workloads = ["spiffe://example.org/ns/billing/*"]
approvers = ["db-owners"]
approvals_required = 2
pending_ttl = "30m"
max_ttl = "15m"
"#;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    #[test]
    fn glob() {
        assert!(glob_match("spiffe://a/ns/*", "spiffe://a/ns/x/y"));
        assert!(!glob_match("spiffe://a/ns/*", "spiffe://a/other"));
        assert!(glob_match("spiffe://a/*/sa/api", "spiffe://a/ns/b/sa/api"));
        assert!(!glob_match(
            "spiffe://a/*/sa/api",
            "spiffe://a/ns/b/sa/apix"
        ));
        assert!(glob_match("spiffe://a/x", "spiffe://a/x"));
        assert!(!glob_match("spiffe://a/x", "spiffe://a/xy"));
        assert!(!glob_match("spiffe://a/x*x", "spiffe://a/x"));
    }

    #[test]
    fn decides_grant_park_and_refuse_with_clamped_ttl() {
        let p = Policy::parse(GOOD).unwrap();
        let w = id("spiffe://example.org/ns/billing/sa/api");
        match p.decide(&w, &["orders.read".into()], None).unwrap() {
            Decision::Grant { ttl, max_ttl, .. } => {
                assert_eq!(ttl, Duration::from_secs(300));
                assert_eq!(max_ttl, Duration::from_secs(3600));
            }
            d => panic!("{d:?}"),
        }
        match p
            .decide(&w, &["orders.read".into()], Some(Duration::from_secs(7200)))
            .unwrap()
        {
            Decision::Grant { ttl, .. } => assert_eq!(ttl, Duration::from_secs(3600)),
            d => panic!("{d:?}"),
        }
        match p
            .decide(&w, &["orders.read".into(), "orders.admin".into()], None)
            .unwrap()
        {
            Decision::Park {
                ttl,
                pending_ttl,
                requirements,
                ..
            } => {
                assert_eq!(ttl, Duration::from_secs(300));
                assert_eq!(pending_ttl, Duration::from_secs(1800));
                assert_eq!(requirements.len(), 1);
                assert_eq!(requirements[0].approvals_required, 2);
            }
            d => panic!("{d:?}"),
        }
        let r = p.decide(&w, &["nope".into()], None).unwrap_err();
        assert_eq!(r.scope, "nope");
        let other = id("spiffe://example.org/ns/web/sa/x");
        let r = p.decide(&other, &["orders.read".into()], None).unwrap_err();
        assert!(r.reason.contains("not among its allowed workloads"), "{r}");
        assert!(p.is_admin(&id("spiffe://example.org/human/root")));
        assert!(!p.is_admin(&w));
    }

    #[test]
    fn reports_every_problem_with_its_line() {
        let bad = r#"
[groups]
g = ["not-a-uri"]

[[scope]]
name = "a b"
tier = "sometimes"
workloads = ["http://x"]

[[scope]]
name = "x"
tier = "approval"
workloads = ["spiffe://x/*"]
approvers = ["missing"]
max_ttl = "5m"
default_ttl = "10m"
"#;
        let PolicyError::Invalid(problems) = Policy::parse(bad).unwrap_err() else {
            panic!()
        };
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(problems.len() >= 6, "{text:#?}");
        assert!(text.iter().any(|t| t.contains("not-a-uri")), "{text:#?}");
        assert!(
            text.iter().any(|t| t.contains("unknown tier `sometimes`")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|t| t.contains("unknown group `missing`")),
            "{text:#?}"
        );
        assert!(
            text.iter().any(|t| t.contains("default_ttl is longer")),
            "{text:#?}"
        );
        assert!(
            lines.contains(&3) && lines.contains(&6) && lines.contains(&7) && lines.contains(&14),
            "{text:#?}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            Policy::parse("[[scope]]\nname = \"a\"\ntier = \"auto\"\nworkload = []\n").unwrap_err();
        assert!(err.to_string().contains("workload"), "{err}");
        assert!(err.to_string().contains("line 4"), "{err}");
    }
}
