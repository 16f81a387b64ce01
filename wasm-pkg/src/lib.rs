//! The origin-policy engine for JavaScript. The same validation and decisions
//! as the CLI (`check --json`, `explain --json`), through wasm-bindgen; no
//! proxy-wasm code. Results cross as JSON text, parsed by `JSON.parse`, so that
//! the shapes are exactly those of `origin_policy_engine::report`.

use origin_policy_engine::documents::{DocumentKind, PolicyDocuments};
use origin_policy_engine::report::{
    diagnostic_json, outcome_json, request_from_json, request_from_url,
};
use origin_policy_engine::{parse_json, PolicySet, Severity};
use serde_json::{json, Value};
use wasm_bindgen::prelude::*;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** One finding about a policy, as `origin-policy check --json` reports it. */
export interface Diagnostic {
  severity: "error" | "warning";
  source: string;
  domain: string | null;
  /** JSON pointer into the policy, e.g. "/primary/port". */
  path: string;
  message: string;
  fix: string | null;
}

/** A viewer request: a URL, or the fields of a golden case. */
export type ViewerRequest =
  | { url: string; method?: string; x_forwarded_proto?: string }
  | {
      authority: string;
      scheme?: string;
      method?: string;
      x_forwarded_proto?: string;
      /** The request body's size, when a failover depends on it. */
      body_bytes?: number;
      /** Any number: picks among weighted primaries. */
      spread?: number;
    };

export interface OriginTarget {
  tier: "primary" | "secondary";
  /** The origin's Envoy cluster, derived by `origin-policy bundle`. */
  cluster: string;
  address: string;
  scheme: "http" | "https";
  port: number;
  authority: string;
  sni: string | null;
  connect_timeout_ms: number;
  response_timeout_ms: number;
}

/** What `origin-policy explain --json` prints. */
export type Decision =
  | {
      outcome: "origin";
      domain: string;
      match: "exact" | "wildcard";
      viewer_host: string;
      viewer_scheme: "http" | "https";
      /** What the filter names in the cluster header: the origin, or its failover chain. */
      route_cluster: string;
      origin: OriginTarget;
      /** The origins Envoy moves to, in order, when the first fails or is marked down. */
      chain: OriginTarget[];
      failover:
        | null
        | { eligible: false; reason: string }
        | (OriginTarget & { eligible: true; statuses: number[]; connect_failures_only: boolean });
      cache: Record<string, string>;
      /** Which rule chose the scheme and port. */
      rule: string;
    }
  | { outcome: "unknown_domain"; viewer_host: string; action: "pass_through" | { local_reply: number } }
  | { outcome: "bad_host"; error: string }
  | { outcome: "no_route"; domain: string };
"#;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = JSON, js_name = parse, catch)]
    fn js_parse(text: &str) -> Result<JsValue, JsValue>;

    #[wasm_bindgen(js_namespace = JSON, js_name = stringify, catch)]
    fn js_stringify(value: &JsValue) -> Result<String, JsValue>;
}

fn to_js(value: &Value) -> Result<JsValue, JsError> {
    js_parse(&value.to_string()).map_err(|_| JsError::new("result is not JSON"))
}

/// Validates one policy document. Returns every error and warning at once;
/// an empty array means the policy is valid. `source` names it in the results
/// (default `policy.json`); `settings_json` is the edge's `settings.json`
/// (default: none, so the default origin networks: no special-purpose
/// address, such as loopback or a private network, is an origin).
#[wasm_bindgen(unchecked_return_type = "Diagnostic[]")]
pub fn validate(
    policy_json: &str,
    source: Option<String>,
    settings_json: Option<String>,
) -> Result<JsValue, JsError> {
    let source = source.unwrap_or_else(|| "policy.json".to_owned());
    let mut documents = PolicyDocuments::default();
    if let Some(settings) = settings_json {
        let name = origin_policy_engine::documents::SETTINGS_FILE.to_owned();
        match origin_policy_engine::documents::parse_document(&name, settings.as_bytes()) {
            Ok(value) => documents.add(DocumentKind::Settings, name, value),
            Err(unreadable) => documents.unreadable.push(*unreadable),
        }
    }
    match origin_policy_engine::documents::parse_document(&source, policy_json.as_bytes()) {
        Ok(policy) => documents.add(DocumentKind::Policy, source, policy),
        Err(unreadable) => documents.unreadable.push(*unreadable),
    }
    let (_, diagnostics) = documents.compile();
    let list: Vec<Value> = diagnostics.0.iter().map(diagnostic_json).collect();
    to_js(&Value::Array(list))
}

/// The policy set as the filter takes it: the `{settings, policies}` envelope
/// that `origin-policy bundle` writes, a list of policies, or one policy.
fn policy_set(policy_set_json: &str) -> Result<PolicySet, JsError> {
    let value = parse_json(policy_set_json.as_bytes())
        .map_err(|e| JsError::new(&format!("policy set is not valid JSON: {e}")))?;
    let envelope = match value {
        Value::Array(policies) => json!({ "policies": policies }),
        Value::Object(ref o) if o.contains_key("domain") => json!({ "policies": [value] }),
        other => other,
    };
    let compiled =
        PolicySet::from_plugin_value(&envelope, None).map_err(|e| JsError::new(&e.to_string()))?;
    let errors: Vec<String> = compiled
        .diagnostics
        .0
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect();
    if !errors.is_empty() {
        return Err(JsError::new(&format!(
            "policy set rejected:\n{}",
            errors.join("\n")
        )));
    }
    Ok(compiled.set)
}

/// The origin decision for a viewer request: origin, scheme, port, Host, SNI,
/// cache rules, failover plan and the rule that chose the scheme and port.
/// Throws an `Error` for an invalid policy set or request.
#[wasm_bindgen(unchecked_return_type = "Decision")]
pub fn explain(
    policy_set_json: &str,
    #[wasm_bindgen(unchecked_param_type = "ViewerRequest")] request: JsValue,
) -> Result<JsValue, JsError> {
    let set = policy_set(policy_set_json)?;
    let text = js_stringify(&request).map_err(|_| JsError::new("request is not JSON data"))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| JsError::new(&format!("request: {e}")))?;
    let spec = match value.get("url").and_then(Value::as_str) {
        Some(url) => request_from_url(
            url,
            value.get("method").and_then(Value::as_str),
            value.get("x_forwarded_proto").and_then(Value::as_str),
        ),
        None => request_from_json(&value),
    }
    .map_err(|e| JsError::new(&format!("request: {e}")))?;
    to_js(&outcome_json(&set, &set.decide(&spec.as_request())))
}
