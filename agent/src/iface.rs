//! External interface choice, as flanneld makes it: `--iface` (name or IP, first match),
//! `--iface-regex`, else the interface of the default route; `--public-ip` overrides the
//! address advertised, `--public-ipv6` the IPv6 one. The interfaces, addresses and routes come
//! from rtnetlink.

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
    #[error("no interface matches --iface {wanted}; interfaces with an IPv4 address: {available}")]
    NoMatch { wanted: String, available: String },
    #[error(
        "no interface matches --iface-regex {wanted}; interfaces with an IPv4 address: {available}"
    )]
    NoRegexMatch { wanted: String, available: String },
    #[error(
        "no default IPv4 route to pick the external interface from; pass --iface or --iface-regex"
    )]
    NoDefaultRoute,
    #[error(
        "interface {name} has no IPv4 address; give it one or pass --iface with another interface"
    )]
    NoAddress { name: String },
}

/// What the flags ask for.
#[derive(Debug, Clone, Default)]
pub struct IfaceChoice {
    pub iface: Vec<String>,
    pub iface_regex: Vec<Regex>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

fn available(ifaces: &[Interface]) -> String {
    let list: Vec<String> = ifaces
        .iter()
        .filter(|i| !i.addrs.is_empty())
        .map(|i| {
            format!(
                "{} ({})",
                i.name,
                i.addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join("; ")
    }
}

/// Choose among `ifaces` as flanneld does; `default_route` is the index of the default
/// route's interface.
pub fn choose_from(
    choice: &IfaceChoice,
    ifaces: &[Interface],
    default_route: Option<u32>,
) -> Result<ExternalIface, IfaceError> {
    let pick = |iface: &Interface,
                addr: Option<Ipv4Addr>,
                addr6: Option<Ipv6Addr>|
     -> Result<ExternalIface, IfaceError> {
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
    };
    for wanted in &choice.iface {
        let by_ip: Option<Ipv4Addr> = wanted.parse().ok();
        let by_ip6: Option<Ipv6Addr> = wanted.parse().ok();
        let found = ifaces.iter().find(|i| match (by_ip, by_ip6) {
            (Some(ip), _) => i.addrs.contains(&ip),
            (_, Some(ip)) => i.addrs6.contains(&ip),
            _ => i.name == *wanted,
        });
        if let Some(i) = found {
            return pick(i, by_ip, by_ip6);
        }
    }
    if !choice.iface.is_empty() {
        return Err(IfaceError::NoMatch {
            wanted: choice.iface.join(", "),
            available: available(ifaces),
        });
    }
    for re in &choice.iface_regex {
        // flanneld matches the regex against addresses first, then names.
        for i in ifaces {
            if let Some(a) = i.addrs.iter().find(|a| re.is_match(&a.to_string())) {
                return pick(i, Some(*a), None);
            }
            if let Some(a) = i.addrs6.iter().find(|a| re.is_match(&a.to_string())) {
                return pick(i, None, Some(*a));
            }
        }
        if let Some(i) = ifaces
            .iter()
            .find(|i| re.is_match(&i.name) && !i.addrs.is_empty())
        {
            return pick(i, None, None);
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
            available: available(ifaces),
        });
    }
    let index = default_route.ok_or(IfaceError::NoDefaultRoute)?;
    let i = ifaces
        .iter()
        .find(|i| i.index == index)
        .ok_or(IfaceError::NoDefaultRoute)?;
    pick(i, None, None)
}

/// Choose in `nl`'s network namespace.
pub async fn choose(nl: &Netlink, choice: &IfaceChoice) -> Result<ExternalIface, IfaceError> {
    let list = |source| IfaceError::List { source };
    let ifaces = nl.interfaces().await.map_err(list)?;
    let default_route = nl.default_route_index().await.map_err(list)?;
    choose_from(choice, &ifaces, default_route)
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
