//! The policy model: what one accelerated domain's validated policy says.
//! Parsing lives in `parse`, the cross-field checks in `checks`.

use std::collections::BTreeMap;

pub const DEFAULT_FAILOVER_STATUSES: [u16; 4] = [500, 502, 503, 504];
pub const DEFAULT_FAILOVER_METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];
pub const DEFAULT_FAILOVER_TIMEOUT_MS: u32 = 5_000;
pub const MAX_FAILOVER_TIMEOUT_MS: u32 = 300_000;
/// One year: longer TTLs are almost always a typo for a smaller unit.
pub const MAX_CACHE_TTL_SECONDS: u32 = 31_536_000;
pub(crate) const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT",
];

/// How the POP picks the protocol it speaks to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolPolicy {
    /// The origin's port decides: 443 is HTTPS, anything else HTTP.
    Off,
    Http,
    Https,
    /// The viewer's protocol.
    Follow,
}

impl ProtocolPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolPolicy::Off => "off",
            ProtocolPolicy::Http => "http",
            ProtocolPolicy::Https => "https",
            ProtocolPolicy::Follow => "follow",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// The accelerated domain a policy serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    Exact(String),
    /// `*.img.example.com`, stored as `img.example.com`; matches any deeper name.
    Wildcard(String),
}

impl DomainPattern {
    pub fn is_wildcard(&self) -> bool {
        matches!(self, DomainPattern::Wildcard(_))
    }

    pub fn display_name(&self) -> String {
        match self {
            DomainPattern::Exact(name) => name.clone(),
            DomainPattern::Wildcard(suffix) => format!("*.{suffix}"),
        }
    }
}

/// How Envoy reaches an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Named Envoy clusters, one per scheme the policy can use.
    Clusters {
        http: Option<String>,
        https: Option<String>,
    },
    /// The dynamic forward proxy, told the host and port per request.
    DynamicForwardProxy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Normalised domain or IP literal (IPv6 in brackets).
    pub address: String,
    /// The origin's own port; decides the scheme when the protocol policy is `off`.
    pub port: u16,
    pub reach: Reach,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginHost {
    /// The viewer's Host (the accelerated name actually requested).
    AccelerationDomain,
    /// The address of the origin being fetched.
    OriginDomain,
    Custom(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginSni {
    /// The Host sent to origin, without port.
    OriginHost,
    Custom(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRule {
    /// Sorted, so that a status is found by binary search.
    pub statuses: Vec<u16>,
    pub methods: Vec<String>,
    pub timeout_ms: u32,
}

impl FailoverRule {
    pub fn triggers_on(&self, status: u16) -> bool {
        self.statuses.binary_search(&status).is_ok()
    }
}

/// A validated policy for one accelerated domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub domain: DomainPattern,
    pub primary: Origin,
    pub secondary: Option<Origin>,
    pub protocol: ProtocolPolicy,
    pub http_port: u16,
    pub https_port: u16,
    pub origin_host: OriginHost,
    pub origin_sni: OriginSni,
    /// Status -> TTL seconds (0 = never cache); `None` leaves the origin's headers alone.
    pub cache_status_ttl: BTreeMap<u16, Option<u32>>,
    /// Present exactly when there is a secondary origin.
    pub failover: Option<FailoverRule>,
}
