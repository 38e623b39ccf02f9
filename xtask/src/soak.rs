//! `cargo xtask soak --minutes N`: a harness cluster left under churn for N minutes, sampled
//! every few seconds, judged on whether anything grows.
//!
//! What runs at once, on a cluster built by `weft-tests` (an underlay switch with etcd, `--hosts`
//! hosts with one container each, `weft agent --datapath ebpf` by default):
//! - pings at 10/s from each host's container to the next host's, for the whole run;
//! - 50 fake peers join per minute (a lease in flannel's format, under an etcd lease of 40 s) and
//!   as many leave: even ones are revoked after 20 s, odd ones expire;
//! - etcd compaction (to the current revision) and defrag every 2 minutes;
//! - agent restarts, SIGTERM and SIGKILL alternating, every 5 minutes per host (staggered);
//! - interface flaps: `docker0` of one host down for 3 s, the hosts in turn, every 2.5 minutes;
//!   pings lost from 0.5 s before a flap to 5 s after it count as flap losses, the others as lost.
//!
//! Short runs compress the schedule (see [`Schedule::new`]). The fake peers stop joining 50 s
//! before the end so that at the end etcd must hold exactly one lease per host. Samples, verdict
//! and chart: [`report`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::watch;
use weft_tests::{Cluster, ClusterOptions, Container, Host};

mod report;

use report::{EtcdSample, HostSample, Report, Sample};

const NETWORK: &str = "10.1.0.0/16";
/// Agents lease from 10.1.1.0-10.1.127.0; fake peers live in 10.1.128.0-10.1.255.0, so that a
/// fake peer can never overwrite a real host's lease.
const AGENT_SUBNET_MAX: &str = "10.1.127.0";
const FAKE_SLOTS: u32 = 128;
const FAKE_FIRST_OCTET: u32 = 128;
/// A fake peer's etcd lease; even peers are revoked at half of it, odd ones expire.
const FAKE_TTL: Duration = Duration::from_secs(40);
const FAKE_PEERS_PER_MINUTE: u32 = 50;
/// The agents' own lease TTL (renewed every third of it).
const AGENT_LEASE_TTL: &str = "60s";
const FLAP_DOWN: Duration = Duration::from_secs(3);
/// Pings lost this long before a flap and after its end count as flap losses.
const FLAP_BEFORE: f64 = 0.5;
const FLAP_AFTER: f64 = 5.0;

#[derive(clap::Args)]
pub struct Options {
    /// How long the churn runs, in minutes (the run then drains and judges; at least 2).
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// Number of hosts.
    #[arg(long, default_value_t = 3)]
    pub hosts: usize,
    /// Where report.json, report.svg and the agent logs go (default <target>/soak).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Datapath the agents use.
    #[arg(long, default_value = "ebpf", value_parser = ["auto", "kernel", "ebpf"])]
    pub datapath: String,
    /// Do not build the eBPF object first; use the one built earlier.
    #[arg(long)]
    pub skip_ebpf: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::test::require_root("soak")?;
    if opts.minutes < 2 {
        bail!("--minutes {}: a soak needs at least 2 minutes (the fake peers drain for 50 s at the end)", opts.minutes);
    }
    if !(2..=20).contains(&opts.hosts) {
        bail!("--hosts {}: use 2 to 20 hosts", opts.hosts);
    }
    let bin = crate::test::build_weft(opts.skip_ebpf)?;
    if std::env::var_os("WEFT_BIN").is_none() {
        // Read by the harness when it starts the agents; set before any thread exists.
        std::env::set_var("WEFT_BIN", &bin);
    }
    let out = match &opts.out {
        Some(dir) => dir.clone(),
        None => crate::test::target_dir()?.join("soak"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    let report = runtime.block_on(soak(opts, &out))?;
    let verdict = report.verdict();
    let json = out.join("report.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&report.to_json(&verdict))?,
    )
    .with_context(|| format!("write {}", json.display()))?;
    let svg = out.join("report.svg");
    report::draw(&svg, &report)?;
    println!("{}", verdict.text);
    println!("==> wrote {} and {}", json.display(), svg.display());
    if !verdict.pass {
        bail!("the soak failed its criteria (see above)");
    }
    Ok(())
}

/// When each kind of event happens. A 30-minute run uses the issue's periods; shorter runs
/// shrink them so each still happens at least twice.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub total: Duration,
    pub sample: Duration,
    pub compact: Duration,
    /// Per host; hosts are staggered by `restart / hosts`.
    pub restart: Duration,
    pub flap: Duration,
    /// Fake peers stop joining this long before the end and must all be gone at the end.
    pub drain: Duration,
}

impl Schedule {
    pub fn new(minutes: u64) -> Schedule {
        let total = Duration::from_secs(minutes * 60);
        let cap = |period: u64, fraction: u32| Duration::from_secs(period).min(total / fraction);
        Schedule {
            total,
            sample: if minutes >= 10 {
                Duration::from_secs(10)
            } else {
                Duration::from_secs(5)
            },
            compact: cap(120, 3),
            restart: cap(300, 2),
            flap: cap(150, 3),
            drain: FAKE_TTL + Duration::from_secs(10),
        }
    }
}

/// The shared state of a run: the cluster, the stop signal and what happened when.
struct Run {
    cluster: Cluster,
    /// When the churn started (after the cluster came up), as an instant and in unix seconds.
    clock: Mutex<(Instant, f64)>,
    stop: watch::Receiver<bool>,
    /// (host index, start, end) in unix seconds.
    flaps: Mutex<Vec<(usize, f64, f64)>>,
    /// (host index, unix seconds, "SIGTERM"/"SIGKILL").
    restarts: Mutex<Vec<(usize, f64, &'static str)>>,
    /// Fake peers the harness believes alive: slot -> (etcd lease id, joined, revoked at end of life).
    fakes: Mutex<BTreeMap<u32, (String, Instant, bool)>>,
    fakes_joined: Mutex<u64>,
    errors: Mutex<Vec<String>>,
    weft: PathBuf,
    datapath: String,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Run {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn started(&self) -> Instant {
        lock(&self.clock).0
    }

    /// Sleep until `at` (since the start) or the stop; false when stopped.
    async fn sleep_until(&self, at: Duration) -> bool {
        let mut stop = self.stop.clone();
        let wake = tokio::time::Instant::from_std(self.started() + at);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => !self.stopped(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    fn error(&self, what: String) {
        eprintln!("soak: {what}");
        lock(&self.errors).push(what);
    }

    fn elapsed_min(&self) -> f64 {
        self.started().elapsed().as_secs_f64() / 60.0
    }
}

async fn soak(opts: &Options, out: &Path) -> anyhow::Result<Report> {
    let schedule = Schedule::new(opts.minutes);
    let weft = weft_tests::weft_bin()?;
    println!(
        "==> soak: {} hosts, --datapath {}, {} min (schedule {schedule:?})",
        opts.hosts, opts.datapath, opts.minutes
    );
    let cluster = Cluster::start(ClusterOptions::new(opts.hosts))
        .await
        .context("build the soak cluster")?;
    let (stop_tx, stop) = watch::channel(false);
    let run = Arc::new(Run {
        cluster,
        clock: Mutex::new((Instant::now(), unix_now())),
        stop,
        flaps: Mutex::default(),
        restarts: Mutex::default(),
        fakes: Mutex::default(),
        fakes_joined: Mutex::new(0),
        errors: Mutex::default(),
        weft,
        datapath: opts.datapath.clone(),
    });
    let result = tokio::select! {
        r = soak_in(Arc::clone(&run), schedule, &stop_tx) => r,
        _ = interrupted() => {
            let _ = stop_tx.send(true);
            Err(anyhow::anyhow!("interrupted; the cluster is being removed"))
        }
    };
    let _ = stop_tx.send(true);
    copy_logs(&run.cluster, out);
    // Every task has ended (soak_in joins them, and an interrupt dropped them), so this is the last
    // reference: dropping the cluster removes agents, namespaces, etcd and its directory.
    match Arc::try_unwrap(run) {
        Ok(run) => drop(run),
        Err(_) => {
            eprintln!("soak: a task still holds the cluster; it is removed when the process exits")
        }
    }
    result
}

/// SIGINT or SIGTERM.
async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn copy_logs(c: &Cluster, out: &Path) {
    for h in c.hosts() {
        let from = h.dir().join("agent.log");
        let to = out.join(format!("agent-host{}.log", h.index() + 1));
        let _ = std::fs::copy(from, to);
    }
}

async fn soak_in(
    run: Arc<Run>,
    schedule: Schedule,
    stop_tx: &watch::Sender<bool>,
) -> anyhow::Result<Report> {
    let c = &run.cluster;
    let config = format!(
        r#"{{"Network":"{NETWORK}","SubnetMax":"{AGENT_SUBNET_MAX}","Backend":{{"Type":"vxlan"}}}}"#
    );
    c.write_config(&config).await;
    c.start_agents(&[
        "--datapath",
        &run.datapath,
        "--subnet-lease-ttl",
        AGENT_LEASE_TTL,
        "--subnet-lease-renew-margin",
        "1",
    ])?;
    c.add_containers(1).await?;
    let n = c.hosts().len();
    for i in 0..n {
        let (from, to) = (container(c.host(i)), container(c.host((i + 1) % n)));
        from.ping_until(to.ip(), Duration::from_secs(30))
            .await
            .with_context(|| format!("first ping {} -> {}", from.ip(), to.ip()))?;
    }
    println!("==> cluster up; churning for {:?}", schedule.total);
    // Restart the clock now that the cluster is up: the schedule counts from here.
    *lock(&run.clock) = (Instant::now(), unix_now());

    let pings: Vec<_> = (0..n)
        .map(|i| {
            let (from, to) = (
                container(run.cluster.host(i)),
                container(run.cluster.host((i + 1) % n)),
            );
            tokio::spawn(ping_stream(Arc::clone(&run), i, (i + 1) % n, from, to.ip()))
        })
        .collect();
    let tasks = vec![
        tokio::spawn(churn(Arc::clone(&run), schedule)),
        tokio::spawn(compact(Arc::clone(&run), schedule)),
        tokio::spawn(restarts(Arc::clone(&run), schedule)),
        tokio::spawn(flaps(Arc::clone(&run), schedule)),
    ];
    let sampler = tokio::spawn(sample_loop(Arc::clone(&run), schedule));

    run.sleep_until(schedule.total).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await.context("a soak task panicked")?;
    }
    let samples = sampler.await.context("the sampler panicked")?;
    let mut streams = Vec::new();
    for p in pings {
        streams.push(p.await.context("a ping task panicked")??);
    }
    let end = end_state(&run).await;
    let flaps = lock(&run.flaps).clone();
    let restarts = lock(&run.restarts).clone();
    let errors = lock(&run.errors).clone();
    let fakes_joined = *lock(&run.fakes_joined);
    Ok(Report {
        hosts: n,
        datapath: run.datapath.clone(),
        schedule,
        started_unix: lock(&run.clock).1,
        samples,
        pings: streams,
        flaps,
        restarts,
        fakes_joined,
        end,
        errors,
    })
}

fn container(h: &Host) -> Container {
    h.containers()
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{} has no container", h.name()))
}

// ---------------------------------------------------------------------------------------------
// Pings
// ---------------------------------------------------------------------------------------------

/// One ping stream's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PingStream {
    pub from_host: usize,
    pub to_host: usize,
    pub sent: u32,
    pub received: u32,
    /// Lost echo requests: (icmp_seq, unix seconds when ping gave up waiting).
    pub lost: Vec<(u32, f64)>,
}

/// `ping -D -O -i 0.1` until the stop; `-O` prints every request that got no answer before the
/// next one was sent, with its time (`-D`), so each loss can be placed against the flaps. A late
/// answer for such a request removes it from the lost list.
async fn ping_stream(
    run: Arc<Run>,
    from_host: usize,
    to_host: usize,
    from: Container,
    to: Ipv4Addr,
) -> anyhow::Result<PingStream> {
    let mut child = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            from.netns(),
            "ping",
            "-D",
            "-O",
            "-n",
            "-i",
            "0.1",
            "-W",
            "1",
        ])
        .arg(to.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("run ping")?;
    let pid = child.id().context("ping has no pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("ping stdout")?).lines();
    let mut stop = run.stop.clone();
    let mut lost: BTreeMap<u32, f64> = BTreeMap::new();
    let mut summary = None;
    let mut stopping = false;
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                // SAFETY: kill(2) on our own child's pid (ip netns exec has exec'd ping); SIGINT
                // makes ping print its summary and exit.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
                continue;
            }
        };
        let Some(line) = line else { break };
        if let Some(s) = weft_tests::ping_summary(&line) {
            summary = Some(s);
        }
        let Some((at, rest)) = stamped(&line) else {
            continue;
        };
        if let Some(seq) = field(rest, "no answer yet for icmp_seq=") {
            lost.insert(seq, at);
        } else if let Some(seq) = field(rest, "icmp_seq=") {
            lost.remove(&seq);
        }
    }
    let _ = child.wait().await;
    let (sent, received) = summary.context("ping printed no summary")?;
    Ok(PingStream {
        from_host,
        to_host,
        sent,
        received,
        lost: lost.into_iter().collect(),
    })
}

/// `[1700000000.123456] rest` -> (seconds, rest).
fn stamped(line: &str) -> Option<(f64, &str)> {
    let (stamp, rest) = line.strip_prefix('[')?.split_once("] ")?;
    Some((stamp.parse().ok()?, rest))
}

/// The number after `key` in `text`.
fn field(text: &str, key: &str) -> Option<u32> {
    let after = &text[text.find(key)? + key.len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Churn, compaction, restarts, flaps
// ---------------------------------------------------------------------------------------------

fn fake_value(slot: u32, generation: u64) -> String {
    let ip = Ipv4Addr::new(172, 16, 15, 100 + (slot % 150) as u8);
    let g = generation.to_be_bytes();
    let mac = format!(
        "0e:77:{:02x}:{:02x}:{:02x}:{:02x}",
        slot as u8, g[5], g[6], g[7]
    );
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn fake_key(prefix: &str, slot: u32) -> String {
    format!("{prefix}/subnets/10.1.{}.0-24", FAKE_FIRST_OCTET + slot)
}

/// 50 fake peers join per minute and as many leave, until `drain` before the end.
async fn churn(run: Arc<Run>, s: Schedule) {
    let every = Duration::from_secs(60) / FAKE_PEERS_PER_MINUTE;
    let until = s.total.saturating_sub(s.drain);
    let etcd = run.cluster.etcd();
    let prefix = run.cluster.prefix().to_owned();
    let mut next_slot = 0u32;
    let mut generation = 0u64;
    let mut tick = Duration::ZERO;
    // Past `until` only the leaving goes on, so every fake peer is gone by the end.
    while tick < s.total && run.sleep_until(tick).await {
        let joining = tick < until;
        tick += every;
        // Leave: even peers are revoked at half their TTL (odd ones expire on their own).
        let due: Vec<(u32, String)> = lock(&run.fakes)
            .iter()
            .filter(|(_, (_, joined, revoke))| *revoke && joined.elapsed() >= FAKE_TTL / 2)
            .map(|(slot, (id, _, _))| (*slot, id.clone()))
            .collect();
        for (slot, id) in due {
            match etcd.etcdctl(&["lease", "revoke", &id]).await {
                Ok(_) => {
                    lock(&run.fakes).remove(&slot);
                }
                Err(e) => run.error(format!("revoke fake peer {slot}: {e:#}")),
            }
        }
        lock(&run.fakes).retain(|_, (_, joined, revoke)| *revoke || joined.elapsed() < FAKE_TTL);
        if !joining {
            continue;
        }
        // Join: the next free slot.
        let slot = (0..FAKE_SLOTS)
            .map(|k| (next_slot + k) % FAKE_SLOTS)
            .find(|slot| !lock(&run.fakes).contains_key(slot));
        let Some(slot) = slot else {
            run.error("no free fake peer slot".into());
            continue;
        };
        next_slot = slot + 1;
        generation += 1;
        let ttl = FAKE_TTL.as_secs().to_string();
        let granted = match etcd.etcdctl(&["lease", "grant", &ttl]).await {
            Ok(out) => out,
            Err(e) => {
                run.error(format!("grant a fake peer lease: {e:#}"));
                continue;
            }
        };
        // "lease 694d7d1f3c3e4a05 granted with TTL(40s)"
        let Some(id) = granted.split_whitespace().nth(1).map(str::to_owned) else {
            run.error(format!("etcdctl lease grant printed {granted:?}"));
            continue;
        };
        let joined = Instant::now();
        let lease = format!("--lease={id}");
        let key = fake_key(&prefix, slot);
        match etcd
            .etcdctl(&["put", &lease, &key, &fake_value(slot, generation)])
            .await
        {
            Ok(_) => {
                lock(&run.fakes).insert(slot, (id, joined, generation.is_multiple_of(2)));
                *lock(&run.fakes_joined) += 1;
            }
            Err(e) => run.error(format!("put fake peer {key}: {e:#}")),
        }
    }
}

/// Compact etcd to its current revision and defragment it, every `compact`.
async fn compact(run: Arc<Run>, s: Schedule) {
    let etcd = run.cluster.etcd();
    let mut at = s.compact;
    while at < s.total && run.sleep_until(at).await {
        at += s.compact;
        let rev = match etcd_counts(&run).await {
            Ok(e) => e.revision,
            Err(e) => {
                run.error(format!("read etcd's revision: {e:#}"));
                continue;
            }
        };
        if let Err(e) = etcd.etcdctl(&["compact", &rev.to_string()]).await {
            run.error(format!("compact etcd to {rev}: {e:#}"));
        }
        if let Err(e) = etcd.etcdctl(&["defrag"]).await {
            run.error(format!("defrag etcd: {e:#}"));
        }
        println!(
            "    [{:5.1} min] etcd compacted to revision {rev} and defragmented",
            run.elapsed_min()
        );
    }
}

/// Restart each host's agent every `restart`, hosts staggered, SIGTERM and SIGKILL alternating.
async fn restarts(run: Arc<Run>, s: Schedule) {
    let hosts = run.cluster.hosts().len();
    let step = s.restart / hosts as u32;
    let mut at = step;
    let mut k = 0usize;
    while at < s.total && run.sleep_until(at).await {
        at += step;
        let h = run.cluster.host(k % hosts);
        let how = if k.is_multiple_of(2) {
            "SIGTERM"
        } else {
            "SIGKILL"
        };
        k += 1;
        let Some(agent) = h.agent() else { continue };
        if let Some(status) = agent.exit_status() {
            run.error(format!(
                "agent on {} had exited on its own ({status})",
                h.name()
            ));
        }
        lock(&run.restarts).push((h.index(), unix_now(), how));
        if how == "SIGKILL" {
            agent.kill();
        }
        match agent.restart().await {
            Ok(()) => println!(
                "    [{:5.1} min] agent on host{} restarted after {how}",
                run.elapsed_min(),
                h.index() + 1
            ),
            Err(e) => run.error(format!("restart the agent on {}: {e:#}", h.name())),
        }
    }
}

/// Take one host's docker0 down for [`FLAP_DOWN`] every `flap`, the hosts in turn.
async fn flaps(run: Arc<Run>, s: Schedule) {
    let hosts = run.cluster.hosts().len();
    let mut at = s.flap / 2;
    let mut k = 0usize;
    while at + FLAP_DOWN < s.total && run.sleep_until(at).await {
        at += s.flap;
        let h = run.cluster.host(k % hosts);
        k += 1;
        let start = unix_now();
        if let Err(e) = h.netns().ip(&["link", "set", "docker0", "down"]).await {
            run.error(format!("docker0 down on {}: {e:#}", h.name()));
        }
        tokio::time::sleep(FLAP_DOWN).await;
        if let Err(e) = h.netns().ip(&["link", "set", "docker0", "up"]).await {
            run.error(format!("docker0 up on {}: {e:#}", h.name()));
        }
        lock(&run.flaps).push((h.index(), start, unix_now()));
        println!(
            "    [{:5.1} min] docker0 of host{} flapped ({FLAP_DOWN:?} down)",
            run.elapsed_min(),
            h.index() + 1
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------------------

async fn sample_loop(run: Arc<Run>, s: Schedule) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut at = Duration::ZERO;
    loop {
        let t = run.started().elapsed().as_secs_f64();
        match sample(&run, t).await {
            Ok(one) => samples.push(one),
            Err(e) => run.error(format!("sample at {t:.0} s: {e:#}")),
        }
        at += s.sample;
        if at > s.total || !run.sleep_until(at).await {
            break;
        }
    }
    samples
}

async fn sample(run: &Run, t: f64) -> anyhow::Result<Sample> {
    let mut hosts = Vec::new();
    for h in run.cluster.hosts() {
        hosts.push(host_sample(run, h).await);
    }
    let live_fakes = lock(&run.fakes).len();
    Ok(Sample {
        t,
        hosts,
        etcd: etcd_counts(run).await?,
        live_fakes,
    })
}

async fn host_sample(run: &Run, h: &Host) -> HostSample {
    let pid = h.agent().and_then(|a| a.pid());
    let (rss_kib, fds) = match pid {
        Some(pid) => (rss_kib(pid), fd_count(pid)),
        None => (None, None),
    };
    HostSample {
        pid,
        rss_kib,
        fds,
        pinned: Some(count_files(&h.bpf_pin_dir()) as u64),
        forwarding_entries: forwarding_entries(run, h).await,
        iptables_rules: iptables_rules(h).await,
        nft_rules: nft_rules(h).await,
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Files (pinned maps, programs, links) anywhere under `dir`.
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

/// What the datapath holds for peers: with eBPF, remote subnets + VTEPs in the pinned maps
/// (`weft status --json`); with the kernel path, routes + neighbours + fdb entries on flannel.1.
async fn forwarding_entries(run: &Run, h: &Host) -> Option<u64> {
    if run.datapath == "kernel" {
        let mut n = 0;
        for argv in [
            &["ip", "-j", "-4", "route", "show", "dev", "flannel.1"][..],
            &["ip", "-j", "-4", "neigh", "show", "dev", "flannel.1"][..],
            &["bridge", "-j", "fdb", "show", "dev", "flannel.1"][..],
        ] {
            let out = h.exec_ok(argv).await.ok()?;
            n += serde_json::from_str::<Vec<serde_json::Value>>(&out)
                .ok()?
                .len() as u64;
        }
        return Some(n);
    }
    let pin_dir = h.bpf_pin_dir().display().to_string();
    let weft = run.weft.display().to_string();
    let out = h
        .exec_ok(&[&weft, "status", "--json", "--bpf-pin-dir", &pin_dir])
        .await
        .ok()?;
    let st: serde_json::Value = serde_json::from_str(&out).ok()?;
    let len = |k: &str| st[k].as_array().map_or(0, Vec::len) as u64;
    Some(len("peers") + len("known_vteps"))
}

async fn iptables_rules(h: &Host) -> Option<u64> {
    let out = h.exec_ok(&["iptables-save"]).await.ok()?;
    Some(out.lines().filter(|l| l.starts_with("-A ")).count() as u64)
}

async fn nft_rules(h: &Host) -> Option<u64> {
    let out = h.exec_ok(&["nft", "-j", "list", "ruleset"]).await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let items = v["nftables"].as_array()?;
    Some(items.iter().filter(|i| i.get("rule").is_some()).count() as u64)
}

async fn etcd_counts(run: &Run) -> anyhow::Result<EtcdSample> {
    let etcd = run.cluster.etcd();
    let subnets = format!("{}/subnets/", run.cluster.prefix());
    let all = format!("{}/", run.cluster.prefix());
    // (keys under `prefix`, revision); the count is the whole range's even with --limit=1.
    let count = |prefix: String| async move {
        let out = etcd
            .etcdctl(&[
                "get",
                &prefix,
                "--prefix",
                "--keys-only",
                "--limit=1",
                "-w",
                "json",
            ])
            .await?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parse etcdctl json")?;
        anyhow::Ok((
            v["count"].as_u64().unwrap_or(0),
            v["header"]["revision"].as_u64().unwrap_or(0),
        ))
    };
    let (keys, revision) = count(all).await?;
    let (subnet_keys, _) = count(subnets).await?;
    let status = etcd.etcdctl(&["endpoint", "status", "-w", "json"]).await?;
    let status: serde_json::Value =
        serde_json::from_str(&status).context("parse endpoint status")?;
    Ok(EtcdSample {
        keys,
        subnet_keys,
        revision,
        db_bytes: status[0]["Status"]["dbSize"].as_u64().unwrap_or(0),
    })
}

/// After the drain: every agent alive, and etcd holding exactly one lease per host, each the
/// subnet its agent wrote to its subnet file.
async fn end_state(run: &Run) -> report::EndState {
    let c = &run.cluster;
    let kvs = c
        .etcd()
        .get_prefix(&format!("{}/subnets/", c.prefix()))
        .await;
    let mut agents_alive = 0;
    let mut own_leases = 0;
    for h in c.hosts() {
        if h.agent()
            .is_some_and(|a| a.exit_status().is_none() && a.pid().is_some())
        {
            agents_alive += 1;
        }
        let own = std::fs::read_to_string(h.subnet_file())
            .ok()
            .and_then(|t| weft_tests::SubnetEnv::parse(&t).ok())
            .map(|env| env.subnet.trunc());
        if let Some(own) = own {
            let key = format!(
                "{}/subnets/{}-{}",
                c.prefix(),
                own.network(),
                own.prefix_len()
            );
            if kvs.iter().any(|(k, _)| *k == key) {
                own_leases += 1;
            }
        }
    }
    report::EndState {
        subnet_keys: kvs.len(),
        live_fakes: lock(&run.fakes).len(),
        own_leases,
        agents_alive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pings_dash_d_lines() {
        let (at, rest) =
            stamped("[1732950000.123456] 64 bytes from 10.1.2.2: icmp_seq=5 ttl=62 time=0.1 ms")
                .unwrap();
        assert!((at - 1732950000.123456).abs() < 1e-6);
        assert_eq!(field(rest, "icmp_seq="), Some(5));
        let (_, rest) = stamped("[1732950001.5] no answer yet for icmp_seq=17").unwrap();
        assert_eq!(field(rest, "no answer yet for icmp_seq="), Some(17));
        assert_eq!(
            stamped("PING 10.1.2.2 (10.1.2.2) 56(84) bytes of data."),
            None
        );
    }

    #[test]
    fn short_runs_compress_the_schedule() {
        let long = Schedule::new(30);
        assert_eq!(long.compact, Duration::from_secs(120));
        assert_eq!(long.restart, Duration::from_secs(300));
        assert_eq!(long.flap, Duration::from_secs(150));
        let short = Schedule::new(3);
        assert_eq!(short.compact, Duration::from_secs(60));
        assert_eq!(short.restart, Duration::from_secs(90));
        assert_eq!(short.flap, Duration::from_secs(60));
    }

    #[test]
    fn fake_peers_stay_out_of_the_agents_range() {
        let last = fake_key("/p", FAKE_SLOTS - 1);
        assert_eq!(last, "/p/subnets/10.1.255.0-24");
        assert_eq!(fake_key("/p", 0), "/p/subnets/10.1.128.0-24");
    }
}
