//! `myriad generate`: one prompt through the model in this process.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use myriad_model::text::TextTokenizer;
use myriad_model::{Model, Sampling};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder: config.json plus model.safetensors or shards with an index.
    #[arg(long, env = "MYRIAD_MODEL", default_value = "models/tiny-v4")]
    model: PathBuf,

    /// Prompt as comma-separated token ids, e.g. `5,17,42`.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt", required_unless_present = "prompt")]
    prompt_ids: Option<Vec<u32>>,

    /// Prompt as text, encoded with the model folder's tokenizer.json.
    #[arg(long)]
    prompt: Option<String>,

    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,

    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,

    /// Keep only the k most likely tokens before sampling.
    #[arg(long)]
    top_k: Option<usize>,

    /// Seed of the sampler: the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,

    /// Print one JSON object: {"generated": [ids], "prompt_last_logits": [floats]}.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct JsonOutput<'a> {
    generated: &'a [u32],
    prompt_last_logits: &'a [f32],
}

pub fn run(args: Args) -> Result<()> {
    let sampling = Sampling { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed };
    sampling.validate()?;
    let model = Model::load(&args.model).with_context(|| format!("load model from {}", args.model.display()))?;
    let tokenizer = match (&args.prompt, args.json) {
        (Some(_), _) | (None, false) => TextTokenizer::load(&args.model).ok(),
        (None, true) => None,
    };
    let prompt = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tokenizer = TextTokenizer::load(&args.model).context("encode --prompt")?;
            tokenizer.encode(text).context("encode --prompt")?
        }
        (None, None) => bail!("give a prompt with --prompt-ids or --prompt"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let run =
        myriad_model::generate(&model, &prompt, args.max_new_tokens, &sampling, args.ignore_eos).context("generate")?;

    let mut stdout = std::io::stdout().lock();
    if args.json {
        let out = JsonOutput { generated: &run.generated, prompt_last_logits: &run.prompt_last_logits };
        serde_json::to_writer(&mut stdout, &out).context("write output")?;
    } else {
        match tokenizer {
            Some(t) => write!(stdout, "{}", t.decode(&run.generated).context("decode output")?),
            None => write!(stdout, "{:?}", run.generated),
        }
        .context("write output")?;
    }
    writeln!(stdout).context("write output")?;
    // The speed summary goes to stderr, so stdout stays clean for --json.
    let decode_steps = run.generated.len().saturating_sub(1);
    eprintln!(
        "prefill: {} tokens at {:.1} tokens/s; decode: {} tokens at {:.1} tokens/s; sequence state {:.1} KiB",
        prompt.len(),
        prompt.len() as f64 / run.prefill_time.as_secs_f64(),
        decode_steps,
        decode_steps as f64 / run.decode_time.as_secs_f64().max(f64::EPSILON),
        run.state_bytes as f64 / 1024.0,
    );
    Ok(())
}
