//! IPv4 and IPv6 as one type parameter. Code that does the same for both
//! families (routes, addresses, map entries, config bounds) is written once
//! over `A: IpFamily`; only the conversions below differ between them.

use std::{
    fmt::{Debug, Display},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An address family, implemented by its address type: [`Ipv4Addr`] or [`Ipv6Addr`].
pub trait IpFamily:
    Copy + Ord + Hash + Display + Debug + Send + Sync + Into<IpAddr> + From<Self::Octets> + 'static
{
    /// The family's network type ([`Ipv4Net`] or [`Ipv6Net`]).
    type Net: Copy + Ord + Hash + Display + Debug + Send + Sync + Into<IpNet> + 'static;
    /// The address in network byte order, as the kernel and the eBPF maps hold it.
    type Octets: Copy + Debug + Eq + Send + Sync + 'static;
    /// The prefix length of a host route: the address length in bits.
    const HOST_PREFIX: u8;
    const UNSPECIFIED: Self;
    fn octets(self) -> Self::Octets;
    /// `ip` when it is of this family.
    fn from_ip(ip: IpAddr) -> Option<Self>;
    /// The network of `len` bits at `addr` (host bits kept); `None` when `len` is too long.
    fn net(addr: Self, len: u8) -> Option<Self::Net>;
    /// The first address of `net`.
    fn network(net: &Self::Net) -> Self;

    /// `net`'s prefix length.
    fn prefix_len(net: &Self::Net) -> u8 {
        (*net).into().prefix_len()
    }

    /// `net` with its host bits cleared.
    fn trunc(net: &Self::Net) -> Self::Net {
        Self::net(Self::network(net), Self::prefix_len(net)).unwrap_or(*net)
    }
}

/// A network type, leading back to its family: a call that takes only a
/// network ([`Ipv4Net`] or [`Ipv6Net`]) infers the family from it.
pub trait IpNetwork: Copy + Display {
    type Family: IpFamily<Net = Self>;
}

// The two rows differ only in names: one implementation, stamped per family.
macro_rules! ip_families {
    ($($addr:ident, $net:ident, $variant:ident, $bytes:literal;)*) => {$(
        impl IpFamily for $addr {
            type Net = $net;
            type Octets = [u8; $bytes];
            const HOST_PREFIX: u8 = $bytes * 8;
            const UNSPECIFIED: Self = $addr::UNSPECIFIED;
            fn octets(self) -> [u8; $bytes] {
                $addr::octets(&self)
            }
            fn from_ip(ip: IpAddr) -> Option<Self> {
                match ip {
                    IpAddr::$variant(a) => Some(a),
                    _ => None,
                }
            }
            fn net(addr: Self, len: u8) -> Option<$net> {
                $net::new(addr, len).ok()
            }
            fn network(net: &$net) -> Self {
                net.network()
            }
        }

        impl IpNetwork for $net {
            type Family = $addr;
        }
    )*};
}

ip_families! {
    Ipv4Addr, Ipv4Net, V4, 4;
    Ipv6Addr, Ipv6Net, V6, 16;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<A: IpFamily>(net: &str) -> (A::Net, A, u8)
    where
        A::Net: std::str::FromStr<Err = ipnet::AddrParseError>,
    {
        let n: A::Net = net.parse().unwrap();
        (A::trunc(&n), A::network(&A::trunc(&n)), A::prefix_len(&n))
    }

    #[test]
    fn both_families_split_and_truncate_networks() {
        let (n, a, len) = roundtrip::<Ipv4Addr>("10.5.7.9/24");
        assert_eq!(
            (n.to_string(), a, len),
            ("10.5.7.0/24".into(), Ipv4Addr::new(10, 5, 7, 0), 24)
        );
        let (n, a, len) = roundtrip::<Ipv6Addr>("fc00:0:0:36::5/64");
        assert_eq!(
            (n.to_string(), a.to_string(), len),
            ("fc00:0:0:36::/64".into(), "fc00:0:0:36::".into(), 64)
        );
        assert_eq!(Ipv4Addr::from_ip("fd00::1".parse().unwrap()), None);
        assert_eq!(Ipv4Addr::net(Ipv4Addr::UNSPECIFIED, 33), None);
        assert_eq!(
            (
                <Ipv4Addr as IpFamily>::HOST_PREFIX,
                <Ipv6Addr as IpFamily>::HOST_PREFIX
            ),
            (32, 128)
        );
    }
}
