//! `origin-policy serve`: opens the store, checks the settings, gives Envoy
//! the clusters and the filter configuration, syncs a watched directory, then
//! serves the API and the feed until Ctrl-C or SIGTERM. With `--tls-*` both
//! listeners are TLS with client certificates ([`crate::tls`]); without, they
//! may only be on a loopback address.

use crate::ads::EnvoyAds;
use crate::api::Api;
use crate::envoy::EnvoyConfig;
use crate::error::ControlError;
use crate::events::EventKind;
use crate::feed::Nodes;
use crate::replica::{Replica, ReplicaConfig};
use crate::rollout::Fleet;
use crate::store::Store;
use crate::table::DomainTable;
use crate::tls::{Admission, Caller, Identity, TlsFiles};
use crate::validate::EdgeSettings;
use crate::watch::{read_settings, settings_file, DirectoryWatch, SOURCE_PREFIX};
use crate::writer::Shared;
use hyper_util::rt::TokioIo;
use origin_policy_xds::Closing;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub struct ServeConfig {
    /// The store's directory.
    pub store: PathBuf,
    pub listen: String,
    /// Policy directories kept in sync with the store.
    pub watch: Vec<PathBuf>,
    /// The settings document, unless a watched directory has one.
    pub settings: Option<PathBuf>,
    pub envoy: Box<dyn EnvoyConfig>,
    /// A fleet over ADS (`--ads`), its `envoy` being `fleet.envoy`.
    pub fleet: Option<FleetServe>,
    /// One of several replicas over etcd (`--etcd`); `store` is then its
    /// cache and history.
    pub replica: Option<ReplicaConfig>,
    /// mTLS on both listeners (`--tls-*`).
    pub tls: Option<TlsFiles>,
}

/// How long `serve --etcd` (without `--watch`) waits for etcd before it
/// listens anyway, not serving.
pub const LISTEN_WITHOUT_STORE_AFTER: Duration = Duration::from_secs(5);

/// This machine's name: a replica's name unless `--replica` says otherwise.
pub fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| {
            let name = std::fs::read_to_string(path).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or_else(|| "origin-policy".to_owned())
}

/// What `serve --ads` adds: the ADS server, the rollout, and the module
/// source, watched for new builds.
pub struct FleetServe {
    pub ads_listen: String,
    pub envoy: Arc<EnvoyAds>,
    pub fleet: Arc<Fleet>,
    pub wasm: PathBuf,
}

impl Api {
    pub fn current_settings(&self) -> Arc<EdgeSettings> {
        self.settings
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

fn settings_error(d: impl std::fmt::Display) -> ControlError {
    ControlError::Settings(d.to_string())
}

/// New settings, taken only if every domain's policy passes under them:
/// then the clusters as they derive, the filter configuration, the store.
pub fn apply_settings(api: &Api, document: Option<&Value>) -> Result<(), ControlError> {
    take_settings(api, document)?;
    api.shared.envoy.filter(&api.current_settings())
}

/// [`apply_settings`] without the filter configuration, which the caller
/// gives Envoy.
fn take_settings(api: &Api, document: Option<&Value>) -> Result<(), ControlError> {
    let settings = EdgeSettings::parse(document).map_err(settings_error)?;
    if settings.document == api.current_settings().document {
        return Ok(());
    }
    let shared = &api.shared;
    let live = shared.table().live_domains();
    let mut clusters: HashMap<String, Arc<str>> = HashMap::new();
    let mut refused = Vec::new();
    for chunk in live.chunks(10_000) {
        let wanted: Vec<(&str, u64)> = chunk.iter().map(|(d, r)| (d.as_str(), *r)).collect();
        for ((domain, _), document) in chunk.iter().zip(shared.store.documents(&wanted)?) {
            match settings.validate(domain, Some(domain), document.as_bytes()) {
                Ok(policy) => clusters.extend(policy.clusters),
                Err(refusal) => refused.push(refusal.text()),
            }
        }
    }
    if !refused.is_empty() {
        return Err(ControlError::Settings(format!(
            "{} domains would be refused under them:\n{}",
            refused.len(),
            refused.join("\n")
        )));
    }
    let set: Vec<(String, String)> = clusters
        .into_iter()
        .map(|(n, j)| (n, j.to_string()))
        .collect();
    shared.envoy.clusters(
        &set.iter()
            .map(|(_, j)| Arc::from(j.as_str()))
            .collect::<Vec<_>>(),
    )?;
    shared.store.replace_clusters(&set)?;
    shared.table().replace_clusters(set);
    shared
        .store
        .save_meta("settings", &settings.document.to_string())?;
    if let Ok(mut current) = api.settings.write() {
        *current = Arc::new(settings);
    }
    Ok(())
}

/// A watched settings file changed.
pub fn reload_settings(api: &Api, path: &PathBuf) {
    let outcome = read_settings(path)
        .map_err(ControlError::Settings)
        .and_then(|doc| apply_settings(api, Some(&doc)));
    match outcome {
        Ok(()) => eprintln!("serve: {}: settings applied", path.display()),
        Err(e) => eprintln!(
            "serve: {}: {e}; the edge keeps its settings",
            path.display()
        ),
    }
}

pub(crate) fn new_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        & ((1 << 53) - 1)
}

/// A server opened: the store read, the settings checked, Envoy given the
/// clusters and the filter configuration, a watched directory synced.
pub struct Server {
    pub api: Arc<Api>,
    watch: Option<DirectoryWatch>,
    started: std::time::Instant,
    fleet: Option<FleetServe>,
    admission: Option<Arc<Admission>>,
}

impl Server {
    pub fn open(
        config: ServeConfig,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Server, ControlError> {
        let started = std::time::Instant::now();
        if config.replica.is_some()
            && config
                .fleet
                .as_ref()
                .is_some_and(|f| f.fleet.rollout.is_some())
        {
            return Err(ControlError::Usage(
                "--canary cannot be used with --etcd: the canary rollout's stable version is one server's; with replicas every write goes to every node".to_owned(),
            ));
        }
        // The TLS files first: a server that cannot take them does not start.
        let admission = config
            .tls
            .clone()
            .map(|files| Admission::load(files).map(Arc::new))
            .transpose()?;
        let store = Store::open(&config.store)?;
        let loaded = store.load()?;
        // The epoch stays with the store: a restarted server continues every
        // Envoy's feed where it was.
        let epoch = match loaded.epoch {
            Some(epoch) => epoch,
            None => {
                let epoch = new_epoch();
                store.save_meta("epoch", &epoch.to_string())?;
                epoch
            }
        };
        let settings_path = settings_file(&config.watch).or(config.settings.clone());
        let stored: Option<Value> = loaded
            .settings
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok());
        let earlier: Vec<String> = loaded
            .domains
            .iter()
            .filter(|d| !d.removed && d.source.starts_with(SOURCE_PREFIX))
            .map(|d| d.domain.clone())
            .collect();
        let taken = if config.watch.is_empty() {
            Vec::new()
        } else {
            store.watched()?
        };
        let table = DomainTable::from_store(epoch, loaded.seq, loaded.domains, loaded.clusters);
        let domains = table.live();
        let settings = EdgeSettings::parse(stored.as_ref()).map_err(settings_error)?;
        config.envoy.clusters(&table.clusters())?;
        let shared = Shared::start(store, table, config.envoy);
        let fleet = config
            .fleet
            .as_ref()
            .map_or_else(|| Arc::new(Fleet::new(None)), |f| f.fleet.clone());
        let kept_stable = loaded.stable;
        let api = Arc::new(Api {
            shared,
            settings: RwLock::new(Arc::new(settings)),
            nodes: Nodes::default(),
            fleet,
            name: config
                .replica
                .as_ref()
                .map_or_else(host_name, |r| r.name.clone()),
            started_ms: crate::events::now_ms(),
        });
        if let Some(path) = &settings_path {
            let document = read_settings(path).map_err(ControlError::Settings)?;
            take_settings(&api, Some(&document))?;
        }
        eprintln!(
            "serve: {domains} domains from the store (epoch {epoch}) in {} ms",
            started.elapsed().as_millis()
        );
        if let Some(replication) = config.replica.clone() {
            let ads = config.fleet.as_ref().map(|f| f.envoy.ads.clone());
            let replica = Replica::start(&api, replication, ads, runtime)?;
            // A watched directory is synced through etcd: it waits for it.
            // Without one, a replica that cannot reach etcd (down, or
            // refusing its certificate) listens after a while, answering
            // 503 and saying why in /healthz and /status.
            let at_most = config
                .watch
                .is_empty()
                .then_some(LISTEN_WITHOUT_STORE_AFTER);
            if runtime.block_on(replica.wait_serving(at_most)) {
                eprintln!(
                    "serve: {} domains from etcd, at revision {} ({} ms)",
                    api.shared.table().live(),
                    replica.applied(),
                    started.elapsed().as_millis()
                );
            } else {
                eprintln!(
                    "serve: not serving yet ({}); listening meanwhile: /healthz, the feed and writes answer 503 until this replica has reached etcd and caught up",
                    replica.not_serving().unwrap_or_default()
                );
            }
        }
        let epoch = api.shared.table().epoch;
        // The feed opens once a watched directory is in the store: a snapshot
        // from a half-synced store would remove domains from the Envoys.
        let watch = (!config.watch.is_empty()).then(|| {
            let mut watch = DirectoryWatch::new(config.watch.clone(), taken, earlier);
            watch.look(&api, runtime);
            eprintln!(
                "serve: {} domains after syncing the watched files ({} ms)",
                api.shared.table().live(),
                started.elapsed().as_millis()
            );
            watch
        });
        // Without a stable version kept, what the store has once synced is
        // stable: a first start rolls nothing out.
        let stable = match kept_stable {
            Some(stable) => stable,
            None => api.shared.table().seq,
        };
        api.fleet.start(epoch, stable);
        if api.fleet.rollout.is_some() {
            api.shared
                .stable
                .store(stable, std::sync::atomic::Ordering::Relaxed);
            api.shared.store.save_meta("stable", &stable.to_string())?;
        }
        // The filter last: an Envoy that starts now has every policy's
        // clusters, and its first poll gets every policy.
        api.shared.envoy.filter(&api.current_settings())?;
        Ok(Server {
            api,
            watch,
            started,
            fleet: config.fleet,
            admission,
        })
    }

    /// Serves on `listener` until `stop` completes.
    pub async fn run(
        mut self,
        listener: tokio::net::TcpListener,
        stop: impl std::future::Future<Output = ()>,
    ) {
        if let Some(watch) = self.watch.take() {
            let watched = self.api.clone();
            let handle = tokio::runtime::Handle::current();
            std::thread::spawn(move || crate::watch::follow(watch, watched, handle));
        }
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        if let Some(admission) = &self.admission {
            let ads = self.fleet.as_ref().map(|f| f.envoy.ads.clone());
            if let Some(ads) = &ads {
                ads.set_admission(ads_admission(admission.clone(), self.api.clone()));
            }
            admission.clone().follow(move || {
                if let Some(ads) = &ads {
                    ads.check_admission();
                }
            });
        }
        if let Some(fleet) = self.fleet.take() {
            match tokio::net::TcpListener::bind(&fleet.ads_listen).await {
                Ok(ads_listener) => {
                    let ads = fleet.envoy.ads.clone();
                    let mut stopped = stopped.clone();
                    let admission = self.admission.clone();
                    let api = self.api.clone();
                    tokio::spawn(async move {
                        let stop = async move {
                            let _ = stopped.wait_for(|s| *s).await;
                        };
                        let served = match admission {
                            Some(admission) => {
                                let incoming = tls_incoming(ads_listener, admission, api);
                                ads.serve_incoming(incoming, stop).await
                            }
                            None => ads.serve(ads_listener, stop).await,
                        };
                        if let Err(e) = served {
                            eprintln!("serve: {e}");
                        }
                    });
                    eprintln!("serve: ADS on {}", fleet.ads_listen);
                }
                Err(e) => eprintln!("serve: --ads {}: {e}; no ADS", fleet.ads_listen),
            }
            let rollout = self.api.clone();
            std::thread::spawn(move || crate::rollout::drive(rollout));
            std::thread::spawn(move || follow_module(&fleet.envoy, &fleet.wasm));
        }
        eprintln!("serve: ready in {} ms", self.started.elapsed().as_millis());
        let replica = self.api.shared.replica.get().cloned();
        tokio::select! {
            () = accept(self.api, listener, self.admission) => {}
            () = stop => {}
        }
        stopping.send_replace(true);
        if let Some(replica) = replica {
            replica.leave().await;
        }
    }
}

/// `origin-policy serve`: until Ctrl-C or SIGTERM.
pub fn serve(config: ServeConfig) -> Result<(), ControlError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ControlError::Io(format!("cannot start the runtime: {e}")))?;
    let listen = config.listen.clone();
    if config.tls.is_none() {
        only_loopback("--listen", &listen)?;
        if let Some(fleet) = &config.fleet {
            only_loopback("--ads", &fleet.ads_listen)?;
        }
    }
    let server = Server::open(config, runtime.handle())?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| ControlError::Io(format!("--listen {listen}: {e}")))?;
        eprintln!("serve: http://{listen}/v1/domains, the feed at /changes");
        server.run(listener, stop_signal()).await;
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Without TLS a listener must not be reachable from another machine.
fn only_loopback(flag: &str, address: &str) -> Result<(), ControlError> {
    if crate::tls::is_loopback(address) {
        return Ok(());
    }
    Err(ControlError::Tls(format!(
        "{flag} {address} is not a loopback address: serving on it needs --tls-ca, --tls-cert and --tls-key (client certificates; docs/api.md)"
    )))
}

async fn accept(
    api: Arc<Api>,
    listener: tokio::net::TcpListener,
    admission: Option<Arc<Admission>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let Some(admission) = admission.clone() else {
            tokio::spawn(serve_http(api, stream, |_| Ok(Caller::Local)));
            continue;
        };
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(
                crate::tls::HANDSHAKE_TIMEOUT,
                admission.acceptor().accept(stream),
            );
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    if let Some(why) = Admission::handshake_refusal(peer, &e) {
                        api.shared.events.record(EventKind::FeedRefused, why);
                    }
                    return;
                }
                Err(_) => return,
            };
            let certs = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
            // A certificate revoked, or a node removed, since the handshake
            // closes the connection, a long poll in flight included; and
            // every request is admitted again.
            let refused = admission.clone().refused(certs.clone());
            let events = api.clone();
            let served = serve_http(api, stream, move |api: &Api| {
                admission
                    .admit(certs.as_deref())
                    .map(Caller::Certified)
                    .map_err(|why| Box::new(api.forbidden(&peer.ip().to_string(), why)))
            });
            tokio::select! {
                () = served => {}
                why = refused => events.shared.events.record(
                    EventKind::FeedRefused,
                    format!("{}: connection closed: {why}", peer.ip()),
                ),
            }
        });
    }
}

/// HTTP/1.1 on one connection; `caller` says who sends each request, or
/// answers it (a refusal).
async fn serve_http<S, F>(api: Arc<Api>, stream: S, caller: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(&Api) -> Result<Caller, Box<crate::api::Answer>> + Send + Sync + 'static,
{
    let caller = Arc::new(caller);
    let service = hyper::service::service_fn(move |request| {
        let api = api.clone();
        let caller = caller.clone();
        async move {
            let answer = match caller(&api) {
                Ok(caller) => api.answer(request, caller).await,
                Err(refused) => *refused,
            };
            Ok::<_, std::convert::Infallible>(answer)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The ADS listener's connections, each through the TLS handshake; a
/// refused one is an event.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    admission: Arc<Admission>,
    api: Arc<Api>,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<Closing<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>, std::io::Error>,
> {
    let (accepted, incoming) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("serve: ADS accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if accepted.is_closed() {
                return;
            }
            let _ = stream.set_nodelay(true);
            let admission = admission.clone();
            let accepted = accepted.clone();
            let api = api.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(
                    crate::tls::HANDSHAKE_TIMEOUT,
                    admission.acceptor().accept(stream),
                );
                match handshake.await {
                    Ok(Ok(stream)) => {
                        // Closed once its certificate is no longer admitted:
                        // the streams on it end, and Envoy connects again.
                        let certs = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                        let refused = admission.refused(certs);
                        let close = async move {
                            let why = refused.await;
                            api.shared.events.record(
                                EventKind::AdsRefused,
                                format!("{}: connection closed: {why}", peer.ip()),
                            );
                        };
                        let _ = accepted.send(Ok(Closing::new(stream, close))).await;
                    }
                    Ok(Err(e)) => {
                        if let Some(why) = Admission::handshake_refusal(peer, &e) {
                            api.shared.events.record(EventKind::AdsRefused, why);
                        }
                    }
                    Err(_) => {}
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(incoming)
}

/// Who may have xDS: a node identity whose certificate holds, asking for
/// its own `node.id`. A refusal is an event.
fn ads_admission(admission: Arc<Admission>, api: Arc<Api>) -> origin_policy_xds::Admission {
    Arc::new(move |certs, node_id| {
        let decided = admission.admit(certs).and_then(|identity| match identity {
            Identity::Node(id) if id == node_id => Ok(()),
            Identity::Node(_) => Err(format!(
                "node.id {node_id:?} is not the certificate's identity {identity}"
            )),
            other => Err(format!("{other} is not a node identity: xDS is for nodes")),
        });
        if let Err(why) = &decided {
            api.shared
                .events
                .record(EventKind::AdsRefused, format!("node.id {node_id}: {why}"));
        }
        decided
    })
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// A new build of the module (its file's size or modification time
/// changed) goes to the fleet with the filter.
fn follow_module(envoy: &EnvoyAds, wasm: &std::path::Path) {
    let stamp = || {
        std::fs::metadata(wasm)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let mut seen = stamp();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = stamp();
        if now == seen {
            continue;
        }
        seen = now;
        match envoy.module_changed() {
            Ok(true) => eprintln!(
                "serve: {}: a new module, sent with the filter",
                wasm.display()
            ),
            Ok(false) => {}
            Err(e) => eprintln!("serve: {}: {e}; the fleet keeps its module", wasm.display()),
        }
    }
}
