//! A simulated cluster: an underlay switch namespace with a bridge and a real etcd, N host
//! namespaces on it (`ens32` = 172.16.15.21, .22, ...), each with a `docker0` bridge, and container
//! namespaces on docker0 addressed from the host's leased subnet.
//!
//! ```text
//!  switch ns: br0 172.16.15.1/24, etcd on 172.16.15.1:2379
//!     |-- port-h1 <veth> ens32 172.16.15.21/24  host1 ns: docker0 <veth> eth0 (host1-c1, host1-c2 ...)
//!     |-- port-h2 <veth> ens32 172.16.15.22/24  host2 ns: ...
//! ```
//!
//! The test process never joins these networks: it configures them with `ip -n`, runs commands in
//! them with `ip netns exec`, and talks to the cluster's etcd with `etcdctl` inside the switch.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash as _, Hasher as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use ipnet::Ipv4Net;

use crate::agent::Agent;
use crate::container::Container;
use crate::etcd::Etcd;
use crate::keep::{Kept, KeptProcess};
use crate::netns::{self, Netns};
use crate::tail;

/// The underlay: the CoreOS example's 172.16.15.0/24.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 15, 1);
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
/// Host i (0-based) gets 172.16.15.(21 + i).
pub const FIRST_HOST_OCTET: u8 = 21;
/// flanneld's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// How long `add_container` waits for the agent to write the subnet file.
pub const SUBNET_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// How to build a cluster; `ClusterOptions::new(3)` is what [`cluster`] uses.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of host namespaces.
    pub hosts: usize,
    /// Prefix of every namespace name; default `weft-<pid>-<counter>`, unique per test.
    pub name: Option<String>,
    /// Directory for logs, subnet files and etcd data; default a fresh temp dir. Removed on drop.
    pub dir: Option<PathBuf>,
    /// etcd prefix the agents use.
    pub prefix: String,
    /// Run etcd and the agents in their own process groups so they outlive the terminal (for a
    /// cluster that will be kept); tests leave this off so Ctrl-C stops everything.
    pub detach: bool,
}

impl ClusterOptions {
    pub fn new(hosts: usize) -> Self {
        ClusterOptions {
            hosts,
            name: None,
            dir: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            detach: false,
        }
    }
}

/// `n` hosts on an underlay with a running etcd; no agents, no containers yet.
/// Panics with the reason when the cluster cannot be built.
pub async fn cluster(n: usize) -> Cluster {
    Cluster::start(ClusterOptions::new(n))
        .await
        .unwrap_or_else(|e| panic!("build a {n}-host test cluster: {e:#}"))
}

/// The whole simulated cluster. Dropped = agents, containers, hosts, etcd, switch and the
/// directory removed, in that order (also while a test panics).
pub struct Cluster {
    // Drop order is field order: hosts (agents, containers) before etcd, etcd before its switch.
    hosts: Vec<Host>,
    etcd: Etcd,
    switch: Netns,
    dir: ClusterDir,
    name: String,
    prefix: String,
}

impl Cluster {
    /// Build the switch, start etcd on the underlay, and create the hosts.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        sweep_stale();
        let name = opts.name.clone().unwrap_or_else(|| {
            format!(
                "weft-{}-{}",
                std::process::id(),
                NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
            )
        });
        let dir = ClusterDir::create(opts.dir.clone(), &name)?;
        let switch = Netns::create(&format!("{name}-sw")).await?;
        switch.ip(&["link", "add", "br0", "type", "bridge"]).await?;
        // A bridge without an address of its own takes its lowest port MAC and changes it when
        // that port goes: every host's ARP entry for etcd would then point nowhere for seconds
        // after a host is removed. A fixed MAC keeps etcd reachable.
        switch
            .ip(&["link", "set", "br0", "address", "02:77:65:66:74:01"])
            .await?;
        let gw = format!("{UNDERLAY_GATEWAY}/{UNDERLAY_PREFIX_LEN}");
        switch.ip(&["addr", "add", &gw, "dev", "br0"]).await?;
        switch.ip(&["link", "set", "br0", "up"]).await?;
        let etcd = Etcd::start_in_netns(
            switch.name(),
            UNDERLAY_GATEWAY,
            Some(dir.path().join("etcd")),
            opts.detach,
        )
        .await
        .context("start etcd on the underlay")?;
        let mut hosts = Vec::with_capacity(opts.hosts);
        for index in 0..opts.hosts {
            let host = Host::create(&name, index, &switch, dir.path(), &etcd.endpoint(), &opts)
                .await
                .with_context(|| format!("create host {}", index + 1))?;
            hosts.push(host);
        }
        Ok(Cluster {
            hosts,
            etcd,
            switch,
            dir,
            name,
            prefix: opts.prefix,
        })
    }

    /// The name every namespace of this cluster starts with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Logs, subnet files and etcd data live here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The switch namespace (underlay bridge `br0` and etcd).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Host `i`, 0-based (`host(0)` is `<name>-host1` with ens32 172.16.15.21).
    pub fn host(&self, i: usize) -> &Host {
        self.hosts
            .get(i)
            .unwrap_or_else(|| panic!("host({i}): the cluster has {} hosts", self.hosts.len()))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Container `i` counting host by host: with two per host, 0 and 1 are on host(0), 2 and 3 on host(1).
    pub fn container(&self, i: usize) -> Container {
        let all = self.containers();
        all.get(i)
            .cloned()
            .unwrap_or_else(|| panic!("container({i}): the cluster has {} containers", all.len()))
    }

    /// Every container, host by host.
    pub fn containers(&self) -> Vec<Container> {
        self.hosts.iter().flat_map(Host::containers).collect()
    }

    /// The cluster's etcd (on the underlay; its helpers run `etcdctl` inside the switch namespace).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The cluster's etcd, to kill and start it again ([`Etcd::kill`], [`Etcd::start_again`]).
    pub fn etcd_mut(&mut self) -> &mut Etcd {
        &mut self.etcd
    }

    /// The etcd prefix the agents use (default `/coreos.com/network`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Write the network config, e.g. `{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}`,
    /// to `<prefix>/config`.
    pub async fn write_config(&self, json: &str) {
        self.etcd
            .put(&format!("{}/config", self.prefix), json)
            .await;
    }

    /// Start an agent on every host with the default flags plus `extra` (e.g. `["--datapath", "kernel"]`).
    pub fn start_agents(&self, extra: &[&str]) -> anyhow::Result<Vec<Agent>> {
        self.hosts.iter().map(|h| h.spawn_agent(extra)).collect()
    }

    /// [`Cluster::start_agents`] with another weft binary than [`crate::weft_bin`] (another build).
    pub fn start_agents_with(&self, bin: &Path, extra: &[&str]) -> anyhow::Result<Vec<Agent>> {
        self.hosts
            .iter()
            .map(|h| h.spawn_agent_bin(bin, extra, &[]))
            .collect()
    }

    /// Wait for every host's subnet file and address its docker0 from it.
    pub async fn wait_subnets(&self) -> anyhow::Result<Vec<SubnetEnv>> {
        let mut subnets = Vec::with_capacity(self.hosts.len());
        for host in &self.hosts {
            subnets.push(host.wait_subnet(SUBNET_TIMEOUT).await?);
        }
        Ok(subnets)
    }

    /// Add `per_host` containers to every host (waiting for each host's subnet first).
    pub async fn add_containers(&self, per_host: usize) -> anyhow::Result<()> {
        for host in &self.hosts {
            for _ in 0..per_host {
                host.add_container().await?;
            }
        }
        Ok(())
    }

    /// Leave everything running and on disk after drop (the demo's keep mode); returns what was
    /// made so it can be removed later.
    pub fn keep(mut self) -> Kept {
        let mut kept = Kept {
            dir: self.dir.path().to_owned(),
            namespaces: vec![self.switch.name().to_owned()],
            processes: KeptProcess::of(self.etcd.pid()).into_iter().collect(),
        };
        self.switch.keep();
        self.etcd.keep();
        self.dir.keep();
        for host in &mut self.hosts {
            host.keep(&mut kept);
        }
        kept
    }
}

/// One simulated host: a namespace with `ens32` on the underlay and a `docker0` bridge.
pub struct Host {
    // Drop order: the agent first, then containers, then the host namespace.
    agent: Mutex<Option<Agent>>,
    containers: Mutex<Vec<Container>>,
    netns: Netns,
    index: usize,
    ip: Ipv4Addr,
    dir: PathBuf,
    etcd_endpoint: String,
    prefix: String,
    detach: bool,
    subnet: Mutex<Option<SubnetEnv>>,
    next_container: AtomicU32,
}

impl Host {
    async fn create(
        cluster: &str,
        index: usize,
        switch: &Netns,
        cluster_dir: &Path,
        etcd_endpoint: &str,
        opts: &ClusterOptions,
    ) -> anyhow::Result<Host> {
        let octet = u8::try_from(usize::from(FIRST_HOST_OCTET) + index)
            .context("at most 234 hosts fit the underlay")?;
        let ip = Ipv4Addr::new(172, 16, 15, octet);
        let netns = Netns::create(&format!("{cluster}-host{}", index + 1)).await?;
        let port = format!("port-h{}", index + 1);
        switch.add_veth_into(&port, "ens32", netns.name()).await?;
        switch
            .ip(&["link", "set", &port, "master", "br0", "up"])
            .await?;
        netns
            .ip(&[
                "addr",
                "add",
                &format!("{ip}/{UNDERLAY_PREFIX_LEN}"),
                "dev",
                "ens32",
            ])
            .await?;
        // The IPv6 underlay (fd00:16::21/64, ...), without duplicate address detection so the
        // address is usable at once. IPv4-only agents ignore it.
        netns
            .ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", ipv6_of(octet)),
                "dev",
                "ens32",
                "nodad",
            ])
            .await?;
        netns.ip(&["link", "set", "ens32", "up"]).await?;
        netns.sysctl("net.ipv4.ip_forward", "1").await?;
        netns
            .ip(&["link", "add", "docker0", "type", "bridge"])
            .await?;
        netns.ip(&["link", "set", "docker0", "up"]).await?;
        let dir = cluster_dir.join(format!("host{}", index + 1));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Host {
            agent: Mutex::new(None),
            containers: Mutex::new(Vec::new()),
            netns,
            index,
            ip,
            dir,
            etcd_endpoint: etcd_endpoint.to_owned(),
            prefix: opts.prefix.clone(),
            detach: opts.detach,
            subnet: Mutex::new(None),
            next_container: AtomicU32::new(0),
        })
    }

    /// The host namespace's name.
    pub fn name(&self) -> &str {
        self.netns.name()
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// 0-based position in the cluster.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The host's underlay address (its "public IP").
    pub fn ens32_ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The host's underlay IPv6 address (its "PublicIPv6"): fd00:16::21, fd00:16::22, ...
    pub fn ens32_ipv6(&self) -> std::net::Ipv6Addr {
        ipv6_of(self.ip.octets()[3])
    }

    /// The host's directory: subnet file, agent log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the agent writes FLANNEL_SUBNET and friends (its `--subnet-file`).
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// Where the agent writes Docker's options (its `--docker-opts-file`).
    pub fn docker_opts_file(&self) -> PathBuf {
        self.dir.join("docker_opts.env")
    }

    /// The etcd endpoint as seen from the host, `http://172.16.15.1:2379`.
    pub fn etcd_endpoint(&self) -> &str {
        &self.etcd_endpoint
    }

    /// Run `argv` inside the host namespace; its output whatever the exit status.
    pub async fn exec(&self, argv: &[&str]) -> Output {
        self.netns.exec(argv).await
    }

    /// Packets `dev` in this host has sent (`ip -s link`'s TX packets).
    pub async fn tx_packets(&self, dev: &str) -> u64 {
        let out = self
            .exec_ok(&["ip", "-s", "-j", "link", "show", dev])
            .await
            .unwrap_or_else(|e| panic!("ip -s link show {dev} on {}: {e:#}", self.name()));
        let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
        links[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no TX packets for {dev} in {out}"))
    }

    /// Run `argv` inside the host namespace; stdout, or an error with its output.
    pub async fn exec_ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        self.netns.exec_ok(argv).await
    }

    /// `etcdctl <args>` (API v3) run inside the host against the cluster's etcd over the underlay.
    pub async fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec![
            "env",
            "ETCDCTL_API=3",
            "etcdctl",
            "--endpoints",
            self.etcd_endpoint.as_str(),
        ];
        argv.extend_from_slice(args);
        self.exec_ok(&argv).await
    }

    /// Where this host's agent pins its eBPF programs and maps (on the cluster's bpffs); pass it
    /// to `weft status --bpf-pin-dir`.
    pub fn bpf_pin_dir(&self) -> PathBuf {
        let cluster_dir = self.dir.parent().unwrap_or(&self.dir);
        cluster_dir.join(BPFFS).join(self.name())
    }

    /// The agent flags every host gets: flanneld's, pointing at the cluster's etcd and this host's
    /// ens32, subnet file and docker0. Every path is in the host's directory: the namespaces share
    /// the machine's file system, so a default like /run/flannel/subnet.env would be shared too.
    pub fn agent_args(&self) -> Vec<String> {
        let subnet_file = self.subnet_file().display().to_string();
        let docker_opts = self.docker_opts_file().display().to_string();
        [
            "--etcd-endpoints",
            &self.etcd_endpoint,
            "--etcd-prefix",
            &self.prefix,
            "--iface",
            "ens32",
            "--subnet-file",
            &subnet_file,
            "--docker-opts-file",
            &docker_opts,
            "--bridge",
            "docker0",
            "--bpf-pin-dir",
            &self.bpf_pin_dir().display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Start `weft agent` in this host with [`Host::agent_args`] plus `extra`; the host keeps a
    /// handle ([`Host::agent`]) and kills it on drop.
    pub fn spawn_agent(&self, extra: &[&str]) -> anyhow::Result<Agent> {
        self.spawn_agent_with_env(extra, &[])
    }

    /// [`Host::spawn_agent`] with environment variables for the agent (e.g. its own RUST_LOG).
    pub fn spawn_agent_with_env(
        &self,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        self.spawn_agent_bin(&crate::weft_bin()?, extra, env)
    }

    /// [`Host::spawn_agent_with_env`] running another weft binary (another build).
    pub fn spawn_agent_bin(
        &self,
        bin: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        let mut args = self.agent_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = self.dir.join("agent.log");
        let agent = Agent::spawn_bin(bin, self.name(), args, env, &log, self.detach)?;
        *lock(&self.agent) = Some(agent.clone());
        Ok(agent)
    }

    /// The agent last started with [`Host::spawn_agent`].
    pub fn agent(&self) -> Option<Agent> {
        lock(&self.agent).clone()
    }

    /// The subnet once [`Host::wait_subnet`] has seen it.
    pub fn subnet(&self) -> Option<SubnetEnv> {
        lock(&self.subnet).clone()
    }

    /// Wait for the subnet file, then give docker0 `FLANNEL_SUBNET` and `FLANNEL_MTU` as Docker's
    /// `--bip`/`--mtu` do. Idempotent. On timeout the error carries the agent's log.
    pub async fn wait_subnet(&self, timeout: Duration) -> anyhow::Result<SubnetEnv> {
        if let Some(known) = self.subnet() {
            return Ok(known);
        }
        let path = self.subnet_file();
        let deadline = Instant::now() + timeout;
        let env = loop {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    break SubnetEnv::parse(&text)
                        .with_context(|| format!("parse {}", path.display()))?
                }
                Err(e) if self.agent().and_then(|a| a.exit_status()).is_some() => {
                    let agent = self.agent().expect("checked above");
                    bail!(
                        "the agent on {} exited ({}) without writing {} ({e}); agent log:\n{}",
                        self.name(),
                        agent.exit_status().expect("checked above"),
                        path.display(),
                        tail(&agent.log(), 40)
                    );
                }
                Err(_) if Instant::now() < deadline => {
                    // Pacing between two looks; the deadline decides.
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    let log = self
                        .agent()
                        .map(|a| tail(&a.log(), 40))
                        .unwrap_or_else(|| "(no agent started)".into());
                    bail!(
                        "no subnet file {} on {} after {timeout:?} ({e}); agent log:\n{log}",
                        path.display(),
                        self.name()
                    );
                }
            }
        };
        let mtu = env.mtu.to_string();
        self.netns
            .ip(&["addr", "replace", &env.subnet.to_string(), "dev", "docker0"])
            .await?;
        self.netns
            .ip(&["link", "set", "docker0", "mtu", &mtu, "up"])
            .await?;
        *lock(&self.subnet) = Some(env.clone());
        Ok(env)
    }

    /// A new container on docker0: .2, .3, ... of the host's subnet (waiting for the subnet file).
    pub async fn add_container(&self) -> anyhow::Result<Container> {
        let env = self.wait_subnet(SUBNET_TIMEOUT).await?;
        let n = self.next_container.fetch_add(1, Ordering::Relaxed);
        let gateway = env.subnet.addr();
        let ip = Ipv4Addr::from(u32::from(env.subnet.network()) + 2 + n);
        if !env.subnet.contains(&ip) || ip == env.subnet.broadcast() {
            bail!(
                "host {} has no address left in {} for container {}",
                self.name(),
                env.subnet,
                n + 1
            );
        }
        let name = format!("{}-c{}", self.name(), n + 1);
        let container = Container::create(
            &name,
            &self.netns,
            &docker_veth_name(&name),
            ip,
            env.subnet.prefix_len(),
            gateway,
            env.mtu,
        )
        .await
        .with_context(|| format!("create container {name}"))?;
        lock(&self.containers).push(container.clone());
        Ok(container)
    }

    /// Dual stack for docker0 and this host's containers, from the agent's `FLANNEL_IPV6_SUBNET`
    /// (`fd00:10:0:a::1/64`): docker0 gets that first address, the n-th container `::(n+2)` and
    /// a default IPv6 route via docker0, IPv6 forwarding on. Returns each container's address, in
    /// creation order.
    pub async fn enable_ipv6(&self) -> anyhow::Result<Vec<(Container, std::net::Ipv6Addr)>> {
        let text = std::fs::read_to_string(self.subnet_file())?;
        let first: ipnet::Ipv6Net = text
            .lines()
            .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
            .with_context(|| format!("no FLANNEL_IPV6_SUBNET in {}:\n{text}", self.name()))?
            .parse()?;
        self.netns
            .sysctl("net.ipv6.conf.all.forwarding", "1")
            .await?;
        self.netns
            .ip(&[
                "-6",
                "addr",
                "replace",
                &first.to_string(),
                "dev",
                "docker0",
                "nodad",
            ])
            .await?;
        let mut out = Vec::new();
        for (n, c) in self.containers().into_iter().enumerate() {
            let ip = std::net::Ipv6Addr::from(u128::from(first.network()) + 2 + n as u128);
            c.add_ipv6(ip, first.prefix_len(), first.addr()).await?;
            out.push((c, ip));
        }
        Ok(out)
    }

    /// The containers on this host, in creation order.
    pub fn containers(&self) -> Vec<Container> {
        lock(&self.containers).clone()
    }

    fn keep(&mut self, kept: &mut Kept) {
        self.netns.keep();
        kept.namespaces.push(self.netns.name().to_owned());
        if let Some(agent) = lock(&self.agent).as_ref() {
            agent.keep();
            kept.processes.extend(agent.pid().and_then(KeptProcess::of));
        }
        for c in lock(&self.containers).iter() {
            c.keep();
            kept.namespaces.push(c.netns().to_owned());
        }
    }
}

/// The subnet file an agent writes (flannel's `subnet.env`), as Docker's `mk-docker-opts.sh` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK, e.g. 10.1.0.0/16.
    pub network: Ipv4Net,
    /// FLANNEL_SUBNET, e.g. 10.1.10.1/24: docker0's address (`--bip`).
    pub subnet: Ipv4Net,
    /// FLANNEL_MTU (`--mtu`).
    pub mtu: u32,
    /// FLANNEL_IPMASQ.
    pub ipmasq: bool,
}

impl SubnetEnv {
    pub fn parse(text: &str) -> anyhow::Result<SubnetEnv> {
        let var = |name: &str| -> anyhow::Result<&str> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .map(str::trim)
                .with_context(|| format!("no {name}= line in:\n{text}"))
        };
        Ok(SubnetEnv {
            network: var("FLANNEL_NETWORK")?.parse().context("FLANNEL_NETWORK")?,
            subnet: var("FLANNEL_SUBNET")?.parse().context("FLANNEL_SUBNET")?,
            mtu: var("FLANNEL_MTU")?.parse().context("FLANNEL_MTU")?,
            ipmasq: var("FLANNEL_IPMASQ").map(|v| v == "true").unwrap_or(false),
        })
    }
}

/// The underlay IPv6 address of the host whose IPv4 address ends in `octet` (hex digits that read
/// like the decimal ones: .21 -> fd00:16::21).
fn ipv6_of(octet: u8) -> std::net::Ipv6Addr {
    let group = u16::from_str_radix(&octet.to_string(), 16).unwrap_or(u16::from(octet));
    std::net::Ipv6Addr::new(0xfd00, 0x16, 0, 0, 0, 0, 0, group)
}

/// Docker names the host end `veth` + 7 hex digits; derived from the container's name here so it
/// is unique within the host.
fn docker_veth_name(container: &str) -> String {
    let mut h = DefaultHasher::new();
    container.hash(&mut h);
    format!("veth{:07x}", h.finish() & 0x0fff_ffff)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// The cluster's directory: a temp dir, or a given path, removed on drop unless kept.
struct ClusterDir {
    path: PathBuf,
    remove: bool,
}

impl ClusterDir {
    fn create(path: Option<PathBuf>, name: &str) -> anyhow::Result<ClusterDir> {
        let path = match path {
            Some(path) => {
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("create {}", path.display()))?;
                path
            }
            None => tempfile::Builder::new()
                .prefix(&format!("{name}-"))
                .tempdir()
                .context("create the cluster's temp dir")?
                .keep(),
        };
        // One bpffs for the cluster's agents, mounted in the machine's mount namespace: each
        // `ip netns exec` gets a fresh /sys, so pins under /sys/fs/bpf would be private to one
        // agent process and lost on restart. This mount is seen by every host and survives.
        mount_bpffs(&path.join(BPFFS))?;
        Ok(ClusterDir { path, remove: true })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn keep(&mut self) {
        self.remove = false;
    }
}

/// The cluster directory's bpffs mount point, holding one pin directory per host.
pub const BPFFS: &str = "bpffs";

fn mount_bpffs(at: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(at).with_context(|| format!("create {}", at.display()))?;
    crate::netns::run_blocking("mount", &["-t", "bpf", "bpf", &at.display().to_string()])
        .with_context(|| format!("mount bpffs at {}", at.display()))
        .map(drop)
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        if self.remove {
            crate::keep::unmount_below(&self.path);
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("weft-tests cleanup: remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Delete namespaces left by harness runs that died without cleaning up (killed test binaries):
/// names `weft-<pid>-...` whose pid no longer exists. Namespaces of live processes are not touched.
fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for name in netns::list() {
            let Some(pid) = name.strip_prefix("weft-").and_then(|r| r.split('-').next()) else {
                continue;
            };
            let Ok(pid) = pid.parse::<u32>() else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                if let Err(e) = netns::delete(&name) {
                    eprintln!("weft-tests: remove stale namespace {name}: {e:#}");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannels_subnet_file() {
        let text = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.10.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let env = SubnetEnv::parse(text).unwrap();
        assert_eq!(env.network, "10.1.0.0/16".parse().unwrap());
        assert_eq!(env.subnet.addr(), Ipv4Addr::new(10, 1, 10, 1));
        assert_eq!(env.subnet.prefix_len(), 24);
        assert_eq!((env.mtu, env.ipmasq), (1450, true));
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=10.1.0.0/16\n")
            .unwrap_err()
            .to_string()
            .contains("FLANNEL_SUBNET"));
    }

    #[test]
    fn veth_names_look_like_dockers() {
        let name = docker_veth_name("weft-1-0-host1-c1");
        assert_eq!(name.len(), 11);
        assert!(name.starts_with("veth"));
        assert_ne!(name, docker_veth_name("weft-1-0-host1-c2"));
    }
}
