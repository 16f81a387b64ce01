//! Header maps: request and response headers and trailers of the current
//! stream, and the reply to a dispatched call. Each exists only in the
//! callbacks where Envoy has it; elsewhere a call is a `BadArgument`.

use super::memory::{give, read, read_str};
use super::{answer, Caller, HostResult, Status, ENV};
use crate::{Headers, HostState, Phase};
use wasmtime::Linker;

/// proxy-wasm's map types this host knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum MapType {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
    HttpCallResponseHeaders = 6,
    HttpCallResponseTrailers = 7,
}

impl MapType {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }

    fn parse(raw: i32) -> HostResult<Self> {
        MapType::from_raw(raw).ok_or(Status::BadArgument)
    }
}

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_>, map: i32, ret_ptr: i32, ret_size: i32| {
            c.data_mut().note_host_call("proxy_get_header_map_pairs");
            answer(get_header_map_pairs(&mut c, map, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_>, map: i32, ptr: i32, len: i32| {
            c.data_mut().note_host_call("proxy_set_header_map_pairs");
            answer(set_header_map_pairs(&mut c, map, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Caller<'_>, map: i32, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32| {
            c.data_mut().note_host_call("proxy_get_header_map_value");
            answer(get_header_map_value(&mut c, map, kp, kl, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_replace_header_map_value",
        |mut c: Caller<'_>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            c.data_mut()
                .note_host_call("proxy_replace_header_map_value");
            answer(replace_header_map_value(&mut c, map, kp, kl, vp, vl))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_add_header_map_value",
        |mut c: Caller<'_>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            c.data_mut().note_host_call("proxy_add_header_map_value");
            answer(add_header_map_value(&mut c, map, kp, kl, vp, vl))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: Caller<'_>, map: i32, kp: i32, kl: i32| {
            c.data_mut().note_host_call("proxy_remove_header_map_value");
            answer(remove_header_map_value(&mut c, map, kp, kl))
        },
    )?;
    Ok(())
}

/// proxy-wasm's map encoding: a count, (key, value) sizes, then each key and
/// value followed by a NUL.
pub(crate) fn serialize_map(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The inverse of [`serialize_map`]; anything malformed is a `BadArgument`.
pub(crate) fn deserialize_map(bytes: &[u8]) -> HostResult<Headers> {
    let u32_at = |at: usize| -> HostResult<usize> {
        let b = bytes.get(at..at + 4).ok_or(Status::BadArgument)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let n = u32_at(0)?;
    let mut sizes = Vec::with_capacity(n.min(1024));
    for i in 0..n {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut at = 4 + n * 8;
    let mut take = |len: usize| -> HostResult<String> {
        let s = bytes.get(at..at + len).ok_or(Status::BadArgument)?;
        if bytes.get(at + len) != Some(&0) {
            return Err(Status::BadArgument);
        }
        at += len + 1;
        String::from_utf8(s.to_vec()).map_err(|_| Status::BadArgument)
    };
    sizes
        .into_iter()
        .map(|(k, v)| Ok((take(k)?, take(v)?)))
        .collect()
}

/// Whether Envoy has `map` in `phase`, for reading or for writing.
fn available(map: MapType, phase: Phase, writing: bool) -> bool {
    let request_phase = matches!(phase, Phase::RequestHeaders | Phase::RequestBody);
    let response_phase = matches!(phase, Phase::ResponseHeaders | Phase::ResponseBody);
    match map {
        MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers => {
            phase == Phase::HttpCallResponse
        }
        MapType::RequestHeaders | MapType::RequestTrailers if writing => request_phase,
        MapType::RequestHeaders | MapType::RequestTrailers => phase != Phase::Root,
        MapType::ResponseHeaders | MapType::ResponseTrailers => {
            response_phase || (!writing && matches!(phase, Phase::HttpCallResponse | Phase::Done))
        }
    }
}

/// The map a call may touch in the current callback; `BadArgument` when
/// Envoy has no such map now.
fn map_mut(state: &mut HostState, map: MapType, writing: bool) -> HostResult<&mut Headers> {
    let phase = state.phase.ok_or(Status::BadArgument)?;
    if !available(map, phase, writing) {
        return Err(Status::BadArgument);
    }
    let found = match map {
        MapType::HttpCallResponseHeaders => {
            state.http_call_response.as_mut().map(|r| &mut r.headers)
        }
        MapType::HttpCallResponseTrailers => {
            state.http_call_response.as_mut().map(|r| &mut r.trailers)
        }
        MapType::RequestHeaders => state.stream().map(|s| &mut s.request_headers),
        MapType::RequestTrailers => state.stream().map(|s| &mut s.request_trailers),
        MapType::ResponseHeaders => state.stream().map(|s| &mut s.response_headers),
        MapType::ResponseTrailers => state.stream().map(|s| &mut s.response_trailers),
    };
    found.ok_or(Status::BadArgument)
}

fn get_header_map_pairs(c: &mut Caller<'_>, map: i32, ret_ptr: i32, ret_size: i32) -> HostResult {
    let map = MapType::parse(map)?;
    let pairs = serialize_map(map_mut(c.data_mut(), map, false)?);
    give(c, &pairs, ret_ptr, ret_size)
}

fn set_header_map_pairs(c: &mut Caller<'_>, map: i32, ptr: i32, len: i32) -> HostResult {
    let map = MapType::parse(map)?;
    let pairs = deserialize_map(&read(c, ptr, len)?)?;
    *map_mut(c.data_mut(), map, true)? = pairs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    Ok(())
}

fn get_header_map_value(
    c: &mut Caller<'_>,
    map: i32,
    kp: i32,
    kl: i32,
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let map = MapType::parse(map)?;
    let key = read_str(c, kp, kl)?.to_ascii_lowercase();
    let value = map_mut(c.data_mut(), map, false)?
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.clone())
        .ok_or(Status::NotFound)?;
    give(c, value.as_bytes(), ret_ptr, ret_size)
}

/// A single-header edit's arguments, read and checked as Envoy does: the map
/// type, a non-empty lower-cased name, and a value without CR, LF or NUL.
fn header_edit(
    c: &mut Caller<'_>,
    map: i32,
    key: (i32, i32),
    value: Option<(i32, i32)>,
) -> HostResult<(MapType, String, Option<String>)> {
    let map = MapType::parse(map)?;
    let key = read_str(c, key.0, key.1)?.to_ascii_lowercase();
    let value = value.map(|(p, l)| read_str(c, p, l)).transpose()?;
    let bad_value = value
        .as_deref()
        .is_some_and(|v| v.contains(['\r', '\n', '\0']));
    if key.is_empty() || bad_value {
        return Err(Status::BadArgument);
    }
    Ok((map, key, value))
}

/// Sets the first occurrence of a header and drops any later ones.
fn replace_header_map_value(
    c: &mut Caller<'_>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> HostResult {
    let (map, key, value) = header_edit(c, map, (kp, kl), Some((vp, vl)))?;
    let value = value.unwrap_or_default();
    let m = map_mut(c.data_mut(), map, true)?;
    match m.iter().position(|(k, _)| *k == key) {
        Some(first) => {
            m[first].1 = value;
            let mut at = 0;
            m.retain(|(k, _)| {
                at += 1;
                at - 1 <= first || *k != key
            });
        }
        None => m.push((key, value)),
    }
    Ok(())
}

fn add_header_map_value(
    c: &mut Caller<'_>,
    map: i32,
    kp: i32,
    kl: i32,
    vp: i32,
    vl: i32,
) -> HostResult {
    let (map, key, value) = header_edit(c, map, (kp, kl), Some((vp, vl)))?;
    map_mut(c.data_mut(), map, true)?.push((key, value.unwrap_or_default()));
    Ok(())
}

fn remove_header_map_value(c: &mut Caller<'_>, map: i32, kp: i32, kl: i32) -> HostResult {
    let (map, key, _) = header_edit(c, map, (kp, kl), None)?;
    map_mut(c.data_mut(), map, true)?.retain(|(k, _)| *k != key);
    Ok(())
}
