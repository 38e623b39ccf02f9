//! Network config from `<prefix>/config`: parsing, defaults, validation.
//!
//! Field names are matched without regard to case and unknown fields are ignored, as
//! flanneld (Go's encoding/json) does. Defaults and checks follow flannel's
//! `CheckNetworkConfig`; every error names the field, the value and the fix.

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

use crate::family::IpFamily;

mod ipv6;
mod raw;

pub use ipv6::Ipv6Config;
use raw::{boolean, ip, ip6, parsed, raw, uint, RawBackend, RawConfig};
pub(crate) use raw::{lowercase_keys, Typed};

/// The kernel's default VXLAN port (flannel leaves `Port` 0 to mean this).
pub const DEFAULT_VXLAN_PORT: u16 = weft_common::wire::DEFAULT_PORT;
const MAX_VNI: u64 = (1 << 24) - 1;
/// IPv6's minimum link MTU (1280) plus the 50 bytes the overlay MTU gives up to VXLAN: below this
/// the overlay cannot carry IPv6 at all (the kernel disables IPv6 on such a link).
const MIN_IPV6_UNDERLAY_MTU: u32 = 1330;
const SUPPORTED: &str = "\"vxlan\" or \"host-gw\"";

/// A network config that failed to parse or validate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {reason}; fix the syntax, e.g. {{\"Network\": \"10.1.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}")]
    Syntax { reason: String },
    #[error("network config must be a JSON object, found {value}; write e.g. {{\"Network\": \"10.1.0.0/16\"}}")]
    NotObject { value: String },
    #[error("field {field} appears twice with different letter case ({first:?} and {second:?}); keep only one")]
    Duplicate {
        field: String,
        first: String,
        second: String,
    },
    #[error("please define a correct Network parameter in the flannel config: field Network is missing; add e.g. \"Network\": \"10.1.0.0/16\"")]
    MissingNetwork,
    #[error("please define a correct IPv6Network parameter in the flannel config: EnableIPv6 is true but IPv6Network is missing; add e.g. \"IPv6Network\": \"fd00:10::/56\"")]
    MissingIpv6Network,
    #[error("field {field} is {value}, expected {expected}; {fix}")]
    WrongType {
        field: &'static str,
        value: String,
        expected: &'static str,
        fix: &'static str,
    },
    #[error("field {field} is {value}: {reason}; {fix}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
        fix: String,
    },
    #[error("Backend.Type is {value}: weft supports {SUPPORTED}; set \"Backend\": {{\"Type\": \"vxlan\"}}")]
    UnsupportedBackend { value: String },
}

fn invalid(
    field: &'static str,
    value: impl ToString,
    reason: impl ToString,
    fix: impl ToString,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.to_string(),
        fix: fix.to_string(),
    }
}

/// VXLAN backend options (flannel's vxlan backend config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// UDP port; 0 in the config means the kernel default, resolved here to 8472.
    pub port: u16,
    /// Underlay MTU to assume instead of the external interface's; the overlay gets this minus
    /// the 50-byte VXLAN overhead. `None`: the interface's MTU.
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

/// The backend a network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan(VxlanConfig),
    HostGw,
}

impl Backend {
    /// flannel's `BackendType` name, as leases carry it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Vxlan(_) => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }
}

/// A validated network config with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// When false, `network` is 0.0.0.0/0, `subnet_len` 0 and the bounds 0.0.0.0 (flannel's
    /// zero values): there is no IPv4 overlay. Prefer [`NetworkConfig::ipv4_network`].
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    /// The IPv6 half, present exactly when `EnableIPv6` is true.
    pub ipv6: Option<Ipv6Config>,
    pub enable_nftables: bool,
    pub backend: Backend,
}

impl NetworkConfig {
    /// Parse and validate the JSON stored at `<prefix>/config`.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let v: Value = serde_json::from_str(json).map_err(|e| ConfigError::Syntax {
            reason: e.to_string(),
        })?;
        let Value::Object(obj) = v else {
            return Err(ConfigError::NotObject {
                value: v.to_string(),
            });
        };
        let raw: RawConfig = raw(obj)?;

        let enable_ipv4 = boolean(raw.enableipv4, "EnableIPv4", true)?;
        let enable_ipv6 = boolean(raw.enableipv6, "EnableIPv6", false)?;
        let enable_nftables = boolean(raw.enablenftables, "EnableNFTables", false)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(invalid(
                "EnableIPv4",
                false,
                "EnableIPv6 is off too, so the overlay would carry nothing",
                "remove EnableIPv4 (it defaults to true), or set \"EnableIPv6\": true with an IPv6Network",
            ));
        }
        // Read even when IPv6 is off: flanneld fails to decode a malformed IPv6Network either way.
        let ipv6_network: Option<Ipv6Net> = parsed(
            raw.ipv6network,
            "IPv6Network",
            "please define a correct IPv6Network parameter in the flannel config: not an IPv6 CIDR",
            "write e.g. \"fd00:10::/56\"",
        )?;
        let ipv6 = if enable_ipv6 {
            Some(Ipv6Config::parse(
                ipv6_network,
                raw.ipv6subnetlen,
                raw.ipv6subnetmin,
                raw.ipv6subnetmax,
            )?)
        } else {
            uint(raw.ipv6subnetlen, "IPv6SubnetLen", 128)?;
            ip6(raw.ipv6subnetmin, "IPv6SubnetMin")?;
            ip6(raw.ipv6subnetmax, "IPv6SubnetMax")?;
            None
        };

        // flanneld leaves the IPv4 fields at their zero values (and never reads Network) when
        // EnableIPv4 is false; so does weft: 0.0.0.0/0 stands for "no IPv4" as in flannel's keys.
        let (network, subnet_len, subnet_min, subnet_max) = if enable_ipv4 {
            Self::ipv4(raw.network, raw.subnetlen, raw.subnetmin, raw.subnetmax)?
        } else {
            let zero = Ipv4Addr::UNSPECIFIED;
            (Ipv4Net::default(), 0, zero, zero)
        };
        let backend = parse_backend(raw.backend)?;
        if let (Backend::Vxlan(VxlanConfig { mtu: Some(m), .. }), true) = (backend, enable_ipv6) {
            if m < MIN_IPV6_UNDERLAY_MTU {
                return Err(invalid(
                    "Backend.MTU",
                    m,
                    format!("with EnableIPv6 the overlay MTU ({m} - 50) is below 1280, the smallest MTU IPv6 allows, and flannel-v6 would carry no IPv6"),
                    format!("use {MIN_IPV6_UNDERLAY_MTU} or more, or remove MTU to use the interface's"),
                ));
            }
        }
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            enable_ipv4,
            enable_ipv6,
            ipv6,
            enable_nftables,
            backend,
        })
    }

    /// The IPv4 half: Network, SubnetLen, SubnetMin, SubnetMax with flannel's defaults.
    fn ipv4(
        network: Option<Typed<String>>,
        subnet_len: Option<Typed<u64>>,
        min: Option<Typed<String>>,
        max: Option<Typed<String>>,
    ) -> Result<(Ipv4Net, u8, Ipv4Addr, Ipv4Addr), ConfigError> {
        let network = Self::network(network)?;
        let subnet_len = Self::subnet_len(subnet_len, network)?;
        let size = 1u64 << (32 - subnet_len);
        let net_start = u64::from(u32::from(network.network()));
        let net_end = net_start + (1u64 << (32 - network.prefix_len()));
        let default_min = Ipv4Addr::from((net_start + size) as u32);
        let default_max = Ipv4Addr::from((net_end - size) as u32);
        let bound = |v, field| bound(ip(v, field)?, field, "Network", network, subnet_len);
        let subnet_min = bound(min, "SubnetMin")?.unwrap_or(default_min);
        let subnet_max = bound(max, "SubnetMax")?.unwrap_or(default_max);
        if subnet_min > subnet_max {
            return Err(invalid(
                "SubnetMin",
                subnet_min,
                format!("it is above SubnetMax {subnet_max}, which leaves no subnet to hand out"),
                "make SubnetMin lower than SubnetMax, or remove both",
            ));
        }
        Ok((network, subnet_len, subnet_min, subnet_max))
    }

    /// The IPv4 network when IPv4 is enabled.
    pub fn ipv4_network(&self) -> Option<Ipv4Net> {
        self.enable_ipv4.then_some(self.network)
    }

    /// The IPv6 network when IPv6 is enabled.
    pub fn ipv6_network(&self) -> Option<Ipv6Net> {
        self.ipv6.map(|v6| v6.network)
    }

    fn network(v: Option<Typed<String>>) -> Result<Ipv4Net, ConfigError> {
        let s = match v {
            None => return Err(ConfigError::MissingNetwork),
            Some(Typed::Ok(s)) => s,
            Some(Typed::Other(v)) => {
                return Err(ConfigError::WrongType {
                    field: "Network",
                    value: v.to_string(),
                    expected: "a CIDR string",
                    fix: "write e.g. \"Network\": \"10.1.0.0/16\"",
                })
            }
        };
        let net: Ipv4Net = s.parse().map_err(|_| {
            invalid(
                "Network",
                format!("{s:?}"),
                "please define a correct Network parameter in the flannel config: not an IPv4 CIDR",
                "write e.g. \"10.1.0.0/16\"",
            )
        })?;
        if net.network() != net.addr() {
            return Err(invalid(
                "Network",
                format!("{s:?}"),
                "host bits are set",
                format!("write the network address, \"{}\"", net.trunc()),
            ));
        }
        Ok(net)
    }

    fn subnet_len(v: Option<Typed<u64>>, network: Ipv4Net) -> Result<u8, ConfigError> {
        let prefix = network.prefix_len();
        match uint(v, "SubnetLen", 32)? {
            // flannel treats 0 as "not set".
            None | Some(0) => {
                if prefix > 28 {
                    Err(invalid(
                        "Network",
                        network,
                        "network is too small. Minimum useful network prefix is /28",
                        "use a /28 or larger network",
                    ))
                } else if prefix <= 22 {
                    Ok(24)
                } else {
                    Ok(prefix + 2)
                }
            }
            Some(len) if len > 30 => Err(invalid("SubnetLen", len, "SubnetLen must be less than /31", "use 30 or less")),
            Some(len) if (len as u8) < prefix + 2 => Err(invalid(
                "SubnetLen",
                len,
                format!("network must be able to accommodate at least four subnets ({network} holds fewer than four /{len})"),
                format!("use SubnetLen {} or more, or a larger Network", prefix + 2),
            )),
            Some(len) => Ok(len as u8),
        }
    }

    /// The first address of the network's subnets for the overlay MTU and subnet.env.
    pub fn subnet_size(&self) -> u32 {
        1u32 << (32 - self.subnet_len)
    }
}

/// Checks `field` (`SubnetMin`, `SubnetMax` or their IPv6 twins) as flannel
/// does: inside `network` (the field `network_field`) and on a `subnet_len`
/// boundary. Unset and the unspecified address (flannel's "not set") give `None`.
fn bound<A: IpFamily>(
    ip: Option<A>,
    field: &'static str,
    network_field: &str,
    network: A::Net,
    subnet_len: u8,
) -> Result<Option<A>, ConfigError> {
    let Some(ip) = ip.filter(|ip| *ip != A::UNSPECIFIED) else {
        return Ok(None);
    };
    if !network.into().contains(&ip.into()) {
        return Err(invalid(
            field,
            ip,
            format!("{field} is not in the range of the {network_field} {network}"),
            format!("pick an address inside {network_field} or remove the field"),
        ));
    }
    let aligned = A::net(ip, subnet_len).map_or(ip, |n| A::network(&n));
    if aligned != ip {
        return Err(invalid(
            field,
            ip,
            format!("{field} is not on a SubnetLen boundary: {ip}"),
            format!("use {aligned}, the start of its /{subnet_len}"),
        ));
    }
    Ok(Some(ip))
}

fn parse_backend(v: Option<Value>) -> Result<Backend, ConfigError> {
    let b: RawBackend = match v {
        // flanneld falls back to the udp backend when none is given; weft has no udp.
        None | Some(Value::Null) => {
            return Err(ConfigError::UnsupportedBackend {
                value: "missing because Backend is missing (flannel's default is \"udp\")".into(),
            })
        }
        Some(Value::Object(o)) => raw(o)?,
        Some(v) => {
            return Err(ConfigError::WrongType {
                field: "Backend",
                value: v.to_string(),
                expected: "an object",
                fix: "write e.g. \"Backend\": {\"Type\": \"vxlan\"}",
            })
        }
    };
    let ty = match b.ty {
        None => {
            return Err(ConfigError::UnsupportedBackend {
                value: "missing (flannel's default is \"udp\")".into(),
            })
        }
        Some(Typed::Ok(s)) => s,
        Some(Typed::Other(v)) => {
            return Err(ConfigError::WrongType {
                field: "Backend.Type",
                value: v.to_string(),
                expected: "a string",
                fix: "write e.g. \"Type\": \"vxlan\"",
            })
        }
    };
    match ty.as_str() {
        "vxlan" => {
            let vni = uint(b.vni, "Backend.VNI", MAX_VNI)?.unwrap_or(1) as u32;
            let port = uint(b.port, "Backend.Port", u64::from(u16::MAX))?.unwrap_or(0) as u16;
            let mtu = uint(b.mtu, "Backend.MTU", 65535)?.map(|m| m as u32);
            if let Some(m) = mtu.filter(|m| *m < 576) {
                return Err(invalid(
                    "Backend.MTU",
                    m,
                    "below 576, the smallest MTU IPv4 hosts must accept",
                    "use 576 or more, or remove MTU to use the interface's",
                ));
            }
            Ok(Backend::Vxlan(VxlanConfig {
                vni,
                port: if port == 0 { DEFAULT_VXLAN_PORT } else { port },
                mtu,
                gbp: boolean(b.gbp, "Backend.GBP", false)?,
                learning: boolean(b.learning, "Backend.Learning", false)?,
                direct_routing: boolean(b.directrouting, "Backend.DirectRouting", false)?,
            }))
        }
        "host-gw" => Ok(Backend::HostGw),
        other => Err(ConfigError::UnsupportedBackend {
            value: format!("{other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests;
