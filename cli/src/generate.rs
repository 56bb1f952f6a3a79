//! `myriad generate`: one prompt through the model in this process.

use std::io::Write;
use std::path::PathBuf;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use myriad_model::text::TextTokenizer;
use myriad_model::{Model, Sampling};
use myriad_router::dispatch::DispatchStats;
use myriad_router::{RemoteExperts, Target, WorkerPool};
use myriad_worker::Device;

use crate::cluster::LocalCluster;
use crate::tls::TlsArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Model folder: config.json plus model.safetensors or shards with an index.
    #[arg(long, env = "MYRIAD_MODEL", default_value = "models/tiny-v4")]
    model: PathBuf,

    /// Prompt as comma-separated token ids, e.g. `5,17,42`.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "prompt_ids_file"],
          required_unless_present_any = ["prompt", "prompt_ids_file"])]
    prompt_ids: Option<Vec<u32>>,

    /// Prompt as token ids read from a file (separated by commas or
    /// whitespace): for prompts longer than a command line may be.
    #[arg(long, conflicts_with = "prompt")]
    prompt_ids_file: Option<PathBuf>,

    /// Prompt as text, encoded with the model folder's tokenizer.json.
    #[arg(long)]
    prompt: Option<String>,

    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,

    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,

    /// Keep only the k most likely tokens before sampling.
    #[arg(long)]
    top_k: Option<usize>,

    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,

    /// Seed of the sampler: the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,

    /// Print one JSON object: {"generated": [ids], "prompt_last_logits": [floats]}.
    #[arg(long)]
    json: bool,

    /// Run the routed experts on N expert workers started in this process and
    /// reached over gRPC on loopback ports (balanced placement).
    #[arg(long, conflicts_with = "worker_addr")]
    workers: Option<usize>,

    /// With --workers: how many workers host each expert.
    #[arg(long, default_value_t = 1, requires = "workers")]
    replicas: usize,

    /// With --workers: where they compute their experts, `cpu` or `cuda` /
    /// `cuda:N` (a build with the `cuda` feature, on an NVIDIA GPU).
    #[arg(long, default_value = "cpu", requires = "workers")]
    device: Device,

    /// Run the routed experts on already running workers (`myriad worker`);
    /// repeat for each. Placement is read from the workers.
    #[arg(long = "worker-addr")]
    worker_addr: Vec<String>,

    /// Longest wait for one expert call before trying another replica.
    #[arg(long, default_value = "30s")]
    expert_timeout: humantime::Duration,

    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(serde::Serialize)]
struct JsonOutput<'a> {
    generated: &'a [u32],
    prompt_last_logits: &'a [f32],
}

pub fn run(args: Args) -> Result<()> {
    let (temperature, top_p, top_k, min_p) = (args.temperature, args.top_p, args.top_k, args.min_p);
    let sampling = Sampling { temperature, top_p, top_k, min_p, seed: args.seed };
    sampling.validate()?;
    let distributed = args.workers.is_some() || !args.worker_addr.is_empty();
    let model = if distributed { Model::load_dense(&args.model) } else { Model::load(&args.model) }
        .with_context(|| format!("load model from {}", args.model.display()))?;
    let tokenizer = match (&args.prompt, args.json) {
        (Some(_), _) | (None, false) => TextTokenizer::load(&args.model).ok(),
        (None, true) => None,
    };
    let prompt = match (&args.prompt_ids, &args.prompt_ids_file, &args.prompt) {
        (Some(ids), _, _) => ids.clone(),
        (None, Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
            text.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|t| !t.is_empty())
                .map(|t| t.parse::<u32>().with_context(|| format!("{}: `{t}` is not a token id", path.display())))
                .collect::<Result<Vec<_>>>()?
        }
        (None, None, Some(text)) => {
            let tokenizer = TextTokenizer::load(&args.model).context("encode --prompt")?;
            tokenizer.encode(text).context("encode --prompt")?
        }
        (None, None, None) => bail!("give a prompt with --prompt-ids, --prompt-ids-file or --prompt"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut dispatch_summary = None;
    let run = if distributed {
        let cfg = &model.config;
        let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
        let experts = RemoteExperts::new(
            Arc::new(WorkerPool::empty()),
            runtime.handle().clone(),
            cfg.hidden_size,
            *args.expert_timeout,
            *args.expert_timeout,
        );
        runtime.block_on(async {
            match args.workers {
                Some(n) => {
                    let cluster = LocalCluster::start(&args.model, n, args.replicas, args.device, None).await?;
                    cluster.attach_router("generate", &experts, cfg).await
                }
                None => {
                    let targets: Vec<Target> = args.worker_addr.iter().map(Target::addr).collect();
                    let tls = args.tls.client()?;
                    let pool = WorkerPool::connect(&targets, cfg, &model.fingerprint, tls.as_ref())
                        .await
                        .context("connect to the expert workers")?;
                    experts.set_pool(Arc::new(pool));
                    anyhow::Ok(())
                }
            }
        })?;
        tracing::info!(workers = experts.pool().workers.len(), "connected to the expert workers; generating");
        let run =
            myriad_model::generate_with(&model, &prompt, args.max_new_tokens, &sampling, args.ignore_eos, &experts)
                .context("generate")?;
        dispatch_summary = Some(summarize(experts.stats()));
        run
    } else {
        myriad_model::generate(&model, &prompt, args.max_new_tokens, &sampling, args.ignore_eos).context("generate")?
    };

    let mut stdout = std::io::stdout().lock();
    if args.json {
        let out = JsonOutput { generated: &run.generated, prompt_last_logits: &run.prompt_last_logits };
        serde_json::to_writer(&mut stdout, &out).context("write output")?;
    } else {
        match tokenizer {
            Some(t) => write!(stdout, "{}", t.decode(&run.generated).context("decode output")?),
            None => write!(stdout, "{:?}", run.generated),
        }
        .context("write output")?;
    }
    writeln!(stdout).context("write output")?;
    // The speed summary goes to stderr, so stdout stays clean for --json.
    let decode_steps = run.generated.len().saturating_sub(1);
    eprintln!(
        "prefill: {} tokens at {:.1} tokens/s; decode: {} tokens at {:.1} tokens/s; sequence state {:.1} KiB",
        prompt.len(),
        prompt.len() as f64 / run.prefill_time.as_secs_f64(),
        decode_steps,
        decode_steps as f64 / run.decode_time.as_secs_f64().max(f64::EPSILON),
        run.state_bytes as f64 / 1024.0,
    );
    if let Some(summary) = dispatch_summary {
        eprintln!("{summary}");
    }
    Ok(())
}

/// One line about the expert traffic of a distributed run.
fn summarize(stats: &DispatchStats) -> String {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let per_token_layer = |bytes: u64| bytes as f64 / get(&stats.token_layers).max(1) as f64;
    format!(
        "dispatch: {:.0} bytes per token per MoE layer ({:.0} sent, {:.0} received), {} calls, {} retries",
        per_token_layer(get(&stats.bytes_sent) + get(&stats.bytes_received)),
        per_token_layer(get(&stats.bytes_sent)),
        per_token_layer(get(&stats.bytes_received)),
        get(&stats.calls),
        get(&stats.retries),
    )
}
