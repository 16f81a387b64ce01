//! Feed delivery on the workers: a host looked up once is answered from
//! memory, and a change the feed singleton counts is used by every worker
//! on its next tick.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{get, FeedProcess};
use host_test::Vm;
use origin_policy_engine::feed::{entry_key, CHANGES_KEY, REMOVED_ENTRY};

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

#[test]
fn a_counted_change_reaches_every_worker_on_its_next_tick() {
    let feed = FeedProcess::new();
    let mut workers = [feed.worker(), feed.worker()];
    let before: Vec<String> = workers.iter_mut().map(|w| routed(w, PLAIN)).collect();
    assert!(before[0].contains("plain-origin"), "{before:?}");
    assert_eq!(before[0], before[1]);

    feed.write(&entry_key(PLAIN), MOVED.as_bytes());
    // Written but not counted yet: the workers answer from memory.
    for w in &mut workers {
        assert_eq!(routed(w, PLAIN), before[0]);
    }
    feed.write(CHANGES_KEY, b"2");
    for w in &mut workers {
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
