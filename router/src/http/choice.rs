//! One choice of an answer being built from its tokens: its text and
//! deltas, the echoed prompt, and the log-probabilities in the endpoint's
//! shape (OpenAI's chat and completions, vLLM's `prompt_logprobs`).

use std::time::Instant;

use serde_json::{Map, Value, json};

use super::answer::{Kind, Run};
use super::api::ToolUse;
use super::text::{Delta, Deltas, Detokenizer};
use crate::logits::TokenLogprobs;
use crate::metrics;

/// One choice being answered: its text, its deltas, and the
/// log-probabilities of its tokens not yet sent.
pub(super) struct Choice<'a> {
    run: &'a Run,
    pub(super) index: usize,
    pub(super) text: Detokenizer<'a>,
    deltas: Deltas,
    /// Tokens and their log-probabilities not yet sent (`None`: the first
    /// token of an echoed prompt, which has none).
    logprobs: Vec<(u32, Option<TokenLogprobs>)>,
    /// Where the next token's text starts in the completion (completions'
    /// `text_offset`).
    offset: usize,
    /// The echoed prompt's text, until the first delta carries it.
    echo: Option<&'a str>,
    /// Prompt tokens whose log-probabilities were gathered.
    scored: usize,
    /// vLLM's `prompt_logprobs`: the prompt tokens after the first, scored.
    prompt_logprobs: Vec<(u32, TokenLogprobs)>,
    /// `return_token_ids`: the tokens whose ids were sent, and whether the
    /// prompt's were.
    ids_sent: usize,
    prompt_ids_sent: bool,
    last: Instant,
}

impl<'a> Choice<'a> {
    pub(super) fn new(run: &'a Run, index: usize) -> Self {
        let (thinking, calls) = match run.kind {
            Kind::Completion => (false, false),
            Kind::Chat { thinking, tools } => (thinking, tools != ToolUse::Off),
        };
        Choice {
            run,
            index,
            text: Detokenizer::new(&run.state.tokenizer).with_special_tokens(!run.params.skip_special_tokens),
            deltas: Deltas::new(thinking, calls, run.params.stop.clone()).keeping_stop(run.params.include_stop),
            logprobs: Vec::new(),
            offset: 0,
            echo: run.shown(index).and_then(|p| p.echo.as_deref()),
            scored: 0,
            prompt_logprobs: Vec::new(),
            ids_sent: 0,
            prompt_ids_sent: false,
            last: Instant::now(),
        }
    }

    /// Log-probabilities of the prompt's next tokens (from its second),
    /// with as many alternatives as the engine scored: the echo's (the
    /// first token is listed without one) and `prompt_logprobs` keep theirs.
    pub(super) fn prompt_scored(&mut self, scored: Vec<TokenLogprobs>) {
        let Some(prompt) = self.run.shown(self.index) else { return };
        let params = &self.run.params;
        let echoed = prompt.echo.is_some().then_some(params.logits.logprobs).flatten();
        if self.scored == 0 {
            self.scored = 1;
            if let (Some(_), Some(&first)) = (echoed, prompt.ids.first()) {
                self.logprobs.push((first, None));
            }
        }
        let keep = |l: &TokenLogprobs, k: usize| TokenLogprobs { top: l.top[..k.min(l.top.len())].to_vec(), ..*l };
        for l in scored {
            let Some(&t) = prompt.ids.get(self.scored) else { break };
            self.scored += 1;
            if let Some(k) = echoed {
                self.logprobs.push((t, Some(keep(&l, k))));
            }
            if let Some(k) = params.prompt_logprobs {
                self.prompt_logprobs.push((t, keep(&l, k)));
            }
        }
    }

    /// vLLM's `prompt_logprobs`: `null` for the first token, then each
    /// token's entry and its alternatives', by token id.
    pub(super) fn prompt_logprobs(&self) -> Option<Value> {
        self.run.params.prompt_logprobs?;
        let state = &self.run.state;
        let entry = |lp: f32, rank: usize, t: u32| json!({"logprob": lp, "rank": rank, "decoded_token": state.token_piece(t).0});
        let mut all = vec![Value::Null];
        for (t, l) in &self.prompt_logprobs {
            let mut by_id: Map<String, Value> =
                l.top.iter().enumerate().map(|(r, &(a, lp))| (a.to_string(), entry(lp, r + 1, a))).collect();
            by_id.insert(t.to_string(), entry(l.logprob, l.rank, *t));
            all.push(Value::Object(by_id));
        }
        Some(Value::Array(all))
    }

    /// What vLLM's `return_token_ids` asks for, added to `choice` (this
    /// choice's JSON): the ids of the tokens not sent yet, and in a
    /// completion's first, its prompt's (a chat's go at the top).
    pub(super) fn add_token_ids(&mut self, choice: &mut Value) {
        if !self.run.params.return_token_ids {
            return;
        }
        let ids = self.text.ids();
        choice["token_ids"] = json!(ids[self.ids_sent.min(ids.len())..]);
        self.ids_sent = ids.len();
        if self.run.kind == Kind::Completion && !self.prompt_ids_sent {
            self.prompt_ids_sent = true;
            choice["prompt_token_ids"] = json!(self.run.shown(self.index).map(|p| &p.ids));
        }
    }

    /// `delta` with the echoed prompt before it, if not sent yet.
    fn echoed(&mut self, mut delta: Delta) -> Delta {
        if let Some(prompt) = self.echo.take() {
            delta.content.insert_str(0, prompt);
        }
        delta
    }

    /// What is left once the engine is done.
    pub(super) fn tail(&mut self) -> Delta {
        let delta = self.deltas.next(self.text.finish(), true);
        self.echoed(delta)
    }

    pub(super) fn push(&mut self, token: u32, logprobs: Option<TokenLogprobs>) -> Delta {
        if self.text.ids().is_empty() {
            // One first token per request: the first choice's.
            if self.index == 0 {
                metrics::TIME_TO_FIRST_TOKEN.observe(self.run.started.elapsed().as_secs_f64());
            }
        } else {
            metrics::INTER_TOKEN_LATENCY.observe(self.last.elapsed().as_secs_f64());
        }
        self.last = Instant::now();
        if let Some(l) = logprobs {
            self.logprobs.push((token, Some(l)));
        }
        let delta = self.deltas.next(self.text.push(token), false);
        self.echoed(delta)
    }

    /// The log-probabilities gathered since the last call, in the
    /// endpoint's shape; `null` when the request asked for none.
    pub(super) fn take_logprobs(&mut self) -> Value {
        if self.run.params.logits.logprobs.is_none() {
            return Value::Null;
        }
        let entries = std::mem::take(&mut self.logprobs);
        let state = &self.run.state;
        let as_ids = self.run.params.tokens_as_ids;
        let piece =
            |t: u32| if as_ids { (format!("token_id:{t}"), state.token_piece(t).1) } else { state.token_piece(t) };
        match self.run.kind {
            Kind::Chat { .. } => {
                let entry = |t: u32, lp: f32| {
                    let (text, bytes) = piece(t);
                    json!({"token": text, "logprob": lp, "bytes": bytes})
                };
                // Chats echo nothing: every entry has its log-probability.
                let content: Vec<Value> = entries
                    .iter()
                    .filter_map(|(t, l)| {
                        let l = l.as_ref()?;
                        let mut e = entry(*t, l.logprob);
                        e["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                        Some(e)
                    })
                    .collect();
                json!({"content": content})
            }
            Kind::Completion => {
                let (mut tokens, mut token_logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
                for (t, l) in &entries {
                    let (text, bytes) = piece(*t);
                    offsets.push(self.offset);
                    self.offset += String::from_utf8_lossy(&bytes).len();
                    tokens.push(text);
                    token_logprobs.push(l.as_ref().map(|l| l.logprob));
                    let alternatives = l.as_ref().map(|l| -> Map<String, Value> {
                        l.top.iter().map(|&(t, lp)| (piece(t).0, json!(lp))).collect()
                    });
                    top.push(alternatives);
                }
                json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                       "text_offset": offsets})
            }
        }
    }
}
