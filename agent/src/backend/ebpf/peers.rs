//! The peer maps: remote subnets (subnet -> VTEP) and the known VTEPs whose
//! VXLAN is accepted, kept equal to the peer leases.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use tracing::info;

use super::{family::Peer, EbpfBackend, EbpfBackendError};
use crate::{
    datapath::{PeerEntry, PeerEntry6},
    lease::{BackendAttrs, Lease},
};

impl EbpfBackend {
    /// The map entry a peer lease needs; `None` for our own subnet and non-vxlan leases.
    pub(super) fn entry_for(&self, lease: &Lease) -> Option<PeerEntry> {
        match lease.attrs.backend {
            BackendAttrs::Vxlan { vtep_mac, .. } if Some(lease.subnet) != self.own => {
                Some(PeerEntry {
                    subnet: lease.subnet.trunc(),
                    vtep_ip: lease.attrs.public_ip,
                    vtep_mac,
                })
            }
            _ => None,
        }
    }

    /// Adds the VTEP before the subnet, so replies are accepted once we send.
    pub(super) fn add_entry<P: Peer>(&mut self, e: &P) -> Result<(), EbpfBackendError> {
        P::add_vtep(&mut self.dp, e.vtep())
            .map_err(Self::map_err(format!("accept VXLAN from {}", e.vtep())))?;
        e.upsert(&mut self.dp).map_err(Self::map_err(format!(
            "route {} to VTEP {}",
            e.subnet(),
            e.vtep()
        )))
    }

    /// Removes `subnet`'s entry, and `vtep` from the known VTEPs unless another
    /// subnet still uses it.
    pub(super) fn remove_entry(
        &mut self,
        subnet: Ipv4Net,
        vtep: Ipv4Addr,
    ) -> Result<(), EbpfBackendError> {
        self.dp
            .remove_peer(subnet)
            .map_err(Self::map_err(format!("remove {subnet}")))?;
        self.remove_vtep_if_unused(vtep)
    }

    pub(super) fn remove_vtep_if_unused(&mut self, vtep: Ipv4Addr) -> Result<(), EbpfBackendError> {
        let peers = self
            .dp
            .peers()
            .map_err(Self::map_err("list remote subnets".into()))?;
        if !peers.iter().any(|p| p.vtep_ip == vtep) {
            self.dp
                .remove_vtep(vtep)
                .map_err(Self::map_err(format!("stop accepting VXLAN from {vtep}")))?;
        }
        Ok(())
    }

    /// Makes the maps equal `peers`; returns the number of changes, or every
    /// entry that could not be written or removed.
    pub(super) fn sync_maps(&mut self, peers: &[Lease]) -> Result<usize, EbpfBackendError> {
        let want: Vec<PeerEntry> = peers.iter().filter_map(|l| self.entry_for(l)).collect();
        self.sync_peer_maps(want)
    }

    /// [`Self::sync_maps`] for IPv6 (empty maps while our IPv6 side is off).
    pub(super) fn sync_maps6(&mut self, peers: &[Lease]) -> Result<usize, EbpfBackendError> {
        let want: Vec<PeerEntry6> = peers.iter().filter_map(|l| self.entry_for6(l)).collect();
        self.sync_peer_maps(want)
    }

    /// Makes one family's peer maps hold exactly `want`.
    fn sync_peer_maps<P: Peer>(&mut self, want: Vec<P>) -> Result<usize, EbpfBackendError> {
        let want: BTreeMap<P::Net, P> = want.into_iter().map(|e| (e.subnet(), e)).collect();
        let want_vteps: BTreeSet<P::Ip> = want.values().map(|e| e.vtep()).collect();
        let have = P::list(&mut self.dp).map_err(Self::map_err("list remote subnets".into()))?;
        let have_vteps =
            P::vteps(&mut self.dp).map_err(Self::map_err("list known VTEPs".into()))?;
        let mut changes = 0;
        let mut errors = Vec::new();
        let mut count = |done: Result<(), EbpfBackendError>| match done {
            Ok(()) => changes += 1,
            Err(e) => errors.push(e),
        };
        // Stale entries first, so a full map makes room for the missing ones; every
        // entry is tried whatever an earlier one hit.
        for stale in have.iter().filter(|h| !want.contains_key(&h.subnet())) {
            info!(subnet = %stale.subnet(), vtep = %stale.vtep(), "removing map entry no lease justifies");
            count(
                P::remove(&mut self.dp, stale.subnet())
                    .map_err(Self::map_err(format!("remove {}", stale.subnet()))),
            );
        }
        for stale in have_vteps.iter().filter(|v| !want_vteps.contains(v)) {
            info!(vtep = %stale, "no longer accepting VXLAN from a host without a lease");
            count(
                P::remove_vtep(&mut self.dp, *stale)
                    .map_err(Self::map_err(format!("stop accepting VXLAN from {stale}"))),
            );
        }
        for e in want.values() {
            if !have.contains(e) || !have_vteps.contains(&e.vtep()) {
                info!(subnet = %e.subnet(), vtep = %e.vtep(), "adding missing map entry");
                count(self.add_entry(e));
            }
        }
        if !errors.is_empty() {
            return Err(EbpfBackendError::Steps(errors));
        }
        Ok(changes)
    }
}

impl EbpfBackend {
    /// The IPv6 map entry a peer lease needs; `None` while our IPv6 side is
    /// off, for our own subnet and for leases without an IPv6 VTEP.
    pub(super) fn entry_for6(&self, lease: &Lease) -> Option<PeerEntry6> {
        let own = self.node6.as_ref()?.subnet;
        let (subnet, vtep_ip, vtep_mac) = lease.vtep_v6()?;
        (Some(subnet.trunc()) != own).then_some(PeerEntry6 {
            subnet: subnet.trunc(),
            vtep_ip,
            vtep_mac,
        })
    }

    /// Follows one lease event on the IPv6 maps: `old`'s entry out, `new`'s in
    /// (its VTEP accepted before its subnet is routed).
    pub(super) fn apply6(
        &mut self,
        old: Option<&Lease>,
        new: Option<&Lease>,
    ) -> Result<(), EbpfBackendError> {
        let old = old.and_then(|l| self.entry_for6(l));
        let new = new.and_then(|l| self.entry_for6(l));
        if let Some(o) = old.filter(|o| Some(*o) != new) {
            self.dp
                .remove_peer(o.subnet)
                .map_err(Self::map_err(format!("remove {}", o.subnet)))?;
            let used = self
                .dp
                .peers6()
                .map_err(Self::map_err("list remote IPv6 subnets".into()))?
                .iter()
                .any(|p| p.vtep_ip == o.vtep_ip);
            if !used && new.map(|n| n.vtep_ip) != Some(o.vtep_ip) {
                self.dp
                    .remove_vtep(o.vtep_ip)
                    .map_err(Self::map_err(format!(
                        "stop accepting VXLAN from {}",
                        o.vtep_ip
                    )))?;
            }
            info!(subnet = %o.subnet, vtep = %o.vtep_ip, "IPv6 peer removed from the eBPF maps");
        }
        if let Some(n) = new {
            self.add_entry(&n)?;
            info!(subnet = %n.subnet, vtep = %n.vtep_ip, "IPv6 peer in the eBPF maps");
        }
        Ok(())
    }
}
