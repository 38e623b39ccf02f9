//! The nftables side: tables read with `nft -j` into serde types, rules compared as the kernel's own
//! expressions (not as `nft list` text, whose spelling changes between nft versions), chains rewritten
//! in one atomic `nft -f` transaction.

use std::fmt;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{run, run_stdin, Family, Masq, MasqError, Nets};

/// One nftables base chain we own: its hook line, comment and rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    pub name: &'static str,
    pub(super) hook: &'static str,
    pub(super) comment: &'static str,
    pub rules: Vec<NftRule>,
}

/// One rule of ours: all of `matches`, then `verdict`. Display gives the `nft` syntax;
/// [`NftRule::expr`] the expressions `nft -j` lists for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    pub(super) matches: Vec<Match>,
    pub(super) verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Match {
    /// kube-proxy's masquerade mark, `meta mark & 0x4000 == 0x4000`.
    KubeProxyMark,
    Saddr {
        not: bool,
        net: IpNet,
    },
    Daddr {
        not: bool,
        net: IpNet,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Return,
    Accept,
    MasqueradeFullyRandom,
    /// `snat to ip saddr`: bind the connection to its own source (the `weft-nonat` table).
    SnatToSaddr,
}

impl fmt::Display for NftRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            let (field, not, net) = match m {
                Match::KubeProxyMark => {
                    f.write_str("meta mark & 0x00004000 == 0x00004000 ")?;
                    continue;
                }
                Match::Saddr { not, net } => ("saddr", not, net),
                Match::Daddr { not, net } => ("daddr", not, net),
            };
            let op = if *not { "!= " } else { "" };
            write!(f, "{} {field} {op}{net} ", protocol(net))?;
        }
        f.write_str(match self.verdict {
            Verdict::Return => "return",
            Verdict::Accept => "accept",
            Verdict::MasqueradeFullyRandom => "masquerade fully-random",
            Verdict::SnatToSaddr => "snat to ip saddr",
        })
    }
}

/// The nft payload protocol matching `net`'s family: `ip` or `ip6`.
fn protocol(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

impl NftRule {
    /// The rule as libnftables-json(5) lists it.
    pub fn expr(&self) -> Vec<Value> {
        let mut expr: Vec<Value> = self
            .matches
            .iter()
            .map(|m| match m {
                Match::KubeProxyMark => json!({"match": {
                    "op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x4000]}, "right": 0x4000
                }}),
                Match::Saddr { not, net } | Match::Daddr { not, net } => {
                    let field = if matches!(m, Match::Saddr { .. }) { "saddr" } else { "daddr" };
                    json!({"match": {
                        "op": if *not { "!=" } else { "==" },
                        "left": payload(protocol(net), field),
                        "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}}
                    }})
                }
            })
            .collect();
        expr.push(match self.verdict {
            Verdict::Return => json!({"return": null}),
            Verdict::Accept => json!({"accept": null}),
            Verdict::MasqueradeFullyRandom => json!({"masquerade": {"flags": "fully-random"}}),
            Verdict::SnatToSaddr => json!({"snat": {"addr": payload("ip", "saddr")}}),
        });
        expr
    }
}

impl Masq {
    /// The chains of table `ip flannel-ipv4` (with `EnableNFTables`); empty for an IPv6-only network.
    ///
    /// **weft:** flanneld's nftables code returns on `ip saddr != SN ip daddr N` and matches the mark with
    /// `meta mark 0x4000`; both differ from its own iptables rules (the first shadows the host-to-overlay
    /// masquerade). weft writes the iptables logic here, as FLANNEL-COMPAT.md asks: `! -s N -d SN` and
    /// the masked mark. The table is node-local, so peers cannot tell.
    pub fn nft_rules(&self) -> Vec<NftChain> {
        self.v4.map(|n| self.nft_chains(n)).unwrap_or_default()
    }

    /// The chains of table `ip6 flannel-ipv6` (`EnableIPv6` with `EnableNFTables`): the same logic
    /// with `ip6` matches and `ff00::/8` as multicast.
    pub fn nft6_rules(&self) -> Vec<NftChain> {
        self.v6.map(|n| self.nft_chains(n)).unwrap_or_default()
    }

    pub(super) fn nft_chains(&self, nets: Nets) -> Vec<NftChain> {
        let (n, sn) = (nets.network, nets.subnet);
        let family = match n {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        };
        let saddr = |net| Match::Saddr { not: false, net };
        let daddr = |net| Match::Daddr { not: false, net };
        let not_saddr = |net| Match::Saddr { not: true, net };
        let not_daddr = |net| Match::Daddr { not: true, net };
        let rule = |matches: Vec<Match>, verdict| NftRule { matches, verdict };
        let mut chains = Vec::new();
        if self.masquerade {
            chains.push(NftChain {
                name: "postrtg",
                hook: "type nat hook postrouting priority srcnat",
                comment: "chain to manage traffic masquerading by flannel",
                rules: vec![
                    rule(vec![Match::KubeProxyMark], Verdict::Return),
                    rule(vec![saddr(sn), daddr(n)], Verdict::Return),
                    rule(vec![saddr(n), daddr(sn)], Verdict::Return),
                    rule(vec![not_saddr(n), daddr(sn)], Verdict::Return),
                    rule(
                        vec![saddr(n), not_daddr(family.multicast())],
                        Verdict::MasqueradeFullyRandom,
                    ),
                    rule(vec![not_saddr(n), daddr(n)], Verdict::MasqueradeFullyRandom),
                ],
            });
        }
        if self.forward {
            chains.push(NftChain {
                name: "forward",
                hook: "type filter hook forward priority filter",
                comment: "chain to accept flannel traffic",
                rules: vec![
                    rule(vec![saddr(n)], Verdict::Accept),
                    rule(vec![daddr(n)], Verdict::Accept),
                ],
            });
        }
        chains
    }

    /// The chain of table `ip weft-nonat`: only without `--ip-masq`, when Docker masquerades (see the
    /// module docs). The identity binding runs before any srcnat-priority chain and ends NAT evaluation.
    /// IPv4 only: Docker's IPv6 masquerade needs `--ipv6` and `ip6tables` in its own config, which the
    /// Docker options weft writes never turn on.
    pub fn nonat_rules(&self) -> Vec<NftChain> {
        let Some(nets) = self.v4.filter(|_| !self.masquerade) else {
            return Vec::new();
        };
        let n = nets.network;
        vec![NftChain {
            name: "postrouting",
            hook: "type nat hook postrouting priority srcnat - 1",
            comment: "overlay traffic keeps its source address",
            rules: vec![NftRule {
                matches: vec![
                    Match::Saddr { not: false, net: n },
                    Match::Daddr { not: false, net: n },
                ],
                verdict: Verdict::SnatToSaddr,
            }],
        }]
    }
}

/// `nft -j list ...` output: a list of objects, each with one key naming its kind.
#[derive(Debug, Deserialize)]
struct Listing {
    nftables: Vec<Object>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Object {
    table: Option<TableObj>,
    chain: Option<ChainObj>,
    rule: Option<RuleObj>,
}

#[derive(Debug, Deserialize)]
struct TableObj {
    family: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct ChainObj {
    name: String,
}

#[derive(Debug, Deserialize)]
struct RuleObj {
    chain: String,
    expr: Vec<Value>,
}

/// What one of our tables holds: chain names and, per chain, its rules' expressions in order.
#[derive(Debug, Default)]
pub(super) struct TableState {
    chains: Vec<String>,
    rules: Vec<(String, Vec<Value>)>,
}

impl TableState {
    fn parse(json: &str) -> Result<Self, serde_json::Error> {
        let listing: Listing = serde_json::from_str(json)?;
        let mut st = Self::default();
        for o in listing.nftables {
            if let Some(c) = o.chain {
                st.chains.push(c.name);
            }
            if let Some(r) = o.rule {
                st.rules
                    .push((r.chain, r.expr.into_iter().map(normalize).collect()));
            }
        }
        Ok(st)
    }

    fn chain_rules(&self, chain: &str) -> Vec<&Vec<Value>> {
        self.rules
            .iter()
            .filter(|(c, _)| c == chain)
            .map(|(_, e)| e)
            .collect()
    }
}

/// Newer nft versions list a single flag as a one-element array; compare both spellings alike.
fn normalize(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| match v {
                    Value::Array(mut a) if k == "flags" && a.len() == 1 => {
                        (k, normalize(a.remove(0)))
                    }
                    v => (k, normalize(v)),
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        v => v,
    }
}

fn bad_json(command: &str, e: serde_json::Error) -> MasqError {
    MasqError::Json {
        command: command.to_string(),
        source: e,
    }
}

/// `nft -j list table <family> <table>`, or `None` when the table does not exist. Existence is read
/// from the table list rather than guessed from an error message.
pub(super) async fn list_table(family: &str, table: &str) -> Result<Option<TableState>, MasqError> {
    let tables: Listing =
        serde_json::from_str(&run("nft", &["-j", "list", "tables", family]).await?)
            .map_err(|e| bad_json(&format!("nft -j list tables {family}"), e))?;
    let exists = tables
        .nftables
        .iter()
        .filter_map(|o| o.table.as_ref())
        .any(|t| t.family == family && t.name == table);
    if !exists {
        return Ok(None);
    }
    let listing = run("nft", &["-j", "list", "table", family, table]).await?;
    TableState::parse(&listing)
        .map(Some)
        .map_err(|e| bad_json(&format!("nft -j list table {family} {table}"), e))
}

/// Delete table `<family> <table>` if it exists; whether it did. Errors are collected in `errors`.
pub(super) async fn delete_table(family: &str, table: &str, errors: &mut Vec<MasqError>) -> bool {
    match list_table(family, table).await {
        Ok(None) => false,
        Ok(Some(_)) => {
            if let Err(e) = run("nft", &["delete", "table", family, table]).await {
                errors.push(e);
            }
            true
        }
        Err(e) => {
            errors.push(e);
            false
        }
    }
}

/// Make table `<family> <table>` hold exactly `chains`: missing or altered chains are rewritten in
/// one atomic `nft -f` transaction, chains no longer wanted are deleted, and an empty table goes away.
pub(super) async fn ensure_table(
    family: &str,
    table: &str,
    chains: &[NftChain],
) -> Result<Vec<String>, MasqError> {
    let state = match list_table(family, table).await {
        // Nothing wanted and no nft to ask: there is nothing of ours to remove either.
        Err(MasqError::Spawn { .. }) if chains.is_empty() => return Ok(Vec::new()),
        other => other?,
    };
    let mut repairs = Vec::new();
    if chains.is_empty() {
        if state.is_some() {
            run("nft", &["delete", "table", family, table]).await?;
            repairs.push(format!(
                "nftables: removed table {family} {table}, no longer configured"
            ));
        }
        return Ok(repairs);
    }
    if state.is_none() {
        repairs.push(format!("nftables: created table {family} {table}"));
    }
    let state = state.unwrap_or_default();
    let mut script = format!("add table {family} {table} {{ comment \"rules for {table}\"; }}\n");
    for stale in state
        .chains
        .iter()
        .filter(|name| !chains.iter().any(|c| c.name == name.as_str()))
    {
        script.push_str(&format!("delete chain {family} {table} {stale}\n"));
        repairs.push(format!(
            "nftables: removed chain {family} {table} {stale}, no longer configured"
        ));
    }
    for c in chains {
        let have = state.chain_rules(c.name);
        let want: Vec<Vec<Value>> = c.rules.iter().map(NftRule::expr).collect();
        if have.len() == want.len() && have.iter().zip(&want).all(|(h, w)| *h == w) {
            continue;
        }
        let missing = want.iter().filter(|w| !have.contains(w)).count();
        repairs.push(format!(
            "nftables: rewrote chain {family} {table} {} ({missing} rule(s) missing{})",
            c.name,
            if missing == 0 {
                ", order or extra rules fixed"
            } else {
                ""
            }
        ));
        // add + flush + add rules in one `nft -f` transaction: the kernel swaps the chain atomically,
        // so no packet ever sees it empty.
        script.push_str(&format!(
            "add chain {family} {table} {} {{ {}; comment \"{}\"; }}\n",
            c.name, c.hook, c.comment
        ));
        script.push_str(&format!("flush chain {family} {table} {}\n", c.name));
        for rule in &c.rules {
            script.push_str(&format!("add rule {family} {table} {} {rule}\n", c.name));
        }
    }
    if !repairs.is_empty() {
        run_stdin("nft", &["-f", "-"], &script).await?;
    }
    Ok(repairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What nft 1.0.6 lists for a table holding our postrtg chain's first, fourth and fifth rules and
    /// the nonat rule (captured from a real `nft -j list table`).
    const LISTING: &str = r#"{"nftables":[{"metainfo":{"version":"1.0.6","release_name":"Lester Gooch #5","json_schema_version":1}},{"table":{"family":"ip","name":"t","handle":1}},{"chain":{"family":"ip","table":"t","name":"postrtg","handle":1,"type":"nat","hook":"postrouting","prio":100,"policy":"accept"}},{"chain":{"family":"ip","table":"t","name":"nonat","handle":6,"type":"nat","hook":"postrouting","prio":99,"policy":"accept"}},{"rule":{"family":"ip","table":"t","chain":"postrtg","handle":2,"expr":[{"match":{"op":"==","left":{"&":[{"meta":{"key":"mark"}},16384]},"right":16384}},{"return":null}]}},{"rule":{"family":"ip","table":"t","chain":"postrtg","handle":4,"expr":[{"match":{"op":"!=","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.1.0.0","len":16}}}},{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"10.1.10.0","len":24}}}},{"return":null}]}},{"rule":{"family":"ip","table":"t","chain":"postrtg","handle":5,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.1.0.0","len":16}}}},{"match":{"op":"!=","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"224.0.0.0","len":4}}}},{"masquerade":{"flags":["fully-random"]}}]}},{"rule":{"family":"ip","table":"t","chain":"nonat","handle":7,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.1.0.0","len":16}}}},{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"10.1.0.0","len":16}}}},{"snat":{"addr":{"payload":{"protocol":"ip","field":"saddr"}}}}]}}]}"#;

    #[test]
    fn listing_parses_into_the_expressions_we_write() {
        let st = TableState::parse(LISTING).unwrap();
        assert_eq!(st.chains, ["postrtg", "nonat"]);
        let (n, sn): (IpNet, IpNet) = (
            "10.1.0.0/16".parse().unwrap(),
            "10.1.10.0/24".parse().unwrap(),
        );
        let rule = |matches: Vec<Match>, verdict| NftRule { matches, verdict }.expr();
        let postrtg = [
            rule(vec![Match::KubeProxyMark], Verdict::Return),
            rule(
                vec![
                    Match::Saddr { not: true, net: n },
                    Match::Daddr {
                        not: false,
                        net: sn,
                    },
                ],
                Verdict::Return,
            ),
            rule(
                vec![
                    Match::Saddr { not: false, net: n },
                    Match::Daddr {
                        not: true,
                        net: "224.0.0.0/4".parse().unwrap(),
                    },
                ],
                Verdict::MasqueradeFullyRandom,
            ),
        ];
        let have = st.chain_rules("postrtg");
        assert_eq!(have.len(), 3);
        for (h, w) in have.iter().zip(&postrtg) {
            assert_eq!(*h, w);
        }
        let nonat = rule(
            vec![
                Match::Saddr { not: false, net: n },
                Match::Daddr { not: false, net: n },
            ],
            Verdict::SnatToSaddr,
        );
        assert_eq!(st.chain_rules("nonat"), [&nonat]);
        assert!(st.chain_rules("nope").is_empty());
    }
}
