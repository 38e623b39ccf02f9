//! `ip link`: the VXLAN device, its attributes read back, and the external interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_core::Nla;
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::{is_errno, mac_from_bytes, tolerate, Netlink, NetlinkError};
use crate::lease::MacAddr;

/// One interface with its IPv4 addresses, as `ip -4 addr` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub addrs: Vec<Ipv4Addr>,
    /// Global-scope IPv6 addresses, in the kernel's order.
    pub addrs6: Vec<Ipv6Addr>,
    pub mtu: u32,
}

/// The interface weft's traffic leaves by (flannel's `ExternalInterface`) and the address
/// it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIface {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address: the VXLAN `local` address.
    pub ipv4: Ipv4Addr,
    /// The address peers reach us at (`--public-ip`, else `ipv4`).
    pub public_ip: Ipv4Addr,
    /// The interface's first global IPv6 address: `flannel-v6.N`'s `local` (flannel's
    /// `IfaceV6Addr`); `None` when it has none.
    pub ipv6: Option<Ipv6Addr>,
    /// The IPv6 address peers reach us at (`--public-ipv6`, else `ipv6`).
    pub public_ipv6: Option<Ipv6Addr>,
    pub mtu: u32,
}

impl ExternalIface {
    /// `iface` with `addr` as its address and `public_ip` (default `addr`) advertised; its
    /// first global IPv6 address, if any, for IPv6.
    pub fn new(iface: &Interface, addr: Ipv4Addr, public_ip: Option<Ipv4Addr>) -> Self {
        let ipv6 = iface.addrs6.first().copied();
        Self {
            name: iface.name.clone(),
            index: iface.index,
            ipv4: addr,
            public_ip: public_ip.unwrap_or(addr),
            ipv6,
            public_ipv6: ipv6,
            mtu: iface.mtu,
        }
    }
}

/// A link as `ip -d link show` reports it, reduced to what weft checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<MacAddr>,
    pub up: bool,
    /// `Some` when the link is of kind vxlan.
    pub vxlan: Option<VxlanAttrs>,
    /// The link kind (`vxlan`, `dummy`, ...), `None` for plain hardware devices.
    pub kind: Option<String>,
    /// The bridge (or other master) this link is a port of (`ip link show master`).
    pub master: Option<u32>,
    /// `needed_headroom`: the bytes the device wants free in front of a frame; `None`
    /// from kernels that do not report it (before 6.15).
    pub headroom: Option<u16>,
}

/// VXLAN attributes read back from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    /// `local` of a device over an IPv6 underlay (`flannel-v6.N`).
    pub local6: Option<Ipv6Addr>,
    pub dev_index: Option<u32>,
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
    pub l2miss: bool,
    pub l3miss: bool,
    pub ttl: u8,
    pub ttl_inherit: bool,
    pub udp_csum: bool,
}

/// What flanneld passes when it creates `flannel.<VNI>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// IPv4 for `flannel.N`, IPv6 for `flannel-v6.N`.
    pub local: IpAddr,
    /// The underlay device; 0 for none (the headroom device).
    pub dev_index: u32,
    /// Destination port; `weft_common::wire::DEFAULT_PORT` for flannel's `Port: 0`.
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
    pub mtu: u32,
    pub mac: MacAddr,
}

impl VxlanSpec {
    /// Why an existing device cannot be reused for this spec, or `None` when it can.
    /// Same checks as flanneld's `vxlanLinksIncompat`, with the port compared as
    /// effective value (flanneld skips it when `Port` is 0, keeping a 4789 device).
    pub fn incompatibility(&self, link: &LinkInfo) -> Option<String> {
        let Some(v) = &link.vxlan else {
            return Some(format!(
                "it is a {} device, not vxlan",
                link.kind.as_deref().unwrap_or("hardware")
            ));
        };
        if v.vni != self.vni {
            return Some(format!("vni {} instead of {}", v.vni, self.vni));
        }
        if v.dev_index.is_some_and(|d| d != self.dev_index) {
            return Some(format!(
                "external interface index {} instead of {}",
                v.dev_index.unwrap_or_default(),
                self.dev_index
            ));
        }
        let local = v.local.map(IpAddr::V4).or(v.local6.map(IpAddr::V6));
        if local.is_some_and(|l| l != self.local) {
            return Some(format!(
                "local address {} instead of {}",
                local.map(|l| l.to_string()).unwrap_or_default(),
                self.local
            ));
        }
        if v.port != self.port {
            return Some(format!("dstport {} instead of {}", v.port, self.port));
        }
        if v.gbp != self.gbp {
            return Some(format!("gbp {} instead of {}", v.gbp, self.gbp));
        }
        if v.l2miss {
            return Some("l2miss is on".to_string());
        }
        None
    }
}

/// `IFLA_HEADROOM` (a u16, kernel 6.15 on), which netlink-packet-route 0.34 leaves unparsed.
const IFLA_HEADROOM: u16 = 68;

fn parse_link(msg: LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        vxlan: None,
        kind: None,
        master: None,
        headroom: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => info.name = n,
            LinkAttribute::Controller(m) => info.master = Some(m),
            LinkAttribute::Other(nla) if nla.kind() == IFLA_HEADROOM => {
                let mut value = [0u8; 2];
                if nla.value_len() == value.len() {
                    nla.emit_value(&mut value);
                    info.headroom = Some(u16::from_ne_bytes(value));
                }
            }
            LinkAttribute::Mtu(m) => info.mtu = m,
            LinkAttribute::Address(a) => info.mac = mac_from_bytes(&a),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(k) => info.kind = Some(k.to_string()),
                        NlLinkInfo::Data(InfoData::Vxlan(attrs)) => {
                            info.vxlan = Some(parse_vxlan(attrs))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

fn parse_vxlan(attrs: Vec<InfoVxlan>) -> VxlanAttrs {
    let mut v = VxlanAttrs::default();
    for a in attrs {
        match a {
            InfoVxlan::Id(id) => v.vni = id,
            InfoVxlan::Local(l) => v.local = Some(l),
            InfoVxlan::Local6(l) => v.local6 = Some(l),
            InfoVxlan::Link(i) => v.dev_index = Some(i),
            InfoVxlan::Port(p) => v.port = p,
            InfoVxlan::Learning(b) => v.learning = b,
            InfoVxlan::Gbp => v.gbp = true,
            InfoVxlan::L2Miss(b) => v.l2miss = b,
            InfoVxlan::L3Miss(b) => v.l3miss = b,
            InfoVxlan::Ttl(t) => v.ttl = t,
            InfoVxlan::TtlInherit(t) => v.ttl_inherit = t != 0,
            InfoVxlan::TtlInheritFlag => v.ttl_inherit = true,
            InfoVxlan::UDPCsum(b) => v.udp_csum = b,
            _ => {}
        }
    }
    v
}

impl Netlink {
    /// `ip -d link show NAME`; `None` when there is no such link.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let req = self.handle.link().get().match_name(name).execute();
        self.one_link(req, || name.to_string()).await
    }

    /// `ip -d link show` by index; `None` when there is no such link.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>, NetlinkError> {
        let req = self.handle.link().get().match_index(index).execute();
        self.one_link(req, || format!("index {index}")).await
    }

    /// The ports of bridge `bridge_index` as (index, name): `ip link show master BRIDGE`.
    pub async fn bridge_ports(
        &self,
        bridge_index: u32,
    ) -> Result<Vec<(u32, String)>, NetlinkError> {
        let req = self.handle.link().get().execute();
        let port = |m: LinkMessage| {
            let on_bridge = m
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge_index));
            on_bridge.then(|| (m.header.index, parse_link(m).name))
        };
        self.dump(
            req,
            "list the ports of bridge",
            || format!("index {bridge_index}"),
            port,
        )
        .await
    }

    /// The link a get request answers with; read through [`Netlink::dump`] so that a caller
    /// dropped before the answer (a reconcile pass) leaves it a live stream to reach.
    async fn one_link(
        &self,
        stream: impl futures::Stream<Item = Result<LinkMessage, rtnetlink::Error>> + Send + 'static,
        target: impl FnOnce() -> String,
    ) -> Result<Option<LinkInfo>, NetlinkError> {
        match self
            .dump(stream, "get link", target, |m| Some(parse_link(m)))
            .await
        {
            Ok(links) => Ok(links.into_iter().next()),
            Err(NetlinkError::Request { source, .. }) if is_errno(&source, &[libc::ENODEV]) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `ip link add NAME address MAC mtu MTU type vxlan id VNI local IP dev IFINDEX
    /// dstport PORT [no]learning [gbp]`, exactly flanneld's attribute set (l2miss,
    /// l3miss, proxy, rsc off; ttl 0 = `ttl auto`; udp checksum left at the kernel's
    /// default, on). Returns `false` without touching anything if a link of that
    /// name already exists.
    pub async fn add_vxlan(&self, spec: &VxlanSpec) -> Result<bool, NetlinkError> {
        let mut b = LinkVxlan::new(&spec.name, spec.vni);
        if spec.dev_index != 0 {
            b = b.dev(spec.dev_index);
        }
        let b = match spec.local {
            IpAddr::V4(l) => b.local(l),
            IpAddr::V6(l) => b.local6(l),
        };
        let mut b = b
            .ttl(0)
            .tos(0)
            .learning(spec.learning)
            .proxy(false)
            .rsc(false)
            .l2miss(false)
            .l3miss(false)
            .udp_zero_csum6_tx(false)
            .udp_zero_csum6_rx(false)
            .port(spec.port)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec());
        if spec.gbp {
            b = b.gbp();
        }
        match self.handle.link().add(b.build()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, &[libc::EEXIST]) => Ok(false),
            Err(source) => Err(NetlinkError::Request {
                op: "create vxlan device",
                target: spec.name.clone(),
                source: Box::new(source),
            }),
        }
    }

    /// `ip link del` by index; a link already gone is not an error.
    pub async fn del_link(&self, index: u32) -> Result<(), NetlinkError> {
        let res = self.handle.link().del(index).execute().await;
        tolerate(res, &[libc::ENODEV], "delete link", || {
            format!("index {index}")
        })
    }

    /// `ip link set IFINDEX up`.
    pub async fn set_link_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.change_link(msg, "set link up", || format!("index {index}"))
            .await
    }

    /// `ip link set IFINDEX master MASTER`.
    pub async fn set_link_master(&self, index: u32, master: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        self.change_link(msg, "set link master", || {
            format!("index {index} to index {master}")
        })
        .await
    }

    /// `ip link set IFINDEX mtu MTU`.
    pub async fn set_link_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.change_link(msg, "set link mtu", || format!("index {index} to {mtu}"))
            .await
    }

    /// `ip link set` with the attributes of `msg`.
    async fn change_link(
        &self,
        msg: LinkMessage,
        op: &'static str,
        target: impl FnOnce() -> String,
    ) -> Result<(), NetlinkError> {
        let res = self.handle.link().change(msg).execute().await;
        tolerate(res, &[], op, target)
    }

    /// The external interface by name, with its first IPv4 address (advertised as is).
    pub async fn iface_by_name(&self, name: &str) -> Result<ExternalIface, NetlinkError> {
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink {
                name: name.to_string(),
            })?;
        let ipv4 = self
            .addresses_v4(link.index)
            .await?
            .first()
            .map(|n| n.addr())
            .ok_or_else(|| NetlinkError::NoIpv4 {
                name: link.name.clone(),
            })?;
        let ipv6 = self
            .addresses_v6(link.index)
            .await?
            .first()
            .map(|n| n.addr());
        Ok(ExternalIface {
            name: link.name,
            index: link.index,
            ipv4,
            public_ip: ipv4,
            ipv6,
            public_ipv6: ipv6,
            mtu: link.mtu,
        })
    }

    /// Every interface with its IPv4 addresses (in the kernel's order), ordered by index.
    pub async fn interfaces(&self) -> Result<Vec<Interface>, NetlinkError> {
        let req = self.handle.link().get().execute();
        let links = self.collect(req, "list links", String::new).await?;
        let addrs = self.address_dump().await?;
        let mut out: Vec<Interface> = links
            .into_iter()
            .map(|m| {
                let link = parse_link(m);
                Interface {
                    addrs: addrs
                        .iter()
                        .filter(|a| a.header.index == link.index)
                        .filter_map(super::addr::parse_v4)
                        .map(|n| n.addr())
                        .collect(),
                    addrs6: addrs
                        .iter()
                        .filter(|a| a.header.index == link.index)
                        .filter_map(super::addr::parse_v6_global)
                        .map(|n| n.addr())
                        .collect(),
                    name: link.name,
                    index: link.index,
                    mtu: link.mtu,
                }
            })
            .collect();
        out.sort_by_key(|i| i.index);
        Ok(out)
    }

    /// The interface index of the main table's first IPv4 default route (the kernel lists
    /// the lowest metric first), as flanneld picks the external interface without `--iface`.
    pub async fn default_route_index(&self) -> Result<Option<u32>, NetlinkError> {
        Ok(self
            .routes_v4()
            .await?
            .into_iter()
            .find(|r| r.dst.prefix_len() == 0 && r.oif.is_some())
            .and_then(|r| r.oif))
    }
}
