//! The eBPF programs' own log lines (`--ebpf-log`): a peer's VTEP sends VXLAN whose inner source
//! lies outside the subnets it leased; the receiving host drops it. With the flag, the agent's log
//! names the drop with both addresses, also after an agent restart that adopts the pinned
//! programs; without it (and without debug logging), the same drop is counted and not logged.
//!
//! Root only: `cargo xtask test -- ebpf_log`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use weft_tests::attack::{
    self, counter, ethernet, send_udp, status, vtep_mac, vxlan, Udp4, UdpOpts, ETH_P_IPV4,
    VXLAN_PORT,
};
use weft_tests::{netns, poll, Cluster, ClusterOptions, Host};

/// Only the flag may turn the programs' logging on, whatever RUST_LOG the tests run with.
const RUST_LOG: (&str, &str) = ("RUST_LOG", "info");
const DROPPED: &str = "dropped: inner source not leased by the sender";
/// How long a logged drop may take to reach the agent's log (also after a restart).
const LOG_WAIT: Duration = Duration::from_secs(15);
/// How long the log is watched for a line that must not come: the flagged cluster's lines arrive
/// within milliseconds of the drop.
const QUIET: Duration = Duration::from_secs(3);

/// Two eBPF hosts (TC decapsulation), one container each, agents started with `extra`.
async fn cluster(extra: &[&str]) -> Cluster {
    let c = Cluster::start(ClusterOptions::new(2))
        .await
        .unwrap_or_else(|e| panic!("build a 2-host cluster: {e:#}"));
    c.write_config(attack::CONFIG).await;
    let mut args = vec!["--datapath", "ebpf", "--decap-hook", "tc"];
    args.extend_from_slice(extra);
    for h in c.hosts() {
        h.spawn_agent_with_env(&args, &[RUST_LOG])
            .unwrap_or_else(|e| panic!("start the agent on {}: {e:#}", h.name()));
    }
    c.add_containers(1)
        .await
        .unwrap_or_else(|e| panic!("add containers: {e:#}"));
    for h in c.hosts() {
        attack::wait_ebpf_ready(h, 1).await;
    }
    c
}

/// An address in host 1's own subnet, which host 2 has no lease for.
fn forged(c: &Cluster, offset: u32) -> Ipv4Addr {
    let subnet = c.host(0).subnet().expect("host 1's subnet").subnet;
    Ipv4Addr::from(u32::from(subnet.network()) + offset)
}

/// Host 2's VTEP sends host 1 one VXLAN frame for host 1's container with inner source `src`.
async fn spoof(c: &Cluster, src: Ipv4Addr) {
    let (h1, h2) = (c.host(0), c.host(1));
    let inner = Udp4::new(src, c.container(0).ip(), 9999, b"weft-ebpf-log").packet();
    let (to_mac, from_mac) = (vtep_mac(c, h1).await, vtep_mac(c, h2).await);
    let frame = vxlan(1, &ethernet(to_mac, from_mac, ETH_P_IPV4, &inner));
    let (from, to) = (
        SocketAddrV4::new(h2.ens32_ip(), 0),
        SocketAddrV4::new(h1.ens32_ip(), VXLAN_PORT),
    );
    send_udp(h2.name(), from, to, vec![frame], UdpOpts::default()).await;
}

/// The line the decapsulation program logs for [`spoof`]`(src)`.
fn drop_line(c: &Cluster, src: Ipv4Addr) -> String {
    format!(
        "decap drop: inner source {src} from VTEP {}, outside the subnets it leased",
        c.host(1).ens32_ip()
    )
}

fn agent_log(h: &Host) -> String {
    h.agent().expect("an agent").log()
}

/// The tail of host 1's agent log, for failure messages.
fn log_tail(c: &Cluster) -> String {
    let log = agent_log(c.host(0));
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Sends [`spoof`]`(src)` until host 1's log has its line: right after an agent (re)start, the
/// links may still run the previous programs, whose lines nobody reads.
async fn spoof_until_logged(c: &Cluster, src: Ipv4Addr, when: &str) {
    let line = &drop_line(c, src);
    poll::until(
        &format!("{when}: {line:?} in host 1's log"),
        LOG_WAIT,
        || async move {
            if agent_log(c.host(0)).contains(line) {
                return Ok(());
            }
            spoof(c, src).await;
            Err(log_tail(c))
        },
    )
    .await;
}

/// The size, as the kernel runs it, of the decapsulation program attached on `host`.
async fn decap_bytes_xlated(host: &Host) -> u64 {
    let st = status(host).await;
    let id = st["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["program"].as_str().is_some_and(|n| n.contains("decap")))
        .and_then(|p| p["prog_id"].as_u64())
        .unwrap_or_else(|| {
            panic!(
                "{}: no decap program id in weft status:\n{st:#}",
                host.name()
            )
        });
    let out = netns::run("bpftool", &["-j", "prog", "show", "id", &id.to_string()])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let info: serde_json::Value = serde_json::from_str(&out).expect("bpftool -j output");
    info["bytes_xlated"]
        .as_u64()
        .unwrap_or_else(|| panic!("bytes_xlated in {out}"))
}

async fn logged_with_the_flag(c: &Cluster) {
    spoof_until_logged(c, forged(c, 200), "with --ebpf-log").await;

    let agent = c.host(0).agent().expect("host 1's agent");
    agent.restart().await.expect("restart host 1's agent");
    attack::wait_ebpf_ready(c.host(0), 1).await;
    spoof_until_logged(c, forged(c, 201), "after a restart adopting the pins").await;
}

async fn silent_without_it(c: &Cluster) {
    let dropped = || async move { counter(&status(c.host(0)).await, DROPPED) };
    let before = dropped().await;
    spoof(c, forged(c, 200)).await;
    poll::until(
        &format!("without --ebpf-log, the spoofed frame dropped and counted ({DROPPED:?})"),
        LOG_WAIT,
        || async move {
            let now = dropped().await;
            poll::check(now > before, now)
        },
    )
    .await;
    // Absence has no event to wait for: watch the log for as long as a logged drop takes at most.
    let outcome = poll::try_until("a logged drop without --ebpf-log", QUIET, || async move {
        let log = agent_log(c.host(0));
        match log.lines().find(|l| l.contains("decap drop")) {
            Some(line) => Ok(line.to_owned()),
            None => Err("none".to_owned()),
        }
    })
    .await;
    if let Ok(line) = outcome {
        panic!("without --ebpf-log the programs must not log; host 1 logged {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn ebpf_log_names_a_spoofed_vxlan_drop_only_when_asked() {
    let (on, off) = tokio::join!(cluster(&["--ebpf-log"]), cluster(&[]));
    // Off, the verifier prunes the log calls (their level is a read-only constant): the
    // programs the kernel runs are smaller, and a drop costs nothing more than it did before.
    let (with_log, without) = tokio::join!(
        decap_bytes_xlated(on.host(0)),
        decap_bytes_xlated(off.host(0))
    );
    assert!(
        without < with_log,
        "without --ebpf-log the decap program must run without its log code: \
         {without} bytes against {with_log} with it"
    );
    tokio::join!(logged_with_the_flag(&on), silent_without_it(&off));
}
