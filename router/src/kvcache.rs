//! The router's side of the KV-cache service: restore the state of the
//! longest stored prefix of a prompt before it is prefilled, and store the
//! state after a prompt and after a finished turn in the background.
//!
//! The cache is an optimisation, never a dependency: a lookup that fails,
//! times out or returns bytes that do not fit the model means the prompt is
//! computed from scratch; a save that fails is dropped and counted.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use myriad_model::state::block_tokens;
use myriad_model::{ModelConfig, SequenceState};
use myriad_proto::MAX_MESSAGE_BYTES;
use myriad_proto::kvcache::kv_cache_client::KvCacheClient;
use myriad_proto::kvcache::{Block, Prefix, PutChunk, put_chunk, state_chunk};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::metrics;

/// Saves waiting for the service; beyond this, new ones are dropped.
const SAVE_QUEUE: usize = 64;

/// A state to store: the tokens it has consumed and the state itself.
pub struct Save {
    pub tokens: Vec<u32>,
    pub state: SequenceState,
}

/// A handle on the KV-cache service for one model. Cheap to clone.
#[derive(Clone)]
pub struct StateCache {
    client: KvCacheClient<Channel>,
    model_id: String,
    config: Arc<ModelConfig>,
    timeout: Duration,
    saves: mpsc::Sender<Save>,
}

impl StateCache {
    /// Connects lazily to the service at `addr` (`host:port` or a URL) and
    /// starts the background saver on the current runtime.
    pub fn connect(addr: &str, model_id: &str, config: ModelConfig, timeout: Duration) -> Result<Self, String> {
        let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let endpoint = Endpoint::from_shared(url).map_err(|e| format!("bad KV-cache address `{addr}`: {e}"))?;
        let channel = endpoint.connect_timeout(timeout).tcp_nodelay(true).connect_lazy();
        let client = KvCacheClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (saves, queue) = mpsc::channel(SAVE_QUEUE);
        let cache = StateCache { client, model_id: model_id.to_string(), config: Arc::new(config), timeout, saves };
        tokio::spawn(cache.clone().saver(queue));
        Ok(cache)
    }

    fn prefix(&self, tokens: Vec<u32>) -> Prefix {
        Prefix { model_id: self.model_id.clone(), block_tokens: block_tokens(&self.config) as u32, tokens }
    }

    /// The state of the longest stored prefix of `tokens`, if any.
    pub async fn lookup(&self, tokens: &[u32]) -> Option<SequenceState> {
        let outcome = tokio::time::timeout(self.timeout, self.fetch(tokens)).await;
        let result = match outcome {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "KV-cache lookup failed; computing the prompt");
                metrics::KVCACHE_LOOKUPS.with_label_values(&["error"]).inc();
                return None;
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.timeout, "KV-cache lookup timed out; computing the prompt");
                metrics::KVCACHE_LOOKUPS.with_label_values(&["error"]).inc();
                return None;
            }
        };
        metrics::KVCACHE_LOOKUPS.with_label_values(&[if result.is_some() { "hit" } else { "miss" }]).inc();
        result
    }

    async fn fetch(&self, tokens: &[u32]) -> Result<Option<SequenceState>, String> {
        let mut client = self.client.clone();
        let mut stream =
            client.lookup(self.prefix(tokens.to_vec())).await.map_err(|s| s.message().to_string())?.into_inner();
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
            let result = tokio::time::timeout(self.timeout * 4, self.store(save)).await;
            let outcome = match result {
                Ok(Ok(())) => "ok",
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "storing a state in the KV-cache failed");
                    "error"
                }
                Err(_) => "error",
            };
            metrics::KVCACHE_SAVES.with_label_values(&[outcome]).inc();
        }
    }

    /// Sends the blocks the service lacks and the tail; when a block went
    /// missing in between (evicted), sends everything once more.
    async fn store(&self, save: Save) -> Result<(), String> {
        let Save { tokens, state } = save;
        let mut client = self.client.clone();
        let missing =
            client.missing(self.prefix(tokens.clone())).await.map_err(|s| s.message().to_string())?.into_inner().blocks;
        match self.put(&mut client, &tokens, &state, missing.iter().map(|&b| b as usize).collect()).await {
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                let all = (0..state.full_blocks(&self.config)).collect();
                self.put(&mut client, &tokens, &state, all).await.map_err(|s| s.message().to_string())
            }
            other => other.map_err(|s| s.message().to_string()),
        }
    }

    async fn put(
        &self,
        client: &mut KvCacheClient<Channel>,
        tokens: &[u32],
        state: &SequenceState,
        blocks: Vec<usize>,
    ) -> Result<(), tonic::Status> {
        let cfg = &self.config;
        let full = state.full_blocks(cfg);
        let head = PutChunk { part: Some(put_chunk::Part::Head(self.prefix(tokens.to_vec()))) };
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
