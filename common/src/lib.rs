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

/// The layout of the pinned maps this build's programs expect: bumped whenever
/// a map's key, value or size changes. Maps are pinned under
/// `maps-v<LAYOUT_VERSION>/` (with `maps` a link to the live set, where
/// builds before versioning look). Layout 1 (before it was recorded): a
/// 40-byte [`NodeConfig`], 17 counters, 4096 local entries. Layout 2: the
/// 52-byte [`NodeConfig`], 29 counters, 16384 local entries. Layouts only
/// append: counters keep their indices, [`NodeConfig`] grows at its end.
pub const LAYOUT_VERSION: u32 = 2;

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

/// Maximum entries of the local-container map. Only the agent writes it, and
/// only bindings of this host's subnet the kernel's tables agree on (the
/// neighbour table caps those at `gc_thresh3`, 1024 by default): generous on
/// purpose, so a legitimate container always finds room.
pub const MAX_LOCAL: u32 = 16384;

/// A container on this host's bridge, as the kernel would deliver to it: its
/// address's neighbour entry on the bridge (IP -> MAC) and the bridge's
/// forwarding entry (MAC -> port). Decapsulated packets are handed straight to
/// its network namespace (`bpf_redirect_peer`) instead of through the bridge,
/// which would segment every GRO packet in software; encapsulation accepts a
/// source address only from the port and MAC bound to it.
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
    /// VXLAN UDP destination port, host order (8472 by default); the programs
    /// convert it where they compare or write it.
    pub port_ne: u16,
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
    /// This host's container subnet (network order) and its netmask: an
    /// unbound source inside it goes to the kernel path, outside it is
    /// dropped. A zero mask means "not known yet": every unbound source goes
    /// to the kernel path, which judges it.
    pub subnet_be: [u8; 4],
    pub subnet_mask_be: [u8; 4],
    /// Outer IPv4 TTL: the namespace's `net.ipv4.ip_default_ttl`, what a vxlan
    /// device with `ttl auto` (flannel's) uses.
    pub outer_ttl: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(size_of::<NodeConfig>() == 52);

/// Bits of [`NodeConfig::flags_ne`].
pub mod config_flags {
    /// Decrement the inner TTL on encapsulation, as the kernel path's forwarding does.
    pub const DECREMENT_TTL: u32 = 1 << 0;
    /// Fill the outer UDP checksum (`udpcsum`, flannel.N's default) on
    /// packets that are not GSO; without it every outer checksum is 0.
    pub const UDP_CSUM: u32 = 1 << 2;
}

/// Indices into the per-CPU counter array. Every packet a program sees is
/// counted exactly once under `encapsulated`, `decapsulated`, a `passed:`
/// reason (handed to the kernel untouched) or a `dropped:` reason; the
/// `decapsulated: ...` counters say more about some decapsulated packets.
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
    /// A helper refused before the packet was changed (e.g. adjust_room).
    pub const PASS_HELPER_FAIL: u32 = 11;
    pub const PASS_INNER_NOT_OURS: u32 = 12;
    pub const DROP_UNKNOWN_SOURCE: u32 = 13;
    pub const DROP_WRONG_VNI: u32 = 14;
    pub const DROP_MALFORMED: u32 = 15;
    /// Decapsulated and handed straight to a local container (of [`DECAPSULATED`]).
    pub const DELIVERED_TO_CONTAINER: u32 = 16;
    /// 802.1Q/802.1ad, in skb metadata or inline: never tunnelled with its tag.
    pub const PASS_VLAN: u32 = 17;
    /// GSO packet whose segments would not fit the underlay once encapsulated:
    /// the kernel path sends "fragmentation needed".
    pub const PASS_GSO_TOO_BIG: u32 = 18;
    /// IPv4 options (outer on decap, inner on encap): valid, left to the kernel.
    pub const PASS_IP_OPTIONS: u32 = 19;
    /// Source inside this host's subnet but not bound to this port and MAC.
    pub const PASS_SOURCE_UNBOUND: u32 = 20;
    /// The outer UDP checksum cannot be derived from the headers (UDP without
    /// checksum, or a protocol other than TCP/UDP/ICMP): the kernel path sums it.
    pub const PASS_CHECKSUM: u32 = 21;
    /// Source address bound to another container's port: forged.
    pub const DROP_SOURCE_OTHER_PORT: u32 = 22;
    /// Source address outside this host's subnet: forged.
    pub const DROP_SOURCE_OUTSIDE: u32 = 23;
    /// Inner source outside every subnet leased by the sending VTEP: forged.
    pub const DROP_INNER_SOURCE: u32 = 24;
    /// Outer CE with inner Not-ECT (RFC 6040, as the kernel's vxlan).
    pub const DROP_ECN: u32 = 25;
    /// A helper failed after the packet was rewritten: dropped, never sent half-built.
    pub const DROP_HELPER_FAIL: u32 = 26;
    /// Outer CE copied into the inner header (of [`DECAPSULATED`]).
    pub const ECN_CE_SET: u32 = 27;
    /// Too big for the container's link: left to the stack (of [`DECAPSULATED`]).
    pub const DECAP_TOO_BIG: u32 = 28;
    /// Number of counters; the map's max_entries.
    pub const COUNT: u32 = 29;

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
        "passed: helper refused",
        "passed: inner frame not ours",
        "dropped: unknown source",
        "dropped: wrong vni",
        "dropped: malformed vxlan",
        "decapsulated: delivered to container",
        "passed: vlan tagged",
        "passed: gso segments too big",
        "passed: ip options",
        "passed: source not bound to this port",
        "passed: checksum left to the kernel",
        "dropped: source bound to another port",
        "dropped: source outside this host's subnet",
        "dropped: inner source not leased by the sender",
        "dropped: ce on not-ect (rfc 6040)",
        "dropped: helper failed after rewrite",
        "decapsulated: ce set (rfc 6040)",
        "decapsulated: too big for direct delivery",
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
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const ETH_P_8021AD: u16 = 0x88a8;
    pub const IPPROTO_ICMP: u8 = 1;
    pub const IPPROTO_TCP: u8 = 6;
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
