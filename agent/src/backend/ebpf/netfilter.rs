//! The netfilter rules the fast path skips: redirected packets never meet
//! netfilter, so the operator is told which rules stop applying.

use tracing::warn;

/// A filter hook whose rules apply on the kernel path and not to what the programs redirect.
struct Hook {
    /// The iptables chain.
    chain: &'static str,
    /// The nftables hook.
    nft: &'static str,
}

/// Container traffic between hosts is forwarded on the kernel path.
const FORWARD: Hook = Hook {
    chain: "FORWARD",
    nft: "forward",
};
/// The outer VXLAN packets flannel.N sends are the host's own output on the
/// kernel path; the programs build them and send them out directly.
const OUTPUT: Hook = Hook {
    chain: "OUTPUT",
    nft: "output",
};

/// Warns when FORWARD or OUTPUT holds anything the fast path skips:
/// redirected packets never meet netfilter, so a policy or rule (iptables or
/// nftables) there that applies on the kernel path does not apply to
/// container traffic between hosts (FORWARD) nor to the outer VXLAN packets
/// of it and of the host's own traffic (OUTPUT) here. flannel's own FORWARD
/// accept rules are the exception.
pub(super) async fn warn_skipped_netfilter() {
    let nft = command_output("nft", &["list", "ruleset"]).await;
    for (hook, bypass) in [
        (
            FORWARD,
            "container traffic to and from remote subnets bypasses these (and conntrack and NAT)",
        ),
        (
            OUTPUT,
            "the outer VXLAN packets of the traffic the programs encapsulate bypass these",
        ),
    ] {
        let mut skipped = Vec::new();
        if let Some(listing) = command_output("iptables", &["-S", hook.chain]).await {
            skipped.extend(iptables_skipped(&listing, &hook));
        }
        if let Some(listing) = &nft {
            skipped.extend(nft_skipped(listing, &hook));
        }
        if !skipped.is_empty() {
            warn!(
                rules = %skipped.join(" | "),
                "{} filtering the eBPF fast path skips: {bypass}; use --datapath kernel if they must apply",
                hook.chain
            );
        }
    }
}

async fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The policy (unless ACCEPT) and rules of `iptables -S <chain>` that are not flannel's.
fn iptables_skipped(listing: &str, hook: &Hook) -> Vec<String> {
    let flannel = format!("-j {}", crate::masq::FORWARD_CHAIN);
    let (policy, rule) = (format!("-P {} ", hook.chain), format!("-A {} ", hook.chain));
    listing
        .lines()
        .map(str::trim)
        .filter(|l| match l.strip_prefix(&policy) {
            Some(policy) => policy != "ACCEPT",
            None => l.starts_with(&rule) && !l.ends_with(&flannel),
        })
        .map(|l| format!("iptables {l}"))
        .collect()
}

/// Native nftables chains on the hook with a drop policy or any rule, except
/// iptables-nft's own tables (listed by `iptables -S`) and flannel's.
fn nft_skipped(listing: &str, hook: &Hook) -> Vec<String> {
    let filter = format!("type filter hook {} ", hook.nft);
    let mut out = Vec::new();
    let mut table = "";
    let mut chain: Option<(&str, bool, Vec<&str>)> = None;
    for line in listing.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("table ") {
            table = rest.trim_end_matches('{').trim();
        } else if let Some(rest) = line.strip_prefix("chain ") {
            chain = Some((rest.trim_end_matches('{').trim(), false, Vec::new()));
        } else if line == "}" {
            if let Some((name, true, rules)) = chain.take() {
                let iptables_nft = ["ip filter", "ip6 filter", "inet filter"].contains(&table)
                    && name == hook.chain;
                let flannel = [crate::masq::NFT_TABLE, crate::masq::NFT_TABLE6]
                    .iter()
                    .any(|t| table.ends_with(t));
                if !iptables_nft && !flannel && !rules.is_empty() {
                    out.push(format!(
                        "nft table {table} chain {name}: {}",
                        rules.join("; ")
                    ));
                }
            }
        } else if let Some((_, hooked, rules)) = chain.as_mut() {
            if line.starts_with(&filter) {
                *hooked = true;
                if line.contains("policy drop") {
                    rules.push("policy drop");
                }
            } else if !line.is_empty() && !line.starts_with("comment ") {
                rules.push(line);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_and_output_rules_other_than_flannels_are_reported() {
        let listing = "-P FORWARD DROP\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n-A FORWARD -j DOCKER-USER\n";
        assert_eq!(
            iptables_skipped(listing, &FORWARD),
            vec![
                "iptables -P FORWARD DROP",
                "iptables -A FORWARD -j DOCKER-USER"
            ]
        );
        assert!(iptables_skipped("-P FORWARD ACCEPT\n", &FORWARD).is_empty());
        // OUTPUT: what stops flannel.N's outer packets on the kernel path.
        let output = "-P OUTPUT ACCEPT\n-A OUTPUT -p udp -m udp --dport 8472 -j DROP\n";
        assert_eq!(
            iptables_skipped(output, &OUTPUT),
            vec!["iptables -A OUTPUT -p udp -m udp --dport 8472 -j DROP"]
        );
    }

    #[test]
    fn nft_forward_and_output_chains_are_reported() {
        let listing = "table inet fw {\n\tchain fwd {\n\t\ttype filter hook forward priority filter; policy drop;\n\t\tct state established accept\n\t}\n\tchain out {\n\t\ttype filter hook output priority filter; policy accept;\n\t}\n}\ntable ip filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tcounter jump DOCKER-USER\n\t}\n}\n";
        assert_eq!(
            nft_skipped(listing, &FORWARD),
            vec!["nft table inet fw chain fwd: policy drop; ct state established accept"]
        );
        // The output chain has neither rules nor a drop policy.
        assert!(nft_skipped(listing, &OUTPUT).is_empty());
        let output = "table inet fw {\n\tchain out {\n\t\ttype filter hook output priority filter; policy accept;\n\t\tudp dport 8472 drop\n\t}\n}\n";
        assert_eq!(
            nft_skipped(output, &OUTPUT),
            vec!["nft table inet fw chain out: udp dport 8472 drop"]
        );
        // flannel's own forward chains, both families, accept only overlay traffic.
        let flannel = "table ip6 flannel-ipv6 {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tip6 saddr fd00:10::/48 accept\n\t}\n}\n";
        assert!(nft_skipped(flannel, &FORWARD).is_empty());
    }
}
