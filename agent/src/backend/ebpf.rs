//! The eBPF backend: the kernel `flannel.<VNI>` backend plus the eBPF fast path.
//!
//! [`VxlanBackend`] keeps programming `flannel.N` exactly as flanneld does: its
//! MAC is the one advertised in our lease, and its neighbours, fdb entries and
//! routes carry whatever the programs pass on (fragments, oversize non-GSO
//! packets, traffic from the host itself). On top of that this backend loads
//! the datapath, attaches encapsulation to the TC ingress of the container
//! bridge and of each of its ports (a container's frames are encapsulated
//! before the bridge sees them), decapsulation to the external interface, and
//! keeps the programs' maps equal to the peer set (remote subnets, known
//! VTEPs) and to the bridge's containers: bindings of address, MAC and port
//! taken from the kernel's own tables (the bridge's neighbour entries and
//! forwarding entries), never from what containers send. Decapsulated packets
//! for a bound address go straight into that container's namespace, and
//! encapsulation accepts a source address only from the port bound to it.
//!
//! Programs, links and maps are pinned under the pin directory, so they keep
//! forwarding while the agent restarts; a new [`EbpfBackend::try_new`] adopts
//! them without a gap. [`cleanup`] removes them (`weft agent --cleanup`).
//!
//! ```no_run
//! # async fn f(nl: weft::netlink::Netlink, vxlan: weft::backend::vxlan::VxlanSettings) -> anyhow::Result<()> {
//! use weft::backend::{ebpf::{EbpfBackend, EbpfSettings}, vxlan::VxlanBackend, Backend};
//! let settings = EbpfSettings::new(vxlan.clone(), "/sys/fs/bpf/weft/flannel.1");
//! match EbpfBackend::try_new(nl.clone(), settings).await {
//!     Ok(backend) => { /* run it */ }
//!     Err(e) => {
//!         tracing::warn!(error = %e, "eBPF datapath unavailable; using the kernel path");
//!         let backend = VxlanBackend::new(nl, vxlan);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::{
    vxlan::{VxlanBackend, VxlanSettings},
    Backend, BackendError,
};
use crate::{
    datapath::{
        default_ttl, ensure_bpffs, if_index, relax_rp_filter, BpffsError, Datapath, DatapathError,
        DecapHook, LocalEntry, NodeSettings, PeerEntry, RpFilterError,
    },
    lease::{BackendAttrs, Lease, LeaseEvent, MacAddr},
    netlink::{BridgeEvents, LinkWatch, Netlink, NetlinkError},
};

pub use crate::datapath::BPFFS_ROOT;
/// The container bridge flanneld users run Docker with.
pub const DEFAULT_BRIDGE: &str = "docker0";

/// The eBPF backend's settings: the kernel backend's, plus where to pin and attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfSettings {
    pub vxlan: VxlanSettings,
    /// Pin directory of this agent instance, by default `/sys/fs/bpf/weft/<instance>`
    /// ([`Datapath::default_pin_dir`]); agents in different network namespaces of
    /// one machine need different ones.
    pub pin_dir: PathBuf,
    /// The container bridge whose TC ingress gets the encapsulation program.
    pub bridge: String,
    /// Decapsulation hook on the external interface; `None` picks by driver
    /// ([`DecapHook::for_interface`]: TC on veth, XDP elsewhere).
    pub decap_hook: Option<DecapHook>,
    /// Fill the outer UDP checksum (flannel.N's `udpcsum`); GSO packets leave with 0.
    pub udp_csum: bool,
}

impl EbpfSettings {
    /// Defaults: bridge `docker0`, decap hook chosen by the external interface's driver.
    pub fn new(vxlan: VxlanSettings, pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            vxlan,
            pin_dir: pin_dir.into(),
            bridge: DEFAULT_BRIDGE.to_string(),
            decap_hook: None,
            udp_csum: true,
        }
    }
}

/// Why the eBPF datapath could not be set up; each names the step, so that
/// `--datapath auto` can log why it fell back to the kernel path.
#[derive(Debug, thiserror::Error)]
pub enum EbpfBackendError {
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("load the eBPF datapath: {source}")]
    Load {
        #[source]
        source: Box<DatapathError>,
    },
    #[error("read external interface {interface}: {source}")]
    Interface {
        interface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("external interface {interface} has no MAC address; the eBPF datapath needs an Ethernet underlay, use --datapath kernel")]
    NoMac { interface: String },
    #[error("prepare the kernel vxlan device the eBPF path falls back to: {source}")]
    Vxlan {
        #[source]
        source: BackendError,
    },
    #[error("write the node configuration map: {source}")]
    Configure {
        #[source]
        source: Box<DatapathError>,
    },
    #[error("attach {what} ({hook}) on {interface}: {source}")]
    Attach {
        what: &'static str,
        hook: &'static str,
        interface: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error(transparent)]
    RpFilter(#[from] RpFilterError),
    #[error("finish switching to this build's map layout: {source}")]
    Migrate {
        #[source]
        source: Box<DatapathError>,
    },
    #[error("list the containers on bridge {bridge}: {source}")]
    Bridge {
        bridge: String,
        #[source]
        source: NetlinkError,
    },
    #[error("{operation}: {source}")]
    Map {
        operation: String,
        #[source]
        source: Box<DatapathError>,
    },
    /// Reconcile went through every step; these failed (each logged as it happened).
    #[error("{} reconcile step(s) failed: {}", .0.len(), join_errors(.0))]
    Steps(Vec<EbpfBackendError>),
}

fn join_errors(errors: &[EbpfBackendError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `flannel.<VNI>` plus the eBPF programs and their maps.
pub struct EbpfBackend {
    nl: Netlink,
    /// Bridge port events, so a new container's port gets encapsulation at once.
    watch: Option<LinkWatch>,
    /// The bridge's own events (created by dockerd, deleted, recreated), so encapsulation follows it at once.
    bridge_events: Option<BridgeEvents>,
    inner: VxlanBackend,
    s: EbpfSettings,
    dp: Datapath,
    hook: DecapHook,
    node: NodeSettings,
    /// The advertised attributes (flannel.N's MAC), as `prepare` returns them.
    attrs: BackendAttrs,
    own: Option<Ipv4Net>,
    /// Encapsulation is attached to the bridge (false while it does not exist yet).
    encap_attached: bool,
    /// Bridge ports with encapsulation attached.
    ports: BTreeSet<String>,
}

impl EbpfBackend {
    /// Sets everything up: bpffs, the datapath (adopting pinned maps and links
    /// of a previous agent), `flannel.N`, the node configuration, decapsulation
    /// on the external interface, encapsulation on the bridge (deferred to
    /// [`Backend::reconcile`] while the bridge does not exist), and loose
    /// rp_filter on the external interface. On error, whatever this call
    /// attached or pinned is removed again so the kernel path runs alone.
    pub async fn try_new(nl: Netlink, settings: EbpfSettings) -> Result<Self, EbpfBackendError> {
        ensure_bpffs(&settings.pin_dir)?;
        let pin_dir = settings.pin_dir.clone();
        let result = Self::setup(nl, settings).await;
        // Maps of another build that cannot be carried over: nothing was
        // touched, and that build's programs keep forwarding until the
        // operator chooses (the error names the command).
        let refused = matches!(
            &result,
            Err(EbpfBackendError::Load { source }) if matches!(**source, DatapathError::Incompatible { .. })
        );
        if result.is_err() && !refused {
            if let Err(errors) = Datapath::detach_and_unpin(&pin_dir) {
                for e in errors {
                    warn!(error = %e, "cleaning up after a failed eBPF setup");
                }
            }
        }
        result
    }

    async fn setup(nl: Netlink, s: EbpfSettings) -> Result<Self, EbpfBackendError> {
        let dp = Datapath::load(&s.pin_dir).map_err(|source| EbpfBackendError::Load {
            source: Box::new(source),
        })?;
        let mut inner = VxlanBackend::new(nl.clone(), s.vxlan.clone());
        let attrs = inner
            .prepare()
            .await
            .map_err(|source| EbpfBackendError::Vxlan { source })?;
        let BackendAttrs::Vxlan { vtep_mac, .. } = attrs else {
            unreachable!("the vxlan backend advertises vxlan attributes");
        };
        let node = node_settings(&nl, &s, vtep_mac).await?;
        let hook = s
            .decap_hook
            .unwrap_or_else(|| DecapHook::for_interface(&s.vxlan.external.name));
        let watch = LinkWatch::subscribe()
            .inspect_err(|e| warn!(error = %e, "not watching the bridge's ports; new containers get the fast path at the next reconcile"))
            .ok();
        let bridge_index = Some(node.bridge_ifindex).filter(|&i| i != 0);
        let bridge_events = BridgeEvents::subscribe(&s.bridge, bridge_index)
            .inspect_err(|e| warn!(error = %e, "not watching the bridge itself; a new or recreated bridge gets encapsulation at the next reconcile"))
            .ok();
        let mut backend = Self {
            nl,
            watch,
            bridge_events,
            inner,
            s,
            dp,
            hook,
            node,
            attrs,
            own: None,
            encap_attached: false,
            ports: BTreeSet::new(),
        };
        backend.configure_and_attach()?;
        backend.finish_migration()?;
        relax_rp_filter(&backend.s.vxlan.external.name)?;
        warn_skipped_netfilter().await;
        Ok(backend)
    }

    /// Writes the node configuration and attaches both programs (adopting pinned links).
    fn configure_and_attach(&mut self) -> Result<(), EbpfBackendError> {
        self.dp
            .configure(&self.node)
            .map_err(|source| EbpfBackendError::Configure {
                source: Box::new(source),
            })?;
        let ext = self.s.vxlan.external.name.clone();
        let a =
            self.dp
                .attach_decap(&ext, self.hook)
                .map_err(|source| EbpfBackendError::Attach {
                    what: "decapsulation",
                    hook: hook_name(self.hook),
                    interface: ext.clone(),
                    source: Box::new(source),
                })?;
        info!(program = a.program, interface = %a.interface, hook = a.hook, adopted = a.adopted, "decapsulation attached");
        self.encap_attached = false;
        self.attach_encap_if_bridge()?;
        Ok(())
    }

    /// After a layout change, once our programs are attached: every other
    /// pinned link switched, counters carried, the old maps unpinned.
    fn finish_migration(&mut self) -> Result<(), EbpfBackendError> {
        if !self.dp.migrating() {
            return Ok(());
        }
        // Bridge ports attached by the previous agent are switched in place,
        // so the new agent knows them as its own.
        let ports: Vec<String> = self
            .dp
            .pins()
            .links()
            .into_iter()
            .filter(|l| {
                l.program == weft_common::program_names::TC_ENCAP && l.interface != self.s.bridge
            })
            .map(|l| l.interface)
            .collect();
        self.dp
            .finish_migration()
            .map_err(|source| EbpfBackendError::Migrate {
                source: Box::new(source),
            })?;
        self.ports.extend(ports);
        Ok(())
    }

    /// Attaches encapsulation when the bridge exists; returns whether it did.
    fn attach_encap_if_bridge(&mut self) -> Result<bool, EbpfBackendError> {
        let bridge = self.s.bridge.clone();
        let index = if_index(&bridge);
        if index == 0 {
            info!(bridge = %bridge, "bridge does not exist yet; encapsulation is attached once it appears, the kernel path carries traffic meanwhile");
            return Ok(false);
        }
        if self.node.bridge_ifindex != index {
            self.node.bridge_ifindex = index;
            self.dp
                .configure(&self.node)
                .map_err(|source| EbpfBackendError::Configure {
                    source: Box::new(source),
                })?;
        }
        let a = self
            .dp
            .attach_encap(&bridge)
            .map_err(|source| EbpfBackendError::Attach {
                what: "encapsulation",
                hook: "tcx ingress",
                interface: bridge.clone(),
                source: Box::new(source),
            })?;
        info!(program = a.program, interface = %a.interface, hook = a.hook, adopted = a.adopted, "encapsulation attached");
        self.encap_attached = true;
        Ok(true)
    }

    /// The pin directory this backend uses (for `weft status` and `--cleanup`).
    pub fn pin_dir(&self) -> &Path {
        &self.s.pin_dir
    }

    /// The decapsulation hook in use.
    pub fn decap_hook(&self) -> DecapHook {
        self.hook
    }

    /// Whether encapsulation is attached (false while the bridge is missing).
    pub fn encap_attached(&self) -> bool {
        self.encap_attached
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&mut self) -> Result<crate::datapath::Counters, DatapathError> {
        self.dp.counters()
    }

    /// The remote-subnet map's entries.
    pub fn peer_entries(&mut self) -> Result<Vec<PeerEntry>, DatapathError> {
        self.dp.peers()
    }

    /// The known-VTEP map's entries.
    pub fn known_vteps(&mut self) -> Result<Vec<Ipv4Addr>, DatapathError> {
        self.dp.vteps_list()
    }

    fn map_err(operation: String) -> impl FnOnce(DatapathError) -> EbpfBackendError {
        move |source| EbpfBackendError::Map {
            operation,
            source: Box::new(source),
        }
    }

    /// The map entry a peer lease needs; `None` for our own subnet and non-vxlan leases.
    fn entry_for(&self, lease: &Lease) -> Option<PeerEntry> {
        match lease.attrs.backend {
            BackendAttrs::Vxlan { vtep_mac, .. } if Some(lease.subnet) != self.own => {
                Some(PeerEntry {
                    subnet: lease.subnet.trunc(),
                    vtep_ip: lease.attrs.public_ip,
                    vtep_mac,
                })
            }
            _ => None,
        }
    }

    /// Adds the VTEP before the subnet, so replies are accepted once we send.
    fn add_entry(&mut self, e: &PeerEntry) -> Result<(), EbpfBackendError> {
        self.dp
            .add_vtep(e.vtep_ip)
            .map_err(Self::map_err(format!("accept VXLAN from {}", e.vtep_ip)))?;
        self.dp
            .upsert_peer(e.subnet, e.vtep_ip, e.vtep_mac)
            .map_err(Self::map_err(format!(
                "route {} to VTEP {}",
                e.subnet, e.vtep_ip
            )))
    }

    /// Removes `subnet`'s entry, and `vtep` from the known VTEPs unless another
    /// subnet still uses it.
    fn remove_entry(&mut self, subnet: Ipv4Net, vtep: Ipv4Addr) -> Result<(), EbpfBackendError> {
        self.dp
            .remove_peer(subnet)
            .map_err(Self::map_err(format!("remove {subnet}")))?;
        self.remove_vtep_if_unused(vtep)
    }

    fn remove_vtep_if_unused(&mut self, vtep: Ipv4Addr) -> Result<(), EbpfBackendError> {
        let peers = self
            .dp
            .peers()
            .map_err(Self::map_err("list remote subnets".into()))?;
        if !peers.iter().any(|p| p.vtep_ip == vtep) {
            self.dp
                .remove_vtep(vtep)
                .map_err(Self::map_err(format!("stop accepting VXLAN from {vtep}")))?;
        }
        Ok(())
    }

    /// Makes the maps equal `peers`; returns the number of changes.
    fn sync_maps(&mut self, peers: &[Lease]) -> Result<usize, EbpfBackendError> {
        let want: BTreeMap<Ipv4Net, PeerEntry> = peers
            .iter()
            .filter_map(|l| self.entry_for(l))
            .map(|e| (e.subnet, e))
            .collect();
        let want_vteps: BTreeSet<Ipv4Addr> = want.values().map(|e| e.vtep_ip).collect();
        let have = self
            .dp
            .peers()
            .map_err(Self::map_err("list remote subnets".into()))?;
        let have_vteps = self
            .dp
            .vteps_list()
            .map_err(Self::map_err("list known VTEPs".into()))?;
        let mut changes = 0;
        for e in want.values() {
            if !have.contains(e) || !have_vteps.contains(&e.vtep_ip) {
                info!(subnet = %e.subnet, vtep = %e.vtep_ip, "adding missing map entry");
                self.add_entry(e)?;
                changes += 1;
            }
        }
        for stale in have.iter().filter(|h| !want.contains_key(&h.subnet)) {
            info!(subnet = %stale.subnet, vtep = %stale.vtep_ip, "removing map entry no lease justifies");
            self.dp
                .remove_peer(stale.subnet)
                .map_err(Self::map_err(format!("remove {}", stale.subnet)))?;
            changes += 1;
        }
        for stale in have_vteps.iter().filter(|v| !want_vteps.contains(v)) {
            info!(vtep = %stale, "no longer accepting VXLAN from a host without a lease");
            self.dp
                .remove_vtep(*stale)
                .map_err(Self::map_err(format!("stop accepting VXLAN from {stale}")))?;
            changes += 1;
        }
        Ok(changes)
    }

    /// Brings the bridge's ports and containers into the datapath: encapsulation
    /// on every port's TC ingress (a container's frames are encapsulated before
    /// the bridge sees them; the bridge's own attachment catches the rest), and
    /// the local-container map. Returns the number of changes.
    async fn sync_bridge(&mut self) -> Result<usize, EbpfBackendError> {
        let bridge = self.s.bridge.clone();
        let err = |source| EbpfBackendError::Bridge {
            bridge: bridge.clone(),
            source,
        };
        // Events queued until now are covered by the tables read below.
        if let (Some(watch), bridge) = (&mut self.watch, self.node.bridge_ifindex) {
            watch.drain(bridge);
        }
        let mut errors = Vec::new();
        let mut changes = 0;
        // Without the bridge (or before it is attached) nothing is bound.
        let mut want = Vec::new();
        let link = match self.nl.link_by_name(&bridge).await {
            Ok(link) => link.filter(|_| self.encap_attached),
            Err(e) => return Err(err(e)),
        };
        if let Some(link) = link {
            let ports = self.nl.bridge_ports(link.index).await.map_err(err)?;
            match self.sync_port_attachments(&ports) {
                Ok(n) => changes += n,
                Err(e) => errors.push(e),
            }
            if let (Some(gateway_mac), Some(own)) = (link.mac, self.own) {
                let learned = self.nl.bridge_learned(link.index).await.map_err(err)?;
                let neighbours = self.nl.neighbours_v4(link.index).await.map_err(err)?;
                if let Some(watch) = &mut self.watch {
                    watch.remember(&neighbours, &learned);
                }
                want = local_entries(own, gateway_mac, &neighbours, &learned, &ports);
            }
        }
        let (local, local_errors) = self.sync_local(&want);
        errors.extend(local_errors);
        if !errors.is_empty() {
            return Err(EbpfBackendError::Steps(errors));
        }
        Ok(changes + local)
    }

    /// Encapsulation on exactly the current ports (re-attached where someone detached it).
    fn sync_port_attachments(
        &mut self,
        ports: &[(u32, String)],
    ) -> Result<usize, EbpfBackendError> {
        let program = weft_common::program_names::TC_ENCAP;
        let mut changes = 0;
        for (_, name) in ports {
            let live = self.dp.pins().link(program, name).is_live();
            if self.ports.contains(name) && live {
                continue;
            }
            let a = self
                .dp
                .attach_encap(name)
                .map_err(|source| EbpfBackendError::Attach {
                    what: "encapsulation",
                    hook: "tcx ingress",
                    interface: name.clone(),
                    source: Box::new(source),
                })?;
            debug!(interface = %a.interface, adopted = a.adopted, "encapsulation attached to a bridge port");
            self.ports.insert(name.clone());
            changes += 1;
        }
        // Ports that left the bridge, also those a previous agent pinned.
        let pinned = self
            .dp
            .pins()
            .links()
            .into_iter()
            .filter(|l| l.program == program)
            .map(|l| l.interface);
        let gone: BTreeSet<String> = self
            .ports
            .iter()
            .cloned()
            .chain(pinned)
            .filter(|i| *i != self.s.bridge && !ports.iter().any(|(_, n)| n == i))
            .collect();
        for name in gone {
            self.dp
                .detach_encap(&name)
                .map_err(Self::map_err(format!("detach encapsulation from {name}")))?;
            self.ports.remove(&name);
            changes += 1;
        }
        Ok(changes)
    }

    /// Makes the local map hold exactly the bindings the kernel's tables
    /// give (`want`): first removes every other entry (stale, or written by
    /// anyone else), then writes the missing ones. Keeps going past errors, so
    /// a failed write never keeps a stale entry alive; returns the number of
    /// changes and the errors.
    fn sync_local(&mut self, want: &[LocalEntry]) -> (usize, Vec<EbpfBackendError>) {
        let mut errors = Vec::new();
        let have = match self.dp.locals() {
            Ok(have) => have,
            Err(e) => {
                errors.push(Self::map_err("list local containers".into())(e));
                return (0, errors);
            }
        };
        let mut changes = 0;
        for stale in have.iter().filter(|h| !want.iter().any(|w| w.ip == h.ip)) {
            debug!(ip = %stale.ip, port = stale.host_ifindex, "binding no longer in the bridge's tables");
            match self.dp.remove_local(stale.ip) {
                Ok(()) => changes += 1,
                Err(e) => errors.push(Self::map_err(format!("unbind {}", stale.ip))(e)),
            }
        }
        for e in want.iter().filter(|e| !have.contains(e)) {
            debug!(ip = %e.ip, port = e.host_ifindex, mac = %crate::netlink::fmt_mac(&e.mac), "container bound");
            match self.dp.upsert_local(e) {
                Ok(()) => changes += 1,
                Err(err) => errors.push(Self::map_err(format!(
                    "bind {} to port {}",
                    e.ip, e.host_ifindex
                ))(err)),
            }
        }
        for e in &errors {
            warn!(error = %e, "local container binding");
        }
        (changes, errors)
    }

    /// Re-attaches programs that were detached (by hand, or because their
    /// interface was deleted and recreated), attaches encapsulation once the
    /// bridge exists, and rewrites an altered node configuration. Returns the
    /// number of repairs.
    fn repair_attachments(&mut self) -> Result<usize, EbpfBackendError> {
        let mut broken = Vec::new();
        let decap = (hook_program(self.hook), self.s.vxlan.external.name.clone());
        let encap = (weft_common::program_names::TC_ENCAP, self.s.bridge.clone());
        for (program, interface) in [&decap, &encap] {
            if *program == encap.0 && !self.encap_attached {
                continue;
            }
            let link = self.dp.pins().link(program, interface);
            let state = link.state();
            if !state.is_live_on(interface) {
                warn!(program, interface = %interface, state = ?state, "program is no longer attached; re-attaching");
                broken.push(program);
            }
        }
        let mut repairs = broken.len();
        if !broken.is_empty() {
            // Reload rather than re-attach one link: a link whose pin was removed
            // is still held by our fd, and only dropping the old datapath frees it.
            let fresh =
                Datapath::load(&self.s.pin_dir).map_err(|source| EbpfBackendError::Load {
                    source: Box::new(source),
                })?;
            drop(std::mem::replace(&mut self.dp, fresh));
            self.ports.clear();
            self.configure_and_attach()?;
        } else if !self.encap_attached && self.attach_encap_if_bridge()? {
            repairs += 1;
        }
        // `ttl auto` follows the sysctl; so does the outer TTL.
        let ttl = default_ttl();
        if ttl != self.node.outer_ttl {
            info!(
                from = self.node.outer_ttl,
                to = ttl,
                "net.ipv4.ip_default_ttl changed; outer TTL follows"
            );
            self.node.outer_ttl = ttl;
        }
        let current = self
            .dp
            .node_config()
            .map_err(Self::map_err("read node config".into()))?;
        if current != self.node.to_map_value() {
            warn!("node configuration map was altered; rewriting it");
            self.dp
                .configure(&self.node)
                .map_err(|source| EbpfBackendError::Configure {
                    source: Box::new(source),
                })?;
            repairs += 1;
        }
        Ok(repairs)
    }
}

/// What the programs need to know about this node.
async fn node_settings(
    nl: &Netlink,
    s: &EbpfSettings,
    vtep_mac: MacAddr,
) -> Result<NodeSettings, EbpfBackendError> {
    let ext = &s.vxlan.external;
    let link = nl
        .link_by_name(&ext.name)
        .await
        .map_err(|source| EbpfBackendError::Interface {
            interface: ext.name.clone(),
            source,
        })?
        .ok_or_else(|| EbpfBackendError::Interface {
            interface: ext.name.clone(),
            source: NetlinkError::NoSuchLink {
                name: ext.name.clone(),
            },
        })?;
    let underlay_mac = link.mac.ok_or_else(|| EbpfBackendError::NoMac {
        interface: ext.name.clone(),
    })?;
    Ok(NodeSettings {
        vni: s.vxlan.vni,
        port: s.vxlan.port(),
        vtep_ip: ext.ipv4,
        vtep_mac,
        underlay_ifindex: link.index,
        underlay_mac,
        // The MTU flannel assumes for the underlay: a configured MTU is the path's.
        underlay_mtu: s.vxlan.mtu.unwrap_or(link.mtu).min(u32::from(u16::MAX)) as u16,
        bridge_ifindex: if_index(&s.bridge),
        // As the kernel path: flannel.N routes (TTL - 1), and its `ttl auto`
        // takes the namespace's default TTL for the outer header.
        decrement_ttl: true,
        outer_ttl: default_ttl(),
        udp_csum: s.udp_csum,
        subnet: None,
    })
}

/// The bindings the kernel itself would deliver by: addresses of subnet
/// `own` whose neighbour entry on the bridge names a MAC (IP -> MAC) that the
/// bridge forwards to one of its current ports (MAC -> port).
fn local_entries(
    own: Ipv4Net,
    gateway_mac: MacAddr,
    neighbours: &[crate::netlink::NeighEntry],
    learned: &[crate::netlink::BridgePortEntry],
    ports: &[(u32, String)],
) -> Vec<LocalEntry> {
    let mut out: Vec<LocalEntry> = neighbours
        .iter()
        .filter(|n| own.contains(&n.ip))
        .filter_map(|n| {
            let mac = n.mac?;
            let port = learned
                .iter()
                .find(|p| p.mac == mac && ports.iter().any(|(i, _)| *i == p.port_index))?;
            Some(LocalEntry {
                ip: n.ip,
                host_ifindex: port.port_index,
                mac,
                gateway_mac,
            })
        })
        .collect();
    out.sort_by_key(|e| e.ip);
    out
}

fn hook_program(hook: DecapHook) -> &'static str {
    match hook {
        DecapHook::Xdp => weft_common::program_names::XDP_DECAP,
        DecapHook::Tc => weft_common::program_names::TC_DECAP,
    }
}

fn hook_name(hook: DecapHook) -> &'static str {
    match hook {
        DecapHook::Xdp => "xdp native",
        DecapHook::Tc => "tcx ingress",
    }
}

/// Detaches and unpins everything a (stopped) agent pinned under `pin_dir`
/// (`weft agent --cleanup`). `flannel.N` and its routes stay: traffic keeps
/// flowing through the kernel path, as it does after flanneld stops; the
/// kernel backend's own cleanup removes the device if wanted. rp_filter stays
/// loose. Keeps going after errors and reports them all.
pub fn cleanup(pin_dir: &Path) -> Result<(), Vec<DatapathError>> {
    Datapath::detach_and_unpin(pin_dir)
}

impl Backend for EbpfBackend {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    async fn prepare_v6(&mut self) -> Result<Option<crate::lease::VxlanData>, BackendError> {
        self.inner.prepare_v6().await // IPv6 rides flannel-v6.<VNI> until the eBPF v6 path lands
    }

    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        let attrs = self.inner.prepare().await?;
        if attrs != self.attrs {
            if let BackendAttrs::Vxlan { vtep_mac, .. } = attrs {
                self.node.vtep_mac = vtep_mac;
                self.dp
                    .configure(&self.node)
                    .map_err(|source| EbpfBackendError::Configure {
                        source: Box::new(source),
                    })?;
            }
            self.attrs = attrs.clone();
        }
        Ok(attrs)
    }

    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        self.inner.own_lease(lease).await?;
        if self.own != Some(lease.subnet) {
            // A subnet that was a peer's (re-acquired after expiry) must not be encapsulated.
            self.dp
                .remove_peer(lease.subnet)
                .map_err(Self::map_err(format!("remove own subnet {}", lease.subnet)))?;
            self.own = Some(lease.subnet);
            // Unbound sources outside it are forged from now on.
            self.node.subnet = Some(lease.subnet);
            self.dp
                .configure(&self.node)
                .map_err(|source| EbpfBackendError::Configure {
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        match event {
            LeaseEvent::Added(lease) => {
                self.inner.apply(event).await?;
                if let Some(e) = self.entry_for(lease) {
                    self.add_entry(&e)?;
                    info!(subnet = %e.subnet, vtep = %e.vtep_ip, "peer added to the eBPF maps");
                }
            }
            LeaseEvent::Changed { old, new } => {
                self.inner.apply(event).await?;
                match self.entry_for(new) {
                    Some(e) => self.add_entry(&e)?,
                    None => self
                        .dp
                        .remove_peer(old.subnet)
                        .map_err(Self::map_err(format!("remove {}", old.subnet)))?,
                }
                if old.attrs.public_ip != new.attrs.public_ip || self.entry_for(new).is_none() {
                    self.remove_vtep_if_unused(old.attrs.public_ip)?;
                }
                info!(subnet = %new.subnet, vtep = %new.attrs.public_ip, "peer changed in the eBPF maps");
            }
            LeaseEvent::Removed(lease) => {
                // Stop encapsulating first; the kernel entries go after.
                self.remove_entry(lease.subnet, lease.attrs.public_ip)?;
                info!(subnet = %lease.subnet, vtep = %lease.attrs.public_ip, "peer removed from the eBPF maps");
                self.inner.apply(event).await?;
            }
        }
        Ok(())
    }

    async fn local_change(&mut self) {
        let Self {
            watch,
            bridge_events,
            node,
            s,
            ..
        } = self;
        let ports = async {
            match (watch, node.bridge_ifindex) {
                (Some(watch), bridge) if bridge != 0 => watch.port_change(bridge).await,
                _ => std::future::pending().await,
            }
        };
        let bridge = async {
            match bridge_events {
                Some(events) => {
                    let event = events.next().await;
                    debug!(bridge = %s.bridge, ?event, "bridge link event");
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = ports => {}
            () = bridge => {}
        }
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        // The kernel path first: it is the fallback for anything the programs pass on.
        let kernel = self.inner.reconcile(peers).await;
        // Every step runs whatever an earlier one hit: a failed attach must not
        // keep stale map entries, nor a full map keep stale bindings.
        let mut errors = Vec::new();
        let mut repairs = 0;
        for step in [self.repair_attachments(), self.sync_maps(peers)] {
            match step {
                Ok(n) => repairs += n,
                Err(e) => errors.push(e),
            }
        }
        // Not counted as repairs: containers come and go.
        match self.sync_bridge().await {
            Ok(0) => {}
            Ok(local) => debug!(changes = local, "bridge ports and local containers updated"),
            Err(EbpfBackendError::Steps(e)) => errors.extend(e),
            Err(e) => errors.push(e),
        }
        if repairs > 0 {
            info!(repairs, "reconciled the eBPF datapath with leases");
        }
        let kernel = kernel?;
        if !errors.is_empty() {
            return Err(EbpfBackendError::Steps(errors).into());
        }
        Ok(repairs + kernel)
    }
}

/// Warns when FORWARD holds anything the fast path skips: redirected packets
/// never meet netfilter, so a FORWARD policy or rule (iptables or nftables)
/// that applies on the kernel path does not apply to container traffic
/// between hosts here. flannel's own FORWARD accept rules are the exception.
async fn warn_skipped_netfilter() {
    let mut skipped = Vec::new();
    if let Some(listing) = command_output("iptables", &["-S", "FORWARD"]).await {
        skipped.extend(iptables_forward_skipped(&listing));
    }
    if let Some(listing) = command_output("nft", &["list", "ruleset"]).await {
        skipped.extend(nft_forward_skipped(&listing));
    }
    if !skipped.is_empty() {
        warn!(
            rules = %skipped.join(" | "),
            "FORWARD filtering the eBPF fast path skips: container traffic to and from remote subnets bypasses these (and conntrack and NAT); use --datapath kernel if they must apply"
        );
    }
}

async fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The policy (unless ACCEPT) and rules of `iptables -S FORWARD` that are not flannel's.
fn iptables_forward_skipped(listing: &str) -> Vec<String> {
    let flannel = format!("-j {}", crate::masq::FORWARD_CHAIN);
    listing
        .lines()
        .map(str::trim)
        .filter(|l| match l.strip_prefix("-P FORWARD ") {
            Some(policy) => policy != "ACCEPT",
            None => l.starts_with("-A FORWARD ") && !l.ends_with(&flannel),
        })
        .map(|l| format!("iptables {l}"))
        .collect()
}

/// Native nftables chains on the forward hook with a drop policy or any rule,
/// except iptables-nft's own tables (listed by `iptables -S`) and flannel's.
fn nft_forward_skipped(listing: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut table = "";
    let mut chain: Option<(&str, bool, Vec<&str>)> = None;
    for line in listing.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            table = rest.trim_end_matches('{').trim();
        } else if let Some(rest) = line.strip_prefix("chain ") {
            chain = Some((rest.trim_end_matches('{').trim(), false, Vec::new()));
        } else if line == "}" {
            if let Some((name, true, rules)) = chain.take() {
                let iptables_nft = ["ip filter", "ip6 filter", "inet filter"].contains(&table)
                    && name == "FORWARD";
                if !iptables_nft && !table.ends_with(crate::masq::NFT_TABLE) && !rules.is_empty() {
                    out.push(format!(
                        "nft table {table} chain {name}: {}",
                        rules.join("; ")
                    ));
                }
            }
        } else if let Some((_, hooked, rules)) = chain.as_mut() {
            if line.starts_with("type filter hook forward") {
                *hooked = true;
                if line.contains("policy drop") {
                    rules.push("policy drop");
                }
            } else if !line.is_empty() && !line.starts_with("comment ") {
                rules.push(line);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_rules_other_than_flannels_are_reported() {
        let listing = "-P FORWARD DROP\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n-A FORWARD -j DOCKER-USER\n";
        assert_eq!(
            iptables_forward_skipped(listing),
            vec![
                "iptables -P FORWARD DROP",
                "iptables -A FORWARD -j DOCKER-USER"
            ]
        );
        assert!(iptables_forward_skipped("-P FORWARD ACCEPT\n").is_empty());
    }

    #[test]
    fn nft_forward_chains_are_reported() {
        let listing = "table inet fw {\n\tchain fwd {\n\t\ttype filter hook forward priority filter; policy drop;\n\t\tct state established accept\n\t}\n\tchain out {\n\t\ttype filter hook output priority filter; policy accept;\n\t}\n}\ntable ip filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tcounter jump DOCKER-USER\n\t}\n}\n";
        assert_eq!(
            nft_forward_skipped(listing),
            vec!["nft table inet fw chain fwd: policy drop; ct state established accept"]
        );
    }
}
