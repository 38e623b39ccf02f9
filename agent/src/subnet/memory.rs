//! An in-memory [`SubnetStore`] with the etcd semantics the agent relies on: create only if
//! absent, renew only while the key holds our value, leases that expire after their TTL, and a
//! watch that starts with a snapshot and re-snapshots after a break. The operator's side
//! (config, peers' leases) and faults (failing calls, a broken watch) are methods, so the
//! agent loop is tested without etcd or root.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Listing, SubnetError, SubnetStore, WatchUpdate};
use crate::lease::{Lease, LeaseAttrs, LeaseKey};

const CONFIG_KEY: &str = "/memory/network/config";
/// How often a watch looks for expired leases (etcd expires them on its own clock).
const SWEEP: Duration = Duration::from_millis(100);

/// One lease key: its value (`None` when another writer stored something unparsable) and
/// the store lease it lives on.
#[derive(Debug, Clone)]
struct Entry {
    attrs: Option<LeaseAttrs>,
    lease_id: i64,
}

#[derive(Debug, Default)]
struct State {
    config: Option<String>,
    entries: BTreeMap<LeaseKey, Entry>,
    /// Store leases by id and when they expire; as in etcd they outlive the keys on them.
    leases: BTreeMap<i64, Instant>,
    revision: i64,
    next_id: i64,
    /// Calls left to fail, as an etcd outage would.
    failing: usize,
    /// Client calls made so far (what etcd would have received).
    calls: usize,
}

#[derive(Debug, Clone)]
enum Message {
    Update(WatchUpdate),
    /// The network config was written (`None`: deleted).
    Config(Option<String>),
    /// The connection broke: every watch reconnects and re-lists.
    Break,
}

/// A [`SubnetStore`] in memory; clones share the store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Message>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            events: broadcast::channel(4096).0,
        }
    }

    /// The state with expired leases removed (each reported to the watches).
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        st.leases.retain(|_, t| *t > now);
        let expired: Vec<LeaseKey> = st
            .entries
            .iter()
            .filter(|(_, e)| !st.leases.contains_key(&e.lease_id))
            .map(|(s, _)| *s)
            .collect();
        for subnet in expired {
            st.entries.remove(&subnet);
            st.revision += 1;
            let _ = self
                .events
                .send(Message::Update(WatchUpdate::Delete(subnet)));
        }
        st
    }

    /// The state for a client call: an error while an injected outage lasts.
    fn call(&self, op: &'static str, key: &str) -> Result<MutexGuard<'_, State>, SubnetError> {
        let mut st = self.lock();
        st.calls += 1;
        if st.failing > 0 {
            st.failing -= 1;
            return Err(SubnetError::Etcd {
                op,
                key: key.to_string(),
                reason: "injected outage (memory store)".into(),
            });
        }
        Ok(st)
    }

    /// A fresh store lease of `ttl`.
    fn grant(st: &mut State, ttl: Duration) -> i64 {
        st.next_id += 1;
        st.leases.insert(st.next_id, Instant::now() + ttl);
        st.next_id
    }

    fn put(&self, st: &mut State, subnet: LeaseKey, attrs: &LeaseAttrs, ttl: Duration) -> Lease {
        Self::grant(st, ttl);
        st.revision += 1;
        let entry = Entry {
            attrs: Some(attrs.clone()),
            lease_id: st.next_id,
        };
        st.entries.insert(subnet, entry);
        let lease = Lease::new(subnet, attrs.clone(), st.next_id);
        let _ = self
            .events
            .send(Message::Update(WatchUpdate::Put(lease.clone())));
        lease
    }

    fn listing(st: &State) -> Listing {
        Listing {
            leases: st
                .entries
                .iter()
                .filter_map(|(key, e)| Some(Lease::new(*key, e.attrs.clone()?, e.lease_id)))
                .collect(),
            taken: st.entries.keys().copied().collect(),
            revision: st.revision,
        }
    }

    /// The operator writes the network config (`weft config set`).
    pub fn set_config(&self, json: &str) {
        self.lock().config = Some(json.to_string());
        let _ = self.events.send(Message::Config(Some(json.to_string())));
    }

    /// The operator deletes the network config key.
    pub fn delete_config(&self) {
        self.lock().config = None;
        let _ = self.events.send(Message::Config(None));
    }

    /// Another host (or an operator) writes a lease, whoever held the key.
    pub fn put_lease(
        &self,
        subnet: impl Into<LeaseKey>,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Lease {
        let mut st = self.lock();
        self.put(&mut st, subnet.into(), attrs, ttl)
    }

    /// Another writer stores a value no lease parser accepts at `subnet`'s key.
    pub fn put_garbage(&self, subnet: impl Into<LeaseKey>, ttl: Duration) {
        let subnet = subnet.into();
        let mut st = self.lock();
        let lease_id = Self::grant(&mut st, ttl);
        st.revision += 1;
        let entry = Entry {
            attrs: None,
            lease_id,
        };
        st.entries.insert(subnet, entry);
    }

    /// An operator deletes a lease key (`etcdctl del`).
    pub fn delete(&self, subnet: impl Into<LeaseKey>) {
        let subnet = subnet.into();
        let mut st = self.lock();
        if st.entries.remove(&subnet).is_some() {
            st.revision += 1;
            let _ = self
                .events
                .send(Message::Update(WatchUpdate::Delete(subnet)));
        }
    }

    /// The store lease behind `subnet`'s key runs out now, as if renewals had stopped.
    pub fn expire(&self, subnet: impl Into<LeaseKey>) {
        let subnet = subnet.into();
        let mut st = self.lock();
        if let Some(id) = st.entries.get(&subnet).map(|e| e.lease_id) {
            st.leases.insert(id, Instant::now());
        }
        drop(st);
        drop(self.lock());
    }

    /// What `subnet`'s key holds: `Some(None)` for an unparsable value.
    pub fn lease(&self, subnet: impl Into<LeaseKey>) -> Option<Option<LeaseAttrs>> {
        self.lock()
            .entries
            .get(&subnet.into())
            .map(|e| e.attrs.clone())
    }

    /// Every parsable lease.
    pub fn leases(&self) -> Vec<Lease> {
        Self::listing(&self.lock()).leases
    }

    /// The next `calls` client calls fail, as during an etcd outage.
    pub fn fail_next(&self, calls: usize) {
        self.lock().failing = calls;
    }

    /// Client calls made so far, failed ones included.
    pub fn calls(&self) -> usize {
        self.lock().calls
    }

    /// Calls still to fail.
    pub fn failing(&self) -> usize {
        self.lock().failing
    }

    /// Break every watch's connection; each reconnects and re-lists.
    pub fn break_watches(&self) {
        let _ = self.events.send(Message::Break);
    }

    /// Put `attrs` at `current`'s key if `holds` approves of what it holds now.
    fn replace_if(
        &self,
        op: &'static str,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
        holds: impl Fn(Option<&LeaseAttrs>) -> bool,
    ) -> Result<Option<Lease>, SubnetError> {
        let key = current.key();
        let mut st = self.call(op, &key.to_string())?;
        match st.entries.get(&key) {
            Some(e) if holds(e.attrs.as_ref()) => {}
            _ => return Ok(None),
        }
        let lease = self.put(&mut st, key, attrs, ttl);
        // The replaced store lease is revoked, as the etcd store does.
        st.leases.remove(&current.etcd_lease);
        Ok(Some(lease))
    }
}

/// What one watch reads from the store and keeps of its events.
struct Feed<R, P, F> {
    /// The read's operation and key (what an injected failure names).
    op: &'static str,
    key: &'static str,
    /// The first item, and the one after every reconnect.
    read: R,
    pick: P,
    /// Logs a failed read; the watch retries after [`SWEEP`].
    failed: F,
    /// Whether to expire leases every [`SWEEP`] while no event comes (the
    /// lease watch: etcd expires them on its own clock).
    sweeps: bool,
}

impl MemoryStore {
    /// Sends `feed`'s read, then what it picks of each event, and reads again
    /// after a break, until `cancel` or until `tx` closes.
    async fn watch<T, R, P, F>(
        &self,
        feed: Feed<R, P, F>,
        tx: mpsc::Sender<T>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) where
        R: Fn(&State) -> T,
        P: Fn(Message) -> Option<T>,
        F: Fn(&SubnetError),
    {
        loop {
            // Subscribed under the lock that reads: no change falls between the two.
            let read = self
                .call(feed.op, feed.key)
                .map(|st| ((feed.read)(&st), self.events.subscribe()));
            let mut rx = match read {
                Ok((item, rx)) => {
                    if tx.send(item).await.is_err() {
                        return;
                    }
                    rx
                }
                Err(e) => {
                    (feed.failed)(&e);
                    on_reconnect();
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(SWEEP) => continue,
                    }
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = rx.recv() => m,
                    _ = tokio::time::sleep(SWEEP), if feed.sweeps => {
                        drop(self.lock());
                        continue;
                    }
                };
                match msg {
                    Ok(Message::Break) | Err(_) => {
                        on_reconnect();
                        break;
                    }
                    Ok(m) => {
                        if let Some(item) = (feed.pick)(m) {
                            if tx.send(item).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl SubnetStore for MemoryStore {
    fn config_key(&self) -> String {
        CONFIG_KEY.to_string()
    }

    async fn get_config(&self) -> Result<Option<String>, SubnetError> {
        Ok(self.call("get", CONFIG_KEY)?.config.clone())
    }

    async fn list_leases(&self) -> Result<Listing, SubnetError> {
        let st = self.call("list", "subnets")?;
        Ok(Self::listing(&st))
    }

    async fn ttl_left(&self, lease_id: i64) -> Result<Option<i64>, SubnetError> {
        let st = self.call("lease-ttl", &format!("lease {lease_id:x}"))?;
        let now = Instant::now();
        Ok(st
            .leases
            .get(&lease_id)
            .map(|t| t.saturating_duration_since(now).as_secs() as i64))
    }

    async fn create(
        &self,
        subnet: LeaseKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, SubnetError> {
        let mut st = self.call("create", &subnet.to_string())?;
        // As etcd's store: no two leases name one subnet, whatever their keys.
        if st
            .entries
            .keys()
            .any(|k| *k == subnet || k.shares_a_subnet(&subnet))
        {
            return Ok(None);
        }
        Ok(Some(self.put(&mut st, subnet, attrs, ttl)))
    }

    async fn renew(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, SubnetError> {
        self.replace_if("renew", current, attrs, ttl, |held| {
            held == Some(&current.attrs)
        })
    }

    async fn take_over(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
        accept: impl Fn(Option<&LeaseAttrs>) -> bool + Send,
    ) -> Result<Option<Lease>, SubnetError> {
        self.replace_if("take-over", current, attrs, ttl, accept)
    }

    async fn watch_leases(
        &self,
        tx: mpsc::Sender<WatchUpdate>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) {
        let feed = Feed {
            op: "list",
            key: "subnets",
            read: |st: &State| WatchUpdate::Snapshot(Self::listing(st)),
            pick: |m| match m {
                Message::Update(u) => Some(u),
                _ => None,
            },
            failed: |e: &SubnetError| tracing::warn!("listing leases: {e}"),
            sweeps: true,
        };
        self.watch(feed, tx, cancel, on_reconnect).await
    }

    async fn watch_config(
        &self,
        tx: mpsc::Sender<Option<String>>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) {
        let feed = Feed {
            op: "get",
            key: CONFIG_KEY,
            read: |st: &State| st.config.clone(),
            pick: |m| match m {
                Message::Config(json) => Some(json),
                _ => None,
            },
            failed: |e: &SubnetError| tracing::debug!("re-reading the network config: {e}"),
            sweeps: false,
        };
        self.watch(feed, tx, cancel, on_reconnect).await
    }
}
