//! What constrained decoding costs: the engine in-process on the tiny model
//! (local experts, no HTTP), 8 requests at once of 128 prompt tokens and 64
//! new tokens each, with no grammar and with JSON-schema grammars that
//! cannot finish within 64 tokens, in interleaved rounds; prints decode
//! throughput and each grammar's ratio to no grammar measured in the same
//! rounds.
//!
//! `cargo run --release -p myriad-router --example constrained [ROUNDS]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use myriad_model::moe::SharedLocalExperts;
use myriad_model::text::TextTokenizer;
use myriad_model::{Model, Sampling};
use myriad_router::engine::{Engine, EngineConfig, Event, Request};
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
    let grammars = Grammars::new(tokenizer, model.config.vocab_size, &model.config.eos_token_ids).expect("grammars");
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
    for round in 0..=rounds {
        for (k, (_, schema)) in schemas.iter().enumerate() {
            let started = Instant::now();
            let receivers: Vec<_> = (0..CONCURRENCY)
                .map(|i| {
                    let constraint = schema.as_ref().map(|s| {
                        let format = json!({"type": "json_schema", "json_schema": {"name": "b", "schema": s}});
                        let grammar = response_format(&format).expect("schema").expect("a grammar");
                        grammars.constraint(grammar, false).expect("constraint")
                    });
                    let prompt = (0..PROMPT).map(|j| (3 + (j * 131 + i * 977 + round * 31) % 500) as u32).collect();
                    let (tx, rx) = mpsc::unbounded_channel();
                    engine
                        .submit(Request {
                            prompt,
                            max_tokens: NEW,
                            sampling: Sampling { temperature: 1.0, top_p: 1.0, top_k: None, seed: i as u64 },
                            stop_tokens: Vec::new(),
                            events: tx,
                            span: tracing::Span::none(),
                            restored: None,
                            constraint,
                            logits: Default::default(),
                        })
                        .expect("submit");
                    rx
                })
                .collect();
            let mut tokens = 0;
            for mut rx in receivers {
                while let Some(event) = rx.blocking_recv() {
                    match event {
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
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&rates[0]);
    println!("{CONCURRENCY} requests at once, {PROMPT} prompt + {NEW} new tokens each, {rounds} rounds (medians):");
    for ((name, _), r) in schemas.iter().zip(&rates) {
        println!("  {name:<18} {:>8.1} tokens/s   {:.3}× no grammar", median(r), median(r) / base);
    }
}
