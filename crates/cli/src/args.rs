//! The `origin-policy` command line, declared: its subcommands, options and
//! help texts (clap derive). `main.rs` runs them; the tests read them to
//! check that every subcommand's help is in docs/cli.md.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Validate, explain and bundle CDN origin policies for Envoy; serve them per
/// domain; mirror a domain's primary origin into its secondary.
///
/// Exit codes: 0 success; 1 policies rejected or a mirror run with errors
/// (the findings are printed); 2 a usage, file or network error.
#[derive(Debug, Parser)]
#[command(name = "origin-policy", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate policy files; exit 1 on any error.
    Check {
        /// Also list the Envoy clusters derived from the policies, as JSON.
        #[arg(long)]
        json: bool,
        /// Policy files or directories.
        #[arg(value_name = "PATH", default_value = "policies")]
        paths: Vec<PathBuf>,
    },
    /// Show the origin decision for a viewer request, e.g. https://media.example.com/a.png
    Explain {
        /// The decision as JSON.
        #[arg(long)]
        json: bool,
        /// The policy directory.
        #[arg(long, value_name = "DIR", default_value = "policies")]
        policies: String,
        /// The viewer's method.
        #[arg(long, value_name = "M")]
        method: Option<String>,
        /// The `x-forwarded-proto` the viewer's request carries.
        #[arg(long, value_name = "P")]
        x_forwarded_proto: Option<String>,
        /// The viewer's URL.
        url: String,
    },
    /// Write the origin networks, the origin clusters and the filter for Envoy.
    ///
    /// Writes DIR/origin-policy.networks.ecds.json (the origin networks, an
    /// upstream RBAC filter), DIR/origin-policy.cds.json (the origin clusters),
    /// DIR/plugin-config.json and DIR/origin-policy.ecds.json, each replaced
    /// atomically so that Envoy's file watch sees whole files only; clusters
    /// before the filter.
    Bundle {
        #[command(flatten)]
        output: OutputArgs,
        /// Policies per domain for a feed (`serve`): the filter configuration
        /// carries the settings only and DIR/origin-policy.domains.tsv the
        /// policies, one `DOMAIN<TAB>DOCUMENT` line per domain; the clusters
        /// are those of these policies only.
        #[arg(long, value_enum, default_value_t = Delivery::Inline)]
        delivery: Delivery,
        /// Policy files or directories.
        #[arg(value_name = "PATH", default_value = "policies")]
        paths: Vec<PathBuf>,
    },
    /// The control plane: policies per domain in a durable store, an HTTP API, the policy feed.
    ///
    /// Keeps every domain's policy and its history in STORE (a write is
    /// answered once it is on disk), serves the per-domain API under /v1/
    /// (docs/api.md) and the policy feed that Envoys whose filter has
    /// `"delivery": "feed"` poll at GET /changes (docs/feed.md). Each policy
    /// is checked on its own by the engine; a refused one is answered with
    /// its findings and changes nothing. The origin clusters and the filter
    /// with the settings are written into DIR (with --admin: the clusters a
    /// write needs are in Envoy before the write is published). With
    /// --watch, a policy directory is kept in the store: only the files that
    /// changed are checked again. Runs until Ctrl-C or SIGTERM.
    Serve(ServeArgs),
    /// Certificates for the control plane's mTLS: a CA, node, server and operator certificates, the CRL.
    ///
    /// Each certificate's identity is its SAN URI:
    /// spiffe://origin-policy/node/ID (an Envoy), .../server/NAME (a
    /// control-plane server) or .../operator/NAME (the API and /status).
    /// Keys are ECDSA P-256, written with mode 0600.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Copy a domain's resources from its primary origin into its secondary.
    ///
    /// Resources are fetched as the edge fetches them (address, port, scheme,
    /// Host, SNI and certificate name, timeouts) into the store: the domain's
    /// secondary origin. Paths come from list files (one per line; a line with
    /// a query string is skipped, with why) and sitemaps on the origin (e.g.
    /// /sitemap.xml). Unchanged resources are not fetched again
    /// (If-None-Match, If-Modified-Since); a path gone from the lists or
    /// answering 404 is removed after the grace period. Exit 1 if anything
    /// failed or the run stopped early (the summary says what was done and
    /// why); 2 if the store or the origin cannot be used as given.
    Mirror(Box<MirrorArgs>),
    /// Serve local mirrors: the Host picks ROOT/<host>/; answers carry the stored status and headers.
    MirrorServe {
        /// The directory of the local stores.
        #[arg(long, value_name = "DIR", default_value = "run/mirror")]
        root: PathBuf,
        /// Where it listens.
        #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:18089")]
        listen: String,
    },
    /// Print a completion script for a shell, e.g. `origin-policy completions bash > /etc/bash_completion.d/origin-policy`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// A new CA in DIR: ca.pem, ca-key.pem and an empty crl.pem.
    Init {
        /// The directory (created if needed; an existing CA is never replaced).
        dir: PathBuf,
        /// How long the CA is valid.
        #[arg(long, value_name = "DAYS", default_value_t = 3650)]
        days: u32,
    },
    /// A certificate signed by DIR's CA: DIR/NAME.pem and DIR/NAME-key.pem (replaced if there).
    Issue {
        /// The CA's directory (`certs init`).
        dir: PathBuf,
        #[command(flatten)]
        holder: Holder,
        /// An address the server is reached at (repeatable; a server only).
        #[arg(long = "ip", value_name = "ADDRESS", requires = "server")]
        ips: Vec<std::net::IpAddr>,
        /// A DNS name the server is reached at (repeatable; a server only).
        #[arg(long = "dns", value_name = "NAME", requires = "server")]
        dns: Vec<String>,
        /// How long the certificate is valid.
        #[arg(long, value_name = "DAYS", default_value_t = 365)]
        days: u32,
    },
    /// Revokes a certificate: its serial added to DIR/crl.pem (serve --tls-crl reads it again at once).
    Revoke {
        /// The CA's directory.
        dir: PathBuf,
        #[command(flatten)]
        holder: RevokedHolder,
    },
}

/// Whose certificate `certs issue` makes.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Holder {
    /// An Envoy, by its node id (its `node.id`; list it in serve --tls-nodes).
    #[arg(long, value_name = "ID")]
    pub node: Option<String>,
    /// A control-plane server (its --tls-cert).
    #[arg(long, value_name = "NAME")]
    pub server: Option<String>,
    /// An operator: the API (/v1/) and /status.
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,
}

/// Which certificate `certs revoke` revokes: DIR/NAME.pem, or a serial.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RevokedHolder {
    /// The certificate in DIR/ID.pem.
    #[arg(long, value_name = "ID")]
    pub node: Option<String>,
    /// The certificate in DIR/NAME.pem.
    #[arg(long, value_name = "NAME")]
    pub server: Option<String>,
    /// The certificate in DIR/NAME.pem.
    #[arg(long, value_name = "NAME")]
    pub operator: Option<String>,
    /// A certificate by its serial, in hex (say one `certs issue` replaced).
    #[arg(long, value_name = "HEX")]
    pub serial: Option<String>,
}

/// mTLS on both of `serve`'s listeners.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// The CA (PEM) client certificates must chain to. With --tls-cert and
    /// --tls-key, the HTTP and ADS listeners are TLS and every client must
    /// present a certificate of this CA; without them, serve listens on
    /// loopback addresses only.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This server's certificate (PEM; `certs issue DIR --server NAME --ip ADDRESS`).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This server's key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// The CRL (PEM; `certs revoke` writes it), read again when it changes.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_crl: Option<PathBuf>,
    /// The admitted node ids, one a line (`#` comments), read again when it
    /// changes. Without it, every node certificate of the CA is admitted.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    pub tls_nodes: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Delivery {
    /// The policies inside the filter's configuration.
    Inline,
    /// The settings only; the policies come from a feed.
    Feed,
}

/// Where `bundle` and `serve` write, and the Envoy they wait for.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// The filter module the configuration names.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_WASM)]
    pub wasm: PathBuf,
    /// The directory Envoy watches.
    #[arg(long, value_name = "DIR", default_value = "run")]
    pub out: PathBuf,
    /// Envoy's admin address (e.g. 127.0.0.1:9901): the filter configuration
    /// is written only once that Envoy has taken the clusters, so that a new
    /// policy never names a cluster Envoy does not have yet.
    #[arg(long, value_name = "ADDRESS")]
    pub admin: Option<String>,
}

/// `serve`'s flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// Where the API and the feed listen.
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:18090")]
    pub listen: String,
    /// The store's directory.
    #[arg(long, value_name = "STORE", default_value = "run/store")]
    pub store: PathBuf,
    /// A policy directory to keep in the store (settings.json in it: the settings).
    #[arg(long, value_name = "DIR")]
    pub watch: Vec<PathBuf>,
    /// The settings document, when no watched directory has one.
    #[arg(long, value_name = "FILE")]
    pub settings: Option<PathBuf>,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub replicas: Box<ReplicaArgs>,
    #[command(flatten)]
    pub tls: Box<TlsArgs>,
}

/// `serve` for a fleet of Envoys over ADS, with a canary rollout.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Serve the clusters and the filter over ADS on this address (e.g.
    /// 127.0.0.1:18600) instead of writing them for one Envoy (--out).
    #[arg(long, value_name = "ADDRESS")]
    pub ads: Option<String>,
    /// Node ids (comma-separated) that get each write first; the others get
    /// it once the canaries have baked it.
    #[arg(long, value_name = "IDS", value_delimiter = ',', requires = "ads")]
    pub canary: Vec<String>,
    /// How long the canaries run a write within the limits before every node gets it.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub bake_seconds: f64,
    /// The most 5xx answers a canary may give, of its requests, during the bake.
    #[arg(long, value_name = "RATE", default_value_t = 0.01)]
    pub max_5xx_rate: f64,
    /// The most failovers a canary may make, of its requests, during the bake.
    #[arg(long, value_name = "RATE", default_value_t = 0.05)]
    pub max_failover_rate: f64,
    /// The canary's counter of failovers.
    #[arg(
        long,
        value_name = "STAT",
        default_value = "wasmcustom.origin_policy.failover.retried"
    )]
    pub failover_counter: String,
    /// Requests a canary must have answered in the bake before its rates count.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub min_requests: u64,
    /// How long nodes have to ACK (and canaries to take a write) before
    /// they are reported and the others go on.
    #[arg(long, value_name = "S", default_value_t = 20.0)]
    pub ack_timeout: f64,
}

/// `serve` as one of several replicas over one etcd cluster.
#[derive(Debug, Args)]
pub struct ReplicaArgs {
    /// etcd's client URLs (comma-separated), e.g.
    /// http://127.0.0.11:2379,http://127.0.0.12:2379,http://127.0.0.13:2379:
    /// the policies are kept in etcd, shared by every replica, and STORE is
    /// this replica's cache and history (docs/api.md, "Replicas"). Not with
    /// --canary.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// This replica's name in etcd and in /status [default: the host name].
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub replica: Option<String>,
    /// How operators and other replicas reach this replica's HTTP listener
    /// [default: http://LISTEN].
    #[arg(long, value_name = "URL", requires = "etcd")]
    pub advertise: Option<String>,
    /// TLS to etcd: the CA the members' certificates are checked against
    /// (PEM); every --etcd URL is then https://. With --etcd-cert and
    /// --etcd-key.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    /// The client certificate this replica presents to etcd (PEM), for
    /// members started with --client-cert-auth.
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_ca", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["etcd", "etcd_ca", "etcd_cert"])]
    pub etcd_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MirrorArgs {
    /// The accelerated domain whose primary is copied.
    pub domain: String,
    /// A file listing paths, one per line (repeatable).
    #[arg(long = "paths", value_name = "FILE")]
    pub path_files: Vec<PathBuf>,
    /// A sitemap's path on the origin, e.g. /sitemap.xml (repeatable).
    #[arg(long = "sitemap", value_name = "PATH")]
    pub sitemaps: Vec<String>,
    /// A directory, or s3://BUCKET/PREFIX [default: run/mirror/DOMAIN].
    #[arg(long, value_name = "STORE")]
    pub store: Option<String>,
    /// Where the run's bookkeeping goes, a directory or s3://BUCKET/PREFIX,
    /// never where the edge reads; a bucket store needs one [default:
    /// STORE/.origin-policy for a directory].
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// The policy directory naming the primary.
    #[arg(long, value_name = "DIR", default_value = "policies")]
    pub policies: String,
    /// The CA bundle origin certificates are checked against, instead of
    /// `settings.origin_ca_file` (relative to Envoy's working directory).
    #[arg(long, value_name = "FILE")]
    pub origin_ca_file: Option<String>,
    /// Run again at this interval (e.g. 1h) until Ctrl-C.
    #[arg(long, value_name = "INTERVAL")]
    pub every: Option<String>,
    /// Write the run's counters for node_exporter's textfile collector.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// The summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// The viewer scheme a `follow` policy is fetched for (http or https).
    #[arg(long, value_name = "SCHEME", default_value = "https")]
    pub viewer_scheme: String,
    /// Fetches at once (1-256) [default: 4].
    #[arg(long, value_name = "N")]
    pub concurrency: Option<String>,
    /// Bytes per second read from the origin, 0 for no limit [default: 20M].
    #[arg(long, value_name = "BYTES")]
    pub rate: Option<String>,
    /// The largest object [default: 1G].
    #[arg(long, value_name = "BYTES")]
    pub max_object_bytes: Option<String>,
    /// The most the store may hold [default: 10G].
    #[arg(long, value_name = "BYTES")]
    pub max_store_bytes: Option<String>,
    /// The longest one object's fetch may take [default: 10m].
    #[arg(long, value_name = "DURATION")]
    pub object_timeout: Option<String>,
    /// Redirects followed within the domain (0-20) [default: 5].
    #[arg(long, value_name = "N")]
    pub max_redirects: Option<String>,
    /// How long a path gone from the lists is kept [default: 7d].
    #[arg(long, value_name = "DURATION")]
    pub grace: Option<String>,
}

impl MirrorArgs {
    /// A limit as given, by its option's name.
    pub fn limit(&self, name: &str) -> Option<String> {
        match name {
            "concurrency" => self.concurrency.clone(),
            "rate" => self.rate.clone(),
            "max-object-bytes" => self.max_object_bytes.clone(),
            "max-store-bytes" => self.max_store_bytes.clone(),
            "object-timeout" => self.object_timeout.clone(),
            "max-redirects" => self.max_redirects.clone(),
            "grace" => self.grace.clone(),
            _ => None,
        }
    }
}

pub const DEFAULT_WASM: &str = "target/wasm32-wasip1/release/origin_policy.wasm";
