//! Link events of the container bridge itself (`ip monitor link dev docker0`): the bridge
//! appearing, being deleted, or being recreated by dockerd, so the eBPF backend attaches its
//! encapsulation within moments instead of at the next reconcile. The bridge is matched by name,
//! because a recreated bridge has a new index and a missing one has none.

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{link::LinkAttribute, link::LinkMessage, RouteNetlinkMessage};
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;

use super::{Connection, NetlinkError};

type Messages =
    futures::channel::mpsc::UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// What happened to the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeEvent {
    /// RTM_NEWLINK of a bridge by that name with an index not seen before: created or recreated.
    /// Other changes of the same bridge (carrier, flags, features) are no reason to re-attach.
    Created { index: u32 },
    /// RTM_DELLINK.
    Deleted { index: u32 },
}

/// A subscription to the link events of one bridge, by name, in the caller's network namespace.
pub struct BridgeEvents {
    name: String,
    /// The index of the bridge as last reported; `None` before the first event or once deleted.
    index: Option<u32>,
    messages: Messages,
    _conn: Connection,
}

impl BridgeEvents {
    /// Subscribes; must be called inside a tokio runtime, which drives the socket. `index` is
    /// the bridge's index as the caller knows it (`None`: no such bridge yet).
    pub fn subscribe(name: &str, index: Option<u32>) -> Result<Self, NetlinkError> {
        let (conn, _, messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .map_err(|source| NetlinkError::Connect { source })?;
        Ok(Self {
            name: name.to_string(),
            index,
            messages,
            _conn: Connection(tokio::spawn(conn)),
        })
    }

    /// The next event of the bridge. Cancel-safe. Never resolves once the socket is gone.
    pub async fn next(&mut self) -> BridgeEvent {
        while let Some((msg, _)) = self.messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))
                    if is_named(&link, &self.name) && self.index != Some(link.header.index) =>
                {
                    self.index = Some(link.header.index);
                    BridgeEvent::Created {
                        index: link.header.index,
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                    if is_named(&link, &self.name) =>
                {
                    self.index = None;
                    BridgeEvent::Deleted {
                        index: link.header.index,
                    }
                }
                _ => continue,
            };
            return event;
        }
        std::future::pending().await
    }
}

fn is_named(link: &LinkMessage, name: &str) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
}
