//! Feed delivery on the workers: a host looked up once is answered from
//! memory; the feed singleton wakes every worker through the worker's own
//! shared queue when it writes a change, and a worker reads the change count
//! on its tick too, should a wake be lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{get, FeedProcess};
use host_test::Vm;
use origin_policy_engine::feed::{entry_key, CHANGES_KEY, REMOVED_ENTRY, WORKER_STALE_MS};

const PLAIN: &str = "plain.example.com";
/// plain.example.com's policy moved to another origin.
const MOVED: &str = r#"{"domain":"plain.example.com","primary":{"address":"legacy-origin.example.net","port":80},"protocol":{"policy":"http","http_port":18081}}"#;

/// The cluster the request was sent to, or the local reply's status.
fn routed(vm: &mut Vm, host: &str) -> String {
    let id = vm.exchange(&get(host, "http"), "200").unwrap();
    match vm.local_response(id) {
        Some(reply) => format!("local {}", reply.status),
        None => vm.upstream_header(id, "x-origin-cluster").unwrap(),
    }
}

/// The feed singleton (the same module under the root id
/// `origin-policy-feed`) in the workers' process, leading after its first
/// tick, with its first poll out.
fn singleton(feed: &FeedProcess) -> Vm {
    let mut vm = feed.process.instantiate().unwrap();
    vm.state_mut()
        .properties
        .insert("plugin_root_id".into(), b"origin-policy-feed".to_vec());
    assert!(
        vm.configure(r#"{"feed_cluster": "policy_source"}"#)
            .unwrap(),
        "{}",
        vm.log_text()
    );
    vm.tick().unwrap();
    vm
}

/// Answers the singleton's last poll with one page of `lines`.
fn page(singleton: &mut Vm, version: u32, lines: &str) {
    let token = singleton.state().dispatched.last().unwrap().token;
    let version = version.to_string();
    let headers = [
        (":status", "200"),
        ("x-feed-version", version.as_str()),
        ("x-feed-epoch", "1"),
    ];
    singleton
        .http_call_response(token, Some(&headers), lines.as_bytes())
        .unwrap();
}

#[test]
fn a_change_the_singleton_writes_wakes_every_worker_through_its_queue() {
    let feed = FeedProcess::new();
    let mut workers = [feed.worker(), feed.worker()];
    let before: Vec<String> = workers.iter_mut().map(|w| routed(w, PLAIN)).collect();
    assert!(before[0].contains("plain-origin"), "{before:?}");
    assert_eq!(before[0], before[1]);
    let mut singleton = singleton(&feed);

    page(&mut singleton, 2, &format!("{PLAIN}\t{MOVED}\n"));
    assert!(
        !singleton.log_text().contains("rejected"),
        "{}",
        singleton.log_text()
    );
    // Written and counted, the wakes not run yet: answered from memory.
    for w in &mut workers {
        assert_eq!(routed(w, PLAIN), before[0]);
    }
    // Each worker's event loop runs its wake: no tick needed.
    for w in &mut workers {
        assert!(w.deliver_queues().unwrap() >= 1, "{}", w.log_text());
        let after = routed(w, PLAIN);
        assert!(after.contains("legacy-origin"), "{after}");
    }

    // A removal: the domain is unknown (the settings' 404) once woken.
    page(&mut singleton, 3, &format!("{PLAIN}\t\n"));
    for w in &mut workers {
        w.deliver_queues().unwrap();
        assert_eq!(routed(w, PLAIN), "local 404");
    }
}

#[test]
fn a_worker_that_stops_beating_is_no_longer_woken_and_its_tick_still_reads_the_count() {
    let feed = FeedProcess::new();
    let mut live = feed.worker();
    let mut silent = feed.worker();
    for w in [&mut live, &mut silent] {
        routed(w, PLAIN);
    }
    let mut singleton = singleton(&feed);
    // Past the stale limit by the singleton's clock; only `live` beat since.
    singleton.advance_clock_ms(WORKER_STALE_MS + 1);
    live.advance_clock_ms(WORKER_STALE_MS + 1);
    live.tick().unwrap();
    page(&mut singleton, 2, &format!("{PLAIN}\t{MOVED}\n"));
    assert!(live.deliver_queues().unwrap() >= 1);
    assert_eq!(silent.deliver_queues().unwrap(), 0);
    assert!(routed(&mut live, PLAIN).contains("legacy-origin"));
    // Not woken, so answering from memory until its tick reads the count.
    assert!(routed(&mut silent, PLAIN).contains("plain-origin"));
    silent.tick().unwrap();
    assert!(routed(&mut silent, PLAIN).contains("legacy-origin"));
}

#[test]
fn a_counted_change_reaches_a_worker_on_its_tick_without_a_wake() {
    let feed = FeedProcess::new();
    let mut workers = [feed.worker(), feed.worker()];
    let before: Vec<String> = workers.iter_mut().map(|w| routed(w, PLAIN)).collect();

    // Written and counted by hand: no queue was woken.
    feed.write(&entry_key(PLAIN), MOVED.as_bytes());
    for w in &mut workers {
        assert_eq!(routed(w, PLAIN), before[0]);
    }
    feed.write(CHANGES_KEY, b"2");
    for w in &mut workers {
        assert_eq!(w.deliver_queues().unwrap(), 0);
        w.tick().unwrap();
        let after = routed(w, PLAIN);
        assert!(after.contains("legacy-origin"), "{after}");
    }

    // A removal, counted: the domain is unknown (the settings' 404).
    feed.write(&entry_key(PLAIN), REMOVED_ENTRY);
    feed.write(CHANGES_KEY, b"3");
    for w in &mut workers {
        w.tick().unwrap();
        assert_eq!(routed(w, PLAIN), "local 404");
    }
}

#[test]
fn a_new_domain_is_served_at_once_and_an_unknown_one_once_counted() {
    let feed = FeedProcess::new();
    let mut worker = feed.worker();
    let new_domain = MOVED.replace(PLAIN, "new.example.com");
    // Never looked up on this worker: read from shared data at once.
    feed.write(&entry_key("new.example.com"), new_domain.as_bytes());
    assert!(routed(&mut worker, "new.example.com").contains("legacy-origin"));
    // Looked up as unknown, then added and counted.
    assert_eq!(routed(&mut worker, "later.example.com"), "local 404");
    feed.write(
        &entry_key("later.example.com"),
        MOVED.replace(PLAIN, "later.example.com").as_bytes(),
    );
    assert_eq!(routed(&mut worker, "later.example.com"), "local 404");
    feed.write(CHANGES_KEY, b"2");
    worker.tick().unwrap();
    assert!(routed(&mut worker, "later.example.com").contains("legacy-origin"));
}

#[test]
fn without_a_change_count_every_request_reads_its_entry() {
    // A singleton that counts nothing (an older module): no answer is kept.
    let feed = FeedProcess::counting(false);
    let mut worker = feed.worker();
    let before = routed(&mut worker, PLAIN);
    feed.write(&entry_key(PLAIN), MOVED.as_bytes());
    let after = routed(&mut worker, PLAIN);
    assert_ne!(before, after);
    assert!(after.contains("legacy-origin"), "{after}");
}
