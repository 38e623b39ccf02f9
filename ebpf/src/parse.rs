//! Bounds-checked packet access and the header layouts the programs read.
//!
//! Every packet byte the programs touch goes through [`Packet::ptr_at`]: it
//! re-reads `data`/`data_end` each time, so a pointer taken before
//! `adjust_room`/`adjust_head` can never be reused after it.

use aya_ebpf::programs::{TcContext, XdpContext};
use weft_common::wire::{ETH_HLEN, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN};

/// A context whose packet is directly addressable.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;

    /// The whole frame's length. For TC this is skb->len, which includes paged
    /// data beyond `data_end` (every GSO/GRO packet); XDP without frags sees it all.
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }

    /// A pointer to a `T` at `offset` bytes into the packet, if all of it is there.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let start = self.data();
        let end = self.data_end();
        let size = core::mem::size_of::<T>();
        if start + offset + size > end {
            return None;
        }
        Some((start + offset) as *mut T)
    }

    /// A copy of the `T` at `offset`, if all of it is there.
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: ptr_at checked the bounds; all header types are byte arrays (align 1).
        self.ptr_at::<T>(offset).map(|p| unsafe { *p })
    }
}

/// A header in place in the packet, valid until the packet changes (adjust_room
/// or adjust_head): only code that changes nothing reads them so (the
/// decapsulation checks). Reading in place spares a copy of every header
/// byte, one load and one store each, as BPF has no unaligned loads.
#[inline(always)]
pub fn header<C: Packet, T>(ctx: &C, offset: usize) -> Option<&T> {
    // SAFETY: bounds checked by ptr_at; all header types are byte arrays (align 1).
    ctx.ptr_at::<T>(offset).map(|p| unsafe { &*p })
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

/// Ethernet II header. All header types are byte arrays so they have alignment 1
/// and can sit at any packet offset.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HLEN);

impl EthHdr {
    #[inline(always)]
    pub fn proto(&self) -> u16 {
        u16::from_be_bytes(self.proto_be)
    }
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: [u8; 2],
    pub id_be: [u8; 2],
    pub frag_off_be: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check_be: [u8; 2],
    pub saddr_be: [u8; 4],
    pub daddr_be: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_HLEN);

/// MF flag and fragment offset bits of `frag_off`.
const IP_MF_OFFSET: u16 = 0x3fff;

impl Ipv4Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.version_ihl >> 4
    }
    #[inline(always)]
    pub fn ihl_bytes(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }
    #[inline(always)]
    pub fn tot_len(&self) -> u16 {
        u16::from_be_bytes(self.tot_len_be)
    }
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag_off_be) & IP_MF_OFFSET != 0
    }

    /// The ECN field (RFC 3168): 0 Not-ECT, 1 ECT(1), 2 ECT(0), 3 CE.
    #[inline(always)]
    pub fn ecn(&self) -> u8 {
        self.tos & 0x3
    }

    /// Fills in the header checksum (RFC 791) over the 20 bytes.
    #[inline(always)]
    pub fn set_checksum(&mut self) {
        self.check_be = [0, 0];
        self.check_be = fold(sum_words(self.bytes(), 0)).to_be_bytes();
    }

    /// Whether the 20-byte header's checksum is right (the kernel's `ip_rcv`
    /// drops the packet otherwise).
    #[inline(always)]
    pub fn checksum_ok(&self) -> bool {
        fold(sum_words(self.bytes(), 0)) == 0
    }

    #[inline(always)]
    fn bytes(&self) -> &[u8; IPV4_HLEN] {
        // SAFETY: Ipv4Hdr is 20 plain bytes.
        unsafe { &*(self as *const Self as *const [u8; IPV4_HLEN]) }
    }

    /// Marks an ECT packet Congestion Experienced and patches the checksum, as
    /// the kernel's `IP_ECN_set_ce`.
    #[inline(always)]
    pub fn set_ce(&mut self) {
        let old = u16::from_be_bytes([self.version_ihl, self.tos]);
        self.tos |= 0x3;
        let new = u16::from_be_bytes([self.version_ihl, self.tos]);
        self.replace_word(old, new);
    }

    /// RFC 1624: HC' = ~(~HC + ~m + m').
    #[inline(always)]
    fn replace_word(&mut self, old: u16, new: u16) {
        let check = u16::from_be_bytes(self.check_be);
        let sum = (!check as u32) + (!old as u32) + new as u32;
        self.check_be = fold(sum).to_be_bytes();
    }

    /// Decrements the TTL and patches the checksum incrementally (RFC 1624).
    #[inline(always)]
    pub fn decrement_ttl(&mut self) {
        let old = u16::from_be_bytes([self.ttl, self.protocol]);
        self.ttl = self.ttl.wrapping_sub(1);
        let new = u16::from_be_bytes([self.ttl, self.protocol]);
        self.replace_word(old, new);
    }

    /// The one's-complement sum of the TCP/UDP pseudo-header (RFC 793/768)
    /// for an L4 payload of `l4_len` bytes, not yet folded or complemented.
    #[inline(always)]
    pub fn pseudo_header_sum(&self, l4_len: u16) -> u32 {
        let s = self.saddr_be;
        let d = self.daddr_be;
        u16::from_be_bytes([s[0], s[1]]) as u32
            + u16::from_be_bytes([s[2], s[3]]) as u32
            + u16::from_be_bytes([d[0], d[1]]) as u32
            + u16::from_be_bytes([d[2], d[3]]) as u32
            + self.protocol as u32
            + l4_len as u32
    }
}

/// Adds the big-endian 16-bit words of `bytes` (even length) to `sum`.
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// One's-complement fold of a 32-bit sum into a 16-bit checksum (complemented).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source_be: [u8; 2],
    pub dest_be: [u8; 2],
    pub len_be: [u8; 2],
    pub check_be: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<UdpHdr>() == UDP_HLEN);

/// VXLAN header (RFC 7348): flags, 24 reserved bits, VNI, 8 reserved bits.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved1: [u8; 3],
    pub vni_be: [u8; 3],
    pub reserved2: u8,
}
const _: () = assert!(core::mem::size_of::<VxlanHdr>() == VXLAN_HLEN);

impl VxlanHdr {
    #[inline(always)]
    pub fn vni(&self) -> u32 {
        u32::from_be_bytes([0, self.vni_be[0], self.vni_be[1], self.vni_be[2]])
    }
}

/// Offsets of the headers in a VXLAN frame as it arrives on the underlay.
pub mod off {
    use weft_common::wire::{ETH_HLEN, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN};
    pub const OUTER_IP: usize = ETH_HLEN;
    pub const OUTER_UDP: usize = OUTER_IP + IPV4_HLEN;
    pub const VXLAN: usize = OUTER_UDP + UDP_HLEN;
    pub const INNER_ETH: usize = VXLAN + VXLAN_HLEN;
    pub const INNER_IP: usize = INNER_ETH + ETH_HLEN;
}
