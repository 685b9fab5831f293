//! Compact, versioned encodings of stored records. The layout is
//! `proto/portcullis/store/v1/records.proto`: a format byte, then the
//! record. Leases are the records a store holds millions of, so they are
//! protobuf (about a third of their JSON size); the trail stays canonical
//! JSON (its bytes are what the hash chain covers).

use super::StoreError;

use crate::model::{Lease, LeaseState};

mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/portcullis.store.v1.rs"));
}

/// Format byte of a protobuf [`pb::LeaseRecord`].
const LEASE_PROTO: u8 = 0x01;
/// First byte of a JSON lease (stores written by schema version 1).
const LEASE_JSON: u8 = b'{';

fn state_to(s: LeaseState) -> pb::LeaseState {
    match s {
        LeaseState::Active => pb::LeaseState::Active,
        LeaseState::Expired => pb::LeaseState::Expired,
        LeaseState::Revoked => pb::LeaseState::Revoked,
    }
}

/// The stored bytes of `l`.
pub(crate) fn encode_lease(l: &Lease) -> Vec<u8> {
    let rec = pb::LeaseRecord {
        id: l.id.clone(),
        subject: l.subject.clone(),
        client_id: (l.client_id != l.subject).then(|| l.client_id.clone()),
        scopes: l.scopes.clone(),
        audience: l.audience.clone(),
        justification: l.justification.clone(),
        issued_at: l.issued_at,
        expires_at: l.expires_at,
        max_expires_at: l.max_expires_at,
        ttl_ms: l.ttl_ms,
        state: state_to(l.state).into(),
        kid: l.kid.clone(),
        renewals: l.renewals,
        token_issued_at: l.token_issued_at,
        revoked_at: l.revoked_at,
        revoked_by: l.revoked_by.clone(),
        revoke_reason: l.revoke_reason.clone(),
        expired_at: l.expired_at,
        request_id: l.request_id.clone(),
        approved_by: l.approved_by.clone(),
        break_glass: l.break_glass,
        token_mac: l.token_mac.map(|d| d.to_vec()).unwrap_or_default(),
        delegation: l.delegation.as_ref().map(|d| pb::Delegation {
            parent_id: d.parent_id.clone(),
            depth: d.depth,
            actors: d.actors.clone(),
        }),
        cnf: l.cnf.clone(),
        login: l.login.as_ref().map(|g| pb::Login {
            database: g.database.clone(),
            role: g.role.clone(),
            group: g.group.clone(),
        }),
    };
    let mut out = Vec::with_capacity(1 + prost::Message::encoded_len(&rec));
    out.push(LEASE_PROTO);
    prost::Message::encode_raw(&rec, &mut out);
    out
}

fn corrupt(key: &[u8], detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        tree: "leases",
        key: String::from_utf8_lossy(key).into_owned(),
        detail: detail.into(),
    }
}

/// The lease stored under `key` as `bytes`, in any format this build reads.
pub(crate) fn decode_lease(key: &[u8], bytes: &[u8]) -> Result<Lease, StoreError> {
    match bytes.split_first() {
        Some((&LEASE_PROTO, rest)) => {
            let r = <pb::LeaseRecord as prost::Message>::decode(rest)
                .map_err(|e| corrupt(key, e.to_string()))?;
            from_record(key, r)
        }
        Some((&LEASE_JSON, _)) => {
            let l: Lease = super::decode("leases", key, bytes)?;
            if l.id.as_bytes() != key {
                return Err(corrupt(key, format!("record names lease `{}`", l.id)));
            }
            Ok(l)
        }
        Some((b, _)) => Err(corrupt(key, format!("unknown record format {b:#04x}"))),
        None => Err(corrupt(key, "empty record")),
    }
}

fn from_record(key: &[u8], r: pb::LeaseRecord) -> Result<Lease, StoreError> {
    let state = match pb::LeaseState::try_from(r.state) {
        Ok(pb::LeaseState::Active) => LeaseState::Active,
        Ok(pb::LeaseState::Expired) => LeaseState::Expired,
        Ok(pb::LeaseState::Revoked) => LeaseState::Revoked,
        _ => return Err(corrupt(key, format!("unknown lease state {}", r.state))),
    };
    let token_mac = match r.token_mac.len() {
        0 => None,
        _ => Some(
            <[u8; 32]>::try_from(r.token_mac.as_slice())
                .map_err(|_| corrupt(key, "token digest is not 32 bytes"))?,
        ),
    };
    if r.id.as_bytes() != key {
        return Err(corrupt(key, format!("record names lease `{}`", r.id)));
    }
    let client_id = r.client_id.unwrap_or_else(|| r.subject.clone());
    Ok(Lease {
        id: r.id,
        subject: r.subject,
        client_id,
        scopes: r.scopes,
        audience: r.audience,
        justification: r.justification,
        issued_at: r.issued_at,
        expires_at: r.expires_at,
        max_expires_at: r.max_expires_at,
        ttl_ms: r.ttl_ms,
        state,
        kid: r.kid,
        renewals: r.renewals,
        token_issued_at: r.token_issued_at,
        revoked_at: r.revoked_at,
        revoked_by: r.revoked_by,
        revoke_reason: r.revoke_reason,
        expired_at: r.expired_at,
        request_id: r.request_id,
        approved_by: r.approved_by,
        break_glass: r.break_glass,
        token_mac,
        delegation: r.delegation.map(|d| crate::model::Delegation {
            parent_id: d.parent_id,
            depth: d.depth,
            actors: d.actors,
        }),
        cnf: r.cnf,
        login: r.login.map(|g| {
            Box::new(crate::model::LeaseLogin {
                database: g.database,
                role: g.role,
                group: g.group,
            })
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Terms;

    fn lease() -> Lease {
        let terms = Terms {
            scopes: vec!["a.read".into(), "b.write".into()],
            audience: "svc".into(),
            justification: "deploy #42".into(),
            ttl_ms: 300_000,
            max_ttl_ms: 3_600_000,
        };
        Lease::active("l_1".into(), "spiffe://t/w", &terms, 1_000, "kid1")
    }

    #[test]
    fn every_field_survives_the_compact_encoding() {
        let plain = lease();
        let full = Lease {
            client_id: "spiffe://t/agent".into(),
            state: LeaseState::Revoked,
            renewals: 3,
            revoked_at: Some(5),
            revoked_by: Some("human/a".into()),
            revoke_reason: Some("done".into()),
            expired_at: Some(6),
            request_id: Some("r_1".into()),
            approved_by: vec!["human/b".into()],
            break_glass: true,
            token_mac: Some([7; 32]),
            delegation: Some(crate::model::Delegation {
                parent_id: "l_0".into(),
                depth: 2,
                actors: vec!["spiffe://t/agent".into(), "spiffe://t/orchestrator".into()],
            }),
            cnf: Some("x5t-thumbprint".into()),
            login: Some(Box::new(crate::model::LeaseLogin {
                database: "orders".into(),
                role: "pc_l_1".into(),
                group: "orders_reader".into(),
            })),
            ..lease()
        };
        // A client other than the subject, even an empty one, is kept.
        let empty_client = Lease {
            client_id: String::new(),
            ..lease()
        };
        for l in [plain, full, empty_client] {
            let bytes = encode_lease(&l);
            assert_eq!(bytes[0], LEASE_PROTO);
            assert_eq!(decode_lease(b"l_1", &bytes).unwrap(), l);
        }
    }

    #[test]
    fn json_leases_of_schema_one_still_read() {
        let l = lease();
        let json = serde_json::to_vec(&l).unwrap();
        assert_eq!(decode_lease(b"l_1", &json).unwrap(), l);
        // A record stored under another lease's key is refused, in both
        // formats: what a key names is never guessed.
        assert!(decode_lease(b"l_2", &json).is_err());
        assert!(decode_lease(b"l_2", &encode_lease(&l)).is_err());
        assert!(
            encode_lease(&l).len() * 2 < json.len(),
            "compact {} vs json {}",
            encode_lease(&l).len(),
            json.len()
        );
    }

    #[test]
    fn unknown_formats_and_bad_records_are_refused_not_guessed() {
        for bad in [&b""[..], &[0x09, 1, 2][..], &[LEASE_PROTO, 0xff, 0xff][..]] {
            assert!(matches!(
                decode_lease(b"l_1", bad),
                Err(StoreError::Corrupt { .. })
            ));
        }
        let mut no_state = encode_lease(&lease());
        // A record whose state was never set is not an ACTIVE lease.
        let r = pb::LeaseRecord {
            state: 0,
            ..<pb::LeaseRecord as prost::Message>::decode(&no_state[1..]).unwrap()
        };
        no_state.truncate(1);
        prost::Message::encode_raw(&r, &mut no_state);
        assert!(decode_lease(b"l_1", &no_state).is_err());
    }
}
