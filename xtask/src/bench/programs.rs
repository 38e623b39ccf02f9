//! `--programs`: what one packet costs inside weft's eBPF programs, two ways.
//!
//! - live: with `kernel.bpf_stats_enabled` on, the kernel adds each program run's time to the
//!   program's `run_time_ns` and counts it in `run_cnt`; the difference over the ebpf mode's 64-byte
//!   UDP test, divided, is the average cost per packet under load (it includes the two clock reads
//!   the accounting itself adds, some tens of ns). The sysctl is restored when the run ends.
//! - test run: BPF_PROG_TEST_RUN (`bpftool prog run ... repeat N`) of the loaded programs, with
//!   their live maps, on a fixed packet each: a container's 64-byte UDP datagram for encapsulation,
//!   the VXLAN frame host 2 would send for it back for decapsulation. The kernel times the N runs
//!   and reports the average; the action and the length of the packet the program left show it
//!   really encapsulated (+50 bytes) or decapsulated (-50 bytes).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{bail, Context as _};
use serde::Serialize;
use weft_tests::packet::{eth, ipv4_header, udp, verdict, vxlan_header, ETH_P_IP, UDP, VXLAN_PORT};
use weft_tests::{Container, Host};

use crate::bench::counters::status_json;
use crate::bench::measure::UDP_PAYLOAD_BYTES;

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Runs per BPF_PROG_TEST_RUN call: long enough that the kernel's timer resolution does not matter.
pub const TEST_RUN_REPEAT: u32 = 1_000_000;
/// VXLAN's overhead: outer Ethernet, IPv4, UDP and VXLAN headers.
const VXLAN_OVERHEAD: usize = 14 + 20 + 8 + 8;

#[derive(Debug, Default, Serialize)]
pub struct Programs {
    /// Per program and host, summed over the ebpf mode's UDP tests.
    pub live: Vec<LiveCost>,
    pub test_run: Vec<TestRunCost>,
}

/// A program's run-time statistics over some UDP tests.
#[derive(Debug, Clone, Serialize)]
pub struct LiveCost {
    pub host: String,
    pub program: String,
    pub prog_id: u64,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub ns_per_packet: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestRunCost {
    pub program: String,
    pub packet: String,
    pub packet_bytes: usize,
    pub repeat: u32,
    /// The kernel's average over `repeat` runs.
    pub ns_per_run: f64,
    pub action: u32,
    pub bytes_out: usize,
    /// The action and the length change the packet must produce.
    pub expected_action: u32,
    pub expected_bytes_out: usize,
    pub as_expected: bool,
}

/// `kernel.bpf_stats_enabled` on for the life of the guard, then back to what it was.
pub struct StatsEnabled {
    before: String,
}

impl StatsEnabled {
    pub fn enable() -> anyhow::Result<StatsEnabled> {
        let before = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("read {BPF_STATS}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("enable {BPF_STATS}"))?;
        Ok(StatsEnabled { before })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.before) {
            eprintln!("restore {BPF_STATS} to {}: {e}", self.before);
        }
    }
}

/// weft's programs attached in `host`: prog id -> program name.
pub async fn weft_programs(host: &Host) -> anyhow::Result<BTreeMap<u64, String>> {
    let status = status_json(host).await?;
    let programs = status["programs"]
        .as_array()
        .context("`weft status --json` lists no programs")?;
    Ok(programs
        .iter()
        .filter_map(|p| Some((p["prog_id"].as_u64()?, p["program"].as_str()?.to_owned())))
        .collect())
}

/// `run_cnt` and `run_time_ns` of every program, by id (`bpftool -j prog show`).
pub async fn run_stats() -> anyhow::Result<BTreeMap<u64, (u64, u64)>> {
    let text = weft_tests::netns::run("bpftool", &["-j", "prog", "show"]).await?;
    parse_prog_show(&text)
}

pub fn parse_prog_show(json: &str) -> anyhow::Result<BTreeMap<u64, (u64, u64)>> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("parse `bpftool -j prog show`")?;
    Ok(v.as_array()
        .context("`bpftool -j prog show` is not a list")?
        .iter()
        .filter_map(|p| {
            let id = p["id"].as_u64()?;
            let n = p["run_cnt"].as_u64().unwrap_or(0);
            let ns = p["run_time_ns"].as_u64().unwrap_or(0);
            Some((id, (n, ns)))
        })
        .collect())
}

/// The change of the programs' statistics between two snapshots, added into `into`.
pub fn accumulate(
    into: &mut Vec<LiveCost>,
    host: &str,
    programs: &BTreeMap<u64, String>,
    before: &BTreeMap<u64, (u64, u64)>,
    after: &BTreeMap<u64, (u64, u64)>,
) {
    for (id, name) in programs {
        let (Some(b), Some(a)) = (before.get(id), after.get(id)) else {
            continue;
        };
        let (n, ns) = (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1));
        let entry = match into.iter_mut().find(|c| c.host == host && c.prog_id == *id) {
            Some(e) => e,
            None => {
                into.push(LiveCost {
                    host: host.to_owned(),
                    program: name.clone(),
                    prog_id: *id,
                    run_cnt: 0,
                    run_time_ns: 0,
                    ns_per_packet: f64::NAN,
                });
                into.last_mut().expect("just pushed")
            }
        };
        entry.run_cnt += n;
        entry.run_time_ns += ns;
        entry.ns_per_packet = if entry.run_cnt > 0 {
            entry.run_time_ns as f64 / entry.run_cnt as f64
        } else {
            f64::NAN
        };
    }
}

/// What the test runs need to know about the test bed, read from it.
pub struct Endpoints<'a> {
    pub sender: &'a Host,
    pub receiver: &'a Host,
    pub client: &'a Container,
    pub server: &'a Container,
}

/// BPF_PROG_TEST_RUN of host 1's encapsulation and decapsulation programs on fixed packets.
pub async fn test_runs(e: &Endpoints<'_>) -> anyhow::Result<Vec<TestRunCost>> {
    let ours = status_json(e.sender).await?;
    let theirs = status_json(e.receiver).await?;
    let node = &ours["node"];
    let mac = |v: &serde_json::Value, what: &str| -> anyhow::Result<[u8; 6]> {
        parse_mac(v.as_str().unwrap_or_default()).with_context(|| format!("{what}: {v}"))
    };
    let our_vtep_mac = mac(&node["vtep_mac"], "host 1's VTEP MAC")?;
    let our_underlay_mac = mac(&node["underlay_mac"], "host 1's underlay MAC")?;
    let their_underlay_mac = mac(&theirs["node"]["underlay_mac"], "host 2's underlay MAC")?;
    let their_vtep_mac = mac(&theirs["node"]["vtep_mac"], "host 2's VTEP MAC")?;
    let docker0 = link_mac(e.sender.name(), "docker0").await?;
    let client_mac = link_mac(e.client.netns(), "eth0").await?;
    let port = ifindex(e.sender.name(), e.client.host_veth()).await?;
    let ens32 = ifindex(e.sender.name(), "ens32").await?;

    let body = vec![0x5a; UDP_PAYLOAD_BYTES];
    let inner_ip = |src: Ipv4Addr, dst: Ipv4Addr, ttl: u8| {
        let datagram = udp(40_000, 5201, &body);
        let mut f = ipv4_header(src, dst, UDP, ttl, datagram.len(), 0x4000);
        f.extend(datagram);
        f
    };
    let mut encap_in = eth(docker0, client_mac, ETH_P_IP);
    encap_in.extend(inner_ip(e.client.ip(), e.server.ip(), 64));

    let mut inner = eth(our_vtep_mac, their_vtep_mac, ETH_P_IP);
    inner.extend(inner_ip(e.server.ip(), e.client.ip(), 63));
    let mut vxlan = vxlan_header(0x08, 1).to_vec();
    vxlan.extend(&inner);
    let outer_udp = udp(40_001, VXLAN_PORT, &vxlan);
    let mut decap_in = eth(our_underlay_mac, their_underlay_mac, ETH_P_IP);
    decap_in.extend(ipv4_header(
        e.receiver.ens32_ip(),
        e.sender.ens32_ip(),
        UDP,
        64,
        outer_udp.len(),
        0,
    ));
    decap_in.extend(outer_udp);

    let programs = weft_programs(e.sender).await?;
    let id_of = |name: &str| {
        programs
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
    };
    let mut out = Vec::new();
    let cases = [
        (
            "weft_tc_encap",
            "container UDP, 64-byte payload, to the remote container (bridge port ingress)",
            &encap_in,
            Some(port),
            verdict::TC_ACT_REDIRECT,
            encap_in.len() + VXLAN_OVERHEAD,
        ),
        (
            "weft_tc_decap",
            "VXLAN from host 2 for the local container (ens32 ingress)",
            &decap_in,
            Some(ens32),
            verdict::TC_ACT_REDIRECT,
            decap_in.len() - VXLAN_OVERHEAD,
        ),
        (
            "weft_xdp_decap",
            "VXLAN from host 2 for the local container (ens32 XDP)",
            &decap_in,
            None,
            verdict::XDP_PASS,
            decap_in.len() - VXLAN_OVERHEAD,
        ),
    ];
    for (name, what, packet, ifindex, action, bytes_out) in cases {
        let Some(id) = id_of(name) else {
            continue;
        };
        let (ns, got_action, got_bytes) = prog_run(e.sender.name(), id, packet, ifindex).await?;
        out.push(TestRunCost {
            program: name.to_owned(),
            packet: what.to_owned(),
            packet_bytes: packet.len(),
            repeat: TEST_RUN_REPEAT,
            ns_per_run: ns,
            action: got_action,
            bytes_out: got_bytes,
            expected_action: action,
            expected_bytes_out: bytes_out,
            as_expected: got_action == action && got_bytes == bytes_out,
        });
    }
    if out.is_empty() {
        bail!(
            "no weft program attached in {} (programs: {programs:?})",
            e.sender.name()
        );
    }
    Ok(out)
}

/// `bpftool -j prog run id ID ... repeat N` in namespace `ns`: the average ns, the action and the
/// length of the packet the program left.
async fn prog_run(
    ns: &str,
    id: u64,
    packet: &[u8],
    ifindex: Option<u32>,
) -> anyhow::Result<(f64, u32, usize)> {
    let dir = std::env::temp_dir().join(format!("weft-bench-prog-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let (data_in, data_out, ctx) = (dir.join("in"), dir.join("out"), dir.join("ctx"));
    std::fs::write(&data_in, packet)?;
    let id_s = id.to_string();
    let repeat = TEST_RUN_REPEAT.to_string();
    let (din, dout, dctx) = (
        data_in.display().to_string(),
        data_out.display().to_string(),
        ctx.display().to_string(),
    );
    let mut argv = vec![
        "netns",
        "exec",
        ns,
        "bpftool",
        "-j",
        "prog",
        "run",
        "id",
        &id_s,
        "data_in",
        &din,
        "data_out",
        &dout,
        "data_size_out",
        "2048",
    ];
    if let Some(ifindex) = ifindex {
        std::fs::write(&ctx, skb_context(ifindex))?;
        argv.extend(["ctx_in", &dctx]);
    }
    argv.extend(["repeat", &repeat]);
    let result = weft_tests::netns::run("ip", &argv).await;
    let bytes_out = std::fs::metadata(&data_out).map_or(0, |m| m.len() as usize);
    let _ = std::fs::remove_dir_all(&dir);
    let text = result.with_context(|| format!("bpftool prog run id {id} in {ns}"))?;
    let (ns_per_run, action) = parse_prog_run(&text)?;
    Ok((ns_per_run, action, bytes_out))
}

/// `struct __sk_buff` for BPF_PROG_TEST_RUN: ingress_ifindex (offset 36) and ifindex (40) set,
/// the rest zero as the kernel requires.
fn skb_context(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// `{"retval": 7, "duration": 35}` (ns, the average over the repeats).
pub fn parse_prog_run(json: &str) -> anyhow::Result<(f64, u32)> {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .with_context(|| format!("parse `bpftool -j prog run` output {json:?}"))?;
    let duration = v["duration"]
        .as_f64()
        .with_context(|| format!("no duration in {v}"))?;
    let retval = v["retval"]
        .as_u64()
        .with_context(|| format!("no retval in {v}"))?;
    Ok((duration, retval as u32))
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("not a MAC address: {s:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("not a MAC address: {s:?}"))
}

async fn link_mac(ns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let text = weft_tests::netns::run("ip", &["-n", ns, "-j", "link", "show", "dev", dev]).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    parse_mac(v[0]["address"].as_str().unwrap_or_default())
        .with_context(|| format!("{dev} in {ns}"))
}

async fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let text = weft_tests::netns::run("ip", &["-n", ns, "-j", "link", "show", "dev", dev]).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v[0]["ifindex"]
        .as_u64()
        .map(|i| i as u32)
        .with_context(|| format!("no ifindex for {dev} in {ns}: {text}"))
}

/// The terminal's summary.
pub fn summary(p: &Programs) -> String {
    let mut out = String::from("\neBPF programs, per packet\n");
    for c in &p.live {
        out.push_str(&format!(
            "  live (bpf_stats, UDP tests)  {:<16} {:<8} {:>7.0} ns  ({} runs)\n",
            c.program, c.host, c.ns_per_packet, c.run_cnt
        ));
    }
    for t in &p.test_run {
        out.push_str(&format!(
            "  BPF_PROG_TEST_RUN x{}  {:<16} {:>7.0} ns  action {} ({}), {} -> {} bytes{}  [{}]\n",
            t.repeat,
            t.program,
            t.ns_per_run,
            t.action,
            t.expected_action,
            t.packet_bytes,
            t.bytes_out,
            if t.as_expected {
                ""
            } else {
                "  NOT AS EXPECTED"
            },
            t.packet
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bpftool_prog_show_and_run() {
        let show = r#"[{"id":12,"type":"sched_cls","name":"weft_tc_encap","run_time_ns":5000,"run_cnt":100},
                      {"id":13,"type":"xdp","name":"weft_xdp_decap"}]"#;
        let s = parse_prog_show(show).unwrap();
        assert_eq!(s[&12], (100, 5000));
        assert_eq!(s[&13], (0, 0), "no stats yet: zero");
        assert_eq!(
            parse_prog_run(r#"{"retval":7,"duration":41}"#).unwrap(),
            (41.0, 7)
        );
        assert!(parse_prog_run("{}").is_err());
    }

    #[test]
    fn live_costs_add_up_over_tests() {
        let programs: BTreeMap<u64, String> = [(12, "weft_tc_encap".to_owned())].into();
        let mut live = Vec::new();
        let snap = |n: u64, ns: u64| BTreeMap::from([(12u64, (n, ns))]);
        accumulate(
            &mut live,
            "host1",
            &programs,
            &snap(10, 1000),
            &snap(110, 6000),
        );
        accumulate(
            &mut live,
            "host1",
            &programs,
            &snap(110, 6000),
            &snap(410, 27000),
        );
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].run_cnt, live[0].run_time_ns), (400, 26000));
        assert_eq!(live[0].ns_per_packet, 65.0);
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("0a:58:00:00:01:ff").unwrap(),
            [0x0a, 0x58, 0, 0, 1, 0xff]
        );
        assert!(parse_mac("0a:58").is_err());
    }
}
