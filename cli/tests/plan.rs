//! `myriad plan` on a config with V4-Pro's expert shape (61 layers × 384
//! experts, hidden 7168, expert width 3072): fits or is refused with why.

use std::process::Command;

const SHAPE: &str =
    r#""num_hidden_layers": 61, "n_routed_experts": 384, "hidden_size": 7168, "moe_intermediate_size": 3072"#;

fn plan(extra: &[&str]) -> (bool, String) {
    plan_config(&format!("{{{SHAPE}}}"), extra)
}

fn plan_config(json: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["--workers", "64", "--capacity", "80GiB"];
    args.extend(extra);
    run(json, &args)
}

/// `myriad plan --config C ARGS` on the config `json`: whether it fit, and
/// what it printed.
fn run(json: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, json).unwrap();
    let mut args = vec!["plan", "--config", config.to_str().unwrap()];
    args.extend(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_myriad")).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_v4_pro_shaped_plan_fits_in_fp4_and_not_in_f32() {
    let (ok, text) = plan(&["--expert-dtype", "fp4", "--replicas", "2"]);
    assert!(ok, "{text}");
    assert!(text.contains("copies: 46848 (2 per expert)"), "{text}");
    assert!(text.contains("per worker: 732-732 experts, at most 23.9 GiB (30% of capacity)"), "{text}");
    // The release's config.json names the format: the same plan without the flag.
    let (ok, from_config) = plan_config(&format!(r#"{{{SHAPE}, "expert_dtype": "fp4"}}"#), &["--replicas", "2"]);
    assert!(ok && from_config == text, "{from_config}");

    let (ok, text) = plan(&[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("does not fit: 23424 expert copies of 252.0 MiB need 5.6 TiB, the workers have 5.0 TiB"),
        "{text}"
    );
}

/// GPU workers plan with the share of their memory a GPU worker offers
/// placement, and the plan says what the rest holds of batches in flight.
#[test]
fn gpu_workers_plan_with_their_memory() {
    let pro = format!(r#"{{{SHAPE}, "expert_dtype": "fp4"}}"#);
    let (ok, text) = run(&pro, &["--workers", "8", "--gpu-memory", "141GiB"]);
    assert!(ok, "{text}");
    assert!(text.contains("GPU workers: 141.0 GiB each, 126.9 GiB of it for experts (90%"), "{text}");
    assert!(text.contains("per worker: 2928-2928 experts, at most 95.7 GiB (75% of capacity)"), "{text}");
    // 45.3 GiB left; a pair takes 4 x (2 x 7168 + 3072) + 12 bytes, and
    // queues grow in powers of two.
    let left = 141u64 * (1 << 30) - 2928 * (3 * 7168 * 3072 / 2 + 3 * 7168 * 3072 / 32);
    let pairs = left / (2 * (4 * (2 * 7168 + 3072) + 12));
    assert!(
        text.contains("left on the fullest GPU: 45.3 GiB") && text.contains(&format!("about {pairs} pairs")),
        "{text}"
    );
    // 80 GB GPUs offer 72 GiB each: V4-Pro's experts do not fit on eight.
    let (ok, text) = run(&pro, &["--workers", "8", "--gpu-memory", "80GiB"]);
    assert!(!ok && text.contains("the workers have 576.0 GiB"), "{text}");
    // One budget or the other.
    let (ok, text) = run(&pro, &["--workers", "8", "--gpu-memory", "80GiB", "--capacity", "70GiB"]);
    assert!(!ok && text.contains("cannot be used with"), "{text}");
}

/// A recorded load in `myriad ctl load`'s format: Zipf-skewed per layer,
/// each layer's hot experts in a different place.
fn zipf_load(layers: usize, experts: usize, skew: f64) -> String {
    let tokens: Vec<Vec<f64>> = (0..layers)
        .map(|l| (0..experts).map(|e| (1e4 / (((e * 97 + l * 31) % experts + 1) as f64).powf(skew)).round()).collect())
        .collect();
    serde_json::json!({"layers": layers, "experts": experts, "tokens": tokens}).to_string()
}

fn plan_with_load(load: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("load.json");
    std::fs::write(&path, load).unwrap();
    let mut args = vec!["--expert-dtype", "fp4", "--load", path.to_str().unwrap()];
    args.extend(extra);
    plan(&args)
}

#[test]
fn a_recorded_load_is_placed_and_compared_with_round_robin() {
    let (ok, text) = plan_with_load(&zipf_load(61, 384, 1.2), &["--redundant", "64"]);
    assert!(ok, "{text}");
    assert!(text.contains("plus 64 redundant per layer"), "{text}");
    let line = text.lines().find(|l| l.starts_with("on the recorded load")).expect(&text);
    let numbers: Vec<f64> = line.split(' ').filter_map(|w| w.trim_end_matches(',').parse().ok()).collect();
    let (ours, round_robin) = (numbers[numbers.len() - 2], numbers[numbers.len() - 1]);
    assert!(ours >= 0.99 && round_robin < 0.5, "{line}");
    assert!(text.contains("most copies: layer"), "{text}");
    // Eight workers a machine: no expert left with two copies on one
    // machine that could be on two.
    let (ok, text) = plan_with_load(&zipf_load(61, 384, 1.2), &["--redundant", "64", "--workers-per-node", "8"]);
    assert!(ok && text.contains("nodes: 8; experts with two copies on one node that could be on two: 0"), "{text}");
    // Node first (EPLB's hierarchical step): still a plan that fits.
    let extra = ["--redundant", "64", "--workers-per-node", "8", "--hierarchical"];
    let (ok, text) = plan_with_load(&zipf_load(61, 384, 1.2), &extra);
    assert!(ok && text.contains("the plan fits") && text.contains("load-aware"), "{text}");
}

#[test]
fn a_load_of_another_shape_or_with_bad_counts_is_refused() {
    let (ok, text) = plan_with_load(&zipf_load(8, 64, 1.0), &[]);
    assert!(!ok && text.contains("records 8 layers x 64 experts; the config has 61 x 384"), "{text}");
    let mut bad = zipf_load(61, 384, 1.0);
    bad = bad.replacen("10000.0", "-1.0", 1);
    let (ok, text) = plan_with_load(&bad, &[]);
    assert!(!ok && text.contains("a token count must be a finite number, at least 0"), "{text}");
    let (ok, text) = plan_with_load("{\"tokens\": []}", &[]);
    assert!(!ok && text.contains("is not a load record"), "{text}");
}
