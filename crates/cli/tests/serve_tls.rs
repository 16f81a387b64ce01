//! `serve` without `--tls-*` listens on loopback addresses only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn serve(args: &[&str]) -> (Option<i32>, String) {
    let store = tempfile::tempdir().expect("a directory");
    let wasm = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_origin-policy"))
        .args(["serve", "--wasm", wasm, "--store"])
        .arg(store.path())
        .args(args)
        .output()
        .expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_listener_off_loopback_without_tls_is_refused_naming_the_flags() {
    let (code, stderr) = serve(&["--listen", "0.0.0.0:18999"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--listen 0.0.0.0:18999 is not a loopback address")
            && stderr.contains("--tls-ca, --tls-cert and --tls-key"),
        "{stderr}"
    );
    let (code, stderr) = serve(&["--listen", "127.0.0.1:0", "--ads", "0.0.0.0:18998"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--ads 0.0.0.0:18998 is not a loopback address"),
        "{stderr}"
    );
    // --tls-ca alone is not TLS: it needs the server's certificate and key.
    let (code, stderr) = serve(&["--tls-ca", "ca.pem"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-cert"), "{stderr}");
}
