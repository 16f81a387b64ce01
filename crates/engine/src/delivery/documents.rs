//! A policy directory's documents, held in memory: the settings and every
//! policy by the name it came from. The CLI fills it from files, the JavaScript
//! package from strings; both validate and bundle it the same way.

use crate::{
    parse_json, parse_settings, CompiledSet, Diagnostics, PolicyDiagnostic, PolicySet,
    PolicySource, Severity,
};
use serde_json::{json, Value};

/// The settings document beside the policies; every other `*.json` is a
/// policy, except the schema.
pub const SETTINGS_FILE: &str = "settings.json";
/// The JSON Schema kept beside the policies for editors; never a policy.
pub const SCHEMA_FILE: &str = "policy.schema.json";

/// Which document a file name holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentKind {
    Settings,
    Policy,
    Schema,
}

impl DocumentKind {
    /// Classifies by file name (the last path segment).
    pub fn of(name: &str) -> Self {
        match name.rsplit(['/', '\\']).next().unwrap_or(name) {
            SETTINGS_FILE => DocumentKind::Settings,
            SCHEMA_FILE => DocumentKind::Schema,
            _ => DocumentKind::Policy,
        }
    }
}

/// Settings and policies as parsed JSON, with every document that could not
/// be read or parsed kept as a finding.
#[derive(Debug, Clone, Default)]
pub struct PolicyDocuments {
    pub settings: Option<Value>,
    /// `(source, document)`: the source names the policy in every finding.
    pub policies: Vec<(String, Value)>,
    pub unreadable: Vec<PolicyDiagnostic>,
}

/// A finding about a whole document (no domain, no JSON pointer).
pub fn unreadable(source: String, message: String) -> PolicyDiagnostic {
    PolicyDiagnostic {
        severity: Severity::Error,
        source,
        domain: None,
        path: String::new(),
        message,
        fix: None,
    }
}

/// Parses one policy or settings document; the error is a finding for
/// `source`, as `check` reports it.
pub fn parse_document(source: &str, bytes: &[u8]) -> Result<Value, Box<PolicyDiagnostic>> {
    parse_json(bytes).map_err(|e| {
        Box::new(unreadable(
            source.to_owned(),
            format!("not valid JSON: {e}"),
        ))
    })
}

impl PolicyDocuments {
    /// One parsed document, placed by its kind.
    pub fn add(&mut self, kind: DocumentKind, source: String, document: Value) {
        match kind {
            DocumentKind::Settings => self.settings = Some(document),
            DocumentKind::Policy => self.policies.push((source, document)),
            DocumentKind::Schema => {}
        }
    }

    /// One document as bytes: parsed, or kept as a finding.
    pub fn add_bytes(&mut self, source: String, bytes: &[u8]) {
        let kind = DocumentKind::of(&source);
        if kind == DocumentKind::Schema {
            return;
        }
        match parse_document(&source, bytes) {
            Ok(value) => self.add(kind, source, value),
            Err(d) => self.unreadable.push(*d),
        }
    }

    /// Adds `other`; its settings, if any, win.
    pub fn extend(&mut self, other: PolicyDocuments) {
        self.settings = other.settings.or(self.settings.take());
        self.policies.extend(other.policies);
        self.unreadable.extend(other.unreadable);
    }

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

    /// The plugin configuration the filter reads in `on_configure`. With
    /// IDNA, every host name of a valid policy is written in its normalised
    /// ASCII form (`bücher.example` -> `xn--bcher-kva.example`): the filter has
    /// no IDNA tables, and this way it loads exactly what `check` validated.
    pub fn plugin_config(&self) -> Value {
        let policies: Vec<Value> = self
            .policies
            .iter()
            .map(|(source, document)| names_in_ascii(source, document))
            .collect();
        json!({
            "settings": self.settings.clone().unwrap_or_else(|| json!({})),
            "policies": policies,
        })
    }
}

/// What a policy feed publishes from a set of documents.
#[derive(Debug, Clone)]
pub struct FeedDocuments {
    /// The settings document as written (`{}` when there is none).
    pub settings_document: Value,
    pub settings: crate::Settings,
    /// Each accepted policy's domain and compact document, host names in
    /// ASCII as [`PolicyDocuments::plugin_config`] writes them.
    pub accepted: Vec<(String, String)>,
    /// Domains whose document was rejected: they keep what was published.
    pub rejected: Vec<String>,
    pub diagnostics: Diagnostics,
}

impl PolicyDocuments {
    /// Validates everything and splits it into what a feed publishes per
    /// domain. `Err`: the settings are invalid, and nothing can be published.
    pub fn feed_documents(&self) -> Result<FeedDocuments, Diagnostics> {
        let (compiled, diagnostics) = self.compile();
        let Some(compiled) = compiled else {
            return Err(diagnostics);
        };
        let rejected: Vec<String> = compiled
            .unresolved
            .iter()
            .map(crate::DomainPattern::display_name)
            .collect();
        let accepted = self
            .policies
            .iter()
            .filter_map(|(source, document)| {
                let domain = crate::parse_policy(source, document).0?.domain;
                (!compiled.unresolved.contains(&domain)).then(|| {
                    (
                        domain.display_name(),
                        names_in_ascii(source, document).to_string(),
                    )
                })
            })
            .collect();
        Ok(FeedDocuments {
            settings_document: self.settings.clone().unwrap_or_else(|| json!({})),
            settings: compiled.set.settings.clone(),
            accepted,
            rejected,
            diagnostics,
        })
    }
}

/// One policy as a feed publishes it, checked on its own.
#[derive(Debug, Clone)]
pub struct FeedPolicy {
    /// The domain, as the feed names it (`*.` for a wildcard, ASCII).
    pub domain: String,
    /// The compact document, host names in ASCII.
    pub document: String,
    /// The clusters it needs.
    pub clusters: crate::clusters::DerivedClusters,
}

/// Checks one policy under `settings`, as the filter would: what a feed
/// publishes for its domain, or every finding (domain, JSON pointer, fix).
/// A control plane calls this per write, so that a change to one domain
/// costs one policy's check, whatever the number of domains.
pub fn feed_policy(
    settings: &crate::Settings,
    source: &str,
    document: &Value,
) -> Result<FeedPolicy, Vec<PolicyDiagnostic>> {
    let sources = [PolicySource {
        source: source.to_owned(),
        document,
    }];
    let compiled = PolicySet::compile(settings.clone(), &sources, None);
    let errors: Vec<PolicyDiagnostic> = compiled.diagnostics.errors().cloned().collect();
    let policy = compiled.set.index.policies().next();
    match policy {
        Some(policy) if errors.is_empty() && compiled.unresolved.is_empty() => Ok(FeedPolicy {
            domain: policy.policy.domain.display_name(),
            document: names_in_ascii(source, document).to_string(),
            clusters: compiled.set.derived_clusters(),
        }),
        _ if errors.is_empty() => Err(compiled.diagnostics.0),
        _ => Err(errors),
    }
}

/// `document` with every field that `parse` normalises as a host name
/// replaced by what it normalised to; an invalid policy is kept as written
/// (the filter reports it as `check` does).
#[cfg(feature = "idna")]
fn names_in_ascii(source: &str, document: &Value) -> Value {
    use crate::{parse_policy, OriginHost, OriginSni};
    let mut out = document.clone();
    let (Some(policy), _) = parse_policy(source, document) else {
        return out;
    };
    let mut names = vec![("/domain".to_owned(), policy.domain.display_name())];
    // Origins are kept in the order written.
    let listed = document.get("origins").is_some();
    for (i, origin) in policy.origins.into_iter().enumerate() {
        let pointer = match (listed, i) {
            (true, _) => format!("/origins/{i}/address"),
            (false, 0) => "/primary/address".to_owned(),
            (false, _) => "/secondary/address".to_owned(),
        };
        names.push((pointer, origin.address));
    }
    if let OriginHost::Custom(value) = policy.origin_host {
        names.push(("/origin_host/value".to_owned(), value));
    }
    if let OriginSni::Custom(value) = policy.origin_sni {
        names.push(("/origin_sni/value".to_owned(), value));
    }
    for (pointer, name) in names {
        if let Some(slot) = out.pointer_mut(&pointer) {
            *slot = Value::String(name);
        }
    }
    out
}

#[cfg(not(feature = "idna"))]
fn names_in_ascii(_source: &str, document: &Value) -> Value {
    document.clone()
}
