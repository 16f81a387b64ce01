//! Policy files on disk: reading a directory into [`PolicyDocuments`], and
//! writing the bundle (the ECDS resource among it) so that a watcher never
//! sees half a file.

use origin_policy_engine::documents::{unreadable, PolicyDocuments};
use std::fs;
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

pub use origin_policy_control::envoy::{ecds_resource, write_atomically, NETWORKS_FILE};
