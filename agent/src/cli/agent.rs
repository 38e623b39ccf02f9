//! `weft agent`: its flags, and the runtime wiring around [`crate::agent::run`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use regex::Regex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::etcd::EtcdArgs;
use super::status::default_pin_dir;
use super::{args, exit, fail, runtime, subnet_exit, UsageError};
use crate::agent::{self, AgentConfig, AgentError, Datapath};
use crate::datapath::DecapHook;
use crate::health::HealthServer;
use crate::iface::IfaceChoice;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::subnet::LeaseTiming;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DecapChoice {
    Auto,
    Xdp,
    Tc,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Interface (name or IP) for overlay traffic; repeat for fallbacks, first match wins.
    #[arg(long, env = "WEFT_IFACE", value_delimiter = ',')]
    iface: Vec<String>,
    /// Regex matched against interface IPs, then names; repeatable.
    #[arg(long, env = "WEFT_IFACE_REGEX", value_delimiter = ',', value_parser = args::regex)]
    iface_regex: Vec<Regex>,
    /// IP to advertise to peers (default: the interface's).
    #[arg(long, env = "WEFT_PUBLIC_IP", value_parser = args::ipv4)]
    public_ip: Option<Ipv4Addr>,
    /// IPv6 address to advertise to peers when IPv6 is enabled (default: the interface's first
    /// global IPv6 address).
    #[arg(long, env = "WEFT_PUBLIC_IPV6", value_parser = args::ipv6)]
    public_ipv6: Option<Ipv6Addr>,
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
    #[arg(long, env = "WEFT_SUBNET_LEASE_RENEW_MARGIN", default_value = "60", value_parser = args::renew_margin)]
    subnet_lease_renew_margin: Duration,
    /// Lease TTL, e.g. 30s, 5m, 24h.
    #[arg(long, env = "WEFT_SUBNET_LEASE_TTL", default_value = "24h", value_parser = args::duration_at_least(Duration::from_secs(2)))]
    subnet_lease_ttl: Duration,
    /// Masquerade traffic leaving the overlay.
    #[arg(long, env = "WEFT_IP_MASQ", num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set, value_parser = args::boolean)]
    ip_masq: bool,
    /// Seconds between checks of the masquerade and forward rules.
    #[arg(long, env = "WEFT_IPTABLES_RESYNC", default_value = "5", value_parser = args::resync_secs)]
    iptables_resync: Duration,
    /// Accept overlay traffic in FORWARD (flanneld's FLANNEL-FWD chain), with or without --ip-masq,
    /// so a container that has not sent yet is reachable where Docker set the policy to DROP.
    #[arg(long, env = "WEFT_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_missing_value = "true", default_value = "true", action = clap::ArgAction::Set, value_parser = args::boolean)]
    iptables_forward_rules: bool,
    /// Address for /healthz and /readyz.
    #[arg(long, env = "WEFT_HEALTHZ_IP", default_value = "0.0.0.0", value_parser = args::ip)]
    healthz_ip: IpAddr,
    /// Port for /healthz and /readyz; 0 disables them.
    #[arg(long, env = "WEFT_HEALTHZ_PORT", default_value = "0", value_parser = args::port)]
    healthz_port: u16,
    /// Datapath: eBPF, the kernel vxlan device, or eBPF when available.
    #[arg(long, env = "WEFT_DATAPATH", value_enum, default_value = "auto")]
    datapath: Datapath,
    /// Docker bridge the containers hang off.
    #[arg(long, env = "WEFT_BRIDGE", default_value = "docker0", value_parser = args::ifname)]
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
    #[arg(long, env = "WEFT_EBPF_UDP_CSUM", num_args = 0..=1, default_missing_value = "true", default_value = "true", action = clap::ArgAction::Set, value_parser = args::boolean)]
    ebpf_udp_csum: bool,
    /// Have the eBPF programs log each packet they drop, why, and its addresses (debug
    /// level, target weft::ebpf; RUST_LOG=debug does too). Off, the programs carry no log code.
    #[arg(long, env = "WEFT_EBPF_LOG", num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set, value_parser = args::boolean)]
    pub ebpf_log: bool,
    /// Detach and unpin weft's eBPF programs and maps, remove the headroom device from the
    /// bridge, then exit. flannel.<VNI> and its routes stay, so traffic keeps flowing on the
    /// kernel path.
    #[arg(long)]
    cleanup: bool,
    /// How often to compare kernel state with the peer set, e.g. 10s.
    #[arg(long, env = "WEFT_RECONCILE_INTERVAL", default_value = "10s", value_parser = args::duration_at_least(Duration::from_millis(100)))]
    reconcile_interval: Duration,
    /// How long SIGTERM/SIGINT waits for tasks to stop, e.g. 5s.
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE", default_value = "5s", value_parser = args::duration_at_least(Duration::ZERO))]
    shutdown_grace: Duration,
}

impl AgentArgs {
    /// Assemble the agent's config; every value was parsed by clap, only cross-flag checks remain.
    pub fn validate(&self) -> Result<AgentConfig, UsageError> {
        Ok(AgentConfig {
            etcd: self.etcd.validate()?,
            iface: IfaceChoice {
                iface: self.iface.clone(),
                iface_regex: self.iface_regex.clone(),
                public_ip: self.public_ip,
                public_ipv6: self.public_ipv6,
            },
            subnet_file: self.subnet_file.clone(),
            docker_opts_file: self.docker_opts_file.clone(),
            lease: LeaseTiming {
                ttl: self.subnet_lease_ttl,
                renew_margin: self.subnet_lease_renew_margin,
            },
            ip_masq: self.ip_masq,
            iptables_resync: self.iptables_resync,
            iptables_forward_rules: self.iptables_forward_rules,
            healthz: (self.healthz_port != 0)
                .then_some(SocketAddr::new(self.healthz_ip, self.healthz_port)),
            datapath: self.datapath,
            bridge: self.bridge.clone(),
            bpf_pin_dir: match &self.bpf_pin_dir {
                Some(dir) => dir.clone(),
                None => default_pin_dir().map_err(|e| {
                    UsageError::new("bpf-pin-dir", "", format!("{e}; pass --bpf-pin-dir"))
                })?,
            },
            decap_hook: match self.decap_hook {
                DecapChoice::Auto => None,
                DecapChoice::Xdp => Some(DecapHook::Xdp),
                DecapChoice::Tc => Some(DecapHook::Tc),
            },
            ebpf_udp_csum: self.ebpf_udp_csum,
            reconcile_interval: self.reconcile_interval,
            shutdown_grace: self.shutdown_grace,
        })
    }
}

pub fn run(args: &AgentArgs) -> ExitCode {
    match args.validate() {
        Ok(cfg) if args.cleanup => cleanup(&cfg),
        Ok(cfg) => run_agent(cfg),
        Err(e) => fail(exit::USAGE, e),
    }
}

fn cleanup(cfg: &AgentConfig) -> ExitCode {
    let mut errors: Vec<String> = match crate::backend::ebpf::cleanup(&cfg.bpf_pin_dir) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    let headroom = runtime()
        .map_err(|e| format!("start the async runtime: {e}"))
        .and_then(|rt| {
            rt.block_on(crate::backend::ebpf::remove_headroom_device())
                .map_err(|e| e.to_string())
        });
    if let Err(e) = headroom {
        errors.push(e);
    }
    if errors.is_empty() {
        println!(
            "removed weft's eBPF programs, links and maps under {} and its headroom device; flannel.<VNI> and its routes stay (traffic continues on the kernel path)",
            cfg.bpf_pin_dir.display()
        );
        return ExitCode::SUCCESS;
    }
    for e in &errors {
        eprintln!("weft: cleanup: {e}");
    }
    ExitCode::from(exit::OTHER)
}

/// Cancel `shutdown` on SIGTERM or SIGINT, telling systemd we are stopping.
async fn on_signal(shutdown: CancellationToken, notifier: Notifier) {
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
        _ = shutdown.cancelled() => return,
    }
    if let Err(e) = notifier.stopping("stopping: lease and datapath stay for the next start") {
        tracing::warn!("sd_notify: {e}");
    }
    shutdown.cancel();
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
        let sig_task = tokio::spawn(on_signal(shutdown.clone(), notifier.clone()));
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
            Err(e) => fail(agent_exit(&e), e),
        }
    })
}

fn agent_exit(e: &AgentError) -> u8 {
    match e {
        AgentError::Config { .. } | AgentError::Iface(_) => exit::CONFIG,
        AgentError::Subnet(s) => subnet_exit(s),
        AgentError::Files(_)
        | AgentError::Backend(_)
        | AgentError::Masq(_)
        | AgentError::ConfigChanged { .. } => exit::OTHER,
    }
}
