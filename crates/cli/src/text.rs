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
        format!("{} via cluster {}", text(&o["role"]), text(&o["cluster"])),
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
    if let Some(h) = o["dynamic_host"].as_str() {
        line("dfp", format!("{h}:{}", o["port"]));
    }
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
            Some(false) => format!("not for {method} requests"),
            Some(true) => format!(
                "on {} -> secondary via cluster {} ({}://{}:{}, timeout {} ms)",
                f["statuses"],
                text(&f["cluster"]),
                text(&f["scheme"]),
                text(&f["authority"]),
                f["port"],
                f["timeout_ms"]
            ),
        },
    );
    out
}
