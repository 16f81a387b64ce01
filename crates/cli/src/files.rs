//! Policy files on disk: reading a directory into [`PolicyDocuments`], and
//! writing the bundle (the ECDS resource among it) so that a watcher never
//! sees half a file.

use origin_policy_engine::documents::{unreadable, PolicyDocuments};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Reads `*.json` files from `dir` (not recursively), sorted by name so that
/// bundles are reproducible.
pub fn read_dir(dir: &Path) -> Result<PolicyDocuments, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut out = PolicyDocuments::default();
    for path in paths {
        read_file(&path, &mut out);
    }
    Ok(out)
}

fn read_file(path: &Path, out: &mut PolicyDocuments) {
    let shown = path.display().to_string();
    match fs::read(path) {
        Ok(bytes) => out.add_bytes(shown, &bytes),
        Err(e) => out
            .unreadable
            .push(unreadable(shown, format!("cannot read: {e}"))),
    }
}

/// Reads the given files and directories into one set of documents.
pub fn read_paths(paths: &[PathBuf]) -> Result<PolicyDocuments, String> {
    let mut all = PolicyDocuments::default();
    for path in paths {
        if path.is_dir() {
            all.extend(read_dir(path)?);
        } else {
            let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut one = PolicyDocuments::default();
            one.add_bytes(path.display().to_string(), &bytes);
            all.extend(one);
        }
    }
    Ok(all)
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

/// The upstream RBAC filter's ECDS file (`settings.origin_networks`), which
/// `deploy/envoy/edge.yaml` reads beside the filter's.
pub const NETWORKS_FILE: &str = "origin-policy.networks.ecds.json";

/// The ECDS file's one resource: the filter (`origin-policy`, the same name,
/// root id and `vm_id` everywhere) with `plugin_config`, loaded from `wasm`.
pub fn ecds_resource(plugin_config: &str, wasm: &str) -> serde_json::Value {
    serde_json::json!({
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
