//! External interface choice, as flanneld makes it: `--iface` (name or IP, first match),
//! `--iface-regex`, else the interface of the default route; `--public-ip` overrides the
//! address advertised. Reads interfaces with getifaddrs(3) and /proc, not netlink.

use std::ffi::CStr;
use std::net::Ipv4Addr;

use regex::Regex;

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("list interfaces: {source}")]
    List {
        #[source]
        source: std::io::Error,
    },
    #[error("no interface matches --iface {wanted}; interfaces with an IPv4 address: {available}")]
    NoMatch { wanted: String, available: String },
    #[error(
        "no interface matches --iface-regex {wanted}; interfaces with an IPv4 address: {available}"
    )]
    NoRegexMatch { wanted: String, available: String },
    #[error("no default IPv4 route in /proc/net/route; pass --iface or --iface-regex")]
    NoDefaultRoute,
    #[error(
        "interface {name} has no IPv4 address; give it one or pass --iface with another interface"
    )]
    NoAddress { name: String },
}

/// One interface with its IPv4 addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub addrs: Vec<Ipv4Addr>,
    pub mtu: u32,
}

/// The interface weft sends overlay traffic through and the address it advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtIface {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address (the VXLAN `local`).
    pub iface_addr: Ipv4Addr,
    /// The address peers reach us at (`--public-ip`, else `iface_addr`).
    pub public_ip: Ipv4Addr,
    pub mtu: u32,
}

/// What the flags ask for.
#[derive(Debug, Clone, Default)]
pub struct IfaceChoice {
    pub iface: Vec<String>,
    pub iface_regex: Vec<Regex>,
    pub public_ip: Option<Ipv4Addr>,
}

/// All interfaces, ordered by index, with their IPv4 addresses.
pub fn list() -> Result<Vec<Interface>, IfaceError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(IfaceError::List {
            source: std::io::Error::last_os_error(),
        });
    }
    let mut out: Vec<Interface> = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned and has not been freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let entry = match out.iter_mut().position(|i| i.name == name) {
            Some(p) => &mut out[p],
            None => {
                let index = std::ffi::CString::new(name.clone())
                    // SAFETY: a valid NUL-terminated name.
                    .map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) })
                    .unwrap_or(0);
                let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(1500);
                out.push(Interface {
                    name,
                    index,
                    addrs: Vec::new(),
                    mtu,
                });
                out.last_mut().expect("just pushed")
            }
        };
        // SAFETY: ifa_addr is null or points at a sockaddr whose family says its real type.
        if !ifa.ifa_addr.is_null()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: family AF_INET means the storage is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            entry
                .addrs
                .push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort_by_key(|i| i.index);
    Ok(out)
}

/// The interface of the lowest-metric IPv4 default route, from /proc/net/route.
pub fn default_route_iface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[6].parse::<u32>().unwrap_or(0), f[0].to_string()))
        })
        .min()
        .map(|(_, name)| name)
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

/// Choose among `ifaces` as flanneld does; `default_route` is the default route's interface.
pub fn choose_from(
    choice: &IfaceChoice,
    ifaces: &[Interface],
    default_route: Option<&str>,
) -> Result<ExtIface, IfaceError> {
    let pick = |iface: &Interface, addr: Option<Ipv4Addr>| -> Result<ExtIface, IfaceError> {
        let iface_addr = addr
            .or_else(|| iface.addrs.first().copied())
            .ok_or_else(|| IfaceError::NoAddress {
                name: iface.name.clone(),
            })?;
        Ok(ExtIface {
            name: iface.name.clone(),
            index: iface.index,
            iface_addr,
            public_ip: choice.public_ip.unwrap_or(iface_addr),
            mtu: iface.mtu,
        })
    };
    for wanted in &choice.iface {
        let by_ip: Option<Ipv4Addr> = wanted.parse().ok();
        let found = ifaces.iter().find(|i| match by_ip {
            Some(ip) => i.addrs.contains(&ip),
            None => i.name == *wanted,
        });
        if let Some(i) = found {
            return pick(i, by_ip);
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
                return pick(i, Some(*a));
            }
        }
        if let Some(i) = ifaces
            .iter()
            .find(|i| re.is_match(&i.name) && !i.addrs.is_empty())
        {
            return pick(i, None);
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
    let name = default_route.ok_or(IfaceError::NoDefaultRoute)?;
    let i = ifaces
        .iter()
        .find(|i| i.name == name)
        .ok_or(IfaceError::NoDefaultRoute)?;
    pick(i, None)
}

/// Choose on this host.
pub fn choose(choice: &IfaceChoice) -> Result<ExtIface, IfaceError> {
    choose_from(choice, &list()?, default_route_iface().as_deref())
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
                mtu: 65536,
            },
            Interface {
                name: "eth0".into(),
                index: 2,
                addrs: vec!["192.168.1.5".parse().unwrap()],
                mtu: 1500,
            },
            Interface {
                name: "eth1".into(),
                index: 3,
                addrs: vec!["172.16.0.5".parse().unwrap(), "172.16.0.6".parse().unwrap()],
                mtu: 9000,
            },
            Interface {
                name: "dummy0".into(),
                index: 4,
                addrs: vec![],
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
            (e.name.as_str(), e.iface_addr.to_string(), e.mtu, e.index),
            ("eth1", "172.16.0.6".into(), 9000, 3)
        );
        let c = IfaceChoice {
            iface: vec!["eth0".into()],
            public_ip: Some("1.2.3.4".parse().unwrap()),
            ..Default::default()
        };
        let e = choose_from(&c, &ifaces(), None).unwrap();
        assert_eq!(
            (e.iface_addr.to_string(), e.public_ip.to_string()),
            ("192.168.1.5".into(), "1.2.3.4".into())
        );
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
            choose_from(&c, &ifaces(), None)
                .unwrap()
                .iface_addr
                .to_string(),
            "172.16.0.6"
        );
        assert_eq!(
            choose_from(&IfaceChoice::default(), &ifaces(), Some("eth1"))
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

    #[test]
    fn real_host_has_loopback() {
        let all = list().unwrap();
        let lo = all.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo.addrs.contains(&Ipv4Addr::LOCALHOST) && lo.index > 0);
    }
}
