//! The agent loop on the in-memory store with a backend that records what it is told: lease
//! loss, config change, peer churn and store errors, without etcd or root. Time is paused, so
//! TTLs and renewals of minutes run in milliseconds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use ipnet::Ipv4Net;
use tokio::task::JoinHandle;

use super::*;
use crate::lease::{BackendAttrs, Lease, LeaseEvent, MacAddr};
use crate::netlink::NetlinkError;
use crate::subnet::MemoryStore;

/// Our subnet comes from 10.200/16 and up; peers' from 10.1/16 and 10.2/16.
const CONFIG: &str =
    r#"{"Network":"10.0.0.0/8","SubnetMin":"10.200.0.0","Backend":{"Type":"vxlan"}}"#;
const TTL: Duration = Duration::from_secs(60);
const OWN_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);

#[test]
fn overlay_mtu_takes_the_encapsulation_off() {
    let cfg = |b: &str| {
        NetworkConfig::parse(&format!(r#"{{"Network":"10.1.0.0/16","Backend":{b}}}"#)).unwrap()
    };
    let iface = iface();
    assert_eq!(overlay_mtu(&cfg(r#"{"Type":"vxlan"}"#), &iface), 8950);
    assert_eq!(
        overlay_mtu(&cfg(r#"{"Type":"vxlan","MTU":1500}"#), &iface),
        1450
    );
    assert_eq!(overlay_mtu(&cfg(r#"{"Type":"host-gw"}"#), &iface), 9000);
}

fn iface() -> ExternalIface {
    ExternalIface {
        ipv6: None,
        public_ipv6: None,
        name: "eth0".into(),
        index: 2,
        ipv4: OWN_IP,
        public_ip: OWN_IP,
        mtu: 9000,
    }
}

/// What the agent told the backend: the datapath it would hold.
#[derive(Debug, Default)]
struct Programmed {
    own: Vec<Ipv4Net>,
    peers: BTreeMap<Ipv4Net, Lease>,
    /// Reconciles still to fail, with two failed steps each.
    failing_reconciles: usize,
    /// How long a reconcile pass takes (a pass over thousands of peers takes hundreds of ms).
    reconcile_takes: Duration,
    /// Passes run to the end.
    passes: usize,
}

#[derive(Clone, Default)]
struct RecordingBackend(Arc<Mutex<Programmed>>);

impl RecordingBackend {
    fn get<T>(&self, f: impl FnOnce(&mut Programmed) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }
}

impl Backend for RecordingBackend {
    fn mode(&self) -> &'static str {
        "recording"
    }
    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        Ok(BackendAttrs::Vxlan {
            vni: Some(1),
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        })
    }
    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        self.get(|p| p.own.push(lease.subnet));
        Ok(())
    }
    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        self.get(|p| match event {
            LeaseEvent::Added(l) | LeaseEvent::Changed { new: l, .. } => {
                p.peers.insert(l.subnet, l.clone());
            }
            LeaseEvent::Removed(l) => {
                p.peers.remove(&l.subnet);
            }
        });
        Ok(())
    }
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        tokio::time::sleep(self.get(|p| p.reconcile_takes)).await;
        self.get(|p| {
            p.passes += 1;
            if p.failing_reconciles > 0 {
                p.failing_reconciles -= 1;
                let step = |name: &str| NetlinkError::NoSuchLink { name: name.into() }.into();
                return Err(BackendError::Steps(vec![
                    step("flannel.1"),
                    step("docker0"),
                ]));
            }
            let want: BTreeMap<_, _> = peers.iter().map(|l| (l.subnet, l.clone())).collect();
            let repairs = usize::from(want != p.peers);
            p.peers = want;
            Ok(repairs)
        })
    }
}

struct Agent {
    store: MemoryStore,
    backend: RecordingBackend,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
    dir: tempfile::TempDir,
}

fn config(dir: &std::path::Path) -> AgentConfig {
    AgentConfig {
        etcd: EtcdOptions::default(),
        iface: IfaceChoice::default(),
        subnet_file: dir.join("subnet.env"),
        docker_opts_file: dir.join("docker_opts.env"),
        lease: LeaseTiming {
            ttl: TTL,
            renew_margin: Duration::from_secs(10),
        },
        ip_masq: false,
        iptables_resync: Duration::from_secs(5),
        iptables_forward_rules: true,
        healthz: None,
        datapath: Datapath::Kernel,
        bridge: "docker0".into(),
        bpf_pin_dir: dir.join("bpf"),
        decap_hook: None,
        ebpf_udp_csum: true,
        reconcile_interval: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(1),
    }
}

impl Agent {
    fn start(store: &MemoryStore) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let backend = RecordingBackend::default();
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let hooks = Hooks {
            ready: watch::channel(false).0,
            metrics: metrics.clone(),
            notifier: Notifier::from_vars(None, None, None).unwrap(),
        };
        let host = Host {
            iface: iface(),
            firewall: false,
        };
        let (s, b, c) = (store.clone(), backend.clone(), shutdown.clone());
        let task = tokio::spawn(async move {
            let build = async |_: &BackendOptions, _: &NetworkConfig, _: &ExternalIface| Ok(b);
            follow(&cfg, s, host, build, c, hooks).await
        });
        Agent {
            store: store.clone(),
            backend,
            metrics,
            shutdown,
            task,
            dir,
        }
    }

    /// Our lease as the store holds it (the one with our public IP).
    fn own(&self) -> Option<Lease> {
        self.store
            .leases()
            .into_iter()
            .find(|l| l.attrs.public_ip == OWN_IP)
    }

    /// The subnet `subnet.env` names (`FLANNEL_SUBNET=10.1.5.1/24` is 10.1.5.0/24).
    fn subnet_file(&self) -> Option<Ipv4Net> {
        let env = files::read_env(&self.dir.path().join("subnet.env")).ok()?;
        let subnet: Ipv4Net = env.get("FLANNEL_SUBNET")?.parse().ok()?;
        Some(subnet.trunc())
    }

    /// The store's peers (everyone but us), as the backend should hold them.
    fn store_peers(&self) -> BTreeMap<Ipv4Net, Lease> {
        let own = self.own().map(|l| l.subnet);
        self.store
            .leases()
            .into_iter()
            .filter(|l| Some(l.subnet) != own)
            .map(|l| (l.subnet, l))
            .collect()
    }

    async fn stop(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        self.task.await.unwrap()
    }
}

/// Wait (in paused time, so virtually) until `ok` holds; the panic names what was awaited.
async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !ok() {
        assert!(Instant::now() < deadline, "waited 600s for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn store() -> MemoryStore {
    let store = MemoryStore::new();
    store.set_config(CONFIG);
    store
}

fn peer(i: u32, generation: u8) -> (Ipv4Net, LeaseAttrs) {
    let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a01_0000 + (i << 8)), 24).unwrap();
    assert!(
        subnet < "10.200.0.0/24".parse().unwrap(),
        "{subnet} may be ours"
    );
    let ip = Ipv4Addr::from(0xac10_1000 + i);
    let attrs = LeaseAttrs {
        backend_v6: None,
        public_ipv6: None,
        public_ip: ip,
        backend: BackendAttrs::Vxlan {
            vni: Some(1),
            vtep_mac: MacAddr([2, 1, generation, (i >> 8) as u8, i as u8, 0]),
        },
    };
    (subnet, attrs)
}

async fn started(store: &MemoryStore) -> (Agent, Lease) {
    let agent = Agent::start(store);
    until("our lease in the store", || agent.own().is_some()).await;
    let own = agent.own().unwrap();
    until("the subnet file", || {
        agent.subnet_file() == Some(own.subnet)
    })
    .await;
    (agent, own)
}

#[tokio::test(start_paused = true)]
async fn lease_lives_through_ttls_by_renewal() {
    let store = store();
    let (agent, own) = started(&store).await;
    tokio::time::sleep(TTL * 5).await;
    let now = agent.own().expect("lease still held after five TTLs");
    assert_eq!(now.subnet, own.subnet);
    assert!(agent.metrics.lease_renewals.get() >= 5);
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn deleted_lease_is_taken_back_with_the_same_subnet() {
    let store = store();
    let (agent, own) = started(&store).await;
    store.delete(own.subnet);
    until("our subnet leased to us again", || {
        store.lease(own.subnet).flatten().map(|a| a.public_ip) == Some(OWN_IP)
    })
    .await;
    // Same subnet: the datapath is not re-addressed.
    assert_eq!(agent.backend.get(|p| p.own.clone()), vec![own.subnet]);
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn expired_lease_taken_by_another_host_moves_us() {
    let store = store();
    let (agent, own) = started(&store).await;
    let (_, thief) = peer(7, 0);
    // Our store lease ran out and another host got the subnet before we noticed.
    store.expire(own.subnet);
    store.put_lease(own.subnet, &thief, TTL * 100);
    until("us on another subnet", || {
        agent.own().is_some_and(|l| l.subnet != own.subnet)
    })
    .await;
    let moved = agent.own().unwrap().subnet;
    until("the backend told of the new subnet", || {
        agent.backend.get(|p| p.own.last() == Some(&moved))
    })
    .await;
    until("the subnet file rewritten", || {
        agent.subnet_file() == Some(moved)
    })
    .await;
    // The thief is a peer now, as the store says.
    until("the backend holding the thief as a peer", || {
        agent.backend.get(|p| p.peers.clone()) == agent.store_peers()
    })
    .await;
    assert_eq!(store.lease(own.subnet).flatten(), Some(thief));
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn overwritten_live_lease_is_reclaimed() {
    let store = store();
    let (agent, own) = started(&store).await;
    // Another writer overwrites our key while our store lease still runs: the subnet is ours.
    store.put_garbage(own.subnet, TTL);
    store.break_watches();
    until("our attributes back at our key", || {
        store.lease(own.subnet).flatten().map(|a| a.public_ip) == Some(OWN_IP)
    })
    .await;
    assert_eq!(agent.backend.get(|p| p.own.clone()), vec![own.subnet]);
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn five_hundred_peers_churning_end_as_the_store_says() {
    let store = store();
    let (agent, _) = started(&store).await;
    for i in 1..=500 {
        let (subnet, attrs) = peer(i, 0);
        store.put_lease(subnet, &attrs, TTL * 100);
    }
    until("500 peers programmed", || {
        agent.backend.get(|p| p.peers.len()) == 500
    })
    .await;
    // Half leave, a hundred change VTEP, fifty come back: in bursts, with a watch break.
    for i in 1..=250 {
        store.delete(peer(i, 0).0);
    }
    for i in 301..=400 {
        let (subnet, attrs) = peer(i, 1);
        store.put_lease(subnet, &attrs, TTL * 100);
    }
    store.break_watches();
    for i in 1..=50 {
        let (subnet, attrs) = peer(i, 2);
        store.put_lease(subnet, &attrs, TTL * 100);
    }
    until("the backend's peers equal the store's", || {
        agent.backend.get(|p| p.peers.clone()) == agent.store_peers()
    })
    .await;
    assert_eq!(agent.store_peers().len(), 300);
    assert!(agent.metrics.etcd_reconnects.get() >= 1);
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn store_outage_keeps_the_lease_and_the_peers() {
    let store = store();
    let (agent, own) = started(&store).await;
    let (subnet, attrs) = peer(3, 0);
    store.put_lease(subnet, &attrs, TTL * 100);
    until("the peer programmed", || {
        agent.backend.get(|p| p.peers.contains_key(&subnet))
    })
    .await;
    // Renewals, listings and config reads fail for a while; the watch breaks meanwhile.
    store.fail_next(20);
    store.break_watches();
    until("the outage over", || store.failing() == 0).await;
    tokio::time::sleep(TTL * 2).await;
    assert_eq!(agent.own().map(|l| l.subnet), Some(own.subnet));
    assert_eq!(agent.backend.get(|p| p.peers.clone()), agent.store_peers());
    assert_eq!(agent.backend.get(|p| p.own.clone()), vec![own.subnet]);
    assert!(
        !agent.task.is_finished(),
        "an outage must not end the agent"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failed_reconcile_steps_are_counted_and_retried() {
    let store = store();
    let (agent, _) = started(&store).await;
    let (subnet, attrs) = peer(9, 0);
    agent.backend.get(|p| p.failing_reconciles = 2);
    store.put_lease(subnet, &attrs, TTL * 100);
    // Drift the reconcile must repair once it stops failing.
    until("the failures counted", || {
        agent.metrics.reconcile_errors.get() == 2
    })
    .await;
    agent.backend.get(|p| p.peers.clear());
    until("the next rounds repairing the drift", || {
        agent.backend.get(|p| p.peers.contains_key(&subnet))
    })
    .await;
    assert!(agent.metrics.reconcile_repairs.get() >= 1);
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn changed_config_ends_the_agent_for_a_restart_but_a_broken_one_does_not() {
    let store = store();
    let (agent, own) = started(&store).await;
    // Same config in another spelling: nothing to do.
    store.set_config(
        r#"{ "Network": "10.0.0.0/8", "SubnetMin": "10.200.0.0", "Backend": { "Type": "vxlan" } }"#,
    );
    store.set_config("{not json");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !agent.task.is_finished(),
        "an invalid config must not end the agent"
    );
    store.set_config(r#"{"Network":"10.2.0.0/16","Backend":{"Type":"vxlan"}}"#);
    until("the agent to end", || agent.task.is_finished()).await;
    let err = agent.task.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, AgentError::ConfigChanged { what, .. } if what.contains("10.2.0.0/16")),
        "{err}"
    );
    // The lease stays for the restart.
    assert_eq!(
        store.lease(own.subnet).flatten().map(|a| a.public_ip),
        Some(OWN_IP)
    );
}

#[tokio::test(start_paused = true)]
async fn config_change_ends_the_agent_at_once_and_a_deleted_config_does_not() {
    let store = store();
    let (agent, _) = started(&store).await;
    store.delete_config();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !agent.task.is_finished(),
        "a deleted config must not end the agent"
    );
    // A broken connection re-reads the config; the watch then follows it again.
    store.fail_next(2);
    store.break_watches();
    until("the store to answer again", || store.failing() == 0).await;
    store.set_config(CONFIG);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !agent.task.is_finished(),
        "the same config must not end the agent"
    );
    let written = Instant::now();
    store.set_config(r#"{"Network":"10.2.0.0/16","Backend":{"Type":"vxlan"}}"#);
    until("the agent to end", || agent.task.is_finished()).await;
    // Watched, not polled at the reconcile tick (1 s here).
    let took = written.elapsed();
    assert!(took < Duration::from_millis(500), "took {took:?}");
    let err = agent.task.await.unwrap().unwrap_err();
    assert!(matches!(err, AgentError::ConfigChanged { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn idle_agent_sends_the_store_nothing_but_renewals() {
    let store = store();
    let (subnet, attrs) = peer(1, 0);
    store.put_lease(subnet, &attrs, TTL * 10);
    let (agent, own) = started(&store).await;
    until("the peer programmed", || {
        agent
            .backend
            .get(|p| p.peers.contains_key(&subnet) && p.passes > 0)
    })
    .await;
    // 40 reconcile ticks (1 s apart) and no renewal due yet (50 s after the lease).
    let before = store.calls();
    let passes = agent.backend.get(|p| p.passes);
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert!(agent.backend.get(|p| p.passes) >= passes + 30);
    assert_eq!(
        store.calls() - before,
        0,
        "store calls while idle with no renewal due"
    );
    // The renewal is the next call.
    until("the lease renewed", || {
        agent.metrics.lease_renewals.get() >= 1
    })
    .await;
    assert_eq!(store.calls() - before, 1, "one renewal");
    assert!(store.lease(own.subnet).is_some());
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn new_peer_is_programmed_without_waiting_for_a_reconcile_pass() {
    let store = store();
    let (agent, _) = started(&store).await;
    agent
        .backend
        .get(|p| p.reconcile_takes = Duration::from_secs(5));
    // Passes now follow each other: whenever a lease arrives, one is under way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 1..=5 {
        let (subnet, attrs) = peer(i, 0);
        let written = Instant::now();
        store.put_lease(subnet, &attrs, TTL * 10);
        until("the new peer programmed", || {
            agent.backend.get(|p| p.peers.contains_key(&subnet))
        })
        .await;
        let took = written.elapsed();
        assert!(took < Duration::from_millis(200), "peer {i} took {took:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // A lease every 100 ms for 60 s: the interrupted passes still get to finish.
    let passes = agent.backend.get(|p| p.passes);
    for i in 0..600 {
        let (subnet, attrs) = peer(10 + i % 20, (i / 20) as u8);
        store.put_lease(subnet, &attrs, TTL * 10);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        agent.backend.get(|p| p.passes) > passes,
        "no reconcile pass finished under steady churn"
    );
    until("the backend to hold the store's peers", || {
        agent.backend.get(|p| p.peers.clone()) == agent.store_peers()
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_new_peers_never_waits_for_a_whole_pass() {
    let store = store();
    let (agent, _) = started(&store).await;
    // A pass over 5000 peers; one starts again right after each peer is programmed.
    agent
        .backend
        .get(|p| p.reconcile_takes = Duration::from_millis(300));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // As `cargo xtask bench --control-plane` writes them: each as soon as the last is in.
    // Far more than MAX_INTERRUPTED_PASSES passes are cut short in a row.
    for i in 1..=3 * MAX_INTERRUPTED_PASSES {
        let (subnet, attrs) = peer(i, 0);
        let written = Instant::now();
        store.put_lease(subnet, &attrs, TTL * 10);
        while !agent.backend.get(|p| p.peers.contains_key(&subnet)) {
            let took = written.elapsed();
            assert!(
                took < Duration::from_millis(50),
                "peer {i} of a burst not programmed after {took:?}: it waited for a reconcile pass"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Once the burst is over a pass runs to its end.
    let passes = agent.backend.get(|p| p.passes);
    until("a reconcile pass to finish after the burst", || {
        agent.backend.get(|p| p.passes) > passes
    })
    .await;
    agent.stop().await.unwrap();
}
