//! The outer next hop of encapsulation, for both families: the FIB's answer
//! for a peer's VTEP, reused on this CPU for a few milliseconds, and the
//! redirect that sends the finished frame there.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, TC_ACT_REDIRECT,
    },
    helpers::generated::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect,
        bpf_redirect_neigh,
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
    EbpfContext,
};
use weft_common::wire::IPPROTO_UDP;

use crate::parse::{EthHdr, Packet};

/// Outer next hops of recently seen IPv4 VTEPs, per CPU, direct-mapped by
/// address: `bpf_fib_lookup` is the largest single cost of encapsulation
/// (about 95 of 325 ns under BPF_PROG_TEST_RUN), and its answer for one VTEP
/// changes only with the underlay's routes and neighbours. Not pinned: a cache.
#[map(name = "WEFT_NEXT_HOPS")]
static NEXT_HOPS: PerCpuArray<CachedHop<[u8; 4]>> =
    PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// [`NEXT_HOPS`] for IPv6 VTEPs.
#[map(name = "WEFT_NEXT_HOPS6")]
static NEXT_HOPS6: PerCpuArray<CachedHop<[u8; 16]>> =
    PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// Slots of each cache; a power of two. Two VTEPs in one slot only cost
/// lookups, never a wrong answer (the address is compared).
const NEXT_HOP_SLOTS: u32 = 256;

/// How long a FIB answer is reused: an underlay route or neighbour change
/// reaches the fast path within this, as a cached route reaches the kernel's
/// vxlan device when it is next revalidated.
pub const NEXT_HOP_TTL_NS: u64 = 10_000_000;

/// Where the outer frame goes after encapsulation.
pub enum NextHop {
    /// Neighbour known: outer MACs filled in, plain redirect.
    Resolved {
        ifindex: u32,
        src: [u8; 6],
        dst: [u8; 6],
    },
    /// Route known, neighbour not yet: let `bpf_redirect_neigh` resolve it.
    Unresolved { ifindex: u32 },
}

/// One FIB answer: where frames to `vtep_ip_be` leave, with which MACs, until `expires_ns`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedHop<A> {
    pub vtep_ip_be: A,
    pub ifindex: u32,
    pub src: [u8; 6],
    pub dst: [u8; 6],
    /// The last outer IPv4 ID sent to this VTEP from this CPU ([`next_hop`]).
    pub ip_id: u16,
    pub pad: [u8; 2],
    /// `bpf_ktime_get_coarse_ns` time after which the FIB is asked again; 0: empty.
    pub expires_ns: u64,
}

/// A VTEP address of one family (network order), as the cache and the FIB take it.
pub trait VtepAddr: Copy + PartialEq + 'static {
    /// The family's cache.
    fn cache() -> &'static PerCpuArray<CachedHop<Self>>;
    /// This address's slot in [`Self::cache`].
    fn slot(&self) -> u32;
    /// Asks the FIB for the route from `src` (ours) to `self`.
    fn route_from(&self, src: &Self, params: &mut FibParams);
}

impl VtepAddr for [u8; 4] {
    #[inline(always)]
    fn cache() -> &'static PerCpuArray<CachedHop<Self>> {
        &NEXT_HOPS
    }
    #[inline(always)]
    fn slot(&self) -> u32 {
        let a = u32::from_ne_bytes(*self);
        (a ^ (a >> 8) ^ (a >> 16) ^ (a >> 24)) & (NEXT_HOP_SLOTS - 1)
    }
    #[inline(always)]
    fn route_from(&self, src: &Self, params: &mut FibParams) {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(*src);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*self);
    }
}

impl VtepAddr for [u8; 16] {
    #[inline(always)]
    fn cache() -> &'static PerCpuArray<CachedHop<Self>> {
        &NEXT_HOPS6
    }
    #[inline(always)]
    fn slot(&self) -> u32 {
        let w = words(self);
        (w[0] ^ w[1] ^ w[2] ^ w[3]).to_ne_bytes().slot()
    }
    #[inline(always)]
    fn route_from(&self, src: &Self, params: &mut FibParams) {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(src);
        params.__bindgen_anon_4.ipv6_dst = words(self);
    }
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// An IPv6 address as the four network-order words `bpf_fib_lookup` takes.
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The outer route from our VTEP `ours` to a peer's `vtep` out of
/// `underlay_ifindex`: the FIB's answer of the last few milliseconds on this
/// CPU, else a fresh lookup. Only resolved answers are kept: an unresolved
/// neighbour is asked again.
///
/// With it the outer IPv4 ID of this packet (IPv6 has none): a counter per VTEP
/// and CPU, kept in the same slot, as the kernel's tunnels count per
/// destination (`ip_idents`); it starts at a random value with each fresh
/// answer. (A random ID per packet was a helper call, 4 % of encapsulation.)
#[inline(always)]
pub fn next_hop<A: VtepAddr>(
    ctx: &TcContext,
    underlay_ifindex: u32,
    ours: &A,
    vtep: A,
) -> Option<(NextHop, u16)> {
    // The tick-granular clock: a fine one (TSC read) cost about 25 ns a packet, and a
    // tick more or less on a 10 ms lifetime changes nothing.
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let slot = vtep.slot();
    if let Some(ptr) = A::cache().get_ptr_mut(slot) {
        // SAFETY: a per-CPU value pointer; only this CPU touches it while the program runs.
        let hop = unsafe { &mut *ptr };
        if hop.vtep_ip_be == vtep && now < hop.expires_ns {
            hop.ip_id = hop.ip_id.wrapping_add(1);
            let resolved = NextHop::Resolved {
                ifindex: hop.ifindex,
                src: hop.src,
                dst: hop.dst,
            };
            return Some((resolved, hop.ip_id));
        }
    }
    let hop = lookup_underlay(ctx, underlay_ifindex, ours, &vtep)?;
    // SAFETY: plain helper call.
    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    if let NextHop::Resolved { ifindex, src, dst } = hop {
        if let Some(ptr) = A::cache().get_ptr_mut(slot) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe {
                *ptr = CachedHop {
                    vtep_ip_be: vtep,
                    ifindex,
                    src,
                    dst,
                    ip_id,
                    pad: [0; 2],
                    expires_ns: now + NEXT_HOP_TTL_NS,
                }
            };
        }
    }
    Some((hop, ip_id))
}

/// The outer route to `vtep`, looked up as our own output would be.
#[inline(always)]
fn lookup_underlay<A: VtepAddr>(
    ctx: &TcContext,
    underlay_ifindex: u32,
    ours: &A,
    vtep: &A,
) -> Option<NextHop> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid value.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = IPPROTO_UDP;
    params.ifindex = underlay_ifindex;
    // tot_len 0: skip the kernel's MTU check, the caller's knows about GSO.
    vtep.route_from(ours, &mut params);
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

/// Sends the finished outer frame to `next_hop`: `Some(TC_ACT_REDIRECT)`, or
/// `None` when the kernel refused the redirect.
#[inline(always)]
pub fn redirect(ctx: &TcContext, next_hop: NextHop) -> Option<i32> {
    let action = match next_hop {
        NextHop::Resolved { ifindex, src, dst } => {
            let eth = ctx.ptr_at::<EthHdr>(0)?;
            // SAFETY: bounds checked by ptr_at; TC may write packet data.
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
    (action == TC_ACT_REDIRECT as i64).then_some(TC_ACT_REDIRECT as i32)
}
