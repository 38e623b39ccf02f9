//! `cargo xtask demo`: a local demonstration cluster, left running to explore.
//!
//! Built on the test harness (`weft-tests`): an underlay switch with etcd, three hosts with two
//! containers each, `weft agent` on every host. The cluster is kept after this command exits and
//! recorded in a state file; `cargo xtask demo --down` removes it and checks that nothing is left.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use weft_tests::{netns, Cluster, ClusterOptions, Container, DockerContainer, Dockerd, Host, Kept};

/// Where the demo keeps its state file and its cluster's directory.
const STATE_DIR: &str = "/run/weft-demo";
/// Every namespace of the demo starts with this.
const NAME: &str = "weft-demo";
const HOSTS: usize = 3;
const CONTAINERS_PER_HOST: usize = 2;
const NETWORK: &str = "10.1.0.0/16";

#[derive(clap::Args)]
pub struct Options {
    /// Remove the demo cluster and check that nothing of it is left.
    #[arg(long)]
    pub down: bool,
    /// Datapath the agents use.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kernel", "ebpf"])]
    pub datapath: String,
    /// Backend in the network config.
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
    pub backend: String,
    /// Do not build; use the release binary built earlier (`cargo xtask install` builds it), or $WEFT_BIN.
    #[arg(long)]
    pub no_build: bool,
    /// Run a real dockerd per host, started from the agent's Docker options, and `docker run`
    /// containers instead of the harness's namespaces (the flanneld + Docker flow end to end).
    #[arg(long)]
    pub docker: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::test::require_root("demo")?;
    if opts.down {
        return down();
    }
    if let Some(what) = already_up() {
        // Checked before building: a second demo would fight the first over names and addresses.
        eprintln!(
            "A demo cluster is already up ({what}).\n\
             Explore it with the commands `cargo xtask demo` printed, or remove it with \
             `cargo xtask demo --down` and run `cargo xtask demo` again."
        );
        std::process::exit(1);
    }
    // The demo runs the binary users install: the release build of `cargo xtask install`.
    let bin = if opts.no_build {
        crate::test::target_dir()?.join("release").join("weft")
    } else {
        crate::packages::ensure()?;
        crate::install::build_release()?
    };
    if std::env::var_os("WEFT_BIN").is_none() {
        // Read by the harness when it starts the agents; set before any thread exists.
        std::env::set_var("WEFT_BIN", &bin);
    }
    let runtime = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    runtime.block_on(up(opts))
}

fn state_file() -> PathBuf {
    Path::new(STATE_DIR).join("state.json")
}

/// What the demo makes, known before it makes it, so `--down` can remove a half-built cluster too.
fn planned() -> Kept {
    let mut namespaces = vec![format!("{NAME}-sw")];
    for h in 1..=HOSTS {
        namespaces.push(format!("{NAME}-host{h}"));
        namespaces.extend((1..=CONTAINERS_PER_HOST).map(|c| format!("{NAME}-host{h}-c{c}")));
    }
    Kept {
        dir: Path::new(STATE_DIR).join("cluster"),
        namespaces,
        processes: Vec::new(),
    }
}

/// What is left of a demo that is up (or was half-built): its namespaces and state file.
fn already_up() -> Option<String> {
    let mut namespaces: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{NAME}-")))
        .collect();
    namespaces.sort();
    let mut what = Vec::new();
    if !namespaces.is_empty() {
        what.push(format!("namespaces {}", namespaces.join(" ")));
    }
    let state = state_file();
    if state.exists() {
        what.push(format!("state in {}", state.display()));
    }
    (!what.is_empty()).then(|| what.join("; "))
}

async fn up(opts: &Options) -> anyhow::Result<()> {
    let weft = weft_tests::weft_bin()?;
    planned().save(&state_file())?;
    let result = build(opts, &weft).await;
    if result.is_err() {
        // The cluster was dropped, and removed with it; the state file must go too.
        let _ = std::fs::remove_file(state_file());
        let _ = std::fs::remove_dir(STATE_DIR);
    }
    result
}

async fn build(opts: &Options, weft: &Path) -> anyhow::Result<()> {
    println!(
        "==> starting etcd on the underlay switch and {HOSTS} hosts (172.16.15.21-{})",
        20 + HOSTS
    );
    let mut cluster_opts = ClusterOptions::new(HOSTS);
    cluster_opts.name = Some(NAME.to_owned());
    cluster_opts.dir = Some(planned().dir);
    cluster_opts.detach = true;
    let c = Cluster::start(cluster_opts)
        .await
        .context("build the demo cluster")?;
    println!(
        "    etcd {} in namespace {}",
        c.etcd().endpoint(),
        c.switch().name()
    );

    let config = format!(
        r#"{{"Network":"{NETWORK}","Backend":{{"Type":"{}"}}}}"#,
        opts.backend
    );
    println!(
        "==> writing the network config to {}/config: {config}",
        c.prefix()
    );
    c.write_config(&config).await;

    println!(
        "==> starting `weft agent --datapath {}` on every host",
        opts.datapath
    );
    if opts.docker {
        // dockerd creates docker0 from the agent's options; the agent starts without one.
        for h in c.hosts() {
            weft_tests::docker::remove_simulated_bridge(h).await?;
        }
        c.start_agents(&["--datapath", &opts.datapath])?;
        return docker_demo(c, weft).await;
    }
    c.start_agents(&["--datapath", &opts.datapath])?;
    if let Err(e) = bring_up(&c).await {
        print_agent_logs(&c);
        println!("==> the demo failed; removing what it made");
        return Err(e);
    }

    println!("==> datapath in use");
    for h in c.hosts() {
        println!("    {:<16} {}", h.name(), datapath(h, weft).await);
    }
    ping_matrix("", 10, &c.containers().iter().collect::<Vec<_>>()).await;
    throughput(&c).await;
    counters(&c, weft).await;

    let commands = explore_commands(&c, weft);
    let kept = c.keep();
    kept.save(&state_file())?;
    println!();
    println!(
        "The demo cluster stays up ({} namespaces, {} processes; state in {}). Explore it:",
        kept.namespaces.len(),
        kept.processes.len(),
        state_file().display()
    );
    for cmd in commands {
        println!("  {cmd}");
    }
    println!("Remove it: cargo xtask demo --down");
    Ok(())
}

/// Wait for every subnet, then add the containers.
async fn bring_up(c: &Cluster) -> anyhow::Result<()> {
    println!("==> waiting for each host's subnet lease");
    for h in c.hosts() {
        let env = h.wait_subnet(weft_tests::cluster::SUBNET_TIMEOUT).await?;
        println!(
            "    {:<16} ens32 {:<13} subnet {:<14} docker0 {} mtu {}",
            h.name(),
            h.ens32_ip(),
            env.subnet.trunc(),
            env.subnet,
            env.mtu
        );
    }
    println!("==> adding {CONTAINERS_PER_HOST} containers per host on docker0");
    c.add_containers(CONTAINERS_PER_HOST).await?;
    for ct in c.containers() {
        println!("    {:<19} {}", ct.netns(), ct.ip());
    }
    let (first, last) = (c.container(0), c.container(c.containers().len() - 1));
    first
        .ping_until(last.ip(), Duration::from_secs(20))
        .await
        .context("containers on different hosts cannot reach each other")?;
    Ok(())
}

fn print_agent_logs(c: &Cluster) {
    for h in c.hosts() {
        if let Some(agent) = h.agent() {
            let log = agent.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            println!(
                "----- {} agent log (last lines of {}) -----",
                h.name(),
                agent.log_path().display()
            );
            for line in tail.iter().rev() {
                println!("{line}");
            }
        }
    }
}

/// `weft status --json` in a host, for its agent's pin directory.
async fn status(h: &Host, weft: &Path) -> anyhow::Result<serde_json::Value> {
    let pin_dir = h.bpf_pin_dir().display().to_string();
    let argv = [
        &weft.display().to_string(),
        "status",
        "--json",
        "--bpf-pin-dir",
        &pin_dir,
    ];
    let out = h.exec_ok(&argv).await?;
    serde_json::from_str(&out).context("parse weft status --json")
}

/// The datapath a host's agent uses and where its programs are attached, from `weft status`.
async fn datapath(h: &Host, weft: &Path) -> String {
    match status(h, weft).await {
        Ok(st) => {
            let attached: Vec<String> = st["programs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["state"] == "attached")
                .map(|p| {
                    format!(
                        "{} on {} ({})",
                        p["program"].as_str().unwrap_or("?"),
                        p["interface"].as_str().unwrap_or("?"),
                        p["hook"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            match st["mode"].as_str() {
                Some("ebpf") => format!("ebpf: {}", attached.join(", ")),
                Some(mode) => format!("{mode}: flannel.1, as flanneld programs it"),
                None => "unknown (weft status gave no mode)".to_owned(),
            }
        }
        Err(e) => format!("unknown: {e:#}"),
    }
}

/// Per host: packets the eBPF programs encapsulated and decapsulated, and what flannel.1 (the
/// kernel path) carried, so it is plain which path the demo's traffic took.
async fn counters(c: &Cluster, weft: &Path) {
    println!("==> which path carried the traffic (packets since the agents started)");
    println!(
        "    {:<16} {:>12} {:>12} {:>14} {:>14}",
        "host", "eBPF encap", "eBPF decap", "flannel.1 tx", "flannel.1 rx"
    );
    for h in c.hosts() {
        let counter = |st: &serde_json::Value, name: &str| -> u64 {
            st["counters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == name)
                .and_then(|x| x["value"].as_u64())
                .unwrap_or(0)
        };
        let (encap, decap) = match status(h, weft).await {
            Ok(st) => (counter(&st, "encapsulated"), counter(&st, "decapsulated")),
            Err(_) => (0, 0),
        };
        let link = h
            .exec_ok(&["ip", "-s", "-j", "link", "show", "flannel.1"])
            .await
            .ok();
        let stats: serde_json::Value = link
            .and_then(|l| serde_json::from_str(&l).ok())
            .unwrap_or_default();
        let (tx, rx) = (
            stats[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0),
            stats[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0),
        );
        println!(
            "    {:<16} {encap:>12} {decap:>12} {tx:>14} {rx:>14}",
            h.name()
        );
    }
}

/// A container in the ping matrix: its column label, its address, and one ping's round-trip time.
trait Pinging {
    fn label(&self) -> String;
    fn ip(&self) -> Ipv4Addr;
    async fn rtt(&self, to: Ipv4Addr) -> Option<f64>;
}

impl Pinging for Container {
    fn label(&self) -> String {
        self.netns()
            .trim_start_matches(&format!("{NAME}-"))
            .to_owned()
    }

    fn ip(&self) -> Ipv4Addr {
        Container::ip(self)
    }

    /// Two tries.
    async fn rtt(&self, to: Ipv4Addr) -> Option<f64> {
        for _ in 0..2 {
            let out = self.exec(&ping_once(&to.to_string())).await;
            if out.status.success() {
                return ping_rtt(&String::from_utf8_lossy(&out.stdout));
            }
        }
        None
    }
}

impl Pinging for DockerContainer {
    fn label(&self) -> String {
        self.name().to_owned()
    }

    fn ip(&self) -> Ipv4Addr {
        DockerContainer::ip(self)
    }

    async fn rtt(&self, to: Ipv4Addr) -> Option<f64> {
        let out = self.exec(&ping_once(&to.to_string())).await;
        out.ok().as_deref().and_then(ping_rtt)
    }
}

/// One ping to `to`, waiting 2 s for the reply.
fn ping_once(to: &str) -> [&str; 7] {
    ["ping", "-n", "-c", "1", "-W", "2", to]
}

/// Ping every container from every other one; round-trip times in ms, in columns `width` wide.
async fn ping_matrix<P: Pinging>(title: &str, width: usize, all: &[&P]) {
    println!("==> ping matrix{title} (round-trip ms; rows ping columns)");
    let label_width = width - 2;
    print!("    {:<label_width$}", "");
    for to in all {
        print!("{:>width$}", to.label());
    }
    println!();
    let (mut ok, mut failed) = (0, 0);
    for from in all {
        print!("    {:<label_width$}", from.label());
        for to in all {
            let cell = if from.ip() == to.ip() {
                "-".to_owned()
            } else {
                match from.rtt(to.ip()).await {
                    Some(ms) => {
                        ok += 1;
                        format!("{ms:.3}")
                    }
                    None => {
                        failed += 1;
                        "FAIL".to_owned()
                    }
                }
            };
            print!("{cell:>width$}");
        }
        println!();
    }
    println!("    {ok} of {} pairs answer", ok + failed);
}

/// The round-trip time of ping's first reply line (`time=0.123 ms`), in ms.
fn ping_rtt(text: &str) -> Option<f64> {
    text.split("time=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .trim_end_matches("ms")
        .parse()
        .ok()
}

/// A 3-second iperf3 TCP run between containers on the first and the last host.
async fn throughput(c: &Cluster) {
    let all = c.containers();
    let (client, server) = (&all[0], &all[all.len() - CONTAINERS_PER_HOST]);
    println!(
        "==> throughput, iperf3 TCP for 3 s: {} -> {}",
        client.netns(),
        server.netns()
    );
    match iperf3(client, server).await {
        Ok(bps) => println!("    {:.2} Gbit/s", bps / 1e9),
        Err(e) => println!("    no figure: {e:#}"),
    }
}

async fn iperf3(client: &Container, server: &Container) -> anyhow::Result<f64> {
    let ip = server.ip().to_string();
    let mut srv = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            server.netns(),
            "iperf3",
            "-s",
            "-1",
            "-B",
            &ip,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start iperf3 -s (apt-get install iperf3)")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let result = loop {
        let out = client.exec(&["iperf3", "-c", &ip, "-t", "3", "-J"]).await;
        // iperf3 3.12 exits 0 when it cannot connect; only its JSON's "error" says so.
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let error = json["error"].as_str().map(str::to_owned);
        if out.status.success() && error.is_none() {
            break json["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("iperf3 reported no end.sum_received.bits_per_second");
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "iperf3 -c {ip} failed: {}",
                error.unwrap_or_else(|| String::from_utf8_lossy(&out.stdout).into_owned())
            ));
        }
        // The server may not listen yet.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = srv.kill().await;
    result
}

/// Copy-paste commands that explore the cluster, with its real names and addresses.
fn explore_commands(c: &Cluster, weft: &Path) -> Vec<String> {
    let weft = weft.display();
    let (h1, h3) = (c.host(0), c.host(c.hosts().len() - 1));
    let (from, to) = (c.container(0), &h3.containers()[0]);
    let etcd = c.etcd().endpoint();
    vec![
        format!("ip netns exec {} ping -c 3 {}", from.netns(), to.ip()),
        format!(
            "ip netns exec {} {weft} leases --etcd-endpoints {etcd}",
            h1.name()
        ),
        format!(
            "ip netns exec {} {weft} status --bpf-pin-dir {}",
            h1.name(),
            h1.bpf_pin_dir().display()
        ),
        format!("ip netns exec {} ip -d link show flannel.1", h1.name()),
        format!("ip netns exec {} ip route", h1.name()),
        format!("ip netns exec {} bridge fdb show dev flannel.1", h1.name()),
        format!(
            "ip netns exec {} tcpdump -ni ens32 udp port 8472",
            h3.name()
        ),
        format!(
            "ip netns exec {} iperf3 -s -D; ip netns exec {} iperf3 -c {}",
            to.netns(),
            from.netns(),
            to.ip()
        ),
        format!("less {}", h1.dir().join("agent.log").display()),
    ]
}

/// Remove the demo cluster from its state file (plus any `weft-demo-*` namespace) and verify.
fn down() -> anyhow::Result<()> {
    let path = state_file();
    let mut kept = if path.exists() {
        Kept::load(&path)?
    } else {
        planned()
    };
    for name in netns::list() {
        if name.starts_with(&format!("{NAME}-")) && !kept.namespaces.contains(&name) {
            kept.namespaces.push(name);
        }
    }
    let present = netns::list();
    let namespaces = kept
        .namespaces
        .iter()
        .filter(|n| present.contains(n))
        .count();
    let processes = kept.processes.iter().filter(|p| p.alive()).count();
    println!(
        "==> removing the demo cluster: {namespaces} namespaces, {processes} processes, {}",
        kept.dir.display()
    );
    // dockerds first: their containers' cgroups and mounts are outside the namespaces.
    for h in 1..=HOSTS {
        let host = format!("{NAME}-host{h}");
        weft_tests::docker::stop_kept(&host, &kept.dir.join(format!("host{h}")));
    }
    kept.remove()?;
    if path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    }
    // The state directory only ever holds what the demo wrote.
    let _ = std::fs::remove_dir(STATE_DIR);
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(NAME))
        .collect();
    anyhow::ensure!(
        left.is_empty(),
        "namespaces still present after removal: {left:?}"
    );
    println!("    nothing left: no {NAME}-* namespace, no demo process, no {STATE_DIR}");
    Ok(())
}

/// `--docker`: a dockerd per host from the agent's options file, `docker run` containers, the ping
/// matrix between them, which path carried it, and docker commands to explore.
async fn docker_demo(c: Cluster, weft: &Path) -> anyhow::Result<()> {
    let mut dockerds = Vec::new();
    let mut containers = Vec::new();
    let result = async {
        for h in c.hosts() {
            let env = weft_tests::docker::subnet_env(h).await?;
            let d = Dockerd::start_with(h, true).await?;
            println!(
                "==> {}: dockerd {} (from {})",
                h.name(),
                d.network_opts()?.join(" "),
                h.docker_opts_file().display()
            );
            for k in 1..=CONTAINERS_PER_HOST {
                let name = format!("h{}c{k}", h.index() + 1);
                let ct = d.run(&name).await?;
                println!(
                    "    docker run {name}: {} in {}",
                    ct.ip(),
                    env.subnet.trunc()
                );
                containers.push((h.index(), ct));
            }
            dockerds.push(d);
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        print_agent_logs(&c);
        println!("==> the demo failed; removing what it made");
        return Err(e);
    }
    println!("==> datapath in use");
    for h in c.hosts() {
        println!("    {:<16} {}", h.name(), datapath(h, weft).await);
    }
    let dockers: Vec<&DockerContainer> = containers.iter().map(|(_, d)| d).collect();
    ping_matrix(" between Docker containers", 8, &dockers).await;
    counters(&c, weft).await;

    let (d1, (_, from), (_, to)) = (
        &dockerds[0],
        &containers[0],
        &containers[containers.len() - 1],
    );
    let socket = d1.socket();
    let commands = [
        format!("docker -H {socket} ps"),
        format!("docker -H {socket} exec -it {} sh", from.name()),
        format!(
            "docker -H {socket} exec {} ping -c 3 {}",
            from.name(),
            to.ip()
        ),
        format!("docker -H {socket} network inspect bridge"),
        format!("cat {}", c.host(0).docker_opts_file().display()),
        format!(
            "ip netns exec {} iptables-save | grep -e FLANNEL -e DOCKER",
            c.host(0).name()
        ),
        format!(
            "ip netns exec {} nft list table ip weft-nonat",
            c.host(0).name()
        ),
        format!(
            "ip netns exec {} {} status --bpf-pin-dir {}",
            c.host(0).name(),
            weft.display(),
            c.host(0).bpf_pin_dir().display()
        ),
    ];
    let mut kept = c.keep();
    for d in &dockerds {
        d.keep();
        kept.processes
            .extend(d.pid().and_then(weft_tests::KeptProcess::of));
    }
    kept.save(&state_file())?;
    println!();
    println!(
        "The demo cluster stays up with a dockerd per host (state in {}). Explore it:",
        state_file().display()
    );
    for cmd in commands {
        println!("  {cmd}");
    }
    println!("Remove it (dockerds, their mounts, cgroups and state too): cargo xtask demo --down");
    Ok(())
}
