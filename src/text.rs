//! `text`: the limits and checks on text that arrives from outside (request
//! fields, ids, reasons, policy values). Every module that accepts such text
//! uses these, so a limit is stated once. It depends on nothing in the crate.

use ring::rand::{SecureRandom, SystemRandom};

/// Most scopes in one request.
pub const MAX_SCOPES: usize = 64;
/// Longest scope name.
pub const MAX_SCOPE_LEN: usize = 128;
/// Longest justification or reason.
pub const MAX_REASON: usize = 4096;
/// Longest audience.
pub const MAX_AUDIENCE: usize = 256;
/// Longest client request id.
pub const MAX_CLIENT_REQUEST_ID: usize = 128;
/// Longest object id (lease, request, page token).
pub const MAX_ID: usize = 128;

/// Page sizes of the listing calls: the default when the caller asks for 0,
/// and the largest a caller may ask for.
#[derive(Clone, Copy, Debug)]
pub struct PageLimit {
    /// Used when `page_size` is 0.
    pub default: usize,
    /// Largest accepted `page_size`.
    pub max: usize,
}

/// `ListLeases`.
pub const LEASE_PAGE: PageLimit = PageLimit {
    default: 100,
    max: 1000,
};
/// `ListPending` and `ListMyRequests`.
pub const REQUEST_PAGE: PageLimit = PageLimit {
    default: 50,
    max: 500,
};
/// `Audit.Export` (records are small; exports are bulk reads).
pub const AUDIT_PAGE: PageLimit = PageLimit {
    default: 500,
    max: 5000,
};

/// A field of a request that is malformed or out of bounds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct FieldError {
    /// Field name as in the proto.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl FieldError {
    /// `field` is wrong for `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Is `s` 1..=max printable ASCII characters (spaces allowed inside)?
pub fn valid_token_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Is `s` a valid scope name (1–128 printable ASCII, no spaces)?
pub fn valid_scope_name(s: &str) -> bool {
    valid_token_text(s, MAX_SCOPE_LEN) && !s.contains(' ')
}

/// A lease, request or page id: 1..=128 of `[A-Za-z0-9_-]`.
pub fn require_id(field: &'static str, id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return Err(FieldError::new(field, "required"));
    }
    if id.len() > MAX_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(FieldError::new(field, "not a valid id"));
    }
    Ok(())
}

/// Characters that change how text is displayed rather than what it says:
/// C0 controls (newline and carriage return included), DEL, C1 controls,
/// the Unicode bidirectional controls that reorder what a reader sees, and
/// invisible characters that hide text from a reader or split a word a
/// filter looks for: soft hyphen, zero-width space, word joiner, invisible
/// operators, deprecated format controls, the byte-order mark, fillers
/// that render as blanks, variation selectors of the supplementary planes,
/// shorthand and musical format controls, and tag characters (which also
/// spell subdivision flags: refused, since they can carry hidden text).
/// Zero-width joiners and non-joiners, and the variation selectors of the
/// basic plane, stay: scripts and emoji need them.
pub fn is_display_control(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
                | '\u{2028}' | '\u{2029}'
                | '\u{00ad}' | '\u{034f}' | '\u{115f}' | '\u{1160}' | '\u{180e}'
                | '\u{200b}' | '\u{2060}'..='\u{2064}' | '\u{206a}'..='\u{206f}' | '\u{3164}'
                | '\u{feff}' | '\u{ffa0}' | '\u{fff9}'..='\u{fffb}'
                | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e007f}' | '\u{e0100}'..='\u{e01ef}'
        )
}

/// `text` with every display control written as an escape (`\u{1b}`), for
/// terminals, text exports and chat messages. Everything else is kept.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_display_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_display_control(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Free text (justification, reason): at most [`MAX_REASON`] bytes and no
/// display controls (so a requester cannot rewrite what an approver's
/// terminal or a text export shows); non-blank when `required`.
pub fn check_reason(field: &'static str, text: &str, required: bool) -> Result<(), FieldError> {
    if required && text.trim().is_empty() {
        return Err(FieldError::new(field, "required"));
    }
    if text.len() > MAX_REASON {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_REASON} bytes of text"),
        ));
    }
    if let Some((at, c)) = text.char_indices().find(|(_, c)| is_display_control(*c)) {
        return Err(FieldError::new(
            field,
            format!(
                "control characters and invisible characters are not allowed (U+{:04X} at byte {at}); use plain text on one line",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// An optional audience: empty, or 1..=256 printable ASCII.
pub fn check_audience(audience: &str) -> Result<(), FieldError> {
    if !audience.is_empty() && !valid_token_text(audience, MAX_AUDIENCE) {
        return Err(FieldError::new(
            "audience",
            format!("1-{MAX_AUDIENCE} printable ASCII characters"),
        ));
    }
    Ok(())
}

/// An optional idempotency key: empty, or 1..=128 printable ASCII, no spaces.
pub fn check_client_request_id(key: &str) -> Result<(), FieldError> {
    if !key.is_empty() && (!valid_token_text(key, MAX_CLIENT_REQUEST_ID) || key.contains(' ')) {
        return Err(FieldError::new(
            "client_request_id",
            format!("1-{MAX_CLIENT_REQUEST_ID} printable ASCII characters without spaces"),
        ));
    }
    Ok(())
}

/// Check and normalise a scope list: 1..=64 valid names, sorted, unique.
pub fn check_scopes(scopes: &[String]) -> Result<Vec<String>, FieldError> {
    if scopes.is_empty() {
        return Err(FieldError::new("scopes", "at least one scope is required"));
    }
    if scopes.len() > MAX_SCOPES {
        return Err(FieldError::new(
            "scopes",
            format!(
                "at most {MAX_SCOPES} scopes per request, got {}",
                scopes.len()
            ),
        ));
    }
    if let Some(bad) = scopes.iter().find(|s| !valid_scope_name(s)) {
        let shown: String = bad.escape_debug().take(64).collect();
        return Err(FieldError::new(
            "scopes",
            format!("`{shown}` must be 1-128 printable ASCII characters without spaces"),
        ));
    }
    let mut v = scopes.to_vec();
    v.sort();
    v.dedup();
    Ok(v)
}

/// The page size to use for `asked` (0: the default), or an error above the
/// maximum.
pub fn page_size(asked: usize, limit: PageLimit) -> Result<usize, FieldError> {
    match asked {
        0 => Ok(limit.default),
        n if n > limit.max => Err(FieldError::new(
            "page_size",
            format!("at most {}", limit.max),
        )),
        n => Ok(n),
    }
}

/// The operating system could not supply randomness.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("no system randomness")]
pub struct NoRandomness;

/// A sortable random id: 48-bit millisecond time ‖ 80 random bits, hex.
pub fn new_id(prefix: &str, now_ms: u64) -> Result<String, NoRandomness> {
    let mut rnd = [0u8; 10];
    SystemRandom::new()
        .fill(&mut rnd)
        .map_err(|_| NoRandomness)?;
    let mut s = format!("{prefix}{:012x}", now_ms & 0xffff_ffff_ffff);
    for b in rnd {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(s)
}

/// Do two secrets match? Compares their SHA-256 digests without an early
/// exit, so the time taken says nothing about the secrets.
pub fn same_secret(a: &str, b: &str) -> bool {
    let x = ring::digest::digest(&ring::digest::SHA256, a.as_bytes());
    let y = ring::digest::digest(&ring::digest::SHA256, b.as_bytes());
    x.as_ref()
        .iter()
        .zip(y.as_ref())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_scopes_and_pages() {
        assert!(require_id("lease_id", "l_01-ab").is_ok());
        assert_eq!(
            require_id("lease_id", "").unwrap_err(),
            FieldError::new("lease_id", "required")
        );
        assert!(require_id("lease_id", "a b").is_err());
        assert!(require_id("lease_id", &"a".repeat(129)).is_err());
        assert_eq!(
            check_scopes(&["b".into(), "a".into(), "b".into()]).unwrap(),
            ["a", "b"]
        );
        assert_eq!(check_scopes(&[]).unwrap_err().field, "scopes");
        assert!(check_scopes(&["a b".into()]).is_err());
        assert_eq!(page_size(0, LEASE_PAGE).unwrap(), 100);
        assert_eq!(page_size(7, LEASE_PAGE).unwrap(), 7);
        assert_eq!(page_size(1001, LEASE_PAGE).unwrap_err().field, "page_size");
        assert!(check_reason("reason", " ", true).is_err());
        assert!(check_reason("reason", "a\0", false).is_err());
        for bad in [
            "a\nb",
            "a\rb",
            "\u{1b}[2J",
            "a\u{7f}",
            "a\u{85}",
            "x\u{202e}y",
            "t\u{2066}",
            "ap\u{200b}prove",
            "soft\u{ad}hyphen",
            "\u{feff}bom",
            "tag\u{e0041}",
            "filler\u{3164}",
            "vs\u{e0100}",
        ] {
            let e = check_reason("justification", bad, false).unwrap_err();
            assert_eq!(e.field, "justification");
            assert!(e.reason.contains("control characters"), "{e}");
        }
        assert!(check_reason("reason", "ticket OPS-12 — ok ✓", false).is_ok());
        assert!(
            check_reason("reason", "family 👨\u{200d}👩\u{200d}👧", false).is_ok(),
            "zero-width joiners in emoji stay"
        );
        assert_eq!(escape_controls("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
        assert_eq!(escape_controls("plain"), "plain");
        assert!(check_client_request_id("a b").is_err());
        assert!(check_audience("").is_ok());
        let a = new_id("l_", 1).unwrap();
        assert!(a.starts_with("l_000000000001") && a.len() == 2 + 12 + 20);
    }
}
