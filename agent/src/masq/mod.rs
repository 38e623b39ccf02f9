//! `--ip-masq` and `--iptables-forward-rules`: flanneld's masquerade and forward rules, kept in place.
//!
//! With N the overlay network and SN this node's subnet, traffic from containers to the outside world is
//! masqueraded to the host's address while traffic inside N keeps its source. The rules are exactly
//! flanneld's (FLANNEL-COMPAT.md), so `iptables-save` on a weft node reads like one on a flanneld node:
//!
//! ```text
//! -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
//! -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
//! -A FLANNEL-POSTRTG -s SN -d N -m comment --comment "flanneld masq" -j RETURN
//! -A FLANNEL-POSTRTG -s N -d SN -m comment --comment "flanneld masq" -j RETURN
//! -A FLANNEL-POSTRTG ! -s N -d SN -m comment --comment "flanneld masq" -j RETURN
//! -A FLANNEL-POSTRTG -s N ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
//! -A FLANNEL-POSTRTG ! -s N -d N -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
//! ```
//!
//! plus, whether or not masquerading is on (`--iptables-forward-rules`, default true), `FORWARD -j
//! FLANNEL-FWD` accepting `-s N` and `-d N` in the filter table, so a host where Docker set the FORWARD
//! policy to DROP still delivers to a container that has not sent anything yet. With `EnableNFTables` the
//! same logic lives in the nftables table `ip flannel-ipv4`, chains `postrtg` and `forward`.
//!
//! With `EnableIPv6` the same chains exist for IPv6NetWork (N6) and our IPv6 subnet (SN6) in
//! ip6tables, as flanneld's `MasqIP6Rules` and `ForwardRules(IPv6Network)` write them: the same
//! rules in the same order with the same comments, `ff00::/8` standing in for `224.0.0.0/4`; with
//! `EnableNFTables`, the table `ip6 flannel-ipv6`. An IPv6-only config (`EnableIPv4: false`) gets
//! only those. Both families are checked, repaired and removed together.
//!
//! **weft:** without `--ip-masq` the Docker options say `--ip-masq=true` (as `mk-docker-opts.sh` writes
//! them), so Docker adds `-s <bip> ! -o docker0 -j MASQUERADE`. On the kernel path that NATs container
//! traffic leaving through flannel.1 to flannel.1's address, while the eBPF path redirects it past
//! netfilter with the container's address: the receiver would see a different source per datapath.
//! weft keeps overlay traffic's source on both: the nftables table `ip weft-nonat` binds `N -> N`
//! connections to their own address (`snat to ip saddr`) in a NAT chain at priority `srcnat - 1`. The
//! kernel evaluates NAT chains in priority order and stops at the first that sets up a binding, so
//! Docker's MASQUERADE (iptables, priority srcnat) never sees them, whatever order Docker inserts it in.
//! Traffic to the outside world is still masqueraded by Docker.
//!
//! **weft:** where flanneld, when one rule was missing, deleted and re-added them all (a window in which
//! traffic leaves un-NATed), [`Masq::ensure`] checks each rule with `iptables -C` (as flanneld does, so
//! no version's `iptables -S` spelling matters) and counts the chain's rules; when one is missing or a
//! stale one is there (e.g. an old subnet's), the chain is rewritten in one `iptables-restore
//! --noflush` transaction, so packets never see it half-built. The jump into our chain is added last.
//! nftables tables are read with `nft -j` and chains rewritten in one atomic `nft -f` transaction.
//! The binaries are driven as they are installed: `iptables` is whichever backend (nf_tables or legacy)
//! the host's alternatives select, always with `-w` so we wait for the xtables lock instead of failing.
//!
//! ```no_run
//! # async fn demo(shutdown: tokio_util::sync::CancellationToken) -> Result<(), weft::masq::MasqError> {
//! use std::time::Duration;
//! use weft::masq::{Masq, MasqKind};
//!
//! let masq = Masq::new(MasqKind::from_enable_nftables(false), "10.1.0.0/16".parse().unwrap(), "10.1.10.0/24".parse().unwrap())
//!     .with_ipv6("fd00:10::/48".parse().unwrap(), "fd00:10:0:a::/64".parse().unwrap());
//! masq.ensure().await?;                                   // before reporting ready
//! masq.run(Duration::from_secs(5), shutdown).await;       // keeps them there
//! # Ok(()) }
//! ```

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

mod iptables;
mod nftables;

/// The mark kube-proxy sets on packets it will masquerade itself; flannel leaves them alone.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
const MULTICAST: &str = "224.0.0.0/4";
const MULTICAST6: &str = "ff00::/8";
const MASQ_COMMENT: &str = "flanneld masq";
const FWD_COMMENT: &str = "flanneld forward";
pub const NAT_CHAIN: &str = "FLANNEL-POSTRTG";
pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";
pub const NFT_TABLE: &str = "flannel-ipv4";
/// flanneld's nftables table for IPv6 (family `ip6`).
pub const NFT_TABLE6: &str = "flannel-ipv6";
/// weft's own table that keeps overlay traffic's source when Docker masquerades (no `--ip-masq`).
pub const NONAT_TABLE: &str = "weft-nonat";

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("run `{command}`: {source}; install iptables/nftables or put them on PATH")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("read `{command}`: {source}; is this nftables' JSON output?")]
    Json {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("remove ip-masq rules: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Teardown { errors: Vec<MasqError> },
}

/// Which firewall front end carries the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasqKind {
    Iptables,
    Nftables,
}

impl MasqKind {
    /// The network config's `EnableNFTables` decides, as in flanneld.
    pub fn from_enable_nftables(enable: bool) -> Self {
        if enable {
            Self::Nftables
        } else {
            Self::Iptables
        }
    }
}

/// An address family's netfilter front ends: flanneld keeps one set of rules per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// IPv4 first, as flanneld sets them up.
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

impl Family {
    /// The iptables binary of this family (its `-restore` twin is named after it).
    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// The nftables family and flanneld's table name in it.
    fn nft(self) -> (&'static str, &'static str) {
        match self {
            Self::V4 => ("ip", NFT_TABLE),
            Self::V6 => ("ip6", NFT_TABLE6),
        }
    }

    fn multicast(self) -> IpNet {
        match self {
            Self::V4 => MULTICAST,
            Self::V6 => MULTICAST6,
        }
        .parse()
        .expect("a valid prefix")
    }
}

/// One family's overlay network (N) and this node's subnet in it (SN), both masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Nets {
    pub network: IpNet,
    pub subnet: IpNet,
}

impl Nets {
    fn new(network: impl Into<IpNet>, subnet: impl Into<IpNet>) -> Self {
        Self {
            network: network.into().trunc(),
            subnet: subnet.into().trunc(),
        }
    }
}

/// flanneld's rules for the configured families' networks and this node's subnets, kept in place
/// by [`Masq::run`].
#[derive(Debug, Clone)]
pub struct Masq {
    kind: MasqKind,
    v4: Option<Nets>,
    v6: Option<Nets>,
    /// `--ip-masq`: flanneld's NAT chain; when off, the `weft-nonat` table instead.
    masquerade: bool,
    forward: bool,
    random_fully: Arc<OnceLock<bool>>,
    nft_missing_told: Arc<std::sync::atomic::AtomicBool>,
    /// Whether the family not configured was looked at for leftovers (once per instance).
    swept: Arc<std::sync::atomic::AtomicBool>,
    metrics: Option<Arc<Metrics>>,
}

impl Masq {
    /// Masquerade and forward rules for `network` (N) and this node's `subnet` (SN).
    pub fn new(kind: MasqKind, network: Ipv4Net, subnet: Ipv4Net) -> Self {
        Self::with_nets(kind, Some(Nets::new(network, subnet)), None)
    }

    /// An IPv6-only network (`EnableIPv4: false`): only the ip6tables / `ip6` rules.
    pub fn ipv6_only(kind: MasqKind, network: Ipv6Net, subnet: Ipv6Net) -> Self {
        Self::with_nets(kind, None, Some(Nets::new(network, subnet)))
    }

    fn with_nets(kind: MasqKind, v4: Option<Nets>, v6: Option<Nets>) -> Self {
        Self {
            kind,
            v4,
            v6,
            masquerade: true,
            forward: true,
            random_fully: Arc::default(),
            nft_missing_told: Arc::default(),
            swept: Arc::default(),
            metrics: None,
        }
    }

    /// Add the IPv6 rules (`EnableIPv6`) for `IPv6Network` and our IPv6 subnet.
    pub fn with_ipv6(mut self, network: Ipv6Net, subnet: Ipv6Net) -> Self {
        self.v6 = Some(Nets::new(network, subnet));
        self
    }

    /// Whether to masquerade (`--ip-masq`). Off, weft leaves the outside world to Docker's own
    /// masquerade and only keeps overlay traffic's source (the `weft-nonat` table).
    pub fn with_masquerade(mut self, masquerade: bool) -> Self {
        self.masquerade = masquerade;
        self
    }

    /// Whether to add the FORWARD accept rules (flanneld's `--iptables-forward-rules`, default on).
    pub fn with_forward_rules(mut self, forward: bool) -> Self {
        self.forward = forward;
        self
    }

    /// Count every restored rule in [`Metrics::reconcile_repairs`].
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn kind(&self) -> MasqKind {
        self.kind
    }

    fn nets(&self, family: Family) -> Option<Nets> {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    /// Put every missing rule in place; returns one line per repair (empty when all was in place).
    pub async fn ensure(&self) -> Result<Vec<String>, MasqError> {
        let mut repairs = Vec::new();
        for family in FAMILIES {
            match self.nets(family) {
                Some(nets) => repairs.extend(self.ensure_family(family, nets).await?),
                None => repairs.extend(self.sweep(family).await),
            }
        }
        match nftables::ensure_table("ip", NONAT_TABLE, &self.nonat_rules()).await {
            Ok(more) => repairs.extend(more),
            // An iptables-only host without nft: the forward (and masquerade) rules matter more
            // than keeping overlay sources under Docker's masquerade; say so once, keep going.
            Err(e @ MasqError::Spawn { .. }) if self.kind == MasqKind::Iptables => {
                if !self
                    .nft_missing_told
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, "without nft, Docker's masquerade (--ip-masq=true in its options) NATs overlay traffic on the kernel path but not on eBPF; install nftables or run with --ip-masq");
                }
            }
            Err(e) => return Err(e),
        }
        Ok(repairs)
    }

    async fn ensure_family(&self, family: Family, nets: Nets) -> Result<Vec<String>, MasqError> {
        if self.kind == MasqKind::Nftables {
            let (nft_family, table) = family.nft();
            return nftables::ensure_table(nft_family, table, &self.nft_chains(nets)).await;
        }
        let random_fully = self.iptables_random_fully().await;
        let mut repairs = Vec::new();
        for chain in self.iptables_chains(family, nets, random_fully) {
            if self.wants(chain.chain) {
                repairs.extend(iptables::ensure_chain(&chain).await?);
            } else {
                // Turned off since the last run (e.g. restarted without --ip-masq).
                let mut errors = Vec::new();
                if iptables::remove_chain(&chain, &mut errors).await {
                    repairs.push(format!(
                        "{} {} {}: removed, no longer configured",
                        chain.program, chain.table, chain.chain
                    ));
                }
                if let Some(e) = errors.pop() {
                    return Err(e);
                }
            }
        }
        Ok(repairs)
    }

    /// A family the config no longer enables (dual stack turned IPv4-only, or the reverse) may
    /// have left its rules behind: looked for once per instance, quietly, since a host without
    /// IPv6 netfilter (or without ip6tables) has nothing to remove and must still start.
    async fn sweep(&self, family: Family) -> Vec<String> {
        if self.swept.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return Vec::new();
        }
        let mut errors = Vec::new();
        let found = self.remove_family(family, &mut errors).await;
        for e in errors {
            tracing::debug!(error = %e, ?family, "looking for rules of a family no longer configured");
        }
        if found {
            vec![format!(
                "{family:?} rules removed, the network config no longer enables that family"
            )]
        } else {
            Vec::new()
        }
    }

    /// Remove one family's chains (and the jumps into them) or nftables table; whether any was there.
    async fn remove_family(&self, family: Family, errors: &mut Vec<MasqError>) -> bool {
        match self.kind {
            MasqKind::Iptables => {
                let mut found = false;
                // Removal goes by chain names and jumps only; the rules inside do not matter.
                let any = Nets::new(family.multicast(), family.multicast());
                for chain in self.iptables_chains(family, any, true) {
                    found |= iptables::remove_chain(&chain, errors).await;
                }
                found
            }
            MasqKind::Nftables => {
                let (nft_family, table) = family.nft();
                nftables::delete_table(nft_family, table, errors).await
            }
        }
    }

    /// flanneld sets the FORWARD policy to ACCEPT at start (only then: Docker, started later, may set
    /// DROP again, which the FLANNEL-FWD rules make harmless for overlay traffic). Returns whether it
    /// changed the policy. IPv4 only, as flanneld: its IPv6 FLANNEL-FWD rules accept overlay
    /// traffic whatever ip6tables' policy is.
    pub async fn accept_forward_policy(&self) -> Result<bool, MasqError> {
        if !self.forward || self.v4.is_none() {
            return Ok(false);
        }
        let listing = run("iptables", &["-w", "-S", "FORWARD"]).await?;
        if listing.lines().any(|l| l.trim() == "-P FORWARD ACCEPT") {
            return Ok(false);
        }
        run("iptables", &["-w", "-P", "FORWARD", "ACCEPT"]).await?;
        Ok(true)
    }

    fn wants(&self, chain: &str) -> bool {
        match chain {
            NAT_CHAIN | "postrtg" => self.masquerade,
            _ => self.forward,
        }
    }

    /// Check every `interval` (flanneld: 5 s) and restore what is missing, until `shutdown` fires.
    /// Failures are logged and retried on the next tick: a busy xtables lock must not stop the agent.
    pub async fn run(&self, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => match self.ensure().await {
                    Ok(repairs) if repairs.is_empty() => {}
                    Ok(repairs) => {
                        for repair in &repairs {
                            tracing::warn!(repair = %repair, "firewall rule was missing, restored");
                        }
                        if let Some(m) = &self.metrics {
                            m.reconcile_repairs.add(repairs.len() as u64);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "firewall rule check failed; retrying in {interval:?}"),
                },
            }
        }
    }

    /// Remove our chains and the jumps into them, or our nftables tables, for both families (a
    /// family not configured is cleaned quietly). Keeps going after an error and reports all of them.
    /// Not called on a plain stop: the rules stay so traffic keeps its NAT while the agent restarts.
    pub async fn remove(&self) -> Result<(), MasqError> {
        let mut errors = Vec::new();
        for family in FAMILIES {
            if self.nets(family).is_some() {
                self.remove_family(family, &mut errors).await;
            } else {
                self.remove_family(family, &mut Vec::new()).await;
            }
        }
        let mut nonat_errors = Vec::new();
        nftables::delete_table("ip", NONAT_TABLE, &mut nonat_errors).await;
        // No nft binary: there is no nftables table of ours to remove either.
        errors.extend(nonat_errors.into_iter().filter(|e| {
            !(self.kind == MasqKind::Iptables && matches!(e, MasqError::Spawn { .. }))
        }));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(MasqError::Teardown { errors })
        }
    }
}

async fn run(program: &str, args: &[&str]) -> Result<String, MasqError> {
    run_stdin(program, args, "").await
}

async fn run_stdin(program: &str, args: &[&str], stdin: &str) -> Result<String, MasqError> {
    use tokio::io::AsyncWriteExt as _;
    let command = format!("{program} {}", args.join(" "));
    let spawn_err = |source| MasqError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).await.map_err(spawn_err)?;
    }
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if !out.status.success() {
        return Err(MasqError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests;
