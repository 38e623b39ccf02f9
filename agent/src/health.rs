//! `/healthz`, `/readyz` and `/metrics`: axum routes served by hyper over HTTP/1.1.
//!
//! - `/healthz`: 200 while the process is alive (flanneld's meaning).
//! - `/readyz`: 200 once the run loop has set the readiness `watch` to `true` (subnet file written and
//!   datapath programmed), 503 before and whenever it goes back to `false`.
//! - `/metrics`: [`Metrics::render`].
//!
//! The accept loop is ours rather than `axum::serve`'s so each connection gets a header read
//! timeout (idle probers cannot pile up) and shutdown drops connections instead of waiting on them.
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

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, Metrics};

/// A client that has not sent its request headers by then is dropped.
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
    router: Router,
}

#[derive(Clone)]
struct Shared {
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
            router: router(Shared { ready, metrics }),
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
                        let service = TowerToHyperService::new(self.router.clone());
                        conns.spawn(async move {
                            let served = hyper::server::conn::http1::Builder::new()
                                .timer(TokioTimer::new())
                                .header_read_timeout(READ_TIMEOUT)
                                // One request per connection, as probers and scrapers use them;
                                // nothing idles after the answer.
                                .keep_alive(false)
                                // Header names as the old hand-written server sent them.
                                .title_case_headers(true)
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                            if let Err(e) = served {
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

fn router(shared: Shared) -> Router {
    // GET routes answer HEAD too (without the body); any other method gets 405 with a hint.
    let route = |r: MethodRouter<Shared>| {
        r.fallback(|| async { (StatusCode::METHOD_NOT_ALLOWED, text("GET or HEAD only\n")) })
    };
    Router::new()
        .route("/healthz", route(get(|| async { text("ok\n") })))
        .route("/readyz", route(get(readyz)))
        .route("/metrics", route(get(metrics)))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                text("try /healthz, /readyz or /metrics\n"),
            )
        })
        .with_state(shared)
}

fn text(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn readyz(State(s): State<Shared>) -> Response {
    if *s.ready.borrow() {
        return text("ok\n");
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        text("not ready: subnet file or datapath not in place yet\n"),
    )
        .into_response()
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Send one raw request over loopback and return the whole response.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_methods_and_head() {
        let (ready_tx, ready) = watch::channel(false);
        let server = HealthServer::bind("127.0.0.1:0".parse().unwrap(), ready, Arc::default())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(shutdown.clone()));
        let status = |path: &'static str, method: &'static str| async move {
            let r = exchange(
                addr,
                &format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
            )
            .await;
            r.split(' ').nth(1).unwrap_or_default().to_string()
        };
        assert_eq!(status("/healthz", "GET").await, "200");
        assert_eq!(status("/readyz", "GET").await, "503");
        ready_tx.send_replace(true);
        assert_eq!(status("/readyz?verbose", "GET").await, "200");
        assert_eq!(status("/healthz", "POST").await, "405");
        assert_eq!(status("/nope", "GET").await, "404");
        let head = exchange(addr, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            head.contains("Content-Length: 3\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let garbage = exchange(addr, "garbage\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        shutdown.cancel();
        task.await.unwrap();
    }
}
