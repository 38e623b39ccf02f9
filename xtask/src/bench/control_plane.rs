//! The control-plane benchmark: one agent on one host with N peer leases already in etcd.
//!
//! - start to ready: agent spawned -> subnet file written, -> a route for every peer (and with
//!   `--datapath ebpf` an entry in the pinned peer map for every peer), -> `/readyz` answers 200;
//! - lease to datapath: a new lease PUT -> its route on flannel.1 in the host (`ip monitor route`,
//!   so nothing polls the kernel while the agent works) and, for ebpf, its entry in the pinned peer
//!   map (looked up directly every millisecond), one lease at a time;
//! - resident memory: VmRSS when ready and after the idle window, VmHWM (the peak) from /proc;
//! - idle: the agent's CPU time (/proc/<pid>/stat) and the gRPC messages etcd received (its
//!   /metrics, `grpc_server_msg_received_total` by method) over a window in which nothing but the
//!   agent talks to etcd. An idle agent should send nothing but its lease renewals.
//!
//! The peer leases are only data in etcd, in flanneld's format: their PublicIPs (172.16.100.1, ...)
//! are never contacted, and nothing sends traffic to their subnets.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData};
use serde::Serialize;
use weft_common::{map_names, Ipv4LpmData, PeerValue};
use weft_tests::{Cluster, ClusterOptions, Host};

use crate::bench::measure::{clock_ticks_per_second, process_ticks};
use crate::bench::report::Grid;
use crate::bench::stats::median;
use crate::bench::Options;

/// A /8 holds far more /24 subnets than the peers need.
const CONFIG: &str = r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#;
const READY_TIMEOUT: Duration = Duration::from_secs(300);
const LEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's health server, on the host namespace's own loopback.
const HEALTHZ_PORT: u16 = 18285;

/// The issue's targets (16; issue 6 had 1 s and 20 MB at 1000 peers).
pub const P99_TARGET_MS: f64 = 50.0;
pub const READY_TARGET_MS: f64 = 2000.0;
pub const RSS_TARGET_MB: f64 = 40.0;

#[derive(Debug, Serialize)]
pub struct ControlPlane {
    pub datapath: String,
    pub peers: usize,
    pub start_to_subnet_file_ms: f64,
    /// Agent started -> the last peer's route appeared.
    pub start_to_all_routed_ms: f64,
    /// Agent started -> the last peer's entry appeared in the pinned peer map (ebpf only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_to_all_in_map_ms: Option<f64>,
    /// Agent started -> `/readyz` answered 200.
    pub start_to_ready_ms: f64,
    pub new_leases: usize,
    pub lease_to_route: Latencies,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_to_map: Option<Latencies>,
    pub lease_put: PutTimes,
    pub rss_ready_mb: f64,
    /// After the idle window: what the agent keeps.
    pub rss_steady_mb: f64,
    pub rss_peak_mb: f64,
    pub idle: Idle,
    /// The agent's own `weft_reconcile_duration_seconds` at the end: a pass holds the event loop,
    /// so a lease that arrives meanwhile waits for it.
    pub reconcile_passes: f64,
    pub reconcile_mean_ms: f64,
    /// netlink-proto's "failed to forward response back to the handle" lines in the agent's
    /// log: replies read for a reconcile pass that was already dropped (work thrown away).
    pub forward_warnings: usize,
    /// Passes dropped for a watch update, from the agent's debug log (RUST_LOG must enable
    /// `weft::agent=debug`; `None` without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass_drops: Option<PassDrops>,
    pub targets: Targets,
}

/// How promptly reconcile passes gave way to watch updates: the agent's
/// `reconcile pass dropped for a watch update` lines.
#[derive(Debug, Serialize, PartialEq)]
pub struct PassDrops {
    pub count: usize,
    /// The longest `waited=`: from the start of the pass's last poll (the update was not there
    /// yet) to the update being taken, an upper bound on how long one update waited for a pass.
    pub max_waited_ms: f64,
    /// The longest `dropped_in=`: from the update being taken to the pass being dropped.
    pub max_dropped_in_ms: f64,
}

impl PassDrops {
    /// From an agent log; `None` when it has no such line.
    pub fn from_log(log: &str) -> Option<PassDrops> {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("reconcile pass dropped for a watch update"))
            .collect();
        let max = |field: &str| {
            lines
                .iter()
                .filter_map(|l| log_duration_ms(l, field))
                .fold(0.0, f64::max)
        };
        (!lines.is_empty()).then(|| PassDrops {
            count: lines.len(),
            max_waited_ms: max("waited"),
            max_dropped_in_ms: max("dropped_in"),
        })
    }
}

/// A `field=1.5ms` (Rust's Debug of a Duration: ns, µs, ms or s) in a log line, in ms.
fn log_duration_ms(line: &str, field: &str) -> Option<f64> {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(field)?.strip_prefix('='))?;
    let split = value.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = value.split_at(split);
    let scale = match unit {
        "ns" => 1e-6,
        "µs" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

#[derive(Debug, Serialize)]
pub struct Latencies {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
}

/// When each new lease was written, in ms after `/readyz` first answered 200 (to line outliers
/// up with the agent's reconcile passes: one right after ready, then every --reconcile-interval).
#[derive(Debug, Serialize)]
pub struct PutTimes {
    pub since_ready_ms: Vec<f64>,
}

impl Latencies {
    fn of(samples_ms: Vec<f64>) -> Latencies {
        Latencies {
            p50_ms: median(&samples_ms),
            p99_ms: percentile(&samples_ms, 99.0),
            max_ms: samples_ms.iter().copied().fold(f64::NAN, f64::max),
            samples_ms,
        }
    }
}

/// The agent left alone for `seconds`.
#[derive(Debug, Serialize)]
pub struct Idle {
    pub seconds: f64,
    /// CPU time (user + system) over the window, in percent of one CPU.
    pub cpu_percent: f64,
    /// gRPC messages etcd received in the window, by `service/method`.
    pub etcd_messages: BTreeMap<String, f64>,
    pub etcd_requests_per_minute: f64,
    /// What lease renewals explain: a renewal is a LeaseGrant and the Txn that moves the lease
    /// to it (none is due in a short window: leases last 24 h and renew an hour before).
    pub renewal_messages: f64,
}

/// The issue's control-plane targets.
#[derive(Debug, Serialize)]
pub struct Targets {
    pub p99_under_50_ms: bool,
    pub ready_under_2_s: bool,
    pub rss_under_40_mb: bool,
    pub idle_sends_only_renewals: bool,
}

pub async fn run(opts: &Options) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for datapath in &opts.cp_datapaths {
        println!(
            "==> control plane, --datapath {datapath}: {} peers, {} new leases, {} s idle",
            opts.peers, opts.new_leases, opts.idle_seconds
        );
        let log = opts
            .out_dir()
            .join(format!("control-plane-{datapath}-agent.log"));
        let r = run_one(
            datapath,
            opts.peers,
            opts.new_leases,
            opts.idle_seconds,
            &log,
        )
        .await
        .with_context(|| format!("control-plane benchmark with --datapath {datapath}"))?;
        print(&r);
        results.push(r);
    }
    std::fs::create_dir_all(opts.out_dir())
        .with_context(|| format!("create {}", opts.out_dir().display()))?;
    let md = opts.out_dir().join("control-plane.md");
    std::fs::write(&md, markdown(&results).markdown())
        .with_context(|| format!("write {}", md.display()))?;
    println!("table:  {}", md.display());
    let path = opts.out_dir().join("control-plane.json");
    let json = serde_json::to_string_pretty(&serde_json::json!({ "control_plane": results }))?;
    std::fs::write(&path, json + "\n").with_context(|| format!("write {}", path.display()))?;
    println!("report: {}", path.display());
    Ok(())
}

async fn run_one(
    datapath: &str,
    peers: usize,
    new_leases: usize,
    idle_seconds: u64,
    keep_log: &std::path::Path,
) -> anyhow::Result<ControlPlane> {
    let ebpf = datapath == "ebpf";
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
    let port = HEALTHZ_PORT.to_string();
    let start = Instant::now();
    let agent = host.spawn_agent(&[
        "--datapath",
        datapath,
        "--healthz-ip",
        "127.0.0.1",
        "--healthz-port",
        &port,
    ])?;
    let readyz = wait_ready(host, HEALTHZ_PORT);
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
    let routed_at = wait_for(READY_TIMEOUT, || monitor.all_seen(&want))
        .await
        .with_context(|| {
            format!(
                "the agent programmed {} of {peers} peer routes within {READY_TIMEOUT:?}:\n{}",
                monitor.count_of(&want),
                tail(&agent.log())
            )
        })?;
    let mut peer_map = ebpf.then(|| PeerMap::new(host.bpf_pin_dir()));
    let in_map_at = match &mut peer_map {
        Some(map) => Some(
            wait_for(READY_TIMEOUT, || {
                (map.count().ok()? >= peers).then(Instant::now)
            })
            .await
            .with_context(|| {
                format!(
                    "the pinned peer map did not reach {peers} entries:\n{}",
                    tail(&agent.log())
                )
            })?,
        ),
        None => None,
    };
    let ready_at = readyz
        .join()
        .map_err(|_| anyhow!("the /readyz poller panicked"))?
        .with_context(|| format!("/readyz never answered 200:\n{}", tail(&agent.log())))?;
    let routes = host
        .exec_ok(&["ip", "-4", "route", "show", "dev", "flannel.1"])
        .await?;
    let programmed = routes.lines().filter(|l| l.starts_with("10.")).count();
    if programmed < peers {
        bail!("`ip route show dev flannel.1` lists {programmed} routes, expected {peers}");
    }
    let pid = agent.pid().context("the agent is not running")?;
    let rss_ready = memory_kb(pid, "VmRSS")?;

    let mut to_route = Vec::with_capacity(new_leases);
    let mut to_map = Vec::with_capacity(new_leases);
    let mut put_since_ready = Vec::with_capacity(new_leases);
    for k in 0..new_leases {
        let i = peers + k;
        let subnet = peer_subnet(i);
        let put_at = etcd.put_lease(&prefix, i)?;
        put_since_ready.push(ms(put_at.saturating_duration_since(ready_at)));
        let mut map_at = None;
        let route_at = wait_for(LEASE_TIMEOUT, || {
            if let Some(map) = &mut peer_map {
                if map_at.is_none() && map.contains(i) {
                    map_at = Some(Instant::now());
                }
                // Both must have happened; the map is looked up first, it is what encapsulation reads.
                map_at?;
            }
            monitor.seen(&subnet)
        })
        .await
        .with_context(|| {
            format!(
                "no route (and map entry, ebpf) for new lease {subnet} within {LEASE_TIMEOUT:?}:\n{}",
                tail(&agent.log())
            )
        })?;
        to_route.push(ms(route_at.saturating_duration_since(put_at)));
        if let Some(at) = map_at {
            to_map.push(ms(at.saturating_duration_since(put_at)));
        }
    }

    let idle = measure_idle(&cluster, pid, Duration::from_secs(idle_seconds)).await?;
    let rss_steady = memory_kb(pid, "VmRSS")?;
    let rss_peak = memory_kb(pid, "VmHWM")?;
    let (reconcile_passes, reconcile_s) = agent_reconcile(host, HEALTHZ_PORT)?;
    drop(monitor);
    agent.stop().await.ok();
    // The agent's own account of the run (RUST_LOG applies): where its time went.
    if let Some(dir) = keep_log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::copy(agent.log_path(), keep_log)
        .with_context(|| format!("keep the agent's log as {}", keep_log.display()))?;
    let agent_log = std::fs::read_to_string(keep_log)
        .with_context(|| format!("read {}", keep_log.display()))?;
    let forward_warnings = agent_log.matches("failed to forward response").count();
    let pass_drops = PassDrops::from_log(&agent_log);
    drop(etcd);

    let lease_to_route = Latencies::of(to_route);
    let lease_to_map = ebpf.then(|| Latencies::of(to_map));
    let worst_p99 = lease_to_map.as_ref().map_or(lease_to_route.p99_ms, |m| {
        m.p99_ms.max(lease_to_route.p99_ms)
    });
    let ready_ms = ms(ready_at.saturating_duration_since(start));
    let rss_mb = |kb: u64| kb as f64 / 1024.0;
    let targets = Targets {
        p99_under_50_ms: worst_p99 < P99_TARGET_MS,
        ready_under_2_s: ready_ms < READY_TARGET_MS,
        rss_under_40_mb: rss_mb(rss_peak) < RSS_TARGET_MB,
        idle_sends_only_renewals: idle.etcd_messages.values().sum::<f64>() <= idle.renewal_messages,
    };
    Ok(ControlPlane {
        datapath: datapath.to_owned(),
        peers,
        start_to_subnet_file_ms: ms(subnet_at.saturating_duration_since(start)),
        start_to_all_routed_ms: ms(routed_at.saturating_duration_since(start)),
        start_to_all_in_map_ms: in_map_at.map(|at| ms(at.saturating_duration_since(start))),
        start_to_ready_ms: ready_ms,
        new_leases,
        lease_to_route,
        lease_to_map,
        lease_put: PutTimes {
            since_ready_ms: put_since_ready,
        },
        reconcile_passes,
        reconcile_mean_ms: reconcile_s / reconcile_passes * 1e3,
        forward_warnings,
        pass_drops,
        rss_ready_mb: rss_mb(rss_ready),
        rss_steady_mb: rss_mb(rss_steady),
        rss_peak_mb: rss_mb(rss_peak),
        idle,
        targets,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The agent's CPU and etcd's received gRPC messages over `window`, with nothing else talking to
/// etcd (the lease writer is idle; /metrics is plain HTTP, not gRPC).
async fn measure_idle(cluster: &Cluster, pid: u32, window: Duration) -> anyhow::Result<Idle> {
    let ticks = || -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("read /proc/{pid}/stat"))?;
        process_ticks(&stat).with_context(|| format!("parse /proc/{pid}/stat: {stat}"))
    };
    let before = etcd_metrics(cluster)?;
    if before.is_empty() {
        bail!("etcd's /metrics has no grpc_server_msg_received_total: the idle etcd traffic cannot be counted");
    }
    let (t0, at) = (ticks()?, Instant::now());
    tokio::time::sleep(window).await;
    let (t1, seconds) = (ticks()?, at.elapsed().as_secs_f64());
    let after = etcd_metrics(cluster)?;
    let etcd_messages: BTreeMap<String, f64> = after
        .iter()
        .map(|(k, a)| (k.clone(), a - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    let grants = etcd_messages
        .iter()
        .filter(|(k, _)| k.ends_with("/LeaseGrant"))
        .map(|(_, v)| v)
        .sum::<f64>();
    Ok(Idle {
        seconds,
        cpu_percent: (t1 - t0) as f64 / clock_ticks_per_second() / seconds * 100.0,
        // `0.0 +`: an empty f64 sum is -0.0.
        etcd_requests_per_minute: 0.0 + etcd_messages.values().sum::<f64>() * 60.0 / seconds,
        etcd_messages,
        renewal_messages: 2.0 * grants,
    })
}

/// The agent's reconcile passes so far and their total seconds, from its `/metrics`.
fn agent_reconcile(host: &Host, port: u16) -> anyhow::Result<(f64, f64)> {
    let text = host
        .netns()
        .spawn_thread(move || http(&format!("127.0.0.1:{port}"), "GET", "/metrics", None))
        .join()
        .map_err(|_| anyhow!("the agent /metrics reader panicked"))??;
    let series = weft_tests::prometheus::parse(&text).context("parse the agent's /metrics")?;
    let get = |name: &str| {
        series
            .get(name)
            .copied()
            .with_context(|| format!("no {name} in the agent's /metrics"))
    };
    Ok((
        get("weft_reconcile_duration_seconds_count")?,
        get("weft_reconcile_duration_seconds_sum")?,
    ))
}

/// etcd's `grpc_server_msg_received_total` by `service/method`, from its /metrics (read from the
/// switch namespace, where etcd listens).
fn etcd_metrics(cluster: &Cluster) -> anyhow::Result<BTreeMap<String, f64>> {
    let addr = etcd_addr(cluster)?;
    let text = cluster
        .switch()
        .spawn_thread(move || http(&addr, "GET", "/metrics", None))
        .join()
        .map_err(|_| anyhow!("the etcd /metrics reader panicked"))??;
    Ok(parse_grpc_received(&text))
}

pub fn parse_grpc_received(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        let (Some(service), Some(method), Ok(v)) = (
            label("grpc_service"),
            label("grpc_method"),
            value.trim().parse::<f64>(),
        ) else {
            continue;
        };
        *out.entry(format!("{service}/{method}")).or_insert(0.0) += v;
    }
    out
}

/// Poll the agent's `/readyz` (inside the host namespace) until it answers 200.
fn wait_ready(host: &Host, port: u16) -> std::thread::JoinHandle<anyhow::Result<Instant>> {
    host.netns().spawn_thread(move || {
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match http_status(&addr, "/readyz") {
                Ok(200) => return Ok(Instant::now()),
                Ok(code) => last = format!("HTTP {code}"),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        bail!("/readyz on {addr}: last answer {last}")
    })
}

/// The pinned peer map (`WEFT_REMOTES`) of an eBPF agent, opened once the agent has pinned it.
struct PeerMap {
    pin_dir: PathBuf,
    map: Option<LpmTrie<MapData, Ipv4LpmData, PeerValue>>,
}

impl PeerMap {
    fn new(pin_dir: PathBuf) -> PeerMap {
        PeerMap { pin_dir, map: None }
    }

    fn open(&mut self) -> anyhow::Result<&LpmTrie<MapData, Ipv4LpmData, PeerValue>> {
        if self.map.is_none() {
            let path = self.pin_dir.join("maps").join(map_names::REMOTES);
            let data =
                MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
            let map = Map::from_map_data(data)?;
            self.map = Some(LpmTrie::try_from(map)?);
        }
        self.map.as_ref().context("opened above")
    }

    fn count(&mut self) -> anyhow::Result<usize> {
        Ok(self.open()?.keys().filter(Result::is_ok).count())
    }

    /// Whether peer i's subnet has its entry.
    fn contains(&mut self, i: usize) -> bool {
        let Ok(map) = self.open() else {
            return false;
        };
        let addr: Ipv4Addr = peer_subnet(i)
            .trim_end_matches("/24")
            .parse()
            .expect("peer_subnet is an IPv4 /24");
        let key = Key::new(
            24,
            Ipv4LpmData {
                addr_be: addr.octets(),
            },
        );
        map.get(&key, 0).is_ok()
    }
}

fn print(r: &ControlPlane) {
    let ok = |b: bool| if b { "met" } else { "NOT met" };
    let lat = |l: &Latencies| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50_ms, l.p99_ms, l.max_ms
        )
    };
    println!(
        "    start -> subnet file      {:>9.1} ms",
        r.start_to_subnet_file_ms
    );
    println!(
        "    start -> {} peers routed {:>9.1} ms",
        r.peers, r.start_to_all_routed_ms
    );
    if let Some(m) = r.start_to_all_in_map_ms {
        println!("    start -> {} peers in map {m:>9.1} ms", r.peers);
    }
    println!(
        "    start -> /readyz 200      {:>9.1} ms   (target < {READY_TARGET_MS:.0} ms: {})",
        r.start_to_ready_ms,
        ok(r.targets.ready_under_2_s)
    );
    println!(
        "    lease PUT -> route        {} over {} leases   (target p99 < {P99_TARGET_MS:.0} ms: {})",
        lat(&r.lease_to_route),
        r.new_leases,
        ok(r.targets.p99_under_50_ms)
    );
    if let Some(m) = &r.lease_to_map {
        println!("    lease PUT -> map entry    {}", lat(m));
    }
    println!(
        "    resident memory           {:.1} MB ready, {:.1} MB steady, {:.1} MB peak   (target < {RSS_TARGET_MB:.0} MB: {})",
        r.rss_ready_mb,
        r.rss_steady_mb,
        r.rss_peak_mb,
        ok(r.targets.rss_under_40_mb)
    );
    println!(
        "    reconcile passes          {:.0}, {:.1} ms each on average (a lease arriving during one waits for it)",
        r.reconcile_passes, r.reconcile_mean_ms
    );
    println!(
        "    dropped passes' replies   {} \"failed to forward\" warnings in the agent's log",
        r.forward_warnings
    );
    if let Some(d) = &r.pass_drops {
        println!(
            "    passes dropped for leases {}, an update waited at most {:.2} ms for one, dropped within {:.2} ms",
            d.count, d.max_waited_ms, d.max_dropped_in_ms
        );
    }
    println!(
        "    idle {:.0} s                 CPU {:.2} %, etcd {:.1} requests/min {:?}   (only renewals: {})",
        r.idle.seconds,
        r.idle.cpu_percent,
        r.idle.etcd_requests_per_minute,
        r.idle.etcd_messages,
        ok(r.targets.idle_sends_only_renewals)
    );
}

/// One row per datapath, the targets' verdicts in the cells that carry them.
pub fn markdown(results: &[ControlPlane]) -> Grid {
    let ok = |b: bool| if b { "met" } else { "**not met**" };
    let header = [
        "datapath",
        "peers",
        "start to all routed (in map)",
        "start to ready",
        "new lease to route p50 / p99 / max",
        "new lease to map entry p50 / p99 / max",
        "resident memory ready / steady / peak",
        "idle: CPU, etcd requests/min",
    ]
    .map(str::to_owned)
    .to_vec();
    let lat = |l: &Latencies| format!("{:.1} / {:.1} / {:.1} ms", l.p50_ms, l.p99_ms, l.max_ms);
    let rows = results
        .iter()
        .map(|r| {
            vec![
                r.datapath.clone(),
                r.peers.to_string(),
                match r.start_to_all_in_map_ms {
                    Some(m) => format!("{:.0} ms ({m:.0} ms)", r.start_to_all_routed_ms),
                    None => format!("{:.0} ms", r.start_to_all_routed_ms),
                },
                format!(
                    "{:.0} ms, {}",
                    r.start_to_ready_ms,
                    ok(r.targets.ready_under_2_s)
                ),
                format!(
                    "{}, {}",
                    lat(&r.lease_to_route),
                    ok(r.targets.p99_under_50_ms)
                ),
                r.lease_to_map.as_ref().map_or("-".to_owned(), lat),
                format!(
                    "{:.1} / {:.1} / {:.1} MB, {}",
                    r.rss_ready_mb,
                    r.rss_steady_mb,
                    r.rss_peak_mb,
                    ok(r.targets.rss_under_40_mb)
                ),
                format!(
                    "{:.2} %, {:.1} ({}), {}",
                    r.idle.cpu_percent,
                    r.idle.etcd_requests_per_minute,
                    if r.idle.etcd_messages.is_empty() {
                        "none".to_owned()
                    } else {
                        r.idle
                            .etcd_messages
                            .iter()
                            .map(|(k, v)| format!("{v:.0} {}", k.rsplit('/').next().unwrap_or(k)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                    ok(r.targets.idle_sends_only_renewals)
                ),
            ]
        })
        .collect();
    Grid { header, rows }
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
        let addr = etcd_addr(cluster)?;
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

/// One HTTP/1.1 POST with a JSON body; the JSON answer of a 200.
fn post(addr: &str, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let rest = http(addr, "POST", path, Some(&body.to_string()))?;
    // The gateway may answer chunked: the JSON object is what lies between the outer braces.
    let json = rest
        .find('{')
        .zip(rest.rfind('}'))
        .map(|(a, b)| &rest[a..=b])
        .with_context(|| format!("no JSON in etcd's answer to {path}: {rest:?}"))?;
    serde_json::from_str(json).with_context(|| format!("parse etcd's answer to {path}: {json}"))
}

/// One HTTP/1.1 request (`Connection: close`): the status code and the body.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("read the answer of {addr} to {path}"))?;
    let (head, rest) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP answer from {addr} to {path}: {answer:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((code, rest.to_owned()))
}

/// The body of a 200 answer.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<String> {
    let (code, rest) = request(addr, method, path, body)?;
    if code != 200 {
        bail!("{addr} answered {method} {path} with {code}: {rest}");
    }
    Ok(rest)
}

fn http_status(addr: &str, path: &str) -> anyhow::Result<u16> {
    request(addr, "GET", path, None).map(|(code, _)| code)
}

fn etcd_addr(cluster: &Cluster) -> anyhow::Result<String> {
    let endpoint = cluster.etcd().endpoint();
    Ok(endpoint
        .strip_prefix("http://")
        .with_context(|| format!("etcd endpoint {endpoint} is not http://"))?
        .to_owned())
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
    fn reads_etcd_grpc_messages_by_method() {
        let metrics = r#"# HELP grpc_server_msg_received_total Total number of RPC stream messages received on the server.
# TYPE grpc_server_msg_received_total counter
grpc_server_msg_received_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 12
grpc_server_msg_received_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 3
grpc_server_msg_received_total{grpc_method="LeaseGrant",grpc_service="etcdserverpb.Lease",grpc_type="unary"} 0
grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 12
"#;
        let m = parse_grpc_received(metrics);
        assert_eq!(m["etcdserverpb.KV/Range"], 12.0);
        assert_eq!(m["etcdserverpb.Watch/Watch"], 3.0);
        assert_eq!(m["etcdserverpb.Lease/LeaseGrant"], 0.0);
        assert_eq!(m.len(), 3, "handled_total is not counted twice: {m:?}");
    }

    #[test]
    fn reads_how_promptly_passes_gave_way_from_the_agent_log() {
        let log = "\
2026-11-30T15:27:34.005927Z DEBUG weft::agent::running: reconcile pass dropped for a watch update ran=91.490681ms waited=3.5ms dropped_in=812.3µs longest_poll=3.1ms polls=40
2026-11-30T15:27:34.010807Z DEBUG weft::agent::running: lease events applied events=1 took=4.358948ms
2026-11-30T15:27:34.033072Z DEBUG weft::agent::running: reconcile pass dropped for a watch update ran=22.237756ms waited=12.25ms dropped_in=1.5ms longest_poll=12ms polls=9
";
        assert_eq!(
            PassDrops::from_log(log),
            Some(PassDrops {
                count: 2,
                max_waited_ms: 12.25,
                max_dropped_in_ms: 1.5,
            })
        );
        assert_eq!(PassDrops::from_log("ready subnet=10.0.93.0/24"), None);
        assert_eq!(log_duration_ms("x took=2s", "took"), Some(2000.0));
        assert_eq!(log_duration_ms("x took=950ns", "took"), Some(0.00095));
    }

    #[test]
    fn reads_vmrss() {
        let status = "Name:\tweft\nVmHWM:\t   12345 kB\nVmRSS:\t    9876 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS"), Some(9876));
        assert_eq!(parse_status_kb(status, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kb(status, "VmSwap"), None);
    }
}
