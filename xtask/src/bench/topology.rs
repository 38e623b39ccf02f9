//! One test bed per mode: the harness's two hosts with one container each, configured for host-gw,
//! weft's kernel vxlan datapath or weft's eBPF datapath, or (`bare`) the two hosts alone. All live
//! side by side for the whole run so rounds can alternate between them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use weft_tests::flanneld::{self, Ipv4Net};
use weft_tests::{Cluster, ClusterOptions, Container, Host, Netns};

use crate::bench::counters::{find, read_ebpf_counters, PathCounters, IPV4_PATH, IPV6_PATH};
use crate::bench::measure::Endpoint;

/// Longest wait for weft to bind the containers' IPv6 addresses: its reconcile interval (10 s by
/// default) twice, plus the time a loaded machine needs.
const EBPF_BINDING: Duration = Duration::from_secs(40);

/// Container MTU in every IPv4 mode (underlay 1500 minus the 50 bytes of VXLAN), as the issue
/// requires.
pub const CONTAINER_MTU: u32 = 1450;
/// Container MTU in every IPv6 mode: underlay 1500 minus the 70 bytes of VXLAN over IPv6, the MTU
/// of flannel-v6.1. At 1450 every full-size IPv6 segment would first be refused with a Packet Too
/// Big and the figures would measure path-MTU discovery.
pub const CONTAINER_MTU6: u32 = 1430;
/// The overlay network all modes use.
pub const NETWORK: &str = "10.1.0.0/16";
/// The IPv6 overlay network of `--family 6` (dual stack: the harness's containers need IPv4 too).
pub const NETWORK6: &str = "fd00:10::/48";

/// The address family the datapath benchmark measures: of the containers and of the underlay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Family {
    #[default]
    #[value(name = "4")]
    V4,
    /// A dual-stack network (`EnableIPv6`), measured with IPv6 containers over the hosts' IPv6
    /// underlay addresses.
    #[value(name = "6")]
    V6,
}

impl Family {
    /// 4 or 6, as report.json records it.
    pub fn number(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
        }
    }

    /// The name the output files start with: IPv6 runs never overwrite IPv4 reports.
    pub fn report_stem(self) -> &'static str {
        match self {
            Family::V4 => "report",
            Family::V6 => "report6",
        }
    }

    pub fn container_mtu(self) -> u32 {
        match self {
            Family::V4 => CONTAINER_MTU,
            Family::V6 => CONTAINER_MTU6,
        }
    }

    /// The counters and the kernel device that tell whether this family took the eBPF path.
    pub fn path_counters(self) -> &'static PathCounters {
        match self {
            Family::V4 => &IPV4_PATH,
            Family::V6 => &IPV6_PATH,
        }
    }

    /// The network config for `backend`; IPv4's is the benchmark's original one, unchanged.
    fn config(self, backend: &str) -> String {
        let ipv6 = match self {
            Family::V4 => String::new(),
            Family::V6 => format!(r#","EnableIPv6":true,"IPv6Network":"{NETWORK6}""#),
        };
        format!(r#"{{"Network":"{NETWORK}"{ipv6},"Backend":{{"Type":"{backend}"}}}}"#)
    }

    /// `host`'s underlay address in this family.
    pub fn ens32_ip(self, host: &Host) -> IpAddr {
        match self {
            Family::V4 => host.ens32_ip().into(),
            Family::V6 => host.ens32_ipv6().into(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IPv{}", self.number())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Mode {
    /// The two hosts' own namespaces over ens32: no container, bridge, overlay or agent. The
    /// physical limit of this topology.
    Bare,
    /// Plain routing via the peer's underlay address: no encapsulation, the practical limit.
    HostGw,
    /// weft with `--datapath kernel`: flannel.1 as flanneld programs it.
    KernelVxlan,
    /// weft with `--datapath ebpf`.
    Ebpf,
    /// weft with `--datapath ebpf --ebpf-udp-csum=false`: what the outer UDP checksum costs.
    /// Not measured unless named in `--modes`.
    EbpfNocsum,
    /// `weft agent --datapath ebpf` of an earlier build (`--baseline`, its own eBPF programs):
    /// the previous datapath measured in the same rounds. Not measured unless named in `--modes`.
    EbpfBase,
    /// `bare` plus what Docker's veth alone costs the sender: host 1's client in a namespace behind
    /// one veth whose frames TC actions put straight on ens32 (no bridge, routing, overlay or
    /// agent). No datapath for veth containers can send for less. Not measured unless named in
    /// `--modes`.
    VethFloor,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Bare, Mode::HostGw, Mode::KernelVxlan, Mode::Ebpf];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::HostGw => "host-gw",
            Mode::KernelVxlan => "kernel-vxlan",
            Mode::Ebpf => "ebpf",
            Mode::EbpfNocsum => "ebpf-nocsum",
            Mode::EbpfBase => "ebpf-base",
            Mode::VethFloor => "veth-floor",
        }
    }

    /// The eBPF datapath (whose counters each round checks).
    pub fn is_ebpf(self) -> bool {
        matches!(self, Mode::Ebpf | Mode::EbpfNocsum | Mode::EbpfBase)
    }

    fn config(self, family: Family) -> String {
        let backend = match self {
            Mode::Bare | Mode::VethFloor | Mode::HostGw => "host-gw",
            Mode::KernelVxlan | Mode::Ebpf | Mode::EbpfNocsum | Mode::EbpfBase => "vxlan",
        };
        family.config(backend)
    }

    fn agent_args(self) -> &'static [&'static str] {
        match self {
            Mode::Bare | Mode::VethFloor | Mode::HostGw | Mode::KernelVxlan => {
                &["--datapath", "kernel"]
            }
            // The baseline build (96d6bbb) takes these and Host::agent_args alike.
            Mode::Ebpf | Mode::EbpfBase => &["--datapath", "ebpf"],
            Mode::EbpfNocsum => &["--datapath", "ebpf", "--ebpf-udp-csum=false"],
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The weft builds the modes run: this one, and `ebpf-base`'s.
#[derive(Debug, Clone)]
pub struct Builds {
    pub current: PathBuf,
    pub base: Option<PathBuf>,
}

impl Builds {
    /// The binary whose agents run `mode` (and whose `weft status` reads their maps: a build
    /// refuses another build's map layout).
    pub fn for_mode(&self, mode: Mode) -> anyhow::Result<&Path> {
        match mode {
            Mode::EbpfBase => self.base.as_deref().context(
                "the ebpf-base mode needs the baseline build (--baseline or WEFT_BASE_BIN)",
            ),
            _ => Ok(self.current.as_path()),
        }
    }
}

/// Who programs the routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// `weft agent` on both hosts.
    Agent,
    /// `ip` commands, exactly as flanneld programs host-gw and flannel.1 (no agent; no eBPF mode).
    /// A reference for the kernel modes, and a way to check the bench itself.
    Hand,
}

/// The underlay's offload settings for a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Offload {
    /// veth defaults (TSO/GSO on: the wire carries 64 KB frames) with GRO on at each host's ens32.
    On,
    /// TSO and GSO off on both ends of each wire, GRO still on at ens32: every frame on the wire is
    /// at most MTU-sized, as on a physical link, and the receiver coalesces as a NIC's GRO would.
    Off,
}

impl Offload {
    pub fn name(self) -> &'static str {
        match self {
            Offload::On => "offload",
            Offload::Off => "no-offload",
        }
    }
}

/// Two hosts, one container on each (none in `bare`), ready to measure.
pub struct Testbed {
    pub mode: Mode,
    pub family: Family,
    /// Where the tests run: the containers, or in `bare` the hosts themselves.
    pub client: Endpoint,
    pub server: Endpoint,
    /// Host 1's own namespace, for the host-originated tests (to `server`).
    pub host_client: Endpoint,
    // Containers before the cluster: the cluster's drop deletes their namespaces too, and the
    // handles must not outlive that.
    pub containers: Option<(Container, Container)>,
    /// `veth-floor`'s client namespace.
    pub floor: Option<Netns>,
    pub cluster: Cluster,
    /// The weft binary the agents run; its `weft status` reads their counters.
    pub weft: PathBuf,
}

impl Testbed {
    pub async fn start(
        mode: Mode,
        routing: Routing,
        family: Family,
        weft: &Path,
    ) -> anyhow::Result<Testbed> {
        if routing == Routing::Hand && family == Family::V6 {
            bail!("--hand-routed programs IPv4 only; drop it with --family 6");
        }
        let cluster = Cluster::start(ClusterOptions::new(2))
            .await
            .context("build the two-host cluster")?;
        match mode {
            Mode::Bare => return Testbed::bare(cluster, family, weft).await,
            Mode::VethFloor => return Testbed::veth_floor(cluster, family, weft).await,
            _ => {}
        }
        cluster.write_config(&mode.config(family)).await;
        match routing {
            Routing::Agent => {
                cluster
                    .start_agents_with(weft, mode.agent_args())
                    .with_context(|| format!("start weft agents for {mode}"))?;
            }
            Routing::Hand => {
                if mode.is_ebpf() {
                    bail!("the ebpf mode needs the weft agent; drop --hand-routed");
                }
                write_subnet_files(&cluster, mode)?;
            }
        }
        cluster.wait_subnets().await?;
        cluster.add_containers(1).await?;
        if routing == Routing::Hand {
            hand_route(&cluster, mode).await?;
        }
        let client = cluster.container(0);
        let server = cluster.container(1);
        let (client_ip, server_ip) = match family {
            Family::V4 => (client.ip().into(), server.ip().into()),
            Family::V6 => (
                ipv6_of(cluster.host(0)).await?,
                ipv6_of(cluster.host(1)).await?,
            ),
        };
        let bed = Testbed {
            mode,
            family,
            client: Endpoint::at(client.netns(), client_ip),
            server: Endpoint::at(server.netns(), server_ip),
            host_client: Endpoint::host(cluster.host(0), family),
            containers: Some((client, server)),
            floor: None,
            cluster,
            weft: weft.to_owned(),
        };
        bed.force_mtu().await?;
        bed.set_offload(Offload::On).await?;
        let (client, _) = bed.containers.as_ref().context("containers")?;
        client
            .ping_until(server_ip, Duration::from_secs(30))
            .await
            .with_context(|| format!("{mode}: container to container across hosts ({family})"))?;
        if mode.is_ebpf() && family == Family::V6 {
            bed.wait_until_ebpf_carries(client, server_ip).await?;
        }
        Ok(bed)
    }

    /// weft binds a container's IPv6 address to its bridge port once the bridge has a neighbour
    /// entry for it; until then flannel-v6.1 carries the container and the first round would
    /// measure the kernel. Wait until a ping each way is encapsulated and
    /// decapsulated by the programs on both hosts.
    async fn wait_until_ebpf_carries(
        &self,
        client: &Container,
        server_ip: IpAddr,
    ) -> anyhow::Result<()> {
        let path = self.family.path_counters();
        let hosts = self.hosts();
        weft_tests::poll::try_until(
            &format!(
                "{}: a ping {server_ip} each way through the eBPF programs (`{}` and `{}` growing on \
                 host1 and host2; seen: before and after the ping)",
                self.mode, path.encapsulated, path.decapsulated
            ),
            EBPF_BINDING,
            || async {
                let before = path_counts(hosts, path, &self.weft).await?;
                client.ping(server_ip).await.map_err(|e| format!("{e:#}"))?;
                let after = path_counts(hosts, path, &self.weft).await?;
                let grew = before.iter().zip(&after).all(|(b, a)| a > b);
                weft_tests::poll::check(grew, (before, after))
            },
        )
        .await
        .map_err(anyhow::Error::msg)
    }

    /// Host 1 to host 2 over the underlay: the hosts' own namespaces at their ens32 addresses
    /// (IPv6: the harness's fd00:16::/64 ones), MTU 1500 (the wire's; no overlay takes 50 or 70
    /// bytes of it).
    async fn bare(cluster: Cluster, family: Family, weft: &Path) -> anyhow::Result<Testbed> {
        let (client, server) = (
            Endpoint::host(cluster.host(0), family),
            Endpoint::host(cluster.host(1), family),
        );
        let bed = Testbed {
            mode: Mode::Bare,
            family,
            host_client: client.clone(),
            client,
            server,
            containers: None,
            floor: None,
            cluster,
            weft: weft.to_owned(),
        };
        bed.set_offload(Offload::On).await?;
        let (h1, target) = (bed.cluster.host(0), bed.server.ip.to_string());
        weft_tests::poll::try_until(
            &format!("bare: host 1 to answer ping from {target}"),
            Duration::from_secs(30),
            || async {
                h1.exec_ok(&["ping", "-c", "1", "-W", "1", &target])
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await
        .map_err(anyhow::Error::msg)?;
        Ok(bed)
    }

    /// `bare` with host 1's client moved into a namespace behind one veth (10.1.1.2, host 1 holds
    /// 10.1.1.1), its IPv4 frames put straight onto ens32 by a TC `mirred` redirect on the veth's
    /// ingress (no eBPF). The frames leave the namespace already addressed as host 1's ens32 would
    /// send them (its MAC as source, host 2's ens32 as the gateway's), so nothing rewrites them.
    /// The least any datapath for veth containers does to send; host 2 answers through host 1's
    /// routing, so the floor holds for the client-to-server direction (throughput, 64-byte UDP),
    /// not for RR.
    async fn veth_floor(cluster: Cluster, family: Family, weft: &Path) -> anyhow::Result<Testbed> {
        if family == Family::V6 {
            bail!("veth-floor is IPv4 only: leave it out of --modes with --family 6");
        }
        const VETH: &str = "floor0";
        let (h1, h2) = (cluster.host(0), cluster.host(1));
        let (src, dst) = (
            mac_of(h1.name(), "ens32").await?,
            mac_of(h2.name(), "ens32").await?,
        );
        let ns = Netns::create(&format!("{}-floor", cluster.name())).await?;
        h1.netns().add_veth_into(VETH, "eth0", ns.name()).await?;
        h1.netns()
            .ip(&["addr", "add", "10.1.1.1/24", "dev", VETH])
            .await?;
        h1.netns().ip(&["link", "set", VETH, "up"]).await?;
        for args in [
            &["link", "set", "eth0", "address", &src][..],
            &["addr", "add", "10.1.1.2/24", "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &[
                "neigh",
                "replace",
                "10.1.1.1",
                "lladdr",
                &dst,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
            &["route", "add", "default", "via", "10.1.1.1"],
        ] {
            ns.ip(args).await?;
        }
        let via = h1.ens32_ip().to_string();
        h2.netns()
            .ip(&["route", "add", "10.1.1.0/24", "via", &via])
            .await?;
        run_in(h1.name(), &["tc", "qdisc", "add", "dev", VETH, "clsact"]).await?;
        run_in(
            h1.name(),
            &[
                "tc", "filter", "add", "dev", VETH, "ingress", "protocol", "ip", "u32", "match",
                "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "ens32",
            ],
        )
        .await
        .context("veth-floor: a TC mirred redirect on host 1 (cls_u32, act_mirred)")?;
        let target = h2.ens32_ip().to_string();
        let (server, host_client) = (Endpoint::host(h2, family), Endpoint::host(h1, family));
        let bed = Testbed {
            mode: Mode::VethFloor,
            family,
            client: Endpoint::at(ns.name(), Ipv4Addr::new(10, 1, 1, 2).into()),
            server,
            host_client,
            containers: None,
            floor: Some(ns),
            cluster,
            weft: weft.to_owned(),
        };
        bed.set_offload(Offload::On).await?;
        let floor = bed.floor.as_ref().context("the floor namespace")?;
        weft_tests::poll::try_until(
            &format!("veth-floor: {target} to answer ping from behind the veth"),
            Duration::from_secs(30),
            || async {
                floor
                    .exec_ok(&["ping", "-c", "1", "-W", "1", &target])
                    .await
                    .map_err(|e| e.to_string())
            },
        )
        .await
        .map_err(anyhow::Error::msg)?;
        Ok(bed)
    }

    pub fn hosts(&self) -> &[Host] {
        self.cluster.hosts()
    }

    /// host-gw's subnet file says 1500 (nothing to encapsulate); the comparison needs the overlay's
    /// MTU in every mode (1450; IPv6: 1430), so docker0 and both ends of each container veth get
    /// it. Then check all modes alike.
    async fn force_mtu(&self) -> anyhow::Result<()> {
        let mtu = self.family.container_mtu().to_string();
        let Some((client, server)) = &self.containers else {
            return Ok(());
        };
        for (host, c) in self.hosts().iter().zip([client, server]) {
            host.netns()
                .ip(&["link", "set", c.host_veth(), "mtu", &mtu])
                .await?;
            host.netns()
                .ip(&["link", "set", "docker0", "mtu", &mtu])
                .await?;
            c.exec_ok(&["ip", "link", "set", "eth0", "mtu", &mtu])
                .await?;
            let shown = c.exec_ok(&["ip", "-o", "link", "show", "eth0"]).await?;
            if !shown.contains(&format!(" mtu {mtu} ")) {
                bail!("{}: container eth0 is not at MTU {mtu}: {shown}", self.mode);
            }
        }
        Ok(())
    }

    /// TSO/GSO on or off on both ends of both underlay wires; GRO on at each ens32 either way.
    pub async fn set_offload(&self, offload: Offload) -> anyhow::Result<()> {
        let seg = match offload {
            Offload::On => "on",
            Offload::Off => "off",
        };
        for (i, host) in self.hosts().iter().enumerate() {
            let port = format!("port-h{}", i + 1);
            ethtool(
                self.cluster.switch().name(),
                &port,
                &["tso", seg, "gso", seg],
            )
            .await?;
            ethtool(host.name(), "ens32", &["tso", seg, "gso", seg, "gro", "on"]).await?;
        }
        Ok(())
    }

    /// `ethtool -k` of the four underlay ends, tso/gso/gro lines only: what a run really had.
    pub async fn offload_state(&self) -> anyhow::Result<String> {
        let mut out = Vec::new();
        for (i, host) in self.hosts().iter().enumerate() {
            let port = format!("port-h{}", i + 1);
            for (ns, dev) in [
                (self.cluster.switch().name(), port.as_str()),
                (host.name(), "ens32"),
            ] {
                let text = run_in(ns, &["ethtool", "-k", dev]).await?;
                let flags: Vec<String> = text
                    .lines()
                    .filter_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        let short = match k.trim() {
                            "tcp-segmentation-offload" => "tso",
                            "generic-segmentation-offload" => "gso",
                            "generic-receive-offload" => "gro",
                            _ => return None,
                        };
                        Some(format!("{short} {}", v.split_whitespace().next()?))
                    })
                    .collect();
                let who = if dev == "ens32" {
                    format!("host{} ens32", i + 1)
                } else {
                    format!("switch {dev}")
                };
                out.push(format!("{who}: {}", flags.join(", ")));
            }
        }
        Ok(out.join("; "))
    }
}

/// `[encapsulated, decapsulated]` of `path` on each host in turn.
async fn path_counts(hosts: &[Host], path: &PathCounters, weft: &Path) -> Result<Vec<f64>, String> {
    let mut counts = Vec::new();
    for host in hosts {
        let c = read_ebpf_counters(host, path, weft)
            .await
            .map_err(|e| format!("{e:#}"))?;
        counts.extend([path.encapsulated, path.decapsulated].map(|n| find(&c, n).unwrap_or(0.0)));
    }
    Ok(counts)
}

/// Dual stack on `host`'s docker0 and its one container (the harness's IPv6 setup, from the
/// agent's FLANNEL_IPV6_SUBNET): the container's IPv6 address.
async fn ipv6_of(host: &Host) -> anyhow::Result<IpAddr> {
    let v6 = host
        .enable_ipv6()
        .await
        .with_context(|| format!("IPv6 for {}'s container", host.name()))?;
    match v6.as_slice() {
        [(_, ip)] => Ok((*ip).into()),
        _ => bail!("{}: expected one container, got {}", host.name(), v6.len()),
    }
}

/// `ethtool -K dev <features>` in namespace `ns`. A feature the driver cannot change (veth with
/// XDP on its peer cannot do TSO) is not an error here: [`Testbed::offload_state`] records what
/// the run really had.
async fn ethtool(ns: &str, dev: &str, features: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["ethtool", "-K", dev];
    argv.extend_from_slice(features);
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(&argv)
        .output()
        .await
        .with_context(|| format!("run {} in {ns}", argv.join(" ")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains("Could not change any device features") {
        bail!("`{}` in {ns} failed: {stderr}", argv.join(" "));
    }
    Ok(())
}

/// `dev`'s MAC address in namespace `ns`, as `ip` and `tc` write it.
async fn mac_of(ns: &str, dev: &str) -> anyhow::Result<String> {
    let mac = crate::bench::programs::link_mac(ns, dev).await?;
    Ok(mac.map(|b| format!("{b:02x}")).join(":"))
}

async fn run_in(ns: &str, argv: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(argv);
    weft_tests::netns::run("ip", &full).await
}

/// Host i (0-based) gets 10.1.(i+1).0/24, as subnet files the harness reads like the agent's.
fn hand_subnet(i: usize) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 1, i as u8 + 1, 0), 24).expect("a /24")
}

fn write_subnet_files(cluster: &Cluster, mode: Mode) -> anyhow::Result<()> {
    let mtu = match mode {
        Mode::Bare | Mode::VethFloor | Mode::HostGw => 1500,
        Mode::KernelVxlan | Mode::Ebpf | Mode::EbpfNocsum | Mode::EbpfBase => CONTAINER_MTU,
    };
    for (i, host) in cluster.hosts().iter().enumerate() {
        std::fs::write(
            host.subnet_file(),
            flanneld::subnet_env(NETWORK, hand_subnet(i), mtu),
        )
        .with_context(|| format!("write {}", host.subnet_file().display()))?;
    }
    Ok(())
}

/// flanneld's programming, by hand (weft_tests::flanneld, FLANNEL-COMPAT.md): host-gw routes via
/// the peer's underlay address, or flannel.1 with neighbour, fdb entry and onlink route per peer.
/// flannel.1 inherits the inner TTL here, as weft's eBPF path does, so the modes compare alike.
async fn hand_route(cluster: &Cluster, mode: Mode) -> anyhow::Result<()> {
    let hosts = cluster.hosts();
    let mut macs = Vec::new();
    if mode == Mode::KernelVxlan {
        for (i, host) in hosts.iter().enumerate() {
            let ns = host.netns().name();
            let device = flanneld::vxlan_device(
                host.ens32_ip(),
                hand_subnet(i),
                None,
                CONTAINER_MTU,
                &["ttl", "inherit"],
            );
            flanneld::run(ns, &device).await?;
            macs.push(flanneld::device_mac(host.netns()).await?);
        }
    }
    for (i, host) in hosts.iter().enumerate() {
        for (j, peer) in hosts.iter().enumerate().filter(|(j, _)| *j != i) {
            let cmds = match mode {
                Mode::Bare | Mode::VethFloor | Mode::HostGw => {
                    flanneld::host_gw_peer(hand_subnet(j), peer.ens32_ip(), None)
                }
                Mode::KernelVxlan | Mode::Ebpf | Mode::EbpfNocsum | Mode::EbpfBase => {
                    flanneld::vxlan_peer(hand_subnet(j), peer.ens32_ip(), &macs[j])
                }
            };
            flanneld::run(host.netns().name(), &cmds).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_configs_are_the_original_ones_and_ipv6_adds_a_dual_stack_network() {
        assert_eq!(
            Mode::HostGw.config(Family::V4),
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}"#
        );
        assert_eq!(
            Mode::Ebpf.config(Family::V4),
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#
        );
        assert_eq!(
            Mode::KernelVxlan.config(Family::V6),
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#
        );
        assert_eq!(
            (Family::V4.report_stem(), Family::V6.report_stem()),
            ("report", "report6")
        );
        assert_eq!(
            (Family::V4.container_mtu(), Family::V6.container_mtu()),
            (1450, 1430)
        );
        assert_eq!(Family::V6.path_counters().fallback_device, "flannel-v6.1");
    }

    #[test]
    fn family_is_given_as_4_or_6() {
        use clap::ValueEnum as _;
        assert_eq!(Family::from_str("6", false), Ok(Family::V6));
        assert_eq!(Family::from_str("4", false), Ok(Family::V4));
        assert!(Family::from_str("v6", false).is_err());
    }
}
