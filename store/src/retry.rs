//! Joining a cluster whose store is away: a node retries with capped
//! backoff instead of exiting, so pods started during an etcd outage wait
//! for it (unready) rather than crash-loop.

use std::future::Future;
use std::time::Duration;

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
}
