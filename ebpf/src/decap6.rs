//! VXLAN-over-IPv6 decapsulation, on the same hooks as IPv4 (XDP and TC
//! ingress of the underlay). Reached from [`crate::decap`] only for frames
//! that are not IPv4. The checks are IPv4's ([`classify`]): our address, our
//! port, a known VTEP, the I flag and our VNI, an inner source leased by the
//! sending VTEP, RFC 6040; plus IPv6's own: a zero outer UDP checksum is
//! dropped (as flannel-v6.N's kernel does), extension headers and inner hop
//! limits that forwarding would expire go to the kernel.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT,
    },
    helpers::generated::{
        bpf_check_mtu, bpf_csum_update, bpf_fib_lookup, bpf_redirect, bpf_redirect_peer,
        bpf_xdp_adjust_head,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use weft_common::{
    counter, counter6,
    wire::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, UDP_HLEN, VXLAN_FLAG_I},
    wire6::{ETH_P_IPV6, IPV6_HLEN, VXLAN6_OVERHEAD},
    LocalEndpoint, NodeConfig, NodeConfig6,
};

use crate::{
    maps::{self, Verdict},
    maps6,
    nexthop::words,
    parse::{header, EthHdr, Packet, UdpHdr, VxlanHdr},
    parse6::{is_extension_header, off6, Ipv6Hdr},
};

const AF_INET6: u8 = 10;
const ECN_NOT_ECT: u8 = 0;
const ECN_CE: u8 = 3;

/// Shrinks the frame to [outer Ethernet][inner IPv6]; both IPv6, so the skb's
/// protocol stays.
const DECAP6_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64;

/// Headers read linearly: everything up to the inner IPv6 header's end.
const PULL: u32 = (off6::INNER_IP + IPV6_HLEN) as u32;

/// What [`classify`] found in a frame to decapsulate.
struct Accepted {
    /// The underlay NIC's MAC: the destination of frames passed to the stack.
    underlay_mac: [u8; 6],
    /// Outer CE over inner ECT: the inner header must carry CE (RFC 6040).
    set_ce: bool,
}

/// Decides whether a frame is VXLAN over IPv6 for us from a known peer. `Ok`
/// means "decapsulate"; `Err` carries what to do instead.
#[inline(always)]
fn classify<C: Packet>(ctx: &C) -> Result<Accepted, Verdict> {
    // Headers in place, as IPv4's classify reads them: nothing changes the packet here.
    let eth: &EthHdr = header(ctx, 0).ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    if eth.proto() != ETH_P_IPV6 {
        return Err(Verdict::Pass(counter::PASS_NOT_IPV4));
    }
    let cfg = maps::config().ok_or(Verdict::Pass(counter6::PASS_NOT_CONFIGURED))?;
    let cfg6 = maps6::config6().ok_or(Verdict::Pass(counter6::PASS_NOT_CONFIGURED))?;
    let ip: &Ipv6Hdr =
        header(ctx, off6::OUTER_IP).ok_or(Verdict::Pass(counter6::PASS_MALFORMED))?;
    if ip.version() != 6 {
        return Err(Verdict::Pass(counter6::PASS_MALFORMED));
    }
    if ip.daddr_be != cfg6.vtep_ip_be {
        return Err(Verdict::Pass(counter6::PASS_NOT_VXLAN));
    }
    if is_extension_header(ip.next_header) {
        // A fragment header among them: the kernel reassembles and flannel-v6.N decapsulates.
        return Err(Verdict::Pass(counter6::PASS_EXT_HEADERS));
    }
    if ip.next_header != IPPROTO_UDP {
        return Err(Verdict::Pass(counter6::PASS_NOT_VXLAN));
    }
    let udp: &UdpHdr =
        header(ctx, off6::OUTER_UDP).ok_or(Verdict::Pass(counter6::PASS_MALFORMED))?;
    if udp.dest_be != cfg.port_ne.to_be_bytes() {
        return Err(Verdict::Pass(counter6::PASS_NOT_VXLAN));
    }
    // VXLAN aimed at us. From here on, whatever is not deliverable is dropped.
    if udp.check_be == [0, 0] {
        // udp6 drops it before flannel-v6.N sees it (no udp6zerocsumrx).
        return Err(Verdict::Drop(counter6::DROP_ZERO_CHECKSUM));
    }
    // A copy on the stack: the map key must not be the packet itself.
    let sender = ip.saddr_be;
    from_peer(ctx, cfg, cfg6, ip).map_err(|refusal| refuse_sender(&sender, refusal))
}

/// IPv4's `refuse_sender`: a sender without a lease is refused as such, and
/// the lease is looked up only for refused frames (an accepted one's inner
/// source lies in a subnet leased to this sender).
#[inline(always)]
fn refuse_sender(sender: &[u8; 16], refusal: Verdict) -> Verdict {
    if maps6::is_known_vtep6(sender) {
        refusal
    } else {
        Verdict::Drop(counter6::DROP_UNKNOWN_SOURCE)
    }
}

/// [`classify`] for VXLAN aimed at us: the VXLAN header, the inner frame and
/// who may send it.
#[inline(always)]
fn from_peer<C: Packet>(
    ctx: &C,
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    ip: &Ipv6Hdr,
) -> Result<Accepted, Verdict> {
    let vxlan: &VxlanHdr =
        header(ctx, off6::VXLAN).ok_or(Verdict::Drop(counter6::DROP_MALFORMED))?;
    if vxlan.flags & VXLAN_FLAG_I == 0 {
        return Err(Verdict::Drop(counter6::DROP_MALFORMED));
    }
    if vxlan.vni() != cfg.vni_ne {
        return Err(Verdict::Drop(counter6::DROP_WRONG_VNI));
    }
    let frame_l3 = ctx.frame_len().saturating_sub(off6::OUTER_IP);
    let payload = ip.payload_len() as usize;
    // At least UDP, VXLAN and the inner Ethernet header here; the inner IPv6 header below.
    if payload < VXLAN6_OVERHEAD - IPV6_HLEN || payload + IPV6_HLEN > frame_l3 {
        return Err(Verdict::Drop(counter6::DROP_MALFORMED));
    }
    let inner_eth: &EthHdr =
        header(ctx, off6::INNER_ETH).ok_or(Verdict::Drop(counter6::DROP_MALFORMED))?;
    if inner_eth.proto() != ETH_P_IPV6 || inner_eth.dst != cfg6.vtep_mac {
        // IPv4 inside IPv6 (flannel never sends it), or a frame flannel-v6.N
        // would judge: not ours to decide.
        return Err(Verdict::Pass(counter6::PASS_INNER_NOT_OURS));
    }
    let inner: &Ipv6Hdr =
        header(ctx, off6::INNER_IP).ok_or(Verdict::Drop(counter6::DROP_MALFORMED))?;
    if inner.version() != 6 || payload < VXLAN6_OVERHEAD {
        return Err(Verdict::Drop(counter6::DROP_MALFORMED));
    }
    // The sender may only speak for the subnets it leased (one LPM lookup).
    match maps6::remote_peer6(inner.saddr_be) {
        Some(owner) if owner.vtep_ip_be == ip.saddr_be => {}
        _ => return Err(Verdict::Drop(counter6::DROP_INNER_SOURCE)),
    }
    if is_extension_header(inner.next_header) {
        return Err(Verdict::Pass(counter6::PASS_EXT_HEADERS));
    }
    // RFC 6040 as the kernel's INET_ECN_decapsulate (IP6_ECN_decapsulate).
    let set_ce = match (ip.ecn(), inner.ecn()) {
        (ECN_CE, ECN_NOT_ECT) => return Err(Verdict::Drop(counter6::DROP_ECN)),
        (ECN_CE, inner) => inner != ECN_CE,
        _ => false,
    };
    if inner.hop_limit <= 1 {
        // Forwarding expires it. flannel-v6.N decapsulates it intact and the
        // stack's time exceeded leaves from flannel-v6.N's address, inside
        // our subnet; decapsulated here, the packet would reach the stack on
        // the underlay device and the error would carry the underlay's
        // address, which peers refuse as an inner source.
        return Err(Verdict::Pass(counter6::PASS_HOP_LIMIT));
    }
    Ok(Accepted {
        underlay_mac: cfg.underlay_mac,
        set_ce,
    })
}

/// Writes CE into the inner IPv6 header (still at its encapsulated offset);
/// returns the changed word, before and after.
#[inline(always)]
fn mark_ce<C: Packet>(ctx: &C) -> Result<(u16, u16), Verdict> {
    let inner = ctx
        .ptr_at::<Ipv6Hdr>(off6::INNER_IP)
        .ok_or(Verdict::Drop(counter6::DROP_MALFORMED))?;
    maps::count(counter6::ECN_CE_SET);
    // SAFETY: bounds checked by ptr_at; both hooks may write packet data.
    Ok(unsafe { (*inner).set_ce() })
}

/// Keeps a CHECKSUM_COMPLETE sum (a NIC's sum over the whole frame) right
/// after a 16-bit word at an even offset changed from `old` to `new`; no-op
/// for other skbs. IPv4 needs none: its header checksum absorbs the change.
#[inline(always)]
fn csum_replaced(ctx: &TcContext, (old, new): (u16, u16)) {
    let diff = (!old as u32) + new as u32;
    // SAFETY: plain helper call on the live skb.
    unsafe { bpf_csum_update(ctx.skb.skb, diff) };
}

pub fn xdp_decapsulate(ctx: &XdpContext) -> Verdict {
    let accepted = match classify(ctx) {
        Ok(a) => a,
        Err(v) => return v,
    };
    let Some(outer) = ctx.read::<EthHdr>(0) else {
        return Verdict::Pass(counter6::PASS_MALFORMED);
    };
    if accepted.set_ce {
        if let Err(v) = mark_ce(ctx) {
            return v;
        }
    }
    // SAFETY: the context pointer is the live xdp_md of this invocation.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), VXLAN6_OVERHEAD as i32) } != 0 {
        // Only the CE mark may have changed, which the kernel's vxlan would set too.
        return Verdict::Pass(counter6::PASS_HELPER_FAIL);
    }
    let Some(eth) = ctx.ptr_at::<EthHdr>(0) else {
        // Unreachable after classify checked the inner headers; the verifier needs the check.
        return Verdict::Drop(counter6::DROP_MALFORMED);
    };
    // Addressed to the NIC, or the stack would drop it as PACKET_OTHERHOST.
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = accepted.underlay_mac;
        (*eth).src = outer.src;
    }
    Verdict::Done(xdp_action::XDP_PASS as i32, counter6::DECAPSULATED)
}

pub fn tc_decapsulate(ctx: &TcContext) -> Verdict {
    if ctx.data() + PULL as usize > ctx.data_end() && ctx.len() >= PULL {
        let _ = ctx.pull_data(PULL);
    }
    let accepted = match classify(ctx) {
        Ok(a) => a,
        Err(v) => return v,
    };
    if accepted.set_ce {
        match mark_ce(ctx) {
            Ok(words) => csum_replaced(ctx, words),
            Err(v) => return v,
        }
    }
    if ctx
        .adjust_room(-(VXLAN6_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, DECAP6_FLAGS)
        .is_err()
    {
        // Only the CE mark may have changed, which the kernel's vxlan would set too.
        return Verdict::Pass(counter6::PASS_HELPER_FAIL);
    }
    let (action, delivered) = forward_inner(ctx);
    if delivered {
        maps::count(counter6::DELIVERED_TO_CONTAINER);
    }
    Verdict::Done(action, counter6::DECAPSULATED)
}

/// Routes the decapsulated packet like the stack would (hop limit included),
/// or returns TC_ACT_OK so the stack does it. `true`: handed straight to a
/// local container.
#[inline(always)]
fn forward_inner(ctx: &TcContext) -> (i32, bool) {
    let Some(ip) = ctx.read::<Ipv6Hdr>(ETH_HLEN) else {
        return (TC_ACT_OK, false);
    };
    if ip.hop_limit <= 1 {
        // Unreachable after classify (which hands these to flannel-v6.N); the
        // stack would send the ICMPv6 time exceeded.
        return (TC_ACT_OK, false);
    }
    if let Some(ep) = maps6::local_endpoint6(&ip.daddr_be) {
        match fits(ctx, ep.host_ifindex_ne, &ip) {
            Some(true) if deliver_to_container(ctx, &ep) => return (TC_ACT_REDIRECT, true),
            Some(false) => {
                // The stack answers "packet too big", as for flannel-v6.N.
                maps::count(counter6::DECAP_TOO_BIG);
                return (TC_ACT_OK, false);
            }
            // The port is gone (a stale binding) or refused: the routed path knows the way.
            _ => {}
        }
    }
    (route_inner(ctx, &ip), false)
}

/// Decrements the decapsulated packet's hop limit in place.
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext) -> bool {
    let Some(ip) = ctx.ptr_at::<Ipv6Hdr>(ETH_HLEN) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at; TC may write packet data.
    let words = unsafe { (*ip).decrement_hop_limit() };
    csum_replaced(ctx, words);
    true
}

/// Hands the packet to the container's namespace (`bpf_redirect_peer`), as
/// IPv4's `deliver_to_container` does.
#[inline(always)]
fn deliver_to_container(ctx: &TcContext, ep: &LocalEndpoint) -> bool {
    // Decided before the frame is touched, so a refusal leaves it intact for the routed path.
    // SAFETY: plain helper call.
    if unsafe { bpf_redirect_peer(ep.host_ifindex_ne, 0) } != TC_ACT_REDIRECT as i64 {
        return false;
    }
    write_macs(ctx, ep.mac, ep.gateway_mac) && decrement_hop_limit(ctx)
}

#[inline(always)]
fn write_macs(ctx: &TcContext, dst: [u8; 6], src: [u8; 6]) -> bool {
    let Some(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at; TC may write packet data.
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
    }
    true
}

/// Whether the decapsulated packet fits port `ifindex`: `None` when the port
/// does not exist. GSO packets are judged by their segments (IPv6 header, L4
/// header, `gso_size`).
#[inline(always)]
fn fits(ctx: &TcContext, ifindex: u32, ip: &Ipv6Hdr) -> Option<bool> {
    let mut mtu: u32 = 0;
    // SAFETY: plain helper call; mtu lives on our stack.
    let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu, 0, 0) };
    if rc < 0 {
        return None;
    }
    if rc != BPF_MTU_CHK_RET_SUCCESS as i64 {
        return Some(false);
    }
    // SAFETY: ctx.skb.skb is the live __sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return Some(true);
    }
    let l4_header = if ip.next_header == IPPROTO_TCP {
        let doff: u8 = ctx.load(off6::L4 + 12).ok()?;
        ((doff >> 4) as u32) * 4
    } else {
        UDP_HLEN as u32
    };
    Some(IPV6_HLEN as u32 + l4_header + gso_size <= mtu)
}

/// The FIB's next hop for the inner packet, or TC_ACT_OK for the stack.
#[inline(always)]
fn route_inner(ctx: &TcContext, ip: &Ipv6Hdr) -> i32 {
    // SAFETY: plain data; all-zero is valid.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET6;
    // SAFETY: ctx.skb.skb is the live __sk_buff.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // Traffic class and flow label, as the kernel's flowi6 carries them.
    params.__bindgen_anon_2.flowinfo = u32::from_ne_bytes(ip.vtc_flow) & 0x0fff_ffffu32.to_be();
    params.__bindgen_anon_3.ipv6_src = words(&ip.saddr_be);
    params.__bindgen_anon_4.ipv6_dst = words(&ip.daddr_be);
    // SAFETY: params lives on our stack for the duration of the call.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc as u32 != BPF_FIB_LKUP_RET_SUCCESS {
        // Local delivery, no neighbour yet, or no route: the stack knows best.
        return TC_ACT_OK;
    }
    if !write_macs(ctx, params.dmac, params.smac) || !decrement_hop_limit(ctx) {
        return TC_ACT_OK;
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(params.ifindex, 0) };
    if action == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_OK
    }
}
