//! Every domain's current revision in memory, ordered by the sequence number
//! it was written at, and the feed's pages computed from it: what a node at
//! version `since` lacks to be at version `target`. Documents stay in the
//! store; memory holds names and numbers only (about 150 bytes a domain).
//!
//! A page lists the domains whose policy differs between the two versions,
//! each with its document as of `target` (empty: removed then). A domain
//! differs exactly when it has a revision written between the two, and every
//! such domain's current revision is later than the lower of them; so the
//! candidates are the domains written after it, in write order, which is also
//! the order a page's cursor continues from. `target` below `since` (a held
//! canary going back to the stable version) is the same walk.

use crate::error::ControlError;
use crate::store::{CurrentEntry, Store};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

/// Versions with this bit are page cursors, not sequence numbers.
pub const CURSOR_BIT: u64 = 1 << 62;
/// Cursors remembered for nodes paging through a long answer.
const CURSORS_KEPT: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub revision: u64,
    pub seq: u64,
    pub removed: bool,
    /// The document's fingerprint: an unchanged write is not a new revision.
    pub digest: u64,
    pub clusters: Box<[Arc<str>]>,
}

/// A cluster unit (one cluster, or a forward-proxy class's shards).
#[derive(Debug, Clone)]
struct ClusterEntry {
    /// Each cluster's JSON.
    parts: Box<[Arc<str>]>,
    users: u32,
}

impl ClusterEntry {
    fn new(json: &str) -> Self {
        let parts = match serde_json::from_str::<serde_json::Value>(json) {
            Ok(serde_json::Value::Array(list)) => {
                list.iter().map(|c| Arc::from(c.to_string())).collect()
            }
            _ => Box::new([Arc::from(json)]) as Box<[Arc<str>]>,
        };
        ClusterEntry { parts, users: 0 }
    }
}

#[derive(Debug, Clone)]
struct Cursor {
    /// The version the node had before its first page.
    base: u64,
    /// The last write examined: (seq, domain).
    position: (u64, Arc<str>),
}

/// One answer to `GET /changes`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FeedPage {
    pub body: String,
    pub version: u64,
    pub epoch: u64,
    pub more: bool,
    pub reset: bool,
    pub entries: usize,
}

#[derive(Debug)]
pub struct DomainTable {
    pub epoch: u64,
    /// The last sequence number committed.
    pub seq: u64,
    current: HashMap<Arc<str>, Current>,
    /// (seq, domain): a seq names one write of ours, but a domain removed
    /// by a full resync of a replica shares the resync's seq with others.
    by_seq: BTreeSet<(u64, Arc<str>)>,
    clusters: HashMap<Arc<str>, ClusterEntry>,
    /// Clusters no domain needs any more, sent once more so that requests
    /// still running on an older policy keep theirs; dropped at the next
    /// change of the cluster set.
    retired: Vec<Arc<str>>,
    cursors: BTreeMap<u64, Cursor>,
    next_cursor: u64,
    live: usize,
}

/// What a write does to the table, decided before it is committed.
#[derive(Debug, Clone)]
pub struct Applied {
    pub domain: String,
    pub entry: Current,
}

impl DomainTable {
    pub fn new(epoch: u64) -> Self {
        DomainTable {
            epoch,
            seq: 0,
            current: HashMap::new(),
            by_seq: BTreeSet::new(),
            clusters: HashMap::new(),
            retired: Vec::new(),
            cursors: BTreeMap::new(),
            next_cursor: 0,
            live: 0,
        }
    }

    /// The table as the store holds it.
    pub fn from_store(
        epoch: u64,
        seq: u64,
        domains: Vec<CurrentEntry>,
        clusters: Vec<(String, String)>,
    ) -> Self {
        let mut table = DomainTable::new(epoch);
        table.seq = seq;
        for (name, json) in clusters {
            table
                .clusters
                .insert(Arc::from(name), ClusterEntry::new(&json));
        }
        for entry in domains {
            let clusters: Box<[Arc<str>]> = entry
                .clusters
                .iter()
                .map(|name| table.cluster_name(name))
                .collect();
            let current = Current {
                revision: entry.revision,
                seq: entry.seq,
                removed: entry.removed,
                digest: entry.digest,
                clusters,
            };
            table.insert(Arc::from(entry.domain), current);
        }
        // Clusters nobody names (a crash between two writes) go with the next change.
        table.retired = table
            .clusters
            .iter()
            .filter(|(_, c)| c.users == 0)
            .map(|(n, _)| n.clone())
            .collect();
        table
    }

    fn cluster_name(&self, name: &str) -> Arc<str> {
        self.clusters
            .get_key_value(name)
            .map_or_else(|| Arc::from(name), |(k, _)| k.clone())
    }

    fn insert(&mut self, domain: Arc<str>, entry: Current) {
        if let Some(old) = self.current.remove(&domain) {
            self.by_seq.remove(&(old.seq, domain.clone()));
            self.live -= usize::from(!old.removed);
            for name in old.clusters.iter() {
                if let Some(c) = self.clusters.get_mut(name) {
                    c.users = c.users.saturating_sub(1);
                    if c.users == 0 {
                        self.retired.push(name.clone());
                    }
                }
            }
        }
        for name in entry.clusters.iter() {
            if let Some(c) = self.clusters.get_mut(name) {
                c.users += 1;
            }
        }
        self.live += usize::from(!entry.removed);
        self.by_seq.insert((entry.seq, domain.clone()));
        self.current.insert(domain, entry);
    }

    pub fn get(&self, domain: &str) -> Option<&Current> {
        self.current.get(domain)
    }

    /// Domains with a policy.
    pub fn live(&self) -> usize {
        self.live
    }

    pub fn has_cluster(&self, name: &str) -> bool {
        self.clusters.contains_key(name)
    }

    /// Applies committed writes and clusters added with them.
    pub fn apply(&mut self, seq: u64, writes: Vec<Applied>, added: Vec<(String, String)>) {
        for (name, json) in added {
            self.clusters
                .insert(Arc::from(name), ClusterEntry::new(&json));
        }
        for write in writes {
            let clusters: Box<[Arc<str>]> = write
                .entry
                .clusters
                .iter()
                .map(|n| self.cluster_name(n))
                .collect();
            let entry = Current {
                clusters,
                ..write.entry
            };
            self.insert(Arc::from(write.domain), entry);
        }
        self.retired
            .retain(|n| self.clusters.get(n).is_some_and(|c| c.users == 0));
        self.seq = seq;
    }

    /// The retired clusters, to drop at this change of the cluster set.
    pub fn retired(&self) -> Vec<String> {
        self.retired
            .iter()
            .filter(|n| self.clusters.get(*n).is_some_and(|c| c.users == 0))
            .map(|n| n.to_string())
            .collect()
    }

    /// Forgets clusters Envoy no longer has.
    pub fn drop_clusters(&mut self, names: &[String]) {
        for name in names {
            if self
                .clusters
                .get(name.as_str())
                .is_some_and(|c| c.users == 0)
            {
                self.clusters.remove(name.as_str());
            }
        }
    }

    /// Every cluster, re-derived under new settings: the same names with
    /// their new JSON.
    pub fn replace_clusters(&mut self, clusters: Vec<(String, String)>) {
        for (name, json) in clusters {
            match self.clusters.get_mut(name.as_str()) {
                Some(entry) => {
                    let users = entry.users;
                    *entry = ClusterEntry::new(&json);
                    entry.users = users;
                }
                None => {
                    self.clusters
                        .insert(Arc::from(name), ClusterEntry::new(&json));
                }
            }
        }
    }

    /// Every cluster, as Envoy JSON.
    pub fn clusters(&self) -> Vec<Arc<str>> {
        self.cluster_set(&[], &[])
    }

    /// Live domains and their current revision, for a full re-check.
    pub fn live_domains(&self) -> Vec<(String, u64)> {
        self.current
            .iter()
            .filter(|(_, c)| !c.removed)
            .map(|(d, c)| (d.to_string(), c.revision))
            .collect()
    }

    /// Every cluster Envoy should have, with `extra` units (about to be
    /// added) and without the `dropped` ones.
    pub fn cluster_set(&self, extra: &[(String, String)], dropped: &[String]) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = self
            .clusters
            .iter()
            .filter(|(name, _)| !dropped.iter().any(|d| d.as_str() == name.as_ref()))
            .flat_map(|(_, c)| c.parts.iter().cloned())
            .collect();
        for (_, json) in extra {
            out.extend(ClusterEntry::new(json).parts.iter().cloned());
        }
        out
    }

    fn cursor(&mut self, base: u64, position: (u64, Arc<str>)) -> u64 {
        self.next_cursor = (self.next_cursor + 1) % CURSOR_BIT;
        let token = CURSOR_BIT | self.next_cursor;
        self.cursors.insert(token, Cursor { base, position });
        while self.cursors.len() > CURSORS_KEPT {
            self.cursors.pop_first();
        }
        token
    }

    /// What a node polling from `since` in `epoch` that should be at
    /// `target` gets: at most `max` domains. Decided under the table's lock;
    /// the documents are read after it with [`PagePlan::render`] (a revision
    /// never changes once written).
    pub fn plan(
        &mut self,
        store: &Store,
        since: u64,
        epoch: Option<u64>,
        target: u64,
        max: usize,
    ) -> Result<PagePlan, ControlError> {
        let target = target.min(self.seq);
        let resumed = (since & CURSOR_BIT != 0)
            .then(|| self.cursors.get(&since).cloned())
            .flatten();
        let (base, reset) = match resumed {
            _ if epoch != Some(self.epoch) => (0, true),
            Some(ref c) => (c.base, false),
            None if since & CURSOR_BIT != 0 || since > self.seq => (0, true),
            None => (since, false),
        };
        // A resumed snapshot is a snapshot still: no removals.
        let snapshot = reset || (resumed.is_some() && base == 0);
        let (low, high) = (base.min(target), base.max(target));
        let start = match resumed.filter(|_| !reset) {
            Some(c) => Bound::Excluded(c.position),
            None => Bound::Included((low.saturating_add(1), Arc::from(""))),
        };
        let mut plan = PagePlan {
            page: FeedPage {
                epoch: self.epoch,
                reset,
                ..FeedPage::default()
            },
            wanted: Vec::new(),
        };
        let mut last = (low, Arc::from(""));
        for (seq, domain) in self.by_seq.range((start, Bound::Unbounded)) {
            if plan.wanted.len() == max {
                plan.page.more = true;
                break;
            }
            last = (*seq, domain.clone());
            let Some(current) = self.current.get(domain) else {
                continue;
            };
            // The revision at `high`, and whether it is after `low`.
            let at_high = if current.seq <= high {
                Some((current.seq, current.revision, current.removed))
            } else {
                store
                    .as_of(domain, high)?
                    .map(|r| (r.seq, r.revision, r.document.is_empty()))
            };
            let Some((seq_high, revision_high, removed_high)) = at_high else {
                continue;
            };
            if seq_high <= low {
                continue;
            }
            let at_target = if target == high {
                (!removed_high).then_some(revision_high)
            } else {
                store
                    .as_of(domain, target)?
                    .filter(|r| !r.document.is_empty())
                    .map(|r| r.revision)
            };
            if snapshot && at_target.is_none() {
                continue;
            }
            plan.wanted.push((domain.clone(), at_target));
        }
        plan.page.entries = plan.wanted.len();
        plan.page.version = if plan.page.more {
            self.cursor(base, last)
        } else {
            target
        };
        Ok(plan)
    }
}

/// A page decided: its domains and the revision of each to send (`None`: removed).
#[derive(Debug)]
pub struct PagePlan {
    pub page: FeedPage,
    wanted: Vec<(Arc<str>, Option<u64>)>,
}

impl PagePlan {
    /// The page with its documents, `DOMAIN<TAB>DOCUMENT` per line.
    pub fn render(mut self, store: &Store) -> Result<FeedPage, ControlError> {
        let reads: Vec<(&str, u64)> = self
            .wanted
            .iter()
            .filter_map(|(d, r)| r.map(|r| (d.as_ref(), r)))
            .collect();
        let mut documents = store.documents(&reads)?.into_iter();
        let body = &mut self.page.body;
        for (domain, revision) in &self.wanted {
            body.push_str(domain);
            body.push('\t');
            if revision.is_some() {
                body.push_str(&documents.next().unwrap_or_default());
            }
            body.push('\n');
        }
        Ok(self.page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Commit, Put};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        table: DomainTable,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
            let store = Store::open(dir.path()).unwrap_or_else(|e| unreachable!("{e}"));
            Fixture {
                _dir: dir,
                store,
                table: DomainTable::new(7),
            }
        }

        /// Writes `domain` (empty document: removes it).
        fn write(&mut self, domain: &str, document: &str) {
            let seq = self.table.seq + 1;
            let revision = self.table.get(domain).map_or(1, |c| c.revision + 1);
            let put = Put {
                domain: domain.to_owned(),
                revision,
                seq,
                at_ms: 0,
                source: "test".to_owned(),
                document: document.to_owned(),
                clusters: Vec::new(),
            };
            let commit = Commit {
                puts: vec![put],
                seq,
                ..Commit::default()
            };
            self.store
                .commit(&commit)
                .unwrap_or_else(|e| unreachable!("{e}"));
            let entry = Current {
                revision,
                seq,
                removed: document.is_empty(),
                digest: 0,
                clusters: Box::new([]),
            };
            let applied = Applied {
                domain: domain.to_owned(),
                entry,
            };
            self.table.apply(seq, vec![applied], Vec::new());
        }

        fn page_in(&mut self, since: u64, epoch: u64, target: u64, max: usize) -> FeedPage {
            self.table
                .plan(&self.store, since, Some(epoch), target, max)
                .and_then(|plan| plan.render(&self.store))
                .unwrap_or_else(|e| unreachable!("{e}"))
        }

        fn page(&mut self, since: u64, target: u64, max: usize) -> FeedPage {
            self.page_in(since, 7, target, max)
        }
    }

    fn lines(page: &FeedPage) -> Vec<&str> {
        page.body.lines().collect()
    }

    #[test]
    fn a_change_sends_that_domain_only() {
        let mut f = Fixture::new();
        for i in 0..5 {
            f.write(&format!("d{i}.example"), &format!("{{\"n\":{i}}}"));
        }
        let synced = f.page(0, 5, 100);
        assert!(!synced.reset && synced.entries == 5 && synced.version == 5);
        f.write("d3.example", "{\"n\":33}");
        let page = f.page(5, 6, 100);
        assert_eq!(lines(&page), vec!["d3.example\t{\"n\":33}"]);
        assert_eq!(page.version, 6);
        assert_eq!(f.page(6, 6, 100).entries, 0);
    }

    #[test]
    fn pages_continue_from_a_cursor_and_a_snapshot_has_no_removals() {
        let mut f = Fixture::new();
        for i in 0..5 {
            f.write(&format!("d{i}.example"), "{}");
        }
        f.write("d0.example", "");
        let first = f.page_in(0, 99, 6, 2);
        assert!(first.reset && first.more && first.version & CURSOR_BIT != 0);
        assert_eq!(lines(&first), vec!["d1.example\t{}", "d2.example\t{}"]);
        // A write between two pages is sent with the later one.
        f.write("d1.example", "{\"again\":1}");
        let second = f.page(first.version, 7, 10);
        assert!(!second.more && !second.reset && second.version == 7);
        assert_eq!(
            lines(&second),
            vec![
                "d3.example\t{}",
                "d4.example\t{}",
                "d1.example\t{\"again\":1}"
            ]
        );
        let removal = f.page(5, 6, 10);
        assert_eq!(lines(&removal), vec!["d0.example\t"]);
    }

    #[test]
    fn a_node_held_at_an_older_version_gets_that_version_and_goes_back_to_it() {
        let mut f = Fixture::new();
        f.write("a.example", "{\"v\":1}"); // 1
        f.write("b.example", "{\"v\":1}"); // 2
        f.write("a.example", "{\"v\":2}"); // 3
        f.write("c.example", "{\"v\":1}"); // 4
                                           // A node at 1 whose target is 2 (the stable version): a's first revision
                                           // it has; b it lacks; nothing written after 2.
        assert_eq!(lines(&f.page(1, 2, 10)), vec!["b.example\t{\"v\":1}"]);
        // A snapshot as of 2, although a and b were written again since.
        let snapshot = f.page(0, 2, 10);
        assert_eq!(
            lines(&snapshot),
            vec!["b.example\t{\"v\":1}", "a.example\t{\"v\":1}"]
        );
        // A canary at 4 sent back to 2: a as it was, c removed.
        let back = f.page(4, 2, 10);
        assert_eq!(back.version, 2);
        assert_eq!(lines(&back), vec!["a.example\t{\"v\":1}", "c.example\t"]);
    }
}
