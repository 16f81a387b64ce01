//! Prints wasm fuel per request and linear memory for 1, 1,000 and 100,000
//! domains, and the fuel and time of `on_configure` for each.
//! Run: cargo run --release -p host-test --bin cost-table

use host_test::{filter_path, Filter};
use std::time::Instant;

fn config(domains: usize) -> String {
    let mut policies = Vec::with_capacity(domains);
    for i in 0..domains {
        let domain = if i % 2 == 0 {
            format!("site{i}.example.com")
        } else {
            format!("*.img{i}.example.com")
        };
        policies.push(format!(
            r#"{{"domain":"{domain}","primary":{{"address":"o{i}.example.net","port":443,"clusters":{{"https":"c{i}"}}}}}}"#
        ));
    }
    format!(
        r#"{{"settings":{{"unknown_domain":{{"action":"pass_through"}}}},"policies":[{}]}}"#,
        policies.join(",")
    )
}

fn main() -> wasmtime::Result<()> {
    let filter = Filter::load(&filter_path())?;
    println!("| domains | on_configure fuel | on_configure ms | linear memory after load | exact hit fuel/req | wildcard hit fuel/req | miss fuel/req |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for domains in [1usize, 1_000, 100_000] {
        let text = config(domains);
        let mut vm = filter.instantiate()?;
        let started = Instant::now();
        let (ok, configure_fuel) = vm.fuel_used(|vm| vm.configure(&text))?;
        let configure_ms = started.elapsed().as_secs_f64() * 1e3;
        if !ok {
            wasmtime::bail!("on_configure refused {domains} domains:\n{}", vm.log_text());
        }
        let memory = vm.memory_bytes();
        let wildcard_host = if domains > 1 {
            "a.img1.example.com".to_owned()
        } else {
            "a.nothing.example.com".to_owned()
        };
        let mut per_request = Vec::new();
        for host in [
            "site0.example.com",
            wildcard_host.as_str(),
            "unknown.example.org",
        ] {
            let req = [
                (":authority", host),
                (":scheme", "https"),
                (":method", "GET"),
                (":path", "/"),
            ];
            // Warm up once, then average over a few hundred requests.
            let id = vm.exchange(&req, "200")?;
            vm.close_stream(id)?;
            let rounds = 200u64;
            let (_, fuel) = vm.fuel_used(|vm| {
                for _ in 0..rounds {
                    let id = vm.exchange(&req, "200")?;
                    vm.close_stream(id)?;
                }
                Ok(())
            })?;
            per_request.push(fuel / rounds);
        }
        let wildcard = if domains > 1 {
            per_request[1].to_string()
        } else {
            "n/a".to_owned()
        };
        println!(
            "| {domains} | {configure_fuel} | {configure_ms:.1} | {:.1} MiB | {} | {wildcard} | {} |",
            memory as f64 / (1024.0 * 1024.0),
            per_request[0],
            per_request[2]
        );
    }
    println!("\nfuel counts wasm instructions executed in the guest (whole request: headers in, response headers out, stream close).");
    Ok(())
}
