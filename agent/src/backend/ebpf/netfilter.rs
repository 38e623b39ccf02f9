//! The FORWARD rules the fast path skips: redirected packets never meet
//! netfilter, so the operator is told which rules stop applying.

use tracing::warn;

/// Warns when FORWARD holds anything the fast path skips: redirected packets
/// never meet netfilter, so a FORWARD policy or rule (iptables or nftables)
/// that applies on the kernel path does not apply to container traffic
/// between hosts here. flannel's own FORWARD accept rules are the exception.
pub(super) async fn warn_skipped_netfilter() {
    let mut skipped = Vec::new();
    if let Some(listing) = command_output("iptables", &["-S", "FORWARD"]).await {
        skipped.extend(iptables_forward_skipped(&listing));
    }
    if let Some(listing) = command_output("nft", &["list", "ruleset"]).await {
        skipped.extend(nft_forward_skipped(&listing));
    }
    if !skipped.is_empty() {
        warn!(
            rules = %skipped.join(" | "),
            "FORWARD filtering the eBPF fast path skips: container traffic to and from remote subnets bypasses these (and conntrack and NAT); use --datapath kernel if they must apply"
        );
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

/// The policy (unless ACCEPT) and rules of `iptables -S FORWARD` that are not flannel's.
fn iptables_forward_skipped(listing: &str) -> Vec<String> {
    let flannel = format!("-j {}", crate::masq::FORWARD_CHAIN);
    listing
        .lines()
        .map(str::trim)
        .filter(|l| match l.strip_prefix("-P FORWARD ") {
            Some(policy) => policy != "ACCEPT",
            None => l.starts_with("-A FORWARD ") && !l.ends_with(&flannel),
        })
        .map(|l| format!("iptables {l}"))
        .collect()
}

/// Native nftables chains on the forward hook with a drop policy or any rule,
/// except iptables-nft's own tables (listed by `iptables -S`) and flannel's.
fn nft_forward_skipped(listing: &str) -> Vec<String> {
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
                    && name == "FORWARD";
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
            if line.starts_with("type filter hook forward") {
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
    fn forward_rules_other_than_flannels_are_reported() {
        let listing = "-P FORWARD DROP\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n-A FORWARD -j DOCKER-USER\n";
        assert_eq!(
            iptables_forward_skipped(listing),
            vec![
                "iptables -P FORWARD DROP",
                "iptables -A FORWARD -j DOCKER-USER"
            ]
        );
        assert!(iptables_forward_skipped("-P FORWARD ACCEPT\n").is_empty());
    }

    #[test]
    fn nft_forward_chains_are_reported() {
        let listing = "table inet fw {\n\tchain fwd {\n\t\ttype filter hook forward priority filter; policy drop;\n\t\tct state established accept\n\t}\n\tchain out {\n\t\ttype filter hook output priority filter; policy accept;\n\t}\n}\ntable ip filter {\n\tchain FORWARD {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tcounter jump DOCKER-USER\n\t}\n}\n";
        assert_eq!(
            nft_forward_skipped(listing),
            vec!["nft table inet fw chain fwd: policy drop; ct state established accept"]
        );
        // flannel's own forward chains, both families, accept only overlay traffic.
        let flannel = "table ip6 flannel-ipv6 {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tip6 saddr fd00:10::/48 accept\n\t}\n}\n";
        assert!(nft_forward_skipped(flannel).is_empty());
    }
}
