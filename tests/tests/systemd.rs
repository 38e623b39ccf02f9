//! dist/weft.service under a real systemd: a Debian bookworm machine booted with `systemd-nspawn
//! --boot` inside host 1 of the harness, weft installed with `cargo xtask install --destdir`, and the
//! unit driven with `systemctl` as an operator would: start, 90 s of running, stop, start again,
//! `kill -s KILL`, a watchdog catching a stopped agent. Beside it, on a cluster and machine of their
//! own: 90 s of running without a watchdog, and nspawn's default sandbox, where the eBPF datapath
//! cannot load and the fallback has to say why.
//!
//! ```text
//!  switch ns: br0 172.16.15.1/24 (etcd)
//!     |-- host1 ens32 .21: the nspawn machine (systemd, weft.service, eBPF datapath)
//!     |-- host2 ens32 .22: a plain `weft agent`, the peer the status line counts
//! ```
//!
//! Prints the figures it measures (start, stop, restarts) on stderr.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use weft_tests::nspawn::{Machine, MachineOptions};
use weft_tests::{cluster, tail, Cluster, SubnetEnv};

const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#;
const DROPIN: &str = "etc/systemd/system/weft.service.d/50-weft-tests.conf";

/// The unit's state as `systemctl show` reports it.
struct Unit(BTreeMap<String, String>);

impl Unit {
    async fn read(m: &Machine) -> Unit {
        let props =
            "ActiveState,SubState,Result,NRestarts,MainPID,StatusText,WatchdogUSec,InvocationID";
        let text = m
            .exec_ok(&["systemctl", "show", "weft", "-p", props])
            .await
            .expect("systemctl show weft");
        Unit(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> &str {
        self.0.get(key).map_or("", String::as_str)
    }

    fn running(&self) -> bool {
        self.get("ActiveState") == "active" && self.get("SubState") == "running"
    }

    fn restarts(&self) -> u32 {
        self.get("NRestarts").parse().unwrap_or(0)
    }
}

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Everything to read when a step fails.
async fn context(m: &Machine) -> String {
    let status = m.exec(&["systemctl", "status", "weft", "--no-pager"]).await;
    format!(
        "{}\n--- journal ---\n{}",
        String::from_utf8_lossy(&status.stdout),
        tail(&m.journal("weft").await, 60)
    )
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Poll the unit until `done` holds; panics with the unit's status and journal otherwise.
async fn wait_unit(
    m: &Machine,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Unit) -> bool,
) -> Unit {
    let deadline = Instant::now() + timeout;
    loop {
        let u = Unit::read(m).await;
        if done(&u) {
            return u;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not within {timeout:?}; last {u:?}\n{}",
                context(m).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The unit stays `active (running)` with the same main process and no restart for `span`.
async fn stays_running(m: &Machine, span: Duration, why: &str) {
    let first = Unit::read(m).await;
    let end = Instant::now() + span;
    while Instant::now() < end {
        let u = Unit::read(m).await;
        let same = u.running()
            && u.get("MainPID") == first.get("MainPID")
            && u.restarts() == first.restarts();
        if !same {
            panic!(
                "{why}: the unit left active (running) after {:?}: was {first:?}, now {u:?}\n{}",
                span - (end - Instant::now()),
                context(m).await
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `systemctl <args>`, timed.
async fn timed_systemctl(m: &Machine, args: &[&str]) -> Duration {
    let mut argv = vec!["systemctl"];
    argv.extend_from_slice(args);
    let t = Instant::now();
    if let Err(e) = m.exec_ok(&argv).await {
        panic!("{e:#}\n{}", context(m).await);
    }
    t.elapsed()
}

async fn write_dropin(m: &Machine, text: Option<&str>) {
    let path = m.root().join(DROPIN);
    match text {
        Some(text) => {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
        }
        None => std::fs::remove_file(&path).unwrap(),
    }
    m.exec_ok(&["systemctl", "daemon-reload"]).await.unwrap();
}

/// The journal of one run of the unit.
async fn run_journal(m: &Machine, invocation: &str) -> String {
    let out = m
        .exec(&[
            "journalctl",
            "--no-pager",
            &format!("_SYSTEMD_INVOCATION_ID={invocation}"),
        ])
        .await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A machine in host 1 of `c` with weft installed by `cargo xtask install`, its weft.env pointing at
/// the cluster's etcd and ens32 and (`config`) carrying the network config for `ExecStartPre`; not
/// started.
async fn machine_with_weft(c: &Cluster, opts: MachineOptions, config: bool) -> Machine {
    let m = Machine::boot(c.host(0).name(), opts)
        .await
        .unwrap_or_else(|e| panic!("boot the machine: {e:#}"));
    m.install_weft().await.unwrap();
    let env_path = m.root().join("etc/weft/weft.env");
    let mut env = std::fs::read_to_string(&env_path).unwrap();
    env.push_str(&format!(
        "WEFT_ETCD_ENDPOINTS={}\nWEFT_IFACE=ens32\n",
        c.host(0).etcd_endpoint()
    ));
    if config {
        env.push_str(&format!("WEFT_NETWORK_CONFIG='{CONFIG}'\n"));
    }
    std::fs::write(&env_path, env).unwrap();
    m.exec_ok(&["systemctl", "daemon-reload"]).await.unwrap();
    m
}

/// A cluster of two hosts with a plain agent on host 2, so the machine's weft has one peer.
async fn cluster_with_peer() -> Cluster {
    let c = cluster(2).await;
    c.write_config(CONFIG).await;
    c.host(1).spawn_agent(&["--datapath", "kernel"]).unwrap();
    c.host(1)
        .wait_subnet(Duration::from_secs(30))
        .await
        .unwrap();
    c
}

/// Stop: SIGTERM in the journal, done well within 2 s, result success; how long it took.
async fn stop_cleanly(m: &Machine) -> Duration {
    let run = Unit::read(m).await.get("InvocationID").to_owned();
    let stop = timed_systemctl(m, &["stop", "weft"]).await;
    let u = Unit::read(m).await;
    assert!(stop < Duration::from_secs(2), "stop took {stop:?}");
    assert_eq!(
        (u.get("ActiveState"), u.get("Result")),
        ("inactive", "success"),
        "{u:?}"
    );
    let journal = run_journal(m, &run).await;
    assert!(
        journal.contains("SIGTERM"),
        "no SIGTERM in the journal:\n{journal}"
    );
    stop
}

/// No run ended in a timeout; `watchdogs` runs ended by the watchdog.
async fn assert_results(m: &Machine, watchdogs: usize) {
    let journal = m.journal("weft").await;
    let failures: Vec<&str> = journal
        .lines()
        .filter(|l| l.contains("Failed with result"))
        .collect();
    assert!(
        failures.iter().all(|l| !l.contains("'timeout'")),
        "a run timed out: {failures:?}"
    );
    assert_eq!(
        failures.iter().filter(|l| l.contains("'watchdog'")).count(),
        watchdogs,
        "watchdog results: {failures:?}"
    );
}

/// The unit as it was shipped before, without a watchdog (it then SIGKILLed weft every 35 s): 90 s
/// `active (running)`, then a clean stop. Runs beside the main test, on its own cluster. Starts
/// before the network config exists: `systemctl start` must block, `activating` with a status that
/// says what it waits for, until the config is written and the subnet file is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn weft_service_without_watchdog() {
    let c = cluster(1).await;
    let m = machine_with_weft(&c, MachineOptions::ebpf(), false).await;
    write_dropin(&m, Some("[Service]\nWatchdogSec=0\n")).await;
    let mut start = std::process::Command::new("nsenter")
        .args(["-t", &m.leader().to_string(), "-a", "--"])
        .args(["systemctl", "start", "weft"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("run systemctl start in the machine");
    let waiting = "waiting for the network config at /coreos.com/network/config";
    let u = wait_unit(
        &m,
        "the status of a start waiting for the config",
        Duration::from_secs(30),
        |u| u.get("StatusText") == waiting,
    )
    .await;
    assert_eq!(u.get("ActiveState"), "activating", "{u:?}");
    assert!(
        start.try_wait().unwrap().is_none(),
        "systemctl start returned while the config is missing"
    );
    assert!(
        !m.exec(&["test", "-e", "/run/flannel/subnet.env"])
            .await
            .status
            .success(),
        "subnet.env before the config exists"
    );
    let written = Instant::now();
    c.write_config(CONFIG).await;
    let start_deadline = written + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = start.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < start_deadline,
            "systemctl start still blocked 30 s after the config was written\n{}",
            context(&m).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let start = written.elapsed();
    assert!(
        status.success(),
        "systemctl start: {status}\n{}",
        context(&m).await
    );
    m.exec_ok(&["cat", "/run/flannel/subnet.env"])
        .await
        .expect("subnet.env when `systemctl start` returns");
    let u = Unit::read(&m).await;
    assert!(u.running() && u.get("WatchdogUSec") == "0", "{u:?}");
    assert!(
        u.get("StatusText")
            .starts_with("datapath ebpf on ens32, 0 peers"),
        "{u:?}"
    );
    stays_running(&m, Duration::from_secs(90), "WatchdogSec=0").await;
    let stop = stop_cleanly(&m).await;
    assert_results(&m, 0).await;
    eprintln!("systemd: WatchdogSec=0: start blocked until the config came, returned {start:?} after it; active (running) for 90 s; stop {stop:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn weft_service_under_systemd() {
    let c = cluster_with_peer().await;
    let m = machine_with_weft(&c, MachineOptions::ebpf(), true).await;

    // Start: returns once READY=1 came, which is once the subnet file is written.
    let start = timed_systemctl(&m, &["start", "weft"]).await;
    let subnet_env = m
        .exec_ok(&["cat", "/run/flannel/subnet.env"])
        .await
        .expect("subnet.env when `systemctl start` returns");
    let subnet = SubnetEnv::parse(&subnet_env).unwrap().subnet.trunc();
    let u = Unit::read(&m).await;
    assert!(u.running(), "after start: {u:?}\n{}", context(&m).await);
    assert_eq!(u.get("WatchdogUSec"), "30s", "the shipped unit's watchdog");
    // eBPF chosen: the unit's capabilities and nspawn's filter allow it.
    let status_line = format!("datapath ebpf on ens32, 1 peer, subnet {subnet}");
    assert_eq!(u.get("StatusText"), status_line, "{}", context(&m).await);
    let status = m.exec(&["systemctl", "status", "weft", "--no-pager"]).await;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("Status: \"{status_line}\"")),
        "systemctl status:\n{status}"
    );
    let lease_key = format!(
        "{}/subnets/{}",
        c.prefix(),
        subnet.to_string().replace('/', "-")
    );
    assert!(
        c.etcd().get(&lease_key).await.is_some(),
        "no lease at {lease_key}"
    );
    eprintln!(
        "systemd: `systemctl start weft` returned in {start:?} (eBPF datapath, subnet {subnet})"
    );

    // The shipped unit (WatchdogSec=30s): running for 90 s, no restart.
    stays_running(&m, Duration::from_secs(90), "shipped unit").await;
    eprintln!("systemd: active (running) for 90 s with the shipped unit");

    // Stop: SIGTERM, done well within 2 s, lease and datapath left.
    let stop = stop_cleanly(&m).await;
    assert!(
        c.etcd().get(&lease_key).await.is_some(),
        "lease gone after stop"
    );
    m.exec_ok(&["ip", "link", "show", "flannel.1"])
        .await
        .expect("flannel.1 after stop");
    let pins = walk(&m.bpffs());
    assert!(
        pins.iter().any(|p| p.contains("/links/")),
        "no pinned links after stop: {pins:?}"
    );
    eprintln!(
        "systemd: `systemctl stop weft` returned in {stop:?}; lease, flannel.1 and pins left"
    );

    // Start again: the pinned programs and maps are adopted, the subnet kept.
    let restart = timed_systemctl(&m, &["start", "weft"]).await;
    let u = Unit::read(&m).await;
    assert!(u.running(), "{u:?}");
    let journal = run_journal(&m, u.get("InvocationID")).await;
    assert!(
        journal.contains("adopted=true"),
        "the second start did not adopt the pinned programs:\n{journal}"
    );
    let again = m
        .exec_ok(&["cat", "/run/flannel/subnet.env"])
        .await
        .unwrap();
    assert_eq!(SubnetEnv::parse(&again).unwrap().subnet.trunc(), subnet);
    eprintln!("systemd: start with the pins in place (adopted) in {restart:?}");

    // A stopped agent is killed by the watchdog and restarted.
    write_dropin(&m, Some("[Service]\nWatchdogSec=3s\n")).await;
    timed_systemctl(&m, &["restart", "weft"]).await;
    stays_running(&m, Duration::from_secs(7), "WatchdogSec=3s, pinging").await;
    let before = Unit::read(&m).await;
    m.exec_ok(&[
        "sh",
        "-c",
        &format!("kill -s STOP {}", before.get("MainPID")),
    ])
    .await
    .unwrap();
    let stopped_at = Instant::now();
    wait_unit(
        &m,
        "restart after the watchdog fired",
        Duration::from_secs(30),
        |u| u.running() && u.restarts() > before.restarts(),
    )
    .await;
    // systemd's own lines about the unit carry no _SYSTEMD_INVOCATION_ID: read the unit's journal.
    let journal = m.journal("weft").await;
    assert!(
        journal.contains("Watchdog timeout"),
        "no watchdog timeout in the journal:\n{journal}"
    );
    eprintln!(
        "systemd: SIGSTOPped agent killed by a 3 s watchdog and running again after {:?}",
        stopped_at.elapsed()
    );

    // kill -s KILL: restarted after RestartSec, with the shipped unit again.
    write_dropin(&m, None).await;
    timed_systemctl(&m, &["restart", "weft"]).await;
    let before = wait_unit(&m, "running", Duration::from_secs(10), Unit::running).await;
    m.exec_ok(&[
        "sh",
        "-c",
        &format!("kill -s KILL {}", before.get("MainPID")),
    ])
    .await
    .unwrap();
    let killed_at = Instant::now();
    wait_unit(&m, "restart after SIGKILL", Duration::from_secs(20), |u| {
        u.running() && u.restarts() > before.restarts() && u.get("MainPID") != before.get("MainPID")
    })
    .await;
    eprintln!(
        "systemd: SIGKILLed agent running again after {:?}",
        killed_at.elapsed()
    );

    // No run ended in a timeout, and only the injected stop tripped the watchdog.
    assert_results(&m, 1).await;
    stop_cleanly(&m).await;
}

/// Every path below `dir`, as text.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

/// nspawn's default sandbox (no CAP_BPF, `bpf()` refused by its seccomp filter): `auto` falls back
/// to the kernel datapath and the journal names the real cause and its fix, not stale pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run cargo xtask test"]
async fn default_nspawn_sandbox_falls_back_naming_the_cause() {
    let c = cluster(1).await;
    c.write_config(CONFIG).await;
    let m = machine_with_weft(&c, MachineOptions::default_sandbox(), true).await;
    timed_systemctl(&m, &["start", "weft"]).await;
    let u = Unit::read(&m).await;
    assert!(
        u.running() && u.get("StatusText").starts_with("datapath kernel on ens32"),
        "{u:?}\n{}",
        context(&m).await
    );
    let journal = m.journal("weft").await;
    let line = journal
        .lines()
        .find(|l| l.contains("eBPF datapath unavailable"))
        .unwrap_or_else(|| panic!("no fallback message:\n{journal}"));
    eprintln!("systemd: default nspawn sandbox: {line}");
    assert!(
        line.contains("EPERM") && (line.contains("seccomp") || line.contains("lacks CAP_BPF")),
        "the fallback does not name the cause: {line}"
    );
    assert!(
        !line.contains("--cleanup"),
        "stale pins blamed with no pins there: {line}"
    );
}
