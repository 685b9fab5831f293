//! Every bad input gets a clear status naming the field, and changes
//! nothing. Every bad identity is refused at the handshake.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is a test failure"
)]

mod common;

use common::*;
use portcullis::client::ClientOpts;
use portcullis::dev::{As, DevCa, WORKLOAD};
use portcullis::pb;
use portcullis::pb::broker_client::BrokerClient;
use tonic::Code;

#[tokio::test]
async fn malformed_requests_name_the_field_and_write_nothing() {
    let h = Harness::start().await;
    let mut c = h.broker(As::Workload).await;
    let long_scope = "s".repeat(129);
    let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
    let cases: Vec<(pb::RequestTokenRequest, Code, &str)> = vec![
        (ask(&[]), Code::InvalidArgument, "scopes"),
        (ask(&["orders read"]), Code::InvalidArgument, "scopes"),
        (ask(&["orders.read\u{7}"]), Code::InvalidArgument, "scopes"),
        (ask(&["orders.réad"]), Code::InvalidArgument, "scopes"),
        (ask(&[long_scope.as_str()]), Code::InvalidArgument, "scopes"),
        (
            pb::RequestTokenRequest {
                scopes: many,
                ..Default::default()
            },
            Code::InvalidArgument,
            "scopes",
        ),
        (
            pb::RequestTokenRequest {
                ttl: secs(0),
                ..ask(&["orders.read"])
            },
            Code::InvalidArgument,
            "ttl",
        ),
        (
            pb::RequestTokenRequest {
                ttl: secs(-5),
                ..ask(&["orders.read"])
            },
            Code::InvalidArgument,
            "ttl",
        ),
        (
            pb::RequestTokenRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: -1,
                }),
                ..ask(&["orders.read"])
            },
            Code::InvalidArgument,
            "ttl",
        ),
        (
            pb::RequestTokenRequest {
                ttl: secs(25 * 3600),
                ..ask(&["orders.read"])
            },
            Code::InvalidArgument,
            "ttl",
        ),
        (
            pb::RequestTokenRequest {
                justification: "x".repeat(4097),
                ..ask(&["orders.read"])
            },
            Code::InvalidArgument,
            "justification",
        ),
        (
            pb::RequestTokenRequest {
                audience: "a\nb".into(),
                ..ask(&["orders.read"])
            },
            Code::InvalidArgument,
            "audience",
        ),
        (
            pb::RequestTokenRequest {
                client_request_id: "has space".into(),
                ..ask(&["orders.read"])
            },
            Code::InvalidArgument,
            "client_request_id",
        ),
        (
            pb::RequestTokenRequest {
                break_glass: true,
                justification: String::new(),
                ..ask(&["orders.admin"])
            },
            Code::InvalidArgument,
            "justification",
        ),
        (
            pb::RequestTokenRequest {
                break_glass: true,
                justification: "prod down".into(),
                ..ask(&["orders.admin"])
            },
            Code::PermissionDenied,
            "break-glass is not allowed",
        ),
        (
            ask(&["unknown.scope"]),
            Code::PermissionDenied,
            "`unknown.scope`",
        ),
    ];
    for (req, code, needle) in cases {
        let e = c.request_token(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{req:?}: `{}` does not name `{needle}`",
            e.message()
        );
    }
    // Other RPCs name their fields too.
    let e = c
        .renew_lease(pb::RenewLeaseRequest {
            lease_id: String::new(),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("lease_id")),
        (Code::InvalidArgument, true),
        "{}",
        e.message()
    );
    let e = c
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: "../etc".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("lease_id")),
        (Code::InvalidArgument, true),
        "{}",
        e.message()
    );
    let e = c
        .get_request(pb::GetRequestRequest {
            request_id: "r_nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .list_leases(pb::ListLeasesRequest {
            state: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("state")),
        (Code::InvalidArgument, true)
    );
    let e = c
        .revoke_lease(pb::RevokeLeaseRequest {
            lease_id: "l_x".into(),
            reason: "r".repeat(5000),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().contains("reason")),
        (Code::InvalidArgument, true)
    );

    // Oversized message: refused by the transport limit before any handler.
    let e = c
        .request_token(pb::RequestTokenRequest {
            justification: "x".repeat(100 * 1024),
            ..ask(&["orders.read"])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());

    assert_eq!(count_leases(&mut c).await, 0, "no bad input wrote a lease");
    h.stop().await;
}

async fn refused(opts: ClientOpts) -> String {
    // The handshake fails either at connect or on the first call.
    match opts.connect().await {
        Err(e) => e.to_string(),
        Ok(ch) => {
            let e = BrokerClient::new(ch)
                .request_token(ask(&["orders.read"]))
                .await
                .unwrap_err();
            assert_ne!(e.code(), Code::Ok);
            e.to_string()
        }
    }
}

#[tokio::test]
async fn handshakes_without_a_valid_client_certificate_are_refused() {
    let h = Harness::start().await;
    let base = h.opts(As::Workload);

    // No client certificate at all: a bare TLS client trusting the CA.
    let ca = std::fs::read(h.dev.path("ca.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", h.running().grpc_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = ch {
        let e = BrokerClient::new(ch)
            .request_token(ask(&["orders.read"]))
            .await
            .unwrap_err();
        assert_ne!(e.code(), Code::Ok);
    }

    // A certificate from another CA, for the very same identity.
    let other = DevCa::new("someone else's CA").unwrap();
    let (cert, key) = h.foreign_identity(&other, WORKLOAD, false, "foreign");
    let msg = refused(ClientOpts {
        cert: Some(cert),
        key: Some(key),
        ..base.clone()
    })
    .await;
    assert!(!msg.is_empty());

    // An expired certificate from the right CA.
    let (cert, key) = h.foreign_identity(&h.ca, WORKLOAD, true, "expired");
    let msg = refused(ClientOpts {
        cert: Some(cert),
        key: Some(key),
        ..base.clone()
    })
    .await;
    assert!(!msg.is_empty());

    // A valid certificate from the right CA whose URI SAN is not SPIFFE:
    // the handshake passes but every call is UNAUTHENTICATED.
    let (cert, key) =
        h.foreign_identity(&h.ca, "https://example.org/not-spiffe", false, "notspiffe");
    let ch = ClientOpts {
        cert: Some(cert),
        key: Some(key),
        ..base.clone()
    }
    .connect()
    .await
    .unwrap();
    let e = BrokerClient::new(ch)
        .request_token(ask(&["orders.read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        !e.message().contains("not-spiffe"),
        "detail stays in the log: {}",
        e.message()
    );

    // A fresh certificate from the right CA works (the control).
    let (cert, key) = h.foreign_identity(&h.ca, WORKLOAD, false, "fresh");
    let ch = ClientOpts {
        cert: Some(cert),
        key: Some(key),
        ..base.clone()
    }
    .connect()
    .await
    .unwrap();
    grant(&mut BrokerClient::new(ch), ask(&["orders.read"])).await;

    // The broker kept serving through all of it, and nothing was written.
    let mut c = h.broker(As::Workload).await;
    assert_eq!(count_leases(&mut c).await, 1, "only the control call wrote");
    h.stop().await;
}
