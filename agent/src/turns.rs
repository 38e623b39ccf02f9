//! Test support: how many turns a future gives the runtime before it completes. A reconcile
//! pass is dropped for a lease event only at an await that returns `Pending`, so long reads
//! (map listings, netlink dumps) are checked to give such turns.

use std::future::Future;
use std::task::Poll;

/// Polls `fut` to completion by hand: its output and how many times it returned `Pending`.
pub(crate) async fn count_turns<F: Future>(fut: F) -> (F::Output, usize) {
    let mut fut = std::pin::pin!(fut);
    let mut turns = 0;
    loop {
        match futures::poll!(fut.as_mut()) {
            Poll::Ready(out) => return (out, turns),
            Poll::Pending => turns += 1,
        }
    }
}
