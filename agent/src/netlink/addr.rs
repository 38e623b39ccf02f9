//! `ip addr`: the VXLAN device's `<subnet>.0/32` and the external interface's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::AddressMessageBuilder;

use super::{tolerate, Netlink, NetlinkError};

pub(super) fn parse_v4(msg: &AddressMessage) -> Option<Ipv4Net> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on p2p links.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
        _ => None,
    });
    let addr = local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        })
    })?;
    Ipv4Net::new(addr, msg.header.prefix_len).ok()
}

/// An IPv6 address usable as a VXLAN endpoint or advertised address: global scope (not
/// link-local), as flannel's `GetIfaceIP6Addr` picks.
pub(super) fn parse_v6_global(msg: &AddressMessage) -> Option<Ipv6Net> {
    if msg.header.family != AddressFamily::Inet6
        || msg.header.scope != rtnetlink::packet_route::address::AddressScope::Universe
    {
        return None;
    }
    let addr = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
        _ => None,
    })?;
    Ipv6Net::new(addr, msg.header.prefix_len).ok()
}

impl Netlink {
    pub(super) async fn address_dump(&self) -> Result<Vec<AddressMessage>, NetlinkError> {
        let req = self.handle.address().get().execute();
        self.collect(req, "list addresses", String::new).await
    }

    /// The addresses on device `index` that `parse` accepts.
    async fn device_addresses<N>(
        &self,
        index: u32,
        parse: impl Fn(&AddressMessage) -> Option<N>,
    ) -> Result<Vec<N>, NetlinkError> {
        Ok(self
            .address_dump()
            .await?
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(parse)
            .collect())
    }

    /// `ip -4 addr show dev IFINDEX`.
    pub async fn addresses_v4(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        self.device_addresses(index, parse_v4).await
    }

    /// `ip -6 addr show dev IFINDEX scope global`.
    pub async fn addresses_v6(&self, index: u32) -> Result<Vec<Ipv6Net>, NetlinkError> {
        self.device_addresses(index, parse_v6_global).await
    }

    /// `ip addr add ADDR/LEN dev IFINDEX` (`ip -6 addr` for an [`Ipv6Net`]); present already is fine.
    pub async fn add_address(
        &self,
        index: u32,
        addr: impl Into<IpNet>,
    ) -> Result<(), NetlinkError> {
        let addr = addr.into();
        let res = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await;
        tolerate(res, &[libc::EEXIST], "add address", || {
            format!("{addr} on index {index}")
        })
    }

    /// `ip addr del ADDR/LEN dev IFINDEX` (`ip -6 addr` for an [`Ipv6Net`]); absent already is fine.
    pub async fn del_address(
        &self,
        index: u32,
        addr: impl Into<IpNet>,
    ) -> Result<(), NetlinkError> {
        let addr = addr.into();
        // The message `ip addr add` would send, as rtnetlink builds it per family.
        let msg = match addr {
            IpNet::V4(n) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build(),
            IpNet::V6(n) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(n.addr(), n.prefix_len())
                .build(),
        };
        let res = self.handle.address().del(msg).execute().await;
        tolerate(
            res,
            &[libc::EADDRNOTAVAIL, libc::ENODEV],
            "delete address",
            || format!("{addr} on index {index}"),
        )
    }
}
