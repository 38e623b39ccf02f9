//! Rule text as flanneld writes it: what `iptables-save` and `nft list` show a user.

use super::nftables::NftChain;
use super::*;

fn masq() -> Masq {
    Masq::new(
        MasqKind::Iptables,
        "10.1.0.0/16".parse().unwrap(),
        "10.1.10.0/24".parse().unwrap(),
    )
}

/// flanneld's `MasqRules` / `MasqIP6Rules` and `ForwardRules` as `iptables-save` lists them, written
/// once for both families: `{n}` is the network, `{sn}` this node's subnet, `{mc}` the family's
/// multicast prefix.
const FLANNELD_RULES: [&str; 10] = [
    r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#,
    r#"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN"#,
    r#"-A FLANNEL-POSTRTG -s {sn} -d {n} -m comment --comment "flanneld masq" -j RETURN"#,
    r#"-A FLANNEL-POSTRTG -s {n} -d {sn} -m comment --comment "flanneld masq" -j RETURN"#,
    r#"-A FLANNEL-POSTRTG ! -s {n} -d {sn} -m comment --comment "flanneld masq" -j RETURN"#,
    r#"-A FLANNEL-POSTRTG -s {n} ! -d {mc} -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
    r#"-A FLANNEL-POSTRTG ! -s {n} -d {n} -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
    r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#,
    r#"-A FLANNEL-FWD -s {n} -m comment --comment "flanneld forward" -j ACCEPT"#,
    r#"-A FLANNEL-FWD -d {n} -m comment --comment "flanneld forward" -j ACCEPT"#,
];

/// Where the filter table's FORWARD rules start in [`FLANNELD_RULES`] (after the nat table's).
const FORWARD_RULES: usize = 7;

fn flanneld_listing(n: &str, sn: &str, mc: &str) -> Vec<String> {
    FLANNELD_RULES
        .iter()
        .map(|r| r.replace("{sn}", sn).replace("{n}", n).replace("{mc}", mc))
        .collect()
}

#[test]
fn iptables_rules_match_flanneld() {
    let want = flanneld_listing("10.1.0.0/16", "10.1.10.0/24", "224.0.0.0/4");
    assert_eq!(masq().iptables_listing(), want);
}

#[test]
fn forward_rules_optional_and_networks_masked() {
    let m = Masq::new(
        MasqKind::Iptables,
        "10.1.2.3/16".parse().unwrap(),
        "10.1.10.7/24".parse().unwrap(),
    )
    .with_forward_rules(false);
    let listing = m.iptables_listing();
    assert_eq!(listing.len(), 7);
    assert!(listing.iter().all(|l| !l.contains("FLANNEL-FWD")));
    assert!(
        listing[2].contains("-s 10.1.10.0/24 -d 10.1.0.0/16"),
        "{}",
        listing[2]
    );
}

#[test]
fn without_random_fully() {
    let chains = masq().iptables_chains(Family::V4, masq().v4.unwrap(), false);
    assert!(chains
        .iter()
        .flat_map(|c| &c.rules)
        .all(|r| !r.contains(&"--random-fully".to_string())));
}

#[test]
fn nft_rules_use_iptables_logic() {
    let rules = masq().nft_rules();
    assert_eq!(rules[0].name, "postrtg");
    assert_eq!(
        rules[0].rules[3].to_string(),
        "ip saddr != 10.1.0.0/16 ip daddr 10.1.10.0/24 return"
    );
    assert_eq!(
        rules[0].rules[0].to_string(),
        "meta mark & 0x00004000 == 0x00004000 return"
    );
    assert_eq!(
        rules[0].rules[4].to_string(),
        "ip saddr 10.1.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"
    );
    assert_eq!(rules[1].name, "forward");
    assert_eq!(
        rules[1]
            .rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["ip saddr 10.1.0.0/16 accept", "ip daddr 10.1.0.0/16 accept"]
    );
    assert!(masq().nonat_rules().is_empty(), "weft masquerades itself");
}

#[test]
fn forward_rules_without_masquerade() {
    let m = masq().with_masquerade(false);
    assert_eq!(
        m.iptables_listing(),
        flanneld_listing("10.1.0.0/16", "10.1.10.0/24", "224.0.0.0/4")[FORWARD_RULES..]
    );
    let nft: Vec<_> = m.nft_rules().into_iter().map(|c| c.name).collect();
    assert_eq!(nft, ["forward"]);
    let nonat = m.nonat_rules();
    assert_eq!(
        nonat[0].rules[0].to_string(),
        "ip saddr 10.1.0.0/16 ip daddr 10.1.0.0/16 snat to ip saddr"
    );
    assert!(nonat[0].hook.ends_with("priority srcnat - 1"));
}

fn dual() -> Masq {
    masq().with_ipv6(
        "fd00:10::/48".parse().unwrap(),
        "fd00:10:0:a::1/64".parse().unwrap(),
    )
}

/// flanneld's MasqIP6Rules and ForwardRules(IPv6Network): the IPv4 chains' rules, in the same
/// order with the same comments, over the IPv6 networks and ff00::/8.
#[test]
fn ip6tables_rules_match_flanneld() {
    let want = flanneld_listing("fd00:10::/48", "fd00:10:0:a::/64", "ff00::/8");
    let m = dual();
    assert_eq!(m.ip6tables_listing(), want);
    assert_eq!(m.iptables_listing(), masq().iptables_listing());
    let chains = m.iptables_chains(Family::V6, m.v6.unwrap(), true);
    assert!(chains.iter().all(|c| c.program == "ip6tables"));
    assert!(masq().ip6tables_listing().is_empty(), "IPv4 only");
}

#[test]
fn ipv6_only_has_no_ipv4_rules() {
    let m = Masq::ipv6_only(
        MasqKind::Iptables,
        "fd00:10::/48".parse().unwrap(),
        "fd00:10:0:a::/64".parse().unwrap(),
    )
    .with_masquerade(false);
    assert!(m.iptables_listing().is_empty());
    assert!(m.nft_rules().is_empty() && m.nonat_rules().is_empty());
    assert_eq!(
        m.ip6tables_listing(),
        flanneld_listing("fd00:10::/48", "fd00:10:0:a::/64", "ff00::/8")[FORWARD_RULES..]
    );
}

#[test]
fn nft6_rules_use_ip6_matches() {
    let text = |chains: Vec<NftChain>| -> Vec<Vec<String>> {
        chains
            .iter()
            .map(|c| c.rules.iter().map(ToString::to_string).collect())
            .collect()
    };
    assert_eq!(
        text(dual().nft6_rules()),
        [
            vec![
                "meta mark & 0x00004000 == 0x00004000 return",
                "ip6 saddr fd00:10:0:a::/64 ip6 daddr fd00:10::/48 return",
                "ip6 saddr fd00:10::/48 ip6 daddr fd00:10:0:a::/64 return",
                "ip6 saddr != fd00:10::/48 ip6 daddr fd00:10:0:a::/64 return",
                "ip6 saddr fd00:10::/48 ip6 daddr != ff00::/8 masquerade fully-random",
                "ip6 saddr != fd00:10::/48 ip6 daddr fd00:10::/48 masquerade fully-random",
            ],
            vec![
                "ip6 saddr fd00:10::/48 accept",
                "ip6 daddr fd00:10::/48 accept"
            ],
        ]
    );
    let expr = dual().nft6_rules()[1].rules[0].expr();
    assert_eq!(
        expr[0]["match"]["left"]["payload"]["protocol"], "ip6",
        "{expr:?}"
    );
    assert_eq!(
        expr[0]["match"]["right"]["prefix"]["addr"], "fd00:10::",
        "{expr:?}"
    );
    assert!(masq().nft6_rules().is_empty());
}
