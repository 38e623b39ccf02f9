//! `cargo xtask bench`: weft's datapaths measured against each other, or its control plane.
//!
//! Datapath benchmark: the harness's two hosts with one container each, in modes side by side
//! (bare: the hosts alone; host-gw, weft's kernel vxlan, weft's eBPF), every round measuring each
//! mode once in a freshly shuffled order, rounds added until the targets' intervals decide them.
//! Results: tables on the terminal, `<target>/bench/report.json`, `report.svg` (chart) and
//! `report.md` (the tables for README). `--family 6`: the same over IPv6 (a dual-stack network,
//! IPv6 containers, the hosts' IPv6 underlay addresses), into `report6.{json,svg,md}`. `--programs`: the eBPF programs' cost per packet.
//! `--control-plane`: sync time, peer programming latency, memory, idle CPU and etcd traffic with
//! N peers (`control-plane.json`).
//!
//! Builds the eBPF object and a release agent first. Needs root; everything it makes is removed
//! when it ends, also on Ctrl-C.

mod bpf;
mod chart;
mod control_plane;
mod counters;
mod datapath;
mod measure;
mod programs;
mod report;
mod stats;
mod targets;
mod topology;

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;

use self::measure::Test;
use self::topology::{Builds, Family, Mode};
use crate::test::{require_root, step, target_dir};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Rounds at least; each measures every mode once, in a freshly shuffled order.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Rounds at most: after --rounds, rounds are added while any target's 95 % interval still
    /// straddles it (inconclusive), up to this many.
    #[arg(long, default_value_t = 10)]
    pub max_rounds: usize,
    /// Also measure the eBPF programs' own cost per packet: run-time statistics (BPF_ENABLE_STATS)
    /// during a 64-byte UDP timing run after each round of the ebpf (and ebpf-base) bed, apart
    /// from the tests the metrics come from, and BPF_PROG_TEST_RUN timings on fixed packets.
    #[arg(long)]
    pub programs: bool,
    /// Seconds per test (TCP 1 stream, TCP 4 streams, TCP ping-pong, 64-byte UDP).
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Smoke test: 1 round of 1-second tests, no rounds added (and at most 20 new leases and a
    /// 5-second idle window with --control-plane).
    #[arg(long)]
    pub quick: bool,
    /// Address family of the datapath measurements: 4, or 6 for IPv6 containers on a dual-stack
    /// network (`EnableIPv6`) over the hosts' IPv6 underlay addresses; its results go to
    /// report6.{json,svg,md} and are judged against issue 14's IPv6 targets.
    #[arg(long, value_enum, default_value_t = Family::V4)]
    pub family: Family,
    /// Modes to measure (comma-separated). Not in the default set: veth-floor, ebpf-nocsum, ebpf-base.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Mode::ALL)]
    pub modes: Vec<Mode>,
    /// Tests each round runs (comma-separated, default all): tcp1 (with CPU per GB), tcp4, rr,
    /// udp64, host (the host-originated ones). A test left out leaves its metrics out of the
    /// report; a focused run (`--tests rr --rounds 30`) settles one metric in less time.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Test::ALL)]
    pub tests: Vec<Test>,
    /// The commit whose `weft agent --datapath ebpf` the ebpf-base mode runs: built in release
    /// with that commit's own eBPF object into `<target>/weft-base/target` on first use.
    /// `WEFT_BASE_BIN=/path` names an already built binary instead.
    #[arg(long, default_value = "96d6bbb")]
    pub baseline: String,
    /// Underlay offload variants: `both` measures each mode with the veth defaults and with TSO/GSO
    /// off on the underlay, in every round.
    #[arg(long, value_enum, default_value_t = Variants::Both)]
    pub offload: Variants,
    /// Program host-gw and flannel.1 with `ip` commands as flanneld would, instead of running weft
    /// (a reference, and a check of the bench itself; no ebpf mode).
    #[arg(long)]
    pub hand_routed: bool,
    /// TCP congestion control for every test's sockets (`net.ipv4.tcp_congestion_control` in the
    /// client and server namespaces of every mode), e.g. `cubic` or `bbr`; default: what new
    /// namespaces inherit from the machine. The report records what the tests used: verdicts
    /// can differ between the two (see README, "What limits the remaining gap").
    #[arg(long)]
    pub congestion_control: Option<String>,
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
    #[arg(long, value_delimiter = ',', default_value = "kernel,ebpf")]
    pub cp_datapaths: Vec<String>,
    /// Control plane: seconds the agent is left alone to measure its idle CPU and etcd traffic.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Where the results go; default `<target>/bench`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only redraw report.svg from the report.json in the output directory.
    #[arg(long)]
    pub replot: bool,
    /// Do not run `build-ebpf` first; use the eBPF object built earlier.
    #[arg(long)]
    pub skip_ebpf: bool,
    /// Do not build; use the release weft built earlier (or $WEFT_BIN).
    #[arg(long)]
    pub no_build: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variants {
    Both,
    On,
    Off,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("bench")?;
    let mut opts = opts.clone();
    if opts.quick {
        opts.rounds = 1;
        opts.max_rounds = 1;
        opts.seconds = 1;
        opts.new_leases = opts.new_leases.min(20);
        opts.idle_seconds = opts.idle_seconds.min(5);
    }
    if opts.out.is_none() {
        opts.out = Some(target_dir()?.join("bench"));
    }
    if opts.replot {
        return datapath::replot(&opts);
    }
    let bin = if opts.no_build {
        target_dir()?.join("release").join("weft")
    } else {
        build_release_weft(opts.skip_ebpf)?
    };
    if std::env::var_os("WEFT_BIN").is_none() {
        // Read by the harness when it starts the agents; set before any thread exists.
        std::env::set_var("WEFT_BIN", &bin);
    }
    let builds = Builds {
        current: weft_tests::weft_bin()?,
        base: if !opts.control_plane && !opts.hand_routed && opts.modes.contains(&Mode::EbpfBase) {
            Some(baseline_weft(&opts)?)
        } else {
            None
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            r = measure_all(&opts, &builds) => r,
            _ = tokio::signal::ctrl_c() => {
                Err(anyhow::anyhow!("interrupted; what the benchmark made is being removed"))
            }
        }
    })
}

/// The agent in release mode: the control-plane figures (memory, reaction time) are the ones an
/// operator would see.
fn build_release_weft(skip_ebpf: bool) -> anyhow::Result<PathBuf> {
    if !skip_ebpf {
        let xtask = std::env::current_exe().context("find the xtask binary")?;
        step(
            "build the eBPF object",
            Command::new(xtask).arg("build-ebpf"),
        )?;
    }
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build.args(["build", "--release", "--package", "weft", "--bin", "weft"]);
    step("build the weft binary (release)", &mut build)?;
    Ok(target_dir()?.join("release").join("weft"))
}

/// Names an already built weft binary for the ebpf-base mode instead of `--baseline`'s build.
pub const BASE_BIN_VAR: &str = "WEFT_BASE_BIN";

/// The ebpf-base mode's weft: `$WEFT_BASE_BIN`, else `--baseline` built in release (reused once
/// built; the integration tests' debug build of the previous layout lives apart, in weft-prev).
fn baseline_weft(opts: &Options) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(BASE_BIN_VAR) {
        let bin = PathBuf::from(bin);
        anyhow::ensure!(
            bin.is_file(),
            "{BASE_BIN_VAR}={} is not a file; build the baseline weft or unset {BASE_BIN_VAR}",
            bin.display()
        );
        return Ok(bin);
    }
    let build = weft_tests::prev_build::PrevBuild {
        rev: &opts.baseline,
        dir: "weft-base",
        release: true,
        bin_var: BASE_BIN_VAR,
    };
    println!(
        "==> the baseline weft ({}, release) for ebpf-base: {}",
        opts.baseline,
        build.bin().display()
    );
    let started = std::time::Instant::now();
    let bin = build
        .build()
        .with_context(|| format!("build the baseline weft {} for ebpf-base", opts.baseline))?;
    println!(
        "==> baseline ready after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

async fn measure_all(opts: &Options, builds: &Builds) -> anyhow::Result<()> {
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
            anyhow::bail!(
                "`{tool}` is not on PATH; install it (Debian: apt-get install {package})"
            );
        }
    }
    if opts.control_plane {
        control_plane::run(opts).await
    } else {
        datapath::run(opts, builds).await
    }
}

impl Options {
    /// The output directory (set by [`run`]).
    fn out_dir(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/bench"))
    }
}
