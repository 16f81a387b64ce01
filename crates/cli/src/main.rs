//! `origin-policy` command line: check, explain and bundle policy files;
//! mirror a domain's primary origin into its secondary.

use origin_policy_cli::admin;
use origin_policy_cli::explain_text;
use origin_policy_cli::feed;
use origin_policy_cli::files::{ecds_resource, read_paths, write_atomically, NETWORKS_FILE};
use origin_policy_cli::mirror;
use origin_policy_engine::documents::PolicyDocuments;
use origin_policy_engine::report::{diagnostic_json, outcome_json, request_from_url};
use origin_policy_engine::{fingerprint, Diagnostics, PolicySet};
use serde_json::{json, Value};
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage:
  origin-policy check [--json] [PATH...]
      Validate policy files (default PATH: policies/). Exit 1 on any error.
      --json also lists the Envoy clusters derived from the policies.
  origin-policy explain [--json] [--policies PATH] [--method M] [--x-forwarded-proto P] URL
      Show the origin decision for a viewer request, e.g. https://media.example.com/a.png
  origin-policy bundle [--wasm FILE] [--out DIR] [--admin ADDRESS] [--delivery feed] [PATH...]
      Write DIR/origin-policy.networks.ecds.json (the origin networks, an upstream
      RBAC filter), DIR/origin-policy.cds.json (the origin clusters), DIR/plugin-config.json
      and DIR/origin-policy.ecds.json (default DIR: run/), each replaced atomically so
      that Envoy's file watch sees whole files only; clusters first. With --admin
      (Envoy's admin address, e.g. 127.0.0.1:9901), the filter configuration is
      written only once that Envoy has taken the clusters, so that a new policy
      never names a cluster Envoy does not have yet; nothing more is written if
      Envoy rejects them. With --delivery feed (for a policy source such as the
      fleet's control plane), the filter configuration carries the settings only
      and DIR/origin-policy.domains.tsv the policies, one `DOMAIN<TAB>DOCUMENT`
      line per domain, as a feed serves them; the clusters are those of these
      policies only (the source keeps the previous ones while Envoys need them).
  origin-policy feed [--wasm FILE] [--out DIR] [--admin ADDRESS] [--listen ADDRESS] [PATH...]
      Serve the policies per domain to Envoys whose filter has `\"delivery\": \"feed\"`
      (default listen 127.0.0.1:18090, GET /changes). Watches PATH (default
      policies/); on a change, validates, writes DIR/origin-policy.networks.ecds.json,
      DIR/origin-policy.cds.json (with
      --admin: and waits until Envoy has the clusters) and DIR/origin-policy.ecds.json
      (the settings), then publishes the domains that changed. A rejected policy
      keeps its domain's last published one. Runs until Ctrl-C or SIGTERM.
  origin-policy mirror DOMAIN [--paths FILE]... [--sitemap PATH]... [--store DIR|s3://BUCKET/PREFIX]
                       [--policies DIR] [--origin-ca-file FILE] [--every INTERVAL]
                       [--metrics FILE] [--json] [limits]
      Copy DOMAIN's resources from its primary origin, fetched as the edge fetches
      them (address, port, scheme, Host, SNI and certificate name, timeouts), into
      the store (default run/mirror/DOMAIN): the domain's secondary origin. Paths
      come from list files (one per line) and sitemaps on the origin (e.g.
      /sitemap.xml). Unchanged resources are not fetched again (If-None-Match,
      If-Modified-Since); a path gone from the lists or answering 404 is removed
      after the grace period. Exit 1 if anything failed; --metrics writes the run's
      counters for node_exporter's textfile collector.
      limits (defaults): --concurrency 4, --rate 20M (bytes/s, 0: none),
      --max-object-bytes 1G, --max-store-bytes 10G, --object-timeout 10m,
      --max-redirects 5, --grace 7d, --viewer-scheme https (for `follow` policies)
  origin-policy mirror-serve [--root DIR] [--listen ADDRESS]
      Serve local mirrors (default root run/mirror, listen 127.0.0.1:18089): the
      Host picks DIR/<host>/, answers carry the stored status and headers.";

/// Envoy applies a 100,000-cluster file in about a minute (BENCHMARKS.md).
const CLUSTERS_TAKEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(180);

/// Why the command line failed.
#[derive(Debug)]
enum CliError {
    Usage(String),
    Io(String),
    Invalid(Diagnostics),
    /// Policies were rejected and the findings are already printed.
    Rejected,
    /// A mirror run had errors, already printed.
    MirrorFailed,
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(why) => write!(f, "{why}\n\n{USAGE}"),
            CliError::Io(why) => f.write_str(why),
            CliError::Invalid(d) => write!(f, "{d}\npolicies rejected"),
            CliError::Rejected => f.write_str("policies rejected"),
            CliError::MirrorFailed => f.write_str("mirror run had errors"),
        }
    }
}

const BOOLEAN_FLAGS: [&str; 1] = ["json"];

const MIRROR_FLAGS: [&str; 15] = [
    "origin-ca-file",
    "paths",
    "sitemap",
    "store",
    "policies",
    "every",
    "metrics",
    "viewer-scheme",
    "concurrency",
    "rate",
    "max-object-bytes",
    "max-store-bytes",
    "object-timeout",
    "max-redirects",
    "grace",
];

struct Args {
    flags: Vec<(String, Option<String>)>,
    positional: Vec<String>,
}

impl Args {
    fn parse(raw: &[String], with_value: &[&str]) -> Result<Args, CliError> {
        let mut args = Args {
            flags: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if with_value.contains(&name) {
                    let v = it
                        .next()
                        .ok_or_else(|| CliError::Usage(format!("--{name} needs a value")))?;
                    args.flags.push((name.to_owned(), Some(v.clone())));
                } else if BOOLEAN_FLAGS.contains(&name) {
                    args.flags.push((name.to_owned(), None));
                } else {
                    return Err(CliError::Usage(format!("unknown option --{name}")));
                }
            } else {
                args.positional.push(a.clone());
            }
        }
        Ok(args)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn values(&self, name: &str) -> Vec<String> {
        self.flags
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| v.clone())
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }

    fn paths(&self) -> Vec<PathBuf> {
        if self.positional.is_empty() {
            vec![PathBuf::from("policies")]
        } else {
            self.positional.iter().map(PathBuf::from).collect()
        }
    }
}

fn load(paths: &[PathBuf]) -> Result<PolicyDocuments, CliError> {
    read_paths(paths).map_err(CliError::Io)
}

fn check(args: &Args) -> Result<(), CliError> {
    let dir = load(&args.paths())?;
    let (compiled, diagnostics) = dir.compile();
    let domains = compiled.as_ref().map_or(0, |c| c.set.index.len());
    if args.has("json") {
        let list: Vec<Value> = diagnostics.0.iter().map(diagnostic_json).collect();
        let derived = compiled
            .as_ref()
            .map(|c| c.set.derived_clusters())
            .unwrap_or_default();
        let clusters: Vec<&String> = derived
            .origins
            .keys()
            .chain(derived.chains.keys())
            .collect();
        println!(
            "{}",
            json!({
                "ok": !diagnostics.has_errors(),
                "domains": domains,
                "clusters": clusters,
                "diagnostics": list,
            })
        );
    } else {
        for d in &diagnostics.0 {
            println!("{d}");
        }
        let errors = diagnostics.errors().count();
        let warnings = diagnostics.warnings().count();
        println!("{domains} domains valid, {errors} errors, {warnings} warnings");
    }
    if diagnostics.has_errors() {
        return Err(CliError::Rejected);
    }
    Ok(())
}

fn explain(args: &Args) -> Result<(), CliError> {
    let [url] = args.positional.as_slice() else {
        return Err(CliError::Usage("explain takes exactly one URL".to_owned()));
    };
    let set = compiled_set(args.value("policies").unwrap_or("policies"))?;
    let spec = request_from_url(url, args.value("method"), args.value("x-forwarded-proto"))
        .map_err(CliError::Usage)?;
    let outcome = set.decide(&spec.as_request());
    if args.has("json") {
        println!("{}", outcome_json(&set, &outcome));
        return Ok(());
    }
    print!(
        "{}",
        explain_text(&outcome_json(&set, &outcome), &spec.method)
    );
    Ok(())
}

/// The clusters the new policies need, plus those the previous bundle's
/// policies needed: requests still running on the previous filter
/// configuration keep their clusters until the next push removes them.
fn cds_resources(set: &PolicySet, config: &str, previous: &std::path::Path) -> Value {
    let mut derived = set.derived_clusters();
    let old = std::fs::read(previous)
        .ok()
        .and_then(|b| PolicySet::from_plugin_config(&b, None).ok());
    if let Some(old) = old {
        derived.keep(old.set.derived_clusters());
    }
    let resources = derived.envoy_resources(&set.settings);
    json!({
        "version_info": format!("{:016x}", fingerprint(config.as_bytes())),
        "resources": resources,
    })
}

fn bundle(args: &Args) -> Result<(), CliError> {
    let feed_delivery = match args.value("delivery") {
        None | Some("inline") => false,
        Some("feed") => true,
        Some(other) => {
            return Err(CliError::Usage(format!(
                "--delivery is `inline` or `feed`, not `{other}`"
            )))
        }
    };
    let dir = load(&args.paths())?;
    let (compiled, diagnostics) = dir.compile();
    for d in diagnostics.warnings() {
        eprintln!("{d}");
    }
    let compiled = match compiled {
        Some(c) if !diagnostics.has_errors() => c,
        _ => {
            return Err(CliError::Invalid(Diagnostics(
                diagnostics.errors().cloned().collect(),
            )))
        }
    };
    let out = PathBuf::from(args.value("out").unwrap_or("run"));
    std::fs::create_dir_all(&out).map_err(|e| CliError::Io(format!("{}: {e}", out.display())))?;
    let wasm = args
        .value("wasm")
        .unwrap_or("target/wasm32-wasip1/release/origin_policy.wasm");
    let wasm_abs = std::fs::canonicalize(wasm).map_err(|e| {
        CliError::Io(format!(
            "{wasm}: {e} (build it with cargo build --release --target wasm32-wasip1)"
        ))
    })?;
    // Feed delivery: the policies one line per domain, the settings in the
    // filter configuration.
    let (config, domains) = if feed_delivery {
        let found = dir.feed_documents().map_err(CliError::Invalid)?;
        let lines: String = found
            .accepted
            .iter()
            .map(|(domain, document)| format!("{domain}\t{document}\n"))
            .collect();
        let config = json!({"settings": found.settings_document, "delivery": "feed"});
        (config.to_string(), Some(lines))
    } else {
        (dir.plugin_config().to_string(), None)
    };
    let ecds = ecds_resource(&config, &wasm_abs.to_string_lossy());
    // The set just checked is the one bundled: no second compile of it.
    let cds = cds_resources(&compiled.set, &config, &out.join("plugin-config.json"));
    let write = |name: &str, text: String| {
        let path = out.join(name);
        write_atomically(&path, text.as_bytes())
            .map_err(|e| CliError::Io(format!("{}: {e}", path.display())))?;
        println!("wrote {}", path.display());
        Ok::<(), CliError>(())
    };
    // Compact: at 100,000 origins Envoy parses every byte of it on each push.
    // The networks first: an origin they newly allow may be in the clusters.
    let networks = compiled.set.settings.origin_networks.ecds_resource();
    write(NETWORKS_FILE, format!("{networks:#}"))?;
    let cds = cds.to_string();
    let cds_path = out.join("origin-policy.cds.json");
    if std::fs::read(&cds_path).ok().as_deref() != Some(cds.as_bytes()) {
        let admin = args.value("admin");
        let before = admin
            .map(|a| admin::cds_progress(a, CLUSTERS_TAKEN_WITHIN))
            .transpose()
            .map_err(CliError::Io)?;
        write("origin-policy.cds.json", cds)?;
        if let (Some(admin), Some(before)) = (admin, before) {
            admin::wait_for_clusters(admin, before, CLUSTERS_TAKEN_WITHIN).map_err(|e| {
                CliError::Io(format!("{e}: the filter configuration was not written"))
            })?;
        }
    }
    if let Some(lines) = domains {
        write("origin-policy.domains.tsv", lines)?;
    }
    write("plugin-config.json", config)?;
    write("origin-policy.ecds.json", format!("{ecds:#}"))?;
    Ok(())
}

/// The policy set in a directory, or the errors that keep it from compiling.
fn compiled_set(dir: &str) -> Result<PolicySet, CliError> {
    let docs = load(&[PathBuf::from(dir)])?;
    let (compiled, diagnostics) = docs.compile();
    for d in diagnostics.errors() {
        eprintln!("{d}");
    }
    Ok(compiled.ok_or(CliError::Invalid(diagnostics))?.set)
}

fn mirror(args: &Args) -> Result<(), CliError> {
    let [domain] = args.positional.as_slice() else {
        return Err(CliError::Usage(
            "mirror takes exactly one DOMAIN".to_owned(),
        ));
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut set = compiled_set(args.value("policies").unwrap_or("policies"))?;
    // settings.origin_ca_file is relative to Envoy's working directory.
    if let Some(ca) = args.value("origin-ca-file") {
        set.settings.origin_ca_file = ca.to_owned();
    }
    let every = args
        .value("every")
        .map(|v| {
            origin_policy_mirror::parse_duration(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| CliError::Usage(format!("--every `{v}`: a duration like 1h")))
        })
        .transpose()?;
    let request = mirror::MirrorRequest {
        store: args
            .value("store")
            .map_or_else(|| format!("run/mirror/{domain}"), str::to_owned),
        domain,
        set,
        viewer_scheme: args.value("viewer-scheme").unwrap_or("https").to_owned(),
        path_files: args
            .values("paths")
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        sitemaps: args.values("sitemap"),
        limits: mirror::limits(|n| args.value(n).map(str::to_owned)).map_err(CliError::Usage)?,
        every,
        metrics: args.value("metrics").map(PathBuf::from),
        json: args.has("json"),
    };
    match mirror::mirror(request) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CliError::MirrorFailed),
        Err(why) => Err(CliError::Io(why)),
    }
}

fn feed(args: &Args) -> Result<(), CliError> {
    feed::feed(feed::FeedRequest {
        paths: args.paths(),
        out: PathBuf::from(args.value("out").unwrap_or("run")),
        wasm: PathBuf::from(
            args.value("wasm")
                .unwrap_or("target/wasm32-wasip1/release/origin_policy.wasm"),
        ),
        admin: args.value("admin").map(str::to_owned),
        listen: args.value("listen").unwrap_or("127.0.0.1:18090").to_owned(),
    })
    .map_err(CliError::Io)
}

fn mirror_serve(args: &Args) -> Result<(), CliError> {
    if !args.positional.is_empty() {
        return Err(CliError::Usage(
            "mirror-serve takes no arguments".to_owned(),
        ));
    }
    let root = PathBuf::from(args.value("root").unwrap_or("run/mirror"));
    mirror::serve(root, args.value("listen").unwrap_or("127.0.0.1:18089")).map_err(CliError::Io)
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = raw.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "check" => Args::parse(rest, &[]).and_then(|a| check(&a)),
        "explain" => Args::parse(rest, &["policies", "method", "x-forwarded-proto"])
            .and_then(|a| explain(&a)),
        "bundle" => {
            Args::parse(rest, &["wasm", "out", "admin", "delivery"]).and_then(|a| bundle(&a))
        }
        "feed" => Args::parse(rest, &["wasm", "out", "admin", "listen"]).and_then(|a| feed(&a)),
        "mirror" => Args::parse(rest, &MIRROR_FLAGS).and_then(|a| mirror(&a)),
        "mirror-serve" => Args::parse(rest, &["root", "listen"]).and_then(|a| mirror_serve(&a)),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(CliError::Usage(format!("unknown command `{other}`"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Rejected | CliError::MirrorFailed) => ExitCode::from(1),
        Err(e @ CliError::Invalid(_)) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
