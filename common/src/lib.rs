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
/// 52-byte [`NodeConfig`], 29 counters, 16384 local entries. Layout 3: 30
/// IPv4 counters (the bridge-down pass), the IPv6 maps ([`map_names::REMOTES6`]
/// and the rest, new and empty until the agent fills them) and the IPv6
/// counters after the IPv4 ones. Layout 4: the host program's counters
/// ([`counter_host`]) after the IPv6 ones. Layouts only append: counters keep their
/// indices, [`NodeConfig`] grows at its end, new maps start empty.
pub const LAYOUT_VERSION: u32 = 4;

/// Program (function) names in the object.
pub mod program_names {
    /// TC classifier: VXLAN-encapsulate container traffic bound for remote subnets.
    pub const TC_ENCAP: &str = "weft_tc_encap";
    /// XDP: decapsulate VXLAN from known peers on the underlay NIC.
    pub const XDP_DECAP: &str = "weft_xdp_decap";
    /// TC classifier: the same decapsulation on the underlay's TC ingress.
    pub const TC_DECAP: &str = "weft_tc_decap";
    /// TC classifier on `flannel.N`'s (and `flannel-v6.N`'s) egress: what the
    /// host's own routing sends into the tunnel, encapsulated as the vxlan
    /// device would.
    pub const TC_HOST_ENCAP: &str = "weft_tc_host_encap";
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
    /// The container bridge is administratively or operationally down: the
    /// kernel's bridge forwards nothing (its ports are disabled), so the
    /// programs neither encapsulate from it nor deliver into its containers.
    /// Set by the agent from the bridge's link state and its events.
    pub const BRIDGE_DOWN: u32 = 1 << 3;
}

/// Indices into the per-CPU counter array. Every frame the programs see is
/// counted exactly once under `encapsulated`, `decapsulated`, a `passed:`
/// reason (handed to the kernel untouched) or a `dropped:` reason; the
/// `decapsulated: ...` counters say more about some decapsulated packets. A
/// frame a container port's program passed reaches the bridge's program too:
/// it is counted on the port only.
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
    /// The bridge is down ([`crate::config_flags::BRIDGE_DOWN`]): the kernel's
    /// bridge drops what its disabled ports receive.
    pub const PASS_BRIDGE_DOWN: u32 = 29;
    /// Number of counters; the map's max_entries. The IPv6 ones follow the
    /// IPv4 ones, see [`crate::counter6`].
    pub const COUNT: u32 = crate::counter_host::END;
    /// The IPv4 counters: every one the IPv4 path uses.
    pub const COUNT_IPV4: u32 = 30;

    /// Display names of the IPv4 counters, indexed by counter.
    pub const NAMES_IPV4: [&str; COUNT_IPV4 as usize] = [
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
        "passed: bridge down",
    ];

    /// Display names, indexed by counter: IPv4's, then IPv6's.
    pub const NAMES: [&str; COUNT as usize] = {
        let mut out = [""; COUNT as usize];
        let mut i = 0;
        while i < NAMES_IPV4.len() {
            out[i] = NAMES_IPV4[i];
            i += 1;
        }
        let mut j = 0;
        while j < crate::counter6::NAMES.len() {
            out[i + j] = crate::counter6::NAMES[j];
            j += 1;
        }
        let mut k = 0;
        while k < crate::counter_host::NAMES.len() {
            out[i + j + k] = crate::counter_host::NAMES[k];
            k += 1;
        }
        out
    };

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

// ---- IPv6 (layout 3) ------------------------------------------------------------------------
// IPv6 inner packets in IPv6 outer headers, as flanneld's `flannel-v6.<VNI>` sends them. Separate
// maps, so the IPv4 path reads exactly what it read before.

/// Names of the IPv6 maps.
pub mod map_names6 {
    /// LPM trie: remote IPv6 subnet -> [`crate::PeerValue6`].
    pub const REMOTES6: &str = "WEFT_REMOTES6";
    /// Hash: VTEP IPv6 address (network order) -> [`crate::VtepValue`].
    pub const KNOWN_VTEPS6: &str = "WEFT_VTEPS6";
    /// Array with one [`crate::NodeConfig6`].
    pub const CONFIG6: &str = "WEFT_CONFIG6";
    /// Hash: local container IPv6 address (network order) -> [`crate::LocalEndpoint`].
    pub const LOCAL6: &str = "WEFT_LOCAL6";
}

/// Where a remote IPv6 subnet's traffic goes: the peer's lease's `PublicIPv6`
/// and the `VtepMAC` of its `BackendV6Data` (its `flannel-v6.N`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerValue6 {
    /// Outer destination address, network byte order.
    pub vtep_ip_be: [u8; 16],
    /// Inner Ethernet destination: the peer's `flannel-v6.N` MAC.
    pub vtep_mac: [u8; 6],
    pub pad: [u8; 2],
}
const _: () = assert!(size_of::<PeerValue6>() == 24);

/// LPM trie key data for an IPv6 subnet (the prefix length lives in aya's `Key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ipv6LpmData {
    pub addr_be: [u8; 16],
}
const _: () = assert!(size_of::<Ipv6LpmData>() == 16);

/// IPv6 settings of this node, entry 0 of [`map_names6::CONFIG6`]; the rest
/// (VNI, port, underlay, bridge, MTU, source ports, TTL decrement) is shared
/// with IPv4 in [`NodeConfig`]. A zero `vtep_ip_be` means "IPv6 not
/// configured": the programs pass every IPv6 packet untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig6 {
    /// Our VTEP IPv6 address (`flannel-v6.N`'s `local`): the outer source.
    pub vtep_ip_be: [u8; 16],
    /// This host's IPv6 container subnet, network order, and its prefix
    /// length; 0 means "not known yet" (every unbound source goes to the kernel).
    pub subnet_be: [u8; 16],
    /// `flannel-v6.N`'s MAC: the inner Ethernet source, and the destination
    /// of frames peers send us.
    pub vtep_mac: [u8; 6],
    pub subnet_prefix_len: u8,
    /// Outer hop limit: what `ttl auto` uses, the underlay's
    /// `net.ipv6.conf.<dev>.hop_limit`.
    pub outer_hop_limit: u8,
    /// [`config6_flags`] bits, host order.
    pub flags_ne: u32,
}
const _: () = assert!(size_of::<NodeConfig6>() == 44);

/// Bits of [`NodeConfig6::flags_ne`].
pub mod config6_flags {
    /// The underlay hands GSO packets to the receiver whole (a veth): no
    /// segmentation on the way copies one outer UDP checksum into segments of
    /// another length. Without it, IPv6 GSO packets go to the kernel path:
    /// over IPv6 the outer checksum is mandatory, and `bpf_skb_adjust_room`
    /// can only mark the packet `SKB_GSO_UDP_TUNNEL`, never
    /// `SKB_GSO_UDP_TUNNEL_CSUM` (the kernel's per-segment checksum).
    pub const UNDERLAY_KEEPS_GSO: u32 = 1 << 0;
}

/// Indices of the IPv6 counters, after the IPv4 ones in the same per-CPU
/// array. As for IPv4, every IPv6 packet a program sees is counted once
/// under `ipv6: encapsulated`, `ipv6: decapsulated`, an `ipv6: passed:` or
/// an `ipv6: dropped:` reason.
pub mod counter6 {
    use crate::counter::COUNT_IPV4 as B;
    pub const ENCAPSULATED: u32 = B;
    pub const DECAPSULATED: u32 = B + 1;
    /// Of [`DECAPSULATED`]: handed straight to a local container.
    pub const DELIVERED_TO_CONTAINER: u32 = B + 2;
    /// Of [`DECAPSULATED`]: outer CE copied into the inner header (RFC 6040).
    pub const ECN_CE_SET: u32 = B + 3;
    /// Of [`DECAPSULATED`]: too big for the container's link, left to the stack.
    pub const DECAP_TOO_BIG: u32 = B + 4;
    pub const PASS_NOT_CONFIGURED: u32 = B + 5;
    pub const PASS_NOT_REMOTE: u32 = B + 6;
    pub const PASS_NOT_VXLAN: u32 = B + 7;
    /// Extension headers (inner on encap and decap, outer on decap): the kernel parses them.
    pub const PASS_EXT_HEADERS: u32 = B + 8;
    /// Hop limit 1: the kernel path sends the ICMPv6 time exceeded.
    pub const PASS_HOP_LIMIT: u32 = B + 9;
    /// Too big for the underlay once encapsulated: the kernel sends "packet too big".
    pub const PASS_TOO_BIG: u32 = B + 10;
    pub const PASS_GSO_TOO_BIG: u32 = B + 11;
    /// GSO on an underlay that may segment it: see [`crate::config6_flags::UNDERLAY_KEEPS_GSO`].
    pub const PASS_GSO_CHECKSUM: u32 = B + 12;
    /// UDP without checksum, or a protocol other than TCP/UDP/ICMPv6: the
    /// outer checksum would need the payload summed.
    pub const PASS_CHECKSUM: u32 = B + 13;
    pub const PASS_FIB_FAIL: u32 = B + 14;
    pub const PASS_MALFORMED: u32 = B + 15;
    pub const PASS_SOURCE_UNBOUND: u32 = B + 16;
    pub const PASS_HELPER_FAIL: u32 = B + 17;
    pub const PASS_INNER_NOT_OURS: u32 = B + 18;
    pub const DROP_UNKNOWN_SOURCE: u32 = B + 19;
    pub const DROP_WRONG_VNI: u32 = B + 20;
    pub const DROP_MALFORMED: u32 = B + 21;
    pub const DROP_SOURCE_OTHER_PORT: u32 = B + 22;
    pub const DROP_SOURCE_OUTSIDE: u32 = B + 23;
    pub const DROP_INNER_SOURCE: u32 = B + 24;
    pub const DROP_ECN: u32 = B + 25;
    pub const DROP_HELPER_FAIL: u32 = B + 26;
    /// Outer UDP checksum 0: flannel-v6.N (no `udp6zerocsumrx`) drops it too.
    pub const DROP_ZERO_CHECKSUM: u32 = B + 27;
    /// One past the last IPv6 counter.
    pub const END: u32 = B + 28;

    /// Display names, indexed by counter minus [`crate::counter::COUNT_IPV4`].
    pub const NAMES: [&str; (END - B) as usize] = [
        "ipv6: encapsulated",
        "ipv6: decapsulated",
        "ipv6: decapsulated: delivered to container",
        "ipv6: decapsulated: ce set (rfc 6040)",
        "ipv6: decapsulated: too big for direct delivery",
        "ipv6: passed: not configured",
        "ipv6: passed: not a remote subnet",
        "ipv6: passed: not vxlan for us",
        "ipv6: passed: extension headers",
        "ipv6: passed: hop limit expired",
        "ipv6: passed: too big",
        "ipv6: passed: gso segments too big",
        "ipv6: passed: gso needs a per-segment udp checksum",
        "ipv6: passed: checksum left to the kernel",
        "ipv6: passed: fib lookup failed",
        "ipv6: passed: malformed",
        "ipv6: passed: source not bound to this port",
        "ipv6: passed: helper refused",
        "ipv6: passed: inner frame not ours",
        "ipv6: dropped: unknown source",
        "ipv6: dropped: wrong vni",
        "ipv6: dropped: malformed vxlan",
        "ipv6: dropped: source bound to another port",
        "ipv6: dropped: source outside this host's subnet",
        "ipv6: dropped: inner source not leased by the sender",
        "ipv6: dropped: ce on not-ect (rfc 6040)",
        "ipv6: dropped: helper failed after rewrite",
        "ipv6: dropped: zero udp checksum",
    ];
}

/// Counters of the host program (`weft_tc_host_encap`, on `flannel.N`'s
/// egress), after the IPv6 ones. Every frame the host's routing sends into
/// the tunnel is counted once: encapsulated by the program, passed on to the
/// vxlan device (which sends it as it always did), or dropped after a failed
/// rewrite under the family's `dropped: helper failed after rewrite`.
pub mod counter_host {
    use crate::counter6::END as B;
    pub const ENCAPSULATED: u32 = B;
    pub const PASSED: u32 = B + 1;
    pub const ENCAPSULATED6: u32 = B + 2;
    pub const PASSED6: u32 = B + 3;
    /// One past the last counter.
    pub const END: u32 = B + 4;

    /// Display names, indexed by counter minus [`crate::counter6::END`].
    pub const NAMES: [&str; (END - B) as usize] = [
        "host: encapsulated",
        "host: passed to the vxlan device",
        "ipv6: host: encapsulated",
        "ipv6: host: passed to the vxlan device",
    ];
}

/// IPv6 wire constants.
pub mod wire6 {
    use crate::wire::{ETH_HLEN, UDP_HLEN, VXLAN_HLEN};
    pub const IPV6_HLEN: usize = 40;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const IPPROTO_ICMPV6: u8 = 58;
    /// Bytes VXLAN over IPv6 adds in front of the inner IP header: outer
    /// IPv6 + UDP + VXLAN + inner Ethernet.
    pub const VXLAN6_OVERHEAD: usize = IPV6_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
}
const _: () = assert!(wire6::VXLAN6_OVERHEAD == 70);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), padded explicitly, and valid for any bit pattern.
    unsafe impl aya::Pod for super::PeerValue {}
    unsafe impl aya::Pod for super::Ipv4LpmData {}
    unsafe impl aya::Pod for super::VtepValue {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::LocalEndpoint {}
    unsafe impl aya::Pod for super::PeerValue6 {}
    unsafe impl aya::Pod for super::Ipv6LpmData {}
    unsafe impl aya::Pod for super::NodeConfig6 {}
}
