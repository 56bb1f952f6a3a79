//! When a serving role stops: on Ctrl-C in a terminal, and on SIGTERM, which
//! is how Kubernetes, systemd and `docker stop` ask a process to end.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::signal::unix::{Signal, SignalKind, signal as listen};

/// How long a role that has stopped serving waits for work still on the
/// blocking pool (a cache write, an expert load) before it exits without it.
const BLOCKING_GRACE: Duration = Duration::from_secs(5);

/// Runs a role's `main` to its end on `runtime`, then stops the runtime,
/// waiting at most [`BLOCKING_GRACE`] for blocking work. Dropping the
/// runtime would wait for it forever, and an expert load stuck on a volume
/// that hangs never ends: the process would outlive its SIGTERM.
pub fn run<T>(runtime: Runtime, main: impl Future<Output = T>) -> T {
    let out = runtime.block_on(main);
    runtime.shutdown_timeout(BLOCKING_GRACE);
    out
}

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
