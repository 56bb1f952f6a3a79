//! KV-cache content addresses, shared by the service (which files state
//! under them) and routers (which place conversations by them). A block's
//! key is a SHA-256 chain over the model, the
//! block size and the tokens: `h_0 = H(model, B)`, `h_{i+1} = H(h_i, tokens of
//! block i)`, so a key names the whole prefix up to the end of its block and
//! two conversations share a block exactly when they share those tokens. A
//! snapshot's key adds the tokens after its last full block.

use std::fmt;

use sha2::{Digest, Sha256};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.hex()[..12])
    }
}

impl Key {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Key> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(out))
    }
}

fn tokens_into(h: &mut Sha256, tokens: &[u32]) {
    for t in tokens {
        h.update(t.to_le_bytes());
    }
}

/// `[h_0, h_1, .., h_K]` for the `K = tokens.len() / block` full blocks.
pub fn chain(model_id: &str, block: usize, tokens: &[u32]) -> Vec<Key> {
    let mut root = Sha256::new();
    root.update(b"myriad-kv-root\0");
    root.update((model_id.len() as u64).to_le_bytes());
    root.update(model_id.as_bytes());
    root.update((block as u64).to_le_bytes());
    let mut keys = vec![Key(root.finalize().into())];
    for chunk in tokens.chunks_exact(block.max(1)) {
        let mut h = Sha256::new();
        h.update(b"myriad-kv-block\0");
        h.update(keys.last().expect("the root").0);
        tokens_into(&mut h, chunk);
        keys.push(Key(h.finalize().into()));
    }
    keys
}

/// The key of the state after `boundary`'s prefix plus `partial` tokens.
pub fn snapshot(boundary: &Key, partial: &[u32]) -> Key {
    let mut h = Sha256::new();
    h.update(b"myriad-kv-snapshot\0");
    h.update(boundary.0);
    h.update((partial.len() as u64).to_le_bytes());
    tokens_into(&mut h, partial);
    Key(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_whole_prefix_and_the_model() {
        let a = chain("m", 4, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(a.len(), 3, "root and two full blocks");
        let b = chain("m", 4, &[1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(a[1], b[1], "same first block");
        assert_ne!(a[2], b[2], "different second block");
        assert_ne!(chain("m", 4, &[9, 9, 9, 9, 5, 6, 7, 8])[2], a[2], "same tokens after a different prefix");
        assert_ne!(chain("other", 4, &[1, 2, 3, 4])[1], a[1], "another model");
        assert_ne!(chain("m", 2, &[1, 2, 3, 4])[2], a[1], "another block size");
        assert_ne!(snapshot(&a[1], &[5]), snapshot(&a[1], &[5, 6]));
        assert_eq!(Key::from_hex(&a[1].hex()), Some(a[1]));
        assert_eq!(Key::from_hex("zz"), None);
    }
}
