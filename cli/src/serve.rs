//! `myriad up` and `myriad router`: flags into a router node (the
//! OpenAI-compatible endpoint over expert workers started in this
//! process, or already running), and its banner.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use myriad_router::Target;
use myriad_router::engine::EngineConfig;
use myriad_router::node::{Caches, Config, Experts, Node};
use myriad_store::schema::Role;
use myriad_tls::ClientTls;
use tokio::net::TcpListener;

use crate::membership::{ClusterArgs, require_one};
use crate::metrics_http::MetricsArgs;
use crate::tls::TlsArgs;

/// Options of the HTTP front end, shared by `up` and `router`.
#[derive(clap::Args)]
pub struct HttpArgs {
    /// `/metrics` on a port of its own (e.g. `0.0.0.0:9400`) instead of
    /// the API's, so that whatever exposes the API does not expose it.
    #[command(flatten)]
    metrics: MetricsArgs,

    /// Model folder (config, weights, tokenizer.json, tokenizer_config.json).
    #[arg(long, env = "MYRIAD_MODEL", default_value = "models/tiny-v4")]
    pub(crate) model: PathBuf,

    /// Where the HTTP API listens; port 0 picks a free one (printed at start-up).
    #[arg(long, env = "MYRIAD_LISTEN", default_value = "127.0.0.1:8000")]
    listen: String,

    /// How chats become prompts: DeepSeek-V4's own encoding when not given;
    /// a Jinja file's path; or `folder` for the `chat_template` in the model
    /// folder's tokenizer_config.json (used only when asked for).
    #[arg(long, env = "MYRIAD_CHAT_TEMPLATE")]
    chat_template: Option<PathBuf>,

    /// Name clients pass as `model` (default: the model folder's name).
    #[arg(long, env = "MYRIAD_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,

    /// Accepted API keys (comma-separated); none means no authentication.
    #[arg(long = "api-key", env = "MYRIAD_API_KEYS", value_delimiter = ',')]
    api_keys: Vec<String>,

    /// Most sequences in one batch step.
    #[arg(long, env = "MYRIAD_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,

    /// Most tokens one step runs; long prompts are prefilled in chunks of what is left.
    #[arg(long, env = "MYRIAD_STEP_TOKENS", default_value_t = myriad_model::generate::PREFILL_CHUNK)]
    step_tokens: usize,

    /// Requests that may wait for a place in the batch before new ones get 429.
    #[arg(long, env = "MYRIAD_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,

    /// Longest prompt plus completion in tokens (default: the model's
    /// context; `myriad up`: at most 32768).
    #[arg(long, env = "MYRIAD_MAX_MODEL_LEN")]
    pub(crate) max_model_len: Option<usize>,

    /// Longest prompt one request may send, in tokens; longer ones get a
    /// 400 before any work is spent (default: the max model len less one).
    #[arg(long, env = "MYRIAD_MAX_PROMPT_TOKENS")]
    max_prompt_tokens: Option<usize>,

    /// Completion length when a request sets no max_tokens.
    #[arg(long, env = "MYRIAD_DEFAULT_MAX_TOKENS", default_value_t = 1024)]
    default_max_tokens: usize,

    /// Longest wait for one expert call before trying another replica.
    #[arg(long, env = "MYRIAD_EXPERT_TIMEOUT", default_value = "30s")]
    expert_timeout: humantime::Duration,

    /// Longest wait for a live copy of an expert (a worker that comes back,
    /// or a new placement) before the requests that need it fail with 503.
    #[arg(long, env = "MYRIAD_EXPERT_WAIT", default_value = "10s")]
    expert_wait: humantime::Duration,

    /// Longest wait for a KV-cache lookup before computing the prompt instead.
    #[arg(long, env = "MYRIAD_KVCACHE_TIMEOUT", default_value = "5s")]
    kvcache_timeout: humantime::Duration,

    /// On SIGTERM, how long it keeps serving while `/ready` says not
    /// ready, so load balancers take it out before it refuses connections
    /// (on Kubernetes: about the readiness probe's period).
    #[arg(long, env = "MYRIAD_SHUTDOWN_DELAY", default_value = "0s")]
    shutdown_delay: humantime::Duration,

    /// On SIGTERM, after the shutdown delay, how long the responses in
    /// flight may take to finish before they are cut.
    #[arg(long, env = "MYRIAD_DRAIN_TIMEOUT", default_value = "30s")]
    drain_timeout: humantime::Duration,
}

impl HttpArgs {
    /// The router node these flags describe, over `experts` and `caches`.
    pub(crate) fn config(&self, experts: Experts, caches: Caches, tls: Option<ClientTls>) -> Config {
        Config {
            model: self.model.clone(),
            chat_template: self.chat_template.clone(),
            served_model_name: self.served_model_name.clone(),
            api_keys: self.api_keys.clone(),
            engine: EngineConfig { max_batch: self.max_batch, step_tokens: self.step_tokens, queue: self.max_queue },
            max_model_len: self.max_model_len,
            max_prompt_tokens: self.max_prompt_tokens,
            default_max_tokens: self.default_max_tokens,
            expert_timeout: *self.expert_timeout,
            expert_wait: *self.expert_wait,
            kvcache_timeout: *self.kvcache_timeout,
            experts,
            caches,
            tls,
            metrics_here: !self.metrics.enabled(),
            shutdown_delay: *self.shutdown_delay,
            drain_timeout: *self.drain_timeout,
        }
    }
}

#[derive(clap::Args)]
pub struct RouterArgs {
    #[command(flatten)]
    http: HttpArgs,

    /// Fixed expert workers to dispatch to (`myriad worker --experts`
    /// addresses); repeat or comma-separate. Without it, `--etcd`.
    #[arg(long = "worker-addr", env = "MYRIAD_WORKER_ADDRS", value_delimiter = ',')]
    worker_addrs: Vec<String>,

    /// KV-cache instances (`myriad kvcache`) to restore and store
    /// conversation state in, comma-separated: each conversation lives on
    /// one, chosen by its first block. None computes every prompt in full.
    #[arg(long, env = "MYRIAD_KVCACHE", value_delimiter = ',')]
    kvcache: Vec<String>,

    /// Use the KV-cache instances registered in the cluster store
    /// (`myriad kvcache --etcd`), followed as they come and go.
    #[arg(long, env = "MYRIAD_KVCACHE_FROM_STORE")]
    kvcache_from_store: bool,

    /// Instances holding each conversation's state: with 2, a conversation
    /// survives the loss of its home instance.
    #[arg(long, env = "MYRIAD_KVCACHE_REPLICAS", default_value_t = 1)]
    kvcache_replicas: usize,

    #[command(flatten)]
    cluster: ClusterArgs,

    #[command(flatten)]
    tls: TlsArgs,
}

/// `myriad up`'s context limit when none is given: a one-machine cluster
/// on CPUs prefills a prompt this long in tens of seconds, not minutes.
pub(crate) const UP_MAX_MODEL_LEN: usize = 32768;

pub fn router(args: RouterArgs) -> Result<()> {
    require_one(!args.worker_addrs.is_empty(), &args.cluster, "--worker-addr")?;
    let replicas = args.kvcache_replicas;
    if replicas == 0 {
        bail!("--kvcache-replicas must be at least 1");
    }
    if args.kvcache_from_store && !args.kvcache.is_empty() {
        bail!("give either --kvcache or --kvcache-from-store, not both");
    }
    if args.kvcache_from_store && !args.cluster.enabled() {
        bail!("--kvcache-from-store needs --etcd");
    }
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async move {
        // Before anything slow: a SIGTERM during start-up must find the handler.
        let shutdown = crate::shutdown::signal();
        let tls = args.tls.client()?;
        let (experts, caches, what) = if args.cluster.enabled() {
            // One etcd client for placement and the KV-cache instances.
            let cluster = &args.cluster;
            let (store, keys, id) = (cluster.store()?, cluster.keys()?, cluster.node_id(Role::Router)?);
            let caches = if args.kvcache_from_store {
                Caches::Registered { store: store.clone(), keys: keys.clone(), replicas }
            } else {
                fixed_caches(&args.kvcache, replicas)
            };
            let experts = Experts::Cluster { store, keys, id, lease_ttl: *cluster.lease_ttl };
            (experts, caches, format!("placement from cluster {}", cluster.cluster))
        } else {
            let targets = args.worker_addrs.iter().map(Target::addr).collect();
            let what = format!("{} expert workers", args.worker_addrs.len());
            (Experts::Static(targets), fixed_caches(&args.kvcache, replicas), what)
        };
        let node = Node::start(args.http.config(experts, caches, tls)).await.map_err(anyhow::Error::msg)?;
        serve(node, &args.http, &what, None, shutdown).await
    })
}

/// The KV-cache instances given on the command line, if any.
pub(crate) fn fixed_caches(addrs: &[String], replicas: usize) -> Caches {
    if addrs.is_empty() { Caches::None } else { Caches::Fixed { addrs: addrs.to_vec(), replicas } }
}

/// What `myriad up` records for `myriad ctl` while it serves.
pub(crate) struct UpAddresses {
    pub admin: String,
    pub kvcache: Option<String>,
}

/// Binds the API, prints the banner and serves `node` until `shutdown`.
pub(crate) async fn serve(
    node: Node,
    args: &HttpArgs,
    what: &str,
    up: Option<UpAddresses>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener.local_addr().context("read the bound address")?;
    args.metrics.start(None).await?;
    let model_name = node.model_name().to_string();
    tracing::info!(listen = %addr, "serving the HTTP API");
    // Tests and scripts read this first line to find the port. Written,
    // not println!: a reader that closed stdout after the first line must
    // not take the server down.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Myriad is up: http://{addr}/v1 (model `{model_name}`, {what})");
    let recorded = up.and_then(|up| {
        let _ = writeln!(out, "Admin API: {} (try: myriad ctl status)", up.admin);
        crate::up::StateFile::write(&up.admin, &format!("http://{addr}/v1"), up.kvcache.as_deref())
    });
    let _ = writeln!(out, "Try: curl http://{addr}/v1/chat/completions -H 'Content-Type: application/json' \\");
    if !args.api_keys.is_empty() {
        let _ = writeln!(out, "       -H 'Authorization: Bearer YOUR_API_KEY' \\");
    }
    let _ = writeln!(
        out,
        "       -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 16}}'"
    );
    let _ = out.flush();
    drop(out);
    let served = node.run(listener, shutdown).await.context("serve HTTP");
    drop(recorded);
    served
}
