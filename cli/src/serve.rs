//! `myriad up` and `myriad router`: the OpenAI-compatible endpoint over
//! expert workers (started in this process, or already running).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use myriad_model::Model;
use myriad_model::text::TextTokenizer;
use myriad_router::chat::ChatEncoder;
use myriad_router::engine::{Engine, EngineConfig, SaveState};
use myriad_router::http::{self, AppState};
use myriad_router::kvcache::StateCache;
use myriad_router::membership::Membership;
use myriad_router::structured::Grammars;
use myriad_router::{RemoteExperts, Target, WorkerPool};
use myriad_store::schema::Role;
use myriad_tls::ClientTls;
use tokio::net::TcpListener;

use crate::cluster::LocalCluster;
use crate::membership::{ClusterArgs, require_one, router_record};
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

/// Where a router keeps conversation state.
pub(crate) enum Caches {
    None,
    /// These instances.
    Fixed {
        addrs: Vec<String>,
        replicas: usize,
    },
    /// The instances registered in the router's cluster store.
    Registered {
        replicas: usize,
    },
}

/// Where the router learns which worker hosts which experts.
pub(crate) enum Placement {
    /// The current version in this process's own cluster (`myriad up`):
    /// serve only once it is loaded.
    Local(LocalCluster),
    /// The current version in a cluster store; `/ready` says when it is loaded.
    Store(ClusterArgs),
    /// Fixed addresses, each used for the experts it reports.
    Static(Vec<Target>),
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
    let caches = match (args.kvcache_from_store, args.kvcache.is_empty()) {
        (true, false) => bail!("give either --kvcache or --kvcache-from-store, not both"),
        (true, true) if !args.cluster.enabled() => bail!("--kvcache-from-store needs --etcd"),
        (true, true) => Caches::Registered { replicas },
        (false, false) => Caches::Fixed { addrs: args.kvcache, replicas },
        (false, true) => Caches::None,
    };
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    let tls = {
        // On the runtime: TLS files are watched from a task of it.
        let _runtime = runtime.enter();
        args.tls.client()?
    };
    if args.cluster.enabled() {
        let what = format!("placement from cluster {}", args.cluster.cluster);
        return serve(runtime, args.http, Placement::Store(args.cluster), caches, tls, &what);
    }
    let what = format!("{} expert workers", args.worker_addrs.len());
    let targets = args.worker_addrs.iter().map(Target::addr).collect();
    serve(runtime, args.http, Placement::Static(targets), caches, tls, &what)
}

fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "myriad".into())
}

pub(crate) fn serve(
    runtime: tokio::runtime::Runtime,
    args: HttpArgs,
    placement: Placement,
    caches: Caches,
    tls: Option<ClientTls>,
    what: &str,
) -> Result<()> {
    let admin = match &placement {
        Placement::Local(cluster) => cluster.admin.clone(),
        _ => None,
    };
    // The registered KV-cache instances live in the placement's store.
    let cache_store = match (&placement, &caches) {
        (Placement::Store(cluster), Caches::Registered { .. }) => {
            let _guard = runtime.enter();
            Some((cluster.store()?, cluster.keys()?))
        }
        _ => None,
    };
    let model =
        Arc::new(Model::load_dense(&args.model).with_context(|| format!("load model from {}", args.model.display()))?);
    let cfg = &model.config;
    let tokenizer = Arc::new(TextTokenizer::load(&args.model).context("load the tokenizer")?);
    let pieces = tokenizer.token_bytes();
    let grammars = (pieces.as_ref().map_err(ToString::to_string))
        .and_then(|pieces| Grammars::new(tokenizer.clone(), pieces, cfg.vocab_size, &cfg.eos_token_ids))
        .inspect_err(|e| tracing::warn!(error = %e, "structured outputs and forced tool calls are off"))
        .ok();
    let token_bytes = match pieces {
        Ok(pieces) => pieces.into_iter().map(|(bytes, _)| bytes).collect(),
        // Not byte-level: each token's own decoding.
        Err(_) => {
            (0..cfg.vocab_size as u32).map(|id| tokenizer.decode_all(&[id]).unwrap_or_default().into_bytes()).collect()
        }
    };
    let chat = ChatEncoder::choose(&args.model, args.chat_template.as_deref()).map_err(anyhow::Error::msg)?;
    let experts = RemoteExperts::new(
        Arc::new(WorkerPool::empty()),
        runtime.handle().clone(),
        cfg.hidden_size,
        *args.expert_timeout,
        *args.expert_wait,
    );
    // A router in a cluster store leaves it after its last request: a record
    // left to expire would hold up the release of old placement versions
    // (and so the drain of workers) for a lease TTL.
    let mut member = None;
    runtime.block_on(async {
        match placement {
            Placement::Local(cluster) => cluster.attach_router("router-0", &experts, cfg).await,
            Placement::Store(cluster) => {
                let (store, keys, id) = (cluster.store()?, cluster.keys()?, cluster.node_id(Role::Router)?);
                let record = router_record(id, &model.fingerprint);
                let membership = Membership { store, keys, record, lease_ttl: *cluster.lease_ttl, tls: tls.clone() };
                member = Some(myriad_router::membership::start(membership, &experts, cfg));
                Ok(())
            }
            Placement::Static(targets) => {
                let pool = WorkerPool::connect(&targets, cfg, &model.fingerprint, tls.as_ref())
                    .await
                    .context("connect to the expert workers")?;
                experts.set_pool(Arc::new(pool));
                Ok(())
            }
        }
    })?;
    let max_context = args.max_model_len.unwrap_or(cfg.max_position_embeddings).min(cfg.max_position_embeddings);
    if args.max_batch == 0 || args.step_tokens == 0 || max_context < 2 {
        bail!("--max-batch and --step-tokens must be at least 1, --max-model-len at least 2");
    }
    let max_prompt = args.max_prompt_tokens.unwrap_or(max_context - 1).min(max_context - 1);
    if max_prompt == 0 {
        bail!("--max-prompt-tokens must be at least 1");
    }
    let engine_config =
        EngineConfig { max_batch: args.max_batch, step_tokens: args.step_tokens, queue: args.max_queue };
    // What `myriad up` records for `ctl kvcache`: its one instance.
    let kvcache_addr = match &caches {
        Caches::Fixed { addrs, .. } => addrs.first().cloned(),
        _ => None,
    };
    let timeout = *args.kvcache_timeout;
    let kvcache = match caches {
        Caches::None => None,
        Caches::Fixed { addrs, replicas } => {
            let _guard = runtime.enter();
            let cache = StateCache::connect(&addrs, &model.fingerprint, cfg.clone(), timeout, replicas, tls.as_ref())
                .map_err(anyhow::Error::msg)?;
            tracing::info!(?addrs, replicas, "conversation state goes to the KV-cache");
            Some(cache)
        }
        Caches::Registered { replicas } => {
            let (store, keys) = cache_store.context("registered KV-cache instances need a cluster store")?;
            let cache = runtime
                .block_on(StateCache::registered(store, &keys, &model.fingerprint, cfg.clone(), timeout, replicas, tls))
                .context("follow the KV-cache instances in the cluster store")?;
            tracing::info!(replicas, "conversation state goes to the KV-cache instances in the cluster store");
            Some(cache)
        }
    };
    let save: Option<SaveState> = kvcache.clone().map(|c| Box::new(move |s| c.save(s)) as SaveState);
    let engine = Engine::start(model.clone(), experts.clone(), engine_config, save);
    let model_name = args.served_model_name.clone().unwrap_or_else(|| model_name(&args.model));
    let chat_name = chat.name();
    let state = Arc::new(AppState {
        engine,
        tokenizer,
        grammars,
        token_bytes,
        chat,
        model_name: model_name.clone(),
        api_keys: args.api_keys.clone(),
        max_context,
        max_prompt,
        default_max_tokens: args.default_max_tokens,
        eos_token_ids: cfg.eos_token_ids.clone(),
        vocab_size: cfg.vocab_size,
        kvcache,
        ready: Box::new(move || experts.pool().serving()),
        metrics_here: !args.metrics.enabled(),
    });
    tracing::info!(
        model = %model_name, listen = %args.listen, api_keys = args.api_keys.len(), max_batch = args.max_batch,
        step_tokens = args.step_tokens, max_queue = args.max_queue, max_context, max_prompt, chat = chat_name, "starting the HTTP API"
    );
    runtime.block_on(async move {
        // Before the banner: a SIGTERM right after it must find the handler.
        let shutdown = crate::shutdown::signal();
        let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
        let addr = listener.local_addr().context("read the bound address")?;
        args.metrics.start(None).await?;
        // Tests and scripts read this first line to find the port.
        // Written, not println!: a reader that closed stdout after the
        // first line must not take the server down.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "Myriad is up: http://{addr}/v1 (model `{model_name}`, {what})");
        let recorded = admin.as_deref().and_then(|admin| {
            let _ = writeln!(out, "Admin API: {admin} (try: myriad ctl status)");
            crate::up::StateFile::write(admin, &format!("http://{addr}/v1"), kvcache_addr.as_deref())
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
        let served = http::serve(listener, state, shutdown).await.context("serve HTTP");
        drop(recorded);
        if let Some(member) = member {
            member.leave(std::time::Duration::from_secs(2)).await;
        }
        served
    })
}
