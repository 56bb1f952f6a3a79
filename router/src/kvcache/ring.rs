//! Which KV-cache instance holds a conversation: consistent hashing of the
//! key of the conversation's first block (`myriad_proto::kvkey::chain`)
//! onto a ring where every instance sits at [`POINTS`] places. All of a
//! conversation's blocks and snapshots share that key, so they live
//! together and a lookup asks one instance; conversations that share a
//! first block (a system prompt) share an instance, and with it their
//! common prefix. When an instance joins or leaves, only the keys on its
//! arcs move: theirs are recomputed once, the others stay where they are.

use myriad_proto::kvcache::kv_cache_client::KvCacheClient;
use myriad_proto::kvkey::{self as key, Key};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// Places of each instance on the ring: enough that each holds close to
/// its share of the keys (within ~15% at 64).
const POINTS: usize = 64;

/// One KV-cache instance and a (lazily connected) client for it.
#[derive(Clone)]
pub struct Instance {
    /// Its id in the cluster (or its address, for fixed instances): where
    /// it sits on the ring, so an instance back at another address keeps
    /// its keys.
    pub id: String,
    pub addr: String,
    pub client: KvCacheClient<Channel>,
}

/// The instances on the ring.
#[derive(Clone, Default)]
pub struct Ring {
    /// `(place, instance index)`, by place.
    points: Vec<(u64, usize)>,
    instances: Vec<Instance>,
}

impl Ring {
    pub fn new(instances: Vec<Instance>) -> Self {
        let mut points: Vec<(u64, usize)> = instances
            .iter()
            .enumerate()
            .flat_map(|(i, inst)| (0..POINTS).map(move |p| (place(&inst.id, p), i)))
            .collect();
        points.sort_unstable();
        Ring { points, instances }
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// Up to `n` distinct instances for a conversation routed by `key`, its
    /// home first: the instances met going round from the key's place.
    pub fn pick(&self, key: &Key, n: usize) -> Vec<&Instance> {
        let at = u64::from_be_bytes(key.0[..8].try_into().expect("8 bytes"));
        let start = self.points.partition_point(|&(p, _)| p < at);
        let mut picked: Vec<usize> = Vec::with_capacity(n);
        for &(_, i) in self.points[start..].iter().chain(&self.points[..start]) {
            if picked.len() == n.min(self.instances.len()) {
                break;
            }
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked.into_iter().map(|i| &self.instances[i]).collect()
    }
}

/// The key a conversation of `tokens` is routed by: that of its first
/// block, or the root for a prompt shorter than a block.
pub fn route_key(model_id: &str, block: usize, tokens: &[u32]) -> Key {
    let first = &tokens[..tokens.len().min(block)];
    *key::chain(model_id, block, first).last().expect("the chain starts with the root")
}

fn place(id: &str, point: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(b"myriad-kv-ring\0");
    h.update((id.len() as u64).to_le_bytes());
    h.update(id.as_bytes());
    h.update((point as u64).to_le_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::transport::Endpoint;

    fn ring(ids: &[&str]) -> Ring {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let instance = |id: &&str| Instance {
            id: id.to_string(),
            addr: String::new(),
            client: KvCacheClient::new(channel.clone()),
        };
        Ring::new(ids.iter().map(instance).collect())
    }

    fn keys(n: u32) -> Vec<Key> {
        (0..n).map(|i| route_key("m", 4, &[i, i + 1, i + 2, i + 3])).collect()
    }

    fn homes(ring: &Ring, keys: &[Key]) -> Vec<String> {
        keys.iter().map(|k| ring.pick(k, 1)[0].id.clone()).collect()
    }

    #[tokio::test]
    async fn keys_spread_evenly_and_only_a_leavers_keys_move() {
        let (three, two) = (ring(&["a", "b", "c"]), ring(&["a", "c"]));
        let keys = keys(3000);
        let before = homes(&three, &keys);
        for id in ["a", "b", "c"] {
            let share = before.iter().filter(|h| *h == id).count();
            assert!((700..1300).contains(&share), "{id} holds {share} of 3000");
        }
        for (old, new) in before.iter().zip(homes(&two, &keys)) {
            if old != "b" {
                assert_eq!(*old, new, "a key moved off a live instance");
            }
        }
    }

    #[tokio::test]
    async fn a_pick_is_distinct_instances_home_first() {
        let ring = ring(&["a", "b", "c"]);
        for k in keys(50) {
            let two: Vec<&str> = ring.pick(&k, 2).iter().map(|i| i.id.as_str()).collect();
            assert_eq!(two.len(), 2);
            assert_ne!(two[0], two[1]);
            assert_eq!(two[0], ring.pick(&k, 1)[0].id);
            assert_eq!(ring.pick(&k, 5).len(), 3, "never more than there are");
        }
        assert!(Ring::default().pick(&keys(1)[0], 2).is_empty());
    }

    #[test]
    fn a_conversation_is_routed_by_its_first_block() {
        let long = route_key("m", 4, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(long, route_key("m", 4, &[1, 2, 3, 4]), "later turns stay with the first block");
        assert_ne!(long, route_key("m", 4, &[1, 2, 3, 5]));
        assert_eq!(route_key("m", 4, &[1]), route_key("m", 4, &[2, 3]), "short prompts share the root");
    }
}
