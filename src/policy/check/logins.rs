//! `[[database]]` tables and the `login` of a scope
//! (docs/design-db-credentials.md): names that reach PostgreSQL only as
//! identifiers it quotes itself, and never a password in the policy.

use std::collections::BTreeMap;
use std::str::FromStr as _;

use toml::Spanned;

use super::super::raw::{RawDatabase, RawLogin, RawPolicy, line_of};
use super::super::{Database, LEASE_PLACEHOLDER, LoginRule, Owned};
use super::Checker;

/// Longest PostgreSQL identifier (`NAMEDATALEN - 1`).
const MAX_IDENTIFIER: usize = 63;
/// Length of a lease id (`l_` and 32 hex digits).
const LEASE_ID_LEN: usize = 34;
/// Admin connections when the policy names none, and the most it may.
const DEFAULT_POOL: u32 = 4;
const MAX_POOL: u32 = 64;
/// Live logins per identity and database when the policy names none.
const DEFAULT_MAX_LOGINS: u32 = 20;

/// A role or group name as the broker writes them: lower-case ASCII
/// letters, digits and `_`, not starting with a digit, at most 63 bytes.
/// PostgreSQL's own roles (`pg_…`) are never made nor granted.
pub(crate) fn plain_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IDENTIFIER
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && !s.starts_with("pg_")
}

/// The admin role a database URL signs in as, and where: `user@host:port`
/// (every host and port, as the URL lists them).
fn admin_of(url: &str) -> Option<String> {
    let c = tokio_postgres::Config::from_str(url).ok()?;
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.to_ascii_lowercase(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
    Some(format!(
        "`{}` on {}:{}",
        c.get_user()?,
        hosts.join(","),
        if ports.is_empty() {
            "5432".to_owned()
        } else {
            ports.join(",")
        }
    ))
}

impl Checker<'_> {
    /// Every `[[database]]`, by name.
    pub(super) fn databases(&mut self, raw: &RawPolicy) -> BTreeMap<String, Database> {
        let mut out = BTreeMap::new();
        // Whose admin role each is: a role's password is the cluster's, so
        // a rotation through one entry would lock out another sharing it.
        let mut admins: BTreeMap<String, String> = BTreeMap::new();
        for entry in &raw.databases {
            let d = self.database(entry);
            if out.contains_key(&d.name) {
                let msg = format!("database `{}` is defined twice", d.name);
                self.problem(entry.get_ref().name.span(), msg);
            }
            if let Some(admin) = admin_of(&d.url) {
                if let Some(other) = admins.get(&admin).filter(|o| **o != d.name) {
                    let msg = format!(
                        "database `{}`: url: its admin role ({admin}) is also database `{other}`'s; give each `[[database]]` an admin role of its own (a rotation of one would lock the other out)",
                        d.name
                    );
                    self.problem(entry.get_ref().url.span(), msg);
                }
                admins.insert(admin, d.name.clone());
            }
            out.insert(d.name.clone(), d);
        }
        out
    }

    fn database(&mut self, entry: &Spanned<RawDatabase>) -> Database {
        let d = entry.get_ref();
        let name = d.name.get_ref().clone();
        if !plain_identifier(&name) {
            let msg = format!(
                "database `{name}`: name: use lower-case letters, digits and `_` (at most 63)"
            );
            self.problem(d.name.span(), msg);
        }
        self.database_url(&name, &d.url);
        let password_file = match &d.password_file {
            Some(f) if !f.get_ref().is_empty() => f.get_ref().into(),
            Some(f) => {
                self.problem(f.span(), format!("database `{name}`: password_file: empty"));
                Default::default()
            }
            None => {
                let msg = format!(
                    "database `{name}`: password_file: required (the admin's password, read from a file, never written in the policy)"
                );
                self.problem(d.name.span(), msg);
                Default::default()
            }
        };
        let role_name = self.role_name(&name, d.role_name.as_ref());
        Database {
            pool: self.count(&name, "pool", d.pool.as_ref(), DEFAULT_POOL, MAX_POOL) as usize,
            max_logins_per_identity: self.count(
                &name,
                "max_logins_per_identity",
                d.max_logins_per_identity.as_ref(),
                DEFAULT_MAX_LOGINS,
                u32::MAX,
            ),
            owned: self.owned(&name, d.owned.as_ref()),
            ca_file: d.ca_file.as_ref().map(|f| f.get_ref().into()),
            url: d.url.get_ref().clone(),
            password_file,
            role_name,
            name,
            line: line_of(self.text, entry.span().start),
        }
    }

    /// A URL PostgreSQL's client reads, with a user and without a password.
    fn database_url(&mut self, name: &str, url: &Spanned<String>) {
        match tokio_postgres::Config::from_str(url.get_ref()) {
            Err(e) => {
                let msg = format!("database `{name}`: url: not a PostgreSQL URL ({e})");
                self.problem(url.span(), msg);
            }
            Ok(c) if c.get_password().is_some() => {
                let msg = format!(
                    "database `{name}`: url: holds a password; put it in password_file instead"
                );
                self.problem(url.span(), msg);
            }
            Ok(c) if c.get_user().is_none() || c.get_dbname().is_none() => {
                let msg = format!("database `{name}`: url: name the admin user and the database");
                self.problem(url.span(), msg);
            }
            Ok(_) => {}
        }
    }

    /// `role_name`: `{lease}` once, the rest a plain identifier, the
    /// result at most 63 bytes.
    fn role_name(&mut self, name: &str, v: Option<&Spanned<String>>) -> String {
        let Some(v) = v else {
            return format!("pc_{LEASE_PLACEHOLDER}");
        };
        let t = v.get_ref();
        let rest = t.replacen(LEASE_PLACEHOLDER, "", 1);
        let filled = t.len().saturating_sub(LEASE_PLACEHOLDER.len()) + LEASE_ID_LEN;
        let problem = if t.matches(LEASE_PLACEHOLDER).count() != 1 {
            Some(format!("must hold `{LEASE_PLACEHOLDER}` exactly once"))
        } else if !(rest.is_empty() || plain_identifier(&format!("x{rest}")))
            || t.starts_with(|c: char| c.is_ascii_digit())
            || t.starts_with("pg_")
        {
            Some("besides `{lease}`, use lower-case letters, digits and `_`, not starting with `pg_`".to_owned())
        } else if filled > MAX_IDENTIFIER {
            Some(format!(
                "a login's name would be {filled} bytes; PostgreSQL allows {MAX_IDENTIFIER}"
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            self.problem(v.span(), format!("database `{name}`: role_name: {p}"));
        }
        t.clone()
    }

    fn count(
        &mut self,
        name: &str,
        field: &str,
        v: Option<&Spanned<u32>>,
        default: u32,
        max: u32,
    ) -> u32 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n == 0 || n > max {
            let msg = format!("database `{name}`: {field}: must be between 1 and {max}");
            self.problem(v.span(), msg);
            return default;
        }
        n
    }

    fn owned(&mut self, name: &str, v: Option<&Spanned<String>>) -> Owned {
        match v.map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "reassign")) => Owned::Reassign,
            Some((_, "drop")) => Owned::Drop,
            Some((v, other)) => {
                let msg = format!(
                    "database `{name}`: owned: unknown `{other}` (expected `reassign` or `drop`)"
                );
                self.problem(v.span(), msg);
                Owned::Reassign
            }
        }
    }

    /// A scope's `login`: a declared database and a plain group name.
    pub(super) fn login(
        &mut self,
        scope: &str,
        v: Option<&Spanned<RawLogin>>,
        databases: &BTreeMap<String, Database>,
    ) -> Option<LoginRule> {
        let l = v?.get_ref();
        let (db, group) = (l.database.get_ref(), l.member_of.get_ref());
        if !databases.contains_key(db) {
            let msg = format!("scope `{scope}`: login.database: no [[database]] is named `{db}`");
            self.problem(l.database.span(), msg);
        }
        if !plain_identifier(group) {
            let msg = format!(
                "scope `{scope}`: login.member_of: `{group}`: use lower-case letters, digits and `_` (at most 63), not PostgreSQL's own `pg_…` roles"
            );
            self.problem(l.member_of.span(), msg);
        }
        Some(LoginRule {
            database: db.clone(),
            member_of: group.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{Owned, Policy, PolicyError};

    const SCOPE: &str =
        "[[scope]]\nname = \"db.orders.read\"\ntier = \"auto\"\nworkloads = [\"spiffe://t/*\"]\n";

    fn problems(text: &str) -> Vec<String> {
        match Policy::parse(text) {
            Err(PolicyError::Invalid(p)) => p.iter().map(|p| p.to_string()).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn a_login_scope_names_a_database_and_a_group() {
        let text = format!(
            "[[database]]\nname = \"orders\"\nurl = \"postgres://admin@db.example.org/orders\"\npassword_file = \"/etc/p\"\nmax_logins_per_identity = 3\nowned = \"drop\"\n{SCOPE}login = {{ database = \"orders\", member_of = \"orders_reader\" }}\n"
        );
        let p = Policy::parse(&text).unwrap();
        let db = &p.databases["orders"];
        assert_eq!(db.role_of("l_1"), "pc_l_1");
        assert_eq!(
            (db.max_logins_per_identity, db.owned, db.pool),
            (3, Owned::Drop, 4)
        );
        let login = p.scopes["db.orders.read"].login.as_ref().unwrap();
        assert_eq!(
            (login.database.as_str(), login.member_of.as_str()),
            ("orders", "orders_reader")
        );
    }

    #[test]
    fn hostile_or_broken_database_settings_are_refused_with_their_lines() {
        let text = format!(
            "[[database]]\nname = \"Orders; DROP\"\nurl = \"postgres://admin:hunter2@db/orders\"\nrole_name = \"x\\\"; DROP ROLE postgres; --{{lease}}\"\nowned = \"keep\"\npool = 0\n{SCOPE}login = {{ database = \"nope\", member_of = \"a\\\"b\" }}\n"
        );
        let got = problems(&text);
        for want in [
            "line 2: database `Orders; DROP`: name: use lower-case letters, digits and `_` (at most 63)",
            "line 2: database `Orders; DROP`: password_file: required (the admin's password, read from a file, never written in the policy)",
            "line 3: database `Orders; DROP`: url: holds a password; put it in password_file instead",
            "line 4: database `Orders; DROP`: role_name: besides `{lease}`, use lower-case letters, digits and `_`, not starting with `pg_`",
            "line 5: database `Orders; DROP`: owned: unknown `keep` (expected `reassign` or `drop`)",
            "line 6: database `Orders; DROP`: pool: must be between 1 and 64",
            "line 11: scope `db.orders.read`: login.database: no [[database]] is named `nope`",
            "line 11: scope `db.orders.read`: login.member_of: `a\"b`: use lower-case letters, digits and `_` (at most 63), not PostgreSQL's own `pg_…` roles",
        ] {
            assert!(
                got.iter().any(|g| g == want),
                "missing {want:?} in {got:#?}"
            );
        }
    }

    #[test]
    fn two_databases_may_not_share_an_admin_role() {
        let db = |name: &str, url: &str| {
            format!("[[database]]\nname = \"{name}\"\nurl = \"{url}\"\npassword_file = \"/p\"\n")
        };
        let shared = format!(
            "{}{}",
            db("orders", "postgres://admin@db.example.org/orders"),
            db("billing", "postgres://admin@DB.example.org:5432/billing")
        );
        let about_admins = |text: &str| -> Vec<String> {
            match Policy::parse(text) {
                Ok(_) => Vec::new(),
                Err(PolicyError::Invalid(p)) => p
                    .iter()
                    .map(|p| p.to_string())
                    .filter(|p| p.contains("admin role"))
                    .collect(),
                Err(e) => panic!("{e:?}"),
            }
        };
        assert_eq!(
            about_admins(&shared),
            [
                "line 7: database `billing`: url: its admin role (`admin` on db.example.org:5432) is also database `orders`'s; give each `[[database]]` an admin role of its own (a rotation of one would lock the other out)"
            ]
        );
        let own = format!(
            "{}{}",
            db("orders", "postgres://orders_admin@db.example.org/orders"),
            db("billing", "postgres://admin@db.example.org:6432/billing")
        );
        assert!(about_admins(&own).is_empty(), "{:?}", about_admins(&own));
    }

    #[test]
    fn a_role_name_holds_the_lease_once_and_fits_in_an_identifier() {
        for (template, why) in [
            ("pc_fixed", "must hold `{lease}` exactly once"),
            (
                "pg_{lease}",
                "besides `{lease}`, use lower-case letters, digits and `_`, not starting with `pg_`",
            ),
            ("{lease}_{lease}", "must hold `{lease}` exactly once"),
            (
                "a_very_long_prefix_for_every_login_{lease}",
                "a login's name would be 69 bytes; PostgreSQL allows 63",
            ),
        ] {
            let text = format!(
                "[[database]]\nname = \"o\"\nurl = \"postgres://a@h/d\"\npassword_file = \"/p\"\nrole_name = \"{template}\"\n"
            );
            let want = format!("line 5: database `o`: role_name: {why}");
            let got = problems(&text);
            assert!(got.contains(&want), "{template}: {got:#?}");
        }
    }
}
