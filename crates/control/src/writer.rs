//! The one writer: writes queue up while a commit is on disk and go together
//! in the next transaction (group commit), so a durable commit per write does
//! not cap the write rate at the disk's fsyncs per second. For each batch:
//! the clusters it newly needs go to Envoy first (make before break), then
//! the commit, then the feed publishes it, then every writer is answered.

use crate::envoy::EnvoyConfig;
use crate::error::ControlError;
use crate::store::{Commit, Put, Store};
use crate::table::{Applied, Current, DomainTable};
use crate::validate::ValidPolicy;
use origin_policy_engine::fingerprint;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
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

    /// Queues a write; the answer comes once it is on disk and published.
    pub async fn write(&self, request: WriteRequest) -> Result<WriteOutcome, WriteRefused> {
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
            let live = known.filter(|k| !k.1);
            let stale = match request.precondition {
                Precondition::None => false,
                Precondition::Revision(r) => live.map(|k| k.0) != Some(r),
                Precondition::Absent => live.is_some(),
            };
            let answer = if stale {
                Err(WriteRefused::Stale {
                    current: live.map(|k| k.0),
                })
            } else if request.policy.is_none() && live.is_none() {
                Err(WriteRefused::NotFound)
            } else {
                let document = request
                    .policy
                    .as_ref()
                    .map_or(String::new(), |p| p.document.clone());
                let digest = fingerprint(document.as_bytes());
                match live {
                    Some((revision, _, d)) if d == digest && !document.is_empty() => {
                        Ok(WriteOutcome::Unchanged {
                            revision,
                            seq: table.seq,
                        })
                    }
                    _ => {
                        seq += 1;
                        let revision = known.map_or(1, |k| k.0 + 1);
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
            WriteRefused::Failed(why) => f.write_str(why),
        }
    }
}

impl From<ControlError> for WriteRefused {
    fn from(e: ControlError) -> Self {
        WriteRefused::Failed(e.to_string())
    }
}
