//! The router's side of the KV-cache service: restore the state of the
//! longest stored prefix of a prompt before it is prefilled, and store the
//! state after a prompt and after a finished turn in the background.
//!
//! With several instances, each conversation has a home among them
//! ([`ring`]), and with `replicas` > 1 the next instances on the ring hold
//! copies: a lookup asks them in turn, a save goes to each.
//!
//! The cache is an optimisation, never a dependency: a lookup that fails,
//! times out or returns bytes that do not fit the model means the prompt is
//! computed from scratch; a save that fails is dropped and counted. Keys
//! are content addresses and restored states are checked, so an instance
//! that dies, or a conversation whose home moved, costs recomputation,
//! never a wrong answer.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use myriad_model::state::block_tokens;
use myriad_model::{ModelConfig, SequenceState};
use myriad_proto::MAX_MESSAGE_BYTES;
use myriad_proto::kvcache::kv_cache_client::KvCacheClient;
use myriad_proto::kvcache::{Block, Prefix, PutChunk, put_chunk, state_chunk};
use myriad_store::Store;
use myriad_store::mirror::Mirror;
use myriad_store::schema::{self, Keys, Role};
use myriad_tls::ClientTls;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::metrics;

pub mod ring;

use ring::{Instance, Ring, route_key};

/// Saves waiting for the service; beyond this, new ones are dropped.
const SAVE_QUEUE: usize = 64;

/// A state to store: the tokens it has consumed and the state itself,
/// under its request's `cache_salt` (if any).
pub struct Save {
    pub tokens: Vec<u32>,
    pub state: SequenceState,
    pub salt: Option<Arc<str>>,
}

/// A handle on the KV-cache instances for one model. Cheap to clone.
#[derive(Clone)]
pub struct StateCache {
    ring: Arc<RwLock<Arc<Ring>>>,
    /// Instances holding each conversation (its home first).
    replicas: usize,
    model_id: String,
    config: Arc<ModelConfig>,
    timeout: Duration,
    saves: mpsc::Sender<Save>,
}

/// A lazily connected client of the instance at `addr` (`host:port` or a
/// URL), over TLS through `tls` when set.
fn client(addr: &str, timeout: Duration, tls: Option<&ClientTls>) -> Result<KvCacheClient<Channel>, String> {
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let endpoint = Endpoint::from_shared(url).map_err(|e| format!("bad KV-cache address `{addr}`: {e}"))?;
    let channel = myriad_tls::lazy_channel(endpoint.connect_timeout(timeout).tcp_nodelay(true), tls);
    Ok(KvCacheClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

impl StateCache {
    /// Connects lazily to the instances at `addrs` and starts the
    /// background saver on the current runtime.
    pub fn connect(
        addrs: &[String],
        model_id: &str,
        config: ModelConfig,
        timeout: Duration,
        replicas: usize,
        tls: Option<&ClientTls>,
    ) -> Result<Self, String> {
        let instances = addrs
            .iter()
            .map(|addr| Ok(Instance { id: addr.clone(), addr: addr.clone(), client: client(addr, timeout, tls)? }))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self::start(Ring::new(instances), model_id, config, timeout, replicas))
    }

    /// The instances registered in the cluster store (`myriad kvcache
    /// --etcd`), followed as they come and go from the current runtime.
    /// None are known until the store answers: prompts are computed in
    /// full meanwhile.
    pub fn registered(
        store: Arc<dyn Store>,
        keys: &Keys,
        model_id: &str,
        config: ModelConfig,
        timeout: Duration,
        replicas: usize,
        tls: Option<ClientTls>,
    ) -> Self {
        let cache = Self::start(Ring::default(), model_id, config, timeout, replicas);
        let ring = cache.ring.clone();
        let prefix = keys.nodes(Role::Kvcache);
        tokio::spawn(async move {
            let mirror = myriad_store::retry::until_joined("follow the KV-cache instances", || {
                Mirror::follow(store.clone(), prefix.clone())
            })
            .await;
            let mut changes = mirror.subscribe();
            loop {
                let records = schema::read_nodes(&changes.borrow_and_update());
                let old = ring.read().unwrap_or_else(|p| p.into_inner()).clone();
                let instances: Vec<Instance> = records
                    .into_iter()
                    .filter_map(|r| {
                        // Keep the client (and its connection) of an instance still where it was.
                        let known = old.instances().iter().find(|i| i.id == r.id.as_str() && i.addr == r.addr);
                        let client = match known {
                            Some(i) => i.client.clone(),
                            None => client(&r.addr, timeout, tls.as_ref())
                                .inspect_err(
                                    |e| tracing::warn!(node = %r.id, error = %e, "skipping a KV-cache instance"),
                                )
                                .ok()?,
                        };
                        Some(Instance { id: r.id.to_string(), addr: r.addr, client })
                    })
                    .collect();
                let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
                tracing::info!(instances = ?ids, "KV-cache instances");
                *ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Ring::new(instances));
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        cache
    }

    fn start(ring: Ring, model_id: &str, config: ModelConfig, timeout: Duration, replicas: usize) -> Self {
        let (saves, queue) = mpsc::channel(SAVE_QUEUE);
        let cache = StateCache {
            ring: Arc::new(RwLock::new(Arc::new(ring))),
            replicas: replicas.max(1),
            model_id: model_id.to_string(),
            config: Arc::new(config),
            timeout,
            saves,
        };
        tokio::spawn(cache.clone().saver(queue));
        cache
    }

    /// The instances holding a conversation of `tokens`, its home first.
    /// The name states are stored under: the model's id, and for a request
    /// with a `cache_salt` a digest of it, so that requests share stored
    /// prefixes only with those of the same salt (vLLM's tenant isolation).
    fn namespace(&self, salt: Option<&str>) -> String {
        use sha2::Digest;
        match salt {
            None => self.model_id.clone(),
            Some(salt) => {
                let digest = sha2::Sha256::digest(salt.as_bytes());
                let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
                format!("{}/salt-{hex}", self.model_id)
            }
        }
    }

    fn holders(&self, namespace: &str, tokens: &[u32]) -> Vec<Instance> {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner()).clone();
        let key = route_key(namespace, block_tokens(&self.config), tokens);
        ring.pick(&key, self.replicas).into_iter().cloned().collect()
    }

    fn prefix(&self, namespace: &str, tokens: Vec<u32>) -> Prefix {
        Prefix { model_id: namespace.to_string(), block_tokens: block_tokens(&self.config) as u32, tokens }
    }

    /// The state of the longest prefix of `tokens` stored under `salt`, if
    /// any: from its home, else from the next holder that has it.
    pub async fn lookup(&self, tokens: &[u32], salt: Option<&str>) -> Option<SequenceState> {
        let namespace = self.namespace(salt);
        let holders = self.holders(&namespace, tokens);
        let mut failed = 0;
        for instance in &holders {
            let fetch = self.fetch(instance.client.clone(), &namespace, tokens);
            let outcome = tokio::time::timeout(self.timeout, fetch).await;
            match outcome {
                Ok(Ok(Some(state))) => {
                    metrics::KVCACHE_LOOKUPS.with_label_values(&["hit"]).inc();
                    return Some(state);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    failed += 1;
                    tracing::warn!(instance = %instance.id, error = %e, "KV-cache lookup failed");
                }
                Err(_) => {
                    failed += 1;
                    tracing::warn!(instance = %instance.id, timeout = ?self.timeout, "KV-cache lookup timed out");
                }
            }
        }
        // Every holder failing (or none known) is an error; any answer a miss.
        let outcome = if failed == holders.len() { "error" } else { "miss" };
        metrics::KVCACHE_LOOKUPS.with_label_values(&[outcome]).inc();
        None
    }

    async fn fetch(
        &self,
        mut client: KvCacheClient<Channel>,
        namespace: &str,
        tokens: &[u32],
    ) -> Result<Option<SequenceState>, String> {
        let mut stream = client
            .lookup(self.prefix(namespace, tokens.to_vec()))
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut blocks = Vec::new();
        let mut head = None;
        while let Some(chunk) = stream.next().await {
            match chunk.map_err(|s| s.message().to_string())?.part {
                Some(state_chunk::Part::Head(h)) if head.is_none() => head = Some(h),
                Some(state_chunk::Part::Block(b)) if head.is_some() => blocks.push(b),
                Some(state_chunk::Part::Tail(tail)) if head.is_some() => {
                    let head = head.expect("checked");
                    let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
                    let state = SequenceState::from_blocks(&self.config, &refs, &tail).map_err(|e| e.to_string())?;
                    if state.position as u64 != head.tokens || state.position > tokens.len() {
                        return Err(format!("the service sent {} tokens of state for {}", state.position, head.tokens));
                    }
                    metrics::KVCACHE_BYTES
                        .with_label_values(&["restored"])
                        .inc_by((blocks.iter().map(|b| b.len()).sum::<usize>() + tail.len()) as u64);
                    tracing::debug!(tokens = state.position, tier = %head.tier, "restored a prefix");
                    return Ok(Some(state));
                }
                _ => return Err("the service's answer is out of order".into()),
            }
        }
        match head {
            Some(h) if h.tokens == 0 => Ok(None),
            _ => Err("the service's answer ended early".into()),
        }
    }

    /// Queues `save` for storing; drops it (counted) when the queue is full.
    pub fn save(&self, save: Save) {
        if self.saves.try_send(save).is_err() {
            metrics::KVCACHE_SAVES.with_label_values(&["dropped"]).inc();
        }
    }

    async fn saver(self, mut queue: mpsc::Receiver<Save>) {
        while let Some(save) = queue.recv().await {
            let namespace = self.namespace(save.salt.as_deref());
            for instance in self.holders(&namespace, &save.tokens) {
                let result =
                    tokio::time::timeout(self.timeout * 4, self.store(instance.client, &namespace, &save)).await;
                let outcome = match result {
                    Ok(Ok(())) => "ok",
                    Ok(Err(e)) => {
                        tracing::warn!(instance = %instance.id, error = %e, "storing a state in the KV-cache failed");
                        "error"
                    }
                    Err(_) => "error",
                };
                metrics::KVCACHE_SAVES.with_label_values(&[outcome]).inc();
            }
        }
    }

    /// Sends the blocks the instance lacks and the tail; when a block went
    /// missing in between (evicted), sends everything once more.
    async fn store(&self, mut client: KvCacheClient<Channel>, namespace: &str, save: &Save) -> Result<(), String> {
        let Save { tokens, state, .. } = save;
        let prefix = self.prefix(namespace, tokens.clone());
        let missing = client.missing(prefix.clone()).await.map_err(|s| s.message().to_string())?.into_inner().blocks;
        match self.put(&mut client, prefix.clone(), state, missing.iter().map(|&b| b as usize).collect()).await {
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                let all = (0..state.full_blocks(&self.config)).collect();
                self.put(&mut client, prefix, state, all).await.map_err(|s| s.message().to_string())
            }
            other => other.map_err(|s| s.message().to_string()),
        }
    }

    async fn put(
        &self,
        client: &mut KvCacheClient<Channel>,
        prefix: Prefix,
        state: &SequenceState,
        blocks: Vec<usize>,
    ) -> Result<(), tonic::Status> {
        let cfg = &self.config;
        let full = state.full_blocks(cfg);
        let head = PutChunk { part: Some(put_chunk::Part::Head(prefix)) };
        let mut chunks = vec![head];
        let mut bytes = 0;
        for i in blocks.into_iter().filter(|&i| i < full) {
            let data = state.encode_block(cfg, i);
            bytes += data.len();
            chunks.push(PutChunk { part: Some(put_chunk::Part::Block(Block { index: i as u32, data: data.into() })) });
        }
        let tail = state.encode_tail(cfg);
        bytes += tail.len();
        chunks.push(PutChunk { part: Some(put_chunk::Part::Tail(tail.into())) });
        client.put(tokio_stream::iter(chunks)).await?;
        metrics::KVCACHE_BYTES.with_label_values(&["stored"]).inc_by(bytes as u64);
        Ok(())
    }
}
