//! Keep mode: a cluster left running after the program that built it exits (`cargo xtask demo`),
//! described in a state file so that a later run (`cargo xtask demo --down`) can remove it and
//! check that nothing is left.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::netns;

/// Everything a kept cluster consists of.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Kept {
    /// The cluster's directory (logs, subnet files, etcd data).
    pub dir: PathBuf,
    /// Namespaces in creation order (switch, then each host followed by its containers).
    pub namespaces: Vec<String>,
    /// Processes it runs (etcd, agents), each identified by pid and start time so a reused pid is
    /// never mistaken for ours.
    pub processes: Vec<KeptProcess>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptProcess {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot).
    pub start_time: u64,
}

impl KeptProcess {
    /// The running process `pid`, `None` when it does not exist or is a zombie.
    pub fn of(pid: u32) -> Option<KeptProcess> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the ")" closing the command name: state is field 3, starttime field 22.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            return None; // dead, only not reaped yet
        }
        let start_time = fields.get(19)?.parse().ok()?;
        Some(KeptProcess { pid, start_time })
    }

    /// Whether this very process still exists.
    pub fn alive(&self) -> bool {
        KeptProcess::of(self.pid).is_some_and(|now| now == *self)
    }
}

impl Kept {
    /// Write the state as JSON to `path` (creating its directory).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("encode the cluster state")?;
        std::fs::write(path, json + "\n").with_context(|| format!("write {}", path.display()))
    }

    pub fn load(path: &Path) -> anyhow::Result<Kept> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    /// Remove everything: kill the processes, delete the namespaces (which kills whatever else runs
    /// in them) last-made first, remove the directory; then check that none of it is left.
    pub fn remove(&self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        for p in self.processes.iter().filter(|p| p.alive()) {
            // SAFETY: kill(2) of a process this cluster started, identified by pid and start time.
            unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGKILL) };
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                errors.push(format!("{e:#}"));
            }
        }
        if self.dir.exists() {
            unmount_below(&self.dir);
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                errors.push(format!("remove {}: {e}", self.dir.display()));
            }
        }
        errors.extend(self.leftovers());
        if !errors.is_empty() {
            bail!("cluster not fully removed:\n  {}", errors.join("\n  "));
        }
        Ok(())
    }

    /// What of this cluster still exists, one line each; empty when it is all gone.
    pub fn leftovers(&self) -> Vec<String> {
        let present = netns::list();
        let mut left: Vec<String> = self
            .namespaces
            .iter()
            .filter(|ns| present.contains(ns))
            .map(|ns| format!("namespace {ns} still exists"))
            .collect();
        left.extend(
            self.processes
                .iter()
                .filter(|p| p.alive())
                .map(|p| format!("process {} still runs", p.pid)),
        );
        if self.dir.exists() {
            left.push(format!("directory {} still exists", self.dir.display()));
        }
        left
    }
}

/// Lazily unmount every mount at or below `dir` (the cluster's bpffs), deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let Ok(c) = std::ffi::CString::new(p) else {
            continue;
        };
        // SAFETY: umount2 with a valid NUL-terminated path; MNT_DETACH never blocks.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "weft-tests cleanup: unmount {p}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
