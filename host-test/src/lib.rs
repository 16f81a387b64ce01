//! A proxy-wasm host (ABI 0.2.1) on wasmtime that plays Envoy's part for the
//! origin-policy filter: tests send request headers and bodies, play the
//! upstream and the dispatched calls, and observe what Envoy would have seen.
//!
//! Host state lives in each `Store`, so tests run in parallel; every guest
//! memory access is bounds-checked and a bad pointer is a `BadArgument`, not a
//! host crash. A guest trap fails the call with the guest's log attached.
//!
//! - `filter.rs`: [`Filter`] (compiled and linked once) and [`Process`] (one
//!   Envoy process: VMs that share shared data).
//! - `vm.rs`: [`Vm`], one worker's instance, driven callback by callback.
//! - `exports.rs`: the guest's entry points, typed, looked up once per VM.
//! - `state.rs`: [`HostState`], what the host knows about one VM and its streams.
//! - `shared_data.rs`: [`SharedData`], the process-wide store.
//! - `abi/`: the host calls, one file per concern (see its module docs).

mod abi;
mod exports;
mod filter;
mod shared_data;
mod state;
mod vm;

pub use abi::{BufferType, LogLevel, MapType, MetricKind, Status};
pub use filter::{filter_path, Filter, Process};
pub use shared_data::SharedData;
pub use state::{
    header, DispatchedCall, Headers, HostState, HttpCallResponse, LocalResponse, LogLine, Metric,
    Phase, StreamState, GUEST_ALLOCATION, TLS_VERSION, TLS_VERSION_PROPERTY,
};
pub use vm::{Action, Vm};
