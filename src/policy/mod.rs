//! `policy` decides: which identity may have which scope, at once, after
//! approval, or not at all.
//!
//! The policy is a TOML file validated as a whole: every problem is reported
//! with its line, unknown keys are refused, and anything not granted by a
//! rule is refused (deny by default). The README's "Policy file" section
//! documents the format.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::identity::Identity;
use crate::vocab::EventKind;

mod check;
mod delegation;
mod raw;

pub use self::check::MAX_DELEGATION_DEPTH;
pub(crate) use self::check::{identity_template, safe_url, template_segments};
pub use self::delegation::DelegationAsk;

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
    /// Requests must say why (`require_justification`, default true): an
    /// approver is never asked to grant access with a blank reason.
    pub require_justification: bool,
}

/// A scope's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeRule {
    /// Scope name.
    pub name: String,
    /// What it allows, in words, for the people who approve it (shown in
    /// the console, `requests show` and notifications).
    pub description: String,
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
    /// What its tokens are bound to.
    pub bind: Binding,
    /// The database login it issues, if it is a login scope.
    pub login: Option<LoginRule>,
    /// Line of the `[[scope]]` table.
    pub line: usize,
}

/// What a login scope issues (`login = { database, member_of }`): a
/// PostgreSQL login on `database`, a member of the group role `member_of`
/// and nothing else, for the life of the lease (docs/design-db-credentials.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginRule {
    /// The `[[database]]` it is made on.
    pub database: String,
    /// The existing group role that holds its rights.
    pub member_of: String,
}

/// A database the broker makes logins on (`[[database]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Database {
    /// What scopes name.
    pub name: String,
    /// How to reach it as its admin (no password in it).
    pub url: String,
    /// The file that holds the admin's password.
    pub password_file: std::path::PathBuf,
    /// PEM bundle of the CAs that may sign its certificate (default: the
    /// system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// Admin connections.
    pub pool: usize,
    /// A login's name: `{lease}` replaced by its lease id.
    pub role_name: String,
    /// Live logins one identity may hold on it.
    pub max_logins_per_identity: u32,
    /// What happens to what a login owns when it is dropped.
    pub owned: Owned,
    /// Line of the `[[database]]` table.
    pub line: usize,
}

impl Database {
    /// The name of the login of lease `lease_id`.
    pub fn role_of(&self, lease_id: &str) -> String {
        self.role_name.replacen(LEASE_PLACEHOLDER, lease_id, 1)
    }
}

/// A platform whose signed tokens workloads without a client certificate
/// sign in with (`[[issuer]]`, issue 24; docs/design-federation.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    /// What the trail and metrics call it.
    pub name: String,
    /// Which platform's rules apply.
    pub kind: IssuerKind,
    /// The exact `iss` its tokens carry (`None` for a JWT-SVID issuer,
    /// chosen by the trust domain of `sub`).
    pub issuer: Option<String>,
    /// Where its verification keys come from.
    pub keys: KeySource,
    /// PEM bundle of the CAs its HTTPS endpoints may be signed by
    /// (default: the system's roots).
    pub ca_file: Option<std::path::PathBuf>,
    /// The one audience its tokens must be for (this broker).
    pub audience: String,
    /// The signing algorithms accepted (never `none` nor HMAC).
    pub algorithms: Vec<String>,
    /// Longest `exp - iat`.
    pub max_age: std::time::Duration,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: std::time::Duration,
    /// Claims that must hold exactly one of these values (JSON pointers
    /// for nested ones).
    pub require: BTreeMap<String, Vec<String>>,
    /// The identity template (`{claim}` or `{/json/pointer}` placeholders,
    /// one path segment each); `None` for a JWT-SVID issuer (`sub` is the
    /// identity).
    pub identity: Option<String>,
    /// The trust domains its identities are in.
    pub trust_domains: Vec<String>,
    /// How a token is kept from being used twice.
    pub single_use: SingleUse,
    /// Line of the `[[issuer]]` table.
    pub line: usize,
}

/// The platform an `[[issuer]]` is, for the rules particular to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuerKind {
    /// GitHub Actions' OIDC tokens.
    Github,
    /// Kubernetes projected service-account tokens.
    Kubernetes,
    /// SPIFFE JWT-SVIDs.
    JwtSvid,
    /// Any other OIDC issuer.
    Generic,
}

/// Where an issuer's keys come from (exactly one source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `{issuer}/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery,
    /// A JWKS URL.
    JwksUrl(String),
    /// A JWKS file, read again at each refresh.
    JwksFile(std::path::PathBuf),
    /// A JWKS written in the policy.
    Inline(String),
}

/// How an issuer's tokens are kept from being used twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleUse {
    /// A `jti` is required, and usable once until `exp` + leeway.
    Jti,
    /// No `jti` needed: replay is bounded by `max_age` and the audience.
    Bounded,
}

/// The placeholder of `role_name`.
pub const LEASE_PLACEHOLDER: &str = "{lease}";

/// What a dropped login's objects become (`owned`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Owned {
    /// Given to the group role (`REASSIGN OWNED`), then the role dropped.
    #[default]
    Reassign,
    /// Dropped with it (`DROP OWNED`).
    Drop,
}

/// What a scope's tokens are bound to (`bind = "mtls"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Binding {
    /// Bearer: whoever holds the token may use it.
    #[default]
    None,
    /// RFC 8705: the client certificate it was issued to (`cnf.x5t#S256`).
    Mtls,
}

/// Whether delegating an approval-tier scope needs approval again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelegationApproval {
    /// Allowed when the parent lease itself was approved.
    Inherit,
    /// The exchange is parked for the scope's approvers.
    Again,
}

/// One `[[delegation]]` rule: who may hand which scopes to whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelegationRule {
    /// Patterns of the identities that may delegate (the parent's holder).
    pub from: Vec<String>,
    /// Patterns of the identities that may receive.
    pub to: Vec<String>,
    /// Scopes that may pass along this edge.
    pub scopes: Vec<String>,
    /// Longest chain from the lease granted directly.
    pub max_depth: u32,
    /// Audiences a child may name (empty: only its parent's).
    pub audiences: Vec<String>,
    /// Approval-tier scopes: inherited or asked for again.
    pub approval: DelegationApproval,
    /// Line of the `[[delegation]]` table.
    pub line: usize,
}

impl DelegationRule {
    /// Human name of the rule, used in refusals and records.
    pub fn rule_name(&self) -> String {
        format!("delegation rule (policy line {})", self.line)
    }
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
    /// Identity → the person (`[people]`) it belongs to: one human with a
    /// certificate and a console sign-in is one approver, never two.
    pub people: BTreeMap<String, String>,
    /// Scope name → rule.
    pub scopes: BTreeMap<String, ScopeRule>,
    /// Where to announce request events.
    pub webhooks: Vec<Webhook>,
    /// Who may delegate what to whom (none: no delegation at all).
    pub delegations: Vec<DelegationRule>,
    /// Databases that login scopes make logins on, by name.
    pub databases: BTreeMap<String, Database>,
    /// Platforms whose tokens workloads sign in with, by name.
    pub issuers: BTreeMap<String, Issuer>,
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
        requirements: Vec<crate::model::Requirement>,
    },
}

impl Decision {
    /// TTL, renewal bound, requirements and pending window (the last two
    /// empty and zero for a grant).
    pub fn parked(self) -> (Duration, Duration, Vec<crate::model::Requirement>, Duration) {
        match self {
            Self::Grant { ttl, max_ttl, .. } => (ttl, max_ttl, Vec::new(), Duration::ZERO),
            Self::Park {
                ttl,
                max_ttl,
                pending_ttl,
                requirements,
            } => (ttl, max_ttl, requirements, pending_ttl),
        }
    }
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

    /// May `who` use the approver console: named in an approver group of
    /// some scope, or an admin?
    pub fn may_review(&self, who: &Identity) -> bool {
        self.is_admin(who)
            || self.scopes.values().any(|r| {
                r.approval
                    .as_ref()
                    .is_some_and(|a| a.approvers.iter().any(|g| self.is_member(g, who.as_str())))
            })
    }

    /// Everyone [`Policy::may_review`] admits: the members of the admin
    /// groups and of every group that approves a scope (members are exact
    /// identities, so this is the whole set).
    pub fn reviewers(&self) -> std::collections::BTreeSet<&str> {
        let approving = self
            .scopes
            .values()
            .filter_map(|r| r.approval.as_ref())
            .flat_map(|a| a.approvers.iter());
        self.admin_groups
            .iter()
            .chain(approving)
            .filter_map(|g| self.groups.get(g))
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// Is `who` a member of any admin group?
    pub fn is_admin(&self, who: &Identity) -> bool {
        self.admin_groups
            .iter()
            .any(|g| self.is_member(g, who.as_str()))
    }

    /// Are identities `a` and `b` the same principal: equal, or named by
    /// the same person in `[people]`? Self-approval, double approval and
    /// chain membership are judged by this, not by string equality.
    pub fn same_person(&self, a: &str, b: &str) -> bool {
        a == b
            || self
                .people
                .get(a)
                .is_some_and(|p| self.people.get(b) == Some(p))
    }

    /// Is `who` a member of group `g`?
    pub fn is_member(&self, g: &str, who: &str) -> bool {
        self.groups
            .get(g)
            .is_some_and(|m| m.iter().any(|x| x == who))
    }

    /// The rules of `scopes` if `identity` may ask for every one of them.
    fn rules_for(
        &self,
        identity: &Identity,
        scopes: &[String],
    ) -> Result<Vec<&ScopeRule>, Refusal> {
        scopes
            .iter()
            .map(|s| {
                let rule = self.scopes.get(s).ok_or_else(|| Refusal {
                    scope: s.clone(),
                    reason: "not defined in policy".into(),
                })?;
                if rule
                    .workloads
                    .iter()
                    .any(|p| glob_match(p, identity.as_str()))
                {
                    Ok(rule)
                } else {
                    Err(Refusal {
                        scope: s.clone(),
                        reason: format!(
                            "`{}` is not among its allowed workloads ({})",
                            identity.as_str(),
                            rule.rule_name()
                        ),
                    })
                }
            })
            .collect()
    }

    /// Decide for `identity` asking `scopes` (already syntax-checked) with an
    /// optional wanted TTL. The TTL is clamped to the smallest `max_ttl`.
    pub fn decide(
        &self,
        identity: &Identity,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<Decision, Refusal> {
        let rules = self.rules_for(identity, scopes)?;
        Ok(Self::decide_rules(&rules, ttl))
    }

    /// What policy says of `scopes` handed on by a delegation (a
    /// `[[delegation]]` rule already allowed the edge): each scope must
    /// still exist; who may ask for it directly does not matter.
    pub fn decide_delegated(
        &self,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<Decision, Refusal> {
        let rules = scopes
            .iter()
            .map(|s| {
                self.scopes.get(s).ok_or_else(|| Refusal {
                    scope: s.clone(),
                    reason: "not defined in policy".into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::decide_rules(&rules, ttl))
    }

    /// The `[[issuer]]` whose trust domains hold `who`, if any: such an
    /// identity signs in with a platform token, never with a certificate.
    pub fn issuer_owning(&self, who: &Identity) -> Option<String> {
        let domain = who.as_str().strip_prefix("spiffe://")?.split('/').next()?;
        self.issuers
            .values()
            .find(|i| i.trust_domains.iter().any(|d| d == domain))
            .map(|i| i.name.clone())
    }

    /// Must tokens carrying any of `scopes` be bound to their holder's
    /// certificate (`bind = "mtls"`)?
    pub fn binds(&self, scopes: &[String]) -> bool {
        scopes
            .iter()
            .filter_map(|s| self.scopes.get(s))
            .any(|r| r.bind == Binding::Mtls)
    }

    /// How long an issued-but-unclaimed request of `scopes` waits for its
    /// requester: the smallest `claim_ttl` among them.
    pub fn claim_ttl(&self, scopes: &[String]) -> Duration {
        self.claim_ttl_of(scopes)
    }

    /// The first scope of `requirements` that needs a justification
    /// (`require_justification`, the default for approval-tier scopes)
    /// when `justification` is blank: a request that would park without
    /// telling its approvers why.
    pub fn unjustified<'r>(
        &self,
        requirements: &'r [crate::model::Requirement],
        justification: &str,
    ) -> Option<&'r str> {
        if !justification.trim().is_empty() {
            return None;
        }
        requirements
            .iter()
            .find(|w| {
                self.scopes
                    .get(&w.scope)
                    .and_then(|r| r.approval.as_ref())
                    .is_some_and(|a| a.require_justification)
            })
            .map(|w| w.scope.as_str())
    }

    fn claim_ttl_of(&self, scopes: &[String]) -> Duration {
        scopes
            .iter()
            .filter_map(|s| self.scopes.get(s))
            .filter_map(|r| r.approval.as_ref())
            .map(|a| a.claim_ttl)
            .min()
            .unwrap_or(DEFAULT_CLAIM_TTL)
    }

    fn decide_rules(rules: &[&ScopeRule], ttl: Option<Duration>) -> Decision {
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
            return Decision::Grant {
                ttl,
                max_ttl,
                rules: rules.iter().map(|r| r.rule_name()).collect(),
            };
        }
        let mut pending_ttl = DEFAULT_PENDING_TTL;
        let mut requirements = Vec::new();
        for r in approvals {
            if let Some(a) = &r.approval {
                pending_ttl = pending_ttl.min(a.pending_ttl);
                requirements.push(crate::model::Requirement {
                    scope: r.name.clone(),
                    approver_groups: a.approvers.clone(),
                    approvals_required: a.required,
                    rule: r.rule_name(),
                    description: r.description.clone(),
                });
            }
        }
        Decision::Park {
            ttl,
            max_ttl,
            pending_ttl,
            requirements,
        }
    }

    /// Load and validate a policy file.
    pub fn load(path: &std::path::Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// Parse and validate policy text, reporting every problem: first
    /// every unknown key and, around them, the typed reading
    /// and each section's checks ([`check`]), in one pass ([`raw::unknown_and_the_rest`]).
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let (unknown, rest) = raw::unknown_and_the_rest(text);
        if unknown.is_empty() {
            return Self::parse_known(text);
        }
        // Every problem at once: what the unknown keys hide is checked too
        // (unless an unknown key is a whole table).
        let mut problems = unknown;
        if let Some(Err(PolicyError::Invalid(more))) = rest.as_deref().map(Self::parse_known) {
            problems.extend(more);
        }
        problems.sort_by_key(|p| p.line);
        Err(PolicyError::Invalid(problems))
    }

    /// [`Policy::parse`] of a text with no unknown keys.
    fn parse_known(text: &str) -> Result<Self, PolicyError> {
        let raw: raw::RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| raw::line_of(text, s.start));
            PolicyError::Invalid(vec![Problem {
                line,
                message: e.message().to_owned(),
            }])
        })?;
        check::Checker::new(text).policy(&raw)
    }
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

    const DELEGATING: &str = r#"
[[scope]]
name = "orders.read"
tier = "auto"
workloads = ["spiffe://example.org/agent/*"]

[[scope]]
name = "orders.write"
tier = "auto"
workloads = ["spiffe://example.org/agent/*"]
bind = "mtls"

[[delegation]]
from = ["spiffe://example.org/agent/*"]
to = ["spiffe://example.org/tool/*"]
scopes = ["orders.read", "orders.write"]
max_depth = 3
audiences = ["orders-api"]
approval = "again"

[[delegation]]
from = ["spiffe://example.org/tool/*"]
to = ["spiffe://example.org/tool/*"]
scopes = ["orders.read"]
"#;

    #[test]
    fn delegation_rules_and_bindings_are_read() {
        let p = Policy::parse(DELEGATING).unwrap();
        assert_eq!(p.scopes["orders.read"].bind, Binding::None);
        assert_eq!(p.scopes["orders.write"].bind, Binding::Mtls);
        assert_eq!(
            p.delegations,
            [
                DelegationRule {
                    from: vec!["spiffe://example.org/agent/*".into()],
                    to: vec!["spiffe://example.org/tool/*".into()],
                    scopes: vec!["orders.read".into(), "orders.write".into()],
                    max_depth: 3,
                    audiences: vec!["orders-api".into()],
                    approval: DelegationApproval::Again,
                    line: 13,
                },
                DelegationRule {
                    from: vec!["spiffe://example.org/tool/*".into()],
                    to: vec!["spiffe://example.org/tool/*".into()],
                    scopes: vec!["orders.read".into()],
                    max_depth: 1,
                    audiences: vec![],
                    approval: DelegationApproval::Inherit,
                    line: 21,
                },
            ]
        );
        assert_eq!(
            p.delegations[0].rule_name(),
            "delegation rule (policy line 13)"
        );
    }

    #[test]
    fn bad_delegation_rules_are_reported_with_their_lines() {
        let bad = r#"
[[scope]]
name = "a"
tier = "auto"
workloads = ["spiffe://x/*"]
bind = "token"

[[delegation]]
from = ["http://x"]
scopes = ["a", "nope"]
max_depth = 17
approval = "maybe"
depth = 2
"#;
        // Issue 27, item 7: the unknown key and every bad value, at once.
        let PolicyError::Invalid(problems) = Policy::parse(bad).unwrap_err() else {
            panic!()
        };
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        for want in [
            "line 13: unknown key `delegation.depth` (expected one of: from, to, scopes, max_depth, audiences, approval)",
            "line 6: scope `a`: bind: unknown binding `token` (expected `mtls`)",
            "line 8: delegation rule (policy line 8): to: list at least one identity pattern",
            "line 9: delegation rule (policy line 8): from: pattern `http://x` must start with `spiffe://`",
            "line 10: delegation rule (policy line 8): scopes: `nope` is not a scope of this policy",
            "line 11: delegation rule (policy line 8): max_depth: 17 is not between 1 and 16",
            "line 12: delegation rule (policy line 8): approval: unknown value `maybe` (expected `inherit` or `again`)",
        ] {
            assert!(
                text.iter().any(|t| t == want),
                "missing {want:?} in {text:#?}"
            );
        }
        assert_eq!(text.len(), 7, "{text:#?}");
        let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
        assert!(lines.is_sorted(), "in file order: {text:#?}");
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        let text = "[broker]\nadmin = []\n[[scope]]\nname = \"a\"\ntier = \"auto\"\nworkload = []\nbreak_glass = { allowed = true, maxttl = \"1m\" }\n[[webhook]]\nurl = \"https://x\"\nevent = []\n";
        let PolicyError::Invalid(problems) = Policy::parse(text).unwrap_err() else {
            panic!()
        };
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        for want in [
            "line 2: unknown key `broker.admin` (expected one of: default_audience, admins, auditors, max_ttl)",
            "line 6: unknown key `scope.workload` (expected one of: name, description, tier, workloads, default_ttl, max_ttl, approvers, approvals_required, pending_ttl, claim_ttl, require_approval_reason, require_justification, bind, break_glass, login)",
            "line 7: unknown key `scope.break_glass.maxttl` (expected one of: allowed, max_ttl)",
            "line 10: unknown key `webhook.event` (expected one of: url, format, events)",
        ] {
            assert!(
                text.iter().any(|t| t == want),
                "missing {want:?} in {text:#?}"
            );
        }
        // Issue 27, item 7: and, in the same pass, what is wrong around
        // them (an auto scope with break-glass settings, on line 3).
        assert!(
            text.iter()
                .any(|t| t.starts_with("line 3: scope `a`: tier:")),
            "{text:#?}"
        );
    }

    /// Issue 27, items 3 and 5: a scope's description is read for its
    /// approvers; requests for approval scopes need a justification unless
    /// the scope waives it, which only an approval scope may.
    #[test]
    fn descriptions_and_justification_settings_are_read_and_checked() {
        let text = r#"
[groups]
ops = ["spiffe://t/human/a"]
[[scope]]
name = "a"
description = "read a"
tier = "auto"
workloads = ["spiffe://t/*"]
require_justification = false
[[scope]]
name = "b"
tier = "approval"
workloads = ["spiffe://t/*"]
approvers = ["ops"]
[[scope]]
name = "c"
tier = "approval"
workloads = ["spiffe://t/*"]
approvers = ["ops"]
require_justification = false
"#;
        let PolicyError::Invalid(problems) = Policy::parse(text).unwrap_err() else {
            panic!()
        };
        let text_of: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text_of.len(), 1, "{text_of:#?}");
        assert!(
            text_of[0].starts_with("line 4: scope `a`: tier:")
                && text_of[0].contains("require_justification"),
            "{text_of:#?}"
        );
        // Without the waiver on the auto scope, it parses.
        let fixed = text.replacen("require_justification = false\n", "", 1);
        let p = Policy::parse(&fixed).unwrap();
        assert_eq!(p.scopes["a"].description, "read a");
        let asked = |scope: &str| match p
            .decide(
                &crate::identity::Identity::parse("spiffe://t/w").unwrap(),
                &[scope.to_owned()],
                None,
            )
            .unwrap()
        {
            Decision::Park { requirements, .. } => requirements,
            other => panic!("{other:?}"),
        };
        let (b, c) = (asked("b"), asked("c"));
        assert_eq!(p.unjustified(&b, " "), Some("b"));
        assert_eq!(p.unjustified(&b, "ticket 7"), None);
        assert_eq!(p.unjustified(&c, ""), None, "waived");
    }

    /// Issue 27, item 7: quoted keys and string values are blanked whole,
    /// so what remains still reads as TOML and its own problems are found.
    #[test]
    fn quoted_unknown_keys_and_their_values_are_set_aside_whole() {
        let text = "[[scope]]\nname = \"a\"\n\"note\" = \"x, \\\"y\\\"\"\ntier = \"sometimes\"\nworkloads = [\"spiffe://t/*\"]\n";
        let PolicyError::Invalid(problems) = Policy::parse(text).unwrap_err() else {
            panic!()
        };
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            text[0].starts_with("line 3: unknown key `scope.note`"),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.starts_with("line 4:") && t.contains("sometimes")),
            "the bad tier after it is found in the same pass: {text:#?}"
        );
        assert_eq!(
            text.len(),
            2,
            "no syntax error from what was set aside: {text:#?}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            Policy::parse("[[scope]]\nname = \"a\"\ntier = \"auto\"\nworkload = []\n").unwrap_err();
        assert!(err.to_string().contains("workload"), "{err}");
        assert!(err.to_string().contains("line 4"), "{err}");
    }

    #[test]
    fn people_join_identities_and_each_identity_belongs_to_one_person() {
        let good = "[people]\nalice = [\"spiffe://t/human/alice\", \"oidc:alice@example.org\"]\n";
        let p = Policy::parse(good).unwrap();
        assert!(p.same_person("spiffe://t/human/alice", "oidc:alice@example.org"));
        assert!(p.same_person("spiffe://t/x", "spiffe://t/x"));
        assert!(!p.same_person("spiffe://t/human/alice", "oidc:bob@example.org"));
        assert!(
            !p.same_person("spiffe://t/x", "spiffe://t/y"),
            "unnamed: themselves only"
        );
        let bad = "[people]\na = [\"oidc:x@example.org\"]\nb = [\"oidc:x@example.org\", \"not an id\"]\nc = []\n";
        let PolicyError::Invalid(problems) = Policy::parse(bad).unwrap_err() else {
            panic!()
        };
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].contains("named by person `a` and person `b`"),
            "{text:?}"
        );
        assert!(text[1].contains("`not an id`"), "{text:?}");
        assert!(text[2].contains("person `c` has no identities"), "{text:?}");
        // Two identities of one person are one approver of a two-person rule.
        let two = "[groups]\ng = [\"spiffe://t/human/bob\", \"oidc:bob@example.org\"]\n\
                   [people]\nbob = [\"spiffe://t/human/bob\", \"oidc:bob@example.org\"]\n\
                   [[scope]]\nname = \"s\"\ntier = \"approval\"\nworkloads = [\"spiffe://t/w\"]\n\
                   approvers = [\"g\"]\napprovals_required = 2\n";
        let PolicyError::Invalid(problems) = Policy::parse(two).unwrap_err() else {
            panic!()
        };
        assert!(
            problems[0]
                .to_string()
                .contains("only 1 distinct approvers"),
            "{problems:?}"
        );
    }
}
