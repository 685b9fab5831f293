//! `vocab`: the typed vocabularies of the trail and the webhooks — audit
//! actions, outcomes and request event kinds. Each value has one stored
//! (wire) string; the strings never change, values are only added. Depends on
//! nothing in the crate.

macro_rules! vocabulary {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &[Self] = &[$(Self::$variant,)+];

            /// The stored (wire) form.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary! {
    /// What an audit record says happened. The stored form (`as_str`) is
    /// the trail's wire format: never change a string, only add variants.
    Action {
        /// An auto-tier token was granted.
        TokenGranted = "token.granted",
        /// A break-glass token was granted (review pending).
        TokenBreakGlass = "token.break_glass",
        /// Policy refused a token request.
        TokenRefused = "token.refused",
        /// A token was exchanged for a delegated child (RFC 8693).
        TokenExchanged = "token.exchanged",
        /// Policy refused a token exchange.
        ExchangeRefused = "token.exchange_refused",
        /// A request was parked for approval.
        RequestParked = "request.parked",
        /// One approval was recorded; more are needed.
        RequestApproval = "request.approval",
        /// The last needed approval was recorded.
        RequestApproved = "request.approved",
        /// An approver denied a request.
        RequestDenied = "request.denied",
        /// A decision on a request (approve, deny, review) was refused: the
        /// requester deciding their own, someone in its delegation chain, or
        /// someone who may not decide it.
        DecisionRefused = "request.decision_refused",
        /// The requester withdrew a request.
        RequestWithdrawn = "request.withdrawn",
        /// A request's pending or claim window passed.
        RequestExpired = "request.expired",
        /// An approved request's token was delivered.
        RequestIssued = "request.issued",
        /// A lease was renewed.
        LeaseRenewed = "lease.renewed",
        /// A lease was revoked.
        LeaseRevoked = "lease.revoked",
        /// Every active lease of a subject was revoked.
        LeaseBulkRevoked = "lease.bulk_revoked",
        /// A lease reached its expiry.
        LeaseExpired = "lease.expired",
        /// A break-glass grant was reviewed and kept.
        BreakGlassAcknowledged = "breakglass.acknowledged",
        /// A break-glass grant was reviewed and its lease revoked.
        BreakGlassRevoked = "breakglass.revoked",
        /// A signing key was created.
        KeyCreated = "key.created",
        /// A signing key started signing.
        KeyActivated = "key.activated",
        /// A signing key stopped signing (still published).
        KeyRetired = "key.retired",
        /// A retired key was unpublished.
        KeyRemoved = "key.removed",
        /// An admin brought the next rotation forward.
        KeyRotationRequested = "key.rotation_requested",
        /// An admin withdrew the active key at once.
        KeyEmergencyRotated = "key.emergency_rotated",
        /// Old audit records were compacted up to a checkpoint.
        AuditCompacted = "audit.compacted",
        /// Ended leases and requests were deleted by retention.
        RetentionPurged = "retention.purged",
        /// A caller failed authentication.
        AuthFailed = "auth.failed",
        /// A policy was loaded (start or reload).
        PolicyLoaded = "policy.loaded",
        /// A new policy file was rejected; the old one stays.
        PolicyRejected = "policy.rejected",
        /// Every console session of a person was ended (removed from the
        /// policy, or by an admin).
        ConsoleSessionsEnded = "console.sessions_ended",
        /// A database login was made for a lease (issue 23).
        DbLoginCreated = "db.login.created",
        /// A lease's database login can no longer sign in, and its open
        /// sessions were ended.
        DbLoginDisabled = "db.login.disabled",
        /// A lease's database login was dropped (or kept without rights).
        DbLoginDropped = "db.login.dropped",
        /// A database's admin password is being rotated: the new one is
        /// sealed in the store, not yet set on the database.
        DbRootRotating = "db.root.rotating",
        /// A database's admin password was rotated: set on the database,
        /// and the new one is the one in force.
        DbRootRotated = "db.root.rotated",
        /// A workload signed in with its platform's token (issue 24):
        /// issuer, `sub`, `jti`, the identity it maps to and the claims'
        /// digest. Written with the grant or park it led to.
        FederationSignedIn = "federation.signed_in",
        /// A platform token whose signature verified was refused: the
        /// check that failed (audience, age, bound claim, mapping, replay)
        /// and the claims' digest, never the token.
        FederationRefused = "federation.refused",
    }
}

vocabulary! {
    /// How an audited action ended.
    Outcome {
        /// It happened.
        Ok = "ok",
        /// It was refused (policy, authentication).
        Refused = "refused",
    }
}

vocabulary! {
    /// What happened to a request, as webhooks name it (`events` in the
    /// policy's `[[webhook]]`). The strings are the webhook wire format.
    EventKind {
        /// Parked for approval.
        Parked = "parked",
        /// Fully approved; open for the requester to claim.
        Approved = "approved",
        /// Denied by an approver.
        Denied = "denied",
        /// The pending or claim window passed.
        Expired = "expired",
        /// Withdrawn by the requester.
        Withdrawn = "withdrawn",
        /// The approved token was delivered.
        Issued = "issued",
        /// Granted through break-glass; review pending.
        BreakGlass = "break_glass",
        /// A break-glass grant was reviewed.
        Acknowledged = "acknowledged",
    }
}

impl EventKind {
    /// The kind named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.as_str() == s)
    }

    /// How a chat message phrases it.
    pub fn phrase(self) -> &'static str {
        match self {
            Self::Parked => "needs approval",
            Self::Approved => "was approved",
            Self::Denied => "was denied",
            Self::Expired => "expired",
            Self::Withdrawn => "was withdrawn",
            Self::Issued => "was issued",
            Self::BreakGlass => "was taken through BREAK-GLASS and needs review",
            Self::Acknowledged => "break-glass use was acknowledged",
        }
    }
}
