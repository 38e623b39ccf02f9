//! This node's IPv6 settings and the map that holds them. The remote IPv6
//! subnets, VTEPs and local bindings share IPv4's code (`maps.rs`); the
//! backend fills them from dual-stack leases (`PublicIPv6`, `BackendV6Data`).

use std::net::Ipv6Addr;

use aya::maps::Array;
use ipnet::Ipv6Net;
use weft_common::{config6_flags, map_names6, NodeConfig6};

use super::{maps::map_err, Datapath, DatapathError};
use crate::lease::MacAddr;

/// What the programs need to know about this node's IPv6 side; the rest
/// (VNI, port, underlay, bridge, MTU) is shared with IPv4's [`super::NodeSettings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings6 {
    /// Our `PublicIPv6`: `flannel-v6.N`'s `local`, the outer source and the decap destination.
    pub vtep_ip: Ipv6Addr,
    /// `flannel-v6.N`'s MAC, advertised in our lease's `BackendV6Data`.
    pub vtep_mac: MacAddr,
    /// This host's IPv6 container subnet; `None` until the lease is known.
    pub subnet: Option<Ipv6Net>,
    /// Outer hop limit: the underlay's `net.ipv6.conf.<dev>.hop_limit` ([`hop_limit`]).
    pub outer_hop_limit: u8,
    /// The underlay carries GSO packets to the receiver whole (a veth, see
    /// [`keeps_gso`]): IPv6 GSO packets may then take the fast path. Otherwise
    /// they take flannel-v6.N, whose kernel fills each segment's checksum.
    pub underlay_keeps_gso: bool,
}

impl NodeSettings6 {
    /// The map value the programs read.
    pub fn to_map_value(&self) -> NodeConfig6 {
        let (subnet, len) = self.subnet.map_or(([0; 16], 0), |n| {
            (n.trunc().network().octets(), n.prefix_len())
        });
        NodeConfig6 {
            vtep_ip_be: self.vtep_ip.octets(),
            subnet_be: subnet,
            vtep_mac: self.vtep_mac.0,
            subnet_prefix_len: len,
            outer_hop_limit: self.outer_hop_limit,
            flags_ne: if self.underlay_keeps_gso {
                config6_flags::UNDERLAY_KEEPS_GSO
            } else {
                0
            },
        }
    }
}

/// The hop limit a vxlan device with `ttl auto` uses for its IPv6 outer
/// header: the route's, by default the underlay's
/// `net.ipv6.conf.<interface>.hop_limit`; 64 (the kernel's default) if unreadable.
pub fn hop_limit(interface: &str) -> u8 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/hop_limit"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(64)
}

/// Whether `interface` hands GSO packets to the receiver unsegmented: a veth
/// does (its peer receives the skb as it was sent); a NIC segments them, in
/// hardware or software, copying one outer UDP checksum into every segment.
pub fn keeps_gso(interface: &str) -> bool {
    super::attach::driver_name(interface).as_deref() == Some("veth")
}

impl Datapath {
    /// Writes this node's IPv6 settings; the programs pass every IPv6 packet until this is done.
    pub fn configure6(&mut self, settings: &NodeSettings6) -> Result<(), DatapathError> {
        self.open::<Array<_, NodeConfig6>>(map_names6::CONFIG6)?
            .set(0, settings.to_map_value(), 0)
            .map_err(map_err("write node config", map_names6::CONFIG6))
    }

    /// The IPv6 node configuration currently in the map (all zero: IPv6 off).
    pub fn node_config6(&mut self) -> Result<NodeConfig6, DatapathError> {
        self.open::<Array<_, NodeConfig6>>(map_names6::CONFIG6)?
            .get(&0, 0)
            .map_err(map_err("read node config", map_names6::CONFIG6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_the_map_value_the_programs_read() {
        let s = NodeSettings6 {
            vtep_ip: "fd00::21".parse().unwrap(),
            vtep_mac: MacAddr([0x0a, 1, 2, 3, 4, 5]),
            subnet: Some("fc00:0:0:36::5/64".parse().unwrap()),
            outer_hop_limit: 64,
            underlay_keeps_gso: true,
        };
        let v = s.to_map_value();
        assert_eq!(v.vtep_ip_be[15], 0x21);
        assert_eq!(
            Ipv6Addr::from(v.subnet_be),
            "fc00:0:0:36::".parse::<Ipv6Addr>().unwrap(),
            "the network address, host bits cleared"
        );
        assert_eq!((v.subnet_prefix_len, v.outer_hop_limit), (64, 64));
        assert_eq!(v.flags_ne, config6_flags::UNDERLAY_KEEPS_GSO);
        let off = NodeSettings6 {
            subnet: None,
            underlay_keeps_gso: false,
            ..s
        }
        .to_map_value();
        assert_eq!((off.subnet_prefix_len, off.flags_ne), (0, 0));
    }
}
