//! The compiled policy set: a domain index with O(1) exact lookups and
//! O(labels) wildcard lookups, independent of how many domains are loaded.

use crate::compiled::CompiledPolicy;
use crate::decision::{DomainMatch, MatchKind, Outcome, Refusal, ViewerRequest};
use crate::diagnostic::{Diagnostics, PolicyDiagnostic, Severity};
use crate::host::normalize_authority;
use crate::json::parse_json;
use crate::parse::{domain_of, parse_policy};
use crate::policy::DomainPattern;
use crate::settings::{parse_settings, Settings};
use serde_json::Value;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

/// The most policies one plugin configuration may carry: loading is linear
/// (about 0.8 s for 100,000 in wasmtime), and a bound keeps a mistaken push
/// from stalling every worker.
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

/// Settings plus every domain's compiled policy: what the filter serves from.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub settings: Settings,
    pub index: DomainIndex,
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
                source: format!("policies[{i}]"),
                document,
            })
            .collect()
    }
}

/// The result of compiling a set: what is served now, and every finding.
pub struct CompiledSet {
    pub set: PolicySet,
    pub diagnostics: Diagnostics,
    /// Domains whose new policy was rejected and whose last good policy stays.
    pub kept_previous: Vec<String>,
    /// Policies that were rejected (each domain counted once).
    pub rejected: usize,
}

impl PolicySet {
    /// The Envoy clusters the policies need, derived from their origins.
    pub fn derived_clusters(&self) -> crate::clusters::DerivedClusters {
        crate::clusters::DerivedClusters::of(self.index.policies().map(|p| p.as_ref()))
    }

    /// Compiles policies one domain at a time. A rejected policy never takes its
    /// domain down: when `previous` served that domain, its last good policy stays.
    pub fn compile(
        settings: Settings,
        sources: &[PolicySource<'_>],
        previous: Option<&PolicySet>,
    ) -> CompiledSet {
        let mut diagnostics = Vec::new();
        // Each policy goes into its `Arc` once: compiled policies are large, and
        // moving 100,000 of them through a growing Vec dominated compile time.
        let mut accepted: Vec<(usize, Arc<CompiledPolicy>)> = Vec::with_capacity(sources.len());
        let mut rejected_domains: Vec<Option<DomainPattern>> = Vec::new();
        for (i, src) in sources.iter().enumerate() {
            let (policy, found) = parse_policy(&src.source, src.document);
            diagnostics.extend(found);
            match policy {
                Some(p) => accepted.push((i, Arc::new(CompiledPolicy::compile(p)))),
                None => rejected_domains.push(domain_of(src.document)),
            }
        }
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
        let mut duplicate = vec![false; accepted.len()];
        for slots in groups.values() {
            let names: Vec<&str> = slots
                .iter()
                .map(|&s| sources[accepted[s].0].source.as_str())
                .collect();
            for &slot in slots {
                duplicate[slot] = true;
                let (i, p) = &accepted[slot];
                diagnostics.push(PolicyDiagnostic {
                    severity: Severity::Error,
                    source: sources[*i].source.clone(),
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
        // By name, each once (no two patterns share a display name); a map
        // rather than a sort keeps a sort routine out of the filter's module.
        let by_name: BTreeMap<Option<String>, Option<DomainPattern>> = rejected_domains
            .into_iter()
            .map(|d| (d.as_ref().map(DomainPattern::display_name), d))
            .collect();
        let rejected_domains: Vec<Option<DomainPattern>> = by_name.into_values().collect();
        let mut kept_previous = Vec::new();
        for pattern in rejected_domains.iter().flatten() {
            if let Some(old) = previous.and_then(|prev| prev.index.get(pattern)) {
                if index.get(pattern).is_none() {
                    kept_previous.push(old.name.clone());
                    index.insert(Arc::clone(old));
                }
            }
        }
        CompiledSet {
            set: PolicySet { settings, index },
            diagnostics: Diagnostics(diagnostics),
            kept_previous,
            rejected: rejected_domains.len(),
        }
    }

    /// Parses a plugin configuration: `{"settings": {...}, "policies": [...]}`.
    pub fn from_plugin_config(
        bytes: &[u8],
        previous: Option<&PolicySet>,
    ) -> Result<CompiledSet, ConfigError> {
        let value =
            parse_json(bytes).map_err(|e| ConfigError::Envelope(format!("not valid JSON: {e}")))?;
        Self::from_plugin_value(&value, previous)
    }

    /// [`PolicySet::from_plugin_config`] for a document already parsed.
    pub fn from_plugin_value(
        value: &Value,
        previous: Option<&PolicySet>,
    ) -> Result<CompiledSet, ConfigError> {
        let Value::Object(map) = value else {
            return Err(ConfigError::Envelope(
                "expected a JSON object with `settings` and `policies`".to_owned(),
            ));
        };
        if let Some(unknown) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "settings" | "policies" | "$schema"))
        {
            return Err(ConfigError::Envelope(format!(
                "unknown top-level field `{unknown}`"
            )));
        }
        let settings = parse_settings("plugin configuration", map.get("settings"))
            .map_err(|d| ConfigError::Settings(Diagnostics(d)))?;
        let policies = match map.get("policies") {
            Some(Value::Array(list)) => list,
            Some(_) => {
                return Err(ConfigError::Envelope(
                    "`policies` must be an array of policy objects".to_owned(),
                ))
            }
            None => return Err(ConfigError::Envelope("missing `policies`".to_owned())),
        };
        if policies.len() > MAX_POLICIES {
            return Err(ConfigError::Envelope(format!(
                "{} policies is over the limit of {MAX_POLICIES} per plugin configuration",
                policies.len()
            )));
        }
        let sources = PolicySource::numbered(policies);
        Ok(Self::compile(settings, &sources, previous))
    }

    /// The policy that covers a viewer's Host.
    pub fn lookup<'a>(&'a self, authority: &'a str) -> Result<DomainMatch<'a>, Refusal<'a>> {
        let host = normalize_authority(authority).map_err(Refusal::BadHost)?;
        match self.index.lookup(&host) {
            Some((policy, matched)) => Ok(DomainMatch {
                policy,
                matched,
                viewer_host: host,
            }),
            None => Err(Refusal::UnknownDomain { viewer_host: host }),
        }
    }

    /// Decides where a request goes.
    pub fn decide<'a>(&'a self, request: &ViewerRequest<'a>) -> Outcome<'a> {
        match self
            .lookup(request.authority)
            .and_then(|found| found.decide(request, &self.settings))
        {
            Ok(d) => Outcome::Origin(d),
            Err(r) => Outcome::Refused(r),
        }
    }
}
