//! A running coordinator: its admin API and its campaign, until it stops.
//! The CLI only turns flags into a [`Node`].

use std::future::Future;
use std::sync::Arc;

use myriad_store::Store;
use myriad_store::schema::Keys;
use myriad_tls::ServerTls;
use tokio::net::TcpListener;

use crate::admin::{self, AdminService};
use crate::{CoordinatorConfig, Shared};

/// The admin API `myriad ctl` talks to.
pub struct AdminApi {
    /// Where it serves (bound by the caller, which reports the address).
    pub listener: TcpListener,
    /// The token callers must present; none: no authentication.
    pub token: Option<String>,
    pub tls: Option<ServerTls>,
}

/// What a coordinator node runs.
pub struct Node {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub config: CoordinatorConfig,
    pub admin: Option<AdminApi>,
}

impl Node {
    /// Serves the admin API and campaigns (leading when it wins, again
    /// after losing the store) until `stop` resolves; a leader then
    /// resigns, so another coordinator leads at once rather than after
    /// the lease TTL.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let Node { store, keys, config, admin } = self;
        let shared = Arc::new(Shared::default());
        if let Some(AdminApi { listener, token, tls }) = admin {
            let service = AdminService::new(store.clone(), keys.clone(), config.clone(), shared.clone());
            tokio::spawn(admin::serve(listener, service, token, tls));
        }
        crate::run(store, keys, config, shared, stop).await;
    }
}
