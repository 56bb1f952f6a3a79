//! Turning a growing list of token ids into text deltas. [`Detokenizer`]
//! decodes only a short window per token; [`Deltas`] holds back a trailing
//! incomplete UTF-8 character, any suffix that may be the start of a stop
//! string or of `</think>`, and cuts at the first stop string. Both look only
//! at the new end of the text, so a long answer costs linear time in total.

use myriad_model::text::TextTokenizer;

use crate::chat::THINK_END;
use crate::chat::v4_parse::{CALLS_END, CALLS_START};

/// The text of a growing id list. Each token decodes the ids from the last
/// emitted boundary (`prefix`) on, so tokenizers whose output depends on
/// the preceding token still decode right, and text is only appended once
/// it no longer ends in an incomplete character.
pub struct Detokenizer<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Start of the decoding window: context for the ids after `read`.
    prefix: usize,
    /// Ids before this are in `text`.
    read: usize,
    text: String,
    /// Control tokens are spelled out rather than skipped (vLLM's
    /// `skip_special_tokens: false`).
    special: bool,
}

impl<'a> Detokenizer<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Detokenizer { tokenizer, ids: Vec::new(), prefix: 0, read: 0, text: String::new(), special: false }
    }

    /// The text then spells control tokens out instead of skipping them.
    pub fn with_special_tokens(self, special: bool) -> Self {
        Detokenizer { special, ..self }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds a token; returns the text so far (without a trailing incomplete character).
    pub fn push(&mut self, id: u32) -> &str {
        self.ids.push(id);
        self.advance(false);
        &self.text
    }

    /// The whole text, including whatever incomplete character ends it.
    pub fn finish(&mut self) -> &str {
        self.advance(true);
        &self.text
    }

    fn advance(&mut self, last: bool) {
        let decode = |ids: &[u32]| {
            let text = if self.special { self.tokenizer.decode_all(ids) } else { self.tokenizer.decode(ids) };
            text.unwrap_or_default()
        };
        let before = decode(&self.ids[self.prefix..self.read]);
        let now = decode(&self.ids[self.prefix..]);
        match now.strip_prefix(before.as_str()) {
            Some(new) if last || (!new.is_empty() && !new.ends_with('\u{FFFD}')) => {
                self.text.push_str(new);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
            Some(_) => {}
            // The window's decoding changed what came before: decode it all.
            None => {
                self.text = decode(&self.ids);
                self.prefix = self.ids.len();
                self.read = self.ids.len();
            }
        }
    }
}

pub struct Deltas {
    thinking: bool,
    /// Whether a DSML tool-call block in the content is a call.
    calls: bool,
    stops: Vec<String>,
    /// Whether the text keeps the stop string it ends at.
    keep_stop: bool,
    sent_reasoning: usize,
    sent_content: usize,
    /// Where a stop string could still start (earlier ones were searched).
    stop_scan: usize,
    /// Where `</think>` is, once seen, and where to look for it next.
    think_end: Option<usize>,
    think_scan: usize,
    /// Where the tool-call block starts, once seen, and where to look next.
    block: Option<usize>,
    block_scan: usize,
    block_sent: bool,
}

/// What to send now.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
    /// The answer has ended: at a stop string (the text ends before it) or
    /// after a complete tool-call block.
    pub stopped: bool,
    /// The tool-call block, from its leading blank line through its closing
    /// tag; sent once, when it closes or the answer ends without closing it.
    pub calls: Option<String>,
}

impl Deltas {
    /// `calls`: cut a DSML tool-call block out of the content (it ends the
    /// answer) instead of sending it as text.
    pub fn new(thinking: bool, calls: bool, stops: Vec<String>) -> Self {
        Deltas {
            thinking,
            calls,
            stops,
            keep_stop: false,
            sent_reasoning: 0,
            sent_content: 0,
            stop_scan: 0,
            think_end: None,
            think_scan: 0,
            block: None,
            block_scan: 0,
            block_sent: false,
        }
    }

    /// The text then ends after the stop string it stops at, not before
    /// (vLLM's `include_stop_str_in_output`).
    pub fn keeping_stop(self, keep: bool) -> Self {
        Deltas { keep_stop: keep, ..self }
    }

    /// `text` is the decoding of every id so far (each call's text extends
    /// the previous one's); `last` marks the end.
    pub fn next(&mut self, text: &str, last: bool) -> Delta {
        let mut end = text.len();
        let mut stopped = false;
        let from = text.floor_char_boundary(self.stop_scan);
        let found = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| (from + i, s.len())));
        // The first; of stops found at the same place, the longest.
        if let Some((i, len)) = found.min_by_key(|&(i, len)| (i, std::cmp::Reverse(len))) {
            end = if self.keep_stop { i + len } else { i };
            stopped = true;
        } else {
            let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
            self.stop_scan = text.len().saturating_sub(longest.saturating_sub(1));
        }
        if self.thinking && self.think_end.is_none() {
            let from = text.floor_char_boundary(self.think_scan);
            self.think_end = text[from..].find(THINK_END).map(|i| from + i);
            self.think_scan = text.len().saturating_sub(THINK_END.len() - 1);
        }
        let content_start = match (self.thinking, self.think_end) {
            (false, _) => Some(0),
            (true, Some(i)) => Some(i + THINK_END.len()),
            (true, None) => None,
        };
        if let (true, None, Some(start)) = (self.calls, self.block, content_start)
            && start <= end
        {
            let from = text.floor_char_boundary(self.block_scan.max(start));
            match text[from..end].find(CALLS_START) {
                Some(i) => self.block = Some(from + i),
                None => self.block_scan = end.saturating_sub(CALLS_START.len() - 1),
            }
        }
        if let Some(b) = self.block.filter(|&b| b < end)
            && let Some(j) = text[b..end].find(CALLS_END)
        {
            end = b + j + CALLS_END.len();
            stopped = true;
        }
        let mut text = &text[..end];
        if !last && !stopped {
            text = text.trim_end_matches('\u{FFFD}');
            let mut markers: Vec<&str> = self.stops.iter().map(String::as_str).collect();
            if self.thinking && self.think_end.is_none_or(|i| i + THINK_END.len() > text.len()) {
                markers.push(THINK_END);
            }
            if self.calls && self.block.is_none() {
                markers.push(CALLS_START);
            }
            let hold = markers.iter().map(|m| partial_suffix(text, m)).max().unwrap_or(0);
            text = &text[..text.len() - hold];
        }
        let think_end = self.think_end.filter(|&i| i + THINK_END.len() <= text.len());
        let (reasoning, mut content) = match (self.thinking, think_end) {
            (false, _) => ("", text),
            (true, Some(i)) => (&text[..i], &text[i + THINK_END.len()..]),
            (true, None) => (text, ""),
        };
        let mut calls = None;
        if let Some(b) = self.block.filter(|&b| b < text.len()) {
            let block = &text[b..];
            content = &content[..content.len() - block.len()];
            if (stopped || last) && !self.block_sent {
                self.block_sent = true;
                calls = Some(block.to_string());
            }
        }
        let delta = Delta {
            reasoning: reasoning.get(self.sent_reasoning..).unwrap_or("").to_string(),
            content: content.get(self.sent_content..).unwrap_or("").to_string(),
            stopped,
            calls,
        };
        self.sent_reasoning = self.sent_reasoning.max(reasoning.len());
        self.sent_content = self.sent_content.max(content.len());
        delta
    }
}

/// Length of the longest proper suffix of `text` that is a prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_partial_stops_and_cuts_at_them() {
        let mut d = Deltas::new(false, false, vec!["END".into()]);
        assert_eq!(d.next("hello E", false).content, "hello ");
        assert_eq!(d.next("hello EN", false).content, "");
        let last = d.next("hello ENDING", false);
        assert_eq!((last.content.as_str(), last.stopped), ("", true));
        let mut d = Deltas::new(false, false, vec![]);
        assert_eq!(d.next("caf\u{FFFD}", false).content, "caf");
        assert_eq!(d.next("café", false).content, "é");
    }

    #[test]
    fn splits_reasoning_across_deltas() {
        let mut d = Deltas::new(true, false, vec![]);
        assert_eq!(d.next("plan </th", false), Delta { reasoning: "plan ".into(), ..Delta::default() });
        assert_eq!(d.next("plan </think>ans", false), Delta { content: "ans".into(), ..Delta::default() });
        assert_eq!(d.next("plan </think>answer", true).content, "wer");
    }

    #[test]
    fn a_kept_stop_string_ends_the_text() {
        let mut d = Deltas::new(false, false, vec!["END".into(), "ENDING".into()]).keeping_stop(true);
        assert_eq!(d.next("one EN", false).content, "one ");
        let last = d.next("one ENDING and more", false);
        assert_eq!((last.content.as_str(), last.stopped), ("ENDING", true));
    }

    #[test]
    fn a_stop_string_split_across_many_calls_is_found() {
        let mut d = Deltas::new(false, false, vec!["<|stop|>".into()]);
        let text = "some words then <|stop|> and more";
        let mut sent = String::new();
        let mut stopped = false;
        for end in 1..=text.len() {
            let delta = d.next(&text[..end], false);
            sent.push_str(&delta.content);
            if delta.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(sent, "some words then ");
    }

    /// Feeds `text` one character at a time; what was sent as content, the
    /// block, and whether the answer ended before the text did.
    fn feed(deltas: &mut Deltas, text: &str) -> (String, Option<String>, bool) {
        let (mut content, mut calls) = (String::new(), None);
        let ends: Vec<usize> = text.char_indices().map(|(i, c)| i + c.len_utf8()).collect();
        for (n, &end) in ends.iter().enumerate() {
            let delta = deltas.next(&text[..end], n + 1 == ends.len());
            content.push_str(&delta.content);
            assert!(calls.is_none() || delta.calls.is_none(), "the block is sent once");
            calls = calls.or(delta.calls);
            if delta.stopped {
                return (content, calls, true);
            }
        }
        (content, calls, false)
    }

    #[test]
    fn a_tool_call_block_is_cut_out_of_the_content_and_ends_the_answer() {
        let block = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        let text = format!("Let me look.{block}and more");
        let (content, calls, stopped) = feed(&mut Deltas::new(false, true, vec![]), &text);
        assert_eq!((content.as_str(), calls.as_deref(), stopped), ("Let me look.", Some(block), true));
        // In thinking mode only after the reasoning; without tools it is text.
        let thought = format!("I could{block}</think>ok{block}");
        let (content, calls, _) = feed(&mut Deltas::new(true, true, vec![]), &thought);
        assert_eq!((content.as_str(), calls.as_deref()), ("ok", Some(block)));
        let (content, calls, stopped) = feed(&mut Deltas::new(false, false, vec![]), &text);
        assert_eq!((content, calls, stopped), (text.clone(), None, false));
        // A block the answer never closes comes out at the end, to be
        // reported as content when it does not parse.
        let open = "Hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜inv";
        let (content, calls, stopped) = feed(&mut Deltas::new(false, true, vec![]), open);
        assert_eq!((content.as_str(), calls.as_deref(), stopped), ("Hi", Some(&open[2..]), false));
        // Blank lines that start no block are content.
        let (content, calls, _) = feed(&mut Deltas::new(false, true, vec![]), "a\n\n<b>");
        assert_eq!((content.as_str(), calls), ("a\n\n<b>", None));
    }

    #[test]
    fn incremental_decoding_equals_decoding_everything() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4");
        let tokenizer = TextTokenizer::load(&dir).unwrap();
        let ids = tokenizer.encode("Grüße, 世界! naïve café — 🙂 done.").unwrap();
        // Splitting multi-byte characters across tokens is what this tests.
        assert!(ids.len() > 20, "{ids:?}");
        let mut detok = Detokenizer::new(&tokenizer);
        for (i, &id) in ids.iter().enumerate() {
            let text = detok.push(id).to_string();
            let whole = tokenizer.decode(&ids[..=i]).unwrap();
            assert!(whole.starts_with(&text) && !text.contains('\u{FFFD}'), "{text:?} vs {whole:?}");
        }
        assert_eq!(detok.finish(), tokenizer.decode(&ids).unwrap());
    }
}
