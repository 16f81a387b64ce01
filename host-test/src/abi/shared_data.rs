//! Shared data, in the process-wide store every VM of a `Process` sees (see
//! `crate::SharedData` for Envoy's semantics), and shared queues, which this
//! host registers per VM but never delivers to.

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
        |mut c: Caller<'_>, _vp: i32, _vl: i32, np: i32, nl: i32, ret: i32| {
            c.data_mut().note_host_call("proxy_resolve_shared_queue");
            answer(resolve_shared_queue(&mut c, np, nl, ret))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_>, _id: i32, _ret_ptr: i32, _ret_size: i32| {
            c.data_mut().note_host_call("proxy_dequeue_shared_queue");
            answer(Err(Status::Empty))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_>, _id: i32, _ptr: i32, _len: i32| {
            c.data_mut().note_host_call("proxy_enqueue_shared_queue");
            answer(Ok(()))
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

/// A queue's id: its registration order, from 1.
fn queue_id(index: usize) -> u32 {
    index as u32 + 1
}

fn register_shared_queue(c: &mut Caller<'_>, np: i32, nl: i32, ret: i32) -> HostResult {
    let name = read_str(c, np, nl)?;
    let queues = &mut c.data_mut().queues;
    let index = match queues.iter().position(|q| *q == name) {
        Some(i) => i,
        None => {
            queues.push(name);
            queues.len() - 1
        }
    };
    write_u32(c, ret, queue_id(index))
}

fn resolve_shared_queue(c: &mut Caller<'_>, np: i32, nl: i32, ret: i32) -> HostResult {
    let name = read_str(c, np, nl)?;
    let index = c
        .data()
        .queues
        .iter()
        .position(|q| *q == name)
        .ok_or(Status::NotFound)?;
    write_u32(c, ret, queue_id(index))
}
