//! Where the datapath's state lives on bpffs: one type that knows every path
//! under the pin directory, mounts bpffs when needed, and removes it all;
//! and one for a pinned link (its path, adopting it, replacing it, removing it).
//!
//! ```text
//! <pin_dir>/maps-v<N>/WEFT_*          the maps of layout N (weft_common::LAYOUT_VERSION)
//! <pin_dir>/maps -> maps-v<N>         the live set; builds before layout versions look here
//! <pin_dir>/progs/<program>-v<N>      the programs (for bpftool and `weft status`)
//! <pin_dir>/links/<program>@<iface>   the attachments; a new agent swaps its program into them
//! ```
//!
//! Names carry no dot: bpffs reserves dotted names for itself and refuses
//! even to look them up (EPERM).

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};
use weft_common::LAYOUT_VERSION;

use super::{inspect::link_state, DatapathError, LinkState};
use crate::netlink::Interface;

/// Where bpffs is mounted on every systemd host.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LIVE_MAPS: &str = "maps";

/// The pin directory of one agent instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The live maps (a link to the versioned directory, or a plain directory
    /// an agent from before layout versions made).
    pub fn live_maps(&self) -> PathBuf {
        self.root.join(LIVE_MAPS)
    }

    /// The maps of layout `version`.
    pub fn maps_of(&self, version: u32) -> PathBuf {
        self.root.join(format!("{LIVE_MAPS}-v{version}"))
    }

    /// Where this build pins `program`: its name carries the layout version.
    pub fn program(&self, program: &str) -> PathBuf {
        self.root
            .join("progs")
            .join(format!("{program}-v{LAYOUT_VERSION}"))
    }

    /// The pinned link of `program` on `interface`.
    pub fn link(&self, program: &str, interface: &str) -> LinkPin {
        LinkPin {
            program: program.to_string(),
            interface: interface.to_string(),
            path: self
                .root
                .join("links")
                .join(format!("{program}@{}", escape(interface))),
        }
    }

    /// Every pinned link, sorted by program and interface.
    pub fn links(&self) -> Vec<LinkPin> {
        let Ok(entries) = std::fs::read_dir(self.root.join("links")) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let (program, interface) = name.split_once('@')?;
                Some(self.link(program, &unescape(interface)))
            })
            .collect();
        out.sort_by(|a, b| (&a.program, &a.interface).cmp(&(&b.program, &b.interface)));
        out
    }

    /// Creates `links/` and `progs/`.
    pub(super) fn create_attach_dirs(&self) -> Result<(), DatapathError> {
        for dir in ["links", "progs"] {
            let path = self.root.join(dir);
            std::fs::create_dir_all(&path)
                .map_err(|source| DatapathError::PinDir { path, source })?;
        }
        Ok(())
    }

    /// Program pins other than this build's (`progs/<program>` of builds
    /// before layout versions, `progs/<program>-v<M>` of others): their links
    /// now run our programs, so these only keep dead programs alive.
    pub(super) fn foreign_programs(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.root.join("progs")) else {
            return Vec::new();
        };
        let suffix = format!("-v{LAYOUT_VERSION}");
        entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().ends_with(&suffix))
            .map(|e| e.path())
            .collect()
    }

    /// Removes every pin (links, programs, every map set and the live link)
    /// and the directory. Keeps going after errors and reports them all.
    pub fn remove_all(&self) -> Result<(), Vec<DatapathError>> {
        let mut errors = Vec::new();
        let live = self.live_maps();
        if live.is_symlink() {
            remove_pin(&live, &mut errors);
        }
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(vec![DatapathError::Unpin {
                    path: self.root.clone(),
                    source,
                }])
            }
        };
        for dir in entries.flatten().filter(|e| e.path().is_dir()) {
            remove_dir(&dir.path(), &mut errors);
        }
        if let Err(source) = std::fs::remove_dir(&self.root) {
            errors.push(DatapathError::Unpin {
                path: self.root.clone(),
                source,
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Removes the pins in `dir` and the directory itself.
pub(super) fn remove_dir(dir: &Path, errors: &mut Vec<DatapathError>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            remove_pin(&entry.path(), errors);
        }
    }
    if let Err(source) = std::fs::remove_dir(dir) {
        if source.kind() != io::ErrorKind::NotFound {
            errors.push(DatapathError::Unpin {
                path: dir.to_path_buf(),
                source,
            });
        }
    }
}

fn remove_pin(path: &Path, errors: &mut Vec<DatapathError>) {
    if let Err(source) = std::fs::remove_file(path) {
        if source.kind() != io::ErrorKind::NotFound {
            errors.push(DatapathError::Unpin {
                path: path.to_path_buf(),
                source,
            });
        }
    }
}

/// One `links/<program>@<interface>` pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPin {
    pub program: String,
    pub interface: String,
    pub path: PathBuf,
}

impl LinkPin {
    /// What the kernel says about the link right now.
    pub fn state(&self) -> LinkState {
        link_state(&self.path)
    }

    /// Attached, and to the interface that now carries the name it was
    /// attached by (a deleted and recreated docker0 has a new index).
    pub fn is_live(&self, interfaces: &[Interface]) -> bool {
        self.state().is_live_on(interfaces, &self.interface)
    }

    /// Swaps our program into the pinned link, if there is a live one
    /// (`swap` is the program's `attach_to_link`: `BPF_LINK_UPDATE`, so the
    /// interface never runs without a program). A stale pin (interface gone,
    /// wrong link type) is removed so a fresh attach follows.
    pub(super) fn adopt<L, F>(&self, swap: F) -> Option<FdLink>
    where
        L: TryFrom<FdLink> + TryInto<FdLink>,
        F: FnOnce(L) -> Result<L, aya::programs::ProgramError>,
    {
        let pinned = PinnedLink::from_pin(&self.path).ok()?;
        let link = L::try_from(FdLink::from(pinned)).ok();
        if let Some(link) = link {
            if let Ok(swapped) = swap(link) {
                if let Ok(fd) = swapped.try_into() {
                    return Some(fd);
                }
            }
        }
        let _ = std::fs::remove_file(&self.path);
        None
    }

    /// Pins a freshly created link in place of whatever was pinned here, so it survives the agent.
    pub(super) fn replace<L: TryInto<FdLink>>(&self, link: L) -> Result<FdLink, DatapathError> {
        let pin_err = |reason: String| DatapathError::Pin {
            what: format!("link on {}", self.interface),
            path: self.path.clone(),
            reason,
        };
        let fd: FdLink = link
            .try_into()
            .map_err(|_| pin_err("the kernel attached through netlink, which cannot be pinned (needs kernel >= 6.6 for TCX, 5.9 for XDP links)".into()))?;
        let _ = std::fs::remove_file(&self.path);
        let pinned = fd.pin(&self.path).map_err(|e| pin_err(e.to_string()))?;
        Ok(FdLink::from(pinned))
    }

    /// Removes the pin; with no fd left the kernel detaches the link. Absent is fine.
    pub fn remove(&self) -> Result<(), DatapathError> {
        let mut errors = Vec::new();
        remove_pin(&self.path, &mut errors);
        errors.pop().map_or(Ok(()), Err)
    }
}

/// Why bpffs is not usable for a pin directory.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "mount bpffs at {path}: {source}{}",
        crate::datapath::bpffs_mount_fix(source, path)
    )]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pin directory {path} is not on a bpffs mount; choose one under {BPFFS_ROOT}")]
    NotBpffs { path: PathBuf },
}

/// Mounts bpffs at /sys/fs/bpf when the pin directory lives there and nothing
/// is mounted; otherwise checks that the pin directory is on bpffs.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), BpffsError> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        tracing::info!(path = BPFFS_ROOT, "mounting bpffs");
        mount_bpffs(root).map_err(|source| BpffsError::Mount {
            path: root.to_path_buf(),
            source,
        })?;
    }
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(root);
    if !is_bpffs(existing) {
        return Err(BpffsError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = c_path(path) else { return false };
    // SAFETY: statfs fills a plain struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and output pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    let target = c_path(path)?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An interface name as a pin name: bpffs refuses names with a dot
/// (`flannel.1`, a VLAN port `eth0.100`), so `.` is written `%2e` (and `%`
/// itself `%25`, which keeps the mapping reversible).
fn escape(interface: &str) -> String {
    interface.replace('%', "%25").replace('.', "%2e")
}

/// The interface name a pin name stands for ([`escape`] undone).
fn unescape(pin: &str) -> String {
    pin.replace("%2e", ".").replace("%25", "%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pin_name_is_versioned_and_free_of_dots() {
        let pins = PinDir::new("/sys/fs/bpf/weft/netns-1");
        let names = [
            pins.maps_of(LAYOUT_VERSION),
            pins.live_maps(),
            pins.program("weft_tc_encap"),
            pins.link("weft_tc_encap", "docker0").path,
            pins.link("weft_tc_host_encap", "flannel.1").path,
        ];
        for path in &names {
            let name = path.file_name().unwrap().to_string_lossy();
            // bpffs refuses to look up dotted names (EPERM).
            assert!(!name.contains('.'), "{}", path.display());
        }
        assert!(names[0].ends_with(format!("maps-v{LAYOUT_VERSION}")));
        assert!(names[2].ends_with(format!("progs/weft_tc_encap-v{LAYOUT_VERSION}")));
        assert!(names[3].ends_with("links/weft_tc_encap@docker0"));
        assert!(names[4].ends_with("links/weft_tc_host_encap@flannel%2e1"));
    }

    #[test]
    fn links_are_listed_from_their_pin_names() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join("links")).unwrap();
        for name in [
            "weft_tc_encap@docker0",
            "weft_tc_decap@ens32",
            "weft_tc_host_encap@flannel%2e1",
            "weft_tc_encap@odd%25name%2e7",
            "stray",
        ] {
            std::fs::write(dir.path().join("links").join(name), b"").unwrap();
        }
        let links: Vec<_> = pins
            .links()
            .into_iter()
            .map(|l| (l.program, l.interface))
            .collect();
        assert_eq!(
            links,
            [
                ("weft_tc_decap".to_string(), "ens32".to_string()),
                ("weft_tc_encap".to_string(), "docker0".to_string()),
                ("weft_tc_encap".to_string(), "odd%name.7".to_string()),
                ("weft_tc_host_encap".to_string(), "flannel.1".to_string()),
            ]
        );
    }
}
