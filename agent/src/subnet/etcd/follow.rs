//! One etcd watch kept alive through broken connections and lost history: the loop the lease
//! watch and the config watch share. Each says what it reads when it starts (or when etcd no
//! longer has the revisions it would resume from) and what an event means to it.

use std::future::Future;

use etcd_client::{Event, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{sleep_or_cancel, EtcdStore, BACKOFF_MIN};
use crate::subnet::SubnetError;

/// What a watch follows, and its words in the log.
pub(super) struct Follow<'a> {
    /// How the log names it: "lease watch", "config watch".
    pub what: &'static str,
    /// What it does when etcd ends it: "re-listing", "re-reading the config".
    pub again: &'static str,
    pub key: &'a str,
    /// Whether `key` is a prefix (every key under it) or one key.
    pub prefix: bool,
}

impl EtcdStore {
    /// Send what `read` returns, then what `event` makes of each change after the revision
    /// `read` was at. A broken watch resumes from the last revision seen (backoff 100 ms
    /// doubling to 5 s); a compacted or cancelled one reads again. Ends when `cancel` fires or
    /// the receiver is dropped. `on_reconnect` runs each time the watch has to be set up again
    /// after a failure (for the reconnect metric).
    pub(super) async fn follow<T, R, Fut>(
        &self,
        w: Follow<'_>,
        tx: mpsc::Sender<T>,
        cancel: CancellationToken,
        on_reconnect: impl Fn() + Send,
        read: R,
        event: impl Fn(&Event) -> Option<T>,
    ) where
        R: Fn() -> Fut,
        Fut: Future<Output = Result<(T, i64), SubnetError>>,
    {
        let Follow {
            what,
            again,
            key,
            prefix,
        } = w;
        let mut backoff = BACKOFF_MIN;
        let mut next_rev: Option<i64> = None;
        let mut after_break = false;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            // One attempt: read if need be, watch, follow until the watch ends; then back off.
            'attempt: {
                let rev = match next_rev {
                    Some(r) => r,
                    None => match read().await {
                        Ok((first, r)) => {
                            if tx.send(first).await.is_err() {
                                return;
                            }
                            next_rev = Some(r + 1);
                            r + 1
                        }
                        Err(e) => {
                            tracing::warn!(retry_in = ?backoff, "{what}: reading {key}: {e}");
                            on_reconnect();
                            after_break = true;
                            break 'attempt;
                        }
                    },
                };
                let mut opts = WatchOptions::new().with_start_revision(rev);
                if prefix {
                    opts = opts.with_prefix();
                }
                let mut stream = match self.client.clone().watch(key, Some(opts)).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(retry_in = ?backoff, "watching {key}: {e}; reconnecting");
                        on_reconnect();
                        after_break = true;
                        break 'attempt;
                    }
                };
                if after_break {
                    tracing::info!(revision = rev, "{what} re-established");
                    after_break = false;
                } else {
                    tracing::debug!(revision = rev, "{what} established");
                }
                loop {
                    let msg = tokio::select! {
                        _ = cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let Ok(Some(resp)) = msg else {
                        tracing::warn!(retry_in = ?backoff, revision = rev, "{what} broke; reconnecting");
                        on_reconnect();
                        after_break = true;
                        break;
                    };
                    if resp.compact_revision() > 0 {
                        tracing::warn!(
                            compacted_to = resp.compact_revision(),
                            "{what} revision was compacted; {again}"
                        );
                        next_rev = None;
                        break;
                    }
                    if resp.canceled() {
                        tracing::warn!(
                            reason = resp.cancel_reason(),
                            "etcd cancelled the {what}; {again}"
                        );
                        next_rev = None;
                        break;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        next_rev = Some(kv.mod_revision() + 1);
                        backoff = BACKOFF_MIN;
                        let Some(update) = event(ev) else { continue };
                        if tx.send(update).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if sleep_or_cancel(&cancel, &mut backoff).await {
                return;
            }
        }
    }
}
