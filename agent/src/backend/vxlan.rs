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
//!
//! With IPv6 enabled a second device, `flannel-v6.<VNI>` (`local` = the interface's IPv6
//! address, same VNI and port), gets `<v6 subnet>::/128` and the same three entries per peer
//! over the IPv6 underlay: neighbour `<v6 subnet>::` -> MAC of `BackendV6Data`, fdb
//! MAC -> PublicIPv6, route `<v6 subnet> via <v6 subnet>:: dev flannel-v6.1 onlink`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, info, warn};

use super::{join, Backend, BackendError};
use crate::lease::{BackendAttrs, Lease, LeaseEvent, MacAddr, VxlanData};
use crate::netlink::{
    ExternalIface, LinkInfo, Netlink, NetlinkError, RouteEntry, RouteEntry6, RouteSpec, RouteSpec6,
    SyncReport, VxlanSpec,
};
use weft_common::wire;

/// The overlay MTU under an underlay of `underlay_mtu`: what VXLAN adds in front of the
/// inner IP header comes off, as flanneld sizes `flannel.<VNI>`.
pub fn overlay_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(wire::VXLAN_OVERHEAD as u32)
}

/// What an IPv6 outer header adds over an IPv4 one.
const IPV6_EXTRA_OVERHEAD: u32 = 20;

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
    /// `IPv6Network` when IPv6 is enabled: `flannel-v6.<VNI>` carries it.
    pub ipv6: Option<Ipv6Net>,
}

impl VxlanSettings {
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// Whether IPv4 is carried: an IPv6-only config's Network is 0.0.0.0/0 (flannel's zero value).
    pub fn has_ipv4(&self) -> bool {
        self.network.prefix_len() != 0
    }

    /// flanneld's name of the IPv6 device.
    pub fn device_name_v6(&self) -> String {
        format!("flannel-v6.{}", self.vni)
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
    #[error(
        "IPv6 is enabled but {iface} has no global IPv6 address for {name}'s local end; give \
         it one (e.g. `ip -6 addr add fd00:16::21/64 dev {iface}`) or pass --iface with another interface"
    )]
    NoIpv6 { iface: String, name: String },
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
    /// `flannel-v6.<VNI>`: index and advertised MAC, once prepared.
    dev6: Option<(u32, MacAddr)>,
    own6: Option<Ipv6Net>,
}

impl VxlanBackend {
    pub fn new(nl: Netlink, settings: VxlanSettings) -> Self {
        Self {
            nl,
            s: settings,
            dev: None,
            own: None,
            dev6: None,
            own6: None,
        }
    }

    fn spec(&self, mac: MacAddr) -> VxlanSpec {
        self.spec_at(self.s.device_name(), self.s.external.ipv4.into(), mac)
    }

    fn spec_at(&self, name: String, local: IpAddr, mac: MacAddr) -> VxlanSpec {
        VxlanSpec {
            name,
            vni: self.s.vni,
            local,
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
        self.ensure_device_spec(
            self.spec(keep_mac.unwrap_or_else(MacAddr::random)),
            keep_mac,
        )
        .await
    }

    async fn ensure_device_spec(
        &self,
        spec: VxlanSpec,
        keep_mac: Option<MacAddr>,
    ) -> Result<(LinkInfo, bool), VxlanError> {
        let name = spec.name.clone();
        let dev_err = |name: &str, source| VxlanError::Device {
            name: name.to_string(),
            source,
        };
        let mut created = self
            .nl
            .add_vxlan(&spec)
            .await
            .map_err(|e| dev_err(&name, e))?;
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
                    .map_err(|e| dev_err(&name, e))?;
                if !self
                    .nl
                    .add_vxlan(&spec)
                    .await
                    .map_err(|e| dev_err(&name, e))?
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
                .map_err(|e| dev_err(&name, e))?;
        }
        disable_accept_ra(&name);
        Ok((link, created))
    }

    async fn fetch(&self, name: &str) -> Result<LinkInfo, VxlanError> {
        let err = |source| VxlanError::Device {
            name: name.to_string(),
            source,
        };
        self.nl
            .link_by_name(name)
            .await
            .map_err(err)?
            .ok_or_else(|| {
                err(NetlinkError::NoSuchLink {
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
                .any(|f| f.mac == mac && f.dst == Some(ip.into()) && f.permanent)
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
        for f in fdb.iter().filter(|f| {
            f.permanent
                && !want
                    .iter()
                    .any(|w| Some(w.2.into()) == f.dst && w.1 == f.mac)
        }) {
            info!(mac = %f.mac, dst = ?f.dst, "removing fdb entry no lease justifies");
            report.record(self.nl.del_fdb(index, f.mac, f.dst).await);
        }
        Ok(report)
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
    async fn ensure_address6(&self, index: u32, subnet: Ipv6Net) -> Result<usize, VxlanError> {
        let want = Ipv6Net::new(subnet.network(), 128).unwrap_or(subnet);
        let network = self.s.ipv6.unwrap_or(subnet);
        let err = |e| self.device6_err(e);
        let have = self.nl.addresses_v6(index).await.map_err(err)?;
        let mut changes = 0;
        for stray in have
            .iter()
            .filter(|a| **a != want && network.contains(&a.addr()))
        {
            self.nl.del_address6(index, *stray).await.map_err(err)?;
            changes += 1;
        }
        if !have.contains(&want) {
            self.nl.add_address6(index, want).await.map_err(err)?;
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
    async fn program6(&self, lease: &Lease) -> Result<(), VxlanError> {
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
    async fn unprogram6(&self, lease: &Lease) -> Result<(), VxlanError> {
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
    async fn reconcile6(&mut self, peers: &[Lease]) -> Result<usize, VxlanError> {
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
        if !self.s.has_ipv4() {
            // IPv6 only: flanneld creates no flannel.<VNI> and advertises no BackendData.
            return Ok(BackendAttrs::VxlanIpv6Only);
        }
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

    async fn prepare_v6(&mut self) -> Result<Option<VxlanData>, BackendError> {
        Ok(self.prepare_ipv6().await?)
    }

    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        if let Some(v4) = lease.ipv4_subnet().filter(|_| self.s.has_ipv4()) {
            let (index, _) = self.dev()?;
            self.ensure_address(index, v4).await?;
            self.own = Some(v4);
        }
        if let (Some((index6, _)), Some(v6)) = (self.dev6, lease.ipv6_subnet) {
            self.ensure_address6(index6, v6).await?;
            self.own6 = Some(v6);
        }
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        match event {
            LeaseEvent::Added(l) => {
                if self.s.has_ipv4() {
                    self.add_or_change(None, l).await?;
                }
                self.program6(l).await?;
            }
            LeaseEvent::Changed { old, new } => {
                if self.s.has_ipv4() {
                    self.add_or_change(Some(old), new).await?;
                }
                if old.vtep_v6() != new.vtep_v6() {
                    self.unprogram6(old).await?;
                }
                self.program6(new).await?;
            }
            LeaseEvent::Removed(l) => {
                if l.ipv4_subnet().is_some() && self.s.has_ipv4() {
                    let (index, _) = self.dev()?;
                    self.unprogram(l, index).await?;
                }
                self.unprogram6(l).await?;
                info!(subnet = %l.key(), public_ip = %l.attrs.public_ip, "peer removed");
            }
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        // Every step runs whatever an earlier one hit; the failures are reported together
        // and the next round retries them.
        let mut steps: Vec<BackendError> = Vec::new();
        let mut report = SyncReport::default();
        match self.reconcile6(peers).await {
            Ok(n) => report.repairs += n,
            Err(e) => steps.push(e.into()),
        }
        if !self.s.has_ipv4() {
            BackendError::from_steps(steps)?;
            return Ok(report.repairs);
        }
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
