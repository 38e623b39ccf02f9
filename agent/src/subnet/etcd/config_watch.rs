//! Following `<prefix>/config` with an etcd watch instead of re-reading it: one Range at
//! start (and after a compaction), then nothing on the wire until the key changes.

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{sleep_or_cancel, EtcdStore, BACKOFF_MIN};
use crate::subnet::SubnetStore;

impl EtcdStore {
    /// The config JSON (`None` when absent) and the revision it was read at.
    async fn config_at(&self) -> Result<(Option<String>, i64), super::SubnetError> {
        let key = self.config_key();
        let resp = self
            .call("get", &key, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let json = resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        Ok((json, resp.header().map_or(0, |h| h.revision())))
    }

    /// Send the config, then every change from the revision it was read at. A broken watch
    /// resumes from the last revision seen (backoff 100 ms doubling to 5 s); a compacted or
    /// cancelled one re-reads the key.
    pub async fn watch_config(
        &self,
        tx: mpsc::Sender<Option<String>>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) {
        let key = self.config_key();
        let mut backoff = BACKOFF_MIN;
        let mut next_rev: Option<i64> = None;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let rev = match next_rev {
                Some(r) => r,
                None => match self.config_at().await {
                    Ok((json, r)) => {
                        if tx.send(json).await.is_err() {
                            return;
                        }
                        next_rev = Some(r + 1);
                        r + 1
                    }
                    Err(e) => {
                        tracing::debug!(retry_in = ?backoff, "re-reading the network config: {e}");
                        on_reconnect();
                        if sleep_or_cancel(&cancel, &mut backoff).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let opts = WatchOptions::new().with_start_revision(rev);
            let mut stream = match self.client.clone().watch(key.as_str(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(retry_in = ?backoff, "watching {key}: {e}; reconnecting");
                    on_reconnect();
                    if sleep_or_cancel(&cancel, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = stream.message() => m,
                };
                let Ok(Some(resp)) = msg else {
                    tracing::warn!(retry_in = ?backoff, revision = rev, "config watch broke; reconnecting");
                    on_reconnect();
                    break;
                };
                if resp.compact_revision() > 0 || resp.canceled() {
                    tracing::warn!(
                        compacted_to = resp.compact_revision(),
                        reason = resp.cancel_reason(),
                        "etcd ended the config watch; re-reading {key}"
                    );
                    next_rev = None;
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    next_rev = Some(kv.mod_revision() + 1);
                    backoff = BACKOFF_MIN;
                    let json = match ev.event_type() {
                        EventType::Delete => None,
                        EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
                    };
                    if tx.send(json).await.is_err() {
                        return;
                    }
                }
            }
            if sleep_or_cancel(&cancel, &mut backoff).await {
                return;
            }
        }
    }
}
