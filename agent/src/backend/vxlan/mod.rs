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
//! MAC -> PublicIPv6, route `<v6 subnet> via <v6 subnet>:: dev flannel-v6.1 onlink`; with
//! `DirectRouting` and PublicIPv6 on a directly connected network, only
//! `ip -6 route replace <v6 subnet> via <PublicIPv6>`.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, info, warn};

use super::{join, Backend, BackendError};
use crate::lease::{BackendAttrs, Lease, LeaseEvent, MacAddr, VxlanData};
use crate::netlink::{
    ExternalIface, LinkInfo, Netlink, NetlinkError, RouteEntry, RouteSpec, SyncReport, VxlanSpec,
};
use crate::turns::step;
use weft_common::wire;

mod ipv6;
mod peers;

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
            LeaseEvent::Added(l) => self.add(l).await?,
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

    async fn apply_all(&mut self, events: &[LeaseEvent]) -> Vec<Result<(), BackendError>> {
        self.apply_batch(events).await
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
        match step("device", self.repair_device()).await {
            Ok(n) => report.repairs += n,
            Err(e) => steps.push(e.into()),
        }
        let (index, _) = self.dev()?;
        let mut plans = Vec::new();
        let mut failures = Vec::new();
        // A peer we could not check keeps whatever route it has.
        let mut unchecked = Vec::new();
        step("plans", async {
            let mut turns = crate::turns::Turns::default();
            for lease in peers {
                turns.tick().await;
                if Some(lease.subnet) == self.own {
                    continue;
                }
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
        })
        .await;
        let nl = self.pass_netlink();
        let vtep = step(
            "neighbours and fdb",
            self.sync_vtep_entries(&nl, index, &plans),
        )
        .await;
        let routes: Vec<RouteSpec> = plans.iter().map(|p| p.route).collect();
        let owned = |r: &RouteEntry| self.owns_route(index, r) && !unchecked.contains(&r.dst);
        let synced = step("routes", nl.sync_routes(owned, &routes)).await;
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
