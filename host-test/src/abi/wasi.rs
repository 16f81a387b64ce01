//! The WASI calls (`wasi_snapshot_preview1`) Rust's standard library makes
//! at start-up and on a panic. They answer WASI errnos, not proxy-wasm
//! statuses; output to a file descriptor is kept as a log line.

use super::memory::{read, write, write_u32};
use super::{Caller, HostResult};
use crate::{HostState, LogLine};
use wasmtime::Linker;

const WASI: &str = "wasi_snapshot_preview1";

/// The WASI errnos this host answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Errno {
    Success = 0,
    /// A pointer outside the guest's memory.
    Fault = 21,
}

/// The errno a WASI call returns: any failure is a bad address.
fn errno(result: HostResult) -> i32 {
    match result {
        Ok(()) => Errno::Success as i32,
        Err(_) => Errno::Fault as i32,
    }
}

/// Size of a WASI `ciovec`: a u32 pointer and a u32 length.
const CIOVEC_SIZE: i32 = 8;

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        WASI,
        "random_get",
        |mut c: Caller<'_>, ptr: i32, len: i32| {
            c.data_mut().note_host_call("random_get");
            errno(random_get(&mut c, ptr, len))
        },
    )?;
    linker.func_wrap(
        WASI,
        "environ_sizes_get",
        |mut c: Caller<'_>, count: i32, size: i32| {
            c.data_mut().note_host_call("environ_sizes_get");
            errno(environ_sizes_get(&mut c, count, size))
        },
    )?;
    linker.func_wrap(
        WASI,
        "environ_get",
        |mut c: Caller<'_>, _environ: i32, _buf: i32| {
            c.data_mut().note_host_call("environ_get");
            errno(Ok(()))
        },
    )?;
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut c: Caller<'_>, fd: i32, iovs: i32, n: i32, written: i32| {
            c.data_mut().note_host_call("fd_write");
            errno(fd_write(&mut c, fd, iovs, n, written))
        },
    )?;
    linker.func_wrap(
        WASI,
        "proc_exit",
        |mut c: Caller<'_>, code: i32| -> wasmtime::Result<()> {
            c.data_mut().note_host_call("proc_exit");
            wasmtime::bail!("guest called proc_exit({code})")
        },
    )?;
    Ok(())
}

/// Deterministic bytes keep runs reproducible (HashMap seeds).
fn random_get(c: &mut Caller<'_>, ptr: i32, len: i32) -> HostResult {
    let bytes: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(c, ptr, &bytes)
}

/// An empty environment.
fn environ_sizes_get(c: &mut Caller<'_>, count: i32, size: i32) -> HostResult {
    write_u32(c, count, 0)?;
    write_u32(c, size, 0)
}

/// Gathers the `n` buffers at `iovs` into one log line at
/// [`LogLine::WASI_FD_BASE`] + `fd`.
fn fd_write(c: &mut Caller<'_>, fd: i32, iovs: i32, n: i32, written: i32) -> HostResult {
    let mut text = Vec::new();
    for i in 0..n {
        let at = iovs.wrapping_add(i.wrapping_mul(CIOVEC_SIZE));
        let iov = read(c, at, CIOVEC_SIZE)?;
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        text.extend(read(c, ptr, len)?);
    }
    let total = text.len() as u32;
    c.data_mut().logs.push(LogLine {
        level: LogLine::WASI_FD_BASE.wrapping_add(fd as u32),
        message: String::from_utf8_lossy(&text).into_owned(),
    });
    write_u32(c, written, total)
}
