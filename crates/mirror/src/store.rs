//! The object store a domain is mirrored into, and the run's bookkeeping.
//!
//! Every object is written whole or not at all: a local directory through
//! the store's staging file and rename, S3 through its atomic PUT or
//! multipart completion. The response headers travel with the body in the
//! same object: as the object's attributes where the store keeps them (S3
//! serves `Content-Type` and `Cache-Control` as its own; the origin's
//! validators and `Expires` go along as `origin-*` metadata), as a one-line
//! JSON head before the body where it does not (a local directory, served by
//! `mirror-serve`).

use crate::error::MirrorError;
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectKey;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt, PutPayload};
use reqwest::header::HeaderMap;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncWriteExt as _;

/// The run's bookkeeping, beside the objects.
pub const MANIFEST_KEY: &str = ".origin-policy/mirror.json";
/// A stored head line is at most this long; anything longer is not ours.
pub(crate) const MAX_HEAD_LINE: usize = 16 * 1024;

/// The origin's answer, as kept with the body and served again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredHead {
    pub status: u16,
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub expires: Option<String>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

const HEAD_FIELDS: [&str; 5] = [
    "content-type",
    "cache-control",
    "expires",
    "etag",
    "last-modified",
];

impl StoredHead {
    pub fn from_response(status: u16, headers: &HeaderMap) -> Self {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        StoredHead {
            status,
            content_type: get("content-type"),
            cache_control: get("cache-control"),
            expires: get("expires"),
            etag: get("etag"),
            last_modified: get("last-modified"),
        }
    }

    fn fields(&self) -> [Option<&String>; 5] {
        [
            self.content_type.as_ref(),
            self.cache_control.as_ref(),
            self.expires.as_ref(),
            self.etag.as_ref(),
            self.last_modified.as_ref(),
        ]
    }

    /// `(header name, value)` for every header the origin gave.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        HEAD_FIELDS
            .into_iter()
            .zip(self.fields())
            .filter_map(|(name, value)| value.map(|v| (name, v.as_str())))
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
        let text = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        Some(StoredHead {
            status: u16::try_from(value.get("status")?.as_u64()?).ok()?,
            content_type: text("content-type"),
            cache_control: text("cache-control"),
            expires: text("expires"),
            etag: text("etag"),
            last_modified: text("last-modified"),
        })
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
        let mut put = |attr: Attribute, value: &Option<String>| {
            if let Some(v) = value {
                attrs.insert(attr, v.clone().into());
            }
        };
        put(Attribute::ContentType, &self.content_type);
        put(Attribute::CacheControl, &self.cache_control);
        put(Attribute::Metadata("origin-expires".into()), &self.expires);
        put(Attribute::Metadata("origin-etag".into()), &self.etag);
        put(
            Attribute::Metadata("origin-last-modified".into()),
            &self.last_modified,
        );
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

/// Where one domain's copy lives.
#[derive(Debug, Clone)]
pub struct MirrorStore {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    /// As given, for messages.
    pub location: String,
}

impl MirrorStore {
    /// A directory (`run/mirror/static.example.com`, `file:///…`) or an
    /// S3-compatible bucket (`s3://bucket/prefix`; credentials, region and
    /// endpoint from the usual `AWS_*` variables).
    pub fn open(spec: &str) -> Result<Self, MirrorError> {
        let fail = |why: String| MirrorError::Store {
            location: spec.to_owned(),
            why,
        };
        if spec.starts_with("s3://") {
            let store = AmazonS3Builder::from_env()
                .with_url(spec)
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let prefix = spec
                .trim_start_matches("s3://")
                .split_once('/')
                .map(|(_, p)| p.trim_matches('/').to_owned())
                .unwrap_or_default();
            let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(store)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    store,
                    prefix.as_str(),
                ))
            };
            return Ok(MirrorStore {
                store,
                layout: Layout::Attributes,
                location: spec.to_owned(),
            });
        }
        let dir = PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec));
        std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        let local = LocalFileSystem::new_with_prefix(&dir).map_err(|e| fail(e.to_string()))?;
        Ok(MirrorStore {
            store: Arc::new(local),
            layout: Layout::Envelope,
            location: spec.to_owned(),
        })
    }

    fn error(&self, why: impl std::fmt::Display) -> MirrorError {
        MirrorError::Store {
            location: self.location.clone(),
            why: why.to_string(),
        }
    }

    /// The bookkeeping of previous runs; empty for a new store.
    pub async fn load_manifest(&self, domain: &str) -> Result<Manifest, MirrorError> {
        let key = ObjectKey::from(MANIFEST_KEY);
        let bytes = match self.store.get(&key).await {
            Ok(got) => got.bytes().await.map_err(|e| self.error(e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Manifest {
                    domain: domain.to_owned(),
                    entries: BTreeMap::new(),
                })
            }
            Err(e) => return Err(self.error(e)),
        };
        let manifest = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .as_ref()
            .and_then(Manifest::from_json)
            .ok_or_else(|| {
                self.error(format!(
                    "{MANIFEST_KEY} is not a mirror manifest; remove it to mirror from scratch"
                ))
            })?;
        if manifest.domain != domain {
            return Err(self.error(format!(
                "holds the mirror of {}, not {domain}: one store (or prefix) per domain",
                manifest.domain
            )));
        }
        Ok(manifest)
    }

    pub async fn save_manifest(&self, manifest: &Manifest) -> Result<(), MirrorError> {
        let body = manifest.to_json().to_string();
        self.store
            .put(&ObjectKey::from(MANIFEST_KEY), PutPayload::from(body))
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }

    /// A writer for one object; nothing is visible until [`ObjectWriter::commit`].
    pub async fn writer(&self, key: ObjectKey, head: &StoredHead) -> Result<ObjectWriter, String> {
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
                return Err(format!(
                    "the origin's headers take {} bytes stored, over {MAX_HEAD_LINE}",
                    line.len()
                ));
            }
            writer.write(Bytes::from(line)).await?;
        }
        Ok(writer)
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), String> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// One object being written.
pub struct ObjectWriter {
    inner: BufWriter,
}

impl ObjectWriter {
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), String> {
        self.inner.put(bytes).await.map_err(|e| e.to_string())
    }

    /// Makes the object visible, whole.
    pub async fn commit(mut self) -> Result<(), String> {
        self.inner.shutdown().await.map_err(|e| e.to_string())
    }

    /// Drops what was written; the previous object, if any, stays.
    pub async fn abort(mut self) {
        // Best effort. A staging file left behind is never served; an S3
        // multipart upload left behind is removed by the bucket's
        // AbortIncompleteMultipartUpload lifecycle rule (README).
        let _ = self.inner.abort().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_survives_its_envelope_line() {
        let head = StoredHead {
            status: 200,
            content_type: Some("text/css".into()),
            cache_control: Some("max-age=300".into()),
            expires: None,
            etag: Some("\"abc\"".into()),
            last_modified: Some("Tue, 01 Dec 2026 10:00:00 GMT".into()),
        };
        let line = head.envelope_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(StoredHead::from_envelope_line(&line), Ok(head));
        assert!(StoredHead::from_envelope_line(b"<html>").is_err());
    }

    #[tokio::test]
    async fn a_local_store_writes_whole_objects_and_keeps_its_manifest() {
        let dir = std::env::temp_dir().join(format!("mirror-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = MirrorStore::open(&dir.display().to_string()).unwrap();
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
        assert_eq!(store.load_manifest("x.example.com").await.unwrap(), m);
        assert!(store.load_manifest("y.example.com").await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
