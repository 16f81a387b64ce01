//! One mirror run: list the domain's paths, fetch each from the primary
//! origin (conditionally when a copy exists), store what changed, forget
//! what is gone after a grace period.

use crate::error::{MirrorError, ResourceFailure};
use crate::origin::{classify, OriginClient, PrimaryOrigin};
use crate::resources::{parse_path_list, parse_sitemap, ResourcePath};
use crate::store::{Manifest, ManifestEntry, MirrorStore, StoredHead};
use futures::StreamExt as _;
use object_store::path::Path as ObjectKey;
use origin_policy_engine::{Outcome, PolicySet, Scheme, Tier, ViewerRequest};
use reqwest::header::{HeaderMap, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LOCATION};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// How much a run may take from the origin, the network and the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Resources fetched at once.
    pub concurrency: usize,
    /// Largest body stored; a larger one is not stored at all.
    pub max_object_bytes: u64,
    /// Largest the whole store may grow (bodies).
    pub max_store_bytes: u64,
    /// Body bytes per second read from the origin, all fetches together
    /// (sitemaps aside); 0: no cap.
    pub rate_bytes_per_s: u64,
    /// One resource's body, first to last byte, not counting the waits of
    /// the rate limit: a slow drip is cut off here.
    pub object_timeout: Duration,
    pub max_redirects: usize,
    /// How long a path gone from the list, or answering 404, keeps its copy.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            concurrency: 4,
            max_object_bytes: 1 << 30,
            max_store_bytes: 10 << 30,
            rate_bytes_per_s: 20 << 20,
            object_timeout: Duration::from_secs(600),
            max_redirects: 5,
            grace: Duration::from_secs(7 * 86_400),
        }
    }
}

/// Where the paths to mirror come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// Files of paths, one per line.
    pub path_files: Vec<PathBuf>,
    /// Sitemaps on the primary origin, by path (`/sitemap.xml`).
    pub sitemaps: Vec<ResourcePath>,
}

/// Counts while a run goes on, for a progress line.
#[derive(Debug, Default)]
pub struct Progress {
    pub listed: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub bytes: AtomicU64,
    started: Mutex<Option<Instant>>,
}

impl Progress {
    /// `12/40 files, 3.1 MiB, 1.2 MiB/s, 0 errors`.
    pub fn line(&self) -> String {
        let elapsed = self
            .started
            .lock()
            .ok()
            .and_then(|s| s.map(|t| t.elapsed().as_secs_f64()))
            .unwrap_or(0.0);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let rate = if elapsed > 0.0 {
            bytes as f64 / elapsed
        } else {
            0.0
        };
        format!(
            "{}/{} files, {}, {}/s, {} errors",
            self.done.load(Ordering::Relaxed),
            self.listed.load(Ordering::Relaxed),
            human_bytes(bytes as f64),
            human_bytes(rate),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Why a run ended before it went through its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Ctrl-C or SIGTERM.
    Signal,
    /// A list (a file or a sitemap) could not be read: nothing was fetched.
    List,
    /// The store (or its bookkeeping) could not be read or written.
    Store,
    /// The policy gives the domain no primary origin, or its address
    /// cannot be resolved: the run could not start.
    Origin,
}

impl StopReason {
    pub const ALL: [StopReason; 4] = [
        StopReason::Signal,
        StopReason::List,
        StopReason::Store,
        StopReason::Origin,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StopReason::Signal => "signal",
            StopReason::List => "list",
            StopReason::Store => "store",
            StopReason::Origin => "origin",
        }
    }
}

/// What a run did, also when it stopped early.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub domain: String,
    pub listed: u64,
    /// Stored: new or changed.
    pub fetched: u64,
    /// Confirmed current by the origin (304).
    pub unchanged: u64,
    /// Gone (from the list, or 404/410) but kept for the grace period.
    pub missing: u64,
    /// Gone for longer than the grace period: deleted.
    pub removed: u64,
    pub failed: u64,
    /// Listed but not gone through: the run stopped first.
    pub not_done: u64,
    /// Body bytes read from the origin.
    pub bytes: u64,
    /// Body bytes the store holds after the run; `None` when its
    /// bookkeeping could not be read.
    pub stored_bytes: Option<u64>,
    /// Why the run ended early, if it did (the error is in `errors`).
    pub stop: Option<StopReason>,
    /// Whether the bookkeeping now records what this run did.
    pub saved: bool,
    pub elapsed: Duration,
    /// Sitemap locations not mirrored, with why.
    pub skipped: Vec<String>,
    pub errors: Vec<MirrorError>,
}

impl RunSummary {
    /// The run ended before fetching anything: why, and how long it took.
    fn stopped_by(mut self, error: MirrorError, reason: StopReason, started: Instant) -> Self {
        self.errors.push(error);
        self.stop = Some(reason);
        self.elapsed = started.elapsed();
        self
    }

    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "{}: {} listed, {} fetched, {} unchanged, {} missing (kept), {} removed, {} failed",
            self.domain,
            self.listed,
            self.fetched,
            self.unchanged,
            self.missing,
            self.removed,
            self.failed,
        );
        if self.not_done > 0 {
            out.push_str(&format!(", {} not done", self.not_done));
        }
        out.push_str(&format!(
            "; {} read in {:.1} s; ",
            human_bytes(self.bytes as f64),
            self.elapsed.as_secs_f64()
        ));
        match self.stored_bytes {
            Some(n) => out.push_str(&format!("store holds {}", human_bytes(n as f64))),
            None => out.push_str("store holds: unknown (its bookkeeping was not read)"),
        }
        if let Some(reason) = self.stop {
            let why = match reason {
                StopReason::Signal => "stopped by a signal",
                StopReason::List => "stopped: a list could not be read",
                StopReason::Store => "stopped: the store failed",
                StopReason::Origin => "not started: no primary origin to fetch from",
            };
            out.push_str(&format!("; {why}"));
        }
        if !self.saved {
            out.push_str("; bookkeeping not saved");
        }
        out
    }

    pub fn to_json(&self) -> Value {
        json!({
            "domain": self.domain,
            "ok": self.ok(),
            "listed": self.listed,
            "fetched": self.fetched,
            "unchanged": self.unchanged,
            "missing": self.missing,
            "removed": self.removed,
            "failed": self.failed,
            "not_done": self.not_done,
            "bytes": self.bytes,
            "stored_bytes": self.stored_bytes,
            "stopped": self.stop.map(StopReason::label),
            "saved": self.saved,
            "elapsed_ms": u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
            "skipped": self.skipped,
            "errors": self.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })
    }

    /// The run in Prometheus text format (node_exporter's textfile collector).
    /// `last_success_timestamp_seconds` is carried over from `previous` when
    /// this run failed, so an alert can fire on its age.
    pub fn metrics_text(&self, finished_at: u64, last_success: Option<u64>) -> String {
        let d = &self.domain;
        let mut out = String::new();
        out.push_str("# HELP origin_policy_mirror_resources Resources of the last run, by result.\n# TYPE origin_policy_mirror_resources gauge\n");
        for (result, n) in [
            ("listed", self.listed),
            ("fetched", self.fetched),
            ("unchanged", self.unchanged),
            ("missing", self.missing),
            ("removed", self.removed),
            ("failed", self.failed),
            ("not_done", self.not_done),
        ] {
            out.push_str(&format!(
                "origin_policy_mirror_resources{{domain=\"{d}\",result=\"{result}\"}} {n}\n"
            ));
        }
        out.push_str(&format!(
            "# HELP origin_policy_mirror_bytes_read Body bytes the last run read from the origin.\n# TYPE origin_policy_mirror_bytes_read gauge\norigin_policy_mirror_bytes_read{{domain=\"{d}\"}} {}\n",
            self.bytes
        ));
        // Unknown when the bookkeeping was not read: no sample rather than 0.
        if let Some(stored) = self.stored_bytes {
            out.push_str(&format!(
                "# HELP origin_policy_mirror_stored_bytes Body bytes the store holds.\n# TYPE origin_policy_mirror_stored_bytes gauge\norigin_policy_mirror_stored_bytes{{domain=\"{d}\"}} {stored}\n"
            ));
        }
        out.push_str("# HELP origin_policy_mirror_last_run_stopped 1 when the last run ended early, by why (signal, list, store, origin).\n# TYPE origin_policy_mirror_last_run_stopped gauge\n");
        for reason in StopReason::ALL {
            out.push_str(&format!(
                "origin_policy_mirror_last_run_stopped{{domain=\"{d}\",reason=\"{}\"}} {}\n",
                reason.label(),
                u8::from(self.stop == Some(reason))
            ));
        }
        out.push_str(&format!(
            "# HELP origin_policy_mirror_saved 1 when the last run's bookkeeping was saved.\n# TYPE origin_policy_mirror_saved gauge\norigin_policy_mirror_saved{{domain=\"{d}\"}} {}\n",
            u8::from(self.saved)
        ));
        out.push_str(&format!(
            "# HELP origin_policy_mirror_last_run_failed 1 when the last run had any error.\n# TYPE origin_policy_mirror_last_run_failed gauge\norigin_policy_mirror_last_run_failed{{domain=\"{d}\"}} {}\n",
            u8::from(!self.ok())
        ));
        out.push_str(&format!(
            "# HELP origin_policy_mirror_last_run_timestamp_seconds When the last run ended.\n# TYPE origin_policy_mirror_last_run_timestamp_seconds gauge\norigin_policy_mirror_last_run_timestamp_seconds{{domain=\"{d}\"}} {finished_at}\n"
        ));
        if let Some(t) = last_success {
            out.push_str(&format!(
                "# HELP origin_policy_mirror_last_success_timestamp_seconds When a run last ended without error.\n# TYPE origin_policy_mirror_last_success_timestamp_seconds gauge\norigin_policy_mirror_last_success_timestamp_seconds{{domain=\"{d}\"}} {t}\n"
            ));
        }
        out
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes the store holds against its limit, shared by the fetches of a run.
struct StoreBudget {
    limit: u64,
    used: AtomicU64,
}

impl StoreBudget {
    fn reserve(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

/// One pace for all fetches together: each chunk read books its share of
/// time, and the reader waits until that time has come.
struct RateLimit {
    bytes_per_s: u64,
    next_free: tokio::sync::Mutex<Instant>,
}

impl RateLimit {
    /// Waits for `n` bytes' turn; returns how long it waited.
    async fn take(&self, n: u64) -> Duration {
        if self.bytes_per_s == 0 {
            return Duration::ZERO;
        }
        let wait = {
            let mut next = self.next_free.lock().await;
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_s as f64);
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }
}

enum Fetched {
    Stored(ManifestEntry),
    Unchanged,
    Gone,
}

/// A domain, its primary origins and its store, ready to run.
pub struct MirrorJob {
    pub domain: String,
    origins: Vec<OriginClient>,
    store: MirrorStore,
    sources: Sources,
    limits: Limits,
}

impl MirrorJob {
    /// Asks the policy set how the edge reaches `domain`'s primary origins
    /// (for a viewer on `viewer`), and prepares a client for each.
    pub async fn new(
        set: &PolicySet,
        domain: &str,
        viewer: Scheme,
        store: MirrorStore,
        sources: Sources,
        limits: Limits,
    ) -> Result<Self, MirrorError> {
        let policy_error = |why: String| MirrorError::Policy {
            domain: domain.to_owned(),
            why,
        };
        let request = ViewerRequest {
            authority: domain,
            connection: Some(viewer),
            method: "GET",
            ..ViewerRequest::default()
        };
        let decision = match set.decide(&request) {
            Outcome::Origin(d) => d,
            Outcome::Refused(r) => {
                return Err(policy_error(format!(
                    "no policy gives it an origin ({r:?})"
                )))
            }
        };
        let mut targets = vec![PrimaryOrigin::from_target(&decision.target)];
        for t in decision.chain.iter().filter(|t| t.tier == Tier::Primary) {
            let t = PrimaryOrigin::from_target(t);
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        let mut origins = Vec::with_capacity(targets.len());
        for t in targets {
            let described = t.describe();
            origins.push(
                OriginClient::connect(t, &set.settings)
                    .await
                    .map_err(|why| policy_error(format!("primary origin {described}: {why}")))?,
            );
        }
        Ok(MirrorJob {
            domain: domain.to_owned(),
            origins,
            store,
            sources,
            limits,
        })
    }

    /// The primary origins, as the edge reaches them.
    pub fn origins(&self) -> impl Iterator<Item = &PrimaryOrigin> {
        self.origins.iter().map(|o| &o.endpoint)
    }

    /// Runs once, and says what it did, also when it stopped early: a list
    /// that cannot be read stops it before anything is fetched; a store
    /// that fails as a whole (unreachable, full) or a `stop` ends it where it
    /// is. Either way the fetches under way are dropped (nothing of them is
    /// stored), nothing is marked gone, and what was done is recorded when
    /// the bookkeeping can be written. A resource that failed is in the
    /// summary's errors; its copy stays.
    pub async fn run(&self, progress: &Progress, stop: &CancellationToken) -> RunSummary {
        let started = Instant::now();
        if let Ok(mut s) = progress.started.lock() {
            *s = Some(started);
        }
        let mut summary = RunSummary {
            domain: self.domain.clone(),
            ..RunSummary::default()
        };
        // The lists first: a run that cannot list stops before the store.
        let listed = match self.list(&mut summary).await {
            Ok(listed) => listed,
            Err(e) => return summary.stopped_by(e, StopReason::List, started),
        };
        summary.listed = listed.len() as u64;
        summary.not_done = summary.listed;
        progress.listed.store(summary.listed, Ordering::Relaxed);
        let mut manifest = match self.store.load_manifest(&self.domain).await {
            Ok(m) => m,
            Err(e) => return summary.stopped_by(e, StopReason::Store, started),
        };
        self.fetch_all(&listed, &mut manifest, &mut summary, progress, stop)
            .await;
        summary.not_done = summary
            .listed
            .saturating_sub(progress.done.load(Ordering::Relaxed));
        // A run that stopped early marks nothing gone.
        let now = unix_now();
        if summary.stop.is_none() {
            for (key, e) in manifest.entries.iter_mut() {
                if !listed.contains_key(key) {
                    e.missing_since.get_or_insert(now);
                }
            }
            self.forget_gone(&mut manifest, now, &mut summary).await;
        }
        match self.store.save_manifest(&manifest).await {
            Ok(()) => summary.saved = true,
            Err(e) => {
                summary.errors.push(e);
                summary.stop.get_or_insert(StopReason::Store);
            }
        }
        summary.missing = manifest
            .entries
            .values()
            .filter(|e| e.missing_since.is_some())
            .count() as u64;
        summary.bytes = progress.bytes.load(Ordering::Relaxed);
        summary.stored_bytes = Some(manifest.stored_bytes());
        summary.elapsed = started.elapsed();
        summary
    }

    /// Fetches the listed paths until done, stopped, or the store fails as
    /// a whole; records each result in the manifest and the summary.
    async fn fetch_all(
        &self,
        listed: &BTreeMap<String, ResourcePath>,
        manifest: &mut Manifest,
        summary: &mut RunSummary,
        progress: &Progress,
        stop: &CancellationToken,
    ) {
        let budget = StoreBudget {
            limit: self.limits.max_store_bytes,
            used: AtomicU64::new(manifest.stored_bytes()),
        };
        let rate = RateLimit {
            bytes_per_s: self.limits.rate_bytes_per_s,
            next_free: tokio::sync::Mutex::new(Instant::now()),
        };
        let now = unix_now();
        let work: Vec<(&String, &ResourcePath, Option<ManifestEntry>)> = listed
            .iter()
            .map(|(key, path)| (key, path, manifest.entries.get(key).cloned()))
            .collect();
        let jobs = work.into_iter().map(|(key, path, previous)| {
            let (budget, rate) = (&budget, &rate);
            async move {
                let result = self
                    .fetch(path, previous.as_ref(), budget, rate, progress)
                    .await;
                (key, path, result)
            }
        });
        let mut results =
            futures::stream::iter(jobs).buffer_unordered(self.limits.concurrency.max(1));
        let mut since_save = 0;
        loop {
            let next = tokio::select! {
                next = results.next() => next,
                () = stop.cancelled() => {
                    summary.errors.push(MirrorError::Stopped {
                        domain: self.domain.clone(),
                        done: progress.done.load(Ordering::Relaxed),
                        listed: summary.listed,
                    });
                    summary.stop = Some(StopReason::Signal);
                    break;
                }
            };
            let Some((key, path, result)) = next else {
                break;
            };
            progress.done.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(Fetched::Stored(entry)) => {
                    summary.fetched += 1;
                    manifest.entries.insert(key.clone(), entry);
                }
                Ok(Fetched::Unchanged) => {
                    summary.unchanged += 1;
                    if let Some(e) = manifest.entries.get_mut(key) {
                        e.checked_at = now;
                        e.missing_since = None;
                    }
                }
                Ok(Fetched::Gone) => match manifest.entries.get_mut(key) {
                    Some(e) => {
                        e.missing_since.get_or_insert(now);
                    }
                    None => summary
                        .skipped
                        .push(format!("{path}: not found at the origin, nothing stored")),
                },
                Err(ResourceFailure::StoreUnavailable(why)) => {
                    // The next objects would meet the same store: stop here.
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    summary.failed += 1;
                    summary.errors.push(MirrorError::StoreUnavailable {
                        location: self.store.location.clone(),
                        done: progress.done.load(Ordering::Relaxed),
                        listed: summary.listed,
                        why: format!("{path}: {why}"),
                    });
                    summary.stop = Some(StopReason::Store);
                    break;
                }
                Err(failure) => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    summary.failed += 1;
                    summary.errors.push(MirrorError::Resource {
                        domain: self.domain.clone(),
                        path: path.to_string(),
                        failure,
                    });
                }
            }
            // A run stopped half-way resumes from here: what is stored is
            // in the manifest, at most 100 resources behind.
            since_save += 1;
            if since_save >= 100 {
                since_save = 0;
                if let Err(e) = self.store.save_manifest(manifest).await {
                    summary.errors.push(e);
                    summary.stop = Some(StopReason::Store);
                    break;
                }
            }
        }
        // Dropping the stream drops the fetches still under way: their
        // objects are never committed.
        drop(results);
    }

    async fn forget_gone(&self, manifest: &mut Manifest, now: u64, summary: &mut RunSummary) {
        let grace = self.limits.grace.as_secs();
        let expired: Vec<String> = manifest
            .entries
            .iter()
            .filter(|(_, e)| {
                e.missing_since
                    .is_some_and(|t| now.saturating_sub(t) >= grace)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for key in expired {
            let deleted = match ObjectKey::parse(&key) {
                Ok(object) => self.store.delete(&object).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match deleted {
                Ok(()) => {
                    manifest.entries.remove(&key);
                    summary.removed += 1;
                }
                Err(why) => {
                    summary.failed += 1;
                    summary.errors.push(MirrorError::Resource {
                        domain: self.domain.clone(),
                        path: format!("/{key}"),
                        failure: ResourceFailure::Store(format!("cannot delete: {why}")),
                    });
                }
            }
        }
    }

    /// Every path the sources name, by the object it is stored as: paths
    /// naming one object (`/` and `/index.html`) are fetched once, by the
    /// first. Any source that cannot be read fails the run before anything
    /// is fetched or marked gone.
    async fn list(
        &self,
        summary: &mut RunSummary,
    ) -> Result<BTreeMap<String, ResourcePath>, MirrorError> {
        let mut out = BTreeSet::new();
        for file in &self.sources.path_files {
            let source = file.display().to_string();
            let list_error = |line, why| MirrorError::List {
                domain: self.domain.clone(),
                source: source.clone(),
                line,
                why,
            };
            let text = tokio::fs::read_to_string(file)
                .await
                .map_err(|e| list_error(None, e.to_string()))?;
            let list = parse_path_list(&text).map_err(|(line, why)| list_error(Some(line), why))?;
            out.extend(list.paths);
            summary.skipped.extend(
                list.skipped
                    .into_iter()
                    .map(|(line, why)| format!("{source}:{line}: {why}")),
            );
        }
        let mut pending: Vec<(ResourcePath, usize)> = self
            .sources
            .sitemaps
            .iter()
            .map(|s| (s.clone(), 0))
            .collect();
        let mut seen = BTreeSet::new();
        while let Some((sitemap, depth)) = pending.pop() {
            if !seen.insert(sitemap.clone()) {
                continue;
            }
            let list_error = |why: String| MirrorError::List {
                domain: self.domain.clone(),
                source: format!("sitemap {sitemap}"),
                line: None,
                why,
            };
            let xml = self.read_small(&sitemap).await.map_err(list_error)?;
            let entries = parse_sitemap(&xml, &self.domain).map_err(list_error)?;
            out.extend(entries.paths);
            summary.skipped.extend(entries.skipped);
            // A sitemap index lists sitemaps; those list pages (one level).
            if depth == 0 {
                pending.extend(entries.sitemaps.into_iter().map(|s| (s, depth + 1)));
            } else if !entries.sitemaps.is_empty() {
                summary.skipped.push(format!(
                    "sitemap {sitemap}: {} sitemaps of a nested index not read (one level only)",
                    entries.sitemaps.len()
                ));
            }
        }
        let mut by_key = BTreeMap::new();
        for path in out {
            by_key
                .entry(self.store.key(&path).to_string())
                .or_insert(path);
        }
        Ok(by_key)
    }

    /// A sitemap: at most 50 MiB (the sitemaps.org limit), as text.
    async fn read_small(&self, path: &ResourcePath) -> Result<String, String> {
        const MAX_SITEMAP_BYTES: usize = 50 << 20;
        let response = self
            .send(path.as_str(), HeaderMap::new())
            .await
            .map_err(|f| f.to_string())?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(format!("origin answered {status}"));
        }
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        let deadline = tokio::time::Instant::now() + self.limits.object_timeout;
        loop {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => return Err("not complete within the object timeout".to_owned()),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(classify(&e).to_string()),
                Ok(Some(Ok(chunk))) => {
                    if body.len() + chunk.len() > MAX_SITEMAP_BYTES {
                        return Err(format!("larger than {MAX_SITEMAP_BYTES} bytes"));
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
        String::from_utf8(body).map_err(|_| "not UTF-8".to_owned())
    }

    /// The first primary that answers; the next only when one cannot be reached.
    async fn send(
        &self,
        path: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, ResourceFailure> {
        let mut last = ResourceFailure::Unreachable("no primary origin".to_owned());
        for origin in &self.origins {
            match origin.get(path, headers.clone()).await {
                Err(f @ (ResourceFailure::Unreachable(_) | ResourceFailure::Timeout(_))) => {
                    last = f
                }
                other => return other,
            }
        }
        Err(last)
    }

    async fn fetch(
        &self,
        path: &ResourcePath,
        previous: Option<&ManifestEntry>,
        budget: &StoreBudget,
        rate: &RateLimit,
        progress: &Progress,
    ) -> Result<Fetched, ResourceFailure> {
        let mut validators = HeaderMap::new();
        if let Some(head) = previous.map(|p| &p.head) {
            for (asked, kept) in [
                (IF_NONE_MATCH, "etag"),
                (IF_MODIFIED_SINCE, "last-modified"),
            ] {
                if let Some(v) = head.get(kept).and_then(|v| HeaderValue::from_str(v).ok()) {
                    validators.insert(asked, v);
                }
            }
        }
        let mut hops = vec![path.clone()];
        let response = loop {
            let current = hops.last().map_or(path.as_str(), ResourcePath::as_str);
            let response = self.send(current, validators.clone()).await?;
            let status = response.status().as_u16();
            if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                break response;
            }
            let next = self.redirect_target(current, response.headers())?;
            if hops.contains(&next) {
                let mut shown: Vec<String> = hops.iter().map(ToString::to_string).collect();
                shown.push(next.to_string());
                return Err(ResourceFailure::RedirectLoop(shown));
            }
            if hops.len() > self.limits.max_redirects {
                return Err(ResourceFailure::TooManyRedirects(self.limits.max_redirects));
            }
            hops.push(next);
        };
        match response.status().as_u16() {
            200 => {}
            304 if previous.is_some() => return Ok(Fetched::Unchanged),
            404 | 410 => return Ok(Fetched::Gone),
            other => return Err(ResourceFailure::Status(other)),
        }
        let limit = self.limits.max_object_bytes;
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(ResourceFailure::TooLarge { limit });
        }
        let head = StoredHead::from_response(200, response.headers());
        let mut writer = self.store.writer(self.store.key(path), &head).await?;
        let mut size: u64 = 0;
        let mut stream = response.bytes_stream();
        let mut deadline = tokio::time::Instant::now() + self.limits.object_timeout;
        let failure = loop {
            let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => {
                    break ResourceFailure::Timeout(format!(
                        "body not complete within {} s (--object-timeout)",
                        self.limits.object_timeout.as_secs()
                    ))
                }
                Ok(None) => {
                    return match writer.commit().await {
                        Ok(()) => {
                            budget.release(previous.map_or(0, |p| p.size));
                            let now = unix_now();
                            Ok(Fetched::Stored(ManifestEntry {
                                head,
                                size,
                                stored_at: now,
                                checked_at: now,
                                missing_since: None,
                            }))
                        }
                        Err(why) => {
                            budget.release(size);
                            Err(why.into())
                        }
                    };
                }
                Ok(Some(Err(e))) => break classify(&e),
                Ok(Some(Ok(chunk))) => chunk,
            };
            let n = chunk.len() as u64;
            if size + n > limit {
                break ResourceFailure::TooLarge { limit };
            }
            if !budget.reserve(n) {
                break ResourceFailure::StoreFull {
                    limit: budget.limit,
                };
            }
            size += n;
            // The pace is ours, not the origin's: it does not count against it.
            deadline += rate.take(n).await;
            progress.bytes.fetch_add(n, Ordering::Relaxed);
            if let Err(why) = writer.write(chunk).await {
                break why.into();
            }
        };
        writer.abort().await;
        budget.release(size);
        Err(failure)
    }

    /// A redirect is followed only to another path of the same domain (or
    /// of the Host the origin was asked for).
    fn redirect_target(
        &self,
        from: &str,
        headers: &HeaderMap,
    ) -> Result<ResourcePath, ResourceFailure> {
        let location = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ResourceFailure::Http("a redirect without a Location".to_owned()))?;
        let base = url::Url::parse(&format!("http://{}{from}", self.domain))
            .map_err(|e| ResourceFailure::Http(e.to_string()))?;
        let target = base
            .join(location)
            .map_err(|e| ResourceFailure::Http(format!("Location `{location}`: {e}")))?;
        let host = target.host_str().unwrap_or_default();
        let own = host.eq_ignore_ascii_case(&self.domain)
            || self
                .origins
                .iter()
                .any(|o| authority_host(&o.endpoint.authority).eq_ignore_ascii_case(host));
        if !own || target.query().is_some() {
            return Err(ResourceFailure::RedirectElsewhere(location.to_owned()));
        }
        ResourcePath::parse(target.path()).map_err(ResourceFailure::Http)
    }
}

/// The host of a Host value (`name:port`, `[v6]:port`), as `url` writes it.
fn authority_host(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| &authority[..=h.len()]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::authority_host;

    #[test]
    fn the_host_of_a_host_value_is_found_with_or_without_a_port() {
        assert_eq!(authority_host("static.example.com"), "static.example.com");
        assert_eq!(
            authority_host("static.example.com:8080"),
            "static.example.com"
        );
        assert_eq!(authority_host("[2001:db8::1]:443"), "[2001:db8::1]");
        assert_eq!(authority_host("[2001:db8::1]"), "[2001:db8::1]");
    }
}
