//! The host side of proxy-wasm ABI 0.2.1 (module `env`) and the WASI calls a
//! Rust `wasm32-wasip1` module makes. Status codes follow Envoy's.
//!
//! One module per concern, each with a `link` that registers its host calls;
//! every host call is one small function returning [`HostResult`], so a
//! failure is `?` and [`answer`] turns the outcome into the guest's status:
//!
//! | file             | host calls                                                |
//! |------------------|-----------------------------------------------------------|
//! | `memory.rs`      | none: bounds-checked guest memory, `give` to the guest    |
//! | `log.rs`         | `proxy_log`, `proxy_get_log_level`                        |
//! | `clock.rs`       | current time, tick period                                 |
//! | `buffers.rs`     | `proxy_get_buffer_bytes`, `proxy_set_buffer_bytes`        |
//! | `maps.rs`        | header maps: pairs, single values, edits                  |
//! | `properties.rs`  | `proxy_get_property` (stream first), `proxy_set_property` |
//! | `shared_data.rs` | shared data (process-wide), shared queues                 |
//! | `context.rs`     | continue/close stream, effective context, `proxy_done`    |
//! | `calls.rs`       | `proxy_http_call`, local replies, status, foreign functions, gRPC (refused) |
//! | `metrics.rs`     | define, increment, record, get                            |
//! | `wasi.rs`        | `wasi_snapshot_preview1`: random, environment, `fd_write`, `proc_exit` |

mod buffers;
mod calls;
mod clock;
mod context;
mod log;
mod maps;
mod memory;
mod metrics;
mod properties;
mod shared_data;
mod wasi;

use crate::HostState;
use wasmtime::Linker;

pub use buffers::BufferType;
pub use log::LogLevel;
pub use maps::MapType;
pub use metrics::MetricKind;

/// The proxy-wasm module every host call is imported from.
const ENV: &str = "env";

/// What a host call sees of the guest that called it.
type Caller<'a> = wasmtime::Caller<'a, HostState>;

/// A host call's outcome: `Err` is the status the guest gets.
type HostResult<T = ()> = Result<T, Status>;

/// proxy-wasm's `WasmResult`, as Envoy answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

/// The status a host call returns to the guest.
fn answer(result: HostResult) -> i32 {
    match result {
        Ok(()) => Status::Ok as i32,
        Err(status) => status as i32,
    }
}

/// Registers every host call the filter may import; an import missing here
/// fails at link time, as in Envoy.
pub(crate) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    log::link(linker)?;
    clock::link(linker)?;
    buffers::link(linker)?;
    maps::link(linker)?;
    properties::link(linker)?;
    shared_data::link(linker)?;
    context::link(linker)?;
    calls::link(linker)?;
    metrics::link(linker)?;
    wasi::link(linker)
}
