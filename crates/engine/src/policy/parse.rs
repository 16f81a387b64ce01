//! Parsing one policy document into the model, field by field.

use crate::policy::checks::lint;
use crate::policy::diagnostic::{pointer_segment, PolicyDiagnostic};
use crate::policy::host::{is_ip_literal, origin_address, strip_port};
use crate::policy::reader::*;
use crate::policy::*;
use serde_json::Value;
use std::collections::BTreeMap;

/// The domain a document names, if it names a valid one; used to find the
/// last good policy of a domain whose new policy was rejected.
pub(crate) fn domain_of(document: &Value) -> Option<DomainPattern> {
    domain_pattern(&mut Findings::new(""), document.get("domain")?, "/domain")
}

fn domain_pattern(f: &mut Findings, value: &Value, path: &str) -> Option<DomainPattern> {
    let text = string(f, value, path)?;
    let (wildcard, name) = match text.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if name.contains('*') {
        f.error(
            path,
            format!("domain `{text}`: only a leading `*.` wildcard is supported"),
        );
        return None;
    }
    if strip_port(name) != name {
        f.error(
            path,
            format!("domain `{text}` must not carry a port: viewers are matched by name"),
        );
        return None;
    }
    let normalized = host_name(f, name, path, "domain")?;
    if is_ip_literal(&normalized) && wildcard {
        f.error(
            path,
            format!("domain `{text}`: a wildcard cannot cover an IP address"),
        );
        return None;
    }
    Some(if wildcard {
        DomainPattern::Wildcard(normalized)
    } else {
        DomainPattern::Exact(normalized)
    })
}

/// One origin object: `{address, port?, weight?, connect_timeout_ms?,
/// response_timeout_ms?}`, plus `priority` inside an `origins` list.
fn origin(f: &mut Findings, value: &Value, path: &str, tier: Option<Tier>) -> Option<Origin> {
    let mut r = FieldReader::open(f, value, path)?;
    let address = match r.field("address") {
        Some((v, p)) => string(f, v, &p).and_then(|a| {
            if !header_safe(f, a, &p, "address") {
                return None;
            }
            origin_address(a)
                .map_err(|e| f.error(&p, format!("address `{a}` {e}")))
                .ok()
        }),
        None => {
            f.error(path, "missing field `address`");
            None
        }
    };
    let port_value = match r.field("port") {
        Some((v, p)) => port(f, v, &p),
        None => Some(80),
    };
    let tier = match (tier, r.field("priority")) {
        (Some(fixed), None) => Some(fixed),
        (None, None) => Some(Tier::Primary),
        (Some(fixed), Some((_, p))) => {
            f.error(
                &p,
                format!(
                    "`priority` belongs in an `origins` list; `{}` is already the {} origin",
                    path.trim_start_matches('/'),
                    fixed.as_str()
                ),
            );
            None
        }
        (None, Some((v, p))) => match string(f, v, &p)? {
            "primary" => Some(Tier::Primary),
            "secondary" => Some(Tier::Secondary),
            other => {
                f.error(
                    &p,
                    format!("unknown priority `{other}`; expected primary or secondary"),
                );
                None
            }
        },
    };
    let mut bounded =
        |r: &mut FieldReader, key: &'static str, low: u32, high: u32, default: u32| match r
            .field(key)
        {
            Some((v, p)) => integer_in(f, v, &p, u64::from(low), u64::from(high), key)
                .and_then(|n| u32::try_from(n).ok()),
            None => Some(default),
        };
    let weight = bounded(&mut r, "weight", 1, MAX_WEIGHT, DEFAULT_WEIGHT);
    let connect = bounded(
        &mut r,
        "connect_timeout_ms",
        100,
        MAX_CONNECT_TIMEOUT_MS,
        DEFAULT_CONNECT_TIMEOUT_MS,
    );
    let response = bounded(
        &mut r,
        "response_timeout_ms",
        100,
        MAX_RESPONSE_TIMEOUT_MS,
        DEFAULT_RESPONSE_TIMEOUT_MS,
    );
    if let Some((_, p)) = r.field("clusters") {
        f.error_with_fix(
            &p,
            "`clusters` is no longer read: the edge derives the Envoy cluster for each origin from its address, port and the protocol policy",
            "remove `clusters`; `origin-policy bundle` writes the clusters Envoy needs",
        );
    }
    r.finish(f);
    Some(Origin {
        path: path.to_owned(),
        address: address?,
        port: port_value?,
        tier: tier?,
        weight: weight?,
        connect_timeout_ms: connect?,
        response_timeout_ms: response?,
    })
}

/// The origins a policy lists: `primary` (+ `secondary`) for one origin per
/// tier, or an `origins` list with priorities and weights.
fn origins(f: &mut Findings, r: &mut FieldReader<'_>) -> Option<Vec<Origin>> {
    let primary = r.field("primary");
    let secondary = r.field("secondary");
    let list = r.field("origins");
    let mut out = Vec::new();
    let mut ok = true;
    match (primary, list) {
        (Some(_), Some((_, p))) => {
            f.error(
                &p,
                "name the origins either with `primary`/`secondary` or with an `origins` list, not both",
            );
            return None;
        }
        (Some((v, p)), None) => {
            match origin(f, v, &p, Some(Tier::Primary)) {
                Some(o) => out.push(o),
                None => ok = false,
            }
            if let Some((v, p)) = secondary {
                match origin(f, v, &p, Some(Tier::Secondary)) {
                    Some(o) => out.push(o),
                    None => ok = false,
                }
            }
        }
        (None, Some((v, p))) => {
            if let Some((_, sp)) = &secondary {
                f.error(sp, "with an `origins` list, give the secondary origin `\"priority\": \"secondary\"` in the list");
                ok = false;
            }
            match v.as_array() {
                Some(items) if !items.is_empty() && items.len() <= MAX_ORIGINS => {
                    for (i, item) in items.iter().enumerate() {
                        match origin(f, item, &format!("{p}/{i}"), None) {
                            Some(o) => out.push(o),
                            None => ok = false,
                        }
                    }
                }
                _ => {
                    f.error(
                        &p,
                        format!("expected a list of 1-{MAX_ORIGINS} origin objects"),
                    );
                    return None;
                }
            }
            if ok && !out.iter().any(|o| o.tier == Tier::Primary) {
                f.error(&p, "no origin has priority `primary`");
                return None;
            }
        }
        (None, None) => {
            f.error(
                "",
                "missing field `primary` (the primary origin) or `origins` (a list of origins)",
            );
            return None;
        }
    }
    ok.then_some(out)
}

fn mode<'v>(
    f: &mut Findings,
    r: &mut FieldReader<'v>,
    path: &str,
    allowed: &[&str],
) -> Option<&'v str> {
    let (v, p) = match r.field("mode") {
        Some(found) => found,
        None => {
            f.error(
                path,
                format!("missing field `mode` (one of {})", allowed.join(", ")),
            );
            return None;
        }
    };
    let text = string(f, v, &p)?;
    if allowed.contains(&text) {
        Some(text)
    } else {
        f.error(
            &p,
            format!(
                "unknown mode `{text}`; expected one of {}",
                allowed.join(", ")
            ),
        );
        None
    }
}

fn custom_value<'v>(
    f: &mut Findings,
    r: &mut FieldReader<'v>,
    path: &str,
    what: &str,
) -> Option<&'v str> {
    match r.field("value") {
        Some((v, p)) => {
            let text = string(f, v, &p)?;
            header_safe(f, text, &p, what).then_some(text)
        }
        None => {
            f.error(path, "mode `custom` needs a `value`");
            None
        }
    }
}

fn origin_host(f: &mut Findings, value: &Value, path: &str) -> Option<OriginHost> {
    let mut r = FieldReader::open(f, value, path)?;
    let host = match mode(
        f,
        &mut r,
        path,
        &["acceleration_domain", "origin_domain", "custom"],
    )? {
        "acceleration_domain" => Some(OriginHost::AccelerationDomain),
        "origin_domain" => Some(OriginHost::OriginDomain),
        _ => {
            let p = format!("{path}/value");
            custom_value(f, &mut r, path, "origin host").and_then(|text| {
                let name = host_name(f, strip_port(text), &p, "origin host")?;
                Some(OriginHost::Custom(format!(
                    "{name}{}",
                    &text[strip_port(text).len()..]
                )))
            })
        }
    };
    r.finish(f);
    host
}

fn origin_sni(f: &mut Findings, value: &Value, path: &str) -> Option<OriginSni> {
    let mut r = FieldReader::open(f, value, path)?;
    let sni = match mode(f, &mut r, path, &["origin_host", "custom"])? {
        "origin_host" => Some(OriginSni::OriginHost),
        _ => {
            let p = format!("{path}/value");
            custom_value(f, &mut r, path, "SNI").and_then(|text| {
                if strip_port(text) != text {
                    f.error(&p, format!("SNI `{text}` must not carry a port"));
                    return None;
                }
                let name = host_name(f, text, &p, "SNI")?;
                if is_ip_literal(&name) {
                    f.error(
                        &p,
                        format!(
                            "SNI `{text}` is an IP address; TLS only sends host names (RFC 6066)"
                        ),
                    );
                    return None;
                }
                Some(OriginSni::Custom(name))
            })
        }
    };
    r.finish(f);
    sni
}

struct Protocol {
    policy: ProtocolPolicy,
    http_port: u16,
    https_port: u16,
    https_port_given: bool,
}

fn protocol(f: &mut Findings, value: Option<(&Value, String)>) -> Option<Protocol> {
    let Some((value, path)) = value else {
        return Some(Protocol {
            policy: ProtocolPolicy::Off,
            http_port: 80,
            https_port: 443,
            https_port_given: false,
        });
    };
    let mut r = FieldReader::open(f, value, &path)?;
    let policy = match r.field("policy") {
        Some((v, p)) => {
            match string(f, v, &p)? {
                "off" => Some(ProtocolPolicy::Off),
                "http" => Some(ProtocolPolicy::Http),
                "https" => Some(ProtocolPolicy::Https),
                "follow" => Some(ProtocolPolicy::Follow),
                other => {
                    f.error(&p, format!("unknown protocol policy `{other}`; expected off, http, https or follow"));
                    None
                }
            }
        }
        None => Some(ProtocolPolicy::Off),
    };
    let http_port = match r.field("http_port") {
        Some((v, p)) => port(f, v, &p),
        None => Some(80),
    };
    let https_field = r.field("https_port");
    let https_port_given = https_field.is_some();
    let https_port = match https_field {
        Some((v, p)) => port(f, v, &p),
        None => Some(443),
    };
    r.finish(f);
    Some(Protocol {
        policy: policy?,
        http_port: http_port?,
        https_port: https_port?,
        https_port_given,
    })
}

fn cache_rules(
    f: &mut Findings,
    value: Option<(&Value, String)>,
) -> Option<BTreeMap<u16, Option<u32>>> {
    // Inserted, not collected: `collect` would sort (a sort routine more in
    // the filter's module).
    let mut rules: BTreeMap<u16, Option<u32>> = BTreeMap::new();
    rules.insert(301, Some(0));
    rules.insert(302, Some(0));
    let Some((value, path)) = value else {
        return Some(rules);
    };
    let Value::Object(map) = value else {
        f.error(
            &path,
            format!(
                "expected an object of status code -> seconds, found {}",
                kind(value)
            ),
        );
        return None;
    };
    let mut ok = true;
    for (key, ttl) in map {
        let p = format!("{path}/{}", pointer_segment(key));
        let status = match key.parse::<u16>() {
            Ok(s) if (100..=599).contains(&s) && key.len() == 3 => s,
            _ => {
                f.error(&p, format!("`{key}` is not an HTTP status code (100-599)"));
                ok = false;
                continue;
            }
        };
        if ttl.is_null() {
            rules.insert(status, None);
            continue;
        }
        match integer_in(
            f,
            ttl,
            &p,
            0,
            u64::from(MAX_CACHE_TTL_SECONDS),
            "cache TTL (seconds)",
        ) {
            Some(secs) => {
                rules.insert(status, u32::try_from(secs).ok());
            }
            None => ok = false,
        }
    }
    ok.then_some(rules)
}

fn failover(f: &mut Findings, value: Option<(&Value, String)>) -> Option<FailoverRule> {
    let mut rule = FailoverRule {
        statuses: DEFAULT_FAILOVER_STATUSES.to_vec(),
        methods: DEFAULT_FAILOVER_METHODS
            .iter()
            .map(|m| (*m).to_owned())
            .collect(),
    };
    let Some((value, path)) = value else {
        return Some(rule);
    };
    let mut r = FieldReader::open(f, value, &path)?;
    let mut ok = true;
    if let Some((v, p)) = r.field("statuses") {
        match v.as_array() {
            Some(list) if !list.is_empty() => {
                rule.statuses.clear();
                for (i, item) in list.iter().enumerate() {
                    match integer_in(f, item, &format!("{p}/{i}"), 400, 599, "failover status") {
                        Some(s) => rule.statuses.extend(u16::try_from(s).ok()),
                        None => ok = false,
                    }
                }
            }
            _ => {
                f.error(&p, "expected a non-empty array of status codes (400-599)");
                ok = false;
            }
        }
    }
    if let Some((v, p)) = r.field("methods") {
        match v.as_array() {
            Some(list) if !list.is_empty() => {
                rule.methods.clear();
                for (i, item) in list.iter().enumerate() {
                    let ip = format!("{p}/{i}");
                    match string(f, item, &ip) {
                        Some(m) if KNOWN_METHODS.contains(&m) => rule.methods.push(m.to_owned()),
                        Some(m) => {
                            f.error(
                                &ip,
                                format!(
                                    "unknown method `{m}`; expected one of {}",
                                    KNOWN_METHODS.join(", ")
                                ),
                            );
                            ok = false;
                        }
                        None => ok = false,
                    }
                }
            }
            _ => {
                f.error(&p, "expected a non-empty array of HTTP methods");
                ok = false;
            }
        }
    }
    if let Some((_, p)) = r.field("timeout_ms") {
        f.error_with_fix(
            &p,
            "`failover.timeout_ms` is no longer read: each origin has its own timeouts",
            "set `response_timeout_ms` (and `connect_timeout_ms`) on the secondary origin",
        );
        ok = false;
    }
    r.finish(f);
    // Sorted and deduplicated through a table of the codes (all below 600):
    // linear, and no sort routine in the module.
    let mut listed = [false; 600];
    for &s in &rule.statuses {
        if let Some(slot) = listed.get_mut(usize::from(s)) {
            *slot = true;
        }
    }
    rule.statuses = (0..600).filter(|&s| listed[usize::from(s)]).collect();
    rule.methods.dedup();
    ok.then_some(rule)
}

/// Parses and validates one policy document. `source` names where it came from
/// (a file path or a bundle entry) and prefixes every finding.
pub fn parse_policy(source: &str, value: &Value) -> (Option<Policy>, Vec<PolicyDiagnostic>) {
    let mut f = Findings::new(source);
    let policy = parse_into(&mut f, value);
    if policy.is_some() {
        lint(&mut f, policy.as_ref());
    }
    let has_errors = f.has_errors();
    (if has_errors { None } else { policy }, f.into_list())
}

fn parse_into(f: &mut Findings, value: &Value) -> Option<Policy> {
    let mut r = FieldReader::open(f, value, "")?;
    // The domain is read first so that every later finding can name it.
    let domain = match r.field("domain") {
        Some((v, p)) => {
            if let Some(text) = v.as_str() {
                f.set_domain(text);
            }
            domain_pattern(f, v, &p)
        }
        None => {
            f.error("", "missing field `domain`");
            None
        }
    };
    let origins = origins(f, &mut r);
    let protocol = protocol(f, r.field("protocol"));
    let origin_host = match r.field("origin_host") {
        Some((v, p)) => origin_host(f, v, &p),
        None => Some(OriginHost::AccelerationDomain),
    };
    let origin_sni = match r.field("origin_sni") {
        Some((v, p)) => origin_sni(f, v, &p),
        None => Some(OriginSni::OriginHost),
    };
    let cache_status_ttl = cache_rules(f, r.field("cache_status_ttl"));
    let failover_field = r.field("failover");
    let has_secondary = origins
        .as_ref()
        .is_some_and(|list| list.iter().any(|o| o.tier == Tier::Secondary));
    if failover_field.is_some() && origins.is_some() && !has_secondary {
        f.error(
            "/failover",
            "failover is set but there is no `secondary` origin to fail over to",
        );
    }
    let failover = failover(f, failover_field);
    r.finish(f);

    let protocol = protocol?;
    let policy = Policy {
        domain: domain?,
        failover: if has_secondary { failover } else { None },
        origins: origins?,
        protocol: protocol.policy,
        http_port: protocol.http_port,
        https_port: protocol.https_port,
        origin_host: origin_host?,
        origin_sni: origin_sni?,
        cache_status_ttl: cache_status_ttl?,
    };
    if protocol.policy == ProtocolPolicy::Follow
        && !protocol.https_port_given
        && policy
            .tier(Tier::Primary)
            .any(|o| o.port != 80 && o.port != 443)
    {
        f.warn(
            "/protocol/https_port",
            format!(
                "`follow` sends HTTPS viewers to port 443, but the origin is configured on port {} and may have no HTTPS port",
                policy.tier(Tier::Primary).map(|o| o.port).find(|p| *p != 80 && *p != 443).unwrap_or(0)
            ),
            "set `protocol.https_port` to the origin's HTTPS port, or use `http` if the origin has no HTTPS",
        );
    }
    Some(policy)
}
