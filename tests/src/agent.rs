//! The weft agent as a real process inside a host namespace: `ip netns exec <host> weft agent ...`.
//!
//! Its stdout and stderr go to a log file, printed when the test panics so a failure shows what the
//! agent did. Dropped = killed.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::tail;

/// How long `stop` waits after SIGTERM before it gives up and kills.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `weft` binary the harness runs: `$WEFT_BIN`, else `weft` next to the running test or xtask
/// binary (`target/debug/weft`).
pub fn weft_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WEFT_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("find the running executable")?;
    let mut dir = exe.parent().context("executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let bin = dir.join("weft");
    if !bin.is_file() {
        bail!(
            "the weft binary is not at {}; build it with `cargo build -p weft` or set WEFT_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running (or stopped) agent; clones share the process.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    netns: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
    keep: std::sync::atomic::AtomicBool,
    detach: bool,
}

impl Agent {
    /// Start `<bin> agent <args>` inside namespace `netns`, logging to `log_path`. `detach`: in its
    /// own process group, so that it outlives the terminal that started it (keep mode).
    pub fn spawn(
        netns: &str,
        args: Vec<String>,
        log_path: &Path,
        detach: bool,
    ) -> anyhow::Result<Agent> {
        Self::spawn_with_env(netns, args, &[], log_path, detach)
    }

    /// [`Agent::spawn`] with environment variables set for the agent (they override RUST_LOG's
    /// default too).
    pub fn spawn_with_env(
        netns: &str,
        args: Vec<String>,
        env: &[(&str, &str)],
        log_path: &Path,
        detach: bool,
    ) -> anyhow::Result<Agent> {
        Self::spawn_bin(&weft_bin()?, netns, args, env, log_path, detach)
    }

    /// [`Agent::spawn_with_env`] with another weft binary than [`weft_bin`] (another build).
    pub fn spawn_bin(
        bin: &Path,
        netns: &str,
        args: Vec<String>,
        env: &[(&str, &str)],
        log_path: &Path,
        detach: bool,
    ) -> anyhow::Result<Agent> {
        let inner = Inner {
            netns: netns.to_owned(),
            bin: bin.to_owned(),
            args,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log_path: log_path.to_owned(),
            child: Mutex::new(None),
            keep: false.into(),
            detach,
        };
        let agent = Agent {
            inner: Arc::new(inner),
        };
        agent.start()?;
        Ok(agent)
    }

    fn start(&self) -> anyhow::Result<()> {
        let inner = &*self.inner;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&inner.log_path)
            .with_context(|| format!("open agent log {}", inner.log_path.display()))?;
        let cmdline = format!(
            "ip netns exec {} {} agent {}",
            inner.netns,
            inner.bin.display(),
            inner.args.join(" ")
        );
        writeln!(log, "=== weft-tests: {cmdline}").context("write the agent log")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &inner.netns])
            .arg(&inner.bin)
            .arg("agent")
            .args(&inner.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicate the agent log handle")?)
            .stderr(log);
        if inner.detach {
            cmd.process_group(0);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            // weft::ebpf=info: the programs as they run by default, without their drop lines
            // (`weft=debug` alone would switch them on); the bench measures these programs.
            cmd.env("RUST_LOG", "info,weft=debug,weft::ebpf=info");
        }
        cmd.envs(inner.env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().with_context(|| format!("start `{cmdline}`"))?;
        *self.child() = Some(child);
        Ok(())
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.inner
            .child
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    /// The host namespace the agent runs in.
    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// Everything the agent (and its earlier runs) printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.inner.log_path).unwrap_or_default()
    }

    /// `None` while the process runs, its exit status once it ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Wait until the log contains `needle`; an error with the log's tail on timeout or exit.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                bail!(
                    "agent in {} exited ({status}) before logging {needle:?}:\n{}",
                    self.inner.netns,
                    tail(&log, 40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent in {} did not log {needle:?} within {timeout:?}:\n{}",
                    self.inner.netns,
                    tail(&log, 40)
                );
            }
            // Pacing between two looks; the deadline decides.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Graceful stop: SIGTERM, then wait for the exit (SIGKILL and an error after 10 s).
    pub async fn stop(&self) -> anyhow::Result<ExitStatus> {
        let Some(pid) = self.pid() else {
            bail!("agent in {} is not running", self.inner.netns)
        };
        // SAFETY: kill(2) on the pid of our own child, which is not reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status() {
                self.child().take();
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "agent in {} ignored SIGTERM for {STOP_TIMEOUT:?}, killed:\n{}",
                    self.inner.netns,
                    tail(&self.log(), 40)
                );
            }
            // Pacing between two looks; the deadline decides.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL (kill -9) and reap; no chance to clean up, as after a crash.
    pub fn kill(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the agent again with the same arguments (stopping it first with SIGTERM if it runs);
    /// the log continues in the same file.
    pub async fn restart(&self) -> anyhow::Result<()> {
        if self.exit_status().is_none() && self.pid().is_some() {
            self.stop().await?;
        }
        self.start()
    }

    /// Leave the process running after every handle is dropped (the demo's keep mode).
    pub fn keep(&self) {
        self.inner
            .keep
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            eprintln!(
                "\n----- weft agent log, netns {} ({}) -----\n{}\n----- end of agent log -----",
                self.netns,
                self.log_path.display(),
                tail(&log, 200)
            );
        }
    }
}
