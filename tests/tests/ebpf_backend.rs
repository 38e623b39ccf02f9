//! The eBPF backend with real traffic (root): two hosts as network namespaces
//! on a switched underlay, each with `ens32`, a `docker0` bridge and one
//! container, plus a third underlay host that holds no lease. Each backend
//! runs on its own thread inside its host's namespace; the other host's lease
//! is fed to it as an event, as the lease watcher would.
//!
//! Every namespace is named `wfb-<pid>-<n>-<role>` and deleted on drop, the
//! pins live on a private bpffs mount that is unmounted on drop.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde_json::Value;
use weft::{
    backend::{
        ebpf::{EbpfBackend, EbpfSettings},
        vxlan::{VxlanBackend, VxlanSettings},
        Backend,
    },
    datapath::Counters,
    lease::{BackendAttrs, Lease, LeaseAttrs, LeaseEvent, MacAddr},
    netlink::Netlink,
    status::{self, Mode},
};
use weft_common::counter;
use weft_tests::bpffs::BpfFs;
use weft_tests::netns::spawn_in;
use weft_tests::poll;

static NEXT: AtomicUsize = AtomicUsize::new(0);
const MB: usize = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    weft_tests::netns::run_blocking(cmd, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A host, container or switch: the harness's namespace (deleted on drop, also on panic) plus
/// what these tests read from it.
struct Netns {
    ns: weft_tests::Netns,
    name: String,
}

impl Netns {
    fn new(prefix: &str, role: &str) -> Self {
        let name = format!("{prefix}-{role}");
        let ns = weft_tests::Netns::create_blocking(&name).unwrap_or_else(|e| panic!("{e:#}"));
        Self { ns, name }
    }

    fn ip(&self, args: &str) -> String {
        let args: Vec<&str> = args.split_whitespace().collect();
        self.ns
            .ip_blocking(&args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        let (program, args) = args.split_first().expect("a program");
        self.ns
            .command_blocking(program, args)
            .output()
            .expect("ip netns exec")
    }

    fn spawn(&self, args: &[&str]) -> Child {
        let (program, args) = args.split_first().expect("a program");
        self.ns
            .command_blocking(program, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn in netns")
    }

    fn path(&self) -> String {
        self.ns.path()
    }

    /// `count` pings to `dst`; returns (sent, received) and the output.
    fn ping(&self, dst: &str, extra: &[&str]) -> (u32, u32, String) {
        let mut args = vec!["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1"];
        args.extend(extra);
        args.push(dst);
        weft_tests::ping_outcome(&self.exec(&args))
    }

    /// flannel.1's own (tx, rx) packet counters.
    fn flannel_packets(&self) -> (u64, u64) {
        let v: Value = serde_json::from_str(&self.ip("-s -j link show flannel.1")).expect("json");
        let s = &v[0]["stats64"];
        (
            s["tx"]["packets"].as_u64().unwrap_or(0),
            s["rx"]["packets"].as_u64().unwrap_or(0),
        )
    }

    fn sysctl(&self, path: &str) -> String {
        run("ip", &["netns", "exec", &self.name, "cat", path])
            .trim()
            .to_string()
    }
}

const UNDERLAY: [&str; 3] = ["192.168.77.1", "192.168.77.2", "192.168.77.3"];

/// Two hosts, their containers, a stranger on the underlay, and a switch.
struct Topology {
    // Field order is drop order: namespaces last.
    bpffs: BpfFs,
    hosts: [Netns; 2],
    containers: [Netns; 2],
    stranger: Netns,
    _switch: Netns,
}

impl Topology {
    fn new() -> Self {
        let prefix = format!(
            "wfb-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let switch = Netns::new(&prefix, "sw");
        switch.ip("link add br0 type bridge");
        switch.ip("link set br0 up");
        let hosts = [Netns::new(&prefix, "h1"), Netns::new(&prefix, "h2")];
        let containers = [Netns::new(&prefix, "c1"), Netns::new(&prefix, "c2")];
        let stranger = Netns::new(&prefix, "x");
        let underlay = [&hosts[0], &hosts[1], &stranger];
        for (i, host) in underlay.iter().enumerate() {
            let port = format!("p{i}");
            switch.ip(&format!(
                "link add {port} type veth peer name ens32 netns {}",
                host.name
            ));
            switch.ip(&format!("link set {port} master br0 up"));
            host.ip(&format!("addr add {}/24 dev ens32", UNDERLAY[i]));
            host.ip("link set ens32 up");
        }
        for (i, (host, c)) in hosts.iter().zip(&containers).enumerate() {
            let n = i + 1;
            host.ip("link add docker0 type bridge");
            host.ip(&format!("addr add 10.1.{n}.1/24 dev docker0"));
            host.ip("link set docker0 mtu 1450 up");
            host.ip(&format!(
                "link add vethc{n} mtu 1450 type veth peer name eth0 netns {}",
                c.name
            ));
            host.ip(&format!("link set vethc{n} master docker0 up"));
            c.ip(&format!("addr add 10.1.{n}.2/24 dev eth0"));
            c.ip("link set eth0 mtu 1450 up");
            c.ip(&format!("route add default via 10.1.{n}.1"));
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &host.name,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            );
            // A distribution default the backend has to cope with.
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &host.name,
                    "sysctl",
                    "-qw",
                    "net.ipv4.conf.all.rp_filter=1",
                ],
            );
        }
        Self {
            bpffs: BpfFs::mount(),
            hosts,
            containers,
            stranger,
            _switch: switch,
        }
    }

    fn pin_dir(&self, host: usize) -> PathBuf {
        self.bpffs
            .path()
            .join("weft")
            .join(format!("h{}", host + 1))
    }
}

fn container_ip(host: usize) -> String {
    format!("10.1.{}.2", host + 1)
}

fn lease(host: usize, mac: MacAddr) -> Lease {
    Lease {
        ipv6_subnet: None,
        subnet: format!("10.1.{}.0/24", host + 1).parse().expect("subnet"),
        attrs: LeaseAttrs {
            backend_v6: None,
            public_ipv6: None,
            public_ip: UNDERLAY[host].parse().expect("ip"),
            backend: BackendAttrs::Vxlan {
                vni: Some(1),
                vtep_mac: mac,
            },
        },
        etcd_lease: 0,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ebpf,
    Kernel,
}

enum Cmd {
    Apply(LeaseEvent),
    Reconcile(Vec<Lease>),
    Counters,
    /// Wait at most this long for the backend to report a local change.
    LocalChange(Duration),
    /// Leave without cleaning up, as an agent that is stopped or killed.
    Exit,
}

enum Reply {
    Done(usize),
    Counters(Counters),
}

enum AnyBackend {
    Ebpf(Box<EbpfBackend>),
    Kernel(VxlanBackend),
}

/// A backend on its own thread inside a host namespace, driven by commands.
struct Agent {
    tx: mpsc::Sender<(Cmd, mpsc::Sender<Result<Reply, String>>)>,
    thread: Option<JoinHandle<()>>,
    mac: MacAddr,
}

impl Agent {
    /// Starts a backend for `host`; returns an error string when setup fails.
    fn start(topo: &Topology, host: usize, kind: Kind) -> Result<Self, String> {
        let (tx, rx) = mpsc::channel::<(Cmd, mpsc::Sender<Result<Reply, String>>)>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<MacAddr, String>>();
        let pin_dir = topo.pin_dir(host);
        let thread = spawn_in(&topo.hosts[host].path(), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let started = start_backend(host, kind, pin_dir).await;
                let mut backend = match started {
                    Ok((b, mac)) => {
                        let _ = ready_tx.send(Ok(mac));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok((cmd, reply)) = rx.recv() {
                    let result = match (cmd, &mut backend) {
                        (Cmd::Exit, _) => return,
                        (Cmd::Apply(ev), AnyBackend::Ebpf(b)) => b
                            .apply(&ev)
                            .await
                            .map(|_| Reply::Done(0))
                            .map_err(anyhow::Error::from),
                        (Cmd::Apply(ev), AnyBackend::Kernel(b)) => b
                            .apply(&ev)
                            .await
                            .map(|_| Reply::Done(0))
                            .map_err(anyhow::Error::from),
                        (Cmd::Reconcile(p), AnyBackend::Ebpf(b)) => b
                            .reconcile(&p)
                            .await
                            .map(Reply::Done)
                            .map_err(anyhow::Error::from),
                        (Cmd::Reconcile(p), AnyBackend::Kernel(b)) => b
                            .reconcile(&p)
                            .await
                            .map(Reply::Done)
                            .map_err(anyhow::Error::from),
                        (Cmd::Counters, AnyBackend::Ebpf(b)) => b
                            .counters()
                            .map(Reply::Counters)
                            .map_err(anyhow::Error::from),
                        (Cmd::Counters, AnyBackend::Kernel(_)) => {
                            Err(anyhow::anyhow!("kernel backend has no counters"))
                        }
                        (Cmd::LocalChange(d), AnyBackend::Ebpf(b)) => Ok(Reply::Done(usize::from(
                            tokio::time::timeout(d, b.local_change()).await.is_ok(),
                        ))),
                        (Cmd::LocalChange(_), AnyBackend::Kernel(_)) => {
                            Err(anyhow::anyhow!("not used with the kernel backend"))
                        }
                    };
                    let _ = reply.send(result.map_err(|e| format!("{e:#}")));
                }
            })
        });
        match ready_rx.recv() {
            Ok(Ok(mac)) => Ok(Self {
                tx,
                thread: Some(thread),
                mac,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(format!(
                "agent thread died: {:?}",
                thread.join().err().map(|p| panic_text(&p))
            )),
        }
    }

    fn call(&self, cmd: Cmd) -> Reply {
        let (tx, rx) = mpsc::channel();
        self.tx.send((cmd, tx)).expect("agent thread alive");
        rx.recv()
            .expect("agent replied")
            .unwrap_or_else(|e| panic!("agent command failed: {e}"))
    }

    fn apply(&self, ev: LeaseEvent) {
        self.call(Cmd::Apply(ev));
    }

    fn reconcile(&self, peers: Vec<Lease>) -> usize {
        match self.call(Cmd::Reconcile(peers)) {
            Reply::Done(n) => n,
            Reply::Counters(_) => unreachable!(),
        }
    }

    /// Whether the backend reported a local change within `wait`.
    fn local_change(&self, wait: Duration) -> bool {
        matches!(self.call(Cmd::LocalChange(wait)), Reply::Done(1))
    }

    fn counters(&self) -> Counters {
        match self.call(Cmd::Counters) {
            Reply::Counters(c) => c,
            Reply::Done(_) => unreachable!(),
        }
    }

    /// Stops the agent as a crash or SIGTERM would: nothing is cleaned up.
    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (tx, _rx) = mpsc::channel();
        let _ = self.tx.send((Cmd::Exit, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// flannel's defaults on this thread's `ens32`.
async fn vxlan_settings(nl: &Netlink) -> Result<VxlanSettings, String> {
    let external = nl.iface_by_name("ens32").await.map_err(|e| e.to_string())?;
    Ok(VxlanSettings {
        ipv6: None,
        network: "10.1.0.0/16".parse().expect("net"),
        vni: 1,
        port: 0,
        mtu: None,
        gbp: false,
        learning: false,
        direct_routing: false,
        external,
    })
}

async fn start_backend(
    host: usize,
    kind: Kind,
    pin_dir: PathBuf,
) -> Result<(AnyBackend, MacAddr), String> {
    let nl = Netlink::connect().map_err(|e| e.to_string())?;
    let vx = vxlan_settings(&nl).await?;
    let mut backend = match kind {
        Kind::Ebpf => AnyBackend::Ebpf(Box::new(
            EbpfBackend::try_new(nl, EbpfSettings::new(vx, pin_dir))
                .await
                .map_err(|e| e.to_string())?,
        )),
        Kind::Kernel => AnyBackend::Kernel(VxlanBackend::new(nl, vx)),
    };
    let attrs = match &mut backend {
        AnyBackend::Ebpf(b) => b.prepare().await,
        AnyBackend::Kernel(b) => b.prepare().await,
    }
    .map_err(|e| format!("{e:#}"))?;
    let BackendAttrs::Vxlan { vtep_mac, .. } = attrs else {
        return Err("not vxlan attributes".into());
    };
    let own = lease(host, vtep_mac);
    match &mut backend {
        AnyBackend::Ebpf(b) => b.own_lease(&own).await,
        AnyBackend::Kernel(b) => b.own_lease(&own).await,
    }
    .map_err(|e| format!("{e:#}"))?;
    Ok((backend, vtep_mac))
}

/// Starts both hosts and tells each about the other's lease.
fn start_pair(topo: &Topology, kinds: [Kind; 2]) -> [Agent; 2] {
    let a = Agent::start(topo, 0, kinds[0]).unwrap_or_else(|e| panic!("host 1: {e}"));
    let b = Agent::start(topo, 1, kinds[1]).unwrap_or_else(|e| panic!("host 2: {e}"));
    a.apply(LeaseEvent::Added(lease(1, b.mac)));
    b.apply(LeaseEvent::Added(lease(0, a.mac)));
    bind_containers(topo, &a, &b);
    [a, b]
}

/// The containers' first exchange (through flannel.1) gives each host the
/// neighbour and forwarding entries the eBPF path binds them by; a reconcile
/// binds them, as the agent's netlink events would trigger it.
fn bind_containers(topo: &Topology, a: &Agent, b: &Agent) {
    assert_pings(topo, 0, 1, &["-c", "1"]);
    a.reconcile(vec![lease(1, b.mac)]);
    b.reconcile(vec![lease(0, a.mac)]);
}

fn delta(after: &Counters, before: &Counters, index: u32) -> u64 {
    after.get(index).saturating_sub(before.get(index))
}

// ---- TCP with checked bytes -------------------------------------------------

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0] ^ seed ^ (i >> 12) as u8)
        .collect()
}

/// Sends `len` bytes from container `from` to container `to` over TCP and
/// checks every byte arrived, in order.
fn tcp_transfer(topo: &Topology, from: usize, to: usize, len: usize) -> Result<(), String> {
    let dst: Ipv4Addr = container_ip(to).parse().expect("ip");
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = spawn_in(
        &topo.containers[to].path(),
        move || -> std::io::Result<Vec<u8>> {
            let listener = TcpListener::bind(SocketAddrV4::new(dst, 5201))?;
            let _ = ready_tx.send(());
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut got = Vec::with_capacity(len);
            conn.read_to_end(&mut got).map(|_| got)
        },
    );
    ready_rx
        .recv()
        .map_err(|_| "server did not start".to_string())?;
    let client = spawn_in(
        &topo.containers[from].path(),
        move || -> std::io::Result<()> {
            let mut conn = TcpStream::connect_timeout(
                &SocketAddrV4::new(dst, 5201).into(),
                Duration::from_secs(5),
            )?;
            conn.set_write_timeout(Some(Duration::from_secs(10)))?;
            conn.write_all(&pattern(len, from as u8))?;
            conn.shutdown(std::net::Shutdown::Write)
        },
    );
    let sent = client.join().map_err(|_| "client panicked".to_string())?;
    let got = server.join().map_err(|_| "server panicked".to_string())?;
    let got = got.map_err(|e| format!("TCP c{}->c{}: receive: {e}", from + 1, to + 1))?;
    sent.map_err(|e| format!("TCP c{}->c{}: send: {e}", from + 1, to + 1))?;
    if got.len() != len || got != pattern(len, from as u8) {
        return Err(format!(
            "TCP c{}->c{}: {} of {len} bytes arrived, or they differ",
            from + 1,
            to + 1,
            got.len()
        ));
    }
    Ok(())
}

/// `weft status` for `host`, run inside its namespace as the operator would.
fn status_of(topo: &Topology, host: usize) -> status::Status {
    let pin = topo.pin_dir(host);
    spawn_in(&topo.hosts[host].path(), move || {
        // A runtime of this thread, so the netlink socket is opened in the host's namespace.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(status::collect(&pin))
    })
    .join()
    .expect("status thread")
    .expect("status")
}

fn assert_pings(topo: &Topology, from: usize, to: usize, extra: &[&str]) {
    let (sent, received, text) = topo.containers[from].ping(&container_ip(to), extra);
    assert!(
        sent > 0 && received == sent,
        "ping c{}->c{} {extra:?}: {text}",
        from + 1,
        to + 1
    );
}

// ---- tests -------------------------------------------------------------------

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn ebpf_hosts_carry_container_traffic_through_the_programs() {
    let topo = Topology::new();
    let agents = start_pair(&topo, [Kind::Ebpf, Kind::Ebpf]);

    // Decapsulated traffic enters on ens32 with a remote source: strict rp_filter is relaxed there.
    assert_eq!(
        topo.hosts[0].sysctl("/proc/sys/net/ipv4/conf/ens32/rp_filter"),
        "2"
    );
    assert_eq!(
        topo.hosts[0].sysctl("/proc/sys/net/ipv4/conf/all/rp_filter"),
        "1",
        "`all` is left alone"
    );

    let before = [agents[0].counters(), agents[1].counters()];
    let flannel_before = [
        topo.hosts[0].flannel_packets(),
        topo.hosts[1].flannel_packets(),
    ];
    assert_pings(&topo, 0, 1, &[]);
    assert_pings(&topo, 1, 0, &[]);
    let tcp = [
        tcp_transfer(&topo, 0, 1, 8 * MB),
        tcp_transfer(&topo, 1, 0, 8 * MB),
    ];
    let after = [agents[0].counters(), agents[1].counters()];
    for r in &tcp {
        assert!(
            r.is_ok(),
            "{r:?}\nhost 1: {:?}\nhost 2: {:?}",
            after[0],
            after[1]
        );
    }
    let flannel_after = [
        topo.hosts[0].flannel_packets(),
        topo.hosts[1].flannel_packets(),
    ];
    for h in 0..2 {
        let enc = delta(&after[h], &before[h], counter::ENCAPSULATED);
        let dec = delta(&after[h], &before[h], counter::DECAPSULATED);
        let too_big = delta(&after[h], &before[h], counter::PASS_TOO_BIG);
        let (tx, rx) = (
            flannel_after[h].0 - flannel_before[h].0,
            flannel_after[h].1 - flannel_before[h].1,
        );
        eprintln!("host {}: encapsulated {enc}, decapsulated {dec}, passed too big {too_big}, flannel.1 tx {tx} rx {rx}", h + 1);
        // 6 pings + 8 MB each way: at least the pings and thousands of TCP segments (fewer when GSO-sized).
        assert!(
            enc >= 6 + 100 && dec >= 6 + 100,
            "host {}: traffic did not use the eBPF path: {after:?}",
            h + 1
        );
        assert_eq!(
            too_big, 0,
            "GSO packets must not be handed to the kernel as too big"
        );
        assert!(
            tx <= 3 && rx <= 3,
            "host {}: flannel.1 carried the traffic (tx {tx}, rx {rx})",
            h + 1
        );
    }

    // Oversize: fragments of a 1600-byte ping from a 1450-MTU container still go through the programs.
    let before = agents[0].counters();
    assert_pings(&topo, 0, 1, &["-s", "1600", "-M", "dont"]);
    // Their outer UDP checksum needs the whole datagram summed: flannel.1 (udpcsum) does it.
    assert!(delta(&agents[0].counters(), &before, counter::PASS_FRAGMENT) >= 6);
    // A container with a larger MTU than the overlay's: non-GSO packets too big for the
    // underlay go to the kernel path (fragmented by flannel.1), not into a blackhole.
    topo.containers[0].ip("link set eth0 mtu 1500");
    topo.hosts[0].ip("link set vethc1 mtu 1500");
    topo.hosts[0].ip("link set docker0 mtu 1500");
    let before = agents[0].counters();
    let flannel_before = topo.hosts[0].flannel_packets();
    assert_pings(&topo, 0, 1, &["-s", "1460", "-M", "dont"]);
    let too_big = delta(&agents[0].counters(), &before, counter::PASS_TOO_BIG);
    let flannel_tx = topo.hosts[0].flannel_packets().0 - flannel_before.0;
    eprintln!("oversize non-GSO: passed too big {too_big}, flannel.1 tx {flannel_tx}");
    assert!(
        too_big >= 3 && flannel_tx >= 6,
        "too big {too_big}, flannel.1 tx {flannel_tx}"
    );
    // With DF set the sender learns the path MTU instead of losing packets silently.
    let (_, received, text) =
        topo.containers[0].ping(&container_ip(1), &["-s", "1460", "-M", "do"]);
    assert_eq!(received, 0, "{text}");
    // "+N errors": ICMP fragmentation-needed came back (ping -q hides the lines).
    assert!(text.contains("errors"), "no path MTU signal: {text}");
    for (ns, dev) in [
        (&topo.containers[0], "eth0"),
        (&topo.hosts[0], "vethc1"),
        (&topo.hosts[0], "docker0"),
    ] {
        ns.ip(&format!("link set {dev} mtu 1450"));
    }

    // weft status reads the pinned state.
    let st = status_of(&topo, 0);
    assert_eq!(st.mode, Mode::Ebpf);
    // Decapsulation, encapsulation on docker0 and on the container's port
    // (attached by the reconcile that bound the containers), the host program on flannel.1.
    assert_eq!(st.programs.len(), 4, "{st}");
    assert!(st.programs.iter().all(|p| p.state == "attached"), "{st}");
    assert!(
        st.programs.iter().any(|p| p.program == "weft_tc_encap"
            && p.interface == "docker0"
            && p.hook == "tcx ingress"),
        "{st}"
    );
    assert!(
        st.programs
            .iter()
            .any(|p| p.program == "weft_tc_decap" && p.interface == "ens32"),
        "{st}"
    );
    assert_eq!(st.peers.len(), 1);
    assert_eq!(st.peers[0].subnet.to_string(), "10.1.2.0/24");
    assert_eq!(st.peers[0].vtep_ip.to_string(), UNDERLAY[1]);
    assert_eq!(st.peers[0].vtep_mac, weft::netlink::fmt_mac(&agents[1].mac));
    assert_eq!(
        st.known_vteps,
        vec![UNDERLAY[1].parse::<Ipv4Addr>().unwrap()]
    );
    assert!(st.counter("encapsulated") > 0);
    let json = serde_json::to_value(&st).expect("json");
    assert_eq!(json["mode"], "ebpf");
    eprintln!("{st}");
}

/// A VXLAN frame as a peer's flannel.1 would send it, carrying UDP to `dst:9999`.
fn vxlan_payload(inner_dst_mac: MacAddr, src: Ipv4Addr, dst: Ipv4Addr, body: &[u8]) -> Vec<u8> {
    weft_tests::packet::vxlan_payload(1, inner_dst_mac.0, src, dst, 9999, body)
}

/// Sends `frame` as UDP to host 2's VXLAN port from inside `ns`.
fn send_vxlan_from(ns: &Netns, frame: Vec<u8>) {
    spawn_in(&ns.path(), move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..5 {
            sock.send_to(&frame, (UNDERLAY[1], 8472)).expect("send");
            // Pacing between the copies, not a wait for anything.
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .expect("sender");
}

/// What container 2 receives on UDP 9999 within `wait`.
fn receive_in_container2(topo: &Topology, wait: Duration, send: impl FnOnce()) -> Vec<Vec<u8>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let listener = spawn_in(&topo.containers[1].path(), move || {
        let sock = UdpSocket::bind("10.1.2.2:9999").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        ready_tx.send(()).expect("ready");
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        got
    });
    ready_rx.recv().expect("listener ready");
    send();
    listener.join().expect("listener")
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn spoofed_vxlan_never_reaches_a_container_and_peer_removal_empties_the_maps() {
    let topo = Topology::new();
    let agents = start_pair(&topo, [Kind::Ebpf, Kind::Ebpf]);
    let inner_src: Ipv4Addr = "10.1.1.2".parse().unwrap();
    let inner_dst: Ipv4Addr = "10.1.2.2".parse().unwrap();

    // Control: the same frame from host 1, which holds a lease, is delivered.
    let frame = vxlan_payload(agents[1].mac, inner_src, inner_dst, b"from-a-peer");
    let got = receive_in_container2(&topo, Duration::from_secs(2), || {
        send_vxlan_from(&topo.hosts[0], frame)
    });
    assert!(
        got.iter().any(|g| g == b"from-a-peer"),
        "control frame from a peer was not delivered: {got:?}"
    );

    let before = agents[1].counters();
    let frame = vxlan_payload(agents[1].mac, inner_src, inner_dst, b"spoofed");
    let got = receive_in_container2(&topo, Duration::from_secs(2), || {
        send_vxlan_from(&topo.stranger, frame)
    });
    let dropped = delta(&agents[1].counters(), &before, counter::DROP_UNKNOWN_SOURCE);
    eprintln!("spoofed frames dropped: {dropped}");
    assert!(
        got.is_empty(),
        "spoofed VXLAN reached the container: {got:?}"
    );
    assert!(
        dropped >= 5,
        "spoofed frames were not counted as dropped: {dropped}"
    );

    // Peer removal: the map entries go, and the VTEP is no longer accepted.
    agents[0].apply(LeaseEvent::Removed(lease(1, agents[1].mac)));
    let st = status_of(&topo, 0);
    assert!(st.peers.is_empty() && st.known_vteps.is_empty(), "{st}");
    // Changed: a new VTEP MAC replaces the entry; the old VTEP stays known only if still used.
    let new_mac = MacAddr([0x0a, 0, 0, 0, 0, 0x42]);
    agents[1].apply(LeaseEvent::Changed {
        old: lease(0, agents[0].mac),
        new: lease(0, new_mac),
    });
    let st = status_of(&topo, 1);
    assert_eq!(st.peers.len(), 1);
    assert_eq!(st.peers[0].vtep_mac, weft::netlink::fmt_mac(&new_mac));
    assert_eq!(
        st.known_vteps,
        vec![UNDERLAY[0].parse::<Ipv4Addr>().unwrap()]
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn reconcile_repairs_detached_programs_stale_and_missing_entries() {
    let topo = Topology::new();
    let agents = start_pair(&topo, [Kind::Ebpf, Kind::Ebpf]);
    let pin = topo.pin_dir(0);
    let peers = vec![lease(1, agents[1].mac)];
    assert_eq!(
        agents[0].reconcile(peers.clone()),
        0,
        "nothing to repair after setup"
    );

    // Detached by hand with bpftool: the link stays pinned but no longer runs.
    let decap_pin = pin.join("links").join("weft_tc_decap@ens32");
    run(
        "ip",
        &[
            "netns",
            "exec",
            &topo.hosts[0].name,
            "bpftool",
            "link",
            "detach",
            "pinned",
            &decap_pin.to_string_lossy(),
        ],
    );
    let st = status_of(&topo, 0);
    assert!(
        st.programs
            .iter()
            .any(|p| p.program == "weft_tc_decap" && p.state == "detached"),
        "{st}"
    );
    // The pinned encap link removed by hand.
    let encap_pin = pin.join("links").join("weft_tc_encap@docker0");
    std::fs::remove_file(&encap_pin).expect("rm pinned link");
    // A stale map entry and a missing one.
    let stale: Ipv4Net = "10.1.99.0/24".parse().unwrap();
    let stale_lease = Lease {
        subnet: stale,
        ..lease(1, agents[1].mac)
    };
    agents[0].apply(LeaseEvent::Added(Lease {
        attrs: LeaseAttrs {
            public_ip: "192.168.77.50".parse().unwrap(),
            ..stale_lease.attrs.clone()
        },
        ..stale_lease
    }));

    let repairs = agents[0].reconcile(peers.clone());
    eprintln!("repairs made: {repairs}");
    assert!(
        repairs >= 3,
        "expected re-attach of 2 programs and removal of the stale entry, got {repairs}"
    );
    let st = status_of(&topo, 0);
    assert_eq!(
        st.programs.len(),
        4,
        "decap, encap on docker0 and on its port vethc1, host encap on flannel.1: {st}"
    );
    assert!(st.programs.iter().all(|p| p.state == "attached"), "{st}");
    assert_eq!(st.peers.len(), 1, "{st}");
    assert_eq!(
        st.known_vteps,
        vec![UNDERLAY[1].parse::<Ipv4Addr>().unwrap()],
        "{st}"
    );
    assert!(encap_pin.exists() && decap_pin.exists());
    // And the repaired programs carry the traffic again.
    let before = agents[0].counters();
    assert_pings(&topo, 0, 1, &[]);
    let after = agents[0].counters();
    assert!(
        delta(&after, &before, counter::ENCAPSULATED) >= 3
            && delta(&after, &before, counter::DECAPSULATED) >= 3,
        "{after:?}"
    );
    assert_eq!(
        agents[0].reconcile(peers),
        0,
        "a second reconcile finds nothing to do"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn restart_adopts_pinned_programs_without_losing_a_ping() {
    let topo = Topology::new();
    let [a, b] = start_pair(&topo, [Kind::Ebpf, Kind::Ebpf]);
    let mut ping = topo.containers[0].spawn(&[
        "ping",
        "-n",
        "-q",
        "-i",
        "0.01",
        "-c",
        "400",
        &container_ip(1),
    ]);
    let encapsulated_by_b = |since: &Counters| delta(&b.counters(), since, counter::ENCAPSULATED);
    let start = b.counters();
    poll::until_blocking(
        "host 2 to encapsulate ping replies",
        Duration::from_secs(10),
        || {
            let n = encapsulated_by_b(&start);
            poll::check(n >= 5, n)
        },
    );
    let before = b.counters();
    a.stop();
    // Host 1's agent is down; its programs still decapsulate what host 2 sends, so the requests
    // keep arriving and host 2 keeps encapsulating replies.
    poll::until_blocking(
        "host 2 to keep encapsulating replies with host 1's agent stopped",
        Duration::from_secs(3),
        || {
            let n = encapsulated_by_b(&before);
            poll::check(n >= 20, n)
        },
    );
    let a = Agent::start(&topo, 0, Kind::Ebpf).expect("restart adopts");
    assert!(
        ping.try_wait().expect("ping status").is_none(),
        "the ping ended before the agent restarted: the test saw no restart under traffic"
    );
    a.apply(LeaseEvent::Added(lease(1, b.mac)));
    let out = ping.wait_with_output().expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let (sent, received) = weft_tests::ping_summary(&text).unwrap_or((0, 0));
    eprintln!("ping at 100/s across the restart: {sent} sent, {received} received");
    assert!(
        sent == 400 && received == sent,
        "packets lost across the restart: {text}"
    );
    let st = status_of(&topo, 0);
    assert!(
        st.programs.iter().all(|p| p.state == "attached") && st.programs.len() == 4,
        "{st}"
    );
    drop(a);

    // --cleanup: everything pinned goes, traffic falls back to flannel.1.
    weft::backend::ebpf::cleanup(&topo.pin_dir(0)).expect("cleanup");
    let st = status_of(&topo, 0);
    assert_eq!(st.mode, Mode::Kernel, "{st}");
    assert!(st.node.is_none() && st.programs.is_empty());
    // The unpinned links are released asynchronously.
    poll::until_blocking(
        "the XDP program to leave ens32 after cleanup",
        Duration::from_secs(5),
        || {
            let link = topo.hosts[0].ip("-d link show ens32");
            poll::check(!link.contains("weft"), link)
        },
    );
    let flannel_before = topo.hosts[0].flannel_packets();
    assert_pings(&topo, 0, 1, &[]);
    assert!(
        topo.hosts[0].flannel_packets().0 - flannel_before.0 >= 3,
        "after cleanup flannel.1 carries the traffic"
    );
    drop(b);
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn mixed_ebpf_and_kernel_hosts_reach_each_other() {
    let topo = Topology::new();
    let agents = start_pair(&topo, [Kind::Ebpf, Kind::Kernel]);
    let before = agents[0].counters();
    let kernel_before = topo.hosts[1].flannel_packets();
    assert_pings(&topo, 0, 1, &[]);
    assert_pings(&topo, 1, 0, &[]);
    tcp_transfer(&topo, 0, 1, 4 * MB).expect("TCP eBPF -> kernel");
    tcp_transfer(&topo, 1, 0, 4 * MB).expect("TCP kernel -> eBPF");
    let after = agents[0].counters();
    let (tx, rx) = (
        topo.hosts[1].flannel_packets().0 - kernel_before.0,
        topo.hosts[1].flannel_packets().1 - kernel_before.1,
    );
    eprintln!(
        "mixed: eBPF host encapsulated {}, decapsulated {}; kernel host flannel.1 tx {tx} rx {rx}",
        delta(&after, &before, counter::ENCAPSULATED),
        delta(&after, &before, counter::DECAPSULATED)
    );
    assert!(
        delta(&after, &before, counter::ENCAPSULATED) >= 100
            && delta(&after, &before, counter::DECAPSULATED) >= 100
    );
    assert!(
        tx >= 100 && rx >= 100,
        "the kernel host's flannel.1 must carry its side"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn setup_failure_names_the_step_and_leaves_nothing_attached() {
    let topo = Topology::new();
    // Another program already holds native XDP on ens32: the XDP decap attach must fail.
    let pin = topo.pin_dir(0);
    let blocker = topo.bpffs.path().join("weft").join("blocker");
    let path = topo.hosts[0].path();
    let err = spawn_in(&path, move || {
        let mut other = weft::datapath::Datapath::load(&blocker).expect("load blocker");
        other
            .attach_decap("ens32", weft::datapath::DecapHook::Xdp)
            .expect("blocker attaches");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let err = rt.block_on(async {
            let nl = Netlink::connect().expect("netlink");
            let vx = vxlan_settings(&nl).await.expect("settings");
            let mut s = EbpfSettings::new(vx, &pin);
            s.decap_hook = Some(weft::datapath::DecapHook::Xdp);
            EbpfBackend::try_new(nl, s)
                .await
                .err()
                .map(|e| e.to_string())
        });
        let _ = weft::datapath::Datapath::detach_and_unpin(&blocker);
        (err, pin_left(&pin))
    })
    .join()
    .expect("thread");
    let (err, left) = err;
    let err = err.expect("try_new must fail while another XDP program holds ens32");
    eprintln!("{err}");
    assert!(
        err.contains("decapsulation") && err.contains("ens32") && err.contains("xdp"),
        "{err}"
    );
    assert!(!left, "a failed setup left pins behind");
}

fn pin_left(pin: &Path) -> bool {
    pin.join("links").exists() || pin.join("maps").exists()
}

/// Whether `weft status` lists `program` attached on `interface`.
fn attached_on(topo: &Topology, host: usize, program: &str, interface: &str) -> bool {
    status_of(topo, host)
        .programs
        .iter()
        .any(|p| p.program == program && p.interface == interface && p.state == "attached")
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn bridge_ports_get_encapsulation_and_containers_get_packets_directly() {
    let topo = Topology::new();
    let agents = start_pair(&topo, [Kind::Ebpf, Kind::Ebpf]);
    let peers = [vec![lease(1, agents[1].mac)], vec![lease(0, agents[0].mac)]];
    for (a, p) in agents.iter().zip(&peers) {
        a.reconcile(p.clone());
    }
    assert!(
        attached_on(&topo, 0, "weft_tc_encap", "vethc1"),
        "{}",
        status_of(&topo, 0)
    );
    assert!(
        attached_on(&topo, 1, "weft_tc_encap", "vethc2"),
        "{}",
        status_of(&topo, 1)
    );

    // Encapsulated at the container's port (learning the container there), handed
    // straight into the other container's namespace: the bridges see none of it.
    let bridge_rx = |h: usize| topo.hosts[h].ip("-s -j link show docker0");
    let rx_packets = |text: String| {
        serde_json::from_str::<Value>(&text).expect("json")[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = [agents[0].counters(), agents[1].counters()];
    let bridge_before = [rx_packets(bridge_rx(0)), rx_packets(bridge_rx(1))];
    assert_pings(&topo, 0, 1, &[]);
    for r in [
        tcp_transfer(&topo, 0, 1, 8 * MB),
        tcp_transfer(&topo, 1, 0, 8 * MB),
    ] {
        assert!(r.is_ok(), "{r:?}");
    }
    for h in 0..2 {
        let after = agents[h].counters();
        let delivered = delta(&after, &before[h], counter::DELIVERED_TO_CONTAINER);
        let decapsulated = delta(&after, &before[h], counter::DECAPSULATED);
        let bridge = rx_packets(bridge_rx(h)) - bridge_before[h];
        eprintln!("host {}: decapsulated {decapsulated}, delivered to the container {delivered}, docker0 rx {bridge}", h + 1);
        assert!(
            delivered >= 100 && delivered + 3 >= decapsulated,
            "host {}: not delivered directly: {after:?}",
            h + 1
        );
        assert!(
            bridge <= 10,
            "host {}: docker0 received {bridge} packets",
            h + 1
        );
    }

    // The container on host 1 is replaced (same address, new veth, new MAC) and no
    // reconcile has run: the stale entry must not swallow its packets.
    topo.hosts[0].ip("link del vethc1");
    topo.hosts[0].ip(&format!(
        "link add vethc1b mtu 1450 type veth peer name eth0 netns {}",
        topo.containers[0].name
    ));
    topo.hosts[0].ip("link set vethc1b master docker0 up");
    topo.containers[0].ip("addr add 10.1.1.2/24 dev eth0");
    topo.containers[0].ip("link set eth0 mtu 1450 up");
    topo.containers[0].ip("route add default via 10.1.1.1");
    // Its first packet (ARP for the gateway) tells host 1 its new MAC, as with Docker.
    assert_pings(&topo, 0, 1, &[]);
    assert_pings(&topo, 1, 0, &[]);
    agents[0].reconcile(peers[0].clone());
    assert!(attached_on(&topo, 0, "weft_tc_encap", "vethc1b"));
    assert!(
        !topo
            .pin_dir(0)
            .join("links")
            .join("weft_tc_encap@vethc1")
            .exists(),
        "the gone port's pin is removed"
    );
    assert!(!status_of(&topo, 0)
        .programs
        .iter()
        .any(|p| p.interface == "vethc1"));
    // Its first reply through the port teaches the program where it is.
    assert_pings(&topo, 1, 0, &[]);
    let before = agents[0].counters();
    assert_pings(&topo, 1, 0, &[]);
    assert!(
        delta(
            &agents[0].counters(),
            &before,
            counter::DELIVERED_TO_CONTAINER
        ) >= 3,
        "the new container is delivered to directly"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_new_port_on_the_bridge_is_reported_at_once() {
    let topo = Topology::new();
    let [a, _b] = start_pair(&topo, [Kind::Ebpf, Kind::Ebpf]);
    let host = topo.hosts[0].name.clone();
    // Interfaces that are not the bridge's ports are no reason to reconcile. The backend's link
    // watch is subscribed since start, so a change made before `local_change` is queued for it.
    run(
        "ip",
        &[
            "-n", &host, "link", "add", "vethx", "type", "veth", "peer", "name", "vethx-c",
        ],
    );
    run("ip", &["-n", &host, "link", "set", "vethx", "up"]);
    // An observation window for something that must not happen.
    assert!(
        !a.local_change(Duration::from_millis(1500)),
        "a link outside the bridge was reported"
    );
    run(
        "ip",
        &[
            "-n", &host, "link", "add", "vethz", "type", "veth", "peer", "name", "vethz-c",
        ],
    );
    run(
        "ip",
        &[
            "-n", &host, "link", "set", "vethz", "master", "docker0", "up",
        ],
    );
    let started = Instant::now();
    assert!(
        a.local_change(Duration::from_secs(5)),
        "a new bridge port was not reported"
    );
    eprintln!("reported {:?} after the port was added", started.elapsed());
    a.reconcile(vec![lease(1, _b.mac)]);
    assert!(attached_on(&topo, 0, "weft_tc_encap", "vethz"));
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_bridge_created_later_gets_encapsulation_on_reconcile() {
    let topo = Topology::new();
    topo.hosts[0].ip("link set docker0 name docker-old");
    let a = Agent::start(&topo, 0, Kind::Ebpf).expect("a missing bridge is not fatal");
    let b = Agent::start(&topo, 1, Kind::Ebpf).expect("host 2");
    a.apply(LeaseEvent::Added(lease(1, b.mac)));
    b.apply(LeaseEvent::Added(lease(0, a.mac)));
    let st = status_of(&topo, 0);
    assert_eq!(
        st.programs.len(),
        2,
        "only decap and the host program on flannel.1 before docker0 exists: {st}"
    );
    topo.hosts[0].ip("link set docker-old name docker0");
    assert_eq!(
        a.reconcile(vec![lease(1, b.mac)]),
        1,
        "attaching to the new bridge is one repair"
    );
    bind_containers(&topo, &a, &b);
    let before = a.counters();
    assert_pings(&topo, 0, 1, &[]);
    assert!(delta(&a.counters(), &before, counter::ENCAPSULATED) >= 3);
}
