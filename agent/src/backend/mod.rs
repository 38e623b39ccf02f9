//! Datapath backends: what a host programs for its own lease and its peers'.
//!
//! Modelled on flannel's two levels: [`Backend::prepare`] runs before the lease
//! is acquired and returns the attributes to advertise (the VTEP MAC), then
//! [`Backend::apply`] follows lease events and [`Backend::reconcile`] repairs
//! drift against the full peer set.

pub mod ebpf;
pub mod hostgw;
pub mod vxlan;

use std::future::Future;

use crate::lease::{BackendAttrs, Lease, LeaseEvent};

/// Errors a backend reports; each names the kernel object and what to do.
pub type BackendError = anyhow::Error;

pub trait Backend: Send {
    /// Create the local device or programs; returns the backend attributes to advertise.
    fn prepare(&mut self) -> impl Future<Output = Result<BackendAttrs, BackendError>> + Send;
    /// Our own lease is known (or was re-acquired): address the local device.
    fn own_lease(&mut self, lease: &Lease) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Program one peer change, with replace semantics.
    fn apply(&mut self, event: &LeaseEvent) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Make kernel state equal the peer set: add what is missing, remove what no lease justifies.
    /// Returns how many repairs were made.
    fn reconcile(&mut self, peers: &[Lease]) -> impl Future<Output = Result<usize, BackendError>> + Send;
}

use crate::agent::AgentConfig;
use crate::config::{Backend as NetBackend, NetworkConfig};
use crate::iface::ExtIface;
use crate::netlink::{ExternalIface, Netlink};

/// The backend a running agent uses, chosen from the network config and `--datapath`.
pub enum AnyBackend {
    Vxlan(vxlan::VxlanBackend),
    HostGw(hostgw::HostGwBackend),
}

impl AnyBackend {
    /// Name for logs, metrics and `weft status`.
    pub fn mode(&self) -> &'static str {
        match self {
            AnyBackend::Vxlan(_) => "kernel",
            AnyBackend::HostGw(_) => "host-gw",
        }
    }
}

/// Forward each trait method to whichever backend is inside.
macro_rules! delegate {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            AnyBackend::Vxlan($b) => $call,
            AnyBackend::HostGw($b) => $call,
        }
    };
}

impl Backend for AnyBackend {
    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        delegate!(self, b => b.prepare().await)
    }
    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        delegate!(self, b => b.own_lease(lease).await)
    }
    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        delegate!(self, b => b.apply(event).await)
    }
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        delegate!(self, b => b.reconcile(peers).await)
    }
}

/// Build the backend for this host once the network config and the interface are known.
pub async fn build(
    _cfg: &AgentConfig,
    net: &NetworkConfig,
    iface: &ExtIface,
) -> Result<AnyBackend, BackendError> {
    let nl = Netlink::connect()?;
    let external = ExternalIface {
        name: iface.name.clone(),
        index: iface.index,
        ipv4: iface.iface_addr,
        mtu: iface.mtu,
    };
    Ok(match net.backend {
        NetBackend::Vxlan(v) => AnyBackend::Vxlan(vxlan::VxlanBackend::new(
            nl,
            vxlan::VxlanSettings {
                network: net.network,
                vni: v.vni,
                port: v.port,
                mtu: v.mtu,
                gbp: v.gbp,
                learning: v.learning,
                direct_routing: v.direct_routing,
                external,
            },
        )),
        NetBackend::HostGw => AnyBackend::HostGw(hostgw::HostGwBackend::new(
            nl,
            hostgw::HostGwSettings {
                network: net.network,
                external,
            },
        )),
    })
}
