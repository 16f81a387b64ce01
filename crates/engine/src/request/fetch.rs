//! Telling an origin's own 5xx from one the proxy made up because the origin
//! never answered (refused connection, failed TLS handshake, timeout).

use crate::envoy::networks::NetworkPolicy;
use crate::request::origin_error::header_text;
#[cfg(test)]
use crate::request::origin_error::MAX_CAUSE_LEN;
use std::fmt;

/// Why the primary fetch produced no origin response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchFailure<'a> {
    /// TCP connect failed; the cause as the proxy words it ("Connection refused").
    Connect(&'a str),
    /// The TLS handshake failed, e.g. `CERTIFICATE_VERIFY_FAILED` when the
    /// certificate does not match the SNI, or `WRONG_VERSION_NUMBER` when the
    /// origin speaks plain HTTP on that port.
    Tls(&'a str),
    /// No response headers within the route timeout.
    Timeout,
    /// The connection was not established within the origin's connect
    /// timeout (Envoy's `connection_timeout` reset reason): nothing was sent.
    ConnectTimeout,
    /// The connection was reset before response headers arrived.
    Reset(&'a str),
    /// Every origin the request could go to is marked down.
    NoHealthyOrigin,
    /// No origin had an address: the name of each was never resolved
    /// (Envoy's `no_healthy_upstream` for a DNS cluster with no host).
    Unresolved,
    /// The origin's name resolved to an address `settings.origin_networks`
    /// refuses: the edge's upstream RBAC stopped the request before it
    /// connected. The text is the RBAC policy that matched.
    AddressNotAllowed(NetworkPolicy),
}

impl<'a> FetchFailure<'a> {
    /// Reads Envoy's `response.code_details`. `None` means the origin answered
    /// (`via_upstream`) or the reply is not about reaching the origin.
    pub fn from_code_details(details: &'a str) -> Option<Self> {
        if let Some(policy) = details.strip_prefix("rbac_access_denied_matched_policy[") {
            let name = policy.strip_suffix(']').unwrap_or(policy);
            return NetworkPolicy::from_name(name).map(FetchFailure::AddressNotAllowed);
        }
        if matches!(
            details,
            "response_timeout" | "upstream_per_try_timeout" | "upstream_per_try_idle_timeout"
        ) {
            return Some(FetchFailure::Timeout);
        }
        if details == "no_healthy_upstream" {
            return Some(FetchFailure::NoHealthyOrigin);
        }
        // A forward-proxy shard says why it chose no host: its origin's name
        // did not resolve (`dns_resolution_failure{cares_norecords:...}`), or
        // it did and the origin is marked down (the resolver's own success).
        if details.starts_with("dns_resolution_failure") {
            return Some(FetchFailure::Unresolved);
        }
        if details.starts_with("cares_success") {
            return Some(FetchFailure::NoHealthyOrigin);
        }
        // e.g. upstream_reset_before_response_started{connection_failure,delayed_connect_error:_Connection_refused}
        let inner = details
            .strip_prefix("upstream_reset_before_response_started{")?
            .strip_suffix('}')
            .unwrap_or_default();
        if let Some(at) = inner.find("TLS_error") {
            // The OpenSSL reason is the upper-case token before TLS_error_end.
            let reason = inner[at..]
                .split(':')
                .rfind(|t| t.len() > 3 && t.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
                .unwrap_or("TLS_error");
            return Some(FetchFailure::Tls(reason));
        }
        if inner
            .split(',')
            .any(|reason| reason == "connection_timeout")
        {
            return Some(FetchFailure::ConnectTimeout);
        }
        let cause = inner.rsplit(":_").next().unwrap_or(inner);
        if inner.starts_with("connection_failure") || inner.starts_with("remote_connection_failure")
        {
            Some(FetchFailure::Connect(cause))
        } else {
            Some(FetchFailure::Reset(cause))
        }
    }

    /// The status the viewer gets: 504 for a timeout, 502 for the rest.
    pub fn status(&self) -> u16 {
        match self {
            FetchFailure::Timeout | FetchFailure::ConnectTimeout => 504,
            _ => 502,
        }
    }
}

impl fmt::Display for FetchFailure<'_> {
    /// Envoy spells causes with `_` for spaces; the header gets words. The
    /// text ends up in a response header, so only printable ASCII passes and
    /// it is cut at `MAX_CAUSE_LEN`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words = |s: &str| header_text(s).replace('_', " ");
        match self {
            FetchFailure::Connect(c) => write!(f, "orig connect failed ({})", words(c)),
            FetchFailure::Tls(r) => write!(f, "orig TLS handshake failed ({})", header_text(r)),
            FetchFailure::Timeout => f.write_str("orig response timeout"),
            FetchFailure::ConnectTimeout => f.write_str("orig connect timeout"),
            FetchFailure::Reset(c) => write!(f, "orig connection reset ({})", words(c)),
            FetchFailure::NoHealthyOrigin => f.write_str("orig marked down, no origin left"),
            FetchFailure::Unresolved => {
                f.write_str("orig dns failed (the origin's name has no address)")
            }
            FetchFailure::AddressNotAllowed(policy) => {
                write!(f, "origin address not allowed ({})", policy.describe())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_header_safe() {
        // Found by fuzzing: control bytes in the details reached the header.
        let details = "upstream_reset_before_response_started{remote_connection_failure|x:_refuse\u{1c}\r\nd}";
        let shown = FetchFailure::from_code_details(details)
            .unwrap()
            .to_string();
        assert_eq!(shown, "orig connect failed (refuse???d)");
        let long = format!(
            "upstream_reset_before_response_started{{connection_failure:_{}}}",
            "x".repeat(1000)
        );
        let shown = FetchFailure::from_code_details(&long).unwrap().to_string();
        assert_eq!(shown.len(), "orig connect failed ()".len() + MAX_CAUSE_LEN);
    }

    #[test]
    fn envoy_code_details_are_classified() {
        let cases = [
            ("via_upstream", None),
            ("cluster_not_found", None),
            ("response_timeout", Some(FetchFailure::Timeout)),
            (
                "upstream_reset_before_response_started{connection_failure,delayed_connect_error:_Connection_refused}",
                Some(FetchFailure::Connect("Connection_refused")),
            ),
            (
                "upstream_reset_before_response_started{connection_failure,TLS_error:_268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end}",
                Some(FetchFailure::Tls("CERTIFICATE_VERIFY_FAILED")),
            ),
            (
                "upstream_reset_before_response_started{connection_timeout}",
                Some(FetchFailure::ConnectTimeout),
            ),
            (
                "upstream_reset_before_response_started{remote_reset}",
                Some(FetchFailure::Reset("remote_reset")),
            ),
            (
                "dns_resolution_failure{cares_norecords:Domain_name_not_found}",
                Some(FetchFailure::Unresolved),
            ),
            (
                "cares_success:Successful_completion",
                Some(FetchFailure::NoHealthyOrigin),
            ),
            (
                "rbac_access_denied_matched_policy[origin-networks-edge]",
                Some(FetchFailure::AddressNotAllowed(NetworkPolicy::Edge)),
            ),
            (
                "rbac_access_denied_matched_policy[origin-networks-special-purpose]",
                Some(FetchFailure::AddressNotAllowed(NetworkPolicy::SpecialPurpose)),
            ),
            // Another RBAC filter's denial is not about the origin's address.
            ("rbac_access_denied_matched_policy[admins-only]", None),
        ];
        for (details, expected) in cases {
            assert_eq!(
                FetchFailure::from_code_details(details),
                expected,
                "{details}"
            );
        }
    }

    #[test]
    fn failures_read_as_words_with_their_status() {
        let refused = FetchFailure::Connect("Connection_refused");
        assert_eq!(
            refused.to_string(),
            "orig connect failed (Connection refused)"
        );
        assert_eq!(refused.status(), 502);
        assert_eq!(FetchFailure::Timeout.status(), 504);
        assert_eq!(
            FetchFailure::Tls("WRONG_VERSION_NUMBER").to_string(),
            "orig TLS handshake failed (WRONG_VERSION_NUMBER)"
        );
    }
}
