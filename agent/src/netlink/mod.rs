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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::ErrorMessage;

use crate::lease::MacAddr;
use crate::turns::Turns;

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
    abandoned: Abandoned,
}

impl Connection {
    /// Runs `conn` in a task; `closed` is set when this is dropped (a multicast
    /// subscription, which never dumps, passes a flag nobody reads).
    fn spawn(conn: impl Future<Output = ()> + Send + 'static, closed: Arc<AtomicBool>) -> Self {
        let abandoned = Abandoned::default();
        let held = abandoned.clone();
        let task = tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            std::future::poll_fn(|cx| {
                let done = conn.as_mut().poll(cx);
                held.drain(cx);
                done
            })
            .await
        });
        Self {
            task,
            closed,
            abandoned,
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        self.task.abort();
    }
}

/// A dump's replies, as its reader no longer wants them.
type Unwanted = Pin<Box<dyn futures::Stream<Item = ()> + Send>>;

/// The reply streams of dumps their reader gave up on (a reconcile pass dropped for a lease
/// event), kept by the connection task that forwards to them. netlink-proto forwards every
/// reply it has read to its request's stream and logs "failed to forward response back to the
/// handle" for each one whose stream is gone; a dropped pass's connection task often holds a
/// datagram of hundreds when the pass is dropped. Here the stream outlives every forward: the
/// task reads and discards what reaches it after each of its turns, drops it once its dump
/// ended, and drops whatever is left when the task itself ends (aborted with its socket).
#[derive(Clone, Default)]
struct Abandoned(Arc<std::sync::Mutex<Vec<Unwanted>>>);

impl std::fmt::Debug for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Abandoned").finish_non_exhaustive()
    }
}

impl Abandoned {
    fn keep(&self, stream: Unwanted) {
        self.lock().push(stream);
    }

    /// Takes in what the connection forwarded to the kept streams; drops those whose dump
    /// ended (their sender is gone, nothing more can reach them).
    fn drain(&self, cx: &mut Context<'_>) {
        self.lock().retain_mut(|s| loop {
            match s.poll_next_unpin(cx) {
                Poll::Ready(Some(())) => {}
                Poll::Ready(None) => break false,
                Poll::Pending => break true,
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Unwanted>> {
        // A panic while holding it leaves a plain list of streams: still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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

impl Netlink {
    /// Reads a dump, keeping what `keep` makes of each reply as it comes (so a pass never
    /// holds thousands of raw replies, nor converts or frees them all in one go), naming the
    /// dump in the error. Given up on (dropped) before its end, the dump's reply stream goes
    /// to the connection task ([`Abandoned`]) instead of being dropped under it.
    async fn dump<T, U>(
        &self,
        stream: impl futures::Stream<Item = Result<T, rtnetlink::Error>> + Send + 'static,
        op: &'static str,
        target: impl FnOnce() -> String,
        keep: impl FnMut(T) -> Option<U>,
    ) -> Result<Vec<U>, NetlinkError> {
        let mut reading = Reading {
            stream: Some(Box::pin(stream)),
            abandoned: &self._conn.abandoned,
        };
        let stream = reading.stream.as_mut().expect("set above");
        let read = read_in_turns(stream, keep).await;
        if read.is_ok() {
            // Read to its end: nothing more is forwarded to it.
            reading.stream = None;
        }
        read.map_err(|source| NetlinkError::Request {
            op,
            target: target(),
            source: Box::new(source),
        })
    }

    /// [`Self::dump`] keeping every reply.
    async fn collect<T>(
        &self,
        stream: impl futures::Stream<Item = Result<T, rtnetlink::Error>> + Send + 'static,
        op: &'static str,
        target: impl FnOnce() -> String,
    ) -> Result<Vec<T>, NetlinkError> {
        self.dump(stream, op, target, Some).await
    }
}

/// A dump being read; hands its stream to the connection task if dropped before the end.
struct Reading<'a, S: futures::Stream + Send + 'static> {
    stream: Option<Pin<Box<S>>>,
    abandoned: &'a Abandoned,
}

impl<S: futures::Stream + Send + 'static> Drop for Reading<'_, S> {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.abandoned.keep(Box::pin(stream.map(|_| ())));
        }
    }
}

/// Reads `stream` to its end or first error, keeping what `keep` makes of each item.
///
/// Gives the runtime a turn every [`crate::turns::TURN_ITEMS`] replies: the connection task (on another
/// thread) often has the whole dump queued already, so the stream never returns `Pending`,
/// and a reconcile pass reading 5000 neighbours or routes could not be dropped for a lease
/// event until it had read and converted all of them.
async fn read_in_turns<T, U>(
    mut stream: impl futures::Stream<Item = Result<T, rtnetlink::Error>> + Unpin,
    mut keep: impl FnMut(T) -> Option<U>,
) -> Result<Vec<U>, rtnetlink::Error> {
    let mut kept = Vec::new();
    let mut turns = Turns::default();
    while let Some(item) = stream.try_next().await? {
        kept.extend(keep(item));
        turns.tick().await;
    }
    Ok(kept)
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
        let (all, turns) = crate::turns::count_turns(read_in_turns(queued, Some)).await;
        let all = all.expect("an Ok stream collects");
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "every reply, in order");
        assert_eq!(
            turns,
            n / crate::turns::TURN_ITEMS,
            "turns given while reading {n} queued replies"
        );
    }

    /// A reply the connection forwards after its reader gave up must still find a live stream
    /// (netlink-proto logs a warning for each one that does not), until the dump has ended.
    #[test]
    fn a_dump_given_up_on_keeps_its_stream_until_the_dump_ends() {
        let abandoned = Abandoned::default();
        let (replies, stream) =
            futures::channel::mpsc::unbounded::<Result<u32, rtnetlink::Error>>();
        let reading = Reading {
            stream: Some(Box::pin(stream)),
            abandoned: &abandoned,
        };
        drop(reading);
        assert!(
            replies.unbounded_send(Ok(1)).is_ok(),
            "a reply after the reader gave up found its stream gone"
        );
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        abandoned.drain(&mut cx);
        assert_eq!(abandoned.lock().len(), 1, "kept while the dump runs");
        // The dump ends: netlink-proto drops the request's sender.
        drop(replies);
        abandoned.drain(&mut cx);
        assert_eq!(
            abandoned.lock().len(),
            0,
            "dropped once nothing more can reach it"
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
