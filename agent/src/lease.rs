//! Leases and the events that the watcher turns snapshots and watches into.
//!
//! A lease is one host's claim on one subnet, or on one subnet of each family: key
//! `<prefix>/subnets/10.1.10.0-24` (dual stack `10.1.10.0-24&fd00:10:1::-64`, IPv6 only
//! `0.0.0.0-0&fd00:10:1::-64`), value `{"PublicIP":...,"PublicIPv6":...,"BackendType":"vxlan",
//! "BackendData":{"VNI":1,"VtepMAC":...},"BackendV6Data":{...}}`. The subnets always come from
//! the key, never from the value.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// A MAC address, printed lowercase with colons as flannel writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// What a lease advertises about its holder (flannel's `LeaseAttrs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// 0.0.0.0 on an IPv6-only host (flanneld writes that).
    pub public_ip: Ipv4Addr,
    /// `PublicIPv6`: the host's underlay IPv6 address when it carries IPv6, else `null`.
    pub public_ipv6: Option<Ipv6Addr>,
    pub backend: BackendAttrs,
    /// `BackendV6Data` of a vxlan host carrying IPv6: VNI and MAC of its `flannel-v6.<VNI>`.
    pub backend_v6: Option<VxlanData>,
}

/// A vxlan VTEP as `BackendData` (`flannel.<VNI>`) and `BackendV6Data` (`flannel-v6.<VNI>`) carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    /// `None` for writers that left it out.
    pub vni: Option<u32>,
    pub vtep_mac: MacAddr,
}

/// The backend-specific part of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAttrs {
    /// `"BackendType":"vxlan"` with `BackendData` (the IPv4 VTEP, `flannel.<VNI>`); `vni` is
    /// `None` for old writers that left it out.
    Vxlan { vni: Option<u32>, vtep_mac: MacAddr },
    /// `"BackendType":"vxlan"` without `BackendData`: an IPv6-only host, whose only VTEP is in
    /// [`LeaseAttrs::backend_v6`].
    VxlanIpv6Only,
    /// `"BackendType":"host-gw"` (no backend data).
    HostGw,
    /// Any other backend type; receivers ignore these leases.
    Other(String),
}

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

/// What names a lease: the subnets in its key (`10.1.10.0-24&fd00:10:1::-64`). Two leases with
/// the same IPv4 subnet but different IPv6 subnets are different keys, as in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// 0.0.0.0/0 when the lease has no IPv4 subnet.
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

impl From<Ipv4Net> for LeaseKey {
    fn from(v4: Ipv4Net) -> Self {
        LeaseKey { v4, v6: None }
    }
}

impl LeaseKey {
    /// The IPv4 subnet, `None` for an IPv6-only key (0.0.0.0-0).
    pub fn ipv4(&self) -> Option<Ipv4Net> {
        Some(self.v4).filter(|n| n.prefix_len() != 0)
    }
}

impl LeaseKey {
    /// flannel's spelling, the last element of the etcd key: `10.1.10.0-24`,
    /// `10.1.10.0-24&fd00:10:1::-64`, `0.0.0.0-0&fd00:10:1::-64`.
    pub fn etcd_name(&self) -> String {
        let mut out = format!("{}-{}", self.v4.addr(), self.v4.prefix_len());
        if let Some(v6) = self.v6 {
            out += &format!("&{}-{}", v6.addr(), v6.prefix_len());
        }
        out
    }
}

/// For logs and messages: `10.1.10.0/24`, `10.1.10.0/24 fd00:10:1::/64`, `fd00:10:1::/64`.
impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ipv4(), self.v6) {
            (Some(v4), Some(v6)) => write!(f, "{v4} {v6}"),
            (None, Some(v6)) => write!(f, "{v6}"),
            (_, None) => write!(f, "{}", self.v4),
        }
    }
}

/// A change in the peer set, as backends consume it. Our own lease is never sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Added(Lease),
    Changed { old: Lease, new: Lease },
    Removed(Lease),
}

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{lowercase_keys, Typed};

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

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LeaseError::BadMac {
            value: s.to_string(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl MacAddr {
    /// A random, locally administered unicast MAC (what the kernel gives a new vxlan device).
    pub fn random() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }
}

impl BackendAttrs {
    /// flannel's `BackendType` string.
    pub fn type_name(&self) -> &str {
        match self {
            BackendAttrs::Vxlan { .. } | BackendAttrs::VxlanIpv6Only => "vxlan",
            BackendAttrs::HostGw => "host-gw",
            BackendAttrs::Other(t) => t,
        }
    }
}

/// The last path element of a lease key as flannel writes it: `10.1.10.0-24`.
pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.addr(), subnet.prefix_len())
}

/// Parse a lease key (full path or last element). Dual-stack keys `a&b` give their IPv4 part.
pub fn parse_subnet_key(key: &str) -> Result<Ipv4Net, LeaseError> {
    parse_lease_key(key).map(|k| k.v4)
}

/// Parse a lease key (full path or last element), both parts of a dual-stack one. The IPv4 part
/// is always there (0.0.0.0-0 on IPv6-only leases), as flannel's key pattern requires.
pub fn parse_lease_key(key: &str) -> Result<LeaseKey, LeaseError> {
    let bad = || LeaseError::BadKey {
        key: key.to_string(),
    };
    let last = key.rsplit('/').next().unwrap_or(key);
    let (v4, v6) = match last.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (last, None),
    };
    fn net<A: std::str::FromStr, N>(part: &str, new: impl Fn(A, u8) -> Option<N>) -> Option<N> {
        let (ip, len) = part.rsplit_once('-')?;
        new(ip.parse().ok()?, len.parse().ok()?)
    }
    // A key with host bits set names no subnet flannel would have written.
    let v4 = net(v4, |ip: Ipv4Addr, len| {
        Ipv4Net::new(ip, len).ok().filter(|n| n.network() == ip)
    })
    .ok_or_else(bad)?;
    let v6 = match v6 {
        None => None,
        Some(v6) => Some(
            net(v6, |ip: Ipv6Addr, len| {
                Ipv6Net::new(ip, len).ok().filter(|n| n.network() == ip)
            })
            .ok_or_else(bad)?,
        ),
    };
    Ok(LeaseKey { v4, v6 })
}

/// A lease value as flanneld writes it: Go's field order, `PublicIPv6` null, `BackendData` left out
/// when the backend has none.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct WireOut<'a> {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6")]
    public_ipv6: Option<Ipv6Addr>,
    backend_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_data: Option<VxlanOut>,
    #[serde(rename = "BackendV6Data", skip_serializing_if = "Option::is_none")]
    backend_v6_data: Option<VxlanOut>,
}

#[derive(Serialize)]
struct VxlanOut {
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: String,
}

/// A lease value as read, keys already lowercased (Go matches field names in any case). Each field
/// keeps what it found when it is not of the expected type, so the error can show it.
#[derive(Deserialize)]
struct WireIn {
    publicip: Option<Typed<Ipv4Addr>>,
    /// `null` reads as `None`, like a missing field.
    publicipv6: Option<Typed<Ipv6Addr>>,
    backendtype: Option<Typed<String>>,
    backenddata: Option<Typed<AnyCase<VxlanIn>>>,
    backendv6data: Option<Typed<AnyCase<VxlanIn>>>,
}

/// A `T` read from an object whose keys may be in any letter case.
struct AnyCase<T>(T);

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for AnyCase<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let obj = lowercase_keys(serde_json::Map::deserialize(d)?).map_err(D::Error::custom)?;
        T::deserialize(obj).map(AnyCase).map_err(D::Error::custom)
    }
}

#[derive(Deserialize)]
struct VxlanIn {
    vni: Option<Typed<u32>>,
    vtepmac: Option<Typed<MacAddr>>,
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl LeaseAttrs {
    /// Serialise exactly as flanneld does.
    pub fn to_json(&self) -> String {
        let vxlan = |vni: Option<u32>, mac: MacAddr| VxlanOut {
            vni: vni.unwrap_or(0),
            vtep_mac: mac.to_string(),
        };
        let backend_data = match &self.backend {
            BackendAttrs::Vxlan { vni, vtep_mac } => Some(vxlan(*vni, *vtep_mac)),
            _ => None,
        };
        let wire = WireOut {
            public_ip: self.public_ip,
            public_ipv6: self.public_ipv6,
            backend_type: self.backend.type_name(),
            backend_data,
            backend_v6_data: self.backend_v6.map(|v| vxlan(v.vni, v.vtep_mac)),
        };
        // Addresses, strings and numbers always serialise.
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parse a lease value in flanneld's format: any field-name case, unknown fields ignored,
    /// `VNI` and `PublicIPv6` optional. `key` is only used in errors.
    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, LeaseError> {
        let bad_json = |reason: String| LeaseError::BadJson {
            key: key.to_string(),
            reason,
        };
        let v: Value = serde_json::from_slice(value).map_err(|e| bad_json(e.to_string()))?;
        let Value::Object(obj) = v else {
            return Err(bad_json(format!("found {v}")));
        };
        let obj = lowercase_keys(obj).map_err(|e| bad_json(e.to_string()))?;
        let wire: WireIn = serde_json::from_value(obj).map_err(|e| bad_json(e.to_string()))?;
        let bad = |field: &'static str, found: Option<Value>, expected: &'static str| {
            LeaseError::BadField {
                key: key.to_string(),
                field,
                value: found.map_or("missing".to_string(), |v| v.to_string()),
                expected,
            }
        };
        let public_ip = match wire.publicip {
            Some(Typed::Ok(ip)) => ip,
            other => {
                return Err(bad(
                    "PublicIP",
                    Typed::found(other),
                    "an IPv4 address string",
                ))
            }
        };
        let backend_type = match wire.backendtype {
            None => String::new(),
            Some(Typed::Ok(t)) => t,
            other => return Err(bad("BackendType", Typed::found(other), "a string")),
        };
        let public_ipv6 = match wire.publicipv6 {
            None => None,
            Some(Typed::Ok(ip)) => Some(ip),
            other => {
                return Err(bad(
                    "PublicIPv6",
                    Typed::found(other),
                    "null or an IPv6 address string",
                ))
            }
        };
        let vxlan = |field: &'static str,
                     mac_field: &'static str,
                     vni_field: &'static str,
                     data: Option<Typed<AnyCase<VxlanIn>>>|
         -> Result<Option<VxlanData>, LeaseError> {
            let data = match data {
                None => return Ok(None),
                Some(Typed::Ok(AnyCase(d))) => d,
                other => return Err(bad(field, Typed::found(other), "an object with VtepMAC")),
            };
            let vtep_mac = match data.vtepmac {
                Some(Typed::Ok(m)) => m,
                other => return Err(bad(mac_field, Typed::found(other), "a MAC address string")),
            };
            let vni = match data.vni {
                None => None,
                Some(Typed::Ok(n)) => Some(n),
                other => return Err(bad(vni_field, Typed::found(other), "an unsigned integer")),
            };
            Ok(Some(VxlanData { vni, vtep_mac }))
        };
        let mut backend_v6 = None;
        let backend = match backend_type.as_str() {
            "vxlan" => {
                backend_v6 = vxlan(
                    "BackendV6Data",
                    "BackendV6Data.VtepMAC",
                    "BackendV6Data.VNI",
                    wire.backendv6data,
                )?;
                let v4 = vxlan(
                    "BackendData",
                    "BackendData.VtepMAC",
                    "BackendData.VNI",
                    wire.backenddata,
                )?;
                match (v4, backend_v6) {
                    (Some(VxlanData { vni, vtep_mac }), _) => BackendAttrs::Vxlan { vni, vtep_mac },
                    (None, Some(_)) if public_ipv6.is_some() => BackendAttrs::VxlanIpv6Only,
                    (None, _) => {
                        return Err(bad("BackendData", None, "an object with VtepMAC"));
                    }
                }
            }
            "host-gw" => BackendAttrs::HostGw,
            _ => BackendAttrs::Other(backend_type),
        };
        Ok(LeaseAttrs {
            public_ip,
            public_ipv6,
            backend,
            backend_v6,
        })
    }

    /// Whether `other` was written by the same host: the same PublicIP, or on IPv6-only hosts
    /// (whose PublicIP is 0.0.0.0) the same PublicIPv6. flanneld compares PublicIP only, so its
    /// IPv6-only hosts would all claim each other's leases.
    pub fn same_host(&self, other: &LeaseAttrs) -> bool {
        if self.public_ip.is_unspecified() {
            self.public_ipv6.is_some() && self.public_ipv6 == other.public_ipv6
        } else {
            self.public_ip == other.public_ip
        }
    }
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

/// The peer leases a host follows: applies snapshots and watch events and says what changed.
///
/// Our own subnet is never reported, and only leases of our backend type are kept (a vxlan
/// host cannot reach a host-gw or udp peer). Renewals that change nothing but the etcd lease
/// id produce no event.
#[derive(Debug, Clone)]
pub struct PeerSet {
    own: Option<LeaseKey>,
    backend_type: String,
    peers: BTreeMap<LeaseKey, Lease>,
}

impl PeerSet {
    /// `backend_type` is flannel's name of our backend (`vxlan`, `host-gw`).
    pub fn new(backend_type: &str) -> Self {
        PeerSet {
            own: None,
            backend_type: backend_type.to_string(),
            peers: BTreeMap::new(),
        }
    }

    /// Set our own subnet; a peer entry for it (seen before we knew) is reported removed.
    pub fn set_own(&mut self, own: impl Into<LeaseKey>) -> Option<LeaseEvent> {
        let own = own.into();
        self.own = Some(own);
        self.peers.remove(&own).map(LeaseEvent::Removed)
    }

    fn wanted(&self, lease: &Lease) -> bool {
        Some(lease.key()) != self.own && lease.attrs.backend.type_name() == self.backend_type
    }

    /// A lease was put (added, changed or renewed).
    pub fn put(&mut self, lease: Lease) -> Option<LeaseEvent> {
        if !self.wanted(&lease) {
            // A known peer that switched to another backend type is gone for us.
            return self
                .delete(lease.key())
                .filter(|_| Some(lease.key()) != self.own);
        }
        match self.peers.insert(lease.key(), lease.clone()) {
            None => Some(LeaseEvent::Added(lease)),
            Some(old) if old.attrs != lease.attrs => Some(LeaseEvent::Changed { old, new: lease }),
            Some(_) => None,
        }
    }

    /// A lease key was deleted (expired or removed).
    pub fn delete(&mut self, key: impl Into<LeaseKey>) -> Option<LeaseEvent> {
        self.peers.remove(&key.into()).map(LeaseEvent::Removed)
    }

    /// Replace the whole set with a fresh listing and return the difference as events.
    pub fn reset(&mut self, snapshot: Vec<Lease>) -> Vec<LeaseEvent> {
        let mut events = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for lease in snapshot {
            seen.insert(lease.key());
            events.extend(self.put(lease));
        }
        let gone: Vec<LeaseKey> = self
            .peers
            .keys()
            .filter(|s| !seen.contains(s))
            .copied()
            .collect();
        events.extend(gone.into_iter().filter_map(|s| self.delete(s)));
        events
    }

    /// The current peers, ordered by subnet.
    pub fn leases(&self) -> Vec<Lease> {
        self.peers.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLANNEL_VXLAN: &str = r#"{"PublicIP":"172.16.15.21","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:14:ca:9c:9a:74"}}"#;

    fn vx(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            ipv6_subnet: None,
            subnet: subnet.parse().unwrap(),
            attrs: LeaseAttrs {
                backend_v6: None,
                public_ipv6: None,
                public_ip: ip.parse().unwrap(),
                backend: BackendAttrs::Vxlan {
                    vni: Some(1),
                    vtep_mac: mac.parse().unwrap(),
                },
            },
            etcd_lease: 0,
        }
    }

    #[test]
    fn vxlan_value_is_byte_identical_to_flanneld() {
        let l = vx("10.1.10.0/24", "172.16.15.21", "f6:14:ca:9c:9a:74");
        assert_eq!(l.attrs.to_json(), FLANNEL_VXLAN);
        assert_eq!(
            LeaseAttrs::from_json("k", FLANNEL_VXLAN.as_bytes()).unwrap(),
            l.attrs
        );
    }

    /// What flanneld v0.20 writes for a dual-stack vxlan host: PublicIPv6, then BackendV6Data
    /// (flannel-v6.1's VNI and MAC) after BackendData.
    const FLANNEL_DUAL: &str = r#"{"PublicIP":"172.16.15.21","PublicIPv6":"fd00:16::21","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:14:ca:9c:9a:74"},"BackendV6Data":{"VNI":1,"VtepMAC":"8e:51:3f:0a:22:01"}}"#;
    const FLANNEL_V6_ONLY: &str = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:16::21","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"8e:51:3f:0a:22:01"}}"#;

    #[test]
    fn dual_stack_and_ipv6_only_values_are_byte_identical_to_flanneld() {
        let mut l = vx("10.1.10.0/24", "172.16.15.21", "f6:14:ca:9c:9a:74");
        l.ipv6_subnet = Some("fd00:10:1::/64".parse().unwrap());
        l.attrs.public_ipv6 = Some("fd00:16::21".parse().unwrap());
        l.attrs.backend_v6 = Some(VxlanData {
            vni: Some(1),
            vtep_mac: "8e:51:3f:0a:22:01".parse().unwrap(),
        });
        assert_eq!(l.attrs.to_json(), FLANNEL_DUAL);
        assert_eq!(
            LeaseAttrs::from_json("k", FLANNEL_DUAL.as_bytes()).unwrap(),
            l.attrs
        );
        assert_eq!(l.key().etcd_name(), "10.1.10.0-24&fd00:10:1::-64");
        assert_eq!(l.key().to_string(), "10.1.10.0/24 fd00:10:1::/64");
        let read = Lease::from_kv(
            "/coreos.com/network/subnets/10.1.10.0-24&fd00:10:1::-64",
            FLANNEL_DUAL.as_bytes(),
            7,
        )
        .unwrap();
        assert_eq!(
            read.vtep_v6(),
            Some((
                "fd00:10:1::/64".parse().unwrap(),
                "fd00:16::21".parse().unwrap(),
                "8e:51:3f:0a:22:01".parse().unwrap()
            ))
        );
        assert_eq!(
            read.vtep_v4().map(|v| v.2.to_string()),
            Some("f6:14:ca:9c:9a:74".into())
        );

        let only6 = LeaseAttrs {
            public_ip: Ipv4Addr::UNSPECIFIED,
            backend: BackendAttrs::VxlanIpv6Only,
            ..l.attrs.clone()
        };
        assert_eq!(only6.to_json(), FLANNEL_V6_ONLY);
        assert_eq!(
            LeaseAttrs::from_json("k", FLANNEL_V6_ONLY.as_bytes()).unwrap(),
            only6
        );
        let read =
            Lease::from_kv("0.0.0.0-0&fd00:10:1::-64", FLANNEL_V6_ONLY.as_bytes(), 0).unwrap();
        assert_eq!((read.ipv4_subnet(), read.vtep_v4()), (None, None));
        assert!(read.vtep_v6().is_some());
        // IPv6-only hosts share PublicIP 0.0.0.0: they are told apart by PublicIPv6.
        let other = LeaseAttrs {
            public_ipv6: Some("fd00:16::22".parse().unwrap()),
            ..only6.clone()
        };
        assert!(only6.same_host(&only6) && !only6.same_host(&other));

        for (bad, needle) in [
            (
                r#"{"PublicIP":"1.1.1.1","PublicIPv6":"1.1.1.1","BackendType":"host-gw"}"#,
                "PublicIPv6",
            ),
            (
                r#"{"PublicIP":"1.1.1.1","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VtepMAC":"f6:14:ca:9c:9a:74"},"BackendV6Data":{"VtepMAC":7}}"#,
                "BackendV6Data.VtepMAC",
            ),
        ] {
            let e = LeaseAttrs::from_json("k", bad.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn dual_stack_keys() {
        let k =
            parse_lease_key("/coreos.com/network/subnets/10.1.54.0-24&fc00:0:0:36::-64").unwrap();
        assert_eq!(
            (k.v4.to_string(), k.v6.map(|n| n.to_string())),
            ("10.1.54.0/24".into(), Some("fc00:0:0:36::/64".into()))
        );
        assert_eq!(k.etcd_name(), "10.1.54.0-24&fc00:0:0:36::-64");
        let only6 = parse_lease_key("0.0.0.0-0&fd00:10:1::-64").unwrap();
        assert_eq!(
            (only6.ipv4(), only6.etcd_name()),
            (None, "0.0.0.0-0&fd00:10:1::-64".into())
        );
        for bad in [
            "10.1.54.0-24&fd00::1-64",
            "10.1.54.0-24&fd00::-129",
            "10.1.54.0-24&",
            "10.1.54.0-24&x-64",
        ] {
            assert!(parse_lease_key(bad).is_err(), "{bad}");
        }
        // Same IPv4 subnet, different IPv6 subnets: two peers, as two etcd keys are.
        let mut ps = PeerSet::new("vxlan");
        let mut a = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:02");
        a.ipv6_subnet = Some("fd00::/64".parse().unwrap());
        let b = Lease {
            ipv6_subnet: Some("fd00:0:0:1::/64".parse().unwrap()),
            ..a.clone()
        };
        assert!(ps.put(a.clone()).is_some() && ps.put(b.clone()).is_some());
        assert_eq!(ps.delete(a.key()), Some(LeaseEvent::Removed(a)));
        assert_eq!(ps.leases(), vec![b]);
    }

    #[test]
    fn host_gw_value_has_no_backend_data() {
        let a = LeaseAttrs {
            backend_v6: None,
            public_ipv6: None,
            public_ip: "10.0.0.5".parse().unwrap(),
            backend: BackendAttrs::HostGw,
        };
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"10.0.0.5","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        assert_eq!(
            LeaseAttrs::from_json("k", a.to_json().as_bytes()).unwrap(),
            a
        );
    }

    #[test]
    fn parses_old_and_oddly_cased_values() {
        let v = br#"{"publicip":"172.16.15.22","BACKENDTYPE":"vxlan","backenddata":{"vtepmac":"F6:14:CA:9C:9A:75"},"Extra":[1]}"#;
        let a = LeaseAttrs::from_json("k", v).unwrap();
        assert_eq!(a.public_ip, "172.16.15.22".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            a.backend,
            BackendAttrs::Vxlan {
                vni: None,
                vtep_mac: "f6:14:ca:9c:9a:75".parse().unwrap()
            }
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not a JSON object"),
            (b"[1]", "not a JSON object"),
            (br#"{"BackendType":"vxlan"}"#, "PublicIP"),
            (br#"{"PublicIP":"300.1.1.1","BackendType":"vxlan"}"#, "PublicIP"),
            (br#"{"PublicIP":"1.1.1.1","BackendType":"vxlan"}"#, "BackendData"),
            (br#"{"PublicIP":"1.1.1.1","BackendType":"vxlan","BackendData":{"VtepMAC":"zz"}}"#, "VtepMAC"),
            (br#"{"PublicIP":"1.1.1.1","BackendType":"vxlan","BackendData":{"VNI":-1,"VtepMAC":"f6:14:ca:9c:9a:74"}}"#, "VNI"),
            (br#"{"PublicIP":"1.1.1.1","BackendType":7}"#, "BackendType"),
        ];
        for (v, needle) in cases {
            let e = LeaseAttrs::from_json("/p/subnets/10.1.1.0-24", v)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("10.1.1.0-24"), "{e}");
        }
    }

    #[test]
    fn keys() {
        assert_eq!(
            parse_subnet_key("/coreos.com/network/subnets/10.1.10.0-24").unwrap(),
            "10.1.10.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert_eq!(
            parse_subnet_key("10.12.13.0-24&fd00:12:13::-56").unwrap(),
            "10.12.13.0/24".parse::<Ipv4Net>().unwrap()
        );
        for bad in [
            "10.1.10.0",
            "10.1.10.0-33",
            "10.1.10.1-24",
            "x-24",
            "10.1.10.0-",
            "",
        ] {
            assert!(parse_subnet_key(bad).is_err(), "{bad}");
        }
        assert_eq!(subnet_key("10.1.10.0/24".parse().unwrap()), "10.1.10.0-24");
    }

    #[test]
    fn peer_set_events() {
        let mut ps = PeerSet::new("vxlan");
        assert_eq!(ps.set_own("10.1.1.0/24".parse::<Ipv4Net>().unwrap()), None);
        let a = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:02");
        assert_eq!(
            ps.put(vx("10.1.1.0/24", "1.1.1.1", "02:00:00:00:00:01")),
            None,
            "own lease skipped"
        );
        assert_eq!(ps.put(a.clone()), Some(LeaseEvent::Added(a.clone())));
        let mut renewed = a.clone();
        renewed.etcd_lease = 99;
        assert_eq!(ps.put(renewed.clone()), None, "renewal is not a change");
        let moved = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:22");
        assert_eq!(
            ps.put(moved.clone()),
            Some(LeaseEvent::Changed {
                old: renewed,
                new: moved.clone()
            })
        );
        let hg = Lease {
            attrs: LeaseAttrs {
                backend: BackendAttrs::HostGw,
                ..moved.attrs.clone()
            },
            ..moved.clone()
        };
        assert_eq!(
            ps.put(hg.clone()),
            Some(LeaseEvent::Removed(moved)),
            "switched away from vxlan"
        );
        assert_eq!(
            ps.put(Lease {
                subnet: "10.1.3.0/24".parse().unwrap(),
                ..hg
            }),
            None,
            "host-gw ignored"
        );
        assert!(ps.is_empty());
    }

    #[test]
    fn reset_diffs_against_current() {
        let mut ps = PeerSet::new("vxlan");
        let a = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:02");
        let b = vx("10.1.3.0/24", "1.1.1.3", "02:00:00:00:00:03");
        let c = vx("10.1.4.0/24", "1.1.1.4", "02:00:00:00:00:04");
        assert_eq!(ps.reset(vec![a.clone(), b.clone()]).len(), 2);
        let ev = ps.reset(vec![b.clone(), c.clone()]);
        assert_eq!(
            ev,
            vec![LeaseEvent::Added(c.clone()), LeaseEvent::Removed(a)]
        );
        assert_eq!(ps.reset(vec![b.clone(), c.clone()]), vec![]);
        assert_eq!(ps.leases(), vec![b, c]);
    }
}
