//! The kernel datapath end to end: three hosts on one underlay, a real etcd, `weft agent
//! --datapath kernel` as processes, two containers per host.
//!
//! What a user would notice: containers reach each other across hosts (ping and checked TCP
//! bytes) with `vxlan` and `host-gw`; each host's kernel holds exactly what flanneld would
//! program for the leases in etcd (compared entry by entry with a namespace programmed by hand
//! with FLANNEL-COMPAT.md's commands); a host set up by hand the way flanneld does it
//! interoperates; deleted, stale and changed leases are followed; and an agent restart (SIGTERM
//! or kill -9) loses no packet. Needs root and the `weft` binary (`cargo xtask test`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde_json::Value;
use weft_tests::{cluster, flanneld, Cluster, Container, Host, Netns, PingCount, Pinger};

const VXLAN: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";
/// ens32 is a veth with the default MTU; flannel.1 gets 50 less.
const FLANNEL_MTU: u32 = 1450;
/// How long agents get to program what etcd says before a comparison fails.
const SETTLE: Duration = Duration::from_secs(10);

/// A lease as flanneld writes it, read straight from etcd (not through weft's parser).
#[derive(Debug, Clone, PartialEq, Eq)]
struct EtcdLease {
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    backend: String,
    /// `BackendData.VtepMAC` of vxlan leases.
    mac: Option<String>,
}

async fn leases(c: &Cluster) -> Vec<EtcdLease> {
    c.etcd()
        .get_prefix(SUBNETS)
        .await
        .into_iter()
        .map(|(key, value)| {
            let subnet = key
                .strip_prefix(SUBNETS)
                .and_then(|s| s.replacen('-', "/", 1).parse().ok())
                .unwrap_or_else(|| panic!("lease key {key} does not name a subnet"));
            let v: Value = serde_json::from_str(&value)
                .unwrap_or_else(|e| panic!("lease {key}: {e}: {value}"));
            EtcdLease {
                subnet,
                public_ip: v["PublicIP"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("lease {key} has no PublicIP: {value}")),
                backend: v["BackendType"].as_str().unwrap_or_default().to_owned(),
                mac: v["BackendData"]["VtepMAC"].as_str().map(str::to_owned),
            }
        })
        .collect()
}

fn lease_of(leases: &[EtcdLease], host: &Host) -> EtcdLease {
    leases
        .iter()
        .find(|l| l.public_ip == host.ens32_ip())
        .cloned()
        .unwrap_or_else(|| panic!("no lease with PublicIP {} in {leases:?}", host.ens32_ip()))
}

fn lease_key(subnet: Ipv4Net) -> String {
    format!("{SUBNETS}{}-{}", subnet.network(), subnet.prefix_len())
}

/// Three hosts with agents (`--datapath kernel`) and `per_host` containers each.
async fn running(config: &str, per_host: usize) -> Cluster {
    let c = cluster(3).await;
    c.write_config(config).await;
    c.start_agents(&["--datapath", "kernel"]).unwrap();
    c.add_containers(per_host).await.unwrap();
    c
}

/// Every container pings every container on the other hosts, then sends it 1 MiB over TCP,
/// checked byte for byte and seen from the sender's own address (nothing NATs in between).
async fn assert_all_reach_each_other(c: &Cluster, containers: &[Container]) {
    let pairs: Vec<(Container, Container)> = containers
        .iter()
        .flat_map(|a| containers.iter().map(move |b| (a.clone(), b.clone())))
        .filter(|(a, b)| host_of(c, a) != host_of(c, b))
        .collect();
    // The first pair waits for the agents to learn about each other; the rest must answer at once.
    let (a, b) = &pairs[0];
    a.ping_until(b.ip(), SETTLE).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (a, b) in pairs.clone() {
        tasks.spawn(async move { a.ping_until(b.ip(), Duration::from_secs(3)).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    for (a, b) in pairs.clone() {
        tasks.spawn(async move {
            let t = a.tcp_transfer(&b, 1 << 20).await?;
            anyhow::ensure!(t.bytes == 1 << 20 && t.peer.ip() == a.ip(), "{t:?}");
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    println!(
        "{} ordered container pairs: ping and 1 MiB TCP",
        pairs.len()
    );
}

fn host_of(c: &Cluster, ct: &Container) -> usize {
    c.hosts()
        .iter()
        .position(|h| h.containers().iter().any(|x| x.netns() == ct.netns()))
        .expect("container belongs to a host")
}

// ---- kernel state, as `ip -j` and `bridge -j` print it ----

/// What flanneld's backends leave in a host's kernel, as the tools print it.
#[derive(Debug, Clone, PartialEq)]
struct KernelState {
    /// `ip -d -j link show flannel.1` (ifindex removed); `Null` when there is no flannel.1.
    link: Value,
    /// `ip -j -4 addr show dev flannel.1`, the address entries.
    addrs: Value,
    /// `ip -j neigh show dev flannel.1`.
    neigh: Value,
    /// `bridge -j fdb show dev flannel.1`.
    fdb: Value,
    /// `ip -j route`, without docker0's connected route (the reference has no containers).
    routes: Value,
}

fn parse_json(out: &str) -> Value {
    if out.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(out).unwrap_or_else(|e| panic!("bad JSON from ip/bridge ({e}): {out}"))
}

impl KernelState {
    async fn read(ns: &Netns) -> KernelState {
        let json = |out: anyhow::Result<String>| out.map(|o| parse_json(&o)).unwrap_or(Value::Null);
        let mut link = json(ns.ip(&["-d", "-j", "link", "show", "flannel.1"]).await);
        if let Some(l) = link.get_mut(0).and_then(Value::as_object_mut) {
            l.remove("ifindex");
        }
        let addrs = json(
            ns.ip(&["-j", "-4", "addr", "show", "dev", "flannel.1"])
                .await,
        );
        let addrs = addrs
            .get(0)
            .map(|a| a["addr_info"].clone())
            .unwrap_or(Value::Null);
        let neigh = json(ns.ip(&["-j", "neigh", "show", "dev", "flannel.1"]).await);
        let fdb = json(
            ns.exec_ok(&["bridge", "-j", "fdb", "show", "dev", "flannel.1"])
                .await,
        );
        let routes = json(ns.ip(&["-j", "route"]).await);
        let routes = Value::Array(
            routes
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["dev"] != "docker0")
                .cloned()
                .collect(),
        );
        KernelState {
            link,
            addrs,
            neigh,
            fdb,
            routes,
        }
    }

    /// Entry-by-entry differences, one line each; empty when equal.
    fn diff(&self, want: &KernelState) -> Vec<String> {
        let mut out = Vec::new();
        diff_flat(
            "ip -d link show flannel.1",
            &self.link,
            &want.link,
            &mut out,
        );
        let sets = [
            ("ip -4 addr show dev flannel.1", &self.addrs, &want.addrs),
            ("ip neigh show dev flannel.1", &self.neigh, &want.neigh),
            ("bridge fdb show dev flannel.1", &self.fdb, &want.fdb),
            ("ip route", &self.routes, &want.routes),
        ];
        for (what, got, want) in sets {
            diff_entries(what, got, want, &mut out);
        }
        out
    }
}

/// Lists compared as sets of entries (dumps come in hash order).
fn diff_entries(what: &str, got: &Value, want: &Value, out: &mut Vec<String>) {
    let entries = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(a) => a.iter().map(Value::to_string).collect(),
            Value::Null => vec!["(no such device)".to_owned()],
            other => vec![other.to_string()],
        }
    };
    let (got, want) = (entries(got), entries(want));
    out.extend(
        want.iter()
            .filter(|e| !got.contains(e))
            .map(|e| format!("{what}: missing  {e}")),
    );
    out.extend(
        got.iter()
            .filter(|e| !want.contains(e))
            .map(|e| format!("{what}: extra    {e}")),
    );
}

/// One object compared field by field (`linkinfo.info_data.port: 8472 != 4789`).
fn diff_flat(what: &str, got: &Value, want: &Value, out: &mut Vec<String>) {
    fn flatten(prefix: String, v: &Value, into: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    flatten(format!("{prefix}.{k}"), v, into);
                }
            }
            Value::Array(a) if a.len() == 1 && prefix.is_empty() => {
                flatten(prefix, &a[0], into);
            }
            other => {
                into.insert(prefix, other.to_string());
            }
        }
    }
    let (mut g, mut w) = (BTreeMap::new(), BTreeMap::new());
    flatten(String::new(), got, &mut g);
    flatten(String::new(), want, &mut w);
    for key in g
        .keys()
        .chain(w.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if g.get(key) != w.get(key) {
            out.push(format!(
                "{what}: {key}: {} (flanneld: {})",
                g.get(key).map_or("absent", String::as_str),
                w.get(key).map_or("absent", String::as_str)
            ));
        }
    }
}

/// Run a command line (split on whitespace) inside `ns`; panics with its output when it fails.
async fn sh(ns: &Netns, cmd: &str) -> String {
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    ns.exec_ok(&argv).await.unwrap_or_else(|e| panic!("{e:#}"))
}

/// A namespace with the host's `ens32` address, programmed by hand with FLANNEL-COMPAT.md's
/// commands for `own` and `peers`: what flanneld would have made on that host.
async fn flanneld_reference(c: &Cluster, host: &Host, leases: &[EtcdLease]) -> Netns {
    let ns = Netns::create(&format!("{}-ref{}", c.name(), host.index() + 1))
        .await
        .unwrap();
    ns.add_interface("ens32", &format!("{}/24", host.ens32_ip()))
        .await
        .unwrap();
    let own = lease_of(leases, host);
    program_as_flanneld(&ns, host.ens32_ip(), &own, leases).await;
    ns
}

/// flanneld's own device (vxlan) and its per-peer entries, by the commands of FLANNEL-COMPAT.md.
/// The device gets `own.mac` when it is not there yet.
async fn program_as_flanneld(ns: &Netns, local: Ipv4Addr, own: &EtcdLease, leases: &[EtcdLease]) {
    let peers = leases
        .iter()
        .filter(|l| l.subnet != own.subnet && l.backend == own.backend);
    let mut cmds = Vec::new();
    if own.backend == "host-gw" {
        for p in peers {
            cmds.extend(flanneld::host_gw_peer(p.subnet, p.public_ip, Some("ens32")));
        }
    } else {
        if ns.ip(&["link", "show", "flannel.1"]).await.is_err() {
            let mac = own.mac.as_deref().expect("a vxlan lease has a VtepMAC");
            cmds.extend(flanneld::vxlan_device(
                local,
                own.subnet,
                Some(mac),
                FLANNEL_MTU,
                &[],
            ));
        }
        for p in peers {
            let mac = p.mac.as_deref().expect("VtepMAC");
            cmds.extend(flanneld::vxlan_peer(p.subnet, p.public_ip, mac));
        }
    }
    flanneld::run(ns.name(), &cmds)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// On each of `hosts`, the kernel state equals what flanneld programs for the leases now in
/// etcd (waiting up to [`SETTLE`] for the agents to catch up).
async fn assert_programmed_as_flanneld(c: &Cluster, hosts: &[usize]) {
    let leases = leases(c).await;
    for &i in hosts {
        let host = c.host(i);
        let reference = flanneld_reference(c, host, &leases).await;
        let want = KernelState::read(&reference).await;
        assert_ne!(
            want.routes,
            Value::Array(Vec::new()),
            "reference has no routes"
        );
        let deadline = Instant::now() + SETTLE;
        loop {
            let got = KernelState::read(host.netns()).await;
            let diff = got.diff(&want);
            if diff.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the kernel state differs from what flanneld programs for the leases\n{leases:?}\n{}",
                host.name(),
                diff.join("\n")
            );
            // Pacing between two looks; the deadline decides.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---- 1 and 2: reachability and kernel state, vxlan and host-gw ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn vxlan_containers_reach_each_other_and_kernel_state_is_flanneld_s() {
    let c = running(VXLAN, 2).await;
    assert_all_reach_each_other(&c, &c.containers()).await;
    assert_programmed_as_flanneld(&c, &[0, 1, 2]).await;
    for l in leases(&c).await {
        let mac = l.mac.clone().unwrap_or_default();
        assert!(
            l.backend == "vxlan" && mac.len() == 17 && mac == mac.to_lowercase(),
            "{l:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn host_gw_containers_reach_each_other_and_routes_are_flanneld_s() {
    let c = running(HOST_GW, 2).await;
    assert_all_reach_each_other(&c, &c.containers()).await;
    // Also: no flannel.1, no neighbour or fdb entries (the reference has none).
    assert_programmed_as_flanneld(&c, &[0, 1, 2]).await;
}

// ---- 3: a host configured by hand as flanneld does it ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn a_host_set_up_by_hand_like_flanneld_interoperates() {
    let c = cluster(3).await;
    c.write_config(VXLAN).await;
    let hand = c.host(2);
    let subnet: Ipv4Net = "10.1.99.0/24".parse().unwrap();
    let ns = hand.netns();
    flanneld::host_by_hand(&c, hand, "10.1.0.0/16", subnet)
        .await
        .unwrap();

    for h in &c.hosts()[..2] {
        h.spawn_agent(&["--datapath", "kernel"]).unwrap();
        h.wait_subnet(weft_tests::cluster::SUBNET_TIMEOUT)
            .await
            .unwrap();
    }
    let all = leases(&c).await;
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(lease_of(&all, hand).subnet, subnet);
    program_as_flanneld(ns, hand.ens32_ip(), &lease_of(&all, hand), &all).await;

    c.add_containers(2).await.unwrap();
    // Both ways: weft <-> hand-made host, and weft <-> weft.
    assert_all_reach_each_other(&c, &c.containers()).await;
    assert_programmed_as_flanneld(&c, &[0, 1]).await;
}

// ---- 4: deleted, stale and changed leases ----

/// The lines of `state` that mention `lease`'s subnet, gateway or VTEP.
fn mentions(state: &KernelState, lease: &EtcdLease) -> Vec<String> {
    let gw = lease.subnet.network().to_string();
    let (subnet, public_ip) = (lease.subnet.to_string(), lease.public_ip.to_string());
    let pick = |v: &Value, key: &str, needle: &str| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e[key] == needle)
            .map(Value::to_string)
            .collect()
    };
    [
        pick(&state.neigh, "dst", &gw),
        pick(&state.fdb, "dst", &public_ip),
        pick(&state.routes, "dst", &subnet),
    ]
    .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn deleted_stale_and_changed_leases_are_followed() {
    let c = cluster(3).await;
    c.write_config(VXLAN).await;
    // Before any agent, host 1 has flanneld's flannel.1 (a MAC peers may already know) and the
    // entries of a node that was removed while flanneld was down.
    let (h1, h3) = (c.host(0), c.host(2));
    let kept_mac = "0e:5e:ed:00:00:01";
    let stale = EtcdLease {
        subnet: "10.1.250.0/24".parse().unwrap(),
        public_ip: "172.16.15.250".parse().unwrap(),
        backend: "vxlan".into(),
        mac: Some("0e:5e:ed:00:00:fa".into()),
    };
    let flanneld_own = EtcdLease {
        subnet: "10.1.249.0/24".parse().unwrap(),
        public_ip: h1.ens32_ip(),
        backend: "vxlan".into(),
        mac: Some(kept_mac.into()),
    };
    program_as_flanneld(
        h1.netns(),
        h1.ens32_ip(),
        &flanneld_own,
        &[flanneld_own.clone(), stale.clone()],
    )
    .await;
    assert_eq!(
        mentions(&KernelState::read(h1.netns()).await, &stale).len(),
        3
    );
    // flanneld's subnet file: the agent takes that subnet again, so flannel.1 keeps its address
    // (removing a device's last address would flush its neighbours and routes for us).
    std::fs::write(
        h1.subnet_file(),
        format!(
            "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.249.1/24\nFLANNEL_MTU={FLANNEL_MTU}\nFLANNEL_IPMASQ=false\n"
        ),
    )
    .unwrap();

    c.start_agents(&["--datapath", "kernel"]).unwrap();
    c.add_containers(1).await.unwrap();
    assert_all_reach_each_other(&c, &c.containers()).await;
    let before = leases(&c).await;
    assert_eq!(
        lease_of(&before, h1).mac.as_deref(),
        Some(kept_mac),
        "the compatible flannel.1 must be reused with its MAC"
    );
    assert_eq!(lease_of(&before, h1).subnet, flanneld_own.subnet);
    // Exact equality: the stale peer's neighbour, fdb entry and route are gone.
    assert_programmed_as_flanneld(&c, &[0, 1, 2]).await;

    // Host 3 restarts with a recreated flannel.1: a new VTEP MAC in its lease, which the peers
    // follow (old fdb entry gone, neighbour replaced).
    let agent3 = h3.agent().unwrap();
    let old = lease_of(&before, h3);
    agent3.stop().await.unwrap();
    sh(h3.netns(), "ip link del flannel.1").await;
    agent3.restart().await.unwrap();
    let deadline = Instant::now() + SETTLE;
    let changed = loop {
        let now = lease_of(&leases(&c).await, h3);
        if now.mac != old.mac {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "host 3 kept VTEP MAC {:?}",
            old.mac
        );
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(changed.subnet, old.subnet);
    let (a, b) = (c.container(0), c.container(2));
    a.ping_until(b.ip(), SETTLE).await.unwrap();
    b.ping_until(a.ip(), SETTLE).await.unwrap();
    assert_programmed_as_flanneld(&c, &[0, 1, 2]).await;
    println!(
        "host 3's VTEP MAC {:?} -> {:?}: reachable",
        old.mac, changed.mac
    );

    // Host 3 leaves for good: its lease deleted in etcd removes its entries everywhere within 1 s.
    agent3.kill();
    assert_eq!(c.etcd().delete(&lease_key(changed.subnet)).await, 1);
    let deleted = Instant::now();
    loop {
        let mut left = Vec::new();
        for h in &c.hosts()[..2] {
            left.extend(mentions(&KernelState::read(h.netns()).await, &changed));
        }
        if left.is_empty() {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "1 s after its lease was deleted, host 3's entries are still there:\n{}",
            left.join("\n")
        );
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("deleted lease's entries gone after {:?}", deleted.elapsed());
    assert_programmed_as_flanneld(&c, &[0, 1]).await;
}

// ---- 5: agent restarts under traffic ----

fn readies(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" ready") && l.contains("peers="))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn agent_restart_loses_no_packets() {
    let c = running(VXLAN, 1).await;
    let (a, b) = (c.container(0), c.container(1));
    a.ping_until(b.ip(), SETTLE).await.unwrap();
    b.ping_until(a.ip(), SETTLE).await.unwrap();
    let agent = c.host(1).agent().unwrap();
    for how in ["SIGTERM", "kill -9"] {
        let seen = readies(&agent.log());
        let pings = [
            Pinger::start(&a, &b, "0.1").unwrap(),
            Pinger::start(&b, &a, "0.1").unwrap(),
        ];
        // The scenario: a second of traffic before the restart (the pingers count every packet).
        tokio::time::sleep(Duration::from_secs(1)).await;
        if how == "SIGTERM" {
            let status = agent.stop().await.unwrap();
            assert!(status.success(), "SIGTERM: {status}\n{}", agent.log());
        } else {
            agent.kill();
        }
        agent.restart().await.unwrap();
        weft_tests::poll::until(
            "the restarted agent to be ready",
            Duration::from_secs(20),
            || async {
                assert!(
                    agent.exit_status().is_none(),
                    "restarted agent exited:\n{}",
                    agent.log()
                );
                let log = agent.log();
                weft_tests::poll::check(readies(&log) > seen, ()).map_err(|_| log)
            },
        )
        .await;
        // An observation window: keep pinging through the restarted agent's first reconcile.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for p in pings {
            let PingCount {
                what,
                sent,
                received: got,
            } = p.finish().await.unwrap();
            println!(
                "agent restart ({how}): ping {what}: {sent} sent, {} lost",
                sent - got
            );
            assert!(sent >= 15, "ping {what} sent only {sent}");
            assert_eq!(
                sent - got,
                0,
                "agent restart ({how}): ping {what} lost packets"
            );
        }
    }
    assert_programmed_as_flanneld(&c, &[0, 1, 2]).await;
}
