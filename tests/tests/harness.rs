//! The harness itself, exercised for real: etcd, namespaces, containers, cleanup. Root only.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_tests::{cluster, netns, Cluster, Etcd, KeptProcess};

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn local_etcd_serves_and_cleans_up() {
    let etcd = Etcd::start_local().await;
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    etcd.put("/weft-test/a", "1").await;
    etcd.put("/weft-test/b", "2").await;
    assert_eq!(etcd.get("/weft-test/a").await.as_deref(), Some("1"));
    assert_eq!(etcd.get("/weft-test/missing").await, None);
    assert_eq!(
        etcd.get_prefix("/weft-test/").await,
        vec![
            ("/weft-test/a".into(), "1".into()),
            ("/weft-test/b".into(), "2".into())
        ]
    );
    assert_eq!(etcd.delete("/weft-test/a").await, 1);
    let mut client = etcd.client().await;
    assert_eq!(
        client.get("/weft-test/a", None).await.unwrap().kvs().len(),
        0
    );

    let (pid, dir) = (etcd.pid(), etcd.dir().unwrap().to_owned());
    drop(etcd);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "etcd {pid} still running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// What a cluster made, to check afterwards that none of it is left.
struct Footprint {
    namespaces: Vec<String>,
    etcd: KeptProcess,
    dir: PathBuf,
}

impl Footprint {
    fn of(c: &Cluster) -> Footprint {
        let mut namespaces = vec![c.switch().name().to_owned()];
        for h in c.hosts() {
            namespaces.push(h.name().to_owned());
            namespaces.extend(h.containers().iter().map(|c| c.netns().to_owned()));
        }
        let etcd = KeptProcess::of(c.etcd().pid()).expect("etcd runs");
        Footprint {
            namespaces,
            etcd,
            dir: c.dir().to_owned(),
        }
    }

    fn assert_gone(&self) {
        let present = netns::list();
        let left: Vec<_> = self
            .namespaces
            .iter()
            .filter(|n| present.contains(n))
            .collect();
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
        assert!(
            !self.etcd.alive(),
            "etcd (pid {}) still runs",
            self.etcd.pid
        );
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
    }
}

/// Write a subnet file the way the agent does, so the harness can address docker0 and containers
/// without an agent.
fn write_subnet_file(path: &Path, third_octet: u8) {
    let text = format!(
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.{third_octet}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    );
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn three_hosts_with_containers_etcd_and_cleanup() {
    let c = cluster(3).await;
    assert_eq!(c.hosts().len(), 3);

    // The underlay: every host reaches etcd and its peers over ens32.
    for (i, h) in c.hosts().iter().enumerate() {
        assert_eq!(h.ens32_ip(), Ipv4Addr::new(172, 16, 15, 21 + i as u8));
        let forward = h
            .exec_ok(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .await
            .unwrap();
        assert_eq!(forward.trim(), "1", "ip_forward on {}", h.name());
        let docker0 = h
            .exec_ok(&["ip", "-o", "link", "show", "docker0"])
            .await
            .unwrap();
        assert!(
            docker0.contains("state UP") || docker0.contains("UP"),
            "{docker0}"
        );
    }
    let out = c
        .host(0)
        .exec(&["ping", "-c", "1", "-W", "2", "172.16.15.23"])
        .await;
    assert!(
        out.status.success(),
        "host1 -> host3 over the underlay: {out:?}"
    );

    // etcd on the underlay: written from host 1, read from host 3 and from the test process.
    c.host(0)
        .etcdctl(&["put", "/weft-test/from-host1", "hello"])
        .await
        .unwrap();
    let got = c
        .host(2)
        .etcdctl(&["get", "--print-value-only", "/weft-test/from-host1"])
        .await
        .unwrap();
    assert_eq!(got.trim(), "hello");
    assert_eq!(
        c.etcd().get("/weft-test/from-host1").await.as_deref(),
        Some("hello")
    );
    c.write_config(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .await;
    let config = c
        .host(1)
        .etcdctl(&["get", "--print-value-only", "/coreos.com/network/config"])
        .await
        .unwrap();
    assert!(config.contains(r#""Network":"10.1.0.0/16""#), "{config}");
    assert_eq!(c.etcd().get_prefix("/weft-test/").await.len(), 1);
    assert_eq!(c.etcd().delete("/weft-test/from-host1").await, 1);

    // Containers: addressed from each host's subnet file the way Docker's --bip/--mtu do it.
    for (i, h) in c.hosts().iter().enumerate() {
        write_subnet_file(&h.subnet_file(), 10 + i as u8);
    }
    c.add_containers(2).await.unwrap();
    assert_eq!(c.containers().len(), 6);
    let (a, b) = (c.container(0), c.container(1));
    assert_eq!(a.ip(), Ipv4Addr::new(10, 1, 10, 2));
    assert_eq!(b.ip(), Ipv4Addr::new(10, 1, 10, 3));
    assert_eq!(c.container(2).ip(), Ipv4Addr::new(10, 1, 11, 2));
    assert_eq!(a.gateway(), Ipv4Addr::new(10, 1, 10, 1));
    assert!(a.host_veth().starts_with("veth"));
    let eth0 = a
        .exec_ok(&["ip", "-o", "link", "show", "eth0"])
        .await
        .unwrap();
    assert!(eth0.contains("mtu 1450"), "{eth0}");
    let routes = a.exec_ok(&["ip", "route"]).await.unwrap();
    assert!(
        routes.contains("default via 10.1.10.1 dev eth0"),
        "{routes}"
    );
    let bridge = c
        .host(0)
        .exec_ok(&["ip", "-o", "addr", "show", "docker0"])
        .await
        .unwrap();
    assert!(bridge.contains("inet 10.1.10.1/24"), "{bridge}");
    let ports = c
        .host(0)
        .exec_ok(&["ip", "-o", "link", "show", "master", "docker0"])
        .await
        .unwrap();
    assert!(
        ports.contains(a.host_veth()) && ports.contains(b.host_veth()),
        "{ports}"
    );

    // Same host: over docker0, by ping and by a checked TCP transfer; the gateway answers too.
    a.ping(b.ip()).await.unwrap();
    b.ping(a.ip()).await.unwrap();
    a.ping(a.gateway()).await.unwrap();
    let t = a.tcp_transfer(&b, 4 << 20).await.unwrap();
    assert_eq!(t.bytes, 4 << 20);
    assert_eq!(t.peer.ip(), a.ip());
    // Across hosts nothing routes without an agent, and the error says what failed.
    let err = a.ping(c.container(4).ip()).await.unwrap_err().to_string();
    assert!(
        err.contains("ping 10.1.12.2 from container") && err.contains("failed"),
        "{err}"
    );

    let footprint = Footprint::of(&c);
    assert_eq!(footprint.namespaces.len(), 1 + 3 + 6);
    drop((a, b));
    drop(c);
    footprint.assert_gone();
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn cleanup_happens_when_a_test_panics() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let c = cluster(2).await;
        write_subnet_file(&c.host(1).subnet_file(), 7);
        c.host(1).add_container().await.unwrap();
        let _ = tx.send(Footprint::of(&c));
        panic!("a failing test");
    });
    let err = task.await.unwrap_err();
    assert!(err.is_panic());
    rx.await.unwrap().assert_gone();
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn a_container_waits_for_the_subnet_file() {
    let c = cluster(1).await;
    let host = c.host(0);
    let add = host.add_container();
    tokio::pin!(add);
    // An observation window, not an ordering: without the file the add must still be pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut add)
            .await
            .is_err(),
        "a container came up before its host had a subnet file"
    );
    write_subnet_file(&host.subnet_file(), 99);
    let container = add.await.unwrap();
    assert_eq!(container.ip(), Ipv4Addr::new(10, 1, 99, 2));
    assert_eq!(host.subnet().unwrap().mtu, 1450);
    // No subnet file and no agent: a clear error, not a hang.
    let c2 = cluster(1).await;
    let err = c2
        .host(0)
        .wait_subnet(Duration::from_millis(300))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no subnet file") && err.contains("no agent started"),
        "{err}"
    );
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn a_kept_cluster_survives_drop_and_is_removed_from_its_state_file() {
    let c = cluster(1).await;
    write_subnet_file(&c.host(0).subnet_file(), 5);
    c.host(0).add_container().await.unwrap();
    let kept = c.keep();
    assert_eq!(kept.namespaces.len(), 3);
    assert!(
        kept.leftovers().len() == 5,
        "everything should still be there: {:?}",
        kept.leftovers()
    );
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("state.json");
    kept.save(&path).unwrap();
    let loaded = weft_tests::Kept::load(&path).unwrap();
    loaded.remove().unwrap();
    assert!(loaded.leftovers().is_empty());
}

/// The agent as a real process: it leases a subnet per host, its log is captured, and the handle
/// stops (SIGTERM), kills (SIGKILL) and restarts it. Needs the `weft` binary (`cargo xtask test`).
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn agents_run_as_processes_and_obey_stop_kill_restart() {
    let c = cluster(2).await;
    c.write_config(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .await;
    let agents = c.start_agents(&["--datapath", "kernel"]).unwrap();
    let subnets = c.wait_subnets().await.unwrap();
    assert_ne!(
        subnets[0].subnet, subnets[1].subnet,
        "two hosts got one subnet"
    );
    for (h, env) in c.hosts().iter().zip(&subnets) {
        assert_eq!(env.network, "10.1.0.0/16".parse().unwrap());
        let bridge = h
            .exec_ok(&["ip", "-o", "addr", "show", "docker0"])
            .await
            .unwrap();
        assert!(bridge.contains(&format!("inet {}", env.subnet)), "{bridge}");
    }
    let leases = c.etcd().get_prefix("/coreos.com/network/subnets/").await;
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert!(
        leases
            .iter()
            .any(|(_, v)| v.contains(r#""PublicIP":"172.16.15.21""#)),
        "{leases:?}"
    );

    let agent = &agents[0];
    assert!(
        agent.log().contains("=== weft-tests: ip netns exec"),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().lines().count() > 1,
        "the agent's own output is captured:\n{}",
        agent.log()
    );
    let pid = agent.pid().unwrap();
    let status = agent.stop().await.unwrap();
    assert!(
        status.success(),
        "SIGTERM should end the agent cleanly: {status}\n{}",
        agent.log()
    );
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    agent.restart().await.unwrap();
    let restarted = agent.pid().unwrap();
    assert_ne!(restarted, pid);
    assert_eq!(
        agent.exit_status(),
        None,
        "restarted agent runs:\n{}",
        agent.log()
    );
    agent.kill();
    assert!(!Path::new(&format!("/proc/{restarted}")).exists());
    assert_eq!(agent.pid(), None);
    // Restarted, it writes the subnet file again, with the same subnet: the lease holding its
    // public IP is reused.
    std::fs::remove_file(c.host(0).subnet_file()).unwrap();
    agent.restart().await.unwrap();
    let file = c.host(0).subnet_file();
    let text = weft_tests::poll::until(
        "the restarted agent's subnet file",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(&file).map_err(|e| format!("{e}; agent log:\n{}", agent.log()))
        },
    )
    .await;
    assert_eq!(
        weft_tests::SubnetEnv::parse(&text).unwrap().subnet,
        subnets[0].subnet
    );

    let pids: Vec<u32> = agents.iter().filter_map(|a| a.pid()).collect();
    drop(agents);
    drop(c);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "agent {pid} outlived its cluster"
        );
    }
}
