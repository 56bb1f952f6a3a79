//! Joining a cluster whose store is away: a node retries with capped
//! backoff instead of exiting, so pods started during an etcd outage wait
//! for it (unready) rather than crash-loop.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use crate::StoreError;

/// First pause after a failed attempt; each next one doubles, up to [`MOST`].
const FIRST: Duration = Duration::from_millis(250);
const MOST: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds, pausing between failures (250 ms,
/// doubling, at most 5 s). Logs the first failure and every tenth after.
pub async fn until_joined<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut pause = FIRST;
    let mut failures = 0u64;
    loop {
        match attempt().await {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(what, failures, "the cluster store answers again");
                }
                return value;
            }
            Err(e) => {
                if failures.is_multiple_of(10) {
                    tracing::warn!(what, error = %e, retry_in = ?pause, "cannot reach the cluster store; retrying");
                }
                failures += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MOST);
            }
        }
    }
}

/// [`until_joined`], given up as soon as `leave` turns true (a dropped
/// sender never asks to leave): `None` then, as nothing was joined and so
/// nothing needs undoing.
pub async fn until_joined_unless_leaving<T, F, Fut>(what: &str, leave: &watch::Receiver<bool>, attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut leave = leave.clone();
    tokio::select! {
        joined = until_joined(what, attempt) => Some(joined),
        true = async { leave.wait_for(|leave| *leave).await.is_ok() } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_with_growing_pauses_until_it_succeeds() {
        let calls = AtomicUsize::new(0);
        let start = tokio::time::Instant::now();
        let got = until_joined("test", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 8 { Err(StoreError::Unavailable("down".into())) } else { Ok(n) }
        })
        .await;
        assert_eq!(got, 8);
        // 0.25 + 0.5 + 1 + 2 + 4 + 5 + 5 + 5 seconds of pauses.
        assert_eq!(start.elapsed(), Duration::from_millis(22_750));
    }

    /// Asked to leave while the store is away: it gives up at once. Its
    /// sender dropped: it keeps trying, and joins when the store answers.
    #[tokio::test(start_paused = true)]
    async fn leaving_stops_the_retries_and_a_dropped_sender_does_not() {
        let down = || async { Err::<(), _>(StoreError::Unavailable("down".into())) };
        let (leave, leaving) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let asked = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            leave.send_replace(true);
        };
        let (gave_up, ()) = tokio::join!(until_joined_unless_leaving("test", &leaving, down), asked);
        assert_eq!(gave_up, None);
        assert_eq!(start.elapsed(), Duration::from_secs(3));

        let (leave, leaving) = watch::channel(false);
        drop(leave);
        let calls = AtomicUsize::new(0);
        let joined = until_joined_unless_leaving("test", &leaving, || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 { Err(StoreError::Unavailable("down".into())) } else { Ok(7) }
        });
        assert_eq!(joined.await, Some(7));
    }
}
