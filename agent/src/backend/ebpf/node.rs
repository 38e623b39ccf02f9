//! The node configuration map: what the programs know about this host (its
//! VTEP, underlay, bridge and subnet), built from the kernel's view and kept
//! equal to it.

use tracing::{info, warn};

use super::{attach::index_of, EbpfBackend, EbpfBackendError, EbpfSettings};
use crate::{
    datapath::{default_ttl, NodeSettings},
    lease::MacAddr,
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
        vtep_ip: ext.ipv4,
        vtep_mac,
        underlay_ifindex: link.index,
        underlay_mac,
        // The MTU flannel assumes for the underlay: a configured MTU is the path's.
        underlay_mtu: s.vxlan.mtu.unwrap_or(link.mtu).min(u32::from(u16::MAX)) as u16,
        bridge_ifindex: index_of(interfaces, &s.bridge).unwrap_or(0),
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
        if current == self.node.to_map_value() {
            return Ok(0);
        }
        warn!("node configuration map was altered; rewriting it");
        self.write_node()?;
        Ok(1)
    }
}
