//! A proxy-wasm HTTP filter that lets every request and response through
//! untouched. Envoy still creates a context per stream and calls into the VM
//! for each callback, which is the fixed price of any wasm filter; the
//! benchmark subtracts it to see what origin-policy's own work costs.

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{ContextType, LogLevel};

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
    }}

    struct NoopRoot;

    impl Context for NoopRoot {}

    impl RootContext for NoopRoot {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Noop))
        }
    }

    struct Noop;

    impl Context for Noop {}

    // The trait's defaults continue every callback.
    impl HttpContext for Noop {}
}
