//! The `host-gw` backend: one route per remote subnet via the peer's public IP.
//!
//! `ip route replace 10.1.54.0/24 via 172.16.15.22 dev ens32`, which only works when
//! every host is on one L2 network; a peer that is not gets a clear error instead
//! of the kernel's "Nexthop has invalid gateway".

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, info};

use super::{Backend, BackendError};
use crate::lease::{BackendAttrs, Lease, LeaseEvent};
use crate::netlink::{
    ExternalIface, Netlink, NetlinkError, RouteEntry, RouteEntry6, RouteSpec, RouteSpec6,
    SyncReport,
};

/// The host-gw backend's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGwSettings {
    /// The overlay `Network`; routes into it via the external interface are ours.
    pub network: Ipv4Net,
    pub external: ExternalIface,
    /// `IPv6Network` when IPv6 is enabled: peers' IPv6 subnets are routed via their PublicIPv6.
    pub ipv6: Option<Ipv6Net>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostGwError {
    #[error(
        "peer {subnet} has public IP {public_ip}, which is not on a network directly connected \
         to {iface} (the kernel routes it {how}); host-gw needs all hosts on one L2 network: \
         use the vxlan backend (with \"DirectRouting\":true to keep host-gw speed where possible) \
         or give the peer an address on {iface}'s network"
    )]
    NotOnLink {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        iface: String,
        how: String,
    },
    #[error("route to peer {subnet} via {public_ip}: {source}")]
    Route {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        #[source]
        source: NetlinkError,
    },
    #[error("reconcile host-gw routes ({repairs} repairs made): {}", failures.join("; "))]
    Partial {
        repairs: usize,
        failures: Vec<String>,
    },
}

/// Routes to peers' subnets through the external interface.
pub struct HostGwBackend {
    nl: Netlink,
    s: HostGwSettings,
    own: Option<Ipv4Net>,
    own6: Option<Ipv6Net>,
}

impl HostGwBackend {
    pub fn new(nl: Netlink, settings: HostGwSettings) -> Self {
        Self {
            nl,
            s: settings,
            own: None,
            own6: None,
        }
    }

    /// flanneld's IPv6 host-gw route: `<v6 subnet> via <PublicIPv6> dev <external>`; `None` for
    /// leases without an IPv6 subnet in IPv6Network or without a PublicIPv6.
    fn route6_for(&self, lease: &Lease) -> Option<RouteSpec6> {
        let (dst, via) = (lease.ipv6_subnet?, lease.attrs.public_ipv6?);
        let fits = self.s.ipv6.is_some_and(|n| n.contains(&dst)) && Some(dst) != self.own6;
        (lease.attrs.backend == BackendAttrs::HostGw && fits).then_some(RouteSpec6 {
            dst,
            gateway: Some(via),
            oif: Some(self.s.external.index),
            onlink: false,
        })
    }

    fn owns_route6(&self, r: &RouteEntry6) -> bool {
        r.oif == Some(self.s.external.index)
            && r.gateway.is_some()
            && self.s.ipv6.is_some_and(|n| n.contains(&r.dst))
            && Some(r.dst) != self.own6
    }

    /// The route for a host-gw lease, after checking the peer is on our L2 network.
    async fn route_for(&self, lease: &Lease) -> Result<Option<RouteSpec>, HostGwError> {
        // An IPv6-only lease (0.0.0.0/0) has no IPv4 route.
        if lease.attrs.backend != BackendAttrs::HostGw || lease.ipv4_subnet().is_none() {
            return Ok(None);
        }
        let (subnet, public_ip) = (lease.subnet, lease.attrs.public_ip);
        let via = self
            .nl
            .route_get(public_ip)
            .await
            .map_err(|source| HostGwError::Route {
                subnet,
                public_ip,
                source,
            })?;
        let on_link =
            via.is_some_and(|r| r.gateway.is_none() && r.oif == Some(self.s.external.index));
        if !on_link {
            let how = match via {
                None => "nowhere: it is unreachable".to_string(),
                Some(r) => match r.gateway {
                    Some(gw) => format!("via gateway {gw}"),
                    None => format!("out of interface index {}", r.oif.unwrap_or_default()),
                },
            };
            return Err(HostGwError::NotOnLink {
                subnet,
                public_ip,
                iface: self.s.external.name.clone(),
                how,
            });
        }
        Ok(Some(RouteSpec {
            dst: subnet,
            gateway: Some(public_ip),
            oif: Some(self.s.external.index),
            onlink: false,
        }))
    }

    fn owns_route(&self, r: &RouteEntry) -> bool {
        r.oif == Some(self.s.external.index)
            && r.gateway.is_some()
            && self.s.network.contains(&r.dst)
            && Some(r.dst) != self.own
    }
}

fn route_err(l: &Lease) -> impl FnOnce(NetlinkError) -> HostGwError + '_ {
    move |source| HostGwError::Route {
        subnet: l.subnet,
        public_ip: l.attrs.public_ip,
        source,
    }
}

impl Backend for HostGwBackend {
    fn mode(&self) -> &'static str {
        "host-gw"
    }

    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        Ok(BackendAttrs::HostGw)
    }

    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        self.own = lease.ipv4_subnet();
        self.own6 = lease.ipv6_subnet;
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        if let LeaseEvent::Changed { old, new } = event {
            if let Some(r) = self
                .route6_for(old)
                .filter(|r| Some(*r) != self.route6_for(new))
            {
                self.nl.del_route(&r).await.map_err(route_err(old))?;
            }
        }
        match event {
            LeaseEvent::Added(l) | LeaseEvent::Changed { new: l, .. } => {
                if let Some(r) = self.route6_for(l) {
                    self.nl.replace_route(&r).await.map_err(route_err(l))?;
                    info!(subnet = %r.dst, via = ?r.gateway, "IPv6 peer route programmed");
                }
                let Some(route) = self.route_for(l).await? else {
                    debug!(subnet = %l.subnet, "ignoring lease of another backend type");
                    return Ok(());
                };
                self.nl.replace_route(&route).await.map_err(route_err(l))?;
                info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer route programmed");
            }
            LeaseEvent::Removed(l) => {
                if let Some(r) = self.route6_for(l) {
                    self.nl.del_route(&r).await.map_err(route_err(l))?;
                }
                if l.ipv4_subnet().is_none() {
                    return Ok(());
                }
                let route = RouteSpec {
                    dst: l.subnet,
                    gateway: Some(l.attrs.public_ip),
                    oif: Some(self.s.external.index),
                    onlink: false,
                };
                self.nl.del_route(&route).await.map_err(route_err(l))?;
                info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer route removed");
            }
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        let mut desired = Vec::new();
        let mut failures = Vec::new();
        // A peer we could not check keeps whatever route it has.
        let mut unchecked = Vec::new();
        for lease in peers.iter().filter(|l| Some(l.subnet) != self.own) {
            match self.route_for(lease).await {
                Ok(Some(r)) => desired.push(r),
                Ok(None) => {}
                Err(e) => {
                    unchecked.push(lease.subnet);
                    failures.push(e.to_string());
                }
            }
        }
        let owned = |r: &RouteEntry| self.owns_route(r) && !unchecked.contains(&r.dst);
        // The peers' checks and the sync are reported together; the next round retries both.
        let report = match self.nl.sync_routes(owned, &desired).await {
            Ok(report) => report,
            Err(e) => {
                failures.push(e.to_string());
                SyncReport::default()
            }
        };
        let mut report = report;
        if self.s.ipv6.is_some() {
            let desired6: Vec<RouteSpec6> =
                peers.iter().filter_map(|l| self.route6_for(l)).collect();
            match self
                .nl
                .sync_routes(|r| self.owns_route6(r), &desired6)
                .await
            {
                Ok(r6) => report.merge(r6),
                Err(e) => failures.push(e.to_string()),
            }
        }
        failures.extend(report.failures.iter().map(ToString::to_string));
        if report.repairs > 0 {
            info!(
                repairs = report.repairs,
                "reconciled host-gw routes with leases"
            );
        }
        if !failures.is_empty() {
            return Err(HostGwError::Partial {
                repairs: report.repairs,
                failures,
            }
            .into());
        }
        Ok(report.repairs)
    }
}
