//! One VM: the guest instance in its store, driven the way Envoy drives a
//! worker's filter (contexts, streams, callbacks in their phases).

use crate::exports::{Export, Exports};
use crate::shared_data::SharedData;
use crate::state::{header, owned, HostState, HttpCallResponse, LocalResponse, Phase, StreamState};
use crate::state::{TLS_VERSION, TLS_VERSION_PROPERTY};
use wasmtime::{format_err as anyhow, Result};
use wasmtime::{Instance, Store, WasmParams, WasmResults};

/// The filter's answer to a stream callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    fn from_raw(raw: i32) -> Option<Self> {
        match raw {
            0 => Some(Action::Continue),
            1 => Some(Action::Pause),
            _ => None,
        }
    }
}

/// Picks one entry point out of [`Exports`].
type Select<P, R> = fn(&Exports) -> &Export<P, R>;

/// One VM (one Envoy worker's instance of the filter).
pub struct Vm {
    store: Store<HostState>,
    instance: Instance,
    exports: Exports,
    next_context: u32,
    /// The root context new streams belong to: the newest plugin configuration.
    root: u32,
}

fn flag(b: bool) -> i32 {
    i32::from(b)
}

impl Vm {
    /// Looks the exports up and starts the root context `root`, as Envoy
    /// does for a new VM: `_initialize`, context create, `on_vm_start`.
    pub(crate) fn boot(mut store: Store<HostState>, instance: Instance, root: u32) -> Result<Vm> {
        let exports = Exports::lookup(&mut store, &instance)?;
        store.data_mut().root_context = root;
        let mut vm = Vm {
            store,
            instance,
            exports,
            next_context: root + 1,
            root,
        };
        vm.call(|e| &e.initialize, ())?;
        vm.call(|e| &e.on_context_create, (root as i32, 0))?;
        vm.with_phase(0, Phase::Root, |vm| {
            vm.call(|e| &e.on_vm_start, (root as i32, 0))
        })?;
        Ok(vm)
    }

    pub fn state(&self) -> &HostState {
        self.store.data()
    }

    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    /// The vm_id the VM's shared data is kept under.
    pub fn vm_id(&self) -> &str {
        &self.state().vm_id
    }

    /// The shared data of the process this VM runs in.
    pub fn shared_data(&self) -> &SharedData {
        &self.state().shared_data
    }

    fn trap_report(&self, name: &str, e: wasmtime::Error) -> wasmtime::Error {
        anyhow!(
            "guest trapped in {name}: {e:?}\nguest log:\n{}",
            self.log_text()
        )
    }

    /// Calls one guest entry point; a trap fails with the guest's log.
    fn call<P: WasmParams, R: WasmResults>(&mut self, select: Select<P, R>, args: P) -> Result<R> {
        let export = select(&self.exports);
        let func = export.func()?;
        func.call(&mut self.store, args)
            .map_err(|e| self.trap_report(export.name, e))
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
            vm.call(|e| &e.on_configure, (root, size))
        })?;
        Ok(ok != 0)
    }

    /// What Envoy does when a plugin's configuration changes but its VM does
    /// not: a new root context in the same VM, started and configured; new
    /// streams belong to it. Returns what `on_configure` said.
    pub fn configure_new_root(&mut self, plugin_configuration: &str) -> Result<bool> {
        let id = self.next_context;
        self.next_context += 1;
        self.call(|e| &e.on_context_create, (id as i32, 0))?;
        self.with_phase(0, Phase::Root, |vm| {
            vm.call(|e| &e.on_vm_start, (id as i32, 0))
        })?;
        self.root = id;
        self.store.data_mut().root_context = id;
        self.configure(plugin_configuration)
    }

    /// Opens an HTTP stream (an HTTP context) on a plaintext downstream
    /// connection and returns its id.
    pub fn open_stream(&mut self) -> Result<u32> {
        self.open_stream_with(StreamState::default())
    }

    /// Opens an HTTP stream on a TLS downstream connection: Envoy answers
    /// its `connection.tls_version` with `TLSv1.3`.
    pub fn open_tls_stream(&mut self) -> Result<u32> {
        let mut stream = StreamState::default();
        stream.properties.insert(
            TLS_VERSION_PROPERTY.to_owned(),
            TLS_VERSION.as_bytes().to_vec(),
        );
        self.open_stream_with(stream)
    }

    /// Creates the context with the stream's state (its connection
    /// properties) in place, as Envoy has them before the first callback.
    fn open_stream_with(&mut self, stream: StreamState) -> Result<u32> {
        let id = self.next_context;
        self.next_context += 1;
        self.store.data_mut().streams.insert(id, stream);
        let root = self.root;
        self.call(|e| &e.on_context_create, (id as i32, root as i32))?;
        Ok(id)
    }

    /// Sets a property of one stream only, by dotted path
    /// (`connection.tls_version`); the guest's `get_property` in that stream
    /// sees it before any VM-wide property of the same path.
    pub fn set_stream_property(
        &mut self,
        stream: u32,
        path: &str,
        value: impl AsRef<[u8]>,
    ) -> Result<()> {
        self.stream_mut(stream)?
            .properties
            .insert(path.to_owned(), value.as_ref().to_vec());
        Ok(())
    }

    /// What the guest's `get_property` answers for `path` inside `stream`
    /// (0: the root context); `None` is NotFound.
    pub fn property(&self, stream: u32, path: &str) -> Option<&[u8]> {
        self.state().property(stream, path)
    }

    /// Runs a stream callback in its phase and reads its action.
    fn action(
        &mut self,
        stream: u32,
        phase: Phase,
        select: Select<(i32, i32, i32), i32>,
        args: (i32, i32, i32),
    ) -> Result<Action> {
        let raw = self.with_phase(stream, phase, |vm| vm.call(select, args))?;
        Action::from_raw(raw).ok_or_else(|| {
            anyhow!(
                "{} returned unknown action {raw}",
                select(&self.exports).name
            )
        })
    }

    pub fn request_headers(
        &mut self,
        stream: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.stream_mut(stream)?.request_headers = owned(headers);
        let args = (stream as i32, headers.len() as i32, flag(end_of_stream));
        self.action(
            stream,
            Phase::RequestHeaders,
            |e| &e.on_request_headers,
            args,
        )
    }

    pub fn request_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.stream_mut(stream)?.request_body = chunk.to_vec();
        let args = (stream as i32, chunk.len() as i32, flag(end_of_stream));
        self.action(stream, Phase::RequestBody, |e| &e.on_request_body, args)
    }

    pub fn response_headers(
        &mut self,
        stream: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.stream_mut(stream)?.response_headers = owned(headers);
        let args = (stream as i32, headers.len() as i32, flag(end_of_stream));
        self.action(
            stream,
            Phase::ResponseHeaders,
            |e| &e.on_response_headers,
            args,
        )
    }

    pub fn response_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action> {
        self.stream_mut(stream)?.response_body = chunk.to_vec();
        let args = (stream as i32, chunk.len() as i32, flag(end_of_stream));
        self.action(stream, Phase::ResponseBody, |e| &e.on_response_body, args)
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
        let args = (
            call.context_id as i32,
            token as i32,
            headers.len() as i32,
            body.len() as i32,
            0,
        );
        self.store.data_mut().http_call_response = Some(HttpCallResponse {
            headers,
            body: body.to_vec(),
            trailers: Vec::new(),
        });
        let result = self.with_phase(call.context_id, Phase::HttpCallResponse, |vm| {
            vm.call(|e| &e.on_http_call_response, args)
        });
        self.store.data_mut().http_call_response = None;
        result
    }

    /// Ends a stream as Envoy does: `on_done`, `on_log`, `on_delete`.
    pub fn close_stream(&mut self, stream: u32) -> Result<()> {
        let id = stream as i32;
        self.with_phase(stream, Phase::Done, |vm| vm.call(|e| &e.on_done, id))?;
        self.with_phase(stream, Phase::Done, |vm| vm.call(|e| &e.on_log, id))?;
        self.with_phase(stream, Phase::Done, |vm| vm.call(|e| &e.on_delete, id))?;
        self.store.data_mut().streams.remove(&stream);
        Ok(())
    }

    /// One tick of the root context, as Envoy delivers every
    /// `tick_period_ms`: the filter hands its per-request counters over then.
    pub fn tick(&mut self) -> Result<()> {
        let root = self.root as i32;
        self.with_phase(0, Phase::Root, |vm| vm.call(|e| &e.on_tick, root))
    }

    /// Runs the `on_queue_ready` calls posted to this VM's queues since the
    /// last time, one per enqueue, as the worker's event loop would; returns
    /// how many ran.
    pub fn deliver_queues(&mut self) -> Result<usize> {
        let posted = self.shared_data().take_posted(self.state().serial);
        for (root, token) in &posted {
            let args = (*root as i32, *token as i32);
            self.with_phase(0, Phase::Root, |vm| vm.call(|e| &e.on_queue_ready, args))?;
        }
        Ok(posted.len())
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

#[cfg(test)]
mod tests {
    use super::Action;

    #[test]
    fn actions_are_the_abi_values() {
        assert_eq!(Action::from_raw(0), Some(Action::Continue));
        assert_eq!(Action::from_raw(1), Some(Action::Pause));
        assert_eq!(Action::from_raw(2), None);
    }
}
