//! Host-name normalisation shared by policy compilation and request matching.
//!
//! Both sides go through the same function so that a policy for `Bücher.example`
//! matches a viewer sending `xn--bcher-kva.example.:443`.

use std::borrow::Cow;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a host could not be normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    Empty,
    TooLong,
    /// More than one Host value: Envoy joins repeated `Host` headers with a
    /// comma before a filter sees them (RFC 9112 3.2 makes that a 400).
    Conflicting,
    Invalid(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Empty => f.write_str("host is empty"),
            HostError::TooLong => write!(f, "host is longer than {MAX_HOST_LEN} bytes"),
            HostError::Conflicting => f.write_str("conflicting Host values"),
            HostError::Invalid(why) => write!(f, "host is not a valid name: {why}"),
        }
    }
}

/// DNS limits a name to 253 bytes; anything longer cannot name a domain.
pub const MAX_HOST_LEN: usize = 253;
pub const MAX_LABEL_LEN: usize = 63;

/// Splits a viewer `Host`/`:authority` into its host part, dropping the port.
/// IPv6 literals keep their brackets (`[::1]:8080` -> `[::1]`).
pub fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => &authority[..=end],
            None => authority,
        };
    }
    match authority.rfind(':') {
        Some(colon) if authority[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            &authority[..colon]
        }
        _ => authority,
    }
}

/// One pass over the bytes: lower-case ASCII labels of 1 to 63 bytes, 253 in
/// all, no punycode (which must be validated). Most viewer hosts take only this path.
fn is_plain_ascii_name(host: &str) -> bool {
    let bytes = host.as_bytes();
    if bytes.len() > MAX_HOST_LEN {
        return false;
    }
    let mut previous = b'.';
    let mut label_len = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' => {}
            b'-' => {
                if bytes[i.saturating_sub(3)..=i] == *b"xn--" {
                    return false;
                }
            }
            b'.' if previous != b'.' => label_len = 0,
            _ => return false,
        }
        if b != b'.' {
            label_len += 1;
            if label_len > MAX_LABEL_LEN {
                return false;
            }
        }
        previous = b;
    }
    previous != b'.'
}

/// DNS limits: 253 bytes in all, 1 to 63 per label (RFC 1035 2.3.4).
fn check_labels(name: &str) -> Result<(), HostError> {
    if name.len() > MAX_HOST_LEN {
        return Err(HostError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostError::Invalid(format!("`{name}` has an empty label")));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostError::Invalid(format!(
                "label `{}...` is longer than {MAX_LABEL_LEN} bytes",
                &label[..16]
            )));
        }
    }
    Ok(())
}

/// Normalises a host name (no port): lower case, no trailing dot, IDN in punycode.
/// The common case (already lower-case ASCII) borrows and does not allocate.
pub fn normalize_host(host: &str) -> Result<Cow<'_, str>, HostError> {
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if host.len() > MAX_HOST_LEN + 1 {
        return Err(HostError::TooLong);
    }
    // The fast path checks the DNS limits itself; anything else goes the long way.
    if is_plain_ascii_name(host) {
        return Ok(Cow::Borrowed(host));
    }
    // URL parsing would decode `%2e` into a dot; a Host header is not a URL,
    // and a name that means something only after decoding is not a name.
    if host.contains('%') {
        return Err(HostError::Invalid(
            "percent-encoding is not allowed in a host".to_owned(),
        ));
    }
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    let parsed = url::Host::parse(trimmed).map_err(|e| HostError::Invalid(e.to_string()))?;
    let ascii = match parsed {
        url::Host::Domain(d) => d,
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => format!("[{ip}]"),
    };
    check_labels(&ascii)?;
    if ascii.contains(|c: char| {
        !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':' | '_'))
    }) {
        return Err(HostError::Invalid(format!(
            "`{ascii}` has characters not allowed in a host name"
        )));
    }
    Ok(Cow::Owned(ascii))
}

/// Normalises a viewer authority: the port is ignored, the host normalised.
pub fn normalize_authority(authority: &str) -> Result<Cow<'_, str>, HostError> {
    // Only a Host already found invalid is searched for the comma.
    normalize_host(strip_port(authority)).map_err(|e| {
        if authority.contains(',') {
            HostError::Conflicting
        } else {
            e
        }
    })
}

/// True when `host` is an IPv4 or (bracketed or bare) IPv6 literal.
pub fn is_ip_literal(host: &str) -> bool {
    // A name whose last character is a letter is never an address; checking
    // that first keeps the parsers off the per-request path.
    let could_be_ip =
        host.starts_with('[') || host.contains(':') || host.ends_with(|c: char| c.is_ascii_digit());
    if !could_be_ip {
        return false;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<Ipv4Addr>().is_ok() || bare.parse::<Ipv6Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        let cases: &[(&str, Result<&str, HostError>)] = &[
            ("img.example.com", Ok("img.example.com")),
            ("IMG.Example.COM", Ok("img.example.com")),
            ("img.example.com.", Ok("img.example.com")),
            ("Bücher.example", Ok("xn--bcher-kva.example")),
            ("xn--bcher-kva.example", Ok("xn--bcher-kva.example")),
            ("127.0.0.1", Ok("127.0.0.1")),
            ("[::1]", Ok("[::1]")),
            ("", Err(HostError::Empty)),
            (".", Err(HostError::Empty)),
        ];
        for (input, want) in cases {
            let got = normalize_host(input).map(|h| h.into_owned());
            assert_eq!(got, want.clone().map(str::to_owned), "input {input:?}");
        }
    }

    #[test]
    fn authority_port_is_ignored() {
        assert_eq!(
            normalize_authority("Img.Example.com:8080").unwrap(),
            "img.example.com"
        );
        assert_eq!(normalize_authority("[::1]:443").unwrap(), "[::1]");
        assert_eq!(
            normalize_authority("a.example.com.:80").unwrap(),
            "a.example.com"
        );
    }

    #[test]
    fn plain_names_take_the_fast_path_only_when_already_normal() {
        for plain in ["a.example.com", "a-b.c0.example", "x"] {
            assert!(is_plain_ascii_name(plain), "{plain}");
        }
        for other in [
            "",
            ".a",
            "a.",
            "a..b",
            "A.b",
            "xn--bcher-kva.example",
            "a.xn--p1ai",
            "a_b",
        ] {
            assert!(!is_plain_ascii_name(other), "{other}");
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(normalize_host("a b.example").is_err());
        assert!(normalize_host("a\r\nb").is_err());
        assert!(normalize_host(&"a".repeat(300)).is_err());
        assert!(normalize_host("img%2eexample.com").is_err());
        // Found by fuzzing: ".." used to normalise to ".", which is no name.
        for empty_label in ["..", "a..b.", ".a", "..a.example"] {
            assert!(normalize_host(empty_label).is_err(), "{empty_label}");
        }
        assert_eq!(normalize_host(&"a".repeat(254)), Err(HostError::TooLong));
        let label = "a".repeat(64);
        assert!(normalize_host(&format!("{label}.example")).is_err());
        assert!(normalize_host(&format!("{}.example", &label[1..])).is_ok());
        assert!(normalize_host("a\0b").is_err());
    }

    #[test]
    fn ip_literals() {
        assert!(is_ip_literal("10.0.0.1"));
        assert!(is_ip_literal("[2001:db8::1]"));
        assert!(is_ip_literal("2001:db8::1"));
        assert!(!is_ip_literal("origin.example.net"));
        assert!(!is_ip_literal("host1.example.42"));
        assert!(is_ip_literal("::1"));
    }
}
