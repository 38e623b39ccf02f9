//! Link events as they happen (`ip monitor link`): interfaces joining or
//! leaving the container bridge, so the eBPF backend attaches to a new
//! container's port at once instead of at the next reconcile.

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{link::LinkAttribute, link::LinkMessage, RouteNetlinkMessage};
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;

use super::{Connection, NetlinkError};

type Messages =
    futures::channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// A subscription to the link events of the caller's network namespace.
pub struct LinkWatch {
    messages: Messages,
    _conn: Connection,
}

impl LinkWatch {
    /// Subscribes; must be called inside a tokio runtime, which drives the socket.
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let (conn, _, messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .map_err(|source| NetlinkError::Connect { source })?;
        Ok(Self {
            messages,
            _conn: Connection(tokio::spawn(conn)),
        })
    }

    /// Resolves when an interface was added to, changed on, or removed from
    /// bridge `bridge_index`. Cancel-safe. Never resolves once the socket is gone.
    pub async fn port_change(&mut self, bridge_index: u32) {
        while let Some((msg, _)) = self.messages.next().await {
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
            ) = msg.payload
            {
                if is_port_of(&link, bridge_index) {
                    return;
                }
            }
        }
        std::future::pending().await
    }
}

fn is_port_of(link: &LinkMessage, bridge_index: u32) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge_index))
}
