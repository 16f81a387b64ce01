//! The ADS protocol in process: a fake Envoy (a tonic client that sends what
//! Envoy sends) against the server on a free port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use origin_policy_xds::{
    AdsServer, NodeSelector, NodeStatus, XdsResources, CLUSTER_TYPE, EXTENSION_CONFIG_TYPE,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const WAIT: Duration = Duration::from_secs(5);
/// How long a fake Envoy waits to be sure that nothing comes.
const QUIET: Duration = Duration::from_millis(300);

fn cluster(name: &str, port: u32) -> Value {
    json!({
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        ]}]}
    })
}

fn filter_config(name: &str, value: &str) -> Value {
    json!({
        "name": name,
        "typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": value}
    })
}

fn resources(clusters: &[(&str, u32)]) -> Result<Arc<XdsResources>, origin_policy_xds::XdsError> {
    let clusters: Vec<Value> = clusters.iter().map(|(n, p)| cluster(n, *p)).collect();
    let configs = [
        filter_config("filter-a", "a"),
        filter_config("filter-b", "b"),
    ];
    Ok(Arc::new(XdsResources::from_json(&clusters, &configs)?))
}

fn version(resources: &XdsResources) -> String {
    resources
        .version(CLUSTER_TYPE)
        .unwrap_or_default()
        .to_owned()
}

struct RunningServer {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<Result<(), origin_policy_xds::XdsError>>,
}

impl RunningServer {
    async fn start(server: AdsServer) -> Result<Self, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
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
        Ok(RunningServer {
            address,
            stop: Some(stop),
            serving,
        })
    }

    async fn stop(mut self) -> TestResult {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(WAIT, self.serving).await???;
        Ok(())
    }
}

/// What an Envoy sends on its ADS stream, and what it gets back.
struct FakeEnvoy {
    node: String,
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    first: bool,
}

impl FakeEnvoy {
    async fn connect(address: SocketAddr, node: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://{address}")).await?;
        let (requests, outgoing) = mpsc::channel(16);
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(FakeEnvoy {
            node: node.to_owned(),
            requests,
            responses,
            first: true,
        })
    }

    async fn send(
        &mut self,
        type_url: &str,
        version: &str,
        nonce: &str,
        names: &[&str],
        error: Option<&str>,
    ) -> TestResult {
        // Envoy names its node on the first request only
        // (set_node_on_first_message_only).
        let node = self.first.then(|| Node {
            id: self.node.clone(),
            ..Default::default()
        });
        self.first = false;
        self.requests
            .send(DiscoveryRequest {
                version_info: version.to_owned(),
                node,
                resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
                type_url: type_url.to_owned(),
                response_nonce: nonce.to_owned(),
                error_detail: error.map(|message| RpcStatus {
                    code: 3,
                    message: message.to_owned(),
                    details: Vec::new(),
                }),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn subscribe(&mut self, type_url: &str, runs: &str, names: &[&str]) -> TestResult {
        self.send(type_url, runs, "", names, None).await
    }

    async fn ack(&mut self, response: &DiscoveryResponse, names: &[&str]) -> TestResult {
        let (url, version, nonce) = (&response.type_url, &response.version_info, &response.nonce);
        self.send(url, version, nonce, names, None).await
    }

    async fn next(&mut self) -> Result<DiscoveryResponse, Box<dyn std::error::Error>> {
        match timeout(WAIT, self.responses.message()).await?? {
            Some(response) => Ok(response),
            None => Err("the stream ended".into()),
        }
    }

    async fn nothing_more(&mut self) -> TestResult {
        match timeout(QUIET, self.responses.message()).await {
            Err(_) => Ok(()),
            Ok(got) => Err(format!("expected nothing, got {got:?}").into()),
        }
    }
}

fn names_of(response: &DiscoveryResponse) -> Vec<String> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use prost::Message;
    response
        .resources
        .iter()
        .filter_map(|any| match any.type_url.as_str() {
            CLUSTER_TYPE => Cluster::decode(any.value.as_slice()).ok().map(|c| c.name),
            _ => TypedExtensionConfig::decode(any.value.as_slice())
                .ok()
                .map(|c| c.name),
        })
        .collect()
}

fn node<'a>(status: &'a [NodeStatus], id: &str) -> Option<&'a NodeStatus> {
    status.iter().find(|n| n.id == id)
}

#[tokio::test]
async fn a_node_gets_its_target_and_acks_it() -> TestResult {
    let target = resources(&[("one", 8001), ("two", 8002)])?;
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, target.clone());
    let running = RunningServer::start(server.clone()).await?;
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    let response = envoy.next().await?;
    assert_eq!(response.type_url, CLUSTER_TYPE);
    assert_eq!(response.version_info, version(&target));
    assert_eq!(names_of(&response), ["one", "two"]);
    let mut status = server.watch_status();
    envoy.ack(&response, &[]).await?;
    let acked = timeout(
        WAIT,
        status.wait_for(|s| node(s, "edge-1").is_some_and(|n| n.runs_target(CLUSTER_TYPE))),
    )
    .await??
    .clone();
    let edge = node(&acked, "edge-1").ok_or("no edge-1")?;
    assert!(edge.connected);
    assert_eq!(edge.acked(CLUSTER_TYPE), Some(version(&target).as_str()));
    envoy.nothing_more().await?;

    // ECDS by name: the resources named, and again when another is named.
    envoy
        .subscribe(EXTENSION_CONFIG_TYPE, "", &["filter-a"])
        .await?;
    let configs = envoy.next().await?;
    assert_eq!(names_of(&configs), ["filter-a"]);
    envoy.ack(&configs, &["filter-a", "filter-b"]).await?;
    let configs = envoy.next().await?;
    assert_eq!(names_of(&configs), ["filter-a", "filter-b"]);
    envoy.ack(&configs, &["filter-a", "filter-b"]).await?;
    envoy.nothing_more().await?;

    drop(envoy);
    timeout(
        WAIT,
        status.wait_for(|s| node(s, "edge-1").is_some_and(|n| !n.connected)),
    )
    .await??;
    running.stop().await
}

#[tokio::test]
async fn a_nack_is_recorded_and_that_version_not_sent_again() -> TestResult {
    let good = resources(&[("one", 8001)])?;
    let bad = resources(&[("one", 8001), ("two", 8002)])?;
    let fixed = resources(&[("one", 8001), ("two", 8003)])?;
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, good.clone());
    let running = RunningServer::start(server.clone()).await?;
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    let first = envoy.next().await?;
    let mut status = server.watch_status();
    envoy.ack(&first, &[]).await?;
    timeout(
        WAIT,
        status.wait_for(|s| node(s, "edge-1").is_some_and(|n| n.runs_target(CLUSTER_TYPE))),
    )
    .await??;

    server.set_target(NodeSelector::All, bad.clone());
    let refused = envoy.next().await?;
    assert_eq!(refused.version_info, version(&bad));
    // A NACK carries the version Envoy keeps and the response's nonce.
    envoy
        .send(
            CLUSTER_TYPE,
            &version(&good),
            &refused.nonce,
            &[],
            Some("no good"),
        )
        .await?;
    let after = timeout(
        WAIT,
        status.wait_for(|s| {
            node(s, "edge-1")
                .is_some_and(|n| n.types.get(CLUSTER_TYPE).is_some_and(|t| t.nack.is_some()))
        }),
    )
    .await??
    .clone();
    let cds = node(&after, "edge-1")
        .and_then(|n| n.types.get(CLUSTER_TYPE))
        .ok_or("no CDS status")?;
    let nack = cds.nack.as_ref().ok_or("no NACK")?;
    assert_eq!(
        (nack.version.as_str(), nack.message.as_str()),
        (version(&bad).as_str(), "no good")
    );
    assert_eq!(cds.acked.as_deref(), Some(version(&good).as_str()));
    assert_eq!(cds.target.as_deref(), Some(version(&bad).as_str()));
    envoy.nothing_more().await?;

    // Not after a reconnect either.
    drop(envoy);
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, &version(&good), &[]).await?;
    envoy.nothing_more().await?;

    // A new target is sent.
    server.set_target(NodeSelector::All, fixed.clone());
    let response = envoy.next().await?;
    assert_eq!(response.version_info, version(&fixed));
    running.stop().await
}

#[tokio::test]
async fn a_node_that_reconnects_with_the_version_it_runs_gets_nothing_new() -> TestResult {
    let target = resources(&[("one", 8001)])?;
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, target.clone());
    let running = RunningServer::start(server).await?;
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    envoy
        .subscribe(EXTENSION_CONFIG_TYPE, "", &["filter-a"])
        .await?;
    let clusters = envoy.next().await?;
    let configs = envoy.next().await?;
    envoy.ack(&clusters, &[]).await?;
    envoy.ack(&configs, &["filter-a"]).await?;
    running.stop().await?;

    // A restarted server, the same content: the same versions, nothing sent.
    let restarted = AdsServer::new();
    restarted.set_target(NodeSelector::All, resources(&[("one", 8001)])?);
    let running = RunningServer::start(restarted.clone()).await?;
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy
        .subscribe(CLUSTER_TYPE, &clusters.version_info, &[])
        .await?;
    envoy
        .subscribe(EXTENSION_CONFIG_TYPE, &configs.version_info, &["filter-a"])
        .await?;
    envoy.nothing_more().await?;
    let status = restarted.status();
    let edge = node(&status, "edge-1").ok_or("no edge-1")?;
    assert!(
        edge.connected && edge.runs_target(CLUSTER_TYPE) && edge.runs_target(EXTENSION_CONFIG_TYPE)
    );

    // One that runs an older version is sent the target.
    let mut other = FakeEnvoy::connect(running.address, "edge-2").await?;
    other
        .subscribe(CLUSTER_TYPE, "0123456789abcdef", &[])
        .await?;
    assert_eq!(other.next().await?.version_info, clusters.version_info);
    running.stop().await
}

#[tokio::test]
async fn a_node_target_overrides_the_fleet_target() -> TestResult {
    let stable = resources(&[("one", 8001)])?;
    let candidate = resources(&[("one", 8001), ("two", 8002)])?;
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, stable.clone());
    server.set_target(NodeSelector::Node("canary".into()), candidate.clone());
    let running = RunningServer::start(server.clone()).await?;
    let mut canary = FakeEnvoy::connect(running.address, "canary").await?;
    let mut other = FakeEnvoy::connect(running.address, "other").await?;
    canary.subscribe(CLUSTER_TYPE, "", &[]).await?;
    other.subscribe(CLUSTER_TYPE, "", &[]).await?;
    let to_canary = canary.next().await?;
    let to_other = other.next().await?;
    assert_eq!(to_canary.version_info, version(&candidate));
    assert_eq!(to_other.version_info, version(&stable));
    canary.ack(&to_canary, &[]).await?;
    other.ack(&to_other, &[]).await?;

    // Promoted: the other node follows, the canary has it already.
    server.set_target(NodeSelector::All, candidate.clone());
    server.remove_node_target("canary");
    assert_eq!(other.next().await?.version_info, version(&candidate));
    canary.nothing_more().await?;

    // Held: the canary alone goes back.
    server.set_target(NodeSelector::Node("canary".into()), stable.clone());
    assert_eq!(canary.next().await?.version_info, version(&stable));
    other.nothing_more().await?;
    running.stop().await
}

#[tokio::test]
async fn a_request_with_an_older_nonce_is_ignored() -> TestResult {
    let first = resources(&[("one", 8001)])?;
    let second = resources(&[("two", 8002)])?;
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, first.clone());
    let running = RunningServer::start(server.clone()).await?;
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    let one = envoy.next().await?;
    server.set_target(NodeSelector::All, second.clone());
    let two = envoy.next().await?;
    // The answer to the first response arrives after the second was sent.
    envoy
        .send(
            CLUSTER_TYPE,
            &one.version_info,
            &one.nonce,
            &[],
            Some("late"),
        )
        .await?;
    envoy.nothing_more().await?;
    let status = server.status();
    let cds = node(&status, "edge-1")
        .and_then(|n| n.types.get(CLUSTER_TYPE))
        .ok_or("no CDS status")?;
    assert_eq!((cds.nack.as_ref(), cds.acked.as_ref()), (None, None));
    assert_eq!(cds.sent.as_deref(), Some(two.version_info.as_str()));
    running.stop().await
}

#[tokio::test]
async fn delta_xds_is_unimplemented_and_a_nameless_node_refused() -> TestResult {
    let running = RunningServer::start(AdsServer::new()).await?;
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", running.address)).await?;
    let (_requests, outgoing) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let delta = client
        .delta_aggregated_resources(ReceiverStream::new(outgoing))
        .await;
    assert_eq!(
        delta.err().map(|s| s.code()),
        Some(tonic::Code::Unimplemented)
    );

    let mut nameless = FakeEnvoy::connect(running.address, "").await?;
    nameless.subscribe(CLUSTER_TYPE, "", &[]).await?;
    let refused = timeout(WAIT, nameless.responses.message()).await?;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::InvalidArgument)
    );
    running.stop().await
}

#[tokio::test]
async fn shutdown_ends_the_open_streams() -> TestResult {
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, resources(&[("one", 8001)])?);
    let running = RunningServer::start(server.clone()).await?;
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    envoy.next().await?;
    // Returns although the stream was open.
    running.stop().await?;
    assert!(!server.status().iter().any(|n| n.connected));
    Ok(())
}

#[tokio::test]
async fn a_server_not_serving_ends_its_streams_unavailable_and_refuses_new_ones() -> TestResult {
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, resources(&[("one", 8001)])?);
    let running = RunningServer::start(server.clone()).await?;
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    envoy.next().await?;

    server.set_not_serving(Some("the store is unreachable".to_owned()));
    let ended = timeout(WAIT, envoy.responses.message()).await?;
    let status = ended.err().ok_or("the stream was not ended")?;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "the store is unreachable");
    // A new stream is refused with the same reason.
    let refused = match FakeEnvoy::connect(running.address, "edge-2").await {
        Ok(mut envoy) => {
            envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
            timeout(WAIT, envoy.responses.message()).await?.err()
        }
        Err(e) => e.downcast::<tonic::Status>().ok().map(|status| *status),
    };
    assert_eq!(refused.map(|s| s.code()), Some(tonic::Code::Unavailable));

    // Serving again: a node connects and gets its target.
    server.set_not_serving(None);
    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    assert_eq!(names_of(&envoy.next().await?), ["one"]);
    running.stop().await
}

#[tokio::test]
async fn a_node_the_admission_refuses_gets_nothing_and_loses_its_stream_when_refused_later(
) -> TestResult {
    let server = AdsServer::new();
    server.set_target(NodeSelector::All, resources(&[("one", 8001)])?);
    let admitted = Arc::new(std::sync::Mutex::new(vec!["edge-1".to_owned()]));
    let list = admitted.clone();
    server.set_admission(Arc::new(move |certs, node| {
        // Without TLS there are no certificates to judge.
        assert!(certs.is_none());
        match list.lock() {
            Ok(ids) if ids.iter().any(|id| id == node) => Ok(()),
            _ => Err(format!("{node} is not admitted")),
        }
    }));
    let running = RunningServer::start(server.clone()).await?;

    let mut stranger = FakeEnvoy::connect(running.address, "edge-2").await?;
    stranger.subscribe(CLUSTER_TYPE, "", &[]).await?;
    let refused = timeout(WAIT, stranger.responses.message()).await?;
    let status = refused.err().ok_or("edge-2 was answered")?;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "edge-2 is not admitted");
    assert!(node(&server.status(), "edge-2").is_none());

    let mut envoy = FakeEnvoy::connect(running.address, "edge-1").await?;
    envoy.subscribe(CLUSTER_TYPE, "", &[]).await?;
    envoy.next().await?;
    // No longer admitted: its open stream ends.
    admitted.lock().map_err(|e| e.to_string())?.clear();
    server.check_admission();
    let ended = timeout(WAIT, envoy.responses.message()).await?;
    assert_eq!(
        ended.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    running.stop().await
}
