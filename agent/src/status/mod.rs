//! `weft status`: what the datapath is doing, read from the pinned programs,
//! links and maps, so it works whether or not the agent is running; and what
//! the agent's last reconcile round could not do, from the file the agent
//! keeps for it ([`failures_file`]).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let status = weft::status::collect(std::path::Path::new("/sys/fs/bpf/weft/flannel.1")).await?;
//! println!("{status}");
//! println!("{}", serde_json::to_string_pretty(&status)?);
//! # Ok(()) }
//! ```

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use weft_common::{config_flags, NodeConfig};

mod ipv6;

use ipv6::ipv6_status;
pub use ipv6::Ipv6Status;

use crate::{
    backend::ebpf::HEADROOM_DEVICE,
    datapath::{Datapath, DatapathError, LinkState, PinnedLinkState, PinnedMaps},
    lease::MacAddr,
    netlink::{Interface, Netlink, NetlinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("read the pinned eBPF state in {pin_dir}: {source}; is weft's pin directory right (--bpf-pin-dir) and are you root?")]
    Read {
        pin_dir: PathBuf,
        #[source]
        source: DatapathError,
    },
    #[error("read the last reconcile round's failures from {path}: {reason}; the agent rewrites it after its next round")]
    Failures { path: PathBuf, reason: String },
    #[error("list this namespace's interfaces (to tell live links from stale ones): {source}")]
    Interfaces {
        #[source]
        source: NetlinkError,
    },
}

/// Which datapath carries the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// At least one weft program is attached.
    Ebpf,
    /// No weft program is attached: flannel.N carries everything.
    Kernel,
}

/// One pinned program attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgramStatus {
    pub program: String,
    pub interface: String,
    /// `xdp`, `tcx ingress`, ... as the kernel reports the link; empty when detached.
    pub hook: String,
    /// `attached`, `detached`, `stale` (the interface was recreated) or `unreadable: <why>`.
    pub state: String,
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
}

/// The node configuration the programs use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub configured: bool,
    pub vni: u32,
    pub port: u16,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: String,
    pub underlay_ifindex: u32,
    pub underlay_mac: String,
    pub underlay_mtu: u16,
    pub bridge_ifindex: u32,
    pub decrement_ttl: bool,
    pub outer_ttl: u8,
    pub udp_csum: bool,
    /// This host's container subnet; `None` while unknown.
    pub subnet: Option<Ipv4Net>,
}

/// One remote subnet and its VTEP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub subnet: Ipv4Net,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: String,
}

/// A local container binding: decapsulated packets for `ip` go straight to
/// the container behind port `port`, and encapsulation accepts `ip` only from
/// that port and `mac`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BindingStatus {
    pub ip: Ipv4Addr,
    pub port: u32,
    pub mac: String,
}

/// One counter, summed over all CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CounterStatus {
    pub name: &'static str,
    pub value: u64,
}

/// One step the agent's last reconcile round could not do; the next round retries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileFailure {
    /// The layer that failed: `ebpf`, `vxlan`, `host-gw` or `netlink`.
    pub layer: String,
    /// What failed, on what, and why, as the agent logged it.
    pub error: String,
}

/// Everything `weft status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub mode: Mode,
    pub pin_dir: PathBuf,
    pub programs: Vec<ProgramStatus>,
    /// `None` when no maps are pinned (the agent never ran in eBPF mode, or was cleaned up).
    pub node: Option<NodeStatus>,
    pub peers: Vec<PeerStatus>,
    pub known_vteps: Vec<Ipv4Addr>,
    pub local_bindings: Vec<BindingStatus>,
    /// The IPv6 side (flannel-v6.N's), `None` while not configured and empty.
    pub ipv6: Option<Ipv6Status>,
    pub counters: Vec<CounterStatus>,
    /// The failures of the agent's last reconcile round; empty once a round succeeds.
    pub reconcile_failures: Vec<ReconcileFailure>,
    /// The headroom device, `None` when this namespace has none.
    pub headroom: Option<HeadroomStatus>,
}

/// The headroom device (`weft-headroom`, see the eBPF backend), as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadroomStatus {
    pub interface: String,
    /// The bridge it is a port of (docker0); `None` on none.
    pub bridge: Option<String>,
    /// The bytes it asks to be free in front of every frame, which the bridge asks of every port
    /// and a veth of its peer, the container's eth0; `None` from kernels that do not report it.
    pub needed_headroom: Option<u16>,
}

impl Status {
    /// A counter's value by name, 0 when absent.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.value)
    }
}

/// Reads the state pinned under `pin_dir`, judging the links against this
/// namespace's interfaces. Nothing pinned is not an error: it is the kernel
/// datapath. Needs a tokio runtime (for the netlink socket).
pub async fn collect(pin_dir: &Path) -> Result<Status, StatusError> {
    let (interfaces, headroom) = async {
        let nl = Netlink::connect()?;
        let interfaces = nl.interfaces().await?;
        Ok((interfaces, nl.link_by_name(HEADROOM_DEVICE).await?))
    }
    .await
    .map_err(|source| StatusError::Interfaces { source })?;
    let mut status = collect_with(pin_dir, &interfaces)?;
    status.headroom = headroom.map(|link| HeadroomStatus {
        bridge: link
            .master
            .and_then(|m| interfaces.iter().find(|i| i.index == m))
            .map(|i| i.name.clone()),
        interface: link.name,
        needed_headroom: link.headroom,
    });
    Ok(status)
}

fn collect_with(pin_dir: &Path, interfaces: &[Interface]) -> Result<Status, StatusError> {
    let read_err = |source| StatusError::Read {
        pin_dir: pin_dir.to_path_buf(),
        source,
    };
    let programs: Vec<ProgramStatus> = Datapath::inspect_links(pin_dir)
        .iter()
        .map(|link| program_status(link, interfaces))
        .collect();
    let mode = if programs
        .iter()
        .any(|p| p.link_id.is_some() && p.prog_id.is_some())
    {
        Mode::Ebpf
    } else {
        Mode::Kernel
    };
    let mut status = Status {
        mode,
        pin_dir: pin_dir.to_path_buf(),
        programs,
        node: None,
        peers: Vec::new(),
        known_vteps: Vec::new(),
        local_bindings: Vec::new(),
        ipv6: None,
        counters: Vec::new(),
        reconcile_failures: read_failures(pin_dir)?,
        headroom: None,
    };
    let Some(maps) = PinnedMaps::open(pin_dir).map_err(read_err)? else {
        return Ok(status);
    };
    status.node = Some(node_status(&maps.node_config().map_err(read_err)?));
    status.peers = maps
        .peers()
        .map_err(read_err)?
        .into_iter()
        .map(|p| PeerStatus {
            subnet: p.subnet,
            vtep_ip: p.vtep_ip,
            vtep_mac: p.vtep_mac.to_string(),
        })
        .collect();
    status.known_vteps = maps.vteps().map_err(read_err)?;
    status.local_bindings = maps
        .locals()
        .map_err(read_err)?
        .into_iter()
        .map(|b| BindingStatus {
            ip: b.ip,
            port: b.host_ifindex,
            mac: b.mac.to_string(),
        })
        .collect();
    status.ipv6 = ipv6_status(&maps).map_err(read_err)?;
    status.counters = maps
        .counters()
        .map_err(read_err)?
        .values
        .into_iter()
        .map(|(name, value)| CounterStatus { name, value })
        .collect();
    Ok(status)
}

/// Where the agent pinning under `pin_dir` records its last reconcile round's
/// failures: `/run/weft/reconcile/<pin_dir, escaped as systemd-escape --path>.json`.
/// bpffs holds only BPF objects, so the file lives in /run, named after the pin
/// directory that already tells one agent instance from another.
pub fn failures_file(pin_dir: &Path) -> PathBuf {
    let mut name = String::new();
    for (i, b) in pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .bytes()
        .enumerate()
    {
        match b {
            b'/' => name.push('-'),
            b'.' if i == 0 => name.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' => name.push(b as char),
            b => name.push_str(&format!("\\x{b:02x}")),
        }
    }
    PathBuf::from(FAILURES_DIR).join(format!("{name}.json"))
}

const FAILURES_DIR: &str = "/run/weft/reconcile";

/// Records the outcome of a reconcile round for `weft status`: the failures,
/// or no file at all when the round succeeded.
pub fn record_failures(pin_dir: &Path, failures: &[ReconcileFailure]) -> std::io::Result<()> {
    let path = failures_file(pin_dir);
    if failures.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let json = serde_json::to_vec_pretty(failures).map_err(std::io::Error::other)?;
    crate::files::write_atomic(&path, &json).map_err(std::io::Error::other)
}

fn read_failures(pin_dir: &Path) -> Result<Vec<ReconcileFailure>, StatusError> {
    let path = failures_file(pin_dir);
    let failed = |reason: String| StatusError::Failures {
        path: path.clone(),
        reason,
    };
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| failed(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(failed(e.to_string())),
    }
}

fn program_status(link: &PinnedLinkState, interfaces: &[Interface]) -> ProgramStatus {
    let (hook, state, link_id, prog_id) = match &link.state {
        LinkState::Attached {
            hook,
            link_id,
            prog_id,
            ..
        } => {
            let state = if link.is_live(interfaces) {
                "attached"
            } else {
                "stale"
            };
            (
                hook.to_string(),
                state.to_string(),
                Some(*link_id),
                Some(*prog_id),
            )
        }
        LinkState::Detached { link_id } => {
            (String::new(), "detached".to_string(), Some(*link_id), None)
        }
        LinkState::Unreadable { reason } => {
            (String::new(), format!("unreadable: {reason}"), None, None)
        }
    };
    ProgramStatus {
        program: link.program.clone(),
        interface: link.interface.clone(),
        hook,
        state,
        link_id,
        prog_id,
    }
}

fn node_status(c: &NodeConfig) -> NodeStatus {
    NodeStatus {
        configured: c.vni_ne != 0 || c.vtep_ip_be != [0; 4],
        vni: c.vni_ne,
        port: c.port_ne,
        vtep_ip: Ipv4Addr::from(c.vtep_ip_be),
        vtep_mac: MacAddr(c.vtep_mac).to_string(),
        underlay_ifindex: c.underlay_ifindex_ne,
        underlay_mac: MacAddr(c.underlay_mac).to_string(),
        underlay_mtu: c.underlay_mtu_ne,
        bridge_ifindex: c.bridge_ifindex_ne,
        decrement_ttl: c.flags_ne & config_flags::DECREMENT_TTL != 0,
        outer_ttl: c.outer_ttl,
        udp_csum: c.flags_ne & config_flags::UDP_CSUM != 0,
        subnet: (c.subnet_mask_be != [0; 4])
            .then(|| {
                let prefix = u32::from_be_bytes(c.subnet_mask_be).count_ones() as u8;
                Ipv4Net::new(Ipv4Addr::from(c.subnet_be), prefix).ok()
            })
            .flatten(),
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Ebpf => "ebpf",
            Mode::Kernel => "kernel (no weft program attached; flannel.N carries all traffic)",
        };
        writeln!(f, "datapath:  {mode}")?;
        writeln!(f, "pins:      {}", self.pin_dir.display())?;
        match &self.node {
            Some(n) if n.configured => writeln!(
                f,
                "node:      vtep {} mac {}, vni {}, port {}, underlay ifindex {} mac {} mtu {}, bridge ifindex {}",
                n.vtep_ip, n.vtep_mac, n.vni, n.port, n.underlay_ifindex, n.underlay_mac, n.underlay_mtu, n.bridge_ifindex
            )
            .and_then(|()| {
                writeln!(
                    f,
                    "outer:     ttl {}, udp checksum {}; containers of {}",
                    n.outer_ttl,
                    if n.udp_csum { "on (0 on GSO packets)" } else { "off" },
                    n.subnet.map_or_else(|| "(subnet not known yet)".to_string(), |s| s.to_string())
                )
            })?,
            Some(_) => writeln!(f, "node:      not configured (the programs pass everything)")?,
            None => writeln!(f, "node:      no pinned maps")?,
        }
        writeln!(f, "\nprograms:")?;
        if self.programs.is_empty() {
            writeln!(f, "  (none pinned)")?;
        } else {
            writeln!(
                f,
                "  {:<16} {:<12} {:<16} {:<10} {:>6} {:>6}",
                "PROGRAM", "HOOK", "INTERFACE", "STATE", "LINK", "PROG"
            )?;
            let id = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
            for p in &self.programs {
                let hook = if p.hook.is_empty() { "-" } else { &p.hook };
                writeln!(
                    f,
                    "  {:<16} {:<12} {:<16} {:<10} {:>6} {:>6}",
                    p.program,
                    hook,
                    p.interface,
                    p.state,
                    id(p.link_id),
                    id(p.prog_id)
                )?;
            }
        }
        writeln!(f, "\nremote subnets:")?;
        if self.peers.is_empty() {
            writeln!(f, "  (none)")?;
        } else {
            writeln!(f, "  {:<20} {:<16} VTEP MAC", "SUBNET", "VTEP")?;
            for p in &self.peers {
                writeln!(
                    f,
                    "  {:<20} {:<16} {}",
                    p.subnet.to_string(),
                    p.vtep_ip.to_string(),
                    p.vtep_mac
                )?;
            }
        }
        let vteps: Vec<String> = self.known_vteps.iter().map(ToString::to_string).collect();
        writeln!(
            f,
            "\nknown VTEPs: {}",
            if vteps.is_empty() {
                "(none)".to_string()
            } else {
                vteps.join(", ")
            }
        )?;
        writeln!(
            f,
            "\nlocal bindings (from the bridge's neighbour and fdb entries):"
        )?;
        if self.local_bindings.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for b in &self.local_bindings {
            writeln!(
                f,
                "  {:<16} port ifindex {:<6} mac {}",
                b.ip.to_string(),
                b.port,
                b.mac
            )?;
        }
        if let Some(h) = &self.headroom {
            let room = h.needed_headroom.map_or_else(
                || "(not reported by this kernel)".to_string(),
                |b| format!("{b} bytes"),
            );
            match &h.bridge {
                Some(bridge) => writeln!(
                    f,
                    "\nheadroom:  {} on {bridge}: {room} in front of every container's packet",
                    h.interface
                )?,
                None => writeln!(f, "\nheadroom:  {} on no bridge ({room})", h.interface)?,
            }
        }
        if let Some(ipv6) = &self.ipv6 {
            write!(f, "{ipv6}")?;
        }
        if !self.counters.is_empty() {
            writeln!(f, "\ncounters (all CPUs):")?;
            for c in &self.counters {
                writeln!(f, "  {:<52} {:>14}", c.name, c.value)?;
            }
        }
        if self.reconcile_failures.is_empty() {
            writeln!(f, "\nlast reconcile: no failures")?;
        } else {
            writeln!(f, "\nlast reconcile failed (retried every round):")?;
            for r in &self.reconcile_failures {
                writeln!(f, "  {:<8} {}", r.layer, r.error)?;
            }
        }
        Ok(())
    }
}

/// `/metrics`' view of the eBPF datapath: the pinned maps, read at scrape time.
pub struct PinnedStats {
    pub pin_dir: PathBuf,
}

impl PinnedStats {
    /// `read` on the pinned maps; nothing when none are pinned or they cannot be read.
    fn read<T: Default>(&self, read: impl FnOnce(&PinnedMaps) -> Result<T, DatapathError>) -> T {
        match PinnedMaps::open(&self.pin_dir).and_then(|maps| maps.as_ref().map(read).transpose()) {
            Ok(value) => value.unwrap_or_default(),
            Err(e) => {
                tracing::debug!("reading the pinned eBPF maps for /metrics: {e}");
                T::default()
            }
        }
    }
}

impl crate::metrics::DatapathStats for PinnedStats {
    fn counters(&self) -> Vec<(String, u64)> {
        self.read(|maps| {
            Ok(maps
                .counters()?
                .values
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect())
        })
    }

    fn map_entries(&self) -> Vec<(String, u64)> {
        self.read(|maps| {
            Ok(vec![
                ("peers".to_string(), maps.peers()?.len() as u64),
                ("vteps".to_string(), maps.vteps()?.len() as u64),
                ("local_bindings".to_string(), maps.locals()?.len() as u64),
            ])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_file_is_named_after_the_whole_pin_dir() {
        assert_eq!(
            failures_file(Path::new("/sys/fs/bpf/weft/netns-4026531840")),
            PathBuf::from("/run/weft/reconcile/sys-fs-bpf-weft-netns\\x2d4026531840.json")
        );
        // Two pin dirs that differ only where one has `-` and the other `/`.
        assert_ne!(
            failures_file(Path::new("/tmp/a-b/c")),
            failures_file(Path::new("/tmp/a/b-c"))
        );
    }
}
