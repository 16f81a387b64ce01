//! What a VM that has no previous set needs to keep a rejected domain on its
//! last good policy: the documents of the last applied push, as JSON text.
//!
//! The filter keeps it in proxy-wasm shared data (one store per Envoy process,
//! which outlives a VM), so a new `.wasm`, whose VMs start empty, still serves
//! a domain whose newly pushed policy is invalid with the policy it had. Any
//! domain's next document may be the invalid one, so every served domain's
//! document is needed: the store holds the last applied plugin configuration
//! as it was pushed, and, apart, the documents of the domains that were kept on
//! an older policy (those the configuration holds in a rejected form). Nothing
//! compiled is stored: a VM compiles only the documents it needs from it.

use crate::compile::compiled::CompiledPolicy;
use crate::compile::index::MAX_POLICIES;
use crate::policy::json::{domain_text, fingerprint, parse_json, scan_envelope};
use crate::policy::parse::{domain_of, parse_policy};
use crate::policy::DomainPattern;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::sync::Arc;

const HEADER: usize = 16;

/// A decoded store: borrowed from its bytes.
#[derive(Debug, Clone, Copy)]
pub struct LastGood<'a> {
    /// The fingerprint ([`crate::fingerprint`]) of the configuration stored.
    pub config_fingerprint: u64,
    /// `{"policies": [...]}`: the documents of the domains served by an older
    /// policy than the configuration's own.
    kept: &'a [u8],
    /// The last applied plugin configuration.
    config: &'a [u8],
}

impl<'a> LastGood<'a> {
    /// The store for an applied configuration and the documents of its kept
    /// domains (from [`LastGood::documents`]).
    pub fn encode(config: &[u8], kept: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + kept.len() + config.len());
        out.extend_from_slice(&fingerprint(config).to_le_bytes());
        out.extend_from_slice(&(kept.len() as u64).to_le_bytes());
        out.extend_from_slice(kept);
        out.extend_from_slice(config);
        out
    }

    pub fn decode(bytes: &'a [u8]) -> Option<Self> {
        let (head, rest) = bytes.split_at_checked(HEADER)?;
        let (fp, len) = head.split_at(8);
        let config_fingerprint = u64::from_le_bytes(fp.try_into().ok()?);
        let kept_len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
        let (kept, config) = rest.split_at_checked(kept_len)?;
        Some(LastGood {
            config_fingerprint,
            kept,
            config,
        })
    }

    /// The stored bytes' size: what the store costs.
    pub fn len(&self) -> usize {
        HEADER + self.kept.len() + self.config.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == HEADER
    }

    /// No domain was kept on an older policy than the configuration's.
    pub fn is_kept_empty(&self) -> bool {
        self.kept == no_kept_documents().as_slice()
    }

    /// The stored document of each of `domains` that has one (a kept document
    /// first, then the configuration's), in the order found.
    fn find(&self, domains: &[DomainPattern]) -> Vec<(&'a RawValue, CompiledPolicy)> {
        let mut wanted: Vec<DomainPattern> = domains.to_vec();
        let mut found = Vec::new();
        for layer in [self.kept, self.config] {
            if wanted.is_empty() {
                break;
            }
            let Ok(envelope) = scan_envelope(layer, MAX_POLICIES) else {
                continue;
            };
            for raw in envelope.policies.unwrap_or_default() {
                let Some(text) = domain_text(raw) else {
                    continue;
                };
                let mut one = Map::new();
                one.insert("domain".to_owned(), Value::String(text));
                let Some(pattern) = domain_of(&Value::Object(one)) else {
                    continue;
                };
                if let Some(at) = wanted.iter().position(|d| *d == pattern) {
                    // Only a document that compiles is a last good one (a
                    // configuration also holds the rejected documents).
                    if let Some(policy) = compile(raw) {
                        wanted.swap_remove(at);
                        found.push((raw, policy));
                    }
                }
            }
        }
        found
    }

    /// The last good policies of `domains`, compiled.
    pub fn policies(&self, domains: &[DomainPattern]) -> Vec<Arc<CompiledPolicy>> {
        if domains.is_empty() {
            return Vec::new();
        }
        self.find(domains)
            .into_iter()
            .map(|(_, policy)| Arc::new(policy))
            .collect()
    }

    /// `{"policies": [...]}` with the stored documents of `domains`: the kept
    /// part of the next store.
    pub fn documents(&self, domains: &[DomainPattern]) -> Vec<u8> {
        let found = self.find(domains);
        kept_documents(found.iter().map(|(raw, _)| *raw))
    }
}

fn kept_documents<'r>(found: impl Iterator<Item = &'r RawValue>) -> Vec<u8> {
    let mut out = b"{\"policies\":[".to_vec();
    for (i, raw) in found.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(raw.get().as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

/// The kept part of a store when no domain is kept.
pub fn no_kept_documents() -> Vec<u8> {
    kept_documents(std::iter::empty())
}

fn compile(raw: &RawValue) -> Option<CompiledPolicy> {
    let value = parse_json(raw.get().as_bytes()).ok()?;
    let (policy, _) = parse_policy("last good policy", &value);
    policy.map(CompiledPolicy::compile)
}
