//! What a lease value carries ([`LeaseAttrs`], its backend data and VTEP MACs) and its JSON,
//! read and written exactly as flanneld does.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::LeaseError;
use crate::config::{lowercase_keys, Typed};

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
/// A MAC address, printed lowercase with colons as flannel writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

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

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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
