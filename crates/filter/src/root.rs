//! The root context: parses and compiles each plugin configuration, keeps a
//! rejected domain on its last good policy, and hands every stream the policy
//! set that was current when it started.

use crate::http::{forget_entries, note_feed_changes, OriginFetch};
use crate::metrics::{Counter, Metrics};
use log::{error, info, warn};
use origin_policy_engine::feed::{beat_worker, SETTINGS_KEY, WAKE_QUEUE_PREFIX, WORKERS_KEY};
use origin_policy_engine::last_good::{no_kept_documents, LastGood};
use origin_policy_engine::{
    fingerprint, CompiledSet, Delivery, JsonError, PolicySet, MAX_JSON_BYTES,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, Status};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The root's tick, which hands the per-request counters to Envoy: how late
/// they may reach its stats. With feed delivery it also renews the worker's
/// line in [`WORKERS_KEY`] and reads the change count, should a wake have
/// been lost.
const TICK_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// The policies last applied per plugin in this VM. Envoy configures a
    /// changed plugin in a fresh root context, which must still be able to keep
    /// a rejected domain on its last good policy.
    static LAST_GOOD: RefCell<HashMap<String, Rc<PolicySet>>> = RefCell::default();
}

fn last_good(plugin: &str) -> Option<Rc<PolicySet>> {
    LAST_GOOD.with(|m| m.borrow().get(plugin).cloned())
}

pub(crate) fn plugin_root_id() -> String {
    hostcalls::get_property(vec!["plugin_root_id"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default()
}

/// What this VM reports about a push. Every worker has its own VM and
/// configures it, but a push is one event: it is counted and logged once per
/// process, by whichever VM claims it in shared data (one store per process).
/// The claim is a compare-and-swap on the configuration's fingerprint; Envoy
/// configures a new VM on the main thread before the workers, so the first
/// claim of a key does not race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    /// First to apply it: count it and log everything.
    All,
    /// First to apply it, but without the last good policies of earlier
    /// pushes (Envoy's fresh main-thread VM): count it and log the findings;
    /// which domains kept their policy is left to a VM that knows.
    Findings,
    /// The first VM with history after a [`Report::Findings`]: the domains
    /// kept on their last good policy, and what is served.
    Kept,
    Nothing,
}

/// `knows_kept`: this VM can tell which domains kept their last good policy
/// (it has the previous set, or nothing was rejected).
fn claim(plugin: &str, config: &[u8], knows_kept: bool) -> Report {
    let key = format!("origin-policy.applied.{plugin}");
    let fingerprint = fingerprint(config).to_le_bytes();
    let (report, cas) = match hostcalls::get_shared_data(&key) {
        Ok((Some(seen), cas)) if seen.starts_with(&fingerprint) => {
            if knows_kept && seen.last() == Some(&0) {
                (Report::Kept, cas)
            } else {
                return Report::Nothing;
            }
        }
        // An earlier push was applied in this process, so a VM without history
        // is not one the workers are.
        Ok((Some(_), cas)) if !knows_kept => (Report::Findings, cas),
        Ok((_, cas)) => (Report::All, cas),
        // Without shared data, report in every VM rather than never.
        Err(_) => return Report::All,
    };
    let mut mark = fingerprint.to_vec();
    mark.push(u8::from(report != Report::Findings));
    match hostcalls::set_shared_data(&key, Some(&mark), cas) {
        Ok(()) => report,
        Err(_) => Report::Nothing,
    }
}

/// The shared-data key of a plugin's last good documents (see
/// [`origin_policy_engine::last_good`]): one store per Envoy process, which
/// outlives a VM, so a new `.wasm` keeps rejected domains on their last good
/// policy too.
fn last_good_key(plugin: &str) -> String {
    format!("origin-policy.last-good.{plugin}")
}

fn read_last_good(plugin: &str) -> Option<Vec<u8>> {
    match hostcalls::get_shared_data(&last_good_key(plugin)) {
        Ok((Some(bytes), _)) => Some(bytes),
        _ => None,
    }
}

/// A VM with no previous set (a new `.wasm`, or the VM Envoy makes to check a
/// configuration) keeps the domains it rejected on the last good policies of
/// the process. Returns whether it knows which domains kept theirs.
fn keep_from_store(plugin: &str, compiled: &mut CompiledSet, stored: &mut Option<Vec<u8>>) -> bool {
    if compiled.unresolved.is_empty() {
        return true;
    }
    *stored = read_last_good(plugin);
    let Some(store) = stored.as_deref().and_then(LastGood::decode) else {
        return false;
    };
    let policies = store.policies(&compiled.unresolved);
    compiled.keep_last_good(policies);
    true
}

/// After a push is applied, by the VM that reports it: the configuration as
/// applied, and the documents of the domains it kept on an older policy (from
/// the store being replaced). The store is rewritten only when the
/// configuration changed or domains are kept.
fn store_last_good(plugin: &str, config: &[u8], compiled: &CompiledSet, stored: Option<Vec<u8>>) {
    let old = stored.or_else(|| read_last_good(plugin));
    let old = old.as_deref().and_then(LastGood::decode);
    let kept = if compiled.kept_patterns.is_empty() {
        if old.is_some_and(|o| o.config_fingerprint == fingerprint(config) && o.is_kept_empty()) {
            return;
        }
        no_kept_documents()
    } else {
        match old {
            Some(old) => old.documents(&compiled.kept_patterns),
            None => no_kept_documents(),
        }
    };
    let value = LastGood::encode(config, &kept);
    if hostcalls::set_shared_data(&last_good_key(plugin), Some(&value), None).is_err() {
        warn!("could not store the last good policies: a new VM may drop rejected domains");
    }
}

#[derive(Default)]
pub(crate) struct OriginPolicyRoot {
    policies: Option<Rc<PolicySet>>,
    metrics: Option<Rc<Metrics>>,
    /// Whether the tick was asked of Envoy.
    ticking: bool,
    /// With feed delivery, the name of the shared queue the feed singleton
    /// wakes this root through after each change.
    wake_queue: Option<String>,
}

/// Registers a queue of this root's own (Envoy delivers a queue to the
/// context that registered its name last, so one per worker) and lists it
/// for the feed singleton. `None` if the host has no queues: the tick then
/// reads the change count.
fn register_wake_queue() -> Option<String> {
    let name = format!("{WAKE_QUEUE_PREFIX}{}", crate::feed::unique_id());
    if let Err(e) = hostcalls::register_shared_queue(&name) {
        warn!("policy feed: no shared queue ({e:?}): changes reach this worker on its tick");
        return None;
    }
    beat(&name);
    Some(name)
}

/// Renews this worker's line in [`WORKERS_KEY`] (and drops the silent ones).
fn beat(name: &str) {
    let now = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    // Workers beat on their own threads: a CAS loop, a few tries (one lost
    // beat is renewed on the next tick; the first two writers of the list
    // both see no CAS, and the one overwritten is back a tick later).
    for _ in 0..8 {
        let (list, cas) = hostcalls::get_shared_data(WORKERS_KEY).unwrap_or((None, None));
        let list = beat_worker(list.as_deref(), name, now);
        match hostcalls::set_shared_data(WORKERS_KEY, Some(&list), cas) {
            Err(Status::CasMismatch) => continue,
            Ok(()) | Err(_) => return,
        }
    }
}

impl OriginPolicyRoot {
    fn reject(&self, metrics: &Metrics, report: Report, why: &dyn std::fmt::Display) -> bool {
        if matches!(report, Report::All | Report::Findings) {
            error!("{why}");
            metrics.add(Counter::ConfigRejected, 1);
        }
        // Envoy keeps serving the previous configuration.
        false
    }
}

/// Gives the feed singleton the settings it admits policies under; written
/// only when they changed, so that it checks its entries again only then.
fn publish_settings(configuration: &[u8]) {
    let published = hostcalls::get_shared_data(SETTINGS_KEY)
        .ok()
        .and_then(|(v, _)| v);
    if published.as_deref() != Some(configuration) {
        if let Err(e) = hostcalls::set_shared_data(SETTINGS_KEY, Some(configuration), None) {
            error!("cannot publish the settings to the policy feed: {e:?}");
        }
    }
}

impl Context for OriginPolicyRoot {}

impl RootContext for OriginPolicyRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        let metrics = Rc::clone(
            self.metrics
                .get_or_insert_with(|| Rc::new(Metrics::define())),
        );
        let plugin = plugin_root_id();
        if size > MAX_JSON_BYTES {
            // Refused before it is copied into the VM.
            let why = format!(
                "plugin configuration rejected: {}",
                JsonError::TooLarge { bytes: size }
            );
            let report = claim(&plugin, &(size as u64).to_le_bytes(), true);
            return self.reject(&metrics, report, &why);
        }
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => {
                let report = claim(&plugin, b"", true);
                let why = "plugin configuration rejected: no configuration was given";
                return self.reject(&metrics, report, &why);
            }
        };
        // The plugin's newest applied set, whichever root context applied it.
        let previous = last_good(&plugin);
        let mut compiled = match PolicySet::from_plugin_config(&bytes, previous.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                let report = claim(&plugin, &bytes, true);
                return self.reject(&metrics, report, &e);
            }
        };
        let mut stored = None;
        let knows_kept = previous.is_some() || keep_from_store(&plugin, &mut compiled, &mut stored);
        let report = claim(&plugin, &bytes, knows_kept);
        if matches!(report, Report::All | Report::Kept) {
            store_last_good(&plugin, &bytes, &compiled, stored);
        }
        if matches!(report, Report::All | Report::Findings) {
            for d in compiled.diagnostics.errors() {
                error!("policy rejected: {d}");
            }
            for d in compiled.diagnostics.warnings() {
                warn!("{d}");
            }
            metrics.add(Counter::PolicyRejected, compiled.rejected as u64);
            metrics.add(Counter::ConfigApplied, 1);
        }
        if matches!(report, Report::All | Report::Kept) {
            for domain in &compiled.kept_previous {
                warn!("{domain}: keeping the last good policy");
            }
            match compiled.set.delivery {
                Delivery::Inline => info!(
                    "origin policies loaded: {} domains ({} rejected)",
                    compiled.set.index.len(),
                    compiled.rejected
                ),
                Delivery::Feed => info!("settings loaded; the policies come from the feed"),
            }
        }
        if compiled.set.delivery == Delivery::Feed {
            publish_settings(&bytes);
        }
        if !self.ticking {
            self.set_tick_period(TICK_PERIOD);
            self.ticking = true;
        }
        if compiled.set.delivery == Delivery::Feed && self.wake_queue.is_none() {
            self.wake_queue = register_wake_queue();
            // Listed from now on: whatever changed before is in the count.
            note_feed_changes();
        }
        if previous.as_ref().map(|p| &p.settings) != Some(&compiled.set.settings) {
            forget_entries();
        }
        let set = Rc::new(compiled.set);
        LAST_GOOD.with(|m| m.borrow_mut().insert(plugin, Rc::clone(&set)));
        self.policies = Some(set);
        true
    }

    fn on_tick(&mut self) {
        if self
            .policies
            .as_ref()
            .is_some_and(|p| p.delivery == Delivery::Feed)
        {
            if let Some(name) = &self.wake_queue {
                beat(name);
            }
            note_feed_changes();
        }
        if let Some(metrics) = &self.metrics {
            metrics.flush();
        }
    }

    /// The feed singleton counted a change: read the count now, so that no
    /// request is answered from memory past it.
    fn on_queue_ready(&mut self, queue_id: u32) {
        // Each wake posts one call; the first takes them all.
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        note_feed_changes();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let policies = Rc::clone(self.policies.as_ref()?);
        let metrics = Rc::clone(self.metrics.as_ref()?);
        Some(Box::new(OriginFetch::new(policies, metrics)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
