//! The compiled filter and the Envoy processes that run it.
//!
//! A [`Filter`] is the module compiled and linked once ([`InstancePre`]); a
//! [`Process`] is one Envoy process: each [`Vm`] started in it is one
//! worker's instance of the filter, and all of them see the process's shared
//! data (kept per vm_id, as Envoy does). Metrics, logs and streams stay per
//! VM. `Filter::start` and `Filter::instantiate` give a VM alone in a
//! process of its own.
//!
//! ```no_run
//! # fn main() -> wasmtime::Result<()> {
//! let filter = host_test::Filter::shared()?;
//! let process = filter.process();
//! let main_thread = process.start("{}")?;
//! let worker = process.start("{}")?;
//! // Both VMs read and write the same shared data:
//! let _ = process.shared_data().get(main_thread.vm_id(), "some-key");
//! # drop(worker);
//! # Ok(())
//! # }
//! ```

use crate::abi;
use crate::shared_data::SharedData;
use crate::state::{HostState, ROOT_CONTEXT};
use crate::vm::Vm;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use wasmtime::{bail, format_err as anyhow, Result};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store};

/// The host clock's start: a fixed instant keeps runs reproducible.
const START_NANOS: u64 = 1_700_000_000_000_000_000;

/// The compiled filter, shared by every test in a process.
pub struct Filter {
    engine: Engine,
    pre: InstancePre<HostState>,
}

/// Where the release filter is built by `cargo build --release --target wasm32-wasip1`.
pub fn filter_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip1/release/origin_policy.wasm")
}

impl Filter {
    pub fn load(path: &Path) -> Result<Filter> {
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config)?;
        let module = Module::from_file(&engine, path).map_err(|e| {
            anyhow!(
                "{}: {e:#} (build it: cargo build --release --target wasm32-wasip1 -p origin-policy-filter)",
                path.display()
            )
        })?;
        let mut linker = Linker::new(&engine);
        abi::link(&mut linker)?;
        // Unknown imports fail here, at link time, as in Envoy.
        let pre = linker.instantiate_pre(&module)?;
        Ok(Filter { engine, pre })
    }

    /// The release filter, compiled once per test process.
    pub fn shared() -> Result<&'static Filter> {
        static FILTER: OnceLock<std::result::Result<Filter, String>> = OnceLock::new();
        FILTER
            .get_or_init(|| Filter::load(&filter_path()).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// A new Envoy process for this filter, with empty shared data.
    pub fn process(&self) -> Process<'_> {
        Process {
            filter: self,
            shared_data: SharedData::new(),
            vm_id: String::new(),
        }
    }

    /// A fresh VM, alone in its own process, with its root context
    /// configured. Fails if `on_configure` refused.
    pub fn start(&self, plugin_configuration: &str) -> Result<Vm> {
        self.process().start(plugin_configuration)
    }

    /// A fresh VM, alone in its own process, whose root context exists but is
    /// not configured yet.
    pub fn instantiate(&self) -> Result<Vm> {
        self.process().instantiate()
    }
}

/// Tells VMs apart for shared queues (unique across processes too).
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One Envoy process: VMs started here share its shared data.
#[derive(Clone)]
pub struct Process<'f> {
    filter: &'f Filter,
    shared_data: SharedData,
    vm_id: String,
}

impl<'f> Process<'f> {
    /// The same process, for VMs with another vm_id: they see their own part
    /// of the shared data, as in Envoy. The default vm_id is empty.
    pub fn with_vm_id(&self, vm_id: &str) -> Process<'f> {
        Process {
            vm_id: vm_id.to_owned(),
            ..self.clone()
        }
    }

    /// The vm_id of the VMs this starts.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// The process's shared data: what `proxy_get_shared_data` answers (with
    /// a VM's vm_id), readable and writable by tests.
    pub fn shared_data(&self) -> &SharedData {
        &self.shared_data
    }

    /// A fresh VM (one more worker) with its root context configured. Fails
    /// if `on_configure` refused.
    pub fn start(&self, plugin_configuration: &str) -> Result<Vm> {
        let mut vm = self.instantiate()?;
        if !vm.configure(plugin_configuration)? {
            bail!("on_configure returned false; logs:\n{}", vm.log_text());
        }
        Ok(vm)
    }

    /// A fresh VM whose root context exists but is not configured yet.
    pub fn instantiate(&self) -> Result<Vm> {
        let mut store = Store::new(
            &self.filter.engine,
            HostState {
                now_nanos: START_NANOS,
                vm_id: self.vm_id.clone(),
                shared_data: self.shared_data.clone(),
                serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                ..HostState::default()
            },
        );
        store.set_fuel(u64::MAX)?;
        let instance = self.filter.pre.instantiate(&mut store)?;
        Vm::boot(store, instance, ROOT_CONTEXT)
    }
}
