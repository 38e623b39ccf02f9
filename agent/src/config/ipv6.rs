//! The IPv6 half of a network config: `IPv6Network`, `IPv6SubnetLen` and the subnet bounds,
//! defaulted and checked as flannel's `CheckNetworkConfig` does.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use super::raw::{ip6, uint, Typed};
use super::{bound, invalid, ConfigError};

/// The IPv6 part of a network config (`IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`,
/// `IPv6SubnetMax`), defaults filled in as flannel's `CheckNetworkConfig` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Config {
    pub network: Ipv6Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

impl Ipv6Config {
    pub(super) fn parse(
        network: Option<Ipv6Net>,
        subnet_len: Option<Typed<u64>>,
        min: Option<Typed<String>>,
        max: Option<Typed<String>>,
    ) -> Result<Self, ConfigError> {
        let Some(network) = network else {
            return Err(ConfigError::MissingIpv6Network);
        };
        if network.network() != network.addr() {
            return Err(invalid(
                "IPv6Network",
                format!("\"{network}\""),
                "host bits are set",
                format!("write the network address, \"{}\"", network.trunc()),
            ));
        }
        let prefix = network.prefix_len();
        let subnet_len = match uint(subnet_len, "IPv6SubnetLen", 128)? {
            // flannel treats 0 as "not set".
            None | Some(0) => {
                if prefix > 124 {
                    return Err(invalid(
                        "IPv6Network",
                        network,
                        "IPv6Network is too small. Minimum useful network prefix is /124",
                        "use a /124 or larger IPv6Network",
                    ));
                } else if prefix <= 62 {
                    64
                } else {
                    prefix + 2
                }
            }
            Some(len) if len > 126 => {
                return Err(invalid(
                    "IPv6SubnetLen",
                    len,
                    "SubnetLen must be less than /127",
                    "use 126 or less (64 is usual)",
                ))
            }
            Some(len) if (len as u8) < prefix + 2 => {
                return Err(invalid(
                    "IPv6SubnetLen",
                    len,
                    format!("network must be able to accommodate at least four subnets ({network} holds fewer than four /{len})"),
                    format!("use IPv6SubnetLen {} or more, or a larger IPv6Network", prefix + 2),
                ))
            }
            Some(len) => len as u8,
        };
        let size = 1u128 << (128 - subnet_len);
        let start = u128::from(network.network());
        let end = start.wrapping_add(1u128.checked_shl(128 - u32::from(prefix)).unwrap_or(0));
        let bound = |v, field| bound(ip6(v, field)?, field, "IPv6Network", network, subnet_len);
        let subnet_min =
            bound(min, "IPv6SubnetMin")?.unwrap_or(Ipv6Addr::from(start.wrapping_add(size)));
        let subnet_max =
            bound(max, "IPv6SubnetMax")?.unwrap_or(Ipv6Addr::from(end.wrapping_sub(size)));
        if subnet_min > subnet_max {
            return Err(invalid(
                "IPv6SubnetMin",
                subnet_min,
                format!(
                    "it is above IPv6SubnetMax {subnet_max}, which leaves no subnet to hand out"
                ),
                "make IPv6SubnetMin lower than IPv6SubnetMax, or remove both",
            ));
        }
        Ok(Ipv6Config {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
        })
    }
}
