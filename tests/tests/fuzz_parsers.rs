//! Property tests of every parser that reads input weft does not control: lease values and keys
//! from etcd, the network config, the subnet file. None may panic on any input, and what weft
//! writes must read back unchanged. (The eBPF programs' packet fuzz is in ebpf_programs.rs.)
//!
//! `PROPTEST_CASES` scales the run (default 256 per property; `cargo xtask test --long` sets
//! WEFT_LONG_TESTS, which raises it to 4096).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::prelude::*;
use weft::config::NetworkConfig;
use weft::files::{parse_env, SubnetEnv};
use weft::lease::{parse_subnet_key, subnet_key, BackendAttrs, Lease, LeaseAttrs, MacAddr};
use weft::subnet::alloc;

fn cases() -> u32 {
    if std::env::var_os("WEFT_LONG_TESTS").is_some() {
        4096
    } else {
        256
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    }
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn ipv4_net() -> impl Strategy<Value = Ipv4Net> {
    (ipv4(), 0u8..=32).prop_map(|(ip, len)| Ipv4Net::new(ip, len).unwrap().trunc())
}

/// A subnet a lease can hold: SubnetLen is at most 30.
/// A subnet flannel could hand out: /0 is never one (it stands for "no IPv4" in IPv6-only keys).
fn subnet() -> impl Strategy<Value = Ipv4Net> {
    (ipv4(), 1u8..=30).prop_map(|(ip, len)| Ipv4Net::new(ip, len).unwrap().trunc())
}

fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

fn lease_attrs() -> impl Strategy<Value = LeaseAttrs> {
    let backend = prop_oneof![
        (any::<u32>(), mac()).prop_map(|(vni, vtep_mac)| BackendAttrs::Vxlan {
            vni: Some(vni),
            vtep_mac
        }),
        Just(BackendAttrs::HostGw),
        "[a-z][a-z0-9-]{0,12}"
            .prop_filter("named types", |t| t != "vxlan" && t != "host-gw")
            .prop_map(BackendAttrs::Other),
    ];
    (ipv4(), backend).prop_map(|(public_ip, backend)| LeaseAttrs {
        backend_v6: None,
        public_ipv6: None,
        public_ip,
        backend,
    })
}

/// `attrs` as weft writes it: a missing VNI becomes 0.
fn vni_written(attrs: LeaseAttrs) -> LeaseAttrs {
    let backend = match attrs.backend {
        BackendAttrs::Vxlan { vni, vtep_mac } => BackendAttrs::Vxlan {
            vni: Some(vni.unwrap_or(0)),
            vtep_mac,
        },
        other => other,
    };
    LeaseAttrs { backend, ..attrs }
}

/// Any JSON value, nested a little: what a confused writer might store.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,24}".prop_map(Value::String),
        ipv4().prop_map(|ip| Value::String(ip.to_string())),
        ipv4_net().prop_map(|n| Value::String(n.to_string())),
        mac().prop_map(|m| Value::String(m.to_string())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names weft reads, in random letter case, and some it does not.
fn field_name() -> impl Strategy<Value = String> {
    let known = prop::sample::select(vec![
        "Network",
        "SubnetLen",
        "SubnetMin",
        "SubnetMax",
        "EnableIPv4",
        "EnableIPv6",
        "IPv6Network",
        "IPv6SubnetLen",
        "EnableNFTables",
        "Backend",
        "Type",
        "VNI",
        "Port",
        "MTU",
        "GBP",
        "Learning",
        "DirectRouting",
        "PublicIP",
        "PublicIPv6",
        "BackendType",
        "BackendData",
        "VtepMAC",
    ]);
    prop_oneof![
        4 => (known, any::<u32>()).prop_map(|(k, bits)| k
            .chars()
            .enumerate()
            .map(|(i, c)| if bits >> (i % 32) & 1 == 1 { c.to_ascii_lowercase() } else { c })
            .collect()),
        1 => "[A-Za-z]{1,10}",
    ]
}

/// Mutate `text`: cut it, or flip/insert a byte, as a corrupted write would.
fn mutated(text: String) -> impl Strategy<Value = Vec<u8>> {
    let len = text.len();
    (0..=len, any::<u8>(), 0u8..3).prop_map(move |(at, byte, how)| {
        let mut b = text.clone().into_bytes();
        match how {
            0 => b.truncate(at),
            1 if at < b.len() => b[at] ^= byte | 1,
            _ => b.insert(at, byte),
        }
        b
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn lease_values_round_trip(attrs in lease_attrs()) {
        let json = attrs.to_json();
        prop_assert_eq!(LeaseAttrs::from_json("k", json.as_bytes()).unwrap(), attrs);
    }

    #[test]
    fn lease_values_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = LeaseAttrs::from_json("k", &bytes);
    }

    #[test]
    fn structured_lease_values_never_panic(v in json_value()) {
        let _ = LeaseAttrs::from_json("k", v.to_string().as_bytes());
    }

    #[test]
    fn mutated_lease_values_never_panic(bytes in lease_attrs().prop_flat_map(|a| mutated(a.to_json()))) {
        if let Ok(attrs) = LeaseAttrs::from_json("k", &bytes) {
            // Whatever still parses is a lease weft can write back and read again; a missing
            // VNI (older writers) is written as flanneld's 0.
            let back = LeaseAttrs::from_json("k", attrs.to_json().as_bytes()).unwrap();
            prop_assert_eq!(back, vni_written(attrs));
        }
    }

    #[test]
    fn lease_keys_round_trip(net in ipv4_net(), prefix in "(/[a-z.]{1,10}){0,3}") {
        let key = format!("{prefix}/subnets/{}", subnet_key(net));
        prop_assert_eq!(parse_subnet_key(&key).unwrap(), net);
        // Dual-stack keys carry the IPv4 subnet first.
        prop_assert_eq!(parse_subnet_key(&format!("{key}&fd00::-56")).unwrap(), net);
    }

    #[test]
    fn lease_keys_never_panic(key in ".{0,64}") {
        if let Ok(net) = parse_subnet_key(&key) {
            prop_assert_eq!(net, net.trunc(), "a key with host bits was accepted: {}", key);
        }
    }

    #[test]
    fn near_miss_lease_keys_never_panic(key in "[0-9./&:-]{0,24}") {
        if let Ok(net) = parse_subnet_key(&key) {
            prop_assert!(key.contains(&subnet_key(net)), "{} parsed as {}", key, net);
        }
    }

    #[test]
    fn whole_kvs_never_panic(key in ".{0,40}", v in json_value(), id in any::<i64>()) {
        let _ = Lease::from_kv(&key, v.to_string().as_bytes(), id);
    }

    #[test]
    fn macs_round_trip(m in mac(), junk in ".{0,24}") {
        prop_assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        let _ = junk.parse::<MacAddr>();
    }

    #[test]
    fn network_configs_never_panic(text in ".{0,128}") {
        let _ = NetworkConfig::parse(&text);
    }

    #[test]
    fn structured_network_configs_hold_their_invariants(v in json_value(), net in ipv4_net(), len in 0u8..=32) {
        // Half the time, a plausible config with random extras; else any JSON at all.
        let text = match &v {
            serde_json::Value::Object(extra) => {
                let mut obj = extra.clone();
                obj.insert("Network".into(), net.to_string().into());
                obj.insert("SubnetLen".into(), len.into());
                obj.insert("Backend".into(), serde_json::json!({"Type": "vxlan"}));
                serde_json::Value::Object(obj).to_string()
            }
            other => other.to_string(),
        };
        if let Ok(cfg) = NetworkConfig::parse(&text) {
            prop_assert!(cfg.subnet_len <= 30 && cfg.subnet_len >= cfg.network.prefix_len() + 2, "{}: {:?}", text, cfg);
            prop_assert!(cfg.network.contains(&cfg.subnet_min) && cfg.network.contains(&cfg.subnet_max), "{}", text);
            prop_assert_eq!(u32::from(cfg.subnet_min) % cfg.subnet_size(), 0, "{}", text);
            prop_assert_eq!(u32::from(cfg.subnet_max) % cfg.subnet_size(), 0, "{}", text);
            for s in alloc::free_subnets(&cfg, &Default::default(), 4) {
                prop_assert!(alloc::fits(&cfg, s), "{} handed out {} outside its range", text, s);
            }
        }
    }

    #[test]
    fn mutated_network_configs_never_panic(bytes in mutated(
        r#"{"Network":"10.1.0.0/16","SubnetLen":24,"SubnetMin":"10.1.10.0","SubnetMax":"10.1.99.0","Backend":{"Type":"vxlan","VNI":1,"Port":8472,"MTU":1500,"DirectRouting":true}}"#.to_string()
    )) {
        let _ = NetworkConfig::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn subnet_files_round_trip(network in ipv4_net(), own in subnet(), mtu in any::<u32>(), ipmasq in any::<bool>()) {
        let env = SubnetEnv { ipv6: None, network, subnet: own, mtu, ipmasq };
        let vars = parse_env(&env.render());
        prop_assert_eq!(vars.get("FLANNEL_NETWORK").unwrap(), &network.to_string());
        prop_assert_eq!(vars.get("FLANNEL_MTU").unwrap(), &mtu.to_string());
        prop_assert_eq!(vars.get("FLANNEL_IPMASQ").unwrap(), &ipmasq.to_string());
        let subnet: Ipv4Net = vars.get("FLANNEL_SUBNET").unwrap().parse().unwrap();
        prop_assert_eq!(subnet.trunc(), own);
    }

    #[test]
    fn subnet_files_never_panic(text in "((export )?[A-Z_]{0,16}=?\"?[ -~]{0,24}\"?\n){0,6}", junk in ".{0,64}") {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        for t in [&text, &junk] {
            let vars = parse_env(t);
            if let Some(s) = vars.get("FLANNEL_SUBNET") {
                if let Some(net) = alloc::from_subnet_file(&cfg, Some(s), vars.get("FLANNEL_IPV6_SUBNET").map(String::as_str)) {
                    prop_assert!(alloc::fits(&cfg, net));
                }
            }
            let _ = alloc::from_subnet_file(&cfg, Some(t), Some(t));
        }
    }
}
