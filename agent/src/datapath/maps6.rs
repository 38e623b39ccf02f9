//! Typed access to the IPv6 maps: this node's IPv6 settings, remote IPv6
//! subnets, known IPv6 VTEPs and local IPv6 container bindings. Plain types
//! in, plain types out, as for IPv4 (`maps.rs`); the backend fills them from
//! dual-stack leases (`PublicIPv6`, `BackendV6Data`).

use std::{borrow::Borrow, net::Ipv6Addr};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData};
use ipnet::Ipv6Net;
use weft_common::{
    config6_flags, map_names6, Ipv6LpmData, LocalEndpoint, NodeConfig6, PeerValue6, VtepValue,
};

use super::{
    maps::{is_not_found, map_err},
    Datapath, DatapathError,
};
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

/// One remote IPv6 subnet and the VTEP it is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEntry6 {
    pub subnet: Ipv6Net,
    /// The peer's `PublicIPv6`.
    pub vtep_ip: Ipv6Addr,
    /// The peer's `flannel-v6.N` MAC.
    pub vtep_mac: MacAddr,
}

/// A container's IPv6 address on this host's bridge, bound as for IPv4
/// (from the bridge's neighbour and forwarding entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalEntry6 {
    pub ip: Ipv6Addr,
    /// The host end of the container's veth (a bridge port).
    pub host_ifindex: u32,
    pub mac: MacAddr,
    /// The bridge's MAC, the container's gateway.
    pub gateway_mac: MacAddr,
}

fn lpm_key6(subnet: Ipv6Net) -> Key<Ipv6LpmData> {
    let subnet = subnet.trunc();
    Key::new(
        u32::from(subnet.prefix_len()),
        Ipv6LpmData {
            addr_be: subnet.network().octets(),
        },
    )
}

/// Removal where an absent entry is not an error.
fn removed(
    result: Result<(), aya::maps::MapError>,
    what: String,
    map: &'static str,
) -> Result<(), DatapathError> {
    match result {
        Err(e) if !is_not_found(&e) => Err(map_err(format!("remove {what}"), map)(e)),
        _ => Ok(()),
    }
}

impl Datapath {
    fn map6(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { map: name })
    }

    fn remotes6(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, Ipv6LpmData, PeerValue6>, DatapathError> {
        LpmTrie::try_from(self.map6(map_names6::REMOTES6)?)
            .map_err(map_err("open", map_names6::REMOTES6))
    }

    fn vteps6(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], VtepValue>, DatapathError> {
        HashMap::try_from(self.map6(map_names6::KNOWN_VTEPS6)?)
            .map_err(map_err("open", map_names6::KNOWN_VTEPS6))
    }

    fn local6(&mut self) -> Result<HashMap<&mut MapData, [u8; 16], LocalEndpoint>, DatapathError> {
        HashMap::try_from(self.map6(map_names6::LOCAL6)?)
            .map_err(map_err("open", map_names6::LOCAL6))
    }

    fn config6_map(&mut self) -> Result<Array<&mut MapData, NodeConfig6>, DatapathError> {
        Array::try_from(self.map6(map_names6::CONFIG6)?)
            .map_err(map_err("open", map_names6::CONFIG6))
    }

    /// Writes this node's IPv6 settings; the programs pass every IPv6 packet until this is done.
    pub fn configure6(&mut self, settings: &NodeSettings6) -> Result<(), DatapathError> {
        self.config6_map()?
            .set(0, settings.to_map_value(), 0)
            .map_err(map_err("write node config", map_names6::CONFIG6))
    }

    /// The IPv6 node configuration currently in the map (all zero: IPv6 off).
    pub fn node_config6(&mut self) -> Result<NodeConfig6, DatapathError> {
        self.config6_map()?
            .get(&0, 0)
            .map_err(map_err("read node config", map_names6::CONFIG6))
    }

    /// Routes `subnet` to the VTEP at `vtep_ip` with MAC `vtep_mac` (replace semantics).
    pub fn upsert_peer6(
        &mut self,
        subnet: Ipv6Net,
        vtep_ip: Ipv6Addr,
        vtep_mac: MacAddr,
    ) -> Result<(), DatapathError> {
        let value = PeerValue6 {
            vtep_ip_be: vtep_ip.octets(),
            vtep_mac: vtep_mac.0,
            pad: [0; 2],
        };
        self.remotes6()?
            .insert(&lpm_key6(subnet), value, 0)
            .map_err(map_err(
                format!("upsert {subnet} -> {vtep_ip}"),
                map_names6::REMOTES6,
            ))
    }

    /// Stops encapsulating for `subnet`; absent entries are not an error.
    pub fn remove_peer6(&mut self, subnet: Ipv6Net) -> Result<(), DatapathError> {
        let result = self.remotes6()?.remove(&lpm_key6(subnet));
        removed(result, subnet.to_string(), map_names6::REMOTES6)
    }

    /// Every remote IPv6 subnet in the map, sorted.
    pub fn peers6(&mut self) -> Result<Vec<PeerEntry6>, DatapathError> {
        list_peers6(&self.remotes6()?)
    }

    /// Accepts VXLAN over IPv6 from `ip` (a host whose lease has this `PublicIPv6`).
    pub fn add_vtep6(&mut self, ip: Ipv6Addr) -> Result<(), DatapathError> {
        self.vteps6()?
            .insert(ip.octets(), VtepValue::default(), 0)
            .map_err(map_err(format!("add {ip}"), map_names6::KNOWN_VTEPS6))
    }

    /// Drops VXLAN from `ip` from now on; absent entries are not an error.
    pub fn remove_vtep6(&mut self, ip: Ipv6Addr) -> Result<(), DatapathError> {
        let result = self.vteps6()?.remove(&ip.octets());
        removed(result, ip.to_string(), map_names6::KNOWN_VTEPS6)
    }

    /// The known IPv6 VTEP addresses, sorted.
    pub fn vteps6_list(&mut self) -> Result<Vec<Ipv6Addr>, DatapathError> {
        list_vteps6(&self.vteps6()?)
    }

    /// Binds `e.ip` to its container's port and MAC (replace semantics).
    pub fn upsert_local6(&mut self, e: &LocalEntry6) -> Result<(), DatapathError> {
        let value = LocalEndpoint {
            host_ifindex_ne: e.host_ifindex,
            mac: e.mac.0,
            gateway_mac: e.gateway_mac.0,
        };
        self.local6()?
            .insert(e.ip.octets(), value, 0)
            .map_err(map_err(
                format!("upsert {} -> ifindex {}", e.ip, e.host_ifindex),
                map_names6::LOCAL6,
            ))
    }

    /// Unbinds `ip`; absent entries are not an error.
    pub fn remove_local6(&mut self, ip: Ipv6Addr) -> Result<(), DatapathError> {
        let result = self.local6()?.remove(&ip.octets());
        removed(result, ip.to_string(), map_names6::LOCAL6)
    }

    /// The local IPv6 bindings, sorted by address.
    pub fn locals6(&mut self) -> Result<Vec<LocalEntry6>, DatapathError> {
        list_locals6(&self.local6()?)
    }
}

// Readers shared by the loaded datapath and the pinned-state inspector.

pub(super) fn list_peers6<T: Borrow<MapData>>(
    map: &LpmTrie<T, Ipv6LpmData, PeerValue6>,
) -> Result<Vec<PeerEntry6>, DatapathError> {
    let mut peers = Vec::new();
    for item in map.iter() {
        let (key, value) = item.map_err(map_err("list", map_names6::REMOTES6))?;
        let addr = Ipv6Addr::from(key.data().addr_be);
        let Ok(subnet) = Ipv6Net::new(addr, key.prefix_len() as u8) else {
            continue;
        };
        peers.push(PeerEntry6 {
            subnet,
            vtep_ip: Ipv6Addr::from(value.vtep_ip_be),
            vtep_mac: MacAddr(value.vtep_mac),
        });
    }
    peers.sort_by_key(|p| p.subnet);
    Ok(peers)
}

pub(super) fn list_vteps6<T: Borrow<MapData>>(
    map: &HashMap<T, [u8; 16], VtepValue>,
) -> Result<Vec<Ipv6Addr>, DatapathError> {
    let mut out = Vec::new();
    for key in map.keys() {
        out.push(Ipv6Addr::from(
            key.map_err(map_err("list", map_names6::KNOWN_VTEPS6))?,
        ));
    }
    out.sort();
    Ok(out)
}

pub(super) fn list_locals6<T: Borrow<MapData>>(
    map: &HashMap<T, [u8; 16], LocalEndpoint>,
) -> Result<Vec<LocalEntry6>, DatapathError> {
    let mut out = Vec::new();
    for item in map.iter() {
        let (ip, v) = item.map_err(map_err("list", map_names6::LOCAL6))?;
        out.push(LocalEntry6 {
            ip: Ipv6Addr::from(ip),
            host_ifindex: v.host_ifindex_ne,
            mac: MacAddr(v.mac),
            gateway_mac: MacAddr(v.gateway_mac),
        });
    }
    out.sort_by_key(|e| e.ip);
    Ok(out)
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
