//! VXLAN decapsulation on the underlay: XDP (default on physical NICs) and TC
//! ingress (default on veth, where XDP costs TSO on the peer).
//!
//! Both hooks share [`classify`], so they accept exactly the same packets.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT,
    },
    helpers::generated::{
        bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_head,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use weft_common::{
    config_flags, counter,
    wire::{ETH_P_IPV4, IPPROTO_TCP, IPPROTO_UDP, UDP_HLEN, VXLAN_FLAG_I, VXLAN_OVERHEAD},
    LocalEndpoint, NodeConfig,
};

use aya_log_ebpf::debug;

use crate::{
    maps::{self, Verdict},
    parse::{header, off, EthHdr, Ipv4Hdr, Packet, UdpHdr, VxlanHdr},
};

const AF_INET: u8 = 2;
const ECN_NOT_ECT: u8 = 0;
const ECN_CE: u8 = 3;

/// Shrinks the frame to [outer Ethernet][inner IP]: the outer Ethernet header
/// already carries our NIC's MAC as destination.
const DECAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64;

/// What [`classify`] found in a frame to decapsulate.
struct Accepted {
    cfg: &'static NodeConfig,
    /// Outer CE over inner ECT: the inner header must carry CE (RFC 6040).
    set_ce: bool,
    /// The inner packet is an IPv4 fragment.
    inner_fragment: bool,
}

/// Decides whether a frame is VXLAN for us from a known peer. `Ok` means
/// "decapsulate"; `Err` carries what to do instead.
#[inline(always)]
fn classify<C: Packet>(ctx: &C) -> Result<Accepted, Verdict> {
    let cfg = maps::config().ok_or(Verdict::Pass(counter::PASS_NOT_CONFIGURED))?;
    // The headers are read in place, not copied: nothing changes the packet
    // here, and a copy of every header byte (one load and store each, as BPF
    // has no unaligned loads) was a good part of the program's own time.
    let eth: &EthHdr = header(ctx, 0).ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    if eth.proto() != ETH_P_IPV4 {
        return Err(Verdict::Pass(counter::PASS_NOT_IPV4));
    }
    let ip: &Ipv4Hdr = header(ctx, off::OUTER_IP).ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    if ip.version() != 4 || ip.ihl_bytes() < 20 {
        return Err(Verdict::Pass(counter::PASS_MALFORMED));
    }
    if ip.protocol != IPPROTO_UDP || ip.daddr_be != cfg.vtep_ip_be {
        return Err(Verdict::Pass(counter::PASS_NOT_VXLAN));
    }
    if ip.is_fragment() {
        // The kernel reassembles and flannel.N decapsulates.
        return Err(Verdict::Pass(counter::PASS_FRAGMENT));
    }
    if ip.ihl_bytes() != 20 {
        // Outer IP options: valid, rare; flannel.N decapsulates them.
        return Err(Verdict::Pass(counter::PASS_IP_OPTIONS));
    }
    if !ip.checksum_ok() {
        // ip_rcv drops it on the kernel path.
        return Err(Verdict::Pass(counter::PASS_MALFORMED));
    }
    let udp: &UdpHdr = header(ctx, off::OUTER_UDP).ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    if udp.dest_be != cfg.port_ne.to_be_bytes() {
        return Err(Verdict::Pass(counter::PASS_NOT_VXLAN));
    }
    // VXLAN aimed at us. From here on, whatever is not deliverable is dropped.
    let sender = ip.saddr_be;
    from_peer(ctx, cfg, ip).map_err(|refusal| refuse_sender(ctx, sender, refusal))
}

/// Whether a sender without a lease is refused as such, whatever else is wrong
/// with its frame. The lease is looked up only for refused frames: an accepted
/// one's inner source lies in a subnet leased to this sender, which proves the
/// lease, since the agent adds a VTEP before its subnets and removes it only
/// after the last of them (a hash lookup less for every packet delivered).
#[inline(always)]
fn refuse_sender<C: Packet>(ctx: &C, sender: [u8; 4], refusal: Verdict) -> Verdict {
    if maps::is_known_vtep(sender) {
        return refusal;
    }
    debug!(
        ctx,
        "decap drop: VXLAN from {:i}, which holds no lease", sender
    );
    Verdict::Drop(counter::DROP_UNKNOWN_SOURCE)
}

/// [`classify`] for VXLAN aimed at us: the VXLAN header, the inner frame and
/// who may send it.
#[inline(always)]
fn from_peer<C: Packet>(
    ctx: &C,
    cfg: &'static NodeConfig,
    ip: &Ipv4Hdr,
) -> Result<Accepted, Verdict> {
    let vxlan: &VxlanHdr = header(ctx, off::VXLAN).ok_or(Verdict::Drop(counter::DROP_MALFORMED))?;
    if vxlan.flags & VXLAN_FLAG_I == 0 {
        return Err(Verdict::Drop(counter::DROP_MALFORMED));
    }
    if vxlan.vni() != cfg.vni_ne {
        debug!(
            ctx,
            "decap drop: VNI {} from {:i}, ours is {}",
            vxlan.vni(),
            ip.saddr_be,
            cfg.vni_ne
        );
        return Err(Verdict::Drop(counter::DROP_WRONG_VNI));
    }
    let frame_l3 = ctx.frame_len().saturating_sub(off::OUTER_IP);
    let tot_len = ip.tot_len() as usize;
    if tot_len < VXLAN_OVERHEAD + 20 || tot_len > frame_l3 {
        return Err(Verdict::Drop(counter::DROP_MALFORMED));
    }
    let inner_eth: &EthHdr =
        header(ctx, off::INNER_ETH).ok_or(Verdict::Drop(counter::DROP_MALFORMED))?;
    if inner_eth.proto() != ETH_P_IPV4 || inner_eth.dst != cfg.vtep_mac {
        // IPv6 of a dual-stack peer, or a frame flannel.N would judge: not ours to decide.
        return Err(Verdict::Pass(counter::PASS_INNER_NOT_OURS));
    }
    let inner: &Ipv4Hdr =
        header(ctx, off::INNER_IP).ok_or(Verdict::Drop(counter::DROP_MALFORMED))?;
    if inner.version() != 4 || inner.ihl_bytes() < 20 {
        return Err(Verdict::Drop(counter::DROP_MALFORMED));
    }
    // The sender may only speak for the subnets it leased: the TC hook runs
    // before rp_filter, and rp_filter would only ask for *some* remote subnet.
    match maps::remote_peer(inner.saddr_be) {
        Some(owner) if owner.vtep_ip_be == ip.saddr_be => {}
        _ => {
            debug!(
                ctx,
                "decap drop: inner source {:i} from VTEP {:i}, outside the subnets it leased",
                inner.saddr_be,
                ip.saddr_be
            );
            return Err(Verdict::Drop(counter::DROP_INNER_SOURCE));
        }
    }
    // RFC 6040 as the kernel's INET_ECN_decapsulate: CE over Not-ECT is
    // dropped, CE over ECT marks the inner packet, everything else is kept.
    let set_ce = match (ip.ecn(), inner.ecn()) {
        (ECN_CE, ECN_NOT_ECT) => {
            debug!(
                ctx,
                "decap drop: CE over Not-ECT, inner {:i} from VTEP {:i}",
                inner.saddr_be,
                ip.saddr_be
            );
            return Err(Verdict::Drop(counter::DROP_ECN));
        }
        (ECN_CE, inner) => inner != ECN_CE,
        _ => false,
    };
    Ok(Accepted {
        cfg,
        set_ce,
        inner_fragment: inner.is_fragment(),
    })
}

/// Writes CE into the inner IPv4 header (still at its encapsulated offset).
#[inline(always)]
fn mark_ce<C: Packet>(ctx: &C) -> Result<(), Verdict> {
    let inner = ctx
        .ptr_at::<Ipv4Hdr>(off::INNER_IP)
        .ok_or(Verdict::Drop(counter::DROP_MALFORMED))?;
    // SAFETY: bounds checked by ptr_at; both hooks may write packet data.
    unsafe { (*inner).set_ce() };
    maps::count(counter::ECN_CE_SET);
    Ok(())
}

pub fn xdp_decapsulate(ctx: &XdpContext) -> Verdict {
    let accepted = match classify(ctx) {
        Ok(a) => a,
        Err(Verdict::Pass(counter::PASS_NOT_IPV4)) => return crate::decap6::xdp_decapsulate(ctx),
        Err(v) => return v,
    };
    if accepted.inner_fragment {
        // Decapsulated here, inner fragments reach the stack on the underlay
        // device and were lost in tests (the TC hook delivers them straight to
        // the container): flannel.N decapsulates them as on the kernel path.
        return Verdict::Pass(counter::PASS_FRAGMENT);
    }
    let Some(outer) = ctx.read::<EthHdr>(0) else {
        return Verdict::Pass(counter::PASS_MALFORMED);
    };
    if accepted.set_ce {
        if let Err(v) = mark_ce(ctx) {
            return v;
        }
    }
    // SAFETY: the context pointer is the live xdp_md of this invocation.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), VXLAN_OVERHEAD as i32) } != 0 {
        // Only the CE mark may have changed, which the kernel's vxlan would set too.
        return Verdict::Pass(counter::PASS_HELPER_FAIL);
    }
    let Some(eth) = ctx.ptr_at::<EthHdr>(0) else {
        // Unreachable after classify checked the inner headers; the verifier needs the check.
        return Verdict::Drop(counter::DROP_MALFORMED);
    };
    // The inner destination is our VTEP MAC, which the NIC does not own: the stack
    // would mark the frame PACKET_OTHERHOST and drop it. Address it to the NIC.
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = accepted.cfg.underlay_mac;
        (*eth).src = outer.src;
    }
    Verdict::Done(xdp_action::XDP_PASS as i32, counter::DECAPSULATED)
}

pub fn tc_decapsulate(ctx: &TcContext) -> Verdict {
    // Headers of a received skb may sit in fragments; the ones we read must be linear.
    let need = (off::INNER_IP + core::mem::size_of::<Ipv4Hdr>()) as u32;
    if ctx.data() + need as usize > ctx.data_end() && ctx.len() >= need {
        let _ = ctx.pull_data(need);
    }
    let accepted = match classify(ctx) {
        Ok(a) => a,
        Err(Verdict::Pass(counter::PASS_NOT_IPV4)) => return crate::decap6::tc_decapsulate(ctx),
        Err(v) => return v,
    };
    if accepted.set_ce {
        if let Err(v) = mark_ce(ctx) {
            return v;
        }
    }
    if ctx
        .adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, DECAP_FLAGS)
        .is_err()
    {
        // Only the CE mark may have changed, which the kernel's vxlan would set too.
        return Verdict::Pass(counter::PASS_HELPER_FAIL);
    }
    // Decapsulated: the frame is now an ordinary IPv4 frame addressed to this host.
    // Forward it ourselves when the route and neighbour are known, else let the stack.
    // A down bridge delivers to none of its containers: the FIB (which lost
    // the bridge's routes with it) or the stack decides, as on the kernel path.
    let bridge_up = accepted.cfg.flags_ne & config_flags::BRIDGE_DOWN == 0;
    let (action, delivered) = forward_inner(ctx, bridge_up);
    if delivered {
        maps::count(counter::DELIVERED_TO_CONTAINER);
    }
    Verdict::Done(action, counter::DECAPSULATED)
}

/// Routes the decapsulated packet like the stack would (TTL included), or
/// returns TC_ACT_OK so the stack does it. `true`: handed straight to a local container.
#[inline(always)]
fn forward_inner(ctx: &TcContext, bridge_up: bool) -> (i32, bool) {
    let Some(ip) = ctx.ptr_at::<Ipv4Hdr>(off::OUTER_IP) else {
        return (TC_ACT_OK, false);
    };
    // SAFETY: bounds checked by ptr_at.
    let (saddr, daddr, tos, ttl) =
        unsafe { ((*ip).saddr_be, (*ip).daddr_be, (*ip).tos, (*ip).ttl) };
    if ttl <= 1 {
        return (TC_ACT_OK, false);
    }
    if let Some(ep) = maps::local_endpoint(daddr).filter(|_| bridge_up) {
        match fits(ctx, ep.host_ifindex_ne) {
            Some(true) if deliver_to_container(ctx, &ep) => return (TC_ACT_REDIRECT, true),
            Some(false) => {
                // The stack fragments or answers "fragmentation needed", as for flannel.N.
                maps::count(counter::DECAP_TOO_BIG);
                return (TC_ACT_OK, false);
            }
            // The port is gone (a stale binding) or refused: the routed path knows the way.
            _ => {}
        }
    }
    (route_inner(ctx, saddr, daddr, tos), false)
}

/// Hands the packet to the container's namespace (`bpf_redirect_peer` into the
/// peer of its host-side veth), as if the bridge had delivered it: through the
/// bridge, a GRO packet that still carries its tunnel GSO marks is segmented in
/// software (the bridge has no tunnel offloads), which costs most of the throughput.
#[inline(always)]
fn deliver_to_container(ctx: &TcContext, ep: &LocalEndpoint) -> bool {
    let Some(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return false;
    };
    let Some(ip) = ctx.ptr_at::<Ipv4Hdr>(off::OUTER_IP) else {
        return false;
    };
    // Only records the target; decided before the frame is touched, so a
    // refusal leaves it intact for the routed path.
    // SAFETY: plain helper call.
    if unsafe { bpf_redirect_peer(ep.host_ifindex_ne, 0) } != TC_ACT_REDIRECT as i64 {
        return false;
    }
    // SAFETY: bounds checked by ptr_at; TC may write packet data.
    unsafe {
        (*eth).dst = ep.mac;
        (*eth).src = ep.gateway_mac;
        (*ip).decrement_ttl();
    }
    true
}

/// Whether the decapsulated packet fits port `ifindex`: `None` when the port
/// does not exist (a binding older than the container). `bpf_check_mtu`
/// returns a positive code for "too big" and passes any GSO packet, whose
/// segments (inner IP and L4 headers plus `gso_size`) are checked here.
#[inline(always)]
fn fits(ctx: &TcContext, ifindex: u32) -> Option<bool> {
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
    let ip: Ipv4Hdr = ctx.read(off::OUTER_IP)?;
    let ihl = ip.ihl_bytes() & 0x3c;
    let l4_header = if ip.protocol == IPPROTO_TCP {
        let doff: u8 = ctx.load(off::OUTER_IP + ihl + 12).ok()?;
        ((doff >> 4) as u32) * 4
    } else {
        UDP_HLEN as u32
    };
    Some(ihl as u32 + l4_header + gso_size <= mtu)
}

/// The FIB's next hop for the inner packet, or TC_ACT_OK for the stack.
#[inline(always)]
fn route_inner(ctx: &TcContext, saddr: [u8; 4], daddr: [u8; 4], tos: u8) -> i32 {
    // SAFETY: plain data; all-zero is valid.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    // SAFETY: ctx.skb.skb is the live __sk_buff.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    params.__bindgen_anon_2.tos = tos;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
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
    let Some(eth) = ctx.ptr_at::<EthHdr>(0) else {
        return TC_ACT_OK;
    };
    let Some(ip) = ctx.ptr_at::<Ipv4Hdr>(off::OUTER_IP) else {
        return TC_ACT_OK;
    };
    // SAFETY: bounds checked by ptr_at; TC may write packet data.
    unsafe {
        (*eth).dst = params.dmac;
        (*eth).src = params.smac;
        (*ip).decrement_ttl();
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(params.ifindex, 0) };
    if action == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_OK
    }
}
