//! `proxy_log` and `proxy_get_log_level`: the guest's log lines are kept in
//! [`crate::HostState::logs`] and shown with a trap.

use super::memory::{read_str, write_u32};
use super::{answer, Caller, HostResult, Status, ENV};
use crate::{HostState, LogLine};
use wasmtime::Linker;

/// proxy-wasm's log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// The level the host asks the guest to log at: everything.
const HOST_LOG_LEVEL: LogLevel = LogLevel::Trace;

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_log",
        |mut c: Caller<'_>, level: i32, ptr: i32, len: i32| {
            c.data_mut().note_host_call("proxy_log");
            answer(log(&mut c, level, ptr, len))
        },
    )?;
    linker.func_wrap(ENV, "proxy_get_log_level", |mut c: Caller<'_>, ret: i32| {
        c.data_mut().note_host_call("proxy_get_log_level");
        answer(get_log_level(&mut c, ret))
    })?;
    Ok(())
}

fn log(c: &mut Caller<'_>, level: i32, ptr: i32, len: i32) -> HostResult {
    let level = LogLevel::from_raw(level).ok_or(Status::BadArgument)?;
    let message = read_str(c, ptr, len)?;
    c.data_mut().logs.push(LogLine {
        level: level as u32,
        message,
    });
    Ok(())
}

fn get_log_level(c: &mut Caller<'_>, ret: i32) -> HostResult {
    write_u32(c, ret, HOST_LOG_LEVEL as u32)
}
