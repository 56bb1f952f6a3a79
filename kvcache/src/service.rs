//! The gRPC adapter over [`Cache`]: validate, run the cache's work off the
//! async threads, stream states in and out block by block.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use myriad_proto::MAX_MESSAGE_BYTES;
use myriad_proto::kvcache::kv_cache_server::{KvCache, KvCacheServer};
use myriad_proto::kvcache::{
    MissingBlocks, Prefix as PbPrefix, PutChunk, PutReply, StateChunk, StateHead, StatsReply, StatsRequest, put_chunk,
    state_chunk,
};
use myriad_tls::ServerTls;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::cache::{Cache, Prefix, PutError};
use crate::metrics;

/// The service's state: one cache, shared by every call.
#[derive(Clone)]
pub struct KvCacheService {
    cache: Arc<Mutex<Cache>>,
    published: Arc<Mutex<StatsReply>>,
}

/// Longest prefix a request may name (tokens).
const MAX_TOKENS: usize = 16 << 20;

fn prefix(p: &PbPrefix) -> Result<Prefix<'_>, Status> {
    if p.block_tokens == 0 {
        return Err(Status::invalid_argument("block_tokens must be at least 1"));
    }
    if p.tokens.len() > MAX_TOKENS {
        return Err(Status::invalid_argument(format!("more than {MAX_TOKENS} tokens")));
    }
    Ok(Prefix { model_id: &p.model_id, block: p.block_tokens as usize, tokens: &p.tokens })
}

impl KvCacheService {
    pub fn new(cache: Cache) -> Self {
        let service = KvCacheService { cache: Arc::new(Mutex::new(cache)), published: Default::default() };
        service.publish();
        service
    }

    /// Runs `f` on the cache on a blocking thread (disk I/O, hashing).
    async fn with_cache<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Cache) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let cache = self.cache.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| Status::internal(format!("cache task failed: {e}")))?;
        self.publish();
        Ok(out)
    }

    pub fn stats(&self) -> StatsReply {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let objects = cache.objects();
        let [(memory, memory_capacity), (disk, disk_capacity)] = objects.usage();
        StatsReply {
            memory_bytes: memory as u64,
            memory_capacity: memory_capacity as u64,
            disk_bytes: disk as u64,
            disk_capacity: disk_capacity as u64,
            blocks: objects.count(crate::objects::Kind::Block) as u64,
            snapshots: cache.snapshots() as u64,
            hits_memory: cache.hits.memory,
            hits_disk: cache.hits.disk,
            misses: cache.hits.misses,
            evictions_memory: objects.counts.evictions_memory,
            evictions_disk: objects.counts.evictions_disk,
            corrupt: objects.counts.corrupt,
            tokens_served: cache.hits.tokens_served,
        }
    }

    /// Brings the Prometheus metrics up to date with the cache's counters.
    fn publish(&self) {
        let now = self.stats();
        let mut last = self.published.lock().unwrap_or_else(|p| p.into_inner());
        metrics::publish(&last, &now);
        *last = now;
    }

    pub fn into_server(self) -> KvCacheServer<Self> {
        KvCacheServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<StateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl KvCache for KvCacheService {
    type LookupStream = ChunkStream;

    async fn lookup(&self, request: Request<PbPrefix>) -> Result<Response<Self::LookupStream>, Status> {
        let p = request.into_inner();
        prefix(&p)?;
        let found = self.with_cache(move |c| c.lookup(&prefix(&p).expect("checked"))).await?;
        let head = |tokens, blocks, tier: &str| StateChunk {
            part: Some(state_chunk::Part::Head(StateHead { tokens, blocks, tier: tier.into() })),
        };
        let chunks: Vec<StateChunk> = match found {
            None => vec![head(0, 0, "")],
            Some(f) => std::iter::once(head(f.tokens as u64, f.blocks.len() as u32, f.tier.name()))
                .chain(f.blocks.into_iter().map(|b| StateChunk { part: Some(state_chunk::Part::Block(b)) }))
                .chain(std::iter::once(StateChunk { part: Some(state_chunk::Part::Tail(f.tail)) }))
                .collect(),
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks.into_iter().map(Ok)))))
    }

    async fn missing(&self, request: Request<PbPrefix>) -> Result<Response<MissingBlocks>, Status> {
        let p = request.into_inner();
        prefix(&p)?;
        let missing = self.with_cache(move |c| c.missing(&prefix(&p).expect("checked"))).await?;
        Ok(Response::new(MissingBlocks { blocks: missing.into_iter().map(|i| i as u32).collect() }))
    }

    async fn put(&self, request: Request<Streaming<PutChunk>>) -> Result<Response<PutReply>, Status> {
        let mut stream = request.into_inner();
        let limit = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.objects().usage()[0].1
        };
        let mut head = None;
        let mut blocks: Vec<(usize, Bytes)> = Vec::new();
        let mut tail = None;
        let mut received = 0usize;
        while let Some(chunk) = stream.next().await {
            let part = chunk?.part.ok_or_else(|| Status::invalid_argument("an empty chunk"))?;
            match (part, &head, &tail) {
                (put_chunk::Part::Head(h), None, _) => {
                    prefix(&h)?;
                    head = Some(h);
                }
                (put_chunk::Part::Block(b), Some(_), None) => {
                    received += b.data.len();
                    blocks.push((b.index as usize, b.data));
                }
                (put_chunk::Part::Tail(t), Some(_), None) => {
                    received += t.len();
                    tail = Some(t);
                }
                _ => return Err(Status::invalid_argument("a put is one head, then blocks, then one tail")),
            }
            if received > limit {
                return Err(Status::resource_exhausted(format!("a state larger than the cache ({limit} bytes)")));
            }
        }
        let (Some(head), Some(tail)) = (head, tail) else {
            return Err(Status::invalid_argument("a put needs a head and a tail"));
        };
        let stored = self.with_cache(move |c| c.put(&prefix(&head).expect("checked"), blocks, tail)).await?;
        match stored {
            Ok(bytes) => Ok(Response::new(PutReply { stored_bytes: bytes as u64 })),
            Err(e @ PutError::MissingBlock(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ PutError::Io(_)) => Err(Status::resource_exhausted(e.to_string())),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsReply>, Status> {
        Ok(Response::new(KvCacheService::stats(self)))
    }
}

/// Serves `service` on `listener`, over TLS through `tls` when set, until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    service: KvCacheService,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = myriad_tls::incoming(listener, tls);
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
