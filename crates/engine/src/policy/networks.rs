//! Which networks an origin may be in. A policy is a tenant's; the networks
//! are the edge's (`settings.origin_networks`), so that no policy can make the
//! edge fetch from itself, its hosts' private networks or a metadata service.
//!
//! An address is refused when it, or an IPv4 address it carries
//! (`::ffff:127.0.0.1`, NAT64, 6to4, Teredo), is: one of the edge's own
//! sockets (`edge`, whatever else is listed), in a `deny` entry, or in a
//! special-purpose network ([`SPECIAL_PURPOSE`]) that no `allow` entry covers.

use crate::policy::reader::{kind, port, FieldReader, Findings};
use serde_json::Value;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 network. The families never match each other: an IPv4
/// address written inside IPv6 is checked as the IPv6 address it is and
/// again as the IPv4 address it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpNetwork {
    V4 { base: u32, prefix: u8 },
    V6 { base: u128, prefix: u8 },
}

pub(crate) const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> IpNetwork {
    IpNetwork::V4 {
        base: u32::from_be_bytes([a, b, c, d]),
        prefix,
    }
}

const fn v6(segments: [u16; 8], prefix: u8) -> IpNetwork {
    let [a, b, c, d, e, f, g, h] = segments;
    IpNetwork::V6 {
        base: Ipv6Addr::new(a, b, c, d, e, f, g, h).to_bits(),
        prefix,
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl IpNetwork {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (one host).
    pub fn parse(text: &str) -> Result<IpNetwork, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("prefix length `{p}` is not 0-{max}"))?,
        };
        let network = match addr {
            IpAddr::V4(ip) => IpNetwork::V4 {
                base: ip.to_bits() & mask32(prefix),
                prefix,
            },
            IpAddr::V6(ip) => IpNetwork::V6 {
                base: ip.to_bits() & mask128(prefix),
                prefix,
            },
        };
        if network.base_address() != addr {
            return Err(format!(
                "`{text}` has host bits set: the network is `{network}`"
            ));
        }
        Ok(network)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (IpNetwork::V4 { base, prefix }, IpAddr::V4(ip)) => {
                ip.to_bits() & mask32(*prefix) == *base
            }
            (IpNetwork::V6 { base, prefix }, IpAddr::V6(ip)) => {
                ip.to_bits() & mask128(*prefix) == *base
            }
            _ => false,
        }
    }

    pub(crate) fn base_address(&self) -> IpAddr {
        match self {
            IpNetwork::V4 { base, .. } => IpAddr::V4(Ipv4Addr::from_bits(*base)),
            IpNetwork::V6 { base, .. } => IpAddr::V6(Ipv6Addr::from_bits(*base)),
        }
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self {
            IpNetwork::V4 { prefix, .. } | IpNetwork::V6 { prefix, .. } => prefix,
        };
        write!(f, "{}/{prefix}", self.base_address())
    }
}

/// The networks no origin is in unless an `allow` entry says so, most
/// specific first (the first that matches names the refusal): IANA's
/// special-purpose registries, less what the public internet routes.
pub const SPECIAL_PURPOSE: &[(IpNetwork, &str)] = &[
    (v4(0, 0, 0, 0, 8), "\"this network\", unspecified"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "shared address space"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (
        v4(169, 254, 0, 0, 16),
        "link-local, cloud metadata services",
    ),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96), "IPv4-mapped"),
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "IPv4-compatible"),
    (v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), "NAT64"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), "Teredo"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        "IETF protocol assignments",
    ),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), "6to4"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), "segment routing"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local"),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// The IPv4 addresses an IPv6 address carries, each of which reaches (or
/// is translated to) that IPv4 host.
fn embedded_ipv4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let bits = ip.to_bits();
    let low = Ipv4Addr::from_bits(bits as u32);
    let mut out = Vec::new();
    let in_net = |net: IpNetwork| net.contains(IpAddr::V6(ip));
    if in_net(v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96))
        || in_net(v6([0, 0, 0, 0, 0, 0, 0, 0], 96))
        || in_net(v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96))
        || in_net(v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48))
    {
        out.push(low);
    }
    if in_net(v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16)) {
        out.push(Ipv4Addr::from_bits((bits >> 80) as u32));
    }
    if in_net(v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32)) {
        // Teredo: the server, then the client (stored inverted).
        out.push(Ipv4Addr::from_bits((bits >> 64) as u32));
        out.push(Ipv4Addr::from_bits(!(bits as u32)));
    }
    out
}

/// Ports as written: inclusive ranges; none means every port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRule {
    pub network: IpNetwork,
    pub ports: Vec<(u16, u16)>,
}

impl NetworkRule {
    fn matches(&self, ip: IpAddr, port: u16) -> bool {
        self.network.contains(ip)
            && (self.ports.is_empty() || self.ports.iter().any(|(a, b)| (*a..=*b).contains(&port)))
    }
}

impl fmt::Display for NetworkRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.network)?;
        for (i, (a, b)) in self.ports.iter().enumerate() {
            f.write_str(if i == 0 { " port " } else { "," })?;
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

/// `settings.origin_networks`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginNetworks {
    /// Special-purpose networks (and ports) origins may be in all the same.
    pub allow: Vec<NetworkRule>,
    /// Networks no origin may be in, besides the special-purpose ones.
    pub deny: Vec<NetworkRule>,
    /// The edge's own sockets (admin, listeners, the policy source): never
    /// an origin, whatever `allow` says.
    pub edge: Vec<NetworkRule>,
}

/// Why an origin address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRefusal {
    /// The address checked: the origin's, or the IPv4 address it carries.
    pub address: IpAddr,
    pub reason: RefusalReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalReason {
    Edge(NetworkRule),
    Denied(NetworkRule),
    SpecialPurpose(IpNetwork, &'static str),
}

impl fmt::Display for AddressRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = self.address;
        match &self.reason {
            RefusalReason::Edge(rule) => write!(
                f,
                "{address} is the edge itself (`settings.origin_networks.edge`: {rule})"
            ),
            RefusalReason::Denied(rule) => write!(
                f,
                "{address} is in a denied network (`settings.origin_networks.deny`: {rule})"
            ),
            RefusalReason::SpecialPurpose(net, name) => {
                write!(f, "{address} is in {net} ({name})")
            }
        }
    }
}

impl OriginNetworks {
    /// Every address allowed: for a check made again, under the real
    /// networks, before anything connects.
    pub fn unchecked() -> OriginNetworks {
        let every = |network| NetworkRule {
            network,
            ports: Vec::new(),
        };
        OriginNetworks {
            allow: vec![every(v4(0, 0, 0, 0, 0)), every(v6([0; 8], 0))],
            ..OriginNetworks::default()
        }
    }

    /// Whether the edge may connect to `ip` on `port`.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), AddressRefusal> {
        self.verdict(ip, port)?;
        if let IpAddr::V6(v6) = ip {
            for carried in embedded_ipv4(v6) {
                self.verdict(IpAddr::V4(carried), port)?;
            }
        }
        Ok(())
    }

    fn verdict(&self, address: IpAddr, port: u16) -> Result<(), AddressRefusal> {
        let refuse = |reason| Err(AddressRefusal { address, reason });
        if let Some(rule) = self.edge.iter().find(|r| r.matches(address, port)) {
            return refuse(RefusalReason::Edge(rule.clone()));
        }
        if let Some(rule) = self.deny.iter().find(|r| r.matches(address, port)) {
            return refuse(RefusalReason::Denied(rule.clone()));
        }
        if self.allow.iter().any(|r| r.matches(address, port)) {
            return Ok(());
        }
        match SPECIAL_PURPOSE
            .iter()
            .find(|(net, _)| net.contains(address))
        {
            Some((net, name)) => refuse(RefusalReason::SpecialPurpose(*net, name)),
            None => Ok(()),
        }
    }

    /// Whether any port of `ip` may be an origin (for a `resolve` target).
    pub fn allows_some_port(&self, ip: IpAddr) -> bool {
        self.check(ip, 0).is_ok()
            || self
                .allow
                .iter()
                .flat_map(|r| r.ports.iter().map(|(a, _)| *a))
                .any(|port| self.check(ip, port).is_ok())
    }
}

/// Parses `settings.origin_networks`: `{"allow": [...], "deny": [...],
/// "edge": [...]}`, each entry `"CIDR"` or `{"network": "CIDR", "ports":
/// [80, "8000-8999"]}`.
pub(crate) fn parse_origin_networks(f: &mut Findings, value: &Value, path: &str) -> OriginNetworks {
    let mut networks = OriginNetworks::default();
    let Some(mut r) = FieldReader::open(f, value, path) else {
        return networks;
    };
    for (key, slot) in [
        ("allow", &mut networks.allow),
        ("deny", &mut networks.deny),
        ("edge", &mut networks.edge),
    ] {
        if let Some((v, p)) = r.field(key) {
            *slot = rules(f, v, &p);
        }
    }
    r.finish(f);
    networks
}

fn rules(f: &mut Findings, value: &Value, path: &str) -> Vec<NetworkRule> {
    let Value::Array(items) = value else {
        f.error(
            path,
            "expected a list of networks (`\"10.1.0.0/16\"` or `{\"network\": \"10.1.0.0/16\", \"ports\": [443]}`)",
        );
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| rule(f, item, &format!("{path}/{i}")))
        .collect()
}

fn rule(f: &mut Findings, value: &Value, path: &str) -> Option<NetworkRule> {
    let network = |f: &mut Findings, v: &Value, p: &str| match v {
        Value::String(text) => IpNetwork::parse(text)
            .map_err(|e| f.error(p, format!("{e} (expected a network such as `10.1.0.0/16`)")))
            .ok(),
        other => {
            f.error(
                p,
                format!(
                    "expected a network such as `10.1.0.0/16`, found {}",
                    kind(other)
                ),
            );
            None
        }
    };
    if !value.is_object() {
        return network(f, value, path).map(|network| NetworkRule {
            network,
            ports: Vec::new(),
        });
    }
    let mut r = FieldReader::open(f, value, path)?;
    let net = match r.field("network") {
        Some((v, p)) => network(f, v, &p),
        None => {
            f.error(path, "missing field `network`");
            None
        }
    };
    let ports = match r.field("ports") {
        Some((v, p)) => port_ranges(f, v, &p),
        None => Some(Vec::new()),
    };
    r.finish(f);
    Some(NetworkRule {
        network: net?,
        ports: ports?,
    })
}

fn port_ranges(f: &mut Findings, value: &Value, path: &str) -> Option<Vec<(u16, u16)>> {
    let items = match value {
        Value::Array(items) if !items.is_empty() => items,
        _ => {
            f.error(
                path,
                "expected a non-empty list of ports (`443`) or ranges (`\"8000-8999\"`)",
            );
            return None;
        }
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = format!("{path}/{i}");
        let range = match item {
            Value::String(text) => {
                let parsed = text.split_once('-').and_then(|(a, b)| {
                    let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
                    (a >= 1 && a <= b).then_some((a, b))
                });
                if parsed.is_none() {
                    f.error(
                        &p,
                        format!(
                            "`{}` is not a port range such as `8000-8999`",
                            crate::policy::reader::escaped(text)
                        ),
                    );
                }
                parsed
            }
            other => port(f, other, &p).map(|n| (n, n)),
        };
        match range {
            Some(r) => out.push(r),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    fn rule(net: &str, ports: &[(u16, u16)]) -> NetworkRule {
        NetworkRule {
            network: IpNetwork::parse(net).unwrap_or(v4(0, 0, 0, 0, 0)),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn by_default_every_special_purpose_network_is_refused_and_public_ones_are_not() {
        let networks = OriginNetworks::default();
        let refused = [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.7",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::",
            "2001:db8::1",
        ];
        for text in refused {
            assert!(
                networks.check(ip(text), 80).is_err(),
                "{text} should be refused"
            );
        }
        for text in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "2606:4700::1111",
            "100.128.0.1",
        ] {
            assert_eq!(networks.check(ip(text), 80), Ok(()), "{text}");
        }
    }

    #[test]
    fn a_refusal_names_the_network_and_what_it_is() {
        let networks = OriginNetworks::default();
        let why = networks
            .check(ip("169.254.169.254"), 80)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            why.as_deref(),
            Some("169.254.169.254 is in 169.254.0.0/16 (link-local, cloud metadata services)")
        );
        let why = networks
            .check(ip("::ffff:127.0.0.1"), 80)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            why.as_deref(),
            Some("::ffff:127.0.0.1 is in ::ffff:0.0.0.0/96 (IPv4-mapped)")
        );
    }

    #[test]
    fn allow_opens_a_special_network_by_port_but_never_the_edge_or_a_denied_one() {
        let networks = OriginNetworks {
            allow: vec![
                rule("127.0.0.1", &[(18080, 18090)]),
                rule("::ffff:0:0/96", &[]),
                rule("10.0.0.0/8", &[]),
            ],
            deny: vec![rule("10.9.0.0/16", &[])],
            edge: vec![rule("127.0.0.0/8", &[(18085, 18085)])],
        };
        assert_eq!(networks.check(ip("127.0.0.1"), 18080), Ok(()));
        assert!(networks.check(ip("127.0.0.1"), 9901).is_err());
        assert!(networks.check(ip("127.0.0.2"), 18080).is_err());
        let edge = networks.check(ip("127.0.0.1"), 18085).err();
        assert!(matches!(
            edge.map(|e| e.reason),
            Some(RefusalReason::Edge(_))
        ));
        // The IPv6 form is allowed, but the IPv4 address it carries is
        // checked too: the edge's own port stays refused.
        assert_eq!(networks.check(ip("::ffff:127.0.0.1"), 18080), Ok(()));
        let carried = networks.check(ip("::ffff:127.0.0.1"), 18085).err();
        assert_eq!(carried.map(|e| e.address), Some(ip("127.0.0.1")));
        assert_eq!(networks.check(ip("10.1.0.1"), 443), Ok(()));
        let denied = networks.check(ip("10.9.0.1"), 443).err();
        assert!(matches!(
            denied.map(|e| e.reason),
            Some(RefusalReason::Denied(_))
        ));
    }

    #[test]
    fn unchecked_allows_every_address_and_port() {
        let any = OriginNetworks::unchecked();
        for text in [
            "127.0.0.1",
            "169.254.169.254",
            "::1",
            "::ffff:10.0.0.1",
            "8.8.8.8",
        ] {
            assert_eq!(any.check(ip(text), 9901), Ok(()), "{text}");
        }
    }

    #[test]
    fn teredo_and_6to4_carry_the_ipv4_they_reach() {
        let teredo: Ipv6Addr = "2001:0:4136:e378:8000:63bf:80ff:fffe"
            .parse()
            .unwrap_or(Ipv6Addr::UNSPECIFIED);
        assert_eq!(
            embedded_ipv4(teredo),
            vec![Ipv4Addr::new(65, 54, 227, 120), Ipv4Addr::new(127, 0, 0, 1)]
        );
        let six_to_four: Ipv6Addr = "2002:a00:1::1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        assert_eq!(embedded_ipv4(six_to_four), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    }

    #[test]
    fn networks_parse_strictly() {
        assert_eq!(IpNetwork::parse("10.0.0.0/8"), Ok(v4(10, 0, 0, 0, 8)));
        assert_eq!(IpNetwork::parse("127.0.0.1"), Ok(v4(127, 0, 0, 1, 32)));
        assert_eq!(
            IpNetwork::parse("fe80::/10"),
            Ok(v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10))
        );
        assert!(IpNetwork::parse("10.0.0.1/8").is_err_and(|e| e.contains("`10.0.0.0/8`")));
        assert!(IpNetwork::parse("10.0.0.0/33").is_err());
        assert!(IpNetwork::parse("example.net").is_err());
        assert_eq!(v4(0, 0, 0, 0, 0).to_string(), "0.0.0.0/0");
    }
}
