//! A running KV-cache instance: its gRPC service and, in a cluster, its
//! registration, from start to a phased stop. The CLI only turns flags
//! into a [`Node`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use myriad_store::Store;
use myriad_store::lease::Registration;
use myriad_store::schema::{self, Keys, NodeRecord};
use myriad_tls::ServerTls;
use tokio::net::TcpListener;

use crate::KvCacheService;

/// An instance's place in a cluster: routers started with
/// `--kvcache-from-store` spread conversations over the registered ones.
pub struct Presence {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub record: NodeRecord,
    pub lease_ttl: Duration,
}

/// What a KV-cache node runs.
pub struct Node {
    /// Where it serves (bound by the caller, which reports the address).
    pub listener: TcpListener,
    pub tls: Option<ServerTls>,
    pub service: KvCacheService,
    /// In a cluster: its registration. None: routers name it themselves.
    pub presence: Option<Presence>,
}

impl Node {
    /// Serves until `stop` resolves. In a cluster it registers once the
    /// store answers (serving meanwhile), and on stop unregisters first,
    /// so routers stop sending it conversations before it goes, then
    /// finishes the calls in flight.
    pub async fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> Result<(), tonic::transport::Error> {
        let Node { listener, tls, service, presence } = self;
        let Some(Presence { store, keys, record, lease_ttl }) = presence else {
            return crate::serve(listener, service, tls, stop).await;
        };
        let (key, value) = (keys.node(record.role, &record.id), schema::encode(&record));
        let registered = tokio::spawn(async move {
            myriad_store::retry::until_joined("register the KV-cache instance", || {
                Registration::start(store.clone(), key.clone(), value.clone(), lease_ttl)
            })
            .await
        });
        let leave = async move {
            stop.await;
            registered.abort();
            if let Ok(registration) = registered.await {
                registration.close().await;
            }
        };
        crate::serve(listener, service, tls, leave).await
    }
}
