//! The workers a router dispatches to, and which of them hosts what.
//!
//! A worker whose call fails is marked down and skipped; [`WorkerPool::probe`]
//! asks each down worker, with backoff, whether it answers again and still
//! hosts what this pool uses it for, and puts it back if so. A worker killed
//! and restarted at once on the same address keeps its id, so no new
//! placement version replaces this pool: without the probe it would stay
//! unused for good.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use myriad_model::ModelConfig;
use myriad_proto::MAX_MESSAGE_BYTES;
use myriad_proto::pb::DescribeRequest;
use myriad_proto::pb::expert_worker_client::ExpertWorkerClient;
use myriad_proto::spec::ExpertSpec;
use myriad_tls::ClientTls;
use tonic::transport::{Channel, Endpoint};

/// First pause before probing a worker marked down; doubles up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_millis(200);
/// Longest pause between two probes of a down worker: one that comes back
/// is used again within about this long after it serves its experts.
const PROBE_MAX: Duration = Duration::from_secs(1);
/// Longest wait for one probe's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// router then stops choosing this worker until a probe sets it again.
    pub alive: AtomicBool,
    /// The `(layer, expert)` pairs this pool uses it for: what a probe
    /// checks it still hosts before putting it back.
    uses: Vec<(u32, u32)>,
    /// When to probe it next while down, and the pause after that.
    backoff: Mutex<(Instant, Duration)>,
}

pub struct WorkerPool {
    pub workers: Vec<WorkerHandle>,
    /// `(layer, expert)` -> indices into `workers`, ascending.
    replicas: HashMap<(usize, usize), Vec<usize>>,
    /// The model fingerprint every worker must serve.
    model_id: String,
}

impl WorkerPool {
    /// No workers: every dispatch fails as unavailable (before the first
    /// placement arrives).
    pub fn empty() -> Self {
        WorkerPool { workers: Vec::new(), replicas: HashMap::new(), model_id: String::new() }
    }

    /// Connects to every target, asks each worker what it hosts (checking
    /// it has at least what its target names), and checks that together
    /// they serve every routed expert of `config`. `model_id` is the
    /// router's own [`myriad_model::Model::fingerprint`]. Over TLS through
    /// `tls` when set.
    pub async fn connect(
        targets: &[Target],
        config: &ModelConfig,
        model_id: &str,
        tls: Option<&ClientTls>,
    ) -> Result<Self, PoolError> {
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
            let channel = myriad_tls::connect(endpoint, tls).await.map_err(|e| fail(format!("connect: {e}")))?;
            let mut client = ExpertWorkerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let reported = describe(&mut client, config, model_id).await.map_err(fail)?;
            let uses: Vec<(u32, u32)> = match assigned {
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
            for &(l, e) in &uses {
                replicas.entry((l as usize, e as usize)).or_default().push(i);
            }
            let backoff = Mutex::new((Instant::now(), PROBE_FIRST));
            workers.push(WorkerHandle { addr: addr.clone(), client, alive: AtomicBool::new(true), uses, backoff });
        }
        for layer in 0..config.num_hidden_layers {
            for expert in 0..config.n_routed_experts {
                if !replicas.contains_key(&(layer, expert)) {
                    return Err(PoolError::Uncovered { layer, expert });
                }
            }
        }
        Ok(WorkerPool { workers, replicas, model_id: model_id.to_string() })
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

    /// The addresses of the workers marked down, ascending.
    pub fn down(&self) -> Vec<String> {
        let mut down: Vec<String> =
            self.workers.iter().filter(|w| !w.alive.load(Ordering::Relaxed)).map(|w| w.addr.clone()).collect();
        down.sort();
        down
    }

    pub fn mark_down(&self, worker: usize) {
        let handle = &self.workers[worker];
        if handle.alive.swap(false, Ordering::Relaxed) {
            *handle.backoff.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now() + PROBE_FIRST, PROBE_FIRST);
        }
    }

    /// Probes every down worker whose pause has passed (every down worker
    /// when `now_all`), concurrently, and puts back each that answers,
    /// serves this pool's model and hosts what the pool uses it for.
    /// Returns the addresses put back.
    pub async fn probe(&self, now_all: bool) -> Vec<String> {
        let now = Instant::now();
        let due = self.workers.iter().filter(|w| {
            let mut backoff = w.backoff.lock().unwrap_or_else(|p| p.into_inner());
            let due = !w.alive.load(Ordering::Relaxed) && (now_all || backoff.0 <= now);
            if due {
                *backoff = (now + backoff.1, (backoff.1 * 2).min(PROBE_MAX));
            }
            due
        });
        let probes = due.map(|w| async move {
            let mut client = w.client.clone();
            let answer = tokio::time::timeout(PROBE_TIMEOUT, client.describe(DescribeRequest {})).await;
            let hosted = match answer {
                Ok(Ok(r)) => r.into_inner(),
                _ => return None,
            };
            if hosted.model_id != self.model_id {
                return None;
            }
            let reported: HashSet<(u32, u32)> = hosted.experts.iter().map(|e| (e.layer, e.expert)).collect();
            if !w.uses.iter().all(|p| reported.contains(p)) {
                return None;
            }
            w.alive.store(true, Ordering::Relaxed);
            Some(w.addr.clone())
        });
        futures::future::join_all(probes).await.into_iter().flatten().collect()
    }
}

/// Asks a worker what it hosts, checking it runs this router's model.
async fn describe(
    client: &mut ExpertWorkerClient<Channel>,
    config: &ModelConfig,
    model_id: &str,
) -> Result<HashSet<(u32, u32)>, String> {
    let hosted = client.describe(DescribeRequest {}).await.map_err(|s| s.message().to_string())?.into_inner();
    if hosted.model_id != model_id {
        return Err(format!(
            "serves model {} but this router runs model {model_id} (another checkpoint)",
            hosted.model_id
        ));
    }
    let shape = (hosted.hidden_size as usize, hosted.num_layers as usize, hosted.num_experts as usize);
    if shape != (config.hidden_size, config.num_hidden_layers, config.n_routed_experts) {
        return Err(format!(
            "serves a model with hidden {}, {} layers, {} experts; this router's has {}, {}, {}",
            shape.0, shape.1, shape.2, config.hidden_size, config.num_hidden_layers, config.n_routed_experts
        ));
    }
    Ok(hosted.experts.iter().map(|e| (e.layer, e.expert)).collect())
}
