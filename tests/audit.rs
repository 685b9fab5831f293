//! The decision trail over real mTLS: one record per action, a chain that
//! verifies, tampering found at the right sequence number; and the
//! observability surface (metrics, health, reflection).
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

mod common;

use std::time::Duration;

use common::*;
use portcullis::clock::Clock;
use portcullis::dev::{ADMIN, APPROVER, As, WORKLOAD};
use portcullis::pb;
use portcullis::pb::approvals_client::ApprovalsClient;
use portcullis::pb::audit_client::AuditClient;
use tonic::Code;

async fn verify(h: &Harness) -> pb::VerifyResponse {
    AuditClient::new(h.channel(As::Admin).await)
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// Drive one of every action through the API.
async fn mixed_workload(h: &Harness) {
    let mut c = h.broker(As::Workload).await;
    let g = grant(
        &mut c,
        pb::RequestTokenRequest {
            justification: "report".into(),
            ..ask(&["orders.read"])
        },
    )
    .await;
    let lease = g.lease.unwrap().id;
    c.renew_lease(pb::RenewLeaseRequest {
        lease_id: lease.clone(),
        ttl: None,
    })
    .await
    .unwrap();
    c.revoke_lease(pb::RevokeLeaseRequest {
        lease_id: lease,
        reason: "done".into(),
    })
    .await
    .unwrap();
    c.request_token(ask(&["payroll.read"])).await.unwrap_err();
    let parked = |r: pb::RequestTokenResponse| match r.outcome.unwrap() {
        pb::request_token_response::Outcome::Pending(p) => p.id,
        _ => panic!("expected pending"),
    };
    let approved = parked(
        c.request_token(pb::RequestTokenRequest {
            justification: "fix".into(),
            ..ask(&["orders.admin"])
        })
        .await
        .unwrap()
        .into_inner(),
    );
    let mut alice = ApprovalsClient::new(h.channel(As::Approver).await);
    alice
        .approve(pb::ApproveRequest {
            request_id: approved.clone(),
            reason: "ok".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        c.get_request(pb::GetRequestRequest {
            request_id: approved
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .is_some()
    );
    let denied = parked(
        c.request_token(ask(&["orders.admin"]))
            .await
            .unwrap()
            .into_inner(),
    );
    alice
        .deny(pb::DenyRequest {
            request_id: denied,
            reason: "no".into(),
        })
        .await
        .unwrap();
    let withdrawn = parked(
        c.request_token(ask(&["orders.admin"]))
            .await
            .unwrap()
            .into_inner(),
    );
    c.withdraw_request(pb::WithdrawRequestRequest {
        request_id: withdrawn,
        reason: "nvm".into(),
    })
    .await
    .unwrap();
    grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(30),
            ..ask(&["orders.read"])
        },
    )
    .await;
    grant(&mut c, ask(&["orders.read"])).await;
    h.broker(As::Admin)
        .await
        .revoke_leases(pb::RevokeLeasesRequest {
            subject: WORKLOAD.into(),
            reason: "incident".into(),
        })
        .await
        .unwrap();
    grant(
        &mut c,
        pb::RequestTokenRequest {
            ttl: secs(30),
            ..ask(&["orders.read"])
        },
    )
    .await;
    parked(
        c.request_token(ask(&["orders.admin"]))
            .await
            .unwrap()
            .into_inner(),
    );
    h.advance(Duration::from_secs(1801)).await;
    // An authentication failure: right CA, not a SPIFFE identity.
    let ch = h.channel_for("https://example.org/not-spiffe").await;
    let e = pb::broker_client::BrokerClient::new(ch)
        .request_token(ask(&["orders.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn every_action_leaves_one_record_and_the_chain_verifies() {
    let h = Harness::start().await;
    mixed_workload(&h).await;
    let records = export(&h).await;
    let count = |action: &str| records.iter().filter(|r| r.action == action).count();
    for (action, n) in [
        ("policy.loaded", 1),
        ("key.created", 1),
        ("token.granted", 4),
        ("lease.renewed", 1),
        ("lease.revoked", 1),
        ("token.refused", 1),
        ("request.parked", 4),
        ("request.approved", 1),
        ("request.issued", 1),
        ("request.denied", 1),
        ("request.withdrawn", 1),
        ("lease.bulk_revoked", 1),
        ("lease.expired", 1),
        ("request.expired", 1),
        ("auth.failed", 1),
    ] {
        assert_eq!(
            count(action),
            n,
            "{action}: {:#?}",
            records.iter().map(|r| &r.action).collect::<Vec<_>>()
        );
    }
    let find = |action: &str| records.iter().find(|r| r.action == action).unwrap();
    assert_eq!(find("request.approved").actor, APPROVER);
    assert_eq!(find("request.approved").reason, "ok");
    assert!(find("request.approved").rule.contains("orders.admin"));
    assert_eq!(find("request.denied").reason, "no");
    assert_eq!(find("lease.revoked").reason, "done");
    assert_eq!(find("lease.bulk_revoked").actor, ADMIN);
    assert!(
        find("lease.bulk_revoked")
            .reason
            .starts_with("3 active leases"),
        "{}",
        find("lease.bulk_revoked").reason
    );
    assert_eq!(find("token.refused").outcome, "refused");
    assert!(find("token.refused").reason.contains("payroll.read"));
    assert_eq!(find("token.granted").reason, "report");
    assert!(find("token.granted").rule.contains("orders.read"));
    assert!(
        !find("token.granted").peer.is_empty(),
        "peer address recorded"
    );
    assert!(
        !find("token.granted").call_id.is_empty(),
        "call id recorded"
    );
    assert_eq!(find("lease.expired").actor, "portcullis");
    // No token or key material anywhere in the trail.
    assert!(records.iter().all(|r| !r.canonical_json.contains("eyJ")));
    // Sequence numbers are contiguous from 1.
    assert!(
        records
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == i as u64 + 1)
    );

    h.running()
        .engine
        .checkpoint_audit()
        .await
        .unwrap()
        .unwrap();
    let v = verify(&h).await;
    assert!(v.ok, "{v:?}");
    assert_eq!(v.records, records.len() as u64);
    // The one signed at start, and this one.
    assert_eq!(v.checkpoints, 2);

    // Filters.
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let leases = a
        .export(pb::ExportRequest {
            action: "lease.".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(leases.len() >= 4 && leases.iter().all(|r| r.action.starts_with("lease.")));
    let by_alice = a
        .export(pb::ExportRequest {
            actor: APPROVER.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(by_alice.len(), 2);
    let page = a
        .export(pb::ExportRequest {
            page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((page.records.len(), page.next_after_seq), (3, 3));
    h.stop().await;
}

#[tokio::test]
async fn only_admins_and_auditors_read_the_trail_and_tail_is_live() {
    let h = Harness::start().await;
    let mut w = AuditClient::new(h.channel(As::Workload).await);
    let e = w.export(pb::ExportRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = w.verify(pb::VerifyRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let mut tail = a
        .tail(pb::TailRequest { after_seq: 1 })
        .await
        .unwrap()
        .into_inner();
    let replayed = tail.message().await.unwrap().unwrap();
    assert_eq!(replayed.seq, 2, "replay starts after after_seq");
    let mut c = h.broker(As::Workload).await;
    let g = grant(&mut c, ask(&["orders.read"])).await;
    let live = tail.message().await.unwrap().unwrap();
    assert_eq!(live.action, "token.granted");
    assert_eq!(live.target, g.lease.unwrap().id);
    h.stop().await;
}

/// Run the workload, stop, tamper with the sled files directly, restart and
/// verify.
async fn tampered(edit: impl FnOnce(&sled::Tree)) -> pb::VerifyResponse {
    let mut h = Harness::start().await;
    mixed_workload(&h).await;
    h.running().engine.checkpoint_audit().await.unwrap();
    if let Some(r) = h.running.take() {
        r.shutdown().await;
    }
    {
        let db = open_sled(&h.dev.data()).await;
        edit(&unblock(&db));
        db.flush().unwrap();
    }
    h.boot().await;
    let v = verify(&h).await;
    h.stop().await;
    v
}

/// The broker's sled files, opened as someone with write access to them
/// would. sled lets go of its file lock from a background thread after the
/// broker's last handle drops (`SledStore::open` waits the same way).
async fn open_sled(dir: &std::path::Path) -> sled::Db {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < until => {
                assert!(e.to_string().contains("lock"), "{e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The store's `audit` tree with its blocks of records (one key per group
/// of batches) rewritten as one key per record — a layout the store reads
/// too (builds before blocks wrote it) — so an edit can name a record by
/// its number, as someone with write access to the files could.
fn unblock(db: &sled::Db) -> sled::Tree {
    let audit = db.open_tree("audit").unwrap();
    for item in audit.iter() {
        let (k, v) = item.unwrap();
        let records = portcullis::store::sled_store::audit_entry(&k, &v).unwrap();
        audit.remove(&k).unwrap();
        for (seq, record) in records {
            audit.insert(seq.to_be_bytes(), record).unwrap();
        }
    }
    audit
}

fn get(t: &sled::Tree, seq: u64) -> Vec<u8> {
    t.get(seq.to_be_bytes()).unwrap().unwrap().to_vec()
}

#[tokio::test]
async fn an_edited_record_is_found_at_its_sequence_number() {
    let v = tampered(|t| {
        let text = String::from_utf8(get(t, 5)).unwrap();
        let edited = text.replacen("\"outcome\":\"ok\"", "\"outcome\":\"OK\"", 1);
        assert_ne!(text, edited);
        t.insert(5u64.to_be_bytes(), edited.as_bytes()).unwrap();
    })
    .await;
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, 5, "{v:?}");
}

#[tokio::test]
async fn a_deleted_record_is_found_at_its_sequence_number() {
    let v = tampered(|t| {
        t.remove(7u64.to_be_bytes()).unwrap();
    })
    .await;
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, 7, "{v:?}");
    assert!(v.problem.contains("missing"), "{v:?}");
}

#[tokio::test]
async fn swapped_records_are_found_at_the_first_of_them() {
    let v = tampered(|t| {
        let (a, b) = (get(t, 4), get(t, 9));
        t.insert(4u64.to_be_bytes(), b).unwrap();
        t.insert(9u64.to_be_bytes(), a).unwrap();
    })
    .await;
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, 4, "{v:?}");
}

#[tokio::test]
async fn an_edit_of_the_newest_checkpointed_record_is_found_by_the_checkpoint() {
    let v = tampered(|t| {
        let (seq, bytes) = t.last().unwrap().unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap().replacen(
            "\"reason\":\"",
            "\"reason\":\"edited ",
            1,
        );
        t.insert(seq, text.as_bytes()).unwrap();
    })
    .await;
    assert!(!v.ok, "{v:?}");
    assert!(
        v.problem.contains("checkpoint") || v.problem.contains("does not match"),
        "{v:?}"
    );
}

#[tokio::test]
async fn retention_compaction_keeps_the_rest_verifiable_from_a_signed_checkpoint() {
    let mut h = Harness::start().await;
    mixed_workload(&h).await;
    let engine = h.running().engine.clone();
    let first = engine.checkpoint_audit().await.unwrap().unwrap();
    h.clock.advance(Duration::from_secs(3600));
    let mut c = h.broker(As::Workload).await;
    grant(&mut c, ask(&["orders.read"])).await;
    engine.checkpoint_audit().await.unwrap().unwrap();
    let total = export(&h).await.len() as u64;
    let point = engine
        .compact_audit(h.clock.now() - 1_800_000)
        .await
        .unwrap();
    assert_eq!(point, Some(first));
    let v = verify(&h).await;
    assert!(v.ok, "{v:?}");
    assert_eq!(
        v.records,
        total - first + 1,
        "compacted records are gone, plus the compaction record"
    );
    assert_eq!(export(&h).await[0].seq, first + 1);
    // Without the anchoring checkpoint the remainder no longer verifies.
    drop(engine);
    if let Some(r) = h.running.take() {
        r.shutdown().await;
    }
    {
        let db = open_sled(&h.dev.data()).await;
        db.open_tree("audit_checkpoints")
            .unwrap()
            .remove(first.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    h.boot().await;
    let v = verify(&h).await;
    assert!(!v.ok, "{v:?}");
    assert!(v.problem.contains("anchors"), "{v:?}");
    h.stop().await;
}

/// Issue 21, finding 2: removing the oldest records and the checkpoints
/// before a signed one — exactly what compaction does, but without
/// compaction — no longer verifies: a trail that does not start at record 1
/// must record the compaction to where it starts.
#[tokio::test]
async fn i21_02_the_oldest_records_removed_without_a_compaction_are_found() {
    let mut h = Harness::start().await;
    mixed_workload(&h).await;
    let engine = h.running().engine.clone();
    let point = engine.checkpoint_audit().await.unwrap().unwrap();
    let mut c = h.broker(As::Workload).await;
    grant(&mut c, ask(&["orders.read"])).await;
    engine.checkpoint_audit().await.unwrap().unwrap();
    assert!(verify(&h).await.ok);
    drop((engine, c));
    if let Some(r) = h.running.take() {
        r.shutdown().await;
    }
    {
        // What compaction to `point` removes, with no record of it.
        let db = open_sled(&h.dev.data()).await;
        let (audit, checkpoints) = (unblock(&db), db.open_tree("audit_checkpoints").unwrap());
        for item in audit.range(..=point.to_be_bytes()) {
            audit.remove(item.unwrap().0).unwrap();
        }
        for item in checkpoints.range(..point.to_be_bytes()) {
            checkpoints.remove(item.unwrap().0).unwrap();
        }
        db.flush().unwrap();
    }
    h.boot().await;
    let v = verify(&h).await;
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.first_bad_seq, point, "{v:?}");
    assert!(v.problem.contains("no compaction"), "{v:?}");
    h.stop().await;
}

/// Issue 21, finding 2: a compaction record appended by someone who can
/// write the store but holds no signing key (chained correctly: the chain
/// has no key) does not make a removal pass; an operator may accept an
/// unsigned compaction by name (trails compacted by an older build).
#[tokio::test]
async fn i21_02_a_forged_compaction_record_is_found() {
    let mut h = Harness::start().await;
    mixed_workload(&h).await;
    let engine = h.running().engine.clone();
    let point = engine.checkpoint_audit().await.unwrap().unwrap();
    let mut c = h.broker(As::Workload).await;
    grant(&mut c, ask(&["orders.read"])).await;
    engine.checkpoint_audit().await.unwrap().unwrap();
    drop((engine, c));
    if let Some(r) = h.running.take() {
        r.shutdown().await;
    }
    {
        // What compaction to `point` does, with a record of it in the
        // right shape, chained after the last — but not signed.
        let db = open_sled(&h.dev.data()).await;
        let (audit, checkpoints) = (unblock(&db), db.open_tree("audit_checkpoints").unwrap());
        let (last, bytes) = audit.last().unwrap().unwrap();
        let last = u64::from_be_bytes(last.as_ref().try_into().unwrap());
        let body = portcullis::audit::AuditLog::bodies(
            h.clock.now(),
            vec![
                portcullis::audit::Entry::ok(
                    "portcullis",
                    portcullis::audit::Action::AuditCompacted,
                    &point.to_string(),
                    &[],
                    "retention",
                )
                .rule("eyJhbGciOiJFUzI1NiJ9.e30.c2ln"),
            ],
        )
        .unwrap();
        let forged =
            portcullis::chain::chained(last + 1, &body[0], &portcullis::chain::sha256_hex(&bytes));
        audit.insert((last + 1).to_be_bytes(), forged).unwrap();
        for item in audit.range(..=point.to_be_bytes()) {
            audit.remove(item.unwrap().0).unwrap();
        }
        for item in checkpoints.range(..point.to_be_bytes()) {
            checkpoints.remove(item.unwrap().0).unwrap();
        }
        db.flush().unwrap();
    }
    h.boot().await;
    let v = verify(&h).await;
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.first_bad_seq, point, "{v:?}");
    assert!(v.problem.contains("is not signed"), "{v:?}");
    // Accepted on the operator's word, with a note saying so; another
    // point is not.
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let asked = |n: u64| pb::VerifyRequest {
        accept_unsigned_compaction: n,
        ..Default::default()
    };
    let wrong = a.verify(asked(point + 1)).await.unwrap().into_inner();
    assert!(!wrong.ok, "{wrong:?}");
    let accepted = a.verify(asked(point)).await.unwrap().into_inner();
    assert!(accepted.ok, "{accepted:?}");
    assert!(
        accepted.notes.iter().any(|n| n.contains("operator's word")),
        "{accepted:?}"
    );
    h.stop().await;
}

/// Issue 21, finding 2: with every checkpoint removed, a broker re-signs
/// the trail it finds (at start, or 30 s later on a shared store): that
/// first checkpoint names the genesis but was signed long after record 1,
/// so the trail verifies only when the chain alone is asked for.
#[tokio::test]
async fn i21_02_a_trail_whose_checkpoints_were_all_removed_is_found_after_re_signing() {
    let mut h = Harness::start().await;
    mixed_workload(&h).await;
    h.running()
        .engine
        .checkpoint_audit()
        .await
        .unwrap()
        .unwrap();
    assert!(verify(&h).await.ok);
    if let Some(r) = h.running.take() {
        r.shutdown().await;
    }
    {
        let db = open_sled(&h.dev.data()).await;
        db.open_tree("audit_checkpoints").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    h.clock.advance(Duration::from_secs(600));
    h.boot().await;
    let v = verify(&h).await;
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.first_bad_seq, 1, "{v:?}");
    assert!(
        v.problem.contains("after record 1") && v.problem.contains("re-signed"),
        "{v:?}"
    );
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let chain_alone = a
        .verify(pb::VerifyRequest {
            allow_uncovered: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(chain_alone.ok, "{chain_alone:?}");
    h.stop().await;
}

/// Issue 21, finding 2: a fresh broker's trail verifies at once — it signs
/// a checkpoint at start — where before its records were covered by no
/// checkpoint for up to 30 s (and a trail no checkpoint covers no longer
/// verifies: `audit` `a_trail_no_checkpoint_covers_is_not_verified`).
#[tokio::test]
async fn i21_02_a_fresh_trail_is_covered_from_the_start() {
    let h = Harness::start().await;
    let v = verify(&h).await;
    assert!(v.ok, "{v:?}");
    assert_eq!(v.checkpoints, 1, "{v:?}");
    assert_eq!(v.covered_seq, v.last_seq, "{v:?}");
    h.stop().await;
}

#[tokio::test]
async fn metrics_health_and_reflection() {
    let h = Harness::start().await;
    let http = h.running().http_addr.unwrap();
    let before = http_get(http, "/metrics").await;
    let mut c = h.broker(As::Workload).await;
    grant(&mut c, ask(&["orders.read"])).await;
    c.request_token(ask(&["payroll.read"])).await.unwrap_err();
    let after = http_get(http, "/metrics").await;
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        value(
            &after,
            "portcullis_token_requests_total{outcome=\"granted\"}"
        ) - value(
            &before,
            "portcullis_token_requests_total{outcome=\"granted\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            "portcullis_token_requests_total{outcome=\"refused\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(value(&after, "portcullis_active_leases"), 1.0, "{after}");
    assert!(
        value(&after, "portcullis_issuance_seconds_count") >= 1.0,
        "{after}"
    );
    assert!(
        value(&after, "portcullis_group_commit_syncs") >= 1.0,
        "{after}"
    );

    let mut health =
        tonic_health::pb::health_client::HealthClient::new(h.channel(As::Workload).await);
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "portcullis.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        s.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(h.channel(As::Workload).await);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!()
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "portcullis.v1.Broker",
        "portcullis.v1.Approvals",
        "portcullis.v1.Audit",
        "portcullis.v1.Keys",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s.to_owned()), "{s} not in {names:?}");
    }
    h.stop().await;
}

/// Issue 9, finding 3 (in part): verify says exactly what it proved, and
/// `strict` fails while records after the newest checkpoint are unsigned
/// (a truncated tail leaves no trace inside the store).
#[tokio::test]
async fn f03_verify_says_what_it_proved_and_strict_refuses_an_unsigned_tail() {
    let h = Harness::start().await;
    mixed_workload(&h).await;
    let signed = h
        .running()
        .engine
        .checkpoint_audit()
        .await
        .unwrap()
        .unwrap();
    let mut c = h.broker(As::Workload).await;
    grant(&mut c, ask(&["orders.read"])).await;
    grant(&mut c, ask(&["orders.read"])).await;
    let v = verify(&h).await;
    assert!(v.ok, "{v:?}");
    assert_eq!((v.first_seq, v.covered_seq), (1, signed), "{v:?}");
    assert_eq!(v.last_seq, signed + 2, "{v:?}");
    assert_eq!(
        v.proved,
        format!(
            "records 1..{} chained, checkpoints cover 1..{signed}, 2 unsigned trailing records",
            signed + 2
        )
    );
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let strict = a
        .verify(pb::VerifyRequest {
            strict: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!strict.ok, "{strict:?}");
    assert_eq!(strict.first_bad_seq, signed + 1);
    assert!(strict.problem.contains("not signed"), "{strict:?}");
    h.running()
        .engine
        .checkpoint_audit()
        .await
        .unwrap()
        .unwrap();
    let strict = a
        .verify(pb::VerifyRequest {
            strict: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(strict.ok, "{strict:?}");
    assert!(
        strict.proved.ends_with(", 0 unsigned trailing records"),
        "{strict:?}"
    );
    h.stop().await;
}

/// Issue 9, finding 3 (in part): a copy of each checkpoint kept by an
/// external witness makes a consistent truncation of the store detectable.
#[tokio::test]
async fn f03_a_truncated_trail_is_caught_against_the_witness() {
    let mut h = Harness::start().await;
    let witness = h.dir.path().join("witness.jws");
    // Each start and each shutdown signs a checkpoint and hands it to the
    // witness.
    h.restart_with(|cfg| cfg.audit_witness = Some(witness.clone()))
        .await;
    mixed_workload(&h).await;
    h.halt().await;
    let first = std::fs::read_to_string(&witness).unwrap();
    assert_eq!(first.lines().count(), 2, "{first}");
    h.restart_with(|cfg| {
        cfg.audit_witness = Some(witness.clone());
    })
    .await;
    mixed_workload(&h).await;
    h.halt().await;
    let lines: Vec<String> = std::fs::read_to_string(&witness)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 4);

    // Roll the store back to the first checkpoint: drop every later record
    // and checkpoint. What remains is consistent in itself.
    {
        let db = open_sled(&h.dev.data()).await;
        let checkpoints = db.open_tree("audit_checkpoints").unwrap();
        let (first_seq, _) = checkpoints.first().unwrap().unwrap();
        let keep = u64::from_be_bytes(first_seq.as_ref().try_into().unwrap());
        let audit = unblock(&db);
        for item in audit.range((keep + 1).to_be_bytes()..) {
            audit.remove(item.unwrap().0).unwrap();
        }
        for item in checkpoints.range((keep + 1).to_be_bytes()..) {
            checkpoints.remove(item.unwrap().0).unwrap();
        }
        // The journal (`journal-*`) is left: the broker closed cleanly, so
        // it holds no group after the store's number, and nothing is
        // written again at open.
        db.flush().unwrap();
    }
    h.boot().await;
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let alone = a
        .verify(pb::VerifyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(alone.ok, "the store alone cannot tell: {alone:?}");
    let witnessed = a
        .verify(pb::VerifyRequest {
            witnessed: lines,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!witnessed.ok, "{witnessed:?}");
    assert!(
        witnessed.problem.contains("truncated or rewritten"),
        "{witnessed:?}"
    );
    h.stop().await;
}

/// Issue 9, finding 3: checkpoints chain to each other, so removing one
/// from the middle is found even though the records still chain.
#[tokio::test]
async fn f03_a_removed_checkpoint_breaks_the_checkpoint_chain() {
    let mut h = Harness::start().await;
    let mut seqs = Vec::new();
    for _ in 0..3 {
        mixed_workload(&h).await;
        seqs.push(
            h.running()
                .engine
                .checkpoint_audit()
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(verify(&h).await.ok);
    h.halt().await;
    {
        let db = open_sled(&h.dev.data()).await;
        let checkpoints = db.open_tree("audit_checkpoints").unwrap();
        checkpoints.remove(seqs[1].to_be_bytes()).unwrap().unwrap();
        db.flush().unwrap();
    }
    h.boot().await;
    let v = verify(&h).await;
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.first_bad_seq, seqs[2], "{v:?}");
    assert!(v.problem.contains("does not follow"), "{v:?}");
    h.stop().await;
}

/// Issue 9, finding 3: the export stream carries the signed checkpoints of
/// its range, so whoever keeps the export holds a witness copy.
#[tokio::test]
async fn f03_the_export_stream_carries_its_checkpoints() {
    let h = Harness::start().await;
    mixed_workload(&h).await;
    let seq = h
        .running()
        .engine
        .checkpoint_audit()
        .await
        .unwrap()
        .unwrap();
    let mut a = AuditClient::new(h.channel(As::Admin).await);
    let page = a
        .export(pb::ExportRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The one signed at start, and this one.
    assert_eq!(page.checkpoints.len(), 2, "{:?}", page.checkpoints);
    let claims = part(&page.checkpoints[1], 1);
    assert_eq!(claims["seq"], seq);
    let later = a
        .export(pb::ExportRequest {
            after_seq: seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(later.checkpoints.is_empty(), "only the page's own range");
    let v = a
        .verify(pb::VerifyRequest {
            witnessed: page.checkpoints,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        v.ok,
        "an intact store matches its exported checkpoints: {v:?}"
    );
    h.stop().await;
}

/// Issue 9, finding 3: a witness reached over HTTP receives every signed
/// checkpoint, and what it received verifies against the store.
#[tokio::test]
async fn f03_a_witness_url_receives_every_checkpoint() {
    let (port, mut received) = receiver().await;
    let mut h = Harness::start().await;
    h.restart_with(|cfg| {
        cfg.audit_witness_url = Some(format!("http://127.0.0.1:{port}/witness"));
    })
    .await;
    mixed_workload(&h).await;
    // Shutdown signs the last checkpoint and hands it over.
    h.halt().await;
    let (path, body) = received.recv().await.unwrap();
    assert_eq!(path, "witness");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let jws = doc["checkpoint"].as_str().unwrap().to_owned();
    assert_eq!(part(&jws, 1)["seq"], doc["seq"]);
    h.boot().await;
    let v = AuditClient::new(h.channel(As::Admin).await)
        .verify(pb::VerifyRequest {
            witnessed: vec![jws],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    h.stop().await;
}
