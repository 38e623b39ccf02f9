//! `--programs`: what one packet costs inside weft's eBPF programs, two ways.
//!
//! - live: with run-time statistics on ([`StatsEnabled`]), the kernel adds each program run's time
//!   to the program's `run_time_ns` and counts it in `run_cnt`; the difference over the ebpf mode's
//!   64-byte UDP test, divided, is the average cost per packet under load. It includes what the
//!   measuring and the dispatch cost: `__bpf_prog_run` reads `sched_clock()` before and after each
//!   run, and the hook calls the program through its chain. The live floor ([`LiveFloor`]) says
//!   how much that is: an empty program (`r0 = TCX_NEXT; exit`) attached first on the TCX egress
//!   of host 1's ens32 for the life of the ebpf test bed, where every VXLAN packet that
//!   encapsulation redirected passes. Its `run_time_ns / run_cnt` over the same UDP tests is what
//!   a program that does nothing costs under the same load: the part of every live figure that is
//!   no program's work (it is never judged against the target). The extra program itself adds
//!   about that floor to each packet of the ebpf mode's UDP test (and the other tests), only with
//!   `--programs`. Where it cannot be loaded or attached (no TCX before kernel 6.6), the bench
//!   warns once and reports the floor as not measured.
//! - test run: BPF_PROG_TEST_RUN (`bpftool prog run`, [`TEST_RUNS`] calls of one run each) of the
//!   loaded programs, with their live maps, on a fixed packet each: a container's 64-byte UDP
//!   datagram (with its checksum, as a socket sends it) for encapsulation, the VXLAN frame host 2
//!   would send back for decapsulation. The kernel times each run; the median goes into the
//!   report. The datapath counters that moved and the length of the packet the program left show
//!   it really encapsulated (+50 bytes) or decapsulated (-50 bytes). A third packet, an ARP frame
//!   that decapsulation hands straight back, gives the floor every test-run figure stands on: the
//!   kernel's timing of one call (on this VM an empty program alone measures about 83 ns) plus
//!   the program's entry, its configuration read and its counter.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{bail, Context as _};
use aya::programs::{loaded_programs, SchedClassifier, TestRun as _, TestRunOptions};
use serde::Serialize;
use weft_tests::packet::{
    eth, ipv4_checksum, ipv4_header, udp, verdict, vxlan_header, ETH_P_IP, UDP, VXLAN_PORT,
};
use weft_tests::{Container, Host, Netns};

use weft_common::counter;

use crate::bench::counters::{self, status_json};
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
    /// Per program and host, summed over the ebpf mode's UDP tests; with the live floor
    /// (`floor: true`) when it was attached.
    pub live: Vec<LiveCost>,
    /// Why the live floor was not measured (it could not be loaded or attached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_floor_missing: Option<String>,
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
    /// The floor every live figure stands on ([`LiveFloor`]), not a program's cost. Older
    /// report.json files have no such field: their live rows are all programs.
    pub floor: bool,
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

/// Run-time statistics on for the life of the guard: BPF_ENABLE_STATS (BPF_STATS_RUN_TIME) hands
/// out a file descriptor that keeps them on until it is closed, counted apart from
/// `kernel.bpf_stats_enabled`. Another user of the machine turning the sysctl off mid-run cannot stop
/// our counting, we never turn theirs off, and the kernel closes ours even if the bench dies.
pub struct StatsEnabled {
    _fd: OwnedFd,
}

impl StatsEnabled {
    pub fn enable() -> anyhow::Result<StatsEnabled> {
        const BPF_STATS_RUN_TIME: u32 = 0;
        // `union bpf_attr`'s enable_stats member: one u32, the stats type; the kernel zero-fills
        // the rest of the attribute.
        let mut attr = BPF_STATS_RUN_TIME;
        let fd = bpf_fd(bpf_cmd::ENABLE_STATS, &mut attr)
            .context("BPF_ENABLE_STATS (kernel 5.8 or later, as root)")?;
        Ok(StatsEnabled { _fd: fd })
    }
}

/// `bpf(2)` commands and constants, as linux/bpf.h numbers them.
mod bpf_cmd {
    pub const PROG_LOAD: libc::c_long = 5;
    pub const OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    pub const LINK_CREATE: libc::c_long = 28;
    pub const ENABLE_STATS: libc::c_long = 32;
    /// `enum bpf_prog_type`.
    pub const PROG_TYPE_SCHED_CLS: u32 = 3;
    /// `enum bpf_attach_type`.
    pub const TCX_EGRESS: u32 = 47;
    /// Link flag: before the relative program, or with none given at the head of the chain.
    pub const F_BEFORE: u32 = 1 << 3;
    /// `enum tcx_action_base`: hand the packet to the next program (or on, with none left).
    pub const TCX_NEXT: i32 = -1;
}

/// `bpf(cmd, attr, size_of(attr))`; the kernel reads `attr` and may write results into it (zero
/// beyond our struct, which it accepts from older callers).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: a valid pointer to a plain repr(C) attribute and its exact size; the pointers inside
    // it (instructions, license, buffers) outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// A `bpf(2)` command that returns a new file descriptor.
fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The live floor's program name, as `bpftool prog show` lists it (at most 15 bytes).
pub const FLOOR_NAME: &str = "weft_floor";

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}
const _: () = assert!(std::mem::size_of::<ProgLoadAttr>() == 72);

/// `union bpf_attr` for BPF_LINK_CREATE with its `tcx` member.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}
const _: () = assert!(std::mem::size_of::<LinkCreateAttr>() == 32);

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}
const _: () = assert!(std::mem::size_of::<InfoAttr>() == 16);

/// One `struct bpf_insn`: opcode, destination register in the low nibble and source in the high
/// one (the C bitfields' order on little-endian machines, reversed on big-endian), offset,
/// immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let regs = if cfg!(target_endian = "little") {
        dst | src << 4
    } else {
        dst << 4 | src
    };
    let [o0, o1] = off.to_ne_bytes();
    let [i0, i1, i2, i3] = imm.to_ne_bytes();
    [code, regs, o0, o1, i0, i1, i2, i3]
}

/// The empty program: `r0 = TCX_NEXT; exit`. BPF_ALU64 | BPF_MOV | BPF_K sign-extends the
/// immediate into r0; BPF_JMP | BPF_EXIT returns it.
fn floor_program() -> [[u8; 8]; 2] {
    const MOV64_IMM: u8 = 0x07 | 0xb0;
    const EXIT: u8 = 0x05 | 0x90;
    [
        insn(MOV64_IMM, 0, 0, 0, bpf_cmd::TCX_NEXT),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// The floor of the live figures: an empty program on the TCX egress of a device, timed by the
/// same run-time statistics as weft's programs. Attached first in the device's chain, so it runs
/// for every packet whatever else is there, and hands each on. Closing the link's descriptor
/// (dropping this) detaches it and frees the program: nothing stays behind, even if the bench dies.
pub struct LiveFloor {
    pub prog_id: u64,
    // Dropped in this order: the link, then the program.
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl LiveFloor {
    /// Loads the empty program and attaches it to `dev`'s egress in namespace `ns`.
    pub async fn attach(ns: &Netns, dev: &str) -> anyhow::Result<LiveFloor> {
        let prog = load_floor().context("BPF_PROG_LOAD of an empty sched_cls program")?;
        let prog_id = prog_id(&prog).context("BPF_OBJ_GET_INFO_BY_FD of the empty program")?;
        let (prog_fd, dev) = (prog.as_raw_fd(), dev.to_owned());
        // The kernel looks the ifindex up in the calling thread's namespace; the descriptor it
        // returns is the whole process's.
        let handle = ns.spawn_thread(move || {
            let name = std::ffi::CString::new(dev.clone())?;
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(std::io::Error::last_os_error()).context(format!("no device {dev}"));
            }
            let mut attr = LinkCreateAttr {
                prog_fd: prog_fd as u32,
                target_ifindex: ifindex,
                attach_type: bpf_cmd::TCX_EGRESS,
                flags: bpf_cmd::F_BEFORE,
                ..Default::default()
            };
            bpf_fd(bpf_cmd::LINK_CREATE, &mut attr).with_context(|| {
                format!("BPF_LINK_CREATE, tcx egress of {dev} (TCX needs kernel 6.6 or later)")
            })
        });
        let link = tokio::task::spawn_blocking(move || handle.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the attaching thread panicked"))?
            .with_context(|| format!("attach the empty program in {}", ns.name()))?;
        Ok(LiveFloor {
            prog_id,
            _link: link,
            _prog: prog,
        })
    }
}

fn load_floor() -> anyhow::Result<OwnedFd> {
    let insns = floor_program();
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut prog_name = [0u8; 16];
    prog_name[..FLOOR_NAME.len()].copy_from_slice(FLOOR_NAME.as_bytes());
    let mut attr = ProgLoadAttr {
        prog_type: bpf_cmd::PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    bpf_fd(bpf_cmd::PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        let verifier = String::from_utf8_lossy(&log[..end]);
        anyhow::anyhow!("{e}; verifier log: {:?}", verifier.trim())
    })
}

/// The id the kernel gave the program (`struct bpf_prog_info` starts with its type and id).
fn prog_id(prog: &OwnedFd) -> anyhow::Result<u64> {
    let mut info = [0u32; 2];
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(bpf_cmd::OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(u64::from(info[1]))
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
                    floor: name == FLOOR_NAME,
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

/// The per-packet costs as a table (report.md): the programs that ran for the UDP test's
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
    let how = "bpf_stats during the UDP tests";
    // The floor shows even when it barely ran: then it did not see the test's packets.
    let mut rows: Vec<Vec<String>> = live_rows(p)
        .filter(|c| c.floor || c.run_cnt >= 1000)
        .map(|c| {
            let (how, target) = if c.floor {
                (
                    format!("{how} (the floor: an empty program on ens32's egress, same packets)"),
                    "none (what every live figure includes)".to_owned(),
                )
            } else {
                (how.to_owned(), verdict(c.ns_per_packet))
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
    let floor = |c: &&LiveCost| c.floor;
    p.live
        .iter()
        .filter(move |c| !floor(c))
        .chain(p.live.iter().filter(floor))
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
            "  live (bpf_stats, UDP tests)  {:<16} {:<8} {:>7.0} ns  ({} runs){}\n",
            c.program,
            c.host,
            c.ns_per_packet,
            c.run_cnt,
            // A program that ran a handful of times (the other direction's ARP, replies) is no figure.
            if c.floor {
                "  the floor: an empty program on ens32's egress, same packets; no target"
                    .to_owned()
            } else if c.run_cnt >= 1000 {
                format!("  {}", verdict(c.ns_per_packet))
            } else {
                String::new()
            }
        ));
    }
    if let Some(why) = &p.live_floor_missing {
        out.push_str(&format!(
            "  live (bpf_stats, UDP tests)  {FLOOR_NAME:<16} host1    the floor not measured: {why}\n"
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
    fn the_table_leaves_out_programs_that_barely_ran() {
        let cost = |host: &str, n: u64, ns: u64| LiveCost {
            host: host.to_owned(),
            program: "weft_tc_encap".to_owned(),
            prog_id: 1,
            run_cnt: n,
            run_time_ns: ns,
            ns_per_packet: ns as f64 / n as f64,
            floor: false,
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
        let programs: BTreeMap<u64, String> = [
            (12, "weft_tc_encap".to_owned()),
            (40, FLOOR_NAME.to_owned()),
        ]
        .into();
        let snap =
            |n: u64, floor_ns: u64| BTreeMap::from([(12u64, (n, n * 160)), (40, (n, floor_ns))]);
        let mut live = Vec::new();
        accumulate(
            &mut live,
            "host1",
            &programs,
            &snap(0, 0),
            &snap(100_000, 4_000_000),
        );
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
    fn the_empty_program_is_r0_minus_one_exit() {
        let [mov, exit] = floor_program();
        // The bytes of `r0 = -1; exit` as `llvm-objdump -d` shows them for a BPF object.
        if cfg!(target_endian = "little") {
            assert_eq!(mov, [0xb7, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff]);
            assert_eq!(exit, [0x95, 0, 0, 0, 0, 0, 0, 0]);
            assert_eq!(
                insn(0xbf, 1, 2, -2, 7),
                [0xbf, 0x21, 0xfe, 0xff, 7, 0, 0, 0]
            );
        }
    }

    #[test]
    fn bpf_attr_layouts_match_linux_bpf_h() {
        use std::mem::offset_of;
        // linux/bpf.h, union bpf_attr: the BPF_PROG_LOAD struct ...
        assert_eq!(offset_of!(ProgLoadAttr, insn_cnt), 4);
        assert_eq!(offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(offset_of!(ProgLoadAttr, log_level), 24);
        assert_eq!(offset_of!(ProgLoadAttr, log_size), 28);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(offset_of!(ProgLoadAttr, prog_flags), 44);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, prog_ifindex), 64);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
        // ... BPF_LINK_CREATE's, with the tcx member of its last union ...
        assert_eq!(offset_of!(LinkCreateAttr, target_ifindex), 4);
        assert_eq!(offset_of!(LinkCreateAttr, attach_type), 8);
        assert_eq!(offset_of!(LinkCreateAttr, flags), 12);
        assert_eq!(offset_of!(LinkCreateAttr, relative_fd), 16);
        assert_eq!(offset_of!(LinkCreateAttr, expected_revision), 24);
        // ... and BPF_OBJ_GET_INFO_BY_FD's info member.
        assert_eq!(offset_of!(InfoAttr, info_len), 4);
        assert_eq!(offset_of!(InfoAttr, info), 8);
        assert!(FLOOR_NAME.len() < 16, "BPF_OBJ_NAME_LEN counts the NUL");
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

/// The live floor for real: loaded, attached in a namespace, timed for the packets it saw, gone
/// when dropped (root).
#[cfg(test)]
mod live_floor_tests {
    use std::time::Duration;

    use super::*;
    use weft_tests::poll;

    /// `union bpf_attr` for BPF_PROG_QUERY, up to `revision`: the kernel writes the chain's
    /// revision there whatever size it is handed.
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const _: () = assert!(std::mem::size_of::<QueryAttr>() == 64);

    /// The programs on `dev`'s TCX egress in the calling thread's namespace, in the order they run.
    fn tcx_egress_chain(dev: &str) -> anyhow::Result<Vec<u64>> {
        const BPF_PROG_QUERY: libc::c_long = 16;
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        let mut ids = [0u32; 8];
        let mut attr = QueryAttr {
            target_ifindex: ifindex,
            attach_type: bpf_cmd::TCX_EGRESS,
            prog_ids: ids.as_mut_ptr() as u64,
            count: ids.len() as u32,
            ..Default::default()
        };
        bpf(BPF_PROG_QUERY, &mut attr).context("BPF_PROG_QUERY")?;
        Ok(ids[..attr.count as usize]
            .iter()
            .map(|&i| u64::from(i))
            .collect())
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "needs root: run cargo xtask test"]
    async fn the_empty_program_counts_every_packet_out_of_the_device_and_leaves_nothing() {
        const SENT: u64 = 200;
        let _stats = StatsEnabled::enable().unwrap();
        let ns = Netns::create(&format!("weft-floor-{}", std::process::id()))
            .await
            .unwrap();
        ns.add_interface("ens32", "192.168.77.1/24").await.unwrap();
        // A fixed neighbour: no ARP request travels with the datagrams.
        ns.ip(&[
            "neigh",
            "add",
            "192.168.77.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "ens32",
        ])
        .await
        .unwrap();

        let err = LiveFloor::attach(&ns, "nosuch").await.err().unwrap();
        assert!(format!("{err:#}").contains("no device nosuch"), "{err:#}");

        let floor = LiveFloor::attach(&ns, "ens32").await.unwrap();
        let id = floor.prog_id;
        let show =
            weft_tests::netns::run("bpftool", &["-j", "prog", "show", "id", &id.to_string()])
                .await
                .unwrap();
        assert!(
            show.contains(&format!("\"name\":\"{FLOOR_NAME}\"")),
            "{show}"
        );
        // A later one goes first in the chain: the floor runs whatever program ends it.
        let head = LiveFloor::attach(&ns, "ens32").await.unwrap();
        let order = ns
            .spawn_thread(|| tcx_egress_chain("ens32"))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(order, [head.prog_id, id]);
        drop(head);

        let before = run_stats().await.unwrap()[&id];
        ns.spawn_thread(|| {
            let socket = std::net::UdpSocket::bind("192.168.77.1:0")?;
            for _ in 0..SENT {
                socket.send_to(&[0x5a; 64], "192.168.77.2:5201")?;
            }
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
        let after = run_stats().await.unwrap()[&id];
        let runs = after.0 - before.0;
        // Every datagram, and at most a few packets of the namespace's own (IPv6 neighbour
        // discovery on a fresh link).
        assert!(
            (SENT..SENT + 20).contains(&runs),
            "{runs} runs for {SENT} datagrams"
        );
        assert!(
            after.1 > before.1,
            "no run time counted: {before:?} -> {after:?}"
        );

        drop(floor);
        poll::until(
            "the empty program to be freed",
            Duration::from_secs(10),
            || async {
                let left = run_stats().await.map_err(|e| format!("{e:#}"))?;
                poll::check(
                    !left.contains_key(&id),
                    format!("program {id} still loaded"),
                )
            },
        )
        .await;
    }
}
