//! Native engine cost: `decide` for an exact hit, a wildcard hit and a miss,
//! and loading a policy set, each with 1, 1,000 and 100,000 domains.
//! Run: cargo bench --bench engine

// A benchmark, not library code: a broken fixture should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// criterion does not build for wasm32; there the bench is an empty program.
#[cfg(not(target_arch = "wasm32"))]
mod native {
    use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
    use origin_policy_engine::{Outcome, PolicySet, PolicySource, Scheme, Settings, ViewerRequest};
    use std::hint::black_box;
    use std::time::Duration;

    use origin_policy_synthetic::{host_for, plugin_config, FirstDomain};

    const SIZES: [usize; 3] = [1, 1_000, 100_000];

    fn build(config: &str) -> PolicySet {
        match PolicySet::from_plugin_config(config.as_bytes(), None) {
            Ok(compiled) if compiled.diagnostics.0.is_empty() => compiled.set,
            Ok(compiled) => panic!("synthetic set has findings:\n{}", compiled.diagnostics),
            Err(e) => panic!("{e}"),
        }
    }

    fn request(authority: &str) -> ViewerRequest<'_> {
        ViewerRequest {
            authority,
            connection: Some(Scheme::Https),
            method: "GET",
            ..ViewerRequest::default()
        }
    }

    fn decide(c: &mut Criterion) {
        let mut group = c.benchmark_group("decide");
        group.throughput(Throughput::Elements(1));
        for n in SIZES {
            // The looked-up policy is the last one added, so a bigger set cannot
            // hide behind an early hit.
            let exact_set = build(&plugin_config(n, FirstDomain::Exact));
            let wildcard_set = build(&plugin_config(n, FirstDomain::Wildcard));
            let last_exact = (n - 1) / 2 * 2;
            let last_wildcard = (n - 1) / 2 * 2;
            let cases = [
                (
                    "exact",
                    &exact_set,
                    host_for(last_exact, FirstDomain::Exact),
                ),
                (
                    "wildcard",
                    &wildcard_set,
                    host_for(last_wildcard, FirstDomain::Wildcard),
                ),
                ("miss", &wildcard_set, "unknown.example.org".to_owned()),
            ];
            for (case, set, host) in cases {
                let hit = matches!(set.decide(&request(&host)), Outcome::Origin(_));
                assert_eq!(hit, case != "miss", "{case} with {n} domains ({host})");
                group.bench_with_input(BenchmarkId::new(case, n), &host, |b, host| {
                    b.iter(|| black_box(set.decide(&request(black_box(host)))))
                });
            }
        }
        group.finish();
    }

    /// Loading, as `on_configure` does it: the plugin configuration's bytes to a
    /// served set (JSON parse + validation + compile), and the compile step alone
    /// from parsed documents. Dropping the result is not timed: a replaced set
    /// is freed after the new one serves.
    fn load(c: &mut Criterion) {
        let mut group = c.benchmark_group("load");
        for n in SIZES {
            let config = plugin_config(n, FirstDomain::Exact);
            let parsed: serde_json::Value = serde_json::from_str(&config).expect("synthetic JSON");
            let documents = parsed["policies"].as_array().expect("policies array");
            let sources = PolicySource::numbered(documents);
            if n >= 100_000 {
                group
                    .sample_size(10)
                    .measurement_time(Duration::from_secs(15));
            }
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new("plugin_config", n), &config, |b, cfg| {
                b.iter_with_large_drop(|| build(cfg))
            });
            group.bench_with_input(BenchmarkId::new("compile", n), &sources, |b, sources| {
                b.iter_with_large_drop(|| PolicySet::compile(Settings::default(), sources, None))
            });
        }
        group.finish();
    }

    criterion_group!(benches, decide, load);
}

#[cfg(not(target_arch = "wasm32"))]
criterion::criterion_main!(native::benches);

#[cfg(target_arch = "wasm32")]
fn main() {}
