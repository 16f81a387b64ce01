//! The durable store: every domain's current policy, each of its revisions
//! and the origin clusters the current ones need, in one redb file. A write is
//! acknowledged only once its transaction is committed with
//! `Durability::Immediate` (on disk); writes that arrive together share one
//! commit (see [`crate::writer`]).

use crate::error::ControlError;
use origin_policy_engine::fingerprint;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

/// Domain -> (revision, seq, the document's fingerprint, removed, cluster
/// names as a JSON array, source). No document: a start scans this table
/// whole, and it stays small (the documents are in `history`). A removal is
/// kept so that revisions keep counting.
const CURRENT: TableDefinition<&str, (u64, u64, u64, bool, &str, &str)> =
    TableDefinition::new("current");
/// (domain, revision) -> (seq, written at in ms since the epoch, source, document).
const HISTORY: TableDefinition<(&str, u64), (u64, u64, &str, &str)> =
    TableDefinition::new("history");
/// Cluster name -> the cluster as Envoy JSON.
const CLUSTERS: TableDefinition<&str, &str> = TableDefinition::new("clusters");
/// A watched file as last taken: path -> (size, modified in ns since the
/// epoch, its domain). A restarted server checks only the files that changed.
const WATCHED: TableDefinition<&str, (u64, u64, &str)> = TableDefinition::new("watched");
/// `epoch`, `seq` and `settings`.
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// redb's page cache.
const CACHE_BYTES: usize = 64 << 20;

/// One revision of a domain's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub revision: u64,
    /// The store's sequence number when it was written: the feed's version.
    pub seq: u64,
    pub at_ms: u64,
    /// Who wrote it: `api`, `import`, `watch:FILE`, `rollback:N`.
    pub source: String,
    /// Empty: the domain was removed.
    pub document: String,
}

/// A domain's current state, as kept in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentEntry {
    pub domain: String,
    pub revision: u64,
    pub seq: u64,
    pub removed: bool,
    /// The document's fingerprint.
    pub digest: u64,
    pub clusters: Vec<String>,
    pub source: String,
}

/// One domain's new revision, ready to commit.
#[derive(Debug, Clone)]
pub struct Put {
    pub domain: String,
    pub revision: u64,
    pub seq: u64,
    pub at_ms: u64,
    pub source: String,
    pub document: String,
    pub clusters: Vec<String>,
}

/// What a commit does besides the domains: clusters added or dropped.
#[derive(Debug, Default)]
pub struct Commit {
    pub puts: Vec<Put>,
    pub clusters_added: Vec<(String, String)>,
    pub clusters_dropped: Vec<String>,
    pub seq: u64,
}

/// Everything the server needs in memory at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub epoch: Option<u64>,
    pub seq: u64,
    pub settings: Option<String>,
    /// The rollout's stable version (`serve --canary`).
    pub stable: Option<u64>,
    pub domains: Vec<CurrentEntry>,
    pub clusters: Vec<(String, String)>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

fn failed(path: &Path, e: impl std::fmt::Display) -> ControlError {
    ControlError::Store(format!("{}: {e}", path.display()))
}

impl Store {
    /// Opens (or creates) `dir/policies.redb`.
    pub fn open(dir: &Path) -> Result<Store, ControlError> {
        std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
        let path = dir.join("policies.redb");
        // redb caches up to 1 GiB by default; the documents a feed page
        // reads are small and the OS's page cache keeps the file, so the
        // server's own memory stays small at 1,000,000 domains.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| failed(&path, e))?;
        let store = Store { db, path };
        // Tables exist from the first start on, so reads never meet a missing one.
        let txn = store.begin_write()?;
        {
            txn.open_table(CURRENT).map_err(|e| store.err(e))?;
            txn.open_table(HISTORY).map_err(|e| store.err(e))?;
            txn.open_table(CLUSTERS).map_err(|e| store.err(e))?;
            txn.open_table(META).map_err(|e| store.err(e))?;
            txn.open_table(WATCHED).map_err(|e| store.err(e))?;
        }
        txn.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    /// Every write transaction with quick repair: its commit also writes the
    /// allocator state, so the file opens at once after a crash (a full
    /// repair walks the whole file: 6 s at 1,000,000 domains, bench/store).
    fn begin_write(&self) -> Result<redb::WriteTransaction, ControlError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_quick_repair(true);
        Ok(txn)
    }

    fn err(&self, e: impl std::fmt::Display) -> ControlError {
        failed(&self.path, e)
    }

    pub fn load(&self) -> Result<Loaded, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let text = |key: &str| -> Result<Option<String>, ControlError> {
            Ok(meta
                .get(key)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_owned()))
        };
        let mut loaded = Loaded {
            epoch: text("epoch")?.and_then(|v| v.parse().ok()),
            seq: text("seq")?.and_then(|v| v.parse().ok()).unwrap_or(0),
            settings: text("settings")?,
            stable: text("stable")?.and_then(|v| v.parse().ok()),
            ..Loaded::default()
        };
        let current = txn.open_table(CURRENT).map_err(|e| self.err(e))?;
        for row in current.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let (revision, seq, digest, removed, clusters, source) = value.value();
            let clusters: Vec<String> = serde_json::from_str(clusters).unwrap_or_default();
            loaded.domains.push(CurrentEntry {
                domain: key.value().to_owned(),
                revision,
                seq,
                removed,
                digest,
                clusters,
                source: source.to_owned(),
            });
        }
        let clusters = txn.open_table(CLUSTERS).map_err(|e| self.err(e))?;
        for row in clusters.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            loaded
                .clusters
                .push((key.value().to_owned(), value.value().to_owned()));
        }
        Ok(loaded)
    }

    pub fn save_meta(&self, key: &str, value: &str) -> Result<(), ControlError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert(key, value).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Commits every put in one durable transaction.
    pub fn commit(&self, commit: &Commit) -> Result<(), ControlError> {
        let txn = self.begin_write()?;
        {
            let mut current = txn.open_table(CURRENT).map_err(|e| self.err(e))?;
            let mut history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
            for put in &commit.puts {
                let clusters = serde_json::to_string(&put.clusters).unwrap_or_default();
                current
                    .insert(
                        put.domain.as_str(),
                        (
                            put.revision,
                            put.seq,
                            fingerprint(put.document.as_bytes()),
                            put.document.is_empty(),
                            clusters.as_str(),
                            put.source.as_str(),
                        ),
                    )
                    .map_err(|e| self.err(e))?;
                history
                    .insert(
                        (put.domain.as_str(), put.revision),
                        (
                            put.seq,
                            put.at_ms,
                            put.source.as_str(),
                            put.document.as_str(),
                        ),
                    )
                    .map_err(|e| self.err(e))?;
            }
            let mut clusters = txn.open_table(CLUSTERS).map_err(|e| self.err(e))?;
            for (name, json) in &commit.clusters_added {
                clusters
                    .insert(name.as_str(), json.as_str())
                    .map_err(|e| self.err(e))?;
            }
            for name in &commit.clusters_dropped {
                clusters.remove(name.as_str()).map_err(|e| self.err(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("seq", commit.seq.to_string().as_str())
                .map_err(|e| self.err(e))?;
        }
        // redb's default durability is Immediate: committed means on disk.
        txn.commit().map_err(|e| self.err(e))
    }

    /// Forgets every domain and its history, and takes `epoch`: a replica
    /// whose cache is of another etcd cluster (`serve --etcd`) syncs again
    /// from nothing. The clusters stay, for Envoys still running them.
    pub fn clear_domains(&self, epoch: u64) -> Result<(), ControlError> {
        let txn = self.begin_write()?;
        {
            let mut current = txn.open_table(CURRENT).map_err(|e| self.err(e))?;
            current.retain(|_, _| false).map_err(|e| self.err(e))?;
            let mut history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
            history.retain(|_, _| false).map_err(|e| self.err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("seq", "0").map_err(|e| self.err(e))?;
            meta.insert("epoch", epoch.to_string().as_str())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The cluster table, replaced whole (the settings changed).
    pub fn replace_clusters(&self, clusters: &[(String, String)]) -> Result<(), ControlError> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(CLUSTERS).map_err(|e| self.err(e))?;
            table.retain(|_, _| false).map_err(|e| self.err(e))?;
            for (name, json) in clusters {
                table
                    .insert(name.as_str(), json.as_str())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The watched files as last taken: (path, size, modified ns, domain).
    pub fn watched(&self) -> Result<Vec<(String, u64, u64, String)>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(WATCHED).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let (size, modified, domain) = value.value();
            out.push((key.value().to_owned(), size, modified, domain.to_owned()));
        }
        Ok(out)
    }

    /// Records watched files taken (path, size, modified ns, domain) and gone.
    pub fn save_watched(
        &self,
        taken: &[(String, u64, u64, String)],
        gone: &[String],
    ) -> Result<(), ControlError> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(WATCHED).map_err(|e| self.err(e))?;
            for (path, size, modified, domain) in taken {
                table
                    .insert(path.as_str(), (*size, *modified, domain.as_str()))
                    .map_err(|e| self.err(e))?;
            }
            for path in gone {
                table.remove(path.as_str()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Every revision of `domain`, oldest first.
    pub fn history(&self, domain: &str) -> Result<Vec<Revision>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in history
            .range((domain, 0)..=(domain, u64::MAX))
            .map_err(|e| self.err(e))?
        {
            let (key, value) = row.map_err(|e| self.err(e))?;
            out.push(revision_of(key.value().1, value.value()));
        }
        Ok(out)
    }

    pub fn revision(&self, domain: &str, revision: u64) -> Result<Option<Revision>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
        let found = history
            .get((domain, revision))
            .map_err(|e| self.err(e))?
            .map(|v| revision_of(revision, v.value()));
        Ok(found)
    }

    /// The revision of `domain` that was current at `seq`, if any.
    pub fn as_of(&self, domain: &str, seq: u64) -> Result<Option<Revision>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
        for row in history
            .range((domain, 0)..=(domain, u64::MAX))
            .map_err(|e| self.err(e))?
            .rev()
        {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let found = revision_of(key.value().1, value.value());
            if found.seq <= seq {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Documents of many domains in one read transaction: `(domain, revision)`.
    pub fn documents(&self, wanted: &[(&str, u64)]) -> Result<Vec<String>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let history = txn.open_table(HISTORY).map_err(|e| self.err(e))?;
        wanted
            .iter()
            .map(|&(domain, revision)| {
                Ok(history
                    .get((domain, revision))
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value().3.to_owned())
                    .unwrap_or_default())
            })
            .collect()
    }

    /// Domains in name order after `after`, at most `limit`: `(domain, revision)`.
    pub fn list(&self, after: &str, limit: usize) -> Result<Vec<(String, u64)>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let current = txn.open_table(CURRENT).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let rows = current.range(after..).map_err(|e| self.err(e))?;
        for row in rows {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let (revision, _, _, removed, _, _) = value.value();
            if key.value() == after || removed {
                continue;
            }
            out.push((key.value().to_owned(), revision));
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }
}

fn revision_of(revision: u64, (seq, at_ms, source, document): (u64, u64, &str, &str)) -> Revision {
    Revision {
        revision,
        seq,
        at_ms,
        source: source.to_owned(),
        document: document.to_owned(),
    }
}
