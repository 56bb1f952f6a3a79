//! The batching engine: concurrent requests get exactly their solo
//! outputs, and prompts continue from the states a KV-cache holds.

use std::path::PathBuf;
use std::sync::Arc;

use std::time::{Duration, Instant};

use futures::executor::block_on;
use myriad_kvcache::{Cache, KvCacheService};
use myriad_model::moe::SharedLocalExperts;
use myriad_model::{Model, Sampling, generate};
use myriad_router::engine::{Engine, EngineConfig, Event, FinishReason, Request};
use myriad_router::kvcache::StateCache;
use tokio::sync::mpsc;

fn tiny() -> Arc<Model> {
    Arc::new(Model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")).unwrap())
}

fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, Event) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine dropped the request") {
            Event::Token(t, _) => tokens.push(t),
            other => return (tokens, other),
        }
    }
}

#[test]
fn concurrent_requests_equal_their_solo_runs() {
    let model = tiny();
    // A small step budget forces chunked prefill interleaved with decode.
    let config = EngineConfig { max_batch: 16, step_tokens: 24, queue: 64 };
    let engine = Engine::start(model.clone(), SharedLocalExperts(model.clone()), config, None);
    let requests: Vec<(Vec<u32>, usize, Sampling)> = (0..12)
        .map(|i| {
            let prompt: Vec<u32> = (0..(5 + 17 * i)).map(|j| ((j * 31 + i * 7) % 500 + 2) as u32).collect();
            let sampling = if i % 3 == 0 {
                Sampling { temperature: 0.8, top_p: 0.9, top_k: Some(40), min_p: 0.05, seed: i as u64 }
            } else {
                Sampling::greedy()
            };
            (prompt, 3 + i * 2, sampling)
        })
        .collect();
    let receivers: Vec<_> = requests
        .iter()
        .map(|(prompt, max_tokens, sampling)| {
            let (tx, rx) = mpsc::unbounded_channel();
            let request = Request {
                prompt: prompt.clone(),
                max_tokens: *max_tokens,
                sampling: sampling.clone(),
                stop_tokens: vec![],
                events: tx,
                span: tracing::Span::none(),
                constraint: None,
                logits: Default::default(),
                cache_salt: None,
            };
            block_on(engine.submit(vec![request])).unwrap();
            rx
        })
        .collect();
    for ((prompt, max_tokens, sampling), rx) in requests.iter().zip(receivers) {
        let (tokens, end) = collect(rx);
        let solo = generate(&model, prompt, *max_tokens, sampling, true).unwrap();
        assert_eq!(tokens, solo.generated, "prompt of {} tokens", prompt.len());
        assert_eq!(end, Event::Done(FinishReason::Length));
    }
}

#[test]
fn stop_tokens_end_a_sequence_and_a_full_queue_refuses() {
    let model = tiny();
    let engine = Engine::start(model.clone(), SharedLocalExperts(model.clone()), EngineConfig::default(), None);
    let prompt = vec![5, 17, 42];
    let solo = generate(&model, &prompt, 6, &Sampling::greedy(), true).unwrap().generated;
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = solo[3];
    let request = Request {
        prompt,
        max_tokens: 6,
        sampling: Sampling::greedy(),
        stop_tokens: vec![stop],
        events: tx,
        span: tracing::Span::none(),
        constraint: None,
        logits: Default::default(),
        cache_salt: None,
    };
    block_on(engine.submit(vec![request])).unwrap();
    let (tokens, end) = collect(rx);
    let first_stop = solo.iter().position(|&t| t == stop).unwrap();
    assert_eq!(tokens, solo[..first_stop]);
    assert_eq!(end, Event::Done(FinishReason::Stop));

    // A queue of one, with the engine busy on a long request: the second waits, the third is refused.
    let busy = Engine::start(
        model.clone(),
        SharedLocalExperts(model),
        EngineConfig { max_batch: 1, step_tokens: 8, queue: 1 },
        None,
    );
    let mut keep = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let (tx, rx) = mpsc::unbounded_channel();
        keep.push(rx);
        let r = Request {
            prompt: vec![3; 64],
            max_tokens: 200,
            sampling: Sampling::greedy(),
            stop_tokens: vec![],
            events: tx,
            span: tracing::Span::none(),
            constraint: None,
            logits: Default::default(),
            cache_salt: None,
        };
        if block_on(busy.submit(vec![r])).is_err() {
            refused += 1;
        }
    }
    assert!(refused >= 1, "a full queue must refuse");
}

/// With a KV-cache, the engine stores the state at the prompt's last block
/// boundary, after the prompt and after the turn; a later prompt extending
/// any of them continues from it, prefilling only what it lacks, exactly
/// like a run from scratch. The service is a real one on a loopback port.
#[test]
fn prompts_continue_from_the_states_the_kvcache_holds() {
    let model = tiny();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let service = KvCacheService::new(Cache::in_memory(64 << 20));
        tokio::spawn(myriad_kvcache::serve(listener, service, None, std::future::pending()));
        addr
    });
    let cache = {
        let _runtime = runtime.enter();
        let (id, cfg) = (&model.fingerprint, model.config.clone());
        StateCache::connect(&[addr], id, cfg, Duration::from_secs(5), 1, None).unwrap()
    };
    let config = EngineConfig { max_batch: 4, step_tokens: 64, queue: 8 };
    let engine = Engine::start(model.clone(), SharedLocalExperts(model.clone()), config, Some(cache.clone()));
    // Prompt tokens restored, and the completion; under `salt`, if any.
    let run_salted = |prompt: &[u32], salt: Option<&str>| {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = Request {
            prompt: prompt.to_vec(),
            max_tokens: 12,
            sampling: Sampling::greedy(),
            stop_tokens: vec![],
            events: tx,
            span: tracing::Span::none(),
            constraint: None,
            logits: Default::default(),
            cache_salt: salt.map(Arc::from),
        };
        let cached = runtime.block_on(engine.submit(vec![request])).unwrap();
        let (tokens, end) = collect(rx);
        assert_eq!(end, Event::Done(FinishReason::Length));
        (cached, tokens)
    };
    let run = |prompt: &[u32]| run_salted(prompt, None);
    // Saves go out in the background: wait until the service has `tokens`.
    let stored_salted = |tokens: &[u32], salt: Option<&str>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while runtime.block_on(cache.lookup(tokens, salt)).map(|s| s.position) != Some(tokens.len()) {
            assert!(Instant::now() < deadline, "the state of {} tokens was never stored", tokens.len());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stored = |tokens: &[u32]| stored_salted(tokens, None);
    let prompt: Vec<u32> = (0..300).map(|j| (j * 37 % 500 + 2) as u32).collect();
    let (cached, first) = run(&prompt);
    assert_eq!(cached, 0, "nothing stored yet");
    // The prompt's last block boundary (256 tokens), the prompt but its
    // last token, and the turn but its last sampled token.
    let turn: Vec<u32> = [&prompt[..], &first[..11]].concat();
    for tokens in [&prompt[..256], &prompt[..299], &turn[..]] {
        stored(tokens);
    }

    // Turn 2 extends turn 1 (prompt + answer + more).
    let mut turn2 = turn.clone();
    turn2.extend([5, 6, 7, 8, 9]);
    let scratch = generate(&model, &turn2, 12, &Sampling::greedy(), true).unwrap().generated;
    assert_eq!(run(&turn2), (turn.len(), scratch));
    // The same prompt again runs only its last token on the stored state.
    assert_eq!(run(&prompt), (299, first.clone()));
    // Another prompt sharing the first block (a system prompt) continues
    // from the boundary state.
    let mut sibling = prompt[..256].to_vec();
    sibling.extend((0..40).map(|j| (j * 11 % 500 + 2) as u32));
    let scratch = generate(&model, &sibling, 12, &Sampling::greedy(), true).unwrap().generated;
    assert_eq!(run(&sibling), (256, scratch));

    // A salted request shares nothing with unsalted ones or other salts,
    // and everything with its own: the same answer every time.
    assert_eq!(run_salted(&prompt, Some("tenant-a")), (0, first.clone()));
    stored_salted(&prompt[..299], Some("tenant-a"));
    assert_eq!(run_salted(&prompt, Some("tenant-a")), (299, first.clone()));
    assert_eq!(run_salted(&prompt, Some("tenant-b")), (0, first.clone()));
    assert_eq!(run(&prompt), (299, first));
}
