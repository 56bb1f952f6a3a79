//! `myriad plan` on a config with V4-Pro's expert shape (61 layers × 384
//! experts, hidden 7168, expert width 3072): fits or is refused with why.

use std::process::Command;

const SHAPE: &str =
    r#""num_hidden_layers": 61, "n_routed_experts": 384, "hidden_size": 7168, "moe_intermediate_size": 3072"#;

fn plan(extra: &[&str]) -> (bool, String) {
    plan_config(&format!("{{{SHAPE}}}"), extra)
}

fn plan_config(json: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, json).unwrap();
    let mut args = vec!["plan", "--config", config.to_str().unwrap(), "--workers", "64", "--capacity", "80GiB"];
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
