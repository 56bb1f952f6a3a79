//! One long-context run of a model: a prompt of random token ids prefilled in
//! chunks, then optionally some greedy decode steps. Prints one JSON line:
//! prefill seconds and tokens/s, process CPU seconds, peak RSS, the sequence
//! state's size, and (with `--profile`) each part's thread time and GFLOP,
//! for the prefill and for the decode steps.
//! `scripts/bench_long_context.sh` runs it at several lengths and prints the
//! table; each length is its own process so peak RSS is its own.
//!
//! With `--decode N`, N greedy decode steps are timed from each context in
//! `--decode-at L,…` (default: the whole prompt), interleaved over
//! `--rounds` rounds on copies of the states saved during the prefill, so
//! short and long contexts are compared under the same conditions.
//!
//! Usage: long_context MODEL_DIR TOKENS [--chunk N] [--decode N]
//!        [--decode-at L,…] [--rounds R] [--profile]

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
    let usage =
        "usage: long_context MODEL_DIR TOKENS [--chunk N] [--decode N] [--decode-at L,…] [--rounds R] [--profile]";
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
    let rounds = flag("--rounds")?.unwrap_or(3).max(1);
    let decode_at: Vec<usize> = match args.iter().position(|a| a == "--decode-at") {
        None => vec![tokens],
        Some(i) => (args.get(i + 1).map_or("", String::as_str).split(','))
            .map(|v| v.parse().ok().filter(|&l| l > 0 && l <= tokens))
            .collect::<Option<_>>()
            .ok_or("--decode-at needs contexts between 1 and TOKENS, comma-separated")?,
    };
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
    // States (and their last logits) to decode from, saved on the way.
    let mut saved = Vec::new();
    let mut done = 0;
    while done < tokens {
        // Chunks end at every context to decode from.
        let next_stop = decode_at.iter().copied().filter(|&l| l > done).min().unwrap_or(tokens);
        let end = (done + chunk).min(next_stop);
        let logits = model.forward(&prompt[done..end], &mut state, Logits::Last).map_err(|e| e.to_string())?;
        done = end;
        if decode > 0 && decode_at.contains(&done) {
            saved.push((done, state.clone(), logits.clone()));
        }
    }
    let prefill = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let parts = profile::totals();
    profile::reset();

    let mut decode_ms = vec![Vec::new(); saved.len()];
    for _ in 0..rounds {
        for ((_, state, logits), times) in saved.iter().zip(&mut decode_ms) {
            let (mut state, mut logits) = (state.clone(), logits.clone());
            let started = Instant::now();
            for _ in 0..decode {
                let token = argmax(&logits);
                logits = model.forward(&[token], &mut state, Logits::Last).map_err(|e| e.to_string())?;
            }
            times.push(started.elapsed().as_secs_f64() * 1e3 / decode as f64);
        }
    }
    let decode_ms: Vec<String> = saved
        .iter()
        .zip(&mut decode_ms)
        .map(|((context, _, _), times)| {
            times.sort_by(f64::total_cmp);
            format!("{{\"context\": {context}, \"median_ms\": {:.3}, \"ms\": {times:.3?}}}", times[times.len() / 2])
        })
        .collect();

    // Thread time of all decode steps of all rounds.
    let decode_parts = profile::totals();
    let json = |parts: &[(profile::Part, std::time::Duration, u64)]| {
        let fields: Vec<String> = parts
            .iter()
            .map(|(p, t, f)| {
                format!("{:?}: {{\"s\": {:.4}, \"gflop\": {:.3}}}", p.name(), t.as_secs_f64(), *f as f64 / 1e9)
            })
            .collect();
        format!("{{{}}}", fields.join(", "))
    };
    println!(
        "{{\"tokens\": {tokens}, \"chunk\": {chunk}, \"prefill_s\": {prefill:.4}, \"tokens_per_s\": {:.1}, \
         \"cpu_s\": {cpu:.3}, \"peak_rss_mib\": {:.1}, \"state_mib\": {:.2}, \"decode_ms\": [{}], \"parts\": {}, \
         \"decode_parts\": {}}}",
        tokens as f64 / prefill,
        peak_rss_kib()? as f64 / 1024.0,
        state.size_bytes() as f64 / (1024.0 * 1024.0),
        decode_ms.join(", "),
        json(&parts),
        json(&decode_parts),
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
