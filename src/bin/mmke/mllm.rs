//! `mmke mllm`: run a multimodal LLM in Hugging Face layout (BLIP-2, LLaVA-1.5).

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::DType;
use clap::Subcommand;
use mmke::model::mllm::{Mllm, MllmConfig, io, weights};

use crate::DeviceArgs;

/// The dtype the weights are held and computed in.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

#[derive(Subcommand)]
pub enum MllmCommand {
    /// Logits for the processor's inputs: reads `pixel_values` (f32 [B,3,H,W]), `input_ids`
    /// (i64 [B,T], image tokens placed) and `attention_mask` (i64 [B,T], optional) from IN and
    /// writes `logits` (f32 [B,T,V]) to OUT.
    Forward {
        /// A model directory in Hugging Face layout (config.json, safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// f32 (the reference) or half precision (half the memory).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// What a model directory holds: its architecture, parameters (from the weight files'
    /// headers), their stored dtypes, and the memory its weights take in f32 and in bf16.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
    /// Print the greedy answer to a prompt about an image, the prompt built as the model's
    /// processor builds it (BLIP-2: query tokens, then BOS and the text; LLaVA: `<image>`
    /// expanded where it stands).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

pub fn run(command: MllmCommand) -> Result<()> {
    match command {
        MllmCommand::Forward {
            model,
            inputs,
            out,
            dtype,
            device,
        } => {
            let device = device.device()?;
            let mllm = Mllm::load_in(&model, &device, dtype.dtype())?;
            let inputs = io::read_inputs(&inputs, &device)?;
            let logits =
                mllm.forward(inputs.pixel_values, inputs.input_ids, inputs.attention_mask)?;
            let dims = logits.dims();
            io::write_f32(&out, vec![("logits", logits)])?;
            let peak = mmke::bench::peak_memory_bytes()
                .map_or(String::new(), |b| format!(", peak memory {} MiB", b >> 20));
            eprintln!("wrote logits {dims:?} to {}{peak}", out.display());
        }
        MllmCommand::Info { model } => {
            let config = MllmConfig::from_file(&model.join("config.json"))?;
            let weights = weights::summary(&model)?;
            let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
            let info = serde_json::json!({
                "architecture": config.architecture(),
                "weights": weights,
                "memory_gib_f32": gib(weights.memory(4)),
                "memory_gib_bf16": gib(weights.memory(2)),
            });
            println!("{info}");
        }
        MllmCommand::Generate {
            model,
            image,
            prompt,
            max_new_tokens,
            dtype,
            device,
        } => {
            let device = device.device()?;
            let mllm = Mllm::load_in(&model, &device, dtype.dtype())?;
            let pixels = mllm
                .preprocessor
                .batch(&[&image], &device)
                .with_context(|| format!("preprocessing {}", image.display()))?;
            let ids = mllm.prompt_ids(&prompt)?;
            let answer = mllm.generate(pixels, &ids, max_new_tokens)?;
            println!("{}", mllm.decode(&answer)?);
        }
    }
    Ok(())
}
