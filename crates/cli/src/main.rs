//! `origin-policy` command line: check, explain and bundle policy files;
//! mirror a domain's primary origin into its secondary.

use origin_policy_cli::explain_text;
use origin_policy_cli::files::{ecds_resource, read_paths, write_atomically, NETWORKS_FILE};
use origin_policy_cli::mirror;
use origin_policy_control::admin;
use origin_policy_engine::documents::PolicyDocuments;
use origin_policy_engine::report::{diagnostic_json, outcome_json, request_from_url};
use origin_policy_engine::{fingerprint, Diagnostics, PolicySet};
use serde_json::{json, Value};
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use origin_policy_cli::args::{
    CertsCommand, Cli, Command, Delivery, Holder, MirrorArgs, OutputArgs, ReplicaArgs,
    RevokedHolder, ServeArgs, TlsArgs,
};
use origin_policy_cli::certs;
use origin_policy_control::envoy::EnvoyConfig;
use origin_policy_control::tls::{Identity, TlsFiles};
use std::sync::Arc;

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
            CliError::Usage(why) => f.write_str(why),
            CliError::Io(why) => f.write_str(why),
            CliError::Invalid(d) => write!(f, "{d}\npolicies rejected"),
            CliError::Rejected => f.write_str("policies rejected"),
            CliError::MirrorFailed => f.write_str("mirror run had errors"),
        }
    }
}

fn serve(args: &ServeArgs) -> Result<(), CliError> {
    let ServeArgs {
        output,
        listen,
        store,
        watch,
        settings,
        fleet,
        replicas,
        tls,
    } = args;
    if !replicas.etcd.is_empty() && !fleet.canary.is_empty() {
        return Err(CliError::Usage(
            "--canary cannot be used with --etcd: the canary rollout is one server's (docs/api.md, \"Replicas\")".to_owned(),
        ));
    }
    let replica =
        (!replicas.etcd.is_empty()).then(|| origin_policy_control::replica::ReplicaConfig {
            endpoints: replicas.etcd.clone(),
            name: replicas
                .replica
                .clone()
                .unwrap_or_else(origin_policy_control::serve::host_name),
            api: replicas.advertise.clone().unwrap_or_else(|| {
                let scheme = if tls.tls_ca.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{listen}")
            }),
            ads: fleet.ads.clone(),
            tls: etcd_tls(replicas),
        });
    let wasm = std::fs::canonicalize(&output.wasm)
        .map_err(|e| {
            CliError::Io(format!(
                "{}: {e} (build it with cargo build --release --target wasm32-wasip1)",
                output.wasm.display()
            ))
        })?
        .to_string_lossy()
        .into_owned();
    let seconds = |s: f64, what: &str| {
        std::time::Duration::try_from_secs_f64(s)
            .map_err(|e| CliError::Io(format!("--{what} {s}: {e}")))
    };
    let (envoy, fleet): (Box<dyn EnvoyConfig>, _) = match &fleet.ads {
        Some(address) => {
            use origin_policy_control::rollout::{Fleet, RolloutConfig};
            let ack_timeout = seconds(fleet.ack_timeout, "ack-timeout")?;
            let rollout = (!fleet.canary.is_empty())
                .then(|| -> Result<RolloutConfig, CliError> {
                    Ok(RolloutConfig {
                        canaries: fleet.canary.clone(),
                        bake: seconds(fleet.bake_seconds, "bake-seconds")?,
                        max_5xx_rate: fleet.max_5xx_rate,
                        max_failover_rate: fleet.max_failover_rate,
                        failover_counter: fleet.failover_counter.clone(),
                        min_requests: fleet.min_requests,
                        ack_timeout,
                    })
                })
                .transpose()?;
            let state = Arc::new(Fleet::new(rollout));
            let ads = origin_policy_control::AdsServer::new();
            state.set_ads(ads.clone());
            let envoy = Arc::new(origin_policy_control::ads::EnvoyAds::new(
                ads,
                state.clone(),
                PathBuf::from(&wasm),
                std::path::absolute(store.join("modules"))
                    .map_err(|e| CliError::Io(format!("{}: {e}", store.display())))?,
                ack_timeout,
            ));
            let serve = origin_policy_control::FleetServe {
                ads_listen: address.clone(),
                envoy: envoy.clone(),
                fleet: state,
                wasm: PathBuf::from(&wasm),
            };
            (Box::new(envoy), Some(serve))
        }
        None => {
            std::fs::create_dir_all(&output.out)
                .map_err(|e| CliError::Io(format!("{}: {e}", output.out.display())))?;
            let files = origin_policy_control::envoy::EnvoyFiles {
                dir: output.out.clone(),
                wasm,
                admin: output.admin.clone(),
            };
            (Box::new(files), None)
        }
    };
    origin_policy_control::serve(origin_policy_control::ServeConfig {
        store: store.to_path_buf(),
        listen: listen.to_owned(),
        watch: watch.to_vec(),
        settings: settings.clone(),
        envoy,
        fleet,
        replica,
        tls: tls_files(tls),
    })
    .map_err(|e| CliError::Io(e.to_string()))
}

fn tls_files(tls: &TlsArgs) -> Option<TlsFiles> {
    match (&tls.tls_ca, &tls.tls_cert, &tls.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            crl: tls.tls_crl.clone(),
            nodes: tls.tls_nodes.clone(),
        }),
        _ => None,
    }
}

fn holder_identity(holder: &Holder) -> Option<Identity> {
    let Holder {
        node,
        server,
        operator,
    } = holder;
    node.clone()
        .map(Identity::Node)
        .or_else(|| server.clone().map(Identity::Server))
        .or_else(|| operator.clone().map(Identity::Operator))
}

fn certs_command(command: &CertsCommand) -> Result<(), CliError> {
    let wrote = |paths: Vec<PathBuf>| {
        for path in paths {
            println!("wrote {}", path.display());
        }
    };
    match command {
        CertsCommand::Init { dir, days } => wrote(certs::init(dir, *days).map_err(CliError::Io)?),
        CertsCommand::Issue {
            dir,
            holder,
            ips,
            dns,
            days,
        } => {
            let identity = holder_identity(holder)
                .ok_or_else(|| CliError::Usage("--node, --server or --operator".to_owned()))?;
            wrote(certs::issue(dir, &identity, ips, dns, *days).map_err(CliError::Io)?);
            println!("identity {identity}");
        }
        CertsCommand::Revoke { dir, holder } => {
            let RevokedHolder {
                node,
                server,
                operator,
                serial,
            } = holder;
            let serial = match (
                serial,
                node.as_ref().or(server.as_ref()).or(operator.as_ref()),
            ) {
                (Some(serial), _) => serial.clone(),
                (None, Some(name)) => {
                    certs::serial_of(&dir.join(format!("{name}.pem"))).map_err(CliError::Io)?
                }
                (None, None) => {
                    return Err(CliError::Usage(
                        "--node, --server, --operator or --serial".to_owned(),
                    ))
                }
            };
            let added = certs::revoke(dir, &serial).map_err(CliError::Io)?;
            let crl = dir.join(certs::CRL_FILE).display().to_string();
            if added {
                println!("revoked serial {serial}: wrote {crl}");
            } else {
                println!("serial {serial} was revoked already ({crl})");
            }
        }
    }
    Ok(())
}

/// `--etcd-ca`, `--etcd-cert` and `--etcd-key`, which clap requires together.
fn etcd_tls(replicas: &ReplicaArgs) -> Option<origin_policy_control::etcd::EtcdTls> {
    match (&replicas.etcd_ca, &replicas.etcd_cert, &replicas.etcd_key) {
        (Some(ca), Some(cert), Some(key)) => Some(origin_policy_control::etcd::EtcdTls {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    }
}

fn load(paths: &[PathBuf]) -> Result<PolicyDocuments, CliError> {
    read_paths(paths).map_err(CliError::Io)
}

fn check(json: bool, paths: &[PathBuf]) -> Result<(), CliError> {
    let dir = load(paths)?;
    let (compiled, diagnostics) = dir.compile();
    let domains = compiled.as_ref().map_or(0, |c| c.set.index.len());
    if json {
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

fn explain(
    json: bool,
    policies: &str,
    method: Option<&str>,
    x_forwarded_proto: Option<&str>,
    url: &str,
) -> Result<(), CliError> {
    let set = compiled_set(policies)?;
    let spec = request_from_url(url, method, x_forwarded_proto).map_err(CliError::Usage)?;
    let outcome = set.decide(&spec.as_request());
    if json {
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

fn bundle(output: &OutputArgs, delivery: Delivery, paths: &[PathBuf]) -> Result<(), CliError> {
    let feed_delivery = delivery == Delivery::Feed;
    let dir = load(paths)?;
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
    let out = &output.out;
    std::fs::create_dir_all(out).map_err(|e| CliError::Io(format!("{}: {e}", out.display())))?;
    let wasm = &output.wasm;
    let wasm_abs = std::fs::canonicalize(wasm).map_err(|e| {
        CliError::Io(format!(
            "{}: {e} (build it with cargo build --release --target wasm32-wasip1)",
            wasm.display()
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
        let admin = output.admin.as_deref();
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

fn mirror(args: &MirrorArgs) -> Result<(), CliError> {
    let domain = args.domain.trim_end_matches('.').to_ascii_lowercase();
    let mut set = compiled_set(&args.policies)?;
    // settings.origin_ca_file is relative to Envoy's working directory.
    if let Some(ca) = &args.origin_ca_file {
        set.settings.origin_ca_file = ca.clone();
    }
    let every = args
        .every
        .as_deref()
        .map(|v| {
            origin_policy_mirror::parse_duration(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| CliError::Usage(format!("--every `{v}`: a duration like 1h")))
        })
        .transpose()?;
    let request = mirror::MirrorRequest {
        store: args
            .store
            .clone()
            .unwrap_or_else(|| format!("run/mirror/{domain}")),
        state: args.state.clone(),
        domain,
        set,
        viewer_scheme: args.viewer_scheme.clone(),
        path_files: args.path_files.clone(),
        sitemaps: args.sitemaps.clone(),
        limits: mirror::limits(|n| args.limit(n)).map_err(CliError::Usage)?,
        every,
        metrics: args.metrics.clone(),
        json: args.json,
    };
    match mirror::mirror(request) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CliError::MirrorFailed),
        Err(why) => Err(CliError::Io(why)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Check { json, paths } => check(*json, paths),
        Command::Explain {
            json,
            policies,
            method,
            x_forwarded_proto,
            url,
        } => explain(
            *json,
            policies,
            method.as_deref(),
            x_forwarded_proto.as_deref(),
            url,
        ),
        Command::Bundle {
            output,
            delivery,
            paths,
        } => bundle(output, *delivery, paths),
        Command::Serve(args) => serve(args),
        Command::Certs { command } => certs_command(command),
        Command::Mirror(args) => mirror(args),
        Command::MirrorServe { root, listen } => {
            mirror::serve(root.clone(), listen).map_err(CliError::Io)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "origin-policy",
                &mut std::io::stdout(),
            );
            Ok(())
        }
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
