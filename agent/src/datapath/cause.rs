//! Why a `bpf()` or bpffs operation failed, and the fix for that cause.
//!
//! The errno alone does not say it: EPERM comes from a missing capability as well as from a seccomp
//! filter (systemd-nspawn's and Docker's default ones refuse `bpf()`), and the fix differs. So the
//! process's own capability set and seccomp mode (`/proc/self/status`) are read to tell them apart.
//! Stale pins are blamed only when there are pinned maps to blame.

use std::fmt;
use std::path::{Path, PathBuf};

/// `CAP_SYS_ADMIN`, `CAP_PERFMON` and `CAP_BPF` (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the container runtime must allow, said once for every permission cause.
const SANDBOX_FIX: &str = "under systemd keep the unit's CapabilityBoundingSet/AmbientCapabilities; \
     in systemd-nspawn add --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_SYS_ADMIN \
     --system-call-filter='bpf perf_event_open'; in Docker add --cap-add BPF --cap-add PERFMON \
     --cap-add NET_ADMIN --cap-add SYS_ADMIN and a seccomp profile that allows bpf and perf_event_open; \
     or use --datapath kernel";

/// The cause of a failed eBPF operation, displayed as "; <cause>; <fix>" to follow the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// EPERM/EACCES and the process lacks CAP_BPF (and CAP_SYS_ADMIN) or CAP_PERFMON.
    MissingCapability {
        errno: i32,
        missing: Vec<&'static str>,
    },
    /// EPERM/EACCES with the capabilities present (`has`), under a seccomp filter.
    Seccomp { errno: i32, has: Vec<&'static str> },
    /// EPERM/EACCES with the capabilities and no seccomp filter: an LSM or a user namespace.
    Refused { errno: i32, has: Vec<&'static str> },
    /// EROFS: /sys is mounted read-only and holds no bpffs (a container's usual /sys).
    ReadOnly { errno: i32 },
    /// Maps are pinned in the directory already and the load failed for another reason.
    PinnedMaps { dir: PathBuf, count: usize },
    /// Nothing more specific to say.
    Unknown,
}

impl Cause {
    /// The cause of `error` (or of any error in its `source()` chain carrying an errno), for an
    /// operation on maps pinned in `map_dir`.
    pub fn of(error: &(dyn std::error::Error + 'static), map_dir: &Path) -> Cause {
        match errno_in(error) {
            Some(errno) => Self::of_errno(errno, map_dir),
            None => Self::pinned(map_dir),
        }
    }

    /// The cause of a failure with `errno` (e.g. mounting bpffs or creating the pin directory).
    pub fn of_errno(errno: i32, map_dir: &Path) -> Cause {
        match errno {
            libc::EPERM | libc::EACCES => {
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let caps = field(&status, "CapEff:")
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .unwrap_or(0);
                let has = |cap: u32| caps & (1 << cap) != 0;
                let mut missing = Vec::new();
                if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
                    missing.push("CAP_BPF");
                }
                if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
                    missing.push("CAP_PERFMON");
                }
                let has = [
                    (CAP_BPF, "CAP_BPF"),
                    (CAP_PERFMON, "CAP_PERFMON"),
                    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
                ]
                .into_iter()
                .filter(|(cap, _)| has(*cap))
                .map(|(_, name)| name)
                .collect();
                if !missing.is_empty() {
                    Cause::MissingCapability { errno, missing }
                } else if field(&status, "Seccomp:").is_some_and(|v| v != "0") {
                    Cause::Seccomp { errno, has }
                } else {
                    Cause::Refused { errno, has }
                }
            }
            libc::EROFS => Cause::ReadOnly { errno },
            _ => Self::pinned(map_dir),
        }
    }

    fn pinned(map_dir: &Path) -> Cause {
        let count = std::fs::read_dir(map_dir).map_or(0, |d| d.count());
        if count == 0 {
            return Cause::Unknown;
        }
        Cause::PinnedMaps {
            dir: map_dir.to_path_buf(),
            count,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |errno: &i32| errno_name(*errno);
        match self {
            Cause::MissingCapability { errno, missing } => write!(
                f,
                "; the kernel refused with {}: this process lacks {}; {SANDBOX_FIX}",
                name(errno),
                missing.join(" and ")
            ),
            Cause::Seccomp { errno, has } => write!(
                f,
                "; {} although the process has {} (enough for bpf()): a seccomp filter refuses the bpf() system call; {SANDBOX_FIX}",
                name(errno),
                has.join(", ")
            ),
            Cause::Refused { errno, has } => write!(
                f,
                "; {} although the process has {} (enough for bpf()) and no seccomp filter: an LSM (AppArmor, SELinux) or a user namespace refuses bpf(); allow bpf for weft there, or use --datapath kernel",
                name(errno),
                has.join(", ")
            ),
            Cause::ReadOnly { errno } => write!(
                f,
                "; {}: /sys is read-only here and has no bpffs mounted, so weft cannot mount one; mount bpffs at /sys/fs/bpf from outside (systemd-nspawn: --bind=/sys/fs/bpf; Docker: -v /sys/fs/bpf:/sys/fs/bpf), or use --datapath kernel",
                name(errno)
            ),
            Cause::PinnedMaps { dir, count } => write!(
                f,
                "; the maps pinned in {} ({count}) come from an earlier run: if that was another weft version they may not match this one; remove them with `weft agent --cleanup`",
                dir.display()
            ),
            Cause::Unknown => Ok(()),
        }
    }
}

/// The fix for a failed `mount -t bpf bpf <path>`, by errno.
pub fn bpffs_mount_fix(error: &std::io::Error, path: &Path) -> String {
    match error.raw_os_error() {
        Some(libc::EROFS | libc::ENOENT) => Cause::ReadOnly {
            errno: libc::EROFS,
        }
        .to_string(),
        Some(libc::EPERM) => format!(
            "; mounting needs CAP_SYS_ADMIN in the host's user namespace: mount bpffs before weft starts (`mount -t bpf bpf {}` on the host, bound into a container), or use --datapath kernel",
            path.display()
        ),
        _ => format!(
            "; mount it (`mount -t bpf bpf {}`) or use --datapath kernel",
            path.display()
        ),
    }
}

/// The first errno in `error`'s source chain.
fn errno_in(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(code) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        next = e.source();
    }
    None
}

fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EROFS => "EROFS",
        _ => "an error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_sys_says_to_mount_bpffs_from_outside() {
        let c = Cause::of_errno(libc::EROFS, Path::new("/nonexistent"));
        let text = c.to_string();
        assert!(
            text.contains("EROFS") && text.contains("--bind=/sys/fs/bpf"),
            "{text}"
        );
        assert!(!text.contains("mount -t bpf"), "{text}");
    }

    #[test]
    fn pins_are_blamed_only_when_there_are_pins() {
        let dir = std::env::temp_dir().join(format!("weft-cause-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Cause::of_errno(libc::EINVAL, &dir), Cause::Unknown);
        std::fs::write(dir.join("WEFT_PEERS"), b"").unwrap();
        let text = Cause::of_errno(libc::EINVAL, &dir).to_string();
        assert!(
            text.contains("(1) come from an earlier run") && text.contains("--cleanup"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eperm_names_capability_or_seccomp() {
        // Which one depends on this process; either way the errno and the fix are named.
        let text = Cause::of_errno(libc::EPERM, Path::new("/nonexistent")).to_string();
        assert!(text.contains("EPERM"), "{text}");
        assert!(
            text.contains("lacks CAP_") || text.contains("seccomp") || text.contains("LSM"),
            "{text}"
        );
    }

    #[test]
    fn errno_is_found_down_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from_raw_os_error(libc::EROFS));
        assert_eq!(errno_in(&e), Some(libc::EROFS));
    }
}
