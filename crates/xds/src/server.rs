//! The ADS server: state of the world over one gRPC stream per Envoy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

use crate::resources::{TypeResources, XdsError, XdsResources, CLUSTER_TYPE};

/// Which nodes a target is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeSelector {
    /// Every node without a target of its own.
    All,
    /// The node with this `node.id` (a canary, say).
    Node(String),
}

/// A version a node refused, with Envoy's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub version: String,
    pub message: String,
}

/// Where a node is with one type URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// The version the node's target has for this type.
    pub target: Option<String>,
    /// The version last sent to the node.
    pub sent: Option<String>,
    /// The version the node runs (ACKed, or said it runs when it connected).
    pub acked: Option<String>,
    /// The last version it refused.
    pub nack: Option<Nack>,
}

/// One node (`node.id`) as the server knows it; a node stays listed once it
/// has connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: String,
    pub connected: bool,
    /// The string fields of its `node.metadata`.
    pub metadata: BTreeMap<String, String>,
    /// Streams it has opened since this server started.
    pub connections: u64,
    /// By type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

impl NodeStatus {
    /// The version of `type_url` the node runs.
    pub fn acked(&self, type_url: &str) -> Option<&str> {
        self.types.get(type_url)?.acked.as_deref()
    }

    /// Whether the node runs its target's version of `type_url`.
    pub fn runs_target(&self, type_url: &str) -> bool {
        self.types
            .get(type_url)
            .is_some_and(|t| t.target.is_some() && t.target == t.acked)
    }
}

/// What a target decided per node sees of the node.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub id: String,
    /// The string fields of its `node.metadata`.
    pub metadata: BTreeMap<String, String>,
    /// The version it runs, by type URL (`None`: nothing yet, a new Envoy).
    pub acked: BTreeMap<String, Option<String>>,
}

/// A target decided per node (say, a module path from its metadata), asked
/// whenever the server needs the node's target, under the server's lock: it
/// must be quick and must not call the server. `None`: nothing to send.
pub type TargetFn = Arc<dyn Fn(&NodeInfo) -> Option<Arc<XdsResources>> + Send + Sync>;

/// Whether a stream may serve the node it names, asked with the client
/// certificates of its TLS connection (`None` without TLS) and the `node.id`
/// of its first request, before anything of that node is read or sent.
/// `Err` says why not: the stream ends `PERMISSION_DENIED` with it. Asked
/// again for every open stream on [`AdsServer::check_admission`].
pub type Admission =
    Arc<dyn Fn(Option<&[CertificateDer<'static>]>, &str) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
enum Target {
    Fixed(Arc<XdsResources>),
    PerNode(TargetFn),
}

/// The ADS server. Cheap to clone: every clone is the same server.
#[derive(Clone, Default)]
pub struct AdsServer {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of a target: each stream then sends what its
    /// node lacks.
    targets: watch::Sender<u64>,
    status: watch::Sender<Vec<NodeStatus>>,
    /// `Some(why)`: not serving; open streams are ended with UNAVAILABLE and
    /// new ones refused, so that Envoys move to another control plane.
    not_serving: watch::Sender<Option<String>>,
    /// Without one, every stream is served.
    admission: Mutex<Option<Admission>>,
    /// Bumped when the open streams are to be admitted again.
    admission_checks: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    all: Option<Target>,
    per_node: HashMap<String, Target>,
    nodes: BTreeMap<String, NodeRecord>,
    streams_opened: u64,
}

#[derive(Default)]
struct NodeRecord {
    /// The stream the node is connected on (its latest).
    stream: Option<u64>,
    metadata: BTreeMap<String, String>,
    connections: u64,
    types: BTreeMap<String, TypeRecord>,
}

#[derive(Default)]
struct TypeRecord {
    sent: Option<String>,
    acked: Option<String>,
    nack: Option<Nack>,
    /// The NACKed version, not sent to this node again until its target changes.
    refused: Option<String>,
}

impl State {
    fn target(&self, node: &str) -> Option<Arc<XdsResources>> {
        match self.per_node.get(node).or(self.all.as_ref())? {
            Target::Fixed(resources) => Some(resources.clone()),
            Target::PerNode(decide) => {
                let record = self.nodes.get(node);
                let info = NodeInfo {
                    id: node.to_owned(),
                    metadata: record.map(|r| r.metadata.clone()).unwrap_or_default(),
                    acked: record
                        .map(|r| {
                            r.types
                                .iter()
                                .map(|(t, r)| (t.clone(), r.acked.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                decide(&info)
            }
        }
    }

    fn target_version(&self, node: &str, type_url: &str) -> Option<String> {
        self.target(node)?.version(type_url).map(str::to_owned)
    }

    fn status(&self) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .map(|(id, record)| {
                let mut types: BTreeMap<String, TypeStatus> = BTreeMap::new();
                if let Some(target) = self.target(id) {
                    for t in target.types() {
                        types.entry(t.type_url.to_owned()).or_default().target =
                            Some(t.version.clone());
                    }
                }
                for (type_url, r) in &record.types {
                    let status = types.entry(type_url.clone()).or_default();
                    status.sent.clone_from(&r.sent);
                    status.acked.clone_from(&r.acked);
                    status.nack.clone_from(&r.nack);
                }
                NodeStatus {
                    id: id.clone(),
                    connected: record.stream.is_some(),
                    metadata: record.metadata.clone(),
                    connections: record.connections,
                    types,
                }
            })
            .collect()
    }
}

impl AdsServer {
    pub fn new() -> Self {
        AdsServer::default()
    }

    /// What the selected nodes are to run; connected ones are sent it at once.
    pub fn set_target(&self, selector: NodeSelector, resources: Arc<XdsResources>) {
        self.set(selector, Target::Fixed(resources));
    }

    /// A target decided per node by `decide` ([`TargetFn`]); call
    /// [`AdsServer::refresh`] when what it decides on changes.
    pub fn set_target_fn(&self, selector: NodeSelector, decide: TargetFn) {
        self.set(selector, Target::PerNode(decide));
    }

    fn set(&self, selector: NodeSelector, target: Target) {
        self.change_targets(|state| match selector {
            NodeSelector::All => state.all = Some(target),
            NodeSelector::Node(id) => {
                state.per_node.insert(id, target);
            }
        });
    }

    /// Asks every per-node target again and sends what changed.
    pub fn refresh(&self) {
        self.change_targets(|_| {});
    }

    /// The node follows the target of all nodes again.
    pub fn remove_node_target(&self, node_id: &str) {
        self.change_targets(|state| {
            state.per_node.remove(node_id);
        });
    }

    fn change_targets(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.shared.lock();
        let before = versions_by_node(&state);
        change(&mut state);
        let after = versions_by_node(&state);
        // A version a node refused may be sent to it again once its target
        // has changed (it may be the fix, or the same content again on purpose).
        for (id, record) in state.nodes.iter_mut() {
            for (type_url, r) in record.types.iter_mut() {
                let key = (id.clone(), type_url.clone());
                if before.get(&key) != after.get(&key) {
                    r.refused = None;
                }
            }
        }
        self.shared.publish(&state);
        drop(state);
        self.shared
            .targets
            .send_modify(|generation| *generation += 1);
    }

    /// Stops serving (`Some(why)`: every stream is ended with UNAVAILABLE
    /// and new ones are refused, saying why) or serves again (`None`).
    pub fn set_not_serving(&self, why: Option<String>) {
        self.shared.not_serving.send_if_modified(|current| {
            let changed = *current != why;
            *current = why;
            changed
        });
    }

    /// Why the server does not serve, if it does not.
    pub fn not_serving(&self) -> Option<String> {
        self.shared.not_serving.borrow().clone()
    }

    /// Every node that has connected, by id.
    pub fn status(&self) -> Vec<NodeStatus> {
        self.shared.status.borrow().clone()
    }

    /// The status, updated on every connection, response, ACK, NACK and
    /// change of target: `wait_for` on it waits until, say, a node ACKs a
    /// version.
    pub fn watch_status(&self) -> watch::Receiver<Vec<NodeStatus>> {
        self.shared.status.subscribe()
    }

    /// Who may be served ([`Admission`]); the open streams are checked again.
    pub fn set_admission(&self, admission: Admission) {
        if let Ok(mut current) = self.shared.admission.lock() {
            *current = Some(admission);
        }
        self.check_admission();
    }

    /// Every open stream is admitted again (the admission's files changed,
    /// say): a node no longer admitted loses its stream.
    pub fn check_admission(&self) {
        self.shared.admission_checks.send_modify(|n| *n += 1);
    }

    /// Serves ADS on `listener` until `shutdown` completes; then ends every
    /// open stream (Envoy keeps its configuration and reconnects) and returns.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError> {
        self.serve_incoming(TcpListenerStream::new(listener), shutdown)
            .await
    }

    /// [`AdsServer::serve`] on connections accepted by the caller: TLS
    /// streams (`tokio_rustls::server::TlsStream<TcpStream>`) carry their
    /// client certificates to the [`Admission`].
    pub async fn serve_incoming<I, IO, IE>(
        &self,
        incoming: I,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), XdsError>
    where
        I: Stream<Item = Result<IO, IE>>,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (closing, closed) = watch::channel(false);
        let service = AdsService {
            shared: self.shared.clone(),
            closed,
        };
        let signal = async move {
            shutdown.await;
            closing.send_replace(true);
        };
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(service))
            .serve_with_incoming_shutdown(incoming, signal)
            .await
            .map_err(|e| XdsError::Serve(e.to_string()))
    }
}

/// A connection that ends when `close` completes (say, when its client
/// certificate is revoked): every read and write after that fails, so the
/// server drops it with every stream on it, and the client has to connect
/// again (and present a certificate again). For [`AdsServer::serve_incoming`].
pub struct Closing<IO> {
    inner: IO,
    close: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    closed: bool,
}

impl<IO> Closing<IO> {
    pub fn new(inner: IO, close: impl Future<Output = ()> + Send + 'static) -> Self {
        Closing {
            inner,
            close: Box::pin(close),
            closed: false,
        }
    }

    /// Whether `close` has completed; registers the task to be woken when it does.
    fn closed(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if !self.closed && self.close.as_mut().poll(cx).is_ready() {
            self.closed = true;
        }
        self.closed
    }
}

fn closed_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the connection's client is no longer admitted",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for Closing<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.closed(cx) {
            return std::task::Poll::Ready(Err(closed_error()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Closing<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.closed(cx) {
            return std::task::Poll::Ready(Err(closed_error()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.closed(cx) {
            return std::task::Poll::Ready(Err(closed_error()));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Closing<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

fn versions_by_node(state: &State) -> HashMap<(String, String), Option<String>> {
    let mut versions = HashMap::new();
    for (id, record) in &state.nodes {
        for type_url in record.types.keys() {
            versions.insert(
                (id.clone(), type_url.clone()),
                state.target_version(id, type_url),
            );
        }
    }
    versions
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere
        // while it was held does not make it unusable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, state: &State) {
        self.status.send_replace(state.status());
    }
}

struct AdsService {
    shared: Arc<Shared>,
    closed: watch::Receiver<bool>,
}

type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        if let Some(why) = self.shared.not_serving.borrow().clone() {
            return Err(Status::unavailable(why));
        }
        let (responses, stream) = mpsc::channel(4);
        let ads = AdsStream::open(self.shared.clone(), request.peer_certs());
        tokio::spawn(ads.run(request.into_inner(), responses, self.closed.clone()));
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    /// Not served: the policies travel over the feed, not xDS, so a node's
    /// xDS is a few clusters and two extension configurations, and sending
    /// them whole costs little. Envoy is configured with `api_type: GRPC`.
    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "delta xDS is not served: use state of the world (api_type: GRPC)",
        ))
    }
}

/// One Envoy's stream: per type URL, what it subscribes to and the version
/// and nonce of the last response.
struct AdsStream {
    shared: Arc<Shared>,
    id: u64,
    node: Option<String>,
    types: BTreeMap<String, StreamType>,
    nonces: u64,
    /// The client certificates of its TLS connection.
    peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

#[derive(Default)]
struct StreamType {
    /// Empty: every resource of the type (CDS's wildcard).
    names: BTreeSet<String>,
    sent: Option<String>,
    nonce: Option<String>,
}

impl AdsStream {
    fn open(shared: Arc<Shared>, peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>) -> Self {
        let id = {
            let mut state = shared.lock();
            state.streams_opened += 1;
            state.streams_opened
        };
        AdsStream {
            shared,
            id,
            node: None,
            types: BTreeMap::new(),
            nonces: 0,
            peer_certs,
        }
    }

    /// Whether this stream may serve `node` ([`Admission`]).
    fn admit(&self, node: &str) -> Result<(), Status> {
        let admission = self
            .shared
            .admission
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |a| a.clone());
        match admission {
            Some(admit) => admit(self.peer_certs.as_deref().map(Vec::as_slice), node)
                .map_err(Status::permission_denied),
            None => Ok(()),
        }
    }

    /// A first request is admitted before its node is recorded.
    fn on_first_request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        if self.node.is_none() {
            if let Some(node) = request.node.as_ref().filter(|n| !n.id.is_empty()) {
                self.admit(&node.id)?;
            }
        }
        self.on_request(request)
    }

    async fn run(
        mut self,
        mut requests: Streaming<DiscoveryRequest>,
        responses: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        mut closed: watch::Receiver<bool>,
    ) {
        let mut targets = self.shared.targets.subscribe();
        let mut not_serving = self.shared.not_serving.subscribe();
        let mut admission_checks = self.shared.admission_checks.subscribe();
        'stream: loop {
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => {
                        if let Err(status) = self.on_first_request(request) {
                            let _ = responses.send(Err(status)).await;
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
                checked = admission_checks.changed() => {
                    if checked.is_err() {
                        break;
                    }
                    let admitted = match &self.node {
                        Some(node) => self.admit(node),
                        None => Ok(()),
                    };
                    if let Err(status) = admitted {
                        let _ = responses.send(Err(status)).await;
                        break;
                    }
                }
                changed = targets.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = async { closed.wait_for(|closed| *closed).await.map(|_| ()) } => break,
                why = async { not_serving.wait_for(Option::is_some).await.map(|why| why.clone()) } => {
                    let why = why.ok().flatten().unwrap_or_default();
                    let _ = responses.send(Err(Status::unavailable(why))).await;
                    break;
                }
            }
            for response in self.pending() {
                if responses.send(Ok(response)).await.is_err() {
                    break 'stream;
                }
            }
        }
        self.close();
    }

    fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Status> {
        let mut state = self.shared.lock();
        let node = match &self.node {
            Some(node) => node.clone(),
            None => {
                let id = request
                    .node
                    .as_ref()
                    .map(|node| node.id.clone())
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        Status::invalid_argument("the stream's first request has no node.id")
                    })?;
                let record = state.nodes.entry(id.clone()).or_default();
                record.stream = Some(self.id);
                record.connections += 1;
                record.metadata = request
                    .node
                    .as_ref()
                    .and_then(|node| node.metadata.as_ref())
                    .map(string_fields)
                    .unwrap_or_default();
                self.node = Some(id.clone());
                id
            }
        };
        let stream = self.types.entry(request.type_url.clone()).or_default();
        let record = state
            .nodes
            .entry(node)
            .or_default()
            .types
            .entry(request.type_url.clone())
            .or_default();
        let names: BTreeSet<String> = request
            .resource_names
            .into_iter()
            .filter(|name| name != "*")
            .collect();
        if request.response_nonce.is_empty() {
            // The first request of this type on this stream says what the
            // node runs: not sent again if it is the target's. Envoy compares
            // ECDS configurations by hash, but a cluster re-sent is a cluster
            // re-built.
            let runs = Some(request.version_info).filter(|v| !v.is_empty());
            if runs.is_none() {
                // A new Envoy process: what its predecessor refused may work now.
                record.refused = None;
            }
            record.acked.clone_from(&runs);
            stream.sent = runs;
            stream.nonce = None;
            stream.names = names;
        } else if stream.nonce.as_deref() == Some(request.response_nonce.as_str()) {
            match request.error_detail {
                Some(error) => {
                    // version_info is then the version Envoy keeps.
                    if !request.version_info.is_empty() {
                        record.acked = Some(request.version_info);
                    }
                    let version = stream.sent.clone().unwrap_or_default();
                    record.refused = Some(version.clone());
                    record.nack = Some(Nack {
                        version,
                        message: error.message,
                    });
                }
                None => record.acked = Some(request.version_info),
            }
            if names != stream.names {
                // A changed subscription (another filter's configuration):
                // answered with the resources now named.
                stream.names = names;
                stream.sent = None;
            }
        }
        // Any other nonce answers a response Envoy had not seen when it sent
        // this request: the answer to the latest one follows.
        self.shared.publish(&state);
        Ok(())
    }

    /// The responses this stream owes its node: per subscribed type, the
    /// target's version unless it was sent already or the node refused it;
    /// clusters first, so that a configuration naming a new cluster comes
    /// after it.
    fn pending(&mut self) -> Vec<DiscoveryResponse> {
        let Some(node) = &self.node else {
            return Vec::new();
        };
        let mut state = self.shared.lock();
        let Some(target) = state.target(node) else {
            return Vec::new();
        };
        let Some(record) = state.nodes.get_mut(node) else {
            return Vec::new();
        };
        let mut order: Vec<&String> = self.types.keys().collect();
        order.sort_by_key(|type_url| (type_url.as_str() != CLUSTER_TYPE, type_url.as_str()));
        let order: Vec<String> = order.into_iter().cloned().collect();
        let mut responses = Vec::new();
        for type_url in order {
            let (Some(stream), Some(resources)) =
                (self.types.get_mut(&type_url), target.of_type(&type_url))
            else {
                continue;
            };
            let node_type = record.types.entry(type_url.clone()).or_default();
            if stream.sent.as_ref() == Some(&resources.version)
                || node_type.refused.as_ref() == Some(&resources.version)
            {
                continue;
            }
            self.nonces += 1;
            let nonce = self.nonces.to_string();
            responses.push(response(resources, &stream.names, nonce.clone()));
            stream.sent = Some(resources.version.clone());
            stream.nonce = Some(nonce);
            node_type.sent = Some(resources.version.clone());
        }
        if !responses.is_empty() {
            self.shared.publish(&state);
        }
        responses
    }

    fn close(self) {
        let mut state = self.shared.lock();
        if let Some(record) = self.node.and_then(|node| state.nodes.get_mut(&node)) {
            if record.stream == Some(self.id) {
                record.stream = None;
            }
        }
        self.shared.publish(&state);
    }
}

fn response(
    resources: &TypeResources,
    names: &BTreeSet<String>,
    nonce: String,
) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: resources.version.clone(),
        type_url: resources.type_url.to_owned(),
        nonce,
        resources: resources
            .resources
            .iter()
            .filter(|r| names.is_empty() || names.contains(&r.name))
            .map(|r| r.any.clone())
            .collect(),
        ..Default::default()
    }
}

fn string_fields(metadata: &envoy_types::pb::google::protobuf::Struct) -> BTreeMap<String, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    metadata
        .fields
        .iter()
        .filter_map(|(key, value)| match &value.kind {
            Some(Kind::StringValue(text)) => Some((key.clone(), text.clone())),
            _ => None,
        })
        .collect()
}
