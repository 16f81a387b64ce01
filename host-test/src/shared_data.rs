//! proxy-wasm shared data as Envoy keeps it: one store per process, keyed by
//! vm_id, seen by every worker's VM (proxy-wasm-cpp-host's `SharedData`).
//!
//! Semantics (Envoy 1.40):
//! - a missing key is NotFound;
//! - a set with cas 0 always succeeds;
//! - a set with a non-zero cas on an existing key fails with CasMismatch
//!   unless the cas is the stored one;
//! - a set on a missing key succeeds whatever cas is given;
//! - every successful set gives the entry a new cas from one counter for the
//!   whole process (starting at 1, never 0).
//!
//! And shared queues as proxy-wasm-cpp-host keeps them (`SharedQueue`): one
//! per (vm_id, name), delivered to the context that registered the name last
//! (a second registration takes the queue over, keeping its data); each
//! enqueue posts one `on_queue_ready` to that context's VM, which runs it
//! when the test lets it (`Vm::deliver_queues`, the worker's event loop).

use crate::abi::Status;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A handle on one process's shared data; clones share the same store.
#[derive(Debug, Clone, Default)]
pub struct SharedData {
    store: Arc<Mutex<Store>>,
    queues: Arc<Mutex<Queues>>,
}

/// The VM (its serial in the process) and root context a queue delivers to.
pub type Consumer = (u64, u32);

#[derive(Debug, Default)]
struct Queues {
    tokens: HashMap<(String, String), u32>,
    by_token: HashMap<u32, Queue>,
}

#[derive(Debug)]
struct Queue {
    consumer: Consumer,
    data: std::collections::VecDeque<Vec<u8>>,
    /// `on_queue_ready` calls posted and not yet run.
    posted: u32,
}

#[derive(Debug)]
struct Store {
    by_vm_id: HashMap<String, HashMap<String, Entry>>,
    /// The cas the next successful set hands out.
    next_cas: u32,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            by_vm_id: HashMap::new(),
            next_cas: 1,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    cas: u32,
}

impl Store {
    fn next_cas(&mut self) -> u32 {
        let cas = self.next_cas;
        // 0 means "no cas" in the ABI, so the counter skips it on wrapping.
        self.next_cas = self.next_cas.wrapping_add(1).max(1);
        cas
    }
}

impl SharedData {
    /// An empty store: a new process.
    pub fn new() -> Self {
        SharedData::default()
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock left a consistent map.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value and cas of `key` in `vm_id`'s data, as `proxy_get_shared_data`.
    pub fn get(&self, vm_id: &str, key: &str) -> Result<(Vec<u8>, u32), Status> {
        self.lock()
            .by_vm_id
            .get(vm_id)
            .and_then(|data| data.get(key))
            .map(|e| (e.value.clone(), e.cas))
            .ok_or(Status::NotFound)
    }

    /// Stores `value` under `key` in `vm_id`'s data, as `proxy_set_shared_data`.
    pub fn set(&self, vm_id: &str, key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
        let mut store = self.lock();
        let stored = store
            .by_vm_id
            .get(vm_id)
            .and_then(|data| data.get(key))
            .map(|e| e.cas);
        if matches!(stored, Some(current) if cas != 0 && cas != current) {
            return Err(Status::CasMismatch);
        }
        let cas = store.next_cas();
        store.by_vm_id.entry(vm_id.to_owned()).or_default().insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                cas,
            },
        );
        Ok(())
    }

    /// The keys `vm_id`'s data holds, sorted.
    pub fn keys(&self, vm_id: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .lock()
            .by_vm_id
            .get(vm_id)
            .map(|data| data.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    fn queues(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `proxy_register_shared_queue`: the queue's token (the same for the
    /// same vm_id and name), now delivered to `consumer`.
    pub fn register_queue(&self, vm_id: &str, name: &str, consumer: Consumer) -> u32 {
        let mut queues = self.queues();
        let next = queues.tokens.len() as u32 + 1;
        let token = *queues
            .tokens
            .entry((vm_id.to_owned(), name.to_owned()))
            .or_insert(next);
        queues
            .by_token
            .entry(token)
            .and_modify(|q| q.consumer = consumer)
            .or_insert(Queue {
                consumer,
                data: Default::default(),
                posted: 0,
            });
        token
    }

    /// `proxy_resolve_shared_queue`.
    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> Result<u32, Status> {
        let key = (vm_id.to_owned(), name.to_owned());
        self.queues()
            .tokens
            .get(&key)
            .copied()
            .ok_or(Status::NotFound)
    }

    /// `proxy_enqueue_shared_queue`: one more `on_queue_ready` posted.
    pub fn enqueue(&self, token: u32, value: &[u8]) -> Result<(), Status> {
        let mut queues = self.queues();
        let queue = queues.by_token.get_mut(&token).ok_or(Status::NotFound)?;
        queue.data.push_back(value.to_vec());
        queue.posted += 1;
        Ok(())
    }

    /// `proxy_dequeue_shared_queue`.
    pub fn dequeue(&self, token: u32) -> Result<Vec<u8>, Status> {
        let mut queues = self.queues();
        let queue = queues.by_token.get_mut(&token).ok_or(Status::NotFound)?;
        queue.data.pop_front().ok_or(Status::Empty)
    }

    /// The `on_queue_ready` calls posted to `vm` (its serial), as (root
    /// context, token), taken: the VM runs them.
    pub(crate) fn take_posted(&self, vm: u64) -> Vec<(u32, u32)> {
        let mut posted = Vec::new();
        for (token, queue) in &mut self.queues().by_token {
            if queue.consumer.0 == vm {
                for _ in 0..std::mem::take(&mut queue.posted) {
                    posted.push((queue.consumer.1, *token));
                }
            }
        }
        posted.sort_unstable();
        posted
    }
}
