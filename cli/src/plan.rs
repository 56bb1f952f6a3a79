//! `myriad plan`: the memory plan of a model config over a set of workers,
//! without any weights.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use myriad_coordinator::placement::{self, Load, Problem, human};

use myriad_worker::membership::gpu_capacity;

use crate::membership::parse_bytes;

/// How experts are held in worker memory: workers keep them in the format
/// the checkpoint stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExpertDtype {
    F32,
    /// BF16 or F16.
    Bf16,
    /// Block-FP8 with one f32 scale per 128x128 block (the -Base release).
    Fp8,
    /// MXFP4 with one E8M0 scale byte per 32 inputs (V4-Flash and -Pro).
    Fp4,
}

impl ExpertDtype {
    /// The format a checkpoint's `config.json` says its routed experts are
    /// stored in: `expert_dtype` (DeepSeek's release), else `torch_dtype` /
    /// `dtype`, else f32.
    pub fn of_config(config: &serde_json::Value) -> Result<Self> {
        let field = |k: &str| config.get(k).and_then(|v| v.as_str());
        Ok(match field("expert_dtype").or_else(|| field("torch_dtype")).or_else(|| field("dtype")) {
            Some("fp4") => ExpertDtype::Fp4,
            Some("fp8") => ExpertDtype::Fp8,
            Some("bf16" | "bfloat16" | "float16" | "fp16") => ExpertDtype::Bf16,
            None | Some("float32" | "fp32") => ExpertDtype::F32,
            Some(other) => bail!("unknown expert format `{other}` in config.json; give --expert-dtype"),
        })
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// A model's config.json (only its shape fields are read).
    #[arg(long)]
    config: PathBuf,

    /// Expert workers.
    #[arg(long)]
    workers: usize,

    /// Memory for experts on each worker (e.g. `80GiB`).
    #[arg(long, value_parser = parse_bytes, required_unless_present = "gpu_memory")]
    capacity: Option<u64>,

    /// GPU workers (`--device cuda`) with this much GPU memory each (e.g.
    /// `141GiB`): experts get the share a GPU worker offers placement by
    /// default, and the plan says what the rest holds of batches in flight.
    #[arg(long, value_parser = parse_bytes, conflicts_with = "capacity")]
    gpu_memory: Option<u64>,

    /// Copies of every expert, on distinct workers.
    #[arg(long, default_value_t = 1)]
    replicas: usize,

    /// Extra copies per layer for hot experts (DeepSeek's "redundant experts").
    #[arg(long, default_value_t = 0)]
    redundant: usize,

    /// Workers per machine: copies of one expert go to different machines
    /// where there are enough (workers `0..K` on the first, and so on).
    #[arg(long, default_value_t = 1)]
    workers_per_node: usize,

    /// Balance across nodes first, then within each (EPLB's hierarchical
    /// step); needs --workers-per-node.
    #[arg(long)]
    hierarchical: bool,

    /// Format experts are held in (default: the one `config.json` names:
    /// `expert_dtype`, else `torch_dtype`, else f32).
    #[arg(long, value_enum)]
    expert_dtype: Option<ExpertDtype>,

    /// A recorded load to place for (`myriad ctl load > FILE`: tokens per
    /// expert per layer): prints the balance of the load-aware placement
    /// next to round robin's, and the copies it gives the hottest experts.
    #[arg(long)]
    load: Option<PathBuf>,
}

/// A recorded load matrix, as `myriad ctl load` writes it.
#[derive(serde::Deserialize)]
struct Recorded {
    layers: usize,
    experts: usize,
    tokens: Vec<Vec<f64>>,
}

/// Reads a recorded load and checks it against the model's shape.
fn read_load(path: &Path, shape: &Shape) -> Result<Load> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let r: Recorded = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a load record ({{\"layers\", \"experts\", \"tokens\"}}, as `myriad ctl load` writes)",
            path.display()
        )
    })?;
    if (r.layers, r.experts) != (shape.num_hidden_layers, shape.n_routed_experts) {
        bail!(
            "{} records {} layers x {} experts; the config has {} x {}",
            path.display(),
            r.layers,
            r.experts,
            shape.num_hidden_layers,
            shape.n_routed_experts
        );
    }
    if r.tokens.len() != r.layers || r.tokens.iter().any(|row| row.len() != r.experts) {
        bail!("{}: `tokens` must be {} rows of {} counts", path.display(), r.layers, r.experts);
    }
    if let Some((l, e)) = r
        .tokens
        .iter()
        .enumerate()
        .find_map(|(l, row)| row.iter().position(|t| !t.is_finite() || *t < 0.0).map(|e| (l, e)))
    {
        bail!("{}: layer {l}, expert {e}: a token count must be a finite number, at least 0", path.display());
    }
    Ok(Load { layers: r.layers, experts: r.experts, tokens: r.tokens.concat() })
}

/// The shape fields of a config.json, read leniently so that any
/// DeepSeek-V4 config (or a shape-only sketch of one) plans.
#[derive(serde::Deserialize)]
struct Shape {
    num_hidden_layers: usize,
    n_routed_experts: usize,
    hidden_size: usize,
    moe_intermediate_size: usize,
}

fn read_config(path: &Path) -> Result<(Shape, serde_json::Value)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let shape = serde_json::from_value(value.clone())
        .with_context(|| format!("read the model shape from {}", path.display()))?;
    Ok((shape, value))
}

/// Bytes one routed expert (gate, up and down projections) holds in a
/// worker, scales included: what `ExpertWeights::bytes` reports.
pub fn expert_bytes(hidden: usize, intermediate: usize, dtype: ExpertDtype) -> u64 {
    let (h, i) = (hidden as u64, intermediate as u64);
    let weights = 3 * h * i;
    match dtype {
        ExpertDtype::F32 => 4 * weights,
        ExpertDtype::Bf16 => 2 * weights,
        // Three [i,h]-sized projections, each with one f32 per 128x128 block.
        ExpertDtype::Fp8 => weights + 3 * 4 * h.div_ceil(128) * i.div_ceil(128),
        // Half a byte per weight, one scale byte per 32 inputs.
        ExpertDtype::Fp4 => weights / 2 + weights / 32,
    }
}

/// GPU memory one `(token, expert)` pair of a batch in flight takes at
/// most: its token's hidden state (shared by the token's other pairs on
/// the worker), its SwiGLU activations and its contribution (f32), and its
/// token, slot and weight (`worker/src/cuda/batch.rs`).
fn pair_bytes(hidden: usize, intermediate: usize) -> u64 {
    4 * (2 * hidden as u64 + intermediate as u64) + 12
}

/// Bytes one routed expert of the model in folder `model` holds in a
/// worker, in the format its config.json names.
pub fn model_expert_bytes(model: &Path) -> Result<u64> {
    let (shape, config) = read_config(&model.join("config.json"))?;
    Ok(expert_bytes(shape.hidden_size, shape.moe_intermediate_size, ExpertDtype::of_config(&config)?))
}

pub fn run(args: Args) -> Result<()> {
    let (shape, config) = read_config(&args.config)?;
    let dtype = match args.expert_dtype {
        Some(d) => d,
        None => ExpertDtype::of_config(&config)?,
    };
    let each = expert_bytes(shape.hidden_size, shape.moe_intermediate_size, dtype);
    let capacity = match (args.capacity, args.gpu_memory) {
        (Some(c), _) => c,
        (None, Some(gpu)) => gpu_capacity(gpu),
        (None, None) => bail!("give --capacity or --gpu-memory"),
    };
    let load = match &args.load {
        Some(path) => Some(read_load(path, &shape)?),
        None => None,
    };
    let problem = Problem {
        layers: shape.num_hidden_layers,
        experts: shape.n_routed_experts,
        expert_bytes: each,
        capacities: vec![Some(capacity); args.workers],
        replicas: args.replicas,
        redundant: args.redundant,
        nodes: (0..args.workers).map(|w| w / args.workers_per_node.max(1)).collect(),
        zones: Vec::new(),
        hierarchical: args.hierarchical,
    };
    println!(
        "model: {} layers x {} routed experts; one expert = 3 x {} x {} params = {} ({:?})",
        shape.num_hidden_layers,
        shape.n_routed_experts,
        shape.hidden_size,
        shape.moe_intermediate_size,
        human(each),
        dtype
    );
    if let Some(gpu) = args.gpu_memory {
        println!(
            "GPU workers: {} each, {} of it for experts ({}%, as a worker offers without --capacity)",
            human(gpu),
            human(capacity),
            (capacity as f64 / gpu as f64 * 100.0).round()
        );
    }
    println!(
        "workers: {} x {} = {}",
        args.workers,
        human(capacity),
        human(capacity.saturating_mul(args.workers as u64))
    );
    let uniform = Load::uniform(problem.layers, problem.experts);
    let plan = match placement::eplb(&problem, load.as_ref().unwrap_or(&uniform)) {
        Ok(plan) => plan,
        Err(e) => bail!("{e}; add workers or capacity, or use fewer replicas or a smaller --expert-dtype"),
    };
    let copies = plan.copies();
    let total: u64 = copies.iter().sum();
    let (min, max) = (copies.iter().min().copied().unwrap_or(0), copies.iter().max().copied().unwrap_or(0));
    let base = (problem.layers * problem.experts * args.replicas) as u64;
    let extra = if total > base {
        format!(", plus {} redundant per layer", (total - base) / problem.layers.max(1) as u64)
    } else if args.redundant > 0 && load.is_none() {
        ", no redundant copies: with no load reports every expert is equally hot (give --load)".to_string()
    } else {
        String::new()
    };
    println!("copies: {total} ({} per expert{extra}) = {}", args.replicas, human(total.saturating_mul(each)));
    println!(
        "per worker: {min}-{max} experts, at most {} ({:.0}% of capacity)",
        human(max * each),
        (max * each) as f64 / capacity as f64 * 100.0
    );
    if let Some(gpu) = args.gpu_memory {
        let left = gpu.saturating_sub(max * each);
        let pair = pair_bytes(shape.hidden_size, shape.moe_intermediate_size);
        // Half of it: a batch queue's buffers grow in powers of two.
        println!(
            "left on the fullest GPU: {} for the CUDA context and batches in flight (a (token, expert) pair \
             needs {} there): about {} pairs",
            human(left),
            human(pair),
            left / (2 * pair)
        );
    }
    if args.workers_per_node > 1 {
        let nodes = args.workers.div_ceil(args.workers_per_node);
        let crowded = plan.crowded_experts(&problem);
        println!("nodes: {nodes}; experts with two copies on one node that could be on two: {crowded}");
    }
    println!("the plan fits");
    if let Some(load) = &load {
        print_balance(&problem, &plan, load);
    }
    Ok(())
}

/// Balance of `plan` on the recorded load next to round robin's, and the
/// experts it gives the most copies.
fn print_balance(problem: &Problem, plan: &placement::Plan, load: &Load) {
    let baseline = placement::round_robin(&Problem { redundant: 0, ..problem.clone() });
    let baseline = baseline.map_or("does not fit".to_string(), |b| format!("{:.3}", b.balancedness(load)));
    println!(
        "on the recorded load, balancedness (mean / max worker load, 1 = even): {:.3} load-aware, {baseline} round robin",
        plan.balancedness(load)
    );
    let mut most: Vec<(usize, usize, usize)> = plan
        .holders
        .iter()
        .enumerate()
        .flat_map(|(l, layer)| layer.iter().enumerate().map(move |(e, h)| (h.len(), l, e)))
        .filter(|&(copies, ..)| copies > problem.replicas)
        .collect();
    most.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    if most.is_empty() {
        println!("no expert gets more than {} copies", problem.replicas);
        return;
    }
    let listed: Vec<String> =
        most.iter().take(8).map(|(copies, l, e)| format!("layer {l} expert {e}: {copies}")).collect();
    println!("most copies: {}{}", listed.join(", "), if most.len() > 8 { ", ..." } else { "" });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_sizes_by_format() {
        assert_eq!(expert_bytes(7168, 3072, ExpertDtype::F32), 3 * 7168 * 3072 * 4);
        assert_eq!(expert_bytes(7168, 3072, ExpertDtype::Fp4), 3 * 7168 * 3072 / 2 + 3 * 7168 * 3072 / 32);
        assert_eq!(expert_bytes(7168, 3072, ExpertDtype::Fp8), 3 * 7168 * 3072 + 3 * 4 * 56 * 24);
        // The tiny model's expert in MXFP4: model/tests/quantized.rs checks a
        // loaded expert holds exactly this.
        assert_eq!(expert_bytes(64, 32, ExpertDtype::Fp4), 3072 + 192);
        assert_eq!(human(80 << 30), "80.0 GiB");
    }

    /// What `plan` (and the coordinator) count per expert is exactly what a
    /// worker holds, for both release layouts.
    #[test]
    fn a_worker_holds_what_the_plan_counts() {
        use myriad_worker::ExpertBackend;
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        for (name, dtype) in [("release-flash", ExpertDtype::Fp4), ("release-base", ExpertDtype::Fp8)] {
            let dir = fixtures.join(name);
            let (shape, config) = read_config(&dir.join("config.json")).unwrap();
            assert_eq!(ExpertDtype::of_config(&config).unwrap(), dtype, "{name}");
            let backend =
                myriad_worker::backend::CpuBackend::load(&dir, &myriad_proto::spec::ExpertSpec::all()).unwrap();
            let each = expert_bytes(shape.hidden_size, shape.moe_intermediate_size, dtype);
            let hosted = backend.hosted().experts.len() as u64;
            assert_eq!(backend.bytes() as u64, hosted * each, "{name}");
        }
    }

    #[test]
    fn the_format_comes_from_the_config() {
        let of = |json: &str| ExpertDtype::of_config(&serde_json::from_str(json).unwrap());
        assert_eq!(of(r#"{"expert_dtype": "fp4", "torch_dtype": "bfloat16"}"#).unwrap(), ExpertDtype::Fp4);
        assert_eq!(of(r#"{"expert_dtype": "fp8"}"#).unwrap(), ExpertDtype::Fp8);
        assert_eq!(of(r#"{"torch_dtype": "bfloat16"}"#).unwrap(), ExpertDtype::Bf16);
        assert_eq!(of("{}").unwrap(), ExpertDtype::F32);
        assert!(of(r#"{"expert_dtype": "int3"}"#).unwrap_err().to_string().contains("int3"));
    }
}
