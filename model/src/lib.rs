//! # myriad-model
//!
//! DeepSeek-V4 in one process, exactly as the Hugging Face reference computes
//! it. Synchronous, free of tokio and tonic, so it can be tested and
//! benchmarked alone; routers, workers and the KV-cache service build on it.
//!
//! # Layout
//!
//! - [`config`]: `config.json`, legacy names included, validated once.
//! - [`checkpoint`]: memory-mapped safetensors shards, both tensor namings,
//!   all dtype conversion.
//! - [`quant`]: the released checkpoints' block-FP8 and MXFP4 formats;
//!   [`stored`]: projection weights kept in their stored format.
//! - [`tensor`], [`weights`]: typed weights of every layer.
//! - [`kernels`]: the batch-invariant matmul and small numeric helpers.
//! - [`rope`]: interleaved partial RoPE, default and YaRN.
//! - [`mhc`]: hyper-connection streams (Sinkhorn-projected mixing).
//! - [`attention`], [`compressor`]: sliding window, CSA/HCA compression,
//!   lightning indexer.
//! - [`moe`]: routing, experts, combine order.
//! - [`state`]: [`SequenceState`], the serialisable per-sequence state.
//! - [`model`]: [`Model::forward`] over a chunk of tokens.
//! - [`generate`]: sampling and the generation loop; [`text`]: tokenizer.

pub mod attention;
pub mod checkpoint;
pub mod compressor;
pub mod config;
pub mod error;
pub mod generate;
pub mod indexer;
pub mod kernels;
pub mod mhc;
pub mod model;
pub mod moe;
pub mod profile;
pub mod quant;
pub mod rope;
pub mod state;
pub mod stored;
pub mod tensor;
pub mod text;
pub mod weights;

pub use config::ModelConfig;
pub use error::{ErrorKind, ModelError, Result};
pub use generate::{Generation, Sampling, generate, generate_with};
pub use model::{Chunk, Logits, Model};
pub use state::SequenceState;
