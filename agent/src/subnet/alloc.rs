//! Pure subnet choice: which subnet a host should try to lease.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::seq::IndexedRandom;

use crate::config::NetworkConfig;

/// flannel picks randomly among the first this-many free subnets, so that hosts starting
/// together rarely collide while the network still fills from the bottom.
pub const CANDIDATES: usize = 100;

/// Whether `subnet` is one this config hands out.
pub fn fits(cfg: &NetworkConfig, subnet: Ipv4Net) -> bool {
    subnet.prefix_len() == cfg.subnet_len
        && cfg.network.contains(&subnet)
        && subnet.network() >= cfg.subnet_min
        && subnet.network() <= cfg.subnet_max
}

/// The subnet `FLANNEL_SUBNET` (e.g. `10.1.10.1/24`) of an old subnet file names, masked.
pub fn from_subnet_file(cfg: &NetworkConfig, flannel_subnet: &str) -> Option<Ipv4Net> {
    let net: Ipv4Net = flannel_subnet.trim().parse().ok()?;
    Some(net.trunc()).filter(|n| fits(cfg, *n))
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
        assert_eq!(
            from_subnet_file(&c, "10.1.10.1/24"),
            Some("10.1.10.0/24".parse().unwrap())
        );
        assert_eq!(
            from_subnet_file(&c, "10.1.30.1/24"),
            None,
            "above SubnetMax"
        );
        assert_eq!(from_subnet_file(&c, "10.1.0.1/24"), None, "below SubnetMin");
        assert_eq!(from_subnet_file(&c, "10.2.10.1/24"), None, "other network");
        assert_eq!(from_subnet_file(&c, "10.1.10.1/25"), None, "other length");
        assert_eq!(from_subnet_file(&c, "junk"), None);
    }
}
