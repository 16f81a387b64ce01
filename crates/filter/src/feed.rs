//! The feed singleton: a bootstrap wasm service (`singleton: true`, Envoy's
//! main thread) that long-polls the policy source's change feed and keeps one
//! shared-data entry per domain (see [`origin_policy_engine::feed`]). The
//! HTTP filter's VMs share its `vm_id`, so they read what it writes without
//! being reconfigured.

use crate::http::shared_data;
use crate::metrics::{Counter, Metrics};
use log::{error, info, warn};
use origin_policy_engine::feed::{
    live_workers, malformed_report, next_changes, published_settings, rejected_report,
    waiting_state, FeedSync, MalformedLine, RemovalLimit, SnapshotRefused, CHANGES_KEY,
    EPOCH_HEADER, FEED_STATE_KEY, MALFORMED_HEADER, MORE_HEADER, NODE_HEADER, READY_STATE,
    REJECTED_HEADER, RESET_HEADER, SETTINGS_KEY, SNAPSHOT_REFUSED_HEADER, VERSION_HEADER,
    WORKERS_KEY,
};
use origin_policy_engine::{parse_json, OriginNetworks, Settings};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::{BufferType, Status};
use serde_json::Value;
use std::time::{Duration, SystemTime};

/// The source holds a long poll for about 20 s; this only bounds a lost one.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How soon a failed poll is tried again, and how long the singleton waits
/// before asking a source that answers at once with nothing new.
const RETRY_PERIOD: Duration = Duration::from_secs(1);
/// Pages followed back to back with `x-feed-more`; past this the singleton
/// waits [`RETRY_PERIOD`] between pages (a source paging for ever). A
/// snapshot of 1,000,000 domains is about 1,000 pages.
const MAX_PAGES_IN_A_ROW: u32 = 10_000;
const DEFAULT_PATH: &str = "/changes";
/// Envoy configures the singleton's root in two VMs (the base VM it checks
/// the module with, which gets no ticks, and the one it runs): the first root
/// to tick leads, follows the feed and beats here every tick; another takes
/// over when the beat is this old.
const LEADER_KEY: &str = "origin-policy.feed.leader";
const LEADER_STALE: Duration = Duration::from_secs(3);
const FIRST_TICK: Duration = Duration::from_millis(10);
const FIRST_RETRY: Duration = Duration::from_millis(200);
const IDS_KEY: &str = "origin-policy.feed.ids";

/// A number no other root of this process has (the feed's leader election,
/// the workers' queue names): Envoy's clock is the event loop's, the same
/// for roots configured in one turn of it, so a counter in shared data.
pub(crate) fn unique_id() -> u64 {
    loop {
        let (value, cas) = hostcalls::get_shared_data(IDS_KEY).unwrap_or((None, None));
        let last = value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let id = last + 1;
        match hostcalls::set_shared_data(IDS_KEY, Some(id.to_string().as_bytes()), cas) {
            Err(Status::CasMismatch) => continue,
            // Without shared data there is no second root to tell apart.
            Ok(()) | Err(_) => return id,
        }
    }
}

/// The singleton's plugin configuration: `{"feed_cluster": NAME}`, and
/// optionally `"feed_path"` (default `/changes`) and
/// `"max_snapshot_removal_percent"` (default 50).
#[derive(Debug)]
struct FeedConfig {
    cluster: String,
    path: String,
    removal_limit: RemovalLimit,
}

impl FeedConfig {
    fn parse(bytes: &[u8]) -> Result<FeedConfig, String> {
        let value = parse_json(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(map) = value else {
            return Err("expected a JSON object with `feed_cluster`".to_owned());
        };
        let text = |name: &str| match map.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(format!("/{name}: must be a non-empty string")),
        };
        if let Some(unknown) = map.keys().find(|k| {
            !matches!(
                k.as_str(),
                "feed_cluster" | "feed_path" | "max_snapshot_removal_percent"
            )
        }) {
            return Err(format!("/{unknown}: unknown field"));
        }
        let removal_limit = match map.get("max_snapshot_removal_percent") {
            None => RemovalLimit::default(),
            Some(v) => v
                .as_u64()
                .and_then(|p| u8::try_from(p).ok())
                .filter(|p| *p <= 100)
                .map(|percent| RemovalLimit { percent })
                .ok_or("/max_snapshot_removal_percent: must be an integer from 0 to 100")?,
        };
        Ok(FeedConfig {
            cluster: text("feed_cluster")?
                .ok_or("/feed_cluster: missing (the cluster of the policy source)")?,
            path: text("feed_path")?.unwrap_or_else(|| DEFAULT_PATH.to_owned()),
            removal_limit,
        })
    }
}

pub(crate) struct FeedRoot {
    config: Option<FeedConfig>,
    metrics: Option<Metrics>,
    sync: FeedSync,
    /// The feed's version the entries have reached, in the source's epoch (a
    /// new epoch: the source lost its versions, and a snapshot follows).
    version: u64,
    epoch: String,
    ready: bool,
    retry: bool,
    last_failure: Option<String>,
    sync_started: Option<SystemTime>,
    /// Envoy's node id, sent with each poll.
    node: String,
    /// Domains refused since the last answer, the last page's unreadable
    /// lines and a snapshot's refused removals: reported with the next poll.
    rejected: Vec<String>,
    malformed: Vec<MalformedLine>,
    snapshot_refused: Option<SnapshotRefused>,
    /// When the last poll went out, the pages followed in a row, and why the
    /// next poll waits for a tick (logged once per reason).
    polled_at: Option<SystemTime>,
    pages_in_a_row: u32,
    paused: Option<&'static str>,
    /// This root's id in [`LEADER_KEY`], and whether it leads.
    id: u64,
    leading: bool,
    /// The filter's settings policies are admitted under, and the CAS of the
    /// shared data they were read from. Until the filter publishes them (a
    /// fleet's control plane sends the filter only once the feed is polled)
    /// every origin network is admitted, and the workers, which always have
    /// the settings, refuse what they must. When they arrive or change, the
    /// entries written are checked again and those refused reported.
    settings: Settings,
    settings_cas: Option<u32>,
}

impl FeedRoot {
    pub(crate) fn new() -> Self {
        FeedRoot {
            config: None,
            metrics: None,
            sync: FeedSync::default(),
            version: 0,
            epoch: String::new(),
            ready: false,
            retry: false,
            last_failure: None,
            sync_started: None,
            node: String::new(),
            rejected: Vec::new(),
            malformed: Vec::new(),
            snapshot_refused: None,
            polled_at: None,
            pages_in_a_row: 0,
            paused: None,
            id: 0,
            leading: false,
            settings: Settings {
                origin_networks: OriginNetworks::unchecked(),
                ..Settings::default()
            },
            settings_cas: None,
        }
    }

    fn now_ms(&self) -> u64 {
        self.get_current_time()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    /// Beats as the leader, or becomes it when the leader's beat is stale.
    /// `false`: another root leads.
    fn lead(&mut self) -> bool {
        let now = self.now_ms();
        let (value, cas) = self.get_shared_data(LEADER_KEY);
        let leader = value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.split_once(' '))
            .and_then(|(id, beat)| Some((id.parse::<u64>().ok()?, beat.parse::<u64>().ok()?)));
        let free = match leader {
            Some((id, _)) if id == self.id => true,
            Some((_, beat)) => now.saturating_sub(beat) > LEADER_STALE.as_millis() as u64,
            None => true,
        };
        let won = free
            && self
                .set_shared_data(
                    LEADER_KEY,
                    Some(format!("{} {now}", self.id).as_bytes()),
                    cas,
                )
                .is_ok();
        if won && !self.leading {
            info!(
                "policy feed: following cluster `{}` as node `{}`",
                self.cluster(),
                self.node
            );
        }
        self.leading = won;
        won
    }

    fn cluster(&self) -> String {
        self.config
            .as_ref()
            .map_or_else(String::new, |c| c.cluster.clone())
    }

    /// Reads the filter's settings as its configuration published them. On
    /// their arrival, or a change of what admits an origin, the entries
    /// written are checked again: one refused now is reported to the source
    /// with the next poll (the workers do not use it).
    fn refresh_settings(&mut self) {
        let (Some(value), Some(cas)) = self.get_shared_data(SETTINGS_KEY) else {
            return;
        };
        if self.settings_cas == Some(cas) {
            return;
        }
        let settings = match published_settings(&value) {
            Ok(s) => s,
            Err(e) => {
                // The filter refused them too: it serves its previous ones.
                warn!("policy feed: the filter's published settings are unusable: {e}");
                return;
            }
        };
        let changed = self.settings.origin_networks != settings.origin_networks
            || self.settings.resolve != settings.resolve;
        if changed {
            let refused = self.sync.refused_under(&settings, shared_data);
            for finding in &refused {
                error!("policy rejected under the filter's settings, the workers do not use it: {finding}");
                self.rejected.extend(finding.domain.clone());
            }
            if let Some(metrics) = &self.metrics {
                metrics.add(Counter::FeedPolicyRejected, refused.len() as u64);
            }
        }
        self.settings = settings;
        self.settings_cas = Some(cas);
    }

    fn poll(&mut self) {
        self.refresh_settings();
        let Some(config) = &self.config else { return };
        let path = format!(
            "{}?since={}&epoch={}",
            config.path, self.version, self.epoch
        );
        let cluster = config.cluster.clone();
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", cluster.as_str()),
        ];
        if !self.node.is_empty() {
            headers.push((NODE_HEADER, self.node.as_str()));
        }
        let rejected = rejected_report(&self.rejected);
        if let Some(report) = &rejected {
            headers.push((REJECTED_HEADER, report.as_str()));
        }
        let malformed = malformed_report(&self.malformed);
        if let Some(report) = &malformed {
            headers.push((MALFORMED_HEADER, report.as_str()));
        }
        let refused = self.snapshot_refused.as_ref().map(SnapshotRefused::report);
        if let Some(report) = &refused {
            headers.push((SNAPSHOT_REFUSED_HEADER, report.as_str()));
        }
        self.polled_at = Some(self.get_current_time());
        let call = self.dispatch_http_call(&cluster, headers, None, vec![], CALL_TIMEOUT);
        if let Err(e) = call {
            self.fail(format!(
                "cannot call the policy source on cluster `{cluster}` ({e:?}): is the cluster defined?"
            ));
        }
    }

    /// The source could not be asked or did not answer: try again on the next
    /// tick, serving the entries already here. Until the first sync, requests
    /// are told why they wait.
    fn fail(&mut self, why: String) {
        self.retry = true;
        // Sooner while the edge has nothing to serve: at start, the source's
        // cluster may not be up on the first try.
        if !self.ready {
            self.set_tick_period(FIRST_RETRY);
        }
        if self.last_failure.as_ref() != Some(&why) {
            warn!("policy feed: {why}; trying again every second");
        }
        if !self.ready {
            let _ =
                self.set_shared_data(FEED_STATE_KEY, Some(waiting_state(&why).as_bytes()), None);
            self.count_change();
        }
        self.last_failure = Some(why);
    }

    fn write(&self, writes: Vec<(String, Vec<u8>)>) {
        let mut written = 0;
        for (key, value) in writes {
            match self.set_shared_data(&key, Some(&value), None) {
                Ok(()) => written += 1,
                Err(e) => error!("policy feed: could not write {key}: {e:?}"),
            }
        }
        if written > 0 {
            self.count_change();
        }
        if let Some(metrics) = &self.metrics {
            metrics.add(Counter::FeedEntriesWritten, written);
        }
    }

    /// Tells the workers that entries or the state changed: each is woken
    /// through its queue, reads the count and looks up again what it
    /// answered from memory. Counted after what it counts, and the workers
    /// listed after counting, so a worker either sees the new count or is
    /// listed and woken.
    fn count_change(&self) {
        // Only the leader writes it (on Envoy's main thread): no CAS needed.
        let (value, _) = self.get_shared_data(CHANGES_KEY);
        let next = next_changes(value.as_deref());
        if let Err(e) = self.set_shared_data(CHANGES_KEY, Some(&next), None) {
            error!("policy feed: could not count a change, workers may answer from memory: {e:?}");
        }
        let (Some(list), _) = self.get_shared_data(WORKERS_KEY) else {
            return;
        };
        for name in live_workers(&list, self.now_ms()) {
            // Envoy runs the worker's `on_queue_ready` on its thread. The
            // message is not read: the count is in shared data.
            if let Ok(Some(queue)) = hostcalls::resolve_shared_queue("", name) {
                let _ = hostcalls::enqueue_shared_queue(queue, Some(b"c"));
            }
        }
    }

    fn clear_reports(&mut self) {
        self.rejected.clear();
        self.malformed.clear();
        self.snapshot_refused = None;
    }

    /// Asks for the next page at once, unless the source is not keeping to
    /// the feed: it answered at once with nothing new (it does not hold its
    /// long poll), sent `x-feed-more` on a page that brings nothing, or has
    /// paged for too long. Then the next poll waits for a tick.
    fn follow(&mut self, progressed: bool, more: bool) {
        self.pages_in_a_row = if more { self.pages_in_a_row + 1 } else { 0 };
        let quick = self
            .polled_at
            .and_then(|t| self.get_current_time().duration_since(t).ok())
            .is_some_and(|took| took < RETRY_PERIOD);
        let why = if more && !progressed {
            Some("the source sent `x-feed-more` on a page that brings nothing new (same version and epoch)")
        } else if !progressed && quick {
            Some("the source answered at once with nothing new (it does not hold the long poll)")
        } else if self.pages_in_a_row > MAX_PAGES_IN_A_ROW {
            Some("the source has sent more than 10000 pages in a row")
        } else {
            None
        };
        match why {
            None => {
                self.paused = None;
                self.poll();
            }
            Some(why) => {
                if self.paused != Some(why) {
                    warn!("policy feed: {why}; asking again every second");
                }
                self.paused = Some(why);
                self.retry = true;
            }
        }
    }

    fn apply_page(&mut self, body_size: usize, more: bool) {
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let outcome = self.sync.apply(&body, &self.settings);
        for finding in &outcome.rejected {
            error!("policy rejected, the domain keeps its last good policy: {finding}");
            self.rejected.extend(finding.domain.clone());
        }
        for line in &outcome.malformed {
            warn!("policy feed: {line}; skipped");
        }
        if let Some(metrics) = &self.metrics {
            metrics.add(Counter::FeedPolicyRejected, outcome.rejected.len() as u64);
            metrics.add(Counter::FeedLineMalformed, outcome.malformed.len() as u64);
        }
        self.malformed = outcome.malformed;
        self.write(outcome.writes);
        if more {
            return;
        }
        if self.sync.in_snapshot() {
            let limit = self
                .config
                .as_ref()
                .map_or_else(RemovalLimit::default, |c| c.removal_limit);
            let removed = match self.sync.end_snapshot(limit) {
                Ok(removed) => removed,
                Err(refused) => {
                    error!("policy feed: {refused}");
                    if let Some(metrics) = &self.metrics {
                        metrics.add(Counter::FeedSnapshotRefused, 1);
                    }
                    self.snapshot_refused = Some(refused);
                    Vec::new()
                }
            };
            let count = removed.len();
            self.write(removed);
            if self.ready {
                info!(
                    "policy feed: in sync again at version {}: {} domains, {count} removed by the source",
                    self.version,
                    self.sync.domains()
                );
            } else if count > 0 {
                info!("policy feed: {count} domains removed by the source");
            }
        }
        if !self.ready {
            self.ready = true;
            let _ = self.set_shared_data(FEED_STATE_KEY, Some(READY_STATE.as_bytes()), None);
            self.count_change();
            let took = self
                .sync_started
                .and_then(|t| self.get_current_time().duration_since(t).ok())
                .unwrap_or_default();
            info!(
                "policy feed: in sync at version {}: {} domains in {} ms",
                self.version,
                self.sync.domains(),
                took.as_millis()
            );
        }
    }
}

impl Context for FeedRoot {
    fn on_http_call_response(&mut self, _: u32, _: usize, body_size: usize, _: usize) {
        let header = |name: &str| self.get_http_call_response_header(name);
        let status = header(":status");
        let version = header(VERSION_HEADER).and_then(|v| v.parse::<u64>().ok());
        let epoch = header(EPOCH_HEADER);
        let reset = header(RESET_HEADER).is_some();
        let more = header(MORE_HEADER).is_some();
        let cluster = self.cluster();
        match (status.as_deref(), version, epoch) {
            (Some("200"), Some(version), Some(epoch)) => {
                let progressed = reset || version != self.version || epoch != self.epoch;
                // The source has the reports sent with this poll.
                self.clear_reports();
                self.set_tick_period(RETRY_PERIOD);
                if self.last_failure.take().is_some() {
                    info!("policy feed: the source answers again");
                }
                if reset {
                    info!("policy feed: the source sends every domain (epoch {epoch})");
                    self.sync.begin_snapshot();
                }
                self.epoch = epoch;
                self.version = version;
                self.apply_page(body_size, more);
                self.follow(progressed, more);
            }
            (Some("204"), _, _) => {
                self.clear_reports();
                self.last_failure = None;
                self.follow(false, false);
            }
            (Some(status), _, _) => self.fail(format!(
                "no feed page from the policy source on cluster `{cluster}` (status {status})"
            )),
            (None, _, _) => self.fail(format!(
                "the policy source on cluster `{cluster}` did not answer (unreachable, reset or timed out)"
            )),
        }
    }
}

impl RootContext for FeedRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = proxy_wasm::hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match FeedConfig::parse(&bytes) {
            Ok(c) => c,
            Err(why) => {
                error!("policy feed configuration rejected: {why}");
                return false;
            }
        };
        let first = self.config.is_none();
        self.config = Some(config);
        if first {
            self.metrics = Some(Metrics::define());
            self.sync_started = Some(self.get_current_time());
            self.id = unique_id();
            // `xds.node` in Envoy 1.40; `node` in older releases.
            self.node = [vec!["xds", "node", "id"], vec!["node", "id"]]
                .into_iter()
                .find_map(|path| self.get_property(path).filter(|b| !b.is_empty()))
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            if self.get_shared_data(FEED_STATE_KEY).0.is_none() {
                let why = waiting_state("the policy source has not answered yet");
                let _ = self.set_shared_data(FEED_STATE_KEY, Some(why.as_bytes()), None);
            }
            // The first tick, soon, elects the leader.
            self.set_tick_period(FIRST_TICK);
        }
        true
    }

    fn on_tick(&mut self) {
        let was_leading = self.leading;
        if !self.lead() {
            return;
        }
        if !was_leading {
            self.set_tick_period(RETRY_PERIOD);
            // Taking over: the entries are the process's, but not what the
            // last leader had read: start from a snapshot.
            self.version = 0;
            self.epoch.clear();
            self.poll();
        } else if std::mem::take(&mut self.retry) {
            self.poll();
        }
    }
}
