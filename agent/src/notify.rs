//! systemd readiness and watchdog notifications (`sd_notify(3)`), written out by hand.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket named in `$NOTIFY_SOCKET`; a
//! name starting with `@` is a Linux abstract socket. Outside systemd the variable is unset and every
//! call is a no-op, so the agent can call these unconditionally.
//!
//! ```no_run
//! # async fn demo(shutdown: tokio_util::sync::CancellationToken) -> Result<(), weft::notify::NotifyError> {
//! let notifier = weft::notify::Notifier::from_env()?;
//! tokio::spawn({ let n = notifier.clone(); async move { n.run_watchdog(shutdown).await } });
//! notifier.status("waiting for the network config in etcd")?;
//! // ... subnet file written, datapath programmed ...
//! notifier.ready("datapath kernel on eth0, 2 peers, subnet 10.1.10.0/24")?;
//! // ... on SIGTERM or SIGINT, and only then:
//! notifier.stopping("stopping: lease and datapath stay for the next start")?;
//! # Ok(()) }
//! ```
//!
//! What systemd does with each message, and so when the agent may send it: `READY=1` ends
//! `activating` (once); `STATUS=` is the `Status:` line of `systemctl status`; `WATCHDOG=1` resets the
//! `WatchdogSec=` timer, so it is sent only when `$WATCHDOG_USEC` asks for it; `STOPPING=1` moves
//! the unit to `deactivating` and starts `TimeoutStopSec=`, after which systemd SIGKILLs everything,
//! so it is sent only when the agent is really about to exit. weft has no reload, so it never sends
//! `RELOADING=1`.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={value:?} is not a usable socket address: {source}")]
    Address {
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WATCHDOG_USEC={value:?} is not a positive number of microseconds")]
    WatchdogUsec { value: String },
    #[error("create a unix datagram socket for sd_notify: {source}")]
    Socket {
        #[source]
        source: std::io::Error,
    },
    #[error("send {message:?} to systemd at NOTIFY_SOCKET={socket:?}: {source}; is the unit Type=notify with NotifyAccess=main?")]
    Send {
        message: String,
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Target {
    name: String,
    addr: SocketAddr,
    socket: UnixDatagram,
}

/// Sends notifications to systemd, or nothing when not started by systemd. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Read `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` from the environment.
    pub fn from_env() -> Result<Self, NotifyError> {
        let var = |k| std::env::var(k).ok();
        Self::from_vars(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
        )
    }

    /// Like [`Notifier::from_env`] with the values given explicitly. The watchdog applies only when
    /// `watchdog_pid` is unset or names this process, as sd_watchdog_enabled(3) specifies.
    pub fn from_vars(
        notify_socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Result<Self, NotifyError> {
        let target = match notify_socket.filter(|s| !s.is_empty()) {
            None => None,
            Some(name) => Some(Arc::new(Target {
                name: name.to_owned(),
                addr: parse_address(name)?,
                socket: UnixDatagram::unbound().map_err(|source| NotifyError::Socket { source })?,
            })),
        };
        let for_us = watchdog_pid.is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog = match watchdog_usec.filter(|_| for_us) {
            None => None,
            Some(v) => match v.trim().parse::<u64>() {
                Ok(us) if us > 0 => Some(Duration::from_micros(us)),
                _ => {
                    return Err(NotifyError::WatchdogUsec {
                        value: v.to_owned(),
                    })
                }
            },
        };
        Ok(Self { target, watchdog })
    }

    /// True when started by systemd with a notification socket.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog timeout systemd expects us to beat, if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Startup is complete (subnet file written, datapath programmed), with the status line that
    /// says so in the same datagram, so `systemctl status` never shows `active` with a stale status.
    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("READY=1\n{}", status_line(status)))
    }

    /// One line of free text shown by `systemctl status`.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        self.send(&status_line(text))
    }

    /// The agent is exiting because it was asked to (SIGTERM, SIGINT); never sent otherwise, as
    /// systemd would then wait for an exit that does not come and SIGKILL the agent.
    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("STOPPING=1\n{}", status_line(status)))
    }

    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// Send `WATCHDOG=1` at half the watchdog timeout until `shutdown` fires. Returns at once when no
    /// watchdog is configured. Send failures are logged and retried on the next tick.
    pub async fn run_watchdog(&self, shutdown: CancellationToken) {
        let Some(timeout) = self.watchdog.filter(|_| self.enabled()) else {
            return;
        };
        let mut tick = tokio::time::interval(timeout / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.watchdog() {
                        tracing::warn!(error = %e, "systemd watchdog ping failed");
                    }
                }
            }
        }
    }

    /// Send raw `KEY=VALUE` lines; a no-op without `$NOTIFY_SOCKET`.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some(t) = &self.target else { return Ok(()) };
        t.socket
            .send_to_addr(message.as_bytes(), &t.addr)
            .map(drop)
            .map_err(|source| NotifyError::Send {
                message: message.to_owned(),
                socket: t.name.clone(),
                source,
            })
    }
}

fn status_line(text: &str) -> String {
    // A newline would start a new KEY=VALUE assignment.
    format!("STATUS={}", text.replace('\n', " "))
}

fn parse_address(name: &str) -> Result<SocketAddr, NotifyError> {
    let addr = match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
        None if name.starts_with('/') => SocketAddr::from_pathname(name),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "expected an absolute path or an abstract name starting with '@'",
        )),
    };
    addr.map_err(|source| NotifyError::Address {
        value: name.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_systemd_is_a_noop() {
        let n = Notifier::from_vars(None, None, None).unwrap();
        assert!(!n.enabled());
        n.ready("ready").unwrap();
    }

    #[test]
    fn rejects_bad_values() {
        assert!(matches!(
            Notifier::from_vars(Some("relative"), None, None),
            Err(NotifyError::Address { .. })
        ));
        assert!(matches!(
            Notifier::from_vars(None, Some("soon"), None),
            Err(NotifyError::WatchdogUsec { .. })
        ));
        assert!(matches!(
            Notifier::from_vars(None, Some("0"), None),
            Err(NotifyError::WatchdogUsec { .. })
        ));
    }

    #[test]
    fn watchdog_only_for_our_pid() {
        let ours = std::process::id().to_string();
        let n = Notifier::from_vars(None, Some("2000000"), Some(&ours)).unwrap();
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(2)));
        let n = Notifier::from_vars(None, Some("2000000"), Some("1")).unwrap();
        assert_eq!(n.watchdog_timeout(), None);
    }
}
