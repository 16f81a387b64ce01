//! The compiled policy set: a domain index with O(1) exact lookups and
//! O(labels) wildcard lookups, independent of how many domains are loaded.

use crate::compile::compiled::CompiledPolicy;
use crate::policy::admission::check_policy_origins;
use crate::policy::diagnostic::{Diagnostics, PolicyDiagnostic, Severity};
use crate::policy::json::{document_fingerprint, parse_json, scan_envelope};
use crate::policy::parse::{domain_of, parse_policy};
use crate::policy::settings::{parse_settings, Settings};
use crate::policy::DomainPattern;
use serde_json::Value;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

/// The most policies one plugin configuration may carry: loading is linear
/// (about 0.8 s for 100,000 in wasmtime), and a bound keeps a mistaken push
/// from stalling every worker.
/// How a host found its policy: by its exact name, or a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    Exact,
    Wildcard,
}

pub const MAX_POLICIES: usize = 200_000;

/// Keys are policy names, chosen by the operator, so a fixed seed cannot be
/// used to flood the table; viewers only look names up.
type NameMap = HashMap<String, Arc<CompiledPolicy>, foldhash::fast::FixedState>;

/// Exact names and wildcard suffixes, each mapped to its compiled policy.
#[derive(Debug, Clone, Default)]
pub struct DomainIndex {
    exact: NameMap,
    wildcard: NameMap,
}

impl DomainIndex {
    fn with_capacity(n: usize) -> Self {
        DomainIndex {
            exact: NameMap::with_capacity_and_hasher(n, Default::default()),
            wildcard: NameMap::default(),
        }
    }

    fn insert(&mut self, policy: Arc<CompiledPolicy>) {
        match &policy.policy.domain {
            DomainPattern::Exact(name) => self.exact.insert(name.clone(), policy),
            DomainPattern::Wildcard(suffix) => self.wildcard.insert(suffix.clone(), policy),
        };
    }

    /// The most specific policy for a normalised host: the exact name first, then
    /// the longest wildcard suffix. `*.a.com` covers `x.a.com` and `y.x.a.com`, not `a.com`.
    pub fn lookup(&self, host: &str) -> Option<(&Arc<CompiledPolicy>, MatchKind)> {
        if let Some(p) = self.exact.get(host) {
            return Some((p, MatchKind::Exact));
        }
        if self.wildcard.is_empty() {
            return None;
        }
        let mut rest = host;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(p) = self.wildcard.get(rest) {
                return Some((p, MatchKind::Wildcard));
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, pattern: &DomainPattern) -> Option<&Arc<CompiledPolicy>> {
        match pattern {
            DomainPattern::Exact(name) => self.exact.get(name),
            DomainPattern::Wildcard(suffix) => self.wildcard.get(suffix),
        }
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<CompiledPolicy>> {
        self.exact.values().chain(self.wildcard.values())
    }
}

/// Why a plugin configuration could not be used at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// Not JSON, or not the `{settings, policies}` envelope.
    Envelope(String),
    Settings(Diagnostics),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Envelope(why) => write!(f, "plugin configuration rejected: {why}"),
            ConfigError::Settings(d) => write!(f, "plugin configuration rejected:\n{d}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A document compiled by an earlier push, found again by the fingerprint of
/// its bytes: its policy, and the warnings it gave (each with the source it had
/// then), so a reused document reports what a fresh compile would.
#[derive(Debug, Clone)]
struct Remembered {
    policy: Arc<CompiledPolicy>,
    warnings: Box<[PolicyDiagnostic]>,
}

type DocumentMap = HashMap<u128, Remembered, foldhash::fast::FixedState>;

/// Where a filter's policies come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Delivery {
    /// In the plugin configuration's `policies`.
    #[default]
    Inline,
    /// One domain at a time, from the change feed's entries in shared data
    /// (`"delivery": "feed"`, see the `feed` module); the configuration carries
    /// the settings only.
    Feed,
}

impl Delivery {
    fn parse(raw: Option<&str>, has_policies: bool) -> Result<Delivery, ConfigError> {
        match (raw, has_policies) {
            (None, true) => Ok(Delivery::Inline),
            (None, false) => Err(ConfigError::Envelope("missing `policies`".to_owned())),
            (Some("\"feed\""), false) => Ok(Delivery::Feed),
            (Some("\"feed\""), true) => Err(ConfigError::Envelope(
                "`policies` and `\"delivery\": \"feed\"` exclude each other: with the feed, the configuration carries the settings only".to_owned(),
            )),
            (Some(other), _) => Err(ConfigError::Envelope(format!(
                "`delivery` must be \"feed\" (or absent, with `policies`), not {other}"
            ))),
        }
    }
}

/// Settings plus every domain's compiled policy: what the filter serves from.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub settings: Settings,
    pub index: DomainIndex,
    pub delivery: Delivery,
    /// The accepted documents of the plugin configuration this set was
    /// compiled from, by fingerprint; empty for a set compiled from parsed
    /// values ([`PolicySet::compile`]), which the next push cannot reuse.
    documents: DocumentMap,
    /// The fingerprint of the `settings` text; a change recompiles everything.
    settings_fingerprint: Option<u128>,
}

/// One policy document and where it came from.
pub struct PolicySource<'v> {
    pub source: String,
    pub document: &'v Value,
}

impl<'v> PolicySource<'v> {
    /// The entries of a plugin configuration's `policies` array, each named
    /// by its place in it (`policies[3]`).
    pub fn numbered(documents: &'v [Value]) -> Vec<Self> {
        documents
            .iter()
            .enumerate()
            .map(|(i, document)| PolicySource {
                source: slot_name(i),
                document,
            })
            .collect()
    }
}

fn slot_name(i: usize) -> String {
    format!("policies[{i}]")
}

/// The result of compiling a set: what is served now, and every finding.
pub struct CompiledSet {
    pub set: PolicySet,
    pub diagnostics: Diagnostics,
    /// Domains whose new policy was rejected and whose last good policy stays.
    pub kept_previous: Vec<String>,
    /// The same domains as patterns, in the same order.
    pub kept_patterns: Vec<DomainPattern>,
    /// Domains whose new policy was rejected and that have no policy now (no
    /// earlier one was known): see [`CompiledSet::keep_last_good`].
    pub unresolved: Vec<DomainPattern>,
    /// Policies that were rejected (each domain counted once).
    pub rejected: usize,
    /// Documents parsed and compiled by this push; the others were unchanged
    /// since the previous set and reused as they were.
    pub compiled: usize,
}

impl CompiledSet {
    /// Serves `policies`, last good policies found elsewhere (by a VM that
    /// has no previous set), for the [`CompiledSet::unresolved`] domains they
    /// cover; other policies are ignored. Returns how many were kept.
    pub fn keep_last_good(
        &mut self,
        policies: impl IntoIterator<Item = Arc<CompiledPolicy>>,
    ) -> usize {
        let mut kept = 0;
        for policy in policies {
            let pattern = &policy.policy.domain;
            let Some(at) = self.unresolved.iter().position(|d| d == pattern) else {
                continue;
            };
            let pattern = self.unresolved.remove(at);
            self.kept_previous.push(policy.name.clone());
            self.kept_patterns.push(pattern);
            self.set.index.insert(policy);
            kept += 1;
        }
        kept
    }
}

/// Collects each slot's result in order; then [`Builder::finish`] refuses
/// duplicate domains and keeps rejected domains on their last good policy.
struct Builder {
    diagnostics: Vec<PolicyDiagnostic>,
    // Each policy goes into its `Arc` once: compiled policies are large, and
    // moving 100,000 of them through a growing Vec dominated compile time.
    accepted: Vec<(usize, Arc<CompiledPolicy>)>,
    rejected_domains: Vec<Option<DomainPattern>>,
    documents: DocumentMap,
    compiled: usize,
    settings: Settings,
}

impl Builder {
    fn new(capacity: usize, settings: Settings) -> Self {
        Builder {
            settings,
            diagnostics: Vec::new(),
            accepted: Vec::with_capacity(capacity),
            rejected_domains: Vec::new(),
            documents: DocumentMap::default(),
            compiled: 0,
        }
    }

    /// Parses and compiles one document; `fingerprint` remembers it for the
    /// next push.
    fn compile(&mut self, slot: usize, source: &str, document: &Value, fingerprint: Option<u128>) {
        self.compiled += 1;
        let (policy, mut found) = parse_policy(source, document);
        // The edge's networks: checked here, where every policy enters.
        let policy = policy.filter(|p| {
            let refused = check_policy_origins(p, &self.settings, source);
            let admitted = refused.is_empty();
            found.extend(refused);
            admitted
        });
        match policy {
            Some(p) => {
                let policy = Arc::new(CompiledPolicy::compile(p));
                if let Some(fingerprint) = fingerprint {
                    let warnings = found.clone().into_boxed_slice();
                    let remembered = Remembered {
                        policy: Arc::clone(&policy),
                        warnings,
                    };
                    self.documents.insert(fingerprint, remembered);
                }
                self.accepted.push((slot, policy));
            }
            None => self.rejected_domains.push(domain_of(document)),
        }
        self.diagnostics.extend(found);
    }

    /// Takes a document unchanged since the previous set as it was.
    fn reuse(&mut self, slot: usize, fingerprint: u128, remembered: &Remembered) {
        if !remembered.warnings.is_empty() {
            let source = slot_name(slot);
            self.diagnostics
                .extend(remembered.warnings.iter().map(|w| PolicyDiagnostic {
                    source: source.clone(),
                    ..w.clone()
                }));
        }
        self.accepted.push((slot, Arc::clone(&remembered.policy)));
        self.documents.insert(fingerprint, remembered.clone());
    }

    fn finish(
        self,
        settings_fingerprint: Option<u128>,
        source_of: impl Fn(usize) -> String,
        previous: Option<&PolicySet>,
    ) -> CompiledSet {
        let Builder {
            mut diagnostics,
            accepted,
            mut rejected_domains,
            documents,
            compiled,
            settings,
        } = self;
        // Each domain's first slot, and the later slots that repeat a domain,
        // grouped under that first slot (in order, for stable diagnostics).
        let mut first_slot: HashMap<&DomainPattern, usize, foldhash::fast::FixedState> =
            HashMap::with_capacity_and_hasher(accepted.len(), Default::default());
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (slot, (_, p)) in accepted.iter().enumerate() {
            match first_slot.entry(&p.policy.domain) {
                Entry::Occupied(first) => groups
                    .entry(*first.get())
                    .or_insert_with(|| vec![*first.get()])
                    .push(slot),
                Entry::Vacant(e) => {
                    e.insert(slot);
                }
            }
        }
        drop(first_slot);
        let mut duplicate = vec![false; accepted.len()];
        for slots in groups.values() {
            let names: Vec<String> = slots.iter().map(|&s| source_of(accepted[s].0)).collect();
            for (&slot, source) in slots.iter().zip(&names) {
                duplicate[slot] = true;
                let (_, p) = &accepted[slot];
                diagnostics.push(PolicyDiagnostic {
                    severity: Severity::Error,
                    source: source.clone(),
                    domain: Some(p.name.clone()),
                    path: "/domain".to_owned(),
                    message: format!(
                        "domain `{}` is defined more than once ({})",
                        p.name,
                        names.join(", ")
                    ),
                    fix: Some("keep exactly one policy per domain".to_owned()),
                });
            }
        }
        let mut index = DomainIndex::with_capacity(accepted.len());
        for (slot, (_, p)) in accepted.into_iter().enumerate() {
            if duplicate[slot] {
                rejected_domains.push(Some(p.policy.domain.clone()));
            } else {
                index.insert(p);
            }
        }
        // By name, each once (no two patterns share a display name). Inserted
        // one by one: a map built by `collect` sorts its input first, which
        // would put a sort routine in the filter's module.
        let mut by_name: BTreeMap<Option<String>, Option<DomainPattern>> = BTreeMap::new();
        for d in rejected_domains {
            by_name.insert(d.as_ref().map(DomainPattern::display_name), d);
        }
        let rejected_domains: Vec<Option<DomainPattern>> = by_name.into_values().collect();
        let mut kept_previous = Vec::new();
        let mut kept_patterns = Vec::new();
        let mut unresolved = Vec::new();
        for pattern in rejected_domains.iter().flatten() {
            if index.get(pattern).is_some() {
                continue;
            }
            match previous.and_then(|prev| prev.index.get(pattern)) {
                Some(old) => {
                    kept_previous.push(old.name.clone());
                    kept_patterns.push(pattern.clone());
                    index.insert(Arc::clone(old));
                }
                None => unresolved.push(pattern.clone()),
            }
        }
        CompiledSet {
            set: PolicySet {
                settings,
                index,
                delivery: Delivery::Inline,
                documents,
                settings_fingerprint,
            },
            diagnostics: Diagnostics(diagnostics),
            kept_previous,
            kept_patterns,
            unresolved,
            rejected: rejected_domains.len(),
            compiled,
        }
    }
}

impl PolicySet {
    /// Compiles policies one domain at a time. A rejected policy never takes its
    /// domain down: when `previous` served that domain, its last good policy stays.
    pub fn compile(
        settings: Settings,
        sources: &[PolicySource<'_>],
        previous: Option<&PolicySet>,
    ) -> CompiledSet {
        let mut builder = Builder::new(sources.len(), settings);
        for (i, src) in sources.iter().enumerate() {
            builder.compile(i, &src.source, src.document, None);
        }
        builder.finish(None, |i| sources[i].source.clone(), previous)
    }

    /// Parses a plugin configuration: `{"settings": {...}, "policies": [...]}`.
    ///
    /// Incremental: a policy document whose bytes are those of a document that
    /// `previous` accepted (with the same `settings` text) is not parsed again;
    /// its compiled policy is shared. The result is the one a full compile
    /// gives: the same set, and the same findings (a reused document repeats
    /// its warnings, under its current place in `policies`).
    pub fn from_plugin_config(
        bytes: &[u8],
        previous: Option<&PolicySet>,
    ) -> Result<CompiledSet, ConfigError> {
        Self::incremental(bytes, previous).map_err(|fast| {
            // A refused configuration is reported as a full parse reports it
            // (the first error in the document, with its line and column).
            match parse_json(bytes) {
                Err(e) => ConfigError::Envelope(format!("not valid JSON: {e}")),
                Ok(value) => Self::envelope(&value).err().unwrap_or(fast),
            }
        })
    }

    fn incremental(bytes: &[u8], previous: Option<&PolicySet>) -> Result<CompiledSet, ConfigError> {
        let not_json = |e: &dyn fmt::Display| ConfigError::Envelope(format!("not valid JSON: {e}"));
        let envelope = scan_envelope(bytes, MAX_POLICIES).map_err(|e| not_json(&e.0))?;
        // Each part is held to `parse_json`'s checks (duplicate keys, nesting)
        // when it is parsed; a document reused by its bytes passed them before.
        if let Some(schema) = envelope.schema {
            parse_json(schema.get().as_bytes()).map_err(|e| not_json(&e))?;
        }
        let settings_value = match envelope.settings {
            Some(raw) => Some(parse_json(raw.get().as_bytes()).map_err(|e| not_json(&e))?),
            None => None,
        };
        let settings = parse_settings("plugin configuration", settings_value.as_ref())
            .map_err(|d| ConfigError::Settings(Diagnostics(d)))?;
        let delivery = Delivery::parse(
            envelope.delivery.map(|raw| raw.get()),
            envelope.policies.is_some(),
        )?;
        let policies = envelope.policies.unwrap_or_default();
        let settings_fingerprint = envelope
            .settings
            .map(|raw| document_fingerprint(raw.get().as_bytes()));
        let reusable = previous
            .filter(|p| p.settings_fingerprint == settings_fingerprint)
            .map(|p| &p.documents);
        let mut builder = Builder::new(policies.len(), settings);
        for (slot, raw) in policies.iter().enumerate() {
            let text = raw.get().as_bytes();
            let fingerprint = document_fingerprint(text);
            match reusable.and_then(|documents| documents.get(&fingerprint)) {
                Some(remembered) => builder.reuse(slot, fingerprint, remembered),
                None => {
                    let document = parse_json(text).map_err(|e| not_json(&e))?;
                    builder.compile(slot, &slot_name(slot), &document, Some(fingerprint));
                }
            }
        }
        let mut compiled = builder.finish(settings_fingerprint, slot_name, previous);
        compiled.set.delivery = delivery;
        Ok(compiled)
    }

    /// The settings and policies of a parsed plugin configuration.
    fn envelope(value: &Value) -> Result<(Settings, &[Value], Delivery), ConfigError> {
        let Value::Object(map) = value else {
            return Err(ConfigError::Envelope(
                "expected a JSON object with `settings` and `policies`".to_owned(),
            ));
        };
        if let Some(unknown) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "settings" | "policies" | "delivery" | "$schema"))
        {
            return Err(ConfigError::Envelope(format!(
                "unknown top-level field `{unknown}`"
            )));
        }
        let settings = parse_settings("plugin configuration", map.get("settings"))
            .map_err(|d| ConfigError::Settings(Diagnostics(d)))?;
        let delivery_text = map.get("delivery").map(Value::to_string);
        let delivery = Delivery::parse(delivery_text.as_deref(), map.contains_key("policies"))?;
        let policies: &[Value] = match map.get("policies") {
            Some(Value::Array(list)) => list,
            Some(_) => {
                return Err(ConfigError::Envelope(
                    "`policies` must be an array of policy objects".to_owned(),
                ))
            }
            None => &[],
        };
        if policies.len() > MAX_POLICIES {
            return Err(ConfigError::Envelope(format!(
                "{} policies is over the limit of {MAX_POLICIES} per plugin configuration",
                policies.len()
            )));
        }
        Ok((settings, policies, delivery))
    }

    /// [`PolicySet::from_plugin_config`] for a document already parsed (no
    /// reuse: nothing is known of its documents' bytes).
    pub fn from_plugin_value(
        value: &Value,
        previous: Option<&PolicySet>,
    ) -> Result<CompiledSet, ConfigError> {
        let (settings, policies, delivery) = Self::envelope(value)?;
        let sources = PolicySource::numbered(policies);
        let mut compiled = Self::compile(settings, &sources, previous);
        compiled.set.delivery = delivery;
        Ok(compiled)
    }
}
