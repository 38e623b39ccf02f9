//! Tools for the adversarial suites (`tests/tests/adversarial.rs`, `adversarial6.rs` over IPv6): the same cluster on the kernel
//! datapath and on the eBPF one (with either decapsulation hook), hand-built frames sent from
//! inside a namespace, packet captures that say where frames landed, and the comparison "the eBPF
//! path lands no more than the kernel path".
//!
//! Frames are sent and caught with `AF_PACKET` sockets opened by threads that joined the
//! namespace (as [`Netns::spawn_thread`](crate::Netns::spawn_thread) does): no tool inside the
//! namespaces is needed and the test process itself never joins them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aya::maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData};
use serde_json::Value;
use tokio::task::JoinSet;
use weft_common::{
    map_names, map_names6, Ipv4LpmData, Ipv6LpmData, LocalEndpoint, PeerValue, PeerValue6,
    VtepValue,
};

use crate::agent::weft_bin;
use crate::cluster::{Cluster, ClusterOptions, Host};
use crate::container::Container;

/// The network config every adversarial cluster uses.
pub const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// flannel's VXLAN UDP port.
pub const VXLAN_PORT: u16 = 8472;
/// How long a cluster may take from agent start to every pair of containers answering.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which datapath the agents run: `--datapath kernel` (flannel.1, the reference) or `--datapath
/// ebpf` with either decapsulation hook (TC, the default on these veth NICs, or XDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    Kernel,
    Ebpf,
    EbpfXdp,
}

impl Datapath {
    /// The eBPF datapaths, each compared with the kernel's.
    pub const EBPF: [Datapath; 2] = [Datapath::Ebpf, Datapath::EbpfXdp];

    /// The agent flags that select it.
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Datapath::Kernel => &["--datapath", "kernel"],
            Datapath::Ebpf => &["--datapath", "ebpf", "--decap-hook", "tc"],
            Datapath::EbpfXdp => &["--datapath", "ebpf", "--decap-hook", "xdp"],
        }
    }

    pub fn is_ebpf(self) -> bool {
        self != Datapath::Kernel
    }
}

impl fmt::Display for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Datapath::Kernel => "kernel",
            Datapath::Ebpf => "ebpf/tc",
            Datapath::EbpfXdp => "ebpf/xdp",
        })
    }
}

// ---- the cluster -----------------------------------------------------------------------------------

/// `hosts` hosts running `weft agent --datapath <dp> <extra>`, `per_host` containers each; returns
/// once every container answers every other one and, on eBPF, every host has its programs
/// attached (decap on ens32, encap on docker0 and on each container's port) with every peer.
pub async fn start(dp: Datapath, hosts: usize, per_host: usize, extra: &[&str]) -> Cluster {
    let c = Cluster::start(ClusterOptions::new(hosts))
        .await
        .unwrap_or_else(|e| panic!("build a {hosts}-host cluster for {dp}: {e:#}"));
    c.write_config(CONFIG).await;
    let mut args = dp.args().to_vec();
    args.extend_from_slice(extra);
    c.start_agents(&args)
        .unwrap_or_else(|e| panic!("start the {dp} agents: {e:#}"));
    c.add_containers(per_host)
        .await
        .unwrap_or_else(|e| panic!("add containers on {dp}: {e:#}"));
    if dp.is_ebpf() {
        for h in c.hosts() {
            wait_ebpf_ready(h, hosts - 1).await;
        }
    }
    match dp {
        Datapath::Kernel => ping_all(&c, dp, "at start").await,
        Datapath::Ebpf | Datapath::EbpfXdp => wait_fast_path(&c, dp).await,
    }
    c
}

/// `weft status --json` of the host's pinned state.
pub async fn status(host: &Host) -> Value {
    let bin = weft_bin().expect("weft binary");
    let out = host
        .exec_ok(&[
            &bin.display().to_string(),
            "status",
            "--json",
            "--bpf-pin-dir",
            &host.bpf_pin_dir().display().to_string(),
        ])
        .await
        .unwrap_or_else(|e| panic!("weft status on {}: {e:#}", host.name()));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("weft status --json: {e}:\n{out}"))
}

pub use crate::status::counter;

/// Every counter of the host's programs that is not zero, by name (empty on the kernel datapath).
pub async fn counters(host: &Host) -> BTreeMap<String, u64> {
    status(host).await["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["name"].as_str()?.to_owned(), c["value"].as_u64()?)))
        .filter(|(_, value)| *value > 0)
        .collect()
}

/// `after - before`, counter by counter, leaving out the ones that did not move.
pub fn counters_since(
    after: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Wait until the host runs its programs on ens32, docker0 and every container port, with `peers`
/// remote subnets in its map.
pub async fn wait_ebpf_ready(host: &Host, peers: usize) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let st = status(host).await;
        let containers = host.containers();
        let ports: Vec<&str> = containers.iter().map(|c| c.host_veth()).collect();
        if crate::status::ebpf_ready_on(&st, peers, &ports) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{}: programs not attached everywhere with {peers} peers within {READY_TIMEOUT:?}; \
                 weft status:\n{st:#}",
                host.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Legitimate traffic after an attack: every container pings every other one (same host and
/// across hosts) and every host pings a container on each other host (from its own address, as
/// the kernel routes it). Panics naming each pair that failed. On eBPF, every host's programs
/// must have encapsulated some of it: a silent fallback to flannel.1 would compare the kernel with
/// itself.
pub async fn legit_traffic_flows(c: &Cluster, dp: Datapath, when: &str) {
    if dp == Datapath::Kernel {
        return ping_all(c, dp, when).await;
    }
    let before = encapsulated(c).await;
    ping_all(c, dp, when).await;
    let after = encapsulated(c).await;
    let idle = idle_hosts(c, &before, &after);
    assert!(
        idle.is_empty(),
        "{dp}, {when}: the programs of {idle:?} encapsulated nothing ({before:?} -> {after:?}): \
         their traffic took the kernel path"
    );
}

/// On eBPF, ping all pairs until every host's programs encapsulate its containers' traffic: a new
/// container is handed to the kernel until the agent has bound its address to its port, which
/// must happen within one reconcile interval (10 s by default).
async fn wait_fast_path(c: &Cluster, dp: Datapath) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = encapsulated(c).await;
        ping_all(c, dp, "at start").await;
        let after = encapsulated(c).await;
        let idle = idle_hosts(c, &before, &after);
        if idle.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let mut counters_of = Vec::new();
            for h in c.hosts() {
                counters_of.push(format!("{}: {:?}", h.name(), counters(h).await));
            }
            panic!(
                "{dp}: the fast path never carried the traffic of {idle:?} within 15 s (of the \
                 containers' start, or of the end of an attack):\n{}",
                counters_of.join("\n")
            );
        }
    }
}

/// Names of the hosts whose "encapsulated" counter did not move.
fn idle_hosts(c: &Cluster, before: &[u64], after: &[u64]) -> Vec<String> {
    c.hosts()
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a <= b)
        .map(|(h, _)| h.name().to_owned())
        .collect()
}

/// Every container pings every other one, every host one container on each other host.
async fn ping_all(c: &Cluster, dp: Datapath, when: &str) {
    let containers = c.containers();
    let mut set = JoinSet::new();
    for from in &containers {
        for to in &containers {
            if from.ip() != to.ip() {
                let (from, to) = (from.clone(), to.clone());
                set.spawn(async move {
                    from.ping_until(to.ip(), Duration::from_secs(10))
                        .await
                        .map_err(|e| format!("{} -> {}: {e:#}", from.ip(), to.ip()))
                });
            }
        }
    }
    for h in c.hosts() {
        for other in c.hosts() {
            if let Some(to) = other
                .containers()
                .first()
                .filter(|_| other.index() != h.index())
            {
                let (ns, to, host) = (h.name().to_owned(), to.ip(), h.name().to_owned());
                set.spawn(async move {
                    ping_from_ns(&ns, to)
                        .await
                        .map_err(|e| format!("host {host} -> {to}: {e:#}"))
                });
            }
        }
    }
    crate::assert_all_ok(
        set,
        &format!("{dp}, {when}: legitimate traffic broken, pings"),
    )
    .await;
}

/// Each host's "encapsulated" counter.
async fn encapsulated(c: &Cluster) -> Vec<u64> {
    let mut per_host = Vec::new();
    for h in c.hosts() {
        per_host.push(counter(&status(h).await, "encapsulated"));
    }
    per_host
}

async fn ping_from_ns(ns: &str, to: impl Into<IpAddr>) -> anyhow::Result<()> {
    let to = to.into();
    let family = if to.is_ipv6() { "-6" } else { "-4" };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = crate::netns::run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "ping",
                family,
                "-n",
                "-c",
                "1",
                "-W",
                "2",
                &to.to_string(),
            ],
        )
        .await;
        match out {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The MAC of `dev` in namespace `ns`.
pub async fn mac(ns: &str, dev: &str) -> [u8; 6] {
    let out = crate::netns::run("ip", &["-n", ns, "-j", "link", "show", dev])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v: Value = serde_json::from_str(&out).expect("ip -j output");
    parse_mac(v[0]["address"].as_str().expect("an address"))
}

/// The port `host`'s bridge docker0 forwards `mac` to (the interface of its fdb entry), `None`
/// once it has no entry for it (never learned, or aged out).
pub async fn fdb_port(host: &Host, mac: [u8; 6]) -> Option<String> {
    let out = host
        .exec_ok(&["bridge", "-j", "fdb", "show", "br", "docker0"])
        .await
        .unwrap_or_else(|e| panic!("bridge fdb on {}: {e:#}", host.name()));
    let v: Value = serde_json::from_str(&out).expect("bridge -j output");
    v.as_array()
        .into_iter()
        .flatten()
        .find(|e| e["mac"].as_str().map(parse_mac) == Some(mac))
        .and_then(|e| e["ifname"].as_str().map(str::to_owned))
}

pub fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex MAC"))
        .collect();
    bytes.try_into().expect("6-byte MAC")
}

/// The VtepMAC of `host`'s lease in etcd: what a peer puts as inner destination.
pub async fn vtep_mac(c: &Cluster, host: &Host) -> [u8; 6] {
    let prefix = format!("{}/subnets/", c.prefix());
    for (_, value) in c.etcd().get_prefix(&prefix).await {
        let v: Value = serde_json::from_str(&value).expect("lease JSON");
        if v["PublicIP"].as_str() == Some(&host.ens32_ip().to_string()) {
            return parse_mac(v["BackendData"]["VtepMAC"].as_str().expect("VtepMAC"));
        }
    }
    panic!("no lease in etcd for {}", host.ens32_ip())
}

/// Segmentation before the wire, for the MTU scenarios: each `(host, container)` pair's
/// container side at MTU 1500 (more than the overlay's, as a misconfigured container would be),
/// and TSO/GSO off on `segmenting`'s ens32.
pub async fn oversize_mtu_without_offloads(pairs: [(&Host, &Container); 2], segmenting: &Host) {
    for (host, ct) in pairs {
        for (ns, dev) in [
            (ct.netns(), "eth0"),
            (host.name(), ct.host_veth()),
            (host.name(), "docker0"),
        ] {
            crate::netns::run("ip", &["-n", ns, "link", "set", dev, "mtu", "1500"])
                .await
                .unwrap();
        }
    }
    segmenting
        .exec_ok(&["ethtool", "-K", "ens32", "tso", "off", "gso", "off"])
        .await
        .unwrap();
}

/// Frames the underlay lost between `from` and `to` so far: (`from`'s ens32 tx dropped,
/// `to`'s ens32 rx dropped + errors).
pub async fn underlay_drops(from: &Host, to: &Host) -> (u64, u64) {
    (
        link_stat(from.name(), "ens32", "tx", "dropped").await,
        link_stat(to.name(), "ens32", "rx", "dropped").await
            + link_stat(to.name(), "ens32", "rx", "errors").await,
    )
}

/// A `ip -s -j link` statistic of `dev` in `ns`, e.g. `("tx", "dropped")`.
pub async fn link_stat(ns: &str, dev: &str, dir: &str, what: &str) -> u64 {
    let out = crate::netns::run("ip", &["-n", ns, "-s", "-j", "link", "show", dev])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v: Value = serde_json::from_str(&out).expect("ip -j output");
    v[0]["stats64"][dir][what].as_u64().unwrap_or(0)
}

/// The entries of the host's local-container map (`WEFT_LOCAL`), read from its pin.
pub fn local_map(host: &Host) -> anyhow::Result<Vec<(Ipv4Addr, LocalEndpoint)>> {
    let map: BpfHashMap<MapData, [u8; 4], LocalEndpoint> =
        BpfHashMap::try_from(pinned_map(host, map_names::LOCAL)?)?;
    map.iter()
        .map(|e| {
            let (k, v) = e?;
            Ok((Ipv4Addr::from(k), v))
        })
        .collect()
}

// ---- frames ----------------------------------------------------------------------------------------

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_8021Q: u16 = 0x8100;

/// The Internet checksum of `bytes`.
pub use crate::packet::ipv4_checksum as checksum;

/// What goes into an IPv4/UDP packet.
#[derive(Debug, Clone)]
pub struct Udp4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub tos: u8,
    pub ttl: u8,
    /// IPv4 options, a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Udp4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Udp4 {
        Udp4 {
            src,
            dst,
            sport: 40000,
            dport,
            tos: 0,
            ttl: 64,
            options: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    /// The IPv4 packet: header with a valid checksum, UDP with no checksum (valid for IPv4).
    pub fn packet(&self) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0, "IPv4 options pad to 4 bytes");
        let hlen = 20 + self.options.len();
        let total = (hlen + 8 + self.payload.len()) as u16;
        let mut ip = vec![0x40 | (hlen / 4) as u8, self.tos];
        ip.extend(total.to_be_bytes());
        ip.extend([0x12, 0x34, 0, 0, self.ttl, 17, 0, 0]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        ip.extend(&self.options);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend(self.sport.to_be_bytes());
        ip.extend(self.dport.to_be_bytes());
        ip.extend(((8 + self.payload.len()) as u16).to_be_bytes());
        ip.extend([0, 0]);
        ip.extend(&self.payload);
        ip
    }
}

/// An Ethernet frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend(dst);
    f.extend(src);
    f.extend(proto.to_be_bytes());
    f.extend(payload);
    f
}

/// An 802.1Q-tagged Ethernet frame, the tag inline.
pub fn vlan_frame(dst: [u8; 6], src: [u8; 6], vid: u16, proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut tagged = (vid & 0x0fff).to_be_bytes().to_vec();
    tagged.extend(proto.to_be_bytes());
    tagged.extend(payload);
    ethernet(dst, src, ETH_P_8021Q, &tagged)
}

pub const ETH_P_ARP: u16 = 0x0806;

/// An ARP reply frame, "`sender_ip` is at `sender_mac`", addressed to `target`.
pub fn arp_reply(
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    // Ethernet, IPv4, 6-byte hardware and 4-byte protocol addresses, operation 2 (reply).
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 2];
    arp.extend(sender_mac);
    arp.extend(sender_ip.octets());
    arp.extend(target_mac);
    arp.extend(target_ip.octets());
    ethernet(target_mac, sender_mac, ETH_P_ARP, &arp)
}

/// The link-layer address `ns` has for `ip` on `dev`, if it has a neighbour entry with one.
pub async fn neighbour(ns: &str, dev: &str, ip: Ipv4Addr) -> Option<[u8; 6]> {
    let ip = ip.to_string();
    let out = crate::netns::run("ip", &["-n", ns, "-j", "neigh", "show", &ip, "dev", dev])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v: Value = serde_json::from_str(&out).expect("ip -j output");
    v[0]["lladdr"].as_str().map(parse_mac)
}

/// A VXLAN payload (what follows the outer UDP header): I flag, `vni`, then `inner` (an Ethernet
/// frame).
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0];
    f.extend((vni << 8).to_be_bytes());
    f.extend(inner);
    f
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---- sending ---------------------------------------------------------------------------------------

fn packet_socket(protocol: u16) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(protocol.to_be()),
        )
    };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifindex(dev: &str) -> anyhow::Result<i32> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(index as i32)
}

fn link_addr(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex;
    sll
}

/// Send `frames` (whole Ethernet frames) out of `dev` in namespace `ns`, as a program with a raw
/// socket inside that namespace would. Pauses every 256 frames so a burst does not overflow the
/// receiving CPU's backlog (which would make a flood smaller than it claims).
pub async fn send_frames(ns: &str, dev: &str, frames: Vec<Vec<u8>>) {
    let dev = dev.to_owned();
    let what = format!("send {} frames on {dev} in {ns}", frames.len());
    let sender = spawn_in(ns, move || {
        let sock = packet_socket(0)?;
        let sll = link_addr(ifindex(&dev)?, 0);
        for (i, f) in frames.iter().enumerate() {
            // SAFETY: buffer and address are valid for the call.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                bail!("sendto frame {i}: {}", std::io::Error::last_os_error());
            }
            if i % 256 == 255 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    });
    join(sender)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
}

/// Options of [`send_udp`]'s socket.
#[derive(Debug, Clone, Default)]
pub struct UdpOpts {
    /// IP_TOS (ECN bits included: allowed on UDP sockets).
    pub tos: Option<u8>,
    /// IP_OPTIONS.
    pub ip_options: Vec<u8>,
    /// IP_TTL.
    pub ttl: Option<u8>,
}

/// Send each payload as one UDP datagram from `from` (bound; port 0 = any) to `to`, inside `ns`.
pub async fn send_udp(
    ns: &str,
    from: SocketAddrV4,
    to: SocketAddrV4,
    payloads: Vec<Vec<u8>>,
    opts: UdpOpts,
) {
    send_datagrams(ns, from.into(), to.into(), payloads, move |fd| {
        if let Some(tos) = opts.tos {
            setsockopt(fd, libc::IPPROTO_IP, libc::IP_TOS, &i32::from(tos))?;
        }
        if let Some(ttl) = opts.ttl {
            setsockopt(fd, libc::IPPROTO_IP, libc::IP_TTL, &i32::from(ttl))?;
        }
        if !opts.ip_options.is_empty() {
            set_bytes(fd, libc::IPPROTO_IP, libc::IP_OPTIONS, &opts.ip_options)?;
        }
        Ok(())
    })
    .await;
}

/// Sends each payload as one UDP datagram from `from` to `to` inside `ns`, on a socket that
/// `configure` (given its fd) sets up first.
async fn send_datagrams(
    ns: &str,
    from: SocketAddr,
    to: SocketAddr,
    payloads: Vec<Vec<u8>>,
    configure: impl FnOnce(i32) -> anyhow::Result<()> + Send + 'static,
) {
    let what = format!(
        "send {} UDP datagrams {from} -> {to} in {ns}",
        payloads.len()
    );
    let sender = spawn_in(ns, move || {
        let sock = UdpSocket::bind(from).with_context(|| format!("bind {from}"))?;
        configure(sock.as_raw_fd())?;
        for p in &payloads {
            sock.send_to(p, to)
                .with_context(|| format!("send to {to}"))?;
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    });
    join(sender)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, value: &T) -> anyhow::Result<()> {
    // SAFETY: value points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt {level}/{name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn set_bytes(fd: i32, level: i32, name: i32, value: &[u8]) -> anyhow::Result<()> {
    // SAFETY: value is a live slice of the given length.
    let rc =
        unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), value.len() as u32) };
    if rc != 0 {
        bail!(
            "setsockopt {level}/{name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Run `f` on a fresh thread that joined namespace `ns` (containers expose only their name).
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> JoinHandle<anyhow::Result<T>> {
    let path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file =
            std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
        // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        f()
    })
}

async fn join<T: Send + 'static>(h: JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || h.join())
        .await?
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

// ---- catching --------------------------------------------------------------------------------------

/// One frame a [`Capture`] kept.
#[derive(Debug, Clone)]
pub struct Caught {
    /// The frame as the socket saw it (an 802.1Q tag the kernel moved to metadata is not in it).
    pub data: Vec<u8>,
    /// Sent by this interface rather than received.
    pub outgoing: bool,
    /// The VLAN ID when the frame carried a tag, inline or in the skb's metadata.
    pub vlan: Option<u16>,
    /// The checksum was left to the device (`TP_STATUS_CSUMNOTREADY`): the field holds a partial
    /// sum.
    pub csum_not_ready: bool,
}

/// `struct tpacket_auxdata` (linux/if_packet.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TpacketAuxdata {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}
const PACKET_AUXDATA: i32 = 8;
const PACKET_OUTGOING: u8 = 4;
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;

/// A packet socket on one interface of one namespace that keeps every frame (either direction)
/// it is asked for, with its VLAN tag if it had one. Stops when dropped.
pub struct Capture {
    caught: Arc<Mutex<Vec<Caught>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    what: String,
}

impl Capture {
    /// Start capturing frames that contain `marker`; returns once the socket is bound.
    pub async fn start(ns: &str, dev: &str, marker: &[u8]) -> Capture {
        let marker = marker.to_vec();
        Capture::matching(ns, dev, move |frame| find(frame, &marker).is_some()).await
    }

    /// Start capturing frames `keep_it` accepts; returns once the socket is bound.
    pub async fn matching(
        ns: &str,
        dev: &str,
        keep_it: impl Fn(&[u8]) -> bool + Send + 'static,
    ) -> Capture {
        let what = format!("capture on {dev} in {ns}");
        let caught = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (keep, halt, dev) = (caught.clone(), stop.clone(), dev.to_owned());
        let thread = spawn_in(ns, move || {
            let all = libc::ETH_P_ALL as u16;
            let sock = packet_socket(all)?;
            let fd = sock.as_raw_fd();
            let sll = link_addr(ifindex(&dev)?, all);
            // SAFETY: sll is a valid sockaddr_ll.
            if unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            } != 0
            {
                bail!("bind to {dev}: {}", std::io::Error::last_os_error());
            }
            setsockopt(fd, libc::SOL_PACKET, PACKET_AUXDATA, &1i32)?;
            setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &(8i32 << 20))?;
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
            ready_tx.send(()).ok();
            let mut buf = vec![0u8; 70_000];
            while !halt.load(Ordering::Relaxed) {
                if let Some(c) = receive(fd, &mut buf)? {
                    if keep_it(&c.data) {
                        keep.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                    }
                }
            }
            Ok(())
        });
        let ready =
            tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(5)))
                .await
                .expect("join");
        let mut capture = Capture {
            caught,
            stop,
            thread: Some(thread),
            what,
        };
        if ready.is_err() {
            let err = capture.finish().err();
            panic!("{}: did not start: {err:?}", capture.what);
        }
        capture
    }

    /// What was caught so far.
    pub fn caught(&self) -> Vec<Caught> {
        self.caught
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Frames caught so far that `f` accepts.
    pub fn count(&self, f: impl Fn(&Caught) -> bool) -> usize {
        self.caught().iter().filter(|c| f(c)).count()
    }

    /// Poll until `f` accepts `n` caught frames or `timeout` passes; how many it accepts then.
    pub async fn wait(&self, n: usize, timeout: Duration, f: impl Fn(&Caught) -> bool) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.count(&f);
            if got >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("capture thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("{}: {e:#}", self.what);
        }
    }
}

/// One frame from the packet socket, `None` on timeout.
fn receive(fd: i32, buf: &mut [u8]) -> anyhow::Result<Option<Caught>> {
    // SAFETY: plain data, all-zero valid.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: plain data, all-zero valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in msg is valid for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e).context("recvmsg on the packet socket"),
        };
    }
    let data = buf[..n as usize].to_vec();
    let mut aux = TpacketAuxdata::default();
    // SAFETY: walking the control buffer the kernel filled, with the CMSG macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_PACKET && (*cmsg).cmsg_type == PACKET_AUXDATA {
                aux = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let inline_tag = data.len() >= 16 && u16::from_be_bytes([data[12], data[13]]) == ETH_P_8021Q;
    let vlan = if aux.tp_status & TP_STATUS_VLAN_VALID != 0 {
        Some(aux.tp_vlan_tci & 0x0fff)
    } else if inline_tag {
        Some(u16::from_be_bytes([data[14], data[15]]) & 0x0fff)
    } else {
        None
    };
    Ok(Some(Caught {
        data,
        outgoing: from.sll_pkttype == PACKET_OUTGOING,
        vlan,
        csum_not_ready: aux.tp_status & TP_STATUS_CSUMNOTREADY != 0,
    }))
}

/// The IPv4 header of a caught frame (after an inline VLAN tag if any): (offset, header length).
pub fn ipv4_at(frame: &[u8]) -> Option<(usize, usize)> {
    let mut at = 12;
    while frame.len() >= at + 2 && u16::from_be_bytes([frame[at], frame[at + 1]]) == ETH_P_8021Q {
        at += 4;
    }
    if frame.len() < at + 2 + 20 || u16::from_be_bytes([frame[at], frame[at + 1]]) != ETH_P_IPV4 {
        return None;
    }
    let ip = at + 2;
    let hlen = usize::from(frame[ip] & 0x0f) * 4;
    (frame[ip] >> 4 == 4 && hlen >= 20 && frame.len() >= ip + hlen).then_some((ip, hlen))
}

/// Datagrams a UDP socket bound in a namespace received (after reassembly), collected until drop.
pub struct UdpSink {
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl UdpSink {
    /// Bind `ip:port` inside container `c`.
    pub async fn bind(c: &Container, port: u16) -> UdpSink {
        UdpSink::bind_at(c.netns(), (c.ip(), port).into()).await
    }

    /// Bind `addr` inside namespace `ns` (a container's IPv6 address, say).
    pub async fn bind_at(ns: &str, addr: SocketAddr) -> UdpSink {
        let (got, stop) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(AtomicBool::new(false)),
        );
        let (keep, halt) = (got.clone(), stop.clone());
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = ns.to_owned();
        let thread = spawn_in(&ns, move || {
            let sock = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            ready_tx.send(()).ok();
            let mut buf = vec![0u8; 70_000];
            while !halt.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    keep.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(buf[..n].to_vec());
                }
            }
            Ok(())
        });
        tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(5)))
            .await
            .expect("join")
            .unwrap_or_else(|_| panic!("UDP sink on {ns} did not bind"));
        UdpSink {
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far that equal `payload`.
    pub fn count(&self, payload: &[u8]) -> usize {
        self.got
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|d| d.as_slice() == payload)
            .count()
    }

    /// Poll until `n` copies of `payload` arrived or `timeout` passes; how many did.
    pub async fn wait(&self, payload: &[u8], n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.count(payload);
            if got >= n || Instant::now() > deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- comparing -------------------------------------------------------------------------------------

/// How the eBPF path's figure for one case must relate to the kernel path's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// eBPF lands no more packets here than the kernel path: equal or stricter.
    NoMoreThanKernel,
    /// eBPF does exactly what the kernel path does (legitimate traffic, faithful headers).
    SameAsKernel,
    /// Both datapaths show exactly this value.
    Exactly(u64),
    /// A property only the eBPF path has (its maps, its counters): eBPF shows exactly this value.
    EbpfExactly(u64),
}

/// What one scenario observed on one datapath: a figure per case (packets landed somewhere, a
/// header field, 1/0 for yes/no) and free-text notes for the failure message.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub figures: BTreeMap<String, u64>,
    pub notes: Vec<String>,
}

impl Observed {
    pub fn set(&mut self, case: &str, value: u64) {
        self.figures.insert(case.to_owned(), value);
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }
}

/// Checks every `(case, rule)` of each eBPF datapath's figures against the kernel's; panics with
/// one table of every case (every figure, verdict) and every datapath's notes when any rule is
/// broken or a figure is missing.
pub fn compare(kernel: &Observed, ebpf: &[(Datapath, Observed)], rules: &[(&str, Rule)]) {
    let mut table = Vec::new();
    let mut broken = 0;
    let figure = |o: &Observed, case: &str| o.figures.get(case).copied();
    let shown = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    for (case, rule) in rules {
        let k = figure(kernel, case);
        let mut ok = true;
        let mut row = format!("kernel {}", shown(k));
        for (dp, o) in ebpf {
            let e = figure(o, case);
            ok &= match (k, e, rule) {
                (Some(k), Some(e), Rule::NoMoreThanKernel) => e <= k,
                (Some(k), Some(e), Rule::SameAsKernel) => e == k,
                (Some(k), Some(e), Rule::Exactly(n)) => k == *n && e == *n,
                (_, Some(e), Rule::EbpfExactly(n)) => e == *n,
                _ => false,
            };
            row.push_str(&format!(" / {dp} {}", shown(e)));
        }
        broken += usize::from(!ok);
        table.push(format!(
            "  {:<4} {case}: {row}  ({rule:?})",
            if ok { "ok" } else { "FAIL" }
        ));
    }
    let notes = |o: &Observed| match o.notes.is_empty() {
        true => "(none)".to_owned(),
        false => o.notes.join("\n  "),
    };
    let mut report = format!("{}\nkernel notes:\n  {}", table.join("\n"), notes(kernel));
    for (dp, o) in ebpf {
        report.push_str(&format!("\n{dp} notes:\n  {}", notes(o)));
    }
    assert!(
        broken == 0,
        "{broken} of {} cases broken:\n{report}",
        rules.len()
    );
    eprintln!("{report}");
}

// ---- a scenario on every datapath (both suites) ----------------------------------------------------

/// How many copies of each probe an attack sends.
pub const PROBES: usize = 5;
/// Where probes are aimed inside a container.
pub const PORT: u16 = 9999;
/// How long to wait for probes that should arrive.
pub const ARRIVAL: Duration = Duration::from_secs(5);
/// After the fence (a legitimate packet sent last on the same path) has arrived, how long to wait
/// for stragglers: a packet the eBPF path handed to the kernel may arrive just after a fence that
/// took the fast path.
pub const SETTLE: Duration = Duration::from_millis(300);

/// Runs `scenario` on a kernel cluster and on an eBPF cluster with each decapsulation hook, all
/// at once, and holds each eBPF cluster's figures to `rules` against the kernel's.
pub async fn on_every_datapath<F, Fut>(scenario: F, rules: &[(&str, Rule)])
where
    F: Fn(Datapath) -> Fut,
    Fut: std::future::Future<Output = Observed>,
{
    let [tc, xdp] = Datapath::EBPF;
    let (kernel, on_tc, on_xdp) =
        tokio::join!(scenario(Datapath::Kernel), scenario(tc), scenario(xdp));
    compare(&kernel, &[(tc, on_tc), (xdp, on_xdp)], rules);
}

/// A payload unique to this test process and `what`.
pub fn marker(what: &str) -> Vec<u8> {
    format!("weft-adversarial-{}-{what}", std::process::id()).into_bytes()
}

/// `sink` received the fence (a legitimate packet sent after the attack on the same path), then
/// the stragglers' grace passed: how many `attack` payloads landed.
pub async fn landed_before_fence(
    dp: Datapath,
    sink: &UdpSink,
    attack: &[u8],
    fence: &[u8],
    case: &str,
) -> u64 {
    fence_arrived(dp, sink, fence, case).await;
    sink.count(attack) as u64
}

/// Waits for the fence in `sink`, then for the stragglers' grace. Panics when the fence is lost:
/// legitimate traffic must flow.
pub async fn fence_arrived(dp: Datapath, sink: &UdpSink, fence: &[u8], case: &str) {
    assert_eq!(
        sink.wait(fence, 1, ARRIVAL).await,
        1,
        "{dp}, {case}: the legitimate fence packet never arrived"
    );
    tokio::time::sleep(SETTLE).await;
}

/// Notes which of `host`'s program counters moved since `before` (nothing on the kernel path):
/// the reason the eBPF path gives for what it did.
pub async fn note_counters(o: &mut Observed, host: &Host, before: &BTreeMap<String, u64>) {
    let moved = counters_since(&counters(host).await, before);
    if !moved.is_empty() {
        o.note(format!("{} counters moved: {moved:?}", host.name()));
    }
}

/// Runs `send` (`n` copies of `probe` to an owner whose `in_owner` sink listens) and says where
/// they landed: (in the owner, arriving on `attacker`'s eth0), once all `n` landed somewhere or
/// [`ARRIVAL`] passed, and then the stragglers' grace. Short is not a failure here: the figures
/// go to the rules, which say how many had to land where.
pub async fn where_it_lands(
    in_owner: &UdpSink,
    attacker: &Container,
    probe: &[u8],
    n: usize,
    send: impl std::future::Future<Output = ()>,
) -> (u64, u64) {
    let in_attacker = Capture::start(attacker.netns(), "eth0", probe).await;
    send.await;
    let landed = || (in_owner.count(probe), in_attacker.count(|f| !f.outgoing));
    let what = format!("{n} probes to land in the owner or the attacker");
    let _ = crate::poll::try_until(&what, ARRIVAL, || async {
        let (o, a) = landed();
        crate::poll::check(o + a >= n, (o, a))
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let (o, a) = landed();
    (o as u64, a as u64)
}

/// The hijack cases, on either family: `3 * PROBES` probes (as [`where_it_lands`] counts them)
/// to A after B forged A's address once, again after host 1 forgot its neighbour entry for A,
/// and to the new owner C of an address B claimed first: all land in the owner, none in B.
pub const HIJACK_RULES: [(&str, Rule); 6] = [
    ("A's traffic: landed in A", Rule::Exactly(3 * PROBES as u64)),
    ("A's traffic: landed in B", Rule::Exactly(0)),
    (
        "A's traffic, no neighbour entry: landed in A",
        Rule::Exactly(3 * PROBES as u64),
    ),
    (
        "A's traffic, no neighbour entry: landed in B",
        Rule::Exactly(0),
    ),
    (
        "claimed address: landed in its new owner C",
        Rule::Exactly(3 * PROBES as u64),
    ),
    ("claimed address: landed in B", Rule::Exactly(0)),
];

/// The VLAN hopping cases, on either family ([`record_vlan`]): [`PROBES`] tagged frames from a
/// container on host 1 never leave host 1 tagged and never reach the remote container.
pub const VLAN_RULES: [(&str, Rule); 4] = [
    (
        "frames with the tagged payload on host 1's ens32",
        Rule::NoMoreThanKernel,
    ),
    ("tagged frames on host 1's ens32", Rule::Exactly(0)),
    (
        "frames with the tagged payload in the remote container",
        Rule::Exactly(0),
    ),
    (
        "\"passed: vlan tagged\" on host 1 per tagged frame sent (x5)",
        Rule::EbpfExactly(PROBES as u64),
    ),
];

/// Records the [`VLAN_RULES`] figures: what `wire` (host 1's ens32) and `there` (the remote
/// container's eth0) caught of the tagged payload, and how many tagged frames `h1`'s programs
/// counted since `before`.
pub async fn record_vlan(
    o: &mut Observed,
    h1: &Host,
    (wire, there): (&Capture, &Capture),
    before: &BTreeMap<String, u64>,
) {
    let out = wire.caught();
    o.note(format!(
        "on host 1's ens32: {:?}",
        out.iter().map(|f| f.vlan).collect::<Vec<_>>()
    ));
    o.set(VLAN_RULES[0].0, out.len() as u64);
    o.set(
        VLAN_RULES[1].0,
        out.iter().filter(|f| f.vlan.is_some()).count() as u64,
    );
    o.set(VLAN_RULES[2].0, there.count(|f| !f.outgoing) as u64);
    // The port's program and then docker0's see each frame (the bridge passes it up): one count.
    let moved = counters_since(&counters(h1).await, before);
    o.set(
        VLAN_RULES[3].0,
        moved.get("passed: vlan tagged").copied().unwrap_or(0),
    );
}

/// ECN codepoints (RFC 3168), the two low bits of the TOS / traffic class.
pub const NOT_ECT: u8 = 0;
pub const ECT1: u8 = 1;
pub const ECT0: u8 = 2;
pub const CE: u8 = 3;

pub fn ecn_name(ecn: u8) -> &'static str {
    ["Not-ECT", "ECT(1)", "ECT(0)", "CE"][usize::from(ecn & 3)]
}

/// Records what arrived of `case` ([`ecn_case`]): how many copies, and the ECN they all arrived
/// with (99, which no ECN value is, when they differ or none arrived).
pub fn record_ecn(o: &mut Observed, case: &str, ecns: &[u8]) {
    o.set(&format!("{case}: delivered"), ecns.len() as u64);
    o.note(format!(
        "{case}: arrived as {:?}",
        ecns.iter().map(|e| ecn_name(*e)).collect::<Vec<_>>()
    ));
    let ecn = match ecns.first() {
        Some(first) if ecns.iter().all(|e| e == first) => u64::from(*first),
        _ => 99,
    };
    o.set(&format!("{case}: ECN on arrival"), ecn);
}

/// The case name of a VXLAN packet with `outer` ECN carrying `inner`.
pub fn ecn_case(outer: u8, inner: u8) -> String {
    format!("ECN outer {} + inner {}", ecn_name(outer), ecn_name(inner))
}

// ---- IPv6 (tests/tests/adversarial6.rs) -----------------------------------------------------------

/// The dual-stack network config of the IPv6 adversarial suite.
pub const CONFIG_DUAL: &str = r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#;
/// The same IPv6 network without IPv4 (`EnableIPv4: false`).
pub const CONFIG_IPV6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#;

pub use crate::packet::ETH_P_IPV6;

/// A dual-stack cluster: every container with its IPv6 address, in [`Cluster::containers`] order.
pub struct DualStack {
    pub c: Cluster,
    pub v6: Vec<(Container, Ipv6Addr)>,
}

impl DualStack {
    /// The `i`-th container's IPv6 address.
    pub fn v6(&self, i: usize) -> Ipv6Addr {
        self.v6[i].1
    }
}

/// [`start`] on the dual-stack network: `hosts` hosts, `per_host` containers each with both
/// families; returns once every container answers every other one over both and, on eBPF, every
/// host's programs carry both families.
pub async fn start_dual(dp: Datapath, hosts: usize, per_host: usize, extra: &[&str]) -> DualStack {
    let c = Cluster::start(ClusterOptions::new(hosts))
        .await
        .unwrap_or_else(|e| panic!("build a {hosts}-host cluster for {dp}: {e:#}"));
    c.write_config(CONFIG_DUAL).await;
    // Docker gives docker0 a MAC of its own, so a new port never changes it (a bare bridge takes
    // its ports' lowest, and each change flushes docker0's neighbours, and with them every
    // binding); pinned before any container exists.
    for h in c.hosts() {
        let own = mac(h.name(), "docker0")
            .await
            .map(|b| format!("{b:02x}"))
            .join(":");
        h.netns()
            .ip(&["link", "set", "docker0", "address", &own])
            .await
            .unwrap_or_else(|e| panic!("pin docker0's MAC on {}: {e:#}", h.name()));
    }
    let mut args = dp.args().to_vec();
    args.extend_from_slice(extra);
    c.start_agents(&args)
        .unwrap_or_else(|e| panic!("start the {dp} agents: {e:#}"));
    c.add_containers(per_host)
        .await
        .unwrap_or_else(|e| panic!("add containers on {dp}: {e:#}"));
    let mut v6 = Vec::new();
    for h in c.hosts() {
        let added = h
            .enable_ipv6()
            .await
            .unwrap_or_else(|e| panic!("IPv6 for {}'s containers on {dp}: {e:#}", h.name()));
        v6.extend(added);
    }
    if dp.is_ebpf() {
        for h in c.hosts() {
            wait_ebpf_ready(h, hosts - 1).await;
        }
    }
    let d = DualStack { c, v6 };
    match dp {
        Datapath::Kernel => {
            ping_all(&d.c, dp, "at start").await;
            ping_all6(&d, dp, "at start").await;
        }
        Datapath::Ebpf | Datapath::EbpfXdp => {
            wait_fast_path(&d.c, dp).await;
            wait_fast_path6(&d, dp).await;
        }
    }
    d
}

/// Legitimate traffic after an attack, both families: every container answers every other one
/// (and every host a container on each other host), and on eBPF every host's programs carry
/// both families again within one reconcile interval (an attack that made the kernel forget a
/// neighbour unbinds it until the kernel learns it again, as traffic flows).
pub async fn legit_traffic_flows6(d: &DualStack, dp: Datapath, when: &str) {
    ping_all(&d.c, dp, when).await;
    ping_all6(d, dp, when).await;
    if dp.is_ebpf() {
        wait_fast_path(&d.c, dp).await;
        wait_fast_path6(d, dp).await;
    }
}

/// The IPv6 encapsulation counter's name in `weft status`.
pub const ENCAPSULATED6: &str = "ipv6: encapsulated";

/// [`wait_fast_path`] over IPv6: until every host's programs encapsulate its containers' IPv6.
async fn wait_fast_path6(d: &DualStack, dp: Datapath) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = counter_per_host(&d.c, ENCAPSULATED6).await;
        ping_all6(d, dp, "at start").await;
        let after = counter_per_host(&d.c, ENCAPSULATED6).await;
        let idle = idle_hosts(&d.c, &before, &after);
        if idle.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{dp}: the fast path never carried the IPv6 traffic of {idle:?} within 15 s (of \
                 the containers' start, or of the end of an attack) ({before:?} -> {after:?})"
            );
        }
    }
}

/// Every container pings every other one over IPv6, every host one container on each other host.
async fn ping_all6(d: &DualStack, dp: Datapath, when: &str) {
    let mut set = JoinSet::new();
    for (from, _) in &d.v6 {
        for (_, to) in d.v6.iter().filter(|(c, _)| c.netns() != from.netns()) {
            let (from, to) = (from.clone(), *to);
            set.spawn(async move {
                from.ping_until(to, Duration::from_secs(10))
                    .await
                    .map_err(|e| format!("{} -> {to}: {e:#}", from.netns()))
            });
        }
    }
    for h in d.c.hosts() {
        for other in d.c.hosts().iter().filter(|o| o.index() != h.index()) {
            let first = other.containers().first().map(|c| c.netns().to_owned());
            let Some(to) =
                d.v6.iter()
                    .find(|(c, _)| Some(c.netns()) == first.as_deref())
            else {
                continue;
            };
            let (ns, to) = (h.name().to_owned(), to.1);
            set.spawn(async move {
                ping_from_ns(&ns, to)
                    .await
                    .map_err(|e| format!("host {ns} -> {to}: {e:#}"))
            });
        }
    }
    crate::assert_all_ok(
        set,
        &format!("{dp}, {when}: legitimate IPv6 traffic broken, pings"),
    )
    .await;
}

/// Each host's counter `name`.
pub async fn counter_per_host(c: &Cluster, name: &str) -> Vec<u64> {
    let mut per_host = Vec::new();
    for h in c.hosts() {
        per_host.push(counter(&status(h).await, name));
    }
    per_host
}

/// The `BackendV6Data.VtepMAC` of `host`'s lease (its flannel-v6.1): a peer's inner destination.
pub async fn vtep_mac6(c: &Cluster, host: &Host) -> [u8; 6] {
    let prefix = format!("{}/subnets/", c.prefix());
    for (_, value) in c.etcd().get_prefix(&prefix).await {
        let v: Value = serde_json::from_str(&value).expect("lease JSON");
        if v["PublicIPv6"].as_str() == Some(&host.ens32_ipv6().to_string()) {
            return parse_mac(v["BackendV6Data"]["VtepMAC"].as_str().expect("VtepMAC"));
        }
    }
    panic!("no lease in etcd for {}", host.ens32_ipv6())
}

/// The host's `FLANNEL_IPV6_SUBNET` once its subnet file holds one.
pub async fn ipv6_subnet(host: &Host) -> ipnet::Ipv6Net {
    crate::poll::until(
        &format!("FLANNEL_IPV6_SUBNET in {}'s subnet file", host.name()),
        READY_TIMEOUT,
        || async {
            let text = std::fs::read_to_string(host.subnet_file()).map_err(|e| e.to_string())?;
            text.lines()
                .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
                .and_then(|s| s.parse().ok())
                .ok_or(text)
        },
    )
    .await
}

/// A container on `host`'s docker0 for an IPv6-only network, IPv6 address `::(n+2)` of the host's
/// IPv6 subnet (docker0 gets `::1`, as [`Host::enable_ipv6`] gives it). Docker gives every
/// container an IPv4 address on its bridge even then; this one's is from TEST-NET-1
/// (192.0.2.0/24), which no lease covers and nothing routes.
pub async fn ipv6_only_container(host: &Host, n: u8) -> (Container, Ipv6Addr) {
    let subnet = ipv6_subnet(host).await;
    host.enable_ipv6()
        .await
        .unwrap_or_else(|e| panic!("docker0's IPv6 address on {}: {e:#}", host.name()));
    let name = format!("{}-v6c{n}", host.name());
    let ct = Container::create(
        &name,
        host.netns(),
        &format!("veth6only{n}"),
        Ipv4Addr::new(192, 0, 2, 2 + n),
        24,
        Ipv4Addr::new(192, 0, 2, 1),
        1450,
    )
    .await
    .unwrap_or_else(|e| panic!("create container {name}: {e:#}"));
    let ip = Ipv6Addr::from(u128::from(subnet.network()) + 2 + u128::from(n));
    ct.add_ipv6(ip, subnet.prefix_len(), subnet.addr())
        .await
        .unwrap_or_else(|e| panic!("IPv6 {ip} for {name}: {e:#}"));
    (ct, ip)
}

/// Options of [`send_udp6`]'s socket.
#[derive(Debug, Clone, Default)]
pub struct Udp6Opts {
    /// IPV6_TCLASS (ECN bits included: allowed on UDP sockets).
    pub tclass: Option<u8>,
    /// IPV6_UNICAST_HOPS.
    pub hops: Option<u8>,
}

/// [`send_udp`] over IPv6.
pub async fn send_udp6(
    ns: &str,
    from: SocketAddrV6,
    to: SocketAddrV6,
    payloads: Vec<Vec<u8>>,
    opts: Udp6Opts,
) {
    send_datagrams(ns, from.into(), to.into(), payloads, move |fd| {
        if let Some(tclass) = opts.tclass {
            setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_TCLASS,
                &i32::from(tclass),
            )?;
        }
        if let Some(hops) = opts.hops {
            setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_UNICAST_HOPS,
                &i32::from(hops),
            )?;
        }
        Ok(())
    })
    .await;
}

/// How long a TCP transfer over IPv6 may take to connect, and between two reads.
const TCP6_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `bytes` bytes over one TCP connection from container `from` to container `to` at its
/// IPv6 address `dst`; the receiver checks every byte arrived intact and in order. Returns how
/// long it took.
pub async fn tcp6_transfer(
    from: &Container,
    to: &Container,
    dst: Ipv6Addr,
    bytes: usize,
) -> anyhow::Result<Duration> {
    use std::io::{Read as _, Write as _};
    // A sequence that never repeats within 64 KiB windows, so a misplaced segment shows.
    let data: Arc<Vec<u8>> = Arc::new(
        (0..bytes)
            .map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8)
            .collect(),
    );
    let (port_tx, port_rx) = mpsc::channel();
    let expected = data.clone();
    let server = spawn_in(to.netns(), move || {
        let listener =
            std::net::TcpListener::bind((dst, 0)).with_context(|| format!("listen on {dst}"))?;
        port_tx.send(listener.local_addr()?.port()).ok();
        let mut ready = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut ready, 1, TCP6_TIMEOUT.as_millis() as i32) } != 1 {
            bail!("no connection to {dst} within {TCP6_TIMEOUT:?}");
        }
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(TCP6_TIMEOUT))?;
        let mut got = Vec::with_capacity(expected.len());
        stream.read_to_end(&mut got).context("receive")?;
        match got.iter().zip(expected.iter()).position(|(a, b)| a != b) {
            Some(at) => bail!("byte {at} differs"),
            None if got.len() != expected.len() => {
                bail!("{} of {} bytes arrived", got.len(), expected.len())
            }
            None => Ok(()),
        }
    });
    let port = tokio::task::spawn_blocking(move || port_rx.recv_timeout(Duration::from_secs(5)))
        .await?
        .context("the receiver did not listen")?;
    let start = Instant::now();
    let to_addr = SocketAddr::from((dst, port));
    let client = spawn_in(from.netns(), move || {
        let mut stream = std::net::TcpStream::connect_timeout(&to_addr, TCP6_TIMEOUT)
            .with_context(|| format!("connect to {to_addr}"))?;
        stream.set_write_timeout(Some(TCP6_TIMEOUT))?;
        stream.write_all(&data).context("send")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let what = format!("TCP over IPv6, {bytes} bytes {} -> {to_addr}", from.netns());
    join(client).await.with_context(|| what.clone())?;
    join(server).await.with_context(|| what.clone())?;
    Ok(start.elapsed())
}

/// The IPv6 header of a caught frame (after an inline VLAN tag if any): its offset.
pub fn ipv6_at(frame: &[u8]) -> Option<usize> {
    let mut at = 12;
    while frame.len() >= at + 2 && u16::from_be_bytes([frame[at], frame[at + 1]]) == ETH_P_8021Q {
        at += 4;
    }
    let ip = at + 2;
    (frame.len() >= ip + 40
        && u16::from_be_bytes([frame[at], frame[at + 1]]) == ETH_P_IPV6
        && frame[ip] >> 4 == 6)
        .then_some(ip)
}

/// The ECN bits of a caught IPv6 frame's traffic class.
pub fn ecn6(frame: &[u8]) -> Option<u8> {
    ipv6_at(frame).map(|ip| (frame[ip + 1] >> 4) & 3)
}

/// The hop limit of a caught IPv6 frame.
pub fn hop_limit6(frame: &[u8]) -> Option<u8> {
    ipv6_at(frame).map(|ip| frame[ip + 7])
}

/// The ICMPv6 type and the 32-bit word after the checksum (the MTU of a Packet Too Big) of a
/// caught frame whose IPv6 header is followed directly by ICMPv6.
pub fn icmpv6(frame: &[u8]) -> Option<(u8, u32)> {
    let ip = ipv6_at(frame)?;
    let m = frame.get(ip + 40..ip + 48)?;
    (frame[ip + 6] == crate::packet::ICMPV6)
        .then(|| (m[0], u32::from_be_bytes([m[4], m[5], m[6], m[7]])))
}

/// The map `name` the host's agent pinned.
fn pinned_map(host: &Host, name: &str) -> anyhow::Result<Map> {
    let path = host.bpf_pin_dir().join("maps").join(name);
    MapData::from_pin(&path)
        .map_err(anyhow::Error::from)
        .and_then(|m| Map::from_map_data(m).map_err(anyhow::Error::from))
        .with_context(|| format!("open {}", path.display()))
}

/// The host's IPv6 local-container map (`WEFT_LOCAL6`), read from its pin.
pub fn local_map6(host: &Host) -> anyhow::Result<Vec<(Ipv6Addr, LocalEndpoint)>> {
    let map: BpfHashMap<MapData, [u8; 16], LocalEndpoint> =
        BpfHashMap::try_from(pinned_map(host, map_names6::LOCAL6)?)?;
    map.iter()
        .map(|e| {
            let (k, v) = e?;
            Ok((Ipv6Addr::from(k), v))
        })
        .collect()
}

/// What the host's peer maps hold, read from their pins: remote subnets as `addr/len -> VTEP`
/// and the known VTEPs, IPv4 (`WEFT_REMOTES`, `WEFT_VTEPS`) then IPv6 (`WEFT_REMOTES6`,
/// `WEFT_VTEPS6`), as text.
pub fn peer_maps(host: &Host) -> anyhow::Result<PeerMaps> {
    let remotes: LpmTrie<MapData, Ipv4LpmData, PeerValue> =
        LpmTrie::try_from(pinned_map(host, map_names::REMOTES)?)?;
    let vteps: BpfHashMap<MapData, [u8; 4], VtepValue> =
        BpfHashMap::try_from(pinned_map(host, map_names::KNOWN_VTEPS)?)?;
    let remotes6: LpmTrie<MapData, Ipv6LpmData, PeerValue6> =
        LpmTrie::try_from(pinned_map(host, map_names6::REMOTES6)?)?;
    let vteps6: BpfHashMap<MapData, [u8; 16], VtepValue> =
        BpfHashMap::try_from(pinned_map(host, map_names6::KNOWN_VTEPS6)?)?;
    let mut m = PeerMaps::default();
    for e in remotes.iter() {
        let (k, v) = e?;
        let (net, vtep) = (
            Ipv4Addr::from(k.data().addr_be),
            Ipv4Addr::from(v.vtep_ip_be),
        );
        m.remotes
            .push(format!("{net}/{} -> {vtep}", k.prefix_len()));
    }
    for e in remotes6.iter() {
        let (k, v) = e?;
        let (net, vtep) = (
            Ipv6Addr::from(k.data().addr_be),
            Ipv6Addr::from(v.vtep_ip_be),
        );
        m.remotes
            .push(format!("{net}/{} -> {vtep}", k.prefix_len()));
    }
    for k in vteps.keys() {
        m.vteps.push(Ipv4Addr::from(k?).to_string());
    }
    for k in vteps6.keys() {
        m.vteps.push(Ipv6Addr::from(k?).to_string());
    }
    Ok(m)
}

/// [`peer_maps`]' answer: both families' entries as text.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerMaps {
    /// `subnet/len -> VTEP`, IPv4 then IPv6.
    pub remotes: Vec<String>,
    /// Known VTEP addresses, IPv4 then IPv6.
    pub vteps: Vec<String>,
}

impl PeerMaps {
    /// Whether any entry names `what` (a subnet's `addr/len`, or a VTEP address).
    pub fn mentions(&self, what: &str) -> bool {
        self.remotes
            .iter()
            .any(|r| r.split(" -> ").any(|part| part == what))
            || self.vteps.iter().any(|v| v == what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 2);

    #[test]
    fn udp4_packets_carry_options_and_a_valid_header_checksum() {
        let mut udp = Udp4::new(A, B, 9999, b"probe");
        udp.options = vec![1, 1, 1, 0];
        let p = udp.packet();
        assert_eq!(p[0], 0x46, "version 4, 24-byte header");
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(checksum(&p[..24]), 0, "header checksum");
        assert_eq!(&p[24..26], &40000u16.to_be_bytes());
        assert_eq!(&p[26..28], &9999u16.to_be_bytes());
        assert!(p.ends_with(b"probe"));
    }

    #[test]
    fn ipv4_is_found_behind_inline_vlan_tags() {
        let packet = Udp4::new(A, B, 9, b"x").packet();
        let plain = ethernet([2; 6], [4; 6], ETH_P_IPV4, &packet);
        assert_eq!(ipv4_at(&plain), Some((14, 20)));
        let tagged = vlan_frame([2; 6], [4; 6], 5, ETH_P_IPV4, &packet);
        assert_eq!(ipv4_at(&tagged), Some((18, 20)));
        assert_eq!(ipv4_at(&plain[..30]), None, "truncated header");
    }

    fn observed(figures: &[(&str, u64)]) -> Observed {
        let mut o = Observed::default();
        for (case, value) in figures {
            o.set(case, *value);
        }
        o
    }

    #[test]
    fn compare_fails_an_ebpf_path_looser_than_the_kernel() {
        let kernel = observed(&[("landed", 0), ("ttl", 64)]);
        let same = observed(&[("landed", 0), ("ttl", 64)]);
        let rules = [
            ("landed", Rule::NoMoreThanKernel),
            ("ttl", Rule::SameAsKernel),
        ];
        compare(&kernel, &[(Datapath::Ebpf, same.clone())], &rules);
        let looser = observed(&[("landed", 3), ("ttl", 64)]);
        let missing = observed(&[("landed", 0)]);
        for bad in [looser, missing] {
            let result = std::panic::catch_unwind(|| {
                compare(
                    &kernel,
                    &[(Datapath::Ebpf, same.clone()), (Datapath::EbpfXdp, bad)],
                    &rules,
                )
            });
            assert!(result.is_err(), "compare accepted a broken rule");
        }
    }
}
