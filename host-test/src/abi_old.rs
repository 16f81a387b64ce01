//! The host side of proxy-wasm ABI 0.2.1 (module `env`) and the WASI calls a
//! Rust `wasm32-wasip1` module makes. Status codes follow Envoy's.

use crate::{DispatchedCall, HostState, LocalResponse, LogLine, Metric, Phase};
use wasmtime::Result;
use wasmtime::{Caller, Extern, Linker};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    fn from_raw(raw: i32) -> Option<Self> {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    HttpCallResponseBody,
    VmConfiguration,
    PluginConfiguration,
}

impl BufferType {
    fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            4 => BufferType::HttpCallResponseBody,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            _ => return None,
        })
    }
}

type C<'a> = Caller<'a, HostState>;

fn memory(caller: &mut C<'_>) -> Option<wasmtime::Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

/// Reads guest memory, bounds-checked: an out-of-range pointer is a bad argument.
fn read(caller: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let mem = memory(caller).ok_or(Status::InternalFailure)?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let end = start.checked_add(len).ok_or(Status::BadArgument)?;
    mem.data(&*caller)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::BadArgument)
}

fn read_str(caller: &mut C<'_>, ptr: i32, len: i32) -> Result<String, Status> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

fn write(caller: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let mem = memory(caller).ok_or(Status::InternalFailure)?;
    let start = ptr as u32 as usize;
    let end = start.checked_add(bytes.len()).ok_or(Status::BadArgument)?;
    mem.data_mut(&mut *caller)
        .get_mut(start..end)
        .ok_or(Status::BadArgument)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut C<'_>, ptr: i32, value: u32) -> Result<(), Status> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands bytes to the guest: allocated with its `proxy_on_memory_allocate`,
/// pointer and size written to the return slots.
fn give(caller: &mut C<'_>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> Result<(), Status> {
    let alloc = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .ok_or(Status::InternalFailure)?
        .typed::<i32, i32>(&*caller)
        .map_err(|_| Status::InternalFailure)?;
    let ptr = if bytes.is_empty() {
        0
    } else {
        alloc
            .call(&mut *caller, bytes.len() as i32)
            .map_err(|_| Status::InternalFailure)?
    };
    if !bytes.is_empty() {
        write(caller, ptr, bytes)?;
    }
    write_u32(caller, ret_ptr, ptr as u32)?;
    write_u32(caller, ret_size, bytes.len() as u32)
}

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

pub(crate) fn deserialize_map(bytes: &[u8]) -> Result<Vec<(String, String)>, Status> {
    let u32_at = |at: usize| -> Result<usize, Status> {
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
    let mut take = |len: usize| -> Result<String, Status> {
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

/// The map a call may touch in the current phase; `None` means Envoy has no
/// such map now (it answers BadArgument).
fn map_mut(
    state: &mut HostState,
    map: MapType,
    writing: bool,
) -> Option<&mut Vec<(String, String)>> {
    let phase = state.phase?;
    if map == MapType::HttpCallResponseHeaders || map == MapType::HttpCallResponseTrailers {
        if phase != Phase::HttpCallResponse {
            return None;
        }
        let resp = state.http_call_response.as_mut()?;
        return Some(if map == MapType::HttpCallResponseHeaders {
            &mut resp.0
        } else {
            &mut resp.2
        });
    }
    let request_phase = matches!(phase, Phase::RequestHeaders | Phase::RequestBody);
    let response_phase = matches!(phase, Phase::ResponseHeaders | Phase::ResponseBody);
    let allowed = match map {
        MapType::RequestHeaders | MapType::RequestTrailers => {
            if writing {
                request_phase
            } else {
                !matches!(phase, Phase::Root)
            }
        }
        _ => response_phase || (!writing && matches!(phase, Phase::HttpCallResponse | Phase::Done)),
    };
    if !allowed {
        return None;
    }
    let stream = state.stream()?;
    Some(match map {
        MapType::RequestHeaders => &mut stream.request_headers,
        MapType::RequestTrailers => &mut stream.request_trailers,
        MapType::ResponseHeaders => &mut stream.response_headers,
        _ => &mut stream.response_trailers,
    })
}

fn status(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok as i32,
        Err(s) => s as i32,
    }
}

fn log_level_ok(level: i32) -> bool {
    (0..=5).contains(&level)
}

/// Decodes `SetEnvoyFilterStateArguments { string path = 1; string value = 2; LifeSpan span = 3 }`.
fn decode_filter_state(bytes: &[u8]) -> Result<(String, String), Status> {
    let mut path = None;
    let mut value = String::new();
    let mut i = 0;
    let varint = |i: &mut usize| -> Result<usize, Status> {
        let mut n = 0usize;
        for shift in (0..35).step_by(7) {
            let b = *bytes.get(*i).ok_or(Status::SerializationFailure)?;
            *i += 1;
            n |= usize::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(n);
            }
        }
        Err(Status::SerializationFailure)
    };
    while i < bytes.len() {
        let key = varint(&mut i)?;
        match (key >> 3, key & 7) {
            (1 | 2, 2) => {
                let len = varint(&mut i)?;
                let raw = bytes.get(i..i + len).ok_or(Status::SerializationFailure)?;
                i += len;
                let text =
                    String::from_utf8(raw.to_vec()).map_err(|_| Status::SerializationFailure)?;
                if key >> 3 == 1 {
                    path = Some(text);
                } else {
                    value = text;
                }
            }
            (3, 0) => {
                varint(&mut i)?;
            }
            _ => return Err(Status::SerializationFailure),
        }
    }
    Ok((path.ok_or(Status::BadArgument)?, value))
}

pub(crate) fn link(linker: &mut Linker<HostState>) -> Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> i32 {
            if !log_level_ok(level) {
                return Status::BadArgument as i32;
            }
            match read_str(&mut c, ptr, len) {
                Ok(message) => {
                    c.data_mut().logs.push(LogLine {
                        level: level as u32,
                        message,
                    });
                    Status::Ok as i32
                }
                Err(s) => s as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: i32| -> i32 { status(write_u32(&mut c, ret, 0)) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> i32 {
            let now = c.data().now_nanos;
            status(write(&mut c, ret, &now.to_le_bytes()))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| -> i32 {
            c.data_mut().tick_period_ms = ms as u32;
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let Some(kind) = BufferType::from_raw(kind) else {
                return Status::BadArgument as i32;
            };
            let st = c.data_mut();
            let phase = st.phase;
            let bytes = match kind {
                BufferType::PluginConfiguration if phase == Some(Phase::Root) => {
                    Some(st.plugin_configuration.clone())
                }
                BufferType::VmConfiguration if phase == Some(Phase::Root) => {
                    Some(st.vm_configuration.clone())
                }
                BufferType::RequestBody if phase == Some(Phase::RequestBody) => {
                    st.stream().map(|s| s.request_body.clone())
                }
                BufferType::ResponseBody if phase == Some(Phase::ResponseBody) => {
                    st.stream().map(|s| s.response_body.clone())
                }
                BufferType::HttpCallResponseBody if phase == Some(Phase::HttpCallResponse) => {
                    st.http_call_response.as_ref().map(|r| r.1.clone())
                }
                _ => None,
            };
            let Some(bytes) = bytes else {
                return Status::NotFound as i32;
            };
            let start = start as u32 as usize;
            if start > bytes.len() {
                return Status::BadArgument as i32;
            }
            let end = start.saturating_add(max as u32 as usize).min(bytes.len());
            status(give(&mut c, &bytes[start..end], ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> i32 {
            let data = match read(&mut c, ptr, len) {
                Ok(d) => d,
                Err(s) => return s as i32,
            };
            let st = c.data_mut();
            let phase = st.phase;
            let buf = match (BufferType::from_raw(kind), phase) {
                (Some(BufferType::RequestBody), Some(Phase::RequestBody)) => {
                    st.stream().map(|s| &mut s.request_body)
                }
                (Some(BufferType::ResponseBody), Some(Phase::ResponseBody)) => {
                    st.stream().map(|s| &mut s.response_body)
                }
                (None, _) => return Status::BadArgument as i32,
                _ => None,
            };
            let Some(buf) = buf else {
                return Status::NotFound as i32;
            };
            let start = (start as u32 as usize).min(buf.len());
            let end = start.saturating_add(size as u32 as usize).min(buf.len());
            buf.splice(start..end, data);
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let Some(map) = MapType::from_raw(map) else {
                return Status::BadArgument as i32;
            };
            let Some(pairs) = map_mut(c.data_mut(), map, false).map(|m| serialize_map(m)) else {
                return Status::BadArgument as i32;
            };
            status(give(&mut c, &pairs, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map: i32, ptr: i32, len: i32| -> i32 {
            let Some(map) = MapType::from_raw(map) else {
                return Status::BadArgument as i32;
            };
            let pairs = match read(&mut c, ptr, len).and_then(|b| deserialize_map(&b)) {
                Ok(p) => p,
                Err(s) => return s as i32,
            };
            match map_mut(c.data_mut(), map, true) {
                Some(m) => {
                    *m = pairs
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect();
                    Status::Ok as i32
                }
                None => Status::BadArgument as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, map: i32, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let Some(map) = MapType::from_raw(map) else {
                return Status::BadArgument as i32;
            };
            let key = match read_str(&mut c, kp, kl) {
                Ok(k) => k.to_ascii_lowercase(),
                Err(s) => return s as i32,
            };
            let Some(m) = map_mut(c.data_mut(), map, false) else {
                return Status::BadArgument as i32;
            };
            let Some(value) = m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()) else {
                return Status::NotFound as i32;
            };
            status(give(&mut c, value.as_bytes(), ret_ptr, ret_size))
        },
    )?;
    /// The three single-header edits; values are guest (pointer, length) pairs.
    enum HeaderEdit {
        Replace(i32, i32),
        Add(i32, i32),
        Remove,
    }
    fn edit(c: &mut C<'_>, map: i32, kp: i32, kl: i32, op: HeaderEdit) -> i32 {
        let Some(map) = MapType::from_raw(map) else {
            return Status::BadArgument as i32;
        };
        let key = match read_str(c, kp, kl) {
            Ok(k) => k.to_ascii_lowercase(),
            Err(s) => return s as i32,
        };
        let value = match op {
            HeaderEdit::Replace(p, l) | HeaderEdit::Add(p, l) => Some((p, l)),
            HeaderEdit::Remove => None,
        };
        let value = match value.map(|(p, l)| read_str(c, p, l)).transpose() {
            Ok(v) => v,
            Err(s) => return s as i32,
        };
        if key.is_empty()
            || value
                .as_deref()
                .is_some_and(|v| v.contains(['\r', '\n', '\0']))
        {
            return Status::BadArgument as i32;
        }
        let Some(m) = map_mut(c.data_mut(), map, true) else {
            return Status::BadArgument as i32;
        };
        match (op, value) {
            // Replace sets the first occurrence and drops any later ones.
            (HeaderEdit::Replace(..), Some(v)) => match m.iter().position(|(k, _)| *k == key) {
                Some(first) => {
                    m[first].1 = v;
                    let mut at = 0;
                    m.retain(|(k, _)| {
                        at += 1;
                        at - 1 <= first || *k != key
                    });
                }
                None => m.push((key, v)),
            },
            (HeaderEdit::Add(..), Some(v)) => m.push((key, v)),
            _ => m.retain(|(k, _)| *k != key),
        }
        Status::Ok as i32
    }
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
            edit(&mut c, map, kp, kl, HeaderEdit::Replace(vp, vl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
            edit(&mut c, map, kp, kl, HeaderEdit::Add(vp, vl))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map: i32, kp: i32, kl: i32| -> i32 {
            edit(&mut c, map, kp, kl, HeaderEdit::Remove)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let path = match read(&mut c, pp, pl) {
                Ok(p) => String::from_utf8_lossy(&p)
                    .trim_end_matches('\0')
                    .replace('\0', "."),
                Err(s) => return s as i32,
            };
            match c.data().properties.get(&path).cloned() {
                Some(v) => status(give(&mut c, &v, ret_ptr, ret_size)),
                None => Status::NotFound as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> i32 {
            match (read(&mut c, pp, pl), read(&mut c, vp, vl)) {
                (Ok(p), Ok(v)) => {
                    let path = String::from_utf8_lossy(&p)
                        .trim_end_matches('\0')
                        .replace('\0', ".");
                    c.data_mut().properties.insert(path, v);
                    Status::Ok as i32
                }
                _ => Status::BadArgument as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| -> i32 {
            let key = match read_str(&mut c, kp, kl) {
                Ok(k) => k,
                Err(s) => return s as i32,
            };
            let Some((value, cas)) = c.data().shared_data.get(&key).cloned() else {
                return Status::NotFound as i32;
            };
            status(
                give(&mut c, &value, ret_ptr, ret_size)
                    .and_then(|()| write_u32(&mut c, ret_cas, cas)),
            )
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> i32 {
            let (key, value) = match (read_str(&mut c, kp, kl), read(&mut c, vp, vl)) {
                (Ok(k), Ok(v)) => (k, v),
                _ => return Status::BadArgument as i32,
            };
            let entry = c
                .data_mut()
                .shared_data
                .entry(key)
                .or_insert((Vec::new(), 0));
            if cas != 0 && entry.1 != cas as u32 {
                return Status::CasMismatch as i32;
            }
            *entry = (value, entry.1 + 1);
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nl: i32, ret: i32| -> i32 {
            let name = match read_str(&mut c, np, nl) {
                Ok(n) => n,
                Err(s) => return s as i32,
            };
            let queues = &mut c.data_mut().queues;
            let id = match queues.iter().position(|q| *q == name) {
                Some(i) => i,
                None => {
                    queues.push(name);
                    queues.len() - 1
                }
            };
            status(write_u32(&mut c, ret, id as u32 + 1))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, _vp: i32, _vl: i32, np: i32, nl: i32, ret: i32| -> i32 {
            let name = match read_str(&mut c, np, nl) {
                Ok(n) => n,
                Err(s) => return s as i32,
            };
            match c.data().queues.iter().position(|q| *q == name) {
                Some(i) => status(write_u32(&mut c, ret, i as u32 + 1)),
                None => Status::NotFound as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |_c: C<'_>, _id: i32, _p: i32, _s: i32| -> i32 { Status::Empty as i32 },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |_c: C<'_>, _id: i32, _p: i32, _s: i32| -> i32 { Status::Ok as i32 },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |c: C<'_>, _kind: i32| -> i32 {
            if c.data().streams.contains_key(&c.data().current) {
                Status::Ok as i32
            } else {
                Status::NotFound as i32
            }
        },
    )?;
    linker.func_wrap("env", "proxy_close_stream", |c: C<'_>, _kind: i32| -> i32 {
        if c.data().streams.contains_key(&c.data().current) {
            Status::Ok as i32
        } else {
            Status::NotFound as i32
        }
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32| -> i32 {
            let (code, message) = c.data().status.clone();
            status(
                write_u32(&mut c, ret_code, code)
                    .and_then(|()| give(&mut c, &message, ret_ptr, ret_size)),
            )
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> i32 {
            let (details, body, headers) = match (
                read_str(&mut c, dp, dl),
                read(&mut c, bp, bl),
                read(&mut c, hp, hl),
            ) {
                (Ok(d), Ok(b), Ok(h)) => (d, b, h),
                _ => return Status::BadArgument as i32,
            };
            let headers = match deserialize_map(&headers) {
                Ok(h) => h,
                Err(s) => return s as i32,
            };
            if !(200..=599).contains(&code) && code != 100 {
                return Status::BadArgument as i32;
            }
            let in_stream = matches!(
                c.data().phase,
                Some(
                    Phase::RequestHeaders
                        | Phase::RequestBody
                        | Phase::ResponseHeaders
                        | Phase::ResponseBody
                        | Phase::HttpCallResponse
                )
            );
            let Some(stream) = c.data_mut().stream().filter(|_| in_stream) else {
                return Status::BadArgument as i32;
            };
            stream.local_response = Some(LocalResponse {
                status: code as u32,
                headers,
                body,
                details,
            });
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: i32,
         ul: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         tp: i32,
         tl: i32,
         timeout: i32,
         ret: i32|
         -> i32 {
            let parts = (
                read_str(&mut c, up, ul),
                read(&mut c, hp, hl),
                read(&mut c, bp, bl),
                read(&mut c, tp, tl),
            );
            let (cluster, headers, body) = match parts {
                (Ok(u), Ok(h), Ok(b), Ok(_)) => (u, h, b),
                _ => return Status::BadArgument as i32,
            };
            let headers = match deserialize_map(&headers) {
                Ok(h) => h,
                Err(s) => return s as i32,
            };
            let st = c.data_mut();
            // Envoy refuses unknown clusters and calls without :method, :path, :authority.
            let known = st.known_clusters.is_empty() || st.known_clusters.contains(&cluster);
            let complete = [":method", ":path", ":authority"]
                .iter()
                .all(|h| headers.iter().any(|(k, _)| k == h));
            if !known || !complete {
                return Status::BadArgument as i32;
            }
            st.next_token += 1;
            let token = st.next_token;
            let context_id = st.current;
            st.dispatched.push(DispatchedCall {
                token,
                cluster,
                headers,
                body,
                timeout_ms: timeout as u32,
                context_id,
            });
            status(write_u32(&mut c, ret, token))
        },
    )?;
    for name in ["proxy_grpc_call", "proxy_grpc_stream"] {
        let unsupported = move |_c: C<'_>, _args: &[wasmtime::Val], out: &mut [wasmtime::Val]| {
            out[0] = wasmtime::Val::I32(Status::InternalFailure as i32);
            Ok(())
        };
        let params = if name == "proxy_grpc_call" { 12 } else { 9 };
        let ty = wasmtime::FuncType::new(
            linker.engine(),
            vec![wasmtime::ValType::I32; params],
            vec![wasmtime::ValType::I32],
        );
        linker.func_new("env", name, ty, unsupported)?;
    }
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_c: C<'_>, _t: i32, _p: i32, _s: i32, _e: i32| -> i32 { Status::NotFound as i32 },
    )?;
    linker.func_wrap("env", "proxy_grpc_cancel", |_c: C<'_>, _t: i32| -> i32 {
        Status::NotFound as i32
    })?;
    linker.func_wrap("env", "proxy_grpc_close", |_c: C<'_>, _t: i32| -> i32 {
        Status::NotFound as i32
    })?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> i32 {
            let id = id as u32;
            if id == 1 || c.data().streams.contains_key(&id) {
                c.data_mut().current = if id == 1 { 0 } else { id };
                Status::Ok as i32
            } else {
                Status::BadArgument as i32
            }
        },
    )?;
    linker.func_wrap("env", "proxy_done", |_c: C<'_>| -> i32 {
        Status::Ok as i32
    })?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>, np: i32, nl: i32, ap: i32, al: i32, _ret_ptr: i32, _ret_size: i32| -> i32 {
            let (name, args) = match (read_str(&mut c, np, nl), read(&mut c, ap, al)) {
                (Ok(n), Ok(a)) => (n, a),
                _ => return Status::BadArgument as i32,
            };
            match name.as_str() {
                "set_envoy_filter_state" => {
                    let (path, value) = match decode_filter_state(&args) {
                        Ok(pv) => pv,
                        Err(s) => return s as i32,
                    };
                    let Some(stream) = c.data_mut().stream() else {
                        return Status::BadArgument as i32;
                    };
                    stream.filter_state.push((path, value));
                    Status::Ok as i32
                }
                "clear_route_cache" => match c.data_mut().stream() {
                    Some(stream) => {
                        stream.route_cache_cleared += 1;
                        Status::Ok as i32
                    }
                    None => Status::BadArgument as i32,
                },
                _ => Status::NotFound as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, np: i32, nl: i32, ret: i32| -> i32 {
            if !(0..=2).contains(&kind) {
                return Status::BadArgument as i32;
            }
            let name = match read_str(&mut c, np, nl) {
                Ok(n) => n,
                Err(s) => return s as i32,
            };
            let metrics = &mut c.data_mut().metrics;
            let id = match metrics.iter().position(|m| m.name == name) {
                Some(i) => i,
                None => {
                    metrics.push(Metric {
                        kind: kind as u32,
                        name,
                        value: 0,
                    });
                    metrics.len() - 1
                }
            };
            status(write_u32(&mut c, ret, id as u32))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, offset: i64| -> i32 {
            match c.data_mut().metrics.get_mut(id as u32 as usize) {
                Some(m) if m.kind != 2 => {
                    m.value = m.value.saturating_add_signed(offset);
                    Status::Ok as i32
                }
                Some(_) => Status::BadArgument as i32,
                None => Status::NotFound as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, value: i64| -> i32 {
            match c.data_mut().metrics.get_mut(id as u32 as usize) {
                Some(m) => {
                    m.value = value as u64;
                    Status::Ok as i32
                }
                None => Status::NotFound as i32,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| -> i32 {
            match c.data().metrics.get(id as u32 as usize).map(|m| m.value) {
                Some(v) => status(write(&mut c, ret, &v.to_le_bytes())),
                None => Status::NotFound as i32,
            }
        },
    )?;
    link_wasi(linker)
}

/// The WASI calls Rust's standard library makes at start-up and on a panic.
fn link_wasi(linker: &mut Linker<HostState>) -> Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    linker.func_wrap(W, "random_get", |mut c: C<'_>, ptr: i32, len: i32| -> i32 {
        // Deterministic bytes keep runs reproducible (HashMap seeds).
        let bytes: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        if write(&mut c, ptr, &bytes).is_ok() {
            0
        } else {
            21
        }
    })?;
    linker.func_wrap(
        W,
        "environ_sizes_get",
        |mut c: C<'_>, count: i32, size: i32| -> i32 {
            if write_u32(&mut c, count, 0)
                .and_then(|()| write_u32(&mut c, size, 0))
                .is_ok()
            {
                0
            } else {
                21
            }
        },
    )?;
    linker.func_wrap(W, "environ_get", |_c: C<'_>, _a: i32, _b: i32| -> i32 { 0 })?;
    linker.func_wrap(
        W,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, written: i32| -> i32 {
            let mut text = Vec::new();
            for i in 0..n {
                let Ok(iov) = read(&mut c, iovs + i * 8, 8) else {
                    return 21;
                };
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                match read(&mut c, ptr, len) {
                    Ok(b) => text.extend(b),
                    Err(_) => return 21,
                }
            }
            let total = text.len() as u32;
            c.data_mut().logs.push(LogLine {
                level: 100 + fd as u32,
                message: String::from_utf8_lossy(&text).into_owned(),
            });
            if write_u32(&mut c, written, total).is_ok() {
                0
            } else {
                21
            }
        },
    )?;
    linker.func_wrap(W, "proc_exit", |_c: C<'_>, code: i32| -> Result<()> {
        wasmtime::bail!("guest called proc_exit({code})")
    })?;
    Ok(())
}
