//! The etcd v3 store: the only module that touches etcd-client.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Event, EventType, GetOptions,
    Identity, PutOptions, TlsOptions, Txn, TxnOp,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Listing, SubnetError, SubnetStore, WatchUpdate};

mod config_watch;
mod diagnose;
mod follow;

use crate::lease::{parse_lease_key, Lease, LeaseAttrs, LeaseKey};
use diagnose::{client_cert_fix, diagnose, never_sent};
use follow::Follow;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bare closes after the TLS handshake in a row that make a client-certificate rejection.
const CLOSES_MEAN_REJECTED: u32 = 3;
/// Sends of one request that never reached a member. The client balances over every endpoint
/// it was given, at random and regardless of health: with one member of three gone, one pick
/// in three lands on it, so five picks in a row only in 1 of 243 requests.
const UNSENT_ATTEMPTS: u32 = 5;
const UNSENT_PAUSE: Duration = Duration::from_millis(20);

/// How to reach etcd (flanneld's `--etcd-*` flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: String,
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, SubnetError> {
    std::fs::read(path).map_err(|source| SubnetError::TlsFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl EtcdStore {
    /// Connect and make one read, so an unreachable etcd is reported here. etcd closing the
    /// connection right after the TLS handshake is how TLS 1.3 shows a rejected client
    /// certificate, but a transient reset looks the same: tried again a few times, it is
    /// reported as a rejection (fatal) only when every attempt ends so.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, SubnetError> {
        let mut attempt = 1;
        loop {
            match Self::connect_once(opts).await {
                Err(SubnetError::ClosedAfterHandshake { endpoints }) => {
                    if attempt == CLOSES_MEAN_REJECTED {
                        return Err(SubnetError::Tls {
                            endpoints,
                            reason: format!("etcd closed the connection right after the handshake {attempt} times in a row: it did not accept our client certificate"),
                            fix: client_cert_fix(opts),
                        });
                    }
                    tracing::warn!(
                        attempt,
                        "etcd closed the TLS connection after the handshake; trying again"
                    );
                    attempt += 1;
                    tokio::time::sleep(BACKOFF_MIN).await;
                }
                other => return other,
            }
        }
    }

    async fn connect_once(opts: &EtcdOptions) -> Result<Self, SubnetError> {
        let endpoints = opts.endpoints.join(",");
        let unavailable = |reason: String| SubnetError::Unavailable {
            endpoints: endpoints.clone(),
            reason,
        };
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&opts.username, &opts.password) {
            // etcd's simple tokens expire after --auth-token-ttl (5 min) without use; a renewal
            // an hour later would otherwise fail with "invalid auth token".
            co = co
                .with_user(u.clone(), p.clone())
                .with_auto_token_refresh(true);
        }
        if opts.cafile.is_some() || opts.certfile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read("cafile", ca)?));
            }
            if let (Some(cert), Some(key)) = (&opts.certfile, &opts.keyfile) {
                tls = tls.identity(Identity::from_pem(
                    read("certfile", cert)?,
                    read("keyfile", key)?,
                ));
            }
            co = co.with_tls(tls);
        }
        let refused = |e: etcd_client::Error| {
            tracing::debug!("etcd connect error: {e:?}");
            diagnose(opts, &e).unwrap_or_else(|| unavailable(e.to_string()))
        };
        let client = tokio::time::timeout(CALL_TIMEOUT, Client::connect(&opts.endpoints, Some(co)))
            .await
            .map_err(|_| unavailable("connect timed out".into()))?
            .map_err(refused)?;
        let store = EtcdStore {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_string(),
            endpoints: endpoints.clone(),
        };
        // One real request: TLS handshakes and permissions are only checked here.
        let key = store.config_key();
        tokio::time::timeout(CALL_TIMEOUT, store.client.clone().get(key, None))
            .await
            .map_err(|_| unavailable("no answer within 10s".into()))?
            .map_err(refused)?;
        Ok(store)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// The etcd key of a lease: `<prefix>/subnets/10.1.10.0-24` (`&fd00:10:1::-64` with IPv6).
    pub fn lease_key(&self, key: impl Into<LeaseKey>) -> String {
        format!("{}{}", self.subnets_prefix(), key.into().etcd_name())
    }

    fn err(&self, op: &'static str, key: &str, e: impl ToString) -> SubnetError {
        let reason = e.to_string();
        SubnetError::Etcd {
            op,
            key: key.to_string(),
            reason: format!("{reason} (etcd {})", self.endpoints),
        }
    }

    /// One request, `send` building it: resent while it never reached a member (see
    /// [`never_sent`]), all attempts within [`CALL_TIMEOUT`].
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut send: F,
    ) -> Result<T, SubnetError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        let mut attempt = 1;
        loop {
            match tokio::time::timeout_at(deadline, send(self.client.clone())).await {
                Err(_) => return Err(self.err(op, key, "timed out")),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if attempt < UNSENT_ATTEMPTS && never_sent(&e) => {
                    tracing::debug!(op, attempt, "etcd request never sent; resending: {e}");
                    attempt += 1;
                    tokio::time::sleep(UNSENT_PAUSE).await;
                }
                Ok(Err(e)) => return Err(self.err(op, key, e)),
            }
        }
    }

    /// Store the network config. Callers validate first.
    pub async fn put_config(&self, json: &str) -> Result<(), SubnetError> {
        let key = self.config_key();
        self.call("put", &key, |mut c| {
            let key = key.clone();
            async move { c.put(key, json, None).await }
        })
        .await
        .map(|_| ())
    }

    async fn grant(&self, key: &str, ttl: Duration) -> Result<i64, SubnetError> {
        let secs = ttl.as_secs().max(1) as i64;
        Ok(self
            .call("lease-grant", key, |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?
            .id())
    }

    async fn revoke(&self, id: i64) {
        // Best effort: an unrevoked lease only expires later with nothing attached.
        let _ = self
            .call("lease-revoke", "", |mut c| async move {
                c.lease_revoke(id).await
            })
            .await;
    }

    /// Put `attrs` at `subnet`'s key on a fresh etcd lease if `compare` holds; the new etcd
    /// lease id, or `None` (and the lease revoked) when it did not.
    async fn put_if(
        &self,
        op: &'static str,
        subnet: LeaseKey,
        compare: Compare,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<i64>, SubnetError> {
        let key = self.lease_key(subnet);
        let id = self.grant(&key, ttl).await?;
        let put = TxnOp::put(
            key.as_str(),
            attrs.to_json(),
            Some(PutOptions::new().with_lease(id)),
        );
        let txn = Txn::new().when([compare]).and_then([put]);
        if self
            .call(op, &key, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?
            .succeeded()
        {
            return Ok(Some(id));
        }
        self.revoke(id).await;
        Ok(None)
    }

    /// Every key and value under the subnets prefix.
    async fn get_subnets(&self) -> Result<etcd_client::GetResponse, SubnetError> {
        let prefix = self.subnets_prefix();
        self.call("list", &prefix, |mut c| {
            let prefix = prefix.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await
    }

    /// Whether a key that etcd created before `key` (just put) names one of its subnets
    /// (see [`SubnetStore::create`]). `true` too when `key` is gone already.
    async fn an_older_key_shares_a_subnet(&self, key: LeaseKey) -> Result<bool, SubnetError> {
        let resp = self.get_subnets().await?;
        let ours = self.lease_key(key);
        let Some(ours) = resp.kvs().iter().find(|kv| kv.key() == ours.as_bytes()) else {
            return Ok(true);
        };
        Ok(resp.kvs().iter().any(|kv| {
            kv.create_revision() < ours.create_revision()
                && parse_lease_key(&String::from_utf8_lossy(kv.key()))
                    .is_ok_and(|k| k.shares_a_subnet(&key))
        }))
    }

    /// Whether `key`, just put on etcd lease `id`, may stay: when a key etcd created before it
    /// names one of its subnets, `false`, and `id` revoked, which deletes `key` with it.
    async fn stands(&self, key: LeaseKey, id: i64) -> Result<bool, SubnetError> {
        if self.an_older_key_shares_a_subnet(key).await? {
            self.revoke(id).await;
            return Ok(false);
        }
        Ok(true)
    }

    /// Put `current`'s key with `attrs` on a fresh etcd lease when `compare` holds, then
    /// revoke the etcd lease it replaced. `None` when the compare failed.
    async fn replace_if(
        &self,
        what: &'static str,
        current: &Lease,
        compare: Compare,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, SubnetError> {
        let Some(id) = self
            .put_if(what, current.key(), compare, attrs, ttl)
            .await?
        else {
            return Ok(None);
        };
        if current.etcd_lease != 0 && current.etcd_lease != id {
            self.revoke(current.etcd_lease).await;
        }
        Ok(Some(Lease::new(current.key(), attrs.clone(), id)))
    }
}

impl SubnetStore for EtcdStore {
    fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// The raw network config JSON, `None` when the key is absent.
    async fn get_config(&self) -> Result<Option<String>, SubnetError> {
        let key = self.config_key();
        let resp = self
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// List every lease key; unparsable ones are skipped with a warning naming the key.
    async fn list_leases(&self) -> Result<Listing, SubnetError> {
        let resp = self.get_subnets().await?;
        let mut listing = Listing {
            revision: resp.header().map_or(0, |h| h.revision()),
            ..Listing::default()
        };
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if let Ok(k) = parse_lease_key(&key) {
                listing.taken.insert(k);
            }
            match Lease::from_kv(&key, kv.value(), kv.lease()) {
                Ok(lease) => listing.leases.push(lease),
                Err(e) => tracing::warn!(key = %key, "{e}"),
            }
        }
        Ok(listing)
    }

    /// Seconds left on an etcd lease; `None` when it has expired or the key has none.
    async fn ttl_left(&self, etcd_lease: i64) -> Result<Option<i64>, SubnetError> {
        if etcd_lease == 0 {
            return Ok(None);
        }
        let key = format!("lease {etcd_lease:x}");
        let resp = self
            .call("lease-ttl", &key, |mut c| async move {
                c.lease_time_to_live(etcd_lease, None).await
            })
            .await?;
        Ok(Some(resp.ttl()).filter(|t| *t >= 0))
    }

    /// Create `key` if nobody holds either of its subnets. `None` means another host won one.
    ///
    /// flannel's transaction (`version == 0` on the key) guards a whole key, but a key with an
    /// IPv6 part names two subnets: alone it would let two hosts starting at once create
    /// `A&X` and `A&Y`, or `A&X` and `B&X`. The IPv4 subnet is guarded in the same transaction,
    /// over every key that starts with it (`A` and `A&...`); the IPv6 subnet, which ends keys,
    /// is checked right after: a key sharing it that etcd created before ours wins, on every
    /// host alike, and ours goes with its etcd lease.
    async fn create(
        &self,
        key: LeaseKey,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, SubnetError> {
        let compare = match key.ipv4() {
            Some(v4) => {
                let first = self.lease_key(v4);
                // '\'' follows '&' (and nothing a flannel key holds after its IPv4 part).
                let end = format!("{first}'");
                Compare::version(first, CompareOp::Equal, 0).with_range(end)
            }
            None => Compare::version(self.lease_key(key), CompareOp::Equal, 0),
        };
        let Some(id) = self.put_if("create", key, compare, attrs, ttl).await? else {
            return Ok(None);
        };
        if key.v6.is_some() && !self.stands(key, id).await? {
            return Ok(None);
        }
        Ok(Some(Lease::new(key, attrs.clone(), id)))
    }

    /// Re-put `current` with `attrs` on a fresh etcd lease, only if the key still holds
    /// `current`'s value. `None` means the key is gone or someone else's now.
    async fn renew(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>, SubnetError> {
        let compare = Compare::value(
            self.lease_key(current.key()),
            CompareOp::Equal,
            current.attrs.to_json(),
        );
        self.replace_if("renew", current, compare, attrs, ttl).await
    }

    /// Re-put `current`'s key with `attrs` on a fresh etcd lease if `accept` approves of what
    /// the key holds now (its attrs, `None` when unparsable) and nobody writes it in between
    /// (compared by mod revision, so a value in any writer's spelling is taken as it is). `None`
    /// when the key is gone, `accept` refused, or it changed meanwhile. `current`'s etcd lease is
    /// revoked once replaced.
    ///
    /// `None` too, and the key deleted with its fresh etcd lease, when a key etcd created before
    /// it names one of its subnets, as in [`SubnetStore::create`]. The compare guards this key
    /// alone, and it need not be the key `create` checked: another writer may have deleted and
    /// re-created it, and a key that took one of its subnets while it was absent (`B&X` beside
    /// `A&X`, `A&Y` beside `A`) is the older one now.
    async fn take_over(
        &self,
        current: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
        accept: impl Fn(Option<&LeaseAttrs>) -> bool,
    ) -> Result<Option<Lease>, SubnetError> {
        let key = self.lease_key(current.key());
        let resp = self
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        if !accept(LeaseAttrs::from_json(&key, kv.value()).ok().as_ref()) {
            return Ok(None);
        }
        let compare = Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision());
        let Some(lease) = self
            .replace_if("take-over", current, compare, attrs, ttl)
            .await?
        else {
            return Ok(None);
        };
        Ok(self
            .stands(lease.key(), lease.etcd_lease)
            .await?
            .then_some(lease))
    }

    /// Follow `<prefix>/subnets`: a snapshot, then watch events from the snapshot's revision;
    /// [`EtcdStore::follow`] keeps the watch up (a compacted revision means re-list).
    async fn watch_leases(
        &self,
        tx: mpsc::Sender<WatchUpdate>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) {
        let prefix = self.subnets_prefix();
        let w = Follow {
            what: "lease watch",
            again: "re-listing",
            key: &prefix,
            prefix: true,
        };
        let list = || async move {
            let listing = self.list_leases().await?;
            let rev = listing.revision;
            Ok::<_, SubnetError>((WatchUpdate::Snapshot(listing), rev))
        };
        self.follow(w, tx, cancel, on_reconnect, list, lease_update)
            .await
    }

    async fn watch_config(
        &self,
        tx: mpsc::Sender<Option<String>>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) {
        EtcdStore::watch_config(self, tx, cancel, on_reconnect).await
    }
}

/// What a lease watch event means: a lease put or deleted; `None` (logged) for a key or value
/// that is not a lease.
fn lease_update(ev: &Event) -> Option<WatchUpdate> {
    let kv = ev.kv()?;
    let key = String::from_utf8_lossy(kv.key());
    let update = match ev.event_type() {
        EventType::Delete => parse_lease_key(&key).map(WatchUpdate::Delete),
        EventType::Put => Lease::from_kv(&key, kv.value(), kv.lease()).map(WatchUpdate::Put),
    };
    update
        .inspect_err(|e| tracing::warn!(key = %key, "{e}"))
        .ok()
}

/// Sleep the current backoff and double it; true when cancelled meanwhile.
async fn sleep_or_cancel(cancel: &CancellationToken, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
