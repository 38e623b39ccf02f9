use super::*;

const FLANNEL_VXLAN: &str = r#"{"PublicIP":"172.16.15.21","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:14:ca:9c:9a:74"}}"#;

fn vx(subnet: &str, ip: &str, mac: &str) -> Lease {
    Lease {
        ipv6_subnet: None,
        subnet: subnet.parse().unwrap(),
        attrs: LeaseAttrs {
            backend_v6: None,
            public_ipv6: None,
            public_ip: ip.parse().unwrap(),
            backend: BackendAttrs::Vxlan {
                vni: Some(1),
                vtep_mac: mac.parse().unwrap(),
            },
        },
        etcd_lease: 0,
    }
}

#[test]
fn vxlan_value_is_byte_identical_to_flanneld() {
    let l = vx("10.1.10.0/24", "172.16.15.21", "f6:14:ca:9c:9a:74");
    assert_eq!(l.attrs.to_json(), FLANNEL_VXLAN);
    assert_eq!(
        LeaseAttrs::from_json("k", FLANNEL_VXLAN.as_bytes()).unwrap(),
        l.attrs
    );
}

/// What flanneld v0.20 writes for a dual-stack vxlan host: PublicIPv6, then BackendV6Data
/// (flannel-v6.1's VNI and MAC) after BackendData.
const FLANNEL_DUAL: &str = r#"{"PublicIP":"172.16.15.21","PublicIPv6":"fd00:16::21","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:14:ca:9c:9a:74"},"BackendV6Data":{"VNI":1,"VtepMAC":"8e:51:3f:0a:22:01"}}"#;
const FLANNEL_V6_ONLY: &str = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:16::21","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"8e:51:3f:0a:22:01"}}"#;

#[test]
fn dual_stack_and_ipv6_only_values_are_byte_identical_to_flanneld() {
    let mut l = vx("10.1.10.0/24", "172.16.15.21", "f6:14:ca:9c:9a:74");
    l.ipv6_subnet = Some("fd00:10:1::/64".parse().unwrap());
    l.attrs.public_ipv6 = Some("fd00:16::21".parse().unwrap());
    l.attrs.backend_v6 = Some(VxlanData {
        vni: Some(1),
        vtep_mac: "8e:51:3f:0a:22:01".parse().unwrap(),
    });
    assert_eq!(l.attrs.to_json(), FLANNEL_DUAL);
    assert_eq!(
        LeaseAttrs::from_json("k", FLANNEL_DUAL.as_bytes()).unwrap(),
        l.attrs
    );
    assert_eq!(l.key().etcd_name(), "10.1.10.0-24&fd00:10:1::-64");
    assert_eq!(l.key().to_string(), "10.1.10.0/24 fd00:10:1::/64");
    let read = Lease::from_kv(
        "/coreos.com/network/subnets/10.1.10.0-24&fd00:10:1::-64",
        FLANNEL_DUAL.as_bytes(),
        7,
    )
    .unwrap();
    assert_eq!(
        read.vtep_v6(),
        Some((
            "fd00:10:1::/64".parse().unwrap(),
            "fd00:16::21".parse().unwrap(),
            "8e:51:3f:0a:22:01".parse().unwrap()
        ))
    );
    assert_eq!(
        read.vtep_v4().map(|v| v.2.to_string()),
        Some("f6:14:ca:9c:9a:74".into())
    );

    let only6 = LeaseAttrs {
        public_ip: Ipv4Addr::UNSPECIFIED,
        backend: BackendAttrs::VxlanIpv6Only,
        ..l.attrs.clone()
    };
    assert_eq!(only6.to_json(), FLANNEL_V6_ONLY);
    assert_eq!(
        LeaseAttrs::from_json("k", FLANNEL_V6_ONLY.as_bytes()).unwrap(),
        only6
    );
    let read = Lease::from_kv("0.0.0.0-0&fd00:10:1::-64", FLANNEL_V6_ONLY.as_bytes(), 0).unwrap();
    assert_eq!((read.ipv4_subnet(), read.vtep_v4()), (None, None));
    assert!(read.vtep_v6().is_some());
    // IPv6-only hosts share PublicIP 0.0.0.0: they are told apart by PublicIPv6.
    let other = LeaseAttrs {
        public_ipv6: Some("fd00:16::22".parse().unwrap()),
        ..only6.clone()
    };
    assert!(only6.same_host(&only6) && !only6.same_host(&other));

    for (bad, needle) in [
        (
            r#"{"PublicIP":"1.1.1.1","PublicIPv6":"1.1.1.1","BackendType":"host-gw"}"#,
            "PublicIPv6",
        ),
        (
            r#"{"PublicIP":"1.1.1.1","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VtepMAC":"f6:14:ca:9c:9a:74"},"BackendV6Data":{"VtepMAC":7}}"#,
            "BackendV6Data.VtepMAC",
        ),
    ] {
        let e = LeaseAttrs::from_json("k", bad.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    }
}

#[test]
fn dual_stack_keys() {
    let k = parse_lease_key("/coreos.com/network/subnets/10.1.54.0-24&fc00:0:0:36::-64").unwrap();
    assert_eq!(
        (k.v4.to_string(), k.v6.map(|n| n.to_string())),
        ("10.1.54.0/24".into(), Some("fc00:0:0:36::/64".into()))
    );
    assert_eq!(k.etcd_name(), "10.1.54.0-24&fc00:0:0:36::-64");
    let only6 = parse_lease_key("0.0.0.0-0&fd00:10:1::-64").unwrap();
    assert_eq!(
        (only6.ipv4(), only6.etcd_name()),
        (None, "0.0.0.0-0&fd00:10:1::-64".into())
    );
    for bad in [
        "10.1.54.0-24&fd00::1-64",
        "10.1.54.0-24&fd00::-129",
        "10.1.54.0-24&",
        "10.1.54.0-24&x-64",
    ] {
        assert!(parse_lease_key(bad).is_err(), "{bad}");
    }
    // Same IPv4 subnet, different IPv6 subnets: two peers, as two etcd keys are.
    let mut ps = PeerSet::new("vxlan");
    let mut a = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:02");
    a.ipv6_subnet = Some("fd00::/64".parse().unwrap());
    let b = Lease {
        ipv6_subnet: Some("fd00:0:0:1::/64".parse().unwrap()),
        ..a.clone()
    };
    assert!(ps.put(a.clone()).is_some() && ps.put(b.clone()).is_some());
    assert_eq!(ps.delete(a.key()), Some(LeaseEvent::Removed(a)));
    assert_eq!(ps.leases(), vec![b]);
}

#[test]
fn host_gw_value_has_no_backend_data() {
    let a = LeaseAttrs {
        backend_v6: None,
        public_ipv6: None,
        public_ip: "10.0.0.5".parse().unwrap(),
        backend: BackendAttrs::HostGw,
    };
    assert_eq!(
        a.to_json(),
        r#"{"PublicIP":"10.0.0.5","PublicIPv6":null,"BackendType":"host-gw"}"#
    );
    assert_eq!(
        LeaseAttrs::from_json("k", a.to_json().as_bytes()).unwrap(),
        a
    );
}

#[test]
fn parses_old_and_oddly_cased_values() {
    let v = br#"{"publicip":"172.16.15.22","BACKENDTYPE":"vxlan","backenddata":{"vtepmac":"F6:14:CA:9C:9A:75"},"Extra":[1]}"#;
    let a = LeaseAttrs::from_json("k", v).unwrap();
    assert_eq!(a.public_ip, "172.16.15.22".parse::<Ipv4Addr>().unwrap());
    assert_eq!(
        a.backend,
        BackendAttrs::Vxlan {
            vni: None,
            vtep_mac: "f6:14:ca:9c:9a:75".parse().unwrap()
        }
    );
}

#[test]
fn bad_values_name_the_field() {
    let cases: &[(&[u8], &str)] = &[
        (b"not json", "not a JSON object"),
        (b"[1]", "not a JSON object"),
        (br#"{"BackendType":"vxlan"}"#, "PublicIP"),
        (br#"{"PublicIP":"300.1.1.1","BackendType":"vxlan"}"#, "PublicIP"),
        (br#"{"PublicIP":"1.1.1.1","BackendType":"vxlan"}"#, "BackendData"),
        (br#"{"PublicIP":"1.1.1.1","BackendType":"vxlan","BackendData":{"VtepMAC":"zz"}}"#, "VtepMAC"),
        (br#"{"PublicIP":"1.1.1.1","BackendType":"vxlan","BackendData":{"VNI":-1,"VtepMAC":"f6:14:ca:9c:9a:74"}}"#, "VNI"),
        (br#"{"PublicIP":"1.1.1.1","BackendType":7}"#, "BackendType"),
    ];
    for (v, needle) in cases {
        let e = LeaseAttrs::from_json("/p/subnets/10.1.1.0-24", v)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle) && e.contains("10.1.1.0-24"), "{e}");
    }
}

#[test]
fn keys() {
    assert_eq!(
        parse_subnet_key("/coreos.com/network/subnets/10.1.10.0-24").unwrap(),
        "10.1.10.0/24".parse::<Ipv4Net>().unwrap()
    );
    assert_eq!(
        parse_subnet_key("10.12.13.0-24&fd00:12:13::-56").unwrap(),
        "10.12.13.0/24".parse::<Ipv4Net>().unwrap()
    );
    for bad in [
        "10.1.10.0",
        "10.1.10.0-33",
        "10.1.10.1-24",
        "x-24",
        "10.1.10.0-",
        "",
    ] {
        assert!(parse_subnet_key(bad).is_err(), "{bad}");
    }
    assert_eq!(subnet_key("10.1.10.0/24".parse().unwrap()), "10.1.10.0-24");
}

#[test]
fn peer_set_events() {
    let mut ps = PeerSet::new("vxlan");
    assert_eq!(ps.set_own("10.1.1.0/24".parse::<Ipv4Net>().unwrap()), None);
    let a = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:02");
    assert_eq!(
        ps.put(vx("10.1.1.0/24", "1.1.1.1", "02:00:00:00:00:01")),
        None,
        "own lease skipped"
    );
    assert_eq!(ps.put(a.clone()), Some(LeaseEvent::Added(a.clone())));
    let mut renewed = a.clone();
    renewed.etcd_lease = 99;
    assert_eq!(ps.put(renewed.clone()), None, "renewal is not a change");
    let moved = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:22");
    assert_eq!(
        ps.put(moved.clone()),
        Some(LeaseEvent::Changed {
            old: renewed,
            new: moved.clone()
        })
    );
    let hg = Lease {
        attrs: LeaseAttrs {
            backend: BackendAttrs::HostGw,
            ..moved.attrs.clone()
        },
        ..moved.clone()
    };
    assert_eq!(
        ps.put(hg.clone()),
        Some(LeaseEvent::Removed(moved)),
        "switched away from vxlan"
    );
    assert_eq!(
        ps.put(Lease {
            subnet: "10.1.3.0/24".parse().unwrap(),
            ..hg
        }),
        None,
        "host-gw ignored"
    );
    assert!(ps.is_empty());
}

#[test]
fn reset_diffs_against_current() {
    let mut ps = PeerSet::new("vxlan");
    let a = vx("10.1.2.0/24", "1.1.1.2", "02:00:00:00:00:02");
    let b = vx("10.1.3.0/24", "1.1.1.3", "02:00:00:00:00:03");
    let c = vx("10.1.4.0/24", "1.1.1.4", "02:00:00:00:00:04");
    assert_eq!(ps.reset(vec![a.clone(), b.clone()]).len(), 2);
    let ev = ps.reset(vec![b.clone(), c.clone()]);
    assert_eq!(
        ev,
        vec![LeaseEvent::Added(c.clone()), LeaseEvent::Removed(a)]
    );
    assert_eq!(ps.reset(vec![b.clone(), c.clone()]), vec![]);
    assert_eq!(ps.leases(), vec![b, c]);
}

#[test]
fn keys_sharing_a_subnet() {
    let k = |s: &str| parse_lease_key(s).unwrap();
    let dual = k("10.1.54.0-24&fd00:10:1::-64");
    for (other, shares) in [
        ("10.1.54.0-24&fd00:10:2::-64", true),
        ("10.1.54.0-24", true),
        ("10.1.55.0-24&fd00:10:1::-64", true),
        ("0.0.0.0-0&fd00:10:1::-64", true),
        ("10.1.55.0-24&fd00:10:2::-64", false),
        ("10.1.55.0-24", false),
        // IPv6-only keys share the IPv4 part 0.0.0.0-0, which names no subnet.
        ("0.0.0.0-0&fd00:10:2::-64", false),
    ] {
        assert_eq!(dual.shares_a_subnet(&k(other)), shares, "{other}");
        assert_eq!(
            k(other).shares_a_subnet(&dual),
            shares,
            "{other}, turned round"
        );
    }
    assert!(!k("0.0.0.0-0&fd00:10:1::-64").shares_a_subnet(&k("0.0.0.0-0&fd00:10:2::-64")));
}
