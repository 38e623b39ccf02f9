//! The control-plane benchmark: one agent on one host with N peer leases already in etcd.
//!
//! - start to ready: agent spawned -> subnet file written, and -> a route for every peer;
//! - lease to datapath: a new lease PUT -> its route on flannel.1 in the host (`ip monitor route`,
//!   so nothing polls the kernel while the agent works), one lease at a time;
//! - resident memory: VmRSS (and VmHWM, the peak) of the agent from /proc.
//!
//! The peer leases are only data in etcd, in flanneld's format: their PublicIPs (172.16.100.1, ...)
//! are never contacted, and nothing sends traffic to their subnets.

use std::collections::HashMap;
use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde::Serialize;
use weft_tests::{Cluster, ClusterOptions, Host};

use crate::bench::stats::median;
use crate::bench::Options;

/// A /8 holds far more /24 subnets than the 1000 peers need.
const CONFIG: &str = r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#;
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const LEASE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct ControlPlane {
    pub datapath: String,
    pub peers: usize,
    pub start_to_subnet_file_ms: f64,
    pub start_to_ready_ms: f64,
    pub new_leases: usize,
    pub lease_to_route_p50_ms: f64,
    pub lease_to_route_p99_ms: f64,
    pub lease_to_route_max_ms: f64,
    pub lease_to_route_samples_ms: Vec<f64>,
    pub rss_ready_mb: f64,
    pub rss_end_mb: f64,
    pub rss_peak_mb: f64,
    pub targets: Targets,
}

/// The issue's control-plane targets.
#[derive(Debug, Serialize)]
pub struct Targets {
    pub p99_under_50_ms: bool,
    pub ready_under_1_s: bool,
    pub rss_under_20_mb: bool,
}

pub async fn run(opts: &Options) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for datapath in &opts.cp_datapaths {
        println!(
            "==> control plane, --datapath {datapath}: {} peers, {} new leases",
            opts.peers, opts.new_leases
        );
        let r = run_one(datapath, opts.peers, opts.new_leases)
            .await
            .with_context(|| format!("control-plane benchmark with --datapath {datapath}"))?;
        print(&r);
        results.push(r);
    }
    std::fs::create_dir_all(opts.out_dir())
        .with_context(|| format!("create {}", opts.out_dir().display()))?;
    let path = opts.out_dir().join("control-plane.json");
    let json = serde_json::to_string_pretty(&serde_json::json!({ "control_plane": results }))?;
    std::fs::write(&path, json + "\n").with_context(|| format!("write {}", path.display()))?;
    println!("report: {}", path.display());
    Ok(())
}

async fn run_one(datapath: &str, peers: usize, new_leases: usize) -> anyhow::Result<ControlPlane> {
    let cluster = Cluster::start(ClusterOptions::new(1)).await?;
    cluster.write_config(CONFIG).await;
    let etcd = EtcdWriter::start(&cluster)?;
    let prefix = cluster.prefix().to_owned();
    let t = Instant::now();
    for i in 0..peers {
        etcd.put_lease(&prefix, i)?;
    }
    println!(
        "    {peers} leases written in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let host = cluster.host(0);
    let monitor = RouteMonitor::start(host)?;
    let start = Instant::now();
    let agent = host.spawn_agent(&["--datapath", datapath])?;
    let subnet_file = host.subnet_file();
    let subnet_at = wait_for(READY_TIMEOUT, || subnet_file.exists().then(Instant::now))
        .await
        .with_context(|| {
            format!(
                "no subnet file {}:\n{}",
                subnet_file.display(),
                tail(&agent.log())
            )
        })?;
    let want: Vec<String> = (0..peers).map(peer_subnet).collect();
    let ready_at = wait_for(READY_TIMEOUT, || monitor.all_seen(&want))
        .await
        .with_context(|| {
            format!(
                "the agent programmed {} of {peers} peer routes within {READY_TIMEOUT:?}:\n{}",
                monitor.count_of(&want),
                tail(&agent.log())
            )
        })?;
    let routes = host
        .exec_ok(&["ip", "-4", "route", "show", "dev", "flannel.1"])
        .await?;
    let programmed = routes.lines().filter(|l| l.starts_with("10.")).count();
    if programmed < peers {
        bail!("`ip route show dev flannel.1` lists {programmed} routes, expected {peers}");
    }
    let pid = agent.pid().context("the agent is not running")?;
    let rss_ready = memory_kb(pid, "VmRSS")?;

    let mut latencies = Vec::with_capacity(new_leases);
    for k in 0..new_leases {
        let i = peers + k;
        let subnet = peer_subnet(i);
        let put_at = etcd.put_lease(&prefix, i)?;
        let seen = wait_for(LEASE_TIMEOUT, || monitor.seen(&subnet))
            .await
            .with_context(|| {
                format!(
                    "no route for new lease {subnet} within {LEASE_TIMEOUT:?}:\n{}",
                    tail(&agent.log())
                )
            })?;
        latencies.push(seen.saturating_duration_since(put_at).as_secs_f64() * 1e3);
    }
    let rss_end = memory_kb(pid, "VmRSS")?;
    let rss_peak = memory_kb(pid, "VmHWM")?;
    drop(monitor);
    agent.stop().await.ok();
    drop(etcd);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p99 = percentile(&latencies, 99.0);
    let ready_ms = ms(ready_at.saturating_duration_since(start));
    let rss_mb = |kb: u64| kb as f64 / 1024.0;
    Ok(ControlPlane {
        datapath: datapath.to_owned(),
        peers,
        start_to_subnet_file_ms: ms(subnet_at.saturating_duration_since(start)),
        start_to_ready_ms: ready_ms,
        new_leases,
        lease_to_route_p50_ms: median(&latencies),
        lease_to_route_p99_ms: p99,
        lease_to_route_max_ms: latencies.iter().copied().fold(f64::NAN, f64::max),
        lease_to_route_samples_ms: latencies,
        rss_ready_mb: rss_mb(rss_ready),
        rss_end_mb: rss_mb(rss_end),
        rss_peak_mb: rss_mb(rss_peak),
        targets: Targets {
            p99_under_50_ms: p99 < 50.0,
            ready_under_1_s: ready_ms < 1000.0,
            rss_under_20_mb: rss_mb(rss_peak) < 20.0,
        },
    })
}

fn print(r: &ControlPlane) {
    let ok = |b: bool| if b { "met" } else { "NOT met" };
    println!(
        "    start -> subnet file   {:>8.1} ms\n    start -> {} peers routed {:>8.1} ms   (target < 1000 ms: {})\n    \
         lease PUT -> route       p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} leases   (target p99 < 50 ms: {})\n    \
         resident memory          {:.1} MB ready, {:.1} MB at the end, {:.1} MB peak   (target < 20 MB: {}; flanneld ~90 MB)",
        r.start_to_subnet_file_ms,
        r.peers,
        r.start_to_ready_ms,
        ok(r.targets.ready_under_1_s),
        r.lease_to_route_p50_ms,
        r.lease_to_route_p99_ms,
        r.lease_to_route_max_ms,
        r.new_leases,
        ok(r.targets.p99_under_50_ms),
        r.rss_ready_mb,
        r.rss_end_mb,
        r.rss_peak_mb,
        ok(r.targets.rss_under_20_mb),
    );
}

/// Nearest-rank percentile (with 50 samples p99 is the largest).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// Peer i's subnet: 10.100.0.0/24, 10.100.1.0/24, ... (the agent's own lease is picked from the
/// low end of 10.0.0.0/8, far away).
pub fn peer_subnet(i: usize) -> String {
    format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
}

/// Peer i's lease: key and value exactly as flanneld writes them for a vxlan node.
pub fn peer_lease(prefix: &str, i: usize) -> (String, String) {
    let subnet = peer_subnet(i);
    let key = format!("{prefix}/subnets/{}", subnet.replace('/', "-"));
    let value = format!(
        r#"{{"PublicIP":"172.16.{}.{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0a:58:00:00:{:02x}:{:02x}"}}}}"#,
        100 + i / 250,
        1 + i % 250,
        i / 256,
        i % 256
    );
    (key, value)
}

/// Poll `f` every millisecond until it returns something or `timeout` passes.
async fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `VmRSS` / `VmHWM` (kB) of a process.
fn memory_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    parse_status_kb(&status, field).with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

type PutRequest = (String, String, mpsc::Sender<anyhow::Result<Instant>>);

/// Writes leases through etcd's JSON gateway (`/v3/lease/grant`, `/v3/kv/put`) from a thread inside
/// the switch namespace, where etcd listens, so the bench process itself never joins the underlay
/// and xtask needs no gRPC client. Leases are attached to one 24 h etcd lease, as flanneld's are.
struct EtcdWriter {
    tx: Option<mpsc::Sender<PutRequest>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl EtcdWriter {
    fn start(cluster: &Cluster) -> anyhow::Result<EtcdWriter> {
        let endpoint = cluster.etcd().endpoint();
        let addr = endpoint
            .strip_prefix("http://")
            .with_context(|| format!("etcd endpoint {endpoint} is not http://"))?
            .to_owned();
        let (tx, rx) = mpsc::channel::<PutRequest>();
        let thread = cluster.switch().spawn_thread(move || {
            let grant = post(
                &addr,
                "/v3/lease/grant",
                &serde_json::json!({ "TTL": 86_400 }),
            )?;
            let lease = grant["ID"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| grant["ID"].as_i64().map(|n| n.to_string()))
                .with_context(|| format!("no lease ID in etcd's answer {grant}"))?;
            while let Ok((key, value, reply)) = rx.recv() {
                let at = Instant::now();
                let body = serde_json::json!({
                    "key": base64(key.as_bytes()),
                    "value": base64(value.as_bytes()),
                    "lease": lease,
                });
                let r = post(&addr, "/v3/kv/put", &body)
                    .map(|_| at)
                    .with_context(|| format!("etcd put {key}"));
                let _ = reply.send(r);
            }
            Ok(())
        });
        Ok(EtcdWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Put peer i's lease; the instant just before the PUT was sent.
    fn put_lease(&self, prefix: &str, i: usize) -> anyhow::Result<Instant> {
        let (key, value) = peer_lease(prefix, i);
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .as_ref()
            .context("etcd writer stopped")?
            .send((key, value, reply_tx))
            .map_err(|_| self.failure())?;
        reply_rx.recv().map_err(|_| self.failure())?
    }

    fn failure(&self) -> anyhow::Error {
        anyhow!("the etcd writer thread ended (its error is reported when it is dropped)")
    }
}

impl Drop for EtcdWriter {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(Ok(Err(e))) = self.thread.take().map(|t| t.join()) {
            eprintln!("etcd writer: {e:#}");
        }
    }
}

/// One HTTP/1.1 POST with a JSON body (`Connection: close`); the JSON answer of a 200.
fn post(addr: &str, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let body = body.to_string();
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connect to etcd at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("read etcd's answer to {path}"))?;
    let (head, rest) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP answer from etcd to {path}: {answer:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("etcd answered {path} with {head:?}: {rest}");
    }
    // The gateway may answer chunked: the JSON object is what lies between the outer braces.
    let json = rest
        .find('{')
        .zip(rest.rfind('}'))
        .map(|(a, b)| &rest[a..=b])
        .with_context(|| format!("no JSON in etcd's answer to {path}: {rest:?}"))?;
    serde_json::from_str(json).with_context(|| format!("parse etcd's answer to {path}: {json}"))
}

/// Standard base64 with padding, as etcd's JSON gateway wants keys and values.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `ip monitor route` in a host namespace: when each route first appeared.
struct RouteMonitor {
    child: Child,
    seen: Arc<Mutex<HashMap<String, Instant>>>,
}

impl RouteMonitor {
    fn start(host: &Host) -> anyhow::Result<RouteMonitor> {
        let mut child = Command::new("ip")
            .args(["-n", host.name(), "monitor", "route"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start ip monitor route")?;
        let stdout = child.stdout.take().context("ip monitor's stdout")?;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let map = seen.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                if line.starts_with("Deleted") {
                    continue;
                }
                if let Some(dst) = line.split_whitespace().next() {
                    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
                    m.entry(dst.to_owned()).or_insert(at);
                }
            }
        });
        // Give ip time to subscribe before anything it must see happens.
        std::thread::sleep(Duration::from_millis(200));
        Ok(RouteMonitor { child, seen })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seen(&self, subnet: &str) -> Option<Instant> {
        self.lock().get(subnet).copied()
    }

    fn count_of(&self, subnets: &[String]) -> usize {
        let m = self.lock();
        subnets.iter().filter(|s| m.contains_key(*s)).count()
    }

    /// When the last of `subnets` appeared, once all have.
    fn all_seen(&self, subnets: &[String]) -> Option<Instant> {
        let m = self.lock();
        subnets
            .iter()
            .map(|s| m.get(s).copied())
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_leases_are_flannels_format_and_distinct() {
        let (key, value) = peer_lease("/coreos.com/network", 0);
        assert_eq!(key, "/coreos.com/network/subnets/10.100.0.0-24");
        assert_eq!(
            value,
            r#"{"PublicIP":"172.16.100.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:00:00:00:00"}}"#
        );
        let all: std::collections::HashSet<(String, String)> =
            (0..1050).map(|i| peer_lease("/p", i)).collect();
        assert_eq!(all.len(), 1050);
        let ips: std::collections::HashSet<String> = (0..1050)
            .map(|i| {
                let v: serde_json::Value = serde_json::from_str(&peer_lease("/p", i).1).unwrap();
                v["PublicIP"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(ips.len(), 1050);
        assert_eq!(peer_subnet(1049), "10.104.25.0/24");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=50).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 50.0);
        assert_eq!(percentile(&v, 50.0), 25.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(
            base64(b"/coreos.com/network/subnets/10.100.0.0-24"),
            "L2NvcmVvcy5jb20vbmV0d29yay9zdWJuZXRzLzEwLjEwMC4wLjAtMjQ="
        );
    }

    #[test]
    fn reads_vmrss() {
        let status = "Name:\tweft\nVmHWM:\t   12345 kB\nVmRSS:\t    9876 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS"), Some(9876));
        assert_eq!(parse_status_kb(status, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kb(status, "VmSwap"), None);
    }
}
