//! The kernel VXLAN backend: `flannel.<VNI>` programmed exactly as flanneld does.
//!
//! Per remote lease (subnet 10.1.54.0/24, PublicIP P, VtepMAC M) the kernel gets,
//! in this order, each step rolled back if a later one fails:
//! 1. `ip neigh replace 10.1.54.0 dev flannel.1 lladdr M nud permanent`
//! 2. `bridge fdb replace M dev flannel.1 dst P self permanent`
//! 3. `ip route replace 10.1.54.0/24 via 10.1.54.0 dev flannel.1 onlink`
//!
//! With `DirectRouting` and P on a directly connected network, only
//! `ip route replace 10.1.54.0/24 via P`. Unlike flanneld, [`VxlanBackend::reconcile`]
//! removes entries no lease justifies and recreates a deleted device with the MAC
//! already advertised in our lease.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::{join, Backend, BackendError};
use crate::lease::{BackendAttrs, Lease, LeaseEvent, MacAddr};
use crate::netlink::{
    ExternalIface, LinkInfo, Netlink, NetlinkError, RouteEntry, RouteSpec, SyncReport, VxlanSpec,
};
use weft_common::wire;

/// The overlay MTU under an underlay of `underlay_mtu`: what VXLAN adds in front of the
/// inner IP header comes off, as flanneld sizes `flannel.<VNI>`.
pub fn overlay_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(wire::VXLAN_OVERHEAD as u32)
}

/// The vxlan backend's settings, built from the network config's `Backend` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSettings {
    /// The overlay `Network`; addresses and routes inside it are ours to manage.
    pub network: Ipv4Net,
    /// `VNI` (flannel default 1); the device is `flannel.<VNI>`.
    pub vni: u32,
    /// `Port`; 0 means the kernel's default ([`wire::DEFAULT_PORT`]).
    pub port: u16,
    /// `MTU`: the underlay MTU to assume instead of the interface's ([`overlay_mtu`]).
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    pub external: ExternalIface,
}

impl VxlanSettings {
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// MTU of `flannel.<VNI>`: (configured or interface MTU) - 50.
    pub fn device_mtu(&self) -> u32 {
        overlay_mtu(self.mtu.unwrap_or(self.external.mtu))
    }

    /// The UDP port in use: `Port`, or the kernel's default for 0.
    pub fn port(&self) -> u16 {
        if self.port == 0 {
            wire::DEFAULT_PORT
        } else {
            self.port
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("set up vxlan device {name}: {source}")]
    Device {
        name: String,
        #[source]
        source: NetlinkError,
    },
    #[error(
        "vxlan device {name} reappeared with an incompatible configuration ({why}) right after \
         weft deleted it; is another flanneld or weft running on this host?"
    )]
    Contended { name: String, why: String },
    #[error("{name}: weft must call prepare() before own_lease/apply/reconcile")]
    NotPrepared { name: String },
    #[error(
        "program peer {subnet} (host {public_ip}): {source}; earlier steps were rolled back, \
         the next reconcile retries"
    )]
    Peer {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        #[source]
        source: NetlinkError,
    },
    #[error("{what}: {} kernel operations failed: {}", failures.len(), join(failures))]
    Partial {
        what: String,
        failures: Vec<NetlinkError>,
    },
}

/// What the kernel holds for one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerPlan {
    /// Neighbour `<subnet>.0 -> MAC` and fdb `MAC -> PublicIP`; `None` for a direct route.
    vtep: Option<(Ipv4Addr, MacAddr, Ipv4Addr)>,
    route: RouteSpec,
}

/// `flannel.<VNI>` and the per-peer entries on it.
pub struct VxlanBackend {
    nl: Netlink,
    s: VxlanSettings,
    /// Index of the device and the MAC advertised in our lease, once prepared.
    dev: Option<(u32, MacAddr)>,
    own: Option<Ipv4Net>,
}

impl VxlanBackend {
    pub fn new(nl: Netlink, settings: VxlanSettings) -> Self {
        Self {
            nl,
            s: settings,
            dev: None,
            own: None,
        }
    }

    fn spec(&self, mac: MacAddr) -> VxlanSpec {
        VxlanSpec {
            name: self.s.device_name(),
            vni: self.s.vni,
            local: self.s.external.ipv4,
            dev_index: self.s.external.index,
            port: self.s.port(),
            learning: self.s.learning,
            gbp: self.s.gbp,
            mtu: self.s.device_mtu(),
            mac,
        }
    }

    fn device_err(&self, source: NetlinkError) -> VxlanError {
        VxlanError::Device {
            name: self.s.device_name(),
            source,
        }
    }

    fn dev(&self) -> Result<(u32, MacAddr), VxlanError> {
        self.dev.ok_or_else(|| VxlanError::NotPrepared {
            name: self.s.device_name(),
        })
    }

    /// Create the device, reuse a compatible one (keeping its MAC unless `keep_mac`
    /// says which MAC it must have), or replace an incompatible one. Returns the
    /// device and whether it was (re)created.
    async fn ensure_device(
        &self,
        keep_mac: Option<MacAddr>,
    ) -> Result<(LinkInfo, bool), VxlanError> {
        let name = self.s.device_name();
        let spec = self.spec(keep_mac.unwrap_or_else(MacAddr::random));
        let mut created = self
            .nl
            .add_vxlan(&spec)
            .await
            .map_err(|e| self.device_err(e))?;
        let mut link = self.fetch(&name).await?;
        if !created {
            let why = spec.incompatibility(&link).or_else(|| match keep_mac {
                Some(m) if link.mac != Some(m) => Some(format!(
                    "MAC {} instead of the advertised {}",
                    link.mac.map(|m| m.to_string()).unwrap_or_default(),
                    m
                )),
                _ => None,
            });
            if let Some(why) = why {
                warn!(device = %name, reason = %why, "existing device is incompatible; recreating it");
                self.nl
                    .del_link(link.index)
                    .await
                    .map_err(|e| self.device_err(e))?;
                if !self
                    .nl
                    .add_vxlan(&spec)
                    .await
                    .map_err(|e| self.device_err(e))?
                {
                    return Err(VxlanError::Contended { name, why });
                }
                created = true;
                link = self.fetch(&name).await?;
            } else {
                info!(device = %name, mac = %link.mac.map(|m| m.to_string()).unwrap_or_default(),
                      "reusing existing compatible device");
            }
        }
        if link.mtu != spec.mtu {
            info!(device = %name, from = link.mtu, to = spec.mtu, "setting MTU");
            self.nl
                .set_link_mtu(link.index, spec.mtu)
                .await
                .map_err(|e| self.device_err(e))?;
        }
        disable_accept_ra(&name);
        Ok((link, created))
    }

    async fn fetch(&self, name: &str) -> Result<LinkInfo, VxlanError> {
        self.nl
            .link_by_name(name)
            .await
            .map_err(|e| self.device_err(e))?
            .ok_or_else(|| {
                self.device_err(NetlinkError::NoSuchLink {
                    name: name.to_string(),
                })
            })
    }

    /// `<subnet>.0/32` on the device, other addresses inside Network removed, link up.
    /// Returns the number of changes made.
    async fn ensure_address(&self, index: u32, subnet: Ipv4Net) -> Result<usize, VxlanError> {
        let want = Ipv4Net::new(subnet.network(), 32).unwrap_or(subnet);
        let have = self
            .nl
            .addresses_v4(index)
            .await
            .map_err(|e| self.device_err(e))?;
        let mut changes = 0;
        for stray in have
            .iter()
            .filter(|a| **a != want && self.s.network.contains(&a.addr()))
        {
            info!(device = %self.s.device_name(), address = %stray, "removing stale address");
            self.nl
                .del_address(index, *stray)
                .await
                .map_err(|e| self.device_err(e))?;
            changes += 1;
        }
        if !have.contains(&want) {
            self.nl
                .add_address(index, want)
                .await
                .map_err(|e| self.device_err(e))?;
            changes += 1;
        }
        let up = self
            .nl
            .link_by_index(index)
            .await
            .map_err(|e| self.device_err(e))?;
        if !up.is_some_and(|l| l.up) {
            self.nl
                .set_link_up(index)
                .await
                .map_err(|e| self.device_err(e))?;
            changes += 1;
        }
        Ok(changes)
    }

    /// What a vxlan peer lease needs; `None` for leases of other backend types.
    async fn plan(&self, lease: &Lease, index: u32) -> Result<Option<PeerPlan>, VxlanError> {
        let BackendAttrs::Vxlan { vtep_mac, .. } = lease.attrs.backend else {
            return Ok(None);
        };
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
            if let Err(e) = self.nl.del_fdb(index, mac, Some(ip)).await {
                warn!(error = %e, "rollback: could not remove fdb entry");
            }
        }
    }

    /// Remove what `lease` may have put in the kernel: neighbour, fdb, route.
    async fn unprogram(&self, lease: &Lease, index: u32) -> Result<(), VxlanError> {
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
            keep(self.nl.del_fdb(index, vtep_mac, Some(public_ip)).await);
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

    async fn add_or_change(&self, old: Option<&Lease>, new: &Lease) -> Result<(), VxlanError> {
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
                if let Err(e) = self.nl.del_fdb(index, old_fdb.0, Some(old_fdb.1)).await {
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

    /// Recreate a deleted or altered device with the advertised MAC; re-address it.
    async fn repair_device(&mut self) -> Result<usize, VxlanError> {
        let (old_index, mac) = self.dev()?;
        let mut repairs = 0;
        let current = self
            .nl
            .link_by_name(&self.s.device_name())
            .await
            .map_err(|e| self.device_err(e))?;
        let healthy = current.as_ref().is_some_and(|l| {
            l.index == old_index
                && l.mac == Some(mac)
                && l.mtu == self.s.device_mtu()
                && self.spec(mac).incompatibility(l).is_none()
        });
        if !healthy {
            if current.is_none() {
                warn!(device = %self.s.device_name(), mac = %mac, "device was deleted; recreating it with the advertised MAC");
            }
            let (link, _) = self.ensure_device(Some(mac)).await?;
            self.dev = Some((link.index, mac));
            repairs += 1;
        }
        if let Some(own) = self.own {
            repairs += self.ensure_address(self.dev()?.0, own).await?;
        }
        Ok(repairs)
    }

    /// Routes this backend owns: those on the device, and direct routes into Network.
    fn owns_route(&self, index: u32, r: &RouteEntry) -> bool {
        r.oif == Some(index)
            || (r.oif == Some(self.s.external.index)
                && r.gateway.is_some()
                && self.s.network.contains(&r.dst)
                && Some(r.dst) != self.own)
    }

    async fn sync_vtep_entries(
        &self,
        index: u32,
        plans: &[PeerPlan],
    ) -> Result<SyncReport, NetlinkError> {
        let mut report = SyncReport::default();
        let want: Vec<(Ipv4Addr, MacAddr, Ipv4Addr)> =
            plans.iter().filter_map(|p| p.vtep).collect();
        // Neighbours and fdb first: a route to a gateway without its neighbour would ARP.
        let neighs = self.nl.neighbours_v4(index).await?;
        for &(gw, mac, _) in &want {
            if !neighs
                .iter()
                .any(|n| n.ip == gw && n.mac == Some(mac) && n.permanent)
            {
                report.record(self.nl.replace_neighbour(index, gw, mac).await);
            }
        }
        let fdb = self.nl.fdb_entries(index).await?;
        for &(_, mac, ip) in &want {
            if !fdb
                .iter()
                .any(|f| f.mac == mac && f.dst == Some(ip) && f.permanent)
            {
                report.record(self.nl.replace_fdb(index, mac, ip).await);
            }
        }
        for n in neighs
            .iter()
            .filter(|n| n.permanent && !want.iter().any(|w| w.0 == n.ip))
        {
            info!(ip = %n.ip, "removing neighbour no lease justifies");
            report.record(self.nl.del_neighbour(index, n.ip).await);
        }
        for f in fdb
            .iter()
            .filter(|f| f.permanent && !want.iter().any(|w| Some(w.2) == f.dst && w.1 == f.mac))
        {
            info!(mac = %f.mac, dst = ?f.dst, "removing fdb entry no lease justifies");
            report.record(self.nl.del_fdb(index, f.mac, f.dst).await);
        }
        Ok(report)
    }
}

fn partial(what: String, failures: Vec<NetlinkError>) -> Result<(), VxlanError> {
    if failures.is_empty() {
        Ok(())
    } else {
        Err(VxlanError::Partial { what, failures })
    }
}

/// flanneld sets `accept_ra` 0 so router advertisements never configure the overlay.
/// Best effort, as in flanneld: the file is absent when IPv6 is disabled.
fn disable_accept_ra(dev: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
    if let Err(e) = std::fs::write(&path, "0") {
        debug!(path = %path, error = %e, "could not disable accept_ra");
    }
}

impl Backend for VxlanBackend {
    fn mode(&self) -> &'static str {
        "kernel"
    }

    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        let (link, created) = self.ensure_device(self.dev.map(|d| d.1)).await?;
        let mac = link.mac.ok_or_else(|| {
            self.device_err(NetlinkError::NoSuchLink {
                name: format!("{} (it has no MAC address)", link.name),
            })
        })?;
        info!(device = %link.name, index = link.index, mac = %mac, created, mtu = self.s.device_mtu(), "vxlan device ready");
        self.dev = Some((link.index, mac));
        Ok(BackendAttrs::Vxlan {
            vni: Some(self.s.vni),
            vtep_mac: mac,
        })
    }

    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        let (index, _) = self.dev()?;
        self.ensure_address(index, lease.subnet).await?;
        self.own = Some(lease.subnet);
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        match event {
            LeaseEvent::Added(l) => self.add_or_change(None, l).await?,
            LeaseEvent::Changed { old, new } => self.add_or_change(Some(old), new).await?,
            LeaseEvent::Removed(l) => {
                let (index, _) = self.dev()?;
                self.unprogram(l, index).await?;
                info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer removed");
            }
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        // Every step runs whatever an earlier one hit; the failures are reported together
        // and the next round retries them.
        let mut steps: Vec<BackendError> = Vec::new();
        let mut report = SyncReport::default();
        match self.repair_device().await {
            Ok(n) => report.repairs += n,
            Err(e) => steps.push(e.into()),
        }
        let (index, _) = self.dev()?;
        let mut plans = Vec::new();
        let mut failures = Vec::new();
        // A peer we could not check keeps whatever route it has.
        let mut unchecked = Vec::new();
        for lease in peers.iter().filter(|l| Some(l.subnet) != self.own) {
            match self.plan(lease, index).await {
                Ok(Some(p)) => plans.push(p),
                Ok(None) => {}
                Err(VxlanError::Peer { source, .. }) => {
                    unchecked.push(lease.subnet);
                    failures.push(source);
                }
                Err(e) => steps.push(e.into()),
            }
        }
        let vtep = self.sync_vtep_entries(index, &plans).await;
        let routes: Vec<RouteSpec> = plans.iter().map(|p| p.route).collect();
        let owned = |r: &RouteEntry| self.owns_route(index, r) && !unchecked.contains(&r.dst);
        let synced = self.nl.sync_routes(owned, &routes).await;
        for step in [vtep, synced] {
            match step {
                Ok(r) => report.merge(r),
                Err(e) => steps.push(self.device_err(e).into()),
            }
        }
        failures.extend(report.failures);
        if report.repairs > 0 {
            info!(device = %self.s.device_name(), repairs = report.repairs, "reconciled kernel state with leases");
        }
        let what = format!(
            "reconcile {} ({} repairs made)",
            self.s.device_name(),
            report.repairs
        );
        if let Err(e) = partial(what, failures) {
            steps.push(e.into());
        }
        BackendError::from_steps(steps)?;
        Ok(report.repairs)
    }
}
