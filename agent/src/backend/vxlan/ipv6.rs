//! `flannel-v6.<VNI>`: the IPv6 device, its address and the per-peer neighbour, fdb entry
//! and route over the IPv6 underlay.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use tracing::{info, warn};

use super::{partial, VxlanBackend, VxlanError, IPV6_EXTRA_OVERHEAD};
use crate::lease::{Lease, MacAddr, VxlanData};
use crate::netlink::{NetlinkError, RouteEntry6, RouteSpec6, SyncReport, VxlanSpec};

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

    /// The IPv6 entries a peer needs: (gateway, MAC, PublicIPv6) and the route; `None` when the
    /// lease carries no IPv6 VTEP inside IPv6Network.
    fn plan6(
        &self,
        lease: &Lease,
        index: u32,
    ) -> Option<((Ipv6Addr, MacAddr, Ipv6Addr), RouteSpec6)> {
        let (subnet, public, mac) = lease.vtep_v6()?;
        if !self.s.ipv6.is_some_and(|n| n.contains(&subnet)) || Some(subnet) == self.own6 {
            return None;
        }
        let gw = subnet.network();
        let route = RouteSpec6 {
            dst: subnet,
            gateway: Some(gw),
            oif: Some(index),
            onlink: true,
        };
        Some(((gw, mac, public), route))
    }

    /// Program a peer's IPv6 entries in flannel's order, rolling back on failure.
    pub(super) async fn program6(&self, lease: &Lease) -> Result<(), VxlanError> {
        let Some((index, _)) = self.dev6 else {
            return Ok(());
        };
        let Some(((gw, mac, public), route)) = self.plan6(lease, index) else {
            return Ok(());
        };
        let peer_err = |source| VxlanError::Peer {
            subnet: lease.subnet,
            public_ip: lease.attrs.public_ip,
            source,
        };
        self.nl
            .replace_neighbour(index, gw, mac)
            .await
            .map_err(peer_err)?;
        if let Err(e) = self.nl.replace_fdb(index, mac, public).await {
            let _ = self.nl.del_neighbour(index, gw).await;
            return Err(peer_err(e));
        }
        if let Err(e) = self.nl.replace_route(&route).await {
            let _ = self.nl.del_neighbour(index, gw).await;
            let _ = self.nl.del_fdb(index, mac, Some(public.into())).await;
            return Err(peer_err(e));
        }
        info!(subnet = %route.dst, public_ipv6 = %public, "IPv6 peer programmed");
        Ok(())
    }

    /// Remove what a lease put on `flannel-v6.<VNI>`.
    pub(super) async fn unprogram6(&self, lease: &Lease) -> Result<(), VxlanError> {
        let (Some((index, _)), Some((subnet, public, mac))) = (self.dev6, lease.vtep_v6()) else {
            return Ok(());
        };
        let gw = subnet.network();
        let route = RouteSpec6 {
            dst: subnet,
            gateway: Some(gw),
            oif: Some(index),
            onlink: true,
        };
        let mut failures = Vec::new();
        for r in [
            self.nl.del_neighbour(index, gw).await,
            self.nl.del_fdb(index, mac, Some(public.into())).await,
            self.nl.del_route(&route).await,
        ] {
            failures.extend(r.err());
        }
        partial(format!("remove IPv6 peer {subnet}"), failures)
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
        let plans: Vec<_> = peers.iter().filter_map(|l| self.plan6(l, index)).collect();
        let err = |e| self.device6_err(e);
        let mut report = SyncReport::default();
        let neighs = self.nl.neighbours_v6(index).await.map_err(err)?;
        for &((gw, mac, _), _) in &plans {
            if !neighs
                .iter()
                .any(|n| n.ip == gw && n.mac == Some(mac) && n.permanent)
            {
                report.record(self.nl.replace_neighbour(index, gw, mac).await);
            }
        }
        let fdb = self.nl.fdb_entries(index).await.map_err(err)?;
        for &((_, mac, ip), _) in &plans {
            if !fdb
                .iter()
                .any(|f| f.mac == mac && f.dst == Some(ip.into()) && f.permanent)
            {
                report.record(self.nl.replace_fdb(index, mac, ip).await);
            }
        }
        for n in neighs
            .iter()
            .filter(|n| n.permanent && !plans.iter().any(|p| p.0 .0 == n.ip))
        {
            report.record(self.nl.del_neighbour(index, n.ip).await);
        }
        for f in fdb.iter().filter(|f| {
            f.permanent
                && !plans
                    .iter()
                    .any(|p| Some(p.0 .2.into()) == f.dst && p.0 .1 == f.mac)
        }) {
            report.record(self.nl.del_fdb(index, f.mac, f.dst).await);
        }
        let routes: Vec<RouteSpec6> = plans.iter().map(|p| p.1).collect();
        let owned = |r: &RouteEntry6| r.oif == Some(index);
        report.merge(self.nl.sync_routes(owned, &routes).await.map_err(err)?);
        repairs += report.repairs;
        partial(
            format!("reconcile {}", self.s.device_name_v6()),
            report.failures,
        )?;
        Ok(repairs)
    }
}
