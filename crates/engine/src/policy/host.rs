//! Host-name normalisation shared by policy compilation and request matching.
//!
//! Both sides go through the same function so that a policy for `Bücher.example`
//! matches a viewer sending `xn--bcher-kva.example.:443`.
//!
//! With the `idna` feature, names go through the URL Standard's host parser
//! (UTS 46). Without it (the filter), only ASCII names are taken: the same
//! parser's ASCII part, with `xn--` labels accepted as written, since punycode
//! cannot be validated without the tables; a non-ASCII name is
//! [`HostError::NotAscii`].

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
    /// A non-ASCII name in a build without IDNA (the filter).
    NotAscii,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Empty => f.write_str("host is empty"),
            HostError::TooLong => write!(f, "host is longer than {MAX_HOST_LEN} bytes"),
            HostError::Conflicting => f.write_str("conflicting Host values"),
            HostError::Invalid(why) => write!(f, "host is not a valid name: {why}"),
            // ASCII only: this text can end up in a response header.
            HostError::NotAscii => f.write_str(
                "host is not ASCII and this build has no IDNA tables: write the name in \
                 punycode (xn--...) or let `origin-policy bundle` convert it",
            ),
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
/// all, no punycode where IDNA can validate it. Most viewer hosts take only
/// this path.
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
                if cfg!(feature = "idna") && bytes[i.saturating_sub(3)..=i] == *b"xn--" {
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
    let ascii = to_ascii(trimmed)?;
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

/// The URL Standard's host parser: IDNs to punycode, `xn--` labels validated.
#[cfg(feature = "idna")]
fn to_ascii(name: &str) -> Result<String, HostError> {
    let parsed = url::Host::parse(name).map_err(|e| HostError::Invalid(e.to_string()))?;
    Ok(match parsed {
        url::Host::Domain(d) => d,
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => format!("[{ip}]"),
    })
}

#[cfg(not(feature = "idna"))]
fn to_ascii(name: &str) -> Result<String, HostError> {
    ascii_host(name)
}

/// The words of `url`'s errors, so that both builds say the same.
#[cfg(any(test, not(feature = "idna")))]
mod url_words {
    pub const IPV6: &str = "invalid IPv6 address";
    pub const IPV4: &str = "invalid IPv4 address";
    pub const DOMAIN: &str = "invalid international domain name";
}

/// `url::Host::parse` for ASCII input without the IDNA tables (the URL
/// Standard's host parser): IPv6 in brackets, the forbidden domain code
/// points refused, lower case, a name ending in a number read as IPv4 (`127.1`,
/// `0x7f.0.0.1`). `xn--` labels are taken as written; non-ASCII is refused.
/// A unit test holds it to `url` on ASCII input.
#[cfg(any(test, not(feature = "idna")))]
fn ascii_host(name: &str) -> Result<String, HostError> {
    if !name.is_ascii() {
        return Err(HostError::NotAscii);
    }
    if let Some(inner) = name.strip_prefix('[') {
        return match inner.strip_suffix(']').map(str::parse::<Ipv6Addr>) {
            Some(Ok(ip)) => Ok(format!("[{ip}]")),
            _ => Err(HostError::Invalid(url_words::IPV6.to_owned())),
        };
    }
    // UTS 46 with the URL Standard's deny list: space and below, DEL, and these.
    let forbidden = |b: u8| b <= b' ' || b == 0x7f || b"%#/:<>?@[\\]^|".contains(&b);
    if name.bytes().any(forbidden) {
        return Err(HostError::Invalid(url_words::DOMAIN.to_owned()));
    }
    let name = name.to_ascii_lowercase();
    if ends_in_a_number(&name) {
        return match parse_ipv4(&name) {
            Some(ip) => Ok(ip.to_string()),
            None => Err(HostError::Invalid(url_words::IPV4.to_owned())),
        };
    }
    Ok(name)
}

/// <https://url.spec.whatwg.org/#ends-in-a-number-checker>
fn ends_in_a_number(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let last = match parts.next() {
        Some("") => parts.next(),
        last => last,
    };
    match last {
        Some(last) if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) => true,
        Some(last) => parse_ipv4_number(last).is_ok(),
        None => false,
    }
}

/// <https://url.spec.whatwg.org/#ipv4-number-parser>: decimal, `0x` hex or
/// `0` octal; `Ok(None)` for a valid number over `u32`.
fn parse_ipv4_number(text: &str) -> Result<Option<u32>, ()> {
    if text.is_empty() {
        return Err(());
    }
    let (digits, radix) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (hex, 16)
        } else if text.len() >= 2 && text.starts_with('0') {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    if digits.is_empty() {
        return Ok(Some(0));
    }
    let valid = match radix {
        8 => digits.bytes().all(|b| (b'0'..=b'7').contains(&b)),
        16 => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        _ => digits.bytes().all(|b| b.is_ascii_digit()),
    };
    if !valid {
        return Err(());
    }
    Ok(u32::from_str_radix(digits, radix).ok())
}

/// <https://url.spec.whatwg.org/#concept-ipv4-parser>
fn parse_ipv4(name: &str) -> Option<Ipv4Addr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut numbers = [0u32; 4];
    let mut count = 0;
    for part in name.split('.') {
        let slot = numbers.get_mut(count)?;
        *slot = parse_ipv4_number(part).ok()??;
        count += 1;
    }
    let (last, leading) = numbers[..count].split_last()?;
    // The last number fills the bytes the others leave: 256^(4 - leading).
    if u64::from(*last) >= 1u64 << (8 * (4 - leading.len())) {
        return None;
    }
    if leading.iter().any(|n| *n > 255) {
        return None;
    }
    let mut ip = *last;
    for (i, n) in leading.iter().enumerate() {
        ip += n << (8 * (3 - i));
    }
    Some(Ipv4Addr::from(ip))
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

/// Why an origin address would not take Envoy to the origin as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// `127.1`, `010.0.0.1`, `0x7f.0.0.1`: an IPv4 address in a form the URL
    /// Standard reads but Envoy does not (it would look it up as a DNS name).
    /// Carries the address it reads as, when it reads as one.
    Ipv4Form(Option<Ipv4Addr>),
    BadIpv6,
    /// A host and a port in one string.
    HasPort,
    /// Not a DNS name: a label empty, too long, or with characters other
    /// than letters, digits, `-` (not at either end) and `_`.
    NotDnsName(String),
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::Ipv4Form(Some(ip)) => write!(
                f,
                "is not a dotted-quad IPv4 address, and Envoy would look it up as a DNS name \
                 that never resolves: write `{ip}`"
            ),
            AddressError::Ipv4Form(None) => f.write_str(
                "ends in a number but is not an IPv4 address: write four decimal numbers \
                 (e.g. `192.0.2.10`) or a DNS name",
            ),
            AddressError::BadIpv6 => f.write_str(
                "is not an IPv6 address: write it with or without brackets (e.g. `[2001:db8::1]`)",
            ),
            AddressError::HasPort => f.write_str("must not carry a port: use `port`"),
            AddressError::NotDnsName(why) => {
                write!(f, "is not a DNS name Envoy can resolve: {why}")
            }
        }
    }
}

/// An origin address as Envoy will use it: a dotted-quad IPv4 address, an
/// IPv6 address in brackets (canonical form), or a lower-case DNS name
/// (IDNs in punycode where the build has IDNA). Anything Envoy would not
/// reach as written is refused, naming the fix.
pub fn origin_address(text: &str) -> Result<String, AddressError> {
    let bracketed = text.starts_with('[') || text.ends_with(']');
    if bracketed || text.contains(':') {
        let bare = text.strip_prefix('[').unwrap_or(text);
        let bare = bare.strip_suffix(']').unwrap_or(bare);
        if let Ok(ip) = bare.parse::<Ipv6Addr>() {
            if bracketed != (text.starts_with('[') && text.ends_with(']')) {
                return Err(AddressError::BadIpv6);
            }
            return Ok(format!("[{ip}]"));
        }
        return Err(if !bracketed && strip_port(text) != text {
            AddressError::HasPort
        } else {
            AddressError::BadIpv6
        });
    }
    let lower = text.to_ascii_lowercase();
    if ends_in_a_number(&lower) {
        return match lower.parse::<Ipv4Addr>() {
            Ok(ip) => Ok(ip.to_string()),
            Err(_) => Err(AddressError::Ipv4Form(parse_ipv4(&lower))),
        };
    }
    let name = normalize_host(text).map_err(|e| AddressError::NotDnsName(e.to_string()))?;
    for label in name.split('.') {
        let ldh = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ldh {
            return Err(AddressError::NotDnsName(format!(
                "label `{label}` has characters other than letters, digits, `-` and `_`"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(AddressError::NotDnsName(format!(
                "label `{label}` starts or ends with `-`"
            )));
        }
    }
    Ok(name.into_owned())
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
    fn origin_addresses_are_what_envoy_reaches_or_refused() {
        let ok = [
            ("127.0.0.1", "127.0.0.1"),
            ("2001:DB8::1", "[2001:db8::1]"),
            ("[2001:db8:0:0::1]", "[2001:db8::1]"),
            ("Origin.Example.NET.", "origin.example.net"),
            ("_acme.example.net", "_acme.example.net"),
            ("localhost", "localhost"),
        ];
        for (text, want) in ok {
            assert_eq!(origin_address(text).as_deref(), Ok(want), "{text}");
        }
        let refused = [
            (
                "127.1",
                AddressError::Ipv4Form(Some(Ipv4Addr::new(127, 0, 0, 1))),
            ),
            (
                "127.000.000.001",
                AddressError::Ipv4Form(Some(Ipv4Addr::new(127, 0, 0, 1))),
            ),
            (
                "0x7f000001",
                AddressError::Ipv4Form(Some(Ipv4Addr::new(127, 0, 0, 1))),
            ),
            ("1.2.3.256", AddressError::Ipv4Form(None)),
            ("[127.0.0.1]", AddressError::BadIpv6),
            ("2001:db8::1]", AddressError::BadIpv6),
            ("origin.example.net:80", AddressError::HasPort),
        ];
        for (text, want) in refused {
            assert_eq!(origin_address(text), Err(want), "{text}");
        }
        for name in [
            "a..b",
            "-a.example",
            "a-.example",
            "a!b.example",
            "a.example/x",
        ] {
            assert!(
                matches!(origin_address(name), Err(AddressError::NotDnsName(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn normalisation_table() {
        let cases: &[(&str, Result<&str, HostError>)] = &[
            ("img.example.com", Ok("img.example.com")),
            ("IMG.Example.COM", Ok("img.example.com")),
            ("img.example.com.", Ok("img.example.com")),
            (
                "Bücher.example",
                if cfg!(feature = "idna") {
                    Ok("xn--bcher-kva.example")
                } else {
                    Err(HostError::NotAscii)
                },
            ),
            ("XN--BCHER-KVA.example.", Ok("xn--bcher-kva.example")),
            (
                "xn--a.example",
                if cfg!(feature = "idna") {
                    Err(HostError::Invalid(
                        "invalid international domain name".to_owned(),
                    ))
                } else {
                    Ok("xn--a.example")
                },
            ),
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
        for other in ["", ".a", "a.", "a..b", "A.b", "a_b"] {
            assert!(!is_plain_ascii_name(other), "{other}");
        }
        // Punycode takes the long way only where IDNA can validate it.
        for puny in ["xn--bcher-kva.example", "a.xn--p1ai"] {
            assert_eq!(is_plain_ascii_name(puny), !cfg!(feature = "idna"), "{puny}");
        }
    }

    #[test]
    fn without_idna_names_must_be_ascii_and_punycode_is_taken_as_written() {
        let cases: &[(&str, Result<&str, HostError>)] = &[
            ("Bücher.example", Err(HostError::NotAscii)),
            ("bücher.example", Err(HostError::NotAscii)),
            ("ｅｘａｍｐｌｅ.com", Err(HostError::NotAscii)),
            ("XN--BCHER-KVA.example", Ok("xn--bcher-kva.example")),
            // Not valid punycode, which only the tables could tell.
            ("xn--a.example", Ok("xn--a.example")),
            ("Img.Example.COM", Ok("img.example.com")),
            ("a_b.example", Ok("a_b.example")),
            ("0x7f.1", Ok("127.0.0.1")),
            ("0177.0.0.1.", Ok("127.0.0.1")),
            (
                "1.2.3.256",
                Err(HostError::Invalid(url_words::IPV4.to_owned())),
            ),
            ("a.0x", Err(HostError::Invalid(url_words::IPV4.to_owned()))),
            ("0x", Ok("0.0.0.0")),
            ("[::FFFF:1.2.3.4]", Ok("[::ffff:1.2.3.4]")),
            ("[::1", Err(HostError::Invalid(url_words::IPV6.to_owned()))),
            ("a b", Err(HostError::Invalid(url_words::DOMAIN.to_owned()))),
            ("a:b", Err(HostError::Invalid(url_words::DOMAIN.to_owned()))),
        ];
        for (input, want) in cases {
            let got = ascii_host(input);
            assert_eq!(got, want.clone().map(str::to_owned), "input {input:?}");
        }
        let message = HostError::NotAscii.to_string();
        assert!(message.is_ascii() && message.contains("punycode"));
        assert!(message.contains("origin-policy bundle"));
    }

    /// The ASCII parser used without IDNA gives `url`'s answer for every
    /// ASCII name, except that it cannot refuse invalid punycode.
    #[cfg(feature = "idna")]
    #[test]
    fn without_idna_ascii_names_normalise_as_url_does() {
        const PIECES: &[&str] = &[
            "a",
            "B",
            "z",
            "0",
            "1",
            "7",
            "8",
            "9",
            "f",
            "G",
            "x",
            "X",
            "0x",
            "0X",
            "00",
            "07",
            "08",
            "09",
            "255",
            "256",
            "65535",
            "16777216",
            "4294967295",
            "4294967296",
            "0x100",
            "0xffffffff",
            "0x100000000",
            ".",
            ".",
            ".",
            "..",
            "-",
            "--",
            "_",
            "xn--",
            "XN--",
            "bcher-kva",
            "p1ai",
            "[",
            "]",
            ":",
            "::",
            "::1",
            "ffff",
            "1.2.3.4",
            "::ffff:",
            " ",
            "\t",
            "\0",
            "\x7f",
            "#",
            "/",
            "?",
            "@",
            "\\",
            "^",
            "|",
            "<",
            ">",
            "*",
            "!",
            "~",
            "'",
            "=",
            "+",
            ",",
            ";",
            "$",
            "&",
            "(",
            ")",
            "{",
            "}",
            "`",
            "\"",
        ];
        let compare = |input: &str| {
            let want = to_ascii(input);
            let got = ascii_host(input);
            let punycode = input.to_ascii_lowercase().contains("xn--");
            if punycode && want.is_err() {
                return;
            }
            assert_eq!(got, want, "input {input:?}");
        };
        // Every string of up to two printable or control ASCII characters.
        for a in 0u8..0x80 {
            compare(&char::from(a).to_string());
            for b in 0u8..0x80 {
                compare(&format!("{}{}", char::from(a), char::from(b)));
            }
        }
        // And many joined pieces, from a fixed-seed generator.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |below: usize| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(seed >> 33).unwrap_or(0) % below
        };
        for _ in 0..200_000 {
            let mut input = String::new();
            for _ in 0..1 + next(8) {
                input.push_str(PIECES[next(PIECES.len())]);
            }
            compare(&input);
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
