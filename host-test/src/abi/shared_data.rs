//! Shared data, in the process-wide store every VM of a `Process` sees (see
//! `crate::SharedData` for Envoy's semantics), and shared queues, process-wide
//! too, delivered when the test runs a VM's posted `on_queue_ready` calls.

use super::memory::{give, read, read_str, write_u32};
use super::{answer, Caller, HostResult, Status, ENV};
use crate::HostState;
use wasmtime::Linker;

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: Caller<'_>, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| {
            c.data_mut().note_host_call("proxy_get_shared_data");
            answer(get_shared_data(&mut c, kp, kl, ret_ptr, ret_size, ret_cas))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: Caller<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| {
            c.data_mut().note_host_call("proxy_set_shared_data");
            answer(set_shared_data(&mut c, kp, kl, vp, vl, cas))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_register_shared_queue",
        |mut c: Caller<'_>, np: i32, nl: i32, ret: i32| {
            c.data_mut().note_host_call("proxy_register_shared_queue");
            answer(register_shared_queue(&mut c, np, nl, ret))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_>, vp: i32, vl: i32, np: i32, nl: i32, ret: i32| {
            c.data_mut().note_host_call("proxy_resolve_shared_queue");
            answer(resolve_shared_queue(&mut c, vp, vl, np, nl, ret))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_>, id: i32, ret_ptr: i32, ret_size: i32| {
            c.data_mut().note_host_call("proxy_dequeue_shared_queue");
            answer(dequeue_shared_queue(&mut c, id, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_>, id: i32, ptr: i32, len: i32| {
            c.data_mut().note_host_call("proxy_enqueue_shared_queue");
            answer(enqueue_shared_queue(&mut c, id, ptr, len))
        },
    )?;
    Ok(())
}

fn get_shared_data(
    c: &mut Caller<'_>,
    kp: i32,
    kl: i32,
    ret_ptr: i32,
    ret_size: i32,
    ret_cas: i32,
) -> HostResult {
    let key = read_str(c, kp, kl)?;
    let state = c.data();
    let (value, cas) = state.shared_data.get(&state.vm_id, &key)?;
    give(c, &value, ret_ptr, ret_size)?;
    write_u32(c, ret_cas, cas)
}

fn set_shared_data(c: &mut Caller<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32) -> HostResult {
    let key = read_str(c, kp, kl).map_err(|_| Status::BadArgument)?;
    let value = read(c, vp, vl).map_err(|_| Status::BadArgument)?;
    let state = c.data();
    state
        .shared_data
        .set(&state.vm_id, &key, &value, cas as u32)
}

fn register_shared_queue(c: &mut Caller<'_>, np: i32, nl: i32, ret: i32) -> HostResult {
    let name = read_str(c, np, nl)?;
    let state = c.data();
    // Envoy delivers to the root context, also for a registration made
    // from a stream.
    let consumer = (state.serial, state.root_context);
    let token = state
        .shared_data
        .register_queue(&state.vm_id, &name, consumer);
    write_u32(c, ret, token)
}

fn resolve_shared_queue(
    c: &mut Caller<'_>,
    vp: i32,
    vl: i32,
    np: i32,
    nl: i32,
    ret: i32,
) -> HostResult {
    let vm_id = read_str(c, vp, vl)?;
    let name = read_str(c, np, nl)?;
    let state = c.data();
    // An empty vm_id is the caller's own.
    let vm_id = if vm_id.is_empty() {
        state.vm_id.as_str()
    } else {
        vm_id.as_str()
    };
    let token = state.shared_data.resolve_queue(vm_id, &name)?;
    write_u32(c, ret, token)
}

fn enqueue_shared_queue(c: &mut Caller<'_>, id: i32, ptr: i32, len: i32) -> HostResult {
    let value = read(c, ptr, len).map_err(|_| Status::BadArgument)?;
    c.data().shared_data.enqueue(id as u32, &value)
}

fn dequeue_shared_queue(c: &mut Caller<'_>, id: i32, ret_ptr: i32, ret_size: i32) -> HostResult {
    let value = c.data().shared_data.dequeue(id as u32)?;
    give(c, &value, ret_ptr, ret_size)
}
