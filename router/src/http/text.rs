//! Turning a growing list of token ids into text deltas. [`Detokenizer`]
//! decodes only a short window per token; [`Deltas`] holds back a trailing
//! incomplete UTF-8 character, any suffix that may be the start of a stop
//! string or of `</think>`, and cuts at the first stop string. Both look only
//! at the new end of the text, so a long answer costs linear time in total.

use myriad_model::text::TextTokenizer;

use crate::chat::THINK_END;

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
}

impl<'a> Detokenizer<'a> {
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Detokenizer { tokenizer, ids: Vec::new(), prefix: 0, read: 0, text: String::new() }
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
        let decode = |ids: &[u32]| self.tokenizer.decode(ids).unwrap_or_default();
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
    stops: Vec<String>,
    sent_reasoning: usize,
    sent_content: usize,
    /// Where a stop string could still start (earlier ones were searched).
    stop_scan: usize,
    /// Where `</think>` is, once seen, and where to look for it next.
    think_end: Option<usize>,
    think_scan: usize,
}

/// What to send now.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
    /// A stop string was found: the text ends before it.
    pub stopped: bool,
}

impl Deltas {
    pub fn new(thinking: bool, stops: Vec<String>) -> Self {
        Deltas { thinking, stops, sent_reasoning: 0, sent_content: 0, stop_scan: 0, think_end: None, think_scan: 0 }
    }

    /// `text` is the decoding of every id so far (each call's text extends
    /// the previous one's); `last` marks the end.
    pub fn next(&mut self, text: &str, last: bool) -> Delta {
        let mut end = text.len();
        let mut stopped = false;
        let from = text.floor_char_boundary(self.stop_scan);
        if let Some(i) = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min() {
            end = i;
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
        let mut text = &text[..end];
        if !last && !stopped {
            text = text.trim_end_matches('\u{FFFD}');
            let mut markers: Vec<&str> = self.stops.iter().map(String::as_str).collect();
            if self.thinking && self.think_end.is_none_or(|i| i + THINK_END.len() > text.len()) {
                markers.push(THINK_END);
            }
            let hold = markers.iter().map(|m| partial_suffix(text, m)).max().unwrap_or(0);
            text = &text[..text.len() - hold];
        }
        let think_end = self.think_end.filter(|&i| i + THINK_END.len() <= text.len());
        let (reasoning, content) = match (self.thinking, think_end) {
            (false, _) => ("", text),
            (true, Some(i)) => (&text[..i], &text[i + THINK_END.len()..]),
            (true, None) => (text, ""),
        };
        let delta = Delta {
            reasoning: reasoning.get(self.sent_reasoning..).unwrap_or("").to_string(),
            content: content.get(self.sent_content..).unwrap_or("").to_string(),
            stopped,
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
        let mut d = Deltas::new(false, vec!["END".into()]);
        assert_eq!(d.next("hello E", false).content, "hello ");
        assert_eq!(d.next("hello EN", false).content, "");
        let last = d.next("hello ENDING", false);
        assert_eq!((last.content.as_str(), last.stopped), ("", true));
        let mut d = Deltas::new(false, vec![]);
        assert_eq!(d.next("caf\u{FFFD}", false).content, "caf");
        assert_eq!(d.next("café", false).content, "é");
    }

    #[test]
    fn splits_reasoning_across_deltas() {
        let mut d = Deltas::new(true, vec![]);
        assert_eq!(d.next("plan </th", false), Delta { reasoning: "plan ".into(), content: "".into(), stopped: false });
        assert_eq!(
            d.next("plan </think>ans", false),
            Delta { reasoning: "".into(), content: "ans".into(), stopped: false }
        );
        assert_eq!(d.next("plan </think>answer", true).content, "wer");
    }

    #[test]
    fn a_stop_string_split_across_many_calls_is_found() {
        let mut d = Deltas::new(false, vec!["<|stop|>".into()]);
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
