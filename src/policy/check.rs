//! Stage two of reading a policy: each section checked on its own, every
//! problem collected with its line, then the validated [`Policy`].

mod issuers;
pub(crate) use issuers::{safe_url, segments as template_segments, template as identity_template};
mod logins;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawBroker, RawDelegation, RawPolicy, RawScope, RawWebhook, line_of};
use super::{
    ApprovalRule, Binding, DEFAULT_CLAIM_TTL, DEFAULT_HARD_MAX_TTL, DEFAULT_MAX_TTL,
    DEFAULT_PENDING_TTL, DelegationApproval, DelegationRule, Policy, PolicyError, Problem,
    ScopeRule, Tier, Webhook, WebhookFormat,
};
use crate::identity::Identity;
use crate::text::{MAX_AUDIENCE, valid_scope_name, valid_token_text};
use crate::vocab::EventKind;

/// Audience when the policy names none.
const DEFAULT_AUDIENCE: &str = "portcullis";
/// Longest delegation chain a rule may allow.
pub const MAX_DELEGATION_DEPTH: u32 = 16;
/// Break-glass cap when a scope allows it without naming one.
const DEFAULT_BREAK_GLASS_TTL: Duration = Duration::from_secs(300);

type Groups = BTreeMap<String, Vec<String>>;

/// Collects problems while the sections are read.
pub(super) struct Checker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
    /// Identity → person, once `[people]` is read (approvers are counted
    /// as people).
    people: BTreeMap<String, String>,
}

impl<'t> Checker<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Self {
            text,
            problems: Vec::new(),
            people: BTreeMap::new(),
        }
    }

    fn problem(&mut self, span: Range<usize>, message: String) {
        self.problems.push(Problem {
            line: line_of(self.text, span.start),
            message,
        });
    }

    /// Every section, then every problem at once or the policy.
    pub(super) fn policy(mut self, raw: &RawPolicy) -> Result<Policy, PolicyError> {
        let hard_max_ttl = match &raw.broker.max_ttl {
            Some(s) => self
                .duration(s, "broker.max_ttl")
                .unwrap_or(DEFAULT_HARD_MAX_TTL),
            None => DEFAULT_HARD_MAX_TTL,
        };
        let groups = self.groups(raw);
        let people = self.people(raw);
        self.people = people.clone();
        let admin_groups = self.group_refs(&raw.broker.admins, "broker.admins", &groups);
        let auditor_groups = self.group_refs(&raw.broker.auditors, "broker.auditors", &groups);
        let databases = self.databases(raw);
        let mut scopes = BTreeMap::new();
        for entry in &raw.scopes {
            let mut rule = self.scope(entry, &groups, hard_max_ttl);
            rule.login = self.login(&rule.name, entry.get_ref().login.as_ref(), &databases);
            if scopes.contains_key(&rule.name) {
                let name = &rule.name;
                self.problem(
                    entry.get_ref().name.span(),
                    format!("scope `{name}` is defined twice"),
                );
            }
            scopes.insert(rule.name.clone(), rule);
        }
        let webhooks = raw.webhooks.iter().map(|w| self.webhook(w)).collect();
        let delegations = raw
            .delegations
            .iter()
            .map(|d| self.delegation(d, &scopes))
            .collect();
        let default_audience = self.audience(&raw.broker);
        let issuers = self.issuers(raw, &groups, &scopes);
        if !self.problems.is_empty() {
            return Err(PolicyError::Invalid(self.problems));
        }
        Ok(Policy {
            default_audience,
            admin_groups,
            auditor_groups,
            hard_max_ttl,
            groups,
            people,
            scopes,
            webhooks,
            delegations,
            databases,
            issuers,
        })
    }

    /// `[people]`: each person's identities (a certificate's SPIFFE ID, an
    /// `oidc:` sign-in, …), every one valid and named by one person only.
    fn people(&mut self, raw: &RawPolicy) -> BTreeMap<String, String> {
        let mut of = BTreeMap::new();
        for (person, ids) in &raw.people {
            if ids.get_ref().is_empty() {
                self.problem(ids.span(), format!("person `{person}` has no identities"));
            }
            for id in ids.get_ref() {
                let s = id.get_ref();
                if let Err(e) = Identity::parse_member(s) {
                    self.problem(id.span(), format!("person `{person}`: `{s}`: {e}"));
                } else if let Some(other) = of.insert(s.clone(), person.clone()) {
                    let msg = format!("`{s}` is named by person `{other}` and person `{person}`");
                    self.problem(id.span(), msg);
                }
            }
        }
        of
    }

    /// One `[[delegation]]`: patterns on both sides, scopes the policy
    /// defines, a depth of 1 to [`MAX_DELEGATION_DEPTH`].
    fn delegation(
        &mut self,
        entry: &Spanned<RawDelegation>,
        scopes: &BTreeMap<String, ScopeRule>,
    ) -> DelegationRule {
        let d = entry.get_ref();
        let line = line_of(self.text, entry.span().start);
        let what = format!("delegation rule (policy line {line})");
        for (field, patterns) in [("from", &d.from), ("to", &d.to)] {
            if patterns.is_empty() {
                self.problem(
                    entry.span(),
                    format!("{what}: {field}: list at least one identity pattern"),
                );
            }
            for p in patterns {
                if !p.get_ref().starts_with("spiffe://") {
                    let msg = format!(
                        "{what}: {field}: pattern `{}` must start with `spiffe://`",
                        p.get_ref()
                    );
                    self.problem(p.span(), msg);
                }
            }
        }
        if d.scopes.is_empty() {
            self.problem(
                entry.span(),
                format!("{what}: scopes: list the scopes that may be delegated"),
            );
        }
        for sc in &d.scopes {
            if !scopes.contains_key(sc.get_ref()) {
                let msg = format!(
                    "{what}: scopes: `{}` is not a scope of this policy",
                    sc.get_ref()
                );
                self.problem(sc.span(), msg);
            }
        }
        let (max_depth, approval) = self.delegation_limits(d, &what);
        let strings = |v: &[Spanned<String>]| v.iter().map(|x| x.get_ref().clone()).collect();
        DelegationRule {
            from: strings(&d.from),
            to: strings(&d.to),
            scopes: strings(&d.scopes),
            max_depth,
            audiences: strings(&d.audiences),
            approval,
            line,
        }
    }

    /// A delegation rule's `max_depth` (default 1) and `approval` (default
    /// `inherit`).
    fn delegation_limits(&mut self, d: &RawDelegation, what: &str) -> (u32, DelegationApproval) {
        let max_depth = match &d.max_depth {
            None => 1,
            Some(m) if (1..=MAX_DELEGATION_DEPTH).contains(m.get_ref()) => *m.get_ref(),
            Some(m) => {
                let msg = format!(
                    "{what}: max_depth: {} is not between 1 and {MAX_DELEGATION_DEPTH}",
                    m.get_ref()
                );
                self.problem(m.span(), msg);
                1
            }
        };
        let approval = match d.approval.as_ref().map(|a| a.get_ref().as_str()) {
            None | Some("inherit") => DelegationApproval::Inherit,
            Some("again") => DelegationApproval::Again,
            Some(other) => {
                let msg = format!(
                    "{what}: approval: unknown value `{other}` (expected `inherit` or `again`)"
                );
                if let Some(a) = &d.approval {
                    self.problem(a.span(), msg);
                }
                DelegationApproval::Inherit
            }
        };
        (max_depth, approval)
    }

    /// A scope's `bind`: absent, or `"mtls"`.
    fn binding(&mut self, s: &RawScope, name: &str) -> Binding {
        match s.bind.as_ref().map(|b| b.get_ref().as_str()) {
            None => Binding::None,
            Some("mtls") => Binding::Mtls,
            Some(other) => {
                let msg =
                    format!("scope `{name}`: bind: unknown binding `{other}` (expected `mtls`)");
                if let Some(b) = &s.bind {
                    self.problem(b.span(), msg);
                }
                Binding::None
            }
        }
    }

    fn duration(&mut self, s: &Spanned<String>, field: &str) -> Option<Duration> {
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => {
                let msg = format!("{field}: `{}` is not a positive duration", s.get_ref());
                self.problem(s.span(), msg);
                None
            }
        }
    }

    /// `[groups]`: every member a valid identity, no empty group.
    fn groups(&mut self, raw: &RawPolicy) -> Groups {
        let mut groups = BTreeMap::new();
        for (name, members) in &raw.groups {
            for m in members.get_ref() {
                if let Err(e) = Identity::parse_member(m.get_ref()) {
                    let msg = format!("group `{name}`: member `{}`: {e}", m.get_ref());
                    self.problem(m.span(), msg);
                }
            }
            if members.get_ref().is_empty() {
                self.problem(members.span(), format!("group `{name}` has no members"));
            }
            let list = members
                .get_ref()
                .iter()
                .map(|m| m.get_ref().clone())
                .collect();
            groups.insert(name.clone(), list);
        }
        groups
    }

    /// Group names under `field`, each one defined.
    fn group_refs(
        &mut self,
        names: &[Spanned<String>],
        field: &str,
        groups: &Groups,
    ) -> Vec<String> {
        for g in names {
            if !groups.contains_key(g.get_ref()) {
                self.problem(
                    g.span(),
                    format!("{field}: unknown group `{}`", g.get_ref()),
                );
            }
        }
        names.iter().map(|g| g.get_ref().clone()).collect()
    }

    fn audience(&mut self, broker: &RawBroker) -> String {
        let audience = broker
            .default_audience
            .clone()
            .unwrap_or_else(|| DEFAULT_AUDIENCE.into());
        if !valid_token_text(&audience, MAX_AUDIENCE) {
            self.problems.push(Problem {
                line: 0,
                message: "broker.default_audience must be 1-256 printable characters".into(),
            });
        }
        audience
    }

    /// One `[[scope]]`.
    fn scope(
        &mut self,
        entry: &Spanned<RawScope>,
        groups: &Groups,
        hard_max_ttl: Duration,
    ) -> ScopeRule {
        let s = entry.get_ref();
        let name = s.name.get_ref().clone();
        if !valid_scope_name(&name) {
            let msg = format!(
                "scope name `{name}` must be 1-128 printable ASCII characters without spaces"
            );
            self.problem(s.name.span(), msg);
        }
        let tier = self.tier(s, &name);
        self.workloads(s, &name);
        let (default_ttl, max_ttl) = self.scope_ttls(entry, &name, hard_max_ttl);
        let approval = match tier {
            Tier::Auto => {
                self.no_approval_keys(entry, &name);
                None
            }
            Tier::Approval => Some(self.approval(entry, &name, groups, max_ttl)),
        };
        let bind = self.binding(s, &name);
        ScopeRule {
            name,
            description: s.description.clone().unwrap_or_default(),
            tier,
            workloads: s.workloads.iter().map(|w| w.get_ref().clone()).collect(),
            default_ttl,
            max_ttl,
            approval,
            bind,
            login: None,
            line: line_of(self.text, entry.span().start),
        }
    }

    fn tier(&mut self, s: &RawScope, name: &str) -> Tier {
        match s.tier.get_ref().as_str() {
            "auto" => Tier::Auto,
            "approval" => Tier::Approval,
            other => {
                let msg = format!(
                    "scope `{name}`: tier: unknown tier `{other}` (expected `auto` or `approval`)"
                );
                self.problem(s.tier.span(), msg);
                Tier::Auto
            }
        }
    }

    fn workloads(&mut self, s: &RawScope, name: &str) {
        if s.workloads.is_empty() {
            let msg = format!(
                "scope `{name}`: workloads: no workloads may ask for it; list at least one identity pattern"
            );
            self.problem(s.name.span(), msg);
        }
        for w in &s.workloads {
            if !w.get_ref().starts_with("spiffe://") {
                let msg = format!(
                    "scope `{name}`: workloads: pattern `{}` must start with `spiffe://`",
                    w.get_ref()
                );
                self.problem(w.span(), msg);
            }
        }
    }

    /// A scope's optional positive duration `field`.
    fn scope_duration(
        &mut self,
        v: &Option<Spanned<String>>,
        name: &str,
        field: &str,
    ) -> Option<Duration> {
        let v = v.as_ref()?;
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.problem(
                    v.span(),
                    format!("scope `{name}`: {field}: must be greater than zero"),
                );
                None
            }
            Err(e) => {
                let msg = format!(
                    "scope `{name}`: {field}: `{}` is not a duration ({e})",
                    v.get_ref()
                );
                self.problem(v.span(), msg);
                None
            }
        }
    }

    /// `(default_ttl, max_ttl)` of a scope, within the broker's cap.
    fn scope_ttls(
        &mut self,
        entry: &Spanned<RawScope>,
        name: &str,
        hard_max_ttl: Duration,
    ) -> (Duration, Duration) {
        let s = entry.get_ref();
        let max_ttl = self
            .scope_duration(&s.max_ttl, name, "max_ttl")
            .unwrap_or(DEFAULT_MAX_TTL.min(hard_max_ttl));
        let default_ttl = self
            .scope_duration(&s.default_ttl, name, "default_ttl")
            .unwrap_or(max_ttl);
        if max_ttl > hard_max_ttl {
            let msg = format!(
                "scope `{name}`: max_ttl: {} exceeds broker.max_ttl {}",
                humantime::format_duration(max_ttl),
                humantime::format_duration(hard_max_ttl)
            );
            self.problem(entry.span(), msg);
        }
        if default_ttl > max_ttl {
            let msg = format!("scope `{name}`: default_ttl: default_ttl is longer than max_ttl");
            self.problem(entry.span(), msg);
        }
        (default_ttl, max_ttl)
    }

    fn no_approval_keys(&mut self, entry: &Spanned<RawScope>, name: &str) {
        let s = entry.get_ref();
        if !s.approvers.is_empty()
            || s.approvals_required.is_some()
            || s.pending_ttl.is_some()
            || s.break_glass.is_some()
            || s.claim_ttl.is_some()
            || s.require_approval_reason
            || s.require_justification.is_some()
        {
            let msg = format!(
                "scope `{name}`: tier: approvers/approvals_required/pending_ttl/claim_ttl/break_glass/require_approval_reason/require_justification only apply to tier `approval`"
            );
            self.problem(entry.span(), msg);
        }
    }

    /// The approval settings of an approval-tier scope.
    fn approval(
        &mut self,
        entry: &Spanned<RawScope>,
        name: &str,
        groups: &Groups,
        max_ttl: Duration,
    ) -> ApprovalRule {
        let s = entry.get_ref();
        let required = self.approvers(entry, name, groups);
        let pending_ttl = self
            .scope_duration(&s.pending_ttl, name, "pending_ttl")
            .unwrap_or(DEFAULT_PENDING_TTL);
        let claim_ttl = self
            .scope_duration(&s.claim_ttl, name, "claim_ttl")
            .unwrap_or(DEFAULT_CLAIM_TTL);
        let break_glass_max_ttl = match &s.break_glass {
            Some(b) if b.allowed => {
                let d = self
                    .scope_duration(&b.max_ttl, name, "break_glass.max_ttl")
                    .unwrap_or(max_ttl.min(DEFAULT_BREAK_GLASS_TTL));
                if d > max_ttl {
                    let msg = format!("scope `{name}`: break_glass.max_ttl: longer than max_ttl");
                    self.problem(entry.span(), msg);
                }
                Some(d)
            }
            _ => None,
        };
        ApprovalRule {
            approvers: s.approvers.iter().map(|g| g.get_ref().clone()).collect(),
            required,
            pending_ttl,
            break_glass_max_ttl,
            claim_ttl,
            require_reason: s.require_approval_reason,
            require_justification: s
                .require_justification
                .as_ref()
                .is_none_or(|b| *b.get_ref()),
        }
    }

    /// Check the approver groups and `approvals_required`; returns it.
    fn approvers(&mut self, entry: &Spanned<RawScope>, name: &str, groups: &Groups) -> u32 {
        let s = entry.get_ref();
        if s.approvers.is_empty() {
            let msg = format!(
                "scope `{name}`: approvers: an approval scope needs at least one approver group"
            );
            self.problem(entry.span(), msg);
        }
        // Distinct approvers: a person's identities (`[people]`) count once.
        let mut members = BTreeSet::new();
        for g in &s.approvers {
            match groups.get(g.get_ref()) {
                Some(m) => members.extend(m.iter().map(|id| {
                    self.people
                        .get(id)
                        .map_or_else(|| id.clone(), |p| format!("person {p}"))
                })),
                None => {
                    let msg = format!("scope `{name}`: approvers: unknown group `{}`", g.get_ref());
                    self.problem(g.span(), msg);
                }
            }
        }
        let required = s.approvals_required.as_ref().map_or(1, |r| *r.get_ref());
        if required == 0 {
            let msg = format!("scope `{name}`: approvals_required: must be at least 1");
            self.problem(entry.span(), msg);
        } else if !members.is_empty() && required as usize > members.len() {
            let msg = format!(
                "scope `{name}`: approvals_required: needs {required} approvals but its groups have only {} distinct approvers",
                members.len()
            );
            self.problem(entry.span(), msg);
        }
        required
    }

    /// One `[[webhook]]`.
    fn webhook(&mut self, w: &RawWebhook) -> Webhook {
        let url = w.url.get_ref();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            let msg = format!("webhook url `{url}` must start with http:// or https://");
            self.problem(w.url.span(), msg);
        }
        let format = match w.format.as_ref() {
            None => WebhookFormat::Json,
            Some(f) => match f.get_ref().as_str() {
                "json" => WebhookFormat::Json,
                "slack" => WebhookFormat::Slack,
                other => {
                    let msg = format!("webhook format `{other}` (expected `json` or `slack`)");
                    self.problem(f.span(), msg);
                    WebhookFormat::Json
                }
            },
        };
        let mut events = Vec::new();
        for e in &w.events {
            match EventKind::parse(e.get_ref()) {
                Some(kind) => events.push(kind),
                None => {
                    let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                    let msg = format!(
                        "webhook event `{}` (expected one of {})",
                        e.get_ref(),
                        known.join(", ")
                    );
                    self.problem(e.span(), msg);
                }
            }
        }
        Webhook {
            url: url.clone(),
            format,
            events,
        }
    }
}
