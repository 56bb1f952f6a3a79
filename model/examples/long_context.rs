//! One long-context run of a model: a prompt of random token ids prefilled in
//! chunks, then optionally some greedy decode steps. Prints one JSON line:
//! prefill seconds and tokens/s, process CPU seconds, peak RSS, the sequence
//! state's size, and (with `--profile`) each part's thread time and GFLOP.
//! `scripts/bench_long_context.sh` runs it at several lengths and prints the
//! table; each length is its own process so peak RSS is its own.
//!
//! Usage: long_context MODEL_DIR TOKENS [--chunk N] [--decode N] [--profile]

use std::path::PathBuf;
use std::time::Instant;

use myriad_model::Model;
use myriad_model::generate::argmax;
use myriad_model::model::Logits;
use myriad_model::profile;

fn main() {
    if let Err(e) = run() {
        eprintln!("long_context: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: long_context MODEL_DIR TOKENS [--chunk N] [--decode N] [--profile]";
    let (dir, tokens) = match &args[..] {
        [dir, tokens, ..] => (PathBuf::from(dir), tokens.parse::<usize>().map_err(|e| format!("TOKENS: {e}"))?),
        _ => return Err(usage.into()),
    };
    let flag = |name: &str| -> Result<Option<usize>, String> {
        match args.iter().position(|a| a == name) {
            None => Ok(None),
            Some(i) => args.get(i + 1).and_then(|v| v.parse().ok()).map(Some).ok_or(format!("{name} needs a number")),
        }
    };
    let chunk = flag("--chunk")?.unwrap_or(tokens).max(1);
    let decode = flag("--decode")?.unwrap_or(0);
    profile::enable(args.iter().any(|a| a == "--profile"));

    let model = Model::load(&dir).map_err(|e| format!("load {}: {e}", dir.display()))?;
    let vocab = model.config.vocab_size as u64;
    // A fixed pseudo-random prompt (ids 3.., past the usual control tokens).
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let prompt: Vec<u32> = (0..tokens)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (3 + s % (vocab - 3)) as u32
        })
        .collect();

    let mut state = model.new_state();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut logits = Vec::new();
    for piece in prompt.chunks(chunk) {
        logits = model.forward(piece, &mut state, Logits::Last).map_err(|e| e.to_string())?;
    }
    let prefill = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let parts = profile::totals();
    profile::enable(false);

    let mut decode_ms = None;
    if decode > 0 {
        let started = Instant::now();
        for _ in 0..decode {
            let token = argmax(&logits);
            logits = model.forward(&[token], &mut state, Logits::Last).map_err(|e| e.to_string())?;
        }
        decode_ms = Some(started.elapsed().as_secs_f64() * 1e3 / decode as f64);
    }

    let parts: Vec<String> = parts
        .iter()
        .map(|(p, t, f)| {
            format!("{:?}: {{\"s\": {:.4}, \"gflop\": {:.3}}}", p.name(), t.as_secs_f64(), *f as f64 / 1e9)
        })
        .collect();
    println!(
        "{{\"tokens\": {tokens}, \"chunk\": {chunk}, \"prefill_s\": {prefill:.4}, \"tokens_per_s\": {:.1}, \
         \"cpu_s\": {cpu:.3}, \"peak_rss_mib\": {:.1}, \"state_mib\": {:.2}, \"decode_ms\": {}, \"parts\": {{{}}}}}",
        tokens as f64 / prefill,
        peak_rss_kib()? as f64 / 1024.0,
        state.size_bytes() as f64 / (1024.0 * 1024.0),
        decode_ms.map_or("null".into(), |m| format!("{m:.3}")),
        parts.join(", "),
    );
    Ok(())
}

/// User plus system CPU time of this process, all threads.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 12th and 13th of them, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: Vec<f64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    ticks.iter().sum::<f64>() / 100.0
}

/// The process's peak resident set (`VmHWM`).
fn peak_rss_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("read /proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmHWM in /proc/self/status".into())
}
