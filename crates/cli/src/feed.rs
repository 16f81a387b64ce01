//! `origin-policy feed`: the policy source for `"delivery": "feed"`. It
//! watches the policy files, and for each change writes the origin clusters
//! (and waits for Envoy to take them), then publishes the domains that changed
//! on the change feed the filter's singleton long-polls (see
//! `origin_policy_engine::feed` for the protocol). A one-domain edit sends
//! Envoy that one domain.

use crate::admin;
use crate::files::{ecds_resource, read_paths, write_atomically, NETWORKS_FILE};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use origin_policy_engine::documents::PolicyDocuments;
use origin_policy_engine::feed::{
    parse_report, EPOCH_HEADER, MORE_HEADER, NODE_HEADER, REJECTED_HEADER, RESET_HEADER,
    SNAPSHOT_REFUSED_HEADER, VERSION_HEADER,
};
use origin_policy_engine::{fingerprint, parse_json, PolicySet, PolicySource};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Domains per feed page: a page is one `set_shared_data` burst on Envoy's
/// main thread, and 10,000 keeps a re-sync's longest request in check.
pub const PAGE_ENTRIES: usize = 10_000;
/// How long a poll with nothing new is held open.
const LONG_POLL: Duration = Duration::from_secs(20);
/// How often the policy files are looked at, at least: a look that takes
/// long (100,000 files) waits ten times as long before the next, so that
/// watching stays under a tenth of a core.
const WATCH_PERIOD: Duration = Duration::from_millis(500);
/// Envoy applies a 100,000-cluster file in about a minute (BENCHMARKS.md).
const CLUSTERS_TAKEN_WITHIN: Duration = Duration::from_secs(180);

/// The change feed: every domain's latest document and the version it got.
#[derive(Debug)]
pub struct FeedLog {
    /// Changes each time the source starts: versions of another epoch mean
    /// nothing here, and a reader that has them gets a snapshot.
    epoch: u64,
    version: u64,
    /// Domain -> (version, document); an empty document is a removal.
    entries: HashMap<String, (u64, Arc<str>)>,
    by_version: BTreeMap<u64, String>,
}

/// One answer to `GET /changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPage {
    pub body: String,
    pub version: u64,
    pub epoch: u64,
    pub more: bool,
    pub reset: bool,
    pub entries: usize,
}

impl FeedLog {
    pub fn new(epoch: u64) -> Self {
        FeedLog {
            epoch,
            version: 0,
            entries: HashMap::new(),
            by_version: BTreeMap::new(),
        }
    }

    /// Records a domain's document (empty: removed); `false` if it is the
    /// one already published.
    pub fn publish(&mut self, domain: &str, document: &str) -> bool {
        let known = self.entries.get(domain);
        match known {
            Some((_, doc)) if doc.as_ref() == document => return false,
            None if document.is_empty() => return false,
            _ => {}
        }
        if let Some(&(old, _)) = known {
            self.by_version.remove(&old);
        }
        self.version += 1;
        self.by_version.insert(self.version, domain.to_owned());
        self.entries
            .insert(domain.to_owned(), (self.version, Arc::from(document)));
        true
    }

    /// A domain's published document, unless it was removed.
    pub fn document(&self, domain: &str) -> Option<&str> {
        self.entries
            .get(domain)
            .map(|(_, d)| d.as_ref())
            .filter(|d| !d.is_empty())
    }

    /// The domains with a document.
    pub fn live(&self) -> impl Iterator<Item = (&String, &str)> {
        self.entries
            .iter()
            .filter(|(_, (_, d))| !d.is_empty())
            .map(|(k, (_, d))| (k, d.as_ref()))
    }

    /// The changes after `since` in `epoch`, at most `max` domains; from
    /// the start, without removals, when `since` is not of this epoch.
    pub fn page(&self, since: u64, epoch: Option<u64>, max: usize) -> FeedPage {
        let reset = epoch != Some(self.epoch) || since > self.version;
        let since = if reset { 0 } else { since };
        let mut page = FeedPage {
            body: String::new(),
            version: self.version,
            epoch: self.epoch,
            more: false,
            reset,
            entries: 0,
        };
        for (&version, domain) in self.by_version.range(since + 1..) {
            if page.entries == max {
                page.more = true;
                break;
            }
            page.version = version;
            let Some((_, document)) = self.entries.get(domain) else {
                continue;
            };
            if reset && document.is_empty() {
                continue;
            }
            page.body.push_str(domain);
            page.body.push('\t');
            page.body.push_str(document);
            page.body.push('\n');
            page.entries += 1;
        }
        if !page.more {
            page.version = self.version;
        }
        page
    }
}

/// What `feed` is asked to do.
pub struct FeedRequest {
    pub paths: Vec<PathBuf>,
    pub out: PathBuf,
    pub wasm: PathBuf,
    pub admin: Option<String>,
    pub listen: String,
}

struct Shared {
    log: Mutex<FeedLog>,
    changed: Notify,
    /// What each Envoy said with its last poll, by node id.
    nodes: Mutex<BTreeMap<String, NodeReport>>,
}

/// An Envoy's acknowledgements: a poll from version V says it applied
/// everything up to V, except the domains it names as refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReport {
    pub version: u64,
    pub epoch: Option<u64>,
    /// Domains it refused, with the version it said so at; a later version of
    /// the domain clears it.
    pub refused: BTreeMap<String, u64>,
    /// `REMOVED/DOMAINS` when it kept every domain rather than apply a
    /// snapshot's removals (`max_snapshot_removal_percent`), until its next
    /// snapshot.
    pub snapshot_refused: Option<String>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, FeedLog> {
        // A panic while holding the lock cannot leave the log half-written:
        // every change to it is a whole `publish`.
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, NodeReport>> {
        self.nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records what a poll says about its Envoy.
    fn heard(
        &self,
        node: &str,
        since: u64,
        epoch: Option<u64>,
        refused: Option<&str>,
        snapshot_refused: Option<&str>,
    ) {
        let mut nodes = self.nodes();
        let report = nodes.entry(node.to_owned()).or_default();
        if report.epoch != epoch {
            report.refused.clear();
            report.snapshot_refused = None;
        }
        if let Some(removals) = snapshot_refused {
            eprintln!("feed: {node} kept every domain rather than remove {removals} of them (max_snapshot_removal_percent)");
            report.snapshot_refused = Some(removals.to_owned());
        }
        let log = self.log();
        // A refusal stands until the domain gets a newer document.
        report
            .refused
            .retain(|domain, at| log.entries.get(domain).is_some_and(|(v, _)| v <= at));
        for domain in refused.into_iter().flat_map(parse_report) {
            if report.refused.insert(domain.clone(), since).is_none() {
                eprintln!("feed: {node} refused the policy of {domain} (its log says why); it keeps its last good one");
            }
        }
        report.version = since;
        report.epoch = epoch;
    }

    fn status(&self) -> Value {
        let (version, epoch) = {
            let log = self.log();
            (log.version, log.epoch)
        };
        let nodes: serde_json::Map<String, Value> = self
            .nodes()
            .iter()
            .map(|(node, r)| {
                let report = json!({"version": r.version, "epoch": r.epoch, "refused": r.refused, "snapshot_refused": r.snapshot_refused});
                (node.clone(), report)
            })
            .collect();
        json!({"version": version, "epoch": epoch, "nodes": nodes})
    }
}

/// What the watcher keeps between two looks at the files.
struct Watcher {
    request: FeedRequest,
    wasm: String,
    /// The policy files as last seen: name, size and modification time.
    seen: Option<Vec<(PathBuf, u64, SystemTime)>>,
    /// The clusters written last, kept one more round for requests that
    /// started on the policies they served.
    clusters: Vec<Value>,
    settings: Option<Value>,
}

fn files_seen(paths: &[PathBuf]) -> Vec<(PathBuf, u64, SystemTime)> {
    let mut out = Vec::new();
    for path in paths {
        let files: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default()
        } else {
            vec![path.clone()]
        };
        for file in files {
            if let Ok(meta) = std::fs::metadata(&file) {
                let modified = meta.modified().unwrap_or(UNIX_EPOCH);
                out.push((file, meta.len(), modified));
            }
        }
    }
    out.sort();
    out
}

impl Watcher {
    fn write(&self, name: &str, text: &str) -> Result<(), String> {
        let path = self.request.out.join(name);
        write_atomically(&path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Looks at the files; on a change, validates them, writes what Envoy
    /// needs and publishes what changed. Errors are reported and the feed
    /// keeps what it published.
    /// Returns how long looking at the files took, and whether what they
    /// hold was published (or had been).
    fn look(&mut self, shared: &Shared) -> (Duration, bool) {
        let started = std::time::Instant::now();
        let seen = files_seen(&self.request.paths);
        let looked = started.elapsed();
        if self.seen.as_ref() == Some(&seen) {
            return (looked, self.settings.is_some());
        }
        self.seen = Some(seen);
        if let Err(why) = self.reload(shared) {
            eprintln!("feed: {why}; the feed keeps what it published");
        }
        (looked, self.settings.is_some())
    }

    fn reload(&mut self, shared: &Shared) -> Result<(), String> {
        let documents: PolicyDocuments = read_paths(&self.request.paths)?;
        let found = documents
            .feed_documents()
            .map_err(|d| format!("{d}\nsettings rejected"))?;
        for d in &found.diagnostics.0 {
            eprintln!("{d}");
        }
        for domain in &found.rejected {
            eprintln!("feed: {domain}: rejected; it keeps its last published policy");
        }
        // What will be live after this round: the accepted documents, and
        // the rejected domains' published ones.
        let mut next: BTreeMap<String, String> = found.accepted.into_iter().collect();
        {
            let log = shared.log();
            for domain in &found.rejected {
                if let Some(document) = log.document(domain) {
                    next.insert(domain.clone(), document.to_owned());
                }
            }
        }
        let (settings_value, settings) = (found.settings_document, found.settings);
        // The clusters of every live policy, and of the previous round's.
        let values: Vec<Value> = next
            .values()
            .map(|doc| parse_json(doc.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("a published document: {e}"))?;
        let sources = PolicySource::numbered(&values);
        let set = PolicySet::compile(settings.clone(), &sources, None).set;
        let clusters = set.derived_clusters().envoy_resources(&settings);
        let mut all = clusters.clone();
        let names = |v: &Value| v["name"].as_str().map(str::to_owned);
        let current: std::collections::HashSet<String> =
            clusters.iter().filter_map(names).collect();
        all.extend(
            self.clusters
                .iter()
                .filter(|c| names(c).is_some_and(|n| !current.contains(&n)))
                .cloned(),
        );
        let cds = json!({
            "version_info": format!("{:016x}", fingerprint(Value::Array(all.clone()).to_string().as_bytes())),
            "resources": all,
        })
        .to_string();
        // The networks first: an origin they newly allow may be in the clusters.
        let networks = format!("{:#}", settings.origin_networks.ecds_resource());
        let networks_path = self.request.out.join(NETWORKS_FILE);
        if std::fs::read(&networks_path).ok().as_deref() != Some(networks.as_bytes()) {
            self.write(NETWORKS_FILE, &networks)?;
        }
        let cds_path = self.request.out.join("origin-policy.cds.json");
        if std::fs::read(&cds_path).ok().as_deref() != Some(cds.as_bytes()) {
            // No Envoy answering yet (the edge starts after its feed): it reads
            // the file when it starts, so there is nothing to wait for.
            let admin = self
                .request
                .admin
                .as_deref()
                .filter(|a| admin::listening(a));
            let before = admin
                .map(|a| admin::cds_progress(a, CLUSTERS_TAKEN_WITHIN))
                .transpose()?;
            self.write("origin-policy.cds.json", &cds)?;
            if let (Some(admin), Some(before)) = (admin, before) {
                admin::wait_for_clusters(admin, before, CLUSTERS_TAKEN_WITHIN)
                    .map_err(|e| format!("{e}: nothing new was published"))?;
            }
        }
        self.clusters = clusters;
        if self.settings.as_ref() != Some(&settings_value) {
            // The filter configuration for feed delivery: the settings only.
            let config = json!({"settings": settings_value, "delivery": "feed"}).to_string();
            let ecds = ecds_resource(&config, &self.wasm);
            self.write("origin-policy.ecds.json", &format!("{ecds:#}"))?;
            self.settings = Some(settings_value);
        }
        let mut log = shared.log();
        let mut changed = 0;
        let gone: Vec<String> = log
            .live()
            .filter(|(d, _)| !next.contains_key(*d))
            .map(|(d, _)| d.clone())
            .collect();
        for domain in gone {
            changed += usize::from(log.publish(&domain, ""));
        }
        for (domain, document) in &next {
            changed += usize::from(log.publish(domain, document));
        }
        if changed > 0 {
            eprintln!(
                "feed: version {}: {changed} domains changed, {} served",
                log.version,
                next.len()
            );
            shared.changed.notify_waiters();
        }
        Ok(())
    }
}

fn query_value(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

async fn answer(shared: Arc<Shared>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &str| {
        let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
        *r.status_mut() = status;
        r
    };
    if request.uri().path() == "/status" {
        let mut r = plain(StatusCode::OK, &shared.status().to_string());
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    if request.uri().path() != "/changes" {
        return plain(
            StatusCode::NOT_FOUND,
            "the feed is at GET /changes?since=VERSION&epoch=EPOCH",
        );
    }
    let query = request.uri().query().unwrap_or_default();
    let since = query_value(query, "since").unwrap_or(0);
    let epoch = query_value(query, "epoch");
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(node) = header(NODE_HEADER) {
        let reports = (header(REJECTED_HEADER), header(SNAPSHOT_REFUSED_HEADER));
        shared.heard(node, since, epoch, reports.0, reports.1);
    }
    let deadline = tokio::time::Instant::now() + LONG_POLL;
    loop {
        // Registered before the look, so a change in between is not missed.
        let changed = shared.changed.notified();
        let page = shared.log().page(since, epoch, PAGE_ENTRIES);
        let status = if page.entries > 0 || page.reset || page.version != since {
            StatusCode::OK
        } else if tokio::time::timeout_at(deadline, changed).await.is_ok() {
            continue;
        } else {
            StatusCode::NO_CONTENT
        };
        let mut builder = Response::builder()
            .status(status)
            .header(VERSION_HEADER, page.version)
            .header(EPOCH_HEADER, page.epoch)
            .header("content-type", "text/plain");
        if page.more {
            builder = builder.header(MORE_HEADER, "1");
        }
        if page.reset {
            builder = builder.header(RESET_HEADER, "1");
        }
        let body = if status == StatusCode::OK {
            page.body
        } else {
            String::new()
        };
        return builder
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot build the page"));
    }
}

async fn serve_feed(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("feed: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Runs the feed until Ctrl-C or SIGTERM.
pub fn feed(request: FeedRequest) -> Result<(), String> {
    let wasm = std::fs::canonicalize(&request.wasm)
        .map_err(|e| {
            format!(
                "{}: {e} (build it with cargo build --release --target wasm32-wasip1)",
                request.wasm.display()
            )
        })?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&request.out).map_err(|e| format!("{}: {e}", request.out.display()))?;
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let shared = Arc::new(Shared {
        log: Mutex::new(FeedLog::new(epoch)),
        changed: Notify::new(),
        nodes: Mutex::new(BTreeMap::new()),
    });
    let listen = request.listen.clone();
    let mut watcher = Watcher {
        request,
        wasm,
        seen: None,
        clusters: Vec::new(),
        settings: None,
    };
    // The feed opens once it has published the files: a snapshot from an
    // empty feed would remove every domain of the Envoys that read it.
    loop {
        let (looked, published) = watcher.look(&shared);
        if published {
            break;
        }
        std::thread::sleep(WATCH_PERIOD.max(looked * 10));
    }
    let runtime = crate::mirror::runtime()?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| format!("--listen {listen}: {e}"))?;
        eprintln!("feed: http://{listen}/changes (epoch {epoch})");
        let watched = shared.clone();
        let watch = tokio::task::spawn_blocking(move || loop {
            let (looked, _) = watcher.look(&watched);
            std::thread::sleep(WATCH_PERIOD.max(looked * 10));
        });
        tokio::select! {
            () = serve_feed(shared, listener) => Ok(()),
            _ = watch => Err("the policy watcher stopped".to_owned()),
            _ = crate::mirror::stop_signal() => Ok(()),
        }
    });
    // The watcher sleeps between looks: not waited for.
    runtime.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(page: &FeedPage) -> Vec<&str> {
        page.body.lines().collect()
    }

    #[test]
    fn a_change_sends_that_domain_only() {
        let mut log = FeedLog::new(7);
        for i in 0..5 {
            log.publish(&format!("d{i}.example"), &format!("{{\"n\":{i}}}"));
        }
        let synced = log.page(0, None, 100);
        assert!(synced.reset && synced.entries == 5 && synced.version == 5);
        assert!(
            !log.publish("d3.example", "{\"n\":3}"),
            "unchanged republished"
        );
        log.publish("d3.example", "{\"n\":33}");
        let page = log.page(synced.version, Some(7), 100);
        assert_eq!(lines(&page), vec!["d3.example\t{\"n\":33}"]);
        assert!(!page.reset && page.version == 6);
        assert_eq!(log.page(6, Some(7), 100).entries, 0);
    }

    #[test]
    fn pages_and_removals() {
        let mut log = FeedLog::new(1);
        for i in 0..5 {
            log.publish(&format!("d{i}.example"), "{}");
        }
        let first = log.page(0, Some(1), 2);
        assert!(first.more && first.entries == 2 && first.version == 2);
        let second = log.page(first.version, Some(1), 2);
        assert_eq!(lines(&second), vec!["d2.example\t{}", "d3.example\t{}"]);
        log.publish("d0.example", "");
        let removal = log.page(5, Some(1), 10);
        assert_eq!(lines(&removal), vec!["d0.example\t"]);
        // Another epoch (the source restarted): a snapshot without removals.
        let snapshot = log.page(5, Some(99), 10);
        assert!(snapshot.reset && snapshot.entries == 4);
        assert!(!snapshot.body.contains("d0.example"));
    }
}
