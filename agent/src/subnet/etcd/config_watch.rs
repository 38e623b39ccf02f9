//! Following `<prefix>/config` with an etcd watch instead of re-reading it: one Range at
//! start (and after a compaction), then nothing on the wire until the key changes.

use etcd_client::{Event, EventType};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{follow::Follow, EtcdStore};
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

    /// Send the config, then every change from the revision it was read at; a watch that
    /// breaks or ends is kept up by [`EtcdStore::follow`].
    pub async fn watch_config(
        &self,
        tx: mpsc::Sender<Option<String>>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
    ) {
        let key = self.config_key();
        let w = Follow {
            what: "config watch",
            again: "re-reading the config",
            key: &key,
            prefix: false,
        };
        let event = |ev: &Event| {
            let kv = ev.kv()?;
            Some(match ev.event_type() {
                EventType::Delete => None,
                EventType::Put => Some(String::from_utf8_lossy(kv.value()).into_owned()),
            })
        };
        self.follow(w, tx, cancel, on_reconnect, || self.config_at(), event)
            .await
    }
}
