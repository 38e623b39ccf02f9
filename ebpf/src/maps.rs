//! The maps the programs share with the agent (names in `weft_common::map_names`).
//!
//! Every map is pinned by name, so an agent given a pin directory adopts the
//! existing maps (and their entries) when it restarts.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
};
use weft_common::{
    counter, Ipv4LpmData, LocalEndpoint, NodeConfig, PeerValue, VtepValue, MAX_LOCAL, MAX_PEERS,
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
}

impl Verdict {
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
        }
    }
}
