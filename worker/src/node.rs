//! A running worker node: its gRPC service and, in a cluster, its
//! membership, from start to a phased stop. The CLI only turns flags into
//! a [`Node`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use myriad_tls::ServerTls;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::membership::Membership;
use crate::worker::Worker;

/// What a worker node runs.
pub struct Node {
    /// Where it serves (bound by the caller, which reports the address).
    pub listener: TcpListener,
    pub tls: Option<ServerTls>,
    pub worker: Arc<Worker>,
    /// In a cluster: how it joins and follows placement. None: it serves
    /// the experts its worker was built with.
    pub membership: Option<Membership>,
    /// On stop, how long it keeps serving while its experts move.
    pub drain_timeout: Duration,
}

impl Node {
    /// Serves until `stop` resolves, then stops in phases: it leaves the
    /// cluster (revoking its lease, so the coordinator re-places its
    /// experts at once), keeps serving until no placement version names it
    /// or the drain timeout passes, and stops serving. It joins the
    /// cluster in the background, so it serves (unready) while the store
    /// is away.
    pub async fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> Result<(), tonic::transport::Error> {
        let Node { listener, tls, worker, membership, drain_timeout } = self;
        let Some(membership) = membership else {
            return crate::serve(listener, worker, tls, stop).await;
        };
        let (leave, leaving) = watch::channel(false);
        let member = tokio::spawn(crate::membership::run(membership, worker.clone(), leaving));
        let drained = async move {
            stop.await;
            leave.send_replace(true);
            let started = Instant::now();
            match tokio::time::timeout(drain_timeout, member).await {
                Ok(_) => tracing::info!(after = ?started.elapsed(), "no placement uses this worker; stopping"),
                Err(_) => tracing::warn!(?drain_timeout, "still placed after the drain timeout; stopping anyway"),
            }
        };
        crate::serve(listener, worker, tls, drained).await
    }
}
