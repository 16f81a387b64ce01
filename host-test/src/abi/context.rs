//! Stream and context control: `proxy_continue_stream`, `proxy_close_stream`,
//! `proxy_set_effective_context`, `proxy_done`.

use super::{answer, Caller, HostResult, Status, ENV};
use crate::state::ROOT_CONTEXT;
use crate::HostState;
use wasmtime::Linker;

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_continue_stream",
        |mut c: Caller<'_>, _kind: i32| {
            c.data_mut().note_host_call("proxy_continue_stream");
            answer(current_stream_exists(&c))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_close_stream",
        |mut c: Caller<'_>, _kind: i32| {
            c.data_mut().note_host_call("proxy_close_stream");
            answer(current_stream_exists(&c))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: Caller<'_>, id: i32| {
            c.data_mut().note_host_call("proxy_set_effective_context");
            answer(set_effective_context(&mut c, id))
        },
    )?;
    linker.func_wrap(ENV, "proxy_done", |mut c: Caller<'_>| {
        c.data_mut().note_host_call("proxy_done");
        answer(Ok(()))
    })?;
    Ok(())
}

/// Continuing or closing is accepted for a stream that is still open.
fn current_stream_exists(c: &Caller<'_>) -> HostResult {
    let state = c.data();
    if state.streams.contains_key(&state.current) {
        Ok(())
    } else {
        Err(Status::NotFound)
    }
}

/// Makes later calls act on context `id`: the root context or an open stream.
fn set_effective_context(c: &mut Caller<'_>, id: i32) -> HostResult {
    let id = id as u32;
    let state = c.data_mut();
    if id == ROOT_CONTEXT {
        state.current = 0;
    } else if state.streams.contains_key(&id) {
        state.current = id;
    } else {
        return Err(Status::BadArgument);
    }
    Ok(())
}
