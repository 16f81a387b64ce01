//! `serve --watch DIR`: a policy directory as a source. The kernel says which
//! files changed (inotify, through `notify`), and only those are looked at;
//! a full look lists every file with its size and modification time, at
//! start and every [`FULL_LOOK`] in case an event was lost. Only the files
//! that changed are read and checked, each on its own, and written like an
//! API write (source `watch:FILE`). A file that is refused keeps its
//! domain's last good policy; a file that goes away removes its domain.

use crate::api::Api;
use crate::validate::{EdgeSettings, ValidPolicy};
use crate::writer::{Precondition, WriteOutcome, WriteRequest};
use origin_policy_engine::documents::{DocumentKind, SETTINGS_FILE};
use origin_policy_engine::parse_json;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often every file is listed, besides the events.
pub const FULL_LOOK: Duration = Duration::from_secs(30);
/// Events this close together are taken in one look (an editor's save is
/// several).
const SETTLE: Duration = Duration::from_millis(20);

/// The source of a write from a watched file.
pub const SOURCE_PREFIX: &str = "watch:";

type Seen = (u64, SystemTime);

pub struct DirectoryWatch {
    dirs: Vec<PathBuf>,
    seen: BTreeMap<PathBuf, Seen>,
    /// Which domain each file holds, and the other way round.
    owner: HashMap<PathBuf, String>,
    file_of: HashMap<String, PathBuf>,
    /// Domains a watched file wrote in an earlier run: removed if no file
    /// names them any more.
    earlier: Vec<String>,
}

fn listing(dirs: &[PathBuf]) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            if let Ok(meta) = entry.metadata() {
                if meta.is_file() {
                    let modified = meta.modified().unwrap_or(UNIX_EPOCH);
                    out.insert(path, (meta.len(), modified));
                }
            }
        }
    }
    out
}

/// The settings document of the watched directories, if one has it.
pub fn settings_file(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .map(|d| d.join(SETTINGS_FILE))
        .find(|p| p.is_file())
}

/// Per-domain log lines are printed for this many writes of a look at most;
/// a larger look (the first, of a large directory) gets a summary.
const LOGGED_WRITES: usize = 50;

impl DirectoryWatch {
    /// `taken`: the files an earlier run took, as the store recorded them
    /// (path, size, modified ns, domain); `earlier`: the domains watched
    /// files wrote.
    pub fn new(
        dirs: Vec<PathBuf>,
        taken: Vec<(String, u64, u64, String)>,
        earlier: Vec<String>,
    ) -> Self {
        let mut watch = DirectoryWatch {
            dirs,
            seen: BTreeMap::new(),
            owner: HashMap::new(),
            file_of: HashMap::new(),
            earlier,
        };
        for (path, size, modified, domain) in taken {
            let path = PathBuf::from(path);
            let modified = UNIX_EPOCH + Duration::from_nanos(modified);
            watch.seen.insert(path.clone(), (size, modified));
            watch.file_of.insert(domain.clone(), path.clone());
            watch.owner.insert(path, domain);
        }
        watch
    }

    /// Lists every file and takes what changed since the last look;
    /// returns how long listing took.
    pub fn look(&mut self, api: &Api, runtime: &tokio::runtime::Handle) -> Duration {
        let started = std::time::Instant::now();
        let now = listing(&self.dirs);
        let listed = started.elapsed();
        let changed: Vec<PathBuf> = now
            .iter()
            .filter(|(p, s)| self.seen.get(*p) != Some(s))
            .map(|(p, _)| p.clone())
            .collect();
        let gone: Vec<PathBuf> = self
            .seen
            .keys()
            .filter(|p| !now.contains_key(*p))
            .cloned()
            .collect();
        self.seen = now;
        self.take(api, runtime, &changed, &gone);
        listed
    }

    /// Looks at the files an event named only: what a one-file edit costs,
    /// whatever the number of files.
    pub fn look_at(&mut self, api: &Api, runtime: &tokio::runtime::Handle, paths: &[PathBuf]) {
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        for path in paths {
            let watched = path.extension().is_some_and(|x| x == "json")
                && path
                    .parent()
                    .is_some_and(|d| self.dirs.iter().any(|w| w == d));
            if !watched {
                continue;
            }
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {
                    let seen = (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));
                    if self.seen.insert(path.clone(), seen) != Some(seen) {
                        changed.push(path.clone());
                    }
                }
                _ => {
                    if self.seen.remove(path).is_some() {
                        gone.push(path.clone());
                    }
                }
            }
        }
        if !changed.is_empty() || !gone.is_empty() {
            self.take(api, runtime, &changed, &gone);
        }
    }

    /// Checks the changed files and writes what passed; removes the domains
    /// of files gone.
    fn take(
        &mut self,
        api: &Api,
        runtime: &tokio::runtime::Handle,
        changed: &[PathBuf],
        gone: &[PathBuf],
    ) {
        // The settings first: the policies are checked under them.
        for path in changed {
            if DocumentKind::of(&path.to_string_lossy()) == DocumentKind::Settings {
                crate::serve::reload_settings(api, path);
            }
        }
        let settings = api.current_settings();
        let policies: Vec<&PathBuf> = changed
            .iter()
            .filter(|p| DocumentKind::of(&p.to_string_lossy()) == DocumentKind::Policy)
            .collect();
        let mut writes = Vec::new();
        let mut orphans = Vec::new();
        for (path, checked) in check_files(&settings, &policies) {
            if let Some(request) = self.taken(path, checked, &mut orphans) {
                writes.push(request);
            }
        }
        for path in gone {
            if let Some(domain) = self.owner.remove(path) {
                self.file_of.remove(&domain);
                orphans.push(domain);
            }
        }
        orphans.append(&mut self.earlier);
        orphans.sort();
        orphans.dedup();
        for domain in orphans {
            if !self.file_of.contains_key(&domain) {
                writes.push(WriteRequest {
                    domain,
                    policy: None,
                    source: format!("{SOURCE_PREFIX}removed"),
                    precondition: Precondition::None,
                });
            }
        }
        if !writes.is_empty() {
            self.write(api, runtime, writes);
        }
        self.remember(api, changed, gone);
    }

    /// Records the files taken, so that a restart checks only what changed.
    fn remember(&self, api: &Api, changed: &[PathBuf], gone: &[PathBuf]) {
        let taken: Vec<(String, u64, u64, String)> = changed
            .iter()
            .filter_map(|p| {
                let (size, modified) = self.seen.get(p)?;
                let domain = self.owner.get(p)?;
                let ns = modified.duration_since(UNIX_EPOCH).ok()?.as_nanos() as u64;
                Some((p.to_string_lossy().into_owned(), *size, ns, domain.clone()))
            })
            .collect();
        let gone: Vec<String> = gone
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if taken.is_empty() && gone.is_empty() {
            return;
        }
        if let Err(e) = api.shared.store.save_watched(&taken, &gone) {
            eprintln!("serve: {e}: the next start checks every watched file again");
        }
    }

    /// Writes; a file whose write failed is forgotten as seen, so that the
    /// next full look tries it again.
    fn write(&mut self, api: &Api, runtime: &tokio::runtime::Handle, writes: Vec<WriteRequest>) {
        let count = writes.len();
        let named: Vec<(String, bool)> = writes
            .iter()
            .map(|w| (w.domain.clone(), w.policy.is_none()))
            .collect();
        let outcomes = runtime.block_on(api.shared.write_all(writes));
        let (mut written, mut failed, mut version) = (0, 0, 0);
        for ((domain, removal), outcome) in named.iter().zip(outcomes) {
            match outcome {
                Ok(WriteOutcome::Written { revision, seq }) => {
                    written += 1;
                    version = seq;
                    if count <= LOGGED_WRITES {
                        let what = if *removal {
                            "removed (no watched file names it)".to_owned()
                        } else {
                            format!("revision {revision}")
                        };
                        eprintln!("serve: {domain}: {what} (version {seq})");
                    }
                }
                Ok(WriteOutcome::Unchanged { .. }) => {}
                Err(e) => {
                    failed += 1;
                    eprintln!(
                        "serve: {domain}: not written: {e}; tried again at the next full look"
                    );
                    if let Some(path) = self.file_of.get(domain) {
                        self.seen.remove(path);
                    }
                }
            }
        }
        if count > LOGGED_WRITES {
            eprintln!("serve: {written} domains written from the watched files (version {version}), {failed} not written");
        }
    }

    /// A changed file checked: the write it makes, if it passed.
    fn taken(
        &mut self,
        path: &PathBuf,
        checked: Result<ValidPolicy, String>,
        orphans: &mut Vec<String>,
    ) -> Option<WriteRequest> {
        let shown = path.display().to_string();
        let policy = match checked {
            Ok(p) => p,
            Err(why) => {
                eprintln!("serve: {why}");
                return None;
            }
        };
        let domain = policy.domain.clone();
        if let Some(other) = self.file_of.get(&domain).filter(|p| *p != path) {
            eprintln!(
                "serve: {shown}: {domain} is already {}'s; one file per domain",
                other.display()
            );
            return None;
        }
        if let Some(old) = self.owner.insert(path.clone(), domain.clone()) {
            if old != domain {
                self.file_of.remove(&old);
                orphans.push(old);
            }
        }
        self.file_of.insert(domain.clone(), path.clone());
        Some(WriteRequest {
            domain,
            policy: Some(policy),
            source: format!("{SOURCE_PREFIX}{shown}"),
            precondition: Precondition::None,
        })
    }
}

/// Reads and checks files, on every core when there are many (the first
/// look at a large directory).
fn check_files<'p>(
    settings: &EdgeSettings,
    paths: &[&'p PathBuf],
) -> Vec<(&'p PathBuf, Result<ValidPolicy, String>)> {
    let check = |path: &'p PathBuf| {
        let shown = path.display().to_string();
        let checked = match std::fs::read(path) {
            Ok(bytes) => settings.validate(&shown, None, &bytes).map_err(|refusal| {
                let domain = refusal.domain.as_deref().unwrap_or("(no domain)");
                format!(
                    "{domain}: rejected ({shown}); it keeps its last published policy\n{}",
                    refusal.text()
                )
            }),
            Err(e) => Err(format!("{shown}: cannot read: {e}")),
        };
        (path, checked)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if paths.len() < 256 || threads < 2 {
        return paths.iter().map(|p| check(p)).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = paths
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|p| check(p)).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join().unwrap_or_else(|_| {
                    eprintln!(
                        "serve: a file check stopped; those files are checked at the next change"
                    );
                    Vec::new()
                })
            })
            .collect()
    })
}

/// The settings document at `path`, parsed.
pub fn read_settings(path: &PathBuf) -> Result<serde_json::Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_json(&bytes).map_err(|e| format!("{}: not valid JSON: {e}", path.display()))
}

/// Watches until the process ends: events as they come, a full look every
/// [`FULL_LOOK`] (ten times the time a listing takes, when that is longer).
pub fn follow(mut watch: DirectoryWatch, api: Arc<Api>, runtime: tokio::runtime::Handle) {
    let (events, received) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
    let watcher = notify::recommended_watcher(events).and_then(|mut w| {
        use notify::Watcher as _;
        for dir in &watch.dirs {
            w.watch(dir, notify::RecursiveMode::NonRecursive)?;
        }
        Ok(w)
    });
    let mut full_look = FULL_LOOK;
    if let Err(e) = &watcher {
        full_look = Duration::from_secs(1);
        eprintln!("serve: no file events ({e}); the watched files are listed every second");
    }
    let mut next_full = std::time::Instant::now() + full_look;
    loop {
        let wait = next_full.saturating_duration_since(std::time::Instant::now());
        match received.recv_timeout(wait) {
            Ok(first) => {
                let mut paths = Vec::new();
                let mut lost = false;
                let mut take = |event: notify::Result<notify::Event>| match event {
                    Ok(event) => paths.extend(event.paths),
                    Err(_) => lost = true,
                };
                take(first);
                std::thread::sleep(SETTLE);
                while let Ok(more) = received.try_recv() {
                    take(more);
                }
                if lost {
                    next_full = std::time::Instant::now();
                }
                paths.sort();
                paths.dedup();
                watch.look_at(&api, &runtime, &paths);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let listed = watch.look(&api, &runtime);
                next_full = std::time::Instant::now() + full_look.max(listed * 10);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(full_look);
                watch.look(&api, &runtime);
            }
        }
    }
}
