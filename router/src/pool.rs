//! The workers a router dispatches to, and which of them hosts what.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use myriad_model::ModelConfig;
use myriad_proto::MAX_MESSAGE_BYTES;
use myriad_proto::pb::DescribeRequest;
use myriad_proto::pb::expert_worker_client::ExpertWorkerClient;
use myriad_proto::spec::ExpertSpec;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("worker {addr}: {message}")]
    Worker { addr: String, message: String },
    #[error("expert {expert} of layer {layer} is hosted by no worker")]
    Uncovered { layer: usize, expert: usize },
    #[error("no workers given")]
    Empty,
}

/// A worker to dispatch to and the experts to use it for: those a
/// placement assigns it, or (`None`) whatever it reports hosting.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub experts: Option<ExpertSpec>,
}

impl Target {
    pub fn addr(addr: impl Into<String>) -> Self {
        Target { addr: addr.into(), experts: None }
    }
}

pub struct WorkerHandle {
    pub addr: String,
    pub client: ExpertWorkerClient<Channel>,
    /// Cleared when a call fails in a way another replica can absorb; the
    /// router then stops choosing this worker.
    pub alive: AtomicBool,
}

pub struct WorkerPool {
    pub workers: Vec<WorkerHandle>,
    /// `(layer, expert)` -> indices into `workers`, ascending.
    replicas: HashMap<(usize, usize), Vec<usize>>,
}

impl WorkerPool {
    /// No workers: every dispatch fails as unavailable (before the first
    /// placement arrives).
    pub fn empty() -> Self {
        WorkerPool { workers: Vec::new(), replicas: HashMap::new() }
    }

    /// Connects to every target, asks each worker what it hosts (checking
    /// it has at least what its target names), and checks that together
    /// they serve every routed expert of `config`. `model_id` is the
    /// router's own [`myriad_model::Model::fingerprint`].
    pub async fn connect(targets: &[Target], config: &ModelConfig, model_id: &str) -> Result<Self, PoolError> {
        if targets.is_empty() {
            return Err(PoolError::Empty);
        }
        let mut workers = Vec::with_capacity(targets.len());
        let mut replicas: HashMap<(usize, usize), Vec<usize>> = HashMap::new();
        for (i, Target { addr, experts: assigned }) in targets.iter().enumerate() {
            let fail = |message: String| PoolError::Worker { addr: addr.clone(), message };
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| fail(format!("bad address: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            let channel = endpoint.connect().await.map_err(|e| fail(format!("connect: {e}")))?;
            let mut client = ExpertWorkerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let hosted =
                client.describe(DescribeRequest {}).await.map_err(|s| fail(s.message().to_string()))?.into_inner();
            if hosted.model_id != model_id {
                return Err(fail(format!(
                    "serves model {} but this router runs model {model_id} (another checkpoint)",
                    hosted.model_id
                )));
            }
            let shape = (hosted.hidden_size as usize, hosted.num_layers as usize, hosted.num_experts as usize);
            if shape != (config.hidden_size, config.num_hidden_layers, config.n_routed_experts) {
                return Err(fail(format!(
                    "serves a model with hidden {}, {} layers, {} experts; this router's has {}, {}, {}",
                    shape.0, shape.1, shape.2, config.hidden_size, config.num_hidden_layers, config.n_routed_experts
                )));
            }
            let reported: std::collections::HashSet<(u32, u32)> =
                hosted.experts.iter().map(|e| (e.layer, e.expert)).collect();
            let used: Vec<(u32, u32)> = match assigned {
                None => reported.iter().copied().collect(),
                Some(spec) => {
                    let shape = (config.num_hidden_layers as u32, config.n_routed_experts as u32);
                    let wanted = (0..shape.0).flat_map(|l| (0..shape.1).map(move |e| (l, e)));
                    let wanted: Vec<(u32, u32)> = wanted.filter(|&(l, e)| spec.contains(l, e)).collect();
                    if let Some((l, e)) = wanted.iter().find(|p| !reported.contains(p)) {
                        return Err(fail(format!("is assigned expert {e} of layer {l} but has not loaded it")));
                    }
                    wanted
                }
            };
            for (l, e) in used {
                replicas.entry((l as usize, e as usize)).or_default().push(i);
            }
            workers.push(WorkerHandle { addr: addr.clone(), client, alive: AtomicBool::new(true) });
        }
        for layer in 0..config.num_hidden_layers {
            for expert in 0..config.n_routed_experts {
                if !replicas.contains_key(&(layer, expert)) {
                    return Err(PoolError::Uncovered { layer, expert });
                }
            }
        }
        Ok(WorkerPool { workers, replicas })
    }

    /// Live workers hosting `(layer, expert)`, ascending.
    pub fn live_replicas(&self, layer: usize, expert: usize) -> Vec<usize> {
        self.replicas
            .get(&(layer, expert))
            .map(|r| r.iter().copied().filter(|&w| self.workers[w].alive.load(Ordering::Relaxed)).collect())
            .unwrap_or_default()
    }

    /// Whether every routed expert still has a live replica (readiness).
    pub fn serving(&self) -> bool {
        !self.workers.is_empty()
            && self.replicas.values().all(|r| r.iter().any(|&w| self.workers[w].alive.load(Ordering::Relaxed)))
    }

    pub fn mark_down(&self, worker: usize) {
        self.workers[worker].alive.store(false, Ordering::Relaxed);
    }
}
