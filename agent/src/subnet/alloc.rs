//! Pure subnet choice: which subnet a host should try to lease.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::seq::IndexedRandom;

use crate::config::{Ipv6Config, NetworkConfig};
use crate::lease::LeaseKey;

/// flannel picks randomly among the first this-many free subnets, so that hosts starting
/// together rarely collide while the network still fills from the bottom.
pub const CANDIDATES: usize = 100;

/// Whether `key` is one this config hands out: an IPv4 subnet in range exactly when IPv4 is on
/// (0.0.0.0/0 otherwise) and an IPv6 subnet in range exactly when IPv6 is on (flannel's
/// `isSubnetConfigCompat` and `isIPv6SubnetConfigCompat`).
pub fn fits(cfg: &NetworkConfig, key: impl Into<LeaseKey>) -> bool {
    let key = key.into();
    let v4 = match key.ipv4() {
        Some(n) => fits_v4(cfg, n),
        None => !cfg.enable_ipv4,
    };
    let v6 = match (cfg.ipv6, key.v6) {
        (Some(c), Some(n)) => fits_v6(&c, n),
        (None, None) => true,
        _ => false,
    };
    v4 && v6
}

/// Whether `subnet` is an IPv4 subnet this config hands out.
pub fn fits_v4(cfg: &NetworkConfig, subnet: Ipv4Net) -> bool {
    cfg.enable_ipv4
        && subnet.prefix_len() == cfg.subnet_len
        && cfg.network.contains(&subnet)
        && subnet.network() >= cfg.subnet_min
        && subnet.network() <= cfg.subnet_max
}

/// Whether `subnet` is an IPv6 subnet this config hands out.
pub fn fits_v6(cfg: &Ipv6Config, subnet: Ipv6Net) -> bool {
    subnet.prefix_len() == cfg.subnet_len
        && cfg.network.contains(&subnet)
        && subnet.network() >= cfg.subnet_min
        && subnet.network() <= cfg.subnet_max
}

/// The subnets `FLANNEL_SUBNET` (e.g. `10.1.10.1/24`) and `FLANNEL_IPV6_SUBNET` (e.g.
/// `fd00:10:1::1/64`) of an old subnet file name, masked; `None` unless they make a key this
/// config hands out.
pub fn from_subnet_file(
    cfg: &NetworkConfig,
    flannel_subnet: Option<&str>,
    flannel_ipv6_subnet: Option<&str>,
) -> Option<LeaseKey> {
    let v4 = match flannel_subnet {
        Some(s) => s.trim().parse::<Ipv4Net>().ok()?.trunc(),
        None => Ipv4Net::default(),
    };
    let v6 = match flannel_ipv6_subnet {
        Some(s) => Some(s.trim().parse::<Ipv6Net>().ok()?.trunc()),
        None => None,
    };
    Some(LeaseKey { v4, v6 }).filter(|k| fits(cfg, *k))
}

/// A random pick among the first [`CANDIDATES`] free subnets of each enabled family; `None`
/// means out of subnets (in the family given by the error's caller).
pub fn choose_key(
    cfg: &NetworkConfig,
    taken_v4: &BTreeSet<Ipv4Net>,
    taken_v6: &BTreeSet<Ipv6Net>,
) -> Result<LeaseKey, Family> {
    let v4 = if cfg.enable_ipv4 {
        choose(cfg, taken_v4).ok_or(Family::V4)?
    } else {
        Ipv4Net::default()
    };
    let v6 = match &cfg.ipv6 {
        Some(c) => Some(choose_v6(c, taken_v6).ok_or(Family::V6)?),
        None => None,
    };
    Ok(LeaseKey { v4, v6 })
}

/// Which address family ran out of subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Free IPv6 subnets in order, at most `limit`.
pub fn free_subnets_v6(cfg: &Ipv6Config, taken: &BTreeSet<Ipv6Net>, limit: usize) -> Vec<Ipv6Net> {
    let size = 1u128 << (128 - u32::from(cfg.subnet_len));
    let (min, max) = (u128::from(cfg.subnet_min), u128::from(cfg.subnet_max));
    (0u128..)
        .map_while(|i| min.checked_add(i.checked_mul(size)?))
        .take_while(|a| *a <= max)
        .filter_map(|a| Ipv6Net::new(Ipv6Addr::from(a), cfg.subnet_len).ok())
        .filter(|n| !taken.contains(n))
        .take(limit)
        .collect()
}

/// A random pick among the first [`CANDIDATES`] free IPv6 subnets.
pub fn choose_v6(cfg: &Ipv6Config, taken: &BTreeSet<Ipv6Net>) -> Option<Ipv6Net> {
    free_subnets_v6(cfg, taken, CANDIDATES)
        .choose(&mut rand::rng())
        .copied()
}

/// Free subnets in order, at most `limit`.
pub fn free_subnets(cfg: &NetworkConfig, taken: &BTreeSet<Ipv4Net>, limit: usize) -> Vec<Ipv4Net> {
    let size = u64::from(cfg.subnet_size());
    let (min, max) = (
        u64::from(u32::from(cfg.subnet_min)),
        u64::from(u32::from(cfg.subnet_max)),
    );
    (0..)
        .map(|i| min + i * size)
        .take_while(|a| *a <= max)
        .filter_map(|a| Ipv4Net::new(Ipv4Addr::from(a as u32), cfg.subnet_len).ok())
        .filter(|n| !taken.contains(n))
        .take(limit)
        .collect()
}

/// A random pick among the first [`CANDIDATES`] free subnets; `None` means out of subnets.
pub fn choose(cfg: &NetworkConfig, taken: &BTreeSet<Ipv4Net>) -> Option<Ipv4Net> {
    free_subnets(cfg, taken, CANDIDATES)
        .choose(&mut rand::rng())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    #[test]
    fn picks_only_free_in_range() {
        let c = cfg(r#"{"Network":"10.1.0.0/26","Backend":{"Type":"vxlan"}}"#);
        // /28s: .0 reserved (SubnetMin is the second), .16 .32 .48
        let all = free_subnets(&c, &BTreeSet::new(), 100);
        assert_eq!(
            all.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["10.1.0.16/28", "10.1.0.32/28", "10.1.0.48/28"]
        );
        let taken: BTreeSet<Ipv4Net> = [
            "10.1.0.16/28".parse().unwrap(),
            "10.1.0.48/28".parse().unwrap(),
        ]
        .into();
        for _ in 0..20 {
            assert_eq!(choose(&c, &taken), Some("10.1.0.32/28".parse().unwrap()));
        }
        let full: BTreeSet<Ipv4Net> = all.into_iter().collect();
        assert_eq!(choose(&c, &full), None);
    }

    #[test]
    fn candidates_are_the_first_hundred() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#);
        let first = free_subnets(&c, &BTreeSet::new(), CANDIDATES);
        assert_eq!(first.len(), 100);
        assert_eq!(first[99].to_string(), "10.0.100.0/24");
        let pick = choose(&c, &BTreeSet::new()).unwrap();
        assert!(first.contains(&pick));
    }

    #[test]
    fn subnet_file_and_fit() {
        let c =
            cfg(r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.20.0","Backend":{"Type":"vxlan"}}"#);
        let file = |s: &str| from_subnet_file(&c, Some(s), None);
        assert_eq!(
            file("10.1.10.1/24"),
            Some(LeaseKey::from("10.1.10.0/24".parse::<Ipv4Net>().unwrap()))
        );
        assert_eq!(file("10.1.30.1/24"), None, "above SubnetMax");
        assert_eq!(file("10.1.0.1/24"), None, "below SubnetMin");
        assert_eq!(file("10.2.10.1/24"), None, "other network");
        assert_eq!(file("10.1.10.1/25"), None, "other length");
        assert_eq!(file("junk"), None);
        assert_eq!(
            from_subnet_file(&c, Some("10.1.10.1/24"), Some("fd00::1/64")),
            None,
            "IPv6 is off"
        );
    }

    #[test]
    fn dual_stack_and_ipv6_only_keys() {
        let c = cfg(
            r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/120","Backend":{"Type":"vxlan"}}"#,
        );
        let v6 = c.ipv6.unwrap();
        // /122s: the first is skipped.
        assert_eq!(
            free_subnets_v6(&v6, &BTreeSet::new(), 100)
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["fd00:10::40/122", "fd00:10::80/122", "fd00:10::c0/122"]
        );
        let taken6: BTreeSet<Ipv6Net> = [
            "fd00:10::40/122".parse().unwrap(),
            "fd00:10::c0/122".parse().unwrap(),
        ]
        .into();
        let k = choose_key(&c, &BTreeSet::new(), &taken6).unwrap();
        assert_eq!(k.v6, Some("fd00:10::80/122".parse().unwrap()));
        assert!(fits(&c, k) && k.ipv4().is_some());
        assert!(!fits(&c, k.v4), "a dual-stack config wants both subnets");
        let all6: BTreeSet<Ipv6Net> = free_subnets_v6(&v6, &BTreeSet::new(), 100)
            .into_iter()
            .collect();
        assert_eq!(choose_key(&c, &BTreeSet::new(), &all6), Err(Family::V6));
        assert_eq!(
            from_subnet_file(&c, Some("10.1.7.1/24"), Some("fd00:10::81/122")),
            Some(LeaseKey {
                v4: "10.1.7.0/24".parse().unwrap(),
                v6: Some("fd00:10::80/122".parse().unwrap())
            })
        );
        assert_eq!(
            from_subnet_file(&c, Some("10.1.7.1/24"), None),
            None,
            "IPv6 subnet missing"
        );

        let only6 = cfg(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#,
        );
        let k = choose_key(&only6, &BTreeSet::new(), &BTreeSet::new()).unwrap();
        assert_eq!(
            (k.ipv4(), k.etcd_name().starts_with("0.0.0.0-0&fd00:10:")),
            (None, true)
        );
        assert!(fits(&only6, k));
        assert_eq!(
            from_subnet_file(&only6, None, Some("fd00:10:0:7::1/64")).map(|k| k.etcd_name()),
            Some("0.0.0.0-0&fd00:10:0:7::-64".to_string())
        );
        // The last of 2^16 subnets is reachable (no overflow at the top of the range).
        assert_eq!(
            only6.ipv6.unwrap().subnet_max,
            "fd00:10:0:ffff::".parse::<Ipv6Addr>().unwrap()
        );
    }
}
