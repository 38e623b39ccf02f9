//! TEMPORARY stand-in backend for the control-plane branch: it programs nothing, only logs
//! what a real backend would be told, and advertises a random VTEP MAC. It exists so
//! `weft agent` runs end to end before the datapath branches are merged; the lead replaces
//! the call to [`build`] in `cli.rs` with `crate::backend::build` at merge.

use crate::agent::AgentConfig;
use crate::backend::{Backend, BackendError};
use crate::config::{Backend as NetBackend, NetworkConfig};
use crate::iface::ExtIface;
use crate::lease::{BackendAttrs, Lease, LeaseEvent, MacAddr};

/// Logs lease events; keeps nothing in the kernel.
#[derive(Debug)]
pub struct LogBackend {
    attrs: BackendAttrs,
}

/// Same shape as `crate::backend::build`, so swapping it is a one-line change.
pub fn build(
    _cfg: &AgentConfig,
    net: &NetworkConfig,
    _iface: &ExtIface,
) -> Result<LogBackend, BackendError> {
    let attrs = match net.backend {
        NetBackend::Vxlan(v) => BackendAttrs::Vxlan {
            vni: Some(v.vni),
            vtep_mac: MacAddr::random(),
        },
        NetBackend::HostGw => BackendAttrs::HostGw,
    };
    Ok(LogBackend { attrs })
}

impl Backend for LogBackend {
    async fn prepare(&mut self) -> Result<BackendAttrs, BackendError> {
        tracing::info!(backend = "log", "prepared (programs nothing)");
        Ok(self.attrs.clone())
    }

    async fn own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        tracing::info!(subnet = %lease.subnet, "own lease");
        Ok(())
    }

    async fn apply(&mut self, event: &LeaseEvent) -> Result<(), BackendError> {
        match event {
            LeaseEvent::Added(l) => {
                tracing::info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer added")
            }
            LeaseEvent::Changed { new, .. } => {
                tracing::info!(subnet = %new.subnet, public_ip = %new.attrs.public_ip, "peer changed")
            }
            LeaseEvent::Removed(l) => {
                tracing::info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer removed")
            }
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<usize, BackendError> {
        tracing::debug!(peers = peers.len(), "reconcile (nothing to repair)");
        Ok(0)
    }
}
