//! The one writer: writes queue up while a commit is on disk and go together
//! in the next transaction (group commit), so a durable commit per write does
//! not cap the write rate at the disk's fsyncs per second. For each batch:
//! the clusters it newly needs go to Envoy first (make before break), then
//! the commit, then the feed publishes it, then every writer is answered.

use crate::envoy::EnvoyConfig;
use crate::error::ControlError;
use crate::events::Events;
use crate::replica::Replica;
use crate::store::{Commit, Put, Store};
use crate::table::{Applied, Current, DomainTable};
use crate::validate::ClusterUnit;
use crate::validate::ValidPolicy;
use origin_policy_engine::fingerprint;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

/// Writes committed together at most.
const MAX_BATCH: usize = 10_000;

/// What the writer expects the domain's current revision to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match: "N"`.
    Revision(u64),
    /// `If-None-Match: *`: only if the domain has no policy.
    Absent,
}

#[derive(Debug)]
pub struct WriteRequest {
    pub domain: String,
    /// `None`: remove the domain's policy.
    pub policy: Option<ValidPolicy>,
    pub source: String,
    pub precondition: Precondition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// A new revision, published at feed version `seq`.
    Written { revision: u64, seq: u64 },
    /// The same document as the current revision: nothing written.
    Unchanged { revision: u64, seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteRefused {
    /// The precondition did not hold; the current revision, if any.
    Stale { current: Option<u64> },
    /// A removal of a domain without a policy.
    NotFound,
    /// Nothing was written; why.
    Failed(String),
    /// The replicated store could not be reached (`serve --etcd`); the
    /// message says whether the write may have been applied.
    StoreUnavailable(String),
}

/// What a write finds of its domain: the current revision, whether it
/// removed the policy, and the document's fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub revision: u64,
    pub removed: bool,
    pub digest: u64,
}

/// What a write does once its precondition held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The same document as the current revision: nothing to write.
    Unchanged { revision: u64 },
    /// A new revision.
    Write { revision: u64 },
}

/// Decides a write of `document` (empty: remove the policy) against what
/// the domain has: its precondition, a removal of nothing, an unchanged
/// document, or the next revision.
pub fn decide(
    precondition: Precondition,
    document: &str,
    known: Option<Known>,
) -> Result<Decision, WriteRefused> {
    let live = known.filter(|k| !k.removed);
    let stale = match precondition {
        Precondition::None => false,
        Precondition::Revision(r) => live.map(|k| k.revision) != Some(r),
        Precondition::Absent => live.is_some(),
    };
    if stale {
        return Err(WriteRefused::Stale {
            current: live.map(|k| k.revision),
        });
    }
    if document.is_empty() && live.is_none() {
        return Err(WriteRefused::NotFound);
    }
    match live {
        Some(k) if !document.is_empty() && k.digest == fingerprint(document.as_bytes()) => {
            Ok(Decision::Unchanged {
                revision: k.revision,
            })
        }
        _ => Ok(Decision::Write {
            revision: known.map_or(1, |k| k.revision + 1),
        }),
    }
}

type Reply = oneshot::Sender<Result<WriteOutcome, WriteRefused>>;

/// Everything the server's parts share.
pub struct Shared {
    pub store: Store,
    pub table: Mutex<DomainTable>,
    /// The last published sequence number; feed polls wait on it.
    pub published: watch::Sender<u64>,
    pub envoy: Box<dyn EnvoyConfig>,
    /// The rollout's stable version (`u64::MAX` without canaries): clusters
    /// no domain names any more are kept while the stable version is behind
    /// the latest, since nodes at the stable version may still use them.
    pub stable: std::sync::atomic::AtomicU64,
    /// What happened, for `/status`.
    pub events: Events,
    /// `serve --etcd`: the replica that writes through etcd and applies
    /// what every replica wrote.
    pub replica: OnceLock<Arc<Replica>>,
    queue: mpsc::UnboundedSender<(WriteRequest, Reply)>,
}

impl Shared {
    /// Starts the writer thread.
    pub fn start(store: Store, table: DomainTable, envoy: Box<dyn EnvoyConfig>) -> Arc<Shared> {
        let (queue, receiver) = mpsc::unbounded_channel();
        let (published, _) = watch::channel(table.seq);
        let shared = Arc::new(Shared {
            store,
            table: Mutex::new(table),
            published,
            envoy,
            stable: std::sync::atomic::AtomicU64::new(u64::MAX),
            events: Events::default(),
            replica: OnceLock::new(),
            queue,
        });
        let writer = Arc::downgrade(&shared);
        std::thread::spawn(move || run(writer, receiver));
        shared
    }

    pub fn table(&self) -> MutexGuard<'_, DomainTable> {
        // Every change to the table is a whole `apply`: a panic elsewhere
        // cannot leave it half-written.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Why this server does not serve now (`serve --etcd` without its
    /// store, or catching up), if it does not.
    pub fn not_serving(&self) -> Option<String> {
        self.replica.get().and_then(|r| r.not_serving())
    }

    /// Queues a write; the answer comes once it is on disk and published.
    pub async fn write(&self, request: WriteRequest) -> Result<WriteOutcome, WriteRefused> {
        if let Some(replica) = self.replica.get() {
            return replica.write(self, request).await;
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((request, reply))
            .map_err(|_| WriteRefused::Failed("the writer stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| WriteRefused::Failed("the writer stopped".to_owned()))?
    }

    /// Many writes queued at once (an import): committed in as few
    /// transactions as the writer can.
    pub async fn write_all(
        &self,
        requests: Vec<WriteRequest>,
    ) -> Vec<Result<WriteOutcome, WriteRefused>> {
        if let Some(replica) = self.replica.get() {
            return replica.write_all(self, requests).await;
        }
        let mut answers = Vec::with_capacity(requests.len());
        for request in requests {
            let (reply, answer) = oneshot::channel();
            if self.queue.send((request, reply)).is_err() {
                break;
            }
            answers.push(answer);
        }
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(
                answer
                    .await
                    .unwrap_or_else(|_| Err(WriteRefused::Failed("the writer stopped".to_owned()))),
            );
        }
        out
    }
}

fn run(
    shared: std::sync::Weak<Shared>,
    mut receiver: mpsc::UnboundedReceiver<(WriteRequest, Reply)>,
) {
    while let Some(first) = receiver.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        commit_batch(&shared, batch);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A write decided against the table (and the batch's earlier writes).
struct Decided {
    reply: Reply,
    answer: Result<WriteOutcome, WriteRefused>,
}

fn commit_batch(shared: &Shared, batch: Vec<(WriteRequest, Reply)>) {
    let at_ms = now_ms();
    let mut commit = Commit::default();
    let mut applied = Vec::new();
    let mut decided = Vec::with_capacity(batch.len());
    let (dropped, cluster_set) = {
        let table = shared.table();
        let mut seq = table.seq;
        // Domains written earlier in this batch: (revision, removed, digest).
        let mut pending: HashMap<String, (u64, bool, u64)> = HashMap::new();
        for (request, reply) in batch {
            let known = pending.get(&request.domain).copied().or_else(|| {
                table
                    .get(&request.domain)
                    .map(|c| (c.revision, c.removed, c.digest))
            });
            let document = request
                .policy
                .as_ref()
                .map_or(String::new(), |p| p.document.clone());
            let decision = decide(
                request.precondition,
                &document,
                known.map(|(revision, removed, digest)| Known {
                    revision,
                    removed,
                    digest,
                }),
            );
            let answer = match decision {
                Err(refused) => Err(refused),
                Ok(Decision::Unchanged { revision }) => Ok(WriteOutcome::Unchanged {
                    revision,
                    seq: table.seq,
                }),
                Ok(Decision::Write { revision }) => {
                    let digest = fingerprint(document.as_bytes());
                    seq += 1;
                    let clusters = request.policy.as_ref().map_or(Vec::new(), |p| {
                        p.clusters.iter().map(|(n, _)| n.clone()).collect()
                    });
                    for (name, json) in request.policy.iter().flat_map(|p| &p.clusters) {
                        let known_cluster = table.has_cluster(name)
                            || commit.clusters_added.iter().any(|(n, _)| n == name);
                        if !known_cluster {
                            commit.clusters_added.push((name.clone(), json.to_string()));
                        }
                    }
                    pending.insert(
                        request.domain.clone(),
                        (revision, document.is_empty(), digest),
                    );
                    let entry = Current {
                        revision,
                        seq,
                        removed: document.is_empty(),
                        digest,
                        clusters: Box::new([]),
                    };
                    applied.push((
                        Applied {
                            domain: request.domain.clone(),
                            entry,
                        },
                        clusters.clone(),
                    ));
                    commit.puts.push(Put {
                        domain: request.domain,
                        revision,
                        seq,
                        at_ms,
                        source: request.source,
                        document,
                        clusters,
                    });
                    Ok(WriteOutcome::Written { revision, seq })
                }
            };
            decided.push(Decided { reply, answer });
        }
        commit.seq = seq;
        if commit.clusters_added.is_empty() {
            (Vec::new(), None)
        } else {
            let stable = shared.stable.load(std::sync::atomic::Ordering::Relaxed);
            let dropped = if stable >= table.seq {
                table.retired()
            } else {
                Vec::new()
            };
            let set = table.cluster_set(&commit.clusters_added, &dropped);
            (dropped, Some(set))
        }
    };
    let failed = |why: String, decided: Vec<Decided>| {
        eprintln!("serve: {why}: {} writes refused", decided.len());
        for d in decided {
            let answer = match d.answer {
                Ok(WriteOutcome::Written { .. }) => Err(WriteRefused::Failed(why.clone())),
                other => other,
            };
            let _ = d.reply.send(answer);
        }
    };
    if commit.puts.is_empty() {
        for d in decided {
            let _ = d.reply.send(d.answer);
        }
        return;
    }
    if let Some(set) = cluster_set {
        if let Err(e) = shared.envoy.clusters(&set) {
            return failed(
                format!("{e}; the policies that need new clusters were not written"),
                decided,
            );
        }
        commit.clusters_dropped = dropped;
    }
    if let Err(e) = shared.store.commit(&commit) {
        return failed(e.to_string(), decided);
    }
    {
        let mut table = shared.table();
        table.drop_clusters(&commit.clusters_dropped);
        let writes = applied
            .into_iter()
            .map(|(mut a, clusters)| {
                a.entry.clusters = clusters.into_iter().map(Arc::from).collect();
                a
            })
            .collect();
        table.apply(commit.seq, writes, commit.clusters_added);
    }
    shared.published.send_replace(commit.seq);
    for d in decided {
        let _ = d.reply.send(d.answer);
    }
}

impl std::fmt::Display for WriteRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteRefused::Stale { current: Some(r) } => {
                write!(f, "stale: the domain is at revision {r}")
            }
            WriteRefused::Stale { current: None } => f.write_str("stale: the domain has no policy"),
            WriteRefused::NotFound => f.write_str("the domain has no policy"),
            WriteRefused::Failed(why) | WriteRefused::StoreUnavailable(why) => f.write_str(why),
        }
    }
}

impl From<ControlError> for WriteRefused {
    fn from(e: ControlError) -> Self {
        WriteRefused::Failed(e.to_string())
    }
}

/// One write etcd committed, as a replica applies it (`serve --etcd`): its
/// revision with `seq` the key's mod_revision, and the cluster units its
/// policy needs under this replica's settings.
#[derive(Debug, Clone)]
pub struct Replicated {
    pub put: Put,
    pub units: Vec<ClusterUnit>,
}

/// Applies writes committed to etcd, in the order of their revisions, as the
/// writer applies its own batch: the clusters they newly need to Envoy first
/// (make before break), then the local commit, the table, the feed.
/// `through`: the revision they bring this replica to (past the last write
/// when later ones were skipped). `keep_retired`: no cluster is dropped with
/// this batch (a full resync, whose Envoys still run the policies it
/// replaces).
pub fn apply_replicated(
    shared: &Shared,
    writes: Vec<Replicated>,
    through: u64,
    keep_retired: bool,
) -> Result<(), ControlError> {
    let seq = writes.iter().map(|w| w.put.seq).fold(through, u64::max);
    let mut commit = Commit::default();
    let mut applied = Vec::with_capacity(writes.len());
    let (dropped, cluster_set) = {
        let table = shared.table();
        commit.seq = seq.max(table.seq);
        for write in writes {
            for (name, json) in &write.units {
                let known =
                    table.has_cluster(name) || commit.clusters_added.iter().any(|(n, _)| n == name);
                if !known {
                    commit.clusters_added.push((name.clone(), json.to_string()));
                }
            }
            let put = Put {
                clusters: write.units.into_iter().map(|(n, _)| n).collect(),
                ..write.put
            };
            let entry = Current {
                revision: put.revision,
                seq: put.seq,
                removed: put.document.is_empty(),
                digest: fingerprint(put.document.as_bytes()),
                clusters: put.clusters.iter().map(|n| Arc::from(n.as_str())).collect(),
            };
            applied.push(Applied {
                domain: put.domain.clone(),
                entry,
            });
            commit.puts.push(put);
        }
        if commit.clusters_added.is_empty() {
            (Vec::new(), None)
        } else {
            let stable = shared.stable.load(std::sync::atomic::Ordering::Relaxed);
            let dropped = if !keep_retired && stable >= table.seq {
                table.retired()
            } else {
                Vec::new()
            };
            let set = table.cluster_set(&commit.clusters_added, &dropped);
            (dropped, Some(set))
        }
    };
    if let Some(set) = cluster_set {
        shared.envoy.clusters(&set)?;
        commit.clusters_dropped = dropped;
    }
    shared.store.commit(&commit)?;
    {
        let mut table = shared.table();
        table.drop_clusters(&commit.clusters_dropped);
        table.apply(commit.seq, applied, commit.clusters_added);
    }
    shared.published.send_replace(commit.seq);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(revision: u64, removed: bool, document: &str) -> Option<Known> {
        Some(Known {
            revision,
            removed,
            digest: fingerprint(document.as_bytes()),
        })
    }

    #[test]
    fn a_write_is_decided_against_the_current_revision() {
        let doc = "{\"domain\":\"a.example\"}";
        let other = "{\"domain\":\"a.example\",\"x\":1}";
        assert_eq!(
            decide(Precondition::None, doc, None),
            Ok(Decision::Write { revision: 1 })
        );
        assert_eq!(
            decide(Precondition::None, doc, known(3, false, doc)),
            Ok(Decision::Unchanged { revision: 3 })
        );
        assert_eq!(
            decide(Precondition::None, other, known(3, false, doc)),
            Ok(Decision::Write { revision: 4 })
        );
        // A removed domain written again counts on from its removal.
        assert_eq!(
            decide(Precondition::None, doc, known(4, true, "")),
            Ok(Decision::Write { revision: 5 })
        );
        assert_eq!(
            decide(Precondition::Revision(2), other, known(3, false, doc)),
            Err(WriteRefused::Stale { current: Some(3) })
        );
        assert_eq!(
            decide(Precondition::Revision(3), other, known(3, false, doc)),
            Ok(Decision::Write { revision: 4 })
        );
        assert_eq!(
            decide(Precondition::Absent, doc, known(3, false, doc)),
            Err(WriteRefused::Stale { current: Some(3) })
        );
        assert_eq!(
            decide(Precondition::Absent, doc, known(4, true, "")),
            Ok(Decision::Write { revision: 5 })
        );
        assert_eq!(
            decide(Precondition::Revision(4), doc, known(4, true, "")),
            Err(WriteRefused::Stale { current: None })
        );
        assert_eq!(
            decide(Precondition::None, "", None),
            Err(WriteRefused::NotFound)
        );
        assert_eq!(
            decide(Precondition::None, "", known(4, true, "")),
            Err(WriteRefused::NotFound)
        );
        assert_eq!(
            decide(Precondition::None, "", known(3, false, doc)),
            Ok(Decision::Write { revision: 4 })
        );
    }
}
