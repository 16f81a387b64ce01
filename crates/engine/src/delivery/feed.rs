//! Per-domain delivery: policies arrive one domain at a time from a change
//! feed. On Envoy's main thread a singleton pages the feed into the process's
//! shared data, one entry per domain, after validating each policy
//! ([`FeedSync`]); each worker reads the entry of a request's domain and
//! compiles it on first use, keeping it while the entry is unchanged
//! ([`DomainEntries`]). A push then costs one entry, however many are loaded.
//! The singleton counts its writes ([`CHANGES_KEY`]) and wakes every worker
//! through the worker's own shared queue ([`WORKERS_KEY`]); a worker reads
//! the count when woken (and on its tick, should a wake be lost) and answers
//! a host it has looked up since the last change from memory, with no
//! shared-data read per request.
//!
//! Pure: the filter supplies the shared-data reads and writes.
//!
//! The feed, over HTTP/1.1: `GET /changes?since=VERSION&epoch=EPOCH` answers
//! `200` with one line per changed domain, `DOMAIN \t DOCUMENT` (the policy's
//! compact JSON; an empty document removes the domain), and the headers
//! [`VERSION_HEADER`] (the version this page brings the reader to),
//! [`EPOCH_HEADER`], [`MORE_HEADER`] (another page follows at once) and
//! [`RESET_HEADER`] (this page starts a snapshot: every domain not listed
//! before the last page is removed). `204` says nothing changed within the
//! source's long-poll wait.

use crate::compile::compiled::CompiledPolicy;
use crate::compile::index::MatchKind;
use crate::policy::admission::check_policy_origins;
use crate::policy::diagnostic::{PolicyDiagnostic, Severity};
use crate::policy::json::{document_fingerprint, parse_json};
use crate::policy::parse::parse_policy;
use crate::policy::settings::Settings;
use crate::policy::Policy;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// The shared-data key of a domain's entry: the prefix, then the policy's
/// domain as written in it (`www.example.com`, `*.example.com`).
pub const ENTRY_KEY_PREFIX: &str = "origin-policy.domain/";
/// Where the singleton says whether the edge has its policies yet: `ready`,
/// or `waiting: WHY` until the first sync is complete.
pub const FEED_STATE_KEY: &str = "origin-policy.feed.state";
/// How many times the singleton has written entries or the state: a worker
/// that reads the same count twice knows that nothing it looked up in
/// between has changed. Decimal text.
pub const CHANGES_KEY: &str = "origin-policy.feed.changes";
/// The workers the singleton wakes after each change: one line per worker,
/// `QUEUE_NAME BEAT_MS`, the name of the shared queue the worker registered
/// and when it last said it was alive (Envoy's clock, ms since the epoch).
/// Envoy keys a queue by vm_id and name and delivers it to the one context
/// that registered that name last, so each worker has a queue of its own.
pub const WORKERS_KEY: &str = "origin-policy.feed.workers";
/// The prefix of a worker's queue name; a number unique in the process follows.
pub const WAKE_QUEUE_PREFIX: &str = "origin-policy.feed.wake/";
/// A worker beats every second (its tick); one silent this long is gone (a
/// VM replaced by a new module, or the VM Envoy checks a configuration in),
/// and is neither woken nor kept in the list.
pub const WORKER_STALE_MS: u64 = 10_000;
/// A removed domain's entry (shared data has no delete in ABI 0.2): never a
/// JSON document, so never mistaken for one.
pub const REMOVED_ENTRY: &[u8] = b"-";

pub const VERSION_HEADER: &str = "x-feed-version";
pub const EPOCH_HEADER: &str = "x-feed-epoch";
pub const MORE_HEADER: &str = "x-feed-more";
pub const RESET_HEADER: &str = "x-feed-reset";

/// Sent by the singleton with each poll: the Envoy's node id, so that a
/// source can keep per-Envoy versions (a poll from version V acknowledges
/// everything up to V).
pub const NODE_HEADER: &str = "x-feed-node";
/// Sent by the singleton with the poll after a page: the domains whose policy
/// it refused (the negative acknowledgement, per domain), comma-separated,
/// each as [`report_item`] writes it.
pub const REJECTED_HEADER: &str = "x-feed-rejected";
/// Sent with the poll after a page that had lines the singleton could not
/// read: their line numbers in that page (the page that answered the poll
/// whose `since` this one repeats), comma-separated.
pub const MALFORMED_HEADER: &str = "x-feed-malformed";
/// Sent with the poll after a snapshot whose removals the singleton refused
/// ([`RemovalLimit`]): `REMOVED/DOMAINS`, what the snapshot would have
/// removed out of the domains the edge had.
pub const SNAPSHOT_REFUSED_HEADER: &str = "x-feed-snapshot-refused";
/// At most this many items are named in one report; the rest are counted.
const MAX_REPORTED: usize = 100;

/// A domain as a report names it: printable ASCII as is, every other byte
/// (and `%`, `,`, space) as `%XX`, so that a name the singleton refused for
/// not being ASCII is named back too.
pub fn report_item(domain: &str) -> String {
    let mut out = String::with_capacity(domain.len());
    for b in domain.bytes() {
        if b.is_ascii_graphic() && b != b'%' && b != b',' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A report's value for `items`: at most [`MAX_REPORTED`] named, then
/// `+N more`.
fn report(items: impl Iterator<Item = String>) -> Option<String> {
    let mut named: Vec<String> = items.filter(|i| !i.is_empty()).collect();
    if named.is_empty() {
        return None;
    }
    let more = named.len().saturating_sub(MAX_REPORTED);
    named.truncate(MAX_REPORTED);
    let mut value = named.join(",");
    if more > 0 {
        value.push_str(&format!(",+{more} more"));
    }
    Some(value)
}

/// The [`REJECTED_HEADER`] value for `domains`.
pub fn rejected_report(domains: &[String]) -> Option<String> {
    report(domains.iter().map(|d| report_item(d)))
}

/// The [`MALFORMED_HEADER`] value for a page's unreadable lines.
pub fn malformed_report(lines: &[MalformedLine]) -> Option<String> {
    report(lines.iter().map(|l| l.line.to_string()))
}

/// The items of a [`REJECTED_HEADER`] or [`MALFORMED_HEADER`] value, decoded;
/// the `+N more` count is not an item.
pub fn parse_report(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty() && !i.starts_with('+'))
        .map(percent_decoded)
        .collect()
}

fn percent_decoded(item: &str) -> String {
    let bytes = item.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How much of the edge a snapshot may remove. A snapshot removes every
/// domain it does not list, so a source that lost its data (or answers with
/// an empty set) would remove them all at once; past this share the
/// singleton keeps every domain, logs why and tells the source. A source
/// removes domains deliberately with empty documents, which are not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovalLimit {
    /// The most a snapshot may remove, in percent of the domains the edge
    /// has; 100 turns the guard off.
    pub percent: u8,
}

impl Default for RemovalLimit {
    fn default() -> Self {
        RemovalLimit { percent: 50 }
    }
}

/// A snapshot's removals refused by the [`RemovalLimit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRefused {
    pub removed: usize,
    pub domains: usize,
    pub limit: RemovalLimit,
}

impl SnapshotRefused {
    /// The [`SNAPSHOT_REFUSED_HEADER`] value.
    pub fn report(&self) -> String {
        format!("{}/{}", self.removed, self.domains)
    }
}

impl fmt::Display for SnapshotRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the source's snapshot would remove {} of the {} domains, more than \
             `max_snapshot_removal_percent` ({}%) allows: every domain is kept. \
             Remove domains with empty documents, or raise the limit",
            self.removed, self.domains, self.limit.percent
        )
    }
}

/// Where the filter publishes its configuration (`{"settings": ...,
/// "delivery": "feed"}`) for the singleton, which admits each policy under
/// the edge's `origin_networks` and `resolve` as the workers will: a source
/// that skips validation gets nothing past them.
pub const SETTINGS_KEY: &str = "origin-policy.settings";

/// The settings in a configuration published at [`SETTINGS_KEY`].
pub fn published_settings(value: &[u8]) -> Result<Settings, String> {
    let document = parse_json(value).map_err(|e| format!("not valid JSON: {e}"))?;
    crate::policy::settings::parse_settings("filter configuration", document.get("settings"))
        .map_err(|d| crate::Diagnostics(d).to_string())
}

/// The state value once the first sync is complete.
pub const READY_STATE: &str = "ready";

/// A worker keeps at most this many compiled policies; a domain dropped from
/// the cache is compiled again from its entry when next asked for.
pub const MAX_CACHED_POLICIES: usize = 16_384;
/// A worker remembers the answer for at most this many hosts (a viewer can
/// name any number under a wildcard); one dropped is looked up again.
pub const MAX_REMEMBERED_HOSTS: usize = 16_384;

/// The [`CHANGES_KEY`] value after `previous` (the value read, if any).
pub fn next_changes(previous: Option<&[u8]>) -> Vec<u8> {
    let count = previous.map_or(0, changes_count);
    count.wrapping_add(1).to_string().into_bytes()
}

/// A [`CHANGES_KEY`] value as a count; an unreadable one as 0 (the next
/// write makes it readable again).
fn changes_count(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The [`WORKERS_KEY`] lines, as (queue name, beat).
fn worker_lines(list: &[u8]) -> impl Iterator<Item = (&str, u64)> {
    list.split(|b| *b == b'\n').filter_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let (name, beat) = line.split_once(' ')?;
        Some((name, beat.parse().ok()?))
    })
}

/// The [`WORKERS_KEY`] value after the worker with queue `name` beats at
/// `now_ms`: its line is added or renewed, and the lines of workers silent
/// for [`WORKER_STALE_MS`] are dropped.
pub fn beat_worker(list: Option<&[u8]>, name: &str, now_ms: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (other, beat) in worker_lines(list.unwrap_or_default()) {
        if other != name && now_ms.saturating_sub(beat) < WORKER_STALE_MS {
            out.extend_from_slice(format!("{other} {beat}\n").as_bytes());
        }
    }
    out.extend_from_slice(format!("{name} {now_ms}\n").as_bytes());
    out
}

/// The queue names of the workers in a [`WORKERS_KEY`] value that beat
/// within [`WORKER_STALE_MS`] of `now_ms`.
pub fn live_workers(list: &[u8], now_ms: u64) -> Vec<&str> {
    worker_lines(list)
        .filter(|(_, beat)| now_ms.saturating_sub(*beat) < WORKER_STALE_MS)
        .map(|(name, _)| name)
        .collect()
}

pub fn entry_key(domain: &str) -> String {
    let mut key = String::with_capacity(ENTRY_KEY_PREFIX.len() + domain.len());
    key.push_str(ENTRY_KEY_PREFIX);
    key.push_str(domain);
    key
}

/// The value of [`FEED_STATE_KEY`] while the edge waits for its first sync.
pub fn waiting_state(why: &str) -> String {
    format!("waiting: {why}")
}

/// Why a domain without an entry cannot be called unknown yet, from the value
/// of [`FEED_STATE_KEY`]; `None` once the first sync is complete.
pub fn not_ready(state: Option<&[u8]>) -> Option<EntryError> {
    let why = match state.map(std::str::from_utf8) {
        Some(Ok(READY_STATE)) => return None,
        Some(Ok(text)) => text.strip_prefix("waiting: ").unwrap_or(text).to_owned(),
        Some(Err(_)) => "the feed state is unreadable".to_owned(),
        None => "no policy feed has written to this Envoy (is the feed singleton configured, with the filter's vm_id?)".to_owned(),
    };
    Some(EntryError::NotReady { why })
}

/// Why a request's domain could not be served from its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryError {
    /// No entry, and the first sync is not complete.
    NotReady { why: String },
    /// The entry does not compile in this filter: a source that skipped
    /// validation, or a filter older than the singleton that wrote it.
    Invalid { domain: String, why: String },
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryError::NotReady { why } => {
                write!(f, "origin policies not received yet: {why}")
            }
            EntryError::Invalid { domain, why } => {
                write!(f, "{domain}: the delivered policy cannot be used: {why}")
            }
        }
    }
}

impl std::error::Error for EntryError {}

/// What a read of a shared-data key gives: the value and its CAS (which
/// changes with every write of the key).
pub type EntryRead = Option<(Vec<u8>, u32)>;

/// What a host was found to have: its policy and how it matched, or none.
type Answer = Option<(Arc<CompiledPolicy>, MatchKind)>;

/// One worker's compiled policies, by entry key, each with the CAS of the
/// entry it was compiled from; and the answers it gave per host since the
/// singleton's last change.
#[derive(Debug, Default)]
pub struct DomainEntries {
    compiled: HashMap<String, (u32, Arc<CompiledPolicy>), foldhash::fast::RandomState>,
    /// Per host: the answer, and the [`CHANGES_KEY`] count it was read at.
    remembered: HashMap<String, (u64, Answer), foldhash::fast::RandomState>,
    /// The singleton's count as last read; `None` (no count yet, or a
    /// singleton that keeps none): nothing is answered from memory.
    changes: Option<u64>,
}

impl DomainEntries {
    /// Takes the singleton's change count (the worker's tick reads it): an
    /// answer remembered at another count is read again when next asked.
    pub fn note_changes(&mut self, value: Option<&[u8]>) {
        self.changes = value.map(changes_count);
    }

    /// The policy for a normalised host, as [`DomainEntries::lookup`] finds
    /// it, but from memory when nothing changed since it was last looked up.
    /// `Ok(None)`: the host is an unknown domain; until the first sync
    /// ([`FEED_STATE_KEY`]), that is [`EntryError::NotReady`] instead, which
    /// is never remembered.
    pub fn find(
        &mut self,
        host: &str,
        settings: &Settings,
        mut read: impl FnMut(&str) -> EntryRead,
    ) -> Result<Answer, EntryError> {
        if let (Some(now), Some((seen, answer))) = (self.changes, self.remembered.get(host)) {
            if *seen == now {
                return Ok(answer.clone());
            }
        }
        let answer = self.lookup(host, settings, &mut read)?;
        if answer.is_none() {
            let state = read(FEED_STATE_KEY);
            if let Some(why) = not_ready(state.as_ref().map(|(s, _)| s.as_slice())) {
                return Err(why);
            }
        }
        if let Some(now) = self.changes {
            if self.remembered.len() >= MAX_REMEMBERED_HOSTS && !self.remembered.contains_key(host)
            {
                // Cleared, not trimmed: answers keep no order to drop the
                // stalest by, and a full map (many hosts under a wildcard)
                // only costs each host one lookup again.
                self.remembered.clear();
            }
            self.remembered
                .insert(host.to_owned(), (now, answer.clone()));
        }
        Ok(answer)
    }

    /// The policy for a normalised host: its exact name's entry, then the
    /// wildcard of each parent (`*.b.c`, then `*.c` for `a.b.c`). `Ok(None)`:
    /// no policy covers the host. `read` reads one shared-data key.
    pub fn lookup(
        &mut self,
        host: &str,
        settings: &Settings,
        mut read: impl FnMut(&str) -> EntryRead,
    ) -> Result<Option<(Arc<CompiledPolicy>, MatchKind)>, EntryError> {
        if let Some(p) = self.entry(entry_key(host), settings, &mut read)? {
            return Ok(Some((p, MatchKind::Exact)));
        }
        let mut rest = host;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            let key = format!("{ENTRY_KEY_PREFIX}*.{rest}");
            if let Some(p) = self.entry(key, settings, &mut read)? {
                return Ok(Some((p, MatchKind::Wildcard)));
            }
        }
        Ok(None)
    }

    /// How many compiled policies this worker holds.
    pub fn len(&self) -> usize {
        self.compiled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.compiled.is_empty()
    }

    /// Forgets every compiled policy: the settings they were admitted under
    /// changed.
    pub fn clear(&mut self) {
        self.compiled.clear();
        self.remembered.clear();
    }

    fn entry(
        &mut self,
        key: String,
        settings: &Settings,
        read: &mut impl FnMut(&str) -> EntryRead,
    ) -> Result<Option<Arc<CompiledPolicy>>, EntryError> {
        let Some((value, cas)) = read(&key) else {
            self.compiled.remove(&key);
            return Ok(None);
        };
        if value == REMOVED_ENTRY {
            self.compiled.remove(&key);
            return Ok(None);
        }
        if let Some((seen, policy)) = self.compiled.get(&key) {
            if *seen == cas {
                return Ok(Some(Arc::clone(policy)));
            }
        }
        let domain = &key[ENTRY_KEY_PREFIX.len()..];
        let policy = validate_entry(domain, &value, settings).map_err(|d| EntryError::Invalid {
            domain: domain.to_owned(),
            why: d.to_string(),
        })?;
        let policy = Arc::new(CompiledPolicy::compile(policy));
        if self.compiled.len() >= MAX_CACHED_POLICIES && !self.compiled.contains_key(&key) {
            // Any one: a domain evicted is only compiled again when asked.
            if let Some(evicted) = self.compiled.keys().next().cloned() {
                self.compiled.remove(&evicted);
            }
        }
        self.compiled.insert(key, (cas, Arc::clone(&policy)));
        Ok(Some(policy))
    }
}

/// A document as the feed names it: valid, and for the domain it is filed
/// under. The first error is the one reported.
fn validate_entry(
    domain: &str,
    document: &[u8],
    settings: &Settings,
) -> Result<Policy, Box<PolicyDiagnostic>> {
    let source = "feed";
    let finding = |path: &str, message: String| {
        Box::new(PolicyDiagnostic {
            severity: Severity::Error,
            source: source.to_owned(),
            domain: Some(domain.to_owned()),
            path: path.to_owned(),
            message,
            fix: None,
        })
    };
    let value = parse_json(document).map_err(|e| finding("", format!("not valid JSON: {e}")))?;
    let (policy, found) = parse_policy(source, &value);
    let Some(policy) = policy else {
        let first = found.into_iter().find(|d| d.severity == Severity::Error);
        return Err(first.map_or_else(
            || finding("", "the policy was rejected".to_owned()),
            Box::new,
        ));
    };
    let named = policy.domain.display_name();
    if named != domain {
        return Err(finding(
            "/domain",
            format!("the feed files this policy under `{domain}`, but it is for `{named}`"),
        ));
    }
    if let Some(refused) = check_policy_origins(&policy, settings, source)
        .into_iter()
        .next()
    {
        return Err(Box::new(refused));
    }
    Ok(policy)
}

/// One line of a feed page that is not `DOMAIN \t DOCUMENT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedLine {
    /// Its number in the page, from 1.
    pub line: usize,
    pub why: &'static str,
}

impl fmt::Display for MalformedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "feed page line {}: expected `DOMAIN<TAB>DOCUMENT`, {}",
            self.line, self.why
        )
    }
}

/// What the singleton does with one page of the feed.
#[derive(Debug, Default)]
pub struct PageOutcome {
    /// Shared-data writes, in order: an entry key and its new value.
    pub writes: Vec<(String, Vec<u8>)>,
    /// Policies refused: their domains keep the entry they had.
    pub rejected: Vec<PolicyDiagnostic>,
    pub malformed: Vec<MalformedLine>,
    /// Entries left as they were because the document did not change.
    pub unchanged: usize,
}

/// The singleton's view of what it wrote: each domain's document by
/// fingerprint, so that a re-sync rewrites only what changed and can remove
/// what the source no longer has.
#[derive(Debug, Default)]
pub struct FeedSync {
    written: HashMap<String, u128, foldhash::fast::RandomState>,
    /// During a snapshot: the domains it listed so far.
    listed: Option<HashSet<String, foldhash::fast::RandomState>>,
}

impl FeedSync {
    /// The source starts over (its first answer, or it lost its versions):
    /// the pages that follow list every domain it has.
    pub fn begin_snapshot(&mut self) {
        self.listed = Some(HashSet::default());
    }

    /// The entries written that `settings` refuse (they came in under other
    /// settings), each with why; `read` reads one shared-data key. The
    /// workers refuse them by themselves; this names them to the source.
    pub fn refused_under(
        &self,
        settings: &Settings,
        mut read: impl FnMut(&str) -> EntryRead,
    ) -> Vec<PolicyDiagnostic> {
        let mut domains: Vec<&String> = self.written.keys().collect();
        // Distinct keys: unstable is the same order, with a smaller routine.
        domains.sort_unstable();
        domains
            .into_iter()
            .filter_map(|domain| {
                let (document, _) = read(&entry_key(domain))?;
                validate_entry(domain, &document, settings)
                    .err()
                    .map(|d| *d)
            })
            .collect()
    }

    pub fn in_snapshot(&self) -> bool {
        self.listed.is_some()
    }

    /// How many domains have an entry.
    pub fn domains(&self) -> usize {
        self.written.len()
    }

    /// Validates one page's changes and says what to write.
    pub fn apply(&mut self, page: &[u8], settings: &Settings) -> PageOutcome {
        let mut out = PageOutcome::default();
        for (i, line) in page.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let parsed = match line.iter().position(|b| *b == b'\t') {
                None => Err("found no tab"),
                Some(0) => Err("found no domain before the tab"),
                Some(tab) => std::str::from_utf8(&line[..tab])
                    .map(|domain| (domain, &line[tab + 1..]))
                    .map_err(|_| "the domain is not UTF-8"),
            };
            let (domain, document) = match parsed {
                Ok(found) => found,
                Err(why) => {
                    out.malformed.push(MalformedLine { line: i + 1, why });
                    continue;
                }
            };
            if let Some(listed) = &mut self.listed {
                listed.insert(domain.to_owned());
            }
            if document.is_empty() {
                if self.written.remove(domain).is_some() {
                    out.writes.push((entry_key(domain), REMOVED_ENTRY.to_vec()));
                }
                continue;
            }
            let fingerprint = document_fingerprint(document);
            if self.written.get(domain) == Some(&fingerprint) {
                out.unchanged += 1;
                continue;
            }
            match validate_entry(domain, document, settings) {
                Ok(_) => {
                    self.written.insert(domain.to_owned(), fingerprint);
                    out.writes.push((entry_key(domain), document.to_vec()));
                }
                Err(finding) => out.rejected.push(*finding),
            }
        }
        out
    }

    /// The snapshot's last page was applied: the entries of every domain it
    /// did not list are removed, unless that is more than `limit` allows.
    pub fn end_snapshot(
        &mut self,
        limit: RemovalLimit,
    ) -> Result<Vec<(String, Vec<u8>)>, SnapshotRefused> {
        let Some(listed) = self.listed.take() else {
            return Ok(Vec::new());
        };
        let gone: Vec<String> = self
            .written
            .keys()
            .filter(|d| !listed.contains(*d))
            .cloned()
            .collect();
        let domains = self.written.len();
        if gone.len() * 100 > domains * usize::from(limit.percent) {
            return Err(SnapshotRefused {
                removed: gone.len(),
                domains,
                limit,
            });
        }
        Ok(gone
            .into_iter()
            .map(|domain| {
                self.written.remove(&domain);
                (entry_key(&domain), REMOVED_ENTRY.to_vec())
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;

    const WWW: &str = r#"{"domain":"www.example.com","primary":{"address":"a.example.net"}}"#;
    const WILD: &str = r#"{"domain":"*.example.org","primary":{"address":"b.example.net"}}"#;

    /// Shared data as the filter sees it: values with a CAS bumped per write.
    #[derive(Default)]
    struct FakeSharedData(Map<String, (Vec<u8>, u32)>);

    impl FakeSharedData {
        fn write(&mut self, writes: Vec<(String, Vec<u8>)>) {
            for (key, value) in writes {
                let cas = self.0.get(&key).map_or(1, |(_, c)| c + 1);
                self.0.insert(key, (value, cas));
            }
        }
        fn read(&self, key: &str) -> EntryRead {
            self.0.get(key).cloned()
        }
    }

    fn page(lines: &[(&str, &str)]) -> Vec<u8> {
        lines
            .iter()
            .map(|(d, doc)| format!("{d}\t{doc}\n"))
            .collect::<String>()
            .into_bytes()
    }

    fn origin_of(p: &CompiledPolicy) -> &str {
        &p.policy.origins[0].address
    }

    #[test]
    fn entries_written_before_the_settings_are_checked_again_under_them() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        let admin =
            r#"{"domain":"admin.example.com","primary":{"address":"127.0.0.1","port":9901}}"#;
        let unchecked = Settings {
            origin_networks: crate::OriginNetworks::unchecked(),
            ..Settings::default()
        };
        let page = page(&[("www.example.com", WWW), ("admin.example.com", admin)]);
        shared.write(sync.apply(&page, &unchecked).writes);
        assert_eq!(sync.domains(), 2);
        let refused = sync.refused_under(&Settings::default(), |k| shared.read(k));
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].domain.as_deref(), Some("admin.example.com"));
        assert_eq!(refused[0].path, "/primary/address");
        // And a worker, which has the settings, does not use it.
        let mut entries = DomainEntries::default();
        let used = entries.lookup("admin.example.com", &Settings::default(), |k| {
            shared.read(k)
        });
        assert!(matches!(used, Err(EntryError::Invalid { .. })), "{used:?}");
    }

    #[test]
    fn an_entry_is_compiled_once_and_again_when_rewritten() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        shared.write(
            sync.apply(&page(&[("www.example.com", WWW)]), &Settings::default())
                .writes,
        );
        let mut entries = DomainEntries::default();
        let (p, kind) = entries
            .lookup("www.example.com", &Settings::default(), |k| shared.read(k))
            .unwrap()
            .unwrap();
        assert_eq!((origin_of(&p), kind), ("a.example.net", MatchKind::Exact));
        let (again, _) = entries
            .lookup("www.example.com", &Settings::default(), |k| shared.read(k))
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&p, &again), "unchanged entry recompiled");
        let changed = WWW.replace("a.example.net", "c.example.net");
        shared.write(
            sync.apply(
                &page(&[("www.example.com", &changed)]),
                &Settings::default(),
            )
            .writes,
        );
        let (now, _) = entries
            .lookup("www.example.com", &Settings::default(), |k| shared.read(k))
            .unwrap()
            .unwrap();
        assert_eq!(origin_of(&now), "c.example.net");
        // A request that started before keeps its policy.
        assert_eq!(origin_of(&p), "a.example.net");
    }

    #[test]
    fn wildcards_cover_subdomains_not_the_parent() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        shared.write(
            sync.apply(&page(&[("*.example.org", WILD)]), &Settings::default())
                .writes,
        );
        let mut entries = DomainEntries::default();
        let found = entries
            .lookup("x.y.example.org", &Settings::default(), |k| shared.read(k))
            .unwrap();
        assert_eq!(found.map(|(_, k)| k), Some(MatchKind::Wildcard));
        assert!(entries
            .lookup("example.org", &Settings::default(), |k| shared.read(k))
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_invalid_change_keeps_the_last_good_entry() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        shared.write(
            sync.apply(&page(&[("www.example.com", WWW)]), &Settings::default())
                .writes,
        );
        let bad = WWW.replace("\"a.example.net\"", "\"a.example.net\",\"port\":\"x\"");
        let out = sync.apply(&page(&[("www.example.com", &bad)]), &Settings::default());
        assert!(out.writes.is_empty());
        assert_eq!(out.rejected.len(), 1);
        let finding = out.rejected[0].to_string();
        assert!(
            finding.contains("www.example.com") && finding.contains("/primary/port"),
            "{finding}"
        );
        // Filed under another domain than its own: refused too.
        let out = sync.apply(&page(&[("other.example.com", WWW)]), &Settings::default());
        assert!(out.writes.is_empty());
        assert!(out.rejected[0].to_string().contains("/domain"));
        let mut entries = DomainEntries::default();
        let (p, _) = entries
            .lookup("www.example.com", &Settings::default(), |k| shared.read(k))
            .unwrap()
            .unwrap();
        assert_eq!(origin_of(&p), "a.example.net");
    }

    #[test]
    fn a_snapshot_rewrites_only_changes_and_removes_what_it_did_not_list() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        sync.begin_snapshot();
        let other = WWW.replace("www.example.com", "old.example.com");
        shared.write(
            sync.apply(
                &page(&[("www.example.com", WWW), ("old.example.com", &other)]),
                &Settings::default(),
            )
            .writes,
        );
        assert!(sync
            .end_snapshot(RemovalLimit::default())
            .unwrap()
            .is_empty());
        sync.begin_snapshot();
        let out = sync.apply(&page(&[("www.example.com", WWW)]), &Settings::default());
        assert_eq!((out.writes.len(), out.unchanged), (0, 1));
        let removed = sync.end_snapshot(RemovalLimit::default()).unwrap();
        assert_eq!(
            removed,
            vec![(entry_key("old.example.com"), REMOVED_ENTRY.to_vec())]
        );
        shared.write(removed);
        let mut entries = DomainEntries::default();
        assert!(entries
            .lookup("old.example.com", &Settings::default(), |k| shared.read(k))
            .unwrap()
            .is_none());
        assert_eq!(sync.domains(), 1);
    }

    #[test]
    fn a_removal_and_malformed_lines() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        shared.write(
            sync.apply(&page(&[("www.example.com", WWW)]), &Settings::default())
                .writes,
        );
        let out = sync.apply(
            b"www.example.com\t\nno tab here\n\tdoc\n",
            &Settings::default(),
        );
        assert_eq!(
            out.malformed,
            vec![
                MalformedLine {
                    line: 2,
                    why: "found no tab"
                },
                MalformedLine {
                    line: 3,
                    why: "found no domain before the tab"
                }
            ]
        );
        assert_eq!(malformed_report(&out.malformed).as_deref(), Some("2,3"));
        let not_utf8 = sync.apply(b"b\xfccher.example\t{}\n", &Settings::default());
        assert_eq!(not_utf8.malformed[0].why, "the domain is not UTF-8");
        shared.write(out.writes);
        let mut entries = DomainEntries::default();
        assert!(entries
            .lookup("www.example.com", &Settings::default(), |k| shared.read(k))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_rejection_report_names_every_domain_a_header_can_carry_encoded() {
        let mut domains = vec![
            "a.example".to_owned(),
            "bad,name".to_owned(),
            "bücher.example".to_owned(),
            String::new(),
        ];
        let report = rejected_report(&domains).unwrap();
        assert_eq!(report, "a.example,bad%2Cname,b%C3%BCcher.example");
        assert_eq!(parse_report(&report), &domains[..3]);
        domains.extend((0..150).map(|i| format!("d{i}.example")));
        let report = rejected_report(&domains).unwrap();
        assert!(report.ends_with(",+53 more"), "{report}");
        assert_eq!(parse_report(&report).len(), 100);
        assert_eq!(rejected_report(&[]), None);
        // A stray `%` that is not an escape stays as it is.
        assert_eq!(parse_report("50%off,%zz"), ["50%off", "%zz"]);
    }

    #[test]
    fn a_snapshot_that_would_remove_too_much_keeps_every_domain() {
        let mut sync = FeedSync::default();
        let names: Vec<String> = (0..10).map(|i| format!("d{i}.example.com")).collect();
        let docs: Vec<String> = names
            .iter()
            .map(|n| WWW.replace("www.example.com", n))
            .collect();
        let lines: Vec<(&str, &str)> = names
            .iter()
            .map(String::as_str)
            .zip(docs.iter().map(String::as_str))
            .collect();
        sync.apply(&page(&lines), &Settings::default());
        // An empty snapshot: every domain would go.
        sync.begin_snapshot();
        let refused = sync.end_snapshot(RemovalLimit::default()).unwrap_err();
        assert_eq!(
            (refused.removed, refused.domains, refused.report().as_str()),
            (10, 10, "10/10")
        );
        assert!(
            refused.to_string().contains("max_snapshot_removal_percent"),
            "{refused}"
        );
        assert_eq!(sync.domains(), 10);
        // Half of them: at the limit, removed.
        sync.begin_snapshot();
        sync.apply(&page(&lines[..5]), &Settings::default());
        assert_eq!(sync.end_snapshot(RemovalLimit::default()).unwrap().len(), 5);
        // The guard off.
        sync.begin_snapshot();
        let all = sync.end_snapshot(RemovalLimit { percent: 100 }).unwrap();
        assert_eq!((all.len(), sync.domains()), (5, 0));
    }

    #[test]
    fn the_state_says_why_until_the_first_sync() {
        assert_eq!(not_ready(Some(READY_STATE.as_bytes())), None);
        let waiting = waiting_state("the source is down");
        let why = not_ready(Some(waiting.as_bytes())).unwrap().to_string();
        assert_eq!(why, "origin policies not received yet: the source is down");
        assert!(not_ready(None).unwrap().to_string().contains("vm_id"));
    }

    #[test]
    fn a_host_is_answered_from_memory_until_the_singleton_counts_a_change() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        shared.write(
            sync.apply(&page(&[("*.example.org", WILD)]), &Settings::default())
                .writes,
        );
        shared.write(vec![(FEED_STATE_KEY.to_owned(), READY_STATE.into())]);
        let mut entries = DomainEntries::default();
        entries.note_changes(Some(b"7"));
        let mut reads = Vec::new();
        let find = |entries: &mut DomainEntries,
                    host: &str,
                    reads: &mut Vec<String>,
                    shared: &FakeSharedData| {
            entries.find(host, &Settings::default(), |k| {
                reads.push(k.to_owned());
                shared.read(k)
            })
        };
        let (p, kind) = find(&mut entries, "x.example.org", &mut reads, &shared)
            .unwrap()
            .unwrap();
        assert_eq!(
            (origin_of(&p), kind),
            ("b.example.net", MatchKind::Wildcard)
        );
        assert_eq!(reads.len(), 2, "{reads:?}");
        // A host without a policy, once the edge has its policies: unknown.
        assert!(
            find(&mut entries, "nobody.example.com", &mut reads, &shared)
                .unwrap()
                .is_none()
        );
        reads.clear();
        // Nothing counted since: no read at all.
        let (again, _) = find(&mut entries, "x.example.org", &mut reads, &shared)
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&p, &again));
        assert!(
            find(&mut entries, "nobody.example.com", &mut reads, &shared)
                .unwrap()
                .is_none()
        );
        assert!(reads.is_empty(), "{reads:?}");
        // A change: the singleton writes the entry, then counts it.
        let changed = WILD.replace("b.example.net", "c.example.net");
        shared.write(
            sync.apply(&page(&[("*.example.org", &changed)]), &Settings::default())
                .writes,
        );
        let value = next_changes(shared.read(CHANGES_KEY).as_ref().map(|(v, _)| v.as_slice()));
        assert_eq!(value, b"1");
        entries.note_changes(Some(b"8"));
        let (now, _) = find(&mut entries, "x.example.org", &mut reads, &shared)
            .unwrap()
            .unwrap();
        assert_eq!(origin_of(&now), "c.example.net");
        assert_eq!(next_changes(Some(b"8")), b"9");
    }

    #[test]
    fn workers_beat_into_one_list_and_the_silent_ones_drop_out() {
        let q1 = format!("{WAKE_QUEUE_PREFIX}1");
        let q2 = format!("{WAKE_QUEUE_PREFIX}2");
        let list = beat_worker(None, &q1, 1_000);
        let list = beat_worker(Some(&list), &q2, 1_500);
        assert_eq!(live_workers(&list, 2_000), [q1.as_str(), q2.as_str()]);
        // q1 beats again: one line each, q1's renewed.
        let list = beat_worker(Some(&list), &q1, 9_000);
        assert_eq!(list.iter().filter(|b| **b == b'\n').count(), 2);
        // q2 has been silent for WORKER_STALE_MS: not woken, then dropped.
        let now = 1_500 + WORKER_STALE_MS;
        assert_eq!(live_workers(&list, now), [q1.as_str()]);
        let list = beat_worker(Some(&list), &q1, now);
        assert_eq!(list, format!("{q1} {now}\n").into_bytes());
        // An unreadable line is skipped, not fatal.
        let list = beat_worker(Some(b"garbage\nq 12x\n"), &q2, 5);
        assert_eq!(live_workers(&list, 5), [q2.as_str()]);
    }

    #[test]
    fn without_a_count_every_lookup_reads_and_not_ready_is_never_remembered() {
        let mut shared = FakeSharedData::default();
        let mut sync = FeedSync::default();
        shared.write(
            sync.apply(&page(&[("www.example.com", WWW)]), &Settings::default())
                .writes,
        );
        let mut entries = DomainEntries::default();
        let mut reads = 0;
        for _ in 0..2 {
            entries
                .find("www.example.com", &Settings::default(), |k| {
                    reads += 1;
                    shared.read(k)
                })
                .unwrap()
                .unwrap();
        }
        assert_eq!(
            reads, 2,
            "a singleton that counts nothing: read per request"
        );
        entries.note_changes(Some(b"1"));
        let early = entries.find("nobody.example.com", &Settings::default(), |k| {
            shared.read(k)
        });
        assert!(
            matches!(early, Err(EntryError::NotReady { .. })),
            "{early:?}"
        );
        shared.write(vec![(FEED_STATE_KEY.to_owned(), READY_STATE.into())]);
        let later = entries.find("nobody.example.com", &Settings::default(), |k| {
            shared.read(k)
        });
        assert!(matches!(later, Ok(None)), "{later:?}");
    }

    #[test]
    fn an_entry_this_filter_cannot_compile_is_an_error_naming_the_domain() {
        let mut shared = FakeSharedData::default();
        shared.write(vec![(
            entry_key("www.example.com"),
            b"{\"domain\":".to_vec(),
        )]);
        let err = DomainEntries::default()
            .lookup("www.example.com", &Settings::default(), |k| shared.read(k))
            .unwrap_err();
        assert!(err.to_string().starts_with("www.example.com: "), "{err}");
    }
}
