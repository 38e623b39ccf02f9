//! Link and neighbour events as they happen (`ip monitor link neigh`):
//! interfaces joining or leaving the container bridge, and the bridge's
//! neighbour and forwarding entries changing, so the eBPF backend attaches to
//! a new container's port and binds its address at once instead of at the
//! next reconcile.

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{
    link::LinkAttribute, link::LinkMessage, neighbour::NeighbourAttribute,
    neighbour::NeighbourMessage, RouteNetlinkMessage,
};
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;

use super::{Connection, NetlinkError};

type Messages =
    futures::channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// A subscription to the link and neighbour events of the caller's network namespace.
pub struct LinkWatch {
    messages: Messages,
    _conn: Connection,
}

impl LinkWatch {
    /// Subscribes; must be called inside a tokio runtime, which drives the socket.
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let (conn, _, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Neigh])
                .map_err(|source| NetlinkError::Connect { source })?;
        Ok(Self {
            messages,
            _conn: Connection(tokio::spawn(conn)),
        })
    }

    /// Resolves when an interface was added to, changed on, or removed from
    /// bridge `bridge_index`, or a neighbour entry of the bridge or a
    /// forwarding entry of its ports changed. Cancel-safe. Never resolves once
    /// the socket is gone.
    pub async fn port_change(&mut self, bridge_index: u32) {
        while let Some((msg, _)) = self.messages.next().await {
            let relevant = match msg.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
                ) => is_port_of(&link, bridge_index),
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n),
                ) => is_bridge_neighbour(&n, bridge_index),
                _ => false,
            };
            if relevant {
                return;
            }
        }
        std::future::pending().await
    }
}

/// An ARP entry on the bridge, or an fdb entry of one of its ports.
fn is_bridge_neighbour(n: &NeighbourMessage, bridge_index: u32) -> bool {
    n.header.ifindex == bridge_index
        || n.attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::Controller(c) if *c == bridge_index))
}

fn is_port_of(link: &LinkMessage, bridge_index: u32) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge_index))
}
