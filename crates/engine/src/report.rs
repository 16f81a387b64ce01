//! JSON views of decisions and diagnostics, shared by the CLI, the golden
//! cases and the JavaScript package so that all of them speak the same shape.

use crate::request::direct_route::DirectRoute;
use crate::Settings;
use crate::{
    scheme_from_text, Failover, FailoverSkip, OriginDecision, OriginTarget, Outcome,
    OwnedViewerRequest, PolicyDiagnostic, PolicySet, Refusal,
};
use serde_json::{json, Map, Value};

/// The cluster a target's request goes to: its own, or under
/// `direct_origins` (without a chain) the forward-proxy shard the filter
/// names, as Envoy's access log shows it.
fn target_json(t: &OriginTarget<'_>, direct: Option<&Settings>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("tier".into(), t.tier.as_str().into());
    let route = direct.and_then(|s| Some(DirectRoute::of(t, s.direct_origins?, s)));
    match &route {
        Some(route) => {
            m.insert("cluster".into(), route.cluster.clone().into());
            m.insert("direct".into(), true.into());
        }
        None => {
            m.insert("cluster".into(), t.cluster.into());
        }
    }
    m.insert("address".into(), t.address.into());
    m.insert("scheme".into(), t.scheme.as_str().into());
    m.insert("port".into(), t.port.into());
    m.insert("authority".into(), t.authority.as_ref().into());
    m.insert(
        "sni".into(),
        t.sni.as_deref().map_or(Value::Null, Value::from),
    );
    m.insert("connect_timeout_ms".into(), t.connect_timeout_ms.into());
    m.insert("response_timeout_ms".into(), t.response_timeout_ms.into());
    m
}

fn decision_json(d: &OriginDecision<'_>, settings: &Settings) -> Value {
    // Under `direct_origins` a request without a chain goes to a
    // forward-proxy shard; one with a chain to the chain's cluster.
    let direct = (d.chain.is_empty() && settings.direct_origins.is_some()).then_some(settings);
    let failover = match &d.failover {
        Failover::NotConfigured => Value::Null,
        Failover::Skipped(_, FailoverSkip::Method(_)) => json!({
            "eligible": false,
            "reason": "method not in the policy's failover methods",
        }),
        Failover::Skipped(_, FailoverSkip::BodySize { limit }) => json!({
            "eligible": false,
            "reason": format!("request body over {limit} bytes"),
        }),
        Failover::Plan(plan) => {
            let mut m = target_json(&plan.target, direct);
            m.insert("eligible".into(), true.into());
            m.insert("statuses".into(), plan.rule.statuses.as_slice().into());
            m.insert(
                "connect_failures_only".into(),
                plan.connect_failures_only.into(),
            );
            Value::Object(m)
        }
    };
    let cache: Map<String, Value> = d
        .policy
        .cache_overrides()
        .iter()
        .map(|c| {
            (
                c.status.to_string(),
                Value::from(c.cache_control.to_string()),
            )
        })
        .collect();
    let chain: Vec<Value> = d
        .chain
        .iter()
        .map(|t| Value::Object(target_json(t, None)))
        .collect();
    let origin = target_json(&d.target, direct);
    json!({
        "outcome": "origin",
        "domain": d.policy.name,
        "match": match d.matched { crate::MatchKind::Exact => "exact", crate::MatchKind::Wildcard => "wildcard" },
        "viewer_host": d.viewer_host,
        "viewer_scheme": d.viewer_scheme.as_str(),
        "route_cluster": if direct.is_some() { origin["cluster"].clone() } else { d.route_cluster.into() },
        "origin": Value::Object(origin),
        "chain": chain,
        "failover": failover,
        "cache": cache,
        "rule": d.scheme_rule(),
    })
}

/// The decision for a request as JSON (`outcome` is `origin`, `unknown_domain`,
/// `bad_host` or `no_route`).
pub fn outcome_json(set: &PolicySet, outcome: &Outcome<'_>) -> Value {
    match outcome {
        Outcome::Origin(d) => decision_json(d, &set.settings),
        Outcome::Refused(Refusal::UnknownDomain { viewer_host }) => json!({
            "outcome": "unknown_domain",
            "viewer_host": viewer_host,
            "action": match set.settings.unknown_domain {
                crate::UnknownDomain::PassThrough => json!("pass_through"),
                crate::UnknownDomain::LocalReply { status } => json!({"local_reply": status}),
            },
        }),
        Outcome::Refused(Refusal::BadHost(e)) => {
            json!({"outcome": "bad_host", "error": e.to_string()})
        }
        Outcome::Refused(Refusal::NoRoute { domain }) => {
            json!({"outcome": "no_route", "domain": domain})
        }
    }
}

pub fn diagnostic_json(d: &PolicyDiagnostic) -> Value {
    json!({
        "severity": d.severity.to_string(),
        "source": d.source,
        "domain": d.domain,
        "path": d.path,
        "message": d.message,
        "fix": d.fix,
    })
}

/// Reads a request as golden cases describe it:
/// `{"authority", "scheme"?, "x_forwarded_proto"?, "method"? (GET), "path"?,
/// "body_bytes"?, "spread"?}`, where `scheme` is the viewer's connection to the
/// edge and `spread` picks among weighted primaries.
pub fn request_from_json(value: &Value) -> Result<OwnedViewerRequest, String> {
    let obj = value.as_object().ok_or("request must be an object")?;
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "authority"
                | "scheme"
                | "x_forwarded_proto"
                | "method"
                | "path"
                | "body_bytes"
                | "spread"
        ) {
            return Err(format!("unknown request field `{key}`"));
        }
    }
    Ok(OwnedViewerRequest {
        authority: text("authority").ok_or("request needs `authority`")?,
        connection: text("scheme").as_deref().and_then(scheme_from_text),
        x_forwarded_proto: text("x_forwarded_proto"),
        method: text("method").unwrap_or_else(|| "GET".to_owned()),
        body_bytes: obj.get("body_bytes").and_then(Value::as_u64),
        spread: obj
            .get("spread")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    })
}

/// A viewer request from a URL as a viewer would send it, e.g.
/// `https://media.example.com/a.png`; the authority is taken as written, not
/// normalised, so the engine sees exactly what a viewer would send.
pub fn request_from_url(
    url: &str,
    method: Option<&str>,
    x_forwarded_proto: Option<&str>,
) -> Result<OwnedViewerRequest, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL like https://host/path"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    Ok(OwnedViewerRequest {
        authority: authority.to_owned(),
        connection: scheme_from_text(scheme),
        x_forwarded_proto: x_forwarded_proto.map(str::to_owned),
        method: method.unwrap_or("GET").to_ascii_uppercase(),
        ..OwnedViewerRequest::default()
    })
}
