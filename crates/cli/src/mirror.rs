//! `origin-policy mirror` and `mirror-serve`: the command-line side of the
//! secondary-origin mirror (arguments, progress, repetition, metrics file).

use crate::files::write_atomically;
use origin_policy_engine::{scheme_from_text, PolicySet, Scheme};
use origin_policy_mirror::{
    parse_bytes, parse_duration, serve_stores, unix_now, CancellationToken, Limits, MirrorError,
    MirrorJob, MirrorStore, Progress, ResourcePath, RunSummary, Sources, StopReason,
};
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What `mirror` was asked to do.
pub struct MirrorRequest {
    pub domain: String,
    pub set: PolicySet,
    pub store: String,
    /// Where the run's bookkeeping goes (default: beside a directory store).
    pub state: Option<String>,
    pub viewer_scheme: String,
    pub path_files: Vec<PathBuf>,
    pub sitemaps: Vec<String>,
    pub limits: Limits,
    pub every: Option<Duration>,
    pub metrics: Option<PathBuf>,
    pub json: bool,
}

/// Limits as given on the command line over the defaults.
pub fn limits(value: impl Fn(&str) -> Option<String>) -> Result<Limits, String> {
    let mut l = Limits::default();
    let named = |name: &str, why: String| format!("--{name}: {why}");
    if let Some(v) = value("concurrency") {
        l.concurrency = v
            .parse()
            .ok()
            .filter(|n| (1..=256).contains(n))
            .ok_or_else(|| named("concurrency", format!("`{v}`: a number from 1 to 256")))?;
    }
    for (name, slot) in [
        ("max-object-bytes", &mut l.max_object_bytes),
        ("max-store-bytes", &mut l.max_store_bytes),
        ("rate", &mut l.rate_bytes_per_s),
    ] {
        if let Some(v) = value(name) {
            *slot = parse_bytes(&v).map_err(|why| named(name, why))?;
        }
    }
    for (name, slot) in [
        ("object-timeout", &mut l.object_timeout),
        ("grace", &mut l.grace),
    ] {
        if let Some(v) = value(name) {
            *slot = parse_duration(&v).map_err(|why| named(name, why))?;
        }
    }
    if let Some(v) = value("max-redirects") {
        l.max_redirects = v
            .parse()
            .ok()
            .filter(|n| *n <= 20)
            .ok_or_else(|| named("max-redirects", format!("`{v}`: a number from 0 to 20")))?;
    }
    Ok(l)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Runs the mirror once or every `every`; `Ok(false)` when a run had errors.
pub fn mirror(request: MirrorRequest) -> Result<bool, String> {
    runtime()?.block_on(mirror_async(request))
}

async fn mirror_async(r: MirrorRequest) -> Result<bool, String> {
    let viewer = scheme_from_text(&r.viewer_scheme)
        .ok_or_else(|| format!("--viewer-scheme `{}`: http or https", r.viewer_scheme))?;
    let sitemaps = r
        .sitemaps
        .iter()
        .map(|s| ResourcePath::parse(s).map_err(|why| format!("--sitemap: {why}")))
        .collect::<Result<Vec<_>, _>>()?;
    if r.path_files.is_empty() && sitemaps.is_empty() {
        return Err("nothing to mirror: give --paths FILE and/or --sitemap PATH".to_owned());
    }
    let job = prepare(&r, viewer, &sitemaps)
        .await
        .map_err(|e| e.to_string())?;
    for origin in job.origins() {
        eprintln!(
            "mirror {}: from {} into {}",
            r.domain,
            origin.describe(),
            r.store
        );
    }
    // A signal during a run stops it cleanly (what is done is recorded);
    // between runs, it ends the loop.
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            let why = stop_signal().await;
            eprintln!("\nmirror: {why}");
            stop.cancel();
        }
    });
    let mut next = Ok(job);
    loop {
        let ok = match next {
            Ok(job) => run_once(&job, &r, &stop).await,
            Err(e) => report(&r, Err(e)),
        };
        let Some(every) = r.every.filter(|_| !stop.is_cancelled()) else {
            return Ok(ok);
        };
        eprintln!("next run in {} s (Ctrl-C stops)", every.as_secs());
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return Ok(ok),
        }
        // Every run resolves the origin again: its addresses may have moved.
        next = prepare(&r, viewer, &sitemaps).await;
    }
}

/// The store opened and the primary origins resolved, for one run.
async fn prepare(
    r: &MirrorRequest,
    viewer: Scheme,
    sitemaps: &[ResourcePath],
) -> Result<MirrorJob, MirrorError> {
    let store = MirrorStore::open(&r.store, r.state.as_deref())?;
    let sources = Sources {
        path_files: r.path_files.clone(),
        sitemaps: sitemaps.to_vec(),
    };
    MirrorJob::new(&r.set, &r.domain, viewer, store, sources, r.limits.clone()).await
}

/// Resolves on Ctrl-C or SIGTERM (what systemd and `kill` send), naming it.
pub(crate) async fn stop_signal() -> &'static str {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // Without a SIGTERM handler the default (exit) stays: wait for Ctrl-C.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        () = terminate => "terminated",
    }
}

async fn run_once(job: &MirrorJob, r: &MirrorRequest, stop: &CancellationToken) -> bool {
    let progress = Arc::new(Progress::default());
    let reporter = tokio::spawn(report_progress(r.domain.clone(), progress.clone()));
    let summary = job.run(&progress, stop).await;
    reporter.abort();
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
    }
    report(r, Ok(summary))
}

/// Prints a run's outcome and writes its metrics; whether it went well.
fn report(r: &MirrorRequest, result: Result<RunSummary, MirrorError>) -> bool {
    let finished = unix_now();
    let summary = match result {
        Ok(summary) => summary,
        // The run could not start (the store or the origin): it did nothing.
        Err(e) => RunSummary {
            domain: r.domain.clone(),
            stop: Some(match e {
                MirrorError::Store { .. } => StopReason::Store,
                _ => StopReason::Origin,
            }),
            errors: vec![e],
            ..RunSummary::default()
        },
    };
    for e in &summary.errors {
        eprintln!("error: {e}");
    }
    if matches!(
        summary.stop,
        Some(StopReason::List | StopReason::Store | StopReason::Origin)
    ) {
        eprintln!("the run stopped early: nothing was marked gone");
    }
    for skipped in &summary.skipped {
        eprintln!("skipped: {skipped}");
    }
    if r.json {
        println!("{}", summary.to_json());
    } else {
        println!("{}", summary.text());
    }
    let ok = summary.ok();
    if let Some(file) = &r.metrics {
        let last_success = if ok {
            Some(finished)
        } else {
            previous_success(file)
        };
        let text = summary.metrics_text(finished, last_success);
        if let Err(e) = write_atomically(file, text.as_bytes()) {
            eprintln!("error: metrics file {}: {e}", file.display());
        }
    }
    ok
}

/// The last success a previous metrics file recorded.
fn previous_success(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find(|l| l.starts_with("origin_policy_mirror_last_success_timestamp_seconds{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}

/// A progress line on stderr: redrawn every second on a terminal, one line
/// every 10 s in a log.
async fn report_progress(domain: String, progress: Arc<Progress>) {
    let terminal = std::io::stderr().is_terminal();
    let period = Duration::from_secs(if terminal { 1 } else { 10 });
    loop {
        tokio::time::sleep(period).await;
        if terminal {
            eprint!("\r\x1b[Kmirror {domain}: {}", progress.line());
        } else {
            eprintln!("mirror {domain}: {}", progress.line());
        }
    }
}

/// Serves every domain directory under `root` until interrupted.
pub fn serve(root: PathBuf, listen: &str) -> Result<(), String> {
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("--listen {listen}: {e}"))?;
        eprintln!(
            "mirror-serve: {} on http://{listen} (the Host picks the domain)",
            root.display()
        );
        tokio::select! {
            () = serve_stores(root, listener) => Ok(()),
            _ = stop_signal() => Ok(()),
        }
    })
}
