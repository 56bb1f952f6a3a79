//! The expert-parallel data plane end to end: real `myriad` processes, real
//! gRPC on loopback ports, workers killed with SIGKILL.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn myriad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_myriad")).args(args).current_dir(root()).output().expect("run myriad")
}

fn fixture_prompt(name: &str, case: usize) -> String {
    let path = root().join("tests/fixtures").join(name).join("expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"][case]["prompt"].as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn generate(model: &str, prompt: &str, new_tokens: &str, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--model", model, "--prompt-ids", prompt, "--max-new-tokens", new_tokens];
    args.extend(["--ignore-eos", "--json"]);
    args.extend(extra);
    let out = myriad(&args);
    assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn distributed_output_is_byte_identical_to_one_process() {
    for (model, prompt) in [
        ("tests/fixtures/mixed-f32", fixture_prompt("mixed-f32", 1)),
        ("models/tiny-v4", "5,17,42,300,7,99,8,250".to_string()),
    ] {
        let single = generate(model, &prompt, "12", &[]).stdout;
        for (workers, replicas) in [("1", "1"), ("2", "1"), ("3", "1"), ("5", "1"), ("3", "2"), ("5", "3")] {
            let out = generate(model, &prompt, "12", &["--workers", workers, "--replicas", replicas]);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&single),
                "{model}: {workers} workers, {replicas} replicas"
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("bytes per token per MoE layer") && stderr.contains("0 retries"), "{stderr}");
        }
    }
}

/// A `myriad worker` process, killed when dropped.
struct WorkerProcess {
    child: Child,
    addr: String,
}

impl WorkerProcess {
    fn start(model: &str, spec: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_myriad"))
            .args(["worker", "--listen", "127.0.0.1:0", "--model", model, "--experts", spec])
            .current_dir(root())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr =
            line.split_whitespace().nth(3).unwrap_or_else(|| panic!("unexpected worker banner `{line}`")).to_string();
        WorkerProcess { child, addr }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Specs for `workers` workers, each (layer, expert) on `replicas` of them.
fn specs(layers: u32, experts: u32, workers: u32, replicas: u32) -> Vec<String> {
    (0..workers)
        .map(|w| {
            let pairs: Vec<String> = (0..layers)
                .flat_map(|l| (0..experts).map(move |e| (l, e)))
                .filter(|&(l, e)| (0..replicas).any(|r| ((l * experts + e) % workers + r) % workers == w))
                .map(|(l, e)| format!("{l}:{e}"))
                .collect();
            pairs.join(",")
        })
        .collect()
}

/// Runs a long generation against `workers` and SIGKILLs `workers[victim]`
/// once the router is generating. Returns the router's output.
fn generate_and_kill(workers: &mut [WorkerProcess], victim: usize, prompt: &str, new_tokens: &str) -> Output {
    let mut args: Vec<String> = ["generate", "--model", "tests/fixtures/mixed-f32", "--prompt-ids", prompt]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--max-new-tokens", new_tokens, "--ignore-eos", "--json", "--expert-timeout", "5s"].map(String::from));
    for w in workers.iter() {
        args.extend(["--worker-addr".to_string(), w.addr.clone()]);
    }
    let mut router = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(&args)
        .current_dir(root())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start router");
    let mut stderr = BufReader::new(router.stderr.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains("generating") {
        assert!(Instant::now() < deadline, "router never started generating: {seen}");
        if stderr.read_line(&mut seen).unwrap() == 0 {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    workers[victim].child.kill().expect("SIGKILL the worker");
    let stdout = router.stdout.take().unwrap();
    let collector = std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
        rest
    });
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut BufReader::new(stdout), &mut out).unwrap();
    let status = router.wait().unwrap();
    seen.push_str(&collector.join().unwrap());
    Output { status, stdout: out, stderr: seen.into_bytes() }
}

#[test]
fn a_worker_killed_mid_generation_costs_nothing_with_replicas() {
    let prompt = fixture_prompt("mixed-f32", 1);
    let new_tokens = "3000";
    let fault_free = generate("tests/fixtures/mixed-f32", &prompt, new_tokens, &[]);
    let mut workers: Vec<WorkerProcess> =
        specs(5, 8, 3, 2).iter().map(|s| WorkerProcess::start("tests/fixtures/mixed-f32", s)).collect();
    let out = generate_and_kill(&mut workers, 1, &prompt, new_tokens);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "router failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&fault_free.stdout));
    let retries: u64 = stderr
        .split("calls, ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no dispatch summary in: {stderr}"));
    assert!(retries > 0, "the worker died after the generation: no retry happened\n{stderr}");
}

#[test]
fn a_worker_killed_without_replicas_fails_the_request_with_a_clear_error() {
    let prompt = fixture_prompt("mixed-f32", 1);
    let mut workers: Vec<WorkerProcess> =
        specs(5, 8, 2, 1).iter().map(|s| WorkerProcess::start("tests/fixtures/mixed-f32", s)).collect();
    let out = generate_and_kill(&mut workers, 0, &prompt, "3000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "generation should fail: {stderr}");
    let addr = &workers[0].addr;
    assert!(
        stderr.contains("layer ") && stderr.contains(addr.as_str()) && stderr.contains("no live worker hosts expert"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn workers_that_miss_experts_or_serve_another_model_are_refused() {
    let prompt = fixture_prompt("mixed-f32", 0);
    let refused = |addr: &str, want: &str| {
        let out = myriad(&[
            "generate",
            "--model",
            "tests/fixtures/mixed-f32",
            "--prompt-ids",
            &prompt,
            "--worker-addr",
            addr,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{addr}: `{stderr}` should mention `{want}`");
    };
    let partial = WorkerProcess::start("tests/fixtures/mixed-f32", &specs(5, 8, 2, 1)[0]);
    refused(&partial.addr, "is hosted by no worker");
    let other = WorkerProcess::start("models/tiny-v4", "*:*");
    refused(&other.addr, "another checkpoint");
    refused("127.0.0.1:1", "127.0.0.1:1");
}
