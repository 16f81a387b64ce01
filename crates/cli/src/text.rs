//! `explain`'s text view: the same decision as `explain --json` (the engine's
//! JSON view), laid out for a terminal.

use serde_json::Value;
use std::fmt::Write as _;

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// One line per fact: domain, origin, scheme, rule, Host, SNI, cache, failover.
/// Anything but an origin decision is printed as its JSON.
pub fn explain_text(outcome: &Value, method: &str) -> String {
    if outcome["outcome"] != "origin" {
        return format!("{outcome}\n");
    }
    let o = &outcome["origin"];
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<10} {value}");
    };
    line(
        "domain",
        format!(
            "{} ({} match)",
            text(&outcome["domain"]),
            text(&outcome["match"])
        ),
    );
    line(
        "origin",
        format!(
            "{} {}:{} via cluster {}",
            text(&o["tier"]),
            text(&o["address"]),
            o["port"],
            text(&o["cluster"])
        ),
    );
    line(
        "scheme",
        format!("{}  port {}", text(&o["scheme"]), o["port"]),
    );
    line("rule", text(&outcome["rule"]).to_owned());
    line("host", text(&o["authority"]).to_owned());
    line(
        "sni",
        o["sni"]
            .as_str()
            .unwrap_or("(none: plain HTTP or IP address)")
            .to_owned(),
    );
    line(
        "timeouts",
        format!(
            "connect {} ms, response {} ms",
            o["connect_timeout_ms"], o["response_timeout_ms"]
        ),
    );
    for next in outcome["chain"].as_array().into_iter().flatten() {
        line(
            "then",
            format!(
                "{} {}://{}:{} host {} sni {} (connect {} ms, response {} ms)",
                text(&next["tier"]),
                text(&next["scheme"]),
                text(&next["address"]),
                next["port"],
                text(&next["authority"]),
                next["sni"].as_str().unwrap_or("-"),
                next["connect_timeout_ms"],
                next["response_timeout_ms"]
            ),
        );
    }
    line(
        "cluster",
        format!("{} (cluster header)", text(&outcome["route_cluster"])),
    );
    let cache: Vec<String> = outcome["cache"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(status, cc)| format!("{status}={}", text(cc)))
        .collect();
    line(
        "cache",
        if cache.is_empty() {
            "origin headers kept".to_owned()
        } else {
            cache.join(", ")
        },
    );
    let f = &outcome["failover"];
    line(
        "failover",
        match f["eligible"].as_bool() {
            None => "none (no secondary origin)".to_owned(),
            Some(false) => format!("not for this {method} request: {}", text(&f["reason"])),
            Some(true) if f["connect_failures_only"] == true => format!(
                "{method} is not idempotent: only when {}:{} refuses the connection -> {} {}:{}",
                text(&o["address"]),
                o["port"],
                text(&f["tier"]),
                text(&f["address"]),
                f["port"]
            ),
            Some(true) => format!(
                "on {}, a timeout or a refused connection -> {} {}://{}:{} (one retry)",
                f["statuses"],
                text(&f["tier"]),
                text(&f["scheme"]),
                text(&f["address"]),
                f["port"]
            ),
        },
    );
    out
}
