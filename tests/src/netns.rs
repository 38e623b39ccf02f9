//! Named network namespaces (`ip netns`) owned by a test, and running things inside them.
//!
//! Interfaces are created directly inside namespaces (`ip -n NS link add ... netns OTHER`), so
//! nothing ever appears in the root namespace and names only need to be unique per namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A network namespace; dropped = every process in it killed, then the namespace deleted.
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: AtomicBool,
}

impl Netns {
    /// Create namespace `name` with its loopback up.
    pub async fn create(name: &str) -> anyhow::Result<Netns> {
        run("ip", &["netns", "add", name]).await?;
        let ns = Netns {
            name: name.to_owned(),
            keep: AtomicBool::new(false),
        };
        ns.ip(&["link", "set", "lo", "up"]).await?;
        Ok(ns)
    }

    /// [`Netns::create`] for synchronous tests.
    pub fn create_blocking(name: &str) -> anyhow::Result<Netns> {
        run_blocking("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
            keep: AtomicBool::new(false),
        };
        ns.ip_blocking(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// [`Netns::ip`] for synchronous tests.
    pub fn ip_blocking(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_blocking("ip", &full)
    }

    /// A blocking command that runs `program args` inside the namespace.
    pub fn command_blocking(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// The namespace's file, for `setns` ([`spawn_in`] takes it too).
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The namespace name, as `ip netns exec NAME` takes it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`, an error with ip's message when it fails.
    pub async fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).await
    }

    /// A veth pair: `name` here, its peer `peer` in namespace `other` (`ip link add NAME type veth
    /// peer name PEER netns OTHER`). Both ends are down.
    pub async fn add_veth_into(&self, name: &str, peer: &str, other: &str) -> anyhow::Result<()> {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer, "netns", other,
        ])
        .await
        .map(drop)
    }

    /// An up interface `name` with address `cidr` (e.g. `192.168.50.1/24`): a veth whose peer
    /// `<name>-peer` stays in the namespace, up, since this kernel may lack the dummy driver.
    pub async fn add_interface(&self, name: &str, cidr: &str) -> anyhow::Result<()> {
        let peer = format!("{name}-peer");
        for args in [
            &["link", "add", name, "type", "veth", "peer", "name", &peer][..],
            &["addr", "add", cidr, "dev", name],
            &["link", "set", &peer, "up"],
            &["link", "set", name, "up"],
        ] {
            self.ip(args).await?;
        }
        Ok(())
    }

    /// A command that runs `program args` inside the namespace.
    pub fn command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Run `argv` inside the namespace and return its output, whatever its exit status.
    /// Panics only when the command cannot be started at all.
    pub async fn exec(&self, argv: &[&str]) -> Output {
        let (program, args) = argv.split_first().expect("exec needs a program");
        self.command(program, args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("run `{}` in netns {}: {e}", argv.join(" "), self.name))
    }

    /// Run `argv` inside the namespace; stdout when it succeeds, else an error with its output.
    pub async fn exec_ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(argv).await;
        check(&format!("{} (in netns {})", argv.join(" "), self.name), out)
    }

    /// Set a sysctl inside the namespace, e.g. `("net.ipv4.ip_forward", "1")`.
    pub async fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec_ok(&["sysctl", "-qw", &format!("{key}={value}")])
            .await
            .map(drop)
    }

    /// Run `f` on a fresh thread that has joined this namespace; sockets it opens live there.
    /// The test process itself never joins any namespace.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let path = Path::new("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            enter(&path)?;
            f()
        })
    }

    /// Leave the namespace (and whatever runs in it) in place after drop.
    pub fn keep(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }

    /// Pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::Relaxed) {
            if let Err(e) = delete(&self.name) {
                eprintln!("weft-tests cleanup: {e:#}");
            }
        }
    }
}

/// Kill every process inside namespace `name` and delete it. Safe to call on a missing namespace.
pub fn delete(name: &str) -> anyhow::Result<()> {
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids_in(name);
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} in netns {name} survive SIGKILL");
        }
        for pid in pids {
            // SAFETY: kill(2) has no memory effects; the pids are inside a namespace this harness made.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        // Pacing between two looks; the deadline decides.
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new("ip")
        .args(["netns", "delete", name])
        .output()
        .with_context(|| format!("run ip netns delete {name}"))?;
    check(&format!("ip netns delete {name}"), out).map(drop)
}

/// Pids inside namespace `name` (`ip netns pids`), zombies excluded: they are gone already.
pub fn pids_in(name: &str) -> Vec<u32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid| !is_zombie(*pid))
        .collect()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Run `f` on a fresh thread inside namespace `ns`: a name in `/run/netns`, or a path to a
/// namespace file. Panics on that thread when the namespace cannot be joined.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        join(&ns).unwrap_or_else(|e| panic!("{e:#}"));
        f()
    })
}

/// Move the calling thread (only it) into namespace `ns`, a name or a path as for [`spawn_in`].
/// For threads the caller made itself, e.g. scoped ones; never call it on a test's own thread.
pub fn join(ns: &str) -> anyhow::Result<()> {
    if ns.contains('/') {
        enter(Path::new(ns))
    } else {
        enter(&Path::new("/run/netns").join(ns))
    }
}

/// Every namespace name currently in `/run/netns`.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn enter(path: &Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns on a valid namespace fd; it changes only this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns into {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Run a command; stdout when it succeeds, else an error naming it with its output.
pub async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let what = format!("{program} {}", args.join(" "));
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("run `{what}`"))?;
    check(&what, out)
}

fn check(what: &str, out: Output) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `argv` run to completion in this thread's namespace; panics naming the command and its stderr.
/// For test setup steps that cannot fail in a working environment.
pub fn sh(argv: &[&str]) -> String {
    run_blocking(argv[0], &argv[1..]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`run`] for synchronous contexts (setup outside the runtime, Drop).
pub fn run_blocking(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let what = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run `{what}`"))?;
    check(&what, out)
}
