//! A TCP relay between agents and etcd that a test can cut: every relayed connection dropped at
//! once (what a reset between agent and etcd looks like to the agent) and, while cut, new ones
//! refused in effect.
//!
//! [`Relay::start`] and [`Relay::serve`] relay from a listener to an upstream reached from the
//! test's own namespace; [`Relay::in_namespace`] does both inside one namespace (etcd there,
//! the relay on another port there), on a thread of its own that joined it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::Netns;

/// See the module docs. Dropped: every connection cut and the listener closed.
pub struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    /// Relayed connections still open (a guard in each copying task counts it down when the
    /// task ends or is aborted).
    live: Arc<AtomicUsize>,
    /// Connections still to close right after their TLS handshake.
    close_after_handshake: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    /// For [`Relay::in_namespace`]: ends the runtime thread that drives the relay.
    thread: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<anyhow::Result<()>>,
    )>,
}

impl Relay {
    /// A relay on a free port of the test's 127.0.0.1 to `upstream` (`http://host:port`).
    pub async fn start(upstream: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        Relay::serve(listener, upstream)
    }

    /// Relay connections accepted on `listener` (bound in whatever namespace) to `upstream`,
    /// connected from the test's namespace.
    pub fn serve(listener: TcpListener, upstream: String) -> Relay {
        let port = listener.local_addr().expect("relay addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let live = Arc::new(AtomicUsize::new(0));
        let close_after_handshake = Arc::new(AtomicUsize::new(0));
        let (cut2, conns2, live2) = (cut.clone(), conns.clone(), live.clone());
        let closing = close_after_handshake.clone();
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let up = upstream.clone();
                let open = Open::count(&live2);
                let close = closing
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                conns2.lock().expect("conns").push(tokio::spawn(async move {
                    let _open = open;
                    if let Ok(mut up) = tokio::net::TcpStream::connect(up).await {
                        if close {
                            handshake_then_close(&mut down, &mut up).await;
                        } else {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    }
                }));
            }
        });
        Relay {
            port,
            cut,
            live,
            close_after_handshake,
            conns,
            accept,
            thread: None,
        }
    }

    /// A relay inside `ns` from its 127.0.0.1:`port` to `upstream` (also inside `ns`).
    pub fn in_namespace(ns: &Netns, port: u16, upstream: String) -> Relay {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.spawn_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let relay = rt.block_on(async {
                let listener = TcpListener::bind(("127.0.0.1", port)).await?;
                anyhow::Ok(Relay::serve(listener, upstream))
            })?;
            let _ = ready_tx.send(relay);
            // Drives the accept loop and the copies until the relay is dropped.
            let _ = rt.block_on(stop_rx);
            Ok(())
        });
        let Ok(mut relay) = ready_rx.recv_timeout(Duration::from_secs(10)) else {
            panic!(
                "the relay inside {} did not start: {:?}",
                ns.name(),
                thread.join()
            );
        };
        relay.thread = Some((stop_tx, thread));
        relay
    }

    /// Wait until no relayed connection is open: whoever used the relay is cut off from etcd.
    pub async fn wait_closed(&self) {
        crate::poll::until(
            "every relayed connection to close",
            Duration::from_secs(5),
            || async {
                let n = self.live.load(Ordering::SeqCst);
                crate::poll::check(n == 0, format!("{n} open"))
            },
        )
        .await;
    }

    /// Relayed connections open now.
    pub fn open(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Close each of the next `n` connections right after its TLS 1.3 handshake: the client's
    /// hello and the server's flight pass, then the client's first write (its Finished and
    /// first request) is dropped with the connection. What a client sees when the server
    /// rejects its certificate, or when a connection is reset at that moment.
    pub fn close_after_handshake(&self, n: usize) {
        self.close_after_handshake.store(n, Ordering::SeqCst);
    }

    /// Drop every relayed connection and, while `on`, every new one.
    pub fn cut(&self, on: bool) {
        self.cut.store(on, Ordering::SeqCst);
        if on {
            for c in self.conns.lock().expect("conns").drain(..) {
                c.abort();
            }
        }
    }
}

async fn handshake_then_close(down: &mut tokio::net::TcpStream, up: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let mut pass = async |from: &mut tokio::net::TcpStream, to: &mut tokio::net::TcpStream| {
        let n = from.read(&mut buf).await.unwrap_or(0);
        n > 0 && to.write_all(&buf[..n]).await.is_ok()
    };
    if pass(down, up).await && pass(up, down).await {
        // The client's answer to the server's flight; bounded in case the flight came split.
        let _ = tokio::time::timeout(Duration::from_secs(2), down.read(&mut [0u8; 1])).await;
    }
}

/// One open relayed connection, counted while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(live: &Arc<AtomicUsize>) -> Open {
        live.fetch_add(1, Ordering::SeqCst);
        Open(live.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut(true);
        self.accept.abort();
        if let Some((stop, thread)) = self.thread.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
