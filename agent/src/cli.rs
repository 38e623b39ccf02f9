//! Command line: clap derive, every flag also from the environment.
//!
//! Flags are read as `--flag`, else `WEFT_<FLAG>`, else flanneld's `FLANNELD_<FLAG>` (so
//! existing units keep working), and validated into typed config before tokio starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{self, AgentConfig, AgentError, Datapath};
use crate::config::NetworkConfig;
use crate::datapath::DecapHook;
use crate::files::{self, DockerOpts};
use crate::health::HealthServer;
use crate::iface::IfaceChoice;
use crate::lease::BackendAttrs;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::subnet::{EtcdOptions, EtcdStore, LeaseTiming, SubnetError};

/// Exit codes (sysexits.h), also listed in `weft --help`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const OTHER: u8 = 1;
    /// EX_USAGE: a flag or argument is wrong.
    pub const USAGE: u8 = 64;
    /// EX_UNAVAILABLE: etcd cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// EX_CONFIG: the network config (or interface choice) is invalid.
    pub const CONFIG: u8 = 78;
}

const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   other failure (I/O, backend)
  64  usage error: a flag or argument is invalid (EX_USAGE)
  69  etcd unavailable: no endpoint answered (EX_UNAVAILABLE)
  78  configuration error: the network config is invalid, missing, or no interface matches (EX_CONFIG)

Every flag can also be given as WEFT_<FLAG> (e.g. WEFT_ETCD_ENDPOINTS); flanneld's FLANNELD_<FLAG> is honoured when WEFT_<FLAG> is unset.";

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "flannel-compatible overlay network agent", after_help = EXIT_CODES)]
struct Cli {
    /// Log format (filter with RUST_LOG, default info).
    #[arg(
        long,
        env = "WEFT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DecapChoice {
    Auto,
    Xdp,
    Tc,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (flanneld's replacement).
    #[command(after_help = EXIT_CODES)]
    Agent(Box<AgentArgs>),
    /// Read or write the network config at <prefix>/config.
    #[command(subcommand, after_help = EXIT_CODES)]
    Config(ConfigCmd),
    /// List subnet leases: subnet, public IP, VTEP MAC, backend, time to expiry.
    #[command(after_help = EXIT_CODES)]
    Leases {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write Docker daemon options derived from the subnet file, as mk-docker-opts.sh does.
    #[command(after_help = EXIT_CODES)]
    DockerOpts(DockerOptsArgs),
    /// Show the datapath of this host (run it in the agent's network namespace):
    /// mode, attached programs, map entries, counters.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Pin directory, as given to `weft agent --bpf-pin-dir`.
        #[arg(long, env = "WEFT_BPF_PIN_DIR")]
        bpf_pin_dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The default pin directory: one per network namespace, so agents of several
/// namespaces on one machine (and of the test harness) never share maps.
fn default_pin_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/net")?.ino();
    Ok(PathBuf::from(format!("/sys/fs/bpf/weft/netns-{ino}")))
}

fn status(pin_dir: Option<PathBuf>, json: bool) -> ExitCode {
    let dir = match pin_dir.map_or_else(default_pin_dir, Ok) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                exit::OTHER,
                format!("find this namespace's pin directory: {e}"),
            )
        }
    };
    match crate::status::collect(&dir) {
        Ok(st) if json => match serde_json::to_string_pretty(&st) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(exit::OTHER, e),
        },
        Ok(st) => {
            print!("{st}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(exit::OTHER, e),
    }
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print the stored network config.
    Get {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Validate and store a network config; an invalid one is never written.
    Set {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The config JSON, e.g. '{"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan"}}'.
        json: String,
    },
}

#[derive(Debug, Args)]
struct EtcdArgs {
    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        env = "WEFT_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// etcd prefix holding config and subnets.
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/coreos.com/network")]
    etcd_prefix: String,
    /// CA certificate to verify etcd with.
    #[arg(long, env = "WEFT_ETCD_CAFILE")]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd.
    #[arg(long, env = "WEFT_ETCD_CERTFILE")]
    etcd_certfile: Option<PathBuf>,
    /// Client key for etcd.
    #[arg(long, env = "WEFT_ETCD_KEYFILE")]
    etcd_keyfile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "WEFT_ETCD_USERNAME")]
    etcd_username: Option<String>,
    /// etcd password.
    #[arg(long, env = "WEFT_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
}

#[derive(Debug, Args)]
struct AgentArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Interface (name or IP) for overlay traffic; repeat for fallbacks, first match wins.
    #[arg(long, env = "WEFT_IFACE", value_delimiter = ',')]
    iface: Vec<String>,
    /// Regex matched against interface IPs, then names; repeatable.
    #[arg(long, env = "WEFT_IFACE_REGEX", value_delimiter = ',')]
    iface_regex: Vec<String>,
    /// IP to advertise to peers (default: the interface's).
    #[arg(long, env = "WEFT_PUBLIC_IP")]
    public_ip: Option<String>,
    /// Subnet file to write.
    #[arg(
        long,
        env = "WEFT_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    subnet_file: PathBuf,
    /// Docker options file to write (DOCKER_OPT_BIP, DOCKER_OPT_IPMASQ, DOCKER_OPT_MTU).
    #[arg(
        long,
        env = "WEFT_DOCKER_OPTS_FILE",
        default_value = "/run/flannel/flannel_docker_opts.env"
    )]
    docker_opts_file: PathBuf,
    /// Renew the lease this many minutes before it expires (1..1439).
    #[arg(long, env = "WEFT_SUBNET_LEASE_RENEW_MARGIN", default_value = "60")]
    subnet_lease_renew_margin: String,
    /// Lease TTL, e.g. 30s, 5m, 24h.
    #[arg(long, env = "WEFT_SUBNET_LEASE_TTL", default_value = "24h")]
    subnet_lease_ttl: String,
    /// Masquerade traffic leaving the overlay.
    #[arg(long, env = "WEFT_IP_MASQ", num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    ip_masq: String,
    /// Seconds between checks of the masquerade and forward rules.
    #[arg(long, env = "WEFT_IPTABLES_RESYNC", default_value = "5")]
    iptables_resync: String,
    /// Accept overlay traffic in FORWARD (flanneld's FLANNEL-FWD chain), with or without --ip-masq,
    /// so a container that has not sent yet is reachable where Docker set the policy to DROP.
    #[arg(long, env = "WEFT_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_missing_value = "true", default_value = "true", action = clap::ArgAction::Set)]
    iptables_forward_rules: String,
    /// Address for /healthz and /readyz.
    #[arg(long, env = "WEFT_HEALTHZ_IP", default_value = "0.0.0.0")]
    healthz_ip: String,
    /// Port for /healthz and /readyz; 0 disables them.
    #[arg(long, env = "WEFT_HEALTHZ_PORT", default_value = "0")]
    healthz_port: String,
    /// Datapath: eBPF, the kernel vxlan device, or eBPF when available.
    #[arg(long, env = "WEFT_DATAPATH", value_enum, default_value = "auto")]
    datapath: Datapath,
    /// Docker bridge the containers hang off.
    #[arg(long, env = "WEFT_BRIDGE", default_value = "docker0")]
    bridge: String,
    /// Where the eBPF programs, links and maps are pinned (bpffs); default
    /// /sys/fs/bpf/weft/netns-<inode of this network namespace>.
    #[arg(long, env = "WEFT_BPF_PIN_DIR")]
    bpf_pin_dir: Option<PathBuf>,
    /// eBPF decapsulation hook on the external interface: by driver (TC on veth, XDP
    /// elsewhere), or forced.
    #[arg(long, env = "WEFT_DECAP_HOOK", value_enum, default_value = "auto")]
    decap_hook: DecapChoice,
    /// Fill the outer UDP checksum of eBPF-encapsulated packets, as flannel.N
    /// (`udpcsum`) does; GSO packets leave with 0 either way (see README).
    #[arg(long, env = "WEFT_EBPF_UDP_CSUM", num_args = 0..=1, default_missing_value = "true", default_value = "true", action = clap::ArgAction::Set)]
    ebpf_udp_csum: String,
    /// Detach and unpin weft's eBPF programs and maps, then exit. flannel.<VNI> and its
    /// routes stay, so traffic keeps flowing on the kernel path.
    #[arg(long)]
    cleanup: bool,
    /// How often to compare kernel state with the peer set, e.g. 10s.
    #[arg(long, env = "WEFT_RECONCILE_INTERVAL", default_value = "10s")]
    reconcile_interval: String,
    /// How long SIGTERM/SIGINT waits for tasks to stop, e.g. 5s.
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE", default_value = "5s")]
    shutdown_grace: String,
}

/// mk-docker-opts.sh's options, same letters.
#[derive(Debug, Args)]
struct DockerOptsArgs {
    /// Path to flannel env file.
    #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
    flannel_env: PathBuf,
    /// Path to Docker env file to write to.
    #[arg(short = 'd', default_value = "/run/docker_opts.env")]
    docker_env: PathBuf,
    /// Output each Docker option as individual var, e.g. DOCKER_OPT_MTU=1500.
    #[arg(short = 'i')]
    individual: bool,
    /// Output combined Docker options into the DOCKER_OPTS var.
    #[arg(short = 'c')]
    combined: bool,
    /// Set the combined options key to this value.
    #[arg(short = 'k', default_value = "DOCKER_OPTS")]
    key: String,
    /// Do not output --ip-masq (useful for older Docker versions).
    #[arg(short = 'm')]
    no_ipmasq: bool,
}

/// A flag that failed validation (exit 64).
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {value:?}: {reason}")]
pub struct UsageError {
    flag: &'static str,
    value: String,
    reason: String,
}

fn usage(flag: &'static str, value: &str, reason: impl ToString) -> UsageError {
    UsageError {
        flag,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Parse `30s`, `5m`, `24h`, `1h30m`, `500ms` (Go's time.ParseDuration units, no fractions).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

fn parse_bool(flag: &'static str, v: &str) -> Result<bool, UsageError> {
    match v {
        "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
        "false" | "0" | "f" | "F" | "FALSE" | "False" => Ok(false),
        _ => Err(usage(flag, v, "expected true or false")),
    }
}

fn duration_flag(flag: &'static str, v: &str, min: Duration) -> Result<Duration, UsageError> {
    match parse_duration(v) {
        Some(d) if d >= min => Ok(d),
        Some(_) => Err(usage(flag, v, format!("must be at least {min:?}"))),
        None => Err(usage(flag, v, "expected a duration like 30s, 5m or 24h")),
    }
}

impl EtcdArgs {
    fn validate(&self) -> Result<EtcdOptions, UsageError> {
        for e in &self.etcd_endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(usage(
                    "etcd-endpoints",
                    e,
                    "each endpoint must start with http:// or https://",
                ));
            }
        }
        if self.etcd_endpoints.is_empty() {
            return Err(usage("etcd-endpoints", "", "give at least one endpoint"));
        }
        if !self.etcd_prefix.starts_with('/') {
            return Err(usage(
                "etcd-prefix",
                &self.etcd_prefix,
                "must start with /, e.g. /coreos.com/network",
            ));
        }
        for (flag, path) in [
            ("etcd-cafile", &self.etcd_cafile),
            ("etcd-certfile", &self.etcd_certfile),
            ("etcd-keyfile", &self.etcd_keyfile),
        ] {
            if let Some(p) = path.as_ref().filter(|p| !p.is_file()) {
                return Err(usage(flag, &p.display().to_string(), "no such file"));
            }
        }
        if self.etcd_certfile.is_some() != self.etcd_keyfile.is_some() {
            return Err(usage(
                "etcd-certfile",
                "",
                "--etcd-certfile and --etcd-keyfile go together",
            ));
        }
        if self.etcd_cafile.is_some() || self.etcd_certfile.is_some() {
            if let Some(plain) = self
                .etcd_endpoints
                .iter()
                .find(|e| e.starts_with("http://"))
            {
                return Err(usage(
                    "etcd-endpoints",
                    plain,
                    "TLS files are given, so every endpoint must be https://",
                ));
            }
        }
        if self.etcd_username.is_some() != self.etcd_password.is_some() {
            return Err(usage(
                "etcd-username",
                "",
                "--etcd-username and --etcd-password go together",
            ));
        }
        Ok(EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.trim_end_matches('/').to_string(),
            cafile: self.etcd_cafile.clone(),
            certfile: self.etcd_certfile.clone(),
            keyfile: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        })
    }
}

impl AgentArgs {
    fn validate(&self) -> Result<AgentConfig, UsageError> {
        let iface_regex = self
            .iface_regex
            .iter()
            .map(|r| regex::Regex::new(r).map_err(|e| usage("iface-regex", r, e)))
            .collect::<Result<_, _>>()?;
        let public_ip = self
            .public_ip
            .as_deref()
            .map(|s| {
                s.parse::<Ipv4Addr>()
                    .map_err(|_| usage("public-ip", s, "expected an IPv4 address"))
            })
            .transpose()?;
        let margin_min: u64 = self
            .subnet_lease_renew_margin
            .parse()
            .ok()
            .filter(|m| (1..=1439).contains(m))
            .ok_or_else(|| {
                usage(
                    "subnet-lease-renew-margin",
                    &self.subnet_lease_renew_margin,
                    "minutes from 1 to 1439",
                )
            })?;
        let ttl = duration_flag(
            "subnet-lease-ttl",
            &self.subnet_lease_ttl,
            Duration::from_secs(2),
        )?;
        let healthz_port: u16 = self
            .healthz_port
            .parse()
            .map_err(|_| usage("healthz-port", &self.healthz_port, "a port number 0..65535"))?;
        let healthz_ip: IpAddr = self
            .healthz_ip
            .parse()
            .map_err(|_| usage("healthz-ip", &self.healthz_ip, "expected an IP address"))?;
        let resync: u64 = self
            .iptables_resync
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| {
                usage(
                    "iptables-resync",
                    &self.iptables_resync,
                    "seconds, at least 1",
                )
            })?;
        if self.bridge.is_empty() || self.bridge.len() > 15 {
            return Err(usage(
                "bridge",
                &self.bridge,
                "an interface name of 1 to 15 characters",
            ));
        }
        Ok(AgentConfig {
            etcd: self.etcd.validate()?,
            iface: IfaceChoice {
                iface: self.iface.clone(),
                iface_regex,
                public_ip,
            },
            subnet_file: self.subnet_file.clone(),
            docker_opts_file: self.docker_opts_file.clone(),
            lease: LeaseTiming {
                ttl,
                renew_margin: Duration::from_secs(margin_min * 60),
            },
            ip_masq: parse_bool("ip-masq", &self.ip_masq)?,
            iptables_resync: Duration::from_secs(resync),
            iptables_forward_rules: parse_bool(
                "iptables-forward-rules",
                &self.iptables_forward_rules,
            )?,
            healthz: (healthz_port != 0).then_some(SocketAddr::new(healthz_ip, healthz_port)),
            datapath: self.datapath,
            bridge: self.bridge.clone(),
            bpf_pin_dir: match &self.bpf_pin_dir {
                Some(dir) => dir.clone(),
                None => default_pin_dir()
                    .map_err(|e| usage("bpf-pin-dir", "", format!("{e}; pass --bpf-pin-dir")))?,
            },
            decap_hook: match self.decap_hook {
                DecapChoice::Auto => None,
                DecapChoice::Xdp => Some(DecapHook::Xdp),
                DecapChoice::Tc => Some(DecapHook::Tc),
            },
            ebpf_udp_csum: parse_bool("ebpf-udp-csum", &self.ebpf_udp_csum)?,
            reconcile_interval: duration_flag(
                "reconcile-interval",
                &self.reconcile_interval,
                Duration::from_millis(100),
            )?,
            shutdown_grace: duration_flag("shutdown-grace", &self.shutdown_grace, Duration::ZERO)?,
        })
    }
}

/// Copy `FLANNELD_<NAME>` to `WEFT_<NAME>` where the latter is unset. Runs before any thread.
fn adopt_flanneld_env() {
    for (k, v) in std::env::vars_os() {
        let Some(name) = k.to_str().and_then(|k| k.strip_prefix("FLANNELD_")) else {
            continue;
        };
        let weft = format!("WEFT_{name}");
        if std::env::var_os(&weft).is_none() {
            std::env::set_var(weft, v);
        }
    }
}

fn init_logging(format: LogFormat) -> Result<(), crate::telemetry::TelemetryError> {
    crate::telemetry::init(match format {
        LogFormat::Text => crate::telemetry::LogFormat::Text,
        LogFormat::Json => crate::telemetry::LogFormat::Json,
    })
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("weft: {msg}");
    ExitCode::from(code)
}

fn subnet_exit(e: &SubnetError) -> u8 {
    match e {
        SubnetError::Unavailable { .. } => exit::UNAVAILABLE,
        SubnetError::BadConfig { .. }
        | SubnetError::TlsFile { .. }
        | SubnetError::Tls { .. }
        | SubnetError::Auth { .. } => exit::CONFIG,
        _ => exit::OTHER,
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

pub fn main() -> ExitCode {
    adopt_flanneld_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = init_logging(cli.log_format) {
        return fail(exit::USAGE, e);
    }
    match cli.command {
        Command::Agent(args) => match args.validate() {
            Ok(cfg) if args.cleanup => cleanup(&cfg),
            Ok(cfg) => run_agent(cfg),
            Err(e) => fail(exit::USAGE, e),
        },
        Command::Status { bpf_pin_dir, json } => status(bpf_pin_dir, json),
        Command::Config(ConfigCmd::Set { etcd, json }) => {
            let opts = match etcd.validate() {
                Ok(o) => o,
                Err(e) => return fail(exit::USAGE, e),
            };
            if let Err(e) = NetworkConfig::parse(&json) {
                return fail(exit::CONFIG, format!("not stored: {e}"));
            }
            with_store(&opts, |store| async move {
                store.put_config(&json).await?;
                println!("stored network config at {}", store.config_key());
                Ok(exit::OK)
            })
        }
        Command::Config(ConfigCmd::Get { etcd }) => match etcd.validate() {
            Err(e) => fail(exit::USAGE, e),
            Ok(opts) => with_store(&opts, |store| async move {
                match store.get_config().await? {
                    Some(json) => {
                        println!("{json}");
                        if let Err(e) = NetworkConfig::parse(&json) {
                            eprintln!("weft: warning: this config is invalid: {e}");
                            return Ok(exit::CONFIG);
                        }
                        Ok(exit::OK)
                    }
                    None => {
                        eprintln!("weft: no network config at {}; write one with `weft config set '<json>'`", store.config_key());
                        Ok(exit::CONFIG)
                    }
                }
            }),
        },
        Command::Leases { etcd, json } => match etcd.validate() {
            Err(e) => fail(exit::USAGE, e),
            Ok(opts) => with_store(
                &opts,
                |store| async move { print_leases(&store, json).await },
            ),
        },
        Command::DockerOpts(a) => docker_opts(&a),
    }
}

fn with_store<F, Fut>(opts: &EtcdOptions, f: F) -> ExitCode
where
    F: FnOnce(EtcdStore) -> Fut,
    Fut: std::future::Future<Output = Result<u8, SubnetError>>,
{
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(exit::OTHER, format!("start the async runtime: {e}")),
    };
    rt.block_on(async {
        match EtcdStore::connect(opts).await {
            Ok(store) => match f(store).await {
                Ok(code) => ExitCode::from(code),
                Err(e) => fail(subnet_exit(&e), e),
            },
            Err(e) => fail(subnet_exit(&e), e),
        }
    })
}

async fn print_leases(store: &EtcdStore, json: bool) -> Result<u8, SubnetError> {
    let listing = store.list_leases().await?;
    let mut rows = Vec::new();
    for l in &listing.leases {
        let (vtep, vni) = match &l.attrs.backend {
            BackendAttrs::Vxlan { vni, vtep_mac } => (Some(vtep_mac.to_string()), *vni),
            _ => (None, None),
        };
        let ttl = store.ttl_left(l.etcd_lease).await?;
        rows.push(serde_json::json!({
            "subnet": l.subnet.to_string(),
            "public_ip": l.attrs.public_ip.to_string(),
            "vtep_mac": vtep,
            "vni": vni,
            "backend": l.attrs.backend.type_name(),
            "expires_in_secs": ttl,
        }));
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(exit::OK);
    }
    println!(
        "{:<20} {:<16} {:<18} {:<8} EXPIRES IN",
        "SUBNET", "PUBLIC IP", "VTEP MAC", "BACKEND"
    );
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        let exp = r["expires_in_secs"].as_i64().map_or("-".to_string(), |t| {
            format!("{}h{:02}m{:02}s", t / 3600, t / 60 % 60, t % 60)
        });
        println!(
            "{:<20} {:<16} {:<18} {:<8} {exp}",
            s("subnet"),
            s("public_ip"),
            s("vtep_mac"),
            s("backend")
        );
    }
    Ok(exit::OK)
}

fn docker_opts(a: &DockerOptsArgs) -> ExitCode {
    // The script sources the file only when it exists; a missing file yields empty options.
    let env = if a.flannel_env.is_file() {
        match files::read_env(&a.flannel_env) {
            Ok(e) => e,
            Err(e) => return fail(exit::OTHER, e),
        }
    } else {
        Default::default()
    };
    let opts = DockerOpts {
        individual: a.individual,
        combined: a.combined,
        combined_key: a.key.clone(),
        no_ipmasq: a.no_ipmasq,
    };
    let existing = std::env::var(&a.key).ok();
    match opts.render(&env, existing.as_deref()) {
        Ok(text) => match files::write_atomic(&a.docker_env, text.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(exit::OTHER, e),
        },
        Err(e) => fail(exit::OTHER, e),
    }
}

fn cleanup(cfg: &AgentConfig) -> ExitCode {
    match crate::backend::ebpf::cleanup(&cfg.bpf_pin_dir) {
        Ok(()) => {
            println!(
                "removed weft's eBPF programs, links and maps under {}; flannel.<VNI> and its routes stay (traffic continues on the kernel path)",
                cfg.bpf_pin_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("weft: cleanup: {e}");
            }
            ExitCode::from(exit::OTHER)
        }
    }
}

fn run_agent(cfg: AgentConfig) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(exit::OTHER, format!("start the async runtime: {e}")),
    };
    rt.block_on(async move {
        let notifier = Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!("sd_notify disabled: {e}");
            Notifier::default()
        });
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        let stopping = notifier.clone();
        let sig_task = tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
                // The run loop ended by itself (an error): systemd sees the exit, no STOPPING.
                _ = signals.cancelled() => return,
            }
            if let Err(e) =
                stopping.stopping("stopping: lease and datapath stay for the next start")
            {
                tracing::warn!("sd_notify: {e}");
            }
            signals.cancel();
        });
        let (ready, ready_rx) = tokio::sync::watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        metrics.set_datapath_stats(Arc::new(crate::status::PinnedStats {
            pin_dir: cfg.bpf_pin_dir.clone(),
        }));
        let tracker = TaskTracker::new();
        if let Some(addr) = cfg.healthz {
            // Bind before anything else so a taken port fails the start, not a later scrape.
            match HealthServer::bind(addr, ready_rx, metrics.clone()).await {
                Ok(server) => {
                    tracker.spawn(server.serve(shutdown.clone()));
                }
                Err(e) => return fail(exit::CONFIG, e),
            }
        }
        // From the start, not from READY: systemd arms WatchdogSec= when it starts the process, and
        // waiting for etcd or the config may take longer than the watchdog.
        tracker.spawn({
            let (notifier, shutdown) = (notifier.clone(), shutdown.clone());
            async move { notifier.run_watchdog(shutdown).await }
        });
        tracker.close();
        let hooks = agent::Hooks {
            ready,
            metrics,
            notifier,
        };
        let result = agent::run(cfg, crate::backend::build, shutdown.clone(), hooks).await;
        shutdown.cancel();
        let _ = sig_task.await;
        tracker.wait().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let code = match &e {
                    AgentError::Config { .. } | AgentError::Iface(_) => exit::CONFIG,
                    AgentError::Subnet(s) => subnet_exit(s),
                    AgentError::Files(_)
                    | AgentError::Backend(_)
                    | AgentError::Masq(_)
                    | AgentError::ConfigChanged { .. } => exit::OTHER,
                };
                fail(code, e)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        for bad in ["", "30", "s", "5x", "-5s", "1.5h", "99999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    fn agent(args: &[&str]) -> Result<AgentConfig, String> {
        let mut argv = vec!["weft", "agent"];
        argv.extend(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Agent(a) => a.validate().map_err(|e| e.to_string()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn agent_flags() {
        let c = agent(&[]).unwrap();
        assert_eq!(
            c.etcd.endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(c.etcd.prefix, "/coreos.com/network");
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.lease.ttl, Duration::from_secs(86400));
        assert_eq!(c.lease.renew_margin, Duration::from_secs(3600));
        assert!(!c.ip_masq && c.iptables_forward_rules && c.healthz.is_none());
        let c = agent(&[
            "--ip-masq",
            "--iface",
            "eth0",
            "--iface=10.0.0.1",
            "--subnet-lease-ttl",
            "30s",
            "--healthz-port",
            "8471",
        ])
        .unwrap();
        assert!(c.ip_masq);
        assert_eq!(c.iface.iface, ["eth0", "10.0.0.1"]);
        assert_eq!(c.lease.ttl, Duration::from_secs(30));
        assert_eq!(c.healthz, Some("0.0.0.0:8471".parse().unwrap()));
        assert!(agent(&["--ip-masq=false"]).map(|c| !c.ip_masq).unwrap());
        // Forward rules are flanneld's own switch, independent of --ip-masq.
        let c = agent(&["--iptables-forward-rules=false", "--ip-masq"]).unwrap();
        assert!(c.ip_masq && !c.iptables_forward_rules);
    }

    #[test]
    fn bad_flags_name_the_flag() {
        for (args, needle) in [
            (
                &["--subnet-lease-renew-margin", "0"][..],
                "--subnet-lease-renew-margin",
            ),
            (&["--subnet-lease-renew-margin", "1440"][..], "1 to 1439"),
            (&["--subnet-lease-ttl", "forever"][..], "--subnet-lease-ttl"),
            (&["--public-ip", "1.2.3"][..], "--public-ip"),
            (&["--iface-regex", "("][..], "--iface-regex"),
            (&["--etcd-endpoints", "127.0.0.1:2379"][..], "http://"),
            (
                &[
                    "--etcd-cafile",
                    "/proc/self/status",
                    "--etcd-endpoints",
                    "http://127.0.0.1:2379",
                ][..],
                "must be https://",
            ),
            (&["--etcd-prefix", "coreos.com"][..], "--etcd-prefix"),
            (
                &["--etcd-cafile", "/nonexistent/ca.pem"][..],
                "no such file",
            ),
            (&["--healthz-port", "70000"][..], "--healthz-port"),
            (&["--ip-masq=yes"][..], "true or false"),
            (&["--datapath", "xdp"][..], "invalid value"),
        ] {
            let e = agent(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
