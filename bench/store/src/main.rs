//! Embedded stores for the control plane's durable state, measured on one schema:
//!
//! - `domains`: domain -> (revision, seq, document)
//! - `history`: (domain, revision) -> (seq, document)
//! - `log`: seq -> (domain, revision)
//!
//! A write is one domain's next revision in all three, committed durably (fsync before the
//! commit returns) unless the variant says otherwise (`sqlite-normal`).
//!
//! `store-bench all DIR` runs every phase of every store, each phase in a child process of its
//! own (so that the peak RSS of a cold open is that phase's alone), and prints the tables.
//! The single phases (`import`, `scan`, `read`, `write`, `crash-writer`, `verify`) are what
//! `all` runs; each prints one `key=value` line.

use std::collections::HashMap;
use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn Error>>;

const CACHE_BYTES: usize = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Documents: the repository's policies, each under many domain names.

struct Corpus {
    /// (domain the template names, template text)
    templates: Vec<(String, String)>,
}

impl Corpus {
    fn load(dir: &Path) -> Res<Corpus> {
        let mut templates = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        for p in names {
            let text = std::fs::read_to_string(&p)?;
            let Some(at) = text.find("\"domain\": \"") else { continue };
            let start = at + "\"domain\": \"".len();
            let Some(len) = text[start..].find('"') else { continue };
            templates.push((text[start..start + len].to_string(), text));
        }
        if templates.is_empty() {
            return Err(format!("no policy with a \"domain\" in {}", dir.display()).into());
        }
        Ok(Corpus { templates })
    }

    fn domain(&self, i: u64) -> String {
        let (d, _) = &self.templates[(i % self.templates.len() as u64) as usize];
        format!("{:016x}.{d}", mix(i))
    }

    /// The document of domain `i` at a revision: the template of `i + revision`, so that a new
    /// revision is a real change of policy.
    fn document(&self, i: u64, revision: u64) -> Vec<u8> {
        let n = self.templates.len() as u64;
        let (own, _) = &self.templates[(i % n) as usize];
        let (theirs, text) = &self.templates[((i + revision) % n) as usize];
        let name = format!("{:016x}.{own}", mix(i));
        text.replacen(&format!("\"domain\": \"{theirs}\""), &format!("\"domain\": \"{name}\""), 1)
            .into_bytes()
    }
}

/// A bijection on u64 (splitmix64's finaliser): domain names in no particular order.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0 ^ 0x5555) % n
    }
}

// ---------------------------------------------------------------------------------------------
// The stores.

trait Store {
    /// Writes each domain's next revision (1 if it has none) in one transaction, committed per
    /// the store's durability. Returns the revisions written.
    fn put_batch(&mut self, items: &[(String, &dyn Fn(u64) -> Vec<u8>)]) -> Res<Vec<u64>>;
    /// Visits every row of the domain table: (domain, revision, seq, document length).
    fn scan(&self, f: &mut dyn FnMut(&str, u64, u64, usize)) -> Res<()>;
    fn get(&self, domain: &str) -> Res<Option<(u64, Vec<u8>)>>;
    fn has_history(&self, domain: &str, revision: u64) -> Res<bool>;
    /// Rewrites the file so that its pages lie in key order (SQLite's VACUUM, redb's compact).
    fn compact(&mut self) -> Res<()> {
        Err("no compaction for this store".into())
    }
}

const KINDS: [&str; 5] = ["sqlite-full", "sqlite-normal", "redb", "redb-quick-repair", "fjall"];

/// The directory of a store variant: the SQLite variants share one file, the redb ones too.
fn store_dir(root: &Path, kind: &str) -> PathBuf {
    root.join(match kind {
        "sqlite-full" | "sqlite-normal" => "sqlite",
        "redb" | "redb-quick-repair" => "redb",
        other => other,
    })
}

fn open(kind: &str, dir: &Path) -> Res<Box<dyn Store>> {
    std::fs::create_dir_all(dir)?;
    Ok(match kind {
        "sqlite-full" => Box::new(sqlite::Sqlite::open(dir, "FULL")?),
        "sqlite-normal" => Box::new(sqlite::Sqlite::open(dir, "NORMAL")?),
        "redb" => Box::new(redb_store::Redb::open(dir, false)?),
        "redb-quick-repair" => Box::new(redb_store::Redb::open(dir, true)?),
        "fjall" => Box::new(fjall_store::Fjall::open(dir)?),
        other => return Err(format!("unknown store {other}").into()),
    })
}

mod sqlite {
    use super::*;
    use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

    pub struct Sqlite {
        conn: Connection,
        seq: u64,
    }

    impl Sqlite {
        pub fn open(dir: &Path, synchronous: &str) -> Res<Sqlite> {
            let conn = Connection::open(dir.join("store.sqlite"))?;
            conn.execute_batch(&format!(
                "PRAGMA journal_mode=WAL;
                 PRAGMA synchronous={synchronous};
                 PRAGMA cache_size=-{};
                 CREATE TABLE IF NOT EXISTS domains(
                     domain TEXT PRIMARY KEY, revision INTEGER NOT NULL,
                     seq INTEGER NOT NULL, document BLOB NOT NULL) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS history(
                     domain TEXT NOT NULL, revision INTEGER NOT NULL,
                     seq INTEGER NOT NULL, document BLOB NOT NULL,
                     PRIMARY KEY(domain, revision)) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS log(
                     seq INTEGER PRIMARY KEY, domain TEXT NOT NULL, revision INTEGER NOT NULL);",
                CACHE_BYTES / 1024
            ))?;
            let seq: Option<i64> =
                conn.query_row("SELECT max(seq) FROM log", [], |r| r.get(0))?;
            Ok(Sqlite { conn, seq: seq.unwrap_or(0) as u64 })
        }
    }

    impl Store for Sqlite {
        fn put_batch(&mut self, items: &[(String, &dyn Fn(u64) -> Vec<u8>)]) -> Res<Vec<u64>> {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut out = Vec::with_capacity(items.len());
            let mut seq = self.seq;
            {
                let mut cur = tx.prepare_cached("SELECT revision FROM domains WHERE domain=?1")?;
                let mut dom = tx.prepare_cached(
                    "INSERT INTO domains(domain, revision, seq, document) VALUES(?1,?2,?3,?4)
                     ON CONFLICT(domain) DO UPDATE SET revision=excluded.revision,
                     seq=excluded.seq, document=excluded.document",
                )?;
                let mut his = tx.prepare_cached(
                    "INSERT INTO history(domain, revision, seq, document) VALUES(?1,?2,?3,?4)",
                )?;
                let mut log =
                    tx.prepare_cached("INSERT INTO log(seq, domain, revision) VALUES(?1,?2,?3)")?;
                for (domain, doc) in items {
                    let rev: Option<i64> =
                        cur.query_row(params![domain], |r| r.get(0)).optional()?;
                    let rev = rev.unwrap_or(0) as u64 + 1;
                    seq += 1;
                    let d = doc(rev);
                    dom.execute(params![domain, rev as i64, seq as i64, d])?;
                    his.execute(params![domain, rev as i64, seq as i64, d])?;
                    log.execute(params![seq as i64, domain, rev as i64])?;
                    out.push(rev);
                }
            }
            tx.commit()?;
            self.seq = seq;
            Ok(out)
        }

        fn scan(&self, f: &mut dyn FnMut(&str, u64, u64, usize)) -> Res<()> {
            let mut st = self.conn.prepare("SELECT domain, revision, seq, document FROM domains")?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let d = r.get_ref(0)?.as_str()?;
                let doc = r.get_ref(3)?.as_blob()?;
                f(d, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64, doc.len());
            }
            Ok(())
        }

        fn get(&self, domain: &str) -> Res<Option<(u64, Vec<u8>)>> {
            let mut st =
                self.conn.prepare_cached("SELECT revision, document FROM domains WHERE domain=?1")?;
            Ok(st
                .query_row(params![domain], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
                .optional()?)
        }

        fn has_history(&self, domain: &str, revision: u64) -> Res<bool> {
            let mut st = self
                .conn
                .prepare_cached("SELECT 1 FROM history WHERE domain=?1 AND revision=?2")?;
            Ok(st.exists(params![domain, revision as i64])?)
        }

        fn compact(&mut self) -> Res<()> {
            self.conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")?;
            Ok(())
        }
    }
}

mod redb_store {
    use super::*;
    use redb::{
        Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata,
        TableDefinition,
    };

    const DOMAINS: TableDefinition<&str, (u64, u64, &[u8])> = TableDefinition::new("domains");
    const HISTORY: TableDefinition<(&str, u64), (u64, &[u8])> = TableDefinition::new("history");
    const LOG: TableDefinition<u64, (&str, u64)> = TableDefinition::new("log");

    pub struct Redb {
        db: Database,
        quick_repair: bool,
        seq: u64,
    }

    impl Redb {
        pub fn open(dir: &Path, quick_repair: bool) -> Res<Redb> {
            let db = Database::builder().set_cache_size(CACHE_BYTES).create(dir.join("store.redb"))?;
            let tx = db.begin_write()?;
            {
                tx.open_table(DOMAINS)?;
                tx.open_table(HISTORY)?;
                tx.open_table(LOG)?;
            }
            tx.commit()?;
            let seq = {
                let rx = db.begin_read()?;
                let log = rx.open_table(LOG)?;
                let last = log.last()?;
                last.map(|(k, _)| k.value()).unwrap_or(0)
            };
            Ok(Redb { db, quick_repair, seq })
        }
    }

    impl Store for Redb {
        fn put_batch(&mut self, items: &[(String, &dyn Fn(u64) -> Vec<u8>)]) -> Res<Vec<u64>> {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            tx.set_quick_repair(self.quick_repair);
            let mut out = Vec::with_capacity(items.len());
            let mut seq = self.seq;
            {
                let mut dom = tx.open_table(DOMAINS)?;
                let mut his = tx.open_table(HISTORY)?;
                let mut log = tx.open_table(LOG)?;
                for (domain, doc) in items {
                    let rev = dom.get(domain.as_str())?.map(|g| g.value().0).unwrap_or(0) + 1;
                    seq += 1;
                    let d = doc(rev);
                    dom.insert(domain.as_str(), (rev, seq, d.as_slice()))?;
                    his.insert((domain.as_str(), rev), (seq, d.as_slice()))?;
                    log.insert(seq, (domain.as_str(), rev))?;
                    out.push(rev);
                }
            }
            tx.commit()?;
            self.seq = seq;
            Ok(out)
        }

        fn scan(&self, f: &mut dyn FnMut(&str, u64, u64, usize)) -> Res<()> {
            let rx = self.db.begin_read()?;
            let dom = rx.open_table(DOMAINS)?;
            let _ = dom.len()?;
            for e in dom.iter()? {
                let (k, v) = e?;
                let (rev, seq, doc) = v.value();
                f(k.value(), rev, seq, doc.len());
            }
            Ok(())
        }

        fn get(&self, domain: &str) -> Res<Option<(u64, Vec<u8>)>> {
            let rx = self.db.begin_read()?;
            let dom = rx.open_table(DOMAINS)?;
            let got = dom.get(domain)?.map(|g| {
                let (rev, _, doc) = g.value();
                (rev, doc.to_vec())
            });
            Ok(got)
        }

        fn has_history(&self, domain: &str, revision: u64) -> Res<bool> {
            let rx = self.db.begin_read()?;
            let his = rx.open_table(HISTORY)?;
            let found = his.get((domain, revision))?.is_some();
            Ok(found)
        }

        fn compact(&mut self) -> Res<()> {
            while self.db.compact(redb::CompactionMode::Balanced)? {}
            Ok(())
        }
    }
}

mod fjall_store {
    use super::*;
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub struct Fjall {
        db: Database,
        domains: Keyspace,
        history: Keyspace,
        log: Keyspace,
        seq: u64,
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_be_bytes(a)
    }

    fn history_key(domain: &str, rev: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(domain.len() + 9);
        k.extend_from_slice(domain.as_bytes());
        k.push(0);
        k.extend_from_slice(&rev.to_be_bytes());
        k
    }

    impl Fjall {
        pub fn open(dir: &Path) -> Res<Fjall> {
            let db = Database::builder(dir).cache_size(CACHE_BYTES as u64).open()?;
            let domains = db.keyspace("domains", KeyspaceCreateOptions::default)?;
            let history = db.keyspace("history", KeyspaceCreateOptions::default)?;
            let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
            let seq = match log.last_key_value() {
                Some(g) => u64_at(&g.key()?, 0),
                None => 0,
            };
            Ok(Fjall { db, domains, history, log, seq })
        }
    }

    impl Store for Fjall {
        fn put_batch(&mut self, items: &[(String, &dyn Fn(u64) -> Vec<u8>)]) -> Res<Vec<u64>> {
            // One writer: the read of the current revision cannot race another write.
            let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
            let mut out = Vec::with_capacity(items.len());
            let mut seq = self.seq;
            for (domain, doc) in items {
                let rev = self.domains.get(domain)?.map(|v| u64_at(&v, 0)).unwrap_or(0) + 1;
                seq += 1;
                let d = doc(rev);
                let mut dv = Vec::with_capacity(16 + d.len());
                dv.extend_from_slice(&rev.to_be_bytes());
                dv.extend_from_slice(&seq.to_be_bytes());
                dv.extend_from_slice(&d);
                let mut hv = Vec::with_capacity(8 + d.len());
                hv.extend_from_slice(&seq.to_be_bytes());
                hv.extend_from_slice(&d);
                let mut lv = Vec::with_capacity(8 + domain.len());
                lv.extend_from_slice(&rev.to_be_bytes());
                lv.extend_from_slice(domain.as_bytes());
                b.insert(&self.domains, domain.as_bytes(), dv);
                b.insert(&self.history, history_key(domain, rev), hv);
                b.insert(&self.log, seq.to_be_bytes(), lv);
                out.push(rev);
            }
            b.commit()?;
            self.seq = seq;
            Ok(out)
        }

        fn scan(&self, f: &mut dyn FnMut(&str, u64, u64, usize)) -> Res<()> {
            for g in self.domains.iter() {
                let (k, v) = g.into_inner()?;
                let d = std::str::from_utf8(&k)?;
                f(d, u64_at(&v, 0), u64_at(&v, 8), v.len() - 16);
            }
            Ok(())
        }

        fn get(&self, domain: &str) -> Res<Option<(u64, Vec<u8>)>> {
            Ok(self.domains.get(domain)?.map(|v| (u64_at(&v, 0), v[16..].to_vec())))
        }

        fn has_history(&self, domain: &str, revision: u64) -> Res<bool> {
            Ok(self.history.get(history_key(domain, revision))?.is_some())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements.

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace().nth(1).and_then(|n| n.parse().ok())
            })
        })
        .unwrap_or(0)
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3
}

/// Bytes allocated on disk under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut sum = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            sum += if m.is_dir() { disk_bytes(&e.path()) } else { m.blocks() * 512 };
        }
    }
    sum
}

/// Drops the store's files from the page cache, so that the next open reads the disk.
fn evict(dir: &Path) {
    use std::os::unix::io::AsRawFd;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                evict(&p);
            } else if let Ok(f) = std::fs::File::open(&p) {
                let _ = f.sync_all();
                // SAFETY: a valid descriptor; the call only advises the kernel.
                unsafe {
                    libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }
}

fn phase(kind: &str, dir: &Path, corpus: &Corpus, name: &str, args: &[String]) -> Res<String> {
    let num = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    match name {
        "import" => {
            let n = num(0, 1_000_000);
            let batch = num(1, 10_000);
            let _ = std::fs::remove_dir_all(dir);
            let t = Instant::now();
            let mut s = open(kind, dir)?;
            let mut i = 0;
            let mut worst = Duration::ZERO;
            while i < n {
                let end = (i + batch).min(n);
                let docs: Vec<(u64, Vec<u8>)> = (i..end).map(|j| (j, corpus.document(j, 1))).collect();
                let fns: Vec<Box<dyn Fn(u64) -> Vec<u8>>> = docs
                    .into_iter()
                    .map(|(_, d)| Box::new(move |_| d.clone()) as Box<dyn Fn(u64) -> Vec<u8>>)
                    .collect();
                let items: Vec<(String, &dyn Fn(u64) -> Vec<u8>)> =
                    (i..end).zip(fns.iter()).map(|(j, f)| (corpus.domain(j), f.as_ref())).collect();
                let c = Instant::now();
                s.put_batch(&items)?;
                worst = worst.max(c.elapsed());
                i = end;
            }
            drop(s);
            Ok(format!(
                "import_s={:.1} bytes={} worst_batch_ms={:.0} hwm_kib={}",
                t.elapsed().as_secs_f64(),
                disk_bytes(dir),
                worst.as_secs_f64() * 1e3,
                status_kib("VmHWM:")
            ))
        }
        "compact" => {
            let mut s = open(kind, dir)?;
            let t = Instant::now();
            s.compact()?;
            drop(s);
            evict(dir);
            Ok(format!("compact_s={:.1} bytes={}", t.elapsed().as_secs_f64(), disk_bytes(dir)))
        }
        "evict" => {
            evict(dir);
            Ok("evicted=1".into())
        }
        "scan" => {
            let t = Instant::now();
            let s = open(kind, dir)?;
            let opened = t.elapsed();
            // What a server keeps to know every domain: its name and seq.
            let mut index: HashMap<String, u64> = HashMap::new();
            let mut doc_bytes = 0usize;
            let mut max_seq = 0;
            s.scan(&mut |d, _rev, seq, len| {
                index.insert(d.to_string(), seq);
                doc_bytes += len;
                max_seq = max_seq.max(seq);
            })?;
            Ok(format!(
                "open_s={:.2} total_s={:.2} domains={} doc_mb={} hwm_kib={} rss_kib={}",
                opened.as_secs_f64(),
                t.elapsed().as_secs_f64(),
                index.len(),
                doc_bytes >> 20,
                status_kib("VmHWM:"),
                status_kib("VmRSS:")
            ))
        }
        "read" => {
            let n = num(0, 1_000_000);
            let k = num(1, 10_000);
            let s = open(kind, dir)?;
            let mut rng = Rng(7);
            let mut lat = Vec::with_capacity(k as usize);
            for _ in 0..k {
                let d = corpus.domain(rng.below(n));
                let t = Instant::now();
                let got = s.get(&d)?;
                lat.push(t.elapsed());
                if got.is_none() {
                    return Err(format!("{d} missing").into());
                }
            }
            Ok(format!("read_p50_ms={:.3} read_p99_ms={:.3}", pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
        }
        "write" => {
            // write N SINGLES G10 G100: SINGLES one-write commits, then G10 commits of 10 writes
            // and G100 of 100, each on random domains of the N.
            let n = num(0, 1_000_000);
            let mut s = open(kind, dir)?;
            let mut rng = Rng(11);
            let mut out = String::new();
            for (per, commits) in [(1u64, num(1, 2000)), (10, num(2, 300)), (100, num(3, 100))] {
                let mut lat = Vec::with_capacity(commits as usize);
                let t = Instant::now();
                for _ in 0..commits {
                    let ids: Vec<u64> = (0..per).map(|_| rng.below(n)).collect();
                    let fns: Vec<Box<dyn Fn(u64) -> Vec<u8>>> = ids
                        .iter()
                        .map(|&i| Box::new(move |rev| corpus.document(i, rev)) as Box<dyn Fn(u64) -> Vec<u8>>)
                        .collect();
                    let items: Vec<(String, &dyn Fn(u64) -> Vec<u8>)> =
                        ids.iter().zip(fns.iter()).map(|(&i, f)| (corpus.domain(i), f.as_ref())).collect();
                    let c = Instant::now();
                    s.put_batch(&items)?;
                    lat.push(c.elapsed());
                }
                let secs = t.elapsed().as_secs_f64();
                out += &format!(
                    "w{per}_per_s={:.0} w{per}_p50_ms={:.2} w{per}_p99_ms={:.2} ",
                    (per * commits) as f64 / secs,
                    pct(&mut lat, 0.5),
                    pct(&mut lat, 0.99)
                );
            }
            Ok(out.trim_end().to_string())
        }
        "crash-writer" => {
            // Single durable writes until killed; each acknowledged one is printed after its
            // commit returned.
            let n = num(0, 1_000_000);
            let mut s = open(kind, dir)?;
            let mut rng = Rng(std::process::id() as u64);
            let stdout = std::io::stdout();
            let mut o = stdout.lock();
            writeln!(o, "ready")?;
            o.flush()?;
            loop {
                let i = rng.below(n);
                let f = move |rev| corpus.document(i, rev);
                let d = corpus.domain(i);
                let revs = s.put_batch(&[(d.clone(), &f)])?;
                writeln!(o, "{d} {}", revs[0])?;
                o.flush()?;
            }
        }
        "verify" => {
            // verify ACKED: open after the kill, then check every acknowledged revision.
            let acked = std::fs::read_to_string(args.first().ok_or("verify ACKED_FILE")?)?;
            let t = Instant::now();
            let s = open(kind, dir)?;
            let opened = t.elapsed();
            let mut count = 0;
            s.scan(&mut |_, _, _, _| count += 1)?;
            let scanned = t.elapsed();
            let (mut checked, mut lost) = (0, 0);
            for line in acked.lines() {
                let Some((d, r)) = line.split_once(' ') else { continue };
                let r: u64 = r.parse()?;
                checked += 1;
                let cur = s.get(d)?.map(|(rev, _)| rev).unwrap_or(0);
                if cur < r || !s.has_history(d, r)? {
                    lost += 1;
                }
            }
            Ok(format!(
                "reopen_s={:.2} reopen_scan_s={:.2} domains={count} acked={checked} lost={lost}",
                opened.as_secs_f64(),
                scanned.as_secs_f64()
            ))
        }
        other => Err(format!("unknown phase {other}").into()),
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

fn child(kind: &str, dir: &Path, policies: &Path, phase: &str, args: &[String]) -> Res<HashMap<String, String>> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .arg("phase")
        .arg(kind)
        .arg(dir)
        .arg(policies)
        .arg(phase)
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{kind} {phase} failed: {text}").into());
    }
    eprintln!("  {kind:<18} {phase:<7} {}", text.trim());
    Ok(text
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect())
}

/// Starts a writer, kills it with SIGKILL after `secs`, and checks what it acknowledged.
fn crash(kind: &str, dir: &Path, policies: &Path, n: u64, secs: u64) -> Res<HashMap<String, String>> {
    let exe = std::env::current_exe()?;
    let mut c = Command::new(exe)
        .arg("phase")
        .arg(kind)
        .arg(dir)
        .arg(policies)
        .arg("crash-writer")
        .arg(n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = c.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut acked: HashMap<String, u64> = HashMap::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((d, r)) = line.split_once(' ') {
                if let Ok(r) = r.parse() {
                    acked.insert(d.to_string(), r);
                }
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_secs(secs));
    c.kill()?; // SIGKILL
    c.wait()?;
    let acked = reader.join().map_err(|_| "reader")?;
    let file = dir.with_extension("acked");
    let mut text = String::new();
    for (d, r) in &acked {
        text += &format!("{d} {r}\n");
    }
    std::fs::write(&file, text)?;
    let r = child(kind, dir, policies, "verify", &[file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    r
}

fn all(root: &Path, policies: &Path, n: u64, kinds: &[String]) -> Res<()> {
    let mut rows: Vec<(String, HashMap<String, String>)> = Vec::new();
    let s = |v: &[String]| v.to_vec();
    for kind in kinds {
        let dir = store_dir(root, kind);
        let mut m = HashMap::new();
        // The SQLite variants share one file and the redb ones another: import once, under the
        // durable setting.
        let imported = rows.iter().any(|(k, _)| store_dir(root, k) == dir);
        if !imported {
            m.extend(child(kind, &dir, policies, "import", &s(&[n.to_string(), "10000".into()]))?);
            evict(&dir);
            let cold = child(kind, &dir, policies, "scan", &[])?;
            let warm = child(kind, &dir, policies, "scan", &[])?;
            m.insert("cold_s".into(), cold["total_s"].clone());
            m.insert("cold_open_s".into(), cold["open_s"].clone());
            m.insert("cold_hwm_kib".into(), cold["hwm_kib"].clone());
            m.insert("warm_s".into(), warm["total_s"].clone());
            m.insert("warm_hwm_kib".into(), warm["hwm_kib"].clone());
            m.insert("domains".into(), cold["domains"].clone());
            m.extend(child(kind, &dir, policies, "read", &s(&[n.to_string(), "10000".into()]))?);
        }
        m.extend(child(kind, &dir, policies, "write", &s(&[n.to_string(), "2000".into(), "300".into(), "100".into()]))?);
        m.extend(crash(kind, &dir, policies, n, 5)?);
        rows.push((kind.clone(), m));
    }
    print_tables(&rows);
    Ok(())
}

fn print_tables(rows: &[(String, HashMap<String, String>)]) {
    let g = |m: &HashMap<String, String>, k: &str| m.get(k).cloned().unwrap_or_else(|| "-".into());
    let mib = |m: &HashMap<String, String>, k: &str| {
        m.get(k).and_then(|v| v.parse::<f64>().ok()).map(|v| format!("{:.0}", v / 1024.0)).unwrap_or("-".into())
    };
    let gb = |m: &HashMap<String, String>, k: &str| {
        m.get(k).and_then(|v| v.parse::<f64>().ok()).map(|v| format!("{:.2}", v / 1e9)).unwrap_or("-".into())
    };
    println!("\nDurable writes on a store of 1,000,000 domains (latency of the commit, ms)\n");
    println!("| store | 1 write p50 | 1 write p99 | writes/s @1 | @10: writes/s | @10: p99 | @100: writes/s | @100: p99 |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (k, m) in rows {
        println!(
            "| {k} | {} | {} | {} | {} | {} | {} | {} |",
            g(m, "w1_p50_ms"), g(m, "w1_p99_ms"), g(m, "w1_per_s"),
            g(m, "w10_per_s"), g(m, "w10_p99_ms"), g(m, "w100_per_s"), g(m, "w100_p99_ms")
        );
    }
    println!("\nImport, start, reads, crash\n");
    println!("| store | import 1M (s) | on disk (GB) | cold open+scan (s) | peak RSS (MiB) | warm open+scan (s) | read p50 (ms) | read p99 (ms) | reopen after kill -9 (s) | +scan (s) | acked / lost |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (k, m) in rows {
        println!(
            "| {k} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            g(m, "import_s"), gb(m, "bytes"), g(m, "cold_s"), mib(m, "cold_hwm_kib"), g(m, "warm_s"),
            g(m, "read_p50_ms"), g(m, "read_p99_ms"), g(m, "reopen_s"), g(m, "reopen_scan_s"),
            g(m, "acked"), g(m, "lost")
        );
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("phase") if args.len() >= 5 => {
            let corpus = Corpus::load(Path::new(&args[3]))?;
            let line = phase(&args[1], Path::new(&args[2]), &corpus, &args[4], &args[5..])?;
            println!("{line}");
            Ok(())
        }
        Some("all") if args.len() >= 3 => {
            let n = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
            let kinds: Vec<String> = match args.get(4) {
                Some(k) => k.split(',').map(String::from).collect(),
                None => KINDS.iter().map(|k| k.to_string()).collect(),
            };
            all(Path::new(&args[1]), Path::new(&args[2]), n, &kinds)
        }
        _ => {
            eprintln!(
                "usage: store-bench all STORE_ROOT POLICY_DIR [DOMAINS] [KINDS]\n       \
                 store-bench phase KIND DIR POLICY_DIR import|scan|read|write|crash-writer|verify [ARGS]\n\
                 KINDS: comma-separated of {}",
                KINDS.join(",")
            );
            std::process::exit(2)
        }
    }
}
