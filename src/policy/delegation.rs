//! Which `[[delegation]]` rule, if any, lets a holder hand scopes on.
//! Pure: the exchange (issue 12, step 2) asks this, then checks the parent
//! lease (active, its scopes, its lifetime) itself.

use super::{DelegationRule, Policy, Refusal, glob_match};
use crate::identity::Identity;

/// What a delegation asks of the policy.
#[derive(Clone, Copy, Debug)]
pub struct DelegationAsk<'a> {
    /// Who holds the parent token and delegates.
    pub holder: &'a Identity,
    /// Who the child token is for.
    pub to: &'a Identity,
    /// The child's scopes (already a subset of the parent's).
    pub scopes: &'a [String],
    /// The child's depth: its parent's plus one.
    pub depth: u32,
    /// The child's audience.
    pub audience: &'a str,
    /// The parent's audience (always allowed to the child).
    pub parent_audience: &'a str,
}

impl DelegationRule {
    fn connects(&self, ask: &DelegationAsk<'_>) -> bool {
        self.from.iter().any(|p| glob_match(p, ask.holder.as_str()))
            && self.to.iter().any(|p| glob_match(p, ask.to.as_str()))
    }

    /// Why this rule does not allow `ask` (`None`: it does).
    fn objection(&self, ask: &DelegationAsk<'_>) -> Option<Refusal> {
        let first = ask.scopes.first().cloned().unwrap_or_default();
        if let Some(s) = ask.scopes.iter().find(|s| !self.scopes.contains(s)) {
            return Some(Refusal {
                scope: s.clone(),
                reason: format!("may not be delegated under the {}", self.rule_name()),
            });
        }
        if ask.depth > self.max_depth {
            return Some(Refusal {
                scope: first,
                reason: format!(
                    "a chain of {} delegations is deeper than the {} allows ({})",
                    ask.depth,
                    self.rule_name(),
                    self.max_depth
                ),
            });
        }
        if ask.audience != ask.parent_audience && !self.audiences.iter().any(|a| a == ask.audience)
        {
            return Some(Refusal {
                scope: first,
                reason: format!(
                    "audience `{}` is neither the parent's (`{}`) nor one the {} allows",
                    ask.audience,
                    ask.parent_audience,
                    self.rule_name()
                ),
            });
        }
        None
    }
}

impl Policy {
    /// The first rule that allows `ask`, or a refusal naming the nearest
    /// rule (the first that connects the two identities) and what it
    /// forbids.
    pub fn delegation_rule(&self, ask: &DelegationAsk<'_>) -> Result<&DelegationRule, Refusal> {
        let mut nearest = None;
        for rule in self.delegations.iter().filter(|r| r.connects(ask)) {
            match rule.objection(ask) {
                None => return Ok(rule),
                Some(refusal) => {
                    nearest.get_or_insert(refusal);
                }
            }
        }
        Err(nearest.unwrap_or_else(|| Refusal {
            scope: ask.scopes.first().cloned().unwrap_or_default(),
            reason: format!(
                "no delegation rule lets `{}` delegate to `{}`",
                ask.holder.as_str(),
                ask.to.as_str()
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[scope]]
name = "orders.read"
tier = "auto"
workloads = ["spiffe://example.org/agent/*"]

[[scope]]
name = "orders.write"
tier = "auto"
workloads = ["spiffe://example.org/agent/*"]

[[delegation]]
from = ["spiffe://example.org/agent/*"]
to = ["spiffe://example.org/tool/*"]
scopes = ["orders.read"]
max_depth = 2
audiences = ["orders-api"]

[[delegation]]
from = ["spiffe://example.org/agent/*"]
to = ["spiffe://example.org/tool/writer"]
scopes = ["orders.read", "orders.write"]
"#;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    fn ask<'a>(
        holder: &'a Identity,
        to: &'a Identity,
        scopes: &'a [String],
        depth: u32,
        audience: &'a str,
    ) -> DelegationAsk<'a> {
        DelegationAsk {
            holder,
            to,
            scopes,
            depth,
            audience,
            parent_audience: "portcullis",
        }
    }

    #[test]
    fn the_first_rule_that_allows_it_is_chosen() {
        let p = Policy::parse(POLICY).unwrap();
        let (agent, tool, writer) = (
            id("spiffe://example.org/agent/a"),
            id("spiffe://example.org/tool/t"),
            id("spiffe://example.org/tool/writer"),
        );
        let read = ["orders.read".to_owned()];
        let both = ["orders.read".to_owned(), "orders.write".to_owned()];
        let r = p
            .delegation_rule(&ask(&agent, &tool, &read, 2, "orders-api"))
            .unwrap();
        assert_eq!(r.line, 12);
        let r = p
            .delegation_rule(&ask(&agent, &writer, &both, 1, "portcullis"))
            .unwrap();
        assert_eq!(r.line, 19, "the second rule carries writes to the writer");
    }

    #[test]
    fn refusals_name_the_nearest_rule_and_what_it_forbids() {
        let p = Policy::parse(POLICY).unwrap();
        let (agent, tool) = (
            id("spiffe://example.org/agent/a"),
            id("spiffe://example.org/tool/t"),
        );
        let read = ["orders.read".to_owned()];
        let both = ["orders.read".to_owned(), "orders.write".to_owned()];
        let refused = |a: DelegationAsk<'_>| p.delegation_rule(&a).unwrap_err();

        let e = refused(ask(&agent, &tool, &both, 1, "portcullis"));
        assert_eq!(e.scope, "orders.write");
        assert!(e.reason.contains("policy line 12"), "{}", e.reason);

        let e = refused(ask(&agent, &tool, &read, 3, "portcullis"));
        assert!(
            e.reason.contains("chain of 3") && e.reason.contains("(2)"),
            "{}",
            e.reason
        );

        let e = refused(ask(&agent, &tool, &read, 1, "elsewhere"));
        assert!(e.reason.contains("audience `elsewhere`"), "{}", e.reason);

        // Nobody may delegate to an identity no rule names, nor delegate
        // back up the chain.
        let e = refused(ask(&tool, &agent, &read, 1, "portcullis"));
        assert_eq!(
            e.reason,
            "no delegation rule lets `spiffe://example.org/tool/t` delegate to `spiffe://example.org/agent/a`"
        );
        // A policy without rules delegates nothing.
        let plain = Policy::parse(
            "[[scope]]\nname = \"orders.read\"\ntier = \"auto\"\nworkloads = [\"spiffe://x/*\"]\n",
        )
        .unwrap();
        assert!(
            plain
                .delegation_rule(&ask(&agent, &tool, &read, 1, "portcullis"))
                .is_err()
        );
    }
}
