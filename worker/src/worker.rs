//! A worker independent of its transport: the backends it has loaded, one
//! per placement version it still serves, and the load window.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use myriad_proto::expert::{Contributions, ExpertBatch, ExpertId, LayerId};
use tokio::sync::watch;

use crate::backend::{ExpertBackend, Hosted};
use crate::device::Device;
use crate::error::WorkerError;
use crate::metrics;

/// A backend and the placement version it was loaded for (`None`: a static
/// `--experts` worker outside any placement).
struct Installed {
    version: Option<u64>,
    backend: Arc<dyn ExpertBackend>,
}

pub struct Worker {
    /// The model shape and fingerprint, known before any expert is loaded.
    shape: Hosted,
    /// Where its experts live, and that device's memory (0 for the CPU).
    device: Device,
    device_memory: u64,
    /// Newest last. During a rollout a worker serves both the version
    /// routers use and the one they will switch to.
    installed: RwLock<Vec<Installed>>,
    /// Tokens per hosted expert since the last [`Worker::take_load`]: the
    /// coordinator balances placement on it.
    load: Mutex<BTreeMap<(LayerId, ExpertId), u64>>,
    /// Whether routers depend on this worker for what it should serve: a
    /// static worker from the start, a cluster worker once it serves the
    /// current placement. The gRPC health service reports it, so that
    /// Kubernetes waits for it before stopping the next worker in a rollout.
    ready: watch::Sender<bool>,
    metrics: metrics::Metrics,
}

impl Worker {
    /// A worker serving exactly `backend`'s experts; `name` labels its
    /// metrics.
    pub fn new(name: &str, backend: Arc<dyn ExpertBackend>) -> Result<Self, WorkerError> {
        let shape = Hosted { experts: Vec::new(), ..backend.hosted().clone() };
        let worker = Worker::idle(name, shape, backend.device())?;
        worker.install(None, backend);
        worker.set_ready(true);
        Ok(worker)
    }

    /// A worker of the model `shape` describes that hosts nothing yet (not
    /// ready) and will load its experts on `device`; `name` (its node id)
    /// labels its metrics.
    pub fn idle(name: &str, shape: Hosted, device: Device) -> Result<Self, WorkerError> {
        let (ready, _) = watch::channel(false);
        let device_memory = device.memory_bytes()?;
        let metrics = metrics::Metrics::new(name);
        metrics.device_memory_bytes.set(device_memory as i64);
        Ok(Worker {
            shape,
            device,
            device_memory,
            installed: RwLock::new(Vec::new()),
            load: Mutex::new(BTreeMap::new()),
            ready,
            metrics,
        })
    }

    /// Its series of the `myriad_worker_*` metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Where its experts live and that device's memory in bytes (0 for the CPU).
    pub fn device(&self) -> (Device, u64) {
        (self.device, self.device_memory)
    }

    /// Bytes the experts of the newest version it serves hold on its device.
    pub fn expert_bytes(&self) -> usize {
        self.installed.read().unwrap_or_else(|p| p.into_inner()).last().map_or(0, |i| i.backend.bytes())
    }

    pub fn set_ready(&self, ready: bool) {
        self.metrics.ready.set(i64::from(ready));
        self.ready.send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    /// Follows [`Worker::set_ready`].
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Adds the experts of placement `version` (kept newest last).
    pub fn install(&self, version: Option<u64>, backend: Arc<dyn ExpertBackend>) {
        let mut installed = self.installed.write().unwrap_or_else(|p| p.into_inner());
        installed.push(Installed { version, backend });
        installed.sort_by_key(|i| i.version);
        self.metrics.placement_version.set(installed.last().and_then(|i| i.version).unwrap_or(0) as i64);
        self.metrics.expert_bytes.set(installed.last().map_or(0, |i| i.backend.bytes()) as i64);
    }

    /// Releases the backends of versions `keep` rejects.
    pub fn retain(&self, keep: impl Fn(Option<u64>) -> bool) {
        self.installed.write().unwrap_or_else(|p| p.into_inner()).retain(|i| keep(i.version));
    }

    /// The versions it serves, oldest first.
    pub fn versions(&self) -> Vec<Option<u64>> {
        self.installed.read().unwrap_or_else(|p| p.into_inner()).iter().map(|i| i.version).collect()
    }

    /// The model and every expert any installed version hosts.
    pub fn hosted(&self) -> Hosted {
        let installed = self.installed.read().unwrap_or_else(|p| p.into_inner());
        let mut experts: Vec<(LayerId, ExpertId)> =
            installed.iter().flat_map(|i| i.backend.hosted().experts.iter().copied()).collect();
        experts.sort();
        experts.dedup();
        Hosted { experts, ..self.shape.clone() }
    }

    /// Runs a batch on the blocking pool (expert FFNs are CPU-heavy), with
    /// the newest version that hosts all of the batch's experts.
    pub async fn run(&self, batch: ExpertBatch) -> Result<Contributions, WorkerError> {
        self.check_shape(&batch)?;
        let backend = {
            let installed = self.installed.read().unwrap_or_else(|p| p.into_inner());
            let hosts_all = |b: &Arc<dyn ExpertBackend>| {
                let hosted = &b.hosted().experts;
                batch.routes.iter().flatten().all(|(e, _)| hosted.binary_search(&(batch.layer, *e)).is_ok())
            };
            installed.iter().rev().map(|i| &i.backend).find(|b| hosts_all(b)).cloned()
        };
        let Some(backend) = backend else {
            let missing = batch
                .routes
                .iter()
                .flatten()
                .map(|(e, _)| e.0)
                .find(|&e| !self.hosted().experts.contains(&(batch.layer, ExpertId(e))));
            return Err(WorkerError::NotHosted(match missing {
                Some(e) => format!("expert {e} of layer {} is not hosted here", batch.layer.0),
                None => format!("no loaded placement hosts all of this batch's experts of layer {}", batch.layer.0),
            }));
        };
        let (width, pairs) = (batch.width, batch.pairs());
        let timer = self.metrics.batch_seconds.start_timer();
        let (batch, data) = tokio::task::spawn_blocking(move || {
            let data = backend.run(&batch);
            (batch, data)
        })
        .await
        .map_err(|e| WorkerError::Internal(e.to_string()))?;
        timer.observe_duration();
        if data.is_ok() { &self.metrics.batches_ok } else { &self.metrics.batches_failed }.inc();
        let data = data?;
        self.metrics.pairs.inc_by(pairs as u64);
        if let Ok(mut load) = self.load.lock() {
            for (e, _) in batch.routes.iter().flatten() {
                *load.entry((batch.layer, *e)).or_default() += 1;
            }
        }
        Ok(Contributions { pairs, width, data })
    }

    /// Refuses batches that no worker of this model could serve.
    fn check_shape(&self, batch: &ExpertBatch) -> Result<(), WorkerError> {
        let shape = &self.shape;
        if batch.layer.0 as usize >= shape.num_layers {
            return Err(WorkerError::InvalidArgument(format!(
                "layer {} does not exist (the model has {})",
                batch.layer.0, shape.num_layers
            )));
        }
        if batch.width != shape.hidden_size {
            return Err(WorkerError::InvalidArgument(format!(
                "hidden states are {} wide, the model's are {}",
                batch.width, shape.hidden_size
            )));
        }
        if let Some((e, _)) = batch.routes.iter().flatten().find(|(e, _)| e.0 as usize >= shape.num_experts) {
            return Err(WorkerError::InvalidArgument(format!(
                "expert {} does not exist (the model has {} per layer)",
                e.0, shape.num_experts
            )));
        }
        Ok(())
    }

    /// The load window since the previous call, which starts a new one.
    pub fn take_load(&self) -> BTreeMap<(LayerId, ExpertId), u64> {
        self.load.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default()
    }
}
