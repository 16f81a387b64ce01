//! The HTTP server: the per-domain API under `/v1/`, the policy feed
//! (`/changes`), the status page (`/status`) and `/healthz`. With TLS each
//! request is answered only if the caller's identity may send it
//! ([`Identity::may_request`]); a node polls the feed as itself. Every answer of the API is
//! JSON; an error is `{"error": KIND, "message", ...}` with the findings of a
//! refused policy (domain, JSON pointer, fix).

use crate::events::EventKind;
use crate::feed::{self, Nodes};
use crate::tls::{Caller, Identity};
use crate::validate::{EdgeSettings, Refusal};
use crate::writer::{Precondition, Shared, WriteOutcome, WriteRefused, WriteRequest};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, ETAG};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::{Arc, RwLock};

/// The largest policy document accepted (the engine's own limit is larger;
/// a policy is a few hundred bytes).
const MAX_POLICY_BYTES: usize = 1 << 20;
/// The largest import request: send more domains in several.
const MAX_IMPORT_BYTES: usize = 256 << 20;
/// Domains per list page, at most.
const MAX_LIST: usize = 1000;

/// The server's state, as requests see it.
pub struct Api {
    pub shared: Arc<Shared>,
    pub settings: RwLock<Arc<EdgeSettings>>,
    pub nodes: Nodes,
    pub fleet: Arc<crate::rollout::Fleet>,
    /// This server's name in `/status` (`--replica`).
    pub name: String,
    /// When it started, in ms since the Unix epoch.
    pub started_ms: u64,
}

pub type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: &Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, kind: &str, message: String) -> Answer {
    respond(status, &json!({"error": kind, "message": message}))
}

/// A request the API cannot take: its status, kind and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: String) -> Self {
        ApiError {
            status,
            kind,
            message,
        }
    }

    fn response(&self) -> Answer {
        error(self.status, self.kind, self.message.clone())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.kind,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

fn with_etag(mut r: Answer, revision: u64) -> Answer {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{revision}\"")) {
        r.headers_mut().insert(ETAG, v);
    }
    r
}

fn refused(refusal: &Refusal) -> Answer {
    respond(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({
            "error": "invalid_policy",
            "message": "the policy was refused; nothing was written",
            "domain": refusal.domain,
            "findings": refusal.findings(),
        }),
    )
}

fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn flag(query: &str, name: &str) -> bool {
    matches!(query_value(query, name), Some("" | "1" | "true"))
}

/// A domain as the API's path names it: lower case, `*.` for a wildcard.
fn path_domain(text: &str) -> Result<String, ApiError> {
    let decoded = text.replace("%2A", "*").replace("%2a", "*");
    let valid = !decoded.is_empty()
        && decoded.len() <= 253
        && decoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'));
    if valid {
        Ok(decoded.to_ascii_lowercase())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_domain",
            format!("{text:?} is not a domain name (write IDNs in their ASCII form, xn--)"),
        ))
    }
}

/// `If-Match: "N"` / `If-None-Match: *`.
fn precondition(request: &Request<Incoming>) -> Result<Precondition, ApiError> {
    let headers = request.headers();
    if let Some(value) = headers.get("if-match") {
        let text = value.to_str().unwrap_or_default().trim();
        if text == "*" {
            return Ok(Precondition::None);
        }
        return text
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse()
            .map(Precondition::Revision)
            .map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_precondition",
                    format!("If-Match {text:?}: send the ETag a GET answered, e.g. \"3\""),
                )
            });
    }
    match headers.get("if-none-match").map(|v| v.as_bytes()) {
        Some(b"*") => Ok(Precondition::Absent),
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_precondition",
            "If-None-Match: only * (create, never replace) is understood".to_owned(),
        )),
        None => Ok(Precondition::None),
    }
}

async fn body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            format!("the request body could not be read ({e}); at most {limit} bytes"),
        )),
    }
}

fn written(outcome: WriteOutcome, domain: &str) -> Answer {
    let (status, revision, seq, changed) = match outcome {
        WriteOutcome::Written { revision, seq } if revision == 1 => {
            (StatusCode::CREATED, revision, seq, true)
        }
        WriteOutcome::Written { revision, seq } => (StatusCode::OK, revision, seq, true),
        WriteOutcome::Unchanged { revision, seq } => (StatusCode::OK, revision, seq, false),
    };
    let body = json!({"domain": domain, "revision": revision, "version": seq, "changed": changed});
    with_etag(respond(status, &body), revision)
}

fn write_refused(refusal: WriteRefused, domain: &str) -> Answer {
    match refusal {
        WriteRefused::Stale { current } => respond(
            StatusCode::PRECONDITION_FAILED,
            &json!({
                "error": "stale",
                "message": format!("{domain} is at revision {} now: GET it, and write again with its ETag", current.map_or("none (no policy)".to_owned(), |r| r.to_string())),
                "domain": domain,
                "current_revision": current,
            }),
        ),
        WriteRefused::NotFound => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{domain} has no policy"),
        ),
        WriteRefused::Failed(why) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_written",
            format!("{domain}: nothing was written: {why}"),
        ),
        WriteRefused::StoreUnavailable(why) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", why)
        }
    }
}

impl Api {
    fn settings(&self) -> Arc<EdgeSettings> {
        self.current_settings()
    }

    /// A request refused to `caller`: 403, and an event.
    pub fn forbidden(&self, caller: &str, why: String) -> Answer {
        self.shared
            .events
            .record(EventKind::FeedRefused, format!("{caller}: {why}"));
        error(StatusCode::FORBIDDEN, "forbidden", why)
    }

    pub async fn answer(self: Arc<Self>, request: Request<Incoming>, caller: Caller) -> Answer {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let method = request.method().clone();
        if let Caller::Certified(identity) = &caller {
            if !identity.may_request(&method, &path) {
                let may = match identity {
                    Identity::Node(_) => "GET /changes and /healthz",
                    Identity::Server(_) => "GET /healthz and /status",
                    Identity::Operator(_) => "anything",
                };
                return self.forbidden(
                    &identity.uri(),
                    format!("{method} {path}: {identity} may use {may} only (an operator certificate may use the API)"),
                );
            }
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, parts.as_slice()) {
            (&Method::GET, ["changes"]) => self.changes(&request, &query, &caller).await,
            (&Method::GET, ["status"]) => respond(StatusCode::OK, &self.status()),
            (&Method::GET, ["healthz"]) => match self.shared.not_serving() {
                None => respond(StatusCode::OK, &json!({"serving": true})),
                Some(why) => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"serving": false, "reason": why}),
                ),
            },
            (&Method::GET, ["v1", "settings"]) => {
                respond(StatusCode::OK, &self.settings().document)
            }
            (&Method::GET, ["v1", "domains"]) => self.list(&query),
            (_, ["v1", "domains", domain, rest @ ..]) => {
                let domain = match path_domain(domain) {
                    Ok(d) => d,
                    Err(e) => return e.response(),
                };
                match (&method, rest) {
                    (&Method::GET, []) => self.get(&domain, &query),
                    (&Method::PUT, []) => self.put(request, &domain, &query).await,
                    (&Method::DELETE, []) => self.delete(&request, &domain).await,
                    (&Method::GET, ["history"]) => self.history(&domain),
                    (&Method::POST, ["rollback"]) => self.rollback(request, &domain, &query).await,
                    _ => error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method",
                        format!("{method} {path}: see docs/api.md"),
                    ),
                }
            }
            (&Method::POST, ["v1", "import"]) => self.import(request, &query).await,
            (&Method::GET, ["v1", "rollout"]) => respond(StatusCode::OK, &self.fleet.status()),
            (&Method::POST, ["v1", "rollout", "promote"]) => {
                match crate::rollout::promote_latest(&self) {
                    Ok(version) => respond(
                        StatusCode::OK,
                        &json!({"stable": version, "rollout": self.fleet.status()}),
                    ),
                    Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{method} {path}: the API is under /v1/ (docs/api.md), the feed at GET /changes"),
            ),
        }
    }

    fn status(&self) -> Value {
        let (version, epoch, domains) = {
            let table = self.shared.table();
            (table.seq, table.epoch, table.live())
        };
        let mut nodes = self.nodes.status();
        if let Value::Object(map) = &mut nodes {
            for (id, report) in map.iter_mut() {
                report["target"] = json!(self.fleet.target(Some(id), version));
            }
            for node in self.fleet.ads().map(|a| a.status()).unwrap_or_default() {
                let entry = map.entry(node.id.clone()).or_insert_with(|| json!({}));
                entry["xds"] = xds_status(&node);
            }
        }
        let (store, replicas) = match self.shared.replica.get() {
            Some(replica) => replica.status(),
            None => (
                json!({"kind": "redb", "state": "connected", "endpoints": [],
                       "applied": version, "since_ms": self.started_ms, "error": null}),
                json!({}),
            ),
        };
        json!({
            "version": version,
            "epoch": epoch,
            "domains": domains,
            "stable": self.fleet.stable().min(version),
            "rollout": self.fleet.status(),
            "nodes": nodes,
            "replica": self.name,
            "store": store,
            "replicas": replicas,
            "events": self.shared.events.status(),
        })
    }

    async fn changes(&self, request: &Request<Incoming>, query: &str, caller: &Caller) -> Answer {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut poll = feed::read_poll(query, header);
        // A node polls as the identity of its certificate, whatever it says.
        if let Caller::Certified(Identity::Node(id)) = caller {
            if let Some(said) = poll.node.as_ref().filter(|said| *said != id) {
                return self.forbidden(
                    &format!("{}{id}", crate::tls::NODE_PREFIX),
                    format!("the poll says it is node {said:?}, its certificate node {id:?}"),
                );
            }
            poll.node = Some(id.clone());
        }
        if let Some(why) = self.shared.not_serving() {
            return error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", why);
        }
        self.nodes.heard(&self.shared, &poll);
        if let Some(node) = &poll.node {
            self.fleet.polled(node, poll.epoch, poll.since);
        }
        let fleet = &self.fleet;
        let node = poll.node.as_deref();
        let page =
            match feed::answer(&self.shared, &poll, |latest| fleet.target(node, latest)).await {
                Ok(page) => page,
                Err(why) => {
                    let kind = if self.shared.not_serving().is_some() {
                        "store_unavailable"
                    } else {
                        "store"
                    };
                    return error(StatusCode::SERVICE_UNAVAILABLE, kind, why);
                }
            };
        let (status, headers, text) = match page {
            Some(page) => (StatusCode::OK, feed::page_headers(&page), page.body),
            None => {
                let table = self.shared.table();
                let idle = crate::table::FeedPage {
                    version: poll.since,
                    epoch: table.epoch,
                    ..Default::default()
                };
                (
                    StatusCode::NO_CONTENT,
                    feed::page_headers(&idle),
                    String::new(),
                )
            }
        };
        let mut r = Response::new(Full::new(Bytes::from(text)));
        *r.status_mut() = status;
        for (name, value) in headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().insert(name, v);
            }
        }
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    }

    fn list(&self, query: &str) -> Answer {
        let after = query_value(query, "after").unwrap_or_default();
        let limit = query_value(query, "limit")
            .and_then(|v| v.parse().ok())
            .unwrap_or(100)
            .clamp(1, MAX_LIST);
        match self.shared.store.list(after, limit) {
            Ok(rows) => {
                let next = (rows.len() == limit).then(|| rows.last().map(|r| r.0.clone()));
                let domains: Vec<Value> = rows
                    .into_iter()
                    .map(|(domain, revision)| json!({"domain": domain, "revision": revision}))
                    .collect();
                respond(
                    StatusCode::OK,
                    &json!({"domains": domains, "next": next.flatten()}),
                )
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
        }
    }

    fn get(&self, domain: &str, query: &str) -> Answer {
        let wanted = match query_value(query, "revision").map(str::parse::<u64>) {
            Some(Ok(r)) => Some(r),
            Some(Err(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_revision",
                    "revision=N, a number".to_owned(),
                )
            }
            None => None,
        };
        let current = self.shared.table().get(domain).cloned();
        let revision = match (wanted, &current) {
            (Some(r), _) => r,
            (None, Some(c)) if !c.removed => c.revision,
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("{domain} has no policy"),
                )
            }
        };
        match self.shared.store.revision(domain, revision) {
            Ok(Some(found)) if !found.document.is_empty() => {
                let mut r = Response::new(Full::new(Bytes::from(found.document)));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                with_etag(r, revision)
            }
            Ok(_) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{domain} has no policy at revision {revision}"),
            ),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
        }
    }

    fn history(&self, domain: &str) -> Answer {
        match self.shared.store.history(domain) {
            Ok(revisions) if revisions.is_empty() => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{domain} was never written"),
            ),
            Ok(revisions) => {
                let list: Vec<Value> = revisions
                    .iter()
                    .rev()
                    .map(|r| {
                        json!({"revision": r.revision, "version": r.seq, "at_ms": r.at_ms, "source": r.source, "removed": r.document.is_empty()})
                    })
                    .collect();
                respond(
                    StatusCode::OK,
                    &json!({"domain": domain, "revisions": list}),
                )
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
        }
    }

    async fn put(&self, request: Request<Incoming>, domain: &str, query: &str) -> Answer {
        let precondition = match precondition(&request) {
            Ok(p) => p,
            Err(e) => return e.response(),
        };
        let bytes = match body(request, MAX_POLICY_BYTES).await {
            Ok(b) => b,
            Err(e) => return e.response(),
        };
        let policy = match self.settings().validate("api", Some(domain), &bytes) {
            Ok(p) => p,
            Err(refusal) => return refused(&refusal),
        };
        if flag(query, "dry_run") {
            let clusters: Vec<&String> = policy.clusters.iter().map(|(n, _)| n).collect();
            return respond(
                StatusCode::OK,
                &json!({"domain": domain, "valid": true, "dry_run": true, "document": policy.document, "clusters": clusters}),
            );
        }
        let request = WriteRequest {
            domain: domain.to_owned(),
            policy: Some(policy),
            source: "api".to_owned(),
            precondition,
        };
        match self.shared.write(request).await {
            Ok(outcome) => written(outcome, domain),
            Err(refusal) => write_refused(refusal, domain),
        }
    }

    async fn delete(&self, request: &Request<Incoming>, domain: &str) -> Answer {
        let precondition = match precondition(request) {
            Ok(p) => p,
            Err(e) => return e.response(),
        };
        let request = WriteRequest {
            domain: domain.to_owned(),
            policy: None,
            source: "api".to_owned(),
            precondition,
        };
        match self.shared.write(request).await {
            Ok(outcome) => written(outcome, domain),
            Err(refusal) => write_refused(refusal, domain),
        }
    }

    /// A new revision with an earlier revision's document, checked again
    /// under today's settings.
    async fn rollback(&self, request: Request<Incoming>, domain: &str, query: &str) -> Answer {
        let precondition = match precondition(&request) {
            Ok(p) => p,
            Err(e) => return e.response(),
        };
        let bytes = match body(request, 4096).await {
            Ok(b) => b,
            Err(e) => return e.response(),
        };
        let to = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["revision"].as_u64());
        let Some(to) = to else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_rollback",
                "send {\"revision\": N}, a revision GET /v1/domains/DOMAIN/history lists"
                    .to_owned(),
            );
        };
        let earlier = match self.shared.store.revision(domain, to) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("{domain} has no revision {to}"),
                )
            }
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string()),
        };
        let policy = if earlier.document.is_empty() {
            None
        } else {
            match self.settings().validate(
                &format!("rollback:{to}"),
                Some(domain),
                earlier.document.as_bytes(),
            ) {
                Ok(p) => Some(p),
                Err(refusal) => return refused(&refusal),
            }
        };
        if flag(query, "dry_run") {
            return respond(
                StatusCode::OK,
                &json!({"domain": domain, "valid": true, "dry_run": true, "revision": to}),
            );
        }
        let request = WriteRequest {
            domain: domain.to_owned(),
            policy,
            source: format!("rollback:{to}"),
            precondition,
        };
        match self.shared.write(request).await {
            Ok(outcome) => written(outcome, domain),
            Err(refusal) => write_refused(refusal, domain),
        }
    }

    /// `POST /v1/import`: one policy per line (NDJSON). Each is checked on
    /// its own; the valid ones are written, the others reported by line.
    async fn import(&self, request: Request<Incoming>, query: &str) -> Answer {
        let bytes = match body(request, MAX_IMPORT_BYTES).await {
            Ok(b) => b,
            Err(e) => return e.response(),
        };
        let settings = self.settings();
        let mut writes = Vec::new();
        let mut rejected = Vec::new();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match settings.validate(&format!("import line {}", i + 1), None, line) {
                Ok(policy) => writes.push(WriteRequest {
                    domain: policy.domain.clone(),
                    policy: Some(policy),
                    source: "import".to_owned(),
                    precondition: Precondition::None,
                }),
                Err(refusal) => rejected.push(json!({"line": i + 1, "domain": refusal.domain, "findings": refusal.findings()})),
            }
        }
        let valid = writes.len();
        if flag(query, "dry_run") {
            return respond(
                StatusCode::OK,
                &json!({"dry_run": true, "valid": valid, "rejected": rejected}),
            );
        }
        let domains: Vec<String> = writes.iter().map(|w| w.domain.clone()).collect();
        let outcomes = self.shared.write_all(writes).await;
        let (mut written, mut unchanged, mut version) = (0, 0, 0);
        for (domain, outcome) in domains.iter().zip(outcomes) {
            match outcome {
                Ok(WriteOutcome::Written { seq, .. }) => {
                    written += 1;
                    version = version.max(seq);
                }
                Ok(WriteOutcome::Unchanged { seq, .. }) => {
                    unchanged += 1;
                    version = version.max(seq);
                }
                Err(refusal) => {
                    rejected.push(json!({"domain": domain, "error": refusal.to_string()}))
                }
            }
        }
        let status = if rejected.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::MULTI_STATUS
        };
        respond(
            status,
            &json!({"written": written, "unchanged": unchanged, "rejected": rejected, "version": version}),
        )
    }
}

/// A node's xDS as the ADS server knows it: per type (short name), the
/// target, sent and ACKed versions and the last NACK with Envoy's message.
fn xds_status(node: &origin_policy_xds::NodeStatus) -> Value {
    let types: serde_json::Map<String, Value> = node
        .types
        .iter()
        .map(|(type_url, t)| {
            let nack = t
                .nack
                .as_ref()
                .map(|n| json!({"version": n.version, "message": n.message}));
            (
                crate::ads::short_type(type_url).to_owned(),
                json!({"target": t.target, "sent": t.sent, "acked": t.acked, "nack": nack}),
            )
        })
        .collect();
    json!({
        "connected": node.connected,
        "connections": node.connections,
        "metadata": node.metadata,
        "types": types,
    })
}
