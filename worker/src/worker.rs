//! A worker independent of its transport: a backend and the load window.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use myriad_proto::expert::{Contributions, ExpertBatch, ExpertId, LayerId};

use crate::backend::{ExpertBackend, Hosted};
use crate::error::WorkerError;

pub struct Worker {
    backend: Arc<dyn ExpertBackend>,
    /// Tokens per hosted expert since the last [`Worker::take_load`]: the
    /// coordinator balances placement on it.
    load: Mutex<BTreeMap<(LayerId, ExpertId), u64>>,
}

impl Worker {
    pub fn new(backend: Arc<dyn ExpertBackend>) -> Self {
        Worker { backend, load: Mutex::new(BTreeMap::new()) }
    }

    pub fn hosted(&self) -> &Hosted {
        self.backend.hosted()
    }

    /// Runs a batch on the blocking pool (expert FFNs are CPU-heavy).
    pub async fn run(&self, batch: ExpertBatch) -> Result<Contributions, WorkerError> {
        let backend = self.backend.clone();
        let (width, pairs) = (batch.width, batch.pairs());
        let (batch, data) = tokio::task::spawn_blocking(move || {
            let data = backend.run(&batch);
            (batch, data)
        })
        .await
        .map_err(|e| WorkerError::Internal(e.to_string()))?;
        let data = data?;
        if let Ok(mut load) = self.load.lock() {
            for (e, _) in batch.routes.iter().flatten() {
                *load.entry((batch.layer, *e)).or_default() += 1;
            }
        }
        Ok(Contributions { pairs, width, data })
    }

    /// The load window since the previous call, which starts a new one.
    pub fn take_load(&self) -> BTreeMap<(LayerId, ExpertId), u64> {
        self.load.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default()
    }
}
