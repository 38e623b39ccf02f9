//! A "container": a network namespace wired to a host's `docker0` exactly as Docker does with
//! `--bip`/`--mtu`: a veth whose host end (`vethXXXXXXX`) is a docker0 port and whose other end is
//! `eth0`, addressed from the host's subnet with a default route via docker0's address.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::netns::Netns;

/// How long one side of a TCP transfer waits for the other.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(20);

/// A container; clones share the namespace, which is deleted when the last clone drops.
#[derive(Clone, Debug)]
pub struct Container {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    netns: Netns,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    host_netns: String,
    host_veth: String,
}

/// What a checked TCP transfer saw.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Bytes received, all equal to the bytes sent.
    pub bytes: usize,
    /// The sender's address as the receiver saw it (the container's own IP unless something NATs).
    pub peer: SocketAddr,
    pub elapsed: Duration,
}

impl Container {
    /// Create namespace `name` and wire it to `docker0` of `host` with address `ip/prefix_len`,
    /// default route via `gateway`, MTU `mtu`; `host_veth` names the host end.
    pub(crate) async fn create(
        name: &str,
        host: &Netns,
        host_veth: &str,
        ip: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        mtu: u32,
    ) -> anyhow::Result<Container> {
        let netns = Netns::create(name).await?;
        let mtu = mtu.to_string();
        host.ip(&[
            "link", "add", host_veth, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns",
            name,
        ])
        .await?;
        host.ip(&["link", "set", host_veth, "master", "docker0", "up"])
            .await?;
        netns
            .ip(&["link", "set", "eth0", "mtu", &mtu, "up"])
            .await?;
        netns
            .ip(&["addr", "add", &format!("{ip}/{prefix_len}"), "dev", "eth0"])
            .await?;
        netns
            .ip(&["route", "add", "default", "via", &gateway.to_string()])
            .await?;
        let inner = Inner {
            netns,
            ip,
            gateway,
            host_netns: host.name().to_owned(),
            host_veth: host_veth.to_owned(),
        };
        Ok(Container {
            inner: Arc::new(inner),
        })
    }

    /// Leave the namespace in place after the last handle drops (the demo's keep mode).
    pub fn keep(&self) {
        self.inner.netns.keep();
    }

    /// The container's address on eth0.
    pub fn ip(&self) -> Ipv4Addr {
        self.inner.ip
    }

    /// Its default gateway: the host's docker0 address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.inner.gateway
    }

    /// The container's namespace name.
    pub fn netns(&self) -> &str {
        self.inner.netns.name()
    }

    /// The host end of its veth (a docker0 port in the host namespace).
    pub fn host_veth(&self) -> &str {
        &self.inner.host_veth
    }

    /// Run `argv` inside the container; its output whatever the exit status.
    pub async fn exec(&self, argv: &[&str]) -> Output {
        self.inner.netns.exec(argv).await
    }

    /// Run `argv` inside the container; stdout, or an error with its output.
    pub async fn exec_ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        self.inner.netns.exec_ok(argv).await
    }

    /// Give eth0 the IPv6 address `ip/prefix_len` and a default IPv6 route via `gateway` (the
    /// host's docker0 IPv6 address), as Docker does with `--ipv6 --fixed-cidr-v6`.
    pub async fn add_ipv6(
        &self,
        ip: std::net::Ipv6Addr,
        prefix_len: u8,
        gateway: std::net::Ipv6Addr,
    ) -> anyhow::Result<()> {
        let netns = &self.inner.netns;
        netns
            .ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/{prefix_len}"),
                "dev",
                "eth0",
                "nodad",
            ])
            .await?;
        netns
            .ip(&["-6", "route", "add", "default", "via", &gateway.to_string()])
            .await?;
        Ok(())
    }

    /// One ICMP echo (or ICMPv6 echo, `ping -6`, for an IPv6 address) to `ip`, answered within
    /// 2 s, or an error with ping's output.
    pub async fn ping(&self, ip: impl Into<std::net::IpAddr>) -> anyhow::Result<()> {
        let ip = ip.into();
        let family = if ip.is_ipv6() { "-6" } else { "-4" };
        let out = self
            .exec(&["ping", family, "-n", "-c", "1", "-W", "2", &ip.to_string()])
            .await;
        if !out.status.success() {
            bail!(
                "ping {ip} from container {} ({}, host {}) failed ({}):\n{}{}",
                self.netns(),
                self.ip(),
                self.inner.host_netns,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `count` echoes to `ip` 20 ms apart (`ping -q -i 0.02`, 2 s for the last answer): how many
    /// were answered, or an error with ping's output when not all were.
    pub async fn ping_burst(
        &self,
        ip: impl Into<std::net::IpAddr>,
        count: u32,
    ) -> anyhow::Result<u32> {
        let ip = ip.into();
        let family = if ip.is_ipv6() { "-6" } else { "-4" };
        let (n, to) = (count.to_string(), ip.to_string());
        let argv = [
            "ping", family, "-n", "-q", "-c", &n, "-i", "0.02", "-W", "2", &to,
        ];
        let out = self.exec(&argv).await;
        let text = String::from_utf8_lossy(&out.stdout);
        match ping_summary(&text) {
            Some((_, received)) if received == count && out.status.success() => Ok(received),
            _ => bail!(
                "{count} pings {ip} from container {}: {}{}",
                self.netns(),
                text,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Ping `ip` until it answers or `timeout` passes (then the last ping's error).
    pub async fn ping_until(
        &self,
        ip: impl Into<std::net::IpAddr>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let ip = ip.into();
        let deadline = Instant::now() + timeout;
        loop {
            match self.ping(ip).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("no answer within {timeout:?}")))
                }
                // Pacing between two tries; the deadline decides.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Send `bytes` pseudo-random bytes over one TCP connection from this container to `to`, and
    /// check on the receiving side that every byte arrived intact and in order. The sockets are
    /// opened by threads that joined the two namespaces; no tool in the container is needed.
    pub async fn tcp_transfer(&self, to: &Container, bytes: usize) -> anyhow::Result<Transfer> {
        to.tcp_transfer_from(&self.inner.netns, self.ip(), bytes)
            .await
    }

    /// [`Container::tcp_transfer`] to this container from any namespace (a host's own, say);
    /// `seed` picks the byte pattern (the sender's address by convention).
    pub async fn tcp_transfer_from(
        &self,
        from: &Netns,
        seed: Ipv4Addr,
        bytes: usize,
    ) -> anyhow::Result<Transfer> {
        let to = self;
        let data: Arc<[u8]> = pattern(bytes, u32::from(seed) ^ u32::from(to.ip())).into();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (to_ip, expected) = (to.ip(), data.clone());
        let server = to.inner.netns.spawn_thread(move || {
            let listener =
                TcpListener::bind((to_ip, 0)).with_context(|| format!("listen on {to_ip}"))?;
            port_tx
                .send(listener.local_addr()?.port())
                .context("hand the port to the sender")?;
            let (mut stream, peer) = accept(&listener)?;
            stream.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
            let mut got = Vec::with_capacity(expected.len());
            stream
                .read_to_end(&mut got)
                .with_context(|| format!("receive from {peer}"))?;
            check_same(&expected, &got)?;
            Ok((got.len(), peer))
        });
        let port =
            tokio::task::spawn_blocking(move || port_rx.recv_timeout(Duration::from_secs(5)))
                .await?
                .context("the receiver did not start listening")?;
        let dest = SocketAddr::V4(SocketAddrV4::new(to.ip(), port));
        let start = Instant::now();
        let client = from.spawn_thread(move || {
            let mut stream = TcpStream::connect_timeout(&dest, TRANSFER_TIMEOUT)
                .with_context(|| format!("connect to {dest}"))?;
            stream.set_write_timeout(Some(TRANSFER_TIMEOUT))?;
            stream
                .write_all(&data)
                .with_context(|| format!("send {} bytes to {dest}", data.len()))?;
            stream.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        });
        let (sent, received) =
            tokio::task::spawn_blocking(move || (client.join(), server.join())).await?;
        let what = format!("TCP transfer of {bytes} bytes {} -> {dest}", from.name());
        sent.map_err(|_| anyhow::anyhow!("{what}: sender thread panicked"))?
            .with_context(|| what.clone())?;
        let (bytes, peer) = received
            .map_err(|_| anyhow::anyhow!("{what}: receiver thread panicked"))?
            .with_context(|| what.clone())?;
        Ok(Transfer {
            bytes,
            peer,
            elapsed: start.elapsed(),
        })
    }
}

fn accept(listener: &TcpListener) -> anyhow::Result<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                return Ok((stream, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                // Pacing between two looks; the deadline decides.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("no connection arrived"),
        }
    }
}

fn check_same(sent: &[u8], got: &[u8]) -> anyhow::Result<()> {
    if let Some(at) = sent.iter().zip(got).position(|(a, b)| a != b) {
        bail!(
            "byte {at} differs: sent {:#04x}, received {:#04x}",
            sent[at],
            got[at]
        );
    }
    if sent.len() != got.len() {
        bail!("sent {} bytes, received {}", sent.len(), got.len());
    }
    Ok(())
}

/// Reproducible pseudo-random bytes (xorshift32), so corruption cannot hide in a repeating pattern.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A finished ping's (transmitted, received) and its whole output (stdout, then stderr);
/// (0, 0) when it printed no summary.
pub fn ping_outcome(out: &Output) -> (u32, u32, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (sent, received) = ping_summary(&text).unwrap_or((0, 0));
    (sent, received, text)
}

/// ping's summary line, "21 packets transmitted, 21 received, 0% packet loss, ...", as
/// (transmitted, received); `None` when `text` has no summary.
pub fn ping_summary(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let count = |what: &str| -> Option<u32> {
        line.split(',')
            .find(|part| part.contains(what))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((count("transmitted")?, count("received")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ping_summary_reads_transmitted_and_received() {
        let text = "PING 10.1.2.3\n\n--- 10.1.2.3 ping statistics ---\n21 packets transmitted, 19 received, 9.5% packet loss, time 2115ms\n";
        assert_eq!(super::ping_summary(text), Some((21, 19)));
        assert_eq!(
            super::ping_summary("ping: connect: Network is unreachable\n"),
            None
        );
    }

    use super::*;

    #[test]
    fn transfer_check_names_the_first_bad_byte() {
        let sent = pattern(1000, 7);
        assert!(check_same(&sent, &sent).is_ok());
        let mut bad = sent.clone();
        bad[500] ^= 1;
        assert!(check_same(&sent, &bad)
            .unwrap_err()
            .to_string()
            .starts_with("byte 500 differs"));
        assert!(check_same(&sent, &sent[..999])
            .unwrap_err()
            .to_string()
            .contains("received 999"));
    }
}
