//! Placement balance on skewed synthetic load: Myriad's `eplb` against
//! DeepSeek's published EPLB algorithm (implemented below from its
//! description: replicate the expert with the highest load per replica,
//! then pack replicas heaviest first into the least-loaded GPU that has a
//! free slot, every GPU with the same number of slots) and round robin, on
//! the same traces. Balancedness = mean / max load per worker, averaged
//! over layers; 1 is perfect.
//!
//! Run: `cargo bench -p myriad-coordinator --bench placement`

use std::time::Instant;

use myriad_coordinator::placement::{Load, Migration, Plan, Problem, eplb, rebalance, round_robin};
use myriad_model::generate::Rng;

/// Uniform in `[0, 1)`, from the model's deterministic generator (seeded,
/// every run sees the same traces).
fn unit(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Zipf-like load: the expert of rank r gets tokens ∝ 1 / (r + 1)^skew,
/// ranks shuffled per layer, with ±10% noise.
fn trace(layers: usize, experts: usize, skew: f64, rng: &mut Rng) -> Load {
    let mut tokens = Vec::with_capacity(layers * experts);
    for _ in 0..layers {
        let mut ranks: Vec<usize> = (0..experts).collect();
        for i in (1..experts).rev() {
            ranks.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for &r in &ranks {
            tokens.push(1e4 / ((r + 1) as f64).powf(skew) * (0.9 + 0.2 * unit(rng)));
        }
    }
    Load { layers, experts, tokens }
}

/// `load` after a drift: every expert's tokens times e^(σ·N(0,1)).
fn drifted(load: &Load, sigma: f64, rng: &mut Rng) -> Load {
    let tokens = load
        .tokens
        .iter()
        .map(|t| {
            // Box-Muller: one standard normal from two uniforms.
            let (u, v) = (unit(rng).max(1e-12), unit(rng));
            t * (sigma * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()).exp()
        })
        .collect();
    Load { tokens, ..load.clone() }
}

/// DeepSeek's EPLB for one layer group (no node hierarchy).
fn deepseek_eplb(load: &Load, workers: usize, redundant: usize) -> Plan {
    let mut holders = Vec::with_capacity(load.layers);
    for l in 0..load.layers {
        let w = |e: usize| load.tokens[l * load.experts + e];
        let mut count = vec![1usize; load.experts];
        for _ in 0..redundant {
            let e = (0..load.experts).max_by(|&a, &b| (w(a) / count[a] as f64).total_cmp(&(w(b) / count[b] as f64)));
            if let Some(e) = e {
                count[e] += 1;
            }
        }
        let mut items: Vec<(f64, usize)> =
            (0..load.experts).flat_map(|e| std::iter::repeat_n((w(e) / count[e] as f64, e), count[e])).collect();
        items.sort_by(|a, b| b.0.total_cmp(&a.0));
        let slots = items.len() / workers;
        let mut pack_load = vec![0.0f64; workers];
        let mut pack_items = vec![0usize; workers];
        let mut layer = vec![Vec::new(); load.experts];
        for (weight, e) in items {
            let g = (0..workers)
                .filter(|&g| pack_items[g] < slots)
                .min_by(|&a, &b| pack_load[a].total_cmp(&pack_load[b]))
                .expect("slots divide evenly");
            pack_load[g] += weight;
            pack_items[g] += 1;
            layer[e].push(g);
        }
        holders.push(layer);
    }
    Plan { workers, holders }
}

/// One copy of every expert plus `redundant` per layer, no memory limit.
fn problem(layers: usize, experts: usize, workers: usize, redundant: usize) -> Problem {
    Problem {
        layers,
        experts,
        expert_bytes: 1,
        capacities: vec![None; workers],
        replicas: 1,
        redundant,
        nodes: vec![],
        zones: vec![],
        hierarchical: false,
    }
}

fn main() {
    let mut rng = Rng::new(42);
    println!(
        "| experts | workers | redundant/layer | skew | round robin | DeepSeek EPLB | Myriad eplb | Myriad / EPLB | Myriad ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let (mut sum_ratio, mut cases) = (0.0, 0);
    for (experts, workers) in [(64, 8), (256, 16), (256, 32), (384, 64)] {
        for redundant in [0, workers] {
            for skew in [0.6, 1.0, 1.4] {
                let layers = 8;
                let load = trace(layers, experts, skew, &mut rng);
                let problem = problem(layers, experts, workers, redundant);
                let rr =
                    round_robin(&Problem { redundant: 0, ..problem.clone() }).expect("round robin").balancedness(&load);
                let reference = deepseek_eplb(&load, workers, redundant).balancedness(&load);
                let start = Instant::now();
                let ours = eplb(&problem, &load).expect("eplb").balancedness(&load);
                let ms = start.elapsed().as_secs_f64() * 1e3;
                println!(
                    "| {experts} | {workers} | {redundant} | {skew} | {rr:.3} | {reference:.3} | {ours:.3} | {:.3} | {ms:.0} |",
                    ours / reference
                );
                sum_ratio += ours / reference;
                cases += 1;
            }
        }
    }
    println!("mean Myriad / DeepSeek EPLB balancedness over {cases} traces: {:.3}", sum_ratio / cases as f64);
    // The whole V4-Pro shape, as the coordinator places it.
    for skew in [1.0, 1.4] {
        let (layers, experts, workers) = (61, 384, 64);
        let load = trace(layers, experts, skew, &mut rng);
        let problem = problem(layers, experts, workers, workers);
        let start = Instant::now();
        let ours = eplb(&problem, &load).expect("eplb").balancedness(&load);
        let secs = start.elapsed().as_secs_f64();
        let reference = deepseek_eplb(&load, workers, workers).balancedness(&load);
        println!(
            "V4-Pro shape ({layers} layers x {experts} experts, {workers} workers + {workers} redundant), skew {skew}: \
             DeepSeek EPLB {reference:.3}, Myriad {ours:.3}, placed in {secs:.2} s"
        );
    }
    migration(&mut rng);
    spread(&mut rng);
    joins(&mut rng);
}

/// Workers eight to a machine: balance with and without the machine
/// labels, the experts with two copies on one machine that could be on
/// two, and the hierarchical mode (machines first, then their workers).
fn spread(rng: &mut Rng) {
    println!(
        "\n| experts | workers | machines | skew | balance, no labels | crowded | balance, labelled | crowded | machine balance | hierarchical: balance | machine balance |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (experts, workers) in [(256, 32), (384, 64)] {
        for skew in [1.0, 1.4] {
            let layers = 8;
            let load = trace(layers, experts, skew, rng);
            let flat = problem(layers, experts, workers, workers);
            let labelled = Problem { nodes: (0..workers).map(|w| w / 8).collect(), ..flat.clone() };
            let (a, b) = (eplb(&flat, &load).expect("eplb"), eplb(&labelled, &load).expect("eplb"));
            let c = eplb(&Problem { hierarchical: true, ..labelled.clone() }, &load).expect("eplb");
            println!(
                "| {experts} | {workers} | {} | {skew} | {:.3} | {} | {:.3} | {} | {:.4} | {:.3} | {:.4} |",
                workers / 8,
                a.balancedness(&load),
                a.crowded_experts(&labelled),
                b.balancedness(&load),
                b.crowded_experts(&labelled),
                machine_balance(&b, &load, 8),
                c.balancedness(&load),
                machine_balance(&c, &load, 8)
            );
        }
    }
}

/// A serving cluster whose load drifts: the fresh plan for the new load
/// against [`rebalance`] from the current placement (tolerance 0.01, then
/// also at most two experts loaded per worker). Moved bytes at the shape's
/// expert size in MXFP4 (V4-Flash 4096 x 2048, V4-Pro 7168 x 3072).
fn migration(rng: &mut Rng) {
    println!(
        "\n| experts | workers | drift σ | current | fresh | fresh moves | rebalance | moves | ≤2/worker | moves | ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (experts, workers, hidden, inter) in [(256, 32, 4096u64, 2048u64), (384, 64, 7168, 3072)] {
        let expert_gib = (3 * hidden * inter) as f64 * (0.5 + 1.0 / 32.0) / (1u64 << 30) as f64;
        for sigma in [0.1, 0.3, 0.6] {
            let layers = 8;
            let before = trace(layers, experts, 1.0, rng);
            let after = drifted(&before, sigma, rng);
            let p = problem(layers, experts, workers, workers);
            let current = eplb(&p, &before).expect("eplb");
            let fresh = eplb(&p, &after).expect("eplb");
            let start = Instant::now();
            let loose = Migration { current: &current, max_move: None, tolerance: 0.01 };
            let ours = rebalance(&p, &after, &loose).expect("rebalance");
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let bounded = Migration { max_move: Some(2), ..loose };
            let tight = rebalance(&p, &after, &bounded).expect("rebalance");
            let moved = |plan: &Plan| {
                let copies: usize = plan.moved(&current).iter().sum();
                format!("{copies} ({:.1} GiB)", copies as f64 * expert_gib)
            };
            println!(
                "| {experts} | {workers} | {sigma} | {:.3} | {:.3} | {} | {:.3} | {} | {:.3} | {} | {ms:.0} |",
                current.balancedness(&after),
                fresh.balancedness(&after),
                moved(&fresh),
                ours.balancedness(&after),
                moved(&ours),
                tight.balancedness(&after),
                moved(&tight)
            );
        }
    }
}

/// One worker joins a cluster of `workers - 1` (`workers` redundant
/// copies per layer), idle (every expert's load equal) or serving a skewed
/// trace: the copies [`rebalance`] (tolerance 0.01, no move bound) and a
/// fresh plan load, against the joined worker's share (the least any
/// switch to a plan that uses it loads).
fn joins(rng: &mut Rng) {
    println!(
        "\n| layers | experts | workers | load | joined worker's copies | rebalance loads | / share | balance | fresh plan loads | / share | balance |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (layers, experts, workers) in [(8, 256, 32), (61, 384, 64)] {
        let skewed = trace(layers, experts, 1.0, rng);
        for (name, load) in [("idle", Load::uniform(layers, experts)), ("skew 1", skewed)] {
            let before = eplb(&problem(layers, experts, workers - 1, workers), &load).expect("eplb");
            let current = Plan { workers, holders: before.holders };
            let migration = Migration { current: &current, max_move: None, tolerance: 0.01 };
            let p = problem(layers, experts, workers, workers);
            let next = rebalance(&p, &load, &migration).expect("rebalance");
            let fresh = eplb(&p, &load).expect("eplb");
            let share = next.copies()[workers - 1];
            let loaded = |plan: &Plan| plan.moved(&current).iter().sum::<usize>();
            let per_share = |plan: &Plan| loaded(plan) as f64 / share.max(1) as f64;
            println!(
                "| {layers} | {experts} | {workers} | {name} | {share} | {} | {:.2} | {:.3} | {} | {:.2} | {:.3} |",
                loaded(&next),
                per_share(&next),
                next.balancedness(&load),
                loaded(&fresh),
                per_share(&fresh),
                fresh.balancedness(&load)
            );
        }
    }
}

/// Mean over layers of mean / max load per machine of `per` workers, an
/// expert's load split evenly over its copies.
fn machine_balance(plan: &Plan, load: &Load, per: usize) -> f64 {
    let machines = plan.workers.div_ceil(per);
    let mut sum = 0.0;
    for (l, layer) in plan.holders.iter().enumerate() {
        let mut on = vec![0.0; machines];
        for (e, h) in layer.iter().enumerate() {
            for &w in h {
                on[w / per] += load.tokens[l * load.experts + e] / h.len() as f64;
            }
        }
        let max = on.iter().copied().fold(0.0, f64::max);
        sum += on.iter().sum::<f64>() / machines as f64 / max;
    }
    sum / plan.holders.len() as f64
}
