//! Leases and the events that the watcher turns snapshots and watches into.
//!
//! A lease is one host's claim on one subnet, or on one subnet of each family: key
//! `<prefix>/subnets/10.1.10.0-24` (dual stack `10.1.10.0-24&fd00:10:1::-64`, IPv6 only
//! `0.0.0.0-0&fd00:10:1::-64`), value `{"PublicIP":...,"PublicIPv6":...,"BackendType":"vxlan",
//! "BackendData":{"VNI":1,"VtepMAC":...},"BackendV6Data":{...}}`. The subnets always come from
//! the key, never from the value.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

mod attrs;
mod key;
mod peers;
#[cfg(test)]
mod tests;

pub use attrs::{BackendAttrs, LeaseAttrs, MacAddr, VxlanData};
pub use key::{parse_lease_key, parse_subnet_key, subnet_key, LeaseKey};
pub use peers::PeerSet;

/// One host's lease on one subnet of each family it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 subnet; 0.0.0.0/0 on an IPv6-only lease (as flannel's key spells it), see
    /// [`Lease::ipv4_subnet`].
    pub subnet: Ipv4Net,
    /// The IPv6 subnet of a dual-stack or IPv6-only lease.
    pub ipv6_subnet: Option<Ipv6Net>,
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

/// Why a lease key or value could not be read. Readers skip such leases with a warning.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("lease key {key:?} is not `<ip>-<prefix len>` (like 10.1.10.0-24, or 10.1.10.0-24&fd00:10:1::-64 with IPv6); skipping it")]
    BadKey { key: String },
    #[error("lease value under {key:?} is not a JSON object ({reason}); skipping it")]
    BadJson { key: String, reason: String },
    #[error(
        "lease value under {key:?}: field {field} is {value}, expected {expected}; skipping it"
    )]
    BadField {
        key: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "MAC address {value:?} is not six hex bytes separated by colons (like f6:14:ca:9c:9a:74)"
    )]
    BadMac { value: String },
}

impl Lease {
    /// Build a lease from an etcd key and value, as the watcher sees them.
    pub fn from_kv(key: &str, value: &[u8], etcd_lease: i64) -> Result<Self, LeaseError> {
        let k = parse_lease_key(key)?;
        let attrs = LeaseAttrs::from_json(key, value)?;
        Ok(Lease::new(k, attrs, etcd_lease))
    }

    pub fn new(key: LeaseKey, attrs: LeaseAttrs, etcd_lease: i64) -> Self {
        Lease {
            subnet: key.v4,
            ipv6_subnet: key.v6,
            attrs,
            etcd_lease,
        }
    }

    /// The subnets naming this lease (its etcd key).
    pub fn key(&self) -> LeaseKey {
        LeaseKey {
            v4: self.subnet,
            v6: self.ipv6_subnet,
        }
    }

    /// The IPv4 subnet, `None` on an IPv6-only lease.
    pub fn ipv4_subnet(&self) -> Option<Ipv4Net> {
        self.key().ipv4()
    }

    /// The IPv4 VTEP (`flannel.<VNI>`): the subnet, PublicIP and VtepMAC, when the lease has one.
    pub fn vtep_v4(&self) -> Option<(Ipv4Net, Ipv4Addr, MacAddr)> {
        match self.attrs.backend {
            BackendAttrs::Vxlan { vtep_mac, .. } => {
                Some((self.ipv4_subnet()?, self.attrs.public_ip, vtep_mac))
            }
            _ => None,
        }
    }

    /// The IPv6 VTEP (`flannel-v6.<VNI>`): the IPv6 subnet, PublicIPv6 and the MAC of
    /// `BackendV6Data`, when the lease has all three.
    pub fn vtep_v6(&self) -> Option<(Ipv6Net, Ipv6Addr, MacAddr)> {
        Some((
            self.ipv6_subnet?,
            self.attrs.public_ipv6?,
            self.attrs.backend_v6?.vtep_mac,
        ))
    }
}
