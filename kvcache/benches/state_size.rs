//! Bytes the KV-cache stores per token of sequence state, against the
//! theoretical size of DeepSeek-V4's compressed state (every compressed entry,
//! indexer key, window entry and compressor buffer, as f32) and against a
//! V3.2-style MLA cache of the same width (one latent of `head_dim` plus one
//! indexer key per token per layer). States are built in their exact shape
//! (`state::shaped`, checked against real ones in the model's tests), so
//! 128 K tokens need no forward pass.
//!
//! `cargo bench -p myriad-kvcache --bench state_size`

use std::path::PathBuf;

use bytes::Bytes;
use myriad_kvcache::cache::{Cache, Prefix};
use myriad_model::ModelConfig;
use myriad_model::state::{block_tokens, shaped};
use serde_json::{Value, json};

fn tiny() -> (ModelConfig, Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4/config.json");
    let text = std::fs::read_to_string(path).expect("the tiny model's config");
    let value: Value = serde_json::from_str(&text).expect("JSON");
    (ModelConfig::from_json(&text).expect("a valid config"), value)
}

/// The "larger random" shape of scripts/bench_reference.py.
fn larger(mut raw: Value) -> ModelConfig {
    let layer_types: Vec<&str> = ["heavily_compressed_attention"; 2]
        .into_iter()
        .chain(["compressed_sparse_attention", "heavily_compressed_attention"].repeat(3))
        .collect();
    let overrides = json!({
        "vocab_size": 16384, "hidden_size": 1024, "moe_intermediate_size": 512, "num_hidden_layers": 8,
        "num_attention_heads": 16, "head_dim": 128, "qk_rope_head_dim": 64, "q_lora_rank": 256,
        "num_experts_per_tok": 6, "n_routed_experts": 64, "o_groups": 4, "o_lora_rank": 256,
        "index_n_heads": 8, "index_head_dim": 64, "index_topk": 64, "sliding_window": 128,
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        "layer_types": layer_types, "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe", "moe", "moe", "moe", "moe"],
    });
    for (k, v) in overrides.as_object().expect("an object") {
        raw[k] = v.clone();
    }
    ModelConfig::from_json(&raw.to_string()).expect("the larger config")
}

/// Bytes the cache holds after storing one state of `tokens` tokens.
fn stored(cfg: &ModelConfig, tokens: usize) -> (usize, usize) {
    let state = shaped(cfg, tokens);
    let ids: Vec<u32> = (0..tokens as u32).collect();
    let mut cache = Cache::in_memory(usize::MAX / 2);
    let blocks = (0..state.full_blocks(cfg)).map(|i| (i, Bytes::from(state.encode_block(cfg, i)))).collect();
    let prefix = Prefix { model_id: "bench", block: block_tokens(cfg), tokens: &ids };
    cache.put(&prefix, blocks, Bytes::from(state.encode_tail(cfg))).expect("store");
    (cache.objects().usage()[0].0, state.size_bytes())
}

fn main() {
    let (tiny_cfg, raw) = tiny();
    let configs = [("tiny", tiny_cfg), ("larger", larger(raw))];
    println!(
        "{:<7} {:>7} {:>12} {:>12} {:>8} {:>10} {:>12} {:>9}",
        "config", "tokens", "stored", "theoretical", "ratio", "B/token", "MLA (V3.2)", "V4/MLA"
    );
    for (name, cfg) in &configs {
        for tokens in [4096, 32768, 131072] {
            let (bytes, theory) = stored(cfg, tokens);
            let mla = tokens * cfg.num_hidden_layers * (cfg.head_dim + cfg.index_head_dim) * 4;
            println!(
                "{name:<7} {tokens:>7} {bytes:>12} {theory:>12} {:>7.4}x {:>10.1} {mla:>12} {:>8.3}x",
                bytes as f64 / theory as f64,
                bytes as f64 / tokens as f64,
                bytes as f64 / mla as f64,
            );
        }
    }
}
