//! A ping running in the background between two containers, stopped when the test is done with
//! it: for "no packet lost while X happened" checks whose length is not known in advance.

use std::process::Stdio;

use anyhow::Context as _;

use crate::container::{ping_summary, Container};

/// `ping -n -q -i <interval> -W 1` from one container to another, until [`Pinger::finish`].
pub struct Pinger {
    child: tokio::process::Child,
    what: String,
}

/// What a [`Pinger`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingCount {
    /// "10.1.5.2 -> 10.1.26.2"
    pub what: String,
    pub sent: u32,
    pub received: u32,
}

impl Pinger {
    /// Start pinging `to` from `from` every `interval` seconds (0.05 = 20/s; below 0.2 needs root).
    pub fn start(from: &Container, to: &Container, interval: &str) -> anyhow::Result<Pinger> {
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", from.netns(), "ping", "-n", "-q"])
            .args(["-i", interval, "-W", "1"])
            .arg(to.ip().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("run ping (iputils-ping)")?;
        Ok(Pinger {
            child,
            what: format!("{} -> {}", from.ip(), to.ip()),
        })
    }

    /// SIGINT (ping prints its summary and exits), then what it counted.
    pub async fn finish(self) -> anyhow::Result<PingCount> {
        let pid = self.child.id().context("ping already exited")?;
        // SAFETY: kill(2) on our own child, not yet reaped (`ip netns exec` execs ping in place).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        let out = self
            .child
            .wait_with_output()
            .await
            .context("wait for ping")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (sent, received) = ping_summary(&text).with_context(|| {
            format!(
                "ping {} printed no summary: {text}{}",
                self.what,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(PingCount {
            what: self.what,
            sent,
            received,
        })
    }
}
