//! A real Docker engine per harness host: `dockerd` (Debian's docker.io, with its own containerd
//! and runc) started inside the host's network namespace from the options file the agent wrote,
//! the flanneld + Docker flow end to end.
//!
//! - `nsenter --net=/run/netns/NAME dockerd ...`, not `ip netns exec`: the latter mounts a fresh
//!   /sys in which the cgroup hierarchies are missing ("Devices cgroup isn't mounted").
//! - Each dockerd has its own `--data-root`, `--exec-root`, `--pidfile`, `-H unix://` socket and
//!   `--cgroup-parent` under the host's directory, and the vfs storage driver (no overlay mounts
//!   to leak); nothing touches the machine's own Docker, if any.
//! - Its network options are exactly the agent's `DOCKER_OPT_*` lines (`--bip`, `--ip-masq`,
//!   `--mtu`), so dockerd creates `docker0` itself with the leased subnet.
//! - Containers run [`IMAGE`], a local image imported from a root file system built from
//!   Debian's `busybox-static` (no registry is reachable), cached in the temp dir.
//!
//! Dropped (also while a test panics) = containers removed, dockerd stopped (SIGKILL after a
//! grace period, with every process left in its cgroups), its mounts unmounted, its cgroups and
//! state directory removed.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::cluster::{Host, SubnetEnv};
use crate::etcd::tail;

/// The image every container runs: busybox, `sleep` as its command.
pub const IMAGE: &str = "weft-busybox:latest";
/// Where Debian's busybox-static installs the binary.
const BUSYBOX: &str = "/bin/busybox";
/// How long dockerd may take to answer on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dockerd gets to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// cgroup v1 hierarchies and the v2 one, as Debian mounts them.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One dockerd inside a harness host.
pub struct Dockerd {
    netns: String,
    dir: PathBuf,
    cgroup_parent: String,
    opts_file: PathBuf,
    child: Mutex<Option<Child>>,
    keep: std::sync::atomic::AtomicBool,
    detach: bool,
}

/// A container of a [`Dockerd`], by name.
#[derive(Debug, Clone)]
pub struct DockerContainer {
    socket: String,
    name: String,
    ip: Ipv4Addr,
    pid: u32,
}

/// The `DOCKER_OPT_*` values of an options file in file order (`DOCKER_OPTS`, the combined
/// variable, is skipped so nothing is passed twice).
pub fn docker_opts(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("DOCKER_OPT_"))
        .flat_map(|(_, v)| {
            v.trim()
                .trim_matches('"')
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Delete the harness's own `docker0` from `host`, so dockerd creates it (the agent must start
/// without one).
pub async fn remove_simulated_bridge(host: &Host) -> anyhow::Result<()> {
    if host.netns().ip(&["link", "show", "docker0"]).await.is_ok() {
        host.netns().ip(&["link", "del", "docker0"]).await?;
    }
    Ok(())
}

impl Dockerd {
    /// Start dockerd in `host` once the agent has written its Docker options file, with exactly
    /// those options, and import [`IMAGE`]. Waits until dockerd answers.
    pub async fn start(host: &Host) -> anyhow::Result<Dockerd> {
        Self::start_with(host, false).await
    }

    /// [`Dockerd::start`]; `detach`: in its own process group, so it outlives the terminal that
    /// started it (the demo's keep mode).
    pub async fn start_with(host: &Host, detach: bool) -> anyhow::Result<Dockerd> {
        let opts_file = host.docker_opts_file();
        wait_for_file(&opts_file, START_TIMEOUT).await?;
        let (dir, cgroup_parent) = state_of(host.name(), host.dir());
        let d = Dockerd {
            netns: host.name().to_owned(),
            dir,
            cgroup_parent,
            opts_file,
            child: Mutex::new(None),
            keep: false.into(),
            detach,
        };
        d.spawn().await?;
        d.import_image().await?;
        Ok(d)
    }

    /// The options dockerd was (or will be) started with, from the agent's file.
    pub fn network_opts(&self) -> anyhow::Result<Vec<String>> {
        let text = std::fs::read_to_string(&self.opts_file)
            .with_context(|| format!("read {}", self.opts_file.display()))?;
        Ok(docker_opts(&text))
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn spawn(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        let mut args: Vec<String> = vec![
            format!("--net=/run/netns/{}", self.netns),
            "dockerd".into(),
            format!("--data-root={}", self.path("data")),
            format!("--exec-root={}", self.path("exec")),
            format!("--pidfile={}", self.path("dockerd.pid")),
            format!("--host=unix://{}", self.path("docker.sock")),
            format!("--cgroup-parent={}", self.cgroup_parent),
            "--storage-driver=vfs".into(),
        ];
        args.extend(self.network_opts()?);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .context("open the dockerd log")?;
        use std::io::Write as _;
        writeln!(&log, "=== weft-tests: nsenter {}", args.join(" "))?;
        let mut cmd = Command::new("nsenter");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.detach {
            use std::os::unix::process::CommandExt as _;
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .context("start dockerd with nsenter (install docker.io)")?;
        *self.lock() = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self
                .docker(&["version", "--format", "{{.Server.Version}}"])
                .await
                .is_ok()
            {
                return Ok(());
            }
            let exited = self
                .lock()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                bail!(
                    "dockerd in {} did not come up ({}); its log:\n{}",
                    self.netns,
                    exited.map_or("timeout".into(), |s| s.to_string()),
                    tail(&self.log(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `unix://...`, for `docker -H`.
    pub fn socket(&self) -> String {
        format!("unix://{}", self.path("docker.sock"))
    }

    /// dockerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("dockerd.log")).unwrap_or_default()
    }

    /// `docker -H <socket> <args>`: stdout, or an error with docker's output.
    pub async fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        docker(&self.socket(), args).await
    }

    async fn import_image(&self) -> anyhow::Result<()> {
        let tar = busybox_rootfs_tar()?;
        self.docker(&[
            "import",
            "--change",
            r#"CMD ["sleep", "1000000"]"#,
            &tar.display().to_string(),
            IMAGE,
        ])
        .await
        .map(drop)
    }

    /// `docker run -d --name <name> IMAGE` on the default bridge; the container's address is the
    /// one Docker's IPAM gave it from `--bip`.
    pub async fn run(&self, name: &str) -> anyhow::Result<DockerContainer> {
        self.docker(&["run", "-d", "--name", name, IMAGE]).await?;
        let info = self
            .docker(&[
                "inspect",
                "--format",
                "{{.NetworkSettings.IPAddress}} {{.State.Pid}}",
                name,
            ])
            .await?;
        let mut parts = info.split_whitespace();
        let (Some(ip), Some(pid)) = (parts.next(), parts.next()) else {
            bail!("docker inspect {name}: unexpected output {info:?}");
        };
        Ok(DockerContainer {
            socket: self.socket(),
            name: name.to_owned(),
            ip: ip
                .parse()
                .with_context(|| format!("address of {name}: {ip:?}"))?,
            pid: pid
                .parse()
                .with_context(|| format!("pid of {name}: {pid:?}"))?,
        })
    }

    /// Stop dockerd gracefully (its containers stop with it), keeping its state for a restart.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let Some(mut child) = self.lock().take() else {
            bail!("dockerd in {} is not running", self.netns)
        };
        // SAFETY: kill(2) on our own child (nsenter execs dockerd, same pid), not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("dockerd in {} ignored SIGTERM, killed", self.netns);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stop and start dockerd again with the options file as it is now.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Start a dockerd stopped with [`Dockerd::stop`] again, with the same state.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// dockerd's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// Leave dockerd running after this handle is dropped (the demo's keep mode).
    pub fn keep(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(mut child) = self.lock().take() {
            stop_blocking(&self.socket(), child.id() as i32);
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_docker_state(&self.dir, &self.cgroup_parent);
    }
}

/// The state directory and cgroup parent of the dockerd of host `host_name` whose directory is
/// `host_dir`: what [`Dockerd::start`] uses, for removing a kept one.
pub fn state_of(host_name: &str, host_dir: &Path) -> (PathBuf, String) {
    (host_dir.join("docker"), format!("{host_name}-docker"))
}

/// Stop a dockerd kept running (the demo's `--down`): its containers removed, SIGTERM to the pid
/// in its pidfile, then [`remove_docker_state`]. Quiet when there is nothing to stop.
pub fn stop_kept(host_name: &str, host_dir: &Path) {
    let (dir, cgroup_parent) = state_of(host_name, host_dir);
    let pid = std::fs::read_to_string(dir.join("dockerd.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    if let Some(pid) = pid.filter(|p| Path::new(&format!("/proc/{p}")).exists()) {
        let socket = format!("unix://{}", dir.join("docker.sock").display());
        stop_blocking(&socket, pid);
        // SAFETY: kill(2) on the pid dockerd wrote to its own pidfile, if it still runs.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    remove_docker_state(&dir, &cgroup_parent);
}

/// Remove every container with no stop grace (dockerd would wait 10 s on each `sleep`), then
/// SIGTERM dockerd and wait up to [`STOP_TIMEOUT`] for it to exit.
fn stop_blocking(socket: &str, pid: i32) {
    if let Ok(ids) = docker_blocking(socket, &["ps", "-aq"]) {
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = docker_blocking(socket, &[&["rm", "-f"][..], &ids].concat());
        }
    }
    // SAFETY: kill(2) on a dockerd pid we started (or that its pidfile names).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline && alive(pid) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` runs (a zombie, exited but not reaped, does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Remove what a stopped (or crashed) dockerd leaves: every process still in its cgroups
/// (containerd, shims, containers) killed, mounts below `dir` unmounted, the cgroups and `dir`
/// removed. Errors are printed, not returned: this runs on drop and in `demo --down`.
pub fn remove_docker_state(dir: &Path, cgroup_parent: &str) {
    let cgroups = cgroup_dirs(cgroup_parent);
    for _ in 0..50 {
        let pids: Vec<i32> = cgroups.iter().flat_map(|d| cgroup_pids(d)).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) on pids listed in cgroups this dockerd created for its containers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    crate::keep::unmount_below(dir);
    for cg in &cgroups {
        remove_cgroup_tree(cg);
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!("weft-tests cleanup: remove {}: {e}", dir.display());
        }
    }
}

/// `/sys/fs/cgroup/<hierarchy>/<parent>` for every hierarchy where it exists.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = hierarchies
        .flatten()
        .map(|h| h.path().join(parent))
        .filter(|p| p.is_dir())
        .collect();
    // A v2-only machine: the parent sits directly under the root.
    let direct = Path::new(CGROUP_ROOT).join(parent);
    if direct.join("cgroup.procs").exists() && !dirs.contains(&direct) {
        dirs.push(direct);
    }
    dirs
}

/// Every pid in cgroup `dir` and below.
fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten().filter(|e| e.path().is_dir()) {
            pids.extend(cgroup_pids(&e.path()));
        }
    }
    pids
}

/// rmdir a cgroup and its children, deepest first (cgroupfs only removes empty directories).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten().filter(|e| e.path().is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("weft-tests cleanup: remove cgroup {}: {e}", dir.display());
    }
}

impl DockerContainer {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address Docker gave it on docker0.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its init's pid on the machine (for `/proc/<pid>/ns/net`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `docker exec <name> <argv>`: stdout, or an error with its output.
    pub async fn exec(&self, argv: &[&str]) -> anyhow::Result<String> {
        docker(&self.socket, &[&["exec", &self.name][..], argv].concat()).await
    }

    /// Ping `ip` `count` times at `interval_ms`; (transmitted, received).
    pub async fn ping_count(
        &self,
        ip: Ipv4Addr,
        count: u32,
        interval_ms: u32,
    ) -> anyhow::Result<(u32, u32)> {
        let (count, interval) = (
            count.to_string(),
            format!("{}", f64::from(interval_ms) / 1000.0),
        );
        let argv = [
            "docker",
            "-H",
            &self.socket,
            "exec",
            &self.name,
            "ping",
            "-n",
            "-c",
            &count,
            "-i",
            &interval,
            "-W",
            "1",
            &ip.to_string(),
        ];
        let out = tokio::process::Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .await
            .context("run docker exec ping")?;
        let text = String::from_utf8_lossy(&out.stdout);
        crate::container::ping_summary(&text).with_context(|| {
            format!(
                "ping {ip} from {}: no summary:\n{text}{}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// One ping to `ip` answered within 2 s, or an error with ping's output.
    pub async fn ping(&self, ip: Ipv4Addr) -> anyhow::Result<()> {
        self.exec(&["ping", "-n", "-c", "1", "-W", "2", &ip.to_string()])
            .await
            .map(drop)
            .with_context(|| format!("ping {ip} from container {} ({})", self.name, self.ip))
    }

    /// The interface index of the host end of its veth (`eth0`'s peer), which names the bridge port.
    pub async fn host_ifindex(&self) -> anyhow::Result<u32> {
        let out = self.exec(&["cat", "/sys/class/net/eth0/iflink"]).await?;
        out.trim()
            .parse()
            .with_context(|| format!("iflink of {}: {out:?}", self.name))
    }

    /// Open a TCP connection from this container to `to` and return the source address `to` saw.
    /// The listening socket is opened by a thread that joined `to`'s network namespace, so what it
    /// reports is what an application in the receiving container would see.
    pub async fn source_seen_by(&self, to: &DockerContainer) -> anyhow::Result<SocketAddr> {
        let ns = format!("/proc/{}/ns/net", to.pid);
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || -> anyhow::Result<SocketAddr> {
            crate::netns::enter(Path::new(&ns))?;
            let listener = TcpListener::bind(("0.0.0.0", 0)).context("listen")?;
            tx.send(listener.local_addr()?.port()).ok();
            listener.set_nonblocking(true)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match listener.accept() {
                    Ok((_, peer)) => return Ok(peer),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            bail!("no connection within 10 s");
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(5))
            .context("listener in the receiving container")?;
        let cmd = format!("echo hi | nc -w 3 {} {port}", to.ip);
        let sent = self.exec(&["sh", "-c", &cmd]).await;
        let peer = server
            .join()
            .map_err(|_| anyhow::anyhow!("listener thread panicked"))?;
        peer.with_context(|| format!("connect from {} to {}:{port}: {sent:?}", self.name, to.name))
    }
}

async fn docker(socket: &str, args: &[&str]) -> anyhow::Result<String> {
    crate::netns::run("docker", &[&["-H", socket][..], args].concat()).await
}

fn docker_blocking(socket: &str, args: &[&str]) -> anyhow::Result<String> {
    crate::netns::run_blocking("docker", &[&["-H", socket][..], args].concat())
}

async fn wait_for_file(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!(
                "{} not written within {timeout:?}; is the agent running?",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The subnet file of `host`, once the agent wrote it.
pub async fn subnet_env(host: &Host) -> anyhow::Result<SubnetEnv> {
    let path = host.subnet_file();
    wait_for_file(&path, START_TIMEOUT).await?;
    SubnetEnv::parse(&std::fs::read_to_string(&path)?)
}

/// A tar of a root file system holding busybox and one relative symlink per applet, built once
/// per machine (keyed by the busybox binary's size and mtime) and reused.
pub fn busybox_rootfs_tar() -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(BUSYBOX)
        .with_context(|| format!("{BUSYBOX} missing: install busybox-static"))?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let elf = std::fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?;
    if has_interpreter(&elf) {
        bail!("{BUSYBOX} is dynamically linked and cannot run in an image without libc; install busybox-static (it replaces busybox)");
    }
    let tar = std::env::temp_dir().join(format!("weft-busybox-{}-{mtime}.tar", meta.len()));
    if tar.exists() {
        return Ok(tar);
    }
    let build = tempfile::tempdir().context("temp dir for the busybox root")?;
    let bin = build.path().join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    let applets = crate::netns::run_blocking(BUSYBOX, &["--list"])?;
    for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    // Written under another name and renamed, so parallel tests never read half a tar.
    let partial = build.path().join("rootfs.tar");
    crate::netns::run_blocking(
        "tar",
        &[
            "-C",
            &build.path().join("rootfs").display().to_string(),
            "-cf",
            &partial.display().to_string(),
            ".",
        ],
    )?;
    std::fs::copy(&partial, tar.with_extension("partial"))?;
    std::fs::rename(tar.with_extension("partial"), &tar)?;
    Ok(tar)
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (PT_INTERP), i.e. is
/// dynamically linked.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum))
        .any(|i| u32_at(phoff as usize + i * usize::from(phentsize)) == Some(PT_INTERP))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tells_static_from_dynamic_binaries() {
        // Debian's busybox-static (installed by xtask) must pass; a dynamically linked ls must not.
        let busybox = std::fs::read(super::BUSYBOX).expect("busybox-static installed");
        let ls = std::fs::read("/bin/ls").expect("coreutils");
        assert!(
            !super::has_interpreter(&busybox),
            "busybox-static has no interpreter"
        );
        assert!(super::has_interpreter(&ls), "ls is dynamically linked");
        assert!(!super::has_interpreter(b"not an elf"));
    }

    #[test]
    fn reads_the_agents_docker_options() {
        let text = "DOCKER_OPT_BIP=\"--bip=10.1.10.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.1.10.1/24 --ip-masq=true --mtu=1450\"\n";
        assert_eq!(
            super::docker_opts(text),
            ["--bip=10.1.10.1/24", "--ip-masq=true", "--mtu=1450"]
        );
    }
}
