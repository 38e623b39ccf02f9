//! Hand-built frames for feeding the datapath: Ethernet, IPv4, UDP and VXLAN headers, byte by
//! byte as RFC 791/768/7348 lay them out, so a test states exactly what is on the wire.

use std::net::Ipv4Addr;

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
