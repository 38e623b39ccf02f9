//! Link and neighbour events as they happen (`ip monitor link neigh`):
//! interfaces joining or leaving the container bridge, and the bridge's
//! neighbour and forwarding entries changing, so the eBPF backend attaches to
//! a new container's port and binds its address at once instead of at the
//! next reconcile.

use std::collections::HashMap;

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
    /// What the bridge's entries said last, so that state changes that keep
    /// the binding (REACHABLE -> STALE and back) are no reason to reconcile.
    /// Keys: a neighbour's address bytes, or an fdb entry's MAC; values: the
    /// neighbour's MAC, or the fdb entry's port.
    seen: HashMap<Vec<u8>, Vec<u8>>,
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
            seen: HashMap::new(),
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

    /// Takes in the events queued so far without reporting them: the caller
    /// is about to read the tables anyway.
    pub fn drain(&mut self, bridge_index: u32) {
        while let Ok((msg, _)) = self.messages.try_recv() {
            self.relevant(msg, bridge_index);
        }
    }

    fn relevant(&mut self, msg: NetlinkMessage<RouteNetlinkMessage>, bridge_index: u32) -> bool {
        match msg.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
            ) => is_port_of(&link, bridge_index),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n))
                if is_bridge_neighbour(&n, bridge_index) =>
            {
                let (key, value) = binding_part(&n);
                self.seen.insert(key, value.clone()) != Some(value)
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n))
                if is_bridge_neighbour(&n, bridge_index) =>
            {
                self.seen.remove(&binding_part(&n).0).is_some()
            }
            _ => false,
        }
    }
}

/// The part of a neighbour or fdb entry a binding depends on, as (key, value).
fn binding_part(n: &NeighbourMessage) -> (Vec<u8>, Vec<u8>) {
    let lladdr = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => Some(b.clone()),
        _ => None,
    });
    let dst = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(d) => Some(format!("{d:?}").into_bytes()),
        _ => None,
    });
    match dst {
        // ARP entry: address -> MAC.
        Some(dst) => (dst, lladdr.unwrap_or_default()),
        // fdb entry: MAC -> port.
        None => (
            lladdr.unwrap_or_default(),
            n.header.ifindex.to_ne_bytes().to_vec(),
        ),
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
