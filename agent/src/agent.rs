//! The agent's run loop: network config, interface, lease, files, then follow the peers.
//!
//! It owns no kernel state itself: everything goes through the [`Backend`] trait. On
//! shutdown the lease and the kernel state stay in place, so a restart keeps the subnet and
//! traffic keeps flowing meanwhile.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Backend, BackendError};
use crate::config::{Backend as NetBackend, ConfigError, NetworkConfig};
use crate::files::{self, FilesError, SubnetEnv};
use crate::iface::{self, ExtIface, IfaceChoice, IfaceError};
use crate::lease::{Lease, LeaseAttrs, LeaseEvent, PeerSet};
use crate::masq::{Masq, MasqKind};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::subnet::{self, alloc, EtcdOptions, EtcdStore, LeaseTiming, SubnetError, WatchUpdate};

/// VXLAN's overhead on an IPv4 underlay: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Which datapath to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Datapath {
    /// eBPF when the kernel supports it, else the kernel's vxlan device.
    Auto,
    Ebpf,
    Kernel,
}

/// Everything `weft agent` was told, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub etcd: EtcdOptions,
    pub iface: IfaceChoice,
    pub subnet_file: PathBuf,
    pub docker_opts_file: PathBuf,
    pub lease: LeaseTiming,
    pub ip_masq: bool,
    pub iptables_resync: Duration,
    pub iptables_forward_rules: bool,
    /// `None` when `--healthz-port` is 0 (flanneld's default: no health server).
    pub healthz: Option<SocketAddr>,
    pub datapath: Datapath,
    pub bridge: String,
    /// bpffs directory of this agent's programs, links and maps.
    pub bpf_pin_dir: PathBuf,
    /// Forced eBPF decapsulation hook; `None` picks by the interface's driver.
    pub decap_hook: Option<crate::datapath::DecapHook>,
    /// Outer UDP checksum on eBPF-encapsulated packets (flannel.N's `udpcsum`).
    pub ebpf_udp_csum: bool,
    pub reconcile_interval: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Iface(#[from] IfaceError),
    #[error(
        "the network config at {key} is invalid: {source}; fix it with `weft config set '<json>'`"
    )]
    Config {
        key: String,
        #[source]
        source: ConfigError,
    },
    #[error(transparent)]
    Subnet(#[from] SubnetError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("backend: {0:#}")]
    Backend(BackendError),
    #[error(transparent)]
    Masq(#[from] crate::masq::MasqError),
}

/// What the run loop reports to the outside: readiness (for `/readyz`), systemd's
/// notifications and the metrics registry.
pub struct Hooks {
    /// Turns true once the subnet file is written, the masquerade rules are in place and
    /// the first peer snapshot is programmed.
    pub ready: watch::Sender<bool>,
    pub metrics: Arc<Metrics>,
    /// Gets `STATUS=` for every step the start waits on, `READY=1` at the moment `ready` turns
    /// true, and a new `STATUS=` whenever the peers or our subnet change.
    pub notifier: Notifier,
}

/// The overlay MTU written to subnet.env. For vxlan, `Backend.MTU` stands in for the
/// interface's MTU and the encapsulation overhead comes off either (as the vxlan backend
/// sizes `flannel.<VNI>`).
pub fn overlay_mtu(net: &NetworkConfig, iface: &ExtIface) -> u32 {
    match net.backend {
        NetBackend::Vxlan(v) => v.mtu.unwrap_or(iface.mtu).saturating_sub(VXLAN_OVERHEAD),
        NetBackend::HostGw => iface.mtu,
    }
}

/// Wait for `<prefix>/config`, logging the key to write once a second.
async fn wait_for_config(
    store: &EtcdStore,
    shutdown: &CancellationToken,
) -> Result<Option<NetworkConfig>, AgentError> {
    let key = store.config_key();
    loop {
        match store.get_config().await {
            Ok(Some(json)) => {
                return NetworkConfig::parse(&json)
                    .map(Some)
                    .map_err(|source| AgentError::Config { key, source });
            }
            Ok(None) => tracing::warn!(
                key = %key,
                "network config not found; write it, e.g. weft config set '{{\"Network\": \"10.1.0.0/16\", \"Backend\": {{\"Type\": \"vxlan\"}}}}'"
            ),
            Err(e) => tracing::warn!("reading the network config: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Connect, retrying while etcd is unreachable; a certificate or credential refusal ends the
/// start at once, as retrying cannot fix it. `Ok(None)` when shut down first.
async fn connect(
    cfg: &AgentConfig,
    shutdown: &CancellationToken,
) -> Result<Option<EtcdStore>, AgentError> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match EtcdStore::connect(&cfg.etcd).await {
            Ok(s) => return Ok(Some(s)),
            Err(e @ (SubnetError::Tls { .. } | SubnetError::Auth { .. })) => return Err(e.into()),
            Err(e) => tracing::warn!(retry_in = ?backoff, "{e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The first lease, retrying while etcd is flaky; `None` when shut down first.
async fn first_lease(
    store: &EtcdStore,
    net: &NetworkConfig,
    attrs: &LeaseAttrs,
    cfg: &AgentConfig,
    prefer: Option<ipnet::Ipv4Net>,
    shutdown: &CancellationToken,
) -> Result<Option<Lease>, AgentError> {
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = subnet::acquire(store, net, attrs, cfg.lease.ttl, prefer) => r,
        };
        match result {
            Ok(lease) => return Ok(Some(lease)),
            Err(e @ SubnetError::Etcd { .. }) => {
                tracing::warn!(retry_in = "1s", "acquiring a lease: {e}")
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// State of a running agent that the loop's steps share.
struct Running<'a, B> {
    cfg: &'a AgentConfig,
    net: NetworkConfig,
    iface: ExtIface,
    store: EtcdStore,
    backend: B,
    attrs: LeaseAttrs,
    own: Lease,
    peers: PeerSet,
    metrics: Arc<Metrics>,
    masq: Option<MasqTask>,
    notifier: Notifier,
    /// The last `STATUS=` sent, so an unchanged line is not sent again.
    status: String,
}

/// The masquerade, forward and no-NAT rules for our subnet and the task that keeps them in place.
struct MasqTask {
    cancel: CancellationToken,
}

impl MasqTask {
    /// Install the rules for `subnet` now, then re-check them every `resync`.
    async fn start(
        cfg: &AgentConfig,
        net: &NetworkConfig,
        subnet: ipnet::Ipv4Net,
        metrics: &Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<MasqTask, AgentError> {
        let masq = Masq::new(
            MasqKind::from_enable_nftables(net.enable_nftables),
            net.network,
            subnet,
        )
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
        Ok(MasqTask { cancel })
    }
}

impl<B: Backend> Running<'_, B> {
    async fn apply(&mut self, events: Vec<LeaseEvent>) {
        for ev in events {
            if let Err(e) = self.backend.apply(&ev).await {
                tracing::warn!("applying {ev:?}: {e:#}; the next reconcile retries");
                continue;
            }
            match &ev {
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
    fn announce(&mut self, ready: bool) {
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

    fn write_files(&self) -> Result<(), FilesError> {
        let env = SubnetEnv {
            network: self.net.network,
            subnet: self.own.subnet,
            mtu: overlay_mtu(&self.net, &self.iface),
            ipmasq: self.cfg.ip_masq,
        };
        files::write_atomic(&self.cfg.subnet_file, env.render().as_bytes())?;
        files::write_atomic(&self.cfg.docker_opts_file, env.docker_opts().as_bytes())
    }

    /// Our key is gone or someone else's: get a lease again, the same subnet when free.
    async fn reacquire(
        &mut self,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<(), AgentError> {
        let old = self.own.subnet;
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
        if self.own.subnet == old {
            tracing::info!(subnet = %old, "lease re-acquired; datapath untouched");
            return Ok(());
        }
        tracing::warn!(old = %old, new = %self.own.subnet, "our subnet was taken; moved to a new one");
        self.backend
            .own_lease(&self.own)
            .await
            .map_err(AgentError::Backend)?;
        self.write_files()?;
        if let Some(old) = self.masq.take() {
            // ensure() for the new subnet replaces the old subnet's rules in place.
            old.cancel.cancel();
            self.masq = Some(
                MasqTask::start(
                    self.cfg,
                    &self.net,
                    self.own.subnet,
                    &self.metrics,
                    tracker,
                    shutdown,
                )
                .await?,
            );
        }
        let ev = self.peers.set_own(self.own.subnet);
        self.apply(ev.into_iter().collect()).await;
        Ok(())
    }

    /// Whether a peer lease is one of this network's subnets. Anything else (a /16 over
    /// everyone, a subnet outside Network) would route other hosts' traffic to its holder:
    /// skipped with a warning.
    fn fits(&self, lease: &Lease) -> bool {
        let ok = lease.subnet.prefix_len() == self.net.subnet_len
            && self.net.network.contains(&lease.subnet);
        if !ok {
            tracing::warn!(
                subnet = %lease.subnet,
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
    fn lost_own(&self, update: &WatchUpdate) -> bool {
        let own = self.own.subnet;
        match update {
            WatchUpdate::Delete(s) => *s == own,
            WatchUpdate::Put(l) => l.subnet == own && l.attrs != self.attrs,
            WatchUpdate::Snapshot(listing) => {
                !listing.taken.contains(&own)
                    || listing
                        .leases
                        .iter()
                        .any(|l| l.subnet == own && l.attrs != self.attrs)
            }
        }
    }
}

/// Run the agent until `shutdown` fires. `build` makes the backend once the network config
/// and interface are known; `hooks.ready` turns true once the subnet file is written and the
/// first peer snapshot is applied.
pub async fn run<B, F>(
    cfg: AgentConfig,
    build: F,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), AgentError>
where
    B: Backend,
    F: AsyncFnOnce(&AgentConfig, &NetworkConfig, &ExtIface) -> Result<B, BackendError>,
{
    let Hooks {
        ready,
        metrics,
        notifier,
    } = hooks;
    let iface = iface::choose(&cfg.iface)?;
    tracing::info!(iface = %iface.name, index = iface.index, addr = %iface.iface_addr, public_ip = %iface.public_ip, mtu = iface.mtu, "external interface");
    let endpoints = cfg.etcd.endpoints.join(",");
    warn_notify(notifier.status(&format!("waiting for etcd at {endpoints}")));
    let Some(store) = connect(&cfg, &shutdown).await? else {
        return Ok(());
    };
    let config_key = store.config_key();
    warn_notify(notifier.status(&format!("waiting for the network config at {config_key}")));
    let Some(net) = wait_for_config(&store, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(network = %net.network, backend = net.backend.type_name(), "network config");

    let mut backend = build(&cfg, &net, &iface)
        .await
        .map_err(AgentError::Backend)?;
    tracing::info!(datapath = backend.mode(), "datapath chosen");
    metrics.set_datapath_mode(backend.mode());
    let backend_attrs = backend.prepare().await.map_err(AgentError::Backend)?;
    let attrs = LeaseAttrs {
        public_ip: iface.public_ip,
        backend: backend_attrs,
    };
    let prefer = files::read_env(&cfg.subnet_file).ok().and_then(|env| {
        env.get("FLANNEL_SUBNET")
            .and_then(|s| alloc::from_subnet_file(&net, s))
    });
    warn_notify(notifier.status(&format!("waiting for a subnet lease in {}", net.network)));
    let Some(own) = first_lease(&store, &net, &attrs, &cfg, prefer, &shutdown).await? else {
        return Ok(());
    };
    backend.own_lease(&own).await.map_err(AgentError::Backend)?;

    let mut peers = PeerSet::new(attrs.backend.type_name());
    peers.set_own(own.subnet);
    let mut st = Running {
        cfg: &cfg,
        net,
        iface,
        store: store.clone(),
        backend,
        attrs,
        own,
        peers,
        metrics,
        masq: None,
        notifier,
        status: String::new(),
    };
    st.write_files()?;

    let tracker = TaskTracker::new();
    // Always: forward rules are independent of --ip-masq, and without it weft keeps overlay
    // traffic's source when Docker masquerades (masq.rs).
    st.masq = Some(
        MasqTask::start(
            &cfg,
            &st.net,
            st.own.subnet,
            &st.metrics,
            &tracker,
            &shutdown,
        )
        .await?,
    );
    let watch_cancel = shutdown.child_token();
    let (tx, mut rx) = mpsc::channel(1024);
    {
        let (store, cancel) = (store.clone(), watch_cancel.clone());
        let metrics = st.metrics.clone();
        let on_reconnect = move || metrics.etcd_reconnects.inc();
        tracker.spawn(async move { store.watch_leases(tx, cancel, on_reconnect).await });
    }

    let mut next_renew = Instant::now() + cfg.lease.renew_after();
    let mut need_acquire = false;
    let mut reconcile = tokio::time::interval(cfg.reconcile_interval);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_seen = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            update = rx.recv() => {
                let Some(update) = update else { break };
                if st.lost_own(&update) {
                    tracing::warn!(subnet = %st.own.subnet, "our lease was deleted or taken over; re-acquiring");
                    need_acquire = true;
                    next_renew = Instant::now();
                }
                let events = match update {
                    WatchUpdate::Snapshot(listing) => {
                        let leases = listing.leases.into_iter().filter(|l| st.fits(l)).collect();
                        st.peers.reset(leases)
                    }
                    WatchUpdate::Put(lease) if !st.fits(&lease) => Vec::new(),
                    WatchUpdate::Put(lease) => st.peers.put(lease).into_iter().collect(),
                    WatchUpdate::Delete(subnet) => st.peers.delete(subnet).into_iter().collect(),
                };
                st.apply(events).await;
                let first = !snapshot_seen;
                if first {
                    snapshot_seen = true;
                    reconcile.reset_immediately();
                    let _ = ready.send(true);
                    tracing::info!(subnet = %st.own.subnet, peers = st.peers.len(), "ready");
                }
                st.announce(first);
            }
            _ = tokio::time::sleep_until(next_renew) => {
                let result = if need_acquire {
                    st.reacquire(&tracker, &shutdown).await.map(|()| true)
                } else {
                    let asked = Instant::now();
                    let renewed = st.store.renew(&st.own, &st.attrs, cfg.lease.ttl).await;
                    st.metrics.observe_etcd(asked.elapsed());
                    renewed.map(|l| l.map(|l| st.own = l).is_some()).map_err(AgentError::from)
                };
                match result {
                    Ok(true) => {
                        need_acquire = false;
                        st.announce(false);
                        st.metrics.lease_renewals.inc();
                        next_renew = Instant::now() + cfg.lease.renew_after();
                        tracing::debug!(subnet = %st.own.subnet, "lease renewed");
                    }
                    Ok(false) => {
                        tracing::warn!(subnet = %st.own.subnet, "our lease vanished before renewal; re-acquiring");
                        need_acquire = true;
                        next_renew = Instant::now();
                    }
                    Err(e) => {
                        let retry = (cfg.lease.renew_after() / 2).min(Duration::from_secs(60));
                        tracing::warn!(retry_in = ?retry, "keeping our lease: {e}");
                        next_renew = Instant::now() + retry;
                    }
                }
            }
            // A container joined or left the bridge: reconcile now, not at the next tick.
            _ = st.backend.local_change(), if snapshot_seen => reconcile.reset_immediately(),
            _ = reconcile.tick(), if snapshot_seen => {
                let started = Instant::now();
                let result = st.backend.reconcile(&st.peers.leases()).await;
                st.metrics.observe_reconcile(started.elapsed());
                match result {
                    Ok(0) => {}
                    Ok(n) => {
                        st.metrics.reconcile_repairs.add(n as u64);
                        tracing::info!(repairs = n, "reconcile repaired drift");
                    }
                    Err(e) => {
                        st.metrics.reconcile_errors.inc();
                        tracing::warn!("reconcile: {e:#}");
                    }
                }
            }
        }
    }
    tracing::info!(subnet = %st.own.subnet, "shutting down; lease and datapath left in place for the next start");
    watch_cancel.cancel();
    tracker.close();
    if tokio::time::timeout(cfg.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?cfg.shutdown_grace, "tasks did not stop within the grace period");
    }
    Ok(())
}

/// A notification that does not reach systemd is logged, never fatal: the agent's job does not
/// depend on systemd listening.
fn warn_notify(sent: Result<(), crate::notify::NotifyError>) {
    if let Err(e) = sent {
        tracing::warn!("sd_notify: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_mtu_takes_the_encapsulation_off() {
        let iface = ExtIface {
            name: "eth0".into(),
            index: 2,
            iface_addr: [10, 0, 0, 1].into(),
            public_ip: [10, 0, 0, 1].into(),
            mtu: 9000,
        };
        let cfg = |b: &str| {
            NetworkConfig::parse(&format!(r#"{{"Network":"10.1.0.0/16","Backend":{b}}}"#)).unwrap()
        };
        assert_eq!(overlay_mtu(&cfg(r#"{"Type":"vxlan"}"#), &iface), 8950);
        assert_eq!(
            overlay_mtu(&cfg(r#"{"Type":"vxlan","MTU":1500}"#), &iface),
            1450
        );
        assert_eq!(overlay_mtu(&cfg(r#"{"Type":"host-gw"}"#), &iface), 9000);
    }
}
