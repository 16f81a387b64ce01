//! The policy model: what one accelerated domain's validated policy says.
//! Parsing lives in `parse`, the cross-field checks in `checks`.

use std::collections::BTreeMap;

pub const DEFAULT_FAILOVER_STATUSES: [u16; 4] = [500, 502, 503, 504];
pub const DEFAULT_FAILOVER_METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];
/// Origin timeouts, after the reference CDNs: connect 10 s, response 30 s.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 10_000;
pub const MAX_CONNECT_TIMEOUT_MS: u32 = 60_000;
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u32 = 30_000;
pub const MAX_RESPONSE_TIMEOUT_MS: u32 = 300_000;
pub const DEFAULT_WEIGHT: u32 = 10;
pub const MAX_WEIGHT: u32 = 100;
/// Origins one domain may list: enough for any tiering the seed product offers.
pub const MAX_ORIGINS: usize = 16;
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// An origin's priority: the secondary tier serves only when the primary fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Primary,
    Secondary,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Primary => "primary",
            Tier::Secondary => "secondary",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// JSON pointer of the origin object in its policy (`/primary`, `/origins/2`).
    pub path: String,
    /// Normalised domain or IP literal (IPv6 in brackets).
    pub address: String,
    /// The origin's own port; decides the scheme when the protocol policy is `off`.
    pub port: u16,
    pub tier: Tier,
    /// Share of the tier's requests, relative to the tier's other origins.
    pub weight: u32,
    pub connect_timeout_ms: u32,
    /// From the request sent to the origin's complete response headers.
    pub response_timeout_ms: u32,
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
}

impl FailoverRule {
    pub fn triggers_on(&self, status: u16) -> bool {
        self.statuses.binary_search(&status).is_ok()
    }

    /// `500,502,503,504`: the statuses as Envoy's retry header lists them.
    pub fn status_list(&self) -> String {
        let text: Vec<String> = self.statuses.iter().map(u16::to_string).collect();
        text.join(",")
    }
}

/// A validated policy for one accelerated domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub domain: DomainPattern,
    /// In the order written; `tier` says which are primary.
    pub origins: Vec<Origin>,
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

impl Policy {
    pub fn tier(&self, tier: Tier) -> impl Iterator<Item = &Origin> {
        self.origins.iter().filter(move |o| o.tier == tier)
    }

    /// The first primary origin: the one a single-origin policy names.
    pub fn first_primary(&self) -> Option<&Origin> {
        self.tier(Tier::Primary).next()
    }
}
