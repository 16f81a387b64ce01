//! The host clock (advanced by tests, see `Vm::advance_clock_ms`) and the
//! tick period the guest asks for (recorded; ticks are not delivered).

use super::memory::write_u64;
use super::{answer, Caller, HostResult, ENV};
use crate::HostState;
use wasmtime::Linker;

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_>, ret: i32| {
            c.data_mut()
                .note_host_call("proxy_get_current_time_nanoseconds");
            answer(current_time_nanoseconds(&mut c, ret))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_>, ms: i32| {
            c.data_mut()
                .note_host_call("proxy_set_tick_period_milliseconds");
            answer(set_tick_period_milliseconds(&mut c, ms))
        },
    )?;
    Ok(())
}

fn current_time_nanoseconds(c: &mut Caller<'_>, ret: i32) -> HostResult {
    let now = c.data().now_nanos;
    write_u64(c, ret, now)
}

fn set_tick_period_milliseconds(c: &mut Caller<'_>, ms: i32) -> HostResult {
    c.data_mut().tick_period_ms = ms as u32;
    Ok(())
}
