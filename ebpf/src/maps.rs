//! The maps the programs share with the agent (names in `weft_common::map_names`).
//!
//! Every map is pinned by name, so an agent given a pin directory adopts the
//! existing maps (and their entries) when it restarts.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
};
use weft_common::{
    counter, counter6, counter_host, Ipv4LpmData, LocalEndpoint, NodeConfig, PeerValue, VtepValue,
    MAX_LOCAL, MAX_PEERS,
};

#[map(name = "WEFT_REMOTES")]
static REMOTES: LpmTrie<Ipv4LpmData, PeerValue> = LpmTrie::pinned(MAX_PEERS, 0);

#[map(name = "WEFT_VTEPS")]
static VTEPS: HashMap<[u8; 4], VtepValue> = HashMap::pinned(MAX_PEERS, 0);

#[map(name = "WEFT_CONFIG")]
static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map(name = "WEFT_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[map(name = "WEFT_LOCAL")]
static LOCAL: HashMap<[u8; 4], LocalEndpoint> = HashMap::pinned(MAX_LOCAL, 0);

/// The frame a container port's program last handed to the kernel on this
/// CPU. Not pinned: it only links two hooks of one softirq run (the port's,
/// then the bridge's, as the bridge passes the frame up), so a restarted
/// agent's programs start with an empty one.
#[map(name = "WEFT_PASSED")]
static PASSED: PerCpuArray<Fingerprint> = PerCpuArray::with_max_entries(1, 0);

/// What identifies a frame between the port's hook and the bridge's: its
/// length and 32 bytes from its source MAC on (for IPv4 that covers the
/// header's ID and checksum, for ARP the sender). `len == 0`: none.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Fingerprint {
    pub len: u64,
    pub head: [u64; 4],
}

/// Records `f` as the frame this CPU's port program just passed.
#[inline(always)]
pub fn remember_passed(f: Fingerprint) {
    if let Some(slot) = PASSED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot = f };
    }
}

/// Whether `f` is the frame this CPU's port program just passed; forgets it
/// either way, so it matches once.
#[inline(always)]
pub fn take_passed(f: &Fingerprint) -> bool {
    let Some(slot) = PASSED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    let seen = unsafe { &mut *slot };
    // Word by word: a whole-struct compare may become a memcmp call, which BPF lacks.
    let same = seen.len == f.len
        && seen.head[0] == f.head[0]
        && seen.head[1] == f.head[1]
        && seen.head[2] == f.head[2]
        && seen.head[3] == f.head[3];
    seen.len = 0;
    same
}

/// The container bound to address `addr_be`, if the agent found one in the
/// kernel's tables (neighbour entry on the bridge, forwarding entry on a port).
#[inline(always)]
pub fn local_endpoint(addr_be: [u8; 4]) -> Option<LocalEndpoint> {
    let ptr = LOCAL.get_ptr(addr_be)?;
    // SAFETY: a map value pointer the kernel returned, copied out at once.
    Some(unsafe { *ptr })
}

/// This node's configuration, `None` until the agent wrote a VNI and VTEP address.
#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.vni_ne == 0 && cfg.vtep_ip_be == [0; 4] {
        return None;
    }
    Some(cfg)
}

/// The peer owning the most specific remote subnet containing `addr_be`.
#[inline(always)]
pub fn remote_peer(addr_be: [u8; 4]) -> Option<&'static PeerValue> {
    REMOTES.get(Key::new(32, Ipv4LpmData { addr_be }))
}

/// Whether `addr_be` is the VTEP address of a host holding a lease.
#[inline(always)]
pub fn is_known_vtep(addr_be: [u8; 4]) -> bool {
    VTEPS.get_ptr(addr_be).is_some()
}

/// Adds one to a counter of this CPU.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// What a program decided, with the counter that records why.
pub enum Verdict {
    /// Not ours, or not safe for the fast path: hand the packet on untouched.
    Pass(u32),
    /// Forged, broken, or what the kernel would drop: drop it.
    Drop(u32),
    /// Handled: return this action (redirect, pass after decap).
    Done(i32, u32),
    /// Counted already by the hook that saw it first (a container port's):
    /// hand it on untouched without counting it again.
    Seen,
}

impl Verdict {
    /// The host program's verdict ([`crate::encap::encapsulate_host`]):
    /// counted under its own counters, whatever the reason a frame was passed.
    #[inline(always)]
    pub fn from_host(self) -> Verdict {
        match self {
            Verdict::Done(action, c) if c == counter6::ENCAPSULATED => {
                Verdict::Done(action, counter_host::ENCAPSULATED6)
            }
            Verdict::Done(action, _) => Verdict::Done(action, counter_host::ENCAPSULATED),
            Verdict::Pass(c) if c >= counter::COUNT_IPV4 => Verdict::Pass(counter_host::PASSED6),
            Verdict::Pass(_) => Verdict::Pass(counter_host::PASSED),
            v => v,
        }
    }

    /// Counts the verdict and turns it into the program's return code.
    #[inline(always)]
    pub fn finish(self, pass: i32, drop: i32) -> i32 {
        match self {
            Verdict::Pass(c) => {
                count(c);
                pass
            }
            Verdict::Drop(c) => {
                count(c);
                drop
            }
            Verdict::Done(action, c) => {
                count(c);
                action
            }
            Verdict::Seen => pass,
        }
    }
}
