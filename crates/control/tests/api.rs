//! The per-domain API over HTTP, in-process, on a store in a temporary
//! directory. Envoy is a fake here (`RecordingEnvoy` records what it is
//! given); the real-Envoy tests are deploy/e2e/test_control_plane.py.

mod common;
use common::{call, RecordingEnvoy};

use origin_policy_control::{ServeConfig, Server};
use serde_json::json;
use std::net::SocketAddr;

struct Running {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
    runtime: tokio::runtime::Runtime,
}

fn start(store: &std::path::Path, envoy: RecordingEnvoy) -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let config = ServeConfig {
        store: store.to_path_buf(),
        listen: String::new(),
        watch: Vec::new(),
        settings: None,
        envoy: Box::new(envoy),
        fleet: None,
        replica: None,
        tls: None,
    };
    let server = Server::open(config, runtime.handle()).unwrap_or_else(|e| unreachable!("{e}"));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap_or_else(|e| unreachable!("{e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| unreachable!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(server.run(listener, async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        _stop: stop,
        runtime,
    }
}

fn policy(domain: &str, origin: &str) -> String {
    json!({"domain": domain, "primary": {"address": origin, "port": 80}}).to_string()
}

#[test]
fn a_domain_is_written_read_replaced_only_with_its_etag_and_removed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let envoy = RecordingEnvoy::default();
    let server = start(dir.path(), envoy.clone());
    let a = server.addr;
    let path = "/v1/domains/www.example.com";

    let created = call(
        a,
        "PUT",
        path,
        &[],
        &policy("www.example.com", "one.example.net"),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.header("etag"), Some("\"1\""));
    assert_eq!(created.json()["revision"], 1);
    let got = call(a, "GET", path, &[], "");
    assert_eq!(got.status, 200);
    assert_eq!(got.header("etag"), Some("\"1\""));
    assert_eq!(got.json()["primary"]["address"], "one.example.net");

    // The same document again is no new revision.
    let again = call(
        a,
        "PUT",
        path,
        &[],
        &policy("www.example.com", "one.example.net"),
    );
    assert_eq!(
        (again.status, again.json()["changed"].clone()),
        (200, json!(false))
    );

    let replaced = call(
        a,
        "PUT",
        path,
        &[("If-Match", "\"1\"")],
        &policy("www.example.com", "two.example.net"),
    );
    assert_eq!(replaced.status, 200, "{}", replaced.body);
    assert_eq!(replaced.header("etag"), Some("\"2\""));
    // A writer that read revision 1 is refused: 412, with the current revision.
    let stale = call(
        a,
        "PUT",
        path,
        &[("If-Match", "\"1\"")],
        &policy("www.example.com", "three.example.net"),
    );
    assert_eq!(stale.status, 412);
    assert_eq!(stale.json()["current_revision"], 2);
    let create_only = call(
        a,
        "PUT",
        path,
        &[("If-None-Match", "*")],
        &policy("www.example.com", "x.example.net"),
    );
    assert_eq!(create_only.status, 412);
    assert_eq!(
        call(a, "GET", path, &[], "").json()["primary"]["address"],
        "two.example.net"
    );

    // History, newest first, and a rollback to revision 1 as revision 3.
    let history = call(a, "GET", &format!("{path}/history"), &[], "").json();
    let revisions: Vec<u64> = history["revisions"]
        .as_array()
        .map(|l| l.iter().filter_map(|r| r["revision"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(revisions, vec![2, 1]);
    let back = call(
        a,
        "POST",
        &format!("{path}/rollback"),
        &[],
        "{\"revision\": 1}",
    );
    assert_eq!(
        (back.status, back.json()["revision"].clone()),
        (200, json!(3)),
        "{}",
        back.body
    );
    assert_eq!(
        call(a, "GET", path, &[], "").json()["primary"]["address"],
        "one.example.net"
    );
    assert_eq!(
        call(a, "GET", &format!("{path}?revision=2"), &[], "").json()["primary"]["address"],
        "two.example.net"
    );

    let removed = call(a, "DELETE", path, &[("If-Match", "\"3\"")], "");
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(call(a, "GET", path, &[], "").status, 404);
    assert_eq!(call(a, "DELETE", path, &[], "").status, 404);
    // Each new origin was handed to Envoy before its policy was written.
    assert!(envoy.0.lock().map(|s| s.len()).unwrap_or(0) >= 2);
}

#[test]
fn a_refused_policy_names_the_domain_the_pointer_and_the_fix_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let server = start(dir.path(), RecordingEnvoy::default());
    let a = server.addr;
    let bad = json!({"domain": "shop.example.com", "primary": {"address": "origin.example.net", "port": 0}});
    let refused = call(
        a,
        "PUT",
        "/v1/domains/shop.example.com",
        &[],
        &bad.to_string(),
    );
    assert_eq!(refused.status, 422, "{}", refused.body);
    let body = refused.json();
    assert_eq!(body["error"], "invalid_policy");
    assert_eq!(body["domain"], "shop.example.com");
    assert_eq!(body["findings"][0]["path"], "/primary/port");
    assert!(body["findings"][0]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    // The edge itself, or a network the settings do not allow: refused too.
    let edge =
        json!({"domain": "shop.example.com", "primary": {"address": "127.0.0.1", "port": 9901}});
    let refused = call(
        a,
        "PUT",
        "/v1/domains/shop.example.com",
        &[],
        &edge.to_string(),
    );
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert_eq!(refused.json()["findings"][0]["path"], "/primary/address");
    let misfiled = call(
        a,
        "PUT",
        "/v1/domains/img.example.com",
        &[],
        &policy("shop.example.com", "o.example.net"),
    );
    assert_eq!(misfiled.json()["findings"][0]["path"], "/domain");
    let not_json = call(
        a,
        "PUT",
        "/v1/domains/shop.example.com",
        &[],
        "{\"domain\":",
    );
    assert_eq!(not_json.status, 422);
    assert_eq!(
        call(a, "GET", "/v1/domains/shop.example.com", &[], "").status,
        404
    );

    // A dry run checks and answers, and writes nothing.
    let dry = call(
        a,
        "PUT",
        "/v1/domains/shop.example.com?dry_run=true",
        &[],
        &policy("shop.example.com", "o.example.net"),
    );
    assert_eq!(
        (dry.status, dry.json()["valid"].clone()),
        (200, json!(true)),
        "{}",
        dry.body
    );
    assert_eq!(
        call(a, "GET", "/v1/domains/shop.example.com", &[], "").status,
        404
    );
    assert_eq!(
        call(a, "GET", "/v1/domains/bad%20name", &[], "").status,
        400
    );
}

#[test]
fn an_import_writes_the_valid_lines_names_the_others_and_the_list_pages() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let server = start(dir.path(), RecordingEnvoy::default());
    let a = server.addr;
    let mut lines: Vec<String> = (0..250)
        .map(|i| policy(&format!("d{i:03}.example.com"), "origin.example.net"))
        .collect();
    lines.insert(
        7,
        "{\"domain\": \"broken.example.com\", \"primary\": {}}".to_owned(),
    );
    let imported = call(a, "POST", "/v1/import", &[], &lines.join("\n"));
    assert_eq!(imported.status, 207, "{}", imported.body);
    let body = imported.json();
    assert_eq!(body["written"], 250);
    assert_eq!(body["rejected"][0]["line"], 8);
    assert_eq!(body["rejected"][0]["domain"], "broken.example.com");

    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = call(
            a,
            "GET",
            &format!("/v1/domains?limit=100&after={after}"),
            &[],
            "",
        )
        .json();
        for d in page["domains"].as_array().into_iter().flatten() {
            seen.push(d["domain"].as_str().unwrap_or_default().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.first().map(String::as_str), Some("d000.example.com"));
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "pages overlap or are out of order"
    );
}

#[test]
fn what_was_acknowledged_is_there_after_a_restart_and_the_feed_continues() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
    let (epoch, version) = {
        let server = start(dir.path(), RecordingEnvoy::default());
        for i in 0..20 {
            let d = format!("r{i}.example.com");
            let put = call(
                server.addr,
                "PUT",
                &format!("/v1/domains/{d}"),
                &[],
                &policy(&d, "origin.example.net"),
            );
            assert_eq!(put.status, 201);
        }
        let status = call(server.addr, "GET", "/status", &[], "").json();
        drop(server._stop);
        // Every task dropped: the store's file lock goes with the last reference.
        server
            .runtime
            .shutdown_timeout(std::time::Duration::from_secs(5));
        (status["epoch"].clone(), status["version"].clone())
    };
    let server = start(dir.path(), RecordingEnvoy::default());
    let status = call(server.addr, "GET", "/status", &[], "").json();
    assert_eq!(
        (status["epoch"].clone(), status["version"].clone()),
        (epoch.clone(), version.clone())
    );
    assert_eq!(status["domains"], 20);
    // A node that had everything gets nothing new; one change is one line.
    let path = format!("/changes?since={version}&epoch={epoch}");
    let d = "r3.example.com";
    call(
        server.addr,
        "PUT",
        &format!("/v1/domains/{d}"),
        &[],
        &policy(d, "moved.example.net"),
    );
    let page = call(server.addr, "GET", &path, &[("x-feed-node", "n1")], "");
    assert_eq!(page.status, 200);
    let lines: Vec<&str> = page.body.lines().collect();
    assert_eq!(lines.len(), 1, "{}", page.body);
    assert!(lines[0].starts_with("r3.example.com\t") && lines[0].contains("moved.example.net"));
    let nodes = call(server.addr, "GET", "/status", &[], "").json()["nodes"].clone();
    assert_eq!(nodes["n1"]["version"], version);
}
