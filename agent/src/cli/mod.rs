//! Command line: clap derive, every flag also from the environment.
//!
//! Flags are read as `--flag`, else `WEFT_<FLAG>`, else flanneld's `FLANNELD_<FLAG>` (so
//! existing units keep working). Each value is parsed into its type by clap ([`args`]), so a bad
//! one exits 64 before tokio starts; one module per subcommand holds its flags and its run.

mod agent;
pub mod args;
mod config;
mod docker_opts;
mod etcd;
mod leases;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::subnet::{EtcdOptions, EtcdStore, SubnetError};

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
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (flanneld's replacement).
    #[command(after_help = EXIT_CODES)]
    Agent(Box<agent::AgentArgs>),
    /// Read or write the network config at <prefix>/config.
    #[command(subcommand, after_help = EXIT_CODES)]
    Config(config::ConfigCmd),
    /// List subnet leases: subnet, public IP, VTEP MAC, backend, time to expiry.
    #[command(after_help = EXIT_CODES)]
    Leases(leases::LeasesArgs),
    /// Write Docker daemon options derived from the subnet file, as mk-docker-opts.sh does.
    #[command(after_help = EXIT_CODES)]
    DockerOpts(docker_opts::DockerOptsArgs),
    /// Show the datapath of this host (run it in the agent's network namespace):
    /// mode, attached programs, map entries, counters.
    #[command(after_help = EXIT_CODES)]
    Status(status::StatusArgs),
}

/// A combination of flags that does not work together (exit 64). Single values are checked by clap.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {value:?}: {reason}")]
pub struct UsageError {
    flag: &'static str,
    value: String,
    reason: String,
}

impl UsageError {
    fn new(flag: &'static str, value: &str, reason: impl ToString) -> Self {
        Self {
            flag,
            value: value.to_string(),
            reason: reason.to_string(),
        }
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

fn init_logging(format: LogFormat, ebpf_log: bool) -> Result<(), crate::telemetry::TelemetryError> {
    let format = match format {
        LogFormat::Text => crate::telemetry::LogFormat::Text,
        LogFormat::Json => crate::telemetry::LogFormat::Json,
    };
    crate::telemetry::init(format, ebpf_log)
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
    let ebpf_log = matches!(&cli.command, Command::Agent(a) if a.ebpf_log);
    if let Err(e) = init_logging(cli.log_format, ebpf_log) {
        return fail(exit::USAGE, e);
    }
    match cli.command {
        Command::Agent(args) => agent::run(&args),
        Command::Status(a) => status::run(a),
        Command::Config(cmd) => config::run(cmd),
        Command::Leases(a) => match a.etcd.validate() {
            Err(e) => fail(exit::USAGE, e),
            Ok(opts) => with_store(
                &opts,
                |store| async move { leases::print(&store, a.json).await },
            ),
        },
        Command::DockerOpts(a) => docker_opts::run(&a),
    }
}

/// Connect to etcd, run `f`, and exit with its code, or with the code of the etcd error.
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::agent::AgentConfig;

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
    fn ebpf_log_is_off_unless_asked_for() {
        let ebpf_log = |args: &[&str]| {
            let argv = ["weft", "agent"].iter().chain(args).copied();
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Agent(a) => a.ebpf_log,
                _ => unreachable!(),
            }
        };
        assert!(!ebpf_log(&[]));
        assert!(ebpf_log(&["--ebpf-log"]));
        assert!(!ebpf_log(&["--ebpf-log=false"]));
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
            (
                &["--bridge", "a-very-long-bridge"][..],
                "1 to 15 characters",
            ),
            (&["--reconcile-interval", "50ms"][..], "at least 100ms"),
            (&["--iptables-resync", "0"][..], "--iptables-resync"),
            (&["--etcd-username", "u"][..], "go together"),
        ] {
            let e = agent(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }
}
