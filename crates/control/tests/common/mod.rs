//! What the in-process API tests share: a fake Envoy and an HTTP/1.1 client.
// Each test crate uses its own part of this.
#![allow(dead_code)]

use origin_policy_control::envoy::EnvoyConfig;
use origin_policy_control::validate::EdgeSettings;
use origin_policy_control::ControlError;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A fake Envoy: records every cluster set it is given.
#[derive(Default, Clone)]
pub struct RecordingEnvoy(pub Arc<Mutex<Vec<usize>>>);

impl EnvoyConfig for RecordingEnvoy {
    fn clusters(&self, clusters: &[Arc<str>]) -> Result<(), ControlError> {
        if let Ok(mut sets) = self.0.lock() {
            sets.push(clusters.len());
        }
        Ok(())
    }
    fn filter(&self, _: &EdgeSettings) -> Result<(), ControlError> {
        Ok(())
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (status 0: no answer).
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let failed = || Reply {
        status: 0,
        headers: Vec::new(),
        body: String::new(),
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return failed();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    if stream.write_all(request.as_bytes()).is_err() {
        return failed();
    }
    let mut text = String::new();
    if stream.read_to_string(&mut text).is_err() {
        return failed();
    }
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}
