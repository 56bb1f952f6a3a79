//! The batching engine: concurrent requests get exactly their solo outputs.

use std::path::PathBuf;
use std::sync::Arc;

use myriad_model::moe::SharedLocalExperts;
use myriad_model::{Model, Sampling, generate};
use myriad_router::engine::{Engine, EngineConfig, Event, FinishReason, Request};
use tokio::sync::mpsc;

fn tiny() -> Arc<Model> {
    Arc::new(Model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")).unwrap())
}

fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, Event) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine dropped the request") {
            Event::Token(t) => tokens.push(t),
            other => return (tokens, other),
        }
    }
}

#[test]
fn concurrent_requests_equal_their_solo_runs() {
    let model = tiny();
    // A small step budget forces chunked prefill interleaved with decode.
    let config = EngineConfig { max_batch: 16, step_tokens: 24, queue: 64 };
    let engine = Engine::start(model.clone(), SharedLocalExperts(model.clone()), config);
    let requests: Vec<(Vec<u32>, usize, Sampling)> = (0..12)
        .map(|i| {
            let prompt: Vec<u32> = (0..(5 + 17 * i)).map(|j| ((j * 31 + i * 7) % 500 + 2) as u32).collect();
            let sampling = if i % 3 == 0 {
                Sampling { temperature: 0.8, top_p: 0.9, top_k: Some(40), seed: i as u64 }
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
            };
            engine.submit(request).unwrap();
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
    let engine = Engine::start(model.clone(), SharedLocalExperts(model.clone()), EngineConfig::default());
    let prompt = vec![5, 17, 42];
    let solo = generate(&model, &prompt, 6, &Sampling::greedy(), true).unwrap().generated;
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = solo[3];
    engine
        .submit(Request {
            prompt,
            max_tokens: 6,
            sampling: Sampling::greedy(),
            stop_tokens: vec![stop],
            events: tx,
            span: tracing::Span::none(),
        })
        .unwrap();
    let (tokens, end) = collect(rx);
    let first_stop = solo.iter().position(|&t| t == stop).unwrap();
    assert_eq!(tokens, solo[..first_stop]);
    assert_eq!(end, Event::Done(FinishReason::Stop));

    // A queue of one, with the engine busy on a long request: the second waits, the third is refused.
    let busy = Engine::start(
        model.clone(),
        SharedLocalExperts(model),
        EngineConfig { max_batch: 1, step_tokens: 8, queue: 1 },
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
        };
        if busy.submit(r).is_err() {
            refused += 1;
        }
    }
    assert!(refused >= 1, "a full queue must refuse");
}
