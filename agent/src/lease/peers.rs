//! [`PeerSet`]: the peer leases a host follows, turned into [`LeaseEvent`]s.

use std::collections::BTreeMap;

use super::{Lease, LeaseEvent, LeaseKey};

/// The peer leases a host follows: applies snapshots and watch events and says what changed.
///
/// Our own subnet is never reported, and only leases of our backend type are kept (a vxlan
/// host cannot reach a host-gw or udp peer). Renewals that change nothing but the etcd lease
/// id produce no event.
#[derive(Debug, Clone)]
pub struct PeerSet {
    own: Option<LeaseKey>,
    backend_type: String,
    peers: BTreeMap<LeaseKey, Lease>,
}

impl PeerSet {
    /// `backend_type` is flannel's name of our backend (`vxlan`, `host-gw`).
    pub fn new(backend_type: &str) -> Self {
        PeerSet {
            own: None,
            backend_type: backend_type.to_string(),
            peers: BTreeMap::new(),
        }
    }

    /// Set our own subnet; a peer entry for it (seen before we knew) is reported removed.
    pub fn set_own(&mut self, own: impl Into<LeaseKey>) -> Option<LeaseEvent> {
        let own = own.into();
        self.own = Some(own);
        self.peers.remove(&own).map(LeaseEvent::Removed)
    }

    fn wanted(&self, lease: &Lease) -> bool {
        Some(lease.key()) != self.own && lease.attrs.backend.type_name() == self.backend_type
    }

    /// A lease was put (added, changed or renewed).
    pub fn put(&mut self, lease: Lease) -> Option<LeaseEvent> {
        if !self.wanted(&lease) {
            // A known peer that switched to another backend type is gone for us.
            return self
                .delete(lease.key())
                .filter(|_| Some(lease.key()) != self.own);
        }
        match self.peers.insert(lease.key(), lease.clone()) {
            None => Some(LeaseEvent::Added(lease)),
            Some(old) if old.attrs != lease.attrs => Some(LeaseEvent::Changed { old, new: lease }),
            Some(_) => None,
        }
    }

    /// A lease key was deleted (expired or removed).
    pub fn delete(&mut self, key: impl Into<LeaseKey>) -> Option<LeaseEvent> {
        self.peers.remove(&key.into()).map(LeaseEvent::Removed)
    }

    /// Replace the whole set with a fresh listing and return the difference as events.
    pub fn reset(&mut self, snapshot: Vec<Lease>) -> Vec<LeaseEvent> {
        let mut events = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for lease in snapshot {
            seen.insert(lease.key());
            events.extend(self.put(lease));
        }
        let gone: Vec<LeaseKey> = self
            .peers
            .keys()
            .filter(|s| !seen.contains(s))
            .copied()
            .collect();
        events.extend(gone.into_iter().filter_map(|s| self.delete(s)));
        events
    }

    /// The current peers, ordered by subnet.
    pub fn leases(&self) -> Vec<Lease> {
        self.peers.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}
