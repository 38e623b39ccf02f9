//! The running agent's steps: follow watch updates, renew, reconcile, keep the firewall.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AgentConfig, AgentError};
use crate::backend::Backend;
use crate::config::NetworkConfig;
use crate::files::{self, FilesError, SubnetEnv};
use crate::lease::{Lease, LeaseAttrs, LeaseEvent, PeerSet};
use crate::masq::{Masq, MasqKind};
use crate::metrics::Metrics;
use crate::netlink::ExternalIface;
use crate::notify::Notifier;
use crate::status::ReconcileFailure;
use crate::subnet::{self, SubnetStore, WatchUpdate};
use crate::turns::Polls;

/// State of a running agent that the loop's steps share.
pub(super) struct Running<'a, B, S> {
    pub cfg: &'a AgentConfig,
    pub net: NetworkConfig,
    pub iface: ExternalIface,
    pub store: S,
    pub backend: B,
    pub attrs: LeaseAttrs,
    pub own: Lease,
    pub peers: PeerSet,
    pub metrics: Arc<Metrics>,
    pub masq: Option<MasqTask>,
    /// Whether to install firewall rules at all (see [`super::Host::firewall`]).
    pub firewall: bool,
    pub notifier: Notifier,
    /// The last `STATUS=` sent, so an unchanged line is not sent again.
    pub status: String,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// The failures of the last reconcile round as `weft status` was told them;
    /// `None` before the first round.
    pub last_failures: Option<Vec<ReconcileFailure>>,
}

/// The masquerade, forward and no-NAT rules for our subnet and the task that keeps them in place.
pub(super) struct MasqTask {
    cancel: CancellationToken,
}

impl MasqTask {
    /// Install the rules for our lease's subnets now, then re-check them every `resync`.
    async fn start(
        cfg: &AgentConfig,
        net: &NetworkConfig,
        own: &Lease,
        metrics: &Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Option<MasqTask>, AgentError> {
        let kind = MasqKind::from_enable_nftables(net.enable_nftables);
        // One set of rules per enabled family, as flanneld's MasqRules / MasqIP6Rules.
        let v4 = net.ipv4_network().zip(own.ipv4_subnet());
        let v6 = net.ipv6_network().zip(own.ipv6_subnet);
        let masq = match (v4, v6) {
            (Some((n, sn)), None) => Masq::new(kind, n, sn),
            (Some((n, sn)), Some((n6, sn6))) => Masq::new(kind, n, sn).with_ipv6(n6, sn6),
            (None, Some((n6, sn6))) => Masq::ipv6_only(kind, n6, sn6),
            (None, None) => return Ok(None),
        };
        let masq = masq
            .with_masquerade(cfg.ip_masq)
            .with_forward_rules(cfg.iptables_forward_rules)
            .with_metrics(metrics.clone());
        match masq.accept_forward_policy().await {
            Ok(true) => tracing::info!("FORWARD policy set to ACCEPT, as flanneld does"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not set the FORWARD policy to ACCEPT; the FLANNEL-FWD rules still accept overlay traffic")
            }
        }
        for repair in masq.ensure().await? {
            tracing::info!(rule = %repair, "firewall rule installed");
        }
        let cancel = shutdown.child_token();
        let (c, every) = (cancel.clone(), cfg.iptables_resync);
        tracker.spawn(async move { masq.run(every, c).await });
        Ok(Some(MasqTask { cancel }))
    }
}

impl<B: Backend, S: SubnetStore> Running<'_, B, S> {
    pub async fn start_masq(&mut self) -> Result<(), AgentError> {
        // Only the enabled families get rules: an IPv6-only network's 0.0.0.0/0 in IPv4 rules
        // would accept and exempt everything.
        if self.firewall {
            let (cfg, net, own) = (self.cfg, &self.net, &self.own);
            let task = MasqTask::start(cfg, net, own, &self.metrics, &self.tracker, &self.shutdown);
            self.masq = task.await?;
        }
        Ok(())
    }

    pub fn stop_masq(&mut self) {
        if let Some(old) = self.masq.take() {
            old.cancel.cancel();
        }
    }

    /// Turn a watch update into peer events and program them.
    pub async fn follow(&mut self, update: WatchUpdate) {
        let events = match update {
            WatchUpdate::Snapshot(listing) => {
                let leases = listing
                    .leases
                    .into_iter()
                    .filter(|l| self.fits(l))
                    .collect();
                self.peers.reset(leases)
            }
            WatchUpdate::Put(lease) if !self.fits(&lease) => Vec::new(),
            WatchUpdate::Put(lease) => self.peers.put(lease).into_iter().collect(),
            WatchUpdate::Delete(subnet) => self.peers.delete(subnet).into_iter().collect(),
        };
        self.apply(events).await;
    }

    /// Renew our lease, or get one again after losing it. `Ok(false)`: it vanished.
    pub async fn renew(&mut self, acquire: bool) -> Result<bool, AgentError> {
        let renewed = if acquire {
            self.reacquire().await?;
            true
        } else {
            let asked = std::time::Instant::now();
            let lease = self
                .store
                .renew(&self.own, &self.attrs, self.cfg.lease.ttl)
                .await;
            self.metrics.observe_etcd(asked.elapsed());
            lease?.map(|l| self.own = l).is_some()
        };
        if renewed {
            self.announce(false);
            self.metrics.lease_renewals.inc();
            tracing::debug!(subnet = %self.own.subnet, "lease renewed");
        }
        Ok(renewed)
    }

    /// [`Self::reconcile`], unless a watch update arrives first: then the pass is dropped
    /// and the update returned, so a new peer is programmed at once instead of after a pass
    /// over every peer (hundreds of ms at 5000). A dropped pass is safe to drop: it only
    /// compares the kernel with the peer set and fixes the difference, and the caller runs
    /// it again, on the updated set. `interruptible` false runs the pass to the end.
    pub async fn reconcile_or_update(
        &mut self,
        updates: &mut mpsc::Receiver<WatchUpdate>,
        interruptible: bool,
    ) -> Option<Option<WatchUpdate>> {
        if !interruptible {
            self.reconcile().await;
            return None;
        }
        let started = std::time::Instant::now();
        let mut polls = Polls::new();
        let (update, seen) = tokio::select! {
            biased;
            update = updates.recv() => (update, std::time::Instant::now()),
            () = polls.time(self.reconcile()) => return None,
        };
        // The pass is dropped by now. The update was not there when the pass's last poll
        // began (the select looks at it first), so `waited` bounds how long it waited for
        // the pass; with the apply's own line below, says where a new peer's time went.
        tracing::debug!(
            ran = ?started.elapsed(),
            waited = ?seen.saturating_duration_since(polls.last_start),
            dropped_in = ?seen.elapsed(),
            longest_poll = ?polls.longest,
            longest_poll_sched = ?polls.longest_sched,
            polls = polls.count,
            "reconcile pass dropped for a watch update"
        );
        Some(update)
    }

    /// Make the datapath equal the peer set. Every failed step is logged and counted; the
    /// next round tries it again.
    pub async fn reconcile(&mut self) {
        let started = std::time::Instant::now();
        let result = self.backend.reconcile(&self.peers.leases()).await;
        self.metrics.observe_reconcile(started.elapsed());
        tracing::debug!(took = ?started.elapsed(), "reconcile pass finished");
        let failures = match result {
            Ok(n) => {
                if n > 0 {
                    self.metrics.reconcile_repairs.add(n as u64);
                    tracing::info!(repairs = n, "reconcile repaired drift");
                }
                Vec::new()
            }
            Err(e) => {
                self.metrics.reconcile_errors.inc();
                let failures = e.failures();
                for f in &failures {
                    tracing::warn!(
                        failed = failures.len(),
                        "reconcile step failed, retried next round: {f}"
                    );
                }
                failures
                    .into_iter()
                    .map(|f| ReconcileFailure {
                        layer: f.layer().to_string(),
                        error: f.to_string(),
                    })
                    .collect()
            }
        };
        self.record_failures(failures);
    }

    /// Keeps `weft status`'s view of the last round: rewritten when it changes
    /// (and after the first round, replacing what an earlier agent left).
    fn record_failures(&mut self, failures: Vec<ReconcileFailure>) {
        if self.last_failures.as_ref() == Some(&failures) {
            return;
        }
        let pin_dir = &self.cfg.bpf_pin_dir;
        match crate::status::record_failures(pin_dir, &failures) {
            Ok(()) => self.last_failures = Some(failures),
            Err(e) => tracing::warn!(
                file = %crate::status::failures_file(pin_dir).display(),
                "recording the reconcile failures for weft status: {e}"
            ),
        }
    }

    /// Err when the store's network config (`json`, from the config watch) differs from the
    /// one running. A config that was deleted or cannot be parsed is only logged: the running
    /// one stays.
    pub fn config_unchanged(&self, json: Option<String>) -> Result<(), AgentError> {
        let key = self.store.config_key();
        let Some(json) = json else {
            tracing::warn!(key = %key, "the network config was deleted; running on with the one read at start");
            return Ok(());
        };
        match NetworkConfig::parse(&json) {
            Ok(net) if net == self.net => Ok(()),
            Ok(net) => Err(AgentError::ConfigChanged {
                key,
                what: format!(
                    "Network {} backend {} -> Network {} backend {}",
                    self.net.network,
                    self.net.backend.type_name(),
                    net.network,
                    net.backend.type_name()
                ),
            }),
            Err(e) => {
                tracing::warn!(key = %key, "the network config changed but is invalid ({e}); running on with the one read at start");
                Ok(())
            }
        }
    }

    pub async fn apply(&mut self, events: Vec<LeaseEvent>) {
        // A snapshot's thousands of new peers go to the backend together, so it can overlap
        // their requests: /readyz waits for all of them.
        let started = std::time::Instant::now();
        let results = match events.as_slice() {
            [one] => vec![self.backend.apply(one).await],
            many => self.backend.apply_all(many).await,
        };
        tracing::debug!(events = events.len(), took = ?started.elapsed(), "lease events applied");
        for (ev, result) in events.iter().zip(results) {
            if let Err(e) = result {
                tracing::warn!("applying {ev:?}: {e:#}; the next reconcile retries");
                continue;
            }
            match ev {
                LeaseEvent::Added(l) => {
                    self.metrics.peers_added.inc();
                    tracing::info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer added");
                }
                LeaseEvent::Changed { new, .. } => {
                    tracing::info!(subnet = %new.subnet, public_ip = %new.attrs.public_ip, "peer changed");
                }
                LeaseEvent::Removed(l) => {
                    self.metrics.peers_removed.inc();
                    tracing::info!(subnet = %l.subnet, public_ip = %l.attrs.public_ip, "peer removed");
                }
            }
        }
        self.metrics.set_leases(self.peers.len() + 1);
    }

    /// What `systemctl status` shows while running, e.g.
    /// "datapath ebpf on ens32, 2 peers, subnet 10.1.10.0/24".
    fn status_line(&self) -> String {
        let n = self.peers.len();
        format!(
            "datapath {} on {}, {n} peer{}, subnet {}",
            self.backend.mode(),
            self.iface.name,
            if n == 1 { "" } else { "s" },
            self.own.subnet
        )
    }

    /// READY=1 with the first status line; from then on, a new STATUS= when the line changes.
    pub fn announce(&mut self, ready: bool) {
        let line = self.status_line();
        if !ready && line == self.status {
            return;
        }
        let sent = if ready {
            self.notifier.ready(&line)
        } else {
            self.notifier.status(&line)
        };
        warn_notify(sent);
        self.status = line;
    }

    pub fn write_files(&self) -> Result<(), FilesError> {
        let env = SubnetEnv {
            network: self.net.network,
            subnet: self.own.subnet,
            ipv6: self.net.ipv6_network().zip(self.own.ipv6_subnet),
            mtu: super::overlay_mtu(&self.net, &self.iface),
            ipmasq: self.cfg.ip_masq,
        };
        files::write_atomic(&self.cfg.subnet_file, env.render().as_bytes())?;
        files::write_atomic(&self.cfg.docker_opts_file, env.docker_opts().as_bytes())
    }

    /// Our key is gone or someone else's: get a lease again, the same subnet when free.
    async fn reacquire(&mut self) -> Result<(), AgentError> {
        let old = self.own.key();
        // Overwritten while our etcd lease still runs: the subnet was ours, not free. Moving
        // would cut every container on docker0 off; take the key back instead.
        if self.store.ttl_left(self.own.etcd_lease).await?.is_some() {
            if let Some(lease) = self
                .store
                .reclaim(&self.own, &self.attrs, self.cfg.lease.ttl)
                .await?
            {
                tracing::warn!(subnet = %old, "another writer overwrote our lease while we held it; reclaimed it");
                self.own = lease;
                return Ok(());
            }
        }
        let lease = subnet::acquire(
            &self.store,
            &self.net,
            &self.attrs,
            self.cfg.lease.ttl,
            Some(old),
        )
        .await?;
        self.own = lease;
        if self.own.key() == old {
            tracing::info!(subnet = %old, "lease re-acquired; datapath untouched");
            return Ok(());
        }
        tracing::warn!(old = %old, new = %self.own.key(), "our subnet was taken; moved to a new one");
        self.backend
            .own_lease(&self.own)
            .await
            .map_err(AgentError::Backend)?;
        self.write_files()?;
        // ensure() for the new subnet replaces the old subnet's rules in place.
        self.stop_masq();
        self.start_masq().await?;
        let ev = self.peers.set_own(self.own.subnet);
        self.apply(ev.into_iter().collect()).await;
        // Whoever took our old subnet was skipped as "us" while we held it: re-list so it
        // becomes a peer now rather than at the next watch reconnect.
        self.follow(WatchUpdate::Snapshot(self.store.list_leases().await?))
            .await;
        Ok(())
    }

    /// Whether a peer lease is one of this network's subnets. Anything else (a /16 over
    /// everyone, a subnet outside Network) would route other hosts' traffic to its holder:
    /// skipped with a warning.
    /// A lease with an IPv4 and an IPv6 part fits when either family's part does (and the
    /// backends program only the families that fit).
    pub fn fits(&self, lease: &Lease) -> bool {
        let v4 = lease.ipv4_subnet().is_some_and(|s| {
            self.net.enable_ipv4
                && s.prefix_len() == self.net.subnet_len
                && self.net.network.contains(&s)
        });
        let v6 = match (self.net.ipv6, lease.ipv6_subnet) {
            (Some(c), Some(s)) => s.prefix_len() == c.subnet_len && c.network.contains(&s),
            _ => false,
        };
        let ok = v4 || v6;
        if !ok {
            tracing::warn!(
                subnet = %lease.key(),
                public_ip = %lease.attrs.public_ip,
                network = %self.net.network,
                subnet_len = self.net.subnet_len,
                "lease {} is not a /{} inside {} and would overlap other subnets; skipping it",
                lease.subnet,
                self.net.subnet_len,
                self.net.network
            );
        }
        ok
    }

    /// Whether a watch update says we lost our own key.
    pub fn lost_own(&self, update: &WatchUpdate) -> bool {
        let own = self.own.key();
        match update {
            WatchUpdate::Delete(s) => *s == own,
            WatchUpdate::Put(l) => l.key() == own && l.attrs != self.attrs,
            WatchUpdate::Snapshot(listing) => {
                !listing.taken.contains(&own)
                    || listing
                        .leases
                        .iter()
                        .any(|l| l.key() == own && l.attrs != self.attrs)
            }
        }
    }
}

/// A notification that does not reach systemd is logged, never fatal: the agent's job does not
/// depend on systemd listening.
pub(super) fn warn_notify(sent: Result<(), crate::notify::NotifyError>) {
    if let Err(e) = sent {
        tracing::warn!("sd_notify: {e}");
    }
}
