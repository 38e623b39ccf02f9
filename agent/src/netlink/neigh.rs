//! `ip neigh` and `bridge fdb` on the VXLAN device, and the container
//! bridge's learned ports (which veth a container's MAC sits behind).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::AddressFamily;

use super::{mac_from_bytes, route::family, tolerate, Netlink, NetlinkError};
use crate::{family::IpFamily, lease::MacAddr};

/// A neighbour entry: ARP for IPv4 (unless `A` says otherwise), NDP for IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighEntry<A: IpFamily = Ipv4Addr> {
    pub ip: A,
    pub mac: Option<MacAddr>,
    pub permanent: bool,
}

/// An IPv6 neighbour (NDP) entry.
pub type Neigh6Entry = NeighEntry<Ipv6Addr>;

/// A bridge forwarding entry of a VXLAN device: frames to `mac` go to `dst` (an IPv4 remote
/// on `flannel.N`, an IPv6 one on `flannel-v6.N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub dst: Option<IpAddr>,
    pub permanent: bool,
}

/// A MAC address the bridge learned behind one of its ports (`bridge fdb show br BRIDGE`,
/// entries without `permanent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgePortEntry {
    pub mac: MacAddr,
    /// The port (for a container: the host end of its veth).
    pub port_index: u32,
}

fn dst(msg: &NeighbourMessage) -> Option<IpAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        // Bridge-family (fdb) messages carry the remote as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

fn lladdr(msg: &NeighbourMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => mac_from_bytes(b),
        _ => None,
    })
}

/// NUD_PERMANENT is a bit: vxlan reports fdb entries as PERMANENT|NOARP.
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

impl Netlink {
    /// Dumps the neighbour table of `family` (`op` on `index` names it in an
    /// error) and keeps what `entry` makes of a message. With `device`, asks the kernel for
    /// that device's entries only (`NDA_IFINDEX`, as `ip neigh show dev` does): the bridge's
    /// few neighbours are then not read out of flannel.N's thousands. The kernel's fdb dump
    /// ignores it (it filters only on a strict-checking socket), so `entry` still checks.
    async fn neighbour_dump<T>(
        &self,
        family: AddressFamily,
        op: &'static str,
        index: u32,
        device: bool,
        mut entry: impl FnMut(&NeighbourMessage) -> Option<T>,
    ) -> Result<Vec<T>, NetlinkError> {
        let mut req = self.handle.neighbours().get().set_address_family(family);
        if device {
            req.message_mut()
                .attributes
                .push(NeighbourAttribute::IfIndex(index));
        }
        self.dump(
            req.execute(),
            op,
            || format!("index {index}"),
            |m| entry(&m),
        )
        .await
    }

    /// [`Self::neighbour_dump`] of the entries on device `index`.
    async fn device_neighbours<T>(
        &self,
        family: AddressFamily,
        index: u32,
        entry: impl Fn(&NeighbourMessage) -> Option<T>,
    ) -> Result<Vec<T>, NetlinkError> {
        let on_device = |m: &NeighbourMessage| (m.header.ifindex == index).then(|| entry(m))?;
        self.neighbour_dump(family, "list neighbours of", index, true, on_device)
            .await
    }

    /// `ip neigh show dev IFINDEX` of `A`'s family (`ip -6 neigh` for [`Ipv6Addr`]).
    pub async fn neighbours<A: IpFamily>(
        &self,
        index: u32,
    ) -> Result<Vec<NeighEntry<A>>, NetlinkError> {
        self.device_neighbours(family::<A>(), index, |m| {
            Some(NeighEntry {
                ip: A::from_ip(dst(m)?)?,
                mac: lladdr(m),
                permanent: is_permanent(m.header.state),
            })
        })
        .await
    }

    /// `ip -4 neigh show dev IFINDEX`.
    pub async fn neighbours_v4(&self, index: u32) -> Result<Vec<NeighEntry>, NetlinkError> {
        self.neighbours(index).await
    }

    /// `ip -6 neigh show dev IFINDEX`.
    pub async fn neighbours_v6(&self, index: u32) -> Result<Vec<Neigh6Entry>, NetlinkError> {
        self.neighbours(index).await
    }

    /// The MACs bridge `bridge_index` learned on its ports, as `bridge fdb show br BRIDGE`
    /// lists them without the permanent (port's own and static) entries.
    pub async fn bridge_learned(
        &self,
        bridge_index: u32,
    ) -> Result<Vec<BridgePortEntry>, NetlinkError> {
        let op = "list the forwarding entries of bridge";
        self.neighbour_dump(AddressFamily::Bridge, op, bridge_index, false, |m| {
            let learned = !is_permanent(m.header.state)
                && m.header.ifindex != bridge_index
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::Controller(c) if *c == bridge_index));
            Some(BridgePortEntry {
                mac: lladdr(m).filter(|_| learned)?,
                port_index: m.header.ifindex,
            })
        })
        .await
    }

    /// `ip neigh replace IP dev IFINDEX lladdr MAC nud permanent`.
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: impl Into<IpAddr>,
        mac: MacAddr,
    ) -> Result<(), NetlinkError> {
        let ip = ip.into();
        let res = self
            .handle
            .neighbours()
            .add(index, ip)
            .kind(RouteType::Unicast)
            .state(NeighbourState::Permanent)
            .link_layer_address(&mac.0)
            .replace()
            .execute()
            .await;
        tolerate(res, &[], "replace neighbour", || {
            format!("{ip} lladdr {mac}")
        })
    }

    /// `ip neigh del IP dev IFINDEX`; absent already is fine.
    pub async fn del_neighbour(
        &self,
        index: u32,
        ip: impl Into<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let ip = ip.into();
        let mut msg = NeighbourMessage::default();
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(ip.into()));
        let res = self.handle.neighbours().del(msg).execute().await;
        tolerate(
            res,
            &[libc::ENOENT, libc::ENODEV],
            "delete neighbour",
            || ip.to_string(),
        )
    }

    /// `bridge fdb show dev IFINDEX` (the device's own `self` entries).
    pub async fn fdb_entries(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        self.device_neighbours(AddressFamily::Bridge, index, |m| {
            Some(FdbEntry {
                mac: lladdr(m)?,
                dst: dst(m),
                permanent: is_permanent(m.header.state),
            })
        })
        .await
    }

    /// `bridge fdb replace MAC dev IFINDEX dst IP self permanent`.
    pub async fn replace_fdb(
        &self,
        index: u32,
        mac: MacAddr,
        dst: impl Into<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let dst = dst.into();
        let res = self
            .handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(dst)
            .replace()
            .execute()
            .await;
        tolerate(res, &[], "replace fdb entry", || format!("{mac} dst {dst}"))
    }

    /// `bridge fdb del MAC dev IFINDEX [dst IP] self`; without `dst` the whole
    /// entry goes. Absent already is fine.
    pub async fn del_fdb(
        &self,
        index: u32,
        mac: MacAddr,
        dst: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        if let Some(dst) = dst {
            msg.attributes
                .push(NeighbourAttribute::Destination(dst.into()));
        }
        let res = self.handle.neighbours().del(msg).execute().await;
        tolerate(
            res,
            &[libc::ENOENT, libc::ENODEV],
            "delete fdb entry",
            || format!("{mac} dst {dst:?}"),
        )
    }
}
