//! The socket under a [`super::Netlink`]'s connection: netlink-sys's tokio socket, read in turns
//! and not at all once its last handle is gone.
//!
//! netlink-proto's connection task reads datagrams until the socket would block and only then
//! hands the replies to their requests. A dump is never "would block" while it lasts (every
//! read makes the kernel fill the next datagram), so the task read a whole dump of thousands of
//! routes or neighbours in one poll: nothing reached the caller before the end, and a caller
//! that gave up (a reconcile pass dropped for a lease event) could not stop it. Aborting the
//! task takes effect only when its poll returns, so it drained the rest of the dump and logged
//! "failed to forward response back to the handle" for every message (136,086 lines in one
//! bench run). This socket gives the task back to the runtime after each [`TURN_BYTES`] read,
//! and reports "nothing to read" for good once [`RouteSocket::closer`]'s flag is set: the task
//! then forwards what it holds (at most one turn's messages), sees its request channel closed,
//! and ends; the kernel discards the rest of the dump when the socket closes.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use rtnetlink::sys::{AsyncSocket, Socket, SocketAddr, TokioSocket};

/// Bytes read in one turn of the connection task. Half the kernel's largest dump datagram
/// (32 KiB), so a dump is forwarded one datagram at a time while small replies (ACKs of a
/// snapshot's overlapping requests) still go hundreds to a turn.
pub(super) const TURN_BYTES: usize = 16 * 1024;

/// A route netlink socket read in turns; see the module documentation.
pub struct RouteSocket {
    inner: TokioSocket,
    /// Bytes read since the task last gave the runtime a turn.
    read: AtomicUsize,
    /// Set when the last handle is dropped: read nothing more.
    closed: Arc<AtomicBool>,
}

impl RouteSocket {
    /// The flag that stops reading; set it when nobody waits for replies any more.
    pub(super) fn closer(&self) -> Arc<AtomicBool> {
        self.closed.clone()
    }

    /// `Some(Pending)` when the task must not read now: closed for good (the connection ends
    /// as its request channel is closed too, or its abort ends it), or a turn's bytes read
    /// (woken at once, so the task forwards what it read and carries on).
    fn wait_turn<T>(&self, cx: &mut Context<'_>) -> Option<Poll<T>> {
        if self.closed.load(Ordering::Acquire) {
            return Some(Poll::Pending);
        }
        if self.read.load(Ordering::Relaxed) >= TURN_BYTES {
            self.read.store(0, Ordering::Relaxed);
            cx.waker().wake_by_ref();
            return Some(Poll::Pending);
        }
        None
    }

    /// Counts what a read took; a read that would block ends the turn.
    fn count<T>(&self, got: Poll<io::Result<T>>, bytes: usize) -> Poll<io::Result<T>> {
        match &got {
            Poll::Ready(Ok(_)) => {
                self.read.fetch_add(bytes.max(1), Ordering::Relaxed);
            }
            Poll::Pending => self.read.store(0, Ordering::Relaxed),
            Poll::Ready(Err(_)) => {}
        }
        got
    }
}

impl AsyncSocket for RouteSocket {
    fn socket_ref(&self) -> &Socket {
        self.inner.socket_ref()
    }

    fn socket_mut(&mut self) -> &mut Socket {
        self.inner.socket_mut()
    }

    fn new(protocol: isize) -> io::Result<Self> {
        Ok(Self {
            inner: TokioSocket::new(protocol)?,
            read: AtomicUsize::new(0),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    fn poll_send(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.inner.poll_send(cx, buf)
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        addr: &SocketAddr,
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_send_to(cx, buf, addr)
    }

    fn poll_recv<B>(&self, cx: &mut Context<'_>, buf: &mut B) -> Poll<io::Result<()>>
    where
        B: bytes::BufMut,
    {
        if let Some(wait) = self.wait_turn(cx) {
            return wait;
        }
        let room = buf.remaining_mut();
        let got = self.inner.poll_recv(cx, buf);
        self.count(got, room - buf.remaining_mut())
    }

    fn poll_recv_from<B>(&self, cx: &mut Context<'_>, buf: &mut B) -> Poll<io::Result<SocketAddr>>
    where
        B: bytes::BufMut,
    {
        if let Some(wait) = self.wait_turn(cx) {
            return wait;
        }
        let room = buf.remaining_mut();
        let got = self.inner.poll_recv_from(cx, buf);
        self.count(got, room - buf.remaining_mut())
    }

    fn poll_recv_from_full(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Vec<u8>, SocketAddr)>> {
        if let Some(wait) = self.wait_turn(cx) {
            return wait;
        }
        let got = self.inner.poll_recv_from_full(cx);
        let bytes = match &got {
            Poll::Ready(Ok((data, _))) => data.len(),
            _ => 0,
        };
        self.count(got, bytes)
    }
}
