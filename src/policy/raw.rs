//! Stage one of reading a policy: the TOML shapes as written (with spans
//! for line numbers), and a walk that finds every unknown key at once —
//! serde's `deny_unknown_fields` stops at the first.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Problem;

/// 1-based line of byte `offset` in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |t| t.matches('\n').count() + 1)
}

/// The keys each table may hold; `None` for a table whose keys are free
/// (group names).
enum Shape {
    Keys(&'static [&'static str], &'static [(&'static str, Shape)]),
    Free,
}

const BREAK_GLASS: Shape = Shape::Keys(&["allowed", "max_ttl"], &[]);
const SCOPE: Shape = Shape::Keys(
    &[
        "name",
        "description",
        "tier",
        "workloads",
        "default_ttl",
        "max_ttl",
        "approvers",
        "approvals_required",
        "pending_ttl",
        "claim_ttl",
        "require_approval_reason",
        "require_justification",
        "bind",
    ],
    &[("break_glass", BREAK_GLASS), ("login", LOGIN)],
);
const LOGIN: Shape = Shape::Keys(&["database", "member_of"], &[]);
const DATABASE: Shape = Shape::Keys(
    &[
        "name",
        "url",
        "password_file",
        "ca_file",
        "pool",
        "role_name",
        "max_logins_per_identity",
        "owned",
    ],
    &[],
);
const ISSUER: Shape = Shape::Keys(
    &[
        "name",
        "kind",
        "issuer",
        "discovery",
        "jwks_url",
        "jwks_file",
        "jwks",
        "ca_file",
        "audience",
        "algorithms",
        "max_age",
        "leeway",
        "identity",
        "trust_domains",
        "single_use",
    ],
    &[("require", Shape::Free)],
);
const DELEGATION: Shape = Shape::Keys(
    &["from", "to", "scopes", "max_depth", "audiences", "approval"],
    &[],
);
const WEBHOOK: Shape = Shape::Keys(&["url", "format", "events"], &[]);
const BROKER: Shape = Shape::Keys(&["default_audience", "admins", "auditors", "max_ttl"], &[]);
const TOP: Shape = Shape::Keys(
    &[],
    &[
        ("broker", BROKER),
        ("groups", Shape::Free),
        ("people", Shape::Free),
        ("scope", SCOPE),
        ("webhook", WEBHOOK),
        ("delegation", DELEGATION),
        ("database", DATABASE),
        ("issuer", ISSUER),
    ],
);

/// Every key the policy format does not know, each with its line (a text
/// that is not TOML yields none: the typed reading reports it), and — when each is a plain `key = value` — the text
/// with them blanked out (same lines, same columns), so the values around
/// them are checked in the same pass and every problem is reported at once.
/// `None` when an unknown key is a whole table (`[x]`, `[[x]]`): its
/// contents cannot be told apart from the next table's by blanking.
pub(super) fn unknown_and_the_rest(text: &str) -> (Vec<Problem>, Option<String>) {
    let mut problems = Vec::new();
    let mut spans = Vec::new();
    if let Ok(top) = DeTable::parse(text) {
        walk(
            text,
            top.get_ref(),
            &TOP,
            "",
            &mut (&mut problems, &mut spans),
        );
    }
    // Nested tables are walked before their siblings: report in file order.
    problems.sort_by_key(|p| p.line);
    let rest = spans
        .iter()
        .all(|s: &std::ops::Range<usize>| !s.is_empty())
        .then(|| blanked(text, &spans));
    (problems, rest)
}

/// `text` with each of `spans` (a `key = value`) and its separating comma
/// (inside an inline table) replaced by spaces, newlines kept.
fn blanked(text: &str, spans: &[std::ops::Range<usize>]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for span in spans {
        let (mut start, mut end) = (span.start, span.end.min(bytes.len()));
        let after = bytes[end..]
            .iter()
            .position(|b| *b != b' ' && *b != b'\t')
            .map(|i| end + i);
        if let Some(i) = after.filter(|i| bytes[*i] == b',') {
            end = i + 1;
        } else if let Some(i) = bytes[..start]
            .iter()
            .rposition(|b| *b != b' ' && *b != b'\t')
            .filter(|i| bytes[*i] == b',')
        {
            start = i;
        }
        for b in &mut bytes[start..end] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    }
    // Whole keys and values were replaced (spans fall on character
    // boundaries), so the text is still UTF-8; if not, read it as it was.
    String::from_utf8(bytes).unwrap_or_else(|_| text.to_owned())
}

type Found<'a> = (&'a mut Vec<Problem>, &'a mut Vec<std::ops::Range<usize>>);

fn walk(text: &str, table: &DeTable<'_>, shape: &Shape, path: &str, out: &mut Found<'_>) {
    let Shape::Keys(plain, nested) = shape else {
        return;
    };
    for (key, value) in table {
        let name = key.get_ref().as_ref();
        if plain.contains(&name) {
            continue;
        }
        let Some((_, inner)) = nested.iter().find(|(n, _)| *n == name) else {
            let mut expected: Vec<&str> = plain.to_vec();
            expected.extend(nested.iter().map(|(n, _)| *n));
            out.0.push(Problem {
                line: line_of(text, key.span().start),
                message: format!(
                    "unknown key `{path}{name}` (expected one of: {})",
                    expected.join(", ")
                ),
            });
            // A value in the text after its key: a `key = value` to blank.
            // A table (`[x]`) has its value elsewhere: an empty span says so.
            let (k, v) = (key.span(), value.span());
            let plain = !matches!(value.get_ref(), DeValue::Table(_) | DeValue::Array(_))
                || text
                    .get(k.end..v.start)
                    .is_some_and(|between| between.trim() == "=");
            out.1.push(if plain && v.end > k.start {
                k.start..v.end
            } else {
                0..0
            });
            continue;
        };
        let here = format!("{path}{name}.");
        match value.get_ref() {
            DeValue::Table(t) => walk(text, t, inner, &here, out),
            DeValue::Array(items) => {
                for item in items.iter() {
                    if let DeValue::Table(t) = item.get_ref() {
                        walk(text, t, inner, &here, out);
                    }
                }
            }
            // A wrong type is the typed reading's to report.
            _ => {}
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    pub broker: RawBroker,
    #[serde(default)]
    pub groups: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub people: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default, rename = "scope")]
    pub scopes: Vec<Spanned<RawScope>>,
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<RawWebhook>,
    #[serde(default, rename = "delegation")]
    pub delegations: Vec<Spanned<RawDelegation>>,
    #[serde(default, rename = "database")]
    pub databases: Vec<Spanned<RawDatabase>>,
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<Spanned<RawIssuer>>,
}

/// `[[issuer]]` (issue 24, docs/design-federation.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuer {
    pub name: Spanned<String>,
    pub kind: Option<Spanned<String>>,
    pub issuer: Option<Spanned<String>>,
    pub discovery: Option<Spanned<bool>>,
    pub jwks_url: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<String>>,
    pub jwks: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub audience: Option<Spanned<String>>,
    pub algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_age: Option<Spanned<String>>,
    pub leeway: Option<Spanned<String>>,
    #[serde(default)]
    pub require: BTreeMap<String, Spanned<OneOrMany>>,
    pub identity: Option<Spanned<String>>,
    #[serde(default)]
    pub trust_domains: Vec<Spanned<String>>,
    pub single_use: Option<Spanned<String>>,
}

/// A bound claim's value: one, or a list any of which will do.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    /// `claim = "value"`.
    One(String),
    /// `claim = ["a", "b"]`.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values, in the order written.
    pub(super) fn values(&self) -> Vec<String> {
        match self {
            Self::One(v) => vec![v.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub name: Spanned<String>,
    pub url: Spanned<String>,
    pub password_file: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub pool: Option<Spanned<u32>>,
    pub role_name: Option<Spanned<String>>,
    pub max_logins_per_identity: Option<Spanned<u32>>,
    pub owned: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLogin {
    pub database: Spanned<String>,
    pub member_of: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelegation {
    #[serde(default)]
    pub from: Vec<Spanned<String>>,
    #[serde(default)]
    pub to: Vec<Spanned<String>>,
    #[serde(default)]
    pub scopes: Vec<Spanned<String>>,
    pub max_depth: Option<Spanned<u32>>,
    #[serde(default)]
    pub audiences: Vec<Spanned<String>>,
    pub approval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub default_audience: Option<String>,
    #[serde(default)]
    pub admins: Vec<Spanned<String>>,
    #[serde(default)]
    pub auditors: Vec<Spanned<String>>,
    pub max_ttl: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScope {
    pub name: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for humans reading the policy")]
    pub description: Option<String>,
    pub tier: Spanned<String>,
    #[serde(default)]
    pub workloads: Vec<Spanned<String>>,
    pub default_ttl: Option<Spanned<String>>,
    pub max_ttl: Option<Spanned<String>>,
    #[serde(default)]
    pub approvers: Vec<Spanned<String>>,
    pub approvals_required: Option<Spanned<u32>>,
    pub pending_ttl: Option<Spanned<String>>,
    pub claim_ttl: Option<Spanned<String>>,
    #[serde(default)]
    pub require_approval_reason: bool,
    pub require_justification: Option<Spanned<bool>>,
    pub break_glass: Option<RawBreakGlass>,
    pub bind: Option<Spanned<String>>,
    pub login: Option<Spanned<RawLogin>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub url: Spanned<String>,
    #[serde(default)]
    pub format: Option<Spanned<String>>,
    #[serde(default)]
    pub events: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreakGlass {
    pub allowed: bool,
    pub max_ttl: Option<Spanned<String>>,
}
