//! Operations: ip-masq rules in private network namespaces, the health/metrics endpoint, sd_notify, and
//! the systemd unit. Needs root (namespaces, iptables, nft), like every test in this crate.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use tokio_util::sync::CancellationToken;
use weft::health::HealthServer;
use weft::masq::{Masq, MasqKind};
use weft::metrics::Metrics;
use weft::notify::Notifier;

// ---------------------------------------------------------------------------------------------------
// Namespaces

/// The harness's namespace (deleted on drop, its processes killed) with the runners these tests use.
struct Netns {
    ns: weft_tests::Netns,
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Self> {
        let name = format!("weft-ops-{tag}-{}-{}", std::process::id(), rand_suffix());
        let ns = weft_tests::Netns::create_blocking(&name)?;
        Ok(Self { ns, name })
    }

    /// Run a command inside the namespace, returning stdout; fails on a non-zero exit.
    fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        sh("ip", &args)
    }

    /// Run `f` on a thread that has entered this namespace. Processes it spawns and sockets it opens
    /// live in the namespace; nothing else in the test process moves.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        weft_tests::netns::spawn_in(&self.ns.path(), f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))
    }

    /// Like [`Netns::enter`] with a current-thread tokio runtime, so every task stays on that thread.
    fn block_on<F: std::future::Future + 'static>(
        &self,
        f: impl FnOnce() -> F + Send + 'static,
    ) -> Result<F::Output>
    where
        F::Output: Send + 'static,
    {
        self.enter(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
    }
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos());
    nanos.unwrap_or(0) % 100_000
}

fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawn {program}"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Our lines of `iptables-save` for one table: the chain's rules and the jumps into it.
fn saved(ns: &Netns, table: &str, chain: &str) -> Result<Vec<String>> {
    let listing = ns.exec(&["iptables-save", "-t", table])?;
    Ok(listing
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains(chain))
        .map(String::from)
        .collect())
}

fn net(s: &str) -> ipnet::Ipv4Net {
    s.parse().expect("test network")
}

async fn wait_until(
    deadline: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if check()? {
            return Ok(start.elapsed());
        }
        // Pacing between two looks; the deadline decides.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("not restored within {deadline:?}")
}

// ---------------------------------------------------------------------------------------------------
// ip-masq

/// Our lines for N=10.1.0.0/16, SN=10.1.10.0/24 that mention `chain`, as `iptables-save` prints
/// them: the listing the masq unit test (`iptables_rules_match_flanneld`) pins to flanneld's, so
/// the kernel is checked against the one copy of flanneld's rules.
fn flannel_rules(chain: &str) -> Vec<String> {
    Masq::new(MasqKind::Iptables, net("10.1.0.0/16"), net("10.1.10.0/24"))
        .iptables_listing()
        .into_iter()
        .filter(|l| l.contains(chain))
        .collect()
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn iptables_rules_match_flannel_are_idempotent_and_replace_a_stale_subnet() -> Result<()> {
    let ns = Netns::new("ipt")?;
    // A previous run on another subnet left its rules; the new subnet's must replace them in place.
    let repairs = ns.block_on(|| async {
        let old = Masq::new(MasqKind::Iptables, net("10.1.0.0/16"), net("10.1.99.0/24"));
        old.ensure().await?;
        let masq = Masq::new(MasqKind::Iptables, net("10.1.0.0/16"), net("10.1.10.0/24"));
        let first = masq.ensure().await?;
        let second = masq.ensure().await?;
        anyhow::Ok((first, second))
    })??;
    assert_eq!(
        saved(&ns, "nat", "FLANNEL-POSTRTG")?,
        flannel_rules("FLANNEL-POSTRTG")
    );
    assert_eq!(
        saved(&ns, "filter", "FLANNEL-FWD")?,
        flannel_rules("FLANNEL-FWD")
    );
    assert!(
        repairs.0.iter().any(|r| r.contains("removed stale rule")),
        "{:?}",
        repairs.0
    );
    assert_eq!(
        repairs.1,
        Vec::<String>::new(),
        "a second ensure must change nothing"
    );

    // One rule deleted from the middle comes back at its place, the others untouched.
    ns.exec(&["iptables", "-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "3"])?;
    let repairs = ns.block_on(|| async {
        Masq::new(MasqKind::Iptables, net("10.1.0.0/16"), net("10.1.10.0/24"))
            .ensure()
            .await
    })??;
    assert_eq!(repairs.len(), 1, "{repairs:?}");
    assert_eq!(
        saved(&ns, "nat", "FLANNEL-POSTRTG")?,
        flannel_rules("FLANNEL-POSTRTG")
    );

    ns.block_on(|| async {
        Masq::new(MasqKind::Iptables, net("10.1.0.0/16"), net("10.1.10.0/24"))
            .remove()
            .await
    })??;
    assert_eq!(saved(&ns, "nat", "FLANNEL")?, Vec::<String>::new());
    assert_eq!(saved(&ns, "filter", "FLANNEL")?, Vec::<String>::new());
    ensure!(
        !ns.exec(&["iptables-save"])?.contains("FLANNEL"),
        "chains left after remove"
    );
    Ok(())
}

/// Start `masq.run` with flanneld's 5 s period, let its first check pass, break the rules with
/// `break_it` (what an operator does by hand), and return how long until `restored` holds.
async fn time_to_restore(
    masq: &Masq,
    break_it: impl FnOnce() -> Result<()>,
    mut restored: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn({
        let (masq, shutdown) = (masq.clone(), shutdown.clone());
        async move { masq.run(Duration::from_secs(5), shutdown).await }
    });
    // Its first check has run once the rules are there; only then is breaking them a repair test.
    wait_until(Duration::from_secs(5), &mut restored).await?;
    break_it()?;
    let elapsed = wait_until(Duration::from_secs(12), restored).await;
    shutdown.cancel();
    runner.await?;
    elapsed
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn iptables_chain_deleted_by_hand_is_restored_by_run() -> Result<()> {
    let ns = Netns::new("iptrun")?;
    let ns_name = ns.name.clone();
    let (elapsed, repairs) = ns.block_on(move || async move {
        let metrics = Arc::new(Metrics::default());
        let masq = Masq::new(MasqKind::Iptables, net("10.1.0.0/16"), net("10.1.10.0/24"))
            .with_metrics(metrics.clone());
        masq.ensure().await?;
        let in_ns = |cmd: &[&str]| sh("ip", &[&["netns", "exec", &ns_name], cmd].concat());
        let nat = ["iptables", "-w", "-t", "nat"];
        let jump = [
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ];
        let elapsed = time_to_restore(
            &masq,
            || {
                in_ns(&[&nat[..], &["-D", "POSTROUTING"], &jump].concat())?;
                in_ns(&[&nat[..], &["-F", "FLANNEL-POSTRTG"]].concat())?;
                in_ns(&[&nat[..], &["-X", "FLANNEL-POSTRTG"]].concat())?;
                Ok(())
            },
            || {
                let listing = in_ns(&["iptables-save", "-t", "nat"])?;
                Ok(flannel_rules("FLANNEL-POSTRTG")
                    .iter()
                    .all(|r| listing.contains(r)))
            },
        )
        .await?;
        anyhow::Ok((elapsed, metrics.reconcile_repairs.get()))
    })??;
    assert_eq!(
        saved(&ns, "nat", "FLANNEL-POSTRTG")?,
        flannel_rules("FLANNEL-POSTRTG")
    );
    assert!(
        elapsed < Duration::from_secs(7),
        "restored after {elapsed:?}, expected within one 5 s period"
    );
    assert_eq!(
        repairs, 8,
        "chain + 6 rules + jump, each counted as a reconcile repair"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn nftables_variant_matches_and_is_restored() -> Result<()> {
    let ns = Netns::new("nft")?;
    let ns_name = ns.name.clone();
    let elapsed = ns.block_on(move || async move {
        let masq = Masq::new(MasqKind::Nftables, net("10.1.0.0/16"), net("10.1.10.0/24"));
        ensure!(
            !masq.ensure().await?.is_empty(),
            "first ensure must create the table"
        );
        ensure!(
            masq.ensure().await?.is_empty(),
            "second ensure must change nothing"
        );
        let nft = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &ns_name, "nft"])
                .args(args)
                .output()
        };
        time_to_restore(
            &masq,
            || {
                ensure!(
                    nft(&["delete", "table", "ip", "flannel-ipv4"])?
                        .status
                        .success(),
                    "delete table"
                );
                Ok(())
            },
            || {
                Ok(nft(&["list", "table", "ip", "flannel-ipv4"])?
                    .status
                    .success())
            },
        )
        .await
    })??;
    assert!(
        elapsed < Duration::from_secs(7),
        "restored after {elapsed:?}"
    );
    let listing = ns.exec(&["nft", "list", "table", "ip", "flannel-ipv4"])?;
    let rules: Vec<&str> = listing
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with("return") || l.ends_with("accept") || l.ends_with("fully-random"))
        .collect();
    assert_eq!(
        rules,
        [
            "meta mark & 0x00004000 == 0x00004000 return",
            "ip saddr 10.1.10.0/24 ip daddr 10.1.0.0/16 return",
            "ip saddr 10.1.0.0/16 ip daddr 10.1.10.0/24 return",
            "ip saddr != 10.1.0.0/16 ip daddr 10.1.10.0/24 return",
            "ip saddr 10.1.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
            "ip saddr != 10.1.0.0/16 ip daddr 10.1.0.0/16 masquerade fully-random",
            "ip saddr 10.1.0.0/16 accept",
            "ip daddr 10.1.0.0/16 accept",
        ],
        "{listing}"
    );
    assert!(
        listing.contains("type nat hook postrouting priority srcnat"),
        "{listing}"
    );
    assert!(
        listing.contains("type filter hook forward priority filter"),
        "{listing}"
    );
    ns.block_on(|| async {
        Masq::new(MasqKind::Nftables, net("10.1.0.0/16"), net("10.1.10.0/24"))
            .remove()
            .await
    })??;
    ensure!(
        !ns.exec(&["nft", "list", "tables"])?
            .contains("flannel-ipv4"),
        "table left after remove"
    );
    Ok(())
}

/// `--iptables-forward-rules` without `--ip-masq`: flanneld's FLANNEL-FWD rules alone (a NAT chain
/// from an earlier `--ip-masq` run is removed), plus weft's `ip weft-nonat` table that keeps overlay
/// traffic's source when Docker masquerades; both restored within one resync period when deleted,
/// and gone after `remove`. The Docker scenarios (tests/tests/docker.rs) show what they do for
/// packets: first contact with FORWARD policy DROP, and the receiver seeing the sender's address.
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn forward_rules_without_ip_masq_are_installed_restored_and_removed() -> Result<()> {
    for kind in [MasqKind::Iptables, MasqKind::Nftables] {
        let ns = Netns::new("fwd")?;
        let ns_name = ns.name.clone();
        let elapsed = ns.block_on(move || async move {
            let masq = |on: bool| {
                Masq::new(kind, net("10.1.0.0/16"), net("10.1.10.0/24")).with_masquerade(on)
            };
            masq(true).ensure().await?;
            let forward_only = masq(false);
            let repairs = forward_only.ensure().await?;
            ensure!(
                repairs.iter().any(|r| r.contains("no longer configured")),
                "{kind:?}: the NAT chain of the --ip-masq run must go: {repairs:?}"
            );
            let in_ns = |cmd: &[&str]| sh("ip", &[&["netns", "exec", &ns_name], cmd].concat());
            let delete: Vec<&str> = match kind {
                MasqKind::Iptables => vec!["iptables", "-w", "-F", "FLANNEL-FWD"],
                MasqKind::Nftables => {
                    vec!["nft", "flush", "chain", "ip", "flannel-ipv4", "forward"]
                }
            };
            time_to_restore(
                &forward_only,
                || {
                    in_ns(&delete)?;
                    in_ns(&["nft", "delete", "table", "ip", "weft-nonat"])?;
                    Ok(())
                },
                || {
                    let rules = match kind {
                        MasqKind::Iptables => in_ns(&["iptables-save", "-t", "filter"])?,
                        MasqKind::Nftables => {
                            in_ns(&["nft", "list", "table", "ip", "flannel-ipv4"])?
                        }
                    };
                    let nonat = in_ns(&["nft", "list", "tables"])?;
                    Ok(rules.contains("10.1.0.0/16") && nonat.contains("weft-nonat"))
                },
            )
            .await
        })??;
        assert!(
            elapsed < Duration::from_secs(7),
            "{kind:?}: restored after {elapsed:?}"
        );
        match kind {
            MasqKind::Iptables => {
                assert_eq!(
                    saved(&ns, "filter", "FLANNEL-FWD")?,
                    flannel_rules("FLANNEL-FWD")
                );
                assert_eq!(saved(&ns, "nat", "FLANNEL")?, Vec::<String>::new());
            }
            MasqKind::Nftables => {
                let listing = ns.exec(&["nft", "list", "table", "ip", "flannel-ipv4"])?;
                assert!(listing.contains("ip daddr 10.1.0.0/16 accept"), "{listing}");
                assert!(!listing.contains("postrtg"), "{listing}");
            }
        }
        let nonat = ns.exec(&["nft", "list", "table", "ip", "weft-nonat"])?;
        assert!(
            nonat.contains("ip saddr 10.1.0.0/16 ip daddr 10.1.0.0/16 snat to ip saddr"),
            "{nonat}"
        );
        ns.block_on(move || async move {
            Masq::new(kind, net("10.1.0.0/16"), net("10.1.10.0/24"))
                .with_masquerade(false)
                .remove()
                .await
        })??;
        let left = ns.exec(&["nft", "list", "ruleset"])? + &ns.exec(&["iptables-save"])?;
        ensure!(
            !left.contains("FLANNEL")
                && !left.contains("flannel-ipv4")
                && !left.contains("weft-nonat"),
            "{kind:?}: rules left after remove:\n{left}"
        );
    }
    Ok(())
}

/// A container behind a host reaches a "world" address with its source masqueraded to the host's
/// address, while a packet to another overlay subnet keeps the container's source.
///
/// ```text
///  container 10.1.10.2 ── 10.1.10.1 host 192.168.77.1 ── 192.168.77.2 world
///                                   host 10.1.20.1    ── 10.1.20.2    peer (stands in for the overlay)
/// ```
#[test]
#[ignore = "needs root: run cargo xtask test"]
fn container_traffic_is_masqueraded_to_the_world_but_not_inside_the_overlay() -> Result<()> {
    for kind in [MasqKind::Iptables, MasqKind::Nftables] {
        let (world_src, peer_src) = sources_seen(kind)?;
        assert_eq!(
            world_src,
            Ipv4Addr::new(192, 168, 77, 1),
            "{kind:?}: world must see the host's address"
        );
        assert_eq!(
            peer_src,
            Ipv4Addr::new(10, 1, 10, 2),
            "{kind:?}: overlay traffic must keep its source"
        );
    }
    Ok(())
}

fn sources_seen(kind: MasqKind) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let (host, container, world, peer) = (
        Netns::new("host")?,
        Netns::new("ctr")?,
        Netns::new("world")?,
        Netns::new("peer")?,
    );
    let tag = format!("{}{}", std::process::id() % 10_000, rand_suffix() % 100);
    let link =
        |a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_if: &str, b_ip: &str| -> Result<()> {
            sh(
                "ip",
                &[
                    "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if,
                    "netns", &b.name,
                ],
            )?;
            for (ns, ifname, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
                ns.exec(&["ip", "addr", "add", ip, "dev", ifname])?;
                ns.exec(&["ip", "link", "set", ifname, "up"])?;
            }
            Ok(())
        };
    link(
        &container,
        &format!("oc{tag}"),
        "10.1.10.2/24",
        &host,
        &format!("oh{tag}"),
        "10.1.10.1/24",
    )?;
    link(
        &world,
        &format!("ow{tag}"),
        "192.168.77.2/24",
        &host,
        &format!("ox{tag}"),
        "192.168.77.1/24",
    )?;
    link(
        &peer,
        &format!("op{tag}"),
        "10.1.20.2/24",
        &host,
        &format!("oq{tag}"),
        "10.1.20.1/24",
    )?;
    container.exec(&["ip", "route", "add", "default", "via", "10.1.10.1"])?;
    host.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    host.block_on(move || async move {
        Masq::new(kind, net("10.1.0.0/16"), net("10.1.10.0/24"))
            .ensure()
            .await
    })??;

    let world_src = receive_from(&world, "192.168.77.2", &container)?;
    let peer_src = receive_from(&peer, "10.1.20.2", &container)?;
    Ok((world_src, peer_src))
}

/// Send one UDP datagram from `sender` to `addr` in `receiver`; return the source address it arrived with.
fn receive_from(receiver: &Netns, addr: &str, sender: &Netns) -> Result<Ipv4Addr> {
    let bind: SocketAddr = format!("{addr}:0").parse()?;
    let sock = receiver.enter(move || -> Result<UdpSocket> {
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(s)
    })??;
    let to = sock.local_addr()?;
    sender.enter(move || -> Result<()> {
        UdpSocket::bind("0.0.0.0:0")?.send_to(b"hello", to)?;
        Ok(())
    })??;
    let mut buf = [0u8; 16];
    let (n, from) = sock.recv_from(&mut buf).context("no datagram arrived")?;
    ensure!(&buf[..n] == b"hello");
    match from.ip() {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => bail!("unexpected source {other}"),
    }
}

// ---------------------------------------------------------------------------------------------------
// Health and metrics

fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no header end")?;
    let status = head.split(' ').nth(1).context("no status")?.parse()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .context("no Content-Length")?
        .parse()?;
    ensure!(
        length == body.len(),
        "Content-Length {length} but body has {} bytes",
        body.len()
    );
    Ok((status, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_flips_and_metrics_parse_and_grow() -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let server = HealthServer::bind("127.0.0.1:0".parse()?, ready_rx, metrics.clone()).await?;
    let addr = server.local_addr()?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(shutdown.clone()));
    let get = move |path: &'static str| tokio::task::spawn_blocking(move || http_get(addr, path));

    assert_eq!(get("/healthz").await??.0, 200);
    assert_eq!(get("/readyz").await??.0, 503);
    ready_tx.send_replace(true);
    assert_eq!(get("/readyz").await??.0, 200);
    assert_eq!(get("/healthz").await??.0, 200);

    metrics.set_datapath_mode("ebpf");
    metrics.set_leases(3);
    let before = weft_tests::prometheus::parse(&get("/metrics").await??.1)?;
    metrics.peers_added.add(2);
    metrics.lease_renewals.inc();
    metrics.etcd_reconnects.inc();
    metrics.reconcile_repairs.add(5);
    metrics.set_leases(4);
    let after = weft_tests::prometheus::parse(&get("/metrics").await??.1)?;
    for (name, grew_by) in [
        ("weft_peers_added_total", 2.0),
        ("weft_lease_renewals_total", 1.0),
        ("weft_etcd_reconnects_total", 1.0),
        ("weft_reconcile_repairs_total", 5.0),
    ] {
        assert_eq!(after[name] - before[name], grew_by, "{name}");
    }
    assert_eq!(after["weft_leases"], 4.0);
    assert_eq!(after["weft_datapath_mode{mode=\"ebpf\"}"], 1.0);
    assert_eq!(after["weft_peers_removed_total"], 0.0);

    ready_tx.send_replace(false);
    assert_eq!(get("/readyz").await??.0, 503, "readiness can be withdrawn");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task).await??;
    // Other tests here spawn processes; a child between fork and exec holds a copy of the
    // listening socket for a moment, so the port closes shortly after the task ends, not with it.
    weft_tests::poll::try_until(
        "the port to close after shutdown",
        Duration::from_secs(2),
        || async {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(_) => Err("still accepting connections".to_string()),
                Err(_) => Ok(()),
            }
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    Ok(())
}

#[tokio::test]
async fn taken_port_is_a_clear_error() -> Result<()> {
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let first = HealthServer::bind("127.0.0.1:0".parse()?, rx.clone(), Arc::default()).await?;
    let err = HealthServer::bind(first.local_addr()?, rx, Arc::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--healthz-port") && err.contains("127.0.0.1"),
        "{err}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// sd_notify

fn recv(sock: &UnixDatagram) -> Result<String> {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test]
async fn sd_notify_reaches_a_path_socket_and_an_abstract_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let pid = std::process::id().to_string();
    let n = Notifier::from_vars(path.to_str(), Some("200000"), Some(&pid))?;
    assert!(n.enabled());
    n.status("waiting for\nthe network config")?;
    assert_eq!(recv(&sock)?, "STATUS=waiting for the network config");
    n.ready("running")?;
    assert_eq!(recv(&sock)?, "READY=1\nSTATUS=running");

    // The watchdog pings at half of WATCHDOG_USEC (200 ms -> every 100 ms) until shutdown.
    let shutdown = CancellationToken::new();
    let dog = tokio::spawn({
        let (n, s) = (n.clone(), shutdown.clone());
        async move { n.run_watchdog(s).await }
    });
    let pings = tokio::task::spawn_blocking(move || -> Result<(UnixDatagram, Vec<String>)> {
        let msgs = (0..3).map(|_| recv(&sock)).collect::<Result<Vec<_>>>()?;
        Ok((sock, msgs))
    });
    let (sock, msgs) = pings.await??;
    assert_eq!(msgs, ["WATCHDOG=1"; 3]);
    shutdown.cancel();
    dog.await?;
    n.stopping("bye")?;
    // Drain stray pings that raced with the cancel.
    let mut last = recv(&sock)?;
    while last == "WATCHDOG=1" {
        last = recv(&sock)?;
    }
    assert_eq!(last, "STOPPING=1\nSTATUS=bye");

    let name = format!("weft-ops-notify-{}-{}", std::process::id(), rand_suffix());
    use std::os::linux::net::SocketAddrExt as _;
    let abstract_sock = UnixDatagram::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
    )?;
    abstract_sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    Notifier::from_vars(Some(&format!("@{name}")), None, None)?.ready("up")?;
    assert_eq!(recv(&abstract_sock)?, "READY=1\nSTATUS=up");

    // A socket nobody listens on is an error that says what to check.
    drop(abstract_sock);
    let err = Notifier::from_vars(Some(&format!("@{name}")), None, None)?
        .ready("up")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NOTIFY_SOCKET") && err.contains("Type=notify"),
        "{err}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// systemd unit

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

fn systemd_analyze() -> Option<PathBuf> {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A minimal root for `systemd-analyze verify --root`: the unit and its drop-in where systemd looks,
/// the system's own units (targets it orders against), and executables at the paths the unit names.
fn verify_root(unit_text: &str, dropin_text: &str) -> Result<tempfile::TempDir> {
    let root = tempfile::tempdir()?;
    let r = root.path();
    let units = r.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("weft.service.d"))?;
    std::fs::write(units.join("weft.service"), unit_text)?;
    std::fs::write(units.join("weft.service.d/10-etcd-tls.conf"), dropin_text)?;
    std::fs::create_dir_all(r.join("usr/lib/systemd"))?;
    sh(
        "cp",
        &[
            "-r",
            "/usr/lib/systemd/system",
            r.join("usr/lib/systemd/").to_str().context("utf-8 path")?,
        ],
    )?;
    for exe in ["usr/local/bin/weft", "bin/sh"] {
        let p = r.join(exe);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(&p, "#!/bin/sh\n")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(root)
}

fn verify(analyze: &Path, root: &Path) -> Result<String> {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("weft.service")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() || !text.is_empty(),
        "systemd-analyze failed silently: {}",
        out.status
    );
    Ok(text)
}

#[test]
fn systemd_unit_and_dropin_verify_clean() -> Result<()> {
    // Never a silent pass: `cargo xtask test` and .ci/run install systemd (packages.rs).
    let analyze = systemd_analyze().context(
        "systemd-analyze is not installed (apt-get install systemd); the unit cannot be verified",
    )?;
    let unit = std::fs::read_to_string(dist().join("weft.service"))?;
    let dropin = std::fs::read_to_string(dist().join("weft.service.d/10-etcd-tls.conf"))?;
    let root = verify_root(&unit, &dropin)?;
    let text = verify(&analyze, root.path())?;
    assert_eq!(
        text, "",
        "systemd-analyze verify must print nothing for dist/weft.service"
    );

    // The same check notices a mistake, in the unit or in the drop-in (verify exits 0 on these, so only
    // its output tells).
    let bad = verify_root(
        &unit.replace("KillMode=mixed", "KillMode=sometimes"),
        &format!("{dropin}\nBogusKey=1\n"),
    )?;
    let text = verify(&analyze, bad.path())?;
    assert!(
        text.contains("kill mode") && text.contains("BogusKey"),
        "{text}"
    );

    for needed in [
        "Type=notify",
        "NotifyAccess=main",
        "Restart=always",
        "RestartSec=5",
        "LimitMEMLOCK=infinity",
        "EnvironmentFile=-/etc/weft/weft.env",
        "ExecStart=/usr/local/bin/weft agent",
        "CAP_BPF",
        "CAP_NET_ADMIN",
    ] {
        assert!(
            unit.lines().any(|l| l.contains(needed)),
            "weft.service lacks {needed}"
        );
    }
    Ok(())
}

/// The ExecStartPre line runs `weft config set '<json>'` with the JSON intact when WEFT_NETWORK_CONFIG is
/// set, and does nothing (successfully) when it is not.
#[test]
fn exec_start_pre_writes_the_config_only_when_asked() -> Result<()> {
    let unit = std::fs::read_to_string(dist().join("weft.service"))?;
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .context("no ExecStartPre")?;
    let dir = tempfile::tempdir()?;
    let fake = dir.path().join("weft");
    let log = dir.path().join("args");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {}\n",
            log.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755))?;
    // What systemd does to the line before running it: `$$` becomes `$`; then point at the fake binary.
    let line = line
        .replace("$$", "$")
        .replace("/usr/local/bin/weft", fake.to_str().context("utf-8")?);
    let argv: Vec<&str> = {
        let (program, rest) = line.split_once(' ').context("program")?;
        let (flag, script) = rest.split_once(' ').context("flag")?;
        vec![program, flag, script.trim_matches('\'')]
    };
    let run = |config: Option<&str>| -> Result<()> {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]).env_remove("WEFT_NETWORK_CONFIG");
        if let Some(c) = config {
            cmd.env("WEFT_NETWORK_CONFIG", c);
        }
        ensure!(cmd.status()?.success(), "ExecStartPre failed");
        Ok(())
    };
    run(None)?;
    assert!(
        !log.exists(),
        "weft config set ran without WEFT_NETWORK_CONFIG"
    );
    let json = r#"{"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan"}}"#;
    run(Some(json))?;
    assert_eq!(
        std::fs::read_to_string(&log)?,
        format!("config\nset\n{json}\n")
    );
    Ok(())
}
