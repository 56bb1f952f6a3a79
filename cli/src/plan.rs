//! `myriad plan`: the memory plan of a model config over a set of workers,
//! without any weights.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use myriad_coordinator::placement::{self, Load, Problem, human};

use crate::membership::parse_bytes;

/// How experts are held in worker memory.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ExpertDtype {
    /// What the CPU backend holds today.
    F32,
    Bf16,
    Fp8,
    /// DeepSeek-V4's released routed-expert format (ignoring scale factors).
    Fp4,
}

impl ExpertDtype {
    /// Bytes per parameter, in eighths (fp4 is half a byte).
    fn eighths(self) -> u64 {
        match self {
            ExpertDtype::F32 => 32,
            ExpertDtype::Bf16 => 16,
            ExpertDtype::Fp8 => 8,
            ExpertDtype::Fp4 => 4,
        }
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
    #[arg(long, value_parser = parse_bytes)]
    capacity: u64,

    /// Copies of every expert, on distinct workers.
    #[arg(long, default_value_t = 1)]
    replicas: usize,

    /// Extra copies per layer for hot experts (DeepSeek's "redundant experts").
    #[arg(long, default_value_t = 0)]
    redundant: usize,

    /// Format experts are held in.
    #[arg(long, value_enum, default_value = "f32")]
    expert_dtype: ExpertDtype,
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

fn read_shape(path: &Path) -> Result<Shape> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("read the model shape from {}", path.display()))
}

/// Bytes of one routed expert: gate, up and down projections.
pub fn expert_bytes(hidden: usize, intermediate: usize, dtype: ExpertDtype) -> u64 {
    (3 * hidden as u64 * intermediate as u64 * dtype.eighths()).div_ceil(8)
}

pub fn run(args: Args) -> Result<()> {
    let shape = read_shape(&args.config)?;
    let each = expert_bytes(shape.hidden_size, shape.moe_intermediate_size, args.expert_dtype);
    let problem = Problem {
        layers: shape.num_hidden_layers,
        experts: shape.n_routed_experts,
        expert_bytes: each,
        capacities: vec![Some(args.capacity); args.workers],
        replicas: args.replicas,
        redundant: args.redundant,
    };
    println!(
        "model: {} layers x {} routed experts; one expert = 3 x {} x {} params = {} ({:?})",
        shape.num_hidden_layers,
        shape.n_routed_experts,
        shape.hidden_size,
        shape.moe_intermediate_size,
        human(each),
        args.expert_dtype
    );
    println!(
        "workers: {} x {} = {}",
        args.workers,
        human(args.capacity),
        human(args.capacity.saturating_mul(args.workers as u64))
    );
    let plan = match placement::eplb(&problem, &Load::uniform(problem.layers, problem.experts)) {
        Ok(plan) => plan,
        Err(e) => bail!("{e}; add workers or capacity, or use fewer replicas or a smaller --expert-dtype"),
    };
    let copies = plan.copies();
    let total: u64 = copies.iter().sum();
    let (min, max) = (copies.iter().min().copied().unwrap_or(0), copies.iter().max().copied().unwrap_or(0));
    let base = (problem.layers * problem.experts * args.replicas) as u64;
    let extra = if total > base {
        format!(", plus {} redundant per layer", (total - base) / problem.layers.max(1) as u64)
    } else if args.redundant > 0 {
        ", no redundant copies: with no load reports every expert is equally hot".to_string()
    } else {
        String::new()
    };
    println!("copies: {total} ({} per expert{extra}) = {}", args.replicas, human(total.saturating_mul(each)));
    println!(
        "per worker: {min}-{max} experts, at most {} ({:.0}% of capacity)",
        human(max * each),
        (max * each) as f64 / args.capacity as f64 * 100.0
    );
    println!("the plan fits");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_sizes_by_format() {
        assert_eq!(expert_bytes(7168, 3072, ExpertDtype::F32), 3 * 7168 * 3072 * 4);
        assert_eq!(expert_bytes(7168, 3072, ExpertDtype::Fp4), 3 * 7168 * 3072 / 2);
        assert_eq!(human(80 << 30), "80.0 GiB");
    }
}
