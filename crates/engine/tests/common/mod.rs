//! What the engine's integration tests share: the repository's paths and a
//! policy directory read into memory (the engine itself never touches files).
#![allow(dead_code, clippy::unwrap_used)]

use origin_policy_engine::documents::PolicyDocuments;
use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `*.json` in `dir`, in name order, as the CLI reads it.
pub fn read_policies(dir: &Path) -> PolicyDocuments {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut out = PolicyDocuments::default();
    for path in paths {
        out.add_bytes(path.display().to_string(), &std::fs::read(&path).unwrap());
    }
    out
}
