//! The decision trail's hash chain, as arithmetic: how a record's body,
//! its sequence number and the previous record's hash make its stored
//! bytes. `audit` chains records this way on a store of its own; a store
//! several brokers share (PostgreSQL) does it at commit, under a lock on its
//! chain head. Both must produce the same bytes, so both call this.

/// Hash that precedes the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lowercase hex SHA-256: how records and checkpoints name each other.
pub fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The stored bytes of a record: exactly `serde_json::to_vec` of the
/// `AuditRecord` with `seq` and `prev`, assembled from its body (the
/// record's JSON without them, `audit::body_json`).
pub fn chained(seq: u64, body: &[u8], prev: &str) -> Vec<u8> {
    let inner = body
        .strip_prefix(b"{")
        .and_then(|b| b.strip_suffix(b"}"))
        .unwrap_or(body);
    let mut out = Vec::with_capacity(inner.len() + prev.len() + 40);
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.push(b',');
    out.extend_from_slice(inner);
    out.extend_from_slice(b",\"prev\":\"");
    // `prev` is lowercase hex (or GENESIS): nothing in it needs escaping.
    out.extend_from_slice(prev.as_bytes());
    out.extend_from_slice(b"\"}");
    out
}
