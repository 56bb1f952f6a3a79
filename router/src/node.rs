//! A running router node: the OpenAI-compatible API over the engine, the
//! engine over remote experts and the KV-cache, and in a cluster its
//! membership, from start to a phased stop. The CLI only turns flags into
//! a [`Config`]; `myriad up` builds the same node over its own cluster.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use myriad_model::text::TextTokenizer;
use myriad_model::{Model, ModelConfig};
use myriad_store::Store;
use myriad_store::schema::{Keys, NodeId};
use myriad_tls::ClientTls;
use tokio::net::TcpListener;

use crate::chat::{ChatEncoder, THINK_END};
use crate::engine::{Engine, EngineConfig};
use crate::http::{self, AppState};
use crate::kvcache::StateCache;
use crate::membership::{Member, Membership};
use crate::structured::Grammars;
use crate::{RemoteExperts, Target, WorkerPool};

/// Where the router learns which worker hosts which experts.
pub enum Experts {
    /// The current placement in a cluster store, followed as router `id`.
    Cluster { store: Arc<dyn Store>, keys: Keys, id: NodeId, lease_ttl: Duration },
    /// Fixed workers, each used for the experts it reports.
    Static(Vec<Target>),
}

/// Where the router keeps conversation state.
pub enum Caches {
    /// Nowhere: every prompt is computed in full.
    None,
    /// These KV-cache instances.
    Fixed { addrs: Vec<String>, replicas: usize },
    /// The instances registered in a cluster store, followed as they come and go.
    Registered { store: Arc<dyn Store>, keys: Keys, replicas: usize },
}

/// Everything a router node is built from.
pub struct Config {
    /// Model folder (config, dense weights, tokenizer).
    pub model: PathBuf,
    /// How chats become prompts (see [`ChatEncoder::choose`]).
    pub chat_template: Option<PathBuf>,
    /// Name clients pass as `model` (default: the model folder's name).
    pub served_model_name: Option<String>,
    /// Accepted API keys; none means no authentication.
    pub api_keys: Vec<String>,
    pub engine: EngineConfig,
    /// Longest prompt plus completion (default and cap: the model's context).
    pub max_model_len: Option<usize>,
    /// Longest prompt (default and cap: the max model len less one).
    pub max_prompt_tokens: Option<usize>,
    /// Completion length when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// Longest wait for one expert call before trying another replica.
    pub expert_timeout: Duration,
    /// Longest wait for a live copy of an expert before requests fail.
    pub expert_wait: Duration,
    /// Longest wait for a KV-cache lookup before computing the prompt.
    pub kvcache_timeout: Duration,
    pub experts: Experts,
    pub caches: Caches,
    /// TLS of its calls to workers and KV-cache instances (None: plaintext).
    pub tls: Option<ClientTls>,
    /// Whether `/metrics` is served on the API's port.
    pub metrics_here: bool,
    /// On stop, how long it keeps serving while reporting not ready, so
    /// load balancers take it out before it refuses connections.
    pub shutdown_delay: Duration,
    /// On stop, how long the responses in flight may take to finish.
    pub drain_timeout: Duration,
}

/// A router node, built and connected, not yet serving HTTP.
pub struct Node {
    state: Arc<AppState>,
    experts: RemoteExperts,
    member: Option<Member>,
    stopping: Arc<AtomicBool>,
    shutdown_delay: Duration,
    drain_timeout: Duration,
}

impl Node {
    /// Loads the dense model and tokenizer, starts the engine, connects to
    /// the workers and KV-cache (in a cluster: joins it once the store
    /// answers, unready meanwhile). Runs on the current runtime.
    pub async fn start(config: Config) -> Result<Node, String> {
        let Config { model: dir, experts: source, caches, tls, .. } = config;
        let model = Model::load_dense(&dir).map_err(|e| format!("load the model from {}: {e:#}", dir.display()))?;
        let model = Arc::new(model);
        let cfg = &model.config;
        let max_context = config.max_model_len.unwrap_or(cfg.max_position_embeddings).min(cfg.max_position_embeddings);
        let engine_config = config.engine;
        if engine_config.max_batch == 0 || engine_config.step_tokens == 0 || max_context < 2 {
            return Err("--max-batch and --step-tokens must be at least 1, --max-model-len at least 2".into());
        }
        let max_prompt = config.max_prompt_tokens.unwrap_or(max_context - 1).min(max_context - 1);
        if max_prompt == 0 {
            return Err("--max-prompt-tokens must be at least 1".into());
        }
        let tokenizer = Arc::new(
            TextTokenizer::load(&dir).map_err(|e| format!("load the tokenizer from {}: {e:#}", dir.display()))?,
        );
        let (grammars, token_bytes, think_end) = vocabulary(&tokenizer, cfg);
        let chat = ChatEncoder::choose(&dir, config.chat_template.as_deref())?;
        let experts = RemoteExperts::new(
            Arc::new(WorkerPool::empty()),
            tokio::runtime::Handle::current(),
            cfg.hidden_size,
            config.expert_timeout,
            config.expert_wait,
        );
        let member = match source {
            Experts::Cluster { store, keys, id, lease_ttl } => {
                let record = crate::membership::record(id, &model.fingerprint);
                let membership = Membership { store, keys, record, lease_ttl, tls: tls.clone() };
                Some(crate::membership::start(membership, &experts, cfg))
            }
            Experts::Static(targets) => {
                let pool = WorkerPool::connect(&targets, cfg, &model.fingerprint, tls.as_ref())
                    .await
                    .map_err(|e| format!("connect to the expert workers: {e}"))?;
                experts.set_pool(Arc::new(pool));
                None
            }
        };
        let cache = connect_cache(caches, &model, config.kvcache_timeout, tls)?;
        let engine = Engine::start(model.clone(), experts.clone(), engine_config, cache);
        let stopping = Arc::new(AtomicBool::new(false));
        let ready = {
            let (experts, stopping) = (experts.clone(), stopping.clone());
            Box::new(move || !stopping.load(Ordering::Relaxed) && experts.pool().serving())
        };
        let state = Arc::new(AppState {
            engine,
            tokenizer,
            grammars,
            token_bytes,
            think_end,
            chat,
            model_name: config.served_model_name.unwrap_or_else(|| folder_name(&dir)),
            api_keys: config.api_keys,
            max_context,
            max_prompt,
            default_max_tokens: config.default_max_tokens,
            eos_token_ids: cfg.eos_token_ids.clone(),
            vocab_size: cfg.vocab_size,
            ready,
            metrics_here: config.metrics_here,
        });
        tracing::info!(
            model = %state.model_name, api_keys = state.api_keys.len(), max_batch = engine_config.max_batch,
            step_tokens = engine_config.step_tokens, max_queue = engine_config.queue, max_context, max_prompt,
            chat = state.chat.name(), "router started"
        );
        let (shutdown_delay, drain_timeout) = (config.shutdown_delay, config.drain_timeout);
        Ok(Node { state, experts, member, stopping, shutdown_delay, drain_timeout })
    }

    /// The name clients pass as `model`.
    pub fn model_name(&self) -> &str {
        &self.state.model_name
    }

    /// Waits until it dispatches with a complete placement.
    pub async fn wait_serving(&self, timeout: Duration) -> Result<(), String> {
        crate::membership::wait_serving(&self.experts, timeout).await
    }

    /// Serves the API on `listener` until `stop` resolves, then stops in
    /// phases: it reports not ready for the shutdown delay while still
    /// serving, stops taking connections and lets the responses in flight
    /// finish within the drain timeout (cutting the rest), and leaves the
    /// cluster. It leaves last: its record names the placement version its
    /// responses in flight dispatch with, which keeps that version's
    /// workers serving.
    pub async fn run(self, listener: TcpListener, stop: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        let Node { state, member, stopping, shutdown_delay, drain_timeout, .. } = self;
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(http::serve(listener, state, async {
            let _ = closed.await;
        }));
        tokio::select! {
            served = &mut server => return served.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            () = stop => {}
        }
        stopping.store(true, Ordering::Relaxed);
        if !shutdown_delay.is_zero() {
            tracing::info!(?shutdown_delay, "stopping: not ready, still serving");
            tokio::time::sleep(shutdown_delay).await;
        }
        tracing::info!(?drain_timeout, "stopping: no new connections; finishing the responses in flight");
        let _ = close.send(());
        let served = match tokio::time::timeout(drain_timeout, &mut server).await {
            Ok(served) => served.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            Err(_) => {
                tracing::warn!(?drain_timeout, "responses still open after the drain timeout; cutting them");
                server.abort();
                Ok(())
            }
        };
        if let Some(member) = member {
            member.leave(Duration::from_secs(2)).await;
        }
        served
    }
}

/// The KV-cache client `caches` asks for, if any.
fn connect_cache(
    caches: Caches,
    model: &Model,
    timeout: Duration,
    tls: Option<ClientTls>,
) -> Result<Option<StateCache>, String> {
    let (id, cfg) = (&model.fingerprint, model.config.clone());
    match caches {
        Caches::None => Ok(None),
        Caches::Fixed { addrs, replicas } => {
            let cache = StateCache::connect(&addrs, id, cfg, timeout, replicas, tls.as_ref())?;
            tracing::info!(?addrs, replicas, "conversation state goes to the KV-cache");
            Ok(Some(cache))
        }
        Caches::Registered { store, keys, replicas } => {
            let cache = StateCache::registered(store, &keys, id, cfg, timeout, replicas, tls);
            tracing::info!(replicas, "conversation state goes to the KV-cache instances in the cluster store");
            Ok(Some(cache))
        }
    }
}

/// The grammars for structured outputs (none, with a warning, when the
/// tokenizer cannot spell its tokens as bytes), each token's bytes, and the
/// `</think>` token if the vocabulary has one.
fn vocabulary(tokenizer: &Arc<TextTokenizer>, cfg: &ModelConfig) -> (Option<Grammars>, Vec<Vec<u8>>, Option<u32>) {
    let pieces = tokenizer.token_bytes();
    let token_bytes: Vec<Vec<u8>> = match &pieces {
        Ok(pieces) => pieces.iter().map(|(bytes, _)| bytes.clone()).collect(),
        // Not byte-level: each token's own decoding.
        Err(_) => {
            (0..cfg.vocab_size as u32).map(|id| tokenizer.decode_all(&[id]).unwrap_or_default().into_bytes()).collect()
        }
    };
    let think_end = token_bytes.iter().position(|b| b == THINK_END.as_bytes()).map(|id| id as u32);
    let grammars = (pieces.map_err(|e| e.to_string()))
        .and_then(|pieces| Grammars::new(tokenizer.clone(), &pieces, cfg.vocab_size, &cfg.eos_token_ids, think_end))
        .inspect_err(|e| tracing::warn!(error = %e, "structured outputs and forced tool calls are off"))
        .ok();
    (grammars, token_bytes, think_end)
}

fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "myriad".into())
}
