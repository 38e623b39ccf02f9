//! Lease keys: the subnets naming a lease, in flannel's etcd spelling (`10.1.10.0-24`,
//! `10.1.10.0-24&fd00:10:1::-64`, `0.0.0.0-0&fd00:10:1::-64`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::LeaseError;

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

    /// Whether the two keys name a subnet in common, in either family: two leases that may
    /// not both exist, though etcd holds them under different keys (`10.1.10.0-24&fd00:10:1::-64`
    /// and `10.1.10.0-24&fd00:10:2::-64`).
    pub fn shares_a_subnet(&self, other: &LeaseKey) -> bool {
        (self.ipv4().is_some() && self.ipv4() == other.ipv4())
            || (self.v6.is_some() && self.v6 == other.v6)
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
