//! How Envoy gets what the policies need besides the policies: the origin
//! clusters and the filter configuration (the settings, the module, the
//! origin networks' RBAC). One edge reads them from files it watches
//! ([`EnvoyFiles`]); a fleet gets them over ADS.

use crate::admin;
use crate::error::ControlError;
use crate::validate::EdgeSettings;
use origin_policy_engine::fingerprint;
use serde_json::{json, Value};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The clusters file `deploy/envoy/edge.yaml` reads (`cds_config`).
pub const CLUSTERS_FILE: &str = "origin-policy.cds.json";
/// The filter's ECDS file.
pub const FILTER_FILE: &str = "origin-policy.ecds.json";
/// The upstream RBAC filter's ECDS file (`settings.origin_networks`).
pub const NETWORKS_FILE: &str = "origin-policy.networks.ecds.json";
/// Envoy applies a 100,000-cluster file in about a minute (BENCHMARKS.md).
pub const CLUSTERS_TAKEN_WITHIN: Duration = Duration::from_secs(180);

/// Where the clusters and the filter configuration go. Each call returns
/// once Envoy has what it was given, or says why not.
pub trait EnvoyConfig: Send + Sync {
    /// The whole cluster set, each cluster as Envoy JSON.
    fn clusters(&self, clusters: &[Arc<str>]) -> Result<(), ControlError>;
    /// The filter configuration for feed delivery, and the origin networks.
    fn filter(&self, settings: &EdgeSettings) -> Result<(), ControlError>;
}

impl<T: EnvoyConfig + ?Sized> EnvoyConfig for Arc<T> {
    fn clusters(&self, clusters: &[Arc<str>]) -> Result<(), ControlError> {
        (**self).clusters(clusters)
    }
    fn filter(&self, settings: &EdgeSettings) -> Result<(), ControlError> {
        (**self).filter(settings)
    }
}

/// Envoy's file-based xDS: the files one edge's Envoy watches.
pub struct EnvoyFiles {
    pub dir: PathBuf,
    /// The filter's module, by absolute path.
    pub wasm: String,
    /// Envoy's admin address: with it, a clusters file counts as delivered
    /// once Envoy has taken it.
    pub admin: Option<String>,
}

impl EnvoyFiles {
    fn write(&self, name: &str, text: &str) -> Result<bool, ControlError> {
        let path = self.dir.join(name);
        if fs::read(&path).ok().as_deref() == Some(text.as_bytes()) {
            return Ok(false);
        }
        write_atomically(&path, text.as_bytes())
            .map_err(|e| ControlError::Io(format!("{}: {e}", path.display())))?;
        Ok(true)
    }
}

impl EnvoyConfig for EnvoyFiles {
    fn clusters(&self, clusters: &[Arc<str>]) -> Result<(), ControlError> {
        let mut sorted: Vec<&str> = clusters.iter().map(|c| c.as_ref()).collect();
        sorted.sort_unstable();
        let resources = sorted.join(",");
        let version = fingerprint(resources.as_bytes());
        let text = format!("{{\"version_info\":\"{version:016x}\",\"resources\":[{resources}]}}");
        // No Envoy answering yet (it starts after its control plane): it reads
        // the file when it starts, so there is nothing to wait for.
        let admin = self.admin.as_deref().filter(|a| admin::listening(a));
        let before = admin
            .map(|a| admin::cds_progress(a, CLUSTERS_TAKEN_WITHIN))
            .transpose()
            .map_err(ControlError::Envoy)?;
        if !self.write(CLUSTERS_FILE, &text)? {
            return Ok(());
        }
        if let (Some(admin), Some(before)) = (admin, before) {
            admin::wait_for_clusters(admin, before, CLUSTERS_TAKEN_WITHIN)
                .map_err(ControlError::Envoy)?;
        }
        Ok(())
    }

    fn filter(&self, settings: &EdgeSettings) -> Result<(), ControlError> {
        // The networks first: an origin they newly allow may be in the clusters.
        let networks = settings.settings.origin_networks.ecds_resource();
        self.write(NETWORKS_FILE, &format!("{networks:#}"))?;
        let config = json!({"settings": settings.document, "delivery": "feed"}).to_string();
        self.write(
            FILTER_FILE,
            &format!("{:#}", ecds_resource(&config, &self.wasm)),
        )?;
        Ok(())
    }
}

/// Writes `bytes` to `path` so that a watcher never sees a partial file:
/// a temporary file in the same directory, synced, then renamed over the target.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// The ECDS file's one resource: the filter (`origin-policy`, the same name,
/// root id and `vm_id` everywhere) with `plugin_config`, loaded from `wasm`.
pub fn ecds_resource(plugin_config: &str, wasm: &str) -> Value {
    json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": "origin-policy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": "origin-policy",
                    "root_id": "origin-policy",
                    "vm_config": {
                        "vm_id": "origin-policy",
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": wasm}}
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": plugin_config
                    }
                }
            }
        }]
    })
}
