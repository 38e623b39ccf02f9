//! `/healthz`, `/readyz` and `/metrics` over a deliberately tiny HTTP/1.1 server.
//!
//! Three fixed GET endpoints do not justify a web framework: each connection gets one request and one
//! response with `Connection: close`, which every prober and Prometheus scraper handles.
//!
//! - `/healthz`: 200 while the process is alive (flanneld's meaning).
//! - `/readyz`: 200 once the run loop has set the readiness `watch` to `true` (subnet file written and
//!   datapath programmed), 503 before and whenever it goes back to `false`.
//! - `/metrics`: [`Metrics::render`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), weft::health::HealthError> {
//! use std::sync::Arc;
//! use tokio_util::sync::CancellationToken;
//! use weft::{health::HealthServer, metrics::Metrics};
//!
//! let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
//! let server = HealthServer::bind("0.0.0.0:8285".parse().unwrap(), ready_rx, Arc::new(Metrics::default())).await?;
//! let shutdown = CancellationToken::new();
//! let task = tokio::spawn(server.serve(shutdown.clone()));
//! ready_tx.send_replace(true);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Metrics};

/// Requests larger than this are refused; ours are a request line and a few headers.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that has not sent its request by then is dropped, so idle connections cannot pile up.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("bind the health server to {addr}: {source}; pick another --healthz-ip/--healthz-port or stop what listens there")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("read the health server's local address: {source}")]
    LocalAddr {
        #[source]
        source: std::io::Error,
    },
}

/// A bound, not yet serving, health endpoint. Binding first lets the caller report a taken port before
/// anything else starts.
#[derive(Debug)]
pub struct HealthServer {
    listener: TcpListener,
    ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

impl HealthServer {
    pub async fn bind(
        addr: SocketAddr,
        ready: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, HealthError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HealthError::Bind { addr, source })?;
        Ok(Self {
            listener,
            ready,
            metrics,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, HealthError> {
        self.listener
            .local_addr()
            .map_err(|source| HealthError::LocalAddr { source })
    }

    /// Answer requests until `shutdown` fires; in-flight connections are dropped then.
    pub async fn serve(self, shutdown: CancellationToken) {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let ready = *self.ready.borrow();
                        let metrics = self.metrics.clone();
                        conns.spawn(async move {
                            if let Err(e) = handle(stream, ready, &metrics).await {
                                tracing::debug!(error = %e, "health connection ended with an error");
                            }
                        });
                    }
                    // Accept errors (EMFILE, ECONNABORTED) are transient; back off briefly instead of spinning.
                    Err(e) => {
                        tracing::warn!(error = %e, "health server: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
    }
}

async fn handle(mut stream: TcpStream, ready: bool, metrics: &Metrics) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match head {
        Some(head) => respond(&head, ready, metrics),
        None => Response::text(400, "Bad Request", "bad request\n"),
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.shutdown().await
}

/// Read until the blank line that ends the headers. `None` when the request is malformed or too large.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8(buf).ok())
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

fn respond(head: &str, ready: bool, metrics: &Metrics) -> Response {
    let mut parts = head.lines().next().unwrap_or_default().split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Response::text(400, "Bad Request", "bad request\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(505, "HTTP Version Not Supported", "HTTP/1.x only\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::text(405, "Method Not Allowed", "GET or HEAD only\n"),
    };
    let path = target.split('?').next().unwrap_or(target);
    let mut response = match path {
        "/healthz" => Response::text(200, "OK", "ok\n"),
        "/readyz" if ready => Response::text(200, "OK", "ok\n"),
        "/readyz" => Response::text(
            503,
            "Service Unavailable",
            "not ready: subnet file or datapath not in place yet\n",
        ),
        "/metrics" => Response {
            content_type: metrics::CONTENT_TYPE,
            ..Response::text(200, "OK", &metrics.render())
        },
        _ => Response::text(404, "Not Found", "try /healthz, /readyz or /metrics\n"),
    };
    response.head_only = head_only;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(head: &str, ready: bool) -> u16 {
        respond(head, ready, &Metrics::default()).status
    }

    #[test]
    fn routes() {
        assert_eq!(status("GET /healthz HTTP/1.1\r\n\r\n", false), 200);
        assert_eq!(status("GET /readyz HTTP/1.1\r\n\r\n", false), 503);
        assert_eq!(status("GET /readyz?verbose HTTP/1.0\r\n\r\n", true), 200);
        assert_eq!(status("HEAD /metrics HTTP/1.1\r\n\r\n", true), 200);
        assert_eq!(status("POST /healthz HTTP/1.1\r\n\r\n", true), 405);
        assert_eq!(status("GET /nope HTTP/1.1\r\n\r\n", true), 404);
        assert_eq!(status("GET /healthz SPDY/3\r\n\r\n", true), 505);
        assert_eq!(status("garbage\r\n\r\n", true), 400);
    }

    #[test]
    fn head_has_length_but_no_body() {
        let r = respond("HEAD /healthz HTTP/1.1\r\n\r\n", true, &Metrics::default());
        let bytes = String::from_utf8(r.into_bytes()).unwrap();
        assert!(
            bytes.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{bytes}"
        );
    }
}
