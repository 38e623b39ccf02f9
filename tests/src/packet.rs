//! Hand-built frames for feeding the datapath: Ethernet, IPv4, IPv6, UDP and VXLAN headers, byte
//! by byte as RFC 791/8200/768/7348 lay them out, so a test states exactly what is on the wire.

use std::net::{Ipv4Addr, Ipv6Addr};

/// IPv4 protocol numbers the tests use.
pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
/// flannel's VXLAN network identifier and UDP port.
pub const VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;

/// What TC and XDP programs return (`BPF_PROG_TEST_RUN`'s retval).
pub mod verdict {
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
}
/// EtherType IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// The inner source MAC of frames a made-up peer's flannel.1 sends.
pub const PEER_CONTAINER_MAC: [u8; 6] = [0x02, 0x42, 0xde, 0xad, 0xbe, 0xef];
/// The source port of made-up UDP datagrams.
pub const SRC_PORT: u16 = 12345;

/// The Internet checksum (RFC 1071) over `bytes`; an odd last byte is padded with zero.
pub fn ipv4_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 20-byte IPv4 header (no options) with a correct checksum; `frag` is the flags and fragment
/// offset field (0x4000 = DF).
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    payload_len: usize,
    frag: u16,
) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&0x1234u16.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[ttl, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// An Ethernet header.
pub fn eth(dst: [u8; 6], src: [u8; 6], proto: u16) -> Vec<u8> {
    let mut e = dst.to_vec();
    e.extend_from_slice(&src);
    e.extend_from_slice(&proto.to_be_bytes());
    e
}

/// A UDP header and `body`, without a checksum (zero: valid for IPv4, as the kernel's VXLAN
/// sends it).
pub fn udp(src_port: u16, dst_port: u16, body: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + body.len());
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&((8 + body.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(body);
    u
}

/// The 8-byte VXLAN header: `flags` (0x08 = VNI valid) and the 24-bit `vni`.
pub fn vxlan_header(flags: u8, vni: u32) -> [u8; 8] {
    let v = vni.to_be_bytes();
    [flags, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// What a peer's flannel.1 puts after the outer UDP header (the payload to send to port 8472):
/// the VXLAN header for `vni`, then an Ethernet frame to `inner_dst_mac` carrying UDP
/// `src:12345 -> dst:port` with `body`.
pub fn vxlan_payload(
    vni: u32,
    inner_dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    body: &[u8],
) -> Vec<u8> {
    let mut f = vxlan_header(0x08, vni).to_vec();
    f.extend(eth(inner_dst_mac, PEER_CONTAINER_MAC, ETH_P_IP));
    let datagram = udp(SRC_PORT, port, body);
    f.extend(ipv4_header(src, dst, UDP, 64, datagram.len(), 0));
    f.extend(datagram);
    f
}

// ---- IPv6 ---------------------------------------------------------------------------------------

/// EtherType IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 next-header value of ICMPv6.
pub const ICMPV6: u8 = 58;

/// A 40-byte IPv6 header: traffic class `tc` (DSCP and ECN), flow label `flow` (20 bits).
pub fn ipv6_header(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    payload_len: usize,
    tc: u8,
    flow: u32,
) -> Vec<u8> {
    let first = (6u32 << 28) | (u32::from(tc) << 20) | (flow & 0xf_ffff);
    let mut h = first.to_be_bytes().to_vec();
    h.extend_from_slice(&(payload_len as u16).to_be_bytes());
    h.extend_from_slice(&[next_header, hop_limit]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

/// The IPv6 pseudo-header (RFC 8200 section 8.1) an upper-layer checksum covers.
pub fn ipv6_pseudo_header(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: usize) -> Vec<u8> {
    let mut p = src.octets().to_vec();
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next_header]);
    p
}

/// The checksum of upper-layer message `l4` (its checksum field included): 0 when the message
/// carries a correct TCP, UDP or ICMPv6 checksum.
pub fn l4_checksum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &[u8]) -> u16 {
    let mut bytes = ipv6_pseudo_header(src, dst, next_header, l4.len());
    bytes.extend_from_slice(l4);
    ipv4_checksum(&bytes)
}

/// Fills the checksum at `at` in upper-layer message `l4` (a computed 0 sent as 0xffff, RFC 768).
pub fn fill_checksum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &mut [u8], at: usize) {
    l4[at..at + 2].copy_from_slice(&[0, 0]);
    let c = match l4_checksum6(src, dst, next_header, l4) {
        0 => 0xffff,
        c => c,
    };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// A UDP datagram over IPv6 with its (mandatory) checksum.
pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, src_port: u16, dst_port: u16, body: &[u8]) -> Vec<u8> {
    let mut u = udp(src_port, dst_port, body);
    fill_checksum6(src, dst, UDP, &mut u, 6);
    u
}

/// A TCP segment (20-byte header, ACK|PSH) over IPv6 with its checksum.
pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, src_port: u16, dst_port: u16, body: &[u8]) -> Vec<u8> {
    let mut t = src_port.to_be_bytes().to_vec();
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend_from_slice(&0x0102_0304u32.to_be_bytes());
    t.extend_from_slice(&0x0506_0708u32.to_be_bytes());
    t.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(body);
    fill_checksum6(src, dst, TCP, &mut t, 16);
    t
}

/// An ICMPv6 echo request (RFC 4443) with its checksum.
pub fn icmpv6_echo(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> Vec<u8> {
    let mut m = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1];
    m.extend_from_slice(body);
    fill_checksum6(src, dst, ICMPV6, &mut m, 2);
    m
}

/// An IPv6 packet: header (`tc`, flow label 0) and upper-layer message `l4`.
pub fn ipv6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    tc: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut p = ipv6_header(src, dst, next_header, hop_limit, l4.len(), tc, 0);
    p.extend_from_slice(l4);
    p
}

/// IPv6 next-header values of the two option headers (RFC 8200 section 4.3 and 4.6).
pub const HOP_BY_HOP: u8 = 0;
pub const DEST_OPTIONS: u8 = 60;

/// An IPv6 packet whose header is followed by one 8-byte option header `ext` (Hop-by-Hop or
/// Destination Options, holding one PadN option) and then upper-layer message `l4` of type
/// `next_header` (its checksum, over the final destination, is unchanged by the option header).
pub fn ipv6_with_options(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ext: u8,
    hop_limit: u8,
    next_header: u8,
    l4: &[u8],
) -> Vec<u8> {
    // Next header, length 0 (8 bytes in all), PadN of 4 bytes of zeros.
    let options = [next_header, 0, 1, 4, 0, 0, 0, 0];
    let mut p = ipv6_header(src, dst, ext, hop_limit, options.len() + l4.len(), 0, 0);
    p.extend_from_slice(&options);
    p.extend_from_slice(l4);
    p
}

/// VXLAN over IPv6 as a peer's flannel-v6.N sends it: Ethernet to `nic_dst` from `nic_src`,
/// outer IPv6 `src -> dst` with traffic class `outer_tc`, UDP to `port` with a correct checksum,
/// VXLAN (`flags`, `vni`), then `inner` (an Ethernet frame).
#[allow(clippy::too_many_arguments)]
pub fn vxlan6_frame(
    (nic_dst, nic_src): ([u8; 6], [u8; 6]),
    src: Ipv6Addr,
    dst: Ipv6Addr,
    outer_tc: u8,
    port: u16,
    flags: u8,
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut payload = vxlan_header(flags, vni).to_vec();
    payload.extend_from_slice(inner);
    let datagram = udp6(src, dst, 40000, port, &payload);
    let mut f = eth(nic_dst, nic_src, ETH_P_IPV6);
    f.extend(ipv6_packet(src, dst, UDP, 64, outer_tc, &datagram));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_with_its_checksum_sums_to_zero() {
        let h = ipv4_header(
            Ipv4Addr::new(10, 1, 1, 2),
            Ipv4Addr::new(10, 1, 2, 2),
            UDP,
            64,
            28,
            0x4000,
        );
        assert_eq!(ipv4_checksum(&h), 0);
        // RFC 1071's example words: 0x0001 + 0xf203 + 0xf4f5 + 0xf6f7 = 0xddf2 after folding.
        assert_eq!(
            ipv4_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn ipv6_checksums_validate_and_cover_the_pseudo_header() {
        let (a, b): (Ipv6Addr, Ipv6Addr) = ("fc00::1".parse().unwrap(), "fc00::2".parse().unwrap());
        for (nh, m) in [
            (UDP, udp6(a, b, 1, 2, b"odd")),
            (TCP, tcp6(a, b, 1, 2, b"even")),
            (ICMPV6, icmpv6_echo(a, b, b"ping")),
        ] {
            assert_eq!(l4_checksum6(a, b, nh, &m), 0, "next header {nh}");
            assert_ne!(
                l4_checksum6(b, a, nh + 1, &m),
                0,
                "the pseudo-header counts"
            );
        }
        let h = ipv6_header(a, b, UDP, 64, 8, 0x03, 0xabcde);
        assert_eq!(&h[..4], &[0x60, 0x3a, 0xbc, 0xde]);
        assert_eq!((h.len(), h[4], h[5], h[6], h[7]), (40, 0, 8, UDP, 64));
    }

    #[test]
    fn vxlan_payload_is_laid_out_as_rfc7348_says() {
        let p = vxlan_payload(
            1,
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::new(10, 1, 1, 2),
            Ipv4Addr::new(10, 1, 2, 2),
            9999,
            b"hi",
        );
        assert_eq!(&p[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&p[8..14], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&p[20..22], &[0x08, 0x00]);
        let ip = &p[22..42];
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 2);
        assert_eq!(&p[42..44], &12345u16.to_be_bytes());
        assert_eq!(&p[44..46], &9999u16.to_be_bytes());
        assert_eq!(&p[50..], b"hi");
    }
}
