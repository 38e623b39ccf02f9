//! `--programs`: what one packet costs inside weft's eBPF programs, two ways.
//!
//! - live: a timing run of its own, after each round's measurements of a bed whose programs are
//!   timed (ebpf, and ebpf-base with it in `--modes`): one more 64-byte UDP test, whose packet
//!   rate is no metric, with run-time statistics on ([`StatsEnabled`](crate::bench::bpf::StatsEnabled))
//!   for it alone. The kernel adds each program run's time to the program's `run_time_ns` and
//!   counts it in `run_cnt`; the differences over the timing runs, divided, are the average cost
//!   per packet under load. They include what the measuring and the dispatch cost:
//!   `__bpf_prog_run` reads `sched_clock()` before and after each run, and the hook calls the
//!   program through its chain. The live floor ([`LiveFloor`](crate::bench::bpf::LiveFloor)) says
//!   how much that is: an empty program (`r0 = TCX_NEXT; exit`) attached first on the TCX egress
//!   of host 1's ens32 during the ebpf bed's timing runs, where every VXLAN packet that
//!   encapsulation redirected passes. Its `run_time_ns / run_cnt` is what a program that does
//!   nothing costs under the same load: the part of every live figure that is no program's work
//!   (it is never judged against the target). Neither the statistics nor the floor run during the
//!   tests the metrics come from, so timing the programs slows no mode's figures. Where the floor
//!   cannot be loaded or attached (no TCX before kernel 6.6), the bench warns once and reports it
//!   as not measured.
//! - test run: BPF_PROG_TEST_RUN (`bpftool prog run`, [`TEST_RUNS`] calls of one run each) of the
//!   loaded programs, with their live maps, on a fixed packet each: a container's 64-byte UDP
//!   datagram (with its checksum, as a socket sends it) for encapsulation, the VXLAN frame host 2
//!   would send back for decapsulation. The kernel times each run; the median goes into the
//!   report. The datapath counters that moved and the length of the packet the program left show
//!   it really encapsulated (+50 bytes) or decapsulated (-50 bytes). A third packet, an ARP frame
//!   that decapsulation hands straight back, gives the floor every test-run figure stands on: the
//!   kernel's timing of one call plus the program's entry, its configuration read and its
//!   counter. They run after the rounds, with run-time statistics off (unless the machine has
//!   `kernel.bpf_stats_enabled` on): with them on, each run also pays their clock reads (about
//!   45 ns for the ARP frame on this VM without, 93 with).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context as _};
use aya::programs::{loaded_programs, SchedClassifier, TestRun as _, TestRunOptions};
use serde::Serialize;
use weft_tests::packet::{
    eth, ipv4_checksum, ipv4_header, udp, verdict, vxlan_header, ETH_P_IP, UDP, VXLAN_PORT,
};
use weft_tests::{Container, Host, Netns};

use weft_common::counter;

use crate::bench::bpf::FLOOR_NAME;
use crate::bench::counters::{self, status_json, status_json_of};
use crate::bench::measure::UDP_PAYLOAD_BYTES;
use crate::bench::report::Grid;

/// BPF_PROG_TEST_RUN calls per program. Each runs the program once (`repeat 1`): with a larger
/// repeat the kernel runs it again on the same skb, which the first run already encapsulated or
/// decapsulated, so every later run would time a different packet (decapsulation then sees plain
/// IPv4 and passes it). The kernel's per-call figure includes its two clock reads.
pub const TEST_RUNS: u32 = 20_000;
/// ARP's EtherType: a frame none of the programs is for.
const ETH_P_ARP: u16 = 0x0806;
/// VXLAN's overhead: outer Ethernet, IPv4, UDP and VXLAN headers.
const VXLAN_OVERHEAD: usize = 14 + 20 + 8 + 8;

/// Issue 16: encapsulation and decapsulation each below this per packet on this machine.
pub const TARGET_NS: f64 = 150.0;

#[derive(Debug, Default, Serialize)]
pub struct Programs {
    /// The issue's per-packet target.
    pub target_ns: f64,
    /// Per program and host, summed over the timing runs (UDP); with the live floor
    /// (`floor: true`) when it was attached.
    pub live: Vec<LiveCost>,
    /// Why the live floor was not measured (it could not be loaded or attached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_floor_missing: Option<String>,
    pub test_run: Vec<TestRunCost>,
}

/// A program's run-time statistics over the timing runs.
#[derive(Debug, Clone, Serialize)]
pub struct LiveCost {
    pub host: String,
    pub program: String,
    pub prog_id: u64,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub ns_per_packet: f64,
    /// The floor every live figure stands on ([`LiveFloor`](crate::bench::bpf::LiveFloor)), not a program's cost. Older
    /// report.json files have no such field: their live rows are all programs.
    pub floor: bool,
    /// A program of the ebpf-base build, timed in the same rounds: no target, the figure to
    /// compare with.
    pub baseline: bool,
}

impl LiveCost {
    /// What a row without a target is, and why it has none: the floor and the baseline's
    /// programs are no figure to judge.
    fn untargeted(&self) -> Option<(&'static str, &'static str)> {
        if self.floor {
            Some((
                "the floor: an empty program on ens32's egress, same packets",
                "what every live figure includes",
            ))
        } else if self.baseline {
            Some(("ebpf-base, same rounds", "the baseline build"))
        } else {
            None
        }
    }
}

/// Runs below which a live program's figure is no figure: it saw a handful of packets (the
/// other direction's ARP, replies), not the test's.
const MIN_RUNS: u64 = 1000;

/// One host's programs whose run-time statistics a bed's timing runs add up.
pub struct Watched {
    pub host: String,
    /// The ebpf-base bed's ([`LiveCost::baseline`]).
    pub baseline: bool,
    /// prog id -> program name.
    pub programs: BTreeMap<u64, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestRunCost {
    pub program: String,
    pub packet: String,
    pub packet_bytes: usize,
    /// BPF_PROG_TEST_RUN calls, one run each.
    pub runs: u32,
    /// The median of the kernel's timings.
    pub ns_per_run: f64,
    pub ns_mean: f64,
    pub action: u32,
    pub bytes_out: usize,
    /// The action of the fastest path (a redirect); a pass back to the stack after the work
    /// (`counters_per_run` says why) is still a measured run of the program.
    pub expected_action: u32,
    pub expected_bytes_out: usize,
    /// The datapath counters that moved, per run (`encapsulated: 1`, `delivered to container: 1`,
    /// a `passed: ...` counter when the program handed the packet back): which path it took.
    pub counters_per_run: BTreeMap<String, f64>,
    /// The packet grew (encapsulation) or shrank (decapsulation) by the VXLAN headers and the
    /// program counted it as such.
    pub as_expected: bool,
    /// The floor the other figures stand on (a frame handed straight back), not a program's cost.
    pub floor: bool,
}

/// weft's programs attached in `host`, as build `weft` lists them: prog id -> program name.
pub async fn weft_programs(host: &Host, weft: &Path) -> anyhow::Result<BTreeMap<u64, String>> {
    let status = status_json_of(host, weft).await?;
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
    watched: &Watched,
    before: &BTreeMap<u64, (u64, u64)>,
    after: &BTreeMap<u64, (u64, u64)>,
) {
    let host = watched.host.as_str();
    for (id, name) in &watched.programs {
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
                    floor: name == FLOOR_NAME,
                    baseline: watched.baseline,
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
        let datagram = udp_with_checksum(src, dst, 40_000, 5201, &body);
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
    let mut not_ours = eth([0xff; 6], their_underlay_mac, ETH_P_ARP);
    not_ours.extend([0; 28]);

    let programs = weft_programs(e.sender, &weft_tests::weft_bin()?).await?;
    let id_of = |name: &str| {
        programs
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
    };
    let mut out = Vec::new();
    let cases = [
        (
            weft_common::program_names::TC_ENCAP,
            "container UDP, 64-byte payload, to the remote container (bridge port ingress)",
            &encap_in,
            Some(port),
            verdict::TC_ACT_REDIRECT,
            encap_in.len() + VXLAN_OVERHEAD,
            counters::ENCAPSULATED,
        ),
        (
            weft_common::program_names::TC_DECAP,
            "VXLAN from host 2 for the local container (ens32 ingress)",
            &decap_in,
            Some(ens32),
            verdict::TC_ACT_REDIRECT,
            decap_in.len() - VXLAN_OVERHEAD,
            counters::DECAPSULATED,
        ),
        (
            weft_common::program_names::TC_DECAP,
            "ARP, handed back to the kernel untouched (ens32 ingress): the floor of these figures",
            &not_ours,
            Some(ens32),
            verdict::TC_ACT_OK,
            not_ours.len(),
            counter::name(counter::PASS_NOT_IPV4).unwrap_or_default(),
        ),
    ];
    // The agent attaches decapsulation at TC (XDP only where asked); the TC programs are timed.
    for (name, what, packet, ifindex, action, bytes_out, counted) in cases {
        let Some(id) = id_of(name) else {
            continue;
        };
        let before = counters::flatten(&status_json(e.sender).await?);
        let run = prog_run(e.sender.netns(), id, packet, ifindex).await?;
        let after = counters::flatten(&status_json(e.sender).await?);
        let counters_per_run: BTreeMap<String, f64> = counters::delta(&before, &after)
            .into_iter()
            .filter(|(k, v)| k.starts_with("counters.") && *v > 0.0)
            .map(|(k, v)| {
                let name = k.trim_start_matches("counters.").to_owned();
                (name, v / f64::from(TEST_RUNS))
            })
            .collect();
        let did_it = counters_per_run.get(counted).is_some_and(|n| *n >= 0.99);
        let got_action = run.action;
        out.push(TestRunCost {
            program: name.to_owned(),
            packet: what.to_owned(),
            packet_bytes: packet.len(),
            runs: TEST_RUNS,
            ns_per_run: run.median_ns,
            ns_mean: run.mean_ns,
            action: got_action,
            bytes_out: run.bytes_out,
            expected_action: action,
            expected_bytes_out: bytes_out,
            as_expected: did_it && run.bytes_out == bytes_out,
            counters_per_run,
            floor: action == verdict::TC_ACT_OK,
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

struct ProgRun {
    median_ns: f64,
    mean_ns: f64,
    /// The last run's action.
    action: u32,
    bytes_out: usize,
}

/// [`TEST_RUNS`] BPF_PROG_TEST_RUN calls of TC program `id` on `packet`, one run each, from a thread
/// inside namespace `ns` (FIB lookups and the skb's device are that namespace's). In one process
/// and back to back, the program and its maps stay in the caches as under traffic.
async fn prog_run(
    ns: &Netns,
    id: u64,
    packet: &[u8],
    ifindex: Option<u32>,
) -> anyhow::Result<ProgRun> {
    let packet = packet.to_vec();
    let handle = ns.spawn_thread(move || {
        let info = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| u64::from(p.id()) == id)
            .with_context(|| format!("no loaded program with id {id}"))?;
        let name: std::borrow::Cow<'static, str> = format!("prog-{id}").into();
        let program = SchedClassifier::from_program_info(info, name)?;
        let ctx = ifindex.map(skb_context);
        let mut out = vec![0u8; packet.len() + 256];
        let mut ns_each = Vec::with_capacity(TEST_RUNS as usize);
        let (mut action, mut bytes_out) = (0, 0);
        for _ in 0..TEST_RUNS {
            let opts = TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut out),
                ctx_in: ctx.as_ref().map(|c| c.as_slice()),
                repeat: 1,
                ..Default::default()
            };
            let r = program
                .test_run(opts)
                .with_context(|| format!("BPF_PROG_TEST_RUN of program {id}"))?;
            ns_each.push(r.duration.as_nanos() as f64);
            (action, bytes_out) = (r.return_value, r.data_size_out as usize);
        }
        Ok(ProgRun {
            median_ns: crate::bench::stats::median(&ns_each),
            mean_ns: ns_each.iter().sum::<f64>() / ns_each.len().max(1) as f64,
            action,
            bytes_out,
        })
    });
    tokio::task::spawn_blocking(move || handle.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the test-run thread panicked"))?
}

/// A UDP header and `body` with the checksum a socket would send (RFC 768: over the pseudo
/// header, the header and the data).
fn udp_with_checksum(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, body: &[u8]) -> Vec<u8> {
    let mut datagram = udp(sport, dport, body);
    let mut sum = Vec::with_capacity(12 + datagram.len());
    sum.extend(src.octets());
    sum.extend(dst.octets());
    sum.extend([0, UDP]);
    sum.extend((datagram.len() as u16).to_be_bytes());
    sum.extend(&datagram);
    let c = match ipv4_checksum(&sum) {
        0 => 0xffff,
        c => c,
    };
    datagram[6..8].copy_from_slice(&c.to_be_bytes());
    datagram
}

/// `struct __sk_buff` for BPF_PROG_TEST_RUN: ingress_ifindex (offset 36) and ifindex (40) set,
/// the rest zero as the kernel requires.
fn skb_context(ifindex: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
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

pub(crate) async fn link_mac(ns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
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

/// The per-packet costs as a table (report.md): the programs that ran for the timing runs'
/// packets, and the test runs.
pub fn grid(p: &Programs) -> Grid {
    let header = ["program", "host", "how", "ns per packet", "runs", "target"]
        .map(str::to_owned)
        .to_vec();
    let verdict = |ns: f64| {
        if ns < p.target_ns {
            format!("< {:.0} ns: met", p.target_ns)
        } else {
            format!("< {:.0} ns: **not met**", p.target_ns)
        }
    };
    let how = "bpf_stats, a 64-byte UDP timing run of its own each round";
    // The floor shows even when it barely ran: then it did not see the test's packets.
    let mut rows: Vec<Vec<String>> = live_rows(p)
        .filter(|c| c.floor || c.run_cnt >= MIN_RUNS)
        .map(|c| {
            let (how, target) = match c.untargeted() {
                Some((what, why)) => (format!("{how} ({what})"), format!("none ({why})")),
                None => (how.to_owned(), verdict(c.ns_per_packet)),
            };
            vec![
                c.program.clone(),
                c.host.clone(),
                how,
                format!("{:.0}", c.ns_per_packet),
                c.run_cnt.to_string(),
                target,
            ]
        })
        .collect();
    if let Some(why) = &p.live_floor_missing {
        rows.push(vec![
            FLOOR_NAME.to_owned(),
            "host1".to_owned(),
            format!("{how} (the floor): not measured, {why}"),
            "-".to_owned(),
            "0".to_owned(),
            "none (what every live figure includes)".to_owned(),
        ]);
    }
    rows.extend(p.test_run.iter().map(|t| {
        let (how, target) = match (t.floor, t.as_expected) {
            (true, _) => (
                "the floor: an ARP frame handed back",
                "none (what every test-run figure includes)".to_owned(),
            ),
            (false, true) => ("fast path every run", verdict(t.ns_per_run)),
            (false, false) => ("NOT the fast path", verdict(t.ns_per_run)),
        };
        vec![
            t.program.clone(),
            "host1".to_owned(),
            format!("BPF_PROG_TEST_RUN, median ({how})"),
            format!("{:.0}", t.ns_per_run),
            t.runs.to_string(),
            target,
        ]
    }));
    Grid { header, rows }
}

/// The live costs, the floor after the programs it underlies.
fn live_rows(p: &Programs) -> impl Iterator<Item = &LiveCost> {
    let mut rows: Vec<&LiveCost> = p.live.iter().collect();
    // Each program next to its baseline, the floor last.
    rows.sort_by(|a, b| {
        (a.floor, &a.host, &a.program, a.baseline).cmp(&(b.floor, &b.host, &b.program, b.baseline))
    });
    rows.into_iter()
}

/// The terminal's summary.
pub fn summary(p: &Programs) -> String {
    let verdict = |ns: f64| {
        if ns < p.target_ns {
            "met"
        } else {
            "NOT met"
        }
    };
    let mut out = format!(
        "\neBPF programs, per packet (target < {:.0} ns)\n",
        p.target_ns
    );
    for c in live_rows(p) {
        out.push_str(&format!(
            "  live (bpf_stats, timing runs) {:<16} {:<8} {:>7.0} ns  ({} runs){}\n",
            c.program,
            c.host,
            c.ns_per_packet,
            c.run_cnt,
            match c.untargeted() {
                Some((what, _)) => format!("  {what}; no target"),
                None if c.run_cnt >= MIN_RUNS => format!("  {}", verdict(c.ns_per_packet)),
                None => String::new(),
            }
        ));
    }
    if let Some(why) = &p.live_floor_missing {
        out.push_str(&format!(
            "  live (bpf_stats, timing runs) {FLOOR_NAME:<16} host1    the floor not measured: {why}\n"
        ));
    }
    for t in &p.test_run {
        out.push_str(&format!(
            "  BPF_PROG_TEST_RUN        {:<16} {:>7.0} ns median  {}; {:.0} mean of {} runs; {} -> {} bytes, counted per run {:?}{}  [{}]\n",
            t.program,
            t.ns_per_run,
            if t.floor {
                "the floor, no target"
            } else {
                verdict(t.ns_per_run)
            },
            t.ns_mean,
            t.runs,
            t.packet_bytes,
            t.bytes_out,
            t.counters_per_run,
            if t.as_expected { "" } else { "  NOT AS EXPECTED" },
            t.packet
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched<const N: usize>(programs: [(u64, &str); N], baseline: bool) -> Watched {
        Watched {
            host: "host1".to_owned(),
            baseline,
            programs: programs.map(|(id, p)| (id, p.to_owned())).into(),
        }
    }

    #[test]
    fn reads_bpftool_prog_show() {
        let show = r#"[{"id":12,"type":"sched_cls","name":"weft_tc_encap","run_time_ns":5000,"run_cnt":100},
                      {"id":13,"type":"xdp","name":"weft_xdp_decap"}]"#;
        let s = parse_prog_show(show).unwrap();
        assert_eq!(s[&12], (100, 5000));
        assert_eq!(s[&13], (0, 0), "no stats yet: zero");
    }

    #[test]
    fn live_costs_add_up_over_tests() {
        let host1 = watched([(12, "weft_tc_encap")], false);
        let mut live = Vec::new();
        let snap = |n: u64, ns: u64| BTreeMap::from([(12u64, (n, ns))]);
        accumulate(&mut live, &host1, &snap(10, 1000), &snap(110, 6000));
        accumulate(&mut live, &host1, &snap(110, 6000), &snap(410, 27000));
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].run_cnt, live[0].run_time_ns), (400, 26000));
        assert_eq!(live[0].ns_per_packet, 65.0);
    }

    #[test]
    fn the_table_leaves_out_programs_that_barely_ran() {
        let cost = |host: &str, n: u64, ns: u64| LiveCost {
            host: host.to_owned(),
            program: "weft_tc_encap".to_owned(),
            prog_id: 1,
            run_cnt: n,
            run_time_ns: ns,
            ns_per_packet: ns as f64 / n as f64,
            floor: false,
            baseline: false,
        };
        let p = Programs {
            target_ns: TARGET_NS,
            live: vec![
                cost("host1", 100_000, 12_000_000),
                cost("host2", 30, 300_000),
            ],
            ..Default::default()
        };
        let md = grid(&p).markdown();
        assert_eq!(md.lines().count(), 3, "{md}");
        assert!(md.contains("| 120 |") && md.contains("met"), "{md}");
    }

    #[test]
    fn the_floor_row_is_no_program_cost_and_has_no_target() {
        let run = |floor: bool, ns: f64| TestRunCost {
            program: "weft_tc_decap".to_owned(),
            packet: "p".to_owned(),
            packet_bytes: 64,
            runs: TEST_RUNS,
            ns_per_run: ns,
            ns_mean: ns,
            action: 0,
            bytes_out: 64,
            expected_action: 0,
            expected_bytes_out: 64,
            counters_per_run: BTreeMap::new(),
            as_expected: true,
            floor,
        };
        let p = Programs {
            target_ns: TARGET_NS,
            test_run: vec![run(false, 180.0), run(true, 93.0)],
            ..Default::default()
        };
        let md = grid(&p).markdown();
        let rows: Vec<&str> = md.lines().skip(2).collect();
        assert!(
            rows[0].contains("fast path every run") && rows[0].contains("not met"),
            "{md}"
        );
        assert!(
            rows[1].contains("the floor") && !rows[1].contains("met"),
            "{md}"
        );
        let text = summary(&p);
        let floor_line = text.lines().last().unwrap();
        assert!(
            floor_line.contains("the floor, no target") && !floor_line.contains("met"),
            "{text}"
        );
    }

    #[test]
    fn the_live_floor_is_its_own_row_without_a_target() {
        let host1 = watched([(12, "weft_tc_encap"), (40, FLOOR_NAME)], false);
        let snap =
            |n: u64, floor_ns: u64| BTreeMap::from([(12u64, (n, n * 160)), (40, (n, floor_ns))]);
        let mut live = Vec::new();
        accumulate(&mut live, &host1, &snap(0, 0), &snap(100_000, 4_000_000));
        assert_eq!(
            live.iter()
                .map(|c| (c.program.as_str(), c.floor))
                .collect::<Vec<_>>(),
            [("weft_tc_encap", false), (FLOOR_NAME, true)]
        );
        let p = Programs {
            target_ns: TARGET_NS,
            // The floor first in the data: the table still lists it after the programs.
            live: live.into_iter().rev().collect(),
            ..Default::default()
        };
        let md = grid(&p).markdown();
        let rows: Vec<&str> = md.lines().skip(2).collect();
        assert_eq!(rows.len(), 2, "{md}");
        assert!(
            rows[0].contains("weft_tc_encap") && rows[0].contains("not met"),
            "{md}"
        );
        assert!(
            rows[1].contains(FLOOR_NAME)
                && rows[1].contains("| 40 |")
                && rows[1].contains("the floor: an empty program on ens32's egress")
                && !rows[1].contains("met"),
            "{md}"
        );
        let text = summary(&p);
        let floor_line = text.lines().find(|l| l.contains(FLOOR_NAME)).unwrap();
        assert!(
            floor_line.contains("no target") && !floor_line.contains("met"),
            "{text}"
        );
    }

    #[test]
    fn the_baseline_sits_under_its_program_without_a_target() {
        let snap = |id: u64, ns: u64| BTreeMap::from([(id, (10_000u64, 10_000 * ns))]);
        let zero = |id: u64| BTreeMap::from([(id, (0u64, 0u64))]);
        let mut live = Vec::new();
        let decap = watched([(13, "weft_tc_decap")], false);
        let base = watched([(22, "weft_tc_encap")], true);
        let ours = watched([(12, "weft_tc_encap")], false);
        accumulate(&mut live, &decap, &zero(13), &snap(13, 140));
        accumulate(&mut live, &base, &zero(22), &snap(22, 180));
        accumulate(&mut live, &ours, &zero(12), &snap(12, 160));
        let p = Programs {
            target_ns: TARGET_NS,
            live,
            ..Default::default()
        };
        let md = grid(&p).markdown();
        let rows: Vec<&str> = md.lines().skip(2).collect();
        assert_eq!(rows.len(), 3, "{md}");
        assert!(
            rows[0].contains("weft_tc_decap") && rows[0].contains(": met"),
            "{md}"
        );
        assert!(
            rows[1].contains("| 160 |") && rows[1].contains("not met"),
            "{md}"
        );
        assert!(
            rows[2].contains("| 180 |")
                && rows[2].contains("ebpf-base, same rounds")
                && rows[2].contains("none (the baseline build)")
                && !rows[2].contains("met"),
            "{md}"
        );
        let text = summary(&p);
        let base_line = text.lines().find(|l| l.contains(" 180 ns")).unwrap();
        assert!(
            base_line.contains("no target") && !base_line.contains("met"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_live_floor_says_why() {
        let p = Programs {
            target_ns: TARGET_NS,
            live_floor_missing: Some("BPF_LINK_CREATE: Invalid argument".to_owned()),
            ..Default::default()
        };
        let md = grid(&p).markdown();
        assert!(
            md.contains("not measured, BPF_LINK_CREATE: Invalid argument"),
            "{md}"
        );
        assert!(summary(&p).contains("the floor not measured: BPF_LINK_CREATE"));
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json["live_floor_missing"],
            "BPF_LINK_CREATE: Invalid argument"
        );
        let measured = serde_json::to_value(Programs::default()).unwrap();
        assert!(measured.get("live_floor_missing").is_none(), "{measured}");
    }

    #[test]
    fn udp_checksum_verifies() {
        let (src, dst) = (Ipv4Addr::new(10, 1, 1, 2), Ipv4Addr::new(10, 1, 2, 2));
        let d = udp_with_checksum(src, dst, 40_000, 5201, &[0x5a; 63]);
        // Summed with its checksum, a datagram and its pseudo header come to zero.
        let mut all = Vec::new();
        all.extend(src.octets());
        all.extend(dst.octets());
        all.extend([0, UDP]);
        all.extend((d.len() as u16).to_be_bytes());
        all.extend(&d);
        assert_eq!(ipv4_checksum(&all), 0);
        assert_ne!(&d[6..8], &[0, 0]);
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
