//! The peer maps: remote subnets (subnet -> VTEP) and the known VTEPs whose
//! VXLAN is accepted, kept equal to the peer leases.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use tracing::info;

use super::{family::Peer, Backend, BackendError, EbpfBackend, EbpfBackendError};
use crate::{
    datapath::{PeerEntry, PeerEntry6},
    lease::{BackendAttrs, Lease, LeaseEvent},
    turns::{collect_in_turns, Turns},
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

    /// A new peer's entries in both families' maps (after its kernel entries: the programs
    /// hand `flannel.N` whatever they pass on).
    pub(super) fn add_to_maps(&mut self, lease: &Lease) -> Result<(), EbpfBackendError> {
        if let Some(e) = self.entry_for(lease) {
            self.add_entry(&e)?;
            info!(subnet = %e.subnet, vtep = %e.vtep_ip, "peer added to the eBPF maps");
        }
        self.apply6(None, Some(lease))
    }

    /// [`Backend::apply_all`]: changed and removed peers one at a time, then the new ones'
    /// kernel entries with their requests overlapping (`VxlanBackend::add_all`), then
    /// their map entries.
    pub(super) async fn apply_batch(
        &mut self,
        events: &[LeaseEvent],
    ) -> Vec<Result<(), BackendError>> {
        let mut results: Vec<Option<Result<(), BackendError>>> =
            events.iter().map(|_| None).collect();
        let mut added = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            match ev {
                LeaseEvent::Added(l) => added.push((i, l)),
                ev => results[i] = Some(self.apply(ev).await),
            }
        }
        let leases: Vec<&Lease> = added.iter().map(|(_, l)| *l).collect();
        let kernel = self.inner.add_all(&leases).await;
        for ((i, lease), r) in added.into_iter().zip(kernel) {
            results[i] = Some(r.and_then(|()| Ok(self.add_to_maps(lease)?)));
        }
        results.into_iter().flatten().collect()
    }

    /// Adds the VTEP before the subnet, so replies are accepted once we send.
    /// Removal goes the other way round (subnets, then their VTEP): an entry
    /// naming a VTEP is what decapsulation takes as proof of the sender's lease.
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
    pub(super) async fn sync_maps(&mut self, peers: &[Lease]) -> Result<usize, EbpfBackendError> {
        let mut want = Vec::new();
        let mut turns = Turns::default();
        for lease in peers {
            want.extend(self.entry_for(lease));
            turns.tick().await;
        }
        self.sync_peer_maps(want).await
    }

    /// [`Self::sync_maps`] for IPv6 (empty maps while our IPv6 side is off).
    pub(super) async fn sync_maps6(&mut self, peers: &[Lease]) -> Result<usize, EbpfBackendError> {
        let mut want = Vec::new();
        let mut turns = Turns::default();
        for lease in peers {
            want.extend(self.entry_for6(lease));
            turns.tick().await;
        }
        self.sync_peer_maps(want).await
    }

    /// Makes one family's peer maps hold exactly `want`.
    ///
    /// Map writes are system calls that never yield: every [`SYNC_CHUNK`] entries the pass
    /// gives the runtime back, so that a lease event waiting behind it (the agent drops the
    /// pass for it) is not held up by thousands of them. The listings and comparisons go in
    /// turns too.
    async fn sync_peer_maps<P: Peer>(&mut self, wanted: Vec<P>) -> Result<usize, EbpfBackendError> {
        let mut turns = Turns::default();
        let (mut want, mut want_vteps) = (BTreeMap::new(), BTreeSet::new());
        for e in wanted {
            want.insert(e.subnet(), e);
            want_vteps.insert(e.vtep());
            turns.tick().await;
        }
        let listed = P::list(&mut self.dp)
            .await
            .map_err(Self::map_err("list remote subnets".into()))?;
        let mut have = BTreeMap::new();
        for e in listed {
            have.insert(e.subnet(), e);
            turns.tick().await;
        }
        let listed = P::vteps(&mut self.dp)
            .await
            .map_err(Self::map_err("list known VTEPs".into()))?;
        let have_vteps: BTreeSet<P::Ip> = collect_in_turns(listed).await;
        let mut changes = 0;
        let mut errors = Vec::new();
        let mut count = |done: Result<(), EbpfBackendError>| match done {
            Ok(()) => changes += 1,
            Err(e) => errors.push(e),
        };
        // Stale entries first, so a full map makes room for the missing ones; every
        // entry is tried whatever an earlier one hit.
        let mut stale = Vec::new();
        for h in have.values() {
            if !want.contains_key(&h.subnet()) {
                stale.push(*h);
            }
            turns.tick().await;
        }
        // VTEPs still named by an entry that could not be removed or rewritten.
        let mut still_named = BTreeSet::new();
        for (i, stale) in stale.iter().enumerate() {
            info!(subnet = %stale.subnet(), vtep = %stale.vtep(), "removing map entry no lease justifies");
            let removed = P::remove(&mut self.dp, stale.subnet());
            if removed.is_err() {
                still_named.insert(stale.vtep());
            }
            count(removed.map_err(Self::map_err(format!("remove {}", stale.subnet()))));
            yield_every(i).await;
        }
        let mut missing = Vec::new();
        for e in want.values() {
            if have.get(&e.subnet()) != Some(e) || !have_vteps.contains(&e.vtep()) {
                missing.push(*e);
            }
            turns.tick().await;
        }
        for (i, e) in missing.iter().enumerate() {
            info!(subnet = %e.subnet(), vtep = %e.vtep(), "adding missing map entry");
            let added = self.add_entry(e);
            if added.is_err() {
                still_named.extend(have.get(&e.subnet()).map(|h| h.vtep()));
            }
            count(added);
            yield_every(i).await;
        }
        // Stale VTEPs last: decapsulation takes a subnet entry naming the sender as proof
        // of its lease, so no entry may name a VTEP that is no longer accepted, not even
        // one whose subnet moved to another VTEP in this pass.
        let stale_vteps: Vec<P::Ip> = have_vteps
            .difference(&want_vteps)
            .filter(|v| !still_named.contains(*v))
            .copied()
            .collect();
        for (i, stale) in stale_vteps.iter().enumerate() {
            info!(vtep = %stale, "no longer accepting VXLAN from a host without a lease");
            count(
                P::remove_vtep(&mut self.dp, *stale)
                    .map_err(Self::map_err(format!("stop accepting VXLAN from {stale}"))),
            );
            yield_every(i).await;
        }
        if !errors.is_empty() {
            return Err(EbpfBackendError::Steps(errors));
        }
        Ok(changes)
    }
}

/// Map writes a reconcile pass makes between two yields to the runtime.
const SYNC_CHUNK: usize = 64;

async fn yield_every(i: usize) {
    if i % SYNC_CHUNK == SYNC_CHUNK - 1 {
        tokio::task::yield_now().await;
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
