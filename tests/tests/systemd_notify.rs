//! The sd_notify protocol of a real `weft agent` process, without systemd: the test binds the
//! `NOTIFY_SOCKET` itself and records every datagram, as systemd would receive them, through start,
//! a peer joining, a steady state, SIGTERM and SIGKILL; once without and once with `WATCHDOG_USEC`.
//!
//! What systemd does with them is why the sequence matters: `STOPPING=1` moves the unit to
//! `deactivating` and SIGKILLs the agent after `TimeoutStopSec=` unless it exits, so it may only come
//! on SIGTERM; `WATCHDOG=1` must come more often than `WATCHDOG_USEC` or systemd kills the agent.
//!
//! ```text
//!  switch ns: br0 172.16.15.1/24 (etcd)
//!     |-- host1 ens32 .21 (the agent under test)   host2 ens32 .22 (a peer)
//! ```

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use weft_tests::{cluster, weft_bin, Host};

const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#;
const WATCHDOG: &str = "WATCHDOG=1";
const STOPPING: &str = "STOPPING=1\nSTATUS=stopping: lease and datapath stay for the next start";

/// The systemd end of `NOTIFY_SOCKET`: every datagram with the time it was read.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    received: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> Self {
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("bind the notify socket {}: {e}", path.display()));
        socket.set_nonblocking(true).unwrap();
        NotifySocket {
            socket,
            path,
            received: Vec::new(),
        }
    }

    /// Read what has arrived so far.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(n) => self.received.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => panic!("read the notify socket: {e}"),
            }
        }
    }

    /// Every message but the watchdog pings, in order.
    fn messages(&self) -> Vec<&str> {
        self.received
            .iter()
            .map(|(_, m)| m.as_str())
            .filter(|m| *m != WATCHDOG)
            .collect()
    }

    fn pings(&self) -> Vec<Instant> {
        self.received
            .iter()
            .filter(|(_, m)| m == WATCHDOG)
            .map(|(t, _)| *t)
            .collect()
    }

    /// Poll until `done` holds for what was received; panics with everything received otherwise.
    async fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        agent: &mut AgentProcess,
        done: impl Fn(&Self) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if done(self) {
                return;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the agent exited ({status}) while waiting for {what}; received {:?}\n{}",
                    self.received_text(),
                    agent.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}; received {:?}\n{}",
                self.received_text(),
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn received_text(&self) -> Vec<&str> {
        self.received.iter().map(|(_, m)| m.as_str()).collect()
    }
}

/// `weft agent` in a host, started the way systemd starts it: with `NOTIFY_SOCKET` and, when asked,
/// `WATCHDOG_USEC` in its environment. Killed on drop.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    fn start(host: &Host, socket: &Path, watchdog: Option<Duration>) -> Self {
        let log = host.dir().join("notify-agent.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", host.name()])
            .arg(weft_bin().unwrap())
            .arg("agent")
            .args(host.agent_args())
            .args(["--datapath", "kernel"])
            .env("NOTIFY_SOCKET", socket)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(w) = watchdog {
            cmd.env("WATCHDOG_USEC", w.as_micros().to_string());
        }
        let child = cmd.spawn().expect("start weft agent");
        AgentProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {timeout:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_ready(s: &NotifySocket) -> bool {
    s.messages().iter().any(|m| m.starts_with("READY=1"))
}

/// Start, a peer joining, `steady` of running, SIGTERM; then a second run ended by SIGKILL.
async fn notify_sequence(watchdog: Option<Duration>) {
    let c = cluster(2).await;
    c.write_config(CONFIG).await;
    let host = c.host(0);
    let mut sock = NotifySocket::bind(host.dir().join("notify.sock"));
    let started = Instant::now();
    let mut agent = AgentProcess::start(host, &sock.path, watchdog);

    sock.wait_until("READY=1", Duration::from_secs(30), &mut agent, is_ready)
        .await;
    // READY=1 promises the subnet file: it must be there the moment READY arrives.
    let env = std::fs::read_to_string(host.subnet_file())
        .unwrap_or_else(|e| panic!("READY=1 arrived but {}: {e}", host.subnet_file().display()));
    let subnet = weft_tests::SubnetEnv::parse(&env).unwrap().subnet.trunc();
    let running =
        |peers: &str| format!("STATUS=datapath kernel on ens32, {peers}, subnet {subnet}");
    assert_eq!(
        sock.messages(),
        [
            format!("STATUS=waiting for etcd at {}", host.etcd_endpoint()),
            "STATUS=waiting for the network config at /coreos.com/network/config".into(),
            "STATUS=waiting for a subnet lease in 10.1.0.0/16".into(),
            format!("READY=1\n{}", running("0 peers")),
        ],
        "the start, up to READY=1"
    );

    // A peer joins: the status line follows.
    let _peer = c.host(1).spawn_agent(&["--datapath", "kernel"]).unwrap();
    let one_peer = running("1 peer");
    sock.wait_until(
        "the status line for one peer",
        Duration::from_secs(30),
        &mut agent,
        |s| s.messages().last() == Some(&one_peer.as_str()),
    )
    .await;

    // Steady state: nothing but watchdog pings, and those only when asked for.
    let steady_from = sock.received.len();
    match watchdog {
        Some(timeout) => {
            // 60 pings at half the timeout: 30 watchdog periods, a minute of a 2 s watchdog.
            let pings = 60;
            sock.wait_until(
                &format!("{pings} watchdog pings"),
                timeout * pings as u32,
                &mut agent,
                |s| s.received[steady_from..].len() >= pings,
            )
            .await;
            let times = sock.pings();
            let first_gap = times[0] - started;
            assert!(
                first_gap < timeout,
                "first WATCHDOG=1 {first_gap:?} after the start, watchdog {timeout:?}"
            );
            let worst = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
            assert!(
                worst < timeout,
                "{} pings, longest gap {worst:?}: systemd would have killed the agent (watchdog {timeout:?})",
                times.len()
            );
        }
        None => {
            // As long as the 30 s watchdog the unit ships with: a stray STOPPING=1 shows at once.
            let window = Instant::now() + Duration::from_secs(30);
            while Instant::now() < window {
                sock.drain();
                assert_eq!(agent.child.try_wait().unwrap(), None, "{}", agent.log());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(
                sock.pings().is_empty(),
                "WATCHDOG=1 without WATCHDOG_USEC: {:?}",
                sock.received_text()
            );
        }
    }
    let steady: Vec<&str> = sock.received[steady_from..]
        .iter()
        .map(|(_, m)| m.as_str())
        .filter(|m| *m != WATCHDOG)
        .collect();
    assert!(steady.is_empty(), "steady state sent {steady:?}");

    // SIGTERM: STOPPING=1, then exit 0 at once.
    let before = sock.messages().len();
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(2)).await;
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        agent.log()
    );
    sock.drain();
    assert_eq!(sock.messages()[before..], [STOPPING], "after SIGTERM");

    // SIGKILL: no chance for STOPPING=1, and none was sent before.
    let mut sock = NotifySocket::bind(host.dir().join("notify2.sock"));
    let mut agent = AgentProcess::start(host, &sock.path, watchdog);
    sock.wait_until("READY=1", Duration::from_secs(30), &mut agent, is_ready)
        .await;
    assert_eq!(
        sock.messages().last().copied(),
        Some(format!("READY=1\n{one_peer}").as_str()),
        "restart: same subnet, the peer already there"
    );
    agent.signal(libc::SIGKILL);
    let status = agent.wait_exit(Duration::from_secs(2)).await;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    sock.drain();
    assert!(
        !sock.messages().iter().any(|m| m.contains("STOPPING")),
        "STOPPING=1 without SIGTERM: {:?}",
        sock.received_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn notify_without_watchdog() {
    notify_sequence(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn notify_with_watchdog() {
    notify_sequence(Some(Duration::from_secs(1))).await;
}
