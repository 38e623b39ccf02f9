//! The measurements, run between two endpoints (containers, or a host's own namespace): iperf3
//! for TCP throughput and 64-byte UDP, sockperf ping-pong for TCP request/response (over IPv6
//! [`ping_pong`], since Debian 12's sockperf 3.7 refuses IPv6 addresses), process CPU times for
//! CPU per GB.
//!
//! Every tool runs inside the endpoints' namespaces (`ip netns exec`, or a thread that joined
//! one); nothing here touches the root namespace's network.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Deserialize;
use weft_tests::Host;

use crate::bench::topology::Family;

const IPERF_PORT: &str = "5201";
const SOCKPERF_PORT: &str = "11111";
/// The tests of a round (`--tests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Test {
    /// TCP 1 stream, and the CPU per GB it cost.
    Tcp1,
    Tcp4,
    /// TCP request/response: p50, p99 and transactions per second.
    Rr,
    Udp64,
    /// From host 1's own namespace to the remote container: TCP 1 stream and RR p50.
    Host,
}

impl Test {
    pub const ALL: [Test; 5] = [Test::Tcp1, Test::Tcp4, Test::Rr, Test::Udp64, Test::Host];
}

/// sockperf ping-pong message size (bytes of TCP payload each way).
pub const RR_MESSAGE_BYTES: usize = 64;
/// UDP payload size of the packet-rate test.
pub const UDP_PAYLOAD_BYTES: usize = 64;

/// One iperf3 TCP run as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpRun {
    pub gbps: f64,
    /// Bytes the receiver got.
    pub bytes: u64,
    pub seconds: f64,
    /// CPU seconds: iperf3 client + server (their getrusage) plus ksoftirqd threads.
    pub cpu_seconds: f64,
}

/// One 64-byte UDP run: packets the receiver got.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpRun {
    pub received: u64,
    pub seconds: f64,
}

impl UdpRun {
    pub fn pps(&self) -> f64 {
        self.received as f64 / self.seconds
    }
}

/// One sockperf ping-pong run (round-trip times).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RrRun {
    pub p50_us: f64,
    pub p99_us: f64,
    pub tps: f64,
}

/// Where a tool runs: a namespace and the address its peer reaches it at.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub netns: String,
    pub ip: IpAddr,
}

impl Endpoint {
    pub fn at(netns: &str, ip: IpAddr) -> Endpoint {
        Endpoint {
            netns: netns.to_owned(),
            ip,
        }
    }

    /// A host's own namespace, at its underlay address in `family`.
    pub fn host(h: &Host, family: Family) -> Endpoint {
        Endpoint::at(h.name(), family.ens32_ip(h))
    }

    fn command(&self, argv: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).args(argv);
        cmd
    }

    async fn exec(&self, argv: &[&str]) -> Output {
        match self.command(argv).output().await {
            Ok(out) => out,
            Err(e) => Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
                stdout: Vec::new(),
                stderr: format!("run {}: {e}", argv.join(" ")).into_bytes(),
            },
        }
    }

    /// `net.ipv4.tcp_congestion_control` in this endpoint's namespace: set it when `set` names
    /// one, and say what it is.
    pub async fn congestion_control(&self, set: Option<&str>) -> anyhow::Result<String> {
        const KEY: &str = "net.ipv4.tcp_congestion_control";
        if let Some(cc) = set {
            self.exec_ok(&["sysctl", "-qw", &format!("{KEY}={cc}")])
                .await
                .with_context(|| {
                    format!("--congestion-control {cc}: not one this kernel has (see net.ipv4.tcp_available_congestion_control)")
                })?;
        }
        Ok(self
            .exec_ok(&["sysctl", "-n", KEY])
            .await?
            .trim()
            .to_owned())
    }

    async fn exec_ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(argv).await;
        if !out.status.success() {
            bail!(
                "`{}` in {} failed ({}): {}{}",
                argv.join(" "),
                self.netns,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A process kept running inside a container for the life of a test bed (sockperf's server).
pub struct Daemon {
    child: tokio::process::Child,
    what: String,
}

impl Daemon {
    fn spawn(c: &Endpoint, argv: &[&str]) -> anyhow::Result<Daemon> {
        let what = format!("{} (in {})", argv.join(" "), c.netns);
        let child = c
            .command(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {what}"))?;
        Ok(Daemon { child, what })
    }

    /// An error with the daemon's stderr when it has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status})", self.what);
        }
        Ok(())
    }
}

/// The servers on the receiving container: sockperf's for IPv4; none for IPv6, where each
/// [`ping_pong`] brings its own.
pub struct Servers {
    sockperf: Option<Daemon>,
}

impl Servers {
    pub async fn start(server: &Endpoint) -> anyhow::Result<Servers> {
        if server.ip.is_ipv6() {
            return Ok(Servers { sockperf: None });
        }
        let ip = server.ip.to_string();
        let sockperf = Daemon::spawn(
            server,
            &[
                "sockperf",
                "server",
                "--tcp",
                "-i",
                &ip,
                "-p",
                SOCKPERF_PORT,
            ],
        )?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut sockperf = sockperf;
        sockperf.check_running()?;
        Ok(Servers {
            sockperf: Some(sockperf),
        })
    }
}

/// TCP throughput from `client` to `server` with `streams` parallel streams for `secs` seconds.
pub async fn tcp(
    client: &Endpoint,
    server: &Endpoint,
    streams: usize,
    secs: u64,
) -> anyhow::Result<TcpRun> {
    let streams = streams.to_string();
    let secs_arg = secs.to_string();
    let before = softirq_thread_ticks();
    let json = iperf3(client, server, &["-P", &streams, "-t", &secs_arg]).await?;
    let softirq = softirq_thread_ticks().saturating_sub(before) as f64 / clock_ticks_per_second();
    let mut run = parse_iperf_tcp(&json)
        .with_context(|| format!("read iperf3's TCP report:\n{}", head(&json)))?;
    run.cpu_seconds += softirq;
    Ok(run)
}

/// 64-byte UDP at full rate (`-b 0`) from `client` to `server`: what the receiver got.
pub async fn udp64(client: &Endpoint, server: &Endpoint, secs: u64) -> anyhow::Result<UdpRun> {
    let len = UDP_PAYLOAD_BYTES.to_string();
    let secs = secs.to_string();
    let json = iperf3(client, server, &["-u", "-l", &len, "-b", "0", "-t", &secs]).await?;
    parse_iperf_udp(&json).with_context(|| format!("read iperf3's UDP report:\n{}", head(&json)))
}

/// TCP ping-pong (one 64-byte message in flight) from `client` to the sockperf server, or over
/// IPv6 to a [`ping_pong`] server.
pub async fn rr(
    client: &Endpoint,
    server: &Endpoint,
    servers: &mut Servers,
    secs: u64,
) -> anyhow::Result<RrRun> {
    let Some(sockperf) = servers.sockperf.as_mut() else {
        return ping_pong(client, server, secs).await;
    };
    sockperf.check_running()?;
    let ip = server.ip.to_string();
    let secs = secs.to_string();
    let size = RR_MESSAGE_BYTES.to_string();
    let argv = [
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &ip,
        "-p",
        SOCKPERF_PORT,
        "-t",
        &secs,
        "-m",
        &size,
        "--full-rtt",
    ];
    let text = client
        .exec_ok(&argv)
        .await
        .context("run sockperf ping-pong")?;
    parse_sockperf(&text).with_context(|| format!("read sockperf's output:\n{text}"))
}

/// Run an iperf3 client against a one-off server (`-s -1`) started for this test, so a test that
/// went wrong never leaves a server in a bad state for the next one. JSON output (`-J`).
async fn iperf3(client: &Endpoint, server: &Endpoint, args: &[&str]) -> anyhow::Result<String> {
    let ip = server.ip.to_string();
    let mut daemon = Daemon::spawn(server, &["iperf3", "-s", "-1", "-B", &ip, "-p", IPERF_PORT])?;
    let mut argv = vec!["iperf3", "-c", &ip, "-p", IPERF_PORT, "-J"];
    argv.extend_from_slice(args);
    let mut last = String::new();
    for _ in 0..20 {
        let out = client.exec(&argv).await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        last = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        // Connection refused (iperf3 -J may still exit 0): the server has not bound its port yet.
        let refused = last.contains("Connection refused");
        if out.status.success() && !refused {
            // The one-off server exits by itself; wait so the next test can bind the port.
            let _ = tokio::time::timeout(Duration::from_secs(5), daemon.child.wait()).await;
            return Ok(stdout);
        }
        if !refused {
            break;
        }
        daemon.check_running()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "iperf3 {} from {} to {ip} failed:\n{}",
        args.join(" "),
        client.ip,
        head(&last)
    )
}

/// sockperf's warm-up before its valid period: round trips in it are not counted.
const WARM_UP: Duration = Duration::from_millis(400);
/// How long a ping-pong end waits for the other (connect, accept, each message) before it gives
/// up: the overlay is down, not slow.
const PING_PONG_PATIENCE: Duration = Duration::from_secs(5);

/// sockperf's `ping-pong --tcp -m 64 --full-rtt`, done by two threads that joined the endpoints'
/// namespaces: one 64-byte message in flight on one TCP_NODELAY connection for `secs` seconds;
/// round trips after a 400 ms warm-up (sockperf's default) timed one by one. Blocking reads and
/// writes as sockperf's default mode makes them.
pub async fn ping_pong(client: &Endpoint, server: &Endpoint, secs: u64) -> anyhow::Result<RrRun> {
    let (client, server) = (client.clone(), server.clone());
    let what = format!("TCP ping-pong {} -> {}", client.ip, server.ip);
    let run = tokio::task::spawn_blocking(move || {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let echo = {
            let server = server.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                weft_tests::netns::join(&server.netns)?;
                let listener = TcpListener::bind(SocketAddr::new(server.ip, 0))
                    .with_context(|| format!("listen on {} in {}", server.ip, server.netns))?;
                port_tx.send(listener.local_addr()?.port())?;
                let mut conn = accept_within(&listener, PING_PONG_PATIENCE)?;
                echo_messages(&mut conn)
            })
        };
        let Ok(port) = port_rx.recv_timeout(PING_PONG_PATIENCE) else {
            // Its error says why (it ends at once when it cannot listen).
            return match echo.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("the ping-pong server never listened")),
            };
        };
        let timer = std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
            weft_tests::netns::join(&client.netns)?;
            let to = SocketAddr::new(server.ip, port);
            let mut conn = TcpStream::connect_timeout(&to, PING_PONG_PATIENCE)
                .with_context(|| format!("connect to {to} from {}", client.netns))?;
            time_round_trips(&mut conn, Duration::from_secs(secs))
        });
        let rtts = timer
            .join()
            .map_err(|_| anyhow::anyhow!("the ping-pong client panicked"))?;
        let echoed = echo
            .join()
            .map_err(|_| anyhow::anyhow!("the ping-pong server panicked"))?;
        let rtts = rtts?;
        echoed?;
        Ok::<_, anyhow::Error>(rtts)
    })
    .await
    .context("join the ping-pong threads")?
    .with_context(|| what.clone())?;
    let valid = secs as f64 - WARM_UP.as_secs_f64().min(secs as f64 / 2.0);
    summarize_round_trips(run, valid).with_context(|| what)
}

/// The first connection within `patience` (the listener polled: a blocking accept would outlive
/// a client that never came).
fn accept_within(listener: &TcpListener, patience: Duration) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + patience;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("no ping-pong client connected"),
        }
    }
}

/// The server's side: every message back as it came, until the client closes.
fn echo_messages(conn: &mut TcpStream) -> anyhow::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(PING_PONG_PATIENCE))?;
    let mut msg = [0u8; RR_MESSAGE_BYTES];
    loop {
        match conn.read_exact(&mut msg) {
            Ok(()) => conn.write_all(&msg).context("echo a message")?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("read a message"),
        }
    }
}

/// The client's side: round trips for `length`, the ones after the warm-up returned.
fn time_round_trips(conn: &mut TcpStream, length: Duration) -> anyhow::Result<Vec<Duration>> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(PING_PONG_PATIENCE))?;
    let warm_up = WARM_UP.min(length / 2);
    let start = Instant::now();
    let mut msg = [0x5au8; RR_MESSAGE_BYTES];
    let mut rtts = Vec::new();
    loop {
        let sent = Instant::now();
        if sent - start >= length {
            return Ok(rtts);
        }
        conn.write_all(&msg).context("send a message")?;
        conn.read_exact(&mut msg).context("read the echo")?;
        if sent - start >= warm_up {
            rtts.push(sent.elapsed());
        }
    }
}

/// p50 and p99 (nearest rank) of the round trips, and round trips per second of the `valid`
/// seconds they took.
pub fn summarize_round_trips(mut rtts: Vec<Duration>, valid: f64) -> anyhow::Result<RrRun> {
    if rtts.is_empty() || valid <= 0.0 {
        bail!("no round trip completed after the warm-up");
    }
    rtts.sort();
    let at = |p: f64| {
        let rank = (p * rtts.len() as f64).ceil() as usize;
        rtts[rank.clamp(1, rtts.len()) - 1].as_secs_f64() * 1e6
    };
    Ok(RrRun {
        p50_us: at(0.50),
        p99_us: at(0.99),
        tps: rtts.len() as f64 / valid,
    })
}

fn head(text: &str) -> String {
    text.lines().take(40).collect::<Vec<_>>().join("\n")
}

#[derive(Deserialize)]
struct IperfReport {
    #[serde(default)]
    error: Option<String>,
    end: IperfEnd,
}

#[derive(Deserialize)]
struct IperfEnd {
    #[serde(default)]
    sum: Option<IperfSum>,
    #[serde(default)]
    sum_received: Option<IperfSum>,
    cpu_utilization_percent: Option<IperfCpu>,
}

#[derive(Deserialize)]
struct IperfSum {
    seconds: f64,
    bytes: u64,
    bits_per_second: f64,
    #[serde(default)]
    packets: Option<u64>,
    #[serde(default)]
    lost_packets: Option<i64>,
}

#[derive(Deserialize)]
struct IperfCpu {
    host_total: f64,
    remote_total: f64,
}

fn parse_iperf(json: &str) -> anyhow::Result<IperfReport> {
    let report: IperfReport = serde_json::from_str(json).context("parse iperf3 -J output")?;
    if let Some(e) = &report.error {
        bail!("iperf3 reported: {e}");
    }
    Ok(report)
}

/// Throughput and bytes as received; CPU from both ends' getrusage (percent of the test's time).
pub fn parse_iperf_tcp(json: &str) -> anyhow::Result<TcpRun> {
    let report = parse_iperf(json)?;
    let rx = report
        .end
        .sum_received
        .context("no end.sum_received in iperf3's report")?;
    let cpu = report
        .end
        .cpu_utilization_percent
        .context("no end.cpu_utilization_percent in iperf3's report")?;
    if rx.seconds <= 0.0 || rx.bytes == 0 {
        bail!("the receiver got {} bytes in {} s", rx.bytes, rx.seconds);
    }
    Ok(TcpRun {
        gbps: rx.bits_per_second / 1e9,
        bytes: rx.bytes,
        seconds: rx.seconds,
        cpu_seconds: (cpu.host_total + cpu.remote_total) / 100.0 * rx.seconds,
    })
}

/// Packets the receiver got: sent minus lost (the server's count, reported back to the client).
pub fn parse_iperf_udp(json: &str) -> anyhow::Result<UdpRun> {
    let report = parse_iperf(json)?;
    let sum = report
        .end
        .sum
        .context("no end.sum in iperf3's UDP report")?;
    let (Some(sent), Some(lost)) = (sum.packets, sum.lost_packets) else {
        bail!("no packets/lost_packets in end.sum: not a UDP report");
    };
    let received = u64::try_from(sent as i64 - lost.max(0)).unwrap_or(0);
    if sum.seconds <= 0.0 || received == 0 {
        bail!(
            "the receiver got {received} of {sent} packets in {} s",
            sum.seconds
        );
    }
    Ok(UdpRun {
        received,
        seconds: sum.seconds,
    })
}

/// p50, p99 (round trip, `--full-rtt`) and transactions per second of the valid period.
pub fn parse_sockperf(text: &str) -> anyhow::Result<RrRun> {
    let text = strip_ansi(text);
    let percentile = |p: &str| -> anyhow::Result<f64> {
        let needle = format!("percentile {p} =");
        text.lines()
            .find_map(|l| l.split_once(&needle).map(|(_, v)| v.trim().to_owned()))
            .with_context(|| format!("no `{needle}` line"))?
            .parse()
            .with_context(|| format!("percentile {p} is not a number"))
    };
    let valid = text
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .context("no `[Valid Duration]` line")?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let after = valid
            .split_once(&format!("{name}="))
            .with_context(|| format!("no {name}= in {valid:?}"))?
            .1;
        let num: String = after
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.parse()
            .with_context(|| format!("{name} is not a number in {valid:?}"))
    };
    let runtime = field("RunTime")?;
    let received = field("ReceivedMessages")?;
    if runtime <= 0.0 || received == 0.0 {
        bail!("sockperf exchanged no messages: {valid}");
    }
    Ok(RrRun {
        p50_us: percentile("50.000")?,
        p99_us: percentile("99.000")?,
        tps: received / runtime,
    })
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// CPU ticks (user + system) of every `ksoftirqd/N` thread: packet processing the kernel defers
/// there is charged to no test process. Network work done in a process's own context (the usual
/// case on veth) is already in that process's system time.
fn softirq_thread_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("ksoftirqd/"))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| process_ticks(&stat))
        .sum()
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line.
pub fn process_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum_sent":{"start":0,"end":1.005,"seconds":1.005,"bytes":2056519680,"bits_per_second":16369556657.1,"retransmits":0,"sender":true},
        "sum_received":{"start":0,"end":1.005046,"seconds":1.005046,"bytes":2056519680,"bits_per_second":16369556657.10823,"sender":true},
        "cpu_utilization_percent":{"host_total":43.5,"host_user":0.45,"host_system":43.0,"remote_total":26.5,"remote_user":2.0,"remote_system":24.5}}}"#;

    const UDP: &str = r#"{"start":{},"intervals":[],"end":{"streams":[],
        "sum":{"start":0,"end":1.000285,"seconds":1.000285,"bytes":11151360,"bits_per_second":89202584.2,"jitter_ms":0.038,"lost_packets":116661,"packets":174240,"lost_percent":66.95,"sender":true},
        "sum_received":{"start":0,"end":1.000285,"seconds":1.000285,"bytes":3685056,"bits_per_second":29472048.5,"jitter_ms":0.038,"lost_packets":116661,"packets":174240,"lost_percent":66.95,"sender":false},
        "cpu_utilization_percent":{"host_total":49.5,"host_user":1.3,"host_system":48.2,"remote_total":20.4,"remote_user":2.3,"remote_system":18.1}}}"#;

    const SOCKPERF: &str = "sockperf: \u{1b}[2;35m== version #3.7-no.git == \u{1b}[0m
sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; SentMessages=20387; ReceivedMessages=20386
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=7777; ReceivedMessages=7777
sockperf: \u{1b}[2;35m====> avg-rtt=70.670 (std-dev=537.676)\u{1b}[0m
sockperf: Summary: Round trip is 70.670 usec
sockperf: ---> <MAX> observation = 12598.216
sockperf: ---> percentile 99.000 = 1287.056
sockperf: ---> percentile 90.000 =   42.923
sockperf: ---> percentile 50.000 =   12.809
sockperf: ---> <MIN> observation =   11.687
";

    #[test]
    fn reads_iperf_tcp() {
        let run = parse_iperf_tcp(TCP).unwrap();
        assert!((run.gbps - 16.3695).abs() < 1e-3);
        assert_eq!(run.bytes, 2_056_519_680);
        assert!((run.cpu_seconds - 0.70 * 1.005046).abs() < 1e-9);
    }

    #[test]
    fn reads_iperf_udp_as_received() {
        let run = parse_iperf_udp(UDP).unwrap();
        assert_eq!(run.received, 174_240 - 116_661);
        assert_eq!(run.received * 64, 3_685_056);
        assert!(
            parse_iperf_udp(TCP).is_err(),
            "a TCP report is not a UDP one"
        );
    }

    #[test]
    fn iperf_errors_are_reported() {
        let err = parse_iperf_tcp(
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("Connection refused"));
    }

    #[test]
    fn reads_sockperf_round_trips() {
        let rr = parse_sockperf(SOCKPERF).unwrap();
        assert_eq!(rr.p50_us, 12.809);
        assert_eq!(rr.p99_us, 1287.056);
        assert!((rr.tps - 7777.0 / 0.55).abs() < 1e-6);
        assert!(parse_sockperf("sockperf: error").is_err());
    }

    #[test]
    fn ping_pong_percentiles_are_nearest_rank() {
        let us = |v: u64| Duration::from_micros(v);
        // 1..=200 µs shuffled: p50 is the 100th, p99 the 198th.
        let rtts: Vec<Duration> = (1..=200).rev().map(us).collect();
        let rr = summarize_round_trips(rtts, 0.5).unwrap();
        assert_eq!((rr.p50_us, rr.p99_us), (100.0, 198.0));
        assert_eq!(rr.tps, 400.0);
        let one = summarize_round_trips(vec![us(7)], 1.0).unwrap();
        assert_eq!((one.p50_us, one.p99_us), (7.0, 7.0));
        assert!(summarize_round_trips(Vec::new(), 1.0).is_err());
    }

    #[test]
    fn reads_process_ticks() {
        let stat = "15 (ksoftirqd/1) S 2 0 0 0 -1 69238848 0 0 0 0 7 42 0 0 20 0 1 0 3 0 0";
        assert_eq!(process_ticks(stat), Some(49));
    }
}

/// The IPv6 ping-pong for real, between two namespaces joined by a veth pair (root).
#[cfg(test)]
mod ping_pong_tests {
    use super::*;
    use weft_tests::netns::Netns;

    async fn pair() -> (Netns, Netns) {
        let pid = std::process::id();
        let a = Netns::create(&format!("weft-rr-{pid}-a")).await.unwrap();
        let b = Netns::create(&format!("weft-rr-{pid}-b")).await.unwrap();
        a.add_veth_into("v0", "v1", b.name()).await.unwrap();
        for (ns, dev, ip) in [(&a, "v0", "fd99::1/64"), (&b, "v1", "fd99::2/64")] {
            ns.ip(&["-6", "addr", "add", ip, "dev", dev, "nodad"])
                .await
                .unwrap();
            ns.ip(&["link", "set", dev, "up"]).await.unwrap();
        }
        (a, b)
    }

    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "needs root: run cargo xtask test"]
    async fn ping_pong_times_round_trips_over_ipv6_between_namespaces() {
        let (a, b) = pair().await;
        let client = Endpoint::at(a.name(), "fd99::1".parse().unwrap());
        let server = Endpoint::at(b.name(), "fd99::2".parse().unwrap());
        let rr = ping_pong(&client, &server, 1).await.unwrap();
        // One message in flight: round trips per second cannot beat the fastest half of them.
        assert!(
            rr.p50_us > 0.0 && rr.p50_us <= rr.p99_us && rr.tps > 100.0,
            "{rr:?}"
        );
        assert!(rr.tps <= 1e6 / rr.p50_us * 2.0, "{rr:?}");
        // No server at that address: a clear error, not a hang.
        let nowhere = Endpoint::at(b.name(), "fd99::3".parse().unwrap());
        let err = ping_pong(&client, &nowhere, 1).await.unwrap_err();
        assert!(format!("{err:#}").contains("listen on fd99::3"), "{err:#}");
    }
}
