//! The only module that touches aya: load the embedded eBPF object, attach it,
//! pin it under bpffs, adopt what a previous agent pinned, and read and write
//! its maps through typed wrappers.
//!
//! Layout under the pin directory (by default `/sys/fs/bpf/weft/netns-<inode>`,
//! one per network namespace, see [`PinDir`]): `maps-v<N>/WEFT_*` (the maps of layout N, adopted with
//! their entries on restart, or carried over into new maps when the layout
//! changed, see [`layout`]), `maps` (a link to the live set),
//! `progs/<program>-v<N>` and `links/<program>@<interface>` (the attachments;
//! a pinned link keeps its program attached after the agent exits, and a new
//! agent swaps its own program into it atomically).
//!
//! ```no_run
//! # use weft::datapath::{Datapath, DecapHook, NodeSettings};
//! # fn f(settings: NodeSettings) -> Result<(), weft::datapath::DatapathError> {
//! let mut dp = Datapath::load("/sys/fs/bpf/weft/netns-4026531840")?;
//! dp.configure(&settings)?;
//! dp.attach_encap("docker0")?;
//! dp.attach_decap("ens32", DecapHook::for_interface("ens32"))?;
//! # Ok(()) }
//! ```

mod attach;
mod cause;
mod inspect;
pub mod layout;
mod loader;
mod log;
mod maps;
mod maps6;
mod pins;
mod sysctl;
mod test_run;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::Ebpf;
use ipnet::Ipv4Net;
use weft_common::{config_flags, wire, NodeConfig};

use crate::lease::MacAddr;

pub use attach::{Attachment, DecapHook};
pub use cause::{bpffs_mount_fix, Cause};
pub use inspect::{LinkState, PinnedLinkState, PinnedMaps};
pub use layout::Carried;
pub use maps::{Counters, LocalEntry, LocalEntry6, MapFamily, PeerEntry, PeerEntry6};
pub use maps6::{hop_limit, keeps_gso, NodeSettings6};
pub use pins::{ensure_bpffs, BpffsError, LinkPin, PinDir, BPFFS_ROOT};
pub use sysctl::{default_ttl, relax_rp_filter, RpFilterError};
pub use test_run::{ProgramKind, SkbContext, TestRunOutput};

/// Errors of the datapath; each names the program, map or interface and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this weft was built without the eBPF object (WEFT_NO_EBPF was set at build time); run `cargo xtask build-ebpf` and rebuild, or use --datapath kernel")]
    NoObject,
    #[error("create pin directory {path}: {source}{}", pin_dir_fix(source))]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `cause` is worked out when the load fails: a failed start removes the pins afterwards.
    #[error("load the eBPF object (maps pinned in {pin_dir}): {source}{cause}")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
        cause: Cause,
    },
    #[error(
        "program {program} is missing from the eBPF object; rebuild with `cargo xtask build-ebpf`"
    )]
    MissingProgram { program: &'static str },
    #[error("load program {program} into the kernel: {source}; the verifier log above says why (needs root, kernel >= 6.6)")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("attach {program} to {interface}: {reason}")]
    Attach {
        program: &'static str,
        interface: String,
        reason: String,
    },
    #[error("pin {what} at {path}: {reason}")]
    Pin {
        what: String,
        path: PathBuf,
        reason: String,
    },
    #[error("map {map} is missing from the eBPF object; rebuild with `cargo xtask build-ebpf`")]
    MissingMap { map: &'static str },
    #[error("{operation} in map {map}: {source}")]
    Map {
        operation: String,
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("remove {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned maps of another weft build cannot be carried over ({reason}); its programs keep forwarding: to switch, stop the agent, run this build's `weft agent --cleanup` (traffic takes flannel.1 meanwhile) and start it again")]
    Incompatible { reason: String },
    #[error("the maps pinned in {} are of another weft build's layout ({differences}); this build's `weft agent` carries them over when it starts, that build's `weft status` reads them meanwhile", dir.display())]
    OtherLayout { dir: PathBuf, differences: String },
    #[error("test run of {program}: {source}")]
    TestRun {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// A pin directory that cannot be created: bpffs is missing or /sys is read-only, or permissions.
fn pin_dir_fix(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(errno @ (libc::EROFS | libc::EPERM | libc::EACCES)) => {
            Cause::of_errno(errno, Path::new("")).to_string()
        }
        _ => "; is bpffs mounted at /sys/fs/bpf (`mount -t bpf bpf /sys/fs/bpf`)?".to_owned(),
    }
}

/// What the programs need to know about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub vni: u32,
    /// VXLAN UDP port (8472 when the network config says 0).
    pub port: u16,
    /// Our public (underlay) address: the outer source and the decap destination.
    pub vtep_ip: Ipv4Addr,
    /// `flannel.N`'s MAC, advertised in our lease: the inner source.
    pub vtep_mac: MacAddr,
    pub underlay_ifindex: u32,
    pub underlay_mac: MacAddr,
    pub underlay_mtu: u16,
    /// The container bridge (docker0), 0 when unknown.
    pub bridge_ifindex: u32,
    /// The bridge is down (not up and running): the programs neither
    /// encapsulate what its ports receive nor deliver into its containers,
    /// as its disabled ports would not.
    pub bridge_down: bool,
    /// Decrement the inner TTL on encapsulation like a router (the kernel path does).
    pub decrement_ttl: bool,
    /// Outer TTL: what `ttl auto` (flannel.N's setting) uses, the namespace's
    /// `net.ipv4.ip_default_ttl` ([`default_ttl`]).
    pub outer_ttl: u8,
    /// Fill the outer UDP checksum as flannel.N (`udpcsum`) does; GSO packets
    /// still leave with 0 (see the README's eBPF datapath section).
    pub udp_csum: bool,
    /// This host's container subnet: unbound sources inside it go to the
    /// kernel path, outside it are dropped. `None` until the lease is known
    /// (every unbound source goes to the kernel path meanwhile).
    pub subnet: Option<Ipv4Net>,
}

impl NodeSettings {
    /// The map value the programs read.
    pub fn to_map_value(&self) -> NodeConfig {
        let mut flags = 0;
        if self.decrement_ttl {
            flags |= config_flags::DECREMENT_TTL;
        }
        if self.udp_csum {
            flags |= config_flags::UDP_CSUM;
        }
        if self.bridge_down {
            flags |= config_flags::BRIDGE_DOWN;
        }
        let (subnet, mask) = self.subnet.map_or(([0; 4], [0; 4]), |n| {
            (n.trunc().network().octets(), n.netmask().octets())
        });
        NodeConfig {
            vni_ne: self.vni,
            vtep_ip_be: self.vtep_ip.octets(),
            underlay_ifindex_ne: self.underlay_ifindex,
            bridge_ifindex_ne: self.bridge_ifindex,
            port_ne: if self.port == 0 {
                wire::DEFAULT_PORT
            } else {
                self.port
            },
            underlay_mtu_ne: self.underlay_mtu,
            // The kernel's default ip_local_port_range, as udp_flow_src_port uses it.
            sport_min_ne: 32768,
            sport_max_ne: 61000,
            vtep_mac: self.vtep_mac.0,
            underlay_mac: self.underlay_mac.0,
            flags_ne: flags,
            subnet_be: subnet,
            subnet_mask_be: mask,
            outer_ttl: self.outer_ttl,
            pad: [0; 3],
        }
    }
}

/// The loaded eBPF object and where its state is pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinDir,
    /// Maps of another layout whose contents were carried over; their
    /// programs forward until [`Datapath::finish_migration`] swaps every link.
    previous: Option<layout::Previous>,
    /// Links we own; dropping them closes fds, never detaches pinned links.
    /// (link pin path, link).
    links: Vec<(PathBuf, aya::programs::links::FdLink)>,
    /// Reads the programs' log lines while they are switched on ([`log`]).
    _log: Option<log::Reader>,
}

#[cfg(not(weft_no_ebpf))]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WEFT_EBPF_OBJECT_PATH"));

fn object() -> Result<&'static [u8], DatapathError> {
    #[cfg(not(weft_no_ebpf))]
    return Ok(OBJECT);
    #[cfg(weft_no_ebpf)]
    Err(DatapathError::NoObject)
}

impl Datapath {
    /// Loads the embedded object with its maps pinned in
    /// `pin_dir/maps-v<LAYOUT_VERSION>`, adopting maps (and entries) a
    /// previous agent of this layout left there. Maps of another layout are
    /// carried over into new maps (see [`layout`]); the old ones keep serving
    /// the attached programs until [`Datapath::finish_migration`]. Programs
    /// are loaded into the kernel but not attached.
    pub fn load(pin_dir: impl Into<PathBuf>) -> Result<Self, DatapathError> {
        let pin_dir = pin_dir.into();
        let pins = PinDir::new(&pin_dir);
        let previous = layout::prepare(&pins)?;
        let map_dir = pins.maps_of(weft_common::LAYOUT_VERSION);
        let log_level = log::program_level();
        let mut ebpf = loader::loader()
            .default_map_pin_directory(&map_dir)
            // Not required: an object without log calls simply has nothing to switch.
            .override_global(aya_log::LEVEL, log_level, false)
            .load(object()?)
            .map_err(|source| DatapathError::Load {
                cause: Cause::of(&source, &map_dir),
                pin_dir: pin_dir.clone(),
                source: Box::new(source),
            })?;
        if let Some(previous) = &previous {
            let carried = layout::copy_entries(previous, &mut ebpf)?;
            tracing::info!(
                from = %previous.describe(),
                to = weft_common::LAYOUT_VERSION,
                differences = %previous.differences.join("; "),
                remotes = carried.remotes,
                vteps = carried.vteps,
                locals = carried.locals,
                "pinned maps of another layout: entries carried over into new maps; the old programs forward until the links are switched"
            );
        }
        layout::publish(&pins)?;
        for kind in ProgramKind::ALL {
            kind.load(&mut ebpf)?;
        }
        let log = log::start(&mut ebpf, log_level);
        Ok(Self {
            _log: log,
            ebpf,
            pins,
            previous,
            links: Vec::new(),
        })
    }

    /// Where this datapath's state is pinned.
    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// Writes this node's configuration; the programs pass everything until this is done.
    pub fn configure(&mut self, settings: &NodeSettings) -> Result<(), DatapathError> {
        self.config_map()?
            .set(0, settings.to_map_value(), 0)
            .map_err(|source| DatapathError::Map {
                operation: "write node config".into(),
                map: weft_common::map_names::CONFIG,
                source: Box::new(source),
            })
    }
}
