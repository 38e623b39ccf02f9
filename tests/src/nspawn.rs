//! A Debian machine with a real systemd: a bookworm root file system from `debootstrap`, booted with
//! `systemd-nspawn --boot` inside one of the harness's host namespaces, so weft's unit runs exactly as
//! an operator's would and reaches the cluster's etcd over the simulated underlay.
//!
//! ```no_run
//! # async fn f(c: &weft_tests::Cluster) -> anyhow::Result<()> {
//! use weft_tests::nspawn::{Machine, MachineOptions};
//! let m = Machine::boot(c.host(0).name(), MachineOptions::ebpf()).await?;
//! m.install_weft().await?;
//! m.exec_ok(&["systemctl", "start", "weft"]).await?;
//! # Ok(()) }
//! ```
//!
//! - The root file system is built once (about a minute, from the Debian mirror in the machine's apt
//!   sources) and cached in `/var/cache/weft-tests` (`$WEFT_TESTS_CACHE`); every machine boots an
//!   overlay of it, so the cache stays pristine and tests can run side by side.
//! - Commands run inside with `nsenter -a` into the machine's init: no machined, no host systemd
//!   (this harness often runs where PID 1 is not systemd, hence `--register=no --keep-unit`).
//! - The machine gets its own bpffs at `/sys/fs/bpf` (nspawn mounts /sys read-only and without one).

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::netns::{run, run_blocking};

/// The Debian release booted.
pub const SUITE: &str = "bookworm";
/// What `debootstrap --variant=minbase` adds: an init, D-Bus for systemctl, and the tools weft runs.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "iptables",
    "nftables",
    "kmod",
];
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(15);

static NEXT_MACHINE: AtomicU32 = AtomicU32::new(0);

/// The root file system, built on first use: `<cache>/debian-<suite>`. Concurrent callers wait for
/// one build (a lock file); a directory built with another package list is rebuilt.
pub fn rootfs() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("WEFT_TESTS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/weft-tests"));
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let lock = std::fs::File::create(cache.join(".rootfs.lock"))
        .with_context(|| format!("create the lock file in {}", cache.display()))?;
    // SAFETY: flock on an fd we own; released when `lock` is closed at return.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "lock {}: {}",
            cache.display(),
            std::io::Error::last_os_error()
        );
    }
    let dir = cache.join(format!("debian-{SUITE}"));
    let stamp = format!("{SUITE} minbase {}\n", PACKAGES.join(","));
    let stamp_path = dir.join(".weft-rootfs");
    if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(dir);
    }
    let mirror = debian_mirror();
    let tmp = cache.join(format!("debian-{SUITE}.building"));
    let _ = std::fs::remove_dir_all(&tmp);
    let log = cache.join(format!("debian-{SUITE}.debootstrap.log"));
    // Straight to fd 2, not eprintln!: the test harness captures that, and a silent minute would
    // look like a hang.
    let _ = writeln!(
        std::io::stderr(),
        "weft-tests: building the Debian {SUITE} root file system for the systemd tests in {} \
         (debootstrap from {mirror}, a minute or more; cached for later runs; log {})",
        dir.display(),
        log.display()
    );
    let started = Instant::now();
    let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let status = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args([SUITE, &tmp.display().to_string(), &mirror])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("run debootstrap; install it with `apt-get install debootstrap`")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        bail!(
            "debootstrap of {SUITE} from {mirror} failed ({status}):\n{}",
            crate::tail(&text, 30)
        );
    }
    std::fs::write(tmp.join(".weft-rootfs"), &stamp)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("rename {} to {}", tmp.display(), dir.display()))?;
    let _ = writeln!(
        std::io::stderr(),
        "weft-tests: root file system ready in {:.0?}",
        started.elapsed()
    );
    Ok(dir)
}

/// `$WEFT_DEBIAN_MIRROR`, else the first Debian archive (not the security one) this machine's apt
/// uses, else deb.debian.org.
fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("WEFT_DEBIAN_MIRROR") {
        return m;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|w| {
            (w.starts_with("http://") || w.starts_with("https://"))
                && w.trim_end_matches('/').ends_with("/debian")
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// What the machine's sandbox allows.
#[derive(Debug, Clone)]
pub struct MachineOptions {
    /// `--capability=`: added to nspawn's default set.
    pub capabilities: Vec<String>,
    /// `--system-call-filter=`: added to nspawn's allow list.
    pub system_calls: Vec<String>,
}

impl MachineOptions {
    /// What the eBPF datapath needs inside nspawn: loading and pinning programs and maps (CAP_BPF,
    /// CAP_PERFMON, CAP_SYS_ADMIN for bpffs), links and iptables (CAP_NET_ADMIN), and the `bpf` and
    /// `perf_event_open` system calls, which nspawn's seccomp filter refuses by default.
    pub fn ebpf() -> Self {
        MachineOptions {
            capabilities: ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
                .map(str::to_owned)
                .to_vec(),
            system_calls: ["bpf", "perf_event_open"].map(str::to_owned).to_vec(),
        }
    }

    /// nspawn's default sandbox plus CAP_NET_ADMIN (which every datapath needs for its links):
    /// no CAP_BPF, no CAP_PERFMON, and `bpf()` refused by the seccomp filter.
    pub fn default_sandbox() -> Self {
        MachineOptions {
            capabilities: vec!["CAP_NET_ADMIN".to_owned()],
            system_calls: Vec::new(),
        }
    }
}

/// A booted machine; dropped = powered off (killed if it does not stop), its overlay and bpffs
/// unmounted and its directory removed.
pub struct Machine {
    name: String,
    dir: PathBuf,
    nspawn: Child,
    leader: u32,
}

impl Machine {
    /// Boot the cached root file system in network namespace `netns` (a name under /run/netns) and
    /// wait until systemd reports the system running.
    pub async fn boot(netns: &str, opts: MachineOptions) -> anyhow::Result<Machine> {
        sweep_stale();
        let lower = tokio::task::spawn_blocking(rootfs)
            .await
            .context("the rootfs task")??;
        let name = format!(
            "weft-nspawn-{}-{}",
            std::process::id(),
            NEXT_MACHINE.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .context("create the machine's directory")?
            .keep();
        let nspawn = mount_and_spawn(&name, &dir, &lower, netns, &opts);
        let nspawn = match nspawn {
            Ok(child) => child,
            Err(e) => {
                cleanup_dir(&dir);
                return Err(e);
            }
        };
        let mut m = Machine {
            name,
            dir,
            nspawn,
            leader: 0,
        };
        m.leader = m.wait_for_leader().await?;
        m.wait_booted().await?;
        Ok(m)
    }

    async fn wait_for_leader(&mut self) -> anyhow::Result<u32> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let pid = self.nspawn.id();
        loop {
            if let Some(status) = self.nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn exited ({status}) before starting systemd:\n{}",
                    self.console()
                );
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                let comm =
                    std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return Ok(child);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no systemd under systemd-nspawn (pid {pid}) within {BOOT_TIMEOUT:?}:\n{}",
                    self.console()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_booted(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let out = self.exec(&["systemctl", "is-system-running"]).await;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            // degraded: some unit of the minimal Debian failed (none weft needs); still booted.
            if state == "running" || state == "degraded" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the machine did not finish booting within {BOOT_TIMEOUT:?} (state {state:?}):\n{}",
                    self.console()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The machine's host name, also the prefix of its directory.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The machine's root directory as seen from the host (the overlay's merged view).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The machine's `/sys/fs/bpf`, as seen from the host.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    /// PID (in the host's PID namespace) of the machine's systemd.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// Run `argv` inside the machine (all its namespaces); its output whatever the exit status.
    pub async fn exec(&self, argv: &[&str]) -> Output {
        tokio::process::Command::new("nsenter")
            .args(self.nsenter_args(argv))
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run nsenter")
    }

    /// [`Machine::exec`], an error with the output when it fails.
    pub async fn exec_ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        let args = self.nsenter_args(argv);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("nsenter", &args)
            .await
            .with_context(|| format!("in machine {}", self.name))
    }

    fn nsenter_args(&self, argv: &[&str]) -> Vec<String> {
        let mut args = vec![
            "-t".to_owned(),
            self.leader.to_string(),
            "-a".to_owned(),
            "--".to_owned(),
        ];
        args.extend(argv.iter().map(|s| s.to_string()));
        args
    }

    /// `cargo xtask install --destdir <root> --bin <the weft under test>`: the layout an operator
    /// gets, with the unit and the env file from dist/. Runs the xtask binary beside the weft binary.
    pub async fn install_weft(&self) -> anyhow::Result<String> {
        let weft = crate::weft_bin()?;
        let xtask = weft.with_file_name("xtask");
        if !xtask.is_file() {
            bail!(
                "{} is missing; run the tests with `cargo xtask test`, which builds it",
                xtask.display()
            );
        }
        let root = self.root().display().to_string();
        let bin = weft.display().to_string();
        run(
            &xtask.display().to_string(),
            &["install", "--destdir", &root, "--bin", &bin],
        )
        .await
    }

    /// `journalctl -u <unit>` of this boot, with microsecond timestamps.
    pub async fn journal(&self, unit: &str) -> String {
        let out = self
            .exec(&[
                "journalctl",
                "-u",
                unit,
                "--no-pager",
                "-o",
                "short-precise",
            ])
            .await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show <unit> -p <property>`'s value.
    pub async fn property(&self, unit: &str, property: &str) -> anyhow::Result<String> {
        let out = self
            .exec_ok(&["systemctl", "show", unit, "-p", property, "--value"])
            .await?;
        Ok(out.trim().to_owned())
    }

    /// What nspawn and the machine's console printed.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

/// The overlay over the cached root, the machine's bpffs, then `systemd-nspawn --boot`.
fn mount_and_spawn(
    name: &str,
    dir: &Path,
    lower: &Path,
    netns: &str,
    opts: &MachineOptions,
) -> anyhow::Result<Child> {
    let p = |sub: &str| dir.join(sub).display().to_string();
    for sub in ["upper", "work", "root", "bpffs"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let overlay = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        p("upper"),
        p("work")
    );
    run_blocking(
        "mount",
        &["-t", "overlay", "overlay", "-o", &overlay, &p("root")],
    )
    .context("mount the machine's overlay")?;
    run_blocking("mount", &["-t", "bpf", "bpf", &p("bpffs")])
        .context("mount the machine's bpffs")?;
    let mut cmd = Command::new("systemd-nspawn");
    cmd.args(["--boot", "--quiet", "--register=no", "--console=pipe"])
        .arg(format!("--directory={}", p("root")))
        .arg(format!("--machine={name}"))
        .arg(format!("--network-namespace-path=/run/netns/{netns}"))
        .arg(format!("--bind={}:/sys/fs/bpf", p("bpffs")));
    // Without a host systemd there is no manager to create a scope for the machine in.
    if !Path::new("/run/systemd/system").exists() {
        cmd.arg("--keep-unit");
    }
    if !opts.capabilities.is_empty() {
        cmd.arg(format!("--capability={}", opts.capabilities.join(",")));
    }
    if !opts.system_calls.is_empty() {
        cmd.arg(format!(
            "--system-call-filter={}",
            opts.system_calls.join(" ")
        ));
    }
    let console = std::fs::File::create(dir.join("console.log"))?;
    cmd.stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console);
    cmd.spawn()
        .context("start systemd-nspawn; install it with `apt-get install systemd-container`")
}

/// Machines of test processes that died without cleaning up (killed test binaries): their nspawn
/// killed, their overlay and bpffs unmounted, their directory removed.
fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for dir in entries.flatten().map(|e| e.path()) {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let Some(pid) = name
                .strip_prefix("weft-nspawn-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            // The nspawn (by its --directory) and the machine's processes (by their root).
            let root = dir.join("root");
            let arg = format!("--directory={}", root.display());
            for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let cmdline = std::fs::read(proc_dir.path().join("cmdline")).unwrap_or_default();
                let ours = cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())
                    || std::fs::read_link(proc_dir.path().join("root")).is_ok_and(|r| r == root);
                if let (true, Ok(p)) = (ours, proc_dir.file_name().to_string_lossy().parse::<i32>())
                {
                    // SAFETY: kill(2) on a stale systemd-nspawn of a dead test process.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            eprintln!("weft-tests: removing stale machine {}", dir.display());
            cleanup_dir(&dir);
        }
    });
}

fn cleanup_dir(dir: &Path) {
    crate::keep::unmount_below(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("weft-tests cleanup: remove {}: {e}", dir.display());
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // nspawn turns SIGTERM into an orderly poweroff of the machine.
        // SAFETY: kill(2) on our own child, not reaped yet.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + POWEROFF_TIMEOUT;
        while matches!(self.nspawn.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                eprintln!(
                    "weft-tests cleanup: machine {} did not power off within {POWEROFF_TIMEOUT:?}; killing it",
                    self.name
                );
                if self.leader != 0 {
                    // SAFETY: kill(2) on the machine's init (0 would mean our process group,
                    // hence the check); everything in its PID namespace dies with it.
                    unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGKILL) };
                }
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        cleanup_dir(&self.dir);
    }
}
