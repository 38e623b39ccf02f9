//! `flannel-v6.<VNI>`: the IPv6 device, its address and the per-peer neighbour, fdb entry
//! and route over the IPv6 underlay.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use tracing::{info, warn};

use super::{partial, VxlanBackend, VxlanError, IPV6_EXTRA_OVERHEAD};
use crate::lease::{Lease, MacAddr, VxlanData};
use crate::netlink::{NetlinkError, RouteEntry6, RouteSpec6, SyncReport, VxlanSpec};

/// What the kernel holds for one IPv6 peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerPlan6 {
    /// Neighbour `<v6 subnet>:: -> MAC` and fdb `MAC -> PublicIPv6`; `None` for a direct route.
    vtep: Option<(Ipv6Addr, MacAddr, Ipv6Addr)>,
    route: RouteSpec6,
}

/// `<v6 subnet> via <v6 subnet>:: dev flannel-v6.<VNI> onlink`.
fn vxlan_route6(subnet: Ipv6Net, index: u32) -> RouteSpec6 {
    RouteSpec6 {
        dst: subnet,
        gateway: Some(subnet.network()),
        oif: Some(index),
        onlink: true,
    }
}

/// DirectRouting: `<v6 subnet> via <PublicIPv6>`, the kernel picking the device.
fn direct_route6(subnet: Ipv6Net, public: Ipv6Addr) -> RouteSpec6 {
    RouteSpec6 {
        dst: subnet,
        gateway: Some(public),
        oif: None,
        onlink: false,
    }
}

/// A failed step for an IPv6 peer, reported under the lease's key subnet and PublicIP.
fn peer_err(lease: &Lease, source: NetlinkError) -> VxlanError {
    VxlanError::Peer {
        subnet: lease.subnet,
        public_ip: lease.attrs.public_ip,
        source,
    }
}

/// `flannel-v6.<VNI>`: the IPv6 half of the kernel datapath.
impl VxlanBackend {
    fn spec6(&self, mac: MacAddr) -> Result<VxlanSpec, VxlanError> {
        let local = self.s.external.ipv6.ok_or_else(|| VxlanError::NoIpv6 {
            iface: self.s.external.name.clone(),
            name: self.s.device_name_v6(),
        })?;
        let mut spec = self.spec_at(self.s.device_name_v6(), local.into(), mac);
        // An IPv6 outer header is 20 bytes longer: the kernel caps the device at the
        // underlay's MTU - 70, as it sizes flanneld's flannel-v6 on its own.
        spec.mtu = spec.mtu.saturating_sub(IPV6_EXTRA_OVERHEAD);
        Ok(spec)
    }

    fn device6_err(&self, source: NetlinkError) -> VxlanError {
        VxlanError::Device {
            name: self.s.device_name_v6(),
            source,
        }
    }

    /// Create (or adopt, or repair) `flannel-v6.<VNI>` with flanneld's attributes over the IPv6
    /// underlay; its `BackendV6Data`. `None` when IPv6 is not enabled.
    pub async fn prepare_ipv6(&mut self) -> Result<Option<VxlanData>, VxlanError> {
        if self.s.ipv6.is_none() {
            return Ok(None);
        }
        let keep = self.dev6.map(|d| d.1);
        let spec = self.spec6(keep.unwrap_or_else(MacAddr::random))?;
        let (link, created) = self.ensure_device_spec(spec, keep).await?;
        let mac = link.mac.ok_or_else(|| {
            self.device6_err(NetlinkError::NoSuchLink {
                name: format!("{} (it has no MAC address)", link.name),
            })
        })?;
        info!(device = %link.name, index = link.index, mac = %mac, created, "IPv6 vxlan device ready");
        self.dev6 = Some((link.index, mac));
        Ok(Some(VxlanData {
            vni: Some(self.s.vni),
            vtep_mac: mac,
        }))
    }

    /// `<v6 subnet>::/128` on `flannel-v6.<VNI>`, other addresses inside IPv6Network removed, up.
    pub(super) async fn ensure_address6(
        &self,
        index: u32,
        subnet: Ipv6Net,
    ) -> Result<usize, VxlanError> {
        let want = Ipv6Net::new(subnet.network(), 128).unwrap_or(subnet);
        let network = self.s.ipv6.unwrap_or(subnet);
        let err = |e| self.device6_err(e);
        let have = self.nl.addresses_v6(index).await.map_err(err)?;
        let mut changes = 0;
        for stray in have
            .iter()
            .filter(|a| **a != want && network.contains(&a.addr()))
        {
            self.nl.del_address(index, *stray).await.map_err(err)?;
            changes += 1;
        }
        if !have.contains(&want) {
            self.nl.add_address(index, want).await.map_err(err)?;
            changes += 1;
        }
        if !self
            .nl
            .link_by_index(index)
            .await
            .map_err(err)?
            .is_some_and(|l| l.up)
        {
            self.nl.set_link_up(index).await.map_err(err)?;
            changes += 1;
        }
        Ok(changes)
    }

    /// The IPv6 entries a peer needs; `None` when the lease carries no IPv6 VTEP inside
    /// IPv6Network. With `DirectRouting` and the peer's PublicIPv6 on a directly connected
    /// network, only `ip -6 route replace <v6 subnet> via <PublicIPv6>`, as for IPv4.
    async fn plan6(&self, lease: &Lease, index: u32) -> Result<Option<PeerPlan6>, VxlanError> {
        let Some((subnet, public, mac)) = lease.vtep_v6() else {
            return Ok(None);
        };
        if !self.s.ipv6.is_some_and(|n| n.contains(&subnet)) || Some(subnet) == self.own6 {
            return Ok(None);
        }
        if self.s.direct_routing {
            let on_link = self
                .nl
                .on_link_iface(public)
                .await
                .map_err(|source| peer_err(lease, source))?;
            if on_link.is_some() {
                let route = direct_route6(subnet, public);
                return Ok(Some(PeerPlan6 { vtep: None, route }));
            }
        }
        let gw = subnet.network();
        Ok(Some(PeerPlan6 {
            vtep: Some((gw, mac, public)),
            route: vxlan_route6(subnet, index),
        }))
    }

    /// Program a peer's IPv6 entries in flannel's order, rolling back on failure.
    pub(super) async fn program6(&self, lease: &Lease) -> Result<(), VxlanError> {
        let Some((index, _)) = self.dev6 else {
            return Ok(());
        };
        let Some(plan) = self.plan6(lease, index).await? else {
            return Ok(());
        };
        let Some((gw, mac, public)) = plan.vtep else {
            self.nl
                .replace_route(&plan.route)
                .await
                .map_err(|e| peer_err(lease, e))?;
            info!(subnet = %plan.route.dst, via = ?plan.route.gateway, "IPv6 peer routed directly");
            return Ok(());
        };
        self.nl
            .replace_neighbour(index, gw, mac)
            .await
            .map_err(|e| peer_err(lease, e))?;
        if let Err(e) = self.nl.replace_fdb(index, mac, public).await {
            let _ = self.nl.del_neighbour(index, gw).await;
            return Err(peer_err(lease, e));
        }
        if let Err(e) = self.nl.replace_route(&plan.route).await {
            let _ = self.nl.del_neighbour(index, gw).await;
            let _ = self.nl.del_fdb(index, mac, Some(public.into())).await;
            return Err(peer_err(lease, e));
        }
        info!(subnet = %plan.route.dst, public_ipv6 = %public, "IPv6 peer programmed");
        Ok(())
    }

    /// Remove what a lease put on `flannel-v6.<VNI>`, or its direct route.
    pub(super) async fn unprogram6(&self, lease: &Lease) -> Result<(), VxlanError> {
        let (Some((index, _)), Some((subnet, public, mac))) = (self.dev6, lease.vtep_v6()) else {
            return Ok(());
        };
        let gw = subnet.network();
        let mut failures = Vec::new();
        for r in [
            self.nl.del_neighbour(index, gw).await,
            self.nl.del_fdb(index, mac, Some(public.into())).await,
            self.nl.del_route(&vxlan_route6(subnet, index)).await,
            self.nl.del_route(&direct_route6(subnet, public)).await,
        ] {
            failures.extend(r.err());
        }
        partial(format!("remove IPv6 peer {subnet}"), failures)
    }

    /// Routes `flannel-v6.<VNI>`'s reconcile owns: those on the device, and direct routes into
    /// IPv6Network over the external interface (other than our own subnet's).
    fn owns_route6(&self, index: u32, r: &RouteEntry6) -> bool {
        r.oif == Some(index)
            || (r.oif == Some(self.s.external.index)
                && r.gateway.is_some()
                && self.s.ipv6.is_some_and(|n| n.contains(&r.dst))
                && Some(r.dst) != self.own6)
    }

    /// Make `flannel-v6.<VNI>`'s device, address, neighbours, fdb and routes match `peers`.
    pub(super) async fn reconcile6(&mut self, peers: &[Lease]) -> Result<usize, VxlanError> {
        let Some((old_index, mac)) = self.dev6 else {
            return Ok(0);
        };
        let mut repairs = 0;
        let current = self
            .nl
            .link_by_name(&self.s.device_name_v6())
            .await
            .map_err(|e| self.device6_err(e))?;
        let spec = self.spec6(mac)?;
        let healthy = current.as_ref().is_some_and(|l| {
            l.index == old_index && l.mac == Some(mac) && spec.incompatibility(l).is_none()
        });
        if !healthy {
            warn!(device = %spec.name, mac = %mac, "IPv6 device missing or altered; recreating it with the advertised MAC");
            let (link, _) = self.ensure_device_spec(spec, Some(mac)).await?;
            self.dev6 = Some((link.index, mac));
            repairs += 1;
        }
        let index = self.dev6.map_or(old_index, |d| d.0);
        if let Some(own) = self.own6 {
            repairs += self.ensure_address6(index, own).await?;
        }
        let mut plans = Vec::new();
        let mut report = SyncReport::default();
        // A peer we could not check keeps whatever route it has.
        let mut unchecked = Vec::new();
        for lease in peers {
            match self.plan6(lease, index).await {
                Ok(Some(p)) => plans.push(p),
                Ok(None) => {}
                Err(VxlanError::Peer { source, .. }) => {
                    unchecked.extend(lease.ipv6_subnet);
                    report.failures.push(source);
                }
                Err(e) => return Err(e),
            }
        }
        let vteps: Vec<(Ipv6Addr, MacAddr, Ipv6Addr)> =
            plans.iter().filter_map(|p| p.vtep).collect();
        let err = |e| self.device6_err(e);
        let neighs = self.nl.neighbours_v6(index).await.map_err(err)?;
        for &(gw, mac, _) in &vteps {
            if !neighs
                .iter()
                .any(|n| n.ip == gw && n.mac == Some(mac) && n.permanent)
            {
                report.record(self.nl.replace_neighbour(index, gw, mac).await);
            }
        }
        let fdb = self.nl.fdb_entries(index).await.map_err(err)?;
        for &(_, mac, ip) in &vteps {
            if !fdb
                .iter()
                .any(|f| f.mac == mac && f.dst == Some(ip.into()) && f.permanent)
            {
                report.record(self.nl.replace_fdb(index, mac, ip).await);
            }
        }
        for n in neighs
            .iter()
            .filter(|n| n.permanent && !vteps.iter().any(|v| v.0 == n.ip))
        {
            report.record(self.nl.del_neighbour(index, n.ip).await);
        }
        for f in fdb.iter().filter(|f| {
            f.permanent
                && !vteps
                    .iter()
                    .any(|v| Some(v.2.into()) == f.dst && v.1 == f.mac)
        }) {
            report.record(self.nl.del_fdb(index, f.mac, f.dst).await);
        }
        let routes: Vec<RouteSpec6> = plans.iter().map(|p| p.route).collect();
        let owned = |r: &RouteEntry6| self.owns_route6(index, r) && !unchecked.contains(&r.dst);
        report.merge(self.nl.sync_routes(owned, &routes).await.map_err(err)?);
        repairs += report.repairs;
        partial(
            format!("reconcile {}", self.s.device_name_v6()),
            report.failures,
        )?;
        Ok(repairs)
    }
}
