//! `[[issuer]]` tables (issue 24, docs/design-federation.md): the platforms
//! whose signed tokens workloads without a client certificate sign in
//! with, checked strictly: one key source, no unsigned or shared-secret
//! algorithm, a required audience, bound claims, identities built from
//! immutable claims in trust domains no one else uses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use toml::Spanned;

use super::super::raw::{RawIssuer, RawPolicy, line_of};
use super::super::{Issuer, IssuerKind, KeySource, ScopeRule, SingleUse, Tier};
use super::{Checker, Groups};
use crate::identity::Identity;

/// What an issuer accepts when the policy names nothing.
const DEFAULT_ALGORITHMS: [&str; 2] = ["ES256", "RS256"];
/// Every asymmetric algorithm an issuer may name.
const ALGORITHMS: [&str; 9] = [
    "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA",
];
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);
/// JWT-SVIDs often carry no `jti`: their life is what bounds a replay.
const SVID_MAX_AGE: Duration = Duration::from_secs(300);
/// Longest `max_age` when replay is bounded by it rather than by `jti`.
const BOUNDED_MAX_AGE: Duration = Duration::from_secs(3600);
const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// GitHub's names, which are recycled when a repository is renamed or
/// deleted (its ids are not).
const GITHUB_NAMES: [&str; 2] = ["repository", "repository_owner"];
/// The only GitHub claims an identity may be built from: immutable ids,
/// and the environment (a name, but one whose protection rules an
/// approval relies on).
const GITHUB_SEGMENTS: [&str; 4] = [
    "repository_id",
    "repository_owner_id",
    "environment",
    "actor_id",
];
/// Claims the verifier checks itself; `require` may not name them.
const REGISTERED: [&str; 6] = ["aud", "iss", "exp", "iat", "nbf", "jti"];

/// The placeholders of identity template `t`, each filling one whole path
/// segment: `{claim}` or `{/json/pointer}`; or why it is not a template
/// whose filled form is a SPIFFE ID in a constant trust domain. Returns
/// the placeholders and the trust domain.
pub(crate) fn template(t: &str) -> Result<(Vec<String>, String), String> {
    let rest = t
        .strip_prefix("spiffe://")
        .ok_or("must start with `spiffe://`")?;
    let (domain, path) = rest.split_once('/').ok_or("needs a path")?;
    if domain.contains(['{', '}']) {
        return Err("its trust domain must be written out, not a placeholder".into());
    }
    let mut names = Vec::new();
    let mut filled = format!("spiffe://{domain}");
    for segment in segments(path)? {
        filled.push('/');
        if !segment.contains(['{', '}']) {
            filled.push_str(segment);
            continue;
        }
        let name = segment
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .filter(|n| !n.is_empty() && !n.contains(['{', '}']))
            .ok_or_else(|| format!("`{segment}`: a placeholder fills a whole path segment"))?;
        names.push(canonical(name).map_err(|e| format!("`{{{name}}}`: {e}"))?);
        filled.push('x');
    }
    Identity::parse(&filled).map_err(|e| e.to_string())?;
    valid_domain(domain)?;
    Ok((names, domain.to_owned()))
}

/// Claim `name` in one spelling: a top-level claim by its name (`x`, or
/// the pointer `/x`), a nested one as a JSON pointer (RFC 6901) with its
/// escapes checked and written canonically; or why it is neither.
pub(crate) fn canonical(name: &str) -> Result<String, String> {
    let Some(pointer) = name.strip_prefix('/') else {
        return if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            Ok(name.to_owned())
        } else {
            Err("name a claim (letters, digits, `_`) or a JSON pointer (`/a/b`)".into())
        };
    };
    let mut tokens = Vec::new();
    for token in pointer.split('/') {
        let mut decoded = String::new();
        let mut chars = token.chars();
        while let Some(c) = chars.next() {
            if c == '~' {
                match chars.next() {
                    Some('0') => decoded.push('~'),
                    Some('1') => decoded.push('/'),
                    _ => return Err("`~` is written `~0`, and `/` inside a name `~1`".into()),
                }
            } else if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                decoded.push(c);
            } else {
                return Err(format!("`{c}` in a JSON pointer"));
            }
        }
        if decoded.is_empty() {
            return Err("a JSON pointer with an empty step".into());
        }
        tokens.push(decoded);
    }
    if let [one] = tokens.as_slice()
        && one.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Ok(one.clone());
    }
    let encoded: Vec<String> = tokens
        .iter()
        .map(|t| t.replace('~', "~0").replace('/', "~1"))
        .collect();
    Ok(format!("/{}", encoded.join("/")))
}

/// A trust domain as SPIFFE writes it: lower-case letters, digits, `.`,
/// `-`, `_`, no empty label (so `example.org.` is not a second spelling
/// of `example.org`).
fn valid_domain(d: &str) -> Result<(), String> {
    let chars = d
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !chars || d.split('.').any(str::is_empty) || d.len() > 255 {
        return Err(format!(
            "`{d}` is not a trust domain (lower-case letters, digits, `-`, `_`, labels joined by single dots)"
        ));
    }
    Ok(())
}

/// The path segments of a template: split on `/` outside placeholders (a
/// JSON pointer holds `/` of its own).
pub(crate) fn segments(path: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut start, mut depth) = (0, 0usize);
    for (i, c) in path.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.checked_sub(1).ok_or("an unopened `}`")?,
            '/' if depth == 0 => {
                out.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("an unclosed `{`".into());
    }
    out.push(&path[start..]);
    Ok(out)
}

/// The trust domain of identity or pattern `s` (`None` when it has none
/// written out, e.g. `*`).
fn domain_of(s: &str) -> Option<&str> {
    let d = s.strip_prefix("spiffe://")?.split('/').next()?;
    (!d.contains('*')).then_some(d)
}

/// HTTPS, or plain HTTP to a loopback host (tests); never with user
/// information before the host (`http://127.0.0.1@evil.example`).
pub(crate) fn safe_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return false;
    };
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return false;
    }
    match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => matches!(authority.host(), "127.0.0.1" | "localhost" | "[::1]"),
        _ => false,
    }
}

/// GitHub's issuer, on github.com or on an Enterprise Server.
/// GitHub Enterprise Cloud's issuer is github.com's followed by the
/// enterprise's slug.
fn github_issuer(url: &str) -> bool {
    let url = url.to_ascii_lowercase();
    let url = url.trim_end_matches('/');
    url == "https://token.actions.githubusercontent.com"
        || url.starts_with("https://token.actions.githubusercontent.com/")
        || url.ends_with("/_services/token")
}

impl Checker<'_> {
    /// Every `[[issuer]]`, by name; then the rules that span issuers,
    /// groups and scopes.
    pub(super) fn issuers(
        &mut self,
        raw: &RawPolicy,
        groups: &Groups,
        scopes: &BTreeMap<String, ScopeRule>,
    ) -> BTreeMap<String, Issuer> {
        let mut out: BTreeMap<String, Issuer> = BTreeMap::new();
        let mut domains: BTreeMap<String, String> = BTreeMap::new();
        let mut by_iss: BTreeMap<String, String> = BTreeMap::new();
        // Identities the policy names outright (people, admins, approvers)
        // hold certificates: no issuer may mint one of them.
        let named: BTreeSet<String> = groups
            .values()
            .flatten()
            .chain(self.people.keys())
            .filter_map(|m| domain_of(m).map(str::to_owned))
            .collect();
        for entry in &raw.issuers {
            let i = Issuer {
                line: line_of(self.text, entry.span().start),
                ..self.issuer(entry.get_ref())
            };
            let at = entry.get_ref().name.span();
            if out.contains_key(&i.name) {
                self.problem(at.clone(), format!("issuer `{}` is defined twice", i.name));
            }
            if let Some(iss) = &i.issuer
                && let Some(other) = by_iss.insert(iss.clone(), i.name.clone())
            {
                let msg = format!(
                    "issuer `{}`: issuer: `{iss}` is also issuer `{other}`'s: a token's `iss` must choose one entry",
                    i.name
                );
                self.problem(at.clone(), msg);
            }
            for d in &i.trust_domains {
                if let Some(other) = domains.insert(d.clone(), i.name.clone()) {
                    let msg = format!(
                        "issuer `{}`: trust domain `{d}` is also issuer `{other}`'s: each issuer's identities need a trust domain of their own",
                        i.name
                    );
                    self.problem(at.clone(), msg);
                }
                if named.contains(d) {
                    let msg = format!(
                        "issuer `{}`: trust domain `{d}` holds identities the policy names (groups, people): a token could take one of them",
                        i.name
                    );
                    self.problem(at.clone(), msg);
                }
            }
            if i.kind == IssuerKind::Github {
                self.github_approvals(&i, at, scopes);
            }
            out.insert(i.name.clone(), i);
        }
        self.no_delegation_to(raw, &domains);
        out
    }

    /// A delegated child is claimed by its recipient over mTLS, or handed
    /// back to the certificate holder who asked: naming an issuer's
    /// workload as `to` would let that holder mint tokens whose `sub` is
    /// a workload only its platform may sign in.
    fn no_delegation_to(&mut self, raw: &RawPolicy, domains: &BTreeMap<String, String>) {
        for d in &raw.delegations {
            for to in &d.get_ref().to {
                if let Some(owner) = domain_of(to.get_ref()).and_then(|d| domains.get(d)) {
                    let msg = format!(
                        "delegation: to: `{}` is in a trust domain of issuer `{owner}`, whose workloads only sign in with its tokens",
                        to.get_ref()
                    );
                    self.problem(to.span(), msg);
                }
            }
        }
    }

    /// An approval-tier scope open to a GitHub issuer's identities needs
    /// the identity to name an environment, or a pinned reusable workflow:
    /// otherwise any branch of the repository uses what was approved.
    fn github_approvals(
        &mut self,
        i: &Issuer,
        at: std::ops::Range<usize>,
        scopes: &BTreeMap<String, ScopeRule>,
    ) {
        let names = i
            .identity
            .as_deref()
            .and_then(|t| template(t).ok())
            .map(|(names, _)| names)
            .unwrap_or_default();
        let pinned =
            names.iter().any(|n| n == "environment") || i.require.contains_key("job_workflow_ref");
        if pinned {
            return;
        }
        for s in scopes.values().filter(|s| s.tier == Tier::Approval) {
            let open = s.workloads.iter().any(|w| match domain_of(w) {
                Some(d) => i.trust_domains.iter().any(|t| t == d),
                None => true,
            });
            if open {
                let msg = format!(
                    "issuer `{}`: approval-tier scope `{}` is open to its identities, which name no environment: put `{{environment}}` in `identity`, or `job_workflow_ref` in `require`",
                    i.name, s.name
                );
                self.problem(at.clone(), msg);
            }
        }
    }

    fn issuer(&mut self, r: &RawIssuer) -> Issuer {
        let name = r.name.get_ref().clone();
        let plain = name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !plain {
            let msg = format!(
                "issuer `{name}`: name: a lower-case letter, then lower-case letters, digits and `_` (at most 63)"
            );
            self.problem(r.name.span(), msg);
        }
        let kind = self.issuer_kind(&name, r);
        let issuer = self.issuer_url(&name, kind, r);
        let keys = self.key_source(&name, r);
        let (identity, trust_domains) = self.issuer_identity(&name, kind, r);
        let single_use = self.single_use(&name, kind, r);
        let max_age = self.max_age(&name, kind, single_use, r);
        let leeway = match &r.leeway {
            Some(l) => humantime::parse_duration(l.get_ref()).unwrap_or_else(|_| {
                let msg = format!(
                    "issuer `{name}`: leeway: `{}` is not a duration",
                    l.get_ref()
                );
                self.problem(l.span(), msg);
                DEFAULT_LEEWAY
            }),
            None => DEFAULT_LEEWAY,
        };
        if leeway > MAX_LEEWAY {
            let span = r.leeway.as_ref().map_or(r.name.span(), Spanned::span);
            self.problem(span, format!("issuer `{name}`: leeway: at most 5m"));
        }
        let require = self.bound_claims(&name, kind, identity.as_deref(), r);
        Issuer {
            kind,
            issuer,
            keys,
            ca_file: r.ca_file.as_ref().map(|f| f.get_ref().into()),
            audience: self.issuer_audience(&name, r),
            algorithms: self.algorithms(&name, r),
            max_age,
            leeway,
            require,
            identity,
            trust_domains,
            single_use,
            line: line_of(self.text, r.name.span().start),
            name,
        }
    }

    fn issuer_kind(&mut self, name: &str, r: &RawIssuer) -> IssuerKind {
        let Some(k) = &r.kind else {
            let msg = format!(
                "issuer `{name}`: kind: required (github, kubernetes, jwt-svid or generic: each has rules of its own)"
            );
            self.problem(r.name.span(), msg);
            return IssuerKind::Generic;
        };
        let kind = match k.get_ref().as_str() {
            "github" => IssuerKind::Github,
            "kubernetes" => IssuerKind::Kubernetes,
            "jwt-svid" => IssuerKind::JwtSvid,
            "generic" => IssuerKind::Generic,
            other => {
                let msg = format!(
                    "issuer `{name}`: kind: `{other}` is not one of github, kubernetes, jwt-svid, generic"
                );
                self.problem(k.span(), msg);
                IssuerKind::Generic
            }
        };
        let is_github = r
            .issuer
            .as_ref()
            .is_some_and(|i| github_issuer(i.get_ref()));
        if is_github && kind != IssuerKind::Github {
            let msg = format!(
                "issuer `{name}`: kind: GitHub's issuer is kind = \"github\" (its rules keep recycled names out of identities)"
            );
            self.problem(k.span(), msg);
        }
        kind
    }

    /// The exact `iss`: required (an `https` URL) except for JWT-SVIDs.
    fn issuer_url(&mut self, name: &str, kind: IssuerKind, r: &RawIssuer) -> Option<String> {
        match &r.issuer {
            Some(i) if !safe_url(i.get_ref()) => {
                let msg = format!(
                    "issuer `{name}`: issuer: `{}` is not an https URL",
                    i.get_ref()
                );
                self.problem(i.span(), msg);
                None
            }
            Some(i) => Some(i.get_ref().clone()),
            None if kind == IssuerKind::JwtSvid => None,
            None => {
                let msg =
                    format!("issuer `{name}`: issuer: required (the exact `iss` of its tokens)");
                self.problem(r.name.span(), msg);
                None
            }
        }
    }

    /// Exactly one of `discovery`, `jwks_url`, `jwks_file`, `jwks`.
    fn key_source(&mut self, name: &str, r: &RawIssuer) -> KeySource {
        let mut found = Vec::new();
        if let Some(d) = r.discovery.as_ref().filter(|d| *d.get_ref()) {
            if r.issuer.is_none() {
                let msg = format!("issuer `{name}`: discovery: needs `issuer`");
                self.problem(d.span(), msg);
            }
            found.push(KeySource::Discovery);
        }
        if let Some(u) = &r.jwks_url {
            if !safe_url(u.get_ref()) {
                let msg = format!(
                    "issuer `{name}`: jwks_url: `{}` is not an https URL",
                    u.get_ref()
                );
                self.problem(u.span(), msg);
            }
            found.push(KeySource::JwksUrl(u.get_ref().clone()));
        }
        if let Some(f) = &r.jwks_file {
            found.push(KeySource::JwksFile(f.get_ref().into()));
        }
        if let Some(j) = &r.jwks {
            self.inline_keys(name, j);
            found.push(KeySource::Inline(j.get_ref().clone()));
        }
        if found.len() != 1 {
            let msg = format!(
                "issuer `{name}`: give exactly one key source: discovery = true, jwks_url, jwks_file or jwks (found {})",
                found.len()
            );
            self.problem(r.name.span(), msg);
        }
        found.into_iter().next().unwrap_or(KeySource::Discovery)
    }

    /// An inline JWKS: JSON, at least one key, none of them a shared secret.
    fn inline_keys(&mut self, name: &str, j: &Spanned<String>) {
        let private = serde_json::from_str::<serde_json::Value>(j.get_ref())
            .ok()
            .and_then(|v| v.get("keys").and_then(|k| k.as_array()).cloned())
            .is_some_and(|keys| {
                keys.iter().any(|k| {
                    ["d", "p", "q", "dp", "dq", "qi", "k"]
                        .iter()
                        .any(|f| k.get(f).is_some())
                })
            });
        if private {
            let msg = format!(
                "issuer `{name}`: jwks: holds a private or secret key part (`d`, `p`, `q`, `k`): give only public keys"
            );
            self.problem(j.span(), msg);
            return;
        }
        let why = match serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(j.get_ref()) {
            Err(e) => Some(format!("not a JWK Set ({e})")),
            Ok(set) if set.keys.is_empty() => Some("holds no key".to_owned()),
            Ok(set) => set
                .keys
                .iter()
                .any(|k| {
                    matches!(
                        k.algorithm,
                        jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
                    )
                })
                .then(|| {
                    "holds a shared-secret (`oct`) key: anyone holding it could mint tokens"
                        .to_owned()
                }),
        };
        if let Some(why) = why {
            self.problem(j.span(), format!("issuer `{name}`: jwks: {why}"));
        }
    }

    fn issuer_audience(&mut self, name: &str, r: &RawIssuer) -> String {
        match &r.audience {
            Some(a) if crate::text::valid_token_text(a.get_ref(), crate::text::MAX_AUDIENCE) => {
                a.get_ref().clone()
            }
            _ => {
                let msg = format!(
                    "issuer `{name}`: audience: required (the audience its tokens must name: this broker)"
                );
                self.problem(r.name.span(), msg);
                String::new()
            }
        }
    }

    /// Asymmetric algorithms only; `none` and HMAC never.
    fn algorithms(&mut self, name: &str, r: &RawIssuer) -> Vec<String> {
        let Some(list) = &r.algorithms else {
            return DEFAULT_ALGORITHMS.iter().map(|a| (*a).to_owned()).collect();
        };
        if list.get_ref().is_empty() {
            let msg = format!("issuer `{name}`: algorithms: empty (leave it out for ES256, RS256)");
            self.problem(list.span(), msg);
        }
        for a in list.get_ref() {
            let alg = a.get_ref().as_str();
            let why = if alg.eq_ignore_ascii_case("none") {
                Some("never: an unsigned token proves nothing")
            } else if alg.to_ascii_uppercase().starts_with("HS") {
                Some("never: a shared secret lets whoever holds it mint tokens")
            } else if !ALGORITHMS.contains(&alg) {
                Some("not a signing algorithm this broker verifies")
            } else {
                None
            };
            if let Some(why) = why {
                self.problem(
                    a.span(),
                    format!("issuer `{name}`: algorithms: `{alg}`: {why}"),
                );
            }
        }
        list.get_ref().iter().map(|a| a.get_ref().clone()).collect()
    }

    fn single_use(&mut self, name: &str, kind: IssuerKind, r: &RawIssuer) -> SingleUse {
        match &r.single_use {
            None if matches!(kind, IssuerKind::Kubernetes | IssuerKind::JwtSvid) => {
                SingleUse::Bounded
            }
            None => SingleUse::Jti,
            Some(s) => match s.get_ref().as_str() {
                "jti" => SingleUse::Jti,
                "bounded" if kind == IssuerKind::Github => {
                    let msg = format!(
                        "issuer `{name}`: single_use: GitHub's tokens carry a jti and are never reused by a job: keep `jti` (a copy of a token would sign in again for its whole life)"
                    );
                    self.problem(s.span(), msg);
                    SingleUse::Jti
                }
                "bounded" => SingleUse::Bounded,
                other => {
                    let msg =
                        format!("issuer `{name}`: single_use: `{other}` is not `jti` or `bounded`");
                    self.problem(s.span(), msg);
                    SingleUse::Jti
                }
            },
        }
    }

    /// `exp - iat` at most: an hour by default, five minutes for SVIDs,
    /// and never over an hour when replay is bounded by it.
    fn max_age(
        &mut self,
        name: &str,
        kind: IssuerKind,
        single_use: SingleUse,
        r: &RawIssuer,
    ) -> Duration {
        let default = if kind == IssuerKind::JwtSvid {
            SVID_MAX_AGE
        } else {
            DEFAULT_MAX_AGE
        };
        let Some(m) = &r.max_age else {
            return default;
        };
        let age = self
            .duration(m, &format!("issuer `{name}`: max_age"))
            .unwrap_or(default);
        if kind == IssuerKind::JwtSvid && age > SVID_MAX_AGE {
            let msg = format!(
                "issuer `{name}`: max_age: at most 5m for JWT-SVIDs (they often carry no `jti`)"
            );
            self.problem(m.span(), msg);
        } else if single_use == SingleUse::Bounded && age > BOUNDED_MAX_AGE {
            let msg = format!(
                "issuer `{name}`: max_age: at most 1h when single_use is `bounded` (replay is bounded by it)"
            );
            self.problem(m.span(), msg);
        }
        age
    }

    /// The identity template and its trust domains (a JWT-SVID issuer:
    /// `sub` itself, in the domains it lists).
    fn issuer_identity(
        &mut self,
        name: &str,
        kind: IssuerKind,
        r: &RawIssuer,
    ) -> (Option<String>, Vec<String>) {
        if kind == IssuerKind::JwtSvid {
            if let Some(i) = &r.identity {
                let msg = format!(
                    "issuer `{name}`: identity: a JWT-SVID's `sub` is its identity; list its trust_domains instead"
                );
                self.problem(i.span(), msg);
            }
            return (None, self.svid_domains(name, r));
        }
        if let Some(d) = r.trust_domains.first() {
            let msg = format!(
                "issuer `{name}`: trust_domains: only for kind = \"jwt-svid\" (the identity template names the domain)"
            );
            self.problem(d.span(), msg);
        }
        let Some(t) = &r.identity else {
            let msg = format!(
                "issuer `{name}`: identity: required (a SPIFFE ID template, e.g. spiffe://ci.example.org/{{repository_owner_id}}/{{repository_id}})"
            );
            self.problem(r.name.span(), msg);
            return (None, Vec::new());
        };
        match template(t.get_ref()) {
            Err(e) => {
                self.problem(t.span(), format!("issuer `{name}`: identity: {e}"));
                (None, Vec::new())
            }
            Ok((names, domain)) => {
                if kind == IssuerKind::Github {
                    self.github_template(name, t, &names);
                }
                (Some(t.get_ref().clone()), vec![domain])
            }
        }
    }

    fn svid_domains(&mut self, name: &str, r: &RawIssuer) -> Vec<String> {
        if r.trust_domains.len() != 1 {
            let msg = format!(
                "issuer `{name}`: trust_domains: name exactly one for kind = \"jwt-svid\" (one entry, with that domain's bundle, per trust domain)"
            );
            self.problem(r.name.span(), msg);
        }
        let mut out = Vec::new();
        for d in &r.trust_domains {
            if let Err(e) = valid_domain(d.get_ref()) {
                self.problem(d.span(), format!("issuer `{name}`: trust_domains: {e}"));
            }
            out.push(d.get_ref().clone());
        }
        out
    }

    /// GitHub identities come from ids, never names or path-like claims.
    fn github_template(&mut self, name: &str, t: &Spanned<String>, names: &[String]) {
        for n in names {
            let why = if GITHUB_NAMES.contains(&n.as_str()) {
                "is a name, which GitHub recycles when a repository is renamed or deleted: use repository_id / repository_owner_id"
            } else if !GITHUB_SEGMENTS.contains(&n.as_str()) {
                "is not one of the claims a GitHub identity is built from (repository_id, repository_owner_id, environment, actor_id): bind it in `require` instead"
            } else {
                continue;
            };
            let msg = format!("issuer `{name}`: identity: `{{{n}}}` {why}");
            self.problem(t.span(), msg);
        }
        if !names.iter().any(|n| n == "repository_id") {
            let msg =
                format!("issuer `{name}`: identity: name the repository by `{{repository_id}}`");
            self.problem(t.span(), msg);
        }
    }

    /// `require`: exact values, at least one claim besides the audience
    /// (a JWT-SVID issuer is bound by its trust domains), and the
    /// platform's own rules.
    fn bound_claims(
        &mut self,
        name: &str,
        kind: IssuerKind,
        identity: Option<&str>,
        r: &RawIssuer,
    ) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (claim, value) in &r.require {
            let claim = match canonical(claim) {
                Ok(c) => c,
                Err(e) => {
                    self.problem(
                        value.span(),
                        format!("issuer `{name}`: require: `{claim}`: {e}"),
                    );
                    continue;
                }
            };
            let values = value.get_ref().values();
            let why = if REGISTERED.contains(&claim.as_str()) {
                Some("is checked by the broker itself (see audience, max_age)")
            } else if values.is_empty() || values.iter().any(String::is_empty) {
                Some("is empty: a bound claim names the value it must have")
            } else {
                None
            };
            if let Some(why) = why {
                self.problem(
                    value.span(),
                    format!("issuer `{name}`: require: `{claim}` {why}"),
                );
            }
            out.insert(claim, values);
        }
        let at = r.name.span();
        if kind != IssuerKind::JwtSvid && out.is_empty() {
            let msg = format!(
                "issuer `{name}`: require: bind at least one claim besides the audience (e.g. repository_owner_id), or every tenant of the issuer could sign in"
            );
            self.problem(at.clone(), msg);
        }
        if kind == IssuerKind::Kubernetes {
            self.kubernetes_bound(name, at.clone(), &out, identity);
        }
        if kind == IssuerKind::Github {
            self.github_bound(name, at, &out);
        }
        out
    }

    /// GitHub's issuer signs for every repository on GitHub: a bound
    /// owner or repository id is what keeps others out (an event, a ref
    /// or a public reusable workflow does not), and a name is bound only
    /// beside an id (names are recycled).
    fn github_bound(
        &mut self,
        name: &str,
        at: std::ops::Range<usize>,
        out: &BTreeMap<String, Vec<String>>,
    ) {
        let ids = ["repository_owner_id", "repository_id"];
        if !ids.iter().any(|id| out.contains_key(*id)) {
            let msg = format!(
                "issuer `{name}`: require: bind repository_owner_id or repository_id: any repository on GitHub gets tokens from this issuer"
            );
            self.problem(at, msg);
        }
    }

    /// A Kubernetes identity is bound to its namespace (in `require`) and
    /// to its service account's uid (in `require` or the identity).
    fn kubernetes_bound(
        &mut self,
        name: &str,
        at: std::ops::Range<usize>,
        out: &BTreeMap<String, Vec<String>>,
        identity: Option<&str>,
    ) {
        let mapped: Vec<String> = identity
            .and_then(|t| template(t).ok())
            .map(|(names, _)| names)
            .unwrap_or_default();
        let namespace = "/kubernetes.io/namespace";
        let uid = "/kubernetes.io/serviceaccount/uid";
        if !out.contains_key(namespace) {
            let msg =
                format!("issuer `{name}`: require: bind the namespace: `\"{namespace}\" = \"…\"`");
            self.problem(at.clone(), msg);
        }
        if !out.contains_key(uid) && !mapped.iter().any(|n| n == uid) {
            let msg = format!(
                "issuer `{name}`: require: bind the service account's uid (a re-created account of the same name is another workload): `\"{uid}\"` in `require` or in `identity`"
            );
            self.problem(at.clone(), msg);
        }
    }
}

#[cfg(test)]
mod tests;
