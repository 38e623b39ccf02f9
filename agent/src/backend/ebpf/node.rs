//! The node configuration map: what the programs know about this host (its
//! VTEP, underlay, bridge and subnet), built from the kernel's view and kept
//! equal to it.

use tracing::{info, warn};

use super::{attach::index_of, EbpfBackend, EbpfBackendError, EbpfSettings};
use crate::{
    datapath::{default_ttl, hop_limit, keeps_gso, NodeSettings, NodeSettings6},
    lease::{Lease, MacAddr},
    netlink::{Interface, Netlink, NetlinkError},
};

/// What the programs need to know about this node.
pub(super) async fn node_settings(
    nl: &Netlink,
    s: &EbpfSettings,
    interfaces: &[Interface],
    vtep_mac: MacAddr,
) -> Result<NodeSettings, EbpfBackendError> {
    let ext = &s.vxlan.external;
    let link = nl
        .link_by_name(&ext.name)
        .await
        .map_err(|source| EbpfBackendError::Interface {
            interface: ext.name.clone(),
            source,
        })?
        .ok_or_else(|| EbpfBackendError::Interface {
            interface: ext.name.clone(),
            source: NetlinkError::NoSuchLink {
                name: ext.name.clone(),
            },
        })?;
    let underlay_mac = link.mac.ok_or_else(|| EbpfBackendError::NoMac {
        interface: ext.name.clone(),
    })?;
    Ok(NodeSettings {
        vni: s.vxlan.vni,
        port: s.vxlan.port(),
        // IPv6 only: no IPv4 VTEP, so IPv4 VXLAN is never ours to decapsulate
        // (there is no flannel.N to take it either).
        vtep_ip: if s.vxlan.has_ipv4() {
            ext.ipv4
        } else {
            std::net::Ipv4Addr::UNSPECIFIED
        },
        vtep_mac,
        underlay_ifindex: link.index,
        underlay_mac,
        // The MTU flannel assumes for the underlay: a configured MTU is the path's.
        underlay_mtu: s.vxlan.mtu.unwrap_or(link.mtu).min(u32::from(u16::MAX)) as u16,
        bridge_ifindex: index_of(interfaces, &s.bridge).unwrap_or(0),
        // Until the first sync reads it: the programs forward as before.
        bridge_down: false,
        // As the kernel path: flannel.N routes (TTL - 1), and its `ttl auto`
        // takes the namespace's default TTL for the outer header.
        decrement_ttl: true,
        outer_ttl: default_ttl(),
        udp_csum: s.udp_csum,
        subnet: None,
    })
}

impl EbpfBackend {
    /// Writes the node settings into the configuration map.
    pub(super) fn write_node(&mut self) -> Result<(), EbpfBackendError> {
        self.dp
            .configure(&self.node)
            .map_err(|source| EbpfBackendError::Configure {
                source: Box::new(source),
            })
    }

    /// Writes the IPv6 settings, if IPv6 is on.
    pub(super) fn write_node6(&mut self) -> Result<(), EbpfBackendError> {
        let Some(node6) = &self.node6 else {
            return Ok(());
        };
        self.dp
            .configure6(node6)
            .map_err(|source| EbpfBackendError::Configure {
                source: Box::new(source),
            })
    }

    /// Turns the IPv6 fast path on once our lease has an IPv6 subnet and
    /// flannel-v6.N exists (its MAC is what peers address); until then the
    /// programs pass every IPv6 packet to the kernel.
    pub(super) fn own_lease6(&mut self, lease: &Lease) -> Result<(), EbpfBackendError> {
        let ext = &self.s.vxlan.external;
        // flannel-v6.N's `local`, as IPv4 takes flannel.N's: the outer source and decap destination.
        let vtep_ip = ext.ipv6.or(lease.attrs.public_ipv6);
        let (Some(subnet), Some(vtep_ip), Some(vtep_mac)) =
            (lease.ipv6_subnet, vtep_ip, self.vtep_mac6)
        else {
            return Ok(());
        };
        let want = NodeSettings6 {
            vtep_ip,
            vtep_mac,
            subnet: Some(subnet.trunc()),
            // As flannel-v6.N's `ttl auto`: the route's (the underlay's) hop limit.
            outer_hop_limit: hop_limit(&ext.name),
            underlay_keeps_gso: keeps_gso(&ext.name),
        };
        if self.node6.as_ref() == Some(&want) {
            return Ok(());
        }
        // Our subnet may have been a peer's (re-acquired after expiry): never encapsulate it.
        self.dp
            .remove_peer(subnet.trunc())
            .map_err(Self::map_err(format!("remove own subnet {subnet}")))?;
        info!(vtep = %vtep_ip, subnet = %subnet, "IPv6 fast path configured");
        self.node6 = Some(want);
        self.write_node6()
    }

    /// Follows the default TTL (`ttl auto` does) and rewrites an altered
    /// configuration map; returns the number of repairs.
    pub(super) fn repair_node(&mut self) -> Result<usize, EbpfBackendError> {
        let ttl = default_ttl();
        if ttl != self.node.outer_ttl {
            info!(
                from = self.node.outer_ttl,
                to = ttl,
                "net.ipv4.ip_default_ttl changed; outer TTL follows"
            );
            self.node.outer_ttl = ttl;
        }
        let current = self
            .dp
            .node_config()
            .map_err(Self::map_err("read node config".into()))?;
        let mut repairs = 0;
        if current != self.node.to_map_value() {
            warn!("node configuration map was altered; rewriting it");
            self.write_node()?;
            repairs += 1;
        }
        if let Some(node6) = &mut self.node6 {
            node6.outer_hop_limit = hop_limit(&self.s.vxlan.external.name);
            let want = node6.to_map_value();
            let current = self
                .dp
                .node_config6()
                .map_err(Self::map_err("read IPv6 node config".into()))?;
            if current != want {
                warn!("IPv6 node configuration map differs; rewriting it");
                self.write_node6()?;
                repairs += 1;
            }
        }
        Ok(repairs)
    }
}
