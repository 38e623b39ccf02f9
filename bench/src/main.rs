//! `weft-bench`: what `cargo xtask bench` runs once the eBPF object and the agent are built.
//!
//! Datapath benchmark: two hosts with one container each, in three modes side by side (host-gw,
//! weft's kernel vxlan, weft's eBPF), alternating mode by mode in a shuffled order every round.
//! `--control-plane`: peer programming latency, start-to-ready and memory with 1000 peers.
//!
//! Needs root (namespaces, veths, the agent). Everything it makes is removed when it ends.

mod chart;
mod control_plane;
mod counters;
mod datapath;
mod measure;
mod report;
mod stats;
mod topology;

use std::path::PathBuf;

use clap::Parser;

use crate::topology::Mode;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask bench",
    about = "Benchmark weft's datapaths (host-gw, kernel vxlan, eBPF) or its control plane"
)]
pub struct Options {
    /// Rounds; each measures every mode once, in a freshly shuffled order.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per test (TCP 1 stream, TCP 4 streams, TCP ping-pong, 64-byte UDP).
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Smoke test: 1 round of 1-second tests.
    #[arg(long)]
    pub quick: bool,
    /// Modes to measure (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::ALL)]
    pub modes: Vec<Mode>,
    /// Underlay offload variants: `both` measures each mode with the veth defaults and with TSO/GSO
    /// off on the underlay in every round.
    #[arg(long, value_enum, default_value_t = Variants::Both)]
    pub offload: Variants,
    /// Program host-gw and flannel.1 with `ip` commands as flanneld would, instead of running weft
    /// (a reference, and a check of the bench itself; no ebpf mode).
    #[arg(long)]
    pub hand_routed: bool,
    /// Run the control-plane benchmark instead.
    #[arg(long)]
    pub control_plane: bool,
    /// Control plane: peer leases in etcd before the agent starts.
    #[arg(long, default_value_t = 1000)]
    pub peers: usize,
    /// Control plane: new leases timed one by one after the agent is ready.
    #[arg(long, default_value_t = 50)]
    pub new_leases: usize,
    /// Control plane: agent datapaths to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "kernel")]
    pub cp_datapaths: Vec<String>,
    /// Where report.json, report.svg and control-plane.json go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variants {
    Both,
    On,
    Off,
}

fn main() -> std::process::ExitCode {
    let mut opts = Options::parse();
    if opts.quick {
        opts.rounds = 1;
        opts.seconds = 1;
        opts.new_leases = opts.new_leases.min(20);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(&opts) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; everything made was removed")),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(opts: &Options) -> anyhow::Result<()> {
    require_root()?;
    for (tool, package) in [
        ("iperf3", "iperf3"),
        ("sockperf", "sockperf"),
        ("ethtool", "ethtool"),
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
    ] {
        if weft_tests::netns::run("sh", &["-c", &format!("command -v {tool}")])
            .await
            .is_err()
        {
            anyhow::bail!("`{tool}` is not on PATH; install it (Debian: apt-get install {package})");
        }
    }
    if opts.control_plane {
        control_plane::run(opts).await
    } else {
        datapath::run(opts).await
    }
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no memory effects.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        anyhow::bail!(
            "the benchmark must run as root (effective uid {euid}): it creates network namespaces and \
             runs the agent; use a root shell or `sudo -E env \"PATH=$PATH\" cargo xtask bench`"
        );
    }
    Ok(())
}
