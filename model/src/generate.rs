//! Generation loop and sampling for one sequence.

use std::time::{Duration, Instant};

use crate::error::{ModelError, Result};
use crate::model::{Logits, Model};
use crate::moe::ExpertExecutor;

/// How the next token is chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Drop the tokens less likely than `min_p` times the most likely one
    /// (0: none), before the nucleus is taken.
    pub min_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, top_k: None, min_p: 0.0, seed: 0 }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidInput(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ModelError::InvalidInput(format!("min_p {} must be in [0, 1]", self.min_p)));
        }
        if self.top_k == Some(0) {
            return Err(ModelError::InvalidInput("top_k must be at least 1".into()));
        }
        Ok(())
    }
}

/// A small, fully deterministic random source (SplitMix64): a seed gives the
/// same samples on every machine and every build.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Uniform over every `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> u32 {
    if sampling.temperature == 0.0 {
        return argmax(logits);
    }
    let mut ranked: Vec<(f32, u32)> =
        logits.iter().enumerate().map(|(i, &l)| (l / sampling.temperature, i as u32)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if let Some(k) = sampling.top_k {
        ranked.truncate(k.max(1));
    }
    let max = ranked[0].0;
    if sampling.min_p > 0.0 {
        let likely = ranked.iter().take_while(|(l, _)| (l - max).exp() >= sampling.min_p).count();
        ranked.truncate(likely.max(1));
    }
    let mut probs: Vec<f32> = ranked.iter().map(|(l, _)| (l - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p;
        if mass >= sampling.top_p {
            break;
        }
    }
    let draw = rng.next_f32() * mass;
    let mut acc = 0.0;
    for (p, (_, id)) in probs.iter().zip(&ranked).take(kept) {
        acc += p;
        if draw < acc {
            return *id;
        }
    }
    ranked[kept - 1].1
}

/// Highest logit; ties go to the lower token id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub generated: Vec<u32>,
    pub prompt_last_logits: Vec<f32>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Bytes of sequence state at the end (what the KV-cache service would hold).
    pub state_bytes: usize,
}

/// Tokens per prefill step. Chunked prefill gives the same bits as one
/// forward over the whole prompt; it keeps activations small (peak RSS of a
/// 64K-token prompt on the tiny model: 21 MiB instead of 418) and is no
/// slower (`scripts/bench_long_context.sh`). The engine's default
/// `--step-tokens` is the same.
pub const PREFILL_CHUNK: usize = 512;

/// Prefills `prompt` (in chunks of [`PREFILL_CHUNK`]), then generates up to
/// `max_new_tokens`, stopping after an end-of-sequence token unless
/// `ignore_eos`.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    ignore_eos: bool,
) -> Result<Generation> {
    generate_with(model, prompt, max_new_tokens, sampling, ignore_eos, &model.local_experts())
}

/// [`generate`] with the routed experts run by `experts` (e.g. remote workers).
pub fn generate_with(
    model: &Model,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &Sampling,
    ignore_eos: bool,
    experts: &impl ExpertExecutor,
) -> Result<Generation> {
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("no tokens to run".into()));
    }
    let mut state = model.new_state();
    let mut rng = Rng::new(sampling.seed);
    let start = Instant::now();
    let mut prompt_last_logits = Vec::new();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        prompt_last_logits = model.forward_with(chunk, &mut state, Logits::Last, experts)?;
    }
    let prefill_time = start.elapsed();
    let start = Instant::now();
    let mut generated = Vec::with_capacity(max_new_tokens);
    let mut logits = prompt_last_logits.clone();
    while generated.len() < max_new_tokens {
        let token = sample(&logits, sampling, &mut rng);
        generated.push(token);
        if (!ignore_eos && model.config.eos_token_ids.contains(&token)) || generated.len() == max_new_tokens {
            break;
        }
        logits = model.forward_with(&[token], &mut state, Logits::Last, experts)?;
    }
    Ok(Generation {
        generated,
        prompt_last_logits,
        prefill_time,
        decode_time: start.elapsed(),
        state_bytes: state.size_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_low_id_ties() {
        let mut rng = Rng::new(1);
        assert_eq!(sample(&[0.1, 2.0, 2.0, -1.0], &Sampling::greedy(), &mut rng), 1);
    }

    #[test]
    fn same_seed_same_samples_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let s = Sampling { temperature: 0.9, top_p: 0.95, top_k: None, min_p: 0.0, seed: 7 };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20).map(|_| sample(&logits, &s, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let k1 = Sampling { top_k: Some(1), ..s };
        let mut rng = Rng::new(3);
        assert_eq!(sample(&logits, &k1, &mut rng), argmax(&logits));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~all the mass: with top_p 0.5 it is always chosen.
        let logits = [10.0, 0.0, 0.0, 0.0];
        let s = Sampling { temperature: 1.0, top_p: 0.5, top_k: None, min_p: 0.0, seed: 0 };
        let mut rng = Rng::new(11);
        assert!((0..100).all(|_| sample(&logits, &s, &mut rng) == 0));
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_most_likely() {
        // Relative to token 0, token 1 is e^-1 ≈ 0.37 as likely, token 2
        // e^-3 ≈ 0.05, token 3 e^-6.
        let logits = [6.0, 5.0, 3.0, 0.0];
        let drawn = |min_p| {
            let s = Sampling { temperature: 1.0, top_p: 1.0, top_k: None, min_p, seed: 0 };
            let mut rng = Rng::new(5);
            let mut seen = [0; 4];
            (0..2000).for_each(|_| seen[sample(&logits, &s, &mut rng) as usize] += 1);
            seen
        };
        assert!(drawn(0.0).iter().all(|&n| n > 0), "{:?}", drawn(0.0));
        let [a, b, c, d] = drawn(0.1);
        assert!(a > 0 && b > 0 && c == 0 && d == 0, "{:?}", drawn(0.1));
        assert_eq!(drawn(0.5), [2000, 0, 0, 0]);
        // The most likely token is always kept.
        assert_eq!(drawn(1.0), [2000, 0, 0, 0]);
    }

    #[test]
    fn bad_sampling_settings_are_errors() {
        for s in [
            Sampling { temperature: -1.0, ..Sampling::greedy() },
            Sampling { top_p: 0.0, ..Sampling::greedy() },
            Sampling { top_k: Some(0), ..Sampling::greedy() },
            Sampling { min_p: 1.5, ..Sampling::greedy() },
            Sampling { min_p: -0.1, ..Sampling::greedy() },
        ] {
            assert!(s.validate().is_err(), "{s:?}");
        }
    }

    #[test]
    fn an_empty_prompt_is_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4");
        let model = Model::load(&dir).expect("tiny-v4");
        let err = generate(&model, &[], 3, &Sampling::greedy(), false).expect_err("refused");
        assert!(matches!(&err, ModelError::InvalidInput(m) if m == "no tokens to run"), "{err}");
    }
}
