//! When a serving role stops: on Ctrl-C in a terminal, and on SIGTERM, which
//! is how Kubernetes, systemd and `docker stop` ask a process to end.

/// Resolves on the first SIGINT or SIGTERM. If no handler can be installed,
/// it never resolves (the process then ends only when killed) rather than
/// stopping a server at once.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            None
        }
    };
    let term = async {
        match terminate.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM: shutting down"),
        _ = interrupt => tracing::info!("interrupted: shutting down"),
    }
}
