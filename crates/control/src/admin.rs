//! Envoy's admin endpoint, as `bundle` needs it: to know that Envoy has taken
//! the clusters before the filter configuration that names them is written.
//!
//! Envoy reads the two files through two watches of one directory and may
//! apply them in either order; a policy applied before its clusters answers
//! 503 (`cluster_not_found`) for those few milliseconds.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The CDS counters and gauge that say Envoy took a clusters file.
const STATS_QUERY: &str = "/stats?format=json&filter=%5Ecluster_manager%5C.%28cds%5C.update_%28success%7Crejected%29%7Cwarming_clusters%29%24";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CdsProgress {
    pub updates: u64,
    pub rejected: u64,
    pub warming: u64,
}

/// One GET over plain HTTP/1.1 on the admin address (`127.0.0.1:9901` or
/// `http://127.0.0.1:9901`): the admin listener is local and unencrypted, and
/// this is its only use here, so no HTTP client library is brought in.
/// `patience`: how long Envoy may take to answer; its main thread answers
/// admin requests between config updates, and a large clusters file keeps it
/// busy for seconds.
fn get(admin: &str, path: &str, patience: Duration) -> Result<String, String> {
    let address = admin.strip_prefix("http://").unwrap_or(admin);
    let address = address.trim_end_matches('/');
    let failed = |e: std::io::Error| format!("Envoy admin at {address}: {e}");
    let mut stream = TcpStream::connect(address).map_err(failed)?;
    let _ = stream.set_read_timeout(Some(patience.max(Duration::from_secs(1))));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(failed)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(failed)?;
    let unexpected = || format!("Envoy admin at {address}: unexpected answer to {path}");
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(unexpected)?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(unexpected());
    }
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    if !chunked {
        return Ok(body.to_owned());
    }
    // size CRLF data CRLF ... 0 CRLF CRLF
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or_else(unexpected)?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|_| unexpected())?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or_else(unexpected)?);
        rest = after.get(size + 2..).ok_or_else(unexpected)?;
    }
}

/// Whether anything accepts connections on the admin address.
pub fn listening(admin: &str) -> bool {
    let address = admin.strip_prefix("http://").unwrap_or(admin);
    TcpStream::connect(address.trim_end_matches('/')).is_ok()
}

pub fn cds_progress(admin: &str, patience: Duration) -> Result<CdsProgress, String> {
    let body = get(admin, STATS_QUERY, patience)?;
    let json: Value = serde_json::from_str(&body).map_err(|e| format!("Envoy admin stats: {e}"))?;
    let mut progress = CdsProgress::default();
    let mut reads_cds = false;
    for stat in json["stats"].as_array().into_iter().flatten() {
        let value = stat["value"].as_u64().unwrap_or(0);
        match stat["name"].as_str() {
            Some("cluster_manager.cds.update_success") => {
                reads_cds = true;
                progress.updates = value;
            }
            Some("cluster_manager.cds.update_rejected") => progress.rejected = value,
            Some("cluster_manager.warming_clusters") => progress.warming = value,
            _ => {}
        }
    }
    if !reads_cds {
        return Err(format!(
            "the Envoy at {admin} reads no clusters (no `dynamic_resources.cds_config`)"
        ));
    }
    Ok(progress)
}

/// Waits until Envoy has accepted a clusters file written after `before` and
/// no cluster is warming: every cluster is then on its way to the workers,
/// ahead of any filter configuration written next.
pub fn wait_for_clusters(admin: &str, before: CdsProgress, limit: Duration) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let now = cds_progress(admin, limit.saturating_sub(started.elapsed()))?;
        if now.rejected > before.rejected {
            return Err(
                "Envoy rejected the clusters file (cluster_manager.cds.update_rejected; its log says why)"
                    .to_owned(),
            );
        }
        if now.updates > before.updates && now.warming == 0 {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(format!(
                "Envoy did not take the clusters file within {} s",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The counters named `names`, as Envoy's admin `/stats` has them (a
/// counter it does not have yet counts 0).
pub fn counters(admin: &str, names: &[&str], patience: Duration) -> Result<Vec<u64>, String> {
    let body = get(admin, "/stats?format=json", patience)?;
    let json: Value = serde_json::from_str(&body).map_err(|e| format!("Envoy admin stats: {e}"))?;
    let stats = json["stats"].as_array().cloned().unwrap_or_default();
    Ok(names
        .iter()
        .map(|name| {
            stats
                .iter()
                .find(|s| s["name"].as_str() == Some(name))
                .and_then(|s| s["value"].as_u64())
                .unwrap_or(0)
        })
        .collect())
}
