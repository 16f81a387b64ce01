//! What the host knows about one VM, kept in its wasmtime `Store`: the
//! configuration, the open streams with their maps, buffers and properties,
//! and what the guest did (logs, metrics, dispatched calls).

use crate::abi::MetricKind;
use crate::shared_data::SharedData;
use std::collections::HashMap;

pub type Headers = Vec<(String, String)>;

/// The first root context's id; the host's "current stream" is 0 inside it.
pub(crate) const ROOT_CONTEXT: u32 = 1;

/// The property Envoy answers with the TLS version on a TLS downstream
/// connection, and not at all (NotFound) on a plaintext one.
pub const TLS_VERSION_PROPERTY: &str = "connection.tls_version";
/// What Envoy answers for [`TLS_VERSION_PROPERTY`] on a TLS 1.3 connection.
pub const TLS_VERSION: &str = "TLSv1.3";

/// Which callback the host is inside: decides which maps and buffers exist,
/// as in Envoy (request headers during the request, response headers after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Root,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    HttpCallResponse,
    Done,
}

/// One line the guest wrote: `proxy_log` levels are 0 (trace) to 5
/// (critical); WASI output is [`LogLine::WASI_FD_BASE`] + the file descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: u32,
    pub message: String,
}

impl LogLine {
    /// `fd_write` output is logged at this level plus the descriptor (101 is
    /// stdout, 102 stderr, where a Rust panic message goes).
    pub const WASI_FD_BASE: u32 = 100;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub details: String,
}

impl LocalResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchedCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    pub context_id: u32,
}

impl DispatchedCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// A metric the guest defined; its id is its index in [`HostState::metrics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub kind: MetricKind,
    pub name: String,
    pub value: u64,
}

/// One HTTP stream's maps, buffers and properties.
#[derive(Debug, Default, Clone)]
pub struct StreamState {
    pub request_headers: Headers,
    pub request_trailers: Headers,
    pub response_headers: Headers,
    pub response_trailers: Headers,
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    /// Properties of this stream only (its connection, say), by dotted path;
    /// `get_property` looks here before the VM-wide [`HostState::properties`].
    pub properties: HashMap<String, Vec<u8>>,
    /// `set_envoy_filter_state` calls, decoded, in order.
    pub filter_state: Vec<(String, String)>,
    pub local_response: Option<LocalResponse>,
    pub route_cache_cleared: u32,
}

/// The reply to a dispatched call while `on_http_call_response` runs.
#[derive(Debug, Default, Clone)]
pub struct HttpCallResponse {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// Everything the host knows about one VM; lives in the wasmtime `Store`.
#[derive(Default)]
pub struct HostState {
    pub plugin_configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    pub streams: HashMap<u32, StreamState>,
    /// The stream the current callback belongs to (0 for the root context).
    pub current: u32,
    pub phase: Option<Phase>,
    pub logs: Vec<LogLine>,
    /// This VM's metrics (per VM here, though Envoy aggregates them).
    pub metrics: Vec<Metric>,
    pub dispatched: Vec<DispatchedCall>,
    pub http_call_response: Option<HttpCallResponse>,
    /// Properties every stream of this VM sees, by dotted path
    /// (`response.code_details`), unless the stream has its own.
    pub properties: HashMap<String, Vec<u8>>,
    /// The VM's id: shared data is kept per vm_id, as in Envoy.
    pub vm_id: String,
    /// The process's shared data, shared with every VM of the same process.
    pub shared_data: SharedData,
    pub tick_period_ms: u32,
    /// Clusters `dispatch_http_call` may target; empty accepts any.
    pub known_clusters: Vec<String>,
    /// This VM among the process's: the shared queues it registered are
    /// delivered to it.
    pub serial: u64,
    /// The root context that host calls from the root or a stream act for.
    pub root_context: u32,
    pub now_nanos: u64,
    pub(crate) next_token: u32,
    pub status: (u32, Vec<u8>),
    /// Every call the guest made into the host, with the callback it was in,
    /// in order; and the host's calls back into the guest to hand it a value
    /// (`proxy_on_memory_allocate`), which Envoy pays for too.
    pub host_calls: Vec<(Option<Phase>, &'static str)>,
}

/// The name [`HostState::host_calls`] gives the host's allocation calls into the guest.
pub const GUEST_ALLOCATION: &str = "(proxy_on_memory_allocate)";

impl HostState {
    pub(crate) fn note_host_call(&mut self, name: &'static str) {
        self.host_calls.push((self.phase, name));
    }

    /// The stream the current callback belongs to, if it is one.
    pub(crate) fn stream(&mut self) -> Option<&mut StreamState> {
        let id = self.current;
        self.streams.get_mut(&id)
    }

    /// What `get_property` answers inside `stream` (0: the root context): the
    /// stream's own property, else the VM-wide one.
    pub fn property(&self, stream: u32, path: &str) -> Option<&[u8]> {
        self.streams
            .get(&stream)
            .and_then(|s| s.properties.get(path))
            .or_else(|| self.properties.get(path))
            .map(Vec::as_slice)
    }
}

pub fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub(crate) fn owned(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}
