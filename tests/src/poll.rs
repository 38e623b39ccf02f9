//! Waiting on observable state: look again until a condition holds or a deadline passes.
//!
//! A test never orders two steps with a fixed sleep: it polls what it waits for (a route, a map
//! entry, a lease, a file) with a deadline, and on timeout says what it waited for and what it saw
//! last. The interval between two looks is pacing only; the deadline decides the outcome.

use std::future::Future;
use std::time::{Duration, Instant};

/// Pause between two looks: pacing, so a poll does not spin on 2 shared cores.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Poll `probe` until it returns `Ok`; after `within`, `Err` with what it waited for and the last
/// thing it saw (the probe's `Err`).
pub async fn try_until<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(seen) if Instant::now() >= deadline => {
                return Err(format!("waited {within:?} for {what}; last saw: {seen}"))
            }
            Err(_) => tokio::time::sleep(INTERVAL).await,
        }
    }
}

/// [`try_until`] that panics on timeout (tests fail by panicking so agents print their logs).
pub async fn until<T, F, Fut>(what: &str, within: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    try_until(what, within, probe)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// [`until`] for blocking code (plain `#[test]`s, threads inside namespaces).
pub fn until_blocking<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("waited {within:?} for {what}; last saw: {seen}")
            }
            Err(_) => std::thread::sleep(INTERVAL),
        }
    }
}

/// `Ok(())` when `ok`, else `Err` showing `seen`: the usual probe body, `check(x == want, &x)`.
pub fn check<S: std::fmt::Debug>(ok: bool, seen: S) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{seen:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_names_what_was_awaited_and_what_was_seen() {
        let mut n = 0;
        let got = until_blocking("n to reach 3", Duration::from_secs(5), || {
            n += 1;
            check(n >= 3, n).map(|()| n)
        });
        assert_eq!(got, 3);
        let err = std::panic::catch_unwind(|| {
            until_blocking("never", Duration::from_millis(50), || check(false, "nope"))
        })
        .unwrap_err();
        let text = err.downcast_ref::<String>().expect("a String panic");
        assert!(
            text.contains("for never") && text.contains("\"nope\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_async_poll_returns_the_value_or_the_reason() {
        let mut n = 0;
        let got = until("n to reach 2", Duration::from_secs(5), || {
            n += 1;
            let v = n;
            async move { check(v >= 2, v).map(|()| v) }
        })
        .await;
        assert_eq!(got, 2);
        let err = try_until("never", Duration::from_millis(50), || async {
            Err::<(), _>("last".to_owned())
        })
        .await
        .unwrap_err();
        assert!(
            err.contains("for never") && err.contains("last saw: last"),
            "{err}"
        );
    }
}
