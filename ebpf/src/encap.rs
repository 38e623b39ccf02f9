//! TC encapsulation: IPv4 from containers to a remote subnet leaves as VXLAN,
//! exactly as the peer's kernel `flannel.N` expects it.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_REDIRECT,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect, bpf_redirect_neigh,
    },
    programs::TcContext,
    EbpfContext,
};
use weft_common::{
    config_flags, counter,
    wire::{ETH_HLEN, ETH_P_IPV4, IPPROTO_UDP, VXLAN_FLAG_I, VXLAN_OVERHEAD},
    LocalEndpoint, NodeConfig, PeerValue,
};

use crate::{
    maps::{self, Verdict},
    parse::{off, EthHdr, Ipv4Hdr, Packet, UdpHdr, VxlanHdr},
};

const AF_INET: u8 = 2;

/// `adjust_room` flags. The ENCAP flags make the kernel treat the skb as a UDP
/// tunnel so GSO packets are segmented correctly; L2 length 14 is the inner
/// Ethernet header (the vxlan offload check wants exactly UDP+VXLAN between the
/// outer L4 and the inner MAC header). Built as u64: the L2 length sits in bits
/// 56..63, which the u32 binding constants cannot hold.
const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ((ETH_HLEN as u64 & 0xff) << 56);

/// The 50 bytes inserted between the original Ethernet header and the inner IP
/// header: outer IPv4, UDP, VXLAN and the inner Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
struct VxlanEncap {
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}
const _: () = assert!(core::mem::size_of::<VxlanEncap>() == VXLAN_OVERHEAD);

/// Where the outer frame goes after encapsulation.
enum NextHop {
    /// Neighbour known: outer MACs filled in, plain redirect.
    Resolved {
        ifindex: u32,
        src: [u8; 6],
        dst: [u8; 6],
    },
    /// Route known, neighbour not yet: let `bpf_redirect_neigh` resolve it.
    Unresolved { ifindex: u32 },
}

pub fn encapsulate(ctx: &TcContext) -> Verdict {
    match try_encapsulate(ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_encapsulate(ctx: &TcContext) -> Result<Verdict, Verdict> {
    let cfg = maps::config().ok_or(Verdict::Pass(counter::PASS_NOT_CONFIGURED))?;
    // Headers of a routed skb are normally linear already; pulling is cheap when they are.
    if ctx.data() + ETH_HLEN + core::mem::size_of::<Ipv4Hdr>() > ctx.data_end() {
        let _ = ctx.pull_data((ETH_HLEN + core::mem::size_of::<Ipv4Hdr>()) as u32);
    }
    let eth: EthHdr = ctx.read(0).ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    if eth.proto() != ETH_P_IPV4 {
        return Err(Verdict::Pass(counter::PASS_NOT_IPV4));
    }
    let ip: Ipv4Hdr = ctx
        .read(off::OUTER_IP)
        .ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    let l3_len = ctx.len().saturating_sub(ETH_HLEN as u32);
    let tot_len = ip.tot_len() as u32;
    if ip.version() != 4
        || ip.ihl_bytes() < 20
        || (ip.ihl_bytes() as u32) > tot_len
        || tot_len > l3_len
    {
        // The kernel drops these in ip_rcv; never wrap them into a tunnel.
        return Err(Verdict::Pass(counter::PASS_MALFORMED));
    }
    let peer = *maps::remote_peer(ip.daddr_be).ok_or(Verdict::Pass(counter::PASS_NOT_REMOTE))?;
    learn_sender(ctx, cfg, &eth, &ip);
    let decrement = cfg.flags_ne & config_flags::DECREMENT_TTL != 0;
    if decrement && ip.ttl <= 1 {
        // The kernel path sends the ICMP time-exceeded a router owes the sender.
        return Err(Verdict::Pass(counter::PASS_TTL_EXPIRED));
    }
    // SAFETY: ctx.skb.skb is the live __sk_buff of this invocation.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 && l3_len + VXLAN_OVERHEAD as u32 > cfg.underlay_mtu_ne as u32 {
        // bpf_redirect never fragments: the kernel path fragments or sends
        // "fragmentation needed" instead of silently dropping.
        return Err(Verdict::Pass(counter::PASS_TOO_BIG));
    }
    let next_hop = lookup_underlay(ctx, cfg, &peer).ok_or(Verdict::Pass(counter::PASS_FIB_FAIL))?;

    // Read before adjust_room: afterwards the skb hash would cover the outer header.
    // SAFETY: helper on the live skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let inner_ttl = if decrement { ip.ttl - 1 } else { ip.ttl };

    ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| Verdict::Pass(counter::PASS_HELPER_FAIL))?;

    let outer_len = ctx.len().saturating_sub(ETH_HLEN as u32) as u16;
    let header = build_header(cfg, &peer, &ip, inner_ttl, outer_len, hash);
    // From here on the packet is a VXLAN frame: failures drop it rather than
    // hand a half-built frame to the kernel.
    ctx.store(off::OUTER_IP, &header, 0)
        .map_err(|_| Verdict::Drop(counter::PASS_HELPER_FAIL))?;
    if decrement {
        let inner = ctx
            .ptr_at::<Ipv4Hdr>(off::INNER_IP)
            .ok_or(Verdict::Drop(counter::PASS_HELPER_FAIL))?;
        // SAFETY: bounds checked by ptr_at after adjust_room; TC may write packet data.
        unsafe { (*inner).decrement_ttl() };
    }

    let action = match next_hop {
        NextHop::Resolved { ifindex, src, dst } => {
            let eth = ctx
                .ptr_at::<EthHdr>(0)
                .ok_or(Verdict::Drop(counter::PASS_HELPER_FAIL))?;
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                (*eth).dst = dst;
                (*eth).src = src;
            }
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) }
        }
        NextHop::Unresolved { ifindex } => {
            // SAFETY: NULL params: the kernel resolves the next hop from the outer header.
            unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) }
        }
    };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(Verdict::Drop(counter::PASS_HELPER_FAIL));
    }
    Ok(Verdict::Done(action as i32, counter::ENCAPSULATED))
}

/// On a container's own veth (not the bridge), the sender of a frame bound for a
/// remote subnet is that container and the frame's destination its gateway: what
/// decapsulation needs to hand replies straight to it.
#[inline(always)]
fn learn_sender(ctx: &TcContext, cfg: &NodeConfig, eth: &EthHdr, ip: &Ipv4Hdr) {
    // SAFETY: ctx.skb.skb is the live __sk_buff of this invocation.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if ifindex == 0 || ifindex == cfg.bridge_ifindex_ne || eth.src[0] & 1 != 0 {
        return;
    }
    maps::learn_local(
        ip.saddr_be,
        &LocalEndpoint {
            host_ifindex_ne: ifindex,
            mac: eth.src,
            gateway_mac: eth.dst,
        },
    );
}

/// The outer route to the peer's VTEP, looked up as our own output would be.
#[inline(always)]
fn lookup_underlay(ctx: &TcContext, cfg: &NodeConfig, peer: &PeerValue) -> Option<NextHop> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid value.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    params.ifindex = cfg.underlay_ifindex_ne;
    // tot_len 0: skip the kernel's MTU check, ours above knows about GSO.
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.vtep_ip_be);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(peer.vtep_ip_be);
    // SAFETY: params lives on our stack for the duration of the call.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Some(NextHop::Resolved {
            ifindex: params.ifindex,
            src: params.smac,
            dst: params.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Some(NextHop::Unresolved {
            ifindex: params.ifindex,
        }),
        _ => None,
    }
}

#[inline(always)]
fn build_header(
    cfg: &NodeConfig,
    peer: &PeerValue,
    inner: &Ipv4Hdr,
    inner_ttl: u8,
    outer_len: u16,
    hash: u32,
) -> VxlanEncap {
    let ttl = if cfg.flags_ne & config_flags::TTL_INHERIT != 0 {
        inner_ttl
    } else {
        64
    };
    // SAFETY: plain helper call.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: ecn_encapsulate(inner.tos),
        tot_len_be: outer_len.to_be_bytes(),
        id_be: id.to_be_bytes(),
        // DF clear, as the kernel vxlan device flannel creates sends it.
        frag_off_be: [0, 0],
        ttl,
        protocol: IPPROTO_UDP,
        check_be: [0, 0],
        saddr_be: cfg.vtep_ip_be,
        daddr_be: peer.vtep_ip_be,
    };
    ip.set_checksum();
    let vni = cfg.vni_ne.to_be_bytes();
    VxlanEncap {
        ip,
        udp: UdpHdr {
            source_be: source_port(hash, cfg.sport_min_ne, cfg.sport_max_ne).to_be_bytes(),
            dest_be: cfg.port_be.to_be_bytes(),
            len_be: outer_len.wrapping_sub(20).to_be_bytes(),
            // Zero: allowed for IPv4 (RFC 7348), accepted by Linux receivers.
            check_be: [0, 0],
        },
        vxlan: VxlanHdr {
            flags: VXLAN_FLAG_I,
            reserved1: [0; 3],
            vni_be: [vni[1], vni[2], vni[3]],
            reserved2: 0,
        },
        inner_eth: EthHdr {
            dst: peer.vtep_mac,
            src: cfg.vtep_mac,
            proto_be: ETH_P_IPV4.to_be_bytes(),
        },
    }
}

/// The kernel's `udp_flow_src_port()`: spread flows over [min, max).
#[inline(always)]
fn source_port(hash: u32, min: u16, max: u16) -> u16 {
    let (min, max) = if min < max {
        (min as u32, max as u32)
    } else {
        (32768, 61000)
    };
    let h = hash ^ (hash << 16);
    (((h as u64 * (max - min) as u64) >> 32) as u32 + min) as u16
}

/// RFC 6040 as the kernel's `INET_ECN_encapsulate` with outer TOS 0: copy ECT,
/// turn CE into ECT(0).
#[inline(always)]
fn ecn_encapsulate(inner_tos: u8) -> u8 {
    match inner_tos & 0x3 {
        0x3 => 0x2,
        ecn => ecn,
    }
}
