//! The kernel/host side of IPv6 as flanneld v0.20 runs it: ip6tables (or nft `ip6 flannel-ipv6`)
//! masquerade and forward rules, IPv6 DirectRouting on the vxlan backend, and an IPv6-only host
//! whose external interface has no IPv4 address. Real etcd, `weft agent --datapath kernel`
//! processes in network namespaces (tests/src/cluster.rs); needs root (`cargo xtask test`).
//!
//! What a user would notice: `ip6tables-save` reads like a flanneld node's and is repaired after
//! an operator deletes a rule; a container's IPv6 packet to the outside arrives from the host's
//! address while overlay packets keep the container's; peers on the same link are routed
//! directly; an IPv6-only cluster without IPv4 on ens32 starts and carries container traffic.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use weft::masq::{Masq, MasqKind};
use weft_tests::{cluster, poll, Cluster, Host, Netns};

const DUAL: &str = r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#;
const V6_ONLY: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#;
const SETTLE: Duration = Duration::from_secs(20);

/// The subnets a host's agent wrote to its subnet file: (IPv4 network and subnet, IPv6 subnet).
fn leased(h: &Host) -> (Option<(Ipv4Net, Ipv4Net)>, Ipv6Net) {
    let env = std::fs::read_to_string(h.subnet_file()).expect("subnet file");
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let v4 = var("FLANNEL_NETWORK")
        .zip(var("FLANNEL_SUBNET"))
        .map(|(n, s)| {
            (
                n.parse().expect("FLANNEL_NETWORK"),
                s.parse::<Ipv4Net>().expect("FLANNEL_SUBNET").trunc(),
            )
        });
    let v6 = var("FLANNEL_IPV6_SUBNET")
        .and_then(|s| s.parse::<Ipv6Net>().ok())
        .unwrap_or_else(|| panic!("no FLANNEL_IPV6_SUBNET in\n{env}"))
        .trunc();
    (v4, v6)
}

/// flanneld's rules for this host's lease, from the one copy the masq unit tests pin.
fn expected(h: &Host, kind: MasqKind) -> Masq {
    let net6: Ipv6Net = "fd00:10::/48".parse().unwrap();
    match leased(h) {
        (Some((n, sn)), sn6) => Masq::new(kind, n, sn).with_ipv6(net6, sn6),
        (None, sn6) => Masq::ipv6_only(kind, net6, sn6),
    }
}

/// Our lines of `<program>-save` (nat then filter) that mention FLANNEL.
async fn saved(h: &Host, program: &str) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for table in ["nat", "filter"] {
        let out = h
            .exec_ok(&[&format!("{program}-save"), "-t", table])
            .await
            .map_err(|e| e.to_string())?;
        lines.extend(
            out.lines()
                .filter(|l| l.starts_with("-A ") && l.contains("FLANNEL"))
                .map(str::to_owned),
        );
    }
    Ok(lines)
}

/// The rules of `nft list table ip6 flannel-ipv6`, one per line, as nft prints them.
async fn nft6_rules(h: &Host) -> Result<Vec<String>, String> {
    let out = h
        .exec_ok(&["nft", "list", "table", "ip6", "flannel-ipv6"])
        .await
        .map_err(|e| e.to_string())?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with("return") || l.ends_with("accept") || l.ends_with("fully-random"))
        .map(str::to_owned)
        .collect())
}

/// `masq`'s `ip6 flannel-ipv6` rules in nft syntax, chain after chain.
fn nft6_text(masq: &Masq) -> Vec<String> {
    masq.nft6_rules()
        .iter()
        .flat_map(|c| c.rules.iter().map(ToString::to_string))
        .collect()
}

/// Start one dual-stack host's agent with `--ip-masq` (and `flags`), wait for its subnet file.
async fn one_host(config: &str, flags: &[&str]) -> Cluster {
    let c = cluster(1).await;
    c.write_config(config).await;
    let mut args = vec![
        "--datapath",
        "kernel",
        "--ip-masq",
        "--iptables-resync",
        "1",
    ];
    args.extend_from_slice(flags);
    c.host(0).spawn_agent(&args).unwrap();
    poll::until("the subnet file", SETTLE, || async {
        std::fs::read_to_string(c.host(0).subnet_file()).map_err(|e| e.to_string())
    })
    .await;
    c
}

/// Run `op` on `masq` inside the host's namespace (as the agent or an operator's cleanup would).
fn in_host<T: Send + 'static, F: std::future::Future<Output = Result<T, weft::masq::MasqError>>>(
    h: &Host,
    masq: Masq,
    op: impl FnOnce(Masq) -> F + Send + 'static,
) -> T {
    weft_tests::netns::spawn_in(&h.netns().path(), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(op(masq))
    })
    .join()
    .expect("thread in the host namespace")
    .unwrap_or_else(|e| panic!("{e}"))
}

/// What the agent installed needs no repair: the kernel's listing reads back as ours (for nft,
/// the `ip6` expressions compare equal), so the resync loop does not rewrite it every period.
fn assert_nothing_to_repair(h: &Host, masq: &Masq) {
    let repairs = in_host(h, masq.clone(), |m| async move { m.ensure().await });
    assert_eq!(
        repairs,
        Vec::<String>::new(),
        "a second ensure must change nothing"
    );
}

fn remove_in(h: &Host, masq: Masq) {
    in_host(h, masq, |m| async move { m.remove().await });
}

/// Dual stack with `--ip-masq`: ip6tables holds flanneld's MasqIP6Rules and IPv6 forward rules
/// (and iptables the IPv4 ones), in order, byte for byte; a rule and a jump deleted by hand come
/// back within a resync period; SIGTERM leaves them for the next start (as the IPv4 ones), and
/// `Masq::remove` takes both families away.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn ip6tables_rules_are_flanneld_s_repaired_and_removed() {
    let c = one_host(DUAL, &[]).await;
    let h = c.host(0);
    let want = expected(h, MasqKind::Iptables);
    let want6 = want.ip6tables_listing();
    assert!(
        want6.iter().any(|l| l.contains("! -d ff00::/8")),
        "{want6:?}"
    );
    let in_place = || async {
        let have = saved(h, "ip6tables").await?;
        poll::check(have == want6, &have)?;
        let have4 = saved(h, "iptables").await?;
        poll::check(have4 == want.iptables_listing(), &have4)
    };
    poll::until("flanneld's ip6tables and iptables rules", SETTLE, in_place).await;
    assert_nothing_to_repair(h, &want);

    h.exec_ok(&["ip6tables", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"])
        .await
        .unwrap();
    h.exec_ok(&[
        "ip6tables",
        "-w",
        "-D",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "flanneld forward",
        "-j",
        "FLANNEL-FWD",
    ])
    .await
    .unwrap();
    assert_ne!(saved(h, "ip6tables").await.unwrap(), want6, "deleted");
    poll::until(
        "the ip6tables rules restored",
        Duration::from_secs(5),
        in_place,
    )
    .await;
    let log = h.agent().unwrap().log();
    assert!(
        log.contains("ip6tables nat FLANNEL-POSTRTG: inserted rule 3"),
        "the repair is logged:\n{log}"
    );

    h.agent().unwrap().stop().await.unwrap();
    assert_eq!(
        saved(h, "ip6tables").await.unwrap(),
        want6,
        "a plain stop leaves the rules for the next start, as for IPv4"
    );
    remove_in(h, want);
    let left = h.exec_ok(&["ip6tables-save"]).await.unwrap()
        + &h.exec_ok(&["iptables-save"]).await.unwrap();
    assert!(
        !left.contains("FLANNEL"),
        "rules left after remove:\n{left}"
    );
}

/// `EnableNFTables`: the table `ip6 flannel-ipv6` with the same logic in `ip6` matches, restored
/// after an operator deletes it, removed by `Masq::remove`.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn nft_ip6_table_is_installed_repaired_and_removed() {
    let config = DUAL.replace(r#""Backend""#, r#""EnableNFTables":true,"Backend""#);
    let c = one_host(&config, &[]).await;
    let h = c.host(0);
    let want = expected(h, MasqKind::Nftables);
    let (_, sn6) = leased(h);
    let rules = nft6_text(&want);
    assert_eq!(
        rules[3],
        format!("ip6 saddr != fd00:10::/48 ip6 daddr {sn6} return")
    );
    let in_place = || async {
        let have = nft6_rules(h).await?;
        poll::check(have == rules, &have)
    };
    poll::until("table ip6 flannel-ipv6", SETTLE, in_place).await;
    assert_nothing_to_repair(h, &want);
    let listing = h
        .exec_ok(&["nft", "list", "table", "ip6", "flannel-ipv6"])
        .await
        .unwrap();
    assert!(
        listing.contains("type nat hook postrouting priority srcnat")
            && listing.contains("type filter hook forward priority filter"),
        "{listing}"
    );
    h.exec_ok(&["nft", "delete", "table", "ip6", "flannel-ipv6"])
        .await
        .unwrap();
    poll::until(
        "table ip6 flannel-ipv6 restored",
        Duration::from_secs(5),
        in_place,
    )
    .await;
    h.agent().unwrap().stop().await.unwrap();
    remove_in(h, want);
    let left = h.exec_ok(&["nft", "list", "tables"]).await.unwrap();
    assert!(!left.contains("flannel-ipv"), "tables left: {left}");
}

/// Bind a UDP socket at `addr` inside namespace `receiver_ns`, send one datagram to it from
/// inside `sender_ns`, and return the source address it arrived with.
fn source_seen(receiver_ns: &str, addr: Ipv6Addr, sender_ns: &str) -> IpAddr {
    let bind = SocketAddr::new(addr.into(), 0);
    let sock = weft_tests::netns::spawn_in(&format!("/run/netns/{receiver_ns}"), move || {
        let s = UdpSocket::bind(bind).expect("bind the receiver");
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    })
    .join()
    .expect("receiver thread");
    let to = sock.local_addr().unwrap();
    // The first datagram may race neighbour discovery; a few, until one arrives.
    poll::until_blocking("a datagram to arrive", Duration::from_secs(15), || {
        weft_tests::netns::spawn_in(&format!("/run/netns/{sender_ns}"), move || {
            UdpSocket::bind("[::]:0")
                .and_then(|s| s.send_to(b"hello", to))
                .map_err(|e| e.to_string())
        })
        .join()
        .expect("sender thread")?;
        let mut buf = [0u8; 16];
        sock.recv_from(&mut buf)
            .map(|(_, from)| from.ip())
            .map_err(|e| format!("nothing arrived: {e}"))
    })
}

/// With `--ip-masq`, a container's IPv6 packet to an address outside IPv6Network (a namespace
/// standing in for the world, behind host 1) arrives from host 1's address, while its packet to a
/// container on host 2 (over flannel-v6.1) keeps the container's address.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn container_ipv6_is_masqueraded_to_the_world_but_not_inside_the_overlay() {
    masquerade_scenario(MasqKind::Iptables).await;
}

/// The same with `EnableNFTables` (table `ip6 flannel-ipv6`).
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn container_ipv6_is_masqueraded_by_nft_ip6_table() {
    masquerade_scenario(MasqKind::Nftables).await;
}

async fn masquerade_scenario(kind: MasqKind) {
    let c = cluster(2).await;
    let config = match kind {
        MasqKind::Iptables => DUAL.to_owned(),
        MasqKind::Nftables => DUAL.replace(r#""Backend""#, r#""EnableNFTables":true,"Backend""#),
    };
    c.write_config(&config).await;
    c.start_agents(&["--datapath", "kernel", "--ip-masq"])
        .unwrap();
    c.add_containers(1).await.unwrap();
    let mut v6 = Vec::new();
    for h in c.hosts() {
        v6.extend(h.enable_ipv6().await.unwrap());
    }
    let (h1, (c1, c1_ip), (c2, c2_ip)) = (c.host(0), v6[0].clone(), v6[1].clone());
    let world = Netns::create(&format!("{}-world", h1.name()))
        .await
        .unwrap();
    h1.netns()
        .add_veth_into("out0", "eth0", world.name())
        .await
        .unwrap();
    h1.netns()
        .ip(&["-6", "addr", "add", "fd00:99::1/64", "dev", "out0", "nodad"])
        .await
        .unwrap();
    h1.netns().ip(&["link", "set", "out0", "up"]).await.unwrap();
    world
        .ip(&["-6", "addr", "add", "fd00:99::2/64", "dev", "eth0", "nodad"])
        .await
        .unwrap();
    world.ip(&["link", "set", "eth0", "up"]).await.unwrap();
    let want = expected(h1, kind);
    poll::until("host 1's IPv6 rules", SETTLE, || async {
        match kind {
            MasqKind::Iptables => {
                let have = saved(h1, "ip6tables").await?;
                poll::check(have == want.ip6tables_listing(), &have)
            }
            MasqKind::Nftables => {
                let have = nft6_rules(h1).await?;
                poll::check(have == nft6_text(&want), &have)
            }
        }
    })
    .await;
    c1.ping_until(c2_ip, SETTLE).await.unwrap();

    let (world_ns, c1_ns, c2_ns) = (
        world.name().to_owned(),
        c1.netns().to_owned(),
        c2.netns().to_owned(),
    );
    let seen = tokio::task::spawn_blocking(move || {
        (
            source_seen(&world_ns, "fd00:99::2".parse().unwrap(), &c1_ns),
            source_seen(&c2_ns, c2_ip, &c1_ns),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        seen.0,
        "fd00:99::1".parse::<IpAddr>().unwrap(),
        "{kind:?}: the world must see host 1's address, not {c1_ip}"
    );
    assert_eq!(
        seen.1,
        IpAddr::from(c1_ip),
        "{kind:?}: overlay traffic keeps the container's source"
    );
}

/// `DirectRouting: true` on one IPv6 link: each host routes the other's IPv6 subnet via its
/// PublicIPv6 on ens32 (no neighbour, fdb or route on flannel-v6.1), and containers reach each
/// other over IPv6 without a packet leaving through flannel-v6.1.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn ipv6_direct_routing_routes_via_the_peer_and_carries_traffic() {
    let c = cluster(2).await;
    c.write_config(&DUAL.replace(
        r#"{"Type":"vxlan"}"#,
        r#"{"Type":"vxlan","DirectRouting":true}"#,
    ))
    .await;
    c.start_agents(&["--datapath", "kernel"]).unwrap();
    c.add_containers(1).await.unwrap();
    let mut v6 = Vec::new();
    for h in c.hosts() {
        v6.extend(h.enable_ipv6().await.unwrap());
    }
    for (i, h) in c.hosts().iter().enumerate() {
        let peer = c.host(1 - i);
        let (_, peer_v6) = leased(peer);
        let want = format!("via {} dev ens32", peer.ens32_ipv6());
        poll::until(&format!("{want} on {}", h.name()), SETTLE, || async {
            let r = h
                .exec_ok(&["ip", "-6", "route", "show", &peer_v6.to_string()])
                .await
                .map_err(|e| e.to_string())?;
            poll::check(r.contains(&want), &r)
        })
        .await;
        let on_v6 = h
            .exec_ok(&["ip", "-6", "route", "show", "dev", "flannel-v6.1"])
            .await
            .unwrap();
        assert!(
            !on_v6.contains(&peer_v6.to_string()),
            "no route over flannel-v6.1: {on_v6}"
        );
        let neigh = h
            .exec_ok(&["ip", "-6", "neigh", "show", "dev", "flannel-v6.1"])
            .await
            .unwrap();
        assert!(neigh.trim().is_empty(), "no neighbour: {neigh}");
    }
    let ((c1, c1_ip), (c2, c2_ip)) = (v6[0].clone(), v6[1].clone());
    c1.ping_until(c2_ip, SETTLE).await.unwrap();
    c2.ping_until(c1_ip, SETTLE).await.unwrap();
    // A burst of 40 echoes: none may leave host 1 through flannel-v6.1 (which may still send
    // the odd router solicitation of its own, hence a margin well under 40).
    let before = c.host(0).tx_packets("flannel-v6.1").await;
    c1.ping_burst(c2_ip, 40)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let sent = c.host(0).tx_packets("flannel-v6.1").await - before;
    assert!(
        sent < 5,
        "{sent} packets left through flannel-v6.1, not ens32"
    );
}

/// Move host `h`'s IPv4 address from ens32 to a management port on the same switch, so etcd
/// stays reachable while ens32 carries IPv6 only.
async fn ipv6_only_ens32(c: &Cluster, h: &Host) {
    let port = format!("mport-h{}", h.index() + 1);
    c.switch()
        .add_veth_into(&port, "mgmt0", h.name())
        .await
        .unwrap();
    c.switch()
        .ip(&["link", "set", &port, "master", "br0", "up"])
        .await
        .unwrap();
    let cidr = format!("{}/24", h.ens32_ip());
    h.netns()
        .ip(&["addr", "del", &cidr, "dev", "ens32"])
        .await
        .unwrap();
    h.netns()
        .ip(&["addr", "add", &cidr, "dev", "mgmt0"])
        .await
        .unwrap();
    h.netns().ip(&["link", "set", "mgmt0", "up"]).await.unwrap();
    let v4 = h
        .exec_ok(&["ip", "-4", "addr", "show", "dev", "ens32"])
        .await
        .unwrap();
    assert!(v4.trim().is_empty(), "ens32 keeps no IPv4 address: {v4}");
}

/// An IPv6-only container on `h`'s docker0: address `::2` of the host's IPv6 subnet, default
/// route via docker0's `::1`.
async fn v6_container(h: &Host, subnet: Ipv6Net) -> (Netns, Ipv6Addr) {
    let name = format!("{}-c6", h.name());
    let ns = Netns::create(&name).await.unwrap();
    let gw = Ipv6Addr::from(u128::from(subnet.network()) + 1);
    let ip = Ipv6Addr::from(u128::from(subnet.network()) + 2);
    h.netns()
        .sysctl("net.ipv6.conf.all.forwarding", "1")
        .await
        .unwrap();
    h.netns()
        .ip(&[
            "-6",
            "addr",
            "replace",
            &format!("{gw}/{}", subnet.prefix_len()),
            "dev",
            "docker0",
            "nodad",
        ])
        .await
        .unwrap();
    let veth = format!("vc6h{}", h.index() + 1);
    h.netns().add_veth_into(&veth, "eth0", &name).await.unwrap();
    h.netns()
        .ip(&["link", "set", &veth, "master", "docker0", "up"])
        .await
        .unwrap();
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip}/{}", subnet.prefix_len()),
        "dev",
        "eth0",
        "nodad",
    ])
    .await
    .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).await.unwrap();
    ns.ip(&["-6", "route", "add", "default", "via", &gw.to_string()])
        .await
        .unwrap();
    (ns, ip)
}

/// IPv6-only (`EnableIPv4: false`) on hosts whose ens32 has no IPv4 address at all (etcd is
/// reached over a management port): `--iface ens32` is accepted by its IPv6 address as flanneld's
/// ipv6Stack does, the lease advertises it, only ip6tables rules are installed, and containers on
/// the two hosts ping each other over IPv6.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn ipv6_only_hosts_without_ipv4_on_ens32_carry_container_traffic() {
    let c = cluster(2).await;
    for h in c.hosts() {
        ipv6_only_ens32(&c, h).await;
    }
    c.write_config(V6_ONLY).await;
    c.start_agents(&["--datapath", "kernel", "--ip-masq"])
        .unwrap();
    let mut ends = Vec::new();
    for h in c.hosts() {
        poll::until("the subnet file", SETTLE, || async {
            std::fs::read_to_string(h.subnet_file()).map_err(|e| e.to_string())
        })
        .await;
        let log = h.agent().unwrap().log();
        let line = log
            .lines()
            .find(|l| l.contains("external interface"))
            .unwrap_or_default();
        assert!(
            line.contains("iface=ens32")
                && line.contains(&format!("addr6=Some({})", h.ens32_ipv6())),
            "{line}"
        );
        let (v4, sn6) = leased(h);
        assert_eq!(v4, None, "no IPv4 lines in the subnet file");
        let want = expected(h, MasqKind::Iptables).ip6tables_listing();
        poll::until("ip6tables rules", SETTLE, || async {
            let have = saved(h, "ip6tables").await?;
            poll::check(have == want, &have)
        })
        .await;
        assert_eq!(
            saved(h, "iptables").await.unwrap(),
            Vec::<String>::new(),
            "no IPv4 rules for an IPv6-only network"
        );
        ends.push(v6_container(h, sn6).await);
    }
    let leases = c.etcd().get_prefix("/coreos.com/network/subnets/").await;
    for h in c.hosts() {
        assert!(
            leases
                .iter()
                .any(|(_, v)| v.contains(&format!(r#""PublicIPv6":"{}""#, h.ens32_ipv6()))),
            "{leases:?}"
        );
    }
    let ping = |from: &Netns, to: Ipv6Addr| {
        let from = from.name().to_owned();
        async move {
            poll::until(&format!("ping -6 {to} from {from}"), SETTLE, || async {
                let out = weft_tests::netns::run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &from,
                        "ping",
                        "-6",
                        "-n",
                        "-c",
                        "1",
                        "-W",
                        "1",
                        &to.to_string(),
                    ],
                )
                .await;
                out.map(drop).map_err(|e| e.to_string())
            })
            .await
        }
    };
    ping(&ends[0].0, ends[1].1).await;
    ping(&ends[1].0, ends[0].1).await;
}
