//! `myriad bench`: a load generator for any OpenAI-compatible endpoint.
//! Streams completions with prompts of exactly `--prompt-len` tokens at a
//! fixed concurrency and reports throughput, time to first token and
//! inter-token latency (p50/p99), and failures. With `--shared-prefixes`,
//! prompts start with one of a few shared prefixes (system prompts), and it
//! reports how much of the prompts the server restored from its KV-cache,
//! per KV-cache instance with `--kvcache`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use myriad_model::generate::Rng;
use myriad_proto::kvcache::kv_cache_client::KvCacheClient;
use myriad_proto::kvcache::{StatsReply, StatsRequest};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct Args {
    /// Base URL of the API, e.g. http://127.0.0.1:8000 (with or without /v1).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,

    /// Requests in total.
    #[arg(long, default_value_t = 64)]
    requests: usize,

    /// Prompt length in tokens (sent as token ids).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,

    /// Completion tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,

    /// API key, when the server wants one.
    #[arg(long, env = "MYRIAD_API_KEY")]
    api_key: Option<String>,

    /// Seed of the prompts' token ids (default: from the clock, and printed).
    /// A new seed means no prompt is already in the server's KV-cache from an
    /// earlier run; the same seed repeats a run.
    #[arg(long)]
    seed: Option<u64>,

    /// A `response_format` for every request, as JSON (e.g.
    /// '{"type": "json_object"}'): measures constrained decoding's cost
    /// against a run without it.
    #[arg(long)]
    response_format: Option<String>,

    /// Shared prefixes (system prompts): request `i` starts with prefix
    /// `i mod N`, then its own `--prompt-len` tokens. 0: none.
    #[arg(long, default_value_t = 0)]
    shared_prefixes: usize,

    /// Tokens of each shared prefix.
    #[arg(long, default_value_t = 512)]
    prefix_len: usize,

    /// KV-cache instances (comma-separated) to report on after the run:
    /// lookups, hits and bytes held by each.
    #[arg(long, value_delimiter = ',')]
    kvcache: Vec<String>,
}

/// Shared prefix `p` of a run: drawn from a stream of its own, so no
/// request's own tokens repeat it.
fn shared_prefix(seed: u64, p: usize, len: usize) -> Vec<u32> {
    prompt(seed ^ 0x5EED_F00D_5A4E_D000, p, len)
}

/// Prompt `i` of a run: random token ids in 3..203 (clear of the usual
/// special ids and inside any vocabulary), so no two prompts share a prefix.
fn prompt(seed: u64, i: usize, len: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    (0..len).map(|_| 3 + (rng.next_f32() * 200.0) as u32 % 200).collect()
}

/// What one request measured.
struct Sample {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
    /// Prompt tokens, and those the server restored instead of computing.
    prompt_tokens: usize,
    cached: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.concurrency == 0 || args.requests == 0 || args.prompt_len == 0 || args.max_tokens == 0 {
        bail!("--concurrency, --requests, --prompt-len and --max-tokens must be at least 1");
    }
    let format = match &args.response_format {
        Some(text) => Some(serde_json::from_str::<Value>(text).context("--response-format is not JSON")?),
        None => None,
    };
    if args.shared_prefixes > 0 && args.prefix_len == 0 {
        bail!("--prefix-len must be at least 1 with --shared-prefixes");
    }
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    runtime.block_on(async {
        let before = instance_stats(&args.kvcache).await?;
        bench(&args, format).await?;
        if !args.kvcache.is_empty() {
            report_instances(&args.kvcache, &before, &instance_stats(&args.kvcache).await?);
        }
        Ok(())
    })
}

/// Each KV-cache instance's counters.
async fn instance_stats(addrs: &[String]) -> Result<Vec<StatsReply>> {
    let mut all = Vec::new();
    for addr in addrs {
        let url = if addr.contains("://") { addr.clone() } else { format!("http://{addr}") };
        let mut client =
            KvCacheClient::connect(url).await.with_context(|| format!("connect to the KV-cache at {addr}"))?;
        let stats = client.stats(StatsRequest {}).await.with_context(|| format!("read the stats of {addr}"))?;
        all.push(stats.into_inner());
    }
    Ok(all)
}

/// What each instance served during the run, and what it holds after it.
fn report_instances(addrs: &[String], before: &[StatsReply], after: &[StatsReply]) {
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>14} {:>10} {:>12}",
        "KV-CACHE", "LOOKUPS", "HITS", "HIT%", "TOKENS SERVED", "SNAPSHOTS", "BYTES"
    );
    for ((addr, b), a) in addrs.iter().zip(before).zip(after) {
        let hits = (a.hits_memory + a.hits_disk).saturating_sub(b.hits_memory + b.hits_disk);
        let lookups = hits + a.misses.saturating_sub(b.misses);
        let rate = if lookups == 0 { 0.0 } else { 100.0 * hits as f64 / lookups as f64 };
        println!(
            "{addr:<22} {lookups:>8} {hits:>8} {rate:>7.1}% {:>14} {:>10} {:>12}",
            a.tokens_served.saturating_sub(b.tokens_served),
            a.snapshots,
            a.memory_bytes.max(a.disk_bytes)
        );
    }
}

async fn bench(args: &Args, format: Option<Value>) -> Result<()> {
    let base = format!("{}/v1", args.url.trim_end_matches('/').trim_end_matches("/v1"));
    let client = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| match &args.api_key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let models: Value = auth(client.get(format!("{base}/models")))
        .send()
        .await
        .with_context(|| format!("reach {base}/models"))?
        .json_value()
        .await?;
    let model = models["data"][0]["id"].as_str().context("the server lists no model")?.to_string();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    eprintln!(
        "benchmarking `{model}` at {base}: {} requests, concurrency {}, prompt {} tokens, {} new tokens, seed {seed}{}",
        args.requests,
        args.concurrency,
        args.prompt_len,
        args.max_tokens,
        format.as_ref().map_or(String::new(), |f| format!(", response_format {f}"))
    );

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let progress = {
        let (done, total) = (done.clone(), args.requests);
        tokio::spawn(async move {
            loop {
                let n = done.load(Ordering::Relaxed);
                let filled = n * 30 / total;
                eprint!("\r[{}{}] {n}/{total} requests", "#".repeat(filled), ".".repeat(30 - filled));
                let _ = std::io::stderr().flush();
                if n >= total {
                    eprintln!();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let workers: Vec<_> = (0..args.concurrency.min(args.requests))
        .map(|_| {
            let (client, next, done, base, model, format) =
                (client.clone(), next.clone(), done.clone(), base.clone(), model.clone(), format.clone());
            let (requests, prompt_len, max_tokens, key) =
                (args.requests, args.prompt_len, args.max_tokens, args.api_key.clone());
            let (prefixes, prefix_len) = (args.shared_prefixes, args.prefix_len);
            tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return results;
                    }
                    let mut prompt = prompt(seed, i, prompt_len);
                    if prefixes > 0 {
                        prompt.splice(0..0, shared_prefix(seed, i % prefixes, prefix_len));
                    }
                    // ignore_eos: every request produces exactly max_tokens, as in vLLM's benchmarks.
                    let mut body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                          "temperature": 0, "ignore_eos": true, "stream": true,
                                          "stream_options": {"include_usage": true}});
                    if let Some(format) = &format {
                        body["response_format"] = format.clone();
                    }
                    let mut request = client.post(format!("{base}/completions")).json_body(&body);
                    if let Some(k) = &key {
                        request = request.bearer_auth(k);
                    }
                    results.push(one(request).await);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for w in workers {
        for r in w.await.context("a load task failed")? {
            match r {
                Ok(s) => samples.push(s),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
    }
    let elapsed = started.elapsed();
    let _ = progress.await;
    report(&samples, &failures, elapsed);
    if samples.is_empty() {
        bail!("every request failed");
    }
    Ok(())
}

/// One streamed completion, timed.
async fn one(request: reqwest::RequestBuilder) -> Result<Sample> {
    let start = Instant::now();
    let response = request.send().await.context("send")?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!("HTTP {status}: {body}");
    }
    let mut stream = response.bytes_stream();
    let mut buffer = Vec::new();
    let (mut first, mut last, mut gaps, mut tokens) = (None, None::<Instant>, Vec::new(), 0);
    let (mut prompt_tokens, mut cached) = (0, 0);
    while let Some(chunk) = stream.next().await {
        buffer.extend_from_slice(&chunk.context("read the stream")?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(data) = std::str::from_utf8(&event).ok().and_then(|e| e.trim().strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).context("a stream event is not JSON")?;
            if let Some(e) = v.get("error") {
                bail!("error in the stream: {e}");
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
                prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) as usize;
            }
            if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                first.get_or_insert(now - start);
                if let Some(prev) = last {
                    gaps.push(now - prev);
                }
                last = Some(now);
            }
        }
    }
    Ok(Sample { ttft: first.unwrap_or_else(|| start.elapsed()), gaps, tokens, prompt_tokens, cached })
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(samples: &[Sample], failures: &[String], elapsed: Duration) {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<Duration> = samples.iter().map(|s| s.ttft).collect();
    let mut itl: Vec<Duration> = samples.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    ttft.sort();
    itl.sort();
    let secs = elapsed.as_secs_f64();
    println!(
        "requests: {} ok, {} failed in {secs:.2} s ({:.2} requests/s)",
        samples.len(),
        failures.len(),
        samples.len() as f64 / secs
    );
    println!("throughput: {:.1} completion tokens/s ({tokens} tokens)", tokens as f64 / secs);
    println!("time to first token: p50 {:.1} ms, p99 {:.1} ms", percentile(&ttft, 0.5), percentile(&ttft, 0.99));
    println!("inter-token latency: p50 {:.2} ms, p99 {:.2} ms", percentile(&itl, 0.5), percentile(&itl, 0.99));
    let (prompt, cached): (usize, usize) = samples.iter().fold((0, 0), |(p, c), s| (p + s.prompt_tokens, c + s.cached));
    let restored = samples.iter().filter(|s| s.cached > 0).count();
    println!(
        "prompt tokens restored from the KV-cache: {cached} of {prompt} ({:.1}%); requests restoring some: {restored} of {}",
        if prompt == 0 { 0.0 } else { 100.0 * cached as f64 / prompt as f64 },
        samples.len()
    );
    if let Some(first) = failures.first() {
        println!("first failure: {first}");
    }
}

/// JSON without reqwest's `json` feature (which we keep off: no extra deps).
trait JsonExt {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonExt for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json").body(v.to_string())
    }
}

trait JsonValue {
    async fn json_value(self) -> Result<Value>;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Result<Value> {
        let status = self.status();
        let text = self.text().await.context("read the response")?;
        if !status.is_success() {
            bail!("HTTP {status}: {text}");
        }
        serde_json::from_str(&text).context("the response is not JSON")
    }
}
