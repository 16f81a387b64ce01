//! Guest linear memory, bounds-checked: a pointer or length outside the
//! guest's memory is a `BadArgument` for the call, never a host crash.

use super::{Caller, HostResult, Status};
use wasmtime::{Extern, Memory};

fn memory(caller: &mut Caller<'_>) -> HostResult<Memory> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or(Status::InternalFailure)
}

/// `len` bytes at `ptr` (both as the guest's unsigned 32-bit values).
pub(super) fn read(caller: &mut Caller<'_>, ptr: i32, len: i32) -> HostResult<Vec<u8>> {
    let mem = memory(caller)?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let end = start.checked_add(len).ok_or(Status::BadArgument)?;
    mem.data(&*caller)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::BadArgument)
}

/// `len` bytes at `ptr` that must be UTF-8.
pub(super) fn read_str(caller: &mut Caller<'_>, ptr: i32, len: i32) -> HostResult<String> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

pub(super) fn write(caller: &mut Caller<'_>, ptr: i32, bytes: &[u8]) -> HostResult {
    let mem = memory(caller)?;
    let start = ptr as u32 as usize;
    let end = start.checked_add(bytes.len()).ok_or(Status::BadArgument)?;
    mem.data_mut(&mut *caller)
        .get_mut(start..end)
        .ok_or(Status::BadArgument)?
        .copy_from_slice(bytes);
    Ok(())
}

pub(super) fn write_u32(caller: &mut Caller<'_>, ptr: i32, value: u32) -> HostResult {
    write(caller, ptr, &value.to_le_bytes())
}

pub(super) fn write_u64(caller: &mut Caller<'_>, ptr: i32, value: u64) -> HostResult {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands bytes to the guest: allocated with its `proxy_on_memory_allocate`,
/// pointer and size written to the return slots (a null pointer for none).
pub(super) fn give(
    caller: &mut Caller<'_>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> HostResult {
    let allocate = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .ok_or(Status::InternalFailure)?
        .typed::<i32, i32>(&*caller)
        .map_err(|_| Status::InternalFailure)?;
    let ptr = if bytes.is_empty() {
        0
    } else {
        caller
            .data_mut()
            .note_host_call(crate::state::GUEST_ALLOCATION);
        let ptr = allocate
            .call(&mut *caller, bytes.len() as i32)
            .map_err(|_| Status::InternalFailure)?;
        write(caller, ptr, bytes)?;
        ptr
    };
    write_u32(caller, ret_ptr, ptr as u32)?;
    write_u32(caller, ret_size, bytes.len() as u32)
}
