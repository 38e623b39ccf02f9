//! The iptables and ip6tables side: flanneld's chains per family (what [`Masq`] lists and keeps), each
//! checked rule by rule with `iptables -C` (as flanneld does), rewritten in
//! one `iptables-restore --noflush` transaction when anything is off, so no packet sees a half-built
//! chain and no `iptables -S` text is compared by position (its spelling varies across versions).

use super::{
    run, run_stdin, Family, Masq, MasqError, Nets, FORWARD_CHAIN, FWD_COMMENT, KUBE_PROXY_MARK,
    MASQ_COMMENT, NAT_CHAIN,
};

/// One chain we own, the rules it must hold in order, and the jump into it from a built-in chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IptChain {
    /// `iptables` or `ip6tables`.
    pub program: &'static str,
    pub table: &'static str,
    pub chain: &'static str,
    /// Built-in chain that jumps to `chain`.
    pub hook: &'static str,
    pub jump: Vec<String>,
    pub rules: Vec<Vec<String>>,
}

/// iptables exits 1 when `-C` finds no such rule or `-S`/`-D` no such chain; other codes are failures.
fn absent(e: &MasqError) -> bool {
    matches!(e, MasqError::Command { status, .. } if status.code() == Some(1))
}

/// Does `-C` find `rule` in `chain`?
async fn has_rule(
    program: &str,
    table: &str,
    chain: &str,
    rule: &[String],
) -> Result<bool, MasqError> {
    let mut args = vec!["-w", "-t", table, "-C", chain];
    args.extend(rule.iter().map(String::as_str));
    match run(program, &args).await {
        Ok(_) => Ok(true),
        Err(e) if absent(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// How many rules `chain` holds, or `None` when it does not exist. Only the `-A` lines are counted,
/// which every iptables version prints one per rule.
async fn rule_count(program: &str, table: &str, chain: &str) -> Result<Option<usize>, MasqError> {
    match run(program, &["-w", "-t", table, "-S", chain]).await {
        Ok(listing) => Ok(Some(
            listing.lines().filter(|l| l.starts_with("-A ")).count(),
        )),
        Err(e) if absent(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Put chain `c`, its rules (in order, nothing else) and the jump into it in place; one line per repair.
pub(super) async fn ensure_chain(c: &IptChain) -> Result<Vec<String>, MasqError> {
    let at = |what: &str| format!("{} {} {}: {what}", c.program, c.table, c.chain);
    let mut repairs = Vec::new();
    let count = rule_count(c.program, c.table, c.chain).await?;
    let mut present = 0;
    if count.is_none() {
        repairs.push(at("created chain"));
    }
    for (i, rule) in c.rules.iter().enumerate() {
        if count.is_some() && has_rule(c.program, c.table, c.chain, rule).await? {
            present += 1;
        } else {
            repairs.push(at(&format!("inserted rule {}: {}", i + 1, canonical(rule))));
        }
    }
    let stale = count.unwrap_or(0).saturating_sub(present);
    if stale > 0 {
        repairs.push(at(&format!("removed stale rule(s): {stale} not ours")));
    }
    if !repairs.is_empty() {
        // With --noflush, declaring a user chain creates it or flushes it, in the same transaction
        // that adds the rules: the kernel swaps the whole chain at once.
        let mut script = format!("*{}\n:{} - [0:0]\n", c.table, c.chain);
        for rule in &c.rules {
            script.push_str(&format!("-A {} {}\n", c.chain, canonical(rule)));
        }
        script.push_str("COMMIT\n");
        let restore = format!("{}-restore", c.program);
        run_stdin(&restore, &["-w", "--noflush"], &script).await?;
    }
    // The jump goes in last, so packets never enter a chain that is still being built.
    if !has_rule(c.program, c.table, c.hook, &c.jump).await? {
        let mut args = vec!["-w", "-t", c.table, "-I", c.hook, "1"];
        args.extend(c.jump.iter().map(String::as_str));
        run(c.program, &args).await?;
        repairs.push(format!(
            "{} {} {}: inserted jump to {}",
            c.program, c.table, c.hook, c.chain
        ));
    }
    Ok(repairs)
}

/// Removes chain `c` and every jump into it; returns whether there was anything to remove.
pub(super) async fn remove_chain(c: &IptChain, errors: &mut Vec<MasqError>) -> bool {
    match rule_count(c.program, c.table, c.chain).await {
        // iptables refuses a jump to a chain that does not exist, so there is none to remove
        // (and `-D` of one would fail with "Couldn't load target").
        Ok(None) => return false,
        Ok(Some(_)) => {}
        Err(e) => {
            errors.push(e);
            return false;
        }
    }
    let mut jump = vec!["-w", "-t", c.table, "-D", c.hook];
    jump.extend(c.jump.iter().map(String::as_str));
    // The jump may have been added more than once (by hand, by an old flanneld); remove every copy.
    // Bounded, in case something re-adds it as fast as we delete it.
    for _ in 0..16 {
        match run(c.program, &jump).await {
            Ok(_) => {}
            Err(e) if absent(&e) => break,
            Err(e) => {
                errors.push(e);
                break;
            }
        }
    }
    for op in ["-F", "-X"] {
        if let Err(e) = run(c.program, &["-w", "-t", c.table, op, c.chain]).await {
            errors.push(e);
        }
    }
    true
}

/// A rule spec as `iptables-save` prints it and `iptables-restore` reads it: arguments with spaces in
/// double quotes.
pub(super) fn canonical(spec: &[String]) -> String {
    spec.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Does `iptables v1.8.9 (nf_tables)` name a version at least `min`?
pub(super) fn version_at_least(text: &str, min: (u32, u32, u32)) -> bool {
    let Some(v) = text.split_whitespace().find_map(|w| w.strip_prefix('v')) else {
        return false;
    };
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let got = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    got >= min
}

impl Masq {
    /// The IPv4 rules as `iptables-save` lists them (`-A CHAIN ...`), nat table first. For logs and
    /// tests.
    pub fn iptables_listing(&self) -> Vec<String> {
        self.listing(Family::V4)
    }

    /// The IPv6 rules as `ip6tables-save` lists them.
    pub fn ip6tables_listing(&self) -> Vec<String> {
        self.listing(Family::V6)
    }

    fn listing(&self, family: Family) -> Vec<String> {
        let Some(nets) = self.nets(family) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for c in self
            .iptables_chains(family, nets, true)
            .into_iter()
            .filter(|c| self.wants(c.chain))
        {
            out.push(format!("-A {} {}", c.hook, canonical(&c.jump)));
            out.extend(
                c.rules
                    .iter()
                    .map(|r| format!("-A {} {}", c.chain, canonical(r))),
            );
        }
        out
    }

    /// Both chains of `family`, wanted or not: [`Masq::ensure`] removes the ones switched off.
    /// The same rules for both families (flanneld's `MasqRules` / `MasqIP6Rules`), multicast
    /// being the family's own.
    pub(super) fn iptables_chains(
        &self,
        family: Family,
        nets: Nets,
        random_fully: bool,
    ) -> Vec<IptChain> {
        let (n, sn) = (nets.network.to_string(), nets.subnet.to_string());
        let multicast = family.multicast().to_string();
        // Every masq rule ends in the same comment and target; MASQUERADE adds --random-fully.
        let rule = |spec: &[&str], target: &str| {
            let mut rule = words(spec);
            rule.extend(words(&[
                "-m",
                "comment",
                "--comment",
                MASQ_COMMENT,
                "-j",
                target,
            ]));
            if target == "MASQUERADE" && random_fully {
                rule.push("--random-fully".into());
            }
            rule
        };
        let ret = |spec: &[&str]| rule(spec, "RETURN");
        let masq = |spec: &[&str]| rule(spec, "MASQUERADE");
        let program = family.iptables();
        let mut chains = vec![IptChain {
            program,
            table: "nat",
            chain: NAT_CHAIN,
            hook: "POSTROUTING",
            jump: words(&["-m", "comment", "--comment", MASQ_COMMENT, "-j", NAT_CHAIN]),
            rules: vec![
                ret(&["-m", "mark", "--mark", KUBE_PROXY_MARK]),
                ret(&["-s", &sn, "-d", &n]),
                ret(&["-s", &n, "-d", &sn]),
                ret(&["!", "-s", &n, "-d", &sn]),
                masq(&["-s", &n, "!", "-d", &multicast]),
                masq(&["!", "-s", &n, "-d", &n]),
            ],
        }];
        {
            let accept = |dir: &str| {
                words(&[
                    dir,
                    &n,
                    "-m",
                    "comment",
                    "--comment",
                    FWD_COMMENT,
                    "-j",
                    "ACCEPT",
                ])
            };
            chains.push(IptChain {
                program,
                table: "filter",
                chain: FORWARD_CHAIN,
                hook: "FORWARD",
                jump: words(&[
                    "-m",
                    "comment",
                    "--comment",
                    FWD_COMMENT,
                    "-j",
                    FORWARD_CHAIN,
                ]),
                rules: vec![accept("-s"), accept("-d")],
            });
        }
        chains
    }

    /// `--random-fully` needs iptables 1.6.2 or later; asked once per process, like flanneld does.
    /// ip6tables ships in the same package as iptables, so one answer holds for both.
    pub(super) async fn iptables_random_fully(&self) -> bool {
        if let Some(v) = self.random_fully.get() {
            return *v;
        }
        let program = if self.v4.is_some() {
            "iptables"
        } else {
            "ip6tables"
        };
        let supported = match run(program, &["-V"]).await {
            Ok(out) => {
                tracing::info!(version = %out.trim(), "ip-masq uses {program}");
                version_at_least(&out, (1, 6, 2))
            }
            // Leave it undecided so the next ensure asks again; ensure itself will report the failure.
            Err(_) => return true,
        };
        *self.random_fully.get_or_init(|| supported)
    }
}

fn words(spec: &[&str]) -> Vec<String> {
    spec.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_versions() {
        let spec: Vec<String> = ["-m", "comment", "--comment", "flanneld masq", "-j", "X"]
            .map(String::from)
            .into();
        assert_eq!(
            canonical(&spec),
            r#"-m comment --comment "flanneld masq" -j X"#
        );
        assert!(version_at_least("iptables v1.8.9 (nf_tables)", (1, 6, 2)));
        assert!(!version_at_least("iptables v1.6.1", (1, 6, 2)));
        assert!(!version_at_least("garbage", (1, 6, 2)));
    }
}
