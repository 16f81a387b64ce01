//! A proxy-wasm host (ABI 0.2.1) on wasmtime that plays Envoy's part for the
//! origin-policy filter: tests send request headers and bodies, play the
//! upstream and the dispatched calls, and observe what Envoy would have seen.
//!
//! Host state lives in each `Store`, so tests run in parallel; every guest
//! memory access is bounds-checked and a bad pointer is a `BadArgument`, not a
//! host crash. A guest trap fails the call with the guest's log attached.

mod abi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use wasmtime::{bail, format_err as anyhow, Result};
use wasmtime::{Config, Engine, Instance, InstancePre, Linker, Module, Store};

pub use abi::{BufferType, MapType, Status};

pub type Headers = Vec<(String, String)>;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: u32,
    pub message: String,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub kind: u32,
    pub name: String,
    pub value: u64,
}

/// One HTTP stream's maps and buffers.
#[derive(Debug, Default, Clone)]
pub struct StreamState {
    pub request_headers: Headers,
    pub request_trailers: Headers,
    pub response_headers: Headers,
    pub response_trailers: Headers,
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
    /// `set_envoy_filter_state` calls, decoded, in order.
    pub filter_state: Vec<(String, String)>,
    pub local_response: Option<LocalResponse>,
    pub route_cache_cleared: u32,
}

/// Everything the host knows; lives in the wasmtime `Store`.
#[derive(Default)]
pub struct HostState {
    pub plugin_configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
    pub streams: HashMap<u32, StreamState>,
    /// The stream the current callback belongs to (0 for the root context).
    pub current: u32,
    pub phase: Option<Phase>,
    pub logs: Vec<LogLine>,
    pub metrics: Vec<Metric>,
    pub dispatched: Vec<DispatchedCall>,
    pub http_call_response: Option<(Headers, Vec<u8>, Headers)>,
    pub properties: HashMap<String, Vec<u8>>,
    pub shared_data: HashMap<String, (Vec<u8>, u32)>,
    pub tick_period_ms: u32,
    /// Clusters `dispatch_http_call` may target; empty accepts any.
    pub known_clusters: Vec<String>,
    queues: Vec<String>,
    pub now_nanos: u64,
    next_token: u32,
    pub status: (u32, Vec<u8>),
}

impl HostState {
    fn stream(&mut self) -> Option<&mut StreamState> {
        let id = self.current;
        self.streams.get_mut(&id)
    }
}

pub fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn owned(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

/// The compiled filter, shared by every test in a process.
pub struct Filter {
    engine: Engine,
    pre: InstancePre<HostState>,
}

/// Where the release filter is built by `cargo build --release --target wasm32-wasip1`.
pub fn filter_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/release/origin_policy.wasm")
}

impl Filter {
    pub fn load(path: &Path) -> Result<Filter> {
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config)?;
        let module = Module::from_file(&engine, path).map_err(|e| {
            anyhow!(
                "{}: {e:#} (build it: cargo build --release --target wasm32-wasip1 --lib)",
                path.display()
            )
        })?;
        let mut linker = Linker::new(&engine);
        abi::link(&mut linker)?;
        // Unknown imports fail here, at link time, as in Envoy.
        let pre = linker.instantiate_pre(&module)?;
        Ok(Filter { engine, pre })
    }

    /// The release filter, compiled once per test process.
    pub fn shared() -> Result<&'static Filter> {
        static FILTER: OnceLock<std::result::Result<Filter, String>> = OnceLock::new();
        FILTER
            .get_or_init(|| Filter::load(&filter_path()).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// A fresh VM with its root context configured. Fails if `on_configure` refused.
    pub fn start(&self, plugin_configuration: &str) -> Result<Vm> {
        let mut vm = self.instantiate()?;
        if !vm.configure(plugin_configuration)? {
            bail!("on_configure returned false; logs:\n{}", vm.log_text());
        }
        Ok(vm)
    }

    /// A fresh VM whose root context exists but is not configured yet.
    pub fn instantiate(&self) -> Result<Vm> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                now_nanos: 1_700_000_000_000_000_000,
                ..HostState::default()
            },
        );
        store.set_fuel(u64::MAX)?;
        let instance = self.pre.instantiate(&mut store)?;
        let mut vm = Vm {
            store,
            instance,
            next_context: ROOT_CONTEXT + 1,
            root: ROOT_CONTEXT,
            exports: HashMap::new(),
        };
        vm.call_void("_initialize", &[])?;
        vm.call_void("proxy_on_context_create", &[ROOT_CONTEXT, 0])?;
        vm.with_phase(0, Phase::Root, |vm| {
            vm.call_i32("proxy_on_vm_start", &[ROOT_CONTEXT as i32, 0])
        })?;
        Ok(vm)
    }
}

const ROOT_CONTEXT: u32 = 1;

/// The filter's answer to a stream callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// One VM (one Envoy worker's instance of the filter).
pub struct Vm {
    store: Store<HostState>,
    instance: Instance,
    next_context: u32,
    /// The root context new streams belong to: the newest plugin configuration.
    root: u32,
    exports: HashMap<&'static str, wasmtime::Func>,
}

impl Vm {
    pub fn state(&self) -> &HostState {
        self.store.data()
    }

    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    fn func(&mut self, name: &'static str) -> Result<wasmtime::Func> {
        if let Some(f) = self.exports.get(name) {
            return Ok(*f);
        }
        let f = self
            .instance
            .get_func(&mut self.store, name)
            .ok_or_else(|| anyhow!("guest does not export {name}"))?;
        self.exports.insert(name, f);
        Ok(f)
    }

    fn trap_report(&self, name: &str, e: wasmtime::Error) -> wasmtime::Error {
        anyhow!(
            "guest trapped in {name}: {e:?}\nguest log:\n{}",
            self.log_text()
        )
    }

    fn call_void(&mut self, name: &'static str, args: &[u32]) -> Result<()> {
        let f = self.func(name)?;
        let params: Vec<wasmtime::Val> =
            args.iter().map(|a| wasmtime::Val::I32(*a as i32)).collect();
        f.call(&mut self.store, &params, &mut [])
            .map_err(|e| self.trap_report(name, e))
    }

    fn call_i32(&mut self, name: &'static str, args: &[i32]) -> Result<i32> {
        let f = self.func(name)?;
        let params: Vec<wasmtime::Val> = args.iter().map(|a| wasmtime::Val::I32(*a)).collect();
        let mut out = [wasmtime::Val::I32(0)];
        f.call(&mut self.store, &params, &mut out)
            .map_err(|e| self.trap_report(name, e))?;
        out[0]
            .i32()
            .ok_or_else(|| anyhow!("{name} returned a non-i32"))
    }

    fn with_phase<T>(
        &mut self,
        stream: u32,
        phase: Phase,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let saved = (self.store.data().current, self.store.data().phase);
        self.store.data_mut().current = stream;
        self.store.data_mut().phase = Some(phase);
        let out = f(self);
        self.store.data_mut().current = saved.0;
        self.store.data_mut().phase = saved.1;
        out
    }

    /// Delivers a (new) plugin configuration; returns what `on_configure` said.
    pub fn configure(&mut self, plugin_configuration: &str) -> Result<bool> {
        self.store.data_mut().plugin_configuration = plugin_configuration.as_bytes().to_vec();
        let size = plugin_configuration.len() as i32;
        let root = self.root as i32;
        let ok = self.with_phase(0, Phase::Root, |vm| {
            vm.call_i32("proxy_on_configure", &[root, size])
        })?;
        Ok(ok != 0)
    }

    /// What Envoy does when a plugin's configuration changes but its VM does
    /// not: a new root context in the same VM, started and configured; new
    /// streams belong to it. Returns what `on_configure` said.
    pub fn configure_new_root(&mut self, plugin_configuration: &str) -> Result<bool> {
        let id = self.next_context;
        self.next_context += 1;
        self.call_void("proxy_on_context_create", &[id, 0])?;
        self.with_phase(0, Phase::Root, |vm| {
            vm.call_i32("proxy_on_vm_start", &[id as i32, 0])
        })?;
        self.root = id;
        self.configure(plugin_configuration)
    }

    /// Opens an HTTP stream (an HTTP context) and returns its id.
    pub fn open_stream(&mut self) -> Result<u32> {
        let id = self.next_context;
        self.next_context += 1;
        self.store
            .data_mut()
            .streams
            .insert(id, StreamState::default());
        let root = self.root;
        self.call_void("proxy_on_context_create", &[id, root])?;
        Ok(id)
    }

    fn action(
        &mut self,
        stream: u32,
        phase: Phase,
        name: &'static str,
        args: &[i32],
    ) -> Result<Action> {
        let raw = self.with_phase(stream, phase, |vm| vm.call_i32(name, args))?;
        match raw {
            0 => Ok(Action::Continue),
            1 => Ok(Action::Pause),
            other => bail!("{name} returned unknown action {other}"),
        }
    }

    pub fn request_headers(
        &mut self,
        stream: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action> {
        let s = self.stream_mut(stream)?;
        s.request_headers = owned(headers);
        let n = headers.len() as i32;
        self.action(
            stream,
            Phase::RequestHeaders,
            "proxy_on_request_headers",
            &[stream as i32, n, i32::from(end_of_stream)],
        )
    }

    pub fn request_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.stream_mut(stream)?.request_body = chunk.to_vec();
        let n = chunk.len() as i32;
        self.action(
            stream,
            Phase::RequestBody,
            "proxy_on_request_body",
            &[stream as i32, n, i32::from(end_of_stream)],
        )
    }

    pub fn response_headers(
        &mut self,
        stream: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.stream_mut(stream)?.response_headers = owned(headers);
        let n = headers.len() as i32;
        self.action(
            stream,
            Phase::ResponseHeaders,
            "proxy_on_response_headers",
            &[stream as i32, n, i32::from(end_of_stream)],
        )
    }

    pub fn response_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.stream_mut(stream)?.response_body = chunk.to_vec();
        let n = chunk.len() as i32;
        self.action(
            stream,
            Phase::ResponseBody,
            "proxy_on_response_body",
            &[stream as i32, n, i32::from(end_of_stream)],
        )
    }

    /// Plays the reply to a dispatched call. `None` headers play a failed call
    /// (reset, connect failure or timeout: Envoy delivers no headers).
    pub fn http_call_response(
        &mut self,
        token: u32,
        headers: Option<&[(&str, &str)]>,
        body: &[u8],
    ) -> Result<()> {
        let call = self
            .state()
            .dispatched
            .iter()
            .find(|c| c.token == token)
            .cloned()
            .ok_or_else(|| anyhow!("no dispatched call with token {token}"))?;
        let headers = headers.map(owned).unwrap_or_default();
        let n = headers.len() as i32;
        self.store.data_mut().http_call_response = Some((headers, body.to_vec(), Vec::new()));
        let args = [
            call.context_id as i32,
            token as i32,
            n,
            body.len() as i32,
            0,
        ];
        let result = self.with_phase(call.context_id, Phase::HttpCallResponse, |vm| {
            let f = vm.func("proxy_on_http_call_response")?;
            let params: Vec<wasmtime::Val> = args.iter().map(|a| wasmtime::Val::I32(*a)).collect();
            f.call(&mut vm.store, &params, &mut [])
                .map_err(|e| vm.trap_report("proxy_on_http_call_response", e))
        });
        self.store.data_mut().http_call_response = None;
        result
    }

    /// Ends a stream as Envoy does: `on_done`, `on_log`, `on_delete`.
    pub fn close_stream(&mut self, stream: u32) -> Result<()> {
        self.with_phase(stream, Phase::Done, |vm| {
            vm.call_i32("proxy_on_done", &[stream as i32])
        })?;
        self.with_phase(stream, Phase::Done, |vm| {
            vm.call_void("proxy_on_log", &[stream])
        })?;
        self.with_phase(stream, Phase::Done, |vm| {
            vm.call_void("proxy_on_delete", &[stream])
        })?;
        self.store.data_mut().streams.remove(&stream);
        Ok(())
    }

    /// Advances the host clock (for timeouts measured by the guest).
    pub fn advance_clock_ms(&mut self, ms: u64) {
        self.store.data_mut().now_nanos += ms * 1_000_000;
    }

    fn stream_mut(&mut self, stream: u32) -> Result<&mut StreamState> {
        self.store
            .data_mut()
            .streams
            .get_mut(&stream)
            .ok_or_else(|| anyhow!("no stream {stream}"))
    }

    pub fn stream(&self, stream: u32) -> Result<&StreamState> {
        self.state()
            .streams
            .get(&stream)
            .ok_or_else(|| anyhow!("no stream {stream}"))
    }

    /// What the upstream would receive: the request headers after the filter.
    pub fn upstream_header(&self, stream: u32, name: &str) -> Option<String> {
        self.stream(stream)
            .ok()
            .and_then(|s| header(&s.request_headers, name).map(str::to_owned))
    }

    pub fn response_header(&self, stream: u32, name: &str) -> Option<String> {
        self.stream(stream)
            .ok()
            .and_then(|s| header(&s.response_headers, name).map(str::to_owned))
    }

    pub fn filter_state(&self, stream: u32, key: &str) -> Option<String> {
        let s = self.stream(stream).ok()?;
        s.filter_state
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    pub fn local_response(&self, stream: u32) -> Option<&LocalResponse> {
        self.stream(stream)
            .ok()
            .and_then(|s| s.local_response.as_ref())
    }

    pub fn metric(&self, name: &str) -> Option<u64> {
        self.state()
            .metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }

    pub fn log_text(&self) -> String {
        self.state()
            .logs
            .iter()
            .map(|l| format!("[{}] {}", l.level, l.message))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Current size of the guest's linear memory in bytes.
    pub fn memory_bytes(&mut self) -> usize {
        match self.instance.get_memory(&mut self.store, "memory") {
            Some(m) => m.data_size(&self.store),
            None => 0,
        }
    }

    /// Fuel (roughly: wasm instructions) used by `f`.
    pub fn fuel_used<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<(T, u64)> {
        let before = self.store.get_fuel()?;
        let out = f(self)?;
        let after = self.store.get_fuel()?;
        Ok((out, before - after))
    }

    /// A complete request through the filter with the given upstream reply;
    /// returns the stream id (still open, so it can be inspected).
    pub fn exchange(&mut self, request: &[(&str, &str)], status: &str) -> Result<u32> {
        let id = self.open_stream()?;
        if self.request_headers(id, request, true)? == Action::Continue
            && self.local_response(id).is_none()
        {
            self.response_headers(id, &[(":status", status), ("content-length", "0")], true)?;
        }
        Ok(id)
    }
}
