//! Shared helpers: the example policies as a plugin configuration, and requests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use host_test::{Filter, Vm};
use origin_policy_cli::files::read_dir;
use std::path::{Path, PathBuf};

pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// `policies/` bundled exactly as `origin-policy bundle` does.
pub fn example_config() -> String {
    read_dir(&policies_dir())
        .unwrap()
        .plugin_config()
        .to_string()
}

pub fn example_vm() -> Vm {
    Filter::shared().unwrap().start(&example_config()).unwrap()
}

/// Request headers of a plain `GET /` for `host` over `scheme`.
pub const fn get<'a>(host: &'a str, scheme: &'a str) -> [(&'static str, &'a str); 4] {
    [
        (":authority", host),
        (":scheme", scheme),
        (":method", "GET"),
        (":path", "/"),
    ]
}
