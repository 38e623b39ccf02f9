use std::net::Ipv6Addr;

use super::*;

#[test]
fn defaults_follow_flannel() {
    let c =
        NetworkConfig::parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
    assert_eq!(c.subnet_len, 24);
    assert_eq!(c.subnet_min, "10.1.1.0".parse::<Ipv4Addr>().unwrap());
    assert_eq!(c.subnet_max, "10.1.255.0".parse::<Ipv4Addr>().unwrap());
    assert_eq!(
        c.backend,
        Backend::Vxlan(VxlanConfig {
            vni: 1,
            port: 8472,
            mtu: None,
            gbp: false,
            learning: false,
            direct_routing: false
        })
    );
    let c = NetworkConfig::parse(
        r#"{"network":"10.1.0.0/26","BACKEND":{"type":"host-gw"},"Whatever":1}"#,
    )
    .unwrap();
    assert_eq!((c.subnet_len, c.backend), (28, Backend::HostGw));
    assert_eq!(c.subnet_min, "10.1.0.16".parse::<Ipv4Addr>().unwrap());
    assert_eq!(c.subnet_max, "10.1.0.48".parse::<Ipv4Addr>().unwrap());
    let c = NetworkConfig::parse(
        r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.16.0.0","SubnetMax":"10.32.0.0","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"MTU":1400,"GBP":true,"DirectRouting":true}}"#,
    )
    .unwrap();
    assert_eq!(c.subnet_len, 20);
    assert_eq!(
        c.backend,
        Backend::Vxlan(VxlanConfig {
            vni: 4096,
            port: 4789,
            mtu: Some(1400),
            gbp: true,
            learning: false,
            direct_routing: true
        })
    );
}

#[test]
fn ipv6_defaults_follow_flannel() {
    let c = NetworkConfig::parse(
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    assert!(c.enable_ipv4 && c.enable_ipv6);
    let v6 = c.ipv6.unwrap();
    assert_eq!(v6.network, "fd00:10::/48".parse::<Ipv6Net>().unwrap());
    assert_eq!(v6.subnet_len, 64);
    assert_eq!(
        v6.subnet_min,
        "fd00:10:0:1::".parse::<Ipv6Addr>().unwrap(),
        "the first subnet is skipped"
    );
    assert_eq!(
        v6.subnet_max,
        "fd00:10:0:ffff::".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(c.ipv6_network(), Some(v6.network));

    // Narrower than /62: four subnets of prefix + 2.
    let c = NetworkConfig::parse(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120","Backend":{"Type":"host-gw"}}"#,
    )
    .unwrap();
    let v6 = c.ipv6.unwrap();
    assert_eq!(
        (v6.subnet_len, v6.subnet_min, v6.subnet_max),
        (
            122,
            "fd00::40".parse().unwrap(),
            "fd00::c0".parse().unwrap()
        )
    );
    assert_eq!(
        c.ipv4_network(),
        None,
        "IPv6-only: no IPv4 network, Network not required"
    );

    let c = NetworkConfig::parse(
        r#"{"Network":"10.1.0.0/16","enableipv6":true,"ipv6network":"fd00::/56","IPv6SubnetLen":60,"IPv6SubnetMin":"fd00:0:0:20::","IPv6SubnetMax":"::","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    let v6 = c.ipv6.unwrap();
    assert_eq!(
        (v6.subnet_len, v6.subnet_min, v6.subnet_max),
        (
            60,
            "fd00:0:0:20::".parse().unwrap(),
            "fd00:0:0:f0::".parse().unwrap()
        )
    );

    // EnableIPv6 off: the IPv6 fields are read but not used, as flanneld does.
    let c = NetworkConfig::parse(
        r#"{"Network":"10.1.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetLen":200,"Backend":{"Type":"vxlan"}}"#,
    );
    assert!(c.unwrap_err().to_string().contains("IPv6SubnetLen is 200"));
    let c = NetworkConfig::parse(
        r#"{"Network":"10.1.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetLen":20,"Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    assert_eq!((c.enable_ipv6, c.ipv6), (false, None));
}

/// Each malformed config gets its own error; the needles are what a user must read.
pub(crate) const MALFORMED: &[(&str, &[&str])] = &[
    (r#"{"Network":"10.1.0.0/16""#, &["not valid JSON"]),
    (r#"["10.1.0.0/16"]"#, &["must be a JSON object"]),
    (
        r#"{"Backend":{"Type":"vxlan"}}"#,
        &["please define a correct Network parameter", "add e.g."],
    ),
    (
        r#"{"Network":16,"Backend":{"Type":"vxlan"}}"#,
        &["Network is 16", "CIDR string"],
    ),
    (
        r#"{"Network":"10.1.0.0","Backend":{"Type":"vxlan"}}"#,
        &["Network is \"10.1.0.0\"", "not an IPv4 CIDR"],
    ),
    (
        r#"{"Network":"10.1.0.0/33","Backend":{"Type":"vxlan"}}"#,
        &["not an IPv4 CIDR"],
    ),
    (
        r#"{"Network":"fd00::/48","Backend":{"Type":"vxlan"}}"#,
        &["Network is \"fd00::/48\""],
    ),
    (
        r#"{"Network":"10.1.2.3/16","Backend":{"Type":"vxlan"}}"#,
        &["host bits are set", "\"10.1.0.0/16\""],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetLen":"24","Backend":{"Type":"vxlan"}}"#,
        &["SubnetLen is \"24\"", "a number"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
        &["SubnetLen must be less than /31"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetLen":-1,"Backend":{"Type":"vxlan"}}"#,
        &["SubnetLen is -1", "0 to 32"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetLen":1e40,"Backend":{"Type":"vxlan"}}"#,
        &["SubnetLen", "0 to 32"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetLen":17,"Backend":{"Type":"vxlan"}}"#,
        &["at least four subnets", "SubnetLen 18"],
    ),
    (
        r#"{"Network":"10.1.0.0/29","Backend":{"Type":"vxlan"}}"#,
        &["network is too small. Minimum useful network prefix is /28"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0","Backend":{"Type":"vxlan"}}"#,
        &["SubnetMin is not in the range of the Network"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetMax":"10.2.0.0","Backend":{"Type":"vxlan"}}"#,
        &["SubnetMax is not in the range of the Network"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.5","Backend":{"Type":"vxlan"}}"#,
        &[
            "SubnetMin is not on a SubnetLen boundary: 10.1.1.5",
            "use 10.1.1.0",
        ],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.9.128","Backend":{"Type":"vxlan"}}"#,
        &["SubnetMax is not on a SubnetLen boundary: 10.1.9.128"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.3.0","Backend":{"Type":"vxlan"}}"#,
        &["above SubnetMax"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetMin":"banana","Backend":{"Type":"vxlan"}}"#,
        &["SubnetMin is \"banana\"", "not an IPv4 address"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","SubnetMax":7,"Backend":{"Type":"vxlan"}}"#,
        &["SubnetMax is 7", "a string"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv4":"yes","Backend":{"Type":"vxlan"}}"#,
        &["EnableIPv4 is \"yes\"", "true or false"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv4":false,"Backend":{"Type":"vxlan"}}"#,
        &["EnableIPv4 is false", "EnableIPv6 is off too"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#,
        &["please define a correct IPv6Network parameter in the flannel config"],
    ),
    (
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetLen":127,"Backend":{"Type":"vxlan"}}"#,
        &["IPv6SubnetLen is 127", "SubnetLen must be less than /127"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetLen":57,"Backend":{"Type":"vxlan"}}"#,
        &[
            "network must be able to accommodate at least four subnets",
            "IPv6SubnetLen 58",
        ],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/125","Backend":{"Type":"vxlan"}}"#,
        &["IPv6Network is too small. Minimum useful network prefix is /124"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd01::","Backend":{"Type":"vxlan"}}"#,
        &["IPv6SubnetMin is not in the range of the IPv6Network"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMax":"fd01::","Backend":{"Type":"vxlan"}}"#,
        &["IPv6SubnetMax is not in the range of the IPv6Network"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:1::1","Backend":{"Type":"vxlan"}}"#,
        &[
            "IPv6SubnetMin is not on a SubnetLen boundary: fd00:0:0:1::1",
            "use fd00:0:0:1::",
        ],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:3::","Backend":{"Type":"vxlan"}}"#,
        &["above IPv6SubnetMax"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::1/56","Backend":{"Type":"vxlan"}}"#,
        &["IPv6Network", "host bits are set", "\"fd00::/56\""],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMax":"banana","Backend":{"Type":"vxlan"}}"#,
        &["IPv6SubnetMax is \"banana\"", "not an IPv6 address"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan","MTU":1300}}"#,
        &["Backend.MTU is 1300", "1280", "1330"],
    ),
    (
        r#"{"EnableIPv4":false,"EnableIPv6":"yes","Backend":{"Type":"vxlan"}}"#,
        &["EnableIPv6 is \"yes\"", "true or false"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","IPv6Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#,
        &["IPv6Network", "not an IPv6 CIDR"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Network":"10.1.0.0/16","network":"10.2.0.0/16","Backend":{"Type":"vxlan"}}"#,
        &["appears twice"],
    ),
    (
        r#"{"Network":"10.1.0.0/16"}"#,
        &["Backend.Type is missing", "udp", "vxlan"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":"vxlan"}"#,
        &["Backend is \"vxlan\"", "an object"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{}}"#,
        &["Backend.Type is missing"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":["vxlan"]}}"#,
        &["Backend.Type is [\"vxlan\"]", "a string"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}"#,
        &["Backend.Type is \"udp\"", "\"vxlan\" or \"host-gw\""],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"VXLAN"}}"#,
        &["Backend.Type is \"VXLAN\""],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#,
        &["Backend.VNI is 16777216", "0 to 16777215"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":1.5}}"#,
        &["Backend.VNI is 1.5"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","Port":70000}}"#,
        &["Backend.Port is 70000", "0 to 65535"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","MTU":100}}"#,
        &["Backend.MTU is 100", "576"],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":"true"}}"#,
        &["Backend.GBP is \"true\""],
    ),
    (
        r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","DirectRouting":1}}"#,
        &["Backend.DirectRouting is 1"],
    ),
];

#[test]
fn malformed_configs_each_get_a_clear_error() {
    let mut seen = std::collections::HashSet::new();
    for (json, needles) in MALFORMED {
        let err = NetworkConfig::parse(json).expect_err(json).to_string();
        for n in *needles {
            assert!(
                err.contains(n),
                "config {json}\nerror   {err}\nmissing {n:?}"
            );
        }
        assert!(
            seen.insert(err.clone()),
            "two configs give the same error: {err}"
        );
    }
    assert!(MALFORMED.len() >= 25);
}
