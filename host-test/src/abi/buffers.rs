//! `proxy_get_buffer_bytes` and `proxy_set_buffer_bytes`: bodies, the reply
//! to a dispatched call, and the configurations, each only in the callback
//! where Envoy has it (NotFound elsewhere).

use super::memory::{give, read};
use super::{answer, Caller, HostResult, Status, ENV};
use crate::{HostState, Phase};
use wasmtime::Linker;

/// proxy-wasm's buffer types this host knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum BufferType {
    RequestBody = 0,
    ResponseBody = 1,
    HttpCallResponseBody = 4,
    VmConfiguration = 6,
    PluginConfiguration = 7,
}

impl BufferType {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::HttpCallResponseBody,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            _ => return None,
        })
    }

    /// The callback in which Envoy has this buffer.
    fn phase(self) -> Phase {
        match self {
            BufferType::RequestBody => Phase::RequestBody,
            BufferType::ResponseBody => Phase::ResponseBody,
            BufferType::HttpCallResponseBody => Phase::HttpCallResponse,
            BufferType::VmConfiguration | BufferType::PluginConfiguration => Phase::Root,
        }
    }
}

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| {
            c.data_mut().note_host_call("proxy_get_buffer_bytes");
            answer(get_buffer_bytes(
                &mut c, kind, start, max, ret_ptr, ret_size,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            c.data_mut().note_host_call("proxy_set_buffer_bytes");
            answer(set_buffer_bytes(&mut c, kind, start, size, ptr, len))
        },
    )?;
    Ok(())
}

/// The buffer's bytes, if it exists in the current callback.
fn buffer(state: &mut HostState, kind: BufferType) -> Option<Vec<u8>> {
    if state.phase != Some(kind.phase()) {
        return None;
    }
    match kind {
        BufferType::PluginConfiguration => Some(state.plugin_configuration.clone()),
        BufferType::VmConfiguration => Some(state.vm_configuration.clone()),
        BufferType::RequestBody => state.stream().map(|s| s.request_body.clone()),
        BufferType::ResponseBody => state.stream().map(|s| s.response_body.clone()),
        BufferType::HttpCallResponseBody => {
            state.http_call_response.as_ref().map(|r| r.body.clone())
        }
    }
}

/// The body the guest may change in the current callback.
fn body_mut(state: &mut HostState, kind: BufferType) -> Option<&mut Vec<u8>> {
    match kind {
        BufferType::RequestBody | BufferType::ResponseBody if state.phase == Some(kind.phase()) => {
            let stream = state.stream()?;
            Some(if kind == BufferType::RequestBody {
                &mut stream.request_body
            } else {
                &mut stream.response_body
            })
        }
        _ => None,
    }
}

fn get_buffer_bytes(
    c: &mut Caller<'_>,
    kind: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let kind = BufferType::from_raw(kind).ok_or(Status::BadArgument)?;
    let bytes = buffer(c.data_mut(), kind).ok_or(Status::NotFound)?;
    let start = start as u32 as usize;
    if start > bytes.len() {
        return Err(Status::BadArgument);
    }
    let end = start.saturating_add(max as u32 as usize).min(bytes.len());
    give(c, &bytes[start..end], ret_ptr, ret_size)
}

/// Replaces `size` bytes from `start` (both clamped to the body) with the guest's.
fn set_buffer_bytes(
    c: &mut Caller<'_>,
    kind: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let data = read(c, ptr, len)?;
    let kind = BufferType::from_raw(kind).ok_or(Status::BadArgument)?;
    let body = body_mut(c.data_mut(), kind).ok_or(Status::NotFound)?;
    let start = (start as u32 as usize).min(body.len());
    let end = start.saturating_add(size as u32 as usize).min(body.len());
    body.splice(start..end, data);
    Ok(())
}
