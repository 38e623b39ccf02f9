//! Leases and the events that the watcher turns snapshots and watches into.
//!
//! A lease is one host's claim on one subnet: key `<prefix>/subnets/10.1.10.0-24`,
//! value `{"PublicIP":...,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":...}}`.
//! The subnet always comes from the key, never from the value.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// A MAC address, printed lowercase with colons as flannel writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// What a lease advertises about its holder (flannel's `LeaseAttrs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    pub backend: BackendAttrs,
}

/// The backend-specific part of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAttrs {
    /// `"BackendType":"vxlan"`; `vni` is `None` for old writers that left it out.
    Vxlan { vni: Option<u32>, vtep_mac: MacAddr },
    /// `"BackendType":"host-gw"` (no backend data).
    HostGw,
    /// Any other backend type; receivers ignore these leases.
    Other(String),
}

/// One host's lease on one subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    /// etcd lease id the key is attached to (0 when unknown or none).
    pub etcd_lease: i64,
}

/// A change in the peer set, as backends consume it. Our own lease is never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Added(Lease),
    Changed { old: Lease, new: Lease },
    Removed(Lease),
}
