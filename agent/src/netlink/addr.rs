//! `ip addr`: the VXLAN device's `<subnet>.0/32` and the external interface's address.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::AddressFamily;

use super::{collect, tolerate, Netlink, NetlinkError};

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

impl Netlink {
    pub(super) async fn address_dump(&self) -> Result<Vec<AddressMessage>, NetlinkError> {
        let req = self.handle.address().get().execute();
        collect(req, "list addresses", String::new).await
    }

    /// `ip -4 addr show dev IFINDEX`.
    pub async fn addresses_v4(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        Ok(self
            .address_dump()
            .await?
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(parse_v4)
            .collect())
    }

    /// `ip addr add ADDR/LEN dev IFINDEX`; present already is fine.
    pub async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let res = self
            .handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await;
        tolerate(res, &[libc::EEXIST], "add address", || {
            format!("{addr} on index {index}")
        })
    }

    /// `ip addr del ADDR/LEN dev IFINDEX`; absent already is fine.
    pub async fn del_address(&self, index: u32, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let msg = rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr.addr(), addr.prefix_len())
            .build();
        let res = self.handle.address().del(msg).execute().await;
        tolerate(
            res,
            &[libc::EADDRNOTAVAIL, libc::ENODEV],
            "delete address",
            || format!("{addr} on index {index}"),
        )
    }
}
