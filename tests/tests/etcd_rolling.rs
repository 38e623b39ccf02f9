//! Rolling etcd under running agents: a 3-member cluster restarted one member at a time (SIGTERM,
//! as a rolling upgrade does), then one member replaced by a new member at a new address
//! (`etcdctl member remove` / `member add`, empty data, `--initial-cluster-state existing`).
//! The agents keep the endpoint list they started with, which after the replacement names a
//! member that is gone. Kernel datapath (flannel.1). Root only.
//!
//! What must hold throughout: pings between containers on the three hosts at 20/s lose nothing;
//! every agent keeps running with the same PID; every lease stays in etcd unchanged; and after
//! each step a lease written by a new peer is programmed on every host (its watch resumed).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use weft_tests::{cluster, Agent, Container, EtcdCluster, Host, Pinger};

const PREFIX: &str = "/coreos.com/network";
const NET: &str =
    r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.127.0","Backend":{"Type":"vxlan"}}"#;
/// A 15 s lease renewed every 5 s: renewals go on through every step, so a lost lease shows.
const KERNEL: &[&str] = &[
    "--datapath",
    "kernel",
    "--reconcile-interval",
    "1s",
    "--subnet-lease-ttl",
    "15s",
    "--subnet-lease-renew-margin",
    "1",
];
const LEASE_TTL: Duration = Duration::from_secs(15);
/// How long a new peer may take to show up on every host after a step.
const PROGRAMMED: Duration = Duration::from_secs(20);

/// Members on 172.16.15.2-4 of the switch; the replacement gets .5.
fn member_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 15, n)
}

/// A peer that exists only as a lease: 10.1.(200+n).0/24 on VTEP 172.16.15.(200+n).
struct FakePeer {
    subnet: String,
    gateway: Ipv4Addr,
    vtep: Ipv4Addr,
    mac: String,
}

impl FakePeer {
    fn new(n: u8) -> FakePeer {
        FakePeer {
            subnet: format!("10.1.{}.0/24", 200 + n),
            gateway: Ipv4Addr::new(10, 1, 200 + n, 0),
            vtep: member_ip(200 + n),
            mac: format!("0e:77:00:00:00:{:02x}", n),
        }
    }

    fn key(&self) -> String {
        format!("{PREFIX}/subnets/{}", self.subnet.replace('/', "-"))
    }

    fn value(&self) -> String {
        format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            self.vtep, self.mac
        )
    }
}

/// Whether flannel.1 on `host` has the route to `peer`'s subnet and the fdb entry for its VTEP.
async fn programmed(host: &Host, peer: &FakePeer) -> (bool, String) {
    let route = host
        .exec(&[
            "ip",
            "-4",
            "route",
            "show",
            &peer.subnet,
            "dev",
            "flannel.1",
        ])
        .await;
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    let fdb = host
        .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])
        .await;
    let fdb = String::from_utf8_lossy(&fdb.stdout).into_owned();
    let want_fdb = format!("{} dst {}", peer.mac, peer.vtep);
    let ok = route.contains(&format!("via {}", peer.gateway)) && fdb.contains(&want_fdb);
    (ok, format!("route: {route:?}, fdb: {fdb:?}"))
}

/// Wait until every host has programmed `peer`; panics naming the host and what it had.
async fn wait_programmed(hosts: &[Host], peer: &FakePeer, step: &str) -> Duration {
    let start = Instant::now();
    for h in hosts {
        loop {
            let (ok, seen) = programmed(h, peer).await;
            if ok {
                break;
            }
            if start.elapsed() > PROGRAMMED {
                let log = h.agent().map(|a| a.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "after {step}: {} did not program peer {} within {PROGRAMMED:?} (watch not resumed?); saw {seen}\n--- agent log tail ---\n{}",
                    h.name(),
                    peer.subnet,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    start.elapsed()
}

/// Put `key` = `value` through any member that answers, retrying while the cluster elects.
async fn put_anywhere(etcd: &mut EtcdCluster, key: &str, value: &str) {
    let start = Instant::now();
    loop {
        let mut last = None;
        for m in etcd.members.iter_mut() {
            if !m.running() {
                continue;
            }
            match m.etcdctl(&["put", key, value]).await {
                Ok(_) => return,
                Err(e) => last = Some(e),
            }
        }
        if start.elapsed() > Duration::from_secs(20) {
            panic!("no etcd member accepted a write for 20 s: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM a member (a clean shutdown, as a rolling upgrade does) and wait for it to exit.
async fn stop_member(etcd: &mut EtcdCluster, i: usize) {
    let pid = etcd.members[i].pid();
    // SAFETY: kill(2) on our own child's pid (ip netns exec has exec'd etcd).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    while etcd.members[i].running() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "etcd member {} ignored SIGTERM for 15 s",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn rolling_restart_and_member_replacement_lose_nothing() {
    let c = cluster(4).await;
    for n in 2..=5 {
        c.switch()
            .ip(&["addr", "add", &format!("{}/24", member_ip(n)), "dev", "br0"])
            .await
            .unwrap();
    }
    let dir = c.dir().join("members");
    let mut etcd = EtcdCluster::start_in_netns(
        c.switch().name(),
        &[member_ip(2), member_ip(3), member_ip(4)],
        &dir,
    )
    .await
    .unwrap();
    etcd.members[0].put(&format!("{PREFIX}/config"), NET).await;
    // The list every agent keeps for the whole test, also once member 3 is gone.
    let endpoints = etcd.endpoints();
    let hosts = &c.hosts()[..3];
    let mut agents = Vec::new();
    for h in hosts {
        let mut args = h.agent_args();
        let at = args.iter().position(|a| a == "--etcd-endpoints").unwrap();
        args[at + 1] = endpoints.clone();
        args.extend(KERNEL.iter().map(|s| s.to_string()));
        let agent = Agent::spawn(h.name(), args, &h.dir().join("agent.log"), false).unwrap();
        agents.push(agent);
        h.add_container().await.unwrap();
    }
    let containers: Vec<Container> = hosts.iter().map(|h| h.containers()[0].clone()).collect();
    for i in 0..3 {
        containers[i]
            .ping_until(containers[(i + 1) % 3].ip(), Duration::from_secs(20))
            .await
            .unwrap();
    }
    let pids: Vec<u32> = agents.iter().map(|a| a.pid().unwrap()).collect();
    let subnets = format!("{PREFIX}/subnets/");
    let leases_before = etcd.members[0].get_prefix(&subnets).await;
    assert_eq!(
        leases_before.len(),
        3,
        "one lease per host: {leases_before:?}"
    );

    let pingers: Vec<Pinger> = (0..3)
        .map(|i| Pinger::start(&containers[i], &containers[(i + 1) % 3], "0.05").unwrap())
        .collect();

    // 1. Rolling restart, one member at a time, each back and healthy before the next.
    for i in 0..3 {
        stop_member(&mut etcd, i).await;
        let peer = FakePeer::new(i as u8 + 1);
        // Written while the member is down: the agents connected to it must have moved on.
        put_anywhere(&mut etcd, &peer.key(), &peer.value()).await;
        let took = wait_programmed(hosts, &peer, &format!("member {} stopped", i + 1)).await;
        etcd.members[i].start_again().await.unwrap();
        println!(
            "member {} restarted; a peer leased meanwhile was programmed on every host in {took:?}",
            i + 1
        );
    }
    let peer = FakePeer::new(4);
    put_anywhere(&mut etcd, &peer.key(), &peer.value()).await;
    wait_programmed(hosts, &peer, "the rolling restart").await;

    // 2. Member 3 replaced by a new member on a new address; the agents' lists still name it.
    etcd.replace_member(2, member_ip(5), &dir).await.unwrap();
    let peer = FakePeer::new(5);
    etcd.members[2].put(&peer.key(), &peer.value()).await;
    let took = wait_programmed(hosts, &peer, "member 3 was replaced").await;
    println!(
        "member 3 ({}) replaced by {}; a peer written through the new member was programmed everywhere in {took:?}",
        member_ip(4),
        etcd.members[2].endpoint()
    );
    // And through an old member, once more, a little later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peer = FakePeer::new(6);
    etcd.members[0].put(&peer.key(), &peer.value()).await;
    wait_programmed(hosts, &peer, "member 3 was replaced (second write)").await;

    // Longer than a lease's TTL with the stale list: had a renewal gone to the removed member
    // and failed for good, a lease would expire here.
    let watch_until = Instant::now() + LEASE_TTL + Duration::from_secs(5);
    while Instant::now() < watch_until {
        let now = etcd.members[0].get_prefix(&subnets).await;
        for kv in &leases_before {
            assert!(
                now.contains(kv),
                "lease {kv:?} gone after member 3 was replaced; now {now:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A fresh agent whose list names the removed member first starts and leases all the same.
    let late = c.host(3);
    let mut args = late.agent_args();
    let at = args.iter().position(|a| a == "--etcd-endpoints").unwrap();
    args[at + 1] = format!(
        "http://{}:2379,{},{}",
        member_ip(4),
        etcd.members[0].endpoint(),
        etcd.members[1].endpoint()
    );
    args.extend(KERNEL.iter().map(|s| s.to_string()));
    let late_agent = Agent::spawn(late.name(), args, &late.dir().join("agent.log"), false).unwrap();
    let joined = late.add_container().await.unwrap_or_else(|e| {
        panic!(
            "the late agent (removed member first in its list) got no subnet: {e:#}\n{}",
            late_agent.log()
        )
    });
    containers[0]
        .ping_until(joined.ip(), Duration::from_secs(20))
        .await
        .unwrap();

    let mut lost = Vec::new();
    for p in pingers {
        let weft_tests::PingCount {
            what,
            sent,
            received,
        } = p.finish().await.unwrap();
        println!("pings {what}: {received}/{sent}");
        assert!(sent > 100, "ping {what} sent only {sent}");
        if sent != received {
            lost.push(format!("{what}: {} of {sent} lost", sent - received));
        }
    }
    assert!(lost.is_empty(), "pings lost while etcd rolled: {lost:?}");
    for (h, (agent, pid)) in hosts.iter().zip(agents.iter().zip(&pids)) {
        assert_eq!(
            agent.exit_status(),
            None,
            "agent on {} exited:\n{}",
            h.name(),
            agent.log()
        );
        assert_eq!(
            agent.pid(),
            Some(*pid),
            "agent on {} was restarted",
            h.name()
        );
    }
    assert_eq!(late_agent.exit_status(), None, "{}", late_agent.log());
    let leases_after = etcd.members[0].get_prefix(&subnets).await;
    for kv in &leases_before {
        assert!(
            leases_after.contains(kv),
            "lease {kv:?} lost or changed while etcd rolled; now {leases_after:?}"
        );
    }
}
