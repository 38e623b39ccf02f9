//! Replacing the agent on a live host with another build whose pinned maps have another layout:
//! the previous weft (layout 1, built from git at [`PREVIOUS_COMMIT`]) and this one (layout
//! [`LAYOUT_VERSION`]).
//! Two hosts run `weft agent --datapath ebpf`, a container on one pings a container on the other
//! at 100 packets per second, and one host's agent after the other is replaced by the other build.
//! What a user would notice is asserted: not one ping lost, and the programs' counters carried
//! over. Root only: `cargo xtask test -- grade unversioned shape --include-ignored`.
//!
//! The previous build comes from this repository's history (weft_tests::prev_build): a `git
//! worktree` of [`PREVIOUS_COMMIT`] under `<target>/weft-prev/src`, built (its own eBPF object
//! included) into `<target>/weft-prev/target` the first time and reused afterwards.
//! `WEFT_PREV_BIN` names an already built binary instead.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;
use weft_common::LAYOUT_VERSION;
use weft_tests::prev_build::{run, PrevBuild};
use weft_tests::status::{counter, ebpf_ready};
use weft_tests::{cluster, weft_bin, Cluster, Container, Host};

/// The last commit whose eBPF maps have layout 1 (a 40-byte node config, 17 counters).
const PREVIOUS_COMMIT: &str = "96d6bbb";
const CONFIG: &str = r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// What this build logs once every link runs its programs after a layout change.
const COMPLETE: &str = "layout change complete";
/// What both builds log once their encapsulation program is swapped into the pinned link.
const ATTACHED: &str = "encapsulation attached";
/// Pings at 100 per second while agents are replaced.
const PING_INTERVAL: &str = "0.01";

// ---- the previous build -----------------------------------------------------------------------------

/// The weft binary of [`PREVIOUS_COMMIT`], built on first use (once for all tests here).
fn previous_bin() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_previous().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_previous() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WEFT_PREV_BIN") {
        return Ok(PathBuf::from(bin));
    }
    PrevBuild {
        rev: PREVIOUS_COMMIT,
        dir: "weft-prev",
        release: false,
        bin_var: "WEFT_PREV_BIN",
    }
    .build()
}

// ---- agents of either build -------------------------------------------------------------------------

/// `weft agent` of a given build in a host's namespace; killed on drop.
struct BuildAgent {
    child: Child,
    log: PathBuf,
}

impl BuildAgent {
    fn start(host: &Host, bin: &Path, label: &str) -> anyhow::Result<Self> {
        let log = host.dir().join(format!("agent-{label}.log"));
        let out = File::options().create(true).append(true).open(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", host.name()])
            .arg(bin)
            .arg("agent")
            .args(host.agent_args())
            .args(["--datapath", "ebpf"])
            .env("RUST_LOG", "info,weft=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {} agent", bin.display()))?;
        Ok(Self { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent logged `needle` (the pinned state alone says nothing about which
    /// agent made it).
    async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                panic!(
                    "the agent did not log {needle:?} within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM and wait: the agent exits leaving its programs attached and pinned.
    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("agent did not exit within 10 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for BuildAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weft status --json` of build `bin` (each build reads the maps of its own layout).
async fn status(host: &Host, bin: &Path) -> anyhow::Result<Value> {
    let bin = bin.display().to_string();
    let dir = host.bpf_pin_dir().display().to_string();
    let out = host
        .exec_ok(&[&bin, "status", "--json", "--bpf-pin-dir", &dir])
        .await?;
    Ok(serde_json::from_str(&out)?)
}

/// Decapsulation on ens32, encapsulation on docker0, every program attached, one peer.
fn ready(st: &Value) -> bool {
    ebpf_ready(st, 1)
}

/// Polls `status` of build `bin` until `ok`; the last status and the log otherwise.
async fn wait_status(
    host: &Host,
    bin: &Path,
    agent: &BuildAgent,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let st = status(host, bin).await;
        if let Ok(st) = &st {
            if ok(st) {
                return st.clone();
            }
        }
        if Instant::now() > deadline {
            panic!(
                "{}: not {what} within {READY_TIMEOUT:?}; status: {st:?}\nagent log:\n{}",
                host.name(),
                agent.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two hosts running build `bin`, one container each, bound and reachable over eBPF.
async fn cluster_on(bin: &Path, label: &str) -> (Cluster, Vec<BuildAgent>) {
    let c = cluster(2).await;
    c.write_config(CONFIG).await;
    let agents: Vec<_> = c
        .hosts()
        .iter()
        .map(|h| BuildAgent::start(h, bin, label).expect("start agent"))
        .collect();
    c.add_containers(1).await.expect("containers");
    for (h, a) in c.hosts().iter().zip(&agents) {
        wait_status(h, bin, a, "on eBPF with its peer", ready).await;
    }
    let [a, b] = [c.container(0), c.container(1)];
    a.ping_until(b.ip(), READY_TIMEOUT)
        .await
        .expect("a reaches b");
    b.ping_until(a.ip(), READY_TIMEOUT)
        .await
        .expect("b reaches a");
    (c, agents)
}

/// Pings from `from` to `to` at 100 per second, `count` of them, in the background.
fn ping_in_background(
    from: &Container,
    to: std::net::Ipv4Addr,
    count: u32,
) -> tokio::task::JoinHandle<(u32, u32, String)> {
    let from = from.clone();
    tokio::spawn(async move {
        let count = count.to_string();
        let dst = to.to_string();
        let out = from
            .exec(&["ping", "-n", "-q", "-c", &count, "-i", PING_INTERVAL, &dst])
            .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (sent, received) = weft_tests::ping_summary(&text).unwrap_or((0, 0));
        (sent, received, text)
    })
}

/// What one replacement saw: "encapsulated" just before and once the new agent is ready, the
/// time between the two readings, and how long the new agent took from start to ready.
struct Switch {
    before: u64,
    after: u64,
    between: Duration,
    took: Duration,
}

impl Switch {
    /// Counters carried over: without them the new count could be at most what 100 pings per
    /// second each way add in `between`, which the assertion first checks is less than `before`.
    fn assert_carried(&self, host: usize, log: &str) {
        let possible = (self.between.as_secs_f64() * 200.0) as u64 + 20;
        assert!(
            self.before > possible,
            "host {host}: too little traffic before the switch ({}) to tell carried counters from new ones ({possible})",
            self.before
        );
        assert!(
            self.after >= self.before,
            "host {host}: counters not carried over: encapsulated {} before, {} after\n{log}",
            self.before,
            self.after
        );
    }
}

/// Replaces a host's agent (`old`) by build `to` while traffic flows (see [`start_after`]).
async fn replace(
    host: &Host,
    old: BuildAgent,
    status_before: &Path,
    to: (&Path, &str),
    status_after: &Path,
    label: &str,
) -> (BuildAgent, Switch) {
    old.stop().expect("stop the old agent");
    start_after(host, status_before, to, status_after, label).await
}

/// Starts build `to` on a host whose agent stopped, until it logged `done`. `status_before`
/// and `status_after` are the builds whose `weft status` reads the maps before and after (a
/// build reads the layouts it knows).
async fn start_after(
    host: &Host,
    status_before: &Path,
    (to, done): (&Path, &str),
    status_after: &Path,
    label: &str,
) -> (BuildAgent, Switch) {
    // The stopped agent's programs keep forwarding with its maps; read what they counted so far.
    let before = status(host, status_before)
        .await
        .expect("status before the switch");
    let read = Instant::now();
    let before = counter(&before, "encapsulated");
    let started = Instant::now();
    let new = BuildAgent::start(host, to, label).expect("start the new agent");
    new.wait_log(done).await;
    let st = wait_status(host, status_after, &new, "on eBPF after the switch", ready).await;
    let switch = Switch {
        before,
        after: counter(&st, "encapsulated"),
        between: read.elapsed(),
        took: started.elapsed(),
    };
    (new, switch)
}

// ---- the tests --------------------------------------------------------------------------------------

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn upgrade_from_the_previous_layout_loses_no_packet_and_keeps_the_counters() {
    let prev = previous_bin().expect("the previous weft build");
    let current = weft_bin().unwrap();
    let (c, agents) = cluster_on(&prev, "previous").await;
    // This build's `weft status` says what the pinned maps are rather than misreading them.
    let err = status(c.host(0), &current)
        .await
        .expect_err("this build's status on layout 1 maps");
    assert!(
        format!("{err:#}").contains("another weft build's layout"),
        "{err:#}"
    );
    let (a, b) = (c.container(0), c.container(1));
    let ping = ping_in_background(&a, b.ip(), 1500);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut kept = Vec::new();
    for (i, old) in agents.into_iter().enumerate() {
        let host = c.host(i);
        let (new, sw) = replace(host, old, &prev, (&current, COMPLETE), &current, "current").await;
        eprintln!(
            "host {}: layout 1 -> {LAYOUT_VERSION} in {:?} (agent start to every program switched); encapsulated {} before, {} after",
            i + 1,
            sw.took,
            sw.before,
            sw.after
        );
        sw.assert_carried(i + 1, &new.log());
        // The peer's subnet and VTEP were in the new maps before the new programs ran (an
        // unknown VTEP would have been dropped as "unknown source").
        assert!(
            new.log().contains("remotes=1 vteps=1"),
            "host {}: the peer was not carried over:\n{}",
            i + 1,
            new.log()
        );
        assert!(
            new.log().contains("layout change complete"),
            "host {}: the agent did not report the layout change:\n{}",
            i + 1,
            new.log()
        );
        // Only this build's state is pinned: the live maps are this layout, the old ones are gone.
        let pins = host.bpf_pin_dir();
        assert_eq!(
            std::fs::read_link(pins.join("maps")).ok(),
            Some(PathBuf::from(format!("maps-v{LAYOUT_VERSION}"))),
            "maps links to this layout's set"
        );
        let entries: Vec<String> = std::fs::read_dir(&pins)
            .unwrap()
            .chain(std::fs::read_dir(pins.join("progs")).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !entries.iter().any(|e| e == "maps-unversioned"
                || e.starts_with("weft_") && !e.ends_with(&format!("-v{LAYOUT_VERSION}"))),
            "old pins left behind: {entries:?}"
        );
        kept.push(new);
    }
    let (sent, received, text) = ping.await.unwrap();
    eprintln!("ping at 100/s across both upgrades: {sent} sent, {received} received");
    assert!(
        sent == 1500 && received == sent,
        "packets lost across the upgrade: {text}"
    );
    // The new programs carry the traffic, and no VXLAN was dropped for a VTEP missing from the
    // maps during either switch.
    for host in c.hosts() {
        let st = status(host, &current).await.unwrap();
        assert!(ready(&st), "{st:#}");
        assert_eq!(counter(&st, "dropped: unknown source"), 0, "{st:#}");
    }
}

#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn downgrade_to_the_previous_build_loses_no_packet_and_keeps_the_counters() {
    let prev = previous_bin().expect("the previous weft build");
    let current = weft_bin().unwrap();
    let (c, agents) = cluster_on(&current, "current").await;
    let (a, b) = (c.container(0), c.container(1));
    let ping = ping_in_background(&a, b.ip(), 1500);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut kept = Vec::new();
    for (i, new) in agents.into_iter().enumerate() {
        let host = c.host(i);
        // The previous build's own `weft status` refuses maps of this layout (it checks their
        // sizes); this build's reads what its agent runs on.
        let (old, sw) = replace(host, new, &current, (&prev, ATTACHED), &current, "previous").await;
        eprintln!(
            "host {}: layout {LAYOUT_VERSION} -> build {PREVIOUS_COMMIT} in {:?}; encapsulated {} before, {} after",
            i + 1,
            sw.took,
            sw.before,
            sw.after
        );
        sw.assert_carried(i + 1, &old.log());
        // The previous build runs its own programs, swapped into the pinned links.
        assert!(
            old.log().contains("decapsulation attached")
                && old.log().contains("encapsulation attached")
                && old.log().contains("adopted=true"),
            "host {}: the previous build did not adopt the links:\n{}",
            i + 1,
            old.log()
        );
        kept.push(old);
    }
    let (sent, received, text) = ping.await.unwrap();
    eprintln!("ping at 100/s across both downgrades: {sent} sent, {received} received");
    assert!(
        sent == 1500 && received == sent,
        "packets lost across the downgrade: {text}"
    );
    // And upgrading again adopts the same maps (they are this layout throughout).
    let host = c.host(0);
    let old = kept.remove(0);
    let (new, sw) = replace(
        host,
        old,
        &current,
        (&current, ATTACHED),
        &current,
        "current-again",
    )
    .await;
    assert!(sw.after >= sw.before, "{} then {}", sw.before, sw.after);
    assert!(
        !new.log().contains("another layout"),
        "maps of this layout are adopted, not migrated:\n{}",
        new.log()
    );
}

/// Maps whose entries changed shape cannot be carried over: the agent refuses before touching
/// anything, names the command that makes the switch safe, and leaves the pinned maps in place.
/// The maps are made with bpftool in the shape of a build whose remote-subnet values grew.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn maps_whose_entries_changed_shape_are_refused_and_left_in_place() {
    let c = cluster(1).await;
    c.write_config(CONFIG).await;
    let host = c.host(0);
    let maps = host.bpf_pin_dir().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    // (name, type, key, value, entries, flags): layout 1, but 16-byte remote-subnet values.
    let shapes = [
        ("WEFT_REMOTES", "lpm_trie", 8, 16, 16384, 1),
        ("WEFT_VTEPS", "hash", 4, 4, 16384, 0),
        ("WEFT_CONFIG", "array", 4, 40, 1, 0),
        ("WEFT_COUNTERS", "percpu_array", 4, 8, 17, 0),
        ("WEFT_LOCAL", "hash", 4, 16, 4096, 0),
    ];
    for (name, kind, key, value, entries, flags) in shapes {
        let path = maps.join(name);
        run(Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(["type", kind, "key", &key.to_string(), "value"])
            .args([&value.to_string(), "entries", &entries.to_string()])
            .args(["name", name, "flags", &flags.to_string()]))
        .expect("bpftool map create");
    }
    let mut agent = BuildAgent::start(host, &weft_bin().unwrap(), "refused").unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running on maps it cannot carry over:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = agent.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("cannot be carried over")
            && log.contains("WEFT_REMOTES: key 8 value 16")
            && log.contains("weft agent --cleanup"),
        "the refusal names the map and the command:\n{log}"
    );
    let left: Vec<_> = std::fs::read_dir(&maps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 5, "the maps stay where they were: {left:?}");
    assert!(
        !host
            .bpf_pin_dir()
            .join(format!("maps-v{LAYOUT_VERSION}"))
            .exists(),
        "nothing of this build was pinned"
    );
}

/// `bpftool <kind> pin pinned <from> <to>`, then the old pin removed: the object moves.
fn repin(kind: &str, from: &Path, to: &Path) {
    run(Command::new("bpftool")
        .args([kind, "pin", "pinned"])
        .arg(from)
        .arg(to))
    .unwrap_or_else(|e| panic!("{e:#}"));
    std::fs::remove_file(from).unwrap();
}

/// Every map pinned in `from` re-pinned into `to` (which exists); `from` removed.
fn repin_maps(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        repin("map", &entry.path(), &to.join(entry.file_name()));
    }
    std::fs::remove_dir(from).unwrap();
}

/// Two hosts on build `bin`, 800 pings at 100 per second from one container to the other
/// running, and host 1's agent stopped (its programs keep forwarding).
async fn first_agent_stopped_under_traffic(
    bin: &Path,
    label: &str,
) -> (
    Cluster,
    Vec<BuildAgent>,
    tokio::task::JoinHandle<(u32, u32, String)>,
) {
    let (c, mut agents) = cluster_on(bin, label).await;
    let (a, b) = (c.container(0), c.container(1));
    let ping = ping_in_background(&a, b.ip(), 800);
    tokio::time::sleep(Duration::from_secs(4)).await;
    agents.remove(0).stop().unwrap();
    (c, agents, ping)
}

/// The builds between layout 2 and layout versions (e.g. 6e392c6) pinned their maps in a plain
/// `maps/` and programs without a version. That state is made here from this build's own pins;
/// the agent adopts the maps in place (no carrying over), under traffic, and versions the names.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn unversioned_pins_of_this_layout_are_adopted_in_place() {
    let current = weft_bin().unwrap();
    let (c, _agents, ping) = first_agent_stopped_under_traffic(&current, "current").await;
    let host = c.host(0);
    let pins = host.bpf_pin_dir();
    std::fs::remove_file(pins.join("maps")).unwrap();
    std::fs::create_dir(pins.join("maps")).unwrap();
    repin_maps(
        &pins.join(format!("maps-v{LAYOUT_VERSION}")),
        &pins.join("maps"),
    );
    for entry in std::fs::read_dir(pins.join("progs")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let unversioned = name
            .strip_suffix(&format!("-v{LAYOUT_VERSION}"))
            .expect("versioned program pin");
        repin("prog", &entry.path(), &pins.join("progs").join(unversioned));
    }
    let (new, sw) = start_after(
        host,
        &current,
        (&current, ATTACHED),
        &current,
        "current-again",
    )
    .await;
    eprintln!(
        "unversioned -> versioned in {:?}; encapsulated {} before, {} after",
        sw.took, sw.before, sw.after
    );
    sw.assert_carried(1, &new.log());
    assert!(
        !new.log().contains("another layout"),
        "maps of this layout are adopted, not carried over:\n{}",
        new.log()
    );
    assert_eq!(
        std::fs::read_link(pins.join("maps")).ok(),
        Some(PathBuf::from(format!("maps-v{LAYOUT_VERSION}")))
    );
    let progs: Vec<String> = std::fs::read_dir(pins.join("progs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        progs
            .iter()
            .all(|p| p.ends_with(&format!("-v{LAYOUT_VERSION}"))),
        "{progs:?}"
    );
    let (sent, received, text) = ping.await.unwrap();
    eprintln!("ping at 100/s across the adoption: {sent} sent, {received} received");
    assert!(sent == 800 && received == sent, "packets lost: {text}");
}

/// An agent that died during a layout change, right after moving the old maps aside (they are
/// pinned as `maps-unversioned`, nothing is at `maps`): the next start carries them over as if
/// nothing had happened. The state is made by re-pinning the previous build's maps by hand.
#[tokio::test]
#[ignore = "needs root: run cargo xtask test"]
async fn an_upgrade_interrupted_after_moving_the_old_maps_is_finished_at_the_next_start() {
    let prev = previous_bin().expect("the previous weft build");
    let current = weft_bin().unwrap();
    let (c, _agents, ping) = first_agent_stopped_under_traffic(&prev, "previous").await;
    let host = c.host(0);
    let pins = host.bpf_pin_dir();
    let before = status(host, &prev).await.unwrap();
    let aside = pins.join("maps-unversioned");
    std::fs::create_dir(&aside).unwrap();
    repin_maps(&pins.join("maps"), &aside);
    let read = Instant::now();
    let new = BuildAgent::start(host, &current, "current").unwrap();
    new.wait_log(COMPLETE).await;
    let st = wait_status(host, &current, &new, "on eBPF after the switch", ready).await;
    let sw = Switch {
        before: counter(&before, "encapsulated"),
        after: counter(&st, "encapsulated"),
        between: read.elapsed(),
        took: read.elapsed(),
    };
    sw.assert_carried(1, &new.log());
    assert!(
        new.log().contains("remotes=1 vteps=1"),
        "the peer was not carried over:\n{}",
        new.log()
    );
    assert!(!aside.exists(), "the old maps were unpinned");
    let (sent, received, text) = ping.await.unwrap();
    eprintln!("ping at 100/s across the finished upgrade: {sent} sent, {received} received");
    assert!(sent == 800 && received == sent, "packets lost: {text}");
}
