//! The object store a domain is mirrored into, and the run's bookkeeping.
//!
//! Every object is written whole or not at all: a local directory through
//! the store's staging file and rename, S3 through its atomic PUT or
//! multipart completion. The headers that describe a body travel with it in
//! the same object: as the object's own headers where the store keeps them
//! (S3 serves `Content-Type`, `Content-Encoding`, `Content-Language`,
//! `Content-Disposition`, `Cache-Control` and `Expires` as given; the
//! origin's validators go along as `origin-*` metadata, S3 making its own), as
//! a one-line JSON head before the body where it does not (a local
//! directory, served by `mirror-serve`).
//!
//! The bookkeeping lists every mirrored path: it lives where the edge never
//! reads, `.origin-policy/` of a local store (which `mirror-serve` never
//! serves) or a separate location (`--state`) for a bucket.

use crate::error::{MirrorError, StoreError};
use crate::resources::ResourcePath;
use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectKey;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use reqwest::header::{HeaderMap, HeaderValue, EXPIRES, USER_AGENT};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;

/// The bookkeeping in a local store, beside the objects (never served).
pub const MANIFEST_KEY: &str = ".origin-policy/mirror.json";
/// The bookkeeping in a `--state` location of its own.
const STATE_MANIFEST_KEY: &str = "mirror.json";
/// A stored head line is at most this long; anything longer is not ours.
pub(crate) const MAX_HEAD_LINE: usize = 16 * 1024;
/// Sent to the origin and to the store.
pub const USER_AGENT_VALUE: &str = concat!("origin-policy-mirror/", env!("CARGO_PKG_VERSION"));

/// The response headers that describe the body: kept with it and served
/// again with it, by `mirror-serve` as they came; by a bucket as its own
/// headers, except the validators (`origin-etag`, `origin-last-modified`
/// metadata: a bucket answers with validators of its own).
pub const KEPT_HEADERS: [&str; 8] = [
    "content-type",
    "content-encoding",
    "content-language",
    "content-disposition",
    "cache-control",
    "expires",
    "etag",
    "last-modified",
];

/// Headers that are lists: several fields are one value, comma-separated.
const LIST_HEADERS: [&str; 3] = ["content-encoding", "content-language", "cache-control"];

/// The object metadata the origin's `Expires` is stored as; the store client
/// also sends it as the object's `Expires` (see [`ExpiresFromMetadata`]).
const ORIGIN_EXPIRES_METADATA: &str = "origin-expires";

/// The origin's answer, as kept with the body and served again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredHead {
    pub status: u16,
    /// `(name, value)` in the order of [`KEPT_HEADERS`], each at most once.
    headers: Vec<(&'static str, String)>,
}

impl StoredHead {
    pub fn from_response(status: u16, headers: &HeaderMap) -> Self {
        let mut kept = Vec::new();
        for name in KEPT_HEADERS {
            let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
            let value = if LIST_HEADERS.contains(&name) {
                let all: Vec<&str> = values.collect();
                (!all.is_empty()).then(|| all.join(", "))
            } else {
                values.next().map(str::to_owned)
            };
            if let Some(v) = value {
                kept.push((name, v));
            }
        }
        StoredHead {
            status,
            headers: kept,
        }
    }

    /// A head with these headers (names from [`KEPT_HEADERS`]; others are dropped).
    pub fn with_headers<'a>(
        status: u16,
        given: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let given: Vec<(&str, &str)> = given.into_iter().collect();
        let headers = KEPT_HEADERS
            .into_iter()
            .filter_map(|name| {
                given
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| (name, (*v).to_owned()))
            })
            .collect();
        StoredHead { status, headers }
    }

    /// One kept header's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `(header name, value)` for every header the origin gave.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.headers.iter().map(|(n, v)| (*n, v.as_str()))
    }

    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("status".to_owned(), json!(self.status));
        for (name, value) in self.headers() {
            map.insert(name.to_owned(), json!(value));
        }
        Value::Object(map)
    }

    pub fn from_json(value: &Value) -> Option<Self> {
        let status = u16::try_from(value.get("status")?.as_u64()?).ok()?;
        let headers = KEPT_HEADERS
            .into_iter()
            .filter_map(|name| {
                let v = value.get(name).and_then(Value::as_str)?;
                Some((name, v.to_owned()))
            })
            .collect();
        Some(StoredHead { status, headers })
    }

    /// The head line a local object starts with.
    pub fn envelope_line(&self) -> Vec<u8> {
        let mut line = self.to_json().to_string().into_bytes();
        line.push(b'\n');
        line
    }

    pub fn from_envelope_line(line: &[u8]) -> Result<Self, String> {
        let value: Value =
            serde_json::from_slice(line).map_err(|e| format!("not a stored head: {e}"))?;
        StoredHead::from_json(&value).ok_or_else(|| "not a stored head".to_owned())
    }

    fn attributes(&self) -> Attributes {
        let mut attrs = Attributes::new();
        for (name, value) in self.headers() {
            let attr = match name {
                "content-type" => Attribute::ContentType,
                "content-encoding" => Attribute::ContentEncoding,
                "content-language" => Attribute::ContentLanguage,
                "content-disposition" => Attribute::ContentDisposition,
                "cache-control" => Attribute::CacheControl,
                // S3 has no attribute for these: metadata, `origin-expires`
                // also sent as the object's `Expires`.
                other => Attribute::Metadata(format!("origin-{other}").into()),
            };
            attrs.insert(attr, value.to_owned().into());
        }
        attrs.insert(
            Attribute::Metadata("origin-status".into()),
            self.status.to_string().into(),
        );
        attrs
    }
}

/// What the mirror knows of one stored resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub head: StoredHead,
    /// Body bytes.
    pub size: u64,
    /// Unix seconds the body was stored, and last confirmed current.
    pub stored_at: u64,
    pub checked_at: u64,
    /// Unix seconds since which the path is gone from the list or answers 404.
    pub missing_since: Option<u64>,
}

/// Every resource the store holds for one domain, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub domain: String,
    pub entries: BTreeMap<String, ManifestEntry>,
}

impl Manifest {
    pub fn stored_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.size).sum()
    }

    fn to_json(&self) -> Value {
        let entries: Map<String, Value> = self
            .entries
            .iter()
            .map(|(path, e)| {
                (
                    path.clone(),
                    json!({
                        "head": e.head.to_json(),
                        "size": e.size,
                        "stored_at": e.stored_at,
                        "checked_at": e.checked_at,
                        "missing_since": e.missing_since,
                    }),
                )
            })
            .collect();
        json!({"domain": self.domain, "resources": entries})
    }

    fn from_json(value: &Value) -> Option<Self> {
        let mut entries = BTreeMap::new();
        for (path, e) in value.get("resources")?.as_object()? {
            entries.insert(
                path.clone(),
                ManifestEntry {
                    head: StoredHead::from_json(e.get("head")?)?,
                    size: e.get("size")?.as_u64()?,
                    stored_at: e.get("stored_at")?.as_u64()?,
                    checked_at: e.get("checked_at")?.as_u64()?,
                    missing_since: e.get("missing_since").and_then(Value::as_u64),
                },
            );
        }
        Some(Manifest {
            domain: value.get("domain")?.as_str()?.to_owned(),
            entries,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Head line, then body, in one object (stores without attributes).
    Envelope,
    /// Head as the object's attributes (S3 and compatibles).
    Attributes,
}

/// Where the run's bookkeeping is kept.
#[derive(Debug, Clone)]
struct Bookkeeping {
    store: Arc<dyn ObjectStore>,
    key: ObjectKey,
    /// As given, for messages.
    location: String,
}

/// Where one domain's copy lives.
#[derive(Debug, Clone)]
pub struct MirrorStore {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    bookkeeping: Bookkeeping,
    /// The bookkeeping an older version kept inside a bucket, where the edge
    /// could read it: read once if the state has none, then deleted.
    legacy_manifest: Option<Arc<AtomicBool>>,
    /// As given, for messages.
    pub location: String,
}

/// A store location as written: a directory or `s3://BUCKET[/PREFIX]`.
enum Location {
    Directory(PathBuf),
    Bucket { bucket: String, prefix: String },
}

impl Location {
    fn parse(spec: &str) -> Result<Self, String> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err("no bucket: s3://BUCKET[/PREFIX]".to_owned());
            }
            return Ok(Location::Bucket {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        Ok(Location::Directory(PathBuf::from(
            spec.strip_prefix("file://").unwrap_or(spec),
        )))
    }

    fn open(&self) -> Result<Arc<dyn ObjectStore>, String> {
        match self {
            Location::Directory(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                let local = LocalFileSystem::new_with_prefix(dir).map_err(|e| e.to_string())?;
                Ok(Arc::new(local))
            }
            Location::Bucket { bucket, prefix } => {
                let store = s3_builder()?
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok(if prefix.is_empty() {
                    Arc::new(store)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(
                        store,
                        prefix.as_str(),
                    ))
                })
            }
        }
    }

    /// Whether `other` is this location or inside it.
    fn contains(&self, other: &Location) -> bool {
        match (self, other) {
            (
                Location::Bucket { bucket, prefix },
                Location::Bucket {
                    bucket: b,
                    prefix: p,
                },
            ) => {
                bucket == b
                    && (prefix.is_empty() || p == prefix || p.starts_with(&format!("{prefix}/")))
            }
            _ => false,
        }
    }
}

/// Retries of a store request: a few, within seconds, so that a run on a
/// store that is down stops and says so soon instead of after minutes.
const STORE_RETRIES: usize = 4;
const STORE_RETRY_WITHIN: Duration = Duration::from_secs(20);

/// The `AWS_*` environment, with what a mirror needs on top: an explicit
/// `http://` endpoint is allowed (`AWS_ALLOW_HTTP` only matters when set),
/// our retries, and the store client that sends `Expires` and our User-Agent.
fn s3_builder() -> Result<AmazonS3Builder, String> {
    crate::origin::install_tls_provider();
    let mut builder = AmazonS3Builder::from_env();
    let endpoint = builder
        .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
        .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint));
    // Only an explicit AWS_ALLOW_HTTP overrides (the builder reports its
    // default, false, as a value).
    let allow_http = std::env::var("AWS_ALLOW_HTTP").ok();
    if let Some(endpoint) = endpoint.filter(|e| e.starts_with("http://")) {
        match allow_http.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => builder = builder.with_allow_http(true),
            Some("false" | "0" | "no" | "off") => {
                return Err(format!(
                    "the endpoint {endpoint} is http:// but AWS_ALLOW_HTTP forbids it: unset AWS_ALLOW_HTTP or use an https:// endpoint"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(builder
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: STORE_RETRIES,
            retry_timeout: STORE_RETRY_WITHIN,
        })
        .with_http_connector(MirrorStoreClient))
}

/// The HTTP client of an S3 store: object_store's, plus the headers it has
/// no attribute for.
#[derive(Debug, Default)]
struct MirrorStoreClient;

impl HttpConnector for MirrorStoreClient {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(ExpiresFromMetadata(inner)))
    }
}

/// Sends the origin's `Expires`, carried as metadata, as the object's own
/// `Expires` header too, which S3 keeps and serves back. Added after the
/// request is signed: S3 requires only `Host` and `x-amz-*` to be signed.
#[derive(Debug)]
struct ExpiresFromMetadata(HttpClient);

#[async_trait]
impl HttpService for ExpiresFromMetadata {
    async fn call(&self, mut request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let metadata = format!("x-amz-meta-{ORIGIN_EXPIRES_METADATA}");
        if let Some(value) = request.headers().get(metadata.as_str()).cloned() {
            request.headers_mut().insert(EXPIRES, value);
        }
        request
            .headers_mut()
            .insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        self.0.execute(request).await
    }
}

/// Why the store refused, and whether it refuses as a whole (unreachable,
/// no space left): the next objects would meet the same refusal.
pub(crate) fn store_error(e: &object_store::Error) -> StoreError {
    let mut store_wide = false;
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if let Some(http) = c.downcast_ref::<HttpError>() {
            store_wide |= matches!(
                http.kind(),
                HttpErrorKind::Connect | HttpErrorKind::Timeout | HttpErrorKind::Interrupted
            );
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            store_wide |= io.kind() == std::io::ErrorKind::StorageFull;
        }
        cause = c.source();
    }
    StoreError {
        why: with_root_cause(e),
        store_wide,
    }
}

/// The error, and the cause at the bottom of its chain when the message
/// does not say it (object_store's "error sending request" hides
/// "Connection refused").
fn with_root_cause(e: &dyn std::error::Error) -> String {
    let message = e.to_string();
    let mut root = e.source();
    while let Some(next) = root.and_then(std::error::Error::source) {
        root = Some(next);
    }
    match root.map(ToString::to_string) {
        Some(cause) if !message.contains(&cause) => format!("{message}: {cause}"),
        _ => message,
    }
}

impl MirrorStore {
    /// A directory (`run/mirror/static.example.com`, `file:///…`) or an
    /// S3-compatible bucket (`s3://bucket/prefix`; credentials, region and
    /// endpoint from the usual `AWS_*` variables), and where the bookkeeping
    /// goes: `state` (a directory or `s3://…`), by default `.origin-policy/`
    /// of a directory store. A bucket needs a `state` of its own: what it
    /// holds, the edge serves to anyone.
    pub fn open(spec: &str, state: Option<&str>) -> Result<Self, MirrorError> {
        let fail = |location: &str, why: String| MirrorError::Store {
            location: location.to_owned(),
            why,
        };
        let location = Location::parse(spec).map_err(|why| fail(spec, why))?;
        let store = location.open().map_err(|why| fail(spec, why))?;
        let layout = match location {
            Location::Directory(_) => Layout::Envelope,
            Location::Bucket { .. } => Layout::Attributes,
        };
        let bookkeeping = match state {
            None if layout == Layout::Attributes => {
                return Err(fail(
                    spec,
                    "a bucket needs --state DIR|s3://BUCKET/PREFIX for the run's bookkeeping, outside what the edge reads (it lists every mirrored path)".to_owned(),
                ))
            }
            None => Bookkeeping {
                store: store.clone(),
                key: ObjectKey::from(MANIFEST_KEY),
                location: format!("{spec}/{MANIFEST_KEY}"),
            },
            Some(state_spec) => {
                let state_location =
                    Location::parse(state_spec).map_err(|why| fail(state_spec, why))?;
                if location.contains(&state_location) {
                    return Err(fail(
                        state_spec,
                        format!("--state is inside the store {spec}: the edge would serve the bookkeeping; give another bucket or a directory"),
                    ));
                }
                Bookkeeping {
                    store: state_location.open().map_err(|why| fail(state_spec, why))?,
                    key: ObjectKey::from(STATE_MANIFEST_KEY),
                    location: format!("{}/{STATE_MANIFEST_KEY}", state_spec.trim_end_matches('/')),
                }
            }
        };
        Ok(MirrorStore {
            store,
            layout,
            legacy_manifest: (layout == Layout::Attributes)
                .then(|| Arc::new(AtomicBool::new(false))),
            bookkeeping,
            location: spec.to_owned(),
        })
    }

    fn state_error(&self, why: impl std::fmt::Display) -> MirrorError {
        MirrorError::Store {
            location: self.bookkeeping.location.clone(),
            why: why.to_string(),
        }
    }

    fn state_store_error(&self, e: &object_store::Error) -> MirrorError {
        self.state_error(with_root_cause(e))
    }

    /// The object a path is stored as: in a bucket, the key the edge's
    /// request names (the path `%`-decoded, as S3 decodes it); in a
    /// directory, a file name `mirror-serve` finds from the same path.
    pub fn key(&self, path: &ResourcePath) -> ObjectKey {
        match self.layout {
            Layout::Attributes => path.bucket_key(),
            Layout::Envelope => path.key(),
        }
    }

    async fn read_manifest(
        &self,
        store: &Arc<dyn ObjectStore>,
        key: &ObjectKey,
    ) -> Result<Option<Manifest>, MirrorError> {
        let bytes = match store.get(key).await {
            Ok(got) => got.bytes().await.map_err(|e| self.state_store_error(&e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.state_store_error(&e)),
        };
        serde_json::from_slice::<Value>(&bytes)
            .ok()
            .as_ref()
            .and_then(Manifest::from_json)
            .map(Some)
            .ok_or_else(|| {
                self.state_error(
                    "not a mirror manifest; remove it to mirror from scratch".to_owned(),
                )
            })
    }

    /// The bookkeeping of previous runs; empty for a new store.
    pub async fn load_manifest(&self, domain: &str) -> Result<Manifest, MirrorError> {
        let mut found = self
            .read_manifest(&self.bookkeeping.store, &self.bookkeeping.key)
            .await?;
        if let (None, Some(legacy)) = (&found, &self.legacy_manifest) {
            found = self
                .read_manifest(&self.store, &ObjectKey::from(MANIFEST_KEY))
                .await?;
            legacy.store(found.is_some(), Ordering::Relaxed);
        }
        let manifest = found.unwrap_or_else(|| Manifest {
            domain: domain.to_owned(),
            entries: BTreeMap::new(),
        });
        if manifest.domain != domain {
            return Err(self.state_error(format!(
                "holds the mirror of {}, not {domain}: one store (or prefix) per domain",
                manifest.domain
            )));
        }
        Ok(manifest)
    }

    pub async fn save_manifest(&self, manifest: &Manifest) -> Result<(), MirrorError> {
        let body = manifest.to_json().to_string();
        self.bookkeeping
            .store
            .put(&self.bookkeeping.key, PutPayload::from(body))
            .await
            .map_err(|e| self.state_store_error(&e))?;
        if let Some(legacy) = self
            .legacy_manifest
            .as_ref()
            .filter(|l| l.load(Ordering::Relaxed))
        {
            self.delete(&ObjectKey::from(MANIFEST_KEY))
                .await
                .map_err(|e| {
                    self.state_error(format!(
                        "the old bookkeeping in the bucket ({MANIFEST_KEY}) is not deleted: {e}"
                    ))
                })?;
            legacy.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A writer for one object; nothing is visible until [`ObjectWriter::commit`].
    pub async fn writer(
        &self,
        key: ObjectKey,
        head: &StoredHead,
    ) -> Result<ObjectWriter, StoreError> {
        let writer = BufWriter::with_capacity(self.store.clone(), key, 8 << 20);
        let mut writer = ObjectWriter {
            inner: match self.layout {
                Layout::Attributes => writer.with_attributes(head.attributes()),
                Layout::Envelope => writer,
            },
        };
        if self.layout == Layout::Envelope {
            let line = head.envelope_line();
            // mirror-serve reads no further for a head.
            if line.len() > MAX_HEAD_LINE {
                return Err(StoreError {
                    why: format!(
                        "the origin's headers take {} bytes stored, over {MAX_HEAD_LINE}",
                        line.len()
                    ),
                    store_wide: false,
                });
            }
            writer.write(Bytes::from(line)).await?;
        }
        Ok(writer)
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(&e)),
        }
    }
}

/// One object being written.
pub struct ObjectWriter {
    inner: BufWriter,
}

impl ObjectWriter {
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        self.inner.put(bytes).await.map_err(|e| store_error(&e))
    }

    /// Makes the object visible, whole.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        self.inner.shutdown().await.map_err(|e| io_store_error(&e))
    }

    /// Drops what was written; the previous object, if any, stays.
    pub async fn abort(mut self) {
        // Best effort. A staging file left behind is never served; an S3
        // multipart upload left behind is removed by the bucket's
        // AbortIncompleteMultipartUpload lifecycle rule (README).
        let _ = self.inner.abort().await;
    }
}

/// `BufWriter::shutdown` reports through `std::io::Error`, wrapping the store's.
fn io_store_error(e: &std::io::Error) -> StoreError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<object_store::Error>())
    {
        Some(inner) => store_error(inner),
        None => StoreError {
            why: e.to_string(),
            store_wide: e.kind() == std::io::ErrorKind::StorageFull,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_survives_its_envelope_line() {
        let mut origin = HeaderMap::new();
        for (name, value) in [
            ("content-type", "text/css"),
            ("content-encoding", "gzip"),
            ("cache-control", "max-age=300"),
            ("cache-control", "public"),
            ("etag", "\"abc\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
            ("set-cookie", "a=b"),
        ] {
            origin.append(name, HeaderValue::from_static(value));
        }
        let head = StoredHead::from_response(200, &origin);
        assert_eq!(head.get("cache-control"), Some("max-age=300, public"));
        assert_eq!(head.get("content-encoding"), Some("gzip"));
        assert_eq!(head.get("set-cookie"), None);
        let line = head.envelope_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(StoredHead::from_envelope_line(&line), Ok(head));
        assert!(StoredHead::from_envelope_line(b"<html>").is_err());
    }

    #[test]
    fn a_bucket_gets_the_body_headers_as_its_own_and_the_validators_as_metadata() {
        let head = StoredHead::with_headers(
            200,
            [
                ("content-type", "text/html"),
                ("content-disposition", "inline"),
                ("expires", "Thu, 01 Dec 2033 16:00:00 GMT"),
                ("etag", "\"v1\""),
            ],
        );
        let attrs = head.attributes();
        let get = |a: Attribute| attrs.get(&a).map(|v| v.as_ref().to_owned());
        assert_eq!(get(Attribute::ContentType).as_deref(), Some("text/html"));
        assert_eq!(
            get(Attribute::ContentDisposition).as_deref(),
            Some("inline")
        );
        assert_eq!(
            get(Attribute::Metadata("origin-expires".into())).as_deref(),
            Some("Thu, 01 Dec 2033 16:00:00 GMT")
        );
        assert_eq!(
            get(Attribute::Metadata("origin-etag".into())).as_deref(),
            Some("\"v1\"")
        );
        assert_eq!(
            get(Attribute::Metadata("origin-status".into())).as_deref(),
            Some("200")
        );
    }

    #[test]
    fn a_bucket_needs_its_bookkeeping_elsewhere() {
        let err = |store: &str, state: Option<&str>| {
            MirrorStore::open(store, state).err().map(|e| e.to_string())
        };
        assert!(err("s3://mirror", None).is_some_and(|e| e.contains("needs --state")));
        for inside in ["s3://mirror", "s3://mirror/state", "s3://mirror/"] {
            assert!(
                err("s3://mirror", Some(inside)).is_some_and(|e| e.contains("inside the store")),
                "{inside}"
            );
        }
        assert!(err("s3://mirror/site", Some("s3://mirror/site/state"))
            .is_some_and(|e| e.contains("inside the store")));
        assert!(err("s3://mirror/site", Some("s3://mirror/state")).is_none());
        assert!(err("s3://mirror", Some("s3://mirror-state/static.example.com")).is_none());
    }

    #[tokio::test]
    async fn a_bucket_that_refuses_connections_is_unavailable_as_a_whole() {
        // A port nothing listens on; the endpoint as given, http:// and all.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"));
        std::env::set_var("AWS_ACCESS_KEY_ID", "key");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "secret");
        std::env::remove_var("AWS_ALLOW_HTTP");
        let store = MirrorStore::open("s3://mirror", Some("s3://mirror-state/x")).unwrap();
        let key = ResourcePath::parse("/a.txt").unwrap().bucket_key();
        let mut w = store.writer(key, &StoredHead::default()).await.unwrap();
        w.write(Bytes::from_static(b"a")).await.unwrap();
        let refused = w.commit().await.unwrap_err();
        assert!(refused.store_wide, "{refused}");
        assert!(refused.why.contains("Connection refused"), "{refused}");
        let err = store.load_manifest("x.example.com").await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("store s3://mirror-state/x/mirror.json: "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_local_store_writes_whole_objects_and_keeps_its_manifest() {
        let dir = std::env::temp_dir().join(format!("mirror-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = MirrorStore::open(&dir.display().to_string(), None).unwrap();
        let head = StoredHead {
            status: 200,
            ..StoredHead::default()
        };
        let key = ObjectKey::from("a/b.txt");
        let mut w = store.writer(key.clone(), &head).await.unwrap();
        w.write(Bytes::from_static(b"hello")).await.unwrap();
        assert!(!dir.join("a/b.txt").exists(), "visible before commit");
        w.commit().await.unwrap();
        let text = std::fs::read(dir.join("a/b.txt")).unwrap();
        assert!(text.ends_with(b"\nhello"));

        let mut aborted = store.writer(key.clone(), &head).await.unwrap();
        aborted.write(Bytes::from_static(b"torn")).await.unwrap();
        aborted.abort().await;
        assert_eq!(std::fs::read(dir.join("a/b.txt")).unwrap(), text);

        let mut m = store.load_manifest("x.example.com").await.unwrap();
        assert!(m.entries.is_empty());
        m.entries.insert(
            "/a/b.txt".into(),
            ManifestEntry {
                head,
                size: 5,
                stored_at: 1,
                checked_at: 2,
                missing_since: Some(3),
            },
        );
        store.save_manifest(&m).await.unwrap();
        assert!(dir.join(MANIFEST_KEY).exists());
        assert_eq!(store.load_manifest("x.example.com").await.unwrap(), m);
        assert!(store.load_manifest("y.example.com").await.is_err());

        // A state directory of its own holds the bookkeeping instead.
        let state = dir.with_extension("state");
        let _ = std::fs::remove_dir_all(&state);
        let apart = MirrorStore::open(
            &dir.display().to_string(),
            Some(&state.display().to_string()),
        )
        .unwrap();
        assert!(apart
            .load_manifest("x.example.com")
            .await
            .unwrap()
            .entries
            .is_empty());
        apart.save_manifest(&m).await.unwrap();
        assert!(state.join(STATE_MANIFEST_KEY).exists());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&state);
    }
}
