//! `serve --etcd`: one of several replicas over one etcd cluster. etcd is
//! the source of truth ([`crate::etcd`] names the keys); the local store is
//! this replica's cache and history.
//!
//! - **A write** is decided against what this replica has, then committed
//!   with a transaction that compares the domain key's mod_revision with the
//!   one this replica decided on; if another write came first, the
//!   transaction answers the key as it is and the write is decided again
//!   against it (so preconditions hold across replicas). It is answered once
//!   etcd committed it and this replica applied it (read your writes).
//! - **Every replica applies every write from one watch** of the domains,
//!   from the last revision it applied: each document is checked under this
//!   replica's settings, its clusters go to this replica's Envoys first, then
//!   the local commit, the table, the feed. A domain's feed version is its
//!   key's mod_revision, and the epoch is etcd's: every replica pages the
//!   same versions, so an Envoy moving between replicas keeps its version.
//! - **Without the store** (no member with a leader answering for
//!   [`UNREACHABLE_AFTER`]) the replica stops serving: `/healthz` and feed
//!   polls answer 503, its ADS streams are ended with UNAVAILABLE, writes are
//!   refused; Envoys move to a replica that serves. Once reachable it catches
//!   up from its watch, then serves again. A watch whose revision etcd
//!   compacted away, or an etcd of another epoch, is a full resync.

use crate::api::Api;
use crate::error::ControlError;
use crate::etcd::{
    brief, domain_key, domain_of, prefix_end, DomainValue, Etcd, EtcdError, EtcdTls, ReplicaValue,
    DOMAINS, EPOCH_KEY, REPLICAS,
};
use crate::events::{now_ms, EventKind};
use crate::store::Put;
use crate::table::DomainTable;
use crate::writer::{
    apply_replicated, decide, Decision, Known, Replicated, Shared, WriteOutcome, WriteRefused,
    WriteRequest,
};
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures_util::{FutureExt, StreamExt};
use origin_policy_xds::AdsServer;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the replica looks at etcd.
const TICK: Duration = Duration::from_millis(250);
/// A probe is one linearizable read on one member, within this.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Without an answer from etcd for this long, the replica stops serving:
/// longer than an election after a leader is lost (one to two election
/// timeouts, 1 s by default), so one member going does not stop every
/// replica.
pub const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);
/// The lease of a replica's key, kept alive every second.
const LEASE_TTL: i64 = 3;
/// How long a write tries to get etcd's answer, member after member.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a committed write waits to be applied here before it is
/// answered: longer than Envoys have to ACK the clusters it needs (20 s by
/// default), which comes first.
const APPLY_DEADLINE: Duration = Duration::from_secs(30);
/// Writes of one import in flight at once: etcd commits concurrent
/// proposals together.
const WRITES_AT_ONCE: usize = 64;
/// Keys per page of a full resync.
const RANGE_PAGE: i64 = 1000;
/// Domains per local commit when applying.
const APPLY_BATCH: usize = 10_000;
/// A watch that answers nothing this long (not even a progress request) is
/// started again.
const WATCH_STALLED: Duration = Duration::from_secs(3);

/// How `serve --etcd` reaches etcd and is reached.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// etcd's client URLs, e.g. `http://127.0.0.11:2379` (`https://` with
    /// `tls`).
    pub endpoints: Vec<String>,
    /// TLS to the members (`--etcd-ca`, `--etcd-cert`, `--etcd-key`).
    pub tls: Option<EtcdTls>,
    /// This replica's name in etcd and in `/status`.
    pub name: String,
    /// Its HTTP listener as others reach it.
    pub api: String,
    /// Its ADS listener, with `--ads`.
    pub ads: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    Connected,
    Unreachable,
    CatchingUp,
}

impl StoreState {
    pub fn name(self) -> &'static str {
        match self {
            StoreState::Connected => "connected",
            StoreState::Unreachable => "unreachable",
            StoreState::CatchingUp => "catching_up",
        }
    }
}

#[derive(Debug, Clone)]
struct Health {
    state: StoreState,
    since_ms: u64,
    error: Option<String>,
}

pub struct Replica {
    pub name: String,
    config: ReplicaConfig,
    etcd: Etcd,
    health: Mutex<Health>,
    /// `None` while this replica serves; else why not.
    serving: watch::Sender<Option<String>>,
    /// The last revision of the domains applied here.
    applied: watch::Sender<u64>,
    /// The live replicas, from their keys.
    replicas: Mutex<BTreeMap<String, ReplicaValue>>,
    ads: Option<AdsServer>,
    /// Makes each write's token unique.
    writes: AtomicU64,
    /// The lease this replica's key is under, once granted.
    lease: Mutex<Option<i64>>,
    /// Held while changes are applied: a watch aborted in the middle of an
    /// apply (the store went away) may still be applying when the next
    /// watch delivers the same changes.
    applying: Mutex<()>,
    started_ms: u64,
}

/// One change of a domain from etcd, in revision order.
#[derive(Debug)]
struct Change {
    domain: String,
    /// The key's mod_revision (for a removal found by a resync: its revision).
    seq: u64,
    /// `None`: the key is gone.
    value: Option<Result<DomainValue, EtcdError>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn known_of(value: &DomainValue) -> Known {
    Known {
        revision: value.revision,
        removed: value.document.is_empty(),
        digest: origin_policy_engine::fingerprint(value.document.as_bytes()),
    }
}

fn unavailable(e: impl std::fmt::Display) -> ControlError {
    ControlError::Store(e.to_string())
}

impl Replica {
    /// Connects (lazily) and starts following etcd; the replica serves once
    /// it has caught up ([`Replica::wait_serving`]).
    pub fn start(
        api: &Arc<Api>,
        config: ReplicaConfig,
        ads: Option<AdsServer>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Replica>, ControlError> {
        let etcd = runtime
            .block_on(Etcd::connect(&config.endpoints, config.tls.as_ref()))
            .map_err(|e| match e {
                EtcdError::Config(why) => ControlError::Usage(why),
                other => unavailable(other),
            })?;
        let why = "connecting to etcd".to_owned();
        if let Some(ads) = &ads {
            ads.set_not_serving(Some(why.clone()));
        }
        let applied = api.shared.table().seq;
        let replica = Arc::new(Replica {
            name: config.name.clone(),
            config,
            etcd,
            health: Mutex::new(Health {
                state: StoreState::Unreachable,
                since_ms: now_ms(),
                error: Some(why.clone()),
            }),
            serving: watch::channel(Some(why)).0,
            applied: watch::channel(applied).0,
            replicas: Mutex::new(BTreeMap::new()),
            ads,
            writes: AtomicU64::new(0),
            lease: Mutex::new(None),
            applying: Mutex::new(()),
            started_ms: now_ms(),
        });
        if api.shared.replica.set(replica.clone()).is_err() {
            return Err(ControlError::Store(
                "a replica is running already".to_owned(),
            ));
        }
        runtime.spawn(supervise(api.clone(), replica.clone()));
        Ok(replica)
    }

    /// Until the replica first serves, saying every 5 s what it waits for;
    /// with `at_most`, no longer than that. Whether it serves.
    pub async fn wait_serving(&self, at_most: Option<Duration>) -> bool {
        let started = Instant::now();
        let mut serving = self.serving.subscribe();
        loop {
            let mut wait = Duration::from_secs(5);
            if let Some(at_most) = at_most {
                if started.elapsed() >= at_most {
                    return self.not_serving().is_none();
                }
                wait = wait.min(at_most.saturating_sub(started.elapsed()));
            }
            let waited = tokio::time::timeout(wait, serving.wait_for(Option::is_none)).await;
            match waited {
                Ok(_) => return true,
                Err(_) if at_most.is_some_and(|at_most| started.elapsed() >= at_most) => {}
                Err(_) => eprintln!(
                    "serve: waiting for etcd ({}): {}",
                    self.etcd.endpoints.join(","),
                    self.health().error.unwrap_or_default()
                ),
            }
        }
    }

    fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    pub fn state(&self) -> StoreState {
        lock(&self.health).state
    }

    /// Why this replica does not serve, if it does not.
    pub fn not_serving(&self) -> Option<String> {
        self.serving.borrow().clone()
    }

    pub fn serving_changes(&self) -> watch::Receiver<Option<String>> {
        self.serving.subscribe()
    }

    /// The last revision of the domains applied here.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Until this replica has applied revision `revision`, at most until
    /// `deadline`; whether it has.
    pub async fn wait_applied(&self, revision: u64, deadline: tokio::time::Instant) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn set_state(&self, state: StoreState, error: Option<String>) {
        let mut health = lock(&self.health);
        if health.state != state {
            health.since_ms = now_ms();
        }
        health.state = state;
        health.error = error;
        drop(health);
        let not_serving = match state {
            StoreState::Connected => None,
            StoreState::CatchingUp => Some("catching up with etcd".to_owned()),
            StoreState::Unreachable => Some(format!(
                "the store is unreachable: {}",
                self.health().error.unwrap_or_default()
            )),
        };
        if let Some(ads) = &self.ads {
            ads.set_not_serving(not_serving.clone());
        }
        self.serving.send_replace(not_serving);
    }

    /// Still without the store, for another reason: `/healthz`, refused
    /// writes and `/status` say the latest (e.g. why TLS to etcd failed,
    /// rather than "connecting to etcd").
    fn still_unreachable(&self, why: String) {
        if self.health().error.as_deref() != Some(why.as_str()) {
            self.set_state(StoreState::Unreachable, Some(why));
        }
    }

    /// `/status`: `store` and `replicas`.
    pub fn status(&self) -> (Value, Value) {
        let health = self.health();
        let store = json!({
            "kind": "etcd",
            "state": health.state.name(),
            "endpoints": self.etcd.endpoints,
            "applied": self.applied(),
            "since_ms": health.since_ms,
            "error": health.error,
        });
        let replicas: serde_json::Map<String, Value> = lock(&self.replicas)
            .iter()
            .map(|(name, r)| (name.clone(), json!({"api": r.api, "ads": r.ads})))
            .collect();
        (store, Value::Object(replicas))
    }

    /// Stopping: this replica's key goes with its lease at once, so the
    /// others list it as left now rather than when the lease expires.
    pub async fn leave(&self) {
        let Some(id) = lock(&self.lease).take() else {
            return;
        };
        let (_, mut client) = self.etcd.current();
        let _ = tokio::time::timeout(PROBE_TIMEOUT, client.lease_revoke(id)).await;
    }

    fn refuse(&self, shared: &Shared, domain: &str, why: String) -> WriteRefused {
        let message = format!("{domain}: {why}");
        shared
            .events
            .record(EventKind::WriteRefused, message.clone());
        WriteRefused::StoreUnavailable(message)
    }

    /// The key as etcd has it now (linearizable): its mod_revision (0: no
    /// key) and value.
    async fn read(&self, key: &str) -> Result<(u64, Option<DomainValue>), EtcdError> {
        let answer = self
            .etcd
            .run(|mut client| {
                let key = key.to_owned();
                async move { client.get(key, None).await }
            })
            .await?;
        match answer.kvs().first() {
            Some(kv) => Ok((
                kv.mod_revision() as u64,
                Some(DomainValue::decode(kv.value())?),
            )),
            None => Ok((0, None)),
        }
    }

    /// Waits until the write at `seq` is applied here.
    async fn applied_here(
        &self,
        shared: &Shared,
        domain: &str,
        seq: u64,
    ) -> Result<(), WriteRefused> {
        if self
            .wait_applied(seq, tokio::time::Instant::now() + APPLY_DEADLINE)
            .await
        {
            return Ok(());
        }
        Err(self.refuse(
            shared,
            domain,
            format!(
                "committed to etcd at version {seq}, but this replica has not applied it within {} s; it serves it once it has",
                APPLY_DEADLINE.as_secs()
            ),
        ))
    }

    /// One write through etcd (see the module's documentation).
    pub async fn write(
        &self,
        shared: &Shared,
        request: WriteRequest,
    ) -> Result<WriteOutcome, WriteRefused> {
        let domain = request.domain.as_str();
        if self.state() == StoreState::Unreachable {
            let why = self.not_serving().unwrap_or_default();
            return Err(self.refuse(shared, domain, format!("nothing was written: {why}")));
        }
        let document = request
            .policy
            .as_ref()
            .map_or(String::new(), |p| p.document.clone());
        let key = domain_key(domain);
        let token = format!(
            "{}/{}/{}",
            self.name,
            self.started_ms,
            self.writes.fetch_add(1, Ordering::Relaxed)
        );
        // This replica's copy first; etcd's once that proves stale.
        let (mut expected, mut known) = shared.table().get(domain).map_or((0, None), |c| {
            let known = Known {
                revision: c.revision,
                removed: c.removed,
                digest: c.digest,
            };
            (c.seq, Some(known))
        });
        let mut from_etcd = false;
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut unanswered = false;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            if self.state() == StoreState::Unreachable {
                break;
            }
            let decision = decide(request.precondition, &document, known);
            if !from_etcd && !matches!(decision, Ok(Decision::Write { .. })) {
                // Refused or unchanged on this replica's copy, which may be
                // behind: decided again on etcd's.
                match self.read(&key).await {
                    Ok((revision, value)) => {
                        expected = revision;
                        known = value.as_ref().map(known_of);
                        from_etcd = true;
                        continue;
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let revision = match decision {
                Err(refused) => return Err(refused),
                Ok(Decision::Unchanged { revision }) => {
                    self.applied_here(shared, domain, expected).await?;
                    let seq = shared.table().seq;
                    return Ok(WriteOutcome::Unchanged { revision, seq });
                }
                Ok(Decision::Write { revision }) => revision,
            };
            let value = DomainValue {
                revision,
                at_ms: now_ms(),
                source: request.source.clone(),
                document: document.clone(),
                writer: token.clone(),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    expected as i64,
                )])
                .and_then([TxnOp::put(key.clone(), value.encode(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let answer = self
                .etcd
                .run(|mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await;
            match answer {
                Ok(answer) if answer.succeeded() => {
                    let seq = answer.header().map_or(0, |h| h.revision()) as u64;
                    self.applied_here(shared, domain, seq).await?;
                    return Ok(WriteOutcome::Written { revision, seq });
                }
                Ok(answer) => {
                    // Another write came first: decided again on the key as
                    // it is now.
                    let kv = answer.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                        _ => None,
                    });
                    let current = match kv.as_ref().map(|kv| DomainValue::decode(kv.value())) {
                        Some(Ok(v)) => Some(v),
                        Some(Err(e)) => return Err(WriteRefused::Failed(format!("{domain}: {e}"))),
                        None => None,
                    };
                    expected = kv.as_ref().map_or(0, |kv| kv.mod_revision() as u64);
                    if let Some(v) = current.as_ref().filter(|v| v.writer == token) {
                        // An earlier attempt whose answer was lost did land.
                        self.applied_here(shared, domain, expected).await?;
                        return Ok(WriteOutcome::Written {
                            revision: v.revision,
                            seq: expected,
                        });
                    }
                    known = current.as_ref().map(known_of);
                    from_etcd = true;
                }
                Err(e) => {
                    unanswered |= matches!(e, EtcdError::Unanswered(_));
                    last_error = e.to_string();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let why = if last_error.is_empty() {
            self.not_serving().unwrap_or_default()
        } else {
            last_error
        };
        let outcome = if unanswered {
            "the write may or may not have been applied (a commit went unanswered): read the domain before writing again"
        } else {
            "nothing was written"
        };
        Err(self.refuse(shared, domain, format!("{outcome}: {why}")))
    }

    /// Many writes (an import), [`WRITES_AT_ONCE`] in flight.
    pub async fn write_all(
        &self,
        shared: &Shared,
        requests: Vec<WriteRequest>,
    ) -> Vec<Result<WriteOutcome, WriteRefused>> {
        futures_util::stream::iter(requests)
            .map(|request| self.write(shared, request))
            .buffered(WRITES_AT_ONCE)
            .collect()
            .await
    }

    /// The feed epoch: etcd's, created by the first replica that asks.
    async fn epoch(&self) -> Result<u64, EtcdError> {
        let fresh = crate::serve::new_epoch();
        let txn = Txn::new()
            .when([Compare::create_revision(EPOCH_KEY, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(EPOCH_KEY, fresh.to_string(), None)])
            .or_else([TxnOp::get(EPOCH_KEY, None)]);
        let answer = self
            .etcd
            .run(|mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        if answer.succeeded() {
            return Ok(fresh);
        }
        answer
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .and_then(|kv| kv.value_str().ok()?.trim().parse().ok()),
                _ => None,
            })
            .ok_or_else(|| EtcdError::Invalid(format!("{EPOCH_KEY} is not a number")))
    }

    /// The latest mod_revision among the domains (0: none).
    async fn latest(&self) -> Result<u64, EtcdError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_limit(1)
            .with_sort(SortTarget::Mod, SortOrder::Descend);
        let answer = self
            .etcd
            .run(|mut client| {
                let options = options.clone();
                async move { client.get(DOMAINS, Some(options)).await }
            })
            .await?;
        Ok(answer
            .kvs()
            .first()
            .map_or(0, |kv| kv.mod_revision() as u64))
    }

    /// One linearizable read on the current member: the live replicas.
    async fn probe(&self) -> Result<BTreeMap<String, ReplicaValue>, String> {
        let (index, mut client) = self.etcd.current();
        let options = GetOptions::new().with_prefix();
        let answer = tokio::time::timeout(PROBE_TIMEOUT, client.get(REPLICAS, Some(options))).await;
        if !matches!(answer, Ok(Ok(_))) {
            if let Some(tls) = self.etcd.tls_failure(index).await {
                self.etcd.failed(index);
                return Err(format!("{}: {tls}", self.etcd.endpoints[index]));
            }
        }
        let failed = |why: String| {
            self.etcd.failed(index);
            format!("{}: {why}", self.etcd.endpoints[index])
        };
        match answer {
            Ok(Ok(answer)) => Ok(answer
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let name = kv.key_str().ok()?.strip_prefix(REPLICAS)?.to_owned();
                    Some((name, ReplicaValue::decode(kv.value())?))
                })
                .collect()),
            Ok(Err(e)) => Err(failed(brief(&e))),
            Err(_) => Err(failed(format!(
                "no answer within {} ms",
                PROBE_TIMEOUT.as_millis()
            ))),
        }
    }

    fn update_replicas(&self, shared: &Shared, live: BTreeMap<String, ReplicaValue>) {
        let mut known = lock(&self.replicas);
        for (name, value) in &live {
            if !known.contains_key(name) {
                let ads = value.ads.as_deref().unwrap_or("no ADS");
                shared.events.record(
                    EventKind::ReplicaJoined,
                    format!("{name} ({}, {ads})", value.api),
                );
            }
        }
        for name in known.keys() {
            if !live.contains_key(name) {
                shared.events.record(
                    EventKind::ReplicaLeft,
                    format!("{name} (its lease expired)"),
                );
            }
        }
        *known = live;
    }
}

/// This replica's key, under a lease kept alive.
#[derive(Default)]
struct Lease {
    id: Option<i64>,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    renewed: Option<Instant>,
}

impl Lease {
    async fn keep(&mut self, replica: &Replica) -> Result<(), String> {
        if self
            .renewed
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return Ok(());
        }
        self.renewed = Some(Instant::now());
        let (_, mut client) = replica.etcd.current();
        let timeout = PROBE_TIMEOUT;
        if let Some(id) = self.id {
            if self.keeper.is_none() {
                match tokio::time::timeout(timeout, client.lease_keep_alive(id)).await {
                    Ok(Ok(keeper)) => self.keeper = Some(keeper),
                    // Expired while the store was away (the client's "lease
                    // not found": its first answer had no TTL left): a new
                    // lease, below, or this replica would never be listed
                    // again.
                    Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => self.id = None,
                    Ok(Err(e)) => return Err(brief(&e)),
                    Err(_) => return Err("no answer".to_owned()),
                }
            }
            if let Some((keeper, stream)) = self.keeper.as_mut() {
                let renewed = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(timeout, renewed).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => return Ok(()),
                    // Expired while the store was away: a new lease.
                    Ok(Ok(_)) => self.id = None,
                    Ok(Err(_)) | Err(_) => {
                        self.keeper = None;
                        return Err("the lease's keep-alive failed".to_owned());
                    }
                }
            }
        }
        self.keeper = None;
        let granted = tokio::time::timeout(timeout, client.lease_grant(LEASE_TTL, None))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| brief(&e))?;
        let value = ReplicaValue {
            api: replica.config.api.clone(),
            ads: replica.config.ads.clone(),
        };
        let key = format!("{REPLICAS}{}", replica.name);
        let options = PutOptions::new().with_lease(granted.id());
        tokio::time::timeout(timeout, client.put(key, value.encode(), Some(options)))
            .await
            .map_err(|_| "no answer".to_owned())?
            .map_err(|e| brief(&e))?;
        self.id = Some(granted.id());
        *lock(&replica.lease) = self.id;
        Ok(())
    }
}

type WatchTask = tokio::task::JoinHandle<Result<(), EtcdError>>;

/// Follows etcd until the process ends: probes it, keeps the lease, runs
/// the watch, and says when the store goes and comes back.
async fn supervise(api: Arc<Api>, replica: Arc<Replica>) {
    let shared = &api.shared;
    let mut watch: Option<WatchTask> = None;
    let mut last_answer = Instant::now();
    let mut first = true;
    let mut catch_up_to = 0;
    let mut lease = Lease::default();
    loop {
        match replica.probe().await {
            Ok(live) => {
                last_answer = Instant::now();
                replica.update_replicas(shared, live);
            }
            Err(why) => {
                let state = replica.state();
                let gone = last_answer.elapsed() >= UNREACHABLE_AFTER;
                if state != StoreState::Unreachable && gone {
                    if let Some(task) = watch.take() {
                        task.abort();
                    }
                    lease.keeper = None;
                    replica.set_state(StoreState::Unreachable, Some(why.clone()));
                    shared.events.record(
                        EventKind::StoreUnreachable,
                        format!(
                            "no answer from etcd for {} ms: {why}",
                            last_answer.elapsed().as_millis()
                        ),
                    );
                } else if state == StoreState::Unreachable {
                    replica.still_unreachable(why);
                }
                tokio::time::sleep(TICK).await;
                continue;
            }
        }
        if replica.state() == StoreState::Unreachable {
            match connect(&api, &replica).await {
                Ok(target) => {
                    if !first {
                        shared.events.record(
                            EventKind::StoreReachable,
                            format!(
                                "etcd answers again ({})",
                                replica.etcd.endpoints[replica.etcd.current().0]
                            ),
                        );
                    }
                    first = false;
                    catch_up_to = target;
                    replica.set_state(StoreState::CatchingUp, None);
                    if let Some(task) = watch.take() {
                        task.abort();
                    }
                }
                Err(e) => {
                    replica.still_unreachable(e.to_string());
                    tokio::time::sleep(TICK).await;
                    continue;
                }
            }
        }
        if let Err(why) = lease.keep(&replica).await {
            eprintln!("serve: this replica's key in etcd: {why}");
        }
        if let Some(task) = watch.take_if(|t| t.is_finished()) {
            match task.await {
                Ok(Err(EtcdError::Compacted(revision))) => {
                    eprintln!("serve: etcd compacted the history up to revision {revision}, past what this replica applied: a full resync");
                    replica.set_state(StoreState::CatchingUp, None);
                    if let Err(e) = resync(&api, &replica).await {
                        eprintln!("serve: resync: {e}");
                    }
                    catch_up_to = catch_up_to.max(replica.applied());
                }
                Ok(Err(e)) => eprintln!("serve: the watch of etcd ended: {e}; watching again"),
                Ok(Ok(())) | Err(_) => {}
            }
        }
        if watch.is_none() {
            let from = replica.applied() + 1;
            watch = Some(tokio::spawn(follow(api.clone(), replica.clone(), from)));
        }
        if replica.state() == StoreState::CatchingUp && replica.applied() >= catch_up_to {
            replica.set_state(StoreState::Connected, None);
            shared.events.record(
                EventKind::CaughtUp,
                format!(
                    "applied every write up to revision {}; serving",
                    replica.applied()
                ),
            );
        }
        tokio::time::sleep(TICK).await;
    }
}

/// The store answers again (or for the first time): its epoch (another
/// etcd's is a resync from nothing) and the revision to catch up to.
async fn connect(api: &Arc<Api>, replica: &Arc<Replica>) -> Result<u64, EtcdError> {
    let epoch = replica.epoch().await?;
    let local = api.shared.table().epoch;
    if epoch != local {
        eprintln!("serve: etcd's epoch is {epoch}, this replica's store had {local}: syncing every domain from etcd");
        let wiped = api.clone();
        tokio::task::spawn_blocking(move || -> Result<(), ControlError> {
            let shared = &wiped.shared;
            let _applying = shared.replica.get().map(|r| lock(&r.applying));
            shared.store.clear_domains(epoch)?;
            let loaded = shared.store.load()?;
            *shared.table() = DomainTable::from_store(epoch, 0, Vec::new(), loaded.clusters);
            shared.published.send_replace(0);
            wiped.fleet.start(epoch, 0);
            Ok(())
        })
        .await
        .map_err(|e| EtcdError::Invalid(e.to_string()))?
        .map_err(|e| EtcdError::Invalid(e.to_string()))?;
        replica.applied.send_replace(0);
        resync(api, replica).await?;
    }
    replica.latest().await
}

/// Every domain read from etcd at one revision, and applied where it
/// differs; a domain this replica has that etcd does not is removed.
async fn resync(api: &Arc<Api>, replica: &Arc<Replica>) -> Result<u64, EtcdError> {
    let started = Instant::now();
    let mut at = 0;
    let mut from = DOMAINS.as_bytes().to_vec();
    let mut kvs: Vec<KeyValue> = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(prefix_end(DOMAINS))
            .with_limit(RANGE_PAGE);
        if at > 0 {
            options = options.with_revision(at as i64);
        }
        let answer = replica
            .etcd
            .run(|mut client| {
                let (key, options) = (from.clone(), options.clone());
                async move { client.get(key, Some(options)).await }
            })
            .await?;
        if at == 0 {
            at = answer.header().map_or(0, |h| h.revision()) as u64;
        }
        let more = answer.more();
        if let Some(last) = answer.kvs().last() {
            from = last.key().to_vec();
            from.push(0);
        }
        kvs.extend(answer.kvs().iter().cloned());
        if !more {
            break;
        }
    }
    let mut seen = HashSet::new();
    let mut changes: Vec<Change> = kvs
        .iter()
        .filter_map(|kv| {
            let domain = domain_of(kv.key())?.to_owned();
            seen.insert(domain.clone());
            Some(Change {
                domain,
                seq: kv.mod_revision() as u64,
                value: Some(DomainValue::decode(kv.value())),
            })
        })
        .collect();
    // The feed's versions are the domains' mod_revisions, the same on every
    // replica: the resync brings this one to the latest of them, not to
    // etcd's revision (other keys move that). A removal it finds (a key
    // deleted by hand) takes that version, or this replica's latest.
    let latest = kvs
        .iter()
        .map(|kv| kv.mod_revision() as u64)
        .max()
        .unwrap_or(0);
    let (gone, through) = {
        let table = api.shared.table();
        let gone: Vec<String> = table
            .live_domains()
            .into_iter()
            .map(|(d, _)| d)
            .filter(|d| !seen.contains(d))
            .collect();
        let through = if gone.is_empty() {
            latest
        } else {
            latest.max(table.seq)
        };
        (gone, through)
    };
    changes.extend(gone.into_iter().map(|domain| Change {
        domain,
        seq: through,
        value: None,
    }));
    changes.sort_by_key(|c| c.seq);
    let count = changes.len();
    let applying = api.clone();
    tokio::task::spawn_blocking(move || apply_changes(&applying, changes, through, true))
        .await
        .map_err(|e| EtcdError::Invalid(e.to_string()))?;
    replica.applied.send_if_modified(|a| {
        let moved = *a < at;
        *a = (*a).max(at);
        moved
    });
    eprintln!(
        "serve: resynced {count} domains from etcd at revision {at} in {} ms",
        started.elapsed().as_millis()
    );
    Ok(at)
}

/// The watch of the domains from revision `from`, until it fails.
async fn follow(api: Arc<Api>, replica: Arc<Replica>, from: u64) -> Result<(), EtcdError> {
    let (index, client) = replica.etcd.current();
    let endpoint = replica.etcd.endpoints[index].clone();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from as i64);
    // A catch-up's responses can be large.
    let mut watcher = client.watch_client().max_decoding_message_size(256 << 20);
    let stream = match tokio::time::timeout(
        crate::etcd::REQUEST_TIMEOUT,
        watcher.watch(DOMAINS, Some(options)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            replica.etcd.failed(index);
            return Err(EtcdError::Unreachable(format!("{endpoint}: {}", brief(&e))));
        }
        Err(_) => {
            replica.etcd.failed(index);
            return Err(EtcdError::Unanswered(format!(
                "{endpoint}: the watch was not created"
            )));
        }
    };
    let (mut requests, mut responses) = stream.split();
    // A progress request every second is answered at once, however quiet
    // the domains are: a watch that answers nothing for WATCH_STALLED is on
    // a member that cannot serve it, and is started again.
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut heard = Instant::now();
    loop {
        let message = tokio::select! {
            message = responses.message() => message,
            _ = ticks.tick() => {
                if heard.elapsed() >= WATCH_STALLED {
                    replica.etcd.failed(index);
                    return Err(EtcdError::Unanswered(format!(
                        "{endpoint}: the watch answered nothing for {} s",
                        WATCH_STALLED.as_secs()
                    )));
                }
                let _ = requests.request_progress().await;
                continue;
            }
        };
        heard = Instant::now();
        let mut changes = Vec::new();
        let mut message = Some(message);
        // Every message already here goes into one local commit (group
        // commit): an import's writes arrive one revision each.
        while let Some(next) = message.take() {
            let next = next
                .map_err(|e| EtcdError::Unreachable(format!("{endpoint}: {}", brief(&e))))?
                .ok_or_else(|| EtcdError::Unreachable(format!("{endpoint}: the watch ended")))?;
            if next.canceled() {
                if next.compact_revision() > 0 {
                    return Err(EtcdError::Compacted(next.compact_revision()));
                }
                return Err(EtcdError::Unreachable(format!(
                    "{endpoint}: the watch was cancelled: {}",
                    next.cancel_reason()
                )));
            }
            changes.extend(next.events().iter().filter_map(|event| {
                let kv = event.kv()?;
                let domain = domain_of(kv.key())?.to_owned();
                let value = match event.event_type() {
                    EventType::Put => Some(DomainValue::decode(kv.value())),
                    EventType::Delete => None,
                };
                Some(Change {
                    domain,
                    seq: kv.mod_revision() as u64,
                    value,
                })
            }));
            if changes.len() < APPLY_BATCH {
                message = responses.message().now_or_never();
            }
        }
        let Some(through) = changes.iter().map(|c| c.seq).max() else {
            continue;
        };
        let applying = api.clone();
        tokio::task::spawn_blocking(move || apply_changes(&applying, changes, through, false))
            .await
            .map_err(|e| EtcdError::Invalid(e.to_string()))?;
        replica.applied.send_if_modified(|a| {
            let moved = *a < through;
            *a = (*a).max(through);
            moved
        });
    }
}

/// Applies changes in revision order through the pipeline every write
/// takes; a change this replica has already is skipped, and one its
/// settings refuse is recorded and skipped. Tries again until the local
/// store and Envoy take them: etcd has them, so they cannot be refused.
fn apply_changes(api: &Api, changes: Vec<Change>, through: u64, keep_retired: bool) {
    let shared = &api.shared;
    let _applying = shared.replica.get().map(|r| lock(&r.applying));
    let settings = api.current_settings();
    let mut writes = Vec::with_capacity(changes.len());
    for change in changes {
        let current = shared.table().get(&change.domain).cloned();
        if current.as_ref().is_some_and(|c| c.seq >= change.seq) {
            continue;
        }
        let value = match change.value {
            Some(Ok(value)) => value,
            Some(Err(e)) => {
                shared.events.record(
                    EventKind::WriteRefused,
                    format!("{} at version {}: {e}; skipped", change.domain, change.seq),
                );
                continue;
            }
            // The key is gone (deleted in etcd by hand, or found missing by a
            // resync): a removal, if the domain has a policy here.
            None => match current.filter(|c| !c.removed) {
                Some(c) => DomainValue {
                    revision: c.revision + 1,
                    at_ms: now_ms(),
                    source: "etcd".to_owned(),
                    document: String::new(),
                    writer: String::new(),
                },
                None => continue,
            },
        };
        let units = if value.document.is_empty() {
            Vec::new()
        } else {
            match settings.validate("etcd", Some(&change.domain), value.document.as_bytes()) {
                Ok(policy) => policy.clusters,
                Err(refusal) => {
                    shared.events.record(
                        EventKind::WriteRefused,
                        format!(
                            "{} revision {} (version {}) is refused under this replica's settings; it keeps its last good policy: {}",
                            change.domain, value.revision, change.seq, refusal.text()
                        ),
                    );
                    continue;
                }
            }
        };
        writes.push(Replicated {
            put: Put {
                domain: change.domain,
                revision: value.revision,
                seq: change.seq,
                at_ms: value.at_ms,
                source: value.source,
                document: value.document,
                clusters: Vec::new(),
            },
            units,
        });
    }
    let mut batches: Vec<Vec<Replicated>> = Vec::new();
    let mut rest = writes.into_iter().peekable();
    while rest.peek().is_some() {
        batches.push(rest.by_ref().take(APPLY_BATCH).collect());
    }
    if batches.is_empty() {
        batches.push(Vec::new());
    }
    let last = batches.len() - 1;
    for (i, batch) in batches.into_iter().enumerate() {
        let upto = if i == last {
            through
        } else {
            batch.iter().map(|w| w.put.seq).max().unwrap_or(0)
        };
        loop {
            match apply_replicated(shared, batch.clone(), upto, keep_retired) {
                Ok(()) => break,
                Err(e) => {
                    eprintln!("serve: applying etcd's writes up to revision {upto}: {e}; trying again in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}
