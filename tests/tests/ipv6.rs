//! IPv6 and dual stack on the kernel datapath, as flanneld v0.20 runs them: real etcd, `weft
//! agent --datapath kernel` processes in network namespaces with an IPv6 underlay on ens32.
//!
//! What a user would notice: the lease in etcd is the one flanneld writes (`v4&v6` key,
//! `PublicIPv6`, `BackendV6Data` after `BackendData`), subnet.env gains the IPv6 lines in
//! flanneld's order, `flannel-v6.1` exists over the IPv6 underlay, and IPv6 overlay traffic
//! crosses hosts through it. Needs root and the `weft` binary (`cargo xtask test`).

use std::time::Duration;

use weft_tests::{cluster, poll, Host};

const DUAL: &str = r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";
const SETTLE: Duration = Duration::from_secs(15);

/// `ip -d link show DEV` in the host, or what went wrong.
async fn link(host: &Host, dev: &str) -> Result<String, String> {
    host.exec_ok(&["ip", "-d", "link", "show", dev])
        .await
        .map_err(|e| e.to_string())
}

/// The MAC `ip link` shows for `dev`.
fn mac_of(link: &str) -> String {
    link.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn dual_stack_leases_files_and_flannel_v6_are_flanneld_s_and_carry_ipv6() {
    let c = cluster(2).await;
    c.write_config(DUAL).await;
    c.start_agents(&["--datapath", "kernel"]).unwrap();
    c.wait_subnets().await.unwrap();

    let mut v6_subnets = Vec::new();
    for host in c.hosts() {
        // subnet.env: the IPv6 lines between FLANNEL_SUBNET and FLANNEL_MTU, as flanneld writes.
        let env = std::fs::read_to_string(host.subnet_file()).unwrap();
        let lines: Vec<&str> = env.lines().collect();
        assert_eq!(lines.len(), 6, "{env}");
        assert!(
            lines[0] == "FLANNEL_NETWORK=10.1.0.0/16"
                && lines[1].starts_with("FLANNEL_SUBNET=10.1."),
            "{env}"
        );
        assert_eq!(lines[2], "FLANNEL_IPV6_NETWORK=fd00:10::/48", "{env}");
        let v6: ipnet::Ipv6Net = lines[3]
            .strip_prefix("FLANNEL_IPV6_SUBNET=")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no FLANNEL_IPV6_SUBNET in\n{env}"));
        assert_eq!(
            (
                v6.prefix_len(),
                u128::from(v6.addr()) & 0xffff_ffff_ffff_ffff
            ),
            (64, 1),
            "first address of a /64: {env}"
        );
        assert!(
            lines[4].starts_with("FLANNEL_MTU=") && lines[5].starts_with("FLANNEL_IPMASQ="),
            "{env}"
        );
        let v4: ipnet::Ipv4Net = lines[1]["FLANNEL_SUBNET=".len()..].parse().unwrap();
        v6_subnets.push(v6.trunc());

        // The lease: key `v4&v6`, value byte for byte flanneld's with both devices' MACs.
        let flannel1 = poll::until("flannel.1", SETTLE, || link(host, "flannel.1")).await;
        let flannel_v6 = poll::until("flannel-v6.1", SETTLE, || link(host, "flannel-v6.1")).await;
        let key = format!(
            "{SUBNETS}{}-{}&{}-64",
            v4.trunc().addr(),
            v4.prefix_len(),
            v6.trunc().addr()
        );
        let value = c.etcd().get(&key).await.unwrap_or_else(|| {
            panic!(
                "no lease at {key} (the agent wrote {:?})",
                std::fs::read_to_string(host.subnet_file())
            )
        });
        assert_eq!(
            value,
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
                host.ens32_ip(),
                host.ens32_ipv6(),
                mac_of(&flannel1),
                mac_of(&flannel_v6)
            )
        );
        // flannel-v6.1: flanneld's attributes over the IPv6 underlay.
        for want in [
            "vxlan id 1 ".to_string(),
            format!("local {} dev ens32", host.ens32_ipv6()),
            "dstport 8472".into(),
            "nolearning".into(),
        ] {
            assert!(
                flannel_v6.contains(&want),
                "flannel-v6.1 lacks {want:?}:\n{flannel_v6}"
            );
        }
        let addr = host
            .exec_ok(&[
                "ip",
                "-6",
                "addr",
                "show",
                "dev",
                "flannel-v6.1",
                "scope",
                "global",
            ])
            .await
            .unwrap();
        assert!(
            addr.contains(&format!("{}/128", v6.trunc().addr())),
            "flannel-v6.1 lacks its /128:\n{addr}"
        );
    }

    // IPv6 overlay traffic: host 1 reaches host 2's flannel-v6.1 address through its route,
    // neighbour and fdb entry, encapsulated over the IPv6 underlay.
    let (h1, remote) = (&c.hosts()[0], v6_subnets[1].addr().to_string());
    let route = poll::until("host 1's route to host 2's IPv6 subnet", SETTLE, || async {
        let r = h1
            .exec_ok(&["ip", "-6", "route", "show", &v6_subnets[1].to_string()])
            .await
            .map_err(|e| e.to_string())?;
        poll::check(
            r.contains(&format!("via {remote} dev flannel-v6.1")) && r.contains("onlink"),
            r.clone(),
        )?;
        Ok(r)
    })
    .await;
    assert!(!route.is_empty());
    poll::until(
        "ping -6 from host 1 to host 2's flannel-v6.1 address",
        SETTLE,
        || async {
            h1.exec_ok(&["ping", "-6", "-c", "1", "-W", "1", &remote])
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
}

/// Two dual-stack hosts, two containers each on docker0 with both families: every container
/// reaches every container on the other host over IPv4 and over IPv6 (`datapath` decides how).
async fn all_pairs_reach_each_other_over_both_families(config: &str, datapath: &str) {
    let c = cluster(2).await;
    c.write_config(config).await;
    c.start_agents(&["--datapath", datapath]).unwrap();
    c.add_containers(2).await.unwrap();
    let mut all = Vec::new();
    for h in c.hosts() {
        for (ct, v6) in h.enable_ipv6().await.unwrap() {
            all.push((h.index(), ct, v6));
        }
    }
    for (hi, from, _) in &all {
        for (hj, to, to6) in &all {
            if hi == hj {
                continue;
            }
            from.ping_until(to.ip(), SETTLE).await.unwrap();
            from.ping_until(*to6, SETTLE)
                .await
                .unwrap_or_else(|e| panic!("IPv6 {} -> {to6}: {e:#}", from.netns()));
        }
    }
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn dual_stack_containers_reach_each_other_on_the_kernel_datapath() {
    all_pairs_reach_each_other_over_both_families(DUAL, "kernel").await;
}

/// host-gw: IPv6 subnets routed via each peer's PublicIPv6, as flanneld does.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn dual_stack_containers_reach_each_other_with_host_gw() {
    let host_gw = DUAL.replace("vxlan", "host-gw");
    all_pairs_reach_each_other_over_both_families(&host_gw, "kernel").await;
}

/// Both families through the eBPF programs (flannel.1 and flannel-v6.1 as the fallback).
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn dual_stack_containers_reach_each_other_on_the_ebpf_datapath() {
    all_pairs_reach_each_other_over_both_families(DUAL, "ebpf").await;
}

/// The eBPF datapath carries IPv6 itself: pings across hosts grow `ipv6: encapsulated` on the
/// sender and `ipv6: decapsulated` on the receiver, while flannel-v6.1 (the kernel fallback)
/// sends next to nothing of them; IPv4 still takes the eBPF path too, and so does the host's own
/// IPv6 (the host program on flannel-v6.1).
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn ebpf_datapath_encapsulates_ipv6_itself() {
    use weft_tests::{attack::status, status::counter};
    const PINGS: u64 = 40;
    let c = cluster(2).await;
    c.write_config(DUAL).await;
    c.start_agents(&["--datapath", "ebpf"]).unwrap();
    c.add_containers(1).await.unwrap();
    let (h0, h1) = (&c.hosts()[0], &c.hosts()[1]);
    let (from, _) = h0.enable_ipv6().await.unwrap().remove(0);
    let (to, to6) = h1.enable_ipv6().await.unwrap().remove(0);
    from.ping_until(to6, SETTLE).await.unwrap();
    // Until both containers are bound (from the bridges' neighbour tables, at a reconcile) the
    // kernel path carries them: wait until one ping each way is the programs'.
    let counts = |st: &serde_json::Value, name: &str| counter(st, name);
    poll::until(
        "a ping over IPv6 encapsulated and decapsulated by eBPF",
        SETTLE,
        || async {
            let (s0, s1) = (status(h0).await, status(h1).await);
            let before = (
                counts(&s0, "ipv6: encapsulated"),
                counts(&s1, "ipv6: decapsulated"),
            );
            from.ping(to6).await.map_err(|e| e.to_string())?;
            let (s0, s1) = (status(h0).await, status(h1).await);
            let after = (
                counts(&s0, "ipv6: encapsulated"),
                counts(&s1, "ipv6: decapsulated"),
            );
            poll::check(after.0 > before.0 && after.1 > before.1, (before, after))
        },
    )
    .await;
    let (s0, s1) = (status(h0).await, status(h1).await);
    let encap = counts(&s0, "ipv6: encapsulated");
    let decap = counts(&s1, "ipv6: decapsulated");
    let kernel_tx = h0.tx_packets("flannel-v6.1").await;
    let encap4 = counts(&s0, "encapsulated");
    from.ping_burst(to6, PINGS as u32)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (s0, s1) = (status(h0).await, status(h1).await);
    let sent = counts(&s0, "ipv6: encapsulated") - encap;
    let received = counts(&s1, "ipv6: decapsulated") - decap;
    let kernel = h0.tx_packets("flannel-v6.1").await - kernel_tx;
    assert!(
        sent >= PINGS && received >= PINGS,
        "{PINGS} pings: ipv6: encapsulated on {} grew by {sent}, ipv6: decapsulated on {} by {received}",
        h0.name(),
        h1.name()
    );
    assert!(
        kernel < PINGS / 4,
        "flannel-v6.1 on {} sent {kernel} packets during {PINGS} pings the eBPF path should carry",
        h0.name()
    );
    // IPv4 keeps its eBPF path.
    from.ping_until(to.ip(), SETTLE).await.unwrap();
    poll::until("IPv4 encapsulated by eBPF", SETTLE, || async {
        from.ping(to.ip()).await.map_err(|e| e.to_string())?;
        let now = counts(&status(h0).await, "encapsulated");
        poll::check(now > encap4, now)
    })
    .await;
    // The host's own IPv6 to the remote container: the host program on flannel-v6.1's egress.
    let (host6, kernel_tx) = (
        counts(&status(h0).await, "ipv6: host: encapsulated"),
        h0.tx_packets("flannel-v6.1").await,
    );
    let to6 = to6.to_string();
    let out = h0
        .exec(&["ping", "-n", "-c", "10", "-i", "0.05", "-W", "2", &to6])
        .await;
    let (sent, received, text) = weft_tests::ping_outcome(&out);
    assert_eq!((sent, received), (10, 10), "{text}");
    let host6 = counts(&status(h0).await, "ipv6: host: encapsulated") - host6;
    let kernel = h0.tx_packets("flannel-v6.1").await - kernel_tx;
    assert!(
        host6 >= 10 && kernel < 3,
        "10 pings from {}: ipv6: host: encapsulated grew by {host6}, flannel-v6.1 sent {kernel}",
        h0.name()
    );
}

/// A bad IPv6 config never reaches etcd: `weft config set` refuses it with flannel's message.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn bad_ipv6_configs_are_refused_with_flannels_messages() {
    let c = cluster(1).await;
    let h = &c.hosts()[0];
    for (json, needle) in [
        (
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#,
            "please define a correct IPv6Network parameter in the flannel config",
        ),
        (
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/125","Backend":{"Type":"vxlan"}}"#,
            "IPv6Network is too small. Minimum useful network prefix is /124",
        ),
        (
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetLen":127,"Backend":{"Type":"vxlan"}}"#,
            "SubnetLen must be less than /127",
        ),
        (
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd01::","Backend":{"Type":"vxlan"}}"#,
            "IPv6SubnetMin is not in the range of the IPv6Network",
        ),
    ] {
        let bin = weft_tests::weft_bin().unwrap();
        let out = h
            .exec(&[
                bin.to_str().unwrap(),
                "config",
                "set",
                "--etcd-endpoints",
                h.etcd_endpoint(),
                json,
            ])
            .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{json}: {stderr}");
        assert!(stderr.contains(needle), "{json}: {stderr}");
    }
    assert_eq!(
        c.etcd().get("/coreos.com/network/config").await,
        None,
        "nothing stored"
    );
}

/// The dual-stack lease keys in etcd (`v4&v6`) with their values.
async fn dual_leases(c: &weft_tests::Cluster) -> Vec<(String, String)> {
    c.etcd()
        .get_prefix(SUBNETS)
        .await
        .into_iter()
        .filter(|(k, _)| k.contains('&'))
        .collect()
}

/// A restarted agent keeps its dual-stack lease (found by PublicIP), a deleted lease comes back
/// with both subnets, and IPv6 keeps flowing across both.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn restart_and_deleted_lease_keep_both_subnets_and_ipv6_flowing() {
    let c = cluster(2).await;
    c.write_config(DUAL).await;
    c.start_agents(&["--datapath", "kernel"]).unwrap();
    c.add_containers(1).await.unwrap();
    let mut v6 = Vec::new();
    for h in c.hosts() {
        v6.extend(h.enable_ipv6().await.unwrap());
    }
    let (from, to6) = (&v6[0].0, v6[1].1);
    from.ping_until(to6, SETTLE).await.unwrap();
    let before = dual_leases(&c).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // Restart host 2's agent: the same key, the same value (flannel-v6.1 and its MAC adopted).
    let h2 = &c.hosts()[1];
    let status = h2.agent().expect("agent").stop().await.unwrap();
    assert!(status.success(), "SIGTERM exit {status:?}");
    h2.spawn_agent(&["--datapath", "kernel"]).unwrap();
    let after = poll::until(
        "host 2's lease re-put after the restart",
        SETTLE,
        || async {
            let now = dual_leases(&c).await;
            poll::check(now == before, &now)?;
            Ok(now)
        },
    )
    .await;
    assert_eq!(after, before);
    from.ping_until(to6, SETTLE).await.unwrap();

    // An operator deletes host 2's lease: it comes back with both subnets, IPv6 still flows.
    let key = before
        .iter()
        .find(|(_, v)| v.contains(&h2.ens32_ipv6().to_string()))
        .map(|(k, _)| k.clone())
        .unwrap();
    assert_eq!(c.etcd().delete(&key).await, 1);
    poll::until(
        "host 2's deleted lease back under the same key",
        SETTLE,
        || async {
            let v = c.etcd().get(&key).await;
            poll::check(v.is_some(), &v)
        },
    )
    .await;
    from.ping_until(to6, SETTLE).await.unwrap();
}

/// Two weft hosts (kernel and eBPF datapath) and a dual-stack flanneld host set up by hand with `ip` and `bridge` (its
/// lease, flannel.1 and flannel-v6.1 as flanneld makes them, weft's peers programmed in
/// flanneld's order): every container reaches every other over both families.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn a_dual_stack_flanneld_host_set_up_by_hand_interoperates() {
    use weft_tests::flanneld;
    let c = cluster(3).await;
    c.write_config(DUAL).await;
    let hand = &c.hosts()[2];
    let own = ("10.1.0.0/16", "10.1.200.0/24".parse().unwrap());
    let own6 = ("fd00:10::/48", "fd00:10:0:c8::/64".parse().unwrap());
    flanneld::dual_host_by_hand(&c, hand, own, own6)
        .await
        .unwrap();
    // One weft host per datapath, as issue 14 asks of the mixed cluster.
    for (h, datapath) in c.hosts()[..2].iter().zip(["kernel", "ebpf"]) {
        h.spawn_agent(&["--datapath", datapath]).unwrap();
        h.wait_subnet(SETTLE).await.unwrap();
    }
    let weft: Vec<(String, String)> =
        poll::until("both weft hosts' dual-stack leases", SETTLE, || async {
            let l = dual_leases(&c).await;
            poll::check(l.len() == 3, &l)?;
            Ok(l)
        })
        .await;
    for (key, value) in weft
        .iter()
        .filter(|(_, v)| !v.contains(&hand.ens32_ip().to_string()))
    {
        let name = key.rsplit('/').next().unwrap();
        let (v4, v6) = name.split_once('&').unwrap();
        let v4: ipnet::Ipv4Net = v4.replacen('-', "/", 1).parse().unwrap();
        let v6: ipnet::Ipv6Net = v6
            .rsplit_once('-')
            .map(|(a, l)| format!("{a}/{l}"))
            .unwrap()
            .parse()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap().to_owned();
        let mut cmds = flanneld::vxlan_peer(
            v4,
            s("/PublicIP").parse().unwrap(),
            &s("/BackendData/VtepMAC"),
        );
        cmds.extend(flanneld::vxlan_peer_v6(
            v6,
            s("/PublicIPv6").parse().unwrap(),
            &s("/BackendV6Data/VtepMAC"),
        ));
        flanneld::run(hand.name(), &cmds).await.unwrap();
    }
    c.add_containers(1).await.unwrap();
    let mut all = Vec::new();
    for h in c.hosts() {
        for (ct, v6) in h.enable_ipv6().await.unwrap() {
            all.push((h.index(), ct, v6));
        }
    }
    for (hi, from, _) in &all {
        for (hj, to, to6) in &all {
            if hi != hj {
                from.ping_until(to.ip(), SETTLE).await.unwrap();
                from.ping_until(*to6, SETTLE)
                    .await
                    .unwrap_or_else(|e| panic!("IPv6 {} -> {to6}: {e:#}", from.netns()));
            }
        }
    }
    // The eBPF host's programs, not flannel-v6.1, carry its IPv6 to and from the flanneld host.
    use weft_tests::{attack::status, status::counter};
    let ebpf = &c.hosts()[1];
    let of = |i: usize| {
        all.iter()
            .find(|(h, _, _)| *h == c.hosts()[i].index())
            .expect("a container on every host")
    };
    let ((_, mine, mine6), (_, theirs, theirs6)) = (of(1), of(2));
    for (from, to6, name) in [
        (mine, theirs6, "ipv6: encapsulated"),
        (theirs, mine6, "ipv6: decapsulated"),
    ] {
        poll::until(
            &format!(
                "a ping {} -> {to6} counted as `{name}` on the eBPF host",
                from.netns()
            ),
            SETTLE,
            || async {
                let before = counter(&status(ebpf).await, name);
                from.ping(*to6).await.map_err(|e| e.to_string())?;
                let after = counter(&status(ebpf).await, name);
                poll::check(after > before, (before, after))
            },
        )
        .await;
    }
}

/// `EnableIPv4: false`: leases `0.0.0.0-0&<v6>-64` with PublicIP 0.0.0.0 and distinct IPv6
/// subnets (flanneld's allocator would give the second host none), no flannel.1, subnet.env with
/// only the IPv6 lines, and IPv6 across hosts through flannel-v6.1.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn ipv6_only_hosts_get_distinct_subnets_and_reach_each_other() {
    let c = cluster(2).await;
    c.write_config(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#).await;
    for h in c.hosts() {
        h.spawn_agent(&["--datapath", "kernel"]).unwrap();
    }
    let leases = poll::until("two IPv6-only leases", SETTLE, || async {
        let l = dual_leases(&c).await;
        poll::check(l.len() == 2, &l)?;
        Ok(l)
    })
    .await;
    let mut subnets = Vec::new();
    for h in c.hosts() {
        let (key, value) = leases
            .iter()
            .find(|(_, v)| v.contains(&format!("\"{}\"", h.ens32_ipv6())))
            .unwrap_or_else(|| panic!("no lease for {}: {leases:?}", h.ens32_ipv6()));
        let name = key.rsplit('/').next().unwrap();
        let v6 = name
            .strip_prefix("0.0.0.0-0&")
            .unwrap_or_else(|| panic!("{key}"));
        let (a, l) = v6.rsplit_once('-').unwrap();
        let subnet: ipnet::Ipv6Net = format!("{a}/{l}").parse().unwrap();
        let flannel_v6 = poll::until("flannel-v6.1", SETTLE, || link(h, "flannel-v6.1")).await;
        assert_eq!(
            value,
            &format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
                h.ens32_ipv6(),
                mac_of(&flannel_v6)
            )
        );
        assert!(
            link(h, "flannel.1").await.is_err(),
            "flanneld creates no flannel.1 without IPv4"
        );
        let env = poll::until("the subnet file", SETTLE, || async {
            std::fs::read_to_string(h.subnet_file()).map_err(|e| e.to_string())
        })
        .await;
        assert!(
            env.starts_with("FLANNEL_IPV6_NETWORK=fd00:10::/48\nFLANNEL_IPV6_SUBNET="),
            "{env}"
        );
        subnets.push(subnet);
    }
    assert_ne!(subnets[0], subnets[1]);
    let remote = subnets[1].network().to_string();
    poll::until(
        "ping -6 from host 1 to host 2's flannel-v6.1 address",
        SETTLE,
        || async {
            c.hosts()[0]
                .exec_ok(&["ping", "-6", "-c", "1", "-W", "1", &remote])
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
}
