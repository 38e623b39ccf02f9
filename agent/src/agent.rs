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

pub use crate::backend::Datapath;
use crate::backend::{vxlan, Backend, BackendError, BackendOptions};
use crate::config::{Backend as NetBackend, ConfigError, NetworkConfig};
use crate::files::{self, FilesError};
use crate::iface::{self, IfaceChoice, IfaceError, IpStack};
use crate::lease::{BackendAttrs, LeaseAttrs, PeerSet, VxlanData};
use crate::metrics::Metrics;
use crate::netlink::{ExternalIface, Netlink};
use crate::notify::Notifier;
use crate::subnet::{self, alloc, EtcdOptions, EtcdStore, LeaseTiming, SubnetError, SubnetStore};

mod running;
#[cfg(test)]
mod tests;

use running::{warn_notify, Running};

/// Reconcile passes a watch update may cut short in a row (see `Running::reconcile_or_update`).
const MAX_INTERRUPTED_PASSES: u32 = 16;

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

impl AgentConfig {
    /// What the backend needs from the flags.
    pub fn backend_options(&self) -> BackendOptions {
        BackendOptions {
            datapath: self.datapath,
            bridge: self.bridge.clone(),
            bpf_pin_dir: self.bpf_pin_dir.clone(),
            decap_hook: self.decap_hook,
            udp_csum: self.ebpf_udp_csum,
        }
    }
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
    /// The running network config no longer matches the store's: [`run`] starts over with
    /// the new one (the lease and datapath stay in place and are adopted).
    #[error("the network config at {key} changed ({what})")]
    ConfigChanged { key: String, what: String },
}

/// What the run loop reports to the outside: readiness (for `/readyz`), systemd's
/// notifications and the metrics registry.
#[derive(Clone)]
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
pub fn overlay_mtu(net: &NetworkConfig, iface: &ExternalIface) -> u32 {
    match net.backend {
        NetBackend::Vxlan(v) => vxlan::overlay_mtu(v.mtu.unwrap_or(iface.mtu)),
        NetBackend::HostGw => iface.mtu,
    }
}

/// Wait for `<prefix>/config`, logging the key to write once a second.
async fn wait_for_config(
    store: &impl SubnetStore,
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

/// What our lease advertises, as flanneld's `newSubnetAttrs` builds it: PublicIP and
/// `BackendData` for IPv4 (PublicIP 0.0.0.0 and no `BackendData` on an IPv6-only host), PublicIPv6
/// and `BackendV6Data` for IPv6.
fn lease_attrs(
    net: &NetworkConfig,
    iface: &ExternalIface,
    backend: BackendAttrs,
    backend_v6: Option<VxlanData>,
) -> LeaseAttrs {
    let ipv6 = net.enable_ipv6.then_some(iface.public_ipv6).flatten();
    let backend = match backend {
        BackendAttrs::Vxlan { .. } if !net.enable_ipv4 => BackendAttrs::VxlanIpv6Only,
        b => b,
    };
    LeaseAttrs {
        public_ip: if net.enable_ipv4 {
            iface.public_ip
        } else {
            std::net::Ipv4Addr::UNSPECIFIED
        },
        public_ipv6: ipv6,
        backend,
        backend_v6: ipv6.and(backend_v6),
    }
}

/// The first lease, retrying while etcd is flaky; `None` when shut down first.
async fn first_lease(
    store: &impl SubnetStore,
    net: &NetworkConfig,
    attrs: &LeaseAttrs,
    cfg: &AgentConfig,
    prefer: Option<crate::lease::LeaseKey>,
    shutdown: &CancellationToken,
) -> Result<Option<crate::lease::Lease>, AgentError> {
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

/// Run the agent until `shutdown` fires: connect to etcd, read the network config, choose the
/// interface by the family it enables, then [`follow`]. `build` makes the backend once the
/// network config and interface are known.
///
/// A changed network config starts [`follow`] over in this process (same PID, so systemd's
/// notifications and watchdog carry on): the old backend is dropped, the new one adopts the
/// pinned datapath and `flannel.N` as a restarted agent would, the lease is kept when the new
/// config still holds it, and the files are rewritten.
pub async fn run<B, F>(
    cfg: AgentConfig,
    build: F,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), AgentError>
where
    B: Backend,
    F: AsyncFn(&BackendOptions, &NetworkConfig, &ExternalIface) -> Result<B, BackendError>,
{
    let endpoints = cfg.etcd.endpoints.join(",");
    warn_notify(
        hooks
            .notifier
            .status(&format!("waiting for etcd at {endpoints}")),
    );
    let Some(store) = connect(&cfg, &shutdown).await? else {
        return Ok(());
    };
    loop {
        // As flanneld, the interface is chosen once the config says which family it goes by:
        // an IPv6-only network needs an IPv6 address on it and no IPv4 one.
        let config_key = store.config_key();
        warn_notify(
            hooks
                .notifier
                .status(&format!("waiting for the network config at {config_key}")),
        );
        let Some(net) = wait_for_config(&store, &shutdown).await? else {
            return Ok(());
        };
        let host = Host {
            iface: external_iface(&cfg.iface, IpStack::of(net.enable_ipv4)).await?,
            firewall: true,
        };
        let following = follow(
            &cfg,
            store.clone(),
            host,
            &build,
            shutdown.clone(),
            hooks.clone(),
        );
        match following.await {
            Err(AgentError::ConfigChanged { key, what }) if !shutdown.is_cancelled() => {
                tracing::info!(key = %key, "the network config changed ({what}); starting over with it");
                hooks.ready.send_replace(false);
            }
            result => return result,
        }
    }
}

/// The external interface for a network of `stack`, chosen in our network namespace.
async fn external_iface(choice: &IfaceChoice, stack: IpStack) -> Result<ExternalIface, AgentError> {
    let nl = Netlink::connect().map_err(|source| IfaceError::List { source })?;
    let iface = iface::choose_for(&nl, choice, stack).await?;
    tracing::info!(iface = %iface.name, index = iface.index, addr = %iface.ipv4, public_ip = %iface.public_ip, addr6 = ?iface.ipv6, public_ipv6 = ?iface.public_ipv6, mtu = iface.mtu, "external interface");
    Ok(iface)
}

/// What the agent runs on besides the store.
#[derive(Debug, Clone)]
pub struct Host {
    pub iface: ExternalIface,
    /// Install the masquerade and forward rules (iptables or nftables). Off only where the
    /// loop is tested without root; the rules have their own tests.
    pub firewall: bool,
}

/// The agent's life on a connected store: network config, backend, lease, files and firewall,
/// then follow the peers, renew the lease and reconcile until `shutdown` fires. `hooks.ready`
/// turns true once the subnet file is written and the first peer snapshot is applied.
pub async fn follow<S, B, F>(
    cfg: &AgentConfig,
    store: S,
    host: Host,
    build: F,
    shutdown: CancellationToken,
    hooks: Hooks,
) -> Result<(), AgentError>
where
    S: SubnetStore,
    B: Backend,
    F: AsyncFnOnce(&BackendOptions, &NetworkConfig, &ExternalIface) -> Result<B, BackendError>,
{
    let Hooks {
        ready,
        metrics,
        notifier,
    } = hooks;
    // `run` has read the config already (and said so to systemd): this returns at once there.
    let Some(net) = wait_for_config(&store, &shutdown).await? else {
        return Ok(());
    };
    tracing::info!(network = %net.network, backend = net.backend.type_name(), "network config");

    let mut backend = build(&cfg.backend_options(), &net, &host.iface)
        .await
        .map_err(AgentError::Backend)?;
    tracing::info!(datapath = backend.mode(), "datapath chosen");
    metrics.set_datapath_mode(backend.mode());
    let backend_attrs = backend.prepare().await.map_err(AgentError::Backend)?;
    let backend_v6 = backend.prepare_v6().await.map_err(AgentError::Backend)?;
    let attrs = lease_attrs(&net, &host.iface, backend_attrs, backend_v6);
    let prefer = files::read_env(&cfg.subnet_file).ok().and_then(|env| {
        alloc::from_subnet_file(
            &net,
            env.get("FLANNEL_SUBNET").map(String::as_str),
            env.get("FLANNEL_IPV6_SUBNET").map(String::as_str),
        )
    });
    warn_notify(notifier.status(&format!("waiting for a subnet lease in {}", net.network)));
    let Some(own) = first_lease(&store, &net, &attrs, cfg, prefer, &shutdown).await? else {
        return Ok(());
    };
    backend.own_lease(&own).await.map_err(AgentError::Backend)?;

    let mut peers = PeerSet::new(attrs.backend.type_name());
    peers.set_own(own.key());
    let tracker = TaskTracker::new();
    let mut st = Running {
        cfg,
        net,
        iface: host.iface,
        store: store.clone(),
        backend,
        attrs,
        own,
        peers,
        metrics,
        masq: None,
        firewall: host.firewall,
        notifier,
        status: String::new(),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        last_failures: None,
    };
    st.write_files()?;
    // Always: forward rules are independent of --ip-masq, and without it weft keeps overlay
    // traffic's source when Docker masquerades (masq.rs).
    st.start_masq().await?;
    let watch_cancel = shutdown.child_token();
    let (tx, mut rx) = mpsc::channel(1024);
    {
        let (store, cancel) = (store.clone(), watch_cancel.clone());
        let metrics = st.metrics.clone();
        let on_reconnect = move || metrics.etcd_reconnects.inc();
        tracker.spawn(async move { store.watch_leases(tx, cancel, on_reconnect).await });
    }
    // The config is watched, not re-read: an idle agent's only etcd traffic is its renewals.
    let (config_tx, mut config_rx) = mpsc::channel(4);
    {
        let (store, cancel) = (store.clone(), watch_cancel.clone());
        let metrics = st.metrics.clone();
        let on_reconnect = move || metrics.etcd_reconnects.inc();
        tracker.spawn(async move { store.watch_config(config_tx, cancel, on_reconnect).await });
    }
    let mut config_watched = true;

    let mut next_renew = Instant::now() + cfg.lease.renew_after();
    let mut need_acquire = false;
    let mut reconcile = tokio::time::interval(cfg.reconcile_interval);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot_seen = false;
    // Reconcile passes dropped in a row for a watch update; past MAX_INTERRUPTED_PASSES the
    // next one runs to the end, so steady churn cannot starve repairs.
    let mut interrupted = 0;
    let result = loop {
        let update = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            update = rx.recv() => update,
            json = config_rx.recv(), if config_watched => {
                match json {
                    Some(json) => {
                        if let Err(e) = st.config_unchanged(json) {
                            break Err(e);
                        }
                    }
                    None => config_watched = false,
                }
                continue;
            }
            _ = tokio::time::sleep_until(next_renew) => {
                match st.renew(need_acquire).await {
                    Ok(true) => {
                        need_acquire = false;
                        next_renew = Instant::now() + cfg.lease.renew_after();
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
                continue;
            }
            // A container joined or left the bridge: reconcile now, not at the next tick.
            _ = st.backend.local_change(), if snapshot_seen => {
                reconcile.reset_immediately();
                continue;
            }
            _ = reconcile.tick(), if snapshot_seen => {
                let interruptible = interrupted < MAX_INTERRUPTED_PASSES;
                match st.reconcile_or_update(&mut rx, interruptible).await {
                    None => {
                        interrupted = 0;
                        continue;
                    }
                    Some(update) => {
                        // The dropped pass runs again once the update is applied.
                        interrupted += 1;
                        reconcile.reset_immediately();
                        update
                    }
                }
            }
        };
        let Some(update) = update else { break Ok(()) };
        if st.lost_own(&update) {
            tracing::warn!(subnet = %st.own.subnet, "our lease was deleted or taken over; re-acquiring");
            need_acquire = true;
            next_renew = Instant::now();
        }
        st.follow(update).await;
        let first = !snapshot_seen;
        if first {
            snapshot_seen = true;
            reconcile.reset_immediately();
            let _ = ready.send(true);
            tracing::info!(subnet = %st.own.subnet, peers = st.peers.len(), "ready");
        }
        st.announce(first);
    };
    match &result {
        Ok(()) => {
            tracing::info!(subnet = %st.own.subnet, "shutting down; lease and datapath left in place for the next start")
        }
        Err(e) => tracing::error!(subnet = %st.own.subnet, "{e}; lease and datapath left in place"),
    }
    st.stop_masq();
    watch_cancel.cancel();
    tracker.close();
    if tokio::time::timeout(cfg.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?cfg.shutdown_grace, "tasks did not stop within the grace period");
    }
    result
}
