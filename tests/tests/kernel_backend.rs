//! The kernel backends against real netlink, each test in its own network namespace.
//!
//! Every check compares what weft programmed with what flanneld programs: a second
//! namespace is set up by hand with the ip/bridge commands of FLANNEL-COMPAT.md and
//! the `ip -j` / `bridge -j` output of both is compared entry by entry, with only
//! the ifindex and our own random VTEP MAC normalised. Needs root.

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnet::Ipv4Net;
use serde_json::Value;
use weft::backend::hostgw::{HostGwBackend, HostGwSettings};
use weft::backend::vxlan::{VxlanBackend, VxlanSettings};
use weft::backend::Backend;
use weft::lease::{BackendAttrs, Lease, LeaseAttrs, LeaseEvent, MacAddr};
use weft::netlink::{fmt_mac, Netlink};
use weft_tests::flanneld;

const HOST_IP: &str = "192.168.50.1";
/// A peer on ens32's network.
const NEAR_PEER: &str = "192.168.50.2";
/// A peer behind a router: 172.30.0.0/16 is routed via 192.168.50.254.
const FAR_PEER: &str = "172.30.1.5";
const OWN: &str = "10.1.10.0/24";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The harness's namespace `wft-nl-<pid>-<n>` (deleted on drop, also on panic) plus what these
/// tests read from it.
struct Netns {
    ns: weft_tests::Netns,
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!(
            "wft-nl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let ns = weft_tests::Netns::create_blocking(&name).unwrap_or_else(|e| panic!("{e:#}"));
        Self { ns, name }
    }

    /// A host like flanneld's: `ens32` with 192.168.50.1/24 (a veth, since this
    /// kernel has no dummy driver) and a route to a network behind a router.
    fn host() -> Self {
        let ns = Self::new();
        ns.ip("link add ens32 type veth peer name ens32-peer");
        ns.ip(&format!("addr add {HOST_IP}/24 dev ens32"));
        ns.ip("link set ens32 up");
        ns.ip("link set ens32-peer up");
        ns.ip("route add 172.30.0.0/16 via 192.168.50.254");
        ns
    }

    fn ip(&self, args: &str) -> String {
        let args: Vec<&str> = args.split_whitespace().collect();
        self.ns
            .ip_blocking(&args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn bridge(&self, args: &str) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        run("bridge", &full)
    }

    fn json(&self, tool: &str, args: &str) -> Value {
        let out = if tool == "bridge" {
            self.bridge(args)
        } else {
            self.ip(args)
        };
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
            .unwrap_or_else(|e| panic!("{tool} {args}: bad JSON {e}: {out}"))
    }

    fn link(&self, dev: &str) -> Value {
        let mut v = self.json("ip", &format!("-d -j link show {dev}"));
        normalise(&mut v);
        v
    }

    fn mac_of(&self, dev: &str) -> String {
        let v = self.json("ip", &format!("-j link show {dev}"));
        v[0]["address"]
            .as_str()
            .expect("link has a MAC")
            .to_string()
    }

    fn ifindex(&self, dev: &str) -> u64 {
        let v = self.json("ip", &format!("-j link show {dev}"));
        v[0]["ifindex"].as_u64().expect("link has an index")
    }

    fn addrs(&self, dev: &str) -> Value {
        self.json("ip", &format!("-j -4 addr show dev {dev}"))[0]["addr_info"].clone()
    }

    fn neigh(&self) -> Value {
        sorted(self.json("ip", "-j neigh show dev flannel.1"))
    }

    fn fdb(&self) -> Value {
        sorted(self.json("bridge", "-j fdb show dev flannel.1"))
    }

    fn routes(&self) -> Value {
        self.json("ip", "-j route show table main")
    }

    fn sysctl(&self, path: &str) -> String {
        run("ip", &["netns", "exec", &self.name, "cat", path])
            .trim()
            .to_string()
    }

    /// Run `f` on a thread that lives in this namespace, with its own runtime, so
    /// the netlink socket weft opens belongs to the namespace.
    fn run<T: Send, Fut: Future<Output = T>>(&self, f: impl FnOnce() -> Fut + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                weft_tests::netns::join(&self.name).unwrap_or_else(|e| panic!("{e:#}"));
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    weft_tests::netns::run_blocking(cmd, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Drop what legitimately differs between two hosts: interface indexes and our own MAC.
fn normalise(v: &mut Value) {
    if let Some(arr) = v.as_array_mut() {
        for link in arr {
            if let Some(o) = link.as_object_mut() {
                o.remove("ifindex");
                o.remove("address");
            }
        }
    }
}

/// Neighbour and fdb dumps come in hash order; compare them as sets.
fn sorted(v: Value) -> Value {
    let mut entries = v.as_array().cloned().unwrap_or_default();
    entries.sort_by_key(|e| e.to_string());
    Value::Array(entries)
}

fn net(s: &str) -> Ipv4Net {
    s.parse().expect("subnet")
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("ip")
}

fn mac(last: u8) -> MacAddr {
    MacAddr([0x0a, 0x58, 0x0a, 0x01, 0x00, last])
}

fn vx(subnet: &str, public_ip: &str, m: MacAddr) -> Lease {
    Lease {
        ipv6_subnet: None,
        subnet: net(subnet),
        attrs: LeaseAttrs {
            backend_v6: None,
            public_ipv6: None,
            public_ip: ip(public_ip),
            backend: BackendAttrs::Vxlan {
                vni: Some(1),
                vtep_mac: m,
            },
        },
        etcd_lease: 0,
    }
}

fn hostgw_lease(subnet: &str, public_ip: &str) -> Lease {
    Lease {
        ipv6_subnet: None,
        subnet: net(subnet),
        attrs: LeaseAttrs {
            backend_v6: None,
            public_ipv6: None,
            public_ip: ip(public_ip),
            backend: BackendAttrs::HostGw,
        },
        etcd_lease: 0,
    }
}

fn own_lease(m: MacAddr) -> Lease {
    vx(OWN, HOST_IP, m)
}

async fn vxlan_backend(direct_routing: bool) -> VxlanBackend {
    let nl = Netlink::connect().expect("netlink");
    let external = nl.iface_by_name("ens32").await.expect("ens32");
    let settings = VxlanSettings {
        ipv6: None,
        network: net("10.1.0.0/16"),
        vni: 1,
        port: 0,
        mtu: None,
        gbp: false,
        learning: false,
        direct_routing,
        external,
    };
    VxlanBackend::new(nl, settings)
}

/// prepare + own lease, as the agent does at start; returns the advertised MAC.
async fn start_vxlan(b: &mut VxlanBackend) -> MacAddr {
    let BackendAttrs::Vxlan { vni, vtep_mac } = b.prepare().await.expect("prepare") else {
        panic!("vxlan backend must advertise vxlan attributes");
    };
    assert_eq!(vni, Some(1));
    b.own_lease(&own_lease(vtep_mac)).await.expect("own lease");
    vtep_mac
}

/// A started backend with `peers` added, and its advertised MAC as text.
async fn started_with(direct_routing: bool, peers: &[Lease]) -> (VxlanBackend, String) {
    let mut be = vxlan_backend(direct_routing).await;
    let own = start_vxlan(&mut be).await;
    for p in peers {
        be.apply(&LeaseEvent::Added(p.clone()))
            .await
            .expect("add peer");
    }
    (be, fmt_mac(&own))
}

/// Start a fresh backend, as a restarted agent does, and apply one event.
fn apply_restarted(host: &Netns, direct_routing: bool, event: &LeaseEvent) {
    host.run(|| async {
        let mut be = vxlan_backend(direct_routing).await;
        start_vxlan(&mut be).await;
        be.apply(event).await.expect("apply");
    });
}

/// A host programmed by hand exactly as FLANNEL-COMPAT.md says flanneld does it.
fn flanneld_reference(own_mac: &str, peers: &[Lease], direct_routing: bool) -> Netns {
    let ns = Netns::host();
    let mut cmds = flanneld::vxlan_device(ip(HOST_IP), net(OWN), Some(own_mac), 1450, &[]);
    for p in peers {
        let BackendAttrs::Vxlan { vtep_mac, .. } = p.attrs.backend else {
            continue;
        };
        let pip = p.attrs.public_ip;
        if direct_routing && pip.to_string().starts_with("192.168.50.") {
            cmds.extend(flanneld::host_gw_peer(p.subnet, pip, None));
        } else {
            cmds.extend(flanneld::vxlan_peer(p.subnet, pip, &fmt_mac(&vtep_mac)));
        }
    }
    flanneld::run_blocking(&ns.name, &cmds).unwrap_or_else(|e| panic!("{e:#}"));
    ns
}

/// Neighbours, fdb, routes and the device's addresses equal the reference's.
fn assert_same_peers(ours: &Netns, reference: &Netns) {
    assert_eq!(
        ours.neigh(),
        reference.neigh(),
        "ip neigh show dev flannel.1"
    );
    assert_eq!(ours.fdb(), reference.fdb(), "bridge fdb show dev flannel.1");
    assert_eq!(ours.routes(), reference.routes(), "ip route");
    assert_eq!(
        ours.addrs("flannel.1"),
        reference.addrs("flannel.1"),
        "ip -4 addr show dev flannel.1"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn vxlan_device_is_what_flanneld_creates() {
    let host = Netns::host();
    let advertised = host.run(|| async {
        let mut b = vxlan_backend(false).await;
        start_vxlan(&mut b).await
    });
    let ours = host.mac_of("flannel.1");
    assert_eq!(
        ours,
        fmt_mac(&advertised),
        "the advertised MAC is the device's"
    );
    assert_eq!(
        advertised.0[0] & 0x03,
        0x02,
        "MAC {ours} must be locally administered unicast"
    );

    let reference = flanneld_reference(&ours, &[], false);
    assert_eq!(
        host.link("flannel.1"),
        reference.link("flannel.1"),
        "ip -d link show flannel.1"
    );
    let link = host.link("flannel.1");
    assert_eq!(link[0]["mtu"], 1450, "MTU = 1500 - 50");
    assert_eq!(link[0]["linkinfo"]["info_data"]["port"], 8472);
    assert_eq!(link[0]["linkinfo"]["info_data"]["learning"], false);
    assert_eq!(link[0]["linkinfo"]["info_data"]["udp_csum"], true);
    assert_eq!(host.addrs("flannel.1"), reference.addrs("flannel.1"));
    assert_eq!(host.addrs("flannel.1")[0]["local"], "10.1.10.0");
    assert_eq!(
        host.sysctl("/proc/sys/net/ipv6/conf/flannel.1/accept_ra"),
        "0"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn peers_are_added_changed_and_removed_as_flanneld_does() {
    let host = Netns::host();
    let a = vx("10.1.54.0/24", NEAR_PEER, mac(1));
    let b = vx("10.1.77.0/24", FAR_PEER, mac(2));
    let b_new = vx("10.1.77.0/24", FAR_PEER, mac(3));

    let own = host.run(|| async { started_with(false, &[a.clone(), b.clone()]).await.1 });
    assert_same_peers(
        &host,
        &flanneld_reference(&own, &[a.clone(), b.clone()], false),
    );

    let change = LeaseEvent::Changed {
        old: b.clone(),
        new: b_new.clone(),
    };
    apply_restarted(&host, false, &change);
    // Unlike flanneld, the old MAC's fdb entry is gone.
    assert_same_peers(
        &host,
        &flanneld_reference(&own, &[a.clone(), b_new.clone()], false),
    );

    apply_restarted(&host, false, &LeaseEvent::Removed(b_new.clone()));
    assert_same_peers(
        &host,
        &flanneld_reference(&own, std::slice::from_ref(&a), false),
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_failed_route_rolls_back_neighbour_and_fdb() {
    let host = Netns::host();
    let peer = vx("10.1.54.0/24", NEAR_PEER, mac(1));
    let err = host.run(|| async {
        let mut be = vxlan_backend(false).await;
        start_vxlan(&mut be).await;
        // An onlink route through a device that is down is refused (ENETDOWN).
        host.ip("link set flannel.1 down");
        be.apply(&LeaseEvent::Added(peer.clone()))
            .await
            .expect_err("route must fail")
    });
    let msg = format!("{err:#}");
    assert!(
        msg.contains("10.1.54.0/24") && msg.contains("rolled back"),
        "{msg}"
    );
    assert_eq!(host.neigh(), Value::Array(vec![]), "neighbour rolled back");
    assert_eq!(host.fdb(), Value::Array(vec![]), "fdb entry rolled back");
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_compatible_device_is_reused_with_its_mac() {
    let host = Netns::host();
    host.ip(&format!(
        "link add flannel.1 address 02:aa:bb:cc:dd:ee mtu 1450 type vxlan id 1 local {HOST_IP} dev ens32 \
         dstport 8472 nolearning"
    ));
    let index = host.ifindex("flannel.1");
    let advertised = host.run(|| async {
        let mut b = vxlan_backend(false).await;
        start_vxlan(&mut b).await
    });
    assert_eq!(
        fmt_mac(&advertised),
        "02:aa:bb:cc:dd:ee",
        "existing MAC kept and advertised"
    );
    assert_eq!(
        host.ifindex("flannel.1"),
        index,
        "device reused, not recreated"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn an_incompatible_device_is_replaced() {
    for (why, args) in [
        (
            "vni",
            format!("id 2 local {HOST_IP} dev ens32 dstport 8472"),
        ),
        (
            "local",
            "id 1 local 192.168.50.9 dev ens32 dstport 8472".to_string(),
        ),
        (
            "port",
            format!("id 1 local {HOST_IP} dev ens32 dstport 4789"),
        ),
        (
            "dev",
            format!("id 1 local {HOST_IP} dev ens32-peer dstport 8472"),
        ),
    ] {
        let host = Netns::host();
        host.ip(&format!(
            "link add flannel.1 address 02:aa:bb:cc:dd:ee type vxlan {args} nolearning"
        ));
        let advertised = host.run(|| async {
            let mut b = vxlan_backend(false).await;
            start_vxlan(&mut b).await
        });
        let ours = host.mac_of("flannel.1");
        assert_eq!(ours, fmt_mac(&advertised), "{why}");
        assert_ne!(ours, "02:aa:bb:cc:dd:ee", "{why}: device must be recreated");
        let reference = flanneld_reference(&ours, &[], false);
        assert_eq!(host.link("flannel.1"), reference.link("flannel.1"), "{why}");
    }
}

/// Entries flanneld would have left behind: a vanished peer, and a peer whose MAC changed.
fn plant_stale(host: &Netns) {
    host.ip("neigh replace 10.1.99.0 dev flannel.1 lladdr 0a:58:0a:01:00:99 nud permanent");
    host.bridge("fdb replace 0a:58:0a:01:00:99 dev flannel.1 dst 192.168.50.99 self permanent");
    host.ip("route replace 10.1.99.0/24 via 10.1.99.0 dev flannel.1 onlink");
    host.ip("route replace 10.1.98.0/24 via 192.168.50.98");
    host.ip("neigh replace 10.1.54.0 dev flannel.1 lladdr 0a:58:0a:01:00:77 nud permanent");
    host.bridge("fdb replace 0a:58:0a:01:00:77 dev flannel.1 dst 192.168.50.2 self permanent");
    host.ip("addr add 10.1.200.0/32 dev flannel.1");
    // Not ours: outside the overlay network, must survive.
    host.ip("route add 10.200.0.0/16 via 192.168.50.254");
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn reconcile_removes_stale_adds_missing_and_is_then_quiet() {
    let host = Netns::host();
    let peers = [
        vx("10.1.54.0/24", NEAR_PEER, mac(1)),
        vx("10.1.77.0/24", FAR_PEER, mac(2)),
    ];
    let (own, first, second) = host.run(|| async {
        let mut be = vxlan_backend(false).await;
        let own = start_vxlan(&mut be).await;
        be.apply(&LeaseEvent::Added(peers[1].clone()))
            .await
            .expect("add");
        // Peer 1 lost its route and fdb entry; stale entries planted.
        host.ip("route del 10.1.77.0/24");
        host.bridge(&format!(
            "fdb del {} dev flannel.1 dst {FAR_PEER} self",
            fmt_mac(&mac(2))
        ));
        plant_stale(&host);
        let first = be.reconcile(&peers).await.expect("reconcile");
        let second = be.reconcile(&peers).await.expect("reconcile again");
        (fmt_mac(&own), first, second)
    });
    let reference = flanneld_reference(&own, &peers, false);
    reference.ip("route add 10.200.0.0/16 via 192.168.50.254");
    assert_same_peers(&host, &reference);
    // 10.1.54 (MAC changed): neighbour replaced, fdb and route added; 10.1.77: fdb and
    // route re-added; stale: neighbour, 2 fdb entries, 2 routes, the stray address.
    assert_eq!(first, 11, "repairs made");
    assert_eq!(second, 0, "a second reconcile finds nothing to repair");
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn reconcile_recreates_a_deleted_device_with_the_advertised_mac() {
    let host = Netns::host();
    let peers = [vx("10.1.54.0/24", NEAR_PEER, mac(1))];
    let (advertised, repairs) = host.run(|| async {
        let mut be = vxlan_backend(false).await;
        let own = start_vxlan(&mut be).await;
        be.apply(&LeaseEvent::Added(peers[0].clone()))
            .await
            .expect("add");
        host.ip("link del flannel.1");
        (own, be.reconcile(&peers).await.expect("reconcile"))
    });
    assert!(
        repairs >= 4,
        "device, address, neighbour, fdb, route: {repairs}"
    );
    let ours = host.mac_of("flannel.1");
    assert_eq!(
        ours,
        fmt_mac(&advertised),
        "recreated with the MAC in our lease"
    );
    let reference = flanneld_reference(&ours, &peers, false);
    assert_eq!(host.link("flannel.1"), reference.link("flannel.1"));
    assert_same_peers(&host, &reference);
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn direct_routing_uses_plain_routes_for_peers_on_our_network() {
    let host = Netns::host();
    let near = vx("10.1.54.0/24", NEAR_PEER, mac(1));
    let far = vx("10.1.77.0/24", FAR_PEER, mac(2));
    let peers = [near.clone(), far.clone()];
    let own = host.run(|| async {
        let (mut be, own) = started_with(true, &peers).await;
        assert_eq!(be.reconcile(&peers).await.expect("reconcile"), 0);
        own
    });
    assert_same_peers(
        &host,
        &flanneld_reference(&own, &[near.clone(), far.clone()], true),
    );

    apply_restarted(&host, true, &LeaseEvent::Removed(near.clone()));
    assert_same_peers(
        &host,
        &flanneld_reference(&own, std::slice::from_ref(&far), true),
    );
}

async fn hostgw_backend() -> HostGwBackend {
    let nl = Netlink::connect().expect("netlink");
    let external = nl.iface_by_name("ens32").await.expect("ens32");
    HostGwBackend::new(
        nl,
        HostGwSettings {
            ipv6: None,
            network: net("10.1.0.0/16"),
            external,
        },
    )
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn host_gw_routes_match_flanneld_and_reconcile() {
    let host = Netns::host();
    let a = hostgw_lease("10.1.54.0/24", NEAR_PEER);
    let b = hostgw_lease("10.1.77.0/24", "192.168.50.3");
    let repairs = host.run(|| async {
        let mut be = hostgw_backend().await;
        assert_eq!(be.prepare().await.expect("prepare"), BackendAttrs::HostGw);
        be.own_lease(&hostgw_lease(OWN, HOST_IP))
            .await
            .expect("own");
        be.apply(&LeaseEvent::Added(a.clone()))
            .await
            .expect("add a");
        be.apply(&LeaseEvent::Added(b.clone()))
            .await
            .expect("add b");
        be.apply(&LeaseEvent::Removed(b.clone()))
            .await
            .expect("remove b");
        host.ip("route replace 10.1.99.0/24 via 192.168.50.99 dev ens32");
        host.ip("route add 10.200.0.0/16 via 192.168.50.254");
        host.ip("route del 10.1.54.0/24");
        be.reconcile(std::slice::from_ref(&a))
            .await
            .expect("reconcile")
    });
    assert_eq!(repairs, 2, "one route re-added, one stale removed");
    let reference = Netns::host();
    reference.ip(&format!(
        "route replace 10.1.54.0/24 via {NEAR_PEER} dev ens32"
    ));
    reference.ip("route add 10.200.0.0/16 via 192.168.50.254");
    assert_eq!(host.routes(), reference.routes(), "ip route");
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn host_gw_refuses_a_peer_behind_a_router_with_a_clear_error() {
    let host = Netns::host();
    let far = hostgw_lease("10.1.77.0/24", FAR_PEER);
    let err = host.run(|| async {
        let mut be = hostgw_backend().await;
        be.apply(&LeaseEvent::Added(far.clone()))
            .await
            .expect_err("not on our L2 network")
    });
    let msg = err.to_string();
    for needle in [
        "10.1.77.0/24",
        FAR_PEER,
        "ens32",
        "via gateway 192.168.50.254",
        "vxlan",
    ] {
        assert!(msg.contains(needle), "error must mention {needle}: {msg}");
    }
    let routes = host.routes().to_string();
    assert!(
        !routes.contains("10.1.77.0"),
        "no route programmed: {routes}"
    );
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn external_interface_is_found_by_name_address_and_default_route() {
    let host = Netns::host();
    host.ip("route add default via 192.168.50.254");
    host.ip("link set ens32 mtu 9000");
    let index = host.ifindex("ens32") as u32;
    let (by_name, by_addr, by_default, missing) = host.run(|| async {
        let nl = Netlink::connect().expect("netlink");
        let choose = |wanted: &[&str]| {
            let choice = weft::iface::IfaceChoice {
                iface: wanted.iter().map(|w| w.to_string()).collect(),
                ..Default::default()
            };
            let nl = nl.clone();
            async move { weft::iface::choose(&nl, &choice).await }
        };
        (
            choose(&["ens32"]).await.expect("by name"),
            choose(&[HOST_IP]).await.expect("by address"),
            choose(&[]).await.expect("by default route"),
            choose(&["ens99"])
                .await
                .expect_err("no such interface")
                .to_string(),
        )
    });
    for found in [&by_name, &by_addr, &by_default] {
        assert_eq!((found.name.as_str(), found.index), ("ens32", index));
        assert_eq!((found.ipv4, found.mtu), (ip(HOST_IP), 9000));
    }
    assert!(missing.contains("ens99"), "{missing}");
}
