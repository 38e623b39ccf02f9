//! The bench's own `bpf(2)` calls: run-time statistics on for a timing run ([`StatsEnabled`]), and
//! the live floor ([`LiveFloor`]), an empty program timed by them (see the `programs` module).

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::Context as _;
use weft_tests::Netns;

/// Run-time statistics on for the life of the guard (one timing run): BPF_ENABLE_STATS (BPF_STATS_RUN_TIME) hands
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

/// `kernel.bpf_stats_enabled` as the machine has it (`None` when unreadable). On, every eBPF
/// program on the machine reads the clock twice per run: the ebpf modes' figures then carry that
/// cost in every test, not just in the timing runs.
pub fn stats_sysctl_on() -> Option<bool> {
    let text = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    Some(text.trim() != "0")
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

/// The floor of the live figures: an empty program timed by the same run-time statistics as
/// weft's programs, loaded once per test bed and attached ([`LiveFloor::attach`]) to the TCX egress
/// of a device only while a timing run lasts. Attached first in the device's chain, it runs for
/// every packet whatever else is there, and hands each on. Dropping the program's descriptor frees
/// it once no link holds it: nothing stays behind, even if the bench dies.
pub struct LiveFloor {
    pub prog_id: u64,
    prog: OwnedFd,
}

/// The floor attached to one device: dropping it closes the link's descriptor, which detaches it.
pub struct FloorLink {
    _link: OwnedFd,
}

impl LiveFloor {
    /// Loads the empty program.
    pub fn load() -> anyhow::Result<LiveFloor> {
        let prog = load_floor().context("BPF_PROG_LOAD of an empty sched_cls program")?;
        let prog_id = prog_id(&prog).context("BPF_OBJ_GET_INFO_BY_FD of the empty program")?;
        Ok(LiveFloor { prog_id, prog })
    }

    /// Attaches the program first on `dev`'s egress in namespace `ns`, until the link is dropped.
    pub async fn attach(&self, ns: &Netns, dev: &str) -> anyhow::Result<FloorLink> {
        let (prog_fd, dev) = (self.prog.as_raw_fd(), dev.to_owned());
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
        Ok(FloorLink { _link: link })
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

/// The live floor for real: loaded, attached in a namespace, timed for the packets it saw, gone
/// when dropped (root).
#[cfg(test)]
mod live_floor_tests {
    use std::time::Duration;

    use super::*;
    use crate::bench::programs::run_stats;
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
    async fn the_empty_program_counts_every_packet_out_of_the_device_while_attached_and_leaves_nothing(
    ) {
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

        let floor = LiveFloor::load().unwrap();
        let err = floor.attach(&ns, "nosuch").await.err().unwrap();
        assert!(format!("{err:#}").contains("no device nosuch"), "{err:#}");

        let link = floor.attach(&ns, "ens32").await.unwrap();
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
        let head = LiveFloor::load().unwrap();
        let head_link = head.attach(&ns, "ens32").await.unwrap();
        let chain = || {
            ns.spawn_thread(|| tcx_egress_chain("ens32"))
                .join()
                .unwrap()
                .unwrap()
        };
        assert_eq!(chain(), [head.prog_id, id]);
        drop((head_link, head));

        let send = || {
            ns.spawn_thread(|| {
                let socket = std::net::UdpSocket::bind("192.168.77.1:0")?;
                for _ in 0..SENT {
                    socket.send_to(&[0x5a; 64], "192.168.77.2:5201")?;
                }
                Ok(())
            })
            .join()
            .unwrap()
            .unwrap()
        };
        let before = run_stats().await.unwrap()[&id];
        send();
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

        // Detached between timing runs: loaded, but it sees no packet.
        drop(link);
        assert_eq!(chain(), Vec::<u64>::new());
        send();
        assert_eq!(run_stats().await.unwrap()[&id].0, after.0);
        // Attached again, the same program counts on.
        let link = floor.attach(&ns, "ens32").await.unwrap();
        assert_eq!(chain(), [id]);
        drop(link);

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
