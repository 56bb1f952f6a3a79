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
                restored: None,
                constraint: None,
                logits: Default::default(),
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
    let engine = Engine::start(model.clone(), SharedLocalExperts(model.clone()), EngineConfig::default(), None);
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
            restored: None,
            constraint: None,
            logits: Default::default(),
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
            restored: None,
            constraint: None,
            logits: Default::default(),
        };
        if busy.submit(r).is_err() {
            refused += 1;
        }
    }
    assert!(refused >= 1, "a full queue must refuse");
}

/// The engine hands out the state at the prompt's last block boundary,
/// after the prompt and after the turn; a request restored from any of them
/// continues exactly like one run from scratch, prefilling only what the
/// restored state lacks.
#[test]
fn saved_states_restore_to_the_same_tokens() {
    let model = tiny();
    let (saved_tx, saved_rx) = std::sync::mpsc::channel();
    let save: myriad_router::engine::SaveState = Box::new(move |s| {
        let _ = saved_tx.send(s);
    });
    let config = EngineConfig { max_batch: 4, step_tokens: 64, queue: 8 };
    let engine = Engine::start(model.clone(), SharedLocalExperts(model.clone()), config, Some(save));
    let run = |prompt: &[u32], restored: Option<myriad_model::SequenceState>| {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = Request {
            prompt: prompt.to_vec(),
            max_tokens: 12,
            sampling: Sampling::greedy(),
            stop_tokens: vec![],
            events: tx,
            span: tracing::Span::none(),
            restored,
            constraint: None,
            logits: Default::default(),
        };
        engine.submit(request).unwrap();
        let (tokens, end) = collect(rx);
        assert_eq!(end, Event::Done(FinishReason::Length));
        tokens
    };
    let prompt: Vec<u32> = (0..300).map(|j| (j * 37 % 500 + 2) as u32).collect();
    let first = run(&prompt, None);
    // First the state at the prompt's last block boundary (256 tokens).
    let at_boundary = saved_rx.recv().unwrap();
    assert_eq!(at_boundary.tokens, prompt[..256]);
    assert_eq!(at_boundary.state.position, 256);
    let after_prompt = saved_rx.recv().unwrap();
    let after_turn = saved_rx.recv().unwrap();
    assert_eq!(after_prompt.tokens, prompt[..299]);
    assert_eq!(after_prompt.state.position, 299);
    assert_eq!(after_turn.tokens, [&prompt[..], &first[..11]].concat());
    assert_eq!(after_turn.state.position, prompt.len() + 11);

    // Turn 2 extends turn 1 (prompt + answer + more): restored from the end
    // of turn 1 it equals the run from scratch.
    let mut turn2 = after_turn.tokens.clone();
    turn2.extend([5, 6, 7, 8, 9]);
    let scratch = generate(&model, &turn2, 12, &Sampling::greedy(), true).unwrap().generated;
    assert_eq!(run(&turn2, Some(after_turn.state)), scratch);
    // The same prompt again runs only its last token on the stored state.
    assert_eq!(run(&prompt, Some(after_prompt.state)), first);
    // Another prompt sharing the first block (a system prompt) continues
    // from the boundary state exactly like a run from scratch.
    let mut sibling = prompt[..256].to_vec();
    sibling.extend((0..40).map(|j| (j * 11 % 500 + 2) as u32));
    let scratch = generate(&model, &sibling, 12, &Sampling::greedy(), true).unwrap().generated;
    assert_eq!(run(&sibling, Some(at_boundary.state)), scratch);
    // A state covering the whole prompt leaves no token to give logits: the
    // engine drops it and computes everything.
    let mut whole = model.new_state();
    model.forward(&prompt, &mut whole, myriad_model::Logits::Last).unwrap();
    assert_eq!(run(&prompt, Some(whole)), first);
}
