//! The whole model in one process: load a folder, run a chunk of tokens of
//! one sequence through every layer, return logits.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kernels::rms_norm;
use crate::moe::{ExpertExecutor, LocalExperts};
use crate::state::SequenceState;
use crate::weights::{ModelWeights, RoutedExperts};
use crate::{attention, mhc, moe};

/// The next tokens of one sequence in a batched forward.
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub state: &'a mut SequenceState,
    pub want: Logits,
}

/// Which positions of a chunk to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the chunk's last token (generation).
    Last,
    /// Every token of the chunk (scoring, tests).
    All,
}

pub struct Model {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    /// [`Checkpoint::fingerprint`] of the folder: which model this is.
    pub fingerprint: String,
}

impl Model {
    /// Loads `dir/config.json` and the safetensors weights it describes.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, RoutedExperts::All)
    }

    /// Loads everything but the routed experts: what a router needs.
    pub fn load_dense(dir: &Path) -> Result<Self> {
        Self::load_with(dir, RoutedExperts::None)
    }

    fn load_with(dir: &Path, routed: RoutedExperts) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint { path: dir.to_path_buf(), message: "is not a model folder".into() });
        }
        let (config, config_bytes) = ModelConfig::read(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let mtp = ckpt.names().filter(|n| n.starts_with("mtp.")).count();
        if mtp > 0 {
            tracing::info!(
                tensors = mtp,
                "not using the multi-token-prediction module (mtp.*): no speculative decoding yet"
            );
        }
        let weights = ModelWeights::load(&ckpt, &config, routed)?;
        Ok(Model { config, weights, fingerprint: ckpt.fingerprint(&config_bytes) })
    }

    /// A fresh state for a new sequence of this model.
    pub fn new_state(&self) -> SequenceState {
        SequenceState::new(&self.config)
    }

    /// Runs `tokens` (the next tokens of the sequence that `state` describes)
    /// through the model and advances `state`. Returns `[n, vocab]` logits,
    /// `n` being 1 or `tokens.len()` as `want` says.
    pub fn forward(&self, tokens: &[u32], state: &mut SequenceState, want: Logits) -> Result<Vec<f32>> {
        self.forward_with(tokens, state, want, &self.local_experts())
    }

    /// The experts of this process's own weights.
    pub fn local_experts(&self) -> LocalExperts<'_> {
        LocalExperts { config: &self.config, layers: &self.weights.layers }
    }

    /// [`Model::forward`] with the routed experts run by `experts` (for
    /// example on remote workers). Results are identical whatever runs them.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        state: &mut SequenceState,
        want: Logits,
        experts: &impl ExpertExecutor,
    ) -> Result<Vec<f32>> {
        let mut logits = self.forward_batch(&mut [Chunk { tokens, state, want }], experts)?;
        Ok(logits.pop().unwrap_or_default())
    }

    /// Runs the next tokens of several sequences as one batch: the dense
    /// projections and the routed experts see all rows at once (one expert
    /// call per MoE layer for the whole batch), attention runs per sequence.
    /// Each sequence's logits are the same bits as when it runs alone.
    ///
    /// The whole step runs on a thread of the compute pool, so the many
    /// parallel matmuls of one step start and end there instead of each
    /// handing its work over from (and back to) the calling thread.
    pub fn forward_batch(&self, batch: &mut [Chunk<'_>], experts: &impl ExpertExecutor) -> Result<Vec<Vec<f32>>> {
        let done = AtomicBool::new(false);
        rayon::scope(|s| {
            let (home, done) = (rayon::current_thread_index(), &done);
            for _ in 1..rayon::current_num_threads() {
                s.spawn(move |_| keep_awake(done, home));
            }
            let out = self.step(batch, experts);
            done.store(true, Ordering::Release);
            out
        })
    }

    fn step(&self, batch: &mut [Chunk<'_>], experts: &impl ExpertExecutor) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        for chunk in batch.iter() {
            self.check_input(chunk.tokens, chunk.state)?;
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let rows = tokens.len();
        let (hidden, hc) = (cfg.hidden_size, cfg.hc_mult);
        let mut streams = Vec::with_capacity(rows * hc * hidden);
        let (embed, mut row) = (self.weights.embed.weights(), Vec::with_capacity(hidden));
        for &t in &tokens {
            row.clear();
            embed.rows(hidden, t as usize, t as usize + 1).expand(hidden, &mut row);
            (0..hc).for_each(|_| streams.extend_from_slice(&row));
        }
        for (l, w) in self.weights.layers.iter().enumerate() {
            let mut mix = mhc::pre(&w.hc_attn, cfg, &streams, rows);
            let mut x = std::mem::take(&mut mix.collapsed);
            rms_norm(&mut x, hidden, Some(w.attn_norm.data()), cfg.rms_norm_eps);
            let mut out = Vec::with_capacity(rows * hidden);
            let mut offset = 0;
            for chunk in batch.iter_mut() {
                let n = chunk.tokens.len();
                let first = chunk.state.position;
                let seq_x = &x[offset * hidden..(offset + n) * hidden];
                out.extend(attention::forward(&w.attn, cfg, l, seq_x, n, first, &mut chunk.state.layers[l]));
                offset += n;
            }
            mhc::post(&mix, cfg, &mut streams, &out, rows);

            let mut mix = mhc::pre(&w.hc_ffn, cfg, &streams, rows);
            let mut x = std::mem::take(&mut mix.collapsed);
            rms_norm(&mut x, hidden, Some(w.ffn_norm.data()), cfg.rms_norm_eps);
            let out = moe::forward(&w.moe, cfg, l, &x, &tokens, rows, experts)?;
            mhc::post(&mix, cfg, &mut streams, &out, rows);
        }

        // Rows whose logits are wanted, in batch order.
        let mut wanted = Vec::new();
        let mut offset = 0;
        for chunk in batch.iter_mut() {
            let n = chunk.tokens.len();
            chunk.state.position += n;
            let first = if chunk.want == Logits::All { offset } else { offset + n - 1 };
            wanted.push((first, offset + n));
            offset += n;
        }
        let picked: Vec<f32> =
            wanted.iter().flat_map(|&(a, b)| streams[a * hc * hidden..b * hc * hidden].iter().copied()).collect();
        let picked_rows = picked.len() / (hc * hidden);
        let mut h = mhc::head(&self.weights.hc_head, cfg, &picked, picked_rows);
        rms_norm(&mut h, hidden, Some(self.weights.norm.data()), cfg.rms_norm_eps);
        let logits = match &self.weights.head {
            Some(head) => head.forward(&h, picked_rows),
            None => crate::kernels::linear_with(&h, picked_rows, self.weights.embed.weights(), cfg.vocab_size, hidden),
        };
        let vocab = cfg.vocab_size;
        let mut start = 0;
        Ok(wanted
            .iter()
            .map(|&(a, b)| {
                let n = (b - a) * vocab;
                start += n;
                logits[start - n..start].to_vec()
            })
            .collect())
    }

    fn check_input(&self, tokens: &[u32], state: &SequenceState) -> Result<()> {
        let cfg = &self.config;
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("no tokens to run".into()));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {})",
                cfg.vocab_size
            )));
        }
        if state.layers.len() != cfg.num_hidden_layers {
            return Err(ModelError::InvalidInput(format!(
                "sequence state has {} layers, the model {}",
                state.layers.len(),
                cfg.num_hidden_layers
            )));
        }
        let end = state.position + tokens.len();
        if end > cfg.max_position_embeddings {
            return Err(ModelError::InvalidInput(format!(
                "sequence of {end} tokens exceeds the context length ({})",
                cfg.max_position_embeddings
            )));
        }
        Ok(())
    }
}

/// Keeps a pool thread taking work until `done`, instead of falling asleep
/// between the step's parallel parts: waking a sleeping thread is a system
/// call for the waker and a scheduling delay before the work starts, and a
/// decode step has a few dozen such gaps. Returns at once on the step's own
/// thread, and after [`AWAKE_WHILE_IDLE`] without work, so a spinner that
/// starts inside another task (possible with three threads or more) only
/// delays it, and a step waiting on the network stops spinning.
fn keep_awake(done: &AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home {
        return;
    }
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if let Some(rayon::Yield::Executed) = rayon::yield_now() {
            idle_since = None;
            continue;
        }
        if idle_since.get_or_insert_with(Instant::now).elapsed() > AWAKE_WHILE_IDLE {
            return;
        }
        std::thread::yield_now();
    }
}

/// How long [`keep_awake`] waits for work before it lets its thread sleep.
const AWAKE_WHILE_IDLE: Duration = Duration::from_millis(1);
