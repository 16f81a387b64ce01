//! The filter's cost through the real `.wasm` in wasmtime: `on_configure` fuel,
//! time and linear memory for 1, 1,000 and 100,000 domains, and fuel per
//! request (exact hit, wildcard hit, miss), split by callback for the exact hit.
//! Fuel counts guest wasm instructions, so it is exact and repeatable.
//! Run: cargo run --release -p host-test --bin cost-table [-- FILTER.wasm]

use host_test::{filter_path, Filter, Vm};
use std::path::PathBuf;
use std::time::Instant;

use origin_policy_synthetic::{host_for, plugin_config, FirstDomain};

const SIZES: [usize; 3] = [1, 1_000, 100_000];
const ROUNDS: u64 = 200;

fn request(host: &str) -> [(&str, &str); 5] {
    [
        (":authority", host),
        (":scheme", "http"),
        (":method", "GET"),
        (":path", "/"),
        ("user-agent", "cost-table"),
    ]
}

const RESPONSE: [(&str, &str); 3] = [
    (":status", "200"),
    ("content-length", "3"),
    ("content-type", "text/plain"),
];

/// Fuel per request by callback: context create, request headers, response
/// headers, stream close, averaged over `ROUNDS` after one warm-up request.
fn per_callback(vm: &mut Vm, host: &str) -> wasmtime::Result<[u64; 4]> {
    let req = request(host);
    let mut total = [0u64; 4];
    for round in 0..=ROUNDS {
        let (id, open) = vm.fuel_used(|vm| vm.open_stream())?;
        let (_, headers) = vm.fuel_used(|vm| vm.request_headers(id, &req, true))?;
        let (_, response) = if vm.local_response(id).is_none() {
            vm.fuel_used(|vm| vm.response_headers(id, &RESPONSE, false))?
        } else {
            (host_test::Action::Continue, 0)
        };
        let (_, close) = vm.fuel_used(|vm| vm.close_stream(id))?;
        if round > 0 {
            for (t, f) in total.iter_mut().zip([open, headers, response, close]) {
                *t += f;
            }
        }
    }
    Ok(total.map(|t| t / ROUNDS))
}

fn main() -> wasmtime::Result<()> {
    let path = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(filter_path);
    let filter = Filter::load(&path)?;
    let mut configure_rows = Vec::new();
    let mut request_rows = Vec::new();
    let mut split_rows = Vec::new();
    for n in SIZES {
        let mut fuel = [0u64; 3];
        let mut exact_split = [0u64; 4];
        for (slot, first) in [FirstDomain::Exact, FirstDomain::Wildcard]
            .into_iter()
            .enumerate()
        {
            let text = plugin_config(n, first);
            let mut vm = filter.instantiate()?;
            let started = Instant::now();
            let (ok, configure_fuel) = vm.fuel_used(|vm| vm.configure(&text))?;
            let configure_ms = started.elapsed().as_secs_f64() * 1e3;
            if !ok {
                wasmtime::bail!("on_configure refused {n} domains:\n{}", vm.log_text());
            }
            if first == FirstDomain::Exact {
                configure_rows.push(format!(
                    "| {n} | {configure_fuel} | {configure_ms:.1} | {:.1} MiB |",
                    vm.memory_bytes() as f64 / (1024.0 * 1024.0),
                ));
            }
            // The last policy added is the one looked up.
            let hit = host_for((n - 1) / 2 * 2, first);
            let split = per_callback(&mut vm, &hit)?;
            fuel[slot] = split.iter().sum();
            if first == FirstDomain::Exact {
                exact_split = split;
                fuel[2] = per_callback(&mut vm, "unknown.example.org")?.iter().sum();
            }
        }
        request_rows.push(format!("| {n} | {} | {} | {} |", fuel[0], fuel[1], fuel[2]));
        let [open, headers, response, close] = exact_split;
        split_rows.push(format!(
            "| {n} | {open} | {headers} | {response} | {close} |"
        ));
    }
    let shown = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    let shown = std::env::current_dir()
        .ok()
        .and_then(|cwd| shown.strip_prefix(cwd).ok().map(PathBuf::from))
        .unwrap_or(shown);
    println!("Filter: `{}`\n", shown.display());
    println!("| domains | on_configure fuel | on_configure ms | linear memory after load |");
    println!("|---:|---:|---:|---:|");
    configure_rows.iter().for_each(|r| println!("{r}"));
    println!("\n| domains | exact hit fuel/req | wildcard hit fuel/req | miss fuel/req |");
    println!("|---:|---:|---:|---:|");
    request_rows.iter().for_each(|r| println!("{r}"));
    println!("\nExact hit, fuel by callback:\n");
    println!("| domains | context create | request headers | response headers | stream close |");
    println!("|---:|---:|---:|---:|---:|");
    split_rows.iter().for_each(|r| println!("{r}"));
    println!(
        "\nA request is context create, request headers (5 headers), response headers \
         (3 headers) and close. The synthetic set passes unknown hosts through, so a miss \
         skips the response work."
    );
    Ok(())
}
