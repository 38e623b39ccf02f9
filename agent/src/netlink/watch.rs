//! Link and neighbour events as they happen (`ip monitor link neigh`):
//! interfaces joining or leaving the container bridge, and the bridge's
//! neighbour and forwarding entries changing, so the eBPF backend attaches to
//! a new container's port and binds its address at once instead of at the
//! next reconcile.

use std::collections::HashMap;
use std::net::IpAddr;

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{
    link::LinkAttribute,
    link::LinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    AddressFamily, RouteNetlinkMessage,
};
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;

use super::neigh::{BridgePortEntry, Neigh6Entry, NeighEntry};
use super::{Connection, NetlinkError};

type Messages =
    futures::channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// A subscription to the link and neighbour events of the caller's network namespace.
pub struct LinkWatch {
    messages: Messages,
    _conn: Connection,
    /// What the bridge's entries said last, so that state changes that keep
    /// the binding (REACHABLE -> STALE and back) are no reason to reconcile.
    /// Keys: a neighbour's address bytes, or an fdb entry's MAC; values: the
    /// neighbour's MAC, or the fdb entry's port.
    seen: HashMap<BindingKey, Vec<u8>>,
    /// A bridge port that is not a container's (the eBPF backend's headroom device):
    /// its joining and its forwarding entries are the agent's own doing.
    ignored: Option<u32>,
}

impl LinkWatch {
    /// Subscribes; must be called inside a tokio runtime, which drives the socket.
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let (conn, _, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
                .map_err(|source| NetlinkError::Connect { source })?;
        Ok(Self {
            messages,
            _conn: Connection::spawn(conn, Default::default()),
            seen: HashMap::new(),
            ignored: None,
        })
    }

    /// Resolves when an interface was added to, changed on, or removed from
    /// bridge `bridge_index`, or a neighbour entry of the bridge (IP -> MAC)
    /// or a forwarding entry of its ports (MAC -> port) changed. Cancel-safe.
    /// Never resolves once the socket is gone.
    pub async fn port_change(&mut self, bridge_index: u32) {
        while let Some((msg, _)) = self.messages.next().await {
            if self.relevant(msg, bridge_index) {
                return;
            }
        }
        std::future::pending().await
    }

    /// Events of port `index` are no reason to reconcile from now on (also those
    /// already queued); `None` reports every port again.
    pub fn ignore_port(&mut self, index: Option<u32>) {
        self.ignored = index;
    }

    /// Takes in the events queued so far without reporting them: the caller
    /// is about to read the tables anyway.
    pub fn drain(&mut self, bridge_index: u32) {
        while let Ok((msg, _)) = self.messages.try_recv() {
            self.relevant(msg, bridge_index);
        }
    }

    /// Records the bridge's tables as just read, so that events repeating what they hold (a
    /// neighbour going REACHABLE -> STALE, an entry refreshed) are no reason to reconcile, and
    /// only a real change of an address's MAC or a MAC's port is.
    /// `neighbours6` is empty while IPv6 bindings are off.
    pub fn remember(
        &mut self,
        neighbours: &[NeighEntry],
        neighbours6: &[Neigh6Entry],
        learned: &[BridgePortEntry],
    ) {
        self.seen.clear();
        let v4 = neighbours.iter().map(|n| (IpAddr::V4(n.ip), n.mac));
        let v6 = neighbours6.iter().map(|n| (IpAddr::V6(n.ip), n.mac));
        for (ip, mac) in v4.chain(v6).filter(|(ip, _)| may_bind(*ip)) {
            let mac = mac.map(|m| m.0.to_vec()).unwrap_or_default();
            self.seen.insert(BindingKey::Addr(ip), mac);
        }
        for l in learned {
            self.seen.insert(
                BindingKey::Mac(l.mac.0.to_vec()),
                l.port_index.to_ne_bytes().to_vec(),
            );
        }
    }

    fn relevant(&mut self, msg: NetlinkMessage<RouteNetlinkMessage>, bridge_index: u32) -> bool {
        match msg.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
            ) => is_port_of(&link, bridge_index) && self.ignored != Some(link.header.index),
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n),
            ) if self.ignored == Some(n.header.ifindex) => false,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n))
                if is_bridge_neighbour(&n, bridge_index) =>
            {
                binding_part(&n)
                    .is_some_and(|(key, value)| self.seen.insert(key, value.clone()) != Some(value))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n))
                if is_bridge_neighbour(&n, bridge_index) =>
            {
                binding_part(&n).is_some_and(|(key, _)| self.seen.remove(&key).is_some())
            }
            _ => false,
        }
    }
}

/// What a binding is keyed by: a neighbour's address, or an fdb entry's MAC.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BindingKey {
    Addr(IpAddr),
    Mac(Vec<u8>),
}

/// The part of a neighbour or fdb entry a binding depends on, as (key, value); `None` for
/// entries no binding depends on (multicast and link-local neighbours).
fn binding_part(n: &NeighbourMessage) -> Option<(BindingKey, Vec<u8>)> {
    let lladdr = n
        .attributes
        .iter()
        .find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) => Some(b.clone()),
            _ => None,
        })
        .unwrap_or_default();
    if n.header.family == AddressFamily::Bridge {
        // fdb entry: MAC -> port.
        return Some((
            BindingKey::Mac(lladdr),
            n.header.ifindex.to_ne_bytes().to_vec(),
        ));
    }
    n.attributes
        .iter()
        .find_map(|a| match a {
            // ARP entry: address -> MAC.
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            // NDP entry: as ARP's, for a container's IPv6 address.
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        })
        .filter(|ip| may_bind(*ip))
        .map(|ip| (BindingKey::Addr(ip), lladdr))
}

/// Whether a neighbour entry for `ip` can be a container's binding. Multicast entries
/// (224.0.0.22 for IGMP, ff02::16 for MLD, ...) come and go with group membership, and
/// link-local IPv6 neighbours (every port's fe80:: address) are never a container's
/// overlay address: neither is a reason to reconcile.
fn may_bind(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => !ip.is_multicast(),
        IpAddr::V6(ip) => !ip.is_multicast() && ip.segments()[0] & 0xffc0 != 0xfe80,
    }
}

fn is_port_of(link: &LinkMessage, bridge_index: u32) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge_index))
}

/// An ARP entry on the bridge, or an fdb entry of one of its ports.
fn is_bridge_neighbour(n: &NeighbourMessage, bridge_index: u32) -> bool {
    n.header.ifindex == bridge_index
        || n.attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::Controller(c) if *c == bridge_index))
}
