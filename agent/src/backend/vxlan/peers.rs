//! IPv4 peers on `flannel.<VNI>`: the neighbour, fdb entry and route each lease needs,
//! programmed and removed in flanneld's order, and reconciled with what the kernel holds.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use tracing::{debug, info, warn};

use futures::StreamExt as _;

use super::{partial, Backend, BackendError, VxlanBackend, VxlanError};
use crate::lease::{BackendAttrs, Lease, LeaseEvent, MacAddr};
use crate::netlink::{Netlink, NetlinkError, RouteEntry, RouteSpec, SyncReport};
use crate::turns::Turns;

/// New peers programmed at once by [`VxlanBackend::add_all`]: enough requests in flight to
/// keep the kernel busy while replies come back, few enough for the socket's buffers.
const CONCURRENT_PEERS: usize = 64;

/// What the kernel holds for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PeerPlan {
    /// Neighbour `<subnet>.0 -> MAC` and fdb `MAC -> PublicIP`; `None` for a direct route.
    pub(super) vtep: Option<(Ipv4Addr, MacAddr, Ipv4Addr)>,
    pub(super) route: RouteSpec,
}

impl VxlanBackend {
    pub(super) async fn plan(
        &self,
        lease: &Lease,
        index: u32,
    ) -> Result<Option<PeerPlan>, VxlanError> {
        let BackendAttrs::Vxlan { vtep_mac, .. } = lease.attrs.backend else {
            return Ok(None);
        };
        // An IPv6-only lease (0.0.0.0/0) has nothing for flannel.N.
        if lease.ipv4_subnet().is_none() {
            return Ok(None);
        }
        let public_ip = lease.attrs.public_ip;
        let gw = lease.subnet.network();
        if self.s.direct_routing {
            let on_link =
                self.nl
                    .on_link_iface(public_ip)
                    .await
                    .map_err(|source| VxlanError::Peer {
                        subnet: lease.subnet,
                        public_ip,
                        source,
                    })?;
            if on_link.is_some() {
                let route = RouteSpec {
                    dst: lease.subnet,
                    gateway: Some(public_ip),
                    oif: None,
                    onlink: false,
                };
                return Ok(Some(PeerPlan { vtep: None, route }));
            }
        }
        let route = RouteSpec {
            dst: lease.subnet,
            gateway: Some(gw),
            oif: Some(index),
            onlink: true,
        };
        Ok(Some(PeerPlan {
            vtep: Some((gw, vtep_mac, public_ip)),
            route,
        }))
    }

    /// Program one peer in flannel's order, rolling back earlier steps on failure.
    async fn program(&self, lease: &Lease, index: u32, plan: &PeerPlan) -> Result<(), VxlanError> {
        let peer_err = |source| VxlanError::Peer {
            subnet: lease.subnet,
            public_ip: lease.attrs.public_ip,
            source,
        };
        let Some((gw, mac, public_ip)) = plan.vtep else {
            return self.nl.replace_route(&plan.route).await.map_err(peer_err);
        };
        self.nl
            .replace_neighbour(index, gw, mac)
            .await
            .map_err(peer_err)?;
        if let Err(e) = self.nl.replace_fdb(index, mac, public_ip).await {
            self.rollback(index, gw, None).await;
            return Err(peer_err(e));
        }
        if let Err(e) = self.nl.replace_route(&plan.route).await {
            self.rollback(index, gw, Some((mac, public_ip))).await;
            return Err(peer_err(e));
        }
        Ok(())
    }

    async fn rollback(&self, index: u32, gw: Ipv4Addr, fdb: Option<(MacAddr, Ipv4Addr)>) {
        if let Err(e) = self.nl.del_neighbour(index, gw).await {
            warn!(error = %e, "rollback: could not remove neighbour");
        }
        if let Some((mac, ip)) = fdb {
            if let Err(e) = self.nl.del_fdb(index, mac, Some(ip.into())).await {
                warn!(error = %e, "rollback: could not remove fdb entry");
            }
        }
    }

    /// Remove what `lease` may have put in the kernel: neighbour, fdb, route.
    pub(super) async fn unprogram(&self, lease: &Lease, index: u32) -> Result<(), VxlanError> {
        let gw = lease.subnet.network();
        let public_ip = lease.attrs.public_ip;
        let mut failures = Vec::new();
        let mut keep = |r: Result<(), NetlinkError>| {
            if let Err(e) = r {
                failures.push(e)
            }
        };
        keep(self.nl.del_neighbour(index, gw).await);
        if let BackendAttrs::Vxlan { vtep_mac, .. } = lease.attrs.backend {
            keep(
                self.nl
                    .del_fdb(index, vtep_mac, Some(public_ip.into()))
                    .await,
            );
        }
        let vxlan_route = RouteSpec {
            dst: lease.subnet,
            gateway: Some(gw),
            oif: Some(index),
            onlink: true,
        };
        keep(self.nl.del_route(&vxlan_route).await);
        let direct = RouteSpec {
            dst: lease.subnet,
            gateway: Some(public_ip),
            oif: None,
            onlink: false,
        };
        keep(self.nl.del_route(&direct).await);
        partial(format!("remove peer {}", lease.subnet), failures)
    }

    pub(super) async fn add_or_change(
        &self,
        old: Option<&Lease>,
        new: &Lease,
    ) -> Result<(), VxlanError> {
        let (index, _) = self.dev()?;
        let Some(plan) = self.plan(new, index).await? else {
            debug!(subnet = %new.subnet, "ignoring lease of another backend type");
            return Ok(());
        };
        self.program(new, index, &plan).await?;
        info!(subnet = %new.subnet, public_ip = %new.attrs.public_ip, direct = plan.vtep.is_none(), "peer programmed");
        let Some(old) = old else { return Ok(()) };
        // A changed VTEP (new MAC or public IP) or a switch to direct routing leaves
        // entries the new plan does not overwrite.
        let mut failures = Vec::new();
        if let BackendAttrs::Vxlan {
            vtep_mac: old_mac, ..
        } = old.attrs.backend
        {
            let old_fdb = (old_mac, old.attrs.public_ip);
            if plan.vtep.map(|(_, m, ip)| (m, ip)) != Some(old_fdb) {
                if let Err(e) = self
                    .nl
                    .del_fdb(index, old_fdb.0, Some(old_fdb.1.into()))
                    .await
                {
                    failures.push(e);
                }
            }
        }
        if plan.vtep.is_none() {
            if let Err(e) = self.nl.del_neighbour(index, old.subnet.network()).await {
                failures.push(e);
            }
        }
        partial(
            format!("clean up after peer {} changed", new.subnet),
            failures,
        )
    }

    /// [`Backend::apply_all`]: changed and removed peers one at a time, then the new ones
    /// with [`CONCURRENT_PEERS`] of them in flight, each still in flanneld's order. One at a
    /// time, a snapshot of thousands waits for each reply before the next request.
    pub(super) async fn apply_batch(
        &mut self,
        events: &[LeaseEvent],
    ) -> Vec<Result<(), BackendError>> {
        let mut results: Vec<Option<Result<(), BackendError>>> =
            events.iter().map(|_| None).collect();
        for (i, ev) in events.iter().enumerate() {
            if !matches!(ev, LeaseEvent::Added(_)) {
                results[i] = Some(self.apply(ev).await);
            }
        }
        let added: Vec<(usize, &Lease)> = events
            .iter()
            .enumerate()
            .filter_map(|(i, ev)| match ev {
                LeaseEvent::Added(l) => Some((i, l)),
                _ => None,
            })
            .collect();
        let leases: Vec<&Lease> = added.iter().map(|(_, l)| *l).collect();
        for ((i, _), r) in added.iter().zip(self.add_all(&leases).await) {
            results[*i] = Some(r);
        }
        results.into_iter().flatten().collect()
    }

    /// What [`Backend::apply`] does for `Added`, for many leases with their requests overlapping.
    pub(crate) async fn add_all(&self, leases: &[&Lease]) -> Vec<Result<(), BackendError>> {
        // By index: a closure over `&&Lease` trips the compiler's check that the future is Send.
        futures::stream::iter(0..leases.len())
            .map(|i| self.add(leases[i]))
            .buffered(CONCURRENT_PEERS)
            .collect()
            .await
    }

    pub(super) async fn add(&self, lease: &Lease) -> Result<(), BackendError> {
        if self.s.has_ipv4() {
            self.add_or_change(None, lease).await?;
        }
        self.program6(lease).await?;
        Ok(())
    }

    /// Routes this backend owns: those on the device, and direct routes into Network.
    pub(super) fn owns_route(&self, index: u32, r: &RouteEntry) -> bool {
        r.oif == Some(index)
            || (r.oif == Some(self.s.external.index)
                && r.gateway.is_some()
                && self.s.network.contains(&r.dst)
                && Some(r.dst) != self.own)
    }

    /// A netlink socket of its own for one reconcile pass's dumps and repairs. The agent drops
    /// a pass when a lease event arrives; on the shared socket, the dumps it left in flight
    /// (thousands of messages) would be read and thrown away ahead of the event's replies.
    /// Dropped with the pass, this one closes and the kernel discards them.
    pub(crate) fn pass_netlink(&self) -> Netlink {
        Netlink::connect().unwrap_or_else(|e| {
            warn!(error = %e, "reconciling on the shared netlink socket");
            self.nl.clone()
        })
    }

    pub(super) async fn sync_vtep_entries(
        &self,
        nl: &Netlink,
        index: u32,
        plans: &[PeerPlan],
    ) -> Result<SyncReport, NetlinkError> {
        let mut report = SyncReport::default();
        // Sets, not scans: with thousands of peers, comparing every wanted entry with every
        // kernel entry took tens of ms that nothing could interrupt. Built and compared in
        // turns (a few ms a pass at 5000 peers otherwise), so the pass stays droppable.
        // (Loops rather than iterator chains: a closure over a reference held across an
        // await makes the compiler doubt the future is Send.)
        let mut turns = Turns::default();
        let mut want = Vec::new();
        let mut want_neighs = HashSet::new();
        let mut want_fdb: HashSet<(MacAddr, IpAddr)> = HashSet::new();
        for plan in plans {
            turns.tick().await;
            let Some((gw, mac, ip)) = plan.vtep else {
                continue;
            };
            want.push((gw, mac, ip));
            want_neighs.insert(gw);
            want_fdb.insert((mac, ip.into()));
        }
        // Neighbours and fdb first: a route to a gateway without its neighbour would ARP.
        let neighs = nl.neighbours_v4(index).await?;
        let mut have_neighs = HashSet::new();
        for n in &neighs {
            if let (true, Some(mac)) = (n.permanent, n.mac) {
                have_neighs.insert((n.ip, mac));
            }
            turns.tick().await;
        }
        for &(gw, mac, _) in &want {
            if !have_neighs.contains(&(gw, mac)) {
                report.record(nl.replace_neighbour(index, gw, mac).await);
            }
            turns.tick().await;
        }
        let fdb = nl.fdb_entries(index).await?;
        let mut have_fdb = HashSet::new();
        for f in &fdb {
            if let (true, Some(dst)) = (f.permanent, f.dst) {
                have_fdb.insert((f.mac, dst));
            }
            turns.tick().await;
        }
        for &(_, mac, ip) in &want {
            if !have_fdb.contains(&(mac, ip.into())) {
                report.record(nl.replace_fdb(index, mac, ip).await);
            }
            turns.tick().await;
        }
        for n in &neighs {
            if n.permanent && !want_neighs.contains(&n.ip) {
                info!(ip = %n.ip, "removing neighbour no lease justifies");
                report.record(nl.del_neighbour(index, n.ip).await);
            }
            turns.tick().await;
        }
        for f in &fdb {
            if f.permanent && !f.dst.is_some_and(|d| want_fdb.contains(&(f.mac, d))) {
                info!(mac = %f.mac, dst = ?f.dst, "removing fdb entry no lease justifies");
                report.record(nl.del_fdb(index, f.mac, f.dst).await);
            }
            turns.tick().await;
        }
        Ok(report)
    }
}
