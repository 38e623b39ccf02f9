//! The IPv6 maps (names in `weft_common::map_names6`), pinned by name like the IPv4 ones.
//! Only the IPv6 path reads them; counters are shared (see `weft_common::counter6`).

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
};
use weft_common::{
    Ipv6LpmData, LocalEndpoint, NodeConfig6, PeerValue6, VtepValue, MAX_LOCAL, MAX_PEERS,
};

#[map(name = "WEFT_REMOTES6")]
static REMOTES6: LpmTrie<Ipv6LpmData, PeerValue6> = LpmTrie::pinned(MAX_PEERS, 0);

#[map(name = "WEFT_VTEPS6")]
static VTEPS6: HashMap<[u8; 16], VtepValue> = HashMap::pinned(MAX_PEERS, 0);

#[map(name = "WEFT_CONFIG6")]
static CONFIG6: Array<NodeConfig6> = Array::pinned(1, 0);

#[map(name = "WEFT_LOCAL6")]
static LOCAL6: HashMap<[u8; 16], LocalEndpoint> = HashMap::pinned(MAX_LOCAL, 0);

/// This node's IPv6 settings, `None` until the agent wrote our VTEP IPv6 address.
#[inline(always)]
pub fn config6() -> Option<&'static NodeConfig6> {
    let cfg = CONFIG6.get(0)?;
    if cfg.vtep_ip_be == [0; 16] {
        return None;
    }
    Some(cfg)
}

/// The peer owning the most specific remote IPv6 subnet containing `addr_be`.
#[inline(always)]
pub fn remote_peer6(addr_be: [u8; 16]) -> Option<&'static PeerValue6> {
    REMOTES6.get(Key::new(128, Ipv6LpmData { addr_be }))
}

/// Whether `addr_be` is the `PublicIPv6` of a host holding a lease.
#[inline(always)]
pub fn is_known_vtep6(addr_be: &[u8; 16]) -> bool {
    VTEPS6.get_ptr(addr_be).is_some()
}

/// The container bound to IPv6 address `addr_be`, if the agent found one.
#[inline(always)]
pub fn local_endpoint6(addr_be: &[u8; 16]) -> Option<LocalEndpoint> {
    let ptr = LOCAL6.get_ptr(addr_be)?;
    // SAFETY: a map value pointer the kernel returned, copied out at once.
    Some(unsafe { *ptr })
}
