//! A real Envoy (`.venv/bin/envoy`, installed by `WITH_ENVOY=1 scripts/setup`)
//! on ADS against the server in this process: it takes a cluster list, ACKs
//! it, NACKs an invalid one with its own message and keeps what it had.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use origin_policy_xds::{AdsServer, NodeSelector, NodeStatus, XdsResources, CLUSTER_TYPE};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep, timeout};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const NODE: &str = "xds-envoy-test";
const WAIT: Duration = Duration::from_secs(30);

fn envoy_binary() -> TestResult<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/envoy");
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: install it with `WITH_ENVOY=1 scripts/setup`",
            path.display()
        )
        .into())
    }
}

fn bootstrap(ads_port: u16) -> Value {
    json!({
        "node": {"id": NODE, "cluster": "origin-policy-fleet"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {
                    "cluster_name": "control_plane",
                    "retry_policy": {"retry_back_off": {"base_interval": "0.2s", "max_interval": "1s"}}
                }}]
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {"clusters": [{
            "name": "control_plane",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }
            },
            "load_assignment": {"cluster_name": "control_plane", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ads_port}}}}
            ]}]}
        }]}
    })
}

fn cluster(name: &str, address: &str) -> Value {
    json!({
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": address, "port_value": 60081}}}}
        ]}]}
    })
}

fn clusters(list: &[(&str, &str)]) -> TestResult<Arc<XdsResources>> {
    let list: Vec<Value> = list.iter().map(|(n, a)| cluster(n, a)).collect();
    Ok(Arc::new(XdsResources::from_json(&list, &[])?))
}

/// Envoy, killed when dropped.
struct Envoy {
    child: Child,
    dir: PathBuf,
}

impl Envoy {
    async fn start(ads_port: u16) -> TestResult<Self> {
        let binary = envoy_binary()?;
        let dir = std::env::temp_dir().join(format!("xds-envoy-ads-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("envoy.json");
        std::fs::write(&config, serde_json::to_vec(&bootstrap(ads_port))?)?;
        let _ = std::fs::remove_file(dir.join("admin-address"));
        let log = std::fs::File::create(dir.join("envoy.log"))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(dir.join("admin-address"))
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Envoy { child, dir })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    async fn admin(&mut self) -> TestResult<String> {
        let path = self.dir.join("admin-address");
        for _ in 0..300 {
            if let Ok(address) = std::fs::read_to_string(&path) {
                if !address.trim().is_empty() {
                    return Ok(address.trim().to_owned());
                }
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("Envoy exited with {status}:\n{}", self.log()).into());
            }
            sleep(Duration::from_millis(100)).await;
        }
        Err(format!("Envoy wrote no admin address:\n{}", self.log()).into())
    }
}

async fn get(address: &str, path: &str) -> TestResult<String> {
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Err(format!("no HTTP response: {response}").into());
    };
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(body.to_owned());
    }
    let (mut rest, mut whole) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 || after.len() < size {
            break;
        }
        whole.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    Ok(whole)
}

/// The names of the clusters Envoy has from CDS.
async fn dynamic_clusters(admin: &str) -> TestResult<Vec<String>> {
    let dump: Value =
        serde_json::from_str(&get(admin, "/config_dump?resource=dynamic_active_clusters").await?)?;
    let mut names: Vec<String> = dump["configs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

async fn wait_for(
    status: &mut watch::Receiver<Vec<NodeStatus>>,
    envoy: &Envoy,
    what: &str,
    done: impl FnMut(&NodeStatus) -> bool,
) -> TestResult<NodeStatus> {
    let mut done = done;
    let found = timeout(
        WAIT,
        status.wait_for(|nodes| nodes.iter().any(|n| n.id == NODE && done(n))),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .and_then(|nodes| nodes.iter().find(|n| n.id == NODE).cloned());
    found.ok_or_else(|| {
        format!(
            "{what}: not within {WAIT:?}; status {:?}\n{}",
            status.borrow().clone(),
            envoy.log()
        )
        .into()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_acks_clusters_and_nacks_an_invalid_one() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let ads_port = listener.local_addr()?.port();
    let server = AdsServer::new();
    let first = clusters(&[("origin-a", "127.0.0.1")])?;
    server.set_target(NodeSelector::All, first.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn({
        let server = server.clone();
        async move {
            server
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let mut status = server.watch_status();
    let mut envoy = Envoy::start(ads_port).await?;
    let admin = envoy.admin().await?;

    let node = wait_for(&mut status, &envoy, "ACK of the first clusters", |n| {
        n.runs_target(CLUSTER_TYPE)
    })
    .await?;
    assert!(node.connected);
    assert_eq!(dynamic_clusters(&admin).await?, ["origin-a"]);

    let second = clusters(&[("origin-a", "127.0.0.1"), ("origin-b", "127.0.0.2")])?;
    server.set_target(NodeSelector::All, second.clone());
    wait_for(&mut status, &envoy, "ACK of the second clusters", |n| {
        n.acked(CLUSTER_TYPE) == second.version(CLUSTER_TYPE)
    })
    .await?;
    assert_eq!(dynamic_clusters(&admin).await?, ["origin-a", "origin-b"]);

    // Valid for the schema, refused by Envoy: a STATIC cluster needs an IP.
    let invalid = clusters(&[
        ("origin-a", "127.0.0.1"),
        ("origin-b", "127.0.0.2"),
        ("origin-c", "origin-c.example.net"),
    ])?;
    server.set_target(NodeSelector::All, invalid.clone());
    let node = wait_for(&mut status, &envoy, "NACK of the invalid clusters", |n| {
        n.types
            .get(CLUSTER_TYPE)
            .and_then(|t| t.nack.as_ref())
            .is_some_and(|nack| Some(nack.version.as_str()) == invalid.version(CLUSTER_TYPE))
    })
    .await?;
    let cds = node.types.get(CLUSTER_TYPE).ok_or("no CDS status")?;
    let message = cds
        .nack
        .as_ref()
        .map(|n| n.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("origin-c") && message.contains("malformed IP address"),
        "{message}"
    );
    assert_eq!(cds.acked.as_deref(), second.version(CLUSTER_TYPE));
    assert_eq!(dynamic_clusters(&admin).await?, ["origin-a", "origin-b"]);

    // A server restarted with the clusters Envoy runs: Envoy reconnects and
    // is sent nothing (no cluster re-built).
    let _ = stop.send(());
    timeout(WAIT, serving).await???;
    let listener = TcpListener::bind(("127.0.0.1", ads_port)).await?;
    let restarted = AdsServer::new();
    restarted.set_target(NodeSelector::All, second.clone());
    let mut status = restarted.watch_status();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn({
        let restarted = restarted.clone();
        async move {
            restarted
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let node = wait_for(&mut status, &envoy, "reconnection", |n| {
        n.connected && n.runs_target(CLUSTER_TYPE)
    })
    .await?;
    assert_eq!(
        node.types.get(CLUSTER_TYPE).and_then(|t| t.sent.clone()),
        None
    );
    let stats = get(&admin, "/stats?filter=cluster_manager.cds.update_success").await?;
    assert_eq!(dynamic_clusters(&admin).await?, ["origin-a", "origin-b"]);
    assert!(stats.contains("update_success: 2"), "{stats}");

    let _ = stop.send(());
    timeout(WAIT, serving).await???;
    let dir = envoy.dir.clone();
    drop(envoy);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
