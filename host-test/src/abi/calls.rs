//! What the guest asks Envoy to do for a stream: dispatch an HTTP call
//! (`proxy_http_call`; gRPC is refused), answer with a local reply
//! (`proxy_send_local_response`), read a call's status (`proxy_get_status`),
//! and Envoy's foreign functions (`set_envoy_filter_state`,
//! `clear_route_cache`).

use super::maps::deserialize_map;
use super::memory::{give, read, read_str, write_u32};
use super::{answer, Caller, HostResult, Status, ENV};
use crate::{DispatchedCall, HostState, LocalResponse, Phase};
use wasmtime::{FuncType, Linker, Val, ValType};

/// Headers Envoy requires on a dispatched call.
const REQUIRED_CALL_HEADERS: [&str; 3] = [":method", ":path", ":authority"];

pub(super) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_http_call",
        |mut c: Caller<'_>,
         up: i32,
         ul: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         tp: i32,
         tl: i32,
         timeout: i32,
         ret: i32| {
            c.data_mut().note_host_call("proxy_http_call");
            let call = HttpCallArgs {
                cluster: (up, ul),
                headers: (hp, hl),
                body: (bp, bl),
                trailers: (tp, tl),
                timeout_ms: timeout as u32,
            };
            answer(http_call(&mut c, call, ret))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Caller<'_>,
         code: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32| {
            c.data_mut().note_host_call("proxy_send_local_response");
            let reply = LocalReplyArgs {
                code,
                details: (dp, dl),
                body: (bp, bl),
                headers: (hp, hl),
            };
            answer(send_local_response(&mut c, reply))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_status",
        |mut c: Caller<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32| {
            c.data_mut().note_host_call("proxy_get_status");
            answer(get_status(&mut c, ret_code, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_call_foreign_function",
        |mut c: Caller<'_>, np: i32, nl: i32, ap: i32, al: i32, _ret_ptr: i32, _ret_size: i32| {
            c.data_mut().note_host_call("proxy_call_foreign_function");
            answer(call_foreign_function(&mut c, np, nl, ap, al))
        },
    )?;
    link_grpc(linker)
}

/// gRPC is not offered: calls fail, and there is never a stream to act on.
fn link_grpc(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // (name, number of i32 parameters): too many for a typed closure to read well.
    for (name, params) in [("proxy_grpc_call", 12), ("proxy_grpc_stream", 9)] {
        let ty = FuncType::new(
            linker.engine(),
            vec![ValType::I32; params],
            vec![ValType::I32],
        );
        linker.func_new(ENV, name, ty, |_c, _args, out: &mut [Val]| {
            if let Some(ret) = out.first_mut() {
                *ret = Val::I32(answer(Err(Status::InternalFailure)));
            }
            Ok(())
        })?;
    }
    linker.func_wrap(
        ENV,
        "proxy_grpc_send",
        |mut c: Caller<'_>, _token: i32, _ptr: i32, _len: i32, _end: i32| {
            c.data_mut().note_host_call("proxy_grpc_send");
            answer(Err(Status::NotFound))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_cancel",
        |mut c: Caller<'_>, _token: i32| {
            c.data_mut().note_host_call("proxy_grpc_cancel");
            answer(Err(Status::NotFound))
        },
    )?;
    linker.func_wrap(ENV, "proxy_grpc_close", |mut c: Caller<'_>, _token: i32| {
        c.data_mut().note_host_call("proxy_grpc_close");
        answer(Err(Status::NotFound))
    })?;
    Ok(())
}

/// `proxy_http_call`'s guest (pointer, length) pairs and timeout.
struct HttpCallArgs {
    cluster: (i32, i32),
    headers: (i32, i32),
    body: (i32, i32),
    trailers: (i32, i32),
    timeout_ms: u32,
}

/// Records the call with a new token, as Envoy would send it; Envoy refuses
/// an unknown cluster and a call without `:method`, `:path`, `:authority`.
fn http_call(c: &mut Caller<'_>, call: HttpCallArgs, ret: i32) -> HostResult {
    let bad = |_| Status::BadArgument;
    let cluster = read_str(c, call.cluster.0, call.cluster.1).map_err(bad)?;
    let headers = read(c, call.headers.0, call.headers.1).map_err(bad)?;
    let body = read(c, call.body.0, call.body.1).map_err(bad)?;
    read(c, call.trailers.0, call.trailers.1).map_err(bad)?;
    let headers = deserialize_map(&headers)?;
    let st = c.data_mut();
    let known = st.known_clusters.is_empty() || st.known_clusters.contains(&cluster);
    let complete = REQUIRED_CALL_HEADERS
        .iter()
        .all(|h| headers.iter().any(|(k, _)| k == h));
    if !known || !complete {
        return Err(Status::BadArgument);
    }
    st.next_token += 1;
    let token = st.next_token;
    let context_id = st.current;
    st.dispatched.push(DispatchedCall {
        token,
        cluster,
        headers,
        body,
        timeout_ms: call.timeout_ms,
        context_id,
    });
    write_u32(c, ret, token)
}

/// `proxy_send_local_response`'s status code and guest (pointer, length) pairs.
struct LocalReplyArgs {
    code: i32,
    details: (i32, i32),
    body: (i32, i32),
    headers: (i32, i32),
}

/// Whether Envoy would still answer the viewer with a local reply.
fn accepts_local_reply(phase: Option<Phase>) -> bool {
    matches!(
        phase,
        Some(
            Phase::RequestHeaders
                | Phase::RequestBody
                | Phase::ResponseHeaders
                | Phase::ResponseBody
                | Phase::HttpCallResponse
        )
    )
}

fn valid_reply_code(code: i32) -> bool {
    (200..=599).contains(&code) || code == 100
}

fn send_local_response(c: &mut Caller<'_>, reply: LocalReplyArgs) -> HostResult {
    let bad = |_| Status::BadArgument;
    let details = read_str(c, reply.details.0, reply.details.1).map_err(bad)?;
    let body = read(c, reply.body.0, reply.body.1).map_err(bad)?;
    let headers = read(c, reply.headers.0, reply.headers.1).map_err(bad)?;
    let headers = deserialize_map(&headers)?;
    if !valid_reply_code(reply.code) {
        return Err(Status::BadArgument);
    }
    let state = c.data_mut();
    if !accepts_local_reply(state.phase) {
        return Err(Status::BadArgument);
    }
    let stream = state.stream().ok_or(Status::BadArgument)?;
    stream.local_response = Some(LocalResponse {
        status: reply.code as u32,
        headers,
        body,
        details,
    });
    Ok(())
}

fn get_status(c: &mut Caller<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32) -> HostResult {
    let (code, message) = c.data().status.clone();
    write_u32(c, ret_code, code)?;
    give(c, &message, ret_ptr, ret_size)
}

fn call_foreign_function(c: &mut Caller<'_>, np: i32, nl: i32, ap: i32, al: i32) -> HostResult {
    let name = read_str(c, np, nl).map_err(|_| Status::BadArgument)?;
    let args = read(c, ap, al).map_err(|_| Status::BadArgument)?;
    match name.as_str() {
        "set_envoy_filter_state" => {
            let (path, value) = decode_filter_state(&args)?;
            let stream = c.data_mut().stream().ok_or(Status::BadArgument)?;
            stream.filter_state.push((path, value));
            Ok(())
        }
        "clear_route_cache" => {
            let stream = c.data_mut().stream().ok_or(Status::BadArgument)?;
            stream.route_cache_cleared += 1;
            Ok(())
        }
        _ => Err(Status::NotFound),
    }
}

/// Protobuf wire types used by `SetEnvoyFilterStateArguments`.
const WIRE_VARINT: usize = 0;
const WIRE_LENGTH_DELIMITED: usize = 2;

/// Decodes `SetEnvoyFilterStateArguments { string path = 1; string value = 2; LifeSpan span = 3 }`.
fn decode_filter_state(bytes: &[u8]) -> HostResult<(String, String)> {
    let mut path = None;
    let mut value = String::new();
    let mut i = 0;
    let varint = |i: &mut usize| -> HostResult<usize> {
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
            (field @ (1 | 2), WIRE_LENGTH_DELIMITED) => {
                let len = varint(&mut i)?;
                let raw = bytes.get(i..i + len).ok_or(Status::SerializationFailure)?;
                i += len;
                let text =
                    String::from_utf8(raw.to_vec()).map_err(|_| Status::SerializationFailure)?;
                if field == 1 {
                    path = Some(text);
                } else {
                    value = text;
                }
            }
            (3, WIRE_VARINT) => {
                varint(&mut i)?;
            }
            _ => return Err(Status::SerializationFailure),
        }
    }
    Ok((path.ok_or(Status::BadArgument)?, value))
}
