//! TC encapsulation of IPv6: container IPv6 to a remote IPv6 subnet leaves as
//! VXLAN over IPv6, as the peer's `flannel-v6.N` expects it. Reached from
//! [`crate::encap`] only for frames that are not IPv4, so the IPv4 path does
//! no extra work.
//!
//! Over IPv6 the outer UDP checksum is mandatory (RFC 8200 section 8.1;
//! flannel-v6.N has no `udp6zerocsumrx`, so its kernel drops a zero), and is
//! computed from the headers alone as the kernel's local checksum offload
//! does (see [`udp_checksum6`]). GSO packets are the exception that cannot be
//! made right in every case: see `weft_common::config6_flags::UNDERLAY_KEEPS_GSO`.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    programs::TcContext,
};
use weft_common::{
    config6_flags, config_flags, counter, counter6,
    wire::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, UDP_HLEN, VXLAN_FLAG_I, VXLAN_HLEN},
    wire6::{ETH_P_IPV6, IPPROTO_ICMPV6, IPV6_HLEN, VXLAN6_OVERHEAD},
    LocalEndpoint, NodeConfig, NodeConfig6, PeerValue6,
};

use crate::{
    encap::{ecn_encapsulate, flow_hash, on_chosen_vtep, source_port},
    maps::{self, Verdict},
    maps6,
    nexthop::{self, next_hop, words},
    parse::{fold, sum_words, EthHdr, Packet, UdpHdr, VxlanHdr},
    parse6::{in_prefix, is_extension_header, off6, Ipv6Hdr},
};

/// As IPv4's flags, with an IPv6 outer header: the skb becomes a UDP tunnel
/// (`SKB_GSO_UDP_TUNNEL`) whose inner Ethernet header is 14 bytes.
const ENCAP6_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ((ETH_HLEN as u64 & 0xff) << 56);

/// The 70 bytes inserted between the original Ethernet header and the inner
/// IPv6 header: outer IPv6, UDP, VXLAN and the inner Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Vxlan6Encap {
    ip: Ipv6Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}
const _: () = assert!(core::mem::size_of::<Vxlan6Encap>() == VXLAN6_OVERHEAD);

/// The inner packet's headers the TCP header may extend to, read linearly.
const PULL: u32 = (off6::L4 + 20) as u32;

/// Encapsulates an IPv6 frame, or says why not. Frames that are not IPv6 are
/// counted as IPv4's "not ipv4" (not IP at all).
pub fn encapsulate(ctx: &TcContext) -> Verdict {
    match try_encapsulate::<false>(ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// What the host's routing sent into `flannel-v6.N`: see `encap::encapsulate_host`.
pub fn encapsulate_host(ctx: &TcContext) -> Verdict {
    match try_encapsulate::<true>(ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// `HOST`: from the host's routing, as for IPv4 (`encap::try_encapsulate`).
#[inline(always)]
fn try_encapsulate<const HOST: bool>(ctx: &TcContext) -> Result<Verdict, Verdict> {
    if ctx.data() + PULL as usize > ctx.data_end() && ctx.len() >= PULL {
        let _ = ctx.pull_data(PULL);
    }
    // Headers are used in place (references into the packet, valid until
    // adjust_room): copies would not fit the 512-byte stack next to IPv4's.
    let eth = ctx
        .ptr_at::<EthHdr>(0)
        .ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at; nothing changes the packet before adjust_room.
    let eth = unsafe { &*eth };
    if eth.proto() != ETH_P_IPV6 {
        return Err(Verdict::Pass(counter::PASS_NOT_IPV4));
    }
    let ip = ctx
        .ptr_at::<Ipv6Hdr>(ETH_HLEN)
        .ok_or(Verdict::Pass(counter6::PASS_MALFORMED))?;
    // SAFETY: as for eth.
    let ip = unsafe { &*ip };
    let cfg = maps::config().ok_or(Verdict::Pass(counter6::PASS_NOT_CONFIGURED))?;
    let cfg6 = maps6::config6().ok_or(Verdict::Pass(counter6::PASS_NOT_CONFIGURED))?;
    // SAFETY: ctx.skb.skb is the live __sk_buff of this invocation. (VLAN
    // metadata was checked before the IPv4 path handed the frame over.)
    let (ifindex, gso_size) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.ingress_ifindex, skb.gso_size)
    };
    let l3_len = ctx.len().saturating_sub(ETH_HLEN as u32);
    if ip.version() != 6 || ip.payload_len() as u32 + IPV6_HLEN as u32 > l3_len {
        // The kernel drops these in ipv6_rcv; never wrap them into a tunnel.
        return Err(Verdict::Pass(counter6::PASS_MALFORMED));
    }
    let peer = maps6::remote_peer6(ip.daddr_be).ok_or(Verdict::Pass(counter6::PASS_NOT_REMOTE))?;
    if HOST {
        on_chosen_vtep(eth, &peer.vtep_mac)
            .map_err(|_| Verdict::Pass(counter6::PASS_NOT_REMOTE))?;
    } else {
        check_source(cfg, cfg6, ifindex, eth, ip)?;
    }
    if is_extension_header(ip.next_header) || ip.payload_len() == 0 {
        // Extension headers (and BIG TCP's jumbo packets, whose length field
        // is 0): the kernel path parses and forwards them.
        return Err(Verdict::Pass(counter6::PASS_EXT_HEADERS));
    }
    // The host's routing decremented what it forwarded.
    let decrement = !HOST && cfg.flags_ne & config_flags::DECREMENT_TTL != 0;
    if decrement && ip.hop_limit <= 1 {
        // The kernel path sends the ICMPv6 time exceeded a router owes the sender.
        return Err(Verdict::Pass(counter6::PASS_HOP_LIMIT));
    }
    let l4_len = check_size(ctx, cfg, ip, l3_len, gso_size)?;
    if gso_size != 0 && cfg6.flags_ne & config6_flags::UNDERLAY_KEEPS_GSO == 0 {
        // A segmenter on the way would copy one outer checksum into segments
        // of another length; flannel-v6.N marks them SKB_GSO_UDP_TUNNEL_CSUM,
        // which adjust_room cannot.
        return Err(Verdict::Pass(counter6::PASS_GSO_CHECKSUM));
    }
    check_l4(ctx, ip)?;
    // No ID in an IPv6 header.
    let (next_hop, _) = next_hop(
        ctx,
        cfg.underlay_ifindex_ne,
        &cfg6.vtep_ip_be,
        peer.vtep_ip_be,
    )
    .ok_or(Verdict::Pass(counter6::PASS_FIB_FAIL))?;
    let hop_limit = ip.hop_limit - decrement as u8;
    let inner_sum = inner_sum(ip, hop_limit);
    let inner_tc = ip.traffic_class();

    // Read before adjust_room: afterwards the skb hash would cover the outer header.
    // No extension headers here (handed to the kernel above): the L4 header follows.
    let fold = |a: &[u8; 16]| words(a).iter().fold(0, |x, w| x ^ w);
    let l4 = matches!(ip.next_header, IPPROTO_TCP | IPPROTO_UDP);
    let hash = flow_hash(
        ctx,
        fold(&ip.saddr_be),
        fold(&ip.daddr_be),
        ip.next_header,
        l4.then_some(off6::L4),
    );

    ctx.adjust_room(VXLAN6_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP6_FLAGS)
        .map_err(|_| Verdict::Pass(counter6::PASS_HELPER_FAIL))?;

    // From here on the packet is a VXLAN frame: failures drop it rather than
    // hand a half-built frame to the kernel.
    let outer_len = ctx.len().saturating_sub((ETH_HLEN + IPV6_HLEN) as u32) as u16;
    let h = ctx
        .ptr_at::<Vxlan6Encap>(ETH_HLEN)
        .ok_or(Verdict::Drop(counter6::DROP_HELPER_FAIL))?;
    // SAFETY: bounds checked by ptr_at after adjust_room; TC may write packet data.
    unsafe {
        write_header(&mut *h, cfg, cfg6, peer, inner_tc, outer_len, hash);
        (*h).udp.check_be = udp_checksum6(&*h, inner_sum, l4_len).to_be_bytes();
    }
    if decrement {
        let p = ctx
            .ptr_at::<Ipv6Hdr>(off6::INNER_IP)
            .ok_or(Verdict::Drop(counter6::DROP_HELPER_FAIL))?;
        // SAFETY: as above. The outer checksum was computed over the decremented header.
        unsafe { (*p).decrement_hop_limit() };
    }
    nexthop::redirect(ctx, next_hop)
        .map(|action| Verdict::Done(action, counter6::ENCAPSULATED))
        .ok_or(Verdict::Drop(counter6::DROP_HELPER_FAIL))
}

/// The source must be the IPv6 address bound to the port (and MAC) the frame
/// came in on, as for IPv4: see `encap::check_source`.
#[inline(always)]
fn check_source(
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    ifindex: u32,
    eth: &EthHdr,
    ip: &Ipv6Hdr,
) -> Result<(), Verdict> {
    let on_bridge = ifindex == cfg.bridge_ifindex_ne;
    if let Some(bound) = maps6::local_endpoint6(&ip.saddr_be) {
        return bound_source(&bound, on_bridge, ifindex, eth);
    }
    // A zero prefix length (subnet not known yet) leaves every unbound source to the kernel.
    if cfg6.subnet_prefix_len == 0
        || in_prefix(&ip.saddr_be, &cfg6.subnet_be, cfg6.subnet_prefix_len)
    {
        Err(Verdict::Pass(counter6::PASS_SOURCE_UNBOUND))
    } else {
        // Outside our subnet, link-local included (the kernel never forwards those).
        Err(Verdict::Drop(counter6::DROP_SOURCE_OUTSIDE))
    }
}

#[inline(always)]
fn bound_source(
    bound: &LocalEndpoint,
    on_bridge: bool,
    ifindex: u32,
    eth: &EthHdr,
) -> Result<(), Verdict> {
    if !on_bridge && bound.host_ifindex_ne != ifindex {
        return Err(Verdict::Drop(counter6::DROP_SOURCE_OTHER_PORT));
    }
    if bound.mac == eth.src {
        return Ok(());
    }
    Err(Verdict::Pass(counter6::PASS_SOURCE_UNBOUND))
}

/// Whether the packet, once encapsulated, fits the underlay (`bpf_redirect`
/// never fragments; the kernel path sends "packet too big"). Returns the L4
/// length of one packet on the wire: the whole payload, or for GSO one
/// segment's (L4 header + `gso_size`), which the outer checksum is computed for.
#[inline(always)]
fn check_size(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &Ipv6Hdr,
    l3_len: u32,
    gso_size: u32,
) -> Result<u32, Verdict> {
    let mtu = cfg.underlay_mtu_ne as u32;
    let overhead = VXLAN6_OVERHEAD as u32;
    if ip.payload_len() as u32 + overhead > 0xffff {
        // The outer payload length would not fit its 16 bits.
        return Err(Verdict::Pass(counter6::PASS_TOO_BIG));
    }
    if gso_size == 0 {
        if l3_len + overhead > mtu {
            return Err(Verdict::Pass(counter6::PASS_TOO_BIG));
        }
        return Ok(ip.payload_len() as u32);
    }
    let l4_header = if ip.next_header == IPPROTO_TCP {
        // Data offset: the high nibble of byte 12 of the TCP header.
        let doff: u8 = ctx
            .load(off6::L4 + 12)
            .map_err(|_| Verdict::Pass(counter6::PASS_MALFORMED))?;
        ((doff >> 4) as u32) * 4
    } else {
        UDP_HLEN as u32
    };
    if IPV6_HLEN as u32 + l4_header + gso_size + overhead > mtu {
        return Err(Verdict::Pass(counter6::PASS_GSO_TOO_BIG));
    }
    Ok(l4_header + gso_size)
}

/// Whether the inner L4 bytes sum to what [`udp_checksum6`] assumes: a TCP,
/// UDP or ICMPv6 checksum (each covers the IPv6 pseudo-header) that is
/// correct or still pending (CHECKSUM_PARTIAL, completed before the wire).
/// UDP with checksum 0 (invalid over IPv6) and other protocols would need
/// the payload summed: the kernel path does that.
#[inline(always)]
fn check_l4(ctx: &TcContext, ip: &Ipv6Hdr) -> Result<(), Verdict> {
    match ip.next_header {
        IPPROTO_TCP | IPPROTO_ICMPV6 => Ok(()),
        IPPROTO_UDP => {
            let at = off6::L4 + 6;
            let check: [u8; 2] = ctx
                .read(at)
                .or_else(|| ctx.load(at).ok())
                .ok_or(Verdict::Pass(counter6::PASS_MALFORMED))?;
            if check == [0, 0] {
                return Err(Verdict::Pass(counter6::PASS_CHECKSUM));
            }
            Ok(())
        }
        _ => Err(Verdict::Pass(counter6::PASS_CHECKSUM)),
    }
}

/// Writes the 70 bytes in place (the IPv6 path's stack is too small for a copy).
#[inline(always)]
fn write_header(
    h: &mut Vxlan6Encap,
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    peer: &PeerValue6,
    inner_tc: u8,
    outer_len: u16,
    hash: u32,
) {
    // Traffic class: ECN from the inner packet (RFC 6040, CE -> ECT(0)), DSCP
    // 0; flow label 0: flannel-v6.N's (no `tos`, no `flowlabel`) settings.
    let tc = ecn_encapsulate(inner_tc);
    h.ip.vtc_flow = [0x60 | (tc >> 4), tc << 4, 0, 0];
    h.ip.payload_len_be = outer_len.to_be_bytes();
    h.ip.next_header = IPPROTO_UDP;
    // `ttl auto`: the route's hop limit, the underlay's default.
    h.ip.hop_limit = cfg6.outer_hop_limit;
    h.ip.saddr_be = cfg6.vtep_ip_be;
    h.ip.daddr_be = peer.vtep_ip_be;
    h.udp.source_be = source_port(hash, cfg.sport_min_ne, cfg.sport_max_ne).to_be_bytes();
    h.udp.dest_be = cfg.port_ne.to_be_bytes();
    h.udp.len_be = outer_len.to_be_bytes();
    h.udp.check_be = [0, 0];
    let vni = cfg.vni_ne.to_be_bytes();
    h.vxlan.flags = VXLAN_FLAG_I;
    h.vxlan.reserved1 = [0; 3];
    h.vxlan.vni_be = [vni[1], vni[2], vni[3]];
    h.vxlan.reserved2 = 0;
    h.inner_eth.dst = peer.vtep_mac;
    h.inner_eth.src = cfg6.vtep_mac;
    h.inner_eth.proto_be = ETH_P_IPV6.to_be_bytes();
}

/// What the inner IPv6 header (with hop limit `hop_limit`) and its L4 part
/// add to the outer checksum, from the headers alone (the kernel's `lco_csum`
/// identity): a correct or pending TCP/UDP/ICMPv6 checksum makes the L4 bytes
/// sum to the complement of the inner pseudo-header, which holds the
/// addresses, the length and the next header; what stays of the IPv6 header
/// is its first two words and the next-header/hop-limit word, minus the next
/// header. Not summed yet, not folded.
#[inline(always)]
fn inner_sum(ip: &Ipv6Hdr, hop_limit: u8) -> u32 {
    let v = ip.vtc_flow;
    u16::from_be_bytes([v[0], v[1]]) as u32
        + u16::from_be_bytes([v[2], v[3]]) as u32
        + u16::from_be_bytes([ip.next_header, hop_limit]) as u32
        + (0xffff - ip.next_header as u32)
}

/// The outer UDP checksum of one packet on the wire whose inner L4 part is
/// `l4_len` bytes: pseudo-header, UDP, VXLAN and inner Ethernet summed here,
/// the inner packet's share given ([`inner_sum`]). For a GSO packet `l4_len`
/// is one full segment's: the value every full-size segment carries (see
/// `config6_flags::UNDERLAY_KEEPS_GSO` for why that is only safe on an
/// underlay that never segments).
#[inline(always)]
fn udp_checksum6(h: &Vxlan6Encap, inner_sum: u32, l4_len: u32) -> u16 {
    // UDP + VXLAN + inner Ethernet + inner IPv6 header + L4; below 64 KiB (check_size).
    let udp_len = (UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV6_HLEN) as u32 + l4_len;
    let sum = h.ip.pseudo_header_sum(IPPROTO_UDP, udp_len)
        + u16::from_be_bytes(h.udp.source_be) as u32
        + u16::from_be_bytes(h.udp.dest_be) as u32
        + udp_len
        + inner_sum;
    const REST: usize = VXLAN_HLEN + ETH_HLEN;
    // SAFETY: vxlan and inner_eth are adjacent byte arrays in a repr(C) struct.
    let rest: &[u8; REST] = unsafe { &*(&h.vxlan as *const VxlanHdr as *const [u8; REST]) };
    match fold(sum_words(rest, sum)) {
        // 0 means "no checksum" (invalid over IPv6): a computed 0 is sent as its equivalent.
        0 => 0xffff,
        c => c,
    }
}
