//! `myriad generate` as a user runs it: a real process, real files.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn myriad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_myriad")).args(args).current_dir(root()).output().expect("run myriad")
}

fn expected(name: &str) -> Value {
    let path = root().join("tests/fixtures").join(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn json_output_matches_the_reference() {
    let case = &expected("mixed-f32")["cases"][1];
    let prompt: Vec<String> = ids(&case["prompt"]).iter().map(u64::to_string).collect();
    let new = ids(&case["generated"]).len().to_string();
    let out = myriad(&[
        "generate",
        "--model",
        "tests/fixtures/mixed-f32",
        "--prompt-ids",
        &prompt.join(","),
        "--max-new-tokens",
        &new,
        "--ignore-eos",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(ids(&got["generated"]), ids(&case["generated"]));
    let (ours, reference) = (floats(&got["prompt_last_logits"]), floats(&case["prompt_last_logits"]));
    assert_eq!(ours.len(), reference.len());
    let worst = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "prompt_last_logits differ by {worst}");
}

#[test]
fn text_prompt_goes_through_the_tokenizer() {
    let case = &expected("tiny-v4")["cases"][0];
    let text = case["prompt_text"].as_str().unwrap();
    let new = ids(&case["generated"]).len().to_string();
    let out = myriad(&["generate", "--prompt", text, "--max-new-tokens", &new, "--ignore-eos", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&got["generated"]), ids(&case["generated"]));

    // Human output: decoded text on stdout, a speed summary on stderr.
    let out = myriad(&["generate", "--prompt", text, "--max-new-tokens", "4"]);
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("prefill:") && summary.contains("tokens/s"), "{summary}");
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let run = |seed: &str| {
        let out = myriad(&[
            "generate",
            "--prompt-ids",
            "5,17,42",
            "--max-new-tokens",
            "24",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ids(&serde_json::from_slice::<Value>(&out.stdout).unwrap()["generated"])
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn bad_invocations_fail_with_a_message_not_a_panic() {
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "--prompt-ids", "5,x"], "invalid value"),
        (&["generate", "--prompt-ids", "5,100000"], "outside the vocabulary"),
        (&["generate", "--prompt-ids", "5", "--model", "/nonexistent"], "not a model folder"),
        (&["generate", "--prompt-ids", "5", "--temperature=-1"], "temperature"),
        (&["generate", "--prompt-ids", "5", "--model", "tests/fixtures/mixed-f32", "--prompt", "hi"], "cannot be used"),
        (&["generate", "--prompt", "hi", "--model", "tests/fixtures/mixed-f32"], "no tokenizer.json"),
        (&["generate"], "required"),
        (&["generate", "--prompt-ids", "5", "--workers", "2", "--device", "tpu"], "expected `cpu`, `cuda` or `cuda:N`"),
        (&["generate", "--prompt-ids", "5", "--device", "cuda"], "--workers"),
        // Tests run the default build; one with the `cuda` feature says
        // instead that this machine has no driver (worker/src/device.rs).
        (&["generate", "--prompt-ids", "5", "--workers", "2", "--device", "cuda"], "built without CUDA support"),
        (
            &["worker", "--experts", "*:*", "--listen", "127.0.0.1:0", "--device", "cuda:1"],
            "built without CUDA support",
        ),
    ];
    for (args, want) in cases {
        let out = myriad(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(want), "{args:?}: `{stderr}` should mention `{want}`");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}
