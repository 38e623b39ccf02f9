//! TC encapsulation: IPv4 from containers to a remote subnet leaves as VXLAN,
//! exactly as the peer's kernel `flannel.N` expects it.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_set_hash},
    programs::TcContext,
};
use weft_common::{
    config_flags, counter,
    wire::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_HLEN, UDP_HLEN, VXLAN_FLAG_I, VXLAN_HLEN, VXLAN_OVERHEAD,
    },
    NodeConfig, PeerValue,
};

use aya_log_ebpf::debug;

use crate::{
    maps::{self, Verdict},
    nexthop::{self, next_hop},
    parse::{fold, off, sum_words, EthHdr, Ipv4Hdr, Packet, UdpHdr, VxlanHdr},
};

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

pub fn encapsulate(ctx: &TcContext) -> Verdict {
    let cfg = maps::config();
    // SAFETY: ctx.skb.skb is the live __sk_buff of this invocation.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let on_bridge = cfg.is_some_and(|c| c.bridge_ifindex_ne == ifindex);
    // What a port's program handed to the kernel reaches the bridge's next
    // (the bridge passes it up): judged and counted once, on the port.
    if on_bridge && fingerprint(ctx).is_some_and(|f| maps::take_passed(&f)) {
        return Verdict::Seen;
    }
    let verdict = match try_encapsulate::<false>(ctx, cfg, ifindex) {
        // Not IPv4: IPv6 has its own path, so IPv4 does no work for it.
        Err(Verdict::Pass(counter::PASS_NOT_IPV4)) => crate::encap6::encapsulate(ctx),
        Ok(v) | Err(v) => v,
    };
    if !on_bridge && matches!(verdict, Verdict::Pass(_)) {
        if let Some(f) = fingerprint(ctx) {
            maps::remember_passed(f);
        }
    }
    verdict
}

/// Encapsulates what the host's routing sent into `flannel.N` (or
/// `flannel-v6.N`): the host's own traffic to remote containers, and what the
/// kernel forwarded there after a port's program passed it on. The kernel has
/// judged it already (routing, netfilter, the device's MTU, the forwarding
/// TTL), so what is left is the vxlan device's own job, done as it does it;
/// anything the device would treat differently is passed on to it.
pub fn encapsulate_host(ctx: &TcContext) -> Verdict {
    let verdict = match try_encapsulate::<true>(ctx, maps::config(), 0) {
        Err(Verdict::Pass(counter::PASS_NOT_IPV4)) => crate::encap6::encapsulate_host(ctx),
        Ok(v) | Err(v) => v,
    };
    verdict.from_host()
}

/// The frame's length and 32 bytes from its source MAC on (copied with a
/// helper: the bytes may lie beyond the linear part); `None` for runts.
#[inline(always)]
fn fingerprint(ctx: &TcContext) -> Option<maps::Fingerprint> {
    let head: [u64; 4] = ctx.load(6).ok()?;
    Some(maps::Fingerprint {
        len: ctx.len() as u64,
        head,
    })
}

/// `HOST`: the frame comes from the host's routing ([`encapsulate_host`]),
/// not from a container's port: no source to check, no TTL to decrement, and
/// the tunnel endpoint must be the one the kernel's neighbour entry chose.
#[inline(always)]
fn try_encapsulate<const HOST: bool>(
    ctx: &TcContext,
    cfg: Option<&NodeConfig>,
    ifindex: u32,
) -> Result<Verdict, Verdict> {
    let cfg = cfg.ok_or(Verdict::Pass(counter::PASS_NOT_CONFIGURED))?;
    if !HOST && cfg.flags_ne & config_flags::BRIDGE_DOWN != 0 {
        // Its ports are disabled: the bridge drops what they receive.
        return Err(Verdict::Pass(counter::PASS_BRIDGE_DOWN));
    }
    // SAFETY: ctx.skb.skb is the live __sk_buff of this invocation.
    let (vlan_present, gso_size) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.vlan_present, skb.gso_size)
    };
    if vlan_present != 0 {
        // veth receive moved the tag into metadata; bpf_redirect would keep it
        // and the next device would emit it: the kernel path decides instead.
        return Err(Verdict::Pass(counter::PASS_VLAN));
    }
    // Headers of a routed skb are normally linear already; pulling is cheap when they are.
    if ctx.data() + off::INNER_IP > ctx.data_end() {
        let _ = ctx.pull_data(off::INNER_IP as u32);
    }
    let eth: EthHdr = ctx.read(0).ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
    match eth.proto() {
        ETH_P_IPV4 => {}
        ETH_P_8021Q | ETH_P_8021AD => return Err(Verdict::Pass(counter::PASS_VLAN)),
        _ => return Err(Verdict::Pass(counter::PASS_NOT_IPV4)),
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
        || (ip.ihl_bytes() == 20 && !ip.checksum_ok())
    {
        // The kernel drops these in ip_rcv; never wrap them into a tunnel.
        return Err(Verdict::Pass(counter::PASS_MALFORMED));
    }
    let peer = *maps::remote_peer(ip.daddr_be).ok_or(Verdict::Pass(counter::PASS_NOT_REMOTE))?;
    if HOST {
        on_chosen_vtep(&eth, &peer.vtep_mac)?;
    } else {
        check_source(ctx, cfg, ifindex, &eth, &ip)?;
    }
    if ip.ihl_bytes() != 20 {
        // Valid but rare: the kernel path forwards them (and checks the options).
        return Err(Verdict::Pass(counter::PASS_IP_OPTIONS));
    }
    // The host's routing decremented what it forwarded.
    let decrement = !HOST && cfg.flags_ne & config_flags::DECREMENT_TTL != 0;
    if decrement && ip.ttl <= 1 {
        // The kernel path sends the ICMP time-exceeded a router owes the sender.
        return Err(Verdict::Pass(counter::PASS_TTL_EXPIRED));
    }
    check_size(ctx, cfg, &ip, l3_len, gso_size)?;
    // GSO: the kernel's tunnel segmentation copies the outer UDP header into
    // every segment and fills the checksum only for SKB_GSO_UDP_TUNNEL_CSUM,
    // which bpf_skb_adjust_room cannot set: 0 (no checksum) is the only
    // value that stays correct in every segment.
    let l4_sum = if cfg.flags_ne & config_flags::UDP_CSUM != 0 && gso_size == 0 {
        Some(inner_l4_sum(ctx, &ip)?)
    } else {
        None
    };
    let (next_hop, ip_id) = next_hop(
        ctx,
        cfg.underlay_ifindex_ne,
        &cfg.vtep_ip_be,
        peer.vtep_ip_be,
    )
    .ok_or(Verdict::Pass(counter::PASS_FIB_FAIL))?;

    // Read before adjust_room: afterwards the skb hash would cover the outer header.
    let l4 = matches!(ip.protocol, IPPROTO_TCP | IPPROTO_UDP) && !ip.is_fragment();
    let hash = flow_hash(
        ctx,
        u32::from_ne_bytes(ip.saddr_be),
        u32::from_ne_bytes(ip.daddr_be),
        ip.protocol,
        l4.then_some(off::OUTER_IP + IPV4_HLEN),
    );

    ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| Verdict::Pass(counter::PASS_HELPER_FAIL))?;

    let outer_len = ctx.len().saturating_sub(ETH_HLEN as u32) as u16;
    let header = build_header(cfg, &peer, &ip, (outer_len, ip_id), hash, l4_sum);
    // From here on the packet is a VXLAN frame: failures drop it rather than
    // hand a half-built frame to the kernel.
    let at = ctx
        .ptr_at::<VxlanEncap>(off::OUTER_IP)
        .ok_or(Verdict::Drop(counter::DROP_HELPER_FAIL))?;
    // SAFETY: bounds checked by ptr_at after adjust_room (which made the head
    // private); TC may write packet data; VxlanEncap has alignment 1. A direct
    // write spares bpf_skb_store_bytes' call and checks (5 % of the samples).
    unsafe { *at = header };
    if decrement {
        let inner = ctx
            .ptr_at::<Ipv4Hdr>(off::INNER_IP)
            .ok_or(Verdict::Drop(counter::DROP_HELPER_FAIL))?;
        // SAFETY: bounds checked by ptr_at after adjust_room; TC may write packet data.
        // The checksum stays valid, so the outer UDP checksum (which covers it) does too.
        unsafe { (*inner).decrement_ttl() };
    }

    let Some(action) = nexthop::redirect(ctx, next_hop) else {
        debug!(
            ctx,
            "encap drop: redirect to the underlay failed for {:i} via VTEP {:i}",
            ip.daddr_be,
            peer.vtep_ip_be
        );
        return Err(Verdict::Drop(counter::DROP_HELPER_FAIL));
    };
    Ok(Verdict::Done(action, counter::ENCAPSULATED))
}

/// The flow hash the outer source port is spread by, as the kernel's vxlan
/// takes it (`skb_get_hash`): the skb's own when it carries one (a connected
/// socket's, or one the stack computed on the way). For an skb without one the
/// kernel runs its flow dissector (a quarter of encapsulation's time under
/// BPF_PROG_TEST_RUN, whose skbs carry none); the port only has to stay the
/// same for a flow and spread flows, which a hash of the addresses (`saddr`,
/// `daddr`: IPv6's folded to 32 bits), `protocol` and, when `l4` says where
/// (as the dissector takes them: TCP and UDP, not in fragments), the ports
/// does. It is kept on the skb as the kernel keeps its own.
#[inline(always)]
pub(crate) fn flow_hash(
    ctx: &TcContext,
    saddr: u32,
    daddr: u32,
    protocol: u8,
    l4: Option<usize>,
) -> u32 {
    // SAFETY: ctx.skb.skb is the live __sk_buff of this invocation.
    if unsafe { (*ctx.skb.skb).hash } != 0 {
        // One a driver set may cover the addresses only: the helper redoes such.
        // SAFETY: helper on the live skb.
        return unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    }
    // Linear after the pull on entry; the helper copy covers a paged header.
    let ports = l4.map_or(0, |at| {
        ctx.read::<[u8; 4]>(at)
            .or_else(|| ctx.load(at).ok())
            .map_or(0, u32::from_ne_bytes)
    });
    let hash = match jhash_3words(saddr, daddr, ports ^ protocol as u32) {
        // 0 means "no hash" on an skb.
        0 => 1,
        h => h,
    };
    // SAFETY: helper on the live skb.
    unsafe { bpf_set_hash(ctx.skb.skb, hash) };
    hash
}

/// The kernel's `jhash_3words` (Bob Jenkins' lookup3 final mix) with a fixed seed.
#[inline(always)]
fn jhash_3words(a: u32, b: u32, c: u32) -> u32 {
    const INIT: u32 = 0xdead_beef_u32.wrapping_add(12);
    let (mut a, mut b, mut c) = (
        a.wrapping_add(INIT),
        b.wrapping_add(INIT),
        c.wrapping_add(INIT),
    );
    // x ^= y; x -= rol32(y, r): the kernel's __jhash_final, step by step.
    let step = |x: u32, y: u32, r: u32| (x ^ y).wrapping_sub(y.rotate_left(r));
    c = step(c, b, 14);
    a = step(a, c, 11);
    b = step(b, a, 25);
    c = step(c, b, 16);
    a = step(a, c, 4);
    b = step(b, a, 14);
    step(c, b, 24)
}

/// The source must be the address bound to the port the frame came in on,
/// from the MAC bound to it (the agent binds them from the kernel's
/// neighbour and forwarding tables). On the bridge itself the port is no
/// longer known, so the MAC alone must match. Anything else inside this
/// host's subnet goes to the kernel path, which judges it as it always did;
/// a source outside the subnet is forged.
#[inline(always)]
fn check_source(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ifindex: u32,
    eth: &EthHdr,
    ip: &Ipv4Hdr,
) -> Result<(), Verdict> {
    let on_bridge = ifindex == cfg.bridge_ifindex_ne;
    if let Some(bound) = maps::local_endpoint(ip.saddr_be) {
        let same_port = on_bridge || bound.host_ifindex_ne == ifindex;
        if !same_port {
            debug!(
                ctx,
                "encap drop: source {:i} ({:mac}) on port {}, bound to port {}",
                ip.saddr_be,
                eth.src,
                ifindex,
                bound.host_ifindex_ne
            );
            return Err(Verdict::Drop(counter::DROP_SOURCE_OTHER_PORT));
        }
        if bound.mac == eth.src {
            return Ok(());
        }
        return Err(Verdict::Pass(counter::PASS_SOURCE_UNBOUND));
    }
    let s = u32::from_be_bytes(ip.saddr_be);
    let mask = u32::from_be_bytes(cfg.subnet_mask_be);
    // A zero mask (subnet not known yet) leaves every unbound source to the kernel.
    if s & mask == u32::from_be_bytes(cfg.subnet_be) & mask {
        Err(Verdict::Pass(counter::PASS_SOURCE_UNBOUND))
    } else {
        debug!(
            ctx,
            "encap drop: source {:i} ({:mac}) on port {} is outside this host's subnet",
            ip.saddr_be,
            eth.src,
            ifindex
        );
        Err(Verdict::Drop(counter::DROP_SOURCE_OUTSIDE))
    }
}

/// On `flannel.N` the frame's destination MAC is what the kernel's neighbour
/// entry for the route's next hop gave: the VTEP the vxlan device would send
/// to (by its forwarding entry for that MAC). Only when that is the VTEP of
/// the subnet's lease does the program send it; a route or neighbour set up
/// otherwise stays the device's business.
#[inline(always)]
pub(crate) fn on_chosen_vtep(eth: &EthHdr, vtep_mac: &[u8; 6]) -> Result<(), Verdict> {
    if eth.dst == *vtep_mac {
        Ok(())
    } else {
        Err(Verdict::Pass(counter::PASS_NOT_REMOTE))
    }
}

/// Whether the packet, once encapsulated, fits the underlay. `bpf_redirect`
/// never fragments; the kernel path fragments or sends "fragmentation
/// needed". A GSO packet is judged by its segments: inner IP and L4 headers
/// plus `gso_size`, plus the 50 bytes of VXLAN.
#[inline(always)]
fn check_size(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &Ipv4Hdr,
    l3_len: u32,
    gso_size: u32,
) -> Result<(), Verdict> {
    let mtu = cfg.underlay_mtu_ne as u32;
    if gso_size == 0 {
        if l3_len + VXLAN_OVERHEAD as u32 > mtu {
            return Err(Verdict::Pass(counter::PASS_TOO_BIG));
        }
        return Ok(());
    }
    let l4_header = if ip.protocol == IPPROTO_TCP {
        // Data offset: the high nibble of byte 12 of the TCP header.
        let doff: u8 = ctx
            .load(off::OUTER_IP + IPV4_HLEN + 12)
            .map_err(|_| Verdict::Pass(counter::PASS_MALFORMED))?;
        ((doff >> 4) as u32) * 4
    } else {
        UDP_HLEN as u32
    };
    if IPV4_HLEN as u32 + l4_header + gso_size + VXLAN_OVERHEAD as u32 > mtu {
        return Err(Verdict::Pass(counter::PASS_GSO_TOO_BIG));
    }
    Ok(())
}

/// The one's-complement sum of the inner L4 bytes as they will be on the
/// wire, without summing them: a correct TCP/UDP checksum makes them sum to
/// the complement of the pseudo-header, and so does a checksum still
/// pending (CHECKSUM_PARTIAL holds the pseudo-header sum and is completed
/// before the wire): the kernel's local checksum offload (`lco_csum`) rests
/// on the same identity. A correct ICMP message sums to zero. Anything else
/// would need the payload summed: the kernel path does that.
#[inline(always)]
fn inner_l4_sum(ctx: &TcContext, ip: &Ipv4Hdr) -> Result<u32, Verdict> {
    if ip.is_fragment() {
        // The L4 checksum covers the whole datagram, not this fragment.
        return Err(Verdict::Pass(counter::PASS_FRAGMENT));
    }
    let pseudo = || fold(ip.pseudo_header_sum(ip.tot_len() - IPV4_HLEN as u16)) as u32;
    match ip.protocol {
        IPPROTO_TCP => Ok(pseudo()),
        IPPROTO_UDP => {
            // Linear after the pull on entry; the helper copy covers a paged header.
            let at = off::OUTER_IP + IPV4_HLEN + 6;
            let check: [u8; 2] = ctx
                .read(at)
                .or_else(|| ctx.load(at).ok())
                .ok_or(Verdict::Pass(counter::PASS_MALFORMED))?;
            if check == [0, 0] {
                // No checksum: nothing vouches for the payload's sum.
                return Err(Verdict::Pass(counter::PASS_CHECKSUM));
            }
            Ok(pseudo())
        }
        IPPROTO_ICMP => Ok(0),
        _ => Err(Verdict::Pass(counter::PASS_CHECKSUM)),
    }
}

#[inline(always)]
fn build_header(
    cfg: &NodeConfig,
    peer: &PeerValue,
    inner: &Ipv4Hdr,
    (outer_len, id): (u16, u16),
    hash: u32,
    l4_sum: Option<u32>,
) -> VxlanEncap {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: ecn_encapsulate(inner.tos),
        tot_len_be: outer_len.to_be_bytes(),
        id_be: id.to_be_bytes(),
        // DF clear, as the kernel vxlan device flannel creates sends it.
        frag_off_be: [0, 0],
        // `ttl auto`: the route's hop limit, i.e. the namespace's default TTL.
        ttl: cfg.outer_ttl,
        protocol: IPPROTO_UDP,
        check_be: [0, 0],
        saddr_be: cfg.vtep_ip_be,
        daddr_be: peer.vtep_ip_be,
    };
    ip.set_checksum();
    let vni = cfg.vni_ne.to_be_bytes();
    let udp_len = outer_len.wrapping_sub(IPV4_HLEN as u16);
    let mut header = VxlanEncap {
        ip,
        udp: UdpHdr {
            source_be: source_port(hash, cfg.sport_min_ne, cfg.sport_max_ne).to_be_bytes(),
            dest_be: cfg.port_ne.to_be_bytes(),
            len_be: udp_len.to_be_bytes(),
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
    };
    if let Some(l4_sum) = l4_sum {
        header.udp.check_be = udp_checksum(&header, udp_len, l4_sum).to_be_bytes();
    }
    header
}

/// The outer UDP checksum (RFC 768): pseudo-header, our 30 bytes of UDP,
/// VXLAN and inner Ethernet, the inner IPv4 header (whose valid checksum
/// makes it sum to zero) and `l4_sum` for the rest. All parts start at even
/// offsets, so their sums add up.
#[inline(always)]
fn udp_checksum(h: &VxlanEncap, udp_len: u16, l4_sum: u32) -> u16 {
    let pseudo = Ipv4Hdr {
        protocol: IPPROTO_UDP,
        ..h.ip
    }
    .pseudo_header_sum(udp_len);
    const TUNNEL: usize = UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
    // SAFETY: udp, vxlan and inner_eth are adjacent byte arrays in a repr(C) struct.
    let tunnel: &[u8; TUNNEL] = unsafe { &*(&h.udp as *const UdpHdr as *const [u8; TUNNEL]) };
    match fold(sum_words(tunnel, pseudo + l4_sum)) {
        // 0 means "no checksum": a computed 0 is sent as its equivalent.
        0 => 0xffff,
        c => c,
    }
}

/// The kernel's `udp_flow_src_port()`: spread flows over [min, max).
#[inline(always)]
pub(crate) fn source_port(hash: u32, min: u16, max: u16) -> u16 {
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
pub(crate) fn ecn_encapsulate(inner_tos: u8) -> u8 {
    match inner_tos & 0x3 {
        0x3 => 0x2,
        ecn => ecn,
    }
}
