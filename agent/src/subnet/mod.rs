//! Subnet leases: the [`SubnetStore`] interface with the etcd store and an in-memory one, the
//! pure allocator, and the acquire/renew policy.
//!
//! Policy (flannel's, with weft's fixes): reuse a lease holding our PublicIP, else the subnet
//! of the old subnet file, else a random one among the first 100 free; a lost
//! create-if-absent race picks another subnet instead of exiting.

pub mod alloc;
pub mod etcd;
pub mod memory;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use etcd::{EtcdOptions, EtcdStore};
pub use memory::MemoryStore;

use crate::config::{ConfigError, NetworkConfig};
use crate::lease::{Lease, LeaseAttrs, LeaseKey};

/// How many create-if-absent races we accept losing in a row before giving up.
const MAX_RACES: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error(
        "etcd at {endpoints} is unreachable: {reason}; check --etcd-endpoints and that etcd runs"
    )]
    Unavailable { endpoints: String, reason: String },
    #[error("etcd {op} on {key} failed: {reason}")]
    Etcd {
        op: &'static str,
        key: String,
        reason: String,
    },
    /// The TLS handshake failed: a certificate problem, not an outage; retrying does not help.
    #[error("etcd at {endpoints} refused the TLS connection: {reason}; {fix}")]
    Tls {
        endpoints: String,
        reason: String,
        fix: String,
    },
    /// etcd closed the connection right after the TLS handshake: a rejected client
    /// certificate when it repeats, a transient reset when it does not. Retried.
    #[error("etcd at {endpoints} closed the TLS connection right after the handshake; retrying")]
    ClosedAfterHandshake { endpoints: String },
    /// etcd answered but refused our credentials (or wanted some); retrying does not help.
    #[error("etcd at {endpoints} refused access: {reason}; {fix}")]
    Auth {
        endpoints: String,
        reason: String,
        fix: String,
    },
    #[error("read {what} {path}: {source}; check --etcd-{what}")]
    TlsFile {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the network config at {key} is invalid: {source}")]
    BadConfig {
        key: String,
        #[source]
        source: ConfigError,
    },
    #[error("out of subnets: every /{len} between {min} and {max} in {network} is leased; enlarge Network or SubnetMax, or remove stale leases")]
    OutOfSubnets {
        network: Ipv4Net,
        len: u8,
        min: std::net::Ipv4Addr,
        max: std::net::Ipv4Addr,
    },
    #[error("out of IPv6 subnets: every /{len} between {min} and {max} in {network} is leased; enlarge IPv6Network or IPv6SubnetMax, or remove stale leases")]
    OutOfIpv6Subnets {
        network: Ipv6Net,
        len: u8,
        min: std::net::Ipv6Addr,
        max: std::net::Ipv6Addr,
    },
    #[error("lost the race for a free subnet {races} times in a row; too many hosts starting at once for the free space")]
    TooManyRaces { races: usize },
}

/// Every lease key under `<prefix>/subnets` at one revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Leases whose key and value parse.
    pub leases: Vec<Lease>,
    /// Every key, parsable value or not: none of its subnets may be handed out.
    pub taken: BTreeSet<LeaseKey>,
    pub revision: i64,
}

/// What the lease watch reports.
#[derive(Debug, Clone)]
pub enum WatchUpdate {
    /// A full listing (at start, after a reconnect that lost history, or after compaction).
    Snapshot(Listing),
    Put(Lease),
    Delete(LeaseKey),
}

/// Where the network config and the leases live (flannel's subnet manager interface): the
/// agent loop speaks only this, so it runs the same on etcd and on [`MemoryStore`].
///
/// A lease is a subnet key holding [`LeaseAttrs`] on a store lease (`Lease::etcd_lease`)
/// that expires after its TTL unless renewed.
pub trait SubnetStore: Clone + Send + Sync + 'static {
    /// Where the network config lives, for messages (`/coreos.com/network/config`).
    fn config_key(&self) -> String;
    /// The raw network config JSON; `None` when absent.
    fn get_config(&self) -> impl Future<Output = Result<Option<String>, SubnetError>> + Send;
    /// Every lease at one revision.
    fn list_leases(&self) -> impl Future<Output = Result<Listing, SubnetError>> + Send;
    /// Seconds left on a store lease; `None` when it has expired or the id is 0.
    fn ttl_left(
        &self,
        lease_id: i64,
    ) -> impl Future<Output = Result<Option<i64>, SubnetError>> + Send;
    /// Create `key` if no lease names either of its subnets; `None` when another host won one.
    fn create(
        &self,
        key: LeaseKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Lease>, SubnetError>> + Send;
    /// Re-put `current` with `attrs` on a fresh store lease if the key still holds
    /// `current`'s attributes; `None` when it is gone or someone else's.
    fn renew(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Lease>, SubnetError>> + Send;
    /// Re-put `current`'s key with `attrs` if `accept` approves of what it holds now (`None`
    /// when unparsable) and nobody writes it in between; `None` otherwise, and `None` (the key
    /// deleted) when a key older than it names one of its subnets: another writer may have
    /// deleted and re-created it while a key took one of its subnets.
    fn take_over(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
        accept: impl Fn(Option<&LeaseAttrs>) -> bool + Send,
    ) -> impl Future<Output = Result<Option<Lease>, SubnetError>> + Send;
    /// Take our subnet's key back from a writer that overwrote it with another PublicIP (or
    /// garbage) while our store lease was alive.
    fn reclaim(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Lease>, SubnetError>> + Send {
        let ours = attrs.clone();
        self.take_over(current, attrs, ttl, move |held| {
            held.is_none_or(|h| !ours.same_host(h))
        })
    }
    /// Send a snapshot, then every change; after a break, reconnect (calling `on_reconnect`)
    /// and resume or re-snapshot. Ends when `cancel` fires or the receiver is dropped.
    fn watch_leases(
        &self,
        tx: mpsc::Sender<WatchUpdate>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) -> impl Future<Output = ()> + Send;
    /// Send the raw network config JSON (`None` when absent) now, then again on every change
    /// to it; after a break, reconnect (calling `on_reconnect`) and resume. Ends when
    /// `cancel` fires or the receiver is dropped. A watch, not a poll: an idle agent sends
    /// etcd nothing but its lease renewals.
    fn watch_config(
        &self,
        tx: mpsc::Sender<Option<String>>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) -> impl Future<Output = ()> + Send;
}

/// Lease timing: the TTL granted and how long before expiry to renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub renew_margin: Duration,
}

impl LeaseTiming {
    /// When to renew a lease granted now: `margin` before expiry, but for TTLs near or below
    /// the margin (tests, small clusters) at a third of the TTL so two renewals can fail first.
    pub fn renew_after(&self) -> Duration {
        if self.ttl > self.renew_margin * 2 {
            self.ttl - self.renew_margin
        } else {
            (self.ttl / 3).max(Duration::from_millis(500))
        }
    }
}

/// Get a lease for `attrs`: reuse ours (by PublicIP), else `prefer` (the old subnet file, or
/// the subnet we just lost), else a random free one.
pub async fn acquire(
    store: &impl SubnetStore,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    ttl: Duration,
    prefer: Option<LeaseKey>,
) -> Result<Lease, SubnetError> {
    let mut lost: BTreeSet<LeaseKey> = BTreeSet::new();
    for _ in 0..MAX_RACES {
        let listing = store.list_leases().await?;
        if let Some(own) = listing
            .leases
            .iter()
            .find(|l| attrs.same_host(&l.attrs) && alloc::fits(cfg, l.key()))
        {
            // Compared by revision, not by value: a lease flanneld (or an older weft) wrote
            // in another spelling (no VNI, other field case) is still ours to re-put.
            let ours = |held: Option<&LeaseAttrs>| held.is_some_and(|h| attrs.same_host(h));
            if let Some(lease) = store.take_over(own, attrs, ttl, ours).await? {
                tracing::info!(subnet = %lease.key(), "reusing the lease that holds our public IP");
                return Ok(lease);
            }
            continue;
        }
        let taken = listing.taken.iter().chain(&lost);
        let taken_v4: BTreeSet<Ipv4Net> = taken.clone().filter_map(|k| k.ipv4()).collect();
        let taken_v6: BTreeSet<Ipv6Net> = taken.filter_map(|k| k.v6).collect();
        let free = |k: &LeaseKey| {
            k.ipv4().is_none_or(|n| !taken_v4.contains(&n))
                && k.v6.is_none_or(|n| !taken_v6.contains(&n))
        };
        let candidate = match prefer.filter(|p| alloc::fits(cfg, *p) && free(p)) {
            Some(p) => p,
            None => alloc::choose_key(cfg, &taken_v4, &taken_v6).map_err(|family| {
                match (family, cfg.ipv6) {
                    (alloc::Family::V6, Some(v6)) => SubnetError::OutOfIpv6Subnets {
                        network: v6.network,
                        len: v6.subnet_len,
                        min: v6.subnet_min,
                        max: v6.subnet_max,
                    },
                    _ => SubnetError::OutOfSubnets {
                        network: cfg.network,
                        len: cfg.subnet_len,
                        min: cfg.subnet_min,
                        max: cfg.subnet_max,
                    },
                }
            })?,
        };
        match store.create(candidate, attrs, ttl).await? {
            Some(lease) => {
                tracing::info!(subnet = %lease.key(), public_ip = %attrs.public_ip, "acquired subnet lease");
                return Ok(lease);
            }
            None => {
                tracing::info!(subnet = %candidate, "another host took this subnet first; trying another");
                lost.insert(candidate);
            }
        }
    }
    Err(SubnetError::TooManyRaces { races: MAX_RACES })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renew_timing() {
        let day = LeaseTiming {
            ttl: Duration::from_secs(86400),
            renew_margin: Duration::from_secs(3600),
        };
        assert_eq!(day.renew_after(), Duration::from_secs(82800));
        let short = LeaseTiming {
            ttl: Duration::from_secs(6),
            renew_margin: Duration::from_secs(60),
        };
        assert_eq!(short.renew_after(), Duration::from_secs(2));
    }
}
