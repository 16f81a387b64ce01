//! Reading a policy directory and turning it into the filter's plugin
//! configuration. Native only: this is the part that touches files.

use crate::engine::{
    parse_json, parse_settings, CompiledSet, Diagnostics, PolicyDiagnostic, PolicySet,
    PolicySource, Severity,
};
use serde_json::{json, Value};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The settings file beside the policies; every other `*.json` is a policy,
/// except the schema.
pub const SETTINGS_FILE: &str = "settings.json";
const SCHEMA_FILE: &str = "policy.schema.json";

/// A policy directory as read from disk.
pub struct PolicyDir {
    pub settings: Option<Value>,
    pub policies: Vec<(String, Value)>,
    /// Files that could not be read or parsed as JSON.
    pub unreadable: Vec<PolicyDiagnostic>,
}

fn unreadable(source: String, message: String) -> PolicyDiagnostic {
    PolicyDiagnostic {
        severity: Severity::Error,
        source,
        domain: None,
        path: String::new(),
        message,
        fix: None,
    }
}

/// Parses one policy or settings document; the error is a diagnostic for
/// `source`, as `check` reports it.
pub fn parse_document(source: &str, bytes: &[u8]) -> Result<Value, Box<PolicyDiagnostic>> {
    parse_json(bytes).map_err(|e| {
        Box::new(unreadable(
            source.to_owned(),
            format!("not valid JSON: {e}"),
        ))
    })
}

/// Reads `*.json` files from `dir` (not recursively), sorted by name so that
/// bundles are reproducible.
pub fn read_dir(dir: &Path) -> Result<PolicyDir, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut out = PolicyDir {
        settings: None,
        policies: Vec::new(),
        unreadable: Vec::new(),
    };
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name == SCHEMA_FILE {
            continue;
        }
        let shown = path.display().to_string();
        let parsed = fs::read(&path)
            .map_err(|e| Box::new(unreadable(shown.clone(), format!("cannot read: {e}"))))
            .and_then(|bytes| parse_document(&shown, &bytes));
        let value = match parsed {
            Ok(v) => v,
            Err(d) => {
                out.unreadable.push(*d);
                continue;
            }
        };
        if name == SETTINGS_FILE {
            out.settings = Some(value);
        } else {
            out.policies.push((shown, value));
        }
    }
    Ok(out)
}

/// Reads the given files and directories into one policy set description.
pub fn read_paths(paths: &[PathBuf]) -> Result<PolicyDir, String> {
    let mut all = PolicyDir {
        settings: None,
        policies: Vec::new(),
        unreadable: Vec::new(),
    };
    for path in paths {
        let part = if path.is_dir() {
            read_dir(path)?
        } else {
            let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let shown = path.display().to_string();
            let mut one = PolicyDir {
                settings: None,
                policies: Vec::new(),
                unreadable: Vec::new(),
            };
            match parse_document(&shown, &bytes) {
                Ok(v) if path.file_name().is_some_and(|n| n == SETTINGS_FILE) => {
                    one.settings = Some(v)
                }
                Ok(v) => one.policies.push((shown, v)),
                Err(d) => one.unreadable.push(*d),
            }
            one
        };
        all.settings = part.settings.or(all.settings);
        all.policies.extend(part.policies);
        all.unreadable.extend(part.unreadable);
    }
    Ok(all)
}

impl PolicyDir {
    /// Validates and compiles everything, as the filter would on first load.
    pub fn compile(&self) -> (Option<CompiledSet>, Diagnostics) {
        let mut diagnostics = self.unreadable.clone();
        let settings = match parse_settings(SETTINGS_FILE, self.settings.as_ref()) {
            Ok(s) => s,
            Err(found) => {
                diagnostics.extend(found);
                return (None, Diagnostics(diagnostics));
            }
        };
        let sources: Vec<PolicySource> = self
            .policies
            .iter()
            .map(|(source, document)| PolicySource {
                source: source.clone(),
                document,
            })
            .collect();
        let compiled = PolicySet::compile(settings, &sources, None);
        diagnostics.extend(compiled.diagnostics.0.iter().cloned());
        (Some(compiled), Diagnostics(diagnostics))
    }

    /// The plugin configuration the filter reads in `on_configure`.
    pub fn plugin_config(&self) -> Value {
        let policies: Vec<&Value> = self.policies.iter().map(|(_, v)| v).collect();
        json!({
            "settings": self.settings.clone().unwrap_or_else(|| json!({})),
            "policies": policies,
        })
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
