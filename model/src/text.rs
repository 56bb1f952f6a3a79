//! Text <-> token ids through the model folder's `tokenizer.json`.
//!
//! [`TextTokenizer::encode_protected`] encodes a rendered chat prompt whose
//! message contents must stay text: an added token's string inside a user
//! message (an end-of-sequence or role marker, `<think>`, a tool-call tag)
//! is encoded as ordinary text, never as the token, so a user cannot forge
//! turns or tool calls.

use std::ops::Range;
use std::path::Path;

use crate::error::{ModelError, Result};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with no added token matched in the text.
    plain: tokenizers::Tokenizer,
    /// Each added token's text and id (control tokens and markup such as
    /// `<think>`), longest text first (so a token whose text starts with
    /// another's wins, as in the tokenizer itself).
    added: Vec<(String, u32)>,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`; a clear error when the folder has none.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!(
                "{} has no tokenizer.json; pass token ids instead",
                dir.display()
            )));
        }
        let bad = |e: &dyn std::fmt::Display| ModelError::Tokenizer(format!("{}: {e}", path.display()));
        let json = std::fs::read_to_string(&path).map_err(|e| bad(&e))?;
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e| bad(&e))?;
        // `plain` matches no added token at all: the tokenizer skips only
        // special ones when asked to, so every added token (`<think>` is
        // not special, as it must stay in decoded text) is made special.
        let mut config: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(&e))?;
        for token in config.get_mut("added_tokens").and_then(|t| t.as_array_mut()).into_iter().flatten() {
            token["special"] = serde_json::Value::Bool(true);
        }
        let mut plain: tokenizers::Tokenizer = config.to_string().parse().map_err(|e| bad(&e))?;
        plain.set_encode_special_tokens(true);
        let mut added: Vec<(String, u32)> =
            inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (t.content, id)).collect();
        added.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(TextTokenizer { inner, plain, added })
    }

    /// Encodes `text`, matching added tokens only outside `protected`
    /// (sorted, disjoint byte ranges): inside them an added token's string
    /// is ordinary text. Without such strings in `protected` the ids equal
    /// [`Self::encode`]'s: the tokenizer itself splits the text at added
    /// tokens and encodes the pieces between them independently, as here.
    pub fn encode_protected(&self, text: &str, protected: &[Range<usize>]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let (mut piece, mut at) = (0, 0);
        let mut ranges = protected.iter().peekable();
        while at < text.len() {
            while ranges.next_if(|r| r.end <= at).is_some() {}
            if let Some(r) = ranges.peek()
                && r.start <= at
            {
                at = r.end;
                continue;
            }
            let next_protected = ranges.peek().map_or(text.len(), |r| r.start);
            let found = self
                .added
                .iter()
                .find(|(s, _)| !s.is_empty() && text[at..].starts_with(s.as_str()) && at + s.len() <= next_protected);
            match found {
                Some((s, id)) => {
                    ids.extend(self.encode_plain(&text[piece..at])?);
                    ids.push(*id);
                    at += s.len();
                    piece = at;
                }
                None => at += text[at..].chars().next().map_or(1, char::len_utf8),
            }
        }
        ids.extend(self.encode_plain(&text[piece..])?);
        Ok(ids)
    }

    /// The first added token whose text occurs in `text`.
    pub fn added_in(&self, text: &str) -> Option<&str> {
        self.added.iter().map(|(s, _)| s.as_str()).find(|s| !s.is_empty() && text.contains(s))
    }

    fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let encoding = self.plain.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Each token's bytes, for constrained decoding: what the model writes
    /// when it picks the token, and whether it is a control token (special:
    /// never text). Only byte-level BPE tokenizers (DeepSeek's, GPT-2's)
    /// spell every token as bytes; others are refused.
    pub fn token_bytes(&self) -> Result<Vec<(Vec<u8>, bool)>> {
        let byte_level = match self.inner.get_decoder() {
            Some(tokenizers::DecoderWrapper::ByteLevel(_)) => true,
            Some(tokenizers::DecoderWrapper::Sequence(seq)) => {
                seq.get_decoders().iter().any(|d| matches!(d, tokenizers::DecoderWrapper::ByteLevel(_)))
            }
            _ => false,
        };
        if !byte_level {
            return Err(ModelError::Tokenizer("constrained decoding needs a byte-level BPE tokenizer".into()));
        }
        let unmap = byte_level_chars();
        let added = self.inner.get_added_tokens_decoder();
        let size = self.inner.get_vocab_size(true) as u32;
        (0..size)
            .map(|id| {
                if let Some(token) = added.get(&id) {
                    return Ok((token.content.as_bytes().to_vec(), token.special));
                }
                let Some(name) = self.inner.id_to_token(id) else { return Ok((Vec::new(), true)) };
                let bytes = name.chars().map(|c| unmap.get(&c).copied()).collect::<Option<Vec<u8>>>();
                bytes.map(|b| (b, false)).ok_or_else(|| {
                    ModelError::Tokenizer(format!("token {id} ({name:?}) is not spelled in byte-level characters"))
                })
            })
            .collect()
    }

    /// The text of `ids` without control tokens (BOS, EOS, role markers):
    /// what a completion shows.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The text of `ids` with every token, control tokens included: what a
    /// prompt holds.
    pub fn decode_all(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}

/// Byte-level BPE spells each byte as one printable character: printable
/// Latin-1 bytes as themselves, the other 68 bytes as the characters from
/// U+0100 on, in byte order. The map from those characters to bytes.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                next += 1;
                (c, b)
            }
        })
        .collect()
}
