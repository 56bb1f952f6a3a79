//! What a request does to the logits before sampling (logit bias,
//! repetition, presence and frequency penalties, a minimum length) and the
//! log-probabilities it asks back. Each sequence's logits are its own, so
//! none of this touches batch invariance.
//!
//! Order, as in vLLM: the minimum length masks the stop tokens, then the
//! repetition penalty (prompt and output tokens: positive logits divided by
//! it, negative ones multiplied), then frequency and presence penalties
//! (output tokens only: minus `frequency × count` and `presence` once), then
//! the logit bias; then the token that would complete a bad word is masked,
//! and last every token not in `allowed_token_ids` (if given).
//! Log-probabilities are those of the model's own distribution, before any
//! of this and before temperature (vLLM's default, `raw_logprobs`).

use std::collections::HashMap;

/// Per-request logit processing; the default changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsParams {
    /// The only tokens that may be sampled (vLLM's `allowed_token_ids`).
    pub allowed: Option<Vec<u32>>,
    /// Token sequences the output may not complete (vLLM's `bad_words`,
    /// each word tokenized): the last token of one is masked when the
    /// output ends with the rest of it.
    pub bad_words: Vec<Vec<u32>>,
    /// Added to a token's logit (OpenAI's `logit_bias`, -100 to 100).
    pub bias: Vec<(u32, f32)>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 is none; above 1 discourages every token seen so far.
    pub repetition_penalty: f32,
    /// Stop tokens are masked until this many tokens were generated.
    pub min_tokens: usize,
    /// `Some(k)`: return each sampled token's log-probability and the `k`
    /// most likely tokens' at its position.
    pub logprobs: Option<usize>,
    /// `Some(k)`: the same for every prompt token after the first (the
    /// whole prompt then runs: none of it is restored from the KV-cache).
    pub prompt_logprobs: Option<usize>,
}

impl Default for LogitsParams {
    fn default() -> Self {
        LogitsParams {
            allowed: None,
            bad_words: Vec::new(),
            bias: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
        }
    }
}

/// A sampled token's log-probability and the most likely alternatives
/// (most likely first; ties to the lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// 1 for the most likely token; ties share the better rank.
    pub rank: usize,
    pub top: Vec<(u32, f32)>,
}

impl LogitsParams {
    /// Whether sampling uses the logits as the model gave them.
    pub fn changes_nothing(&self) -> bool {
        LogitsParams { logprobs: None, prompt_logprobs: None, ..self.clone() } == LogitsParams::default()
    }

    /// Applies everything but log-probabilities to `logits`, for a sequence
    /// with `prompt` and `generated` so far whose stop tokens are `stops`.
    pub fn apply(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32], stops: &[u32]) {
        if generated.len() < self.min_tokens {
            for &t in stops {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if self.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in prompt.iter().chain(generated) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
                *l = if *l > 0.0 { *l / self.repetition_penalty } else { *l * self.repetition_penalty };
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.frequency_penalty * n as f32 + self.presence_penalty;
                }
            }
        }
        for &(t, b) in &self.bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        for word in &self.bad_words {
            if let Some((&last, before)) = word.split_last()
                && generated.ends_with(before)
                && let Some(l) = logits.get_mut(last as usize)
            {
                *l = f32::NEG_INFINITY;
            }
        }
        if let Some(allowed) = &self.allowed {
            let mut masked = vec![f32::NEG_INFINITY; logits.len()];
            for &t in allowed {
                if let (Some(m), Some(l)) = (masked.get_mut(t as usize), logits.get(t as usize)) {
                    *m = *l;
                }
            }
            logits.copy_from_slice(&masked);
        }
    }
}

/// `token`'s log-probability under `logits` (log-softmax) and the `k` most
/// likely tokens'.
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_total = max + sum.ln() as f32;
    let at = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |&l| l - log_total);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(ids.len());
        let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        ids.select_nth_unstable_by(k - 1, order);
        ids.truncate(k);
        ids.sort_by(order);
        top = ids.into_iter().map(|t| (t, at(t))).collect();
    }
    let rank = logits.get(token as usize).map_or(logits.len(), |&l| 1 + logits.iter().filter(|&&o| o > l).count());
    TokenLogprobs { logprob: at(token), rank, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_and_bias_change_the_logits_as_documented() {
        let p = LogitsParams {
            allowed: None,
            bad_words: Vec::new(),
            bias: vec![(3, 5.0)],
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            min_tokens: 2,
            logprobs: None,
            prompt_logprobs: None,
        };
        let mut logits = vec![1.0, -1.0, 4.0, 0.0, 2.0];
        // Prompt [0], output [1, 1]: two tokens generated, so stop token 4 is free.
        p.apply(&mut logits, &[0], &[1, 1], &[4]);
        assert_eq!(logits, vec![0.5, -2.0 - 0.5 - 0.5, 4.0, 5.0, 2.0]);
        let mut logits = vec![1.0, -1.0, 4.0, 0.0, 2.0];
        p.apply(&mut logits, &[], &[2], &[4]);
        assert_eq!(logits[4], f32::NEG_INFINITY);
        assert!(LogitsParams::default().changes_nothing() && !p.changes_nothing());
        // A bad word's last token is masked where the output ends with the
        // rest of it; a one-token word everywhere.
        let bad = LogitsParams { bad_words: vec![vec![1, 2], vec![4]], ..LogitsParams::default() };
        let inf = f32::NEG_INFINITY;
        for (generated, expected) in [(&[0, 1][..], [1.0, -1.0, inf, 0.0, inf]), (&[1, 0], [1.0, -1.0, 4.0, 0.0, inf])]
        {
            let mut logits = vec![1.0, -1.0, 4.0, 0.0, 2.0];
            bad.apply(&mut logits, &[1], generated, &[]);
            assert_eq!(logits, expected, "after {generated:?}");
        }
        // Allowed tokens keep their logits; the rest are masked.
        let only = LogitsParams { allowed: Some(vec![2, 0, 9]), ..LogitsParams::default() };
        let mut logits = vec![1.0, -1.0, 4.0, 0.0, 2.0];
        only.apply(&mut logits, &[], &[], &[4]);
        assert_eq!(logits, vec![1.0, inf, 4.0, inf, inf]);
        assert!(!only.changes_nothing());
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_tokens_first() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let lp = logprobs(&logits, 2, 3);
        let total: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (1.0f32.exp() / total).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        // Token 2 is third; tokens 1 and 3 tie for first.
        assert_eq!((lp.rank, logprobs(&logits, 3, 0).rank, logprobs(&logits, 0, 0).rank), (3, 1, 4));
        let mass: f32 = (0..4).map(|t| logprobs(&logits, t, 0).logprob.exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6);
    }
}
