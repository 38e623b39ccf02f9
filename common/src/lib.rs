//! Types shared between the eBPF programs and the agent through BPF maps.
//!
//! Every type is `#[repr(C)]` with explicit padding and a size assertion, and
//! names the byte order of multi-byte fields (`_be` = network order, `_ne` =
//! host order). No bool, Option or enum fields: the kernel side reads raw bytes.
#![no_std]

use core::mem::size_of;

/// Map names, shared so the agent finds exactly what the object declares.
pub mod map_names {
    /// LPM trie: remote subnet -> [`crate::PeerValue`].
    pub const REMOTES: &str = "WEFT_REMOTES";
    /// Hash: VTEP IPv4 (network order) -> [`crate::VtepValue`].
    pub const KNOWN_VTEPS: &str = "WEFT_VTEPS";
    /// Array with one [`crate::NodeConfig`].
    pub const CONFIG: &str = "WEFT_CONFIG";
    /// Per-CPU array of u64 counters, indexed by [`crate::counter`].
    pub const COUNTERS: &str = "WEFT_COUNTERS";
    /// Hash: local container IPv4 (network order) -> [`crate::LocalEndpoint`].
    pub const LOCAL: &str = "WEFT_LOCAL";
}

/// Program (function) names in the object.
pub mod program_names {
    /// TC classifier: VXLAN-encapsulate container traffic bound for remote subnets.
    pub const TC_ENCAP: &str = "weft_tc_encap";
    /// XDP: decapsulate VXLAN from known peers on the underlay NIC.
    pub const XDP_DECAP: &str = "weft_xdp_decap";
    /// TC classifier: the same decapsulation on the underlay's TC ingress.
    pub const TC_DECAP: &str = "weft_tc_decap";
}

/// Maximum entries of the remote-subnet and VTEP maps.
pub const MAX_PEERS: u32 = 16384;

/// Where a remote subnet's traffic goes: the peer's VTEP (its lease's PublicIP
/// and VtepMAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerValue {
    /// Outer destination address, network byte order.
    pub vtep_ip_be: [u8; 4],
    /// Inner Ethernet destination: the peer's `flannel.N` MAC.
    pub vtep_mac: [u8; 6],
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<PeerValue>() == 12);

/// LPM trie key data for an IPv4 subnet (the prefix length lives in aya's
/// `Key` wrapper): the address in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ipv4LpmData {
    pub addr_be: [u8; 4],
}
const _: () = assert!(size_of::<Ipv4LpmData>() == 4);

/// Value of the known-VTEP set. Only presence matters today; the field keeps
/// room for per-peer flags without changing the map layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VtepValue {
    pub flags_ne: u32,
}
const _: () = assert!(size_of::<VtepValue>() == 4);

/// Maximum entries of the local-container map.
pub const MAX_LOCAL: u32 = 4096;

/// A container on this host's bridge, so decapsulated packets can be handed
/// straight to its network namespace (`bpf_redirect_peer`) instead of through
/// the bridge, which would segment every GRO packet in software.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LocalEndpoint {
    /// The host-side veth of the container (a bridge port), host order.
    pub host_ifindex_ne: u32,
    /// The container's MAC: the inner Ethernet destination.
    pub mac: [u8; 6],
    /// The bridge's MAC (the container's gateway): the inner Ethernet source.
    pub gateway_mac: [u8; 6],
}
const _: () = assert!(size_of::<LocalEndpoint>() == 16);

/// Per-node configuration, entry 0 of [`map_names::CONFIG`]. A zero `vni_ne`
/// together with a zero `vtep_ip_be` means "not configured": programs pass
/// everything untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// VXLAN network identifier (24 bits used), host order.
    pub vni_ne: u32,
    /// Our VTEP (underlay) address, network order: the outer source.
    pub vtep_ip_be: [u8; 4],
    /// Underlay interface index (outer FIB lookups and redirects), host order.
    pub underlay_ifindex_ne: u32,
    /// Bridge (docker0) interface index, host order; 0 when unknown.
    pub bridge_ifindex_ne: u32,
    /// VXLAN UDP destination port, network order (8472 by default).
    pub port_be: u16,
    /// Underlay MTU (L3 bytes), host order: larger non-GSO packets go to the kernel.
    pub underlay_mtu_ne: u16,
    /// UDP source port range [min, max), host order, as the kernel's `udp_flow_src_port`.
    pub sport_min_ne: u16,
    pub sport_max_ne: u16,
    /// Our VTEP MAC (`flannel.N`'s): the inner Ethernet source.
    pub vtep_mac: [u8; 6],
    /// The underlay NIC's MAC: the destination written into decapsulated frames.
    pub underlay_mac: [u8; 6],
    /// [`config_flags`] bits, host order.
    pub flags_ne: u32,
}
const _: () = assert!(size_of::<NodeConfig>() == 40);

/// Bits of [`NodeConfig::flags_ne`].
pub mod config_flags {
    /// Decrement the inner TTL on encapsulation, as the kernel path's forwarding does.
    pub const DECREMENT_TTL: u32 = 1 << 0;
    /// Outer TTL copies the (decremented) inner TTL (`ttl inherit`, flannel's
    /// setting); otherwise 64.
    pub const TTL_INHERIT: u32 = 1 << 1;
}

/// Indices into the per-CPU counter array.
pub mod counter {
    pub const ENCAPSULATED: u32 = 0;
    pub const DECAPSULATED: u32 = 1;
    pub const PASS_NOT_IPV4: u32 = 2;
    pub const PASS_NOT_REMOTE: u32 = 3;
    pub const PASS_FRAGMENT: u32 = 4;
    pub const PASS_NOT_VXLAN: u32 = 5;
    pub const PASS_TOO_BIG: u32 = 6;
    pub const PASS_FIB_FAIL: u32 = 7;
    pub const PASS_TTL_EXPIRED: u32 = 8;
    pub const PASS_MALFORMED: u32 = 9;
    pub const PASS_NOT_CONFIGURED: u32 = 10;
    pub const PASS_HELPER_FAIL: u32 = 11;
    pub const PASS_INNER_NOT_OURS: u32 = 12;
    pub const DROP_UNKNOWN_SOURCE: u32 = 13;
    pub const DROP_WRONG_VNI: u32 = 14;
    pub const DROP_MALFORMED: u32 = 15;
    /// Decapsulated and handed straight to a local container (of [`DECAPSULATED`]).
    pub const DELIVERED_TO_CONTAINER: u32 = 16;
    /// Number of counters; the map's max_entries.
    pub const COUNT: u32 = 17;

    /// Display names, indexed by counter.
    pub const NAMES: [&str; COUNT as usize] = [
        "encapsulated",
        "decapsulated",
        "passed: not ipv4",
        "passed: not a remote subnet",
        "passed: fragment",
        "passed: not vxlan for us",
        "passed: too big",
        "passed: fib lookup failed",
        "passed: ttl expired",
        "passed: malformed",
        "passed: not configured",
        "passed: helper failed",
        "passed: inner frame not ours",
        "dropped: unknown source",
        "dropped: wrong vni",
        "dropped: malformed vxlan",
        "decapsulated: delivered to container",
    ];

    /// The name of a counter index, `None` when out of range.
    pub fn name(index: u32) -> Option<&'static str> {
        NAMES.get(index as usize).copied()
    }
}

/// Wire constants both sides agree on.
pub mod wire {
    pub const ETH_HLEN: usize = 14;
    pub const IPV4_HLEN: usize = 20;
    pub const UDP_HLEN: usize = 8;
    pub const VXLAN_HLEN: usize = 8;
    /// Bytes VXLAN adds in front of the inner frame's IP header: outer IPv4 +
    /// UDP + VXLAN + inner Ethernet.
    pub const VXLAN_OVERHEAD: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
    pub const ETH_P_IPV4: u16 = 0x0800;
    pub const IPPROTO_UDP: u8 = 17;
    /// VXLAN flags byte: I (valid VNI).
    pub const VXLAN_FLAG_I: u8 = 0x08;
    pub const DEFAULT_PORT: u16 = 8472;
}
const _: () = assert!(wire::VXLAN_OVERHEAD == 50);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), padded explicitly, and valid for any bit pattern.
    unsafe impl aya::Pod for super::PeerValue {}
    unsafe impl aya::Pod for super::Ipv4LpmData {}
    unsafe impl aya::Pod for super::VtepValue {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::LocalEndpoint {}
}
