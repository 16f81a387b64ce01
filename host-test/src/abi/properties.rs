//! `proxy_get_property` and `proxy_set_property`. A property path arrives as
//! NUL-separated segments and is kept dotted (`connection.tls_version`); the
//! current stream's own properties come before the VM-wide ones, as Envoy
//! answers connection properties per stream.

use super::memory::{give, read};
use super::{answer, Caller, HostResult, Status, ENV};
use crate::HostState;
use wasmtime::Linker;

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_property",
        |mut c: Caller<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32| {
            c.data_mut().note_host_call("proxy_get_property");
            answer(get_property(&mut c, pp, pl, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_property",
        |mut c: Caller<'_>, pp: i32, pl: i32, vp: i32, vl: i32| {
            c.data_mut().note_host_call("proxy_set_property");
            answer(set_property(&mut c, pp, pl, vp, vl))
        },
    )?;
    Ok(())
}

/// `["connection", "tls_version"]` as the guest sends it (each segment
/// NUL-terminated) to the dotted key the host keeps.
fn dotted_path(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .trim_end_matches('\0')
        .replace('\0', ".")
}

fn get_property(c: &mut Caller<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32) -> HostResult {
    let path = dotted_path(&read(c, pp, pl)?);
    let state = c.data();
    let value = state
        .property(state.current, &path)
        .ok_or(Status::NotFound)?
        .to_vec();
    give(c, &value, ret_ptr, ret_size)
}

/// Sets a VM-wide property.
fn set_property(c: &mut Caller<'_>, pp: i32, pl: i32, vp: i32, vl: i32) -> HostResult {
    let path = read(c, pp, pl).map_err(|_| Status::BadArgument)?;
    let value = read(c, vp, vl).map_err(|_| Status::BadArgument)?;
    c.data_mut().properties.insert(dotted_path(&path), value);
    Ok(())
}
