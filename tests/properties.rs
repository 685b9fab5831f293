//! Property tests for the parsers that face untrusted input (issue 9,
//! "beyond the findings"): SPIFFE identities, free text, request fields,
//! policy TOML and token verification. Bounded case counts so `cargo test`
//! stays quick; each property says what must hold for every input.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

use portcullis::identity::Identity;
use portcullis::keys::{Kek, KeyRing, SigningAlg};
use portcullis::policy::Policy;
use portcullis::store::mem::MemStore;
use portcullis::text;
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

/// Any string, biased towards the characters identity and text parsers
/// care about.
fn hostile() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just('/'),
            Just('.'),
            Just('%'),
            Just(':'),
            Just('\n'),
            Just('\u{1b}'),
            Just('\u{202e}'),
            Just('\u{85}'),
            prop::char::range('a', 'z'),
            prop::char::range('0', '9'),
            any::<char>(),
        ],
        0..80,
    )
    .prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(config())]

    /// An accepted identity is `spiffe://domain/seg/...` with every segment
    /// non-empty, never `.` or `..`, and only letters, digits, `.`, `-`, `_`.
    #[test]
    fn accepted_identities_follow_the_spiffe_id_rules(tail in hostile()) {
        let s = format!("spiffe://{tail}");
        if let Ok(id) = Identity::parse(&s) {
            let rest = id.as_str().strip_prefix("spiffe://").unwrap();
            let (domain, path) = rest.split_once('/').unwrap();
            prop_assert!(!domain.is_empty());
            prop_assert!(domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b)));
            for seg in path.split('/') {
                prop_assert!(!seg.is_empty() && seg != "." && seg != "..", "{s:?}");
                prop_assert!(seg.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)), "{s:?}");
            }
        }
    }

    /// Well-formed identities are always accepted and round-trip.
    #[test]
    fn well_formed_identities_are_accepted(
        domain in "[a-z0-9][a-z0-9.-]{0,20}",
        segs in prop::collection::vec("[A-Za-z0-9_-][A-Za-z0-9._-]{0,10}", 1..5),
    ) {
        let segs: Vec<String> = segs.into_iter().filter(|s| s != "." && s != "..").collect();
        prop_assume!(!segs.is_empty());
        let s = format!("spiffe://{domain}/{}", segs.join("/"));
        let id = Identity::parse(&s).unwrap();
        prop_assert_eq!(id.as_str(), s.as_str());
    }

    /// Free text that passes the check never carries a display control, and
    /// the escaped form of anything never does either.
    #[test]
    fn accepted_free_text_cannot_rewrite_a_screen(s in hostile()) {
        if text::check_reason("reason", &s, false).is_ok() {
            prop_assert!(!s.chars().any(text::is_display_control));
        }
        let shown = text::escape_controls(&s);
        prop_assert!(!shown.chars().any(text::is_display_control));
    }

    /// Scope lists come back sorted, unique and valid, or are refused
    /// naming `scopes`.
    #[test]
    fn scope_lists_are_normalised_or_refused(scopes in prop::collection::vec(hostile(), 0..70)) {
        match text::check_scopes(&scopes) {
            Ok(v) => {
                prop_assert!(!v.is_empty() && v.len() <= text::MAX_SCOPES);
                prop_assert!(v.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(v.iter().all(|s| text::valid_scope_name(s)));
            }
            Err(e) => prop_assert_eq!(e.field, "scopes"),
        }
    }

    /// Ids are refused or made of `[A-Za-z0-9_-]`, at most 128 long.
    #[test]
    fn ids_are_refused_or_plain(s in hostile()) {
        if text::require_id("lease_id", &s).is_ok() {
            prop_assert!(s.len() <= text::MAX_ID);
            prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        }
    }

    /// Arbitrary text never panics the policy reader; whatever it accepts
    /// refuses an unknown scope.
    #[test]
    fn policy_text_never_panics_and_denies_by_default(
        s in prop_oneof![hostile(), "(\\[\\[scope\\]\\]\n)?(name|tier|workloads|max_ttl) = \"[a-z.*:/]{0,12}\"\n{0,3}"],
    ) {
        if let Ok(p) = Policy::parse(&s) {
            let who = Identity::parse("spiffe://t/w").unwrap();
            prop_assert!(p.decide(&who, &["no.such.scope".into()], None).is_err());
        }
    }
}

/// Token verification refuses arbitrary and mangled tokens without
/// panicking, including every single-byte change of a real one.
#[tokio::test]
async fn token_verification_refuses_mangled_tokens() {
    let store = MemStore::new();
    let (kek, _) = Kek::generate().unwrap();
    let ring = KeyRing::load_or_create(&store, &kek, SigningAlg::Es256, 1_000_000)
        .await
        .unwrap();
    let keys = ring.current();
    let claims = portcullis::token::Claims {
        iss: "https://t".into(),
        sub: "spiffe://t/w".into(),
        aud: "x".into(),
        client_id: "spiffe://t/w".into(),
        scope: "a".into(),
        iat: 1_000,
        nbf: 1_000,
        exp: 2_000,
        jti: "l_1".into(),
        approved_by: vec![],
        break_glass: false,
        act: None,
        cnf: None,
    };
    let token = portcullis::token::mint(&keys, &claims).unwrap();
    assert!(portcullis::token::verify(&keys, "https://t", &token, 1_500).is_ok());
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(
            &(0..token.len(), any::<u8>(), hostile()),
            |(at, byte, junk)| {
                // The last character of the signature carries unused bits; a
                // change there may decode to the same signature.
                prop_assume!(at + 1 != token.len());
                let mut bytes = token.as_bytes().to_vec();
                prop_assume!(bytes[at] != byte);
                bytes[at] = byte;
                let mangled = String::from_utf8_lossy(&bytes).into_owned();
                prop_assume!(mangled != token);
                prop_assert!(
                    portcullis::token::verify(&keys, "https://t", &mangled, 1_500).is_err()
                );
                prop_assert!(portcullis::token::verify(&keys, "https://t", &junk, 1_500).is_err());
                Ok(())
            },
        )
        .unwrap();
}
