//! Steps that share the compute pool: however many run at once, on pools of
//! one to four threads, each finishes and gives the bits it gives alone.
//! Each step keeps the pool's other threads awake while it runs
//! (`Model::forward_batch`), so those threads pick up tasks of other steps,
//! and whole other steps, while they wait.

use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use myriad_model::{Logits, Model};

fn tiny() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4");
    Model::load(&dir).unwrap_or_else(|e| panic!("load tiny-v4: {e}"))
}

/// Prefill of `prompt`, then three decode steps: every step's logits.
fn run(model: &Model, prompt: &[u32]) -> Vec<Vec<f32>> {
    let mut state = model.new_state();
    let mut out = vec![model.forward(prompt, &mut state, Logits::All).expect("prefill")];
    for &t in &prompt[..3] {
        out.push(model.forward(&[t ^ 1], &mut state, Logits::Last).expect("decode"));
    }
    out
}

#[test]
fn concurrent_steps_finish_with_their_own_bits() {
    let model = Arc::new(tiny());
    let vocab = model.config.vocab_size as u32;
    let prompts: Vec<Vec<u32>> =
        (0..6).map(|s| (0..40 + 7 * s).map(|i| (i * 31 + s * 17 + 3) % vocab).collect()).collect();
    let alone: Vec<_> = prompts.iter().map(|p| run(&model, p)).collect();
    for threads in 1..=4 {
        let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool"));
        let (tx, rx) = mpsc::channel();
        for (i, p) in prompts.iter().enumerate() {
            let (tx, pool, model, p) = (tx.clone(), pool.clone(), model.clone(), p.clone());
            // Detached: a step that never finishes fails the test below
            // instead of hanging it.
            std::thread::spawn(move || tx.send((i, pool.install(|| run(&model, &p)))));
        }
        for _ in 0..prompts.len() {
            let (i, got) = rx.recv_timeout(Duration::from_secs(120)).expect("every step finishes");
            assert_eq!(got, alone[i], "prompt {i} on {threads} threads");
        }
    }
}
