//! Turning a growing list of token ids into text deltas: holds back a
//! trailing incomplete UTF-8 character, any suffix that may be the start of a
//! stop string or of `</think>`, and cuts at the first stop string.

use crate::chat::THINK_END;

pub struct Deltas {
    thinking: bool,
    stops: Vec<String>,
    sent_reasoning: usize,
    sent_content: usize,
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
        Deltas { thinking, stops, sent_reasoning: 0, sent_content: 0 }
    }

    /// `text` is the decoding of every id so far; `last` marks the end.
    pub fn next(&mut self, text: &str, last: bool) -> Delta {
        let mut end = text.len();
        let mut stopped = false;
        if let Some(i) = self.stops.iter().filter_map(|s| text.find(s.as_str())).min() {
            end = i;
            stopped = true;
        }
        let mut text = &text[..end];
        if !last && !stopped {
            text = text.trim_end_matches('\u{FFFD}');
            let mut markers: Vec<&str> = self.stops.iter().map(String::as_str).collect();
            if self.thinking && !text.contains(THINK_END) {
                markers.push(THINK_END);
            }
            let hold = markers.iter().map(|m| partial_suffix(text, m)).max().unwrap_or(0);
            text = &text[..text.len() - hold];
        }
        let (reasoning, content) = match (self.thinking, text.find(THINK_END)) {
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
}
