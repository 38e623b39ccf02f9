//! The IPv6 half of `weft status`: what the programs know of flannel-v6.N's
//! family (our VTEP, remote subnets, known VTEPs, local bindings).

use std::{fmt, net::Ipv6Addr};

use ipnet::Ipv6Net;
use serde::Serialize;
use weft_common::config6_flags;

use crate::{
    datapath::{DatapathError, PinnedMaps},
    lease::MacAddr,
};

/// What the programs know of IPv6: our VTEP, remote subnets, known VTEPs, local bindings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ipv6Status {
    pub vtep_ip: Ipv6Addr,
    pub vtep_mac: String,
    pub subnet: Option<Ipv6Net>,
    pub outer_hop_limit: u8,
    /// IPv6 GSO packets take the fast path (the underlay hands them over whole).
    pub underlay_keeps_gso: bool,
    /// (subnet, VTEP, VTEP MAC).
    pub peers: Vec<(Ipv6Net, Ipv6Addr, String)>,
    pub known_vteps: Vec<Ipv6Addr>,
    /// (address, port ifindex, MAC).
    pub local_bindings: Vec<(Ipv6Addr, u32, String)>,
}

pub(super) fn ipv6_status(maps: &PinnedMaps) -> Result<Option<Ipv6Status>, DatapathError> {
    let cfg = maps.node_config6()?;
    let peers: Vec<_> = maps
        .peers6()?
        .into_iter()
        .map(|p| (p.subnet, p.vtep_ip, p.vtep_mac.to_string()))
        .collect();
    let known_vteps = maps.vteps6()?;
    let local_bindings: Vec<_> = maps
        .locals6()?
        .into_iter()
        .map(|b| (b.ip, b.host_ifindex, b.mac.to_string()))
        .collect();
    let vtep_ip = Ipv6Addr::from(cfg.vtep_ip_be);
    if vtep_ip.is_unspecified() && peers.is_empty() && known_vteps.is_empty() {
        return Ok(None);
    }
    Ok(Some(Ipv6Status {
        vtep_ip,
        vtep_mac: MacAddr(cfg.vtep_mac).to_string(),
        subnet: Ipv6Net::new(Ipv6Addr::from(cfg.subnet_be), cfg.subnet_prefix_len)
            .ok()
            .filter(|_| cfg.subnet_prefix_len > 0),
        outer_hop_limit: cfg.outer_hop_limit,
        underlay_keeps_gso: cfg.flags_ne & config6_flags::UNDERLAY_KEEPS_GSO != 0,
        peers,
        known_vteps,
        local_bindings,
    }))
}

impl fmt::Display for Ipv6Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subnet = self.subnet.map_or("unknown".to_string(), |s| s.to_string());
        writeln!(
            f,
            "\nipv6:      vtep {} ({}), subnet {subnet}, outer hop limit {}, gso {}",
            self.vtep_ip,
            self.vtep_mac,
            self.outer_hop_limit,
            if self.underlay_keeps_gso {
                "on the fast path"
            } else {
                "to flannel-v6"
            }
        )?;
        for (subnet, vtep, mac) in &self.peers {
            writeln!(
                f,
                "  {:<24} {:<28} {mac}",
                subnet.to_string(),
                vtep.to_string()
            )?;
        }
        let vteps: Vec<String> = self.known_vteps.iter().map(ToString::to_string).collect();
        writeln!(f, "  known VTEPs: {}", vteps.join(", "))?;
        for (ip, port, mac) in &self.local_bindings {
            writeln!(
                f,
                "  {:<28} port ifindex {port:<6} mac {mac}",
                ip.to_string()
            )?;
        }
        Ok(())
    }
}
