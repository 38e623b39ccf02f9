//! `ip route` / `ip -6 route`: per-peer routes in the main table, listed for reconciliation.
//! One implementation for both families, through [`IpFamily`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::{tolerate, Netlink, NetlinkError};
use crate::family::IpFamily;
use crate::turns::Turns;

/// The netlink family of `A`.
pub(super) fn family<A: IpFamily>() -> AddressFamily {
    if A::HOST_PREFIX == <Ipv4Addr as IpFamily>::HOST_PREFIX {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn from_route<A: IpFamily>(a: &RouteAddress) -> Option<A> {
    match a {
        RouteAddress::Inet(ip) => A::from_ip(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => A::from_ip(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A message of `A`'s family for `dst` (a network or the host route to one
/// address) and `gateway`: what `RouteMessageBuilder::<Ipv4Addr>` (or `Ipv6Addr`) builds.
fn builder<A: IpFamily>(dst: (A, u8), gateway: Option<A>) -> RouteMessageBuilder<IpAddr> {
    let mut b = RouteMessageBuilder::<IpAddr>::new();
    let msg = b.get_mut();
    msg.header.address_family = family::<A>();
    msg.header.destination_prefix_length = dst.1;
    msg.attributes
        .push(RouteAttribute::Destination(dst.0.into().into()));
    if let Some(gw) = gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(gw.into().into()));
    }
    b
}

/// A route weft programs: `DST [via GATEWAY] [dev OIF] [onlink]`, main table,
/// `proto boot` like `ip route replace` and flanneld. IPv4 unless `A` says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec<A: IpFamily = Ipv4Addr> {
    pub dst: A::Net,
    pub gateway: Option<A>,
    /// `None` lets the kernel pick the device from the gateway (flannel's direct routes).
    pub oif: Option<u32>,
    pub onlink: bool,
}

/// An IPv6 route weft programs.
pub type RouteSpec6 = RouteSpec<Ipv6Addr>;
/// A route of the main IPv6 table.
pub type RouteEntry6 = RouteEntry<Ipv6Addr>;

impl<A: IpFamily> std::fmt::Display for RouteSpec<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev index {oif}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// A route of the main table as the kernel lists it (IPv4 unless `A` says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteEntry<A: IpFamily = Ipv4Addr> {
    pub dst: A::Net,
    pub gateway: Option<A>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// `RTPROT_*`: 2 = kernel (address prefix routes), 3 = boot (`ip route`, flanneld).
    pub protocol: u8,
    pub unicast: bool,
}

impl<A: IpFamily> RouteEntry<A> {
    /// Whether this kernel route already is `spec` (the device only counts when
    /// the spec names one).
    pub fn satisfies(&self, spec: &RouteSpec<A>) -> bool {
        self.unicast
            && self.dst == spec.dst
            && self.gateway == spec.gateway
            && spec.oif.is_none_or(|o| self.oif == Some(o))
            && self.onlink == spec.onlink
    }

    /// The spec that deletes exactly this route.
    pub fn to_spec(&self) -> RouteSpec<A> {
        RouteSpec {
            dst: self.dst,
            gateway: self.gateway,
            oif: self.oif,
            onlink: self.onlink,
        }
    }
}

fn parse<A: IpFamily>(msg: RouteMessage) -> Option<RouteEntry<A>> {
    let h = &msg.header;
    if h.address_family != family::<A>() {
        return None;
    }
    let mut table = u32::from(h.table);
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => dst = from_route(d),
            RouteAttribute::Gateway(g) => gateway = from_route(g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    Some(RouteEntry {
        dst: A::net(dst.unwrap_or(A::UNSPECIFIED), h.destination_prefix_length)?,
        gateway,
        oif,
        onlink: h.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(h.protocol),
        unicast: h.kind == RouteType::Unicast,
    })
}

fn message<A: IpFamily>(spec: &RouteSpec<A>) -> RouteMessageBuilder<IpAddr> {
    let dst = (A::network(&spec.dst), A::prefix_len(&spec.dst));
    let mut b = builder(dst, spec.gateway);
    if let Some(oif) = spec.oif {
        b = b.output_interface(oif);
    }
    if spec.onlink {
        b = b.onlink();
    }
    b
}

impl Netlink {
    /// `ip -4 route show table main`.
    pub async fn routes_v4(&self) -> Result<Vec<RouteEntry>, NetlinkError> {
        self.routes().await
    }

    /// `ip route show table main` of `A`'s family (`ip -6 route` for [`Ipv6Addr`]).
    pub async fn routes<A: IpFamily>(&self) -> Result<Vec<RouteEntry<A>>, NetlinkError> {
        let mut dump = RouteMessageBuilder::<IpAddr>::new().build();
        dump.header.address_family = family::<A>();
        let req = self.handle.route().get(dump).execute();
        self.dump(req, "list routes", String::new, parse).await
    }

    /// `ip route replace SPEC` (proto boot, as flanneld's netlink library and `ip` do).
    pub async fn replace_route<A: IpFamily>(
        &self,
        spec: &RouteSpec<A>,
    ) -> Result<(), NetlinkError> {
        let msg = message(spec).protocol(RouteProtocol::Boot).build();
        let res = self.handle.route().add(msg).replace().execute().await;
        tolerate(res, &[], "replace route", || spec.to_string())
    }

    /// `ip route del SPEC`; a route already gone is fine.
    pub async fn del_route<A: IpFamily>(&self, spec: &RouteSpec<A>) -> Result<(), NetlinkError> {
        // Protocol 0 and scope nowhere match any route with this dst/gateway/dev.
        let msg = message(spec)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build();
        let res = self.handle.route().del(msg).execute().await;
        tolerate(res, &[libc::ESRCH, libc::ENODEV], "delete route", || {
            spec.to_string()
        })
    }

    /// `ip route get IP`: the gateway and device the kernel would use, `None`
    /// when the destination is unreachable.
    pub async fn route_get<A: IpFamily>(
        &self,
        ip: A,
    ) -> Result<Option<RouteEntry<A>>, NetlinkError> {
        let msg = builder((ip, A::HOST_PREFIX), None).build();
        let req = self.handle.route().get(msg).execute();
        match self
            .dump(req, "get route to", || ip.to_string(), parse)
            .await
        {
            Ok(routes) => Ok(routes.into_iter().next()),
            Err(NetlinkError::Request { source, .. })
                if super::is_errno(&source, &[libc::ENETUNREACH, libc::EHOSTUNREACH]) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// What [`Netlink::sync_routes`] changed and what it could not.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub repairs: usize,
    pub failures: Vec<NetlinkError>,
}

impl SyncReport {
    pub(crate) fn record(&mut self, res: Result<(), NetlinkError>) {
        match res {
            Ok(()) => self.repairs += 1,
            Err(e) => self.failures.push(e),
        }
    }

    pub fn merge(&mut self, other: SyncReport) {
        self.repairs += other.repairs;
        self.failures.extend(other.failures);
    }
}

impl Netlink {
    /// The device a packet to `ip` would leave by when `ip` is on a directly
    /// connected network (the kernel's route needs no gateway), else `None`.
    /// flanneld's `ip.DirectRouting` makes the same check.
    pub async fn on_link_iface<A: IpFamily>(&self, ip: A) -> Result<Option<u32>, NetlinkError> {
        Ok(self
            .route_get(ip)
            .await?
            .filter(|r| r.gateway.is_none())
            .and_then(|r| r.oif))
    }

    /// Make the main table's routes selected by `owned` equal `desired`: replace
    /// each desired route the kernel lacks or holds differently, delete each owned
    /// route no desired route justifies. Keeps going after a failure.
    pub async fn sync_routes<A: IpFamily>(
        &self,
        owned: impl Fn(&RouteEntry<A>) -> bool,
        desired: &[RouteSpec<A>],
    ) -> Result<SyncReport, NetlinkError> {
        let kernel = self.routes::<A>().await?;
        // Indexed by destination: with thousands of routes, scanning the kernel's list for
        // each desired one took tens of ms in which nothing else ran. Indexed and compared
        // in turns, so that a reconcile pass stays droppable.
        let mut turns = Turns::default();
        let mut by_dst: BTreeMap<A::Net, Vec<&RouteEntry<A>>> = BTreeMap::new();
        for r in &kernel {
            by_dst.entry(r.dst).or_default().push(r);
            turns.tick().await;
        }
        let mut report = SyncReport::default();
        for spec in desired {
            let held = by_dst.get(&spec.dst);
            if !held.is_some_and(|rs| rs.iter().any(|r| r.satisfies(spec))) {
                report.record(self.replace_route(spec).await);
            }
            turns.tick().await;
        }
        let mut wanted = BTreeSet::new();
        for spec in desired {
            wanted.insert(spec.dst);
            turns.tick().await;
        }
        // A desired route with the same destination replaced the stale one above.
        for stale in &kernel {
            if owned(stale) && stale.protocol != RTPROT_KERNEL && !wanted.contains(&stale.dst) {
                report.record(self.del_route(&stale.to_spec()).await);
            }
            turns.tick().await;
        }
        Ok(report)
    }
}

const RTPROT_KERNEL: u8 = 2;
