//! How long a future runs between the turns it gives the runtime. A reconcile pass is dropped
//! for a lease event only at an await that returns `Pending`, so the longest stretch between
//! two of them (one poll) bounds how long a new peer can wait for a pass: [`Polls`] measures
//! it in the running agent, [`count_turns`] checks in tests that long reads (map listings,
//! netlink dumps) give such turns.

use std::future::Future;
use std::time::{Duration, Instant};

/// The polls of one future: how many, the longest, and when the last one started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Polls {
    pub count: usize,
    pub longest: Duration,
    /// Where the thread was during the longest poll, when measured (debug logging on for
    /// this module): on a CPU, or runnable and waiting for one. Far less on the CPU than
    /// `longest` means the thread was taken off the CPU, not that the future ran that long.
    pub longest_sched: Option<Sched>,
    /// Start of the latest poll. A caller that looks at its other events before each poll (a
    /// biased select) found none then, so the time since bounds how long an event that came
    /// meanwhile waited for this future to give way.
    pub last_start: Instant,
}

impl Polls {
    pub fn new() -> Self {
        Self {
            count: 0,
            longest: Duration::ZERO,
            longest_sched: tracing::enabled!(tracing::Level::DEBUG).then(Sched::default),
            last_start: Instant::now(),
        }
    }

    /// `fut`, with each of its polls recorded here.
    pub async fn time<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            let before = self.longest_sched.map(|_| Sched::now());
            let started = Instant::now();
            let out = fut.as_mut().poll(cx);
            let took = started.elapsed();
            self.count += 1;
            if took >= self.longest {
                self.longest = took;
                if let Some(before) = before {
                    self.longest_sched = Some(Sched::now().since(before));
                }
            }
            self.last_start = started;
            out
        })
        .await
    }
}

/// The calling thread's time on a CPU and waiting for one (the kernel's schedstat).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sched {
    pub on_cpu: Duration,
    pub waiting: Duration,
}

impl Sched {
    fn now() -> Sched {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        let mut ns = stat
            .split_whitespace()
            .map(|n| Duration::from_nanos(n.parse().unwrap_or(0)));
        Sched {
            on_cpu: ns.next().unwrap_or_default(),
            waiting: ns.next().unwrap_or_default(),
        }
    }

    fn since(self, before: Sched) -> Sched {
        Sched {
            on_cpu: self.on_cpu.saturating_sub(before.on_cpu),
            waiting: self.waiting.saturating_sub(before.waiting),
        }
    }
}

/// Polls `fut` to completion by hand: its output and how many times it returned `Pending`.
#[cfg(test)]
pub(crate) async fn count_turns<F: Future>(fut: F) -> (F::Output, usize) {
    use std::task::Poll;
    let mut fut = std::pin::pin!(fut);
    let mut turns = 0;
    loop {
        match futures::poll!(fut.as_mut()) {
            Poll::Ready(out) => return (out, turns),
            Poll::Pending => turns += 1,
        }
    }
}

/// One step of a reconcile pass, logged (debug) with how long it ran and its longest stretch
/// without a turn for the runtime, also when the pass is dropped during it (`finished=false`):
/// where a pass that cannot be dropped spends its time.
pub(crate) async fn step<F: Future>(name: &'static str, fut: F) -> F::Output {
    let mut step = Step {
        name,
        started: Instant::now(),
        polls: Polls::new(),
        finished: false,
    };
    let out = step.polls.time(fut).await;
    step.finished = true;
    out
}

struct Step {
    name: &'static str,
    started: Instant,
    polls: Polls,
    finished: bool,
}

impl Drop for Step {
    fn drop(&mut self) {
        tracing::debug!(
            step = self.name,
            took = ?self.started.elapsed(),
            longest_poll = ?self.polls.longest,
            longest_poll_sched = ?self.polls.longest_sched,
            polls = self.polls.count,
            finished = self.finished,
            "reconcile step"
        );
    }
}

/// Items a reconcile pass handles between two turns it gives the runtime: set inserts,
/// comparisons and map reads of well under a µs to a few µs each, so a turn is due every
/// fraction of a ms however many peers there are.
pub(crate) const TURN_ITEMS: usize = 256;

/// Counts the items of a long loop and gives the runtime a turn every [`TURN_ITEMS`]: a pass
/// comparing thousands of peers stays droppable for a lease event.
#[derive(Debug, Default)]
pub(crate) struct Turns(usize);

impl Turns {
    pub async fn tick(&mut self) {
        self.0 += 1;
        if self.0.is_multiple_of(TURN_ITEMS) {
            tokio::task::yield_now().await;
        }
    }
}

/// `items` collected (into a set, a map, a Vec), giving the runtime a turn every
/// [`TURN_ITEMS`].
pub(crate) async fn collect_in_turns<T, C: Default + Extend<T>>(
    items: impl IntoIterator<Item = T>,
) -> C {
    let mut out = C::default();
    let mut turns = Turns::default();
    for item in items {
        out.extend(Some(item));
        turns.tick().await;
    }
    out
}
