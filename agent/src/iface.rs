//! External interface choice, as flanneld makes it: `--iface` (name or IP, first match),
//! `--iface-regex`, else the interface of the default route; `--public-ip` overrides the
//! address advertised, `--public-ipv6` the IPv6 one. The interfaces, addresses and routes come
//! from rtnetlink.
//!
//! As in flanneld, the network config decides which family the choice goes by ([`IpStack`]): an
//! IPv6-only network (`EnableIPv4: false`) matches `--iface` addresses and `--iface-regex` against
//! IPv6 addresses, falls back to the default IPv6 route's interface, and needs no IPv4 address on
//! the interface at all.

use std::net::{Ipv4Addr, Ipv6Addr};

use regex::Regex;

use crate::netlink::{ExternalIface, Interface, Netlink, NetlinkError};

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("list interfaces: {source}")]
    List {
        #[source]
        source: NetlinkError,
    },
    #[error(
        "no interface matches --iface {wanted}; interfaces with an {family} address: {available}"
    )]
    NoMatch {
        wanted: String,
        family: &'static str,
        available: String,
    },
    #[error(
        "no interface matches --iface-regex {wanted}; interfaces with an {family} address: {available}"
    )]
    NoRegexMatch {
        wanted: String,
        family: &'static str,
        available: String,
    },
    #[error(
        "no default IPv4 route to pick the external interface from; pass --iface or --iface-regex"
    )]
    NoDefaultRoute,
    #[error(
        "interface {name} has no IPv4 address; give it one or pass --iface with another interface"
    )]
    NoAddress { name: String },
    #[error(
        "no default IPv6 route to pick the external interface from (the network is IPv6-only, \
         EnableIPv4 false); pass --iface or --iface-regex"
    )]
    NoDefaultRoute6,
    #[error(
        "interface {name} has no global IPv6 address, which an IPv6-only network (EnableIPv4 false) \
         needs; give it one (e.g. `ip -6 addr add fd00:16::21/64 dev {name}`) or pass --iface with \
         another interface"
    )]
    NoIpv6Address { name: String },
}

/// Which family the interface is chosen by: the network config's `EnableIPv4` / `EnableIPv6`
/// (flanneld's `ipStack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpStack {
    /// IPv4, alone or with IPv6 (whose address then comes from the interface chosen by IPv4).
    #[default]
    V4,
    /// IPv6 only: the interface needs an IPv6 address and no IPv4 one.
    V6,
}

impl IpStack {
    pub fn of(enable_ipv4: bool) -> Self {
        if enable_ipv4 {
            Self::V4
        } else {
            Self::V6
        }
    }
}

/// What the flags ask for.
#[derive(Debug, Clone, Default)]
pub struct IfaceChoice {
    pub iface: Vec<String>,
    pub iface_regex: Vec<Regex>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

fn available(ifaces: &[Interface], stack: IpStack) -> String {
    let list: Vec<String> = ifaces
        .iter()
        .filter_map(|i| {
            let addrs: Vec<String> = match stack {
                IpStack::V4 => i.addrs.iter().map(ToString::to_string).collect(),
                IpStack::V6 => i.addrs6.iter().map(ToString::to_string).collect(),
            };
            (!addrs.is_empty()).then(|| format!("{} ({})", i.name, addrs.join(", ")))
        })
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join("; ")
    }
}

fn family(stack: IpStack) -> &'static str {
    match stack {
        IpStack::V4 => "IPv4",
        IpStack::V6 => "IPv6",
    }
}

/// Whether `i` has an address of the family `stack` chooses by.
fn has_addr(i: &Interface, stack: IpStack) -> bool {
    match stack {
        IpStack::V4 => !i.addrs.is_empty(),
        IpStack::V6 => !i.addrs6.is_empty(),
    }
}

/// The address an interface was found by, if it was found by one.
#[derive(Clone, Copy)]
enum FoundBy {
    Name,
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

/// flanneld's search, the same for both stacks: `--iface` by name or address, `--iface-regex`
/// against addresses then names, else the interface of the default route (`default_route`, of
/// the stack's family). An IPv4 stack also finds interfaces by IPv6 address (the dual-stack
/// address then comes from it); an IPv6 stack never by an IPv4 one.
fn find_iface<'a>(
    choice: &IfaceChoice,
    ifaces: &'a [Interface],
    default_route: Option<u32>,
    stack: IpStack,
) -> Result<(&'a Interface, FoundBy), IfaceError> {
    for wanted in &choice.iface {
        let found = match wanted.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(ip)) if stack == IpStack::V4 => ifaces
                .iter()
                .find(|i| i.addrs.contains(&ip))
                .map(|i| (i, FoundBy::V4(ip))),
            // An IPv4 address names no interface of an IPv6 stack: flanneld looks addresses up
            // among IPv6 ones there.
            Ok(std::net::IpAddr::V4(_)) => None,
            Ok(std::net::IpAddr::V6(ip)) => ifaces
                .iter()
                .find(|i| i.addrs6.contains(&ip))
                .map(|i| (i, FoundBy::V6(ip))),
            Err(_) => ifaces
                .iter()
                .find(|i| i.name == *wanted)
                .map(|i| (i, FoundBy::Name)),
        };
        if let Some(found) = found {
            return Ok(found);
        }
    }
    if !choice.iface.is_empty() {
        return Err(IfaceError::NoMatch {
            wanted: choice.iface.join(", "),
            family: family(stack),
            available: available(ifaces, stack),
        });
    }
    for re in &choice.iface_regex {
        // flanneld matches the regex against addresses first, then names. Unlike flanneld, a
        // name match without an address of the stack's family is skipped rather than chosen
        // and refused.
        for i in ifaces {
            if stack == IpStack::V4 {
                if let Some(a) = i.addrs.iter().find(|a| re.is_match(&a.to_string())) {
                    return Ok((i, FoundBy::V4(*a)));
                }
            }
            if let Some(a) = i.addrs6.iter().find(|a| re.is_match(&a.to_string())) {
                return Ok((i, FoundBy::V6(*a)));
            }
        }
        if let Some(i) = ifaces
            .iter()
            .find(|i| re.is_match(&i.name) && has_addr(i, stack))
        {
            return Ok((i, FoundBy::Name));
        }
    }
    if !choice.iface_regex.is_empty() {
        let wanted = choice
            .iface_regex
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(IfaceError::NoRegexMatch {
            wanted,
            family: family(stack),
            available: available(ifaces, stack),
        });
    }
    let no_route = || match stack {
        IpStack::V4 => IfaceError::NoDefaultRoute,
        IpStack::V6 => IfaceError::NoDefaultRoute6,
    };
    let index = default_route.ok_or_else(no_route)?;
    let i = ifaces
        .iter()
        .find(|i| i.index == index)
        .ok_or_else(no_route)?;
    Ok((i, FoundBy::Name))
}

/// Choose among `ifaces` as flanneld does for an IPv4 (or dual-stack) network; `default_route` is
/// the index of the default route's interface. The address is the one matched, else the
/// interface's first IPv4 address.
pub fn choose_from(
    choice: &IfaceChoice,
    ifaces: &[Interface],
    default_route: Option<u32>,
) -> Result<ExternalIface, IfaceError> {
    let (iface, by) = find_iface(choice, ifaces, default_route, IpStack::V4)?;
    let (addr, addr6) = match by {
        FoundBy::Name => (None, None),
        FoundBy::V4(a) => (Some(a), None),
        FoundBy::V6(a) => (None, Some(a)),
    };
    let addr = addr
        .or_else(|| iface.addrs.first().copied())
        .ok_or_else(|| IfaceError::NoAddress {
            name: iface.name.clone(),
        })?;
    let mut e = ExternalIface::new(iface, addr, choice.public_ip);
    // flanneld: the address the interface was picked by, else its first global one.
    e.ipv6 = addr6.or(e.ipv6);
    e.public_ipv6 = choice.public_ipv6.or(e.ipv6);
    Ok(e)
}

/// Choose among `ifaces` as flanneld does for an IPv6-only network (its `ipv6Stack`): `--iface`
/// by name or IPv6 address, `--iface-regex` against IPv6 addresses then names, else the interface
/// of the default IPv6 route (`default_route6`); the address is the one matched, else the
/// interface's first global IPv6 address. No IPv4 address is needed: `ipv4` and `public_ip` are
/// 0.0.0.0, as the lease's PublicIP of an IPv6-only host.
pub fn choose_from_v6(
    choice: &IfaceChoice,
    ifaces: &[Interface],
    default_route6: Option<u32>,
) -> Result<ExternalIface, IfaceError> {
    let (iface, by) = find_iface(choice, ifaces, default_route6, IpStack::V6)?;
    let matched = match by {
        FoundBy::V6(a) => Some(a),
        FoundBy::Name | FoundBy::V4(_) => None,
    };
    let addr6 = matched
        .or_else(|| iface.addrs6.first().copied())
        .ok_or_else(|| IfaceError::NoIpv6Address {
            name: iface.name.clone(),
        })?;
    let mut e = ExternalIface::new(iface, Ipv4Addr::UNSPECIFIED, Some(Ipv4Addr::UNSPECIFIED));
    e.ipv6 = Some(addr6);
    e.public_ipv6 = Some(choice.public_ipv6.unwrap_or(addr6));
    Ok(e)
}

/// Choose in `nl`'s network namespace for an IPv4 (or dual-stack) network.
pub async fn choose(nl: &Netlink, choice: &IfaceChoice) -> Result<ExternalIface, IfaceError> {
    choose_for(nl, choice, IpStack::V4).await
}

/// Choose in `nl`'s network namespace by the family `stack` names.
pub async fn choose_for(
    nl: &Netlink,
    choice: &IfaceChoice,
    stack: IpStack,
) -> Result<ExternalIface, IfaceError> {
    let list = |source| IfaceError::List { source };
    let ifaces = nl.interfaces().await.map_err(list)?;
    match stack {
        IpStack::V4 => {
            let default_route = nl.default_route_index().await.map_err(list)?;
            choose_from(choice, &ifaces, default_route)
        }
        IpStack::V6 => {
            let routes = nl.routes::<Ipv6Addr>().await.map_err(list)?;
            let default_route6 = routes
                .iter()
                .find(|r| r.dst.prefix_len() == 0 && r.oif.is_some())
                .and_then(|r| r.oif);
            choose_from_v6(choice, &ifaces, default_route6)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifaces() -> Vec<Interface> {
        vec![
            Interface {
                name: "lo".into(),
                index: 1,
                addrs: vec![Ipv4Addr::LOCALHOST],
                addrs6: vec![],
                mtu: 65536,
            },
            Interface {
                name: "eth0".into(),
                index: 2,
                addrs: vec!["192.168.1.5".parse().unwrap()],
                addrs6: vec!["fd00:1::5".parse().unwrap()],
                mtu: 1500,
            },
            Interface {
                name: "eth1".into(),
                index: 3,
                addrs: vec!["172.16.0.5".parse().unwrap(), "172.16.0.6".parse().unwrap()],
                addrs6: vec!["fd00:16::5".parse().unwrap(), "fd00:16::6".parse().unwrap()],
                mtu: 9000,
            },
            Interface {
                name: "dummy0".into(),
                index: 4,
                addrs: vec![],
                addrs6: vec![],
                mtu: 1500,
            },
        ]
    }

    #[test]
    fn by_name_ip_first_match_and_override() {
        let c = IfaceChoice {
            iface: vec!["nope".into(), "172.16.0.6".into(), "eth0".into()],
            ..Default::default()
        };
        let e = choose_from(&c, &ifaces(), None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.ipv4.to_string(), e.mtu, e.index),
            ("eth1", "172.16.0.6".into(), 9000, 3)
        );
        let c = IfaceChoice {
            iface: vec!["eth0".into()],
            public_ip: Some("1.2.3.4".parse().unwrap()),
            ..Default::default()
        };
        let e = choose_from(&c, &ifaces(), None).unwrap();
        assert_eq!(
            (e.ipv4.to_string(), e.public_ip.to_string()),
            ("192.168.1.5".into(), "1.2.3.4".into())
        );
    }

    #[test]
    fn ipv6_address_as_flanneld_picks_it() {
        let e = choose_from(&IfaceChoice::default(), &ifaces(), Some(3)).unwrap();
        assert_eq!(
            (e.ipv6, e.public_ipv6),
            (
                Some("fd00:16::5".parse().unwrap()),
                Some("fd00:16::5".parse().unwrap())
            )
        );
        let c = IfaceChoice {
            iface: vec!["fd00:16::6".into()],
            public_ipv6: Some("2001:db8::1".parse().unwrap()),
            ..Default::default()
        };
        let e = choose_from(&c, &ifaces(), None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.ipv4.to_string()),
            ("eth1", "172.16.0.5".into())
        );
        assert_eq!(
            (e.ipv6, e.public_ipv6),
            (
                Some("fd00:16::6".parse().unwrap()),
                Some("2001:db8::1".parse().unwrap())
            )
        );
        let c = IfaceChoice {
            iface_regex: vec![Regex::new("^fd00:1::").unwrap()],
            ..Default::default()
        };
        let e = choose_from(&c, &ifaces(), None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.ipv6),
            ("eth0", Some("fd00:1::5".parse().unwrap()))
        );
        let e = choose_from(
            &IfaceChoice {
                iface: vec!["lo".into()],
                ..Default::default()
            },
            &ifaces(),
            None,
        )
        .unwrap();
        assert_eq!(e.ipv6, None, "no global IPv6 address");
    }

    #[test]
    fn regex_and_default_route() {
        let c = IfaceChoice {
            iface_regex: vec![Regex::new("^eth").unwrap()],
            ..Default::default()
        };
        assert_eq!(choose_from(&c, &ifaces(), None).unwrap().name, "eth0");
        let c = IfaceChoice {
            iface_regex: vec![Regex::new(r"^172\.16\.0\.6$").unwrap()],
            ..Default::default()
        };
        assert_eq!(
            choose_from(&c, &ifaces(), None).unwrap().ipv4.to_string(),
            "172.16.0.6"
        );
        assert_eq!(
            choose_from(&IfaceChoice::default(), &ifaces(), Some(3))
                .unwrap()
                .name,
            "eth1"
        );
    }

    #[test]
    fn clear_errors() {
        let c = IfaceChoice {
            iface: vec!["wlan9".into()],
            ..Default::default()
        };
        let e = choose_from(&c, &ifaces(), None).unwrap_err().to_string();
        assert!(
            e.contains("wlan9") && e.contains("eth0 (192.168.1.5)"),
            "{e}"
        );
        let c = IfaceChoice {
            iface: vec!["dummy0".into()],
            ..Default::default()
        };
        assert!(choose_from(&c, &ifaces(), None)
            .unwrap_err()
            .to_string()
            .contains("dummy0 has no IPv4"));
        assert!(matches!(
            choose_from(&IfaceChoice::default(), &ifaces(), None),
            Err(IfaceError::NoDefaultRoute)
        ));
    }

    /// IPv6-only (flanneld's ipv6Stack): an interface with no IPv4 address is chosen by name,
    /// by IPv6 address, by regex or by the default IPv6 route, and advertises 0.0.0.0.
    #[test]
    fn ipv6_only_needs_no_ipv4_address() {
        let mut all = ifaces();
        all.push(Interface {
            name: "ens32".into(),
            index: 5,
            addrs: vec![],
            addrs6: vec!["fd00:16::21".parse().unwrap()],
            mtu: 1500,
        });
        let by = |iface: &[&str], regex: Option<&str>, default6| {
            let c = IfaceChoice {
                iface: iface.iter().map(|s| s.to_string()).collect(),
                iface_regex: regex.map(|r| Regex::new(r).unwrap()).into_iter().collect(),
                ..Default::default()
            };
            choose_from_v6(&c, &all, default6)
        };
        for e in [
            by(&["ens32"], None, None).unwrap(),
            by(&["fd00:16::21"], None, None).unwrap(),
            by(&[], Some("^fd00:16::2"), None).unwrap(),
            by(&[], Some("^ens3"), None).unwrap(),
            by(&[], None, Some(5)).unwrap(),
        ] {
            assert_eq!((e.name.as_str(), e.index), ("ens32", 5));
            assert_eq!(
                (e.ipv6, e.public_ipv6),
                (
                    Some("fd00:16::21".parse().unwrap()),
                    Some("fd00:16::21".parse().unwrap())
                )
            );
            assert_eq!(
                (e.ipv4, e.public_ip),
                (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
            );
        }
        // The IPv4 choice refuses it, naming the problem.
        let c = IfaceChoice {
            iface: vec!["ens32".into()],
            ..Default::default()
        };
        assert!(matches!(
            choose_from(&c, &all, None),
            Err(IfaceError::NoAddress { .. })
        ));
        // The address picked by, not the first one, and --public-ipv6 over it.
        let c = IfaceChoice {
            iface: vec!["fd00:16::6".into()],
            public_ipv6: Some("2001:db8::1".parse().unwrap()),
            ..Default::default()
        };
        let e = choose_from_v6(&c, &all, None).unwrap();
        assert_eq!(e.name, "eth1");
        assert_eq!(e.ipv6, Some("fd00:16::6".parse().unwrap()));
        assert_eq!(e.public_ipv6, Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn ipv6_only_errors_name_the_fix() {
        let err = |iface: &[&str], default6| {
            let c = IfaceChoice {
                iface: iface.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            };
            choose_from_v6(&c, &ifaces(), default6)
                .unwrap_err()
                .to_string()
        };
        let e = err(&["dummy0"], None);
        assert!(
            e.contains("dummy0 has no global IPv6 address") && e.contains("EnableIPv4 false"),
            "{e}"
        );
        // An IPv4 address names no interface of an IPv6-only network.
        let e = err(&["192.168.1.5"], None);
        assert!(
            e.contains("interfaces with an IPv6 address") && e.contains("eth0 (fd00:1::5)"),
            "{e}"
        );
        assert!(err(&[], None).contains("no default IPv6 route"));
        assert!(err(&["lo"], None).contains("lo has no global IPv6"));
    }

    /// Dumps need no privilege: this reads the real host through rtnetlink.
    #[tokio::test]
    async fn real_host_has_loopback() {
        let nl = Netlink::connect().unwrap();
        let all = nl.interfaces().await.unwrap();
        let lo = all.iter().find(|i| i.name == "lo").expect("lo");
        assert!(
            lo.addrs.contains(&Ipv4Addr::LOCALHOST) && lo.index > 0,
            "{lo:?}"
        );
    }
}
