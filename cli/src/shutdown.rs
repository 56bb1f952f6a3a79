//! When a serving role stops: on Ctrl-C in a terminal, and on SIGTERM, which
//! is how Kubernetes, systemd and `docker stop` ask a process to end.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal as listen};

/// Installs handlers for SIGTERM and SIGINT now, and returns a future that
/// resolves on the first of them. Call it inside the runtime and before the
/// process announces that it is up: until a handler is installed a signal
/// meets the default action, which ends the process at once. A handler that
/// cannot be installed is logged, and that signal keeps its default action.
pub fn signal() -> impl Future<Output = ()> {
    let install = |kind: SignalKind, name: &'static str| {
        listen(kind).inspect_err(|e| tracing::warn!(signal = name, error = %e, "cannot listen for the signal")).ok()
    };
    let mut terminate = install(SignalKind::terminate(), "SIGTERM");
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            _ = recv(&mut terminate) => tracing::info!("SIGTERM: shutting down"),
            _ = recv(&mut interrupt) => tracing::info!("interrupted: shutting down"),
        }
    }
}

/// The next delivery of `signal`; never, without a handler.
async fn recv(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
