//! The only module that touches rtnetlink: idempotent ensure/replace/delete helpers.
//!
//! [`Netlink`] is a cloneable handle whose methods mirror `ip link`, `ip addr`,
//! `ip route`, `ip neigh` and `bridge fdb`. Writes have replace semantics, deletes of
//! something already gone succeed, and listings return plain domain structs so the
//! backends can reconcile kernel state against leases without seeing netlink types.
//! "Already exists" and "not found" are recognised by errno, never by message text.
//!
//! The socket belongs to the network namespace of the thread that calls
//! [`Netlink::connect`]; the connection task lives as long as the last clone.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weft::netlink::NetlinkError> {
//! let nl = weft::netlink::Netlink::connect()?;
//! let ens32 = nl.iface_by_name("ens32").await?;
//! println!("{} has index {} and mtu {}", ens32.name, ens32.index, ens32.mtu);
//! # Ok(()) }
//! ```

mod addr;
mod bridge_events;
mod link;
mod neigh;
mod route;
mod socket;
mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::TryStreamExt;
use rtnetlink::packet_core::ErrorMessage;

use crate::lease::MacAddr;

pub use bridge_events::{BridgeEvent, BridgeEvents, BridgeState};
pub use link::{ExternalIface, Interface, LinkInfo, VxlanAttrs, VxlanSpec};
pub use neigh::{BridgePortEntry, FdbEntry, Neigh6Entry, NeighEntry};
pub use route::{RouteEntry, RouteEntry6, RouteSpec, RouteSpec6, SyncReport};
pub use watch::LinkWatch;

/// Errors from kernel requests; each names the operation and its target.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("open rtnetlink socket: {source}; weft needs CAP_NET_ADMIN (run as root)")]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {target}: {}", describe(source))]
    Request {
        op: &'static str,
        target: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("interface {name} not found; check the name (`ip link`) or --iface")]
    NoSuchLink { name: String },
    #[error("interface {name} has no IPv4 address; add one or choose another with --iface")]
    NoIpv4 { name: String },
}

/// The kernel's errno as text ("File exists (os error 17)") for error messages.
fn describe(e: &rtnetlink::Error) -> String {
    match errno(e) {
        Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
        None => e.to_string(),
    }
}

/// The positive errno of a kernel NACK, if that is what the error is.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(ErrorMessage {
            code: Some(code), ..
        }) => Some(code.get().abs()),
        _ => None,
    }
}

fn is_errno(e: &rtnetlink::Error, codes: &[i32]) -> bool {
    errno(e).is_some_and(|c| codes.contains(&c))
}

/// Treat the listed errnos as success (an idempotent add or delete).
fn tolerate(
    res: Result<(), rtnetlink::Error>,
    ok: &[i32],
    op: &'static str,
    target: impl FnOnce() -> String,
) -> Result<(), NetlinkError> {
    match res {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, ok) => Ok(()),
        Err(source) => Err(NetlinkError::Request {
            op,
            target: target(),
            source: Box::new(source),
        }),
    }
}

/// Ends the connection task when the last [`Netlink`] clone is dropped: its socket reads
/// nothing more (a dump in progress included, see [`socket`]) and the task is aborted.
#[derive(Debug)]
struct Connection {
    task: tokio::task::JoinHandle<()>,
    closed: Arc<AtomicBool>,
}

impl Connection {
    /// Runs `conn` in a task; `closed` is set when this is dropped (a multicast
    /// subscription, which never dumps, passes a flag nobody reads).
    fn spawn(
        conn: impl std::future::Future<Output = ()> + Send + 'static,
        closed: Arc<AtomicBool>,
    ) -> Self {
        Self {
            task: tokio::spawn(conn),
            closed,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        self.task.abort();
    }
}

/// A cloneable rtnetlink handle bound to the caller's network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    _conn: Arc<Connection>,
}

impl Netlink {
    /// Open a route netlink socket in the current thread's network namespace.
    /// Must be called inside a tokio runtime, which drives the socket.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (mut conn, handle, _) = rtnetlink::new_connection_with_socket::<socket::RouteSocket>()
            .map_err(|source| NetlinkError::Connect { source })?;
        let closed = conn.socket_mut().closer();
        Ok(Self {
            handle,
            _conn: Arc::new(Connection::spawn(conn, closed)),
        })
    }
}

/// Replies read from a dump between two yields to the runtime.
const YIELD_EVERY: usize = 256;

/// Collect a dump stream, naming the dump in the error.
///
/// Yields to the runtime every [`YIELD_EVERY`] replies: the connection task (on the other
/// worker thread) often has the whole dump queued already, so the stream never returns
/// `Pending`, and a reconcile pass reading 5000 neighbours or routes could not be dropped
/// for a lease event until it had read and parsed all of them.
async fn collect<T>(
    stream: impl futures::Stream<Item = Result<T, rtnetlink::Error>>,
    op: &'static str,
    target: impl FnOnce() -> String,
) -> Result<Vec<T>, NetlinkError> {
    let mut stream = std::pin::pin!(stream);
    let mut all = Vec::new();
    let read = async {
        while let Some(item) = stream.try_next().await? {
            all.push(item);
            if all.len() % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    };
    match read.await {
        Ok(()) => Ok(all),
        Err(source) => Err(NetlinkError::Request {
            op,
            target: target(),
            source: Box::new(source),
        }),
    }
}

fn mac_from_bytes(b: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(b).ok().map(MacAddr)
}

/// `aa:bb:cc:dd:ee:ff`: [`MacAddr`]'s Display, kept for callers outside this module.
pub fn fmt_mac(mac: &MacAddr) -> String {
    mac.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_prints_like_flannel() {
        assert_eq!(
            fmt_mac(&MacAddr([0xf6, 0x14, 0xca, 0x9c, 0x9a, 0x74])),
            "f6:14:ca:9c:9a:74"
        );
    }

    /// A reconcile pass is dropped for a lease event only at an await that returns `Pending`:
    /// a dump whose replies are all queued must still give the runtime a turn while read.
    #[tokio::test]
    async fn a_dump_already_queued_is_read_in_turns() {
        let n = 5000;
        let queued = futures::stream::iter((0..n).map(Ok::<_, rtnetlink::Error>));
        let (all, turns) =
            crate::turns::count_turns(collect(queued, "list routes", String::new)).await;
        let all = all.expect("an Ok stream collects");
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "every reply, in order");
        assert_eq!(
            turns,
            n / YIELD_EVERY,
            "turns given while reading {n} queued replies"
        );
    }

    #[test]
    fn errno_comes_from_the_nack_code_not_the_text() {
        let nack = ErrorMessage::default();
        let mut nack = nack;
        nack.code = std::num::NonZeroI32::new(-libc::EEXIST);
        let e = rtnetlink::Error::NetlinkError(nack);
        assert_eq!(errno(&e), Some(libc::EEXIST));
        assert!(is_errno(&e, &[libc::EEXIST]));
        assert!(!is_errno(&rtnetlink::Error::RequestFailed, &[libc::EEXIST]));
        assert!(describe(&e).contains("exists"), "{}", describe(&e));
    }
}
