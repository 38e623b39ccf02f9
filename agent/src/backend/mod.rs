//! Datapath backends: what a host programs for its own lease and its peers'.
//!
//! Modelled on flannel's two levels: [`Backend::prepare`] runs before the lease
//! is acquired and returns the attributes to advertise (the VTEP MAC), then
//! [`Backend::apply`] follows lease events and [`Backend::reconcile`] repairs
//! drift against the full peer set.

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
