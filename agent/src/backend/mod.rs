//! Datapath backends: what a host programs for its own lease and its peers'.
//!
//! Modelled on flannel's two levels: [`Backend::prepare`] runs before the lease
//! is acquired and returns the attributes to advertise (the VTEP MAC), then
//! [`Backend::apply`] follows lease events and [`Backend::reconcile`] repairs
//! drift against the full peer set.
//!
//! Configuration flows down: the agent builds [`BackendOptions`] from its flags and
//! hands them here; nothing in this module knows the agent.

pub mod ebpf;
pub mod hostgw;
pub mod vxlan;

use std::future::Future;
use std::path::PathBuf;

use crate::config::{Backend as NetBackend, NetworkConfig};
use crate::datapath::DecapHook;
use crate::lease::{BackendAttrs, Lease, LeaseEvent, VxlanData};
use crate::netlink::{ExternalIface, Netlink, NetlinkError};

/// What a backend reports; each variant keeps the layer's own message, which names the
/// kernel object and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Vxlan(#[from] vxlan::VxlanError),
    #[error(transparent)]
    HostGw(#[from] hostgw::HostGwError),
    #[error(transparent)]
    Ebpf(Box<ebpf::EbpfBackendError>),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A reconcile went through every step; these failed. The next round retries them.
    #[error("{} reconcile step(s) failed: {}", .0.len(), join(.0))]
    Steps(Vec<BackendError>),
}

/// Errors for one message, `; `-separated.
pub(crate) fn join<E: std::fmt::Display>(errors: &[E]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<ebpf::EbpfBackendError> for BackendError {
    fn from(e: ebpf::EbpfBackendError) -> Self {
        match e {
            ebpf::EbpfBackendError::Steps(steps) => {
                Self::Steps(steps.into_iter().map(Self::from).collect())
            }
            e => Self::Ebpf(Box::new(e)),
        }
    }
}

impl BackendError {
    /// `Ok(())` when nothing failed, else the failures as one error (a single one unwrapped).
    pub fn from_steps(mut failures: Vec<BackendError>) -> Result<(), BackendError> {
        match failures.len() {
            0 => Ok(()),
            1 => Err(failures.remove(0)),
            _ => Err(Self::Steps(failures)),
        }
    }

    /// The layer that failed, for `weft status`: `vxlan`, `host-gw`, `ebpf`, `netlink`.
    pub fn layer(&self) -> &'static str {
        match self {
            Self::Vxlan(_) => "vxlan",
            Self::HostGw(_) => "host-gw",
            Self::Ebpf(_) => "ebpf",
            Self::Netlink(_) => "netlink",
            Self::Steps(_) => "several",
        }
    }

    /// The individual failures: the steps of a partial reconcile, or this error alone.
    pub fn failures(&self) -> Vec<&BackendError> {
        match self {
            Self::Steps(steps) => steps.iter().flat_map(|s| s.failures()).collect(),
            e => vec![e],
        }
    }
}

/// Which datapath to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Datapath {
    /// eBPF when the kernel supports it, else the kernel's vxlan device.
    Auto,
    Ebpf,
    Kernel,
}

/// The host-side choices `build` needs beyond the network config (from `weft agent`'s flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    pub datapath: Datapath,
    /// The container bridge whose ports get eBPF encapsulation.
    pub bridge: String,
    /// bpffs directory of this agent's programs, links and maps.
    pub bpf_pin_dir: PathBuf,
    /// Forced eBPF decapsulation hook; `None` picks by the interface's driver.
    pub decap_hook: Option<DecapHook>,
    /// Outer UDP checksum on eBPF-encapsulated packets (flannel.N's `udpcsum`).
    pub udp_csum: bool,
}

pub trait Backend: Send {
    /// The datapath in use, for logs, metrics and `weft status`: "ebpf", "kernel", "host-gw".
    fn mode(&self) -> &'static str;
    /// Create the local device or programs; returns the backend attributes to advertise.
    fn prepare(&mut self) -> impl Future<Output = Result<BackendAttrs, BackendError>> + Send;
    /// With IPv6 enabled, create the IPv6 device (`flannel-v6.<VNI>`); returns its
    /// `BackendV6Data`. Default: none (a backend without an IPv6 VTEP).
    fn prepare_v6(
        &mut self,
    ) -> impl Future<Output = Result<Option<VxlanData>, BackendError>> + Send {
        std::future::ready(Ok(None))
    }
    /// Our own lease is known (or was re-acquired): address the local device.
    fn own_lease(&mut self, lease: &Lease)
        -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Program one peer change, with replace semantics.
    fn apply(
        &mut self,
        event: &LeaseEvent,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Program many peer changes at once (a snapshot's), one result per event. By default
    /// [`Self::apply`] for each in turn; a backend may overlap the kernel requests of new peers.
    fn apply_all(
        &mut self,
        events: &[LeaseEvent],
    ) -> impl Future<Output = Vec<Result<(), BackendError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(events.len());
            for ev in events {
                results.push(self.apply(ev).await);
            }
            results
        }
    }
    /// Make kernel state equal the peer set: add what is missing, remove what no lease justifies.
    /// Returns how many repairs were made.
    fn reconcile(
        &mut self,
        peers: &[Lease],
    ) -> impl Future<Output = Result<usize, BackendError>> + Send;
    /// Resolves when local state the backend follows changed (a container's interface joined
    /// the bridge) and a reconcile should run now rather than at the next tick. Cancel-safe.
    /// Default: never.
    fn local_change(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// The backend a running agent uses, chosen from the network config and `--datapath`.
pub enum AnyBackend {
    Vxlan(vxlan::VxlanBackend),
    HostGw(hostgw::HostGwBackend),
    Ebpf(Box<ebpf::EbpfBackend>),
}

/// Forward each trait method to whichever backend is inside.
macro_rules! delegate {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            AnyBackend::Vxlan($b) => $call,
            AnyBackend::HostGw($b) => $call,
            AnyBackend::Ebpf($b) => $call,
        }
    };
}

impl Backend for AnyBackend {
    fn mode(&self) -> &'static str {
        delegate!(self, b => b.mode())
    }
    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        delegate!(self, b => b.prepare().await)
    }
    async fn prepare_v6(&mut self) -> Result<Option<VxlanData>, BackendError> {
        delegate!(self, b => b.prepare_v6().await)
    }
    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        delegate!(self, b => b.own_lease(lease).await)
    }
    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        delegate!(self, b => b.apply(event).await)
    }
    async fn apply_all(&mut self, events: &[LeaseEvent]) -> Vec<Result<(), BackendError>> {
        delegate!(self, b => b.apply_all(events).await)
    }
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        delegate!(self, b => b.reconcile(peers).await)
    }
    async fn local_change(&mut self) {
        delegate!(self, b => b.local_change().await)
    }
}

/// Build the backend for this host once the network config and the interface are known.
///
/// `--datapath auto` tries the eBPF datapath and falls back to the kernel vxlan device,
/// logging why; `kernel` removes eBPF programs left pinned by an earlier eBPF run (their
/// maps would go stale and their anti-spoofing would drop new peers).
pub async fn build(
    cfg: &BackendOptions,
    net: &NetworkConfig,
    external: &ExternalIface,
) -> Result<AnyBackend, BackendError> {
    let nl = Netlink::connect()?;
    let external = external.clone();
    let v = match net.backend {
        NetBackend::HostGw => {
            if cfg.datapath == Datapath::Ebpf {
                tracing::info!("host-gw needs no encapsulation: the eBPF datapath is not used");
            }
            drop_stale_pins(cfg).await;
            let settings = hostgw::HostGwSettings {
                network: net.network,
                external,
                ipv6: net.ipv6_network(),
            };
            return Ok(AnyBackend::HostGw(hostgw::HostGwBackend::new(nl, settings)));
        }
        NetBackend::Vxlan(v) => v,
    };
    let settings = vxlan::VxlanSettings {
        network: net.network,
        vni: v.vni,
        port: v.port,
        mtu: v.mtu,
        gbp: v.gbp,
        learning: v.learning,
        direct_routing: v.direct_routing,
        external,
        ipv6: net.ipv6_network(),
    };
    let ebpf_settings = |vxlan| ebpf::EbpfSettings {
        vxlan,
        pin_dir: cfg.bpf_pin_dir.clone(),
        bridge: cfg.bridge.clone(),
        decap_hook: cfg.decap_hook,
        udp_csum: cfg.udp_csum,
    };
    match cfg.datapath {
        Datapath::Kernel => drop_stale_pins(cfg).await,
        Datapath::Ebpf => {
            let b = ebpf::EbpfBackend::try_new(nl, ebpf_settings(settings)).await?;
            return Ok(AnyBackend::Ebpf(Box::new(b)));
        }
        Datapath::Auto => {
            match ebpf::EbpfBackend::try_new(nl.clone(), ebpf_settings(settings.clone())).await {
                Ok(b) => return Ok(AnyBackend::Ebpf(Box::new(b))),
                Err(e) => {
                    tracing::warn!(
                        "eBPF datapath unavailable, using the kernel vxlan device instead: {e}"
                    );
                    // Programs another build left (maps it refused to carry over)
                    // would forward with maps nobody keeps: the kernel path alone.
                    drop_stale_pins(cfg).await;
                }
            }
        }
    }
    Ok(AnyBackend::Vxlan(vxlan::VxlanBackend::new(nl, settings)))
}

/// Whatever an eBPF run left: pinned programs and maps, the headroom device.
async fn drop_stale_pins(cfg: &BackendOptions) {
    match ebpf::remove_headroom_device().await {
        Ok(_) => {}
        Err(e) => tracing::warn!("removing the eBPF datapath's headroom device: {e}"),
    }
    if !cfg.bpf_pin_dir.exists() {
        return;
    }
    match ebpf::cleanup(&cfg.bpf_pin_dir) {
        Ok(()) => {
            tracing::info!(pin_dir = %cfg.bpf_pin_dir.display(), "removed eBPF programs pinned by an earlier run")
        }
        Err(errors) => {
            for e in errors {
                tracing::warn!(pin_dir = %cfg.bpf_pin_dir.display(), "removing stale eBPF pins: {e}");
            }
        }
    }
}
