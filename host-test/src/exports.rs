//! The guest's proxy-wasm entry points, typed and looked up once per
//! instance (as wasmtime's embedding examples do with `get_typed_func`).
//!
//! An export with the wrong signature fails the instantiation; a missing one
//! fails only when the host needs it, naming it.

use crate::HostState;
use wasmtime::{bail, Instance, Result, Store, TypedFunc, WasmParams, WasmResults};

/// One guest export: its name (for errors) and the typed function, if exported.
pub(crate) struct Export<Params, Results> {
    pub(crate) name: &'static str,
    func: Option<TypedFunc<Params, Results>>,
}

impl<Params: WasmParams, Results: WasmResults> Export<Params, Results> {
    fn lookup(
        store: &mut Store<HostState>,
        instance: &Instance,
        name: &'static str,
    ) -> Result<Self> {
        let func = match instance.get_func(&mut *store, name) {
            Some(f) => Some(
                f.typed(&*store)
                    .map_err(|e| e.context(format!("guest export {name}")))?,
            ),
            None => None,
        };
        Ok(Export { name, func })
    }

    pub(crate) fn func(&self) -> Result<&TypedFunc<Params, Results>> {
        match &self.func {
            Some(f) => Ok(f),
            None => bail!("guest does not export {}", self.name),
        }
    }
}

type ContextId = i32;
/// A count (headers, bytes) as the ABI passes it.
type Size = i32;
/// `end_of_stream` as 0 or 1.
type Flag = i32;
/// An action (`Continue` 0, `Pause` 1) or a boolean (0 is false).
type Answer = i32;

/// Every entry point the host calls.
pub(crate) struct Exports {
    pub(crate) initialize: Export<(), ()>,
    pub(crate) on_context_create: Export<(ContextId, ContextId), ()>,
    pub(crate) on_vm_start: Export<(ContextId, Size), Answer>,
    pub(crate) on_configure: Export<(ContextId, Size), Answer>,
    pub(crate) on_request_headers: Export<(ContextId, Size, Flag), Answer>,
    pub(crate) on_request_body: Export<(ContextId, Size, Flag), Answer>,
    pub(crate) on_response_headers: Export<(ContextId, Size, Flag), Answer>,
    pub(crate) on_response_body: Export<(ContextId, Size, Flag), Answer>,
    /// (context, token, header count, body size, trailer count)
    pub(crate) on_http_call_response: Export<(ContextId, i32, Size, Size, Size), ()>,
    pub(crate) on_done: Export<ContextId, Answer>,
    pub(crate) on_log: Export<ContextId, ()>,
    pub(crate) on_delete: Export<ContextId, ()>,
    pub(crate) on_tick: Export<ContextId, ()>,
    pub(crate) on_queue_ready: Export<(ContextId, i32), ()>,
}

impl Exports {
    pub(crate) fn lookup(store: &mut Store<HostState>, instance: &Instance) -> Result<Self> {
        Ok(Exports {
            initialize: Export::lookup(store, instance, "_initialize")?,
            on_context_create: Export::lookup(store, instance, "proxy_on_context_create")?,
            on_vm_start: Export::lookup(store, instance, "proxy_on_vm_start")?,
            on_configure: Export::lookup(store, instance, "proxy_on_configure")?,
            on_request_headers: Export::lookup(store, instance, "proxy_on_request_headers")?,
            on_request_body: Export::lookup(store, instance, "proxy_on_request_body")?,
            on_response_headers: Export::lookup(store, instance, "proxy_on_response_headers")?,
            on_response_body: Export::lookup(store, instance, "proxy_on_response_body")?,
            on_http_call_response: Export::lookup(store, instance, "proxy_on_http_call_response")?,
            on_done: Export::lookup(store, instance, "proxy_on_done")?,
            on_log: Export::lookup(store, instance, "proxy_on_log")?,
            on_delete: Export::lookup(store, instance, "proxy_on_delete")?,
            on_tick: Export::lookup(store, instance, "proxy_on_tick")?,
            on_queue_ready: Export::lookup(store, instance, "proxy_on_queue_ready")?,
        })
    }
}
