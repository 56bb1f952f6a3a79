//! What constrained decoding costs: the engine in-process on the tiny model
//! (local experts, no HTTP), 8 requests at once of 128 prompt tokens and 64
//! new tokens each, with no grammar and with JSON-schema grammars that
//! cannot finish within 64 tokens, in interleaved rounds; prints decode
//! throughput and the CPU time the process spent per token (all threads,
//! from /proc; unlike wall time it does not count time a shared machine
//! gave to others), each as a ratio to no grammar in the same rounds; and
//! what each grammar's masks cost on their own, serially, per token.
//!
//! `cargo run --release -p myriad-router --example constrained [ROUNDS]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use myriad_model::moe::SharedLocalExperts;
use myriad_model::text::TextTokenizer;
use myriad_model::{Model, Sampling};
use myriad_router::engine::{Engine, EngineConfig, Event, Request, mask_allows};
use myriad_router::structured::{Grammars, response_format};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const CONCURRENCY: usize = 8;
const PROMPT: usize = 128;
const NEW: usize = 64;

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4");
    let model = Arc::new(Model::load(&dir).expect("load the tiny model"));
    let tokenizer = Arc::new(TextTokenizer::load(&dir).expect("load its tokenizer"));
    let pieces = tokenizer.token_bytes().expect("a byte-level tokenizer");
    // No thinking mode here: the grammars need no `</think>`.
    let grammars = Grammars::new(tokenizer, &pieces, model.config.vocab_size, &model.config.eos_token_ids, None)
        .expect("grammars");
    let engine = Engine::start(
        model.clone(),
        SharedLocalExperts(model.clone()),
        EngineConfig { max_batch: 64, step_tokens: 512, queue: 256 },
        None,
    );
    let schemas: Vec<(&str, Option<Value>)> = vec![
        ("no grammar", None),
        ("long string", Some(json!({"type": "string", "minLength": 2000}))),
        (
            "array of objects",
            Some(json!({"type": "array", "minItems": 200, "items": {"type": "object",
                "properties": {"id": {"type": "integer"}, "tag": {"type": "string", "maxLength": 6},
                               "ok": {"type": "boolean"}},
                "required": ["id", "tag", "ok"]}})),
        ),
    ];
    let mut rates = vec![Vec::new(); schemas.len()];
    let mut cpu = vec![Vec::new(); schemas.len()];
    for round in 0..=rounds {
        for (k, (_, schema)) in schemas.iter().enumerate() {
            let started = Instant::now();
            let cpu_before = cpu_ns();
            let receivers: Vec<_> = (0..CONCURRENCY)
                .map(|i| {
                    let constraint = schema.as_ref().map(|s| {
                        let format = json!({"type": "json_schema", "json_schema": {"name": "b", "schema": s}});
                        let grammar = response_format(&format).expect("schema").expect("a grammar");
                        grammars.constraint(grammar, false).expect("constraint")
                    });
                    let prompt = (0..PROMPT).map(|j| (3 + (j * 131 + i * 977 + round * 31) % 500) as u32).collect();
                    let (tx, rx) = mpsc::unbounded_channel();
                    let request = Request {
                        prompt,
                        max_tokens: NEW,
                        sampling: Sampling { temperature: 1.0, top_p: 1.0, top_k: None, min_p: 0.0, seed: i as u64 },
                        stop_tokens: Vec::new(),
                        events: tx,
                        span: tracing::Span::none(),
                        constraint,
                        logits: Default::default(),
                        cache_salt: None,
                    };
                    futures::executor::block_on(engine.submit(vec![request])).expect("submit");
                    rx
                })
                .collect();
            let mut tokens = 0;
            for mut rx in receivers {
                while let Some(event) = rx.blocking_recv() {
                    match event {
                        Event::PromptLogprobs(_) => {}
                        Event::Token(..) => tokens += 1,
                        Event::Done(_) => break,
                        Event::Error(e) => panic!("{e}"),
                    }
                }
            }
            assert_eq!(tokens, CONCURRENCY * NEW, "every request runs to max_tokens");
            // Round 0 warms up.
            if round > 0 {
                rates[k].push(tokens as f64 / started.elapsed().as_secs_f64());
                cpu[k].push((cpu_ns() - cpu_before) as f64 / 1e3 / tokens as f64);
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // The grammar work alone, on one thread: a mask and a token per step,
    // the token drawn among the allowed ones.
    let mut alone = vec![0.0; schemas.len()];
    for (k, (_, schema)) in schemas.iter().enumerate().skip(1) {
        let format = json!({"type": "json_schema", "json_schema": {"name": "b", "schema": schema}});
        let mut c = grammars.constraint(response_format(&format).unwrap().unwrap(), false).unwrap();
        let mut state = 0x2545_F491u32;
        let started = Instant::now();
        for _ in 0..CONCURRENCY * NEW {
            let mask = c.allowed().unwrap().unwrap();
            let allowed: Vec<u32> = (0..mask.len() as u32 * 32).filter(|&t| mask_allows(&mask, t as usize)).collect();
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            c.consume(allowed[state as usize % allowed.len()]).unwrap();
        }
        alone[k] = started.elapsed().as_secs_f64() * 1e6 / (CONCURRENCY * NEW) as f64;
    }
    let (base, base_cpu) = (median(&rates[0]), median(&cpu[0]));
    println!("{CONCURRENCY} requests at once, {PROMPT} prompt + {NEW} new tokens each, {rounds} rounds (medians):");
    for (((name, _), r), c) in schemas.iter().zip(&rates).zip(&cpu) {
        println!(
            "  {name:<18} {:>8.1} tokens/s ({:.3}×)   {:>6.1} µs CPU per token ({:.3}×)",
            median(r),
            median(r) / base,
            median(c),
            median(c) / base_cpu
        );
    }
    for ((name, _), a) in schemas.iter().zip(&alone).skip(1) {
        println!(
            "  {name}: mask and token alone {a:.1} µs per token, {:.3} of no grammar's CPU per token",
            a / base_cpu
        );
    }
}

/// CPU time of every thread of this process so far, in nanoseconds (the
/// first field of each thread's /proc schedstat).
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
