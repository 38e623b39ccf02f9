//! Reading what an agent pinned, without loading the object and without the
//! agent running: `weft status`, and the backend's check that its programs are
//! still attached.

use std::{
    ffi::CString,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::FromRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use weft_common::{
    map_names, map_names6, Ipv4LpmData, Ipv6LpmData, LocalEndpoint, NodeConfig, NodeConfig6,
    PeerValue, PeerValue6, VtepValue,
};

use super::{
    maps::{list_locals, list_peers, list_vteps, map_err, sum_counters},
    Counters, Datapath, DatapathError, LocalEntry, LocalEntry6, PeerEntry, PeerEntry6, PinDir,
};
use crate::netlink::Interface;

/// The maps a datapath pinned under `<pin_dir>/maps`, opened read-only in spirit.
#[doc(alias = "BPF_OBJ_GET")]
pub struct PinnedMaps {
    remotes: LpmTrie<MapData, Ipv4LpmData, PeerValue>,
    vteps: HashMap<MapData, [u8; 4], VtepValue>,
    config: Array<MapData, NodeConfig>,
    counters: PerCpuArray<MapData, u64>,
    local: HashMap<MapData, [u8; 4], LocalEndpoint>,
    remotes6: LpmTrie<MapData, Ipv6LpmData, PeerValue6>,
    vteps6: HashMap<MapData, [u8; 16], VtepValue>,
    config6: Array<MapData, NodeConfig6>,
    local6: HashMap<MapData, [u8; 16], LocalEndpoint>,
}

fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    MapData::from_pin(PinDir::new(pin_dir).live_maps().join(name))
        .and_then(Map::from_map_data)
        .map_err(map_err("open pinned", name))
}

impl PinnedMaps {
    /// Opens the pinned maps; `Ok(None)` when nothing is pinned under `pin_dir`
    /// (no eBPF datapath ever ran with this directory, or it was cleaned up).
    pub fn open(pin_dir: &Path) -> Result<Option<Self>, DatapathError> {
        let live = PinDir::new(pin_dir).live_maps();
        if !live.join(map_names::CONFIG).exists() {
            return Ok(None);
        }
        let differences = super::layout::differences(&live);
        if !differences.is_empty() {
            return Err(DatapathError::OtherLayout {
                dir: live,
                differences: differences.join("; "),
            });
        }
        let typed = |name: &'static str| move |e| map_err("open pinned", name)(e);
        Ok(Some(Self {
            remotes: LpmTrie::try_from(open_pinned(pin_dir, map_names::REMOTES)?)
                .map_err(typed(map_names::REMOTES))?,
            vteps: HashMap::try_from(open_pinned(pin_dir, map_names::KNOWN_VTEPS)?)
                .map_err(typed(map_names::KNOWN_VTEPS))?,
            config: Array::try_from(open_pinned(pin_dir, map_names::CONFIG)?)
                .map_err(typed(map_names::CONFIG))?,
            counters: PerCpuArray::try_from(open_pinned(pin_dir, map_names::COUNTERS)?)
                .map_err(typed(map_names::COUNTERS))?,
            local: HashMap::try_from(open_pinned(pin_dir, map_names::LOCAL)?)
                .map_err(typed(map_names::LOCAL))?,
            remotes6: LpmTrie::try_from(open_pinned(pin_dir, map_names6::REMOTES6)?)
                .map_err(typed(map_names6::REMOTES6))?,
            vteps6: HashMap::try_from(open_pinned(pin_dir, map_names6::KNOWN_VTEPS6)?)
                .map_err(typed(map_names6::KNOWN_VTEPS6))?,
            config6: Array::try_from(open_pinned(pin_dir, map_names6::CONFIG6)?)
                .map_err(typed(map_names6::CONFIG6))?,
            local6: HashMap::try_from(open_pinned(pin_dir, map_names6::LOCAL6)?)
                .map_err(typed(map_names6::LOCAL6))?,
        }))
    }

    pub fn peers(&self) -> Result<Vec<PeerEntry>, DatapathError> {
        list_peers::<Ipv4Addr, _>(&self.remotes)
    }

    pub fn vteps(&self) -> Result<Vec<Ipv4Addr>, DatapathError> {
        list_vteps::<Ipv4Addr, _>(&self.vteps)
    }

    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        self.config
            .get(&0, 0)
            .map_err(map_err("read node config", map_names::CONFIG))
    }

    pub fn counters(&self) -> Result<Counters, DatapathError> {
        sum_counters(&self.counters)
    }

    /// The local container bindings the agent made.
    pub fn locals(&self) -> Result<Vec<LocalEntry>, DatapathError> {
        list_locals::<Ipv4Addr, _>(&self.local)
    }

    pub fn peers6(&self) -> Result<Vec<PeerEntry6>, DatapathError> {
        list_peers::<Ipv6Addr, _>(&self.remotes6)
    }

    pub fn vteps6(&self) -> Result<Vec<Ipv6Addr>, DatapathError> {
        list_vteps::<Ipv6Addr, _>(&self.vteps6)
    }

    pub fn node_config6(&self) -> Result<NodeConfig6, DatapathError> {
        self.config6
            .get(&0, 0)
            .map_err(map_err("read node config", map_names6::CONFIG6))
    }

    pub fn locals6(&self) -> Result<Vec<LocalEntry6>, DatapathError> {
        list_locals::<Ipv6Addr, _>(&self.local6)
    }
}

/// What the kernel says about one pinned link right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Attached to the interface with this index (in the pinning namespace).
    Attached {
        ifindex: u32,
        hook: &'static str,
        link_id: u32,
        prog_id: u32,
    },
    /// The link exists but its interface went away or it was detached by hand
    /// (`bpftool link detach`): the program no longer runs.
    Detached { link_id: u32 },
    /// The pin could not be opened or queried.
    Unreadable { reason: String },
}

/// One `links/<program>@<interface>` pin and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedLinkState {
    pub program: String,
    pub interface: String,
    pub path: PathBuf,
    pub state: LinkState,
}

impl PinnedLinkState {
    /// Attached, and to the interface that now carries the name it was attached by
    /// (a deleted and recreated docker0 has a new index).
    pub fn is_live(&self, interfaces: &[Interface]) -> bool {
        self.state.is_live_on(interfaces, &self.interface)
    }
}

impl LinkState {
    /// Attached to the interface now named `interface` (of `interfaces`, as
    /// rtnetlink lists this namespace's).
    pub fn is_live_on(&self, interfaces: &[Interface], interface: &str) -> bool {
        match self {
            LinkState::Attached { ifindex, .. } => interfaces
                .iter()
                .any(|i| i.index == *ifindex && i.name == interface),
            _ => false,
        }
    }
}

impl Datapath {
    /// Every link pinned under `pin_dir`, with what the kernel says about it.
    pub fn inspect_links(pin_dir: &Path) -> Vec<PinnedLinkState> {
        PinDir::new(pin_dir)
            .links()
            .into_iter()
            .map(|pin| PinnedLinkState {
                state: pin.state(),
                program: pin.program,
                interface: pin.interface,
                path: pin.path,
            })
            .collect()
    }
}

// aya's LinkInfo does not expose the attachment's ifindex, which is the one
// field that tells a live link from a detached one; ask the kernel directly.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;
const BPF_TCX_INGRESS: u32 = 46;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit, so it is zero: the kernel rejects non-zero bytes past the last field.
    _pad: u32,
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the union, whose XDP and TCX members both
/// start with the ifindex (TCX then has the attach type); the tail is room for
/// the larger union members and must stay zero.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    attach_type: u32,
    _rest: [u64; 6],
}

pub(super) fn link_state(path: &Path) -> LinkState {
    let unreadable = |what: &str| LinkState::Unreadable {
        reason: format!("{what}: {}", std::io::Error::last_os_error()),
    };
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return LinkState::Unreadable {
            reason: "path contains NUL".into(),
        };
    };
    let get = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: attr points to a live, correctly laid out bpf_attr prefix.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return unreadable("open pinned link");
    }
    // SAFETY: the kernel just returned this fd to us; OwnedFd closes it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut info = RawLinkInfo::default();
    let attr = InfoByFdAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: &mut info as *mut RawLinkInfo as u64,
    };
    // SAFETY: attr and info live across the call; info_len is info's size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &attr as *const InfoByFdAttr,
            size_of::<InfoByFdAttr>(),
        )
    };
    if rc < 0 {
        return unreadable("query link");
    }
    if info.ifindex == 0 {
        return LinkState::Detached { link_id: info.id };
    }
    let hook = match (info.link_type, info.attach_type) {
        (BPF_LINK_TYPE_XDP, _) => "xdp",
        (BPF_LINK_TYPE_TCX, BPF_TCX_INGRESS) => "tcx ingress",
        (BPF_LINK_TYPE_TCX, _) => "tcx egress",
        _ => "other",
    };
    LinkState::Attached {
        ifindex: info.ifindex,
        hook,
        link_id: info.id,
        prog_id: info.prog_id,
    }
}
