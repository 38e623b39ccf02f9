//! The IPv6 header and the offsets of VXLAN over IPv6 (RFC 8200, RFC 7348).
//! Read through the same bounds-checked [`crate::parse::Packet`] accessors as IPv4.

use weft_common::wire6::IPV6_HLEN;

use crate::parse::sum_words;

/// IPv6 fixed header. Byte arrays only, so it has alignment 1.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub vtc_flow: [u8; 4],
    pub payload_len_be: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr_be: [u8; 16],
    pub daddr_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == IPV6_HLEN);

impl Ipv6Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vtc_flow[0] >> 4
    }

    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        u16::from_be_bytes(self.payload_len_be)
    }

    /// The traffic class byte (DSCP and ECN), which straddles the first two bytes.
    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        (self.vtc_flow[0] << 4) | (self.vtc_flow[1] >> 4)
    }

    /// The ECN field (RFC 3168): 0 Not-ECT, 1 ECT(1), 2 ECT(0), 3 CE.
    #[inline(always)]
    pub fn ecn(&self) -> u8 {
        self.traffic_class() & 0x3
    }

    /// The first 16-bit word (version, traffic class, top of the flow label),
    /// the one word marking CE changes.
    #[inline(always)]
    pub fn first_word(&self) -> u16 {
        u16::from_be_bytes([self.vtc_flow[0], self.vtc_flow[1]])
    }

    /// Marks the packet Congestion Experienced (both ECN bits, in the high
    /// nibble of the second byte); returns the first word before and after.
    #[inline(always)]
    pub fn set_ce(&mut self) -> (u16, u16) {
        let old = self.first_word();
        self.vtc_flow[1] |= 0x30;
        (old, self.first_word())
    }

    /// The word holding next header and hop limit.
    #[inline(always)]
    pub fn hop_word(&self) -> u16 {
        u16::from_be_bytes([self.next_header, self.hop_limit])
    }

    /// Decrements the hop limit; returns the word before and after. IPv6 has
    /// no header checksum, but sums over the packet (CHECKSUM_COMPLETE, the
    /// outer UDP checksum) cover it.
    #[inline(always)]
    pub fn decrement_hop_limit(&mut self) -> (u16, u16) {
        let old = self.hop_word();
        self.hop_limit = self.hop_limit.wrapping_sub(1);
        (old, self.hop_word())
    }

    /// The one's-complement sum of the upper-layer pseudo-header (RFC 8200
    /// section 8.1) for `next_header` and an upper-layer length of `l4_len`,
    /// not yet folded or complemented.
    #[inline(always)]
    pub fn pseudo_header_sum(&self, next_header: u8, l4_len: u32) -> u32 {
        let sum = sum_words(&self.saddr_be, 0);
        let sum = sum_words(&self.daddr_be, sum);
        sum + (l4_len >> 16) + (l4_len & 0xffff) + next_header as u32
    }
}

/// Next-header values that are extension headers (RFC 8200 section 4, the
/// IANA list): the upper-layer header is not where the fixed header ends.
#[inline(always)]
pub fn is_extension_header(next_header: u8) -> bool {
    matches!(
        next_header,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// Whether `addr` lies in `prefix`/`len` (both network order). `len` 0 matches nothing:
/// it means "not known yet".
#[inline(always)]
pub fn in_prefix(addr: &[u8; 16], prefix: &[u8; 16], len: u8) -> bool {
    if len == 0 || len > 128 {
        return false;
    }
    // Two u64 halves: BPF has no 128-bit arithmetic.
    let half = |b: &[u8; 16], i: usize| {
        u64::from_be_bytes([
            b[i],
            b[i + 1],
            b[i + 2],
            b[i + 3],
            b[i + 4],
            b[i + 5],
            b[i + 6],
            b[i + 7],
        ])
    };
    let (hi, lo) = (len.min(64) as u32, len.saturating_sub(64) as u32);
    (half(addr, 0) ^ half(prefix, 0)) & high_bits(hi) == 0
        && (half(addr, 8) ^ half(prefix, 8)) & high_bits(lo) == 0
}

/// A u64 with its `n` (0..=64) highest bits set.
#[inline(always)]
fn high_bits(n: u32) -> u64 {
    if n == 0 {
        0
    } else {
        u64::MAX << (64 - n)
    }
}

/// Offsets of the headers in a VXLAN-over-IPv6 frame as it arrives on the underlay.
pub mod off6 {
    use weft_common::{
        wire::{ETH_HLEN, UDP_HLEN, VXLAN_HLEN},
        wire6::IPV6_HLEN,
    };
    pub const OUTER_IP: usize = ETH_HLEN;
    pub const OUTER_UDP: usize = OUTER_IP + IPV6_HLEN;
    pub const VXLAN: usize = OUTER_UDP + UDP_HLEN;
    pub const INNER_ETH: usize = VXLAN + VXLAN_HLEN;
    pub const INNER_IP: usize = INNER_ETH + ETH_HLEN;
    /// Where the L4 header of a plain (not encapsulated) IPv6 frame starts.
    pub const L4: usize = ETH_HLEN + IPV6_HLEN;
}
