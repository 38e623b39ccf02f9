//! Link events of the container bridge itself (`ip monitor link dev docker0`): the bridge
//! appearing, being deleted, recreated by dockerd, or going down and up, so the eBPF backend
//! attaches its encapsulation and mirrors the bridge's state within moments instead of at the next
//! reconcile. The bridge is matched by name, because a recreated bridge has a new index and a
//! missing one has none. Also the bridge's forwarding state as the kernel's bridge judges it
//! ([`Netlink::bridge_state`]): whether it is up, and which ports forward.

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{
    BridgePortState, InfoBridgePort, InfoPortData, LinkAttribute, LinkFlags,
    LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;

use super::{Connection, Netlink, NetlinkError};

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
    /// The bridge went down (administratively, or lost its carrier) or came up again: its
    /// ports stop or resume forwarding.
    StateChanged { index: u32, up: bool },
}

/// A subscription to the link events of one bridge, by name, in the caller's network namespace.
pub struct BridgeEvents {
    name: String,
    /// The index of the bridge as last reported; `None` before the first event or once deleted.
    index: Option<u32>,
    /// Whether it was up and running as last reported; `None` before the first event.
    up: Option<bool>,
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
            up: None,
            messages,
            _conn: Connection::spawn(conn, Default::default()),
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
                    self.up = Some(is_up(&link));
                    BridgeEvent::Created {
                        index: link.header.index,
                    }
                }
                // Carrier, features or statistics changes of the same bridge are no reason to
                // reconcile; only whether it forwards at all is. The first report after
                // subscribing is only recorded: the reconcile that follows the subscription
                // reads the state itself (and a bridge going down disables its ports, whose
                // own events the port watch reports).
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))
                    if is_named(&link, &self.name) && self.up != Some(is_up(&link)) =>
                {
                    let up = is_up(&link);
                    if self.up.replace(up).is_none() {
                        continue;
                    }
                    BridgeEvent::StateChanged {
                        index: link.header.index,
                        up,
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                    if is_named(&link, &self.name) =>
                {
                    self.index = None;
                    self.up = None;
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

/// Administratively up and operationally running (`UP` and `RUNNING` in `ip link`): a bridge
/// that is not disables its ports, and its routes are gone.
fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up) && link.header.flags.contains(LinkFlags::Running)
}

/// Whether a bridge forwards, and through which of its ports, as its own forwarding judges it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeState {
    /// Up and running ([`is_up`]); a down bridge forwards nothing.
    pub up: bool,
    /// Indices of the ports in the `forwarding` state (`bridge link`): the bridge neither
    /// accepts frames from nor delivers frames to a port in any other state (disabled,
    /// blocking, listening, learning).
    pub forwarding: Vec<u32>,
}

impl Netlink {
    /// The state of bridge `bridge_index` and of its ports (`ip -d link show`); `None` when
    /// there is no such link.
    pub async fn bridge_state(
        &self,
        bridge_index: u32,
    ) -> Result<Option<BridgeState>, NetlinkError> {
        let links = self
            .collect(
                self.handle.link().get().execute(),
                "read the state of bridge",
                || format!("index {bridge_index}"),
            )
            .await?;
        let Some(bridge) = links.iter().find(|l| l.header.index == bridge_index) else {
            return Ok(None);
        };
        let forwarding = links
            .iter()
            .filter(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge_index))
                    && port_state(l) == Some(BridgePortState::Forwarding)
            })
            .map(|l| l.header.index)
            .collect();
        Ok(Some(BridgeState {
            up: is_up(bridge),
            forwarding,
        }))
    }
}

/// A bridge port's STP state (`IFLA_BRPORT_STATE` in the port's link info).
fn port_state(link: &LinkMessage) -> Option<BridgePortState> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            NlLinkInfo::PortData(InfoPortData::BridgePort(attrs)) => {
                attrs.iter().find_map(|b| match b {
                    InfoBridgePort::State(s) => Some(*s),
                    _ => None,
                })
            }
            _ => None,
        }),
        _ => None,
    })
}
