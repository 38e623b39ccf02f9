//! The eBPF datapath end to end: 3-host clusters on the harness (real etcd, `weft agent` as real
//! processes in host namespaces, containers on docker0), asserting what a user would notice:
//! containers reach each other, bytes arrive intact, `weft status` counters prove which path carried
//! the traffic, spoofed VXLAN is dropped, restarts lose no packet, `--cleanup` and a detached program
//! leave the overlay working, and `--datapath auto` falls back with a reason. Root only:
//! `cargo xtask test` runs it; this file alone, after `cargo xtask build-ebpf && cargo build -p
//! weft`: `WEFT_BIN=<target>/debug/weft cargo test -p weft-tests --test ebpf_datapath`.
//!
//! "Which path" is read from two independent sources: the programs' own per-CPU counters (`weft
//! status --json`) and the kernel's packet counters of `flannel.1` (`ip -s -j link`), which move
//! only when the kernel vxlan device encapsulates or decapsulates.

use std::net::{Ipv4Addr, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use tokio::task::JoinSet;
mod headroom;

use headroom::{link_in, DEVICE, VXLAN_OVERHEAD};
use weft_tests::attack;
use weft_tests::status::{counter, ebpf_ready};
use weft_tests::{cluster, flanneld, tail, weft_bin, Agent, Cluster, Container, Host, Netns};

const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#;
const VXLAN_PORT: u16 = 8472;
const MB: usize = 1 << 20;
/// How long a host may take from agent start to programs attached with every peer in the maps.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

// ---- weft status and flannel.1 counters -----------------------------------------------------------

/// `weft status --json --bpf-pin-dir <host's pin dir>`, run inside the host's namespace.
async fn status(host: &Host) -> Value {
    status_at(host, &host.bpf_pin_dir()).await
}

async fn status_at(host: &Host, pin_dir: &std::path::Path) -> Value {
    let bin = weft_bin().expect("weft binary");
    let out = host
        .exec_ok(&[
            &bin.display().to_string(),
            "status",
            "--json",
            "--bpf-pin-dir",
            &pin_dir.display().to_string(),
        ])
        .await
        .unwrap_or_else(|e| panic!("weft status on {}: {e:#}", host.name()));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("weft status --json: {e}:\n{out}"))
}

/// The counters that tell the paths apart, as one comparable snapshot.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    encapsulated: u64,
    decapsulated: u64,
    too_big: u64,
    unknown_source: u64,
    wrong_vni: u64,
    /// flannel.1's own packet counters.
    flannel_tx: u64,
    flannel_rx: u64,
}

impl Seen {
    async fn of(host: &Host) -> Seen {
        let st = status(host).await;
        let (flannel_tx, flannel_rx) = flannel_packets(host).await;
        Seen {
            encapsulated: counter(&st, "encapsulated"),
            decapsulated: counter(&st, "decapsulated"),
            too_big: counter(&st, "passed: too big"),
            unknown_source: counter(&st, "dropped: unknown source"),
            wrong_vni: counter(&st, "dropped: wrong vni"),
            flannel_tx,
            flannel_rx,
        }
    }

    fn since(self, before: Seen) -> Seen {
        Seen {
            encapsulated: self.encapsulated - before.encapsulated,
            decapsulated: self.decapsulated - before.decapsulated,
            too_big: self.too_big - before.too_big,
            unknown_source: self.unknown_source - before.unknown_source,
            wrong_vni: self.wrong_vni - before.wrong_vni,
            flannel_tx: self.flannel_tx - before.flannel_tx,
            flannel_rx: self.flannel_rx - before.flannel_rx,
        }
    }
}

/// flannel.1's (tx, rx) packet counters from `ip -s -j link show flannel.1`.
async fn flannel_packets(host: &Host) -> (u64, u64) {
    let out = host
        .netns()
        .ip(&["-s", "-j", "link", "show", "flannel.1"])
        .await
        .unwrap_or_else(|e| panic!("flannel.1 on {}: {e:#}", host.name()));
    let v: Value = serde_json::from_str(&out).expect("ip -j output");
    let stats = &v[0]["stats64"];
    (
        stats["tx"]["packets"].as_u64().expect("tx packets"),
        stats["rx"]["packets"].as_u64().expect("rx packets"),
    )
}

/// Poll `weft status` until `ok` holds; the last status in the panic message otherwise.
async fn wait_status(
    host: &Host,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let st = status(host).await;
        if ok(&st) {
            return st;
        }
        if Instant::now() > deadline {
            let log = host.agent().map(|a| a.log()).unwrap_or_default();
            panic!(
                "{}: not {what} within {timeout:?}; weft status:\n{st:#}\nagent log:\n{}",
                host.name(),
                tail(&log, 60)
            );
        }
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_ebpf_ready(host: &Host, peers: usize) -> Value {
    wait_status(
        host,
        &format!("on eBPF with {peers} peers"),
        READY_TIMEOUT,
        |st| ebpf_ready(st, peers),
    )
    .await
}

/// Each container's first packet (here: to its gateway, so nothing crosses the overlay) gives the
/// host the neighbour and forwarding entries the eBPF path binds it by; waits until the agent,
/// woken by those netlink events, has bound them all. Until then a container's traffic to other
/// hosts takes the kernel path (flannel.1).
async fn bind_containers(host: &Host) {
    let containers = host.containers();
    for ct in &containers {
        ct.ping(ct.gateway()).await.unwrap();
    }
    let n = containers.len();
    wait_status(
        host,
        &format!("with {n} containers bound"),
        READY_TIMEOUT,
        |st| st["local_bindings"].as_array().map_or(0, Vec::len) >= n,
    )
    .await;
}

// ---- clusters --------------------------------------------------------------------------------------

/// A cluster whose hosts all run `weft agent --datapath ebpf <extra>`, `per_host` containers each,
/// every host's programs attached with every peer in its maps.
async fn ebpf_cluster(hosts: usize, per_host: usize, extra: &[&str]) -> Cluster {
    ebpf_cluster_each(hosts, per_host, |_| extra.to_vec()).await
}

/// [`ebpf_cluster`] with flags per host: `extra(i)` for host `i`.
async fn ebpf_cluster_each<'a>(
    hosts: usize,
    per_host: usize,
    extra: impl Fn(usize) -> Vec<&'a str>,
) -> Cluster {
    let c = cluster(hosts).await;
    c.write_config(CONFIG).await;
    for (i, h) in c.hosts().iter().enumerate() {
        let mut args = vec!["--datapath", "ebpf"];
        args.extend(extra(i));
        h.spawn_agent(&args).unwrap();
    }
    c.add_containers(per_host).await.unwrap();
    for h in c.hosts() {
        wait_ebpf_ready(h, hosts - 1).await;
        bind_containers(h).await;
    }
    c
}

/// Every (from, to) pair of containers on different hosts.
fn cross_host_pairs(c: &Cluster) -> Vec<(Container, Container)> {
    let mut pairs = Vec::new();
    for (i, a) in c.hosts().iter().enumerate() {
        for (j, b) in c.hosts().iter().enumerate() {
            if i != j {
                for from in a.containers() {
                    for to in b.containers() {
                        pairs.push((from.clone(), to));
                    }
                }
            }
        }
    }
    pairs
}

/// One ping and one checked TCP transfer of `bytes` for every pair, concurrently; panics naming
/// every pair that failed.
async fn ping_and_transfer(pairs: &[(Container, Container)], bytes: usize) {
    let mut set = JoinSet::new();
    for (from, to) in pairs {
        let (from, to) = (from.clone(), to.clone());
        set.spawn(async move {
            let r = async {
                from.ping(to.ip()).await?;
                let t = from.tcp_transfer(&to, bytes).await?;
                anyhow::ensure!(
                    t.peer.ip() == std::net::IpAddr::V4(from.ip()),
                    "source rewritten: {t:?}"
                );
                Ok(())
            }
            .await;
            r.map_err(|e: anyhow::Error| format!("{} -> {}: {e:#}", from.ip(), to.ip()))
        });
    }
    weft_tests::assert_all_ok(set, "container pairs").await;
}

/// `ping -c <count> -i <interval> <args>` in a container; (transmitted, received, output).
async fn ping_count(
    from: &Container,
    to: Ipv4Addr,
    count: u32,
    extra: &[&str],
) -> (u32, u32, String) {
    let argv = ping_argv(to, count, "0.2", extra);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    weft_tests::ping_outcome(&from.exec(&argv).await)
}

/// `ping -n -c <count> -i <interval> -W 2 <extra> <to>`.
fn ping_argv(to: Ipv4Addr, count: u32, interval: &str, extra: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "ping",
        "-n",
        "-c",
        &count.to_string(),
        "-i",
        interval,
        "-W",
        "2",
    ]
    .map(String::from)
    .to_vec();
    argv.extend(extra.iter().map(|a| a.to_string()));
    argv.push(to.to_string());
    argv
}

// ---- 1. all pairs over eBPF ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn all_cross_host_pairs_ping_and_transfer_over_ebpf_not_flannel1() {
    // Decapsulation by driver (TC on these veth NICs) on hosts 1 and 2, native XDP on host 3.
    let c = ebpf_cluster_each(3, 2, |i| {
        if i == 2 {
            vec!["--decap-hook", "xdp"]
        } else {
            vec![]
        }
    })
    .await;
    for (h, decap) in c
        .hosts()
        .iter()
        .zip(["weft_tc_decap", "weft_tc_decap", "weft_xdp_decap"])
    {
        let attached = attachments(&status(h).await);
        let on = |program: &str, dev: &str| attached.iter().any(|a| a.0 == program && a.1 == dev);
        assert!(
            on("weft_tc_encap", "docker0") && on(decap, "ens32"),
            "{}: {attached:?}",
            h.name()
        );
    }

    let mut before = Vec::new();
    for h in c.hosts() {
        before.push(Seen::of(h).await);
    }
    let pairs = cross_host_pairs(&c);
    assert_eq!(pairs.len(), 24);
    ping_and_transfer(&pairs, MB).await;

    for (h, before) in c.hosts().iter().zip(before) {
        let d = Seen::of(h).await.since(before);
        eprintln!("{}: {d:?}", h.name());
        // Per host: 8 echo requests out + 8 replies to remote requests, the same in; and 8 TCP
        // connections each way (SYN, data, FIN at least 3 packets per direction).
        assert!(
            d.encapsulated >= 16 + 8 * 3,
            "{}: too few packets encapsulated: {d:?}",
            h.name()
        );
        assert!(
            d.decapsulated >= 16 + 8 * 3,
            "{}: too few packets decapsulated: {d:?}",
            h.name()
        );
        assert_eq!(
            (d.flannel_tx, d.flannel_rx),
            (0, 0),
            "{}: flannel.1 carried overlay traffic: {d:?}",
            h.name()
        );
        assert_eq!(d.too_big, 0, "{}: {d:?}", h.name());
    }
}

// ---- 2. mixed cluster: eBPF, kernel, and flanneld by hand ----------------------------------------

/// A lease as etcd holds it: (subnet, PublicIP, VtepMAC).
async fn leases(c: &Cluster) -> Vec<(ipnet::Ipv4Net, Ipv4Addr, String)> {
    let prefix = format!("{}/subnets/", c.prefix());
    c.etcd()
        .get_prefix(&prefix)
        .await
        .into_iter()
        .map(|(key, value)| {
            let subnet = key[prefix.len()..]
                .replacen('-', "/", 1)
                .parse()
                .expect("lease key");
            let v: Value = serde_json::from_str(&value).expect("lease JSON");
            let ip = v["PublicIP"]
                .as_str()
                .expect("PublicIP")
                .parse()
                .expect("PublicIP");
            let mac = v["BackendData"]["VtepMAC"]
                .as_str()
                .expect("VtepMAC")
                .to_owned();
            (subnet, ip, mac)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn mixed_ebpf_kernel_and_flanneld_hosts_all_reach_all() {
    let c = cluster(3).await;
    c.write_config(CONFIG).await;
    let (ebpf, kernel, flanneld) = (c.host(0), c.host(1), c.host(2));
    let flanneld_subnet: ipnet::Ipv4Net = "10.1.200.0/24".parse().unwrap();
    flanneld::host_by_hand(&c, flanneld, "10.1.0.0/16", flanneld_subnet)
        .await
        .unwrap();
    ebpf.spawn_agent(&["--datapath", "ebpf"]).unwrap();
    kernel.spawn_agent(&["--datapath", "kernel"]).unwrap();
    c.add_containers(1).await.unwrap();
    wait_ebpf_ready(ebpf, 2).await;
    let all = leases(&c).await;
    assert_eq!(all.len(), 3, "{all:?}");
    for (subnet, ip, mac) in &all {
        if *ip != flanneld.ens32_ip() {
            flanneld::run(
                flanneld.netns().name(),
                &flanneld::vxlan_peer(*subnet, *ip, mac),
            )
            .await
            .unwrap();
        }
    }
    // The kernel host's agent programs flannel.1 from the watch; wait for both routes.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let routes = kernel
            .netns()
            .ip(&["route", "show", "dev", "flannel.1"])
            .await
            .unwrap();
        if all
            .iter()
            .filter(|(_, ip, _)| *ip != kernel.ens32_ip())
            .all(|(s, _, _)| routes.contains(&s.to_string()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kernel host lacks flannel.1 routes:\n{routes}"
        );
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    bind_containers(ebpf).await;
    let mut before = Vec::new();
    for h in c.hosts() {
        let (tx, rx) = flannel_packets(h).await;
        before.push((tx, rx));
    }
    let ebpf_before = Seen::of(ebpf).await;
    let pairs = cross_host_pairs(&c);
    assert_eq!(pairs.len(), 6);
    ping_and_transfer(&pairs, MB).await;

    let d = Seen::of(ebpf).await.since(ebpf_before);
    eprintln!("eBPF host: {d:?}");
    assert!(
        d.encapsulated >= 4 * 4 && d.decapsulated >= 4 * 4,
        "the eBPF host did not use its programs: {d:?}"
    );
    assert_eq!(
        (d.flannel_tx, d.flannel_rx),
        (0, 0),
        "the eBPF host's flannel.1 carried traffic: {d:?}"
    );
    for (h, (tx0, rx0)) in c.hosts().iter().zip(before).skip(1) {
        let (tx, rx) = flannel_packets(h).await;
        eprintln!("{}: flannel.1 tx +{} rx +{}", h.name(), tx - tx0, rx - rx0);
        assert!(
            tx - tx0 >= 4 * 4 && rx - rx0 >= 4 * 4,
            "{}: flannel.1 must carry this host's traffic",
            h.name()
        );
    }
}

// ---- 3. spoofed VXLAN ------------------------------------------------------------------------------

fn parse_mac(mac: &str) -> [u8; 6] {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex MAC"))
        .collect();
    bytes.try_into().expect("6-byte MAC")
}

const PROBE_PORT: u16 = 9999;
const PROBES: usize = 5;

/// Listen on UDP `to:9999` inside container `to` while `PROBES` copies of `payload` are sent as UDP
/// to `vtep:8472` from namespace `from_ns`; returns how many copies of `body` the container received.
async fn probe(
    to: &Container,
    from_ns: &str,
    vtep: Ipv4Addr,
    payload: Vec<u8>,
    body: &'static [u8],
) -> usize {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ip = to.ip();
    let listener = weft_tests::netns::spawn_in(to.netns(), move || {
        let sock = UdpSocket::bind((ip, PROBE_PORT)).context("bind the probe listener")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        ready_tx.send(()).ok();
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut got = 0;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                got += usize::from(&buf[..n] == body);
            }
        }
        anyhow::Ok(got)
    });
    tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("probe listener ready");
    let sender = weft_tests::netns::spawn_in(from_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..PROBES {
            sock.send_to(&payload, (vtep, VXLAN_PORT))?;
            // Pacing between two probes, not a wait for anything.
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::Ok(())
    });
    tokio::task::spawn_blocking(move || {
        sender.join().expect("sender thread").expect("send VXLAN");
        listener.join().expect("listener thread").expect("listen")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn spoofed_vxlan_from_a_host_without_lease_and_wrong_vni_never_reach_a_container() {
    let c = cluster(3).await;
    c.write_config(CONFIG).await;
    let (peer, target, kernel) = (c.host(0), c.host(1), c.host(2));
    peer.spawn_agent(&["--datapath", "ebpf"]).unwrap();
    target.spawn_agent(&["--datapath", "ebpf"]).unwrap();
    kernel.spawn_agent(&["--datapath", "kernel"]).unwrap();
    c.add_containers(1).await.unwrap();
    wait_ebpf_ready(target, 2).await;
    wait_ebpf_ready(peer, 2).await;
    let (src, dst, kernel_dst) = (c.container(0), c.container(1), c.container(2));
    src.ping_until(dst.ip(), Duration::from_secs(10))
        .await
        .unwrap();
    src.ping_until(kernel_dst.ip(), Duration::from_secs(10))
        .await
        .unwrap();

    // A rogue machine on the underlay switch, holding no lease.
    let rogue = Netns::create(&format!("{}-rogue", c.name())).await.unwrap();
    c.switch()
        .add_veth_into("port-rogue", "eth0", rogue.name())
        .await
        .unwrap();
    c.switch()
        .ip(&["link", "set", "port-rogue", "master", "br0", "up"])
        .await
        .unwrap();
    rogue
        .ip(&["addr", "add", "172.16.15.99/24", "dev", "eth0"])
        .await
        .unwrap();
    rogue.ip(&["link", "set", "eth0", "up"]).await.unwrap();

    // Frames exactly as the peer's flannel.1 would carry them: inner source a real container,
    // inner destination MAC the target host's VtepMAC from its lease.
    let leased = leases(&c).await;
    let send =
        async |from_ns: &str, to_host: &Host, to: &Container, vni: u32, body: &'static [u8]| {
            let mac = &leased
                .iter()
                .find(|l| l.1 == to_host.ens32_ip())
                .expect("lease")
                .2;
            let frame = weft_tests::packet::vxlan_payload(
                vni,
                parse_mac(mac),
                src.ip(),
                to.ip(),
                PROBE_PORT,
                body,
            );
            probe(to, from_ns, to_host.ens32_ip(), frame, body).await
        };

    let before = Seen::of(target).await;
    let spoofed = send(rogue.name(), target, &dst, 1, b"spoofed").await;
    let wrong_vni = send(peer.name(), target, &dst, 2, b"vni2").await;
    let d = Seen::of(target).await.since(before);
    // Controls: the same frame from the leased peer arrives, and the rogue's frame is accepted by a
    // plain kernel vxlan device (flannel has no source check): the probes can see a delivery.
    let from_peer = send(peer.name(), target, &dst, 1, b"peer").await;
    let to_kernel = send(rogue.name(), kernel, &kernel_dst, 1, b"rogue").await;
    eprintln!(
        "received in the container: spoofed {spoofed}/{PROBES}, wrong VNI {wrong_vni}/{PROBES}, \
         from the leased peer {from_peer}/{PROBES}; rogue -> kernel-path host {to_kernel}/{PROBES}; \
         target counters {d:?}"
    );
    assert_eq!(
        spoofed, 0,
        "VXLAN from a host without a lease reached a container"
    );
    assert_eq!(wrong_vni, 0, "VXLAN with another VNI reached a container");
    assert!(
        d.unknown_source >= PROBES as u64,
        "spoofed frames not counted as dropped: {d:?}"
    );
    assert!(
        d.wrong_vni >= PROBES as u64,
        "wrong-VNI frames not counted as dropped: {d:?}"
    );
    assert_eq!(
        from_peer, PROBES,
        "control: the frame from a leased host must arrive"
    );
    assert_eq!(
        to_kernel, PROBES,
        "control: a kernel vxlan device accepts the rogue's frame"
    );
    let st = status(target).await;
    assert!(
        counter(&st, "dropped: unknown source") >= PROBES as u64,
        "{st:#}"
    );
}

// ---- 4. restarts under a 100/s ping ----------------------------------------------------------------

fn count_in_log(agent: &Agent, needle: &str) -> usize {
    agent.log().matches(needle).count()
}

/// Wait until the agent's log holds more than `before` "ready" lines (a restarted agent is ready).
async fn wait_ready_again(agent: &Agent, before: usize) -> Duration {
    let start = Instant::now();
    while count_in_log(agent, READY_LINE) <= before {
        assert!(
            agent.exit_status().is_none(),
            "agent exited:\n{}",
            tail(&agent.log(), 40)
        );
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "agent not ready again:\n{}",
            tail(&agent.log(), 40)
        );
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

const READY_LINE: &str = " ready subnet=";

/// Wall-clock seconds, to line events up with `ping -D` timestamps.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `ping -D` lines of echo requests that never got a reply, e.g.
/// `[1795785414.97] no answer yet for icmp_seq=43`; empty when every request was answered.
fn unanswered(ping_output: &str, count: u32) -> Vec<String> {
    (1..=count)
        .filter_map(|seq| {
            let tag = format!("icmp_seq={seq} ");
            let lines: Vec<&str> = ping_output
                .lines()
                .filter(|l| format!("{l} ").contains(&tag))
                .collect();
            (!lines.iter().any(|l| l.contains("bytes from")))
                .then(|| format!("seq {seq}: {lines:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn agent_restarts_sigterm_and_kill9_lose_no_ping_at_100_per_second() {
    let c = ebpf_cluster(2, 1, &[]).await;
    let (host, agent) = (c.host(0), c.host(0).agent().unwrap());
    let (from, to) = (c.container(0), c.container(1));
    const COUNT: u32 = 1000;
    // -D timestamps every line and -O reports a request without reply, so a loss can be placed
    // on the timeline of agent events.
    let mut ping = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            from.netns(),
            "ping",
            "-n",
            "-D",
            "-O",
            "-i",
            "0.01",
            "-c",
            &COUNT.to_string(),
        ])
        .arg(to.ip().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut timeline = vec![format!("{:.3} ping started", unix_now())];
    let backlog_drops = softnet_drops();
    let attached = attachments(&status(host).await);
    // The scenario's timeline from here on, not waits: half a second of traffic in each phase
    // (before SIGTERM, while the agent is away, after it is ready, while it is killed); the ping
    // counts every packet, and each restart is followed by polling for readiness.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGTERM: the agent exits cleanly; the pinned programs keep forwarding while it is away.
    let ready = count_in_log(&agent, READY_LINE);
    let down = Seen::of(host).await;
    timeline.push(format!("{:.3} SIGTERM", unix_now()));
    let status_code = agent.stop().await.unwrap();
    assert!(
        status_code.success(),
        "SIGTERM exit: {status_code}\n{}",
        tail(&agent.log(), 30)
    );
    // Timeline: the next phase after half a second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let while_down = Seen::of(host).await.since(down);
    timeline.push(format!("{:.3} restart", unix_now()));
    agent.restart().await.unwrap();
    let after_term = wait_ready_again(&agent, ready).await;
    timeline.push(format!("{:.3} ready", unix_now()));

    // kill -9: no chance to clean up, as after a crash.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = count_in_log(&agent, READY_LINE);
    timeline.push(format!("{:.3} SIGKILL", unix_now()));
    agent.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    timeline.push(format!("{:.3} restart", unix_now()));
    agent.restart().await.unwrap();
    let after_kill = wait_ready_again(&agent, ready).await;
    timeline.push(format!("{:.3} ready", unix_now()));
    let st = wait_ebpf_ready(host, 1).await;
    assert!(
        ping.try_wait().unwrap().is_none(),
        "the ping ended before both restarts were done: the test proves nothing; raise COUNT"
    );
    let mid = Seen::of(host).await;

    let out = ping.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) = weft_tests::ping_summary(&text).unwrap_or((0, 0));
    let backlog_drops = softnet_drops() - backlog_drops;
    let grown = Seen::of(host).await.since(mid);
    eprintln!(
        "ping at 100/s across SIGTERM + restart (ready again in {after_term:?}) and kill -9 + restart \
         (ready in {after_kill:?}): {sent} sent, {received} received, {} lost; while the agent was down \
         the programs encapsulated {} and decapsulated {}; after the restarts +{} / +{}",
        sent - received,
        while_down.encapsulated,
        while_down.decapsulated,
        grown.encapsulated,
        grown.decapsulated
    );
    assert_eq!(sent, COUNT, "{text}");
    assert_eq!(
        sent - received,
        0,
        "pings lost across the restarts:\n{}\ntimeline:\n{}\n{}\n(meanwhile the machine's \
         per-CPU input backlogs, shared by every namespace, dropped {backlog_drops} packets)",
        unanswered(&text, COUNT).join("\n"),
        timeline.join("\n"),
        tail(&text, 3)
    );
    assert!(
        while_down.encapsulated >= 20 && while_down.decapsulated >= 20,
        "programs idle while the agent was down: {while_down:?}"
    );
    assert!(
        grown.encapsulated >= 100 && grown.decapsulated >= 100,
        "counters stopped growing: {grown:?}"
    );
    assert_eq!(
        (grown.flannel_tx, grown.flannel_rx),
        (0, 0),
        "fell back to flannel.1: {grown:?}"
    );
    // Both restarts adopted the pinned links: the same kernel links, each now running the
    // program the last agent loaded.
    let adopted = attachments(&st);
    eprintln!("(program, interface, link id, program id) before: {attached:?}, after: {adopted:?}");
    for (before, after) in attached.iter().zip(&adopted) {
        assert_eq!(
            (&before.0, &before.1, before.2),
            (&after.0, &after.1, after.2),
            "link replaced, not adopted"
        );
        assert_ne!(
            before.3, after.3,
            "{} still runs the first agent's program",
            before.0
        );
    }
    // Decapsulation on ens32, encapsulation on docker0 and on the container's bridge port, the
    // host program on flannel.1.
    assert_eq!(adopted.len(), 4, "{adopted:?}");
    let logged = count_in_log(&agent, "adopted=true");
    assert!(
        logged >= 4,
        "expected both programs adopted twice, log says {logged}:\n{}",
        tail(&agent.log(), 60)
    );
}

/// (program, interface, link id, program id) of every attachment `weft status` lists.
fn attachments(st: &Value) -> Vec<(String, String, u64, u64)> {
    st["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
            let n = |k: &str| p[k].as_u64().unwrap_or_default();
            (s("program"), s("interface"), n("link_id"), n("prog_id"))
        })
        .collect()
}

/// Packets the kernel dropped because a CPU's input backlog was full (`/proc/net/softnet_stat`,
/// second column, summed over CPUs): machine-wide, so it includes other tests' traffic.
fn softnet_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .sum()
}

// ---- 4b. the host's own traffic ----------------------------------------------------------------------

/// What the host program counted and what flannel.1 itself sent, as one snapshot.
async fn host_path(host: &Host) -> (u64, u64, u64) {
    let st = status(host).await;
    (
        counter(&st, "host: encapsulated"),
        counter(&st, "host: passed to the vxlan device"),
        flannel_packets(host).await.0,
    )
}

/// `ping -c <count> <args> <to>` from a host's own namespace; (transmitted, received, output).
async fn ping_from_host(
    host: &Host,
    to: Ipv4Addr,
    count: u32,
    extra: &[&str],
) -> (u32, u32, String) {
    let argv = ping_argv(to, count, "0.05", extra);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    weft_tests::ping_outcome(&host.exec(&argv).await)
}

/// A host's own processes (health checks, its services) reach remote containers through
/// flannel.1's route; the host program on flannel.1's egress encapsulates what the vxlan device
/// would have: the packets arrive, with the host's address, and flannel.1's own counters stay
/// still. What the device must do itself (here: fragments, whose outer UDP checksum needs the
/// whole datagram) is passed on to it and still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn the_hosts_own_traffic_to_remote_containers_takes_the_ebpf_path() {
    let c = ebpf_cluster(2, 1, &[]).await;
    let (h1, remote) = (c.host(0), c.host(1).containers()[0].clone());
    let st = status(h1).await;
    assert!(
        attachments(&st)
            .iter()
            .any(|(p, i, link, _)| p == "weft_tc_host_encap" && i == "flannel.1" && *link != 0),
        "no host program on flannel.1: {:#}",
        st["programs"]
    );

    let (enc0, pass0, tx0) = host_path(h1).await;
    let (sent, received, text) = ping_from_host(h1, remote.ip(), 20, &[]).await;
    assert_eq!((sent, received), (20, 20), "{text}");
    let t = remote
        .tcp_transfer_from(h1.netns(), h1.ens32_ip(), MB)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let subnet = h1.subnet().expect("host 1's subnet").subnet;
    let std::net::IpAddr::V4(from) = t.peer.ip() else {
        panic!("IPv6 peer {t:?}")
    };
    assert!(
        subnet.contains(&from),
        "the host's connection arrived from {from}, not from its flannel.1 address in {subnet}"
    );
    let (enc1, pass1, tx1) = host_path(h1).await;
    eprintln!(
        "ping and 1 MB: host encapsulated +{}, passed +{}, flannel.1 tx +{}",
        enc1 - enc0,
        pass1 - pass0,
        tx1 - tx0
    );
    // 20 echo requests, and the connection's SYN, data (GSO-sized, so fewer than 1 MB / MSS) and FIN.
    assert!(
        enc1 - enc0 >= 20 + 3,
        "the host program did not carry the host's traffic"
    );
    // flannel.1 may still send the odd packet of its own (IPv6 router solicitation, say).
    assert!(
        tx1 - tx0 <= 3,
        "flannel.1 carried the host's traffic: tx +{}",
        tx1 - tx0
    );

    // Fragments: ping -s 2000 over flannel.1's MTU of 1450 leaves as two fragments each way.
    let (sent, received, text) = ping_from_host(h1, remote.ip(), 5, &["-s", "2000"]).await;
    assert_eq!((sent, received), (5, 5), "{text}");
    let (enc2, pass2, tx2) = host_path(h1).await;
    eprintln!(
        "5 fragmented pings: host encapsulated +{}, passed +{}, flannel.1 tx +{}",
        enc2 - enc1,
        pass2 - pass1,
        tx2 - tx1
    );
    assert!(
        pass2 - pass1 >= 10 && tx2 - tx1 >= 10,
        "fragments were not handed to flannel.1: passed +{}, flannel.1 tx +{}",
        pass2 - pass1,
        tx2 - tx1
    );
}

// ---- 5. large transfers and oversize packets -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn large_tcp_at_mtu_1450_and_oversize_non_gso_packets() {
    let c = ebpf_cluster(2, 1, &[]).await;
    let (h1, h2) = (c.host(0), c.host(1));
    let (a, b) = (c.container(0), c.container(1));
    assert_eq!(h1.subnet().unwrap().mtu, 1450);

    let (b1, b2) = (Seen::of(h1).await, Seen::of(h2).await);
    let t = a.tcp_transfer(&b, 64 * MB).await.unwrap();
    let (d1, d2) = (Seen::of(h1).await.since(b1), Seen::of(h2).await.since(b2));
    let per_packet = t.bytes as u64 / d1.encapsulated.max(1);
    eprintln!(
        "64 MiB checked in {:?} ({:.2} Gbit/s): sender {d1:?}, receiver {d2:?}; {per_packet} payload bytes \
         per encapsulated packet",
        t.elapsed,
        t.bytes as f64 * 8.0 / t.elapsed.as_secs_f64() / 1e9
    );
    assert_eq!(t.bytes, 64 * MB);
    assert_eq!(
        d1.too_big, 0,
        "GSO packets were handed to the kernel as too big: {d1:?}"
    );
    assert_eq!(d1.flannel_tx, 0, "flannel.1 carried the transfer: {d1:?}");
    assert_eq!(d2.flannel_rx, 0, "flannel.1 received the transfer: {d2:?}");
    assert!(
        d2.decapsulated >= 64 * MB as u64 / 65536,
        "receiver did not decapsulate: {d2:?}"
    );
    // More payload per encapsulated packet than one 1450-byte frame holds: GSO packets went
    // through the program whole (and arrived intact, the byte check says).
    assert!(
        per_packet > 1450,
        "no GSO packet was encapsulated: {per_packet} bytes per packet"
    );
    b.tcp_transfer(&a, 16 * MB).await.unwrap();

    // A container whose MTU exceeds the overlay's: non-GSO packets too big for the underlay go to
    // the kernel path and are fragmented by flannel.1, not blackholed.
    let veth = a.host_veth().to_owned();
    for (ns_argv, dev) in [
        (a.netns(), "eth0"),
        (h1.name(), veth.as_str()),
        (h1.name(), "docker0"),
    ] {
        weft_tests::netns::run("ip", &["-n", ns_argv, "link", "set", dev, "mtu", "1500"])
            .await
            .unwrap();
    }
    let before = Seen::of(h1).await;
    let (sent, received, text) = ping_count(&a, b.ip(), 3, &["-s", "1460", "-M", "dont"]).await;
    let d = Seen::of(h1).await.since(before);
    eprintln!("ping -s 1460 -M dont from MTU 1500: {sent} sent, {received} received; {d:?}");
    assert!(
        sent == 3 && received == 3,
        "oversize packets blackholed:\n{text}"
    );
    assert!(
        d.too_big >= 3,
        "the program did not hand the oversize packets on: {d:?}"
    );
    assert!(
        d.flannel_tx >= 6,
        "flannel.1 did not fragment them (2 fragments each): {d:?}"
    );
    // With DF set the sender is told the path MTU instead of being met with silence.
    let (_, received, text) = ping_count(&a, b.ip(), 2, &["-s", "1460", "-M", "do"]).await;
    eprintln!("ping -s 1460 -M do:\n{text}");
    assert_eq!(received, 0, "{text}");
    assert!(
        text.contains("Frag needed") || text.contains("message too long"),
        "no path MTU signal, only silence:\n{text}"
    );
}

// ---- 6. --cleanup ----------------------------------------------------------------------------------

/// Whether the kernel still has BPF link `id` (`bpftool link show id`).
async fn link_exists(host: &Host, id: u64) -> bool {
    host.exec(&["bpftool", "link", "show", "id", &id.to_string()])
        .await
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn cleanup_removes_programs_and_maps_and_traffic_moves_to_flannel1() {
    let c = ebpf_cluster(2, 1, &[]).await;
    let (h1, h2) = (c.host(0), c.host(1));
    let (a, b) = (c.container(0), c.container(1));
    a.ping(b.ip()).await.unwrap();
    let links: Vec<u64> = attachments(&status(h1).await).iter().map(|a| a.2).collect();
    // Decapsulation on ens32, encapsulation on docker0 and on the container's bridge port, the
    // host program on flannel.1.
    assert_eq!(links.len(), 4);
    for id in &links {
        assert!(
            link_exists(h1, *id).await,
            "link {id} of weft status is unknown to bpftool"
        );
    }
    h1.agent().unwrap().stop().await.unwrap();

    let mut argv: Vec<String> = vec![weft_bin().unwrap().display().to_string(), "agent".into()];
    argv.extend(h1.agent_args());
    argv.push("--cleanup".into());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = h1.exec_ok(&argv).await.unwrap();
    eprintln!("{}", out.trim());
    let pin = h1.bpf_pin_dir();
    assert!(!pin.exists(), "pins left in {}", pin.display());
    // Unpinned links are released asynchronously by the kernel.
    let deadline = Instant::now() + Duration::from_secs(5);
    for id in &links {
        while link_exists(h1, *id).await {
            assert!(
                Instant::now() < deadline,
                "link {id} still exists after cleanup"
            );
            // Pacing between two looks; the deadline decides.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let st = status(h1).await;
    assert_eq!(st["mode"], "kernel", "{st:#}");
    assert_eq!(st["programs"].as_array().map_or(0, Vec::len), 0, "{st:#}");
    assert!(st["node"].is_null(), "{st:#}");

    let (before, peer_before) = (flannel_packets(h1).await, Seen::of(h2).await);
    a.ping(b.ip()).await.unwrap();
    b.ping(a.ip()).await.unwrap();
    a.tcp_transfer(&b, MB).await.unwrap();
    b.tcp_transfer(&a, MB).await.unwrap();
    let after = flannel_packets(h1).await;
    let peer = Seen::of(h2).await.since(peer_before);
    let (tx, rx) = (after.0 - before.0, after.1 - before.1);
    eprintln!("after cleanup: host1 flannel.1 tx +{tx} rx +{rx}; host2 (still eBPF) {peer:?}");
    assert!(
        tx >= 10 && rx >= 10,
        "flannel.1 did not take over: tx +{tx} rx +{rx}"
    );
    assert!(
        peer.decapsulated >= 10,
        "host2 should decapsulate host1's kernel VXLAN: {peer:?}"
    );
}

// ---- 7. a program detached by hand -----------------------------------------------------------------

/// `bpftool link detach` on the host's pinned decapsulation link, as an admin might.
async fn detach_decap_by_hand(host: &Host) {
    let decap = std::fs::read_dir(host.bpf_pin_dir().join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().ends_with("@ens32"))
        .expect("pinned decap link");
    let pinned = decap.display().to_string();
    host.exec_ok(&["bpftool", "link", "detach", "pinned", &pinned])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn a_decap_program_detached_by_hand_is_reattached_within_seconds() {
    let c = ebpf_cluster(2, 1, &["--reconcile-interval", "1s"]).await;
    let (h1, agent) = (c.host(0), c.host(0).agent().unwrap());
    let (a, b) = (c.container(0), c.container(1));
    let repairs_before = count_in_log(&agent, "re-attaching");
    detach_decap_by_hand(h1).await;
    let detached_at = Instant::now();
    let st = status(h1).await;
    assert!(
        st["programs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["interface"] == "ens32" && p["state"] == "detached"),
        "bpftool did not detach it: {st:#}"
    );
    // Meanwhile flannel.1 receives what the peer's eBPF path sends: no outage.
    a.ping(b.ip()).await.unwrap();
    wait_status(h1, "re-attached", Duration::from_secs(5), |st| {
        ebpf_ready(st, 1)
    })
    .await;
    let took = detached_at.elapsed();
    let logged = count_in_log(&agent, "re-attaching") > repairs_before;
    eprintln!(
        "re-attached {took:?} after the detach; agent log:\n{}",
        tail(&agent.log(), 8)
    );
    assert!(
        logged,
        "the agent did not log the repair:\n{}",
        tail(&agent.log(), 30)
    );
    let before = Seen::of(h1).await;
    a.ping(b.ip()).await.unwrap();
    let d = Seen::of(h1).await.since(before);
    assert!(
        d.decapsulated >= 1 && d.flannel_rx == 0,
        "the re-attached program does not decapsulate: {d:?}"
    );
}

/// The admin accidents of an eBPF host: the XDP decapsulation detached by hand, then `docker0`
/// deleted and recreated the way Docker does at its restart (same address and MTU, the
/// containers' veths attached again). The agent re-attaches both and says so.
/// A deleted docker0 created again as dockerd would (the host's subnet and MTU), with `ct`'s port.
async fn create_docker0_again(host: &Host, ct: &Container) {
    let env = host.subnet().unwrap();
    let (addr, mtu) = (env.subnet.to_string(), env.mtu.to_string());
    for cmd in [
        &["ip", "link", "add", "docker0", "type", "bridge"][..],
        &["ip", "addr", "add", &addr, "dev", "docker0"],
        &["ip", "link", "set", "docker0", "mtu", &mtu, "up"],
        &[
            "ip",
            "link",
            "set",
            ct.host_veth(),
            "master",
            "docker0",
            "up",
        ],
    ] {
        host.exec_ok(cmd).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn detached_xdp_and_recreated_docker0_are_repaired() {
    let c = ebpf_cluster_each(2, 1, |i| {
        let mut extra = vec!["--reconcile-interval", "1s"];
        if i == 0 {
            extra.extend(["--decap-hook", "xdp"]);
        }
        extra
    })
    .await;
    let (h1, agent) = (c.host(0), c.host(0).agent().unwrap());
    let (a, b) = (c.container(0), c.container(1));

    let repairs = count_in_log(&agent, "re-attaching");
    detach_decap_by_hand(h1).await;
    let st = status(h1).await;
    assert!(
        st["programs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["interface"] == "ens32" && p["state"] == "detached"),
        "bpftool did not detach the XDP program: {st:#}"
    );
    wait_status(h1, "with XDP re-attached", Duration::from_secs(5), |st| {
        ebpf_ready(st, 1)
    })
    .await;
    assert!(
        count_in_log(&agent, "re-attaching") > repairs,
        "repair not logged:\n{}",
        tail(&agent.log(), 30)
    );
    let before = Seen::of(h1).await;
    b.ping(a.ip()).await.unwrap();
    let d = Seen::of(h1).await.since(before);
    assert!(
        d.decapsulated >= 1 && d.flannel_rx == 0,
        "re-attached XDP does not decapsulate: {d:?}"
    );

    h1.exec_ok(&["ip", "link", "del", "docker0"]).await.unwrap();
    assert!(
        a.ping(b.ip()).await.is_err(),
        "traffic flowed without docker0"
    );
    create_docker0_again(h1, &a).await;
    let recreated = Instant::now();
    a.ping_until(b.ip(), Duration::from_secs(10)).await.unwrap();
    wait_status(
        h1,
        "with encapsulation on the new docker0",
        Duration::from_secs(5),
        |st| ebpf_ready(st, 1),
    )
    .await;
    eprintln!(
        "docker0 recreated: encapsulation back after {:?}",
        recreated.elapsed()
    );
    let before = Seen::of(h1).await;
    a.ping(b.ip()).await.unwrap();
    let d = Seen::of(h1).await.since(before);
    assert!(
        d.encapsulated >= 1 && d.flannel_tx == 0,
        "the new docker0 is not encapsulated in eBPF: {d:?}"
    );
    assert_eq!(
        agent.exit_status(),
        None,
        "the agent exited:\n{}",
        tail(&agent.log(), 30)
    );
}

// ---- 8. --datapath auto falls back ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn auto_falls_back_to_the_kernel_path_with_the_reason_and_traffic_works() {
    let c = cluster(3).await;
    c.write_config(CONFIG).await;
    let (no_bpffs, busy, ok) = (c.host(0), c.host(1), c.host(2));

    // host1: the pin directory is on an ordinary file system, not bpffs (a typo'd or tmpfs path).
    let not_bpffs = c.dir().join("not-bpffs").join(no_bpffs.name());
    let mut args = no_bpffs.agent_args();
    let at = args.iter().position(|a| a == "--bpf-pin-dir").unwrap();
    args[at + 1] = not_bpffs.display().to_string();
    args.extend(["--datapath", "auto"].map(str::to_owned));
    let agent1 = Agent::spawn(
        no_bpffs.name(),
        args,
        &no_bpffs.dir().join("agent.log"),
        false,
    )
    .unwrap();

    // host2: another XDP program already owns ens32, and XDP decapsulation is asked for.
    let blocker_pin = c.dir().join(weft_tests::cluster::BPFFS).join("blocker");
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let blocker = busy.netns().spawn_thread(move || {
        let mut other = weft::datapath::Datapath::load(&blocker_pin).context("load the blocker")?;
        other
            .attach_decap("ens32", weft::datapath::DecapHook::Xdp)
            .context("attach the blocker")?;
        held_tx.send(()).ok();
        let _ = hold_rx.recv();
        drop(other);
        let _ = weft::datapath::Datapath::detach_and_unpin(&blocker_pin);
        Ok(())
    });
    held_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("blocker attached");
    busy.spawn_agent(&["--datapath", "auto", "--decap-hook", "xdp"])
        .unwrap();
    ok.spawn_agent(&["--datapath", "auto"]).unwrap();
    c.add_containers(1).await.unwrap();

    let wait = Duration::from_secs(10);
    agent1
        .wait_for_log("eBPF datapath unavailable", wait)
        .await
        .unwrap();
    busy.agent()
        .unwrap()
        .wait_for_log("eBPF datapath unavailable", wait)
        .await
        .unwrap();
    let reason = |a: &Agent| {
        a.log()
            .lines()
            .find(|l| l.contains("eBPF datapath unavailable"))
            .unwrap_or_default()
            .to_owned()
    };
    let (r1, r2) = (reason(&agent1), reason(busy.agent().as_ref().unwrap()));
    eprintln!("host1: {r1}\nhost2: {r2}");
    assert!(
        r1.contains("not on a bpffs mount") && r1.contains("not-bpffs"),
        "{r1}"
    );
    assert!(r2.contains("ens32") && r2.contains("busy"), "{r2}");
    for a in [&agent1, &busy.agent().unwrap()] {
        assert!(
            a.log()
                .lines()
                .any(|l| l.contains("datapath chosen") && l.contains("kernel")),
            "{}",
            tail(&a.log(), 30)
        );
    }
    wait_ebpf_ready(ok, 2).await;
    bind_containers(ok).await;
    let st = status_at(no_bpffs, &not_bpffs).await;
    assert_eq!(st["mode"], "kernel", "{st:#}");

    let (f1, f2, before) = (
        flannel_packets(no_bpffs).await,
        flannel_packets(busy).await,
        Seen::of(ok).await,
    );
    ping_and_transfer(&cross_host_pairs(&c), MB).await;
    let (g1, g2, d) = (
        flannel_packets(no_bpffs).await,
        flannel_packets(busy).await,
        Seen::of(ok).await.since(before),
    );
    eprintln!(
        "fallback hosts flannel.1 tx/rx: +{}/+{} and +{}/+{}; eBPF host {d:?}",
        g1.0 - f1.0,
        g1.1 - f1.1,
        g2.0 - f2.0,
        g2.1 - f2.1
    );
    assert!(
        g1.0 - f1.0 >= 8 && g2.0 - f2.0 >= 8,
        "the fallback hosts' flannel.1 did not carry their traffic"
    );
    assert!(d.encapsulated >= 8 && d.flannel_tx == 0, "{d:?}");
    hold_tx.send(()).ok();
    tokio::task::spawn_blocking(move || blocker.join())
        .await
        .unwrap()
        .expect("blocker thread")
        .unwrap();
}

// ---- the bridge's forwarding-entry ageing, on both datapaths -----------------------------------------

/// A container's entry in its bridge's forwarding table ages out (300 s by default, 3 s here)
/// whenever the bridge stops seeing its frames: on flannel.1 once the container falls silent, on
/// eBPF even while it talks, because the encapsulation program takes its frames at its port
/// before the bridge learns from them. Either way, decapsulated traffic for it must reach it and
/// no other container, the eBPF path neither stricter nor looser than flannel.1.
///
/// Container A on host 1 pings the remote container R for 20 s (reconciling every 2 s), falls
/// silent until host 1's bridge has no entry for its MAC, then R sends it UDP.
async fn forgotten_by_the_bridge(dp: attack::Datapath) -> attack::Observed {
    let mut o = attack::Observed::default();
    let c = attack::start(dp, 2, 2, &["--reconcile-interval", "2s"]).await;
    let (h1, a, b, remote) = (c.host(0), c.container(0), c.container(1), c.container(2));
    for h in c.hosts() {
        // Centiseconds: 3 s.
        let ageing = [
            "link",
            "set",
            "docker0",
            "type",
            "bridge",
            "ageing_time",
            "300",
        ];
        h.netns().ip(&ageing).await.unwrap();
    }
    let before = flannel_packets(h1).await;
    let (sent, received, out) = ping_count(&a, remote.ip(), 100, &[]).await;
    let carried = flannel_packets(h1).await.0 - before.0;
    o.set("A's pings to R answered (of 100)", u64::from(received));
    o.note(format!(
        "{dp}: A's pings {sent} sent, {received} answered, flannel.1 on host 1 sent {carried}"
    ));
    if received != 100 {
        o.note(out);
    }
    if dp.is_ebpf() {
        // A binding that lapsed with the bridge's entry would hand A's packets to flannel.1.
        o.set(
            "A's pings left host 1 on the fast path (flannel.1 sent at most 2)",
            u64::from(carried <= 2),
        );
        let st = attack::status(h1).await;
        let bound = st["local_bindings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["ip"] == a.ip().to_string());
        o.set(
            "A bound in host 1's eBPF map after 20 s of pings",
            u64::from(bound),
        );
    }

    let a_mac = attack::mac(a.netns(), "eth0").await;
    weft_tests::poll::until(
        &format!("{dp}: host 1's bridge to forget A's MAC while A is silent"),
        Duration::from_secs(20),
        || async {
            let port = attack::fdb_port(h1, a_mac).await;
            weft_tests::poll::check(port.is_none(), port)
        },
    )
    .await;
    let probe = attack::marker("for-a-forgotten");
    let in_a = attack::UdpSink::bind(&a, attack::PORT).await;
    let n = 3 * attack::PROBES;
    let send = attack::send_udp(
        remote.netns(),
        std::net::SocketAddrV4::new(remote.ip(), 0),
        std::net::SocketAddrV4::new(a.ip(), attack::PORT),
        vec![probe.clone(); n],
        attack::UdpOpts::default(),
    );
    let (landed_a, seen_b) = attack::where_it_lands(&in_a, &b, &probe, n, send).await;
    o.set(
        "R's UDP to A, forgotten by the bridge: landed in A",
        landed_a,
    );
    o.set(
        "R's UDP to A, forgotten by the bridge: frames on B's eth0",
        seen_b,
    );
    o.note(format!(
        "{dp}: host 1's bridge afterwards forwards A's MAC to {:?}",
        attack::fdb_port(h1, a_mac).await
    ));
    attack::legit_traffic_flows(&c, dp, "after the bridge forgot A").await;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn traffic_for_a_container_the_bridge_forgot_lands_in_it_alone_on_every_datapath() {
    use attack::Rule;
    attack::on_every_datapath(
        forgotten_by_the_bridge,
        &[
            ("A's pings to R answered (of 100)", Rule::Exactly(100)),
            (
                "A's pings left host 1 on the fast path (flannel.1 sent at most 2)",
                Rule::EbpfExactly(1),
            ),
            (
                "A bound in host 1's eBPF map after 20 s of pings",
                Rule::EbpfExactly(1),
            ),
            (
                "R's UDP to A, forgotten by the bridge: landed in A",
                Rule::Exactly(3 * attack::PROBES as u64),
            ),
            // flannel.1's bridge floods a frame for a MAC it forgot to every port: B's eth0
            // sees it (and B's stack drops it, not its MAC). The eBPF path must show B no more.
            (
                "R's UDP to A, forgotten by the bridge: frames on B's eth0",
                Rule::NoMoreThanKernel,
            ),
        ],
    )
    .await;
}

// ---- 9. the headroom device ------------------------------------------------------------------------

/// The container's `eth0` headroom; 0 when the kernel does not report it.
async fn eth0_headroom(ct: &Container) -> u16 {
    let eth0 = link_in(ct.netns(), "eth0").await.expect("eth0");
    eth0.headroom.unwrap_or(0)
}

/// docker0 as a user sees it: MTU, MAC, carrier (`LOWER_UP`) and operstate.
async fn docker0_seen(host: &Host) -> (u64, String, bool, String) {
    let out = host
        .netns()
        .ip(&["-j", "link", "show", "docker0"])
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&out).expect("ip -j");
    let l = &v[0];
    let carrier = l["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "LOWER_UP"));
    (
        l["mtu"].as_u64().unwrap_or(0),
        l["address"].as_str().unwrap_or_default().to_owned(),
        carrier,
        l["operstate"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Polls until the headroom device is a down port of the host's docker0 at the overlay MTU;
/// returns it.
async fn wait_headroom_device(host: &Host, within: Duration) -> weft::netlink::LinkInfo {
    let ns = host.name().to_owned();
    let mtu = host.subnet().map(|s| s.mtu);
    weft_tests::poll::until(&format!("{DEVICE} on docker0 in {ns}"), within, || async {
        let bridge = link_in(&ns, "docker0").await.ok_or("no docker0")?;
        let dev = link_in(&ns, DEVICE).await.ok_or("no headroom device")?;
        let ok = dev.master == Some(bridge.index)
            && !dev.up
            && dev.kind.as_deref() == Some("vxlan")
            && mtu.is_none_or(|m| dev.mtu == m);
        ok.then_some(dev.clone())
            .ok_or_else(|| format!("{dev:?} (docker0 index {})", bridge.index))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn containers_get_headroom_for_the_outer_headers_and_docker0_looks_the_same() {
    let c = ebpf_cluster(2, 1, &[]).await;
    let (h1, agent) = (c.host(0), c.host(0).agent().unwrap());
    let (a, b) = (c.container(0), c.container(1));
    let dev = wait_headroom_device(h1, READY_TIMEOUT).await;
    wait_headroom_device(c.host(1), READY_TIMEOUT).await;
    eprintln!("{dev:?}");
    let room = dev
        .headroom
        .expect("this kernel reports IFLA_HEADROOM (6.15 on)");
    assert!(room >= VXLAN_OVERHEAD + 14, "device headroom {room}");
    for ct in [&a, &b] {
        let room = eth0_headroom(ct).await;
        assert!(
            room >= VXLAN_OVERHEAD,
            "{}'s eth0 has headroom {room}",
            ct.netns()
        );
    }
    // Never encapsulated from, never bound: only the container's port and docker0 carry
    // encapsulation (next to decapsulation on ens32 and the host program on flannel.1).
    let st = status(h1).await;
    let on: Vec<String> = attachments(&st).into_iter().map(|a| a.1).collect();
    assert!(!on.iter().any(|i| i == DEVICE), "{st:#}");
    assert_eq!(on.len(), 4, "{st:#}");
    // `weft status` shows it, as the kernel has it.
    assert_eq!(
        st["headroom"],
        serde_json::json!({"interface": DEVICE, "bridge": "docker0", "needed_headroom": room}),
        "{st:#}"
    );
    let before = Seen::of(h1).await;
    ping_and_transfer(&cross_host_pairs(&c), MB).await;
    let d = Seen::of(h1).await.since(before);
    assert!(d.encapsulated >= 10 && d.flannel_tx == 0, "{d:?}");

    // docker0 with the device and without it: the same MTU, MAC, carrier and state.
    let with = docker0_seen(h1).await;
    agent.stop().await.unwrap();
    h1.exec_ok(&["ip", "link", "del", DEVICE]).await.unwrap();
    let without = docker0_seen(h1).await;
    assert_eq!(with, without, "docker0 with the device, and without");
    assert!(with.2, "docker0 has a container, so carrier: {with:?}");
    assert!(
        eth0_headroom(&a).await < VXLAN_OVERHEAD,
        "the headroom came from the device"
    );
    // A restart puts it back, the next adopts it as it is.
    agent.restart().await.unwrap();
    let dev = wait_headroom_device(h1, READY_TIMEOUT).await;
    assert!(eth0_headroom(&a).await >= VXLAN_OVERHEAD);
    assert_eq!(docker0_seen(h1).await, with);
    agent.restart().await.unwrap();
    wait_status(h1, "on eBPF again", READY_TIMEOUT, |st| ebpf_ready(st, 1)).await;
    let again = wait_headroom_device(h1, READY_TIMEOUT).await;
    assert_eq!(again.index, dev.index, "the restarted agent recreated it");
    a.ping(b.ip()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn a_later_or_recreated_bridge_gets_the_headroom_device_the_kernel_path_and_cleanup_none() {
    let c = cluster(2).await;
    c.write_config(CONFIG).await;
    let (h1, h2) = (c.host(0), c.host(1));
    // The eBPF agent starts before its docker0 exists, as before dockerd.
    h1.exec_ok(&["ip", "link", "del", "docker0"]).await.unwrap();
    h1.spawn_agent(&["--datapath", "ebpf"]).unwrap();
    h2.spawn_agent(&["--datapath", "kernel"]).unwrap();
    wait_status(h1, "on eBPF without docker0", READY_TIMEOUT, |st| {
        st["mode"] == "ebpf"
    })
    .await;
    assert!(link_in(h1.name(), DEVICE).await.is_none());
    h1.exec_ok(&["ip", "link", "add", "docker0", "type", "bridge"])
        .await
        .unwrap();
    c.add_containers(1).await.unwrap();
    let dev = wait_headroom_device(h1, READY_TIMEOUT).await;
    let (a, b) = (c.container(0), c.container(1));
    assert!(eth0_headroom(&a).await >= VXLAN_OVERHEAD);
    a.ping(b.ip()).await.unwrap();
    b.ping(a.ip()).await.unwrap();
    // The kernel datapath has none, as flanneld.
    assert!(link_in(h2.name(), DEVICE).await.is_none());
    assert_eq!(eth0_headroom(&b).await, 0);

    // docker0 deleted and created again (dockerd restarted): the device follows it.
    h1.exec_ok(&["ip", "link", "del", "docker0"]).await.unwrap();
    create_docker0_again(h1, &a).await;
    let moved = wait_headroom_device(h1, READY_TIMEOUT).await;
    assert_eq!(
        moved.index, dev.index,
        "the device was recreated, not moved"
    );
    a.ping_until(b.ip(), Duration::from_secs(10)).await.unwrap();
    assert!(eth0_headroom(&a).await >= VXLAN_OVERHEAD);

    // --cleanup takes it away with the programs.
    let agent = h1.agent().unwrap();
    agent.stop().await.unwrap();
    let mut argv: Vec<String> = vec![weft_bin().unwrap().display().to_string(), "agent".into()];
    argv.extend(h1.agent_args());
    argv.push("--cleanup".into());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    h1.exec_ok(&argv).await.unwrap();
    assert!(link_in(h1.name(), DEVICE).await.is_none());
    assert_eq!(eth0_headroom(&a).await, 0);
    a.ping(b.ip()).await.unwrap();
    // A kernel-datapath agent after an eBPF one removes a device left behind.
    h1.exec_ok(&[
        "ip", "link", "add", DEVICE, "type", "vxlan", "id", "16777215", "dstport", "8473", "local",
        "::",
    ])
    .await
    .unwrap();
    h1.spawn_agent(&["--datapath", "kernel"]).unwrap();
    weft_tests::poll::until(
        "the kernel datapath to remove the headroom device",
        READY_TIMEOUT,
        || async {
            match link_in(h1.name(), DEVICE).await {
                None => Ok(()),
                Some(l) => Err(format!("{l:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn an_interface_of_the_headroom_devices_name_that_is_not_weft_s_is_left_alone() {
    let c = cluster(2).await;
    c.write_config(CONFIG).await;
    let h1 = c.host(0);
    // Someone's veth (no dummy module here) by that name.
    h1.exec_ok(&[
        "ip", "link", "add", DEVICE, "type", "veth", "peer", "name", "wh-peer",
    ])
    .await
    .unwrap();
    for h in c.hosts() {
        h.spawn_agent(&["--datapath", "ebpf"]).unwrap();
    }
    c.add_containers(1).await.unwrap();
    let agent = h1.agent().unwrap();
    agent
        .wait_for_log("is not weft's headroom device", READY_TIMEOUT)
        .await
        .unwrap();
    let theirs = link_in(h1.name(), DEVICE).await.unwrap();
    assert_eq!(theirs.kind.as_deref(), Some("veth"));
    assert_eq!(theirs.master, None, "enslaved someone else's interface");
    // Only slower: the fast path still carries the traffic.
    wait_ebpf_ready(h1, 1).await;
    bind_containers(h1).await;
    let before = Seen::of(h1).await;
    c.container(0).ping(c.container(1).ip()).await.unwrap();
    let d = Seen::of(h1).await.since(before);
    assert!(d.encapsulated >= 1 && d.flannel_tx == 0, "{d:?}");
    assert_eq!(
        count_in_log(&agent, "is not weft's headroom device"),
        1,
        "warned once, not every pass"
    );
}
