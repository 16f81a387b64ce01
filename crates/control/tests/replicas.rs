//! `serve --etcd`: two replicas in-process over a real 3-member etcd cluster
//! that the test starts (members on 127.0.0.61-63, client port 2379, peer
//! port 2380, data in a temporary directory; Debian's `etcd-server`). Envoy
//! is a fake that records what it is given, as in tests/api.rs.
//!
//! The tests share the members' addresses, so they run one at a time.

mod common;
use common::{call, RecordingEnvoy, Reply};

use origin_policy_control::envoy::EnvoyConfig;
use origin_policy_control::etcd::EtcdTls;
use origin_policy_control::replica::ReplicaConfig;
use origin_policy_control::{ServeConfig, Server};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A wide limit for things that take milliseconds: correctness, not speed.
const WITHIN: Duration = Duration::from_secs(15);

/// Until `done` holds, within [`WITHIN`]; whether it did.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < WITHIN {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

const MEMBERS: usize = 3;

fn member_ip(i: usize) -> String {
    format!("127.0.0.{}", 61 + i)
}

fn client_addr(i: usize) -> SocketAddr {
    format!("{}:2379", member_ip(i))
        .parse()
        .unwrap_or_else(|e| unreachable!("{e}"))
}

/// Where a member says whether it has a leader: its client URL, or with
/// TLS its plain-HTTP metrics URL (`--listen-metrics-urls`).
fn health_addr(i: usize, tls: bool) -> SocketAddr {
    if !tls {
        return client_addr(i);
    }
    format!("{}:2381", member_ip(i))
        .parse()
        .unwrap_or_else(|e| unreachable!("{e}"))
}

/// A certificate and its key, as PEM files.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

/// A CA made for a test (rcgen), the certificates it issued in its
/// directory: one per member (server and client use, the member's IP) at
/// creation, and client certificates on demand.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let key = KeyPair::generate().unwrap_or_else(|e| unreachable!("{e}"));
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap_or_else(|e| unreachable!("{e}"));
        let pki = Pki {
            dir,
            ca,
            issuer: rcgen::Issuer::new(params, key),
        };
        for i in 0..MEMBERS {
            pki.issue(&format!("m{i}"), vec![member_ip(i)], true);
        }
        pki
    }

    fn issue(&self, name: &str, ips: Vec<String>, server: bool) -> Pem {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap_or_else(|e| unreachable!("{e}"));
        let mut params = CertificateParams::new(ips).unwrap_or_else(|e| unreachable!("{e}"));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let pem = self.member_files(name);
        std::fs::write(&pem.cert, cert.pem()).unwrap_or_else(|e| unreachable!("{e}"));
        std::fs::write(&pem.key, key.serialize_pem()).unwrap_or_else(|e| unreachable!("{e}"));
        pem
    }

    fn member_files(&self, name: &str) -> Pem {
        Pem {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        }
    }

    fn member(&self, i: usize) -> Pem {
        self.member_files(&format!("m{i}"))
    }

    /// A replica's files: a client certificate of this CA, this CA trusted.
    fn client(&self, name: &str) -> EtcdTls {
        let pem = self.issue(name, Vec::new(), false);
        EtcdTls {
            ca: self.ca.clone(),
            cert: pem.cert,
            key: pem.key,
        }
    }
}

/// A 3-member etcd cluster of its own, killed when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    members: Vec<Option<Child>>,
    /// Members with TLS on their client URLs and client-cert-auth.
    tls: Option<Pki>,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(None)
    }

    fn start_with(tls: Option<Pki>) -> Cluster {
        let installed = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            installed,
            "`etcd` is not installed: these tests run a real 3-member etcd cluster (Debian: apt-get install etcd-server; scripts/setup does)"
        );
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let mut cluster = Cluster {
            dir,
            members: (0..MEMBERS).map(|_| None).collect(),
            tls,
        };
        for i in 0..MEMBERS {
            cluster.start_member(i);
        }
        assert!(
            eventually(|| cluster.healthy()),
            "the etcd cluster did not become healthy; its logs are in {}",
            cluster.dir.path().display()
        );
        cluster
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn endpoints(&self) -> Vec<String> {
        (0..MEMBERS)
            .map(|i| format!("{}://{}", self.scheme(), client_addr(i)))
            .collect()
    }

    fn start_member(&mut self, i: usize) {
        let ip = member_ip(i);
        let initial: Vec<String> = (0..MEMBERS)
            .map(|m| format!("m{m}=http://{}:2380", member_ip(m)))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("m{i}.log")))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let scheme = self.scheme();
        let mut command = Command::new("etcd");
        if let Some(pki) = &self.tls {
            // Client URLs: TLS, and only clients with a certificate of the
            // CA. Peers stay plain here (--peer-* would do the same for them).
            let member = pki.member(i);
            command
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--cert-file")
                .arg(&member.cert)
                .arg("--key-file")
                .arg(&member.key)
                .args(["--listen-metrics-urls", &format!("http://{ip}:2381")]);
        }
        let child = command
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{i}")))
            .args(["--listen-client-urls", &format!("{scheme}://{ip}:2379")])
            .args(["--advertise-client-urls", &format!("{scheme}://{ip}:2379")])
            .args(["--listen-peer-urls", &format!("http://{ip}:2380")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
            ])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "origin-policy-test"])
            // Quicker elections than the defaults (100/1000 ms) keep the test short.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| unreachable!("etcd: {e}"));
        self.members[i] = Some(child);
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every running member says it is healthy (it has a leader).
    fn healthy(&self) -> bool {
        (0..MEMBERS)
            .filter(|i| self.members[*i].is_some())
            .all(|i| {
                call(
                    health_addr(i, self.tls.is_some()),
                    "GET",
                    "/health",
                    &[],
                    "",
                )
                .json()["health"]
                    == "true"
            })
    }

    /// The member that leads now, if one does.
    fn leader(&self) -> Option<usize> {
        (0..MEMBERS).find(|&i| {
            self.members[i].is_some() && {
                let status =
                    call(client_addr(i), "POST", "/v3/maintenance/status", &[], "{}").json();
                status["leader"].is_string() && status["leader"] == status["header"]["member_id"]
            }
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..MEMBERS {
            self.kill_member(i);
        }
    }
}

struct Replica {
    addr: SocketAddr,
    /// Its ADS server, when started with one.
    ads: Option<origin_policy_control::AdsServer>,
    _stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
    runtime: tokio::runtime::Runtime,
}

impl Replica {
    fn start(name: &str, store: &Path, endpoints: Vec<String>) -> Replica {
        Replica::start_with(name, store, endpoints, false)
    }

    /// With `ads`, it serves ADS too (`--ads`, on a port of its own).
    fn start_with(name: &str, store: &Path, endpoints: Vec<String>, ads: bool) -> Replica {
        let replica = Replica::open(name, store, endpoints, ads, None);
        replica.wait_serving();
        replica
    }

    /// Over TLS to etcd, with these files.
    fn start_tls(name: &str, store: &Path, endpoints: Vec<String>, tls: EtcdTls) -> Replica {
        let replica = Replica::open(name, store, endpoints, false, Some(tls));
        replica.wait_serving();
        replica
    }

    /// Until it serves: a replica that has not reached etcd yet listens
    /// after a while, answering 503.
    fn wait_serving(&self) {
        assert!(
            eventually(|| call(self.addr, "GET", "/healthz", &[], "").status == 200),
            "{}",
            self.status()
        );
    }

    fn open(
        name: &str,
        store: &Path,
        endpoints: Vec<String>,
        ads: bool,
        tls: Option<EtcdTls>,
    ) -> Replica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| unreachable!("{e}"));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap_or_else(|e| unreachable!("{e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| unreachable!("{e}"));
        let fleet = ads.then(|| {
            use origin_policy_control::ads::EnvoyAds;
            use origin_policy_control::rollout::Fleet;
            let fleet = Arc::new(Fleet::new(None));
            let server = origin_policy_control::AdsServer::new();
            fleet.set_ads(server.clone());
            // Any bytes: the module is copied and named, not run.
            let wasm = store.join("filter.wasm");
            std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap_or_else(|e| unreachable!("{e}"));
            let envoy = Arc::new(EnvoyAds::new(
                server,
                fleet.clone(),
                wasm.clone(),
                store.join("modules"),
                Duration::from_secs(2),
            ));
            origin_policy_control::FleetServe {
                ads_listen: "127.0.0.1:0".to_owned(),
                envoy,
                fleet,
                wasm,
            }
        });
        let ads = fleet.as_ref().map(|f| f.envoy.ads.clone());
        let envoy: Box<dyn EnvoyConfig> = match &fleet {
            Some(f) => Box::new(f.envoy.clone()),
            None => Box::new(RecordingEnvoy::default()),
        };
        let config = ServeConfig {
            store: store.to_path_buf(),
            listen: String::new(),
            watch: Vec::new(),
            settings: None,
            envoy,
            fleet,
            replica: Some(ReplicaConfig {
                endpoints,
                name: name.to_owned(),
                api: format!("http://{addr}"),
                ads: ads.as_ref().map(|_| "127.0.0.1:0".to_owned()),
                tls,
            }),
            tls: None,
        };
        let server = Server::open(config, runtime.handle()).unwrap_or_else(|e| unreachable!("{e}"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = runtime.spawn(server.run(listener, async move {
            let _ = stopped.await;
        }));
        Replica {
            addr,
            ads,
            _stop: stop,
            running,
            runtime,
        }
    }

    fn stop(self) {
        drop(self._stop);
        // As `serve` on SIGTERM: the server returns, having left etcd.
        let running = self.running;
        let _ = self
            .runtime
            .block_on(async move { tokio::time::timeout(Duration::from_secs(5), running).await });
        self.runtime.shutdown_timeout(Duration::from_secs(5));
    }

    fn put(&self, domain: &str, origin: &str, headers: &[(&str, &str)]) -> Reply {
        call(
            self.addr,
            "PUT",
            &format!("/v1/domains/{domain}"),
            headers,
            &policy(domain, origin),
        )
    }

    fn get(&self, domain: &str) -> Reply {
        call(self.addr, "GET", &format!("/v1/domains/{domain}"), &[], "")
    }

    /// The origin this replica serves for `domain`.
    fn origin(&self, domain: &str) -> Option<String> {
        self.get(domain).json()["primary"]["address"]
            .as_str()
            .map(str::to_owned)
    }

    fn status(&self) -> Value {
        call(self.addr, "GET", "/status", &[], "").json()
    }

    fn changes(&self, since: &str, epoch: &str) -> Reply {
        call(
            self.addr,
            "GET",
            &format!("/changes?since={since}&epoch={epoch}"),
            &[("x-feed-node", "edge-1")],
            "",
        )
    }

    fn history(&self, domain: &str) -> Vec<(u64, u64)> {
        let history = call(
            self.addr,
            "GET",
            &format!("/v1/domains/{domain}/history"),
            &[],
            "",
        )
        .json();
        history["revisions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["revision"].as_u64()?, r["version"].as_u64()?)))
            .collect()
    }

    fn events(&self) -> Vec<String> {
        self.status()["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["event"].as_str().map(str::to_owned))
            .collect()
    }
}

fn policy(domain: &str, origin: &str) -> String {
    json!({"domain": domain, "primary": {"address": origin, "port": 80}}).to_string()
}

fn stores() -> (tempfile::TempDir, tempfile::TempDir) {
    (
        tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}")),
        tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}")),
    )
}

#[test]
fn a_write_through_either_replica_is_served_by_both_at_the_same_versions() {
    let _one = one_at_a_time();
    let cluster = Cluster::start();
    let (s1, s2) = stores();
    let r1 = Replica::start("r1", s1.path(), cluster.endpoints());
    let r2 = Replica::start("r2", s2.path(), cluster.endpoints());

    let created = r1.put(
        "shop.example.com",
        "one.example.net",
        &[("If-None-Match", "*")],
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let v1 = created.json()["version"].as_u64().unwrap_or(0);
    // Read your writes: the replica that answered serves it at once.
    assert_eq!(
        r1.origin("shop.example.com").as_deref(),
        Some("one.example.net")
    );
    assert!(eventually(
        || r2.get("shop.example.com").header("etag") == Some("\"1\"")
    ));

    // A precondition holds across replicas: r2 writes with revision 1's
    // ETag; r1, asked with the same stale ETag, refuses.
    let replaced = r2.put(
        "shop.example.com",
        "two.example.net",
        &[("If-Match", "\"1\"")],
    );
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    assert_eq!(replaced.json()["revision"], 2);
    let v2 = replaced.json()["version"].as_u64().unwrap_or(0);
    assert!(v2 > v1);
    let stale = r1.put(
        "shop.example.com",
        "three.example.net",
        &[("If-Match", "\"1\"")],
    );
    assert_eq!(stale.status, 412, "{}", stale.body);
    assert_eq!(stale.json()["current_revision"], 2);
    let create_only = r1.put(
        "shop.example.com",
        "x.example.net",
        &[("If-None-Match", "*")],
    );
    assert_eq!(create_only.status, 412, "{}", create_only.body);
    // The same document again through the other replica: no new revision.
    let again = r1.put("shop.example.com", "two.example.net", &[]);
    assert_eq!(
        (again.status, again.json()["changed"].clone()),
        (200, json!(false))
    );
    assert_eq!(
        r1.origin("shop.example.com").as_deref(),
        Some("two.example.net")
    );

    // History, with the same feed versions on both.
    assert_eq!(r2.history("shop.example.com"), vec![(2, v2), (1, v1)]);
    assert!(eventually(
        || r1.history("shop.example.com") == vec![(2, v2), (1, v1)]
    ));

    // An import through r2, served by r1.
    let lines: Vec<String> = (0..40)
        .map(|i| policy(&format!("d{i:02}.example.com"), "origin.example.net"))
        .collect();
    let imported = call(r2.addr, "POST", "/v1/import", &[], &lines.join("\n"));
    assert_eq!(imported.status, 200, "{}", imported.body);
    assert_eq!(imported.json()["written"], 40);
    let latest = imported.json()["version"].as_u64().unwrap_or(0);
    assert!(eventually(
        || r1.status()["version"].as_u64() == Some(latest)
    ));

    // The same feed from both: the epoch, the versions and the pages.
    let (st1, st2) = (r1.status(), r2.status());
    assert_eq!(st1["epoch"], st2["epoch"]);
    assert_eq!(
        (st1["domains"].clone(), st2["domains"].clone()),
        (json!(41), json!(41))
    );
    let epoch = st1["epoch"].to_string();
    let (p1, p2) = (r1.changes("0", ""), r2.changes("0", ""));
    assert_eq!((p1.status, p2.status), (200, 200));
    assert_eq!(p1.header("x-feed-epoch"), Some(epoch.as_str()));
    assert_eq!(p1.header("x-feed-version"), p2.header("x-feed-version"));
    assert_eq!(
        p1.header("x-feed-version"),
        Some(latest.to_string().as_str())
    );
    let sorted = |body: &str| {
        let mut lines: Vec<String> = body.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(&p1.body), sorted(&p2.body));
    assert_eq!(p1.body.lines().count(), 41);
    // A node at v2 gets the import's 40 lines, and nothing else, from either.
    let (q1, q2) = (
        r1.changes(&v2.to_string(), &epoch),
        r2.changes(&v2.to_string(), &epoch),
    );
    assert_eq!((q1.body.lines().count(), q2.body.lines().count()), (40, 40));
    assert_eq!(q1.header("x-feed-reset"), None);

    // A node moving to a replica that has not applied its version yet is
    // held until it has, not sent a snapshot.
    let moved = r1.put("d07.example.com", "moved.example.net", &[]);
    let v3 = moved.json()["version"].as_u64().unwrap_or(0);
    let page = r2.changes(&v3.to_string(), &epoch);
    assert!(matches!(page.status, 200 | 204), "{}", page.body);
    assert_eq!(page.header("x-feed-reset"), None);
    assert_eq!(page.header("x-feed-version"), Some(v3.to_string().as_str()));

    // A removal through one, gone from both.
    let removed = call(r1.addr, "DELETE", "/v1/domains/d03.example.com", &[], "");
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(r1.get("d03.example.com").status, 404);
    assert!(eventually(|| r2.get("d03.example.com").status == 404));

    // Each lists the other, and says its store is etcd and connected.
    for st in [r1.status(), r2.status()] {
        assert_eq!(st["store"]["kind"], "etcd");
        assert_eq!(st["store"]["state"], "connected");
        assert!(
            st["replicas"]["r1"]["api"].is_string() && st["replicas"]["r2"]["api"].is_string(),
            "{st}"
        );
    }
    assert_eq!(
        r2.status()["replicas"]["r1"]["api"],
        format!("http://{}", r1.addr)
    );
    assert_eq!(
        call(r1.addr, "GET", "/healthz", &[], "").json(),
        json!({"serving": true})
    );
    // r1 stops: r2 lists it as gone.
    r1.stop();
    assert!(eventually(|| r2.status()["replicas"]["r1"].is_null()));
    assert!(r2.events().iter().any(|e| e == "replica_left"));
    r2.stop();
}

#[test]
fn a_restarted_replica_catches_up_from_where_it_was() {
    let _one = one_at_a_time();
    let cluster = Cluster::start();
    let (s1, s2) = stores();
    let r1 = Replica::start("r1", s1.path(), cluster.endpoints());
    let r2 = Replica::start("r2", s2.path(), cluster.endpoints());
    for i in 0..10 {
        let put = r1.put(&format!("c{i}.example.com"), "a.example.net", &[]);
        assert_eq!(put.status, 201, "{}", put.body);
    }
    let before = r1.status()["version"].as_u64().unwrap_or(0);
    assert!(eventually(
        || r2.status()["version"].as_u64() == Some(before)
    ));
    let epoch = r2.status()["epoch"].to_string();
    r2.stop();

    // While r2 is down: c0 changed twice, ten new domains.
    assert_eq!(r1.put("c0.example.com", "b.example.net", &[]).status, 200);
    assert_eq!(r1.put("c0.example.com", "c.example.net", &[]).status, 200);
    for i in 10..20 {
        assert_eq!(
            r1.put(&format!("c{i}.example.com"), "a.example.net", &[])
                .status,
            201
        );
    }
    let latest = r1.status()["version"].as_u64().unwrap_or(0);

    // Open returns once it has caught up.
    let r2 = Replica::start("r2", s2.path(), cluster.endpoints());
    let status = r2.status();
    assert_eq!(status["version"].as_u64(), Some(latest));
    assert_eq!(status["domains"], 20);
    assert_eq!(status["epoch"].to_string(), epoch);
    assert_eq!(
        r2.origin("c0.example.com").as_deref(),
        Some("c.example.net")
    );
    // It followed etcd's history from its watermark, revision by revision:
    // both revisions written while it was away are in its history.
    let revisions: Vec<u64> = r2.history("c0.example.com").iter().map(|r| r.0).collect();
    assert_eq!(revisions, vec![3, 2, 1]);
    // A node that was at `before` on r2 gets just what changed since.
    let page = r2.changes(&before.to_string(), &epoch);
    assert_eq!(page.status, 200);
    assert_eq!(page.header("x-feed-reset"), None);
    assert_eq!(page.body.lines().count(), 11, "{}", page.body);
    assert!(r2.events().iter().any(|e| e == "caught_up"));

    // Away again, while etcd compacts its history past r2's watermark: r2
    // resyncs every domain from etcd at one revision instead.
    r2.stop();
    assert_eq!(r1.put("c0.example.com", "d.example.net", &[]).status, 200);
    assert_eq!(r1.put("c0.example.com", "e.example.net", &[]).status, 200);
    let removed = call(r1.addr, "DELETE", "/v1/domains/c1.example.com", &[], "");
    assert_eq!(removed.status, 200);
    let latest = r1.status()["version"].as_u64().unwrap_or(0);
    let compacted = call(
        client_addr(0),
        "POST",
        "/v3/kv/compaction",
        &[],
        &json!({"revision": latest.to_string(), "physical": true}).to_string(),
    );
    assert_eq!(compacted.status, 200, "{}", compacted.body);
    let r2 = Replica::start("r2", s2.path(), cluster.endpoints());
    let status = r2.status();
    assert_eq!(status["version"].as_u64(), Some(latest));
    assert_eq!(status["domains"], 19);
    assert_eq!(
        r2.origin("c0.example.com").as_deref(),
        Some("e.example.net")
    );
    assert_eq!(r2.get("c1.example.com").status, 404);
    // Revision 4 was compacted away before r2 saw it: its history has the
    // revision current at the resync, after those it had.
    let revisions: Vec<u64> = r2.history("c0.example.com").iter().map(|r| r.0).collect();
    assert_eq!(revisions, vec![5, 3, 2, 1]);
    // The same versions as r1: a node r1 brought to `latest` has everything.
    let page = r2.changes(&latest.to_string(), &epoch);
    assert_eq!((page.status, page.body.as_str()), (204, ""));
    r1.stop();
    r2.stop();
}

#[test]
fn writes_go_on_without_one_member_and_stop_without_a_quorum_until_it_is_back() {
    let _one = one_at_a_time();
    let mut cluster = Cluster::start();
    let (s1, s2) = stores();
    let r1 = Replica::start_with("r1", s1.path(), cluster.endpoints(), true);
    let r2 = Replica::start("r2", s2.path(), cluster.endpoints());
    assert_eq!(r1.put("q.example.com", "a.example.net", &[]).status, 201);
    let ads = r1.ads.clone().unwrap_or_default();
    assert_eq!(ads.not_serving(), None);
    assert!(eventually(
        || r2.status()["replicas"]["r1"]["ads"] == "127.0.0.1:0"
    ));

    // One member of three killed (the leader: the harder case).
    let leader = cluster.leader().unwrap_or(0);
    cluster.kill_member(leader);
    let put = r2.put("q.example.com", "b.example.net", &[]);
    assert_eq!(put.status, 200, "{}", put.body);
    let put = r1.put("q2.example.com", "b.example.net", &[]);
    assert_eq!(put.status, 201, "{}", put.body);
    assert!(eventually(
        || r1.origin("q.example.com").as_deref() == Some("b.example.net")
    ));
    for r in [&r1, &r2] {
        assert_eq!(call(r.addr, "GET", "/healthz", &[], "").status, 200);
    }

    // A second: no quorum. A write is refused, saying so; neither replica
    // serves; the events say why.
    let second = (0..MEMBERS).find(|&i| i != leader).unwrap_or(1);
    cluster.kill_member(second);
    let refused = r1.put("q.example.com", "c.example.net", &[]);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"], "store_unavailable");
    for r in [&r1, &r2] {
        assert!(eventually(|| call(r.addr, "GET", "/healthz", &[], "")
            .status
            == 503));
        let health = call(r.addr, "GET", "/healthz", &[], "").json();
        assert_eq!(health["serving"], false);
        assert!(
            health["reason"]
                .as_str()
                .is_some_and(|why| why.contains("unreachable")),
            "{health}"
        );
        let status = r.status();
        assert_eq!(status["store"]["state"], "unreachable");
        assert!(status["store"]["error"].is_string());
        assert!(
            r.events().iter().any(|e| e == "store_unreachable"),
            "{status}"
        );
        assert_eq!(r.changes("0", "").status, 503);
    }
    assert!(r1.events().iter().any(|e| e == "write_refused"));
    // Its ADS ends its streams and refuses new ones (crates/xds tests how).
    assert!(ads
        .not_serving()
        .is_some_and(|why| why.contains("unreachable")));
    let later = r2.put("q.example.com", "c.example.net", &[]);
    assert_eq!(later.json()["error"], "store_unavailable", "{}", later.body);

    // Both back: both serve again, and a write lands on both.
    cluster.start_member(leader);
    cluster.start_member(second);
    for r in [&r1, &r2] {
        assert!(eventually(|| call(r.addr, "GET", "/healthz", &[], "")
            .status
            == 200));
        let events = r.events();
        assert!(events.iter().any(|e| e == "store_reachable"), "{events:?}");
        assert_eq!(
            events.last().map(String::as_str),
            Some("caught_up"),
            "{events:?}"
        );
        assert_eq!(r.status()["store"]["state"], "connected");
    }
    assert_eq!(ads.not_serving(), None);
    let landed = r2.put("q.example.com", "d.example.net", &[]);
    assert_eq!(landed.status, 200, "{}", landed.body);
    assert_eq!(r2.origin("q.example.com").as_deref(), Some("d.example.net"));
    assert!(eventually(
        || r1.origin("q.example.com").as_deref() == Some("d.example.net")
    ));
    r1.stop();
    r2.stop();
}

#[test]
fn no_acknowledged_write_is_lost_by_concurrent_writers_across_a_member_kill() {
    let _one = one_at_a_time();
    let mut cluster = Cluster::start();
    let (s1, s2) = stores();
    let r1 = Arc::new(Replica::start("r1", s1.path(), cluster.endpoints()));
    let r2 = Arc::new(Replica::start("r2", s2.path(), cluster.endpoints()));
    const WRITERS: usize = 4;
    const WRITES: usize = 40;
    // Per writer: its domain, the last value acknowledged, the last tried.
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let replica = if w % 2 == 0 { r1.clone() } else { r2.clone() };
            std::thread::spawn(move || {
                let domain = format!("w{w}.example.com");
                let (mut acknowledged, mut tried) = (None, 0);
                for i in 0..WRITES {
                    tried = i;
                    let put = replica.put(&domain, &format!("v{i}.example.net"), &[]);
                    if matches!(put.status, 200 | 201) {
                        acknowledged = Some(i);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (domain, acknowledged, tried)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let leader = cluster.leader().unwrap_or(0);
    cluster.kill_member(leader);
    let outcomes: Vec<(String, Option<usize>, usize)> = writers
        .into_iter()
        .map(|w| w.join().unwrap_or_else(|_| unreachable!("a writer failed")))
        .collect();
    cluster.start_member(leader);
    for (domain, acknowledged, tried) in outcomes {
        // With two members of three every write should land.
        assert_eq!(
            acknowledged,
            Some(WRITES - 1),
            "{domain}: not every write was acknowledged"
        );
        for r in [&r1, &r2] {
            assert!(
                eventually(|| {
                    let origin = r.origin(&domain).unwrap_or_default();
                    let value: Option<usize> = origin
                        .strip_prefix('v')
                        .and_then(|v| v.split('.').next())
                        .and_then(|v| v.parse().ok());
                    value.is_some_and(|v| Some(v) >= acknowledged && v <= tried)
                }),
                "{domain}: {:?} served, acknowledged {acknowledged:?}",
                r.origin(&domain)
            );
        }
    }
    for r in [r1, r2] {
        if let Ok(r) = Arc::try_unwrap(r) {
            r.stop();
        }
    }
}

#[test]
fn replicas_reach_etcd_over_tls_and_one_with_a_certificate_of_another_ca_cannot() {
    let _one = one_at_a_time();
    let pki = Pki::new("origin-policy test etcd CA");
    let (t1, t2) = (pki.client("r1"), pki.client("r2"));
    // This CA trusted, but a client certificate of another CA: etcd
    // (--client-cert-auth) refuses it.
    let other = Pki::new("another CA");
    let foreign = EtcdTls {
        ca: pki.ca.clone(),
        ..other.client("r3")
    };
    let cluster = Cluster::start_with(Some(pki));
    let endpoints = cluster.endpoints();
    assert!(endpoints.iter().all(|e| e.starts_with("https://")));
    let (s1, s2) = stores();
    let s3 = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    // It waits for etcd before it listens: meanwhile the others start.
    let opening = {
        let (store, endpoints) = (s3.path().to_path_buf(), endpoints.clone());
        std::thread::spawn(move || Replica::open("r3", &store, endpoints, false, Some(foreign)))
    };
    let r1 = Replica::start_tls("r1", s1.path(), endpoints.clone(), t1);
    let r2 = Replica::start_tls("r2", s2.path(), endpoints.clone(), t2);

    let created = r1.put("tls.example.com", "one.example.net", &[]);
    assert_eq!(created.status, 201, "{}", created.body);
    assert!(eventually(
        || r2.origin("tls.example.com").as_deref() == Some("one.example.net")
    ));
    let replaced = r2.put(
        "tls.example.com",
        "two.example.net",
        &[("If-Match", "\"1\"")],
    );
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    assert!(eventually(
        || r1.origin("tls.example.com").as_deref() == Some("two.example.net")
    ));
    assert_eq!(r1.status()["store"]["endpoints"], json!(endpoints));
    assert!(eventually(
        || r1.status()["replicas"]["r2"]["api"].is_string()
    ));

    let r3 = opening
        .join()
        .unwrap_or_else(|_| unreachable!("r3 did not open"));
    let health = call(r3.addr, "GET", "/healthz", &[], "");
    assert_eq!(health.status, 503, "{}", health.body);
    // Why, in its words: the members' alert for its certificate.
    let tls_refused = |why: &str| why.contains("TLS") && why.contains("BadCertificate");
    let reason = health.json()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(tls_refused(&reason), "{reason}");
    let refused = r3.put("tls.example.com", "three.example.net", &[]);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"], "store_unavailable");
    let message = refused.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(tls_refused(&message), "{message}");
    let status = r3.status();
    assert_eq!(status["store"]["state"], "unreachable", "{status}");
    assert!(r1.status()["replicas"]["r3"].is_null());
    assert_eq!(
        r1.origin("tls.example.com").as_deref(),
        Some("two.example.net")
    );
    r3.stop();
    r1.stop();
    r2.stop();
}
