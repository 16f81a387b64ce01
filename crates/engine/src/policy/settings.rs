//! Edge-wide settings that travel with the policies in the plugin configuration.

use crate::policy::diagnostic::PolicyDiagnostic;
use crate::policy::host::is_ip_literal;
use crate::policy::networks::{parse_origin_networks, OriginNetworks};
use crate::policy::reader::{header_safe, host_name, integer_in, string, FieldReader, Findings};
use serde_json::Value;
use std::collections::BTreeMap;

pub const DEFAULT_CLUSTER_HEADER: &str = "x-origin-cluster";
/// Envoy's default per-connection buffer limit: a retry needs the whole body
/// buffered, so a larger body cannot be failed over.
pub const DEFAULT_MAX_REPLAY_BODY_BYTES: u32 = 1024 * 1024;
pub const MAX_REPLAY_BODY_BYTES: u32 = 64 * 1024 * 1024;
/// The system's CA bundle (Debian, Ubuntu, Alpine).
pub const DEFAULT_ORIGIN_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub const DEFAULT_SHARDS: u16 = 64;
pub const MAX_SHARDS: u16 = 1024;

/// The `direct_origins` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectOrigins {
    pub shards: u16,
}

/// When an origin is marked down and for how long: Envoy's outlier detection
/// on every derived origin cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginHealth {
    /// Consecutive failures (5xx, refused or timed-out connections) that mark
    /// an origin down; the seed CDN's 3 failed probes.
    pub consecutive_failures: u32,
    /// The first cool-down; each further one is this times the number of times
    /// the origin was marked down, up to `max_cooldown_ms`.
    pub cooldown_ms: u32,
    pub max_cooldown_ms: u32,
}

impl Default for OriginHealth {
    fn default() -> Self {
        OriginHealth {
            consecutive_failures: 3,
            cooldown_ms: 10_000,
            max_cooldown_ms: 300_000,
        }
    }
}

/// What the filter does with a Host that no policy covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownDomain {
    /// Leave the request untouched; the route decides.
    PassThrough,
    /// Answer locally, without contacting any origin.
    LocalReply { status: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Request header the route's `cluster_header` reads.
    pub cluster_header: String,
    pub unknown_domain: UnknownDomain,
    /// Take the viewer scheme from `x-forwarded-proto` before `:scheme`; only safe
    /// behind a TLS-terminating proxy that sets (and overwrites) that header.
    pub trust_x_forwarded_proto: bool,
    /// Add `x-origin-decision` to responses, naming origin, scheme, port, Host and SNI.
    pub decision_header: bool,
    /// Largest request body failed over; must not exceed Envoy's buffer limit.
    pub max_replay_body_bytes: u32,
    /// CA bundle the derived clusters check origin certificates against.
    pub origin_ca_file: String,
    /// Fixed addresses for origin names, like `curl --resolve`: a lab or a
    /// private network without DNS for its origins.
    pub resolve: BTreeMap<String, String>,
    /// DNS servers (`ip:port`) the origins named by DNS are looked up with;
    /// empty: the system's (`/etc/resolv.conf`).
    pub dns_resolvers: Vec<std::net::SocketAddr>,
    pub origin_health: OriginHealth,
    /// Origins of requests without a failover chain go through a few
    /// forward-proxy clusters instead of one cluster each (`None`: one each).
    pub direct_origins: Option<DirectOrigins>,
    /// The networks origins may be in: the edge's, never a policy's.
    pub origin_networks: OriginNetworks,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_header: DEFAULT_CLUSTER_HEADER.to_owned(),
            unknown_domain: UnknownDomain::PassThrough,
            trust_x_forwarded_proto: false,
            decision_header: false,
            max_replay_body_bytes: DEFAULT_MAX_REPLAY_BODY_BYTES,
            origin_ca_file: DEFAULT_ORIGIN_CA_FILE.to_owned(),
            resolve: BTreeMap::new(),
            dns_resolvers: Vec::new(),
            origin_health: OriginHealth::default(),
            direct_origins: None,
            origin_networks: OriginNetworks::default(),
        }
    }
}

fn boolean(f: &mut Findings, value: &Value, path: &str) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        _ => {
            f.error(path, "expected true or false");
            None
        }
    }
}

/// Parses the `settings` object; absent fields take their defaults.
pub fn parse_settings(
    source: &str,
    value: Option<&Value>,
) -> Result<Settings, Vec<PolicyDiagnostic>> {
    let mut settings = Settings::default();
    let Some(value) = value else {
        return Ok(settings);
    };
    let mut f = Findings::new(source);
    if let Some(mut r) = FieldReader::open(&mut f, value, "/settings") {
        if let Some((v, p)) = r.field("cluster_header") {
            match v.as_str() {
                Some(h)
                    if header_safe(&mut f, h, &p, "cluster header")
                        && h.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
                {
                    settings.cluster_header = h.to_owned();
                }
                Some(h) if !h.is_empty() => f.error(
                    &p,
                    format!(
                        "cluster header `{}` must be a lower-case header name",
                        crate::policy::reader::escaped(h)
                    ),
                ),
                Some(_) => {}
                None => f.error(&p, "expected a header name"),
            }
        }
        if let Some((v, p)) = r.field("unknown_domain") {
            if let Some(mut u) = FieldReader::open(&mut f, v, &p) {
                let action = u.field("action");
                let status = u.field("status");
                match action.as_ref().map(|(v, p)| (v.as_str(), p)) {
                    Some((Some("pass_through"), _)) => {
                        if let Some((_, sp)) = &status {
                            f.error(sp, "`status` only applies to the `local_reply` action");
                        }
                        settings.unknown_domain = UnknownDomain::PassThrough;
                    }
                    Some((Some("local_reply"), _)) => {
                        let code = match &status {
                            Some((v, sp)) => integer_in(&mut f, v, sp, 200, 599, "status"),
                            None => Some(404),
                        };
                        settings.unknown_domain = UnknownDomain::LocalReply {
                            status: code.and_then(|c| u16::try_from(c).ok()).unwrap_or(404),
                        };
                    }
                    Some((_, ap)) => {
                        let ap = ap.clone();
                        f.error(&ap, "expected `pass_through` or `local_reply`");
                    }
                    None => f.error(
                        &p,
                        "missing field `action` (`pass_through` or `local_reply`)",
                    ),
                }
                u.finish(&mut f);
            }
        }
        if let Some((v, p)) = r.field("trust_x_forwarded_proto") {
            settings.trust_x_forwarded_proto = boolean(&mut f, v, &p).unwrap_or(false);
        }
        if let Some((v, p)) = r.field("decision_header") {
            settings.decision_header = boolean(&mut f, v, &p).unwrap_or(false);
        }
        if let Some((v, p)) = r.field("max_replay_body_bytes") {
            if let Some(n) = integer_in(
                &mut f,
                v,
                &p,
                0,
                u64::from(MAX_REPLAY_BODY_BYTES),
                "max_replay_body_bytes",
            ) {
                settings.max_replay_body_bytes =
                    u32::try_from(n).unwrap_or(DEFAULT_MAX_REPLAY_BODY_BYTES);
            }
        }
        if let Some((v, p)) = r.field("origin_ca_file") {
            match string(&mut f, v, &p) {
                Some(path) if !path.is_empty() => settings.origin_ca_file = path.to_owned(),
                Some(_) => f.error(&p, "expected the path of a PEM CA bundle"),
                None => {}
            }
        }
        if let Some((v, p)) = r.field("resolve") {
            settings.resolve = resolve(&mut f, v, &p);
        }
        if let Some((v, p)) = r.field("dns_resolvers") {
            settings.dns_resolvers = dns_resolvers(&mut f, v, &p);
        }
        if let Some((v, p)) = r.field("origin_health") {
            settings.origin_health = origin_health(&mut f, v, &p);
        }
        if let Some((v, p)) = r.field("direct_origins") {
            settings.direct_origins = direct_origins(&mut f, v, &p);
        }
        if let Some((v, p)) = r.field("origin_networks") {
            settings.origin_networks = parse_origin_networks(&mut f, v, &p);
        }
        // A fixed address is held to the networks as a policy's own is.
        for (name, ip) in &settings.resolve {
            let refused = ip
                .parse()
                .is_ok_and(|ip| !settings.origin_networks.allows_some_port(ip));
            if refused {
                f.error_with_fix(
                    &format!("/settings/resolve/{}", crate::policy::diagnostic::pointer_segment(name)),
                    format!("`{name}` resolves to {ip}, which `origin_networks` refuses on every port"),
                    "list the network (and the origin's ports) in `origin_networks.allow`, or remove the name",
                );
            }
        }
        for gone in ["dynamic_forward_proxy", "max_secondary_response_bytes"] {
            if let Some((_, p)) = r.field(gone) {
                f.error(
                    &p,
                    format!("`{gone}` is no longer read: origins are reached through clusters derived from the policies, and failover streams"),
                );
            }
        }
        r.finish(&mut f);
    }
    let list = f.into_list();
    if list.is_empty() {
        Ok(settings)
    } else {
        Err(list)
    }
}

fn resolve(f: &mut Findings, value: &Value, path: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Value::Object(map) = value else {
        f.error(path, "expected an object of origin name -> IP address");
        return out;
    };
    for (name, ip) in map {
        let p = format!(
            "{path}/{}",
            crate::policy::diagnostic::pointer_segment(name)
        );
        let Some(name) = host_name(f, name, &p, "origin name") else {
            continue;
        };
        match ip.as_str() {
            Some(ip) if is_ip_literal(ip) => {
                out.insert(
                    name,
                    ip.trim_start_matches('[').trim_end_matches(']').to_owned(),
                );
            }
            _ => f.error(&p, "expected an IP address"),
        }
    }
    out
}

fn dns_resolvers(f: &mut Findings, value: &Value, path: &str) -> Vec<std::net::SocketAddr> {
    let Value::Array(list) = value else {
        f.error(path, "expected a list of DNS servers as `ip:port`");
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let p = format!("{path}/{i}");
        match item.as_str().map(str::parse::<std::net::SocketAddr>) {
            Some(Ok(addr)) => out.push(addr),
            _ => f.error(
                &p,
                "expected a DNS server as `ip:port` (e.g. `192.0.2.53:53`, `[2001:db8::53]:53`)",
            ),
        }
    }
    out
}

fn origin_health(f: &mut Findings, value: &Value, path: &str) -> OriginHealth {
    let mut health = OriginHealth::default();
    let Some(mut r) = FieldReader::open(f, value, path) else {
        return health;
    };
    let mut read = |r: &mut FieldReader, key: &'static str, low: u32, high: u32, slot: &mut u32| {
        if let Some((v, p)) = r.field(key) {
            if let Some(n) = integer_in(f, v, &p, u64::from(low), u64::from(high), key) {
                *slot = u32::try_from(n).unwrap_or(*slot);
            }
        }
    };
    read(
        &mut r,
        "consecutive_failures",
        1,
        100,
        &mut health.consecutive_failures,
    );
    read(
        &mut r,
        "cooldown_ms",
        1_000,
        3_600_000,
        &mut health.cooldown_ms,
    );
    read(
        &mut r,
        "max_cooldown_ms",
        1_000,
        86_400_000,
        &mut health.max_cooldown_ms,
    );
    r.finish(f);
    if health.max_cooldown_ms < health.cooldown_ms {
        f.error(
            &format!("{path}/max_cooldown_ms"),
            "must be at least `cooldown_ms`",
        );
    }
    health
}

/// `{"shards": N}`; `{}` takes the default number of shards.
fn direct_origins(f: &mut Findings, value: &Value, path: &str) -> Option<DirectOrigins> {
    let mut r = FieldReader::open(f, value, path)?;
    let mut direct = DirectOrigins {
        shards: DEFAULT_SHARDS,
    };
    if let Some((v, p)) = r.field("shards") {
        if let Some(n) = integer_in(f, v, &p, 1, u64::from(MAX_SHARDS), "shards") {
            direct.shards = u16::try_from(n).unwrap_or(DEFAULT_SHARDS);
        }
    }
    r.finish(f);
    Some(direct)
}
