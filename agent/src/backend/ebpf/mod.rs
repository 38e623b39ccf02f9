//! The eBPF backend: the kernel `flannel.<VNI>` backend plus the eBPF fast path.
//!
//! [`VxlanBackend`] keeps programming `flannel.N` exactly as flanneld does: its
//! MAC is the one advertised in our lease, and its neighbours, fdb entries and
//! routes carry whatever the programs pass on (fragments, oversize non-GSO
//! packets). On top of that this backend loads
//! the datapath, attaches encapsulation to the TC ingress of the container
//! bridge and of each of its ports (a container's frames are encapsulated
//! before the bridge sees them), decapsulation to the external interface,
//! host encapsulation to `flannel.N`'s egress (the host's own traffic, and
//! what the kernel forwards there, leaves as the device would send it), and
//! keeps the programs' maps equal to the peer set (remote subnets, known
//! VTEPs) and to the bridge's containers: bindings of address, MAC and port
//! taken from the kernel's own tables (the bridge's neighbour entries and
//! forwarding entries), never from what containers send. Decapsulated packets
//! for a bound address go straight into that container's namespace, and
//! encapsulation accepts a source address only from the port bound to it.
//! A down vxlan device on the bridge, `weft-headroom`, makes every container
//! leave room for the outer headers in front of its packets (`headroom`).
//!
//! With IPv6 on (a dual-stack lease), the IPv6 maps are kept the same way:
//! our `flannel-v6.<VNI>` VTEP and IPv6 subnet, each peer's IPv6 subnet and
//! `PublicIPv6`, and the bridge's IPv6 neighbours; `flannel-v6.<VNI>` is the
//! IPv6 fallback as `flannel.<VNI>` is IPv4's.
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

mod attach;
mod family;
mod headroom;
pub use headroom::DEVICE as HEADROOM_DEVICE;
mod local;
mod netfilter;
mod node;
mod peers;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::{
    join,
    vxlan::{VxlanBackend, VxlanSettings},
    Backend, BackendError,
};
use crate::{
    datapath::{
        ensure_bpffs, relax_rp_filter, BpffsError, Datapath, DatapathError, DecapHook,
        NodeSettings, NodeSettings6, RpFilterError,
    },
    lease::{BackendAttrs, Lease, LeaseEvent},
    netlink::{BridgeEvents, Interface, LinkWatch, Netlink, NetlinkError},
    turns::step,
};

pub use crate::datapath::BPFFS_ROOT;
/// The container bridge flanneld users run Docker with.
pub const DEFAULT_BRIDGE: &str = "docker0";

/// The eBPF backend's settings: the kernel backend's, plus where to pin and attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfSettings {
    pub vxlan: VxlanSettings,
    /// Pin directory of this agent instance, by default `/sys/fs/bpf/weft/netns-<inode>`
    /// (`weft agent --bpf-pin-dir`); agents in different network namespaces of
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
    #[error("list this namespace's interfaces: {source}")]
    Interfaces {
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
    #[error("headroom device {} on bridge {bridge}: {source}", headroom::DEVICE)]
    Headroom {
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
    #[error("{} reconcile step(s) failed: {}", .0.len(), join(.0))]
    Steps(Vec<EbpfBackendError>),
}

/// `flannel.<VNI>` plus the eBPF programs and their maps.
pub struct EbpfBackend {
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
    /// `flannel-v6.N`'s MAC once prepared (IPv6 enabled).
    vtep_mac6: Option<crate::lease::MacAddr>,
    /// The IPv6 side, once our lease has an IPv6 subnet; `None`: IPv6 rides flannel-v6.N alone.
    node6: Option<NodeSettings6>,
    /// Encapsulation is attached to the bridge (false while it does not exist yet).
    encap_attached: bool,
    /// Bridge ports with encapsulation attached.
    ports: BTreeSet<String>,
    /// An interface named like the headroom device but not ours was reported.
    headroom_warned: bool,
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
        let dp = attach::load(&s.pin_dir)?;
        let mut inner = VxlanBackend::new(nl.clone(), s.vxlan.clone());
        let attrs = inner
            .prepare()
            .await
            .map_err(|source| EbpfBackendError::Vxlan { source })?;
        let vtep_mac = match attrs {
            BackendAttrs::Vxlan { vtep_mac, .. } => vtep_mac,
            // IPv6 only: no flannel.N, so no IPv4 VTEP; the IPv4 side of the
            // programs stays idle (no VTEP address, no peers), IPv6 runs on
            // the node's IPv6 settings.
            BackendAttrs::VxlanIpv6Only => crate::lease::MacAddr([0; 6]),
            _ => unreachable!("the vxlan backend advertises vxlan attributes"),
        };
        let interfaces = list_interfaces(&nl).await?;
        let node = node::node_settings(&nl, &s, &interfaces, vtep_mac).await?;
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
            watch,
            bridge_events,
            inner,
            s,
            dp,
            hook,
            node,
            attrs,
            own: None,
            vtep_mac6: None,
            node6: None,
            encap_attached: false,
            ports: BTreeSet::new(),
            headroom_warned: false,
        };
        backend.configure_and_attach(&interfaces)?;
        backend.finish_migration(&interfaces)?;
        relax_rp_filter(&backend.s.vxlan.external.name)?;
        netfilter::warn_skipped_netfilter().await;
        Ok(backend)
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&mut self) -> Result<crate::datapath::Counters, DatapathError> {
        self.dp.counters()
    }

    fn map_err(operation: String) -> impl FnOnce(DatapathError) -> EbpfBackendError {
        move |source| EbpfBackendError::Map {
            operation,
            source: Box::new(source),
        }
    }
}

/// This namespace's interfaces, by which the programs' links are judged live.
async fn list_interfaces(nl: &Netlink) -> Result<Vec<Interface>, EbpfBackendError> {
    nl.interfaces()
        .await
        .map_err(|source| EbpfBackendError::Interfaces { source })
}

/// Detaches and unpins everything a (stopped) agent pinned under `pin_dir`
/// (`weft agent --cleanup`). `flannel.N` and its routes stay: traffic keeps
/// flowing through the kernel path, as it does after flanneld stops; the
/// kernel backend's own cleanup removes the device if wanted. rp_filter stays
/// loose. Keeps going after errors and reports them all.
pub fn cleanup(pin_dir: &Path) -> Result<(), Vec<DatapathError>> {
    Datapath::detach_and_unpin(pin_dir)
}

/// Takes the headroom device (`weft-headroom`) off the bridge and deletes it
/// (`weft agent --cleanup`, and the kernel datapath, which does without it).
/// Returns whether there was one of weft's.
pub async fn remove_headroom_device() -> Result<bool, NetlinkError> {
    headroom::remove(&Netlink::connect()?).await
}

impl Backend for EbpfBackend {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    async fn prepare_v6(&mut self) -> Result<Option<crate::lease::VxlanData>, BackendError> {
        let data = self.inner.prepare_v6().await?;
        let mac = data.map(|d| d.vtep_mac);
        if mac != self.vtep_mac6 {
            self.vtep_mac6 = mac;
            if let (Some(node6), Some(mac)) = (&mut self.node6, mac) {
                node6.vtep_mac = mac;
                self.write_node6()?;
            }
        }
        Ok(data)
    }

    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        let attrs = self.inner.prepare().await?;
        if attrs != self.attrs {
            if let BackendAttrs::Vxlan { vtep_mac, .. } = attrs {
                self.node.vtep_mac = vtep_mac;
                self.write_node()?;
            }
            self.attrs = attrs.clone();
        }
        Ok(attrs)
    }

    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        self.inner.own_lease(lease).await?;
        // An IPv6-only lease's IPv4 subnet is 0.0.0.0/0: nothing of ours to bind or guard.
        if let Some(subnet) = lease.ipv4_subnet().filter(|s| self.own != Some(*s)) {
            // A subnet that was a peer's (re-acquired after expiry) must not be encapsulated.
            self.dp
                .remove_peer(subnet)
                .map_err(Self::map_err(format!("remove own subnet {subnet}")))?;
            self.own = Some(subnet);
            // Unbound sources outside it are forged from now on.
            self.node.subnet = Some(subnet);
            self.write_node()?;
        }
        self.own_lease6(lease)?;
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        match event {
            LeaseEvent::Added(lease) => {
                self.inner.apply(event).await?;
                self.add_to_maps(lease)?;
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
                self.apply6(Some(old), Some(new))?;
            }
            LeaseEvent::Removed(lease) => {
                // Stop encapsulating first; the kernel entries go after.
                self.remove_entry(lease.subnet, lease.attrs.public_ip)?;
                self.apply6(Some(lease), None)?;
                info!(subnet = %lease.subnet, vtep = %lease.attrs.public_ip, "peer removed from the eBPF maps");
                self.inner.apply(event).await?;
            }
        }
        Ok(())
    }

    async fn apply_all(&mut self, events: &[LeaseEvent]) -> Vec<Result<(), BackendError>> {
        self.apply_batch(events).await
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
        // A socket of this pass's own for its dumps (interfaces, the bridge's neighbours,
        // which the kernel lists from all of flannel.N's thousands): the agent drops a pass
        // for a lease event, and the dumps left in flight then close with it instead of
        // draining on the socket the next pass would wait on. Lease events use the kernel
        // backend's socket, never this one. A local, never a field: a field would keep the
        // socket open after the pass is dropped, and its connection task would read every
        // message left of the dump and log a "failed to forward" warning for each.
        let nl = self.inner.pass_netlink();
        // The kernel path first: it is the fallback for anything the programs pass on.
        let kernel = step("kernel", self.inner.reconcile(peers)).await;
        // Every step runs whatever an earlier one hit: a failed attach must not
        // keep stale map entries, nor a full map keep stale bindings.
        let mut errors = Vec::new();
        let mut repairs = 0;
        // Without the interfaces, whether a program is still attached is unknown:
        // only the peer maps are synced this round.
        let interfaces = step("interfaces", list_interfaces(&nl)).await;
        let attached = match &interfaces {
            Ok(interfaces) => {
                step("attachments", async { self.repair_attachments(interfaces) }).await
            }
            Err(_) => Ok(0),
        };
        let maps = step("peer maps", self.sync_maps(peers)).await;
        let maps6 = step("IPv6 peer maps", self.sync_maps6(peers)).await;
        for step in [attached, maps, maps6] {
            match step {
                Ok(n) => repairs += n,
                Err(EbpfBackendError::Steps(e)) => errors.extend(e),
                Err(e) => errors.push(e),
            }
        }
        // Not counted as repairs: containers come and go.
        match interfaces {
            Ok(interfaces) => match step("bridge", self.sync_bridge(&nl, &interfaces)).await {
                Ok(0) => {}
                Ok(local) => debug!(changes = local, "bridge ports and local containers updated"),
                Err(EbpfBackendError::Steps(e)) => errors.extend(e),
                Err(e) => errors.push(e),
            },
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
