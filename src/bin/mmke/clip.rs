//! `mmke clip`: embed images and texts with a CLIP, export its weights.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use mmke::model::clip::Clip;

use crate::DeviceArgs;

#[derive(Subcommand)]
pub enum ClipCommand {
    /// Print projected, L2-normalised embeddings (and logits) of images and texts as JSON.
    Embed {
        /// A CLIP directory in Hugging Face layout (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        #[arg(long = "text")]
        texts: Vec<String>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Load a CLIP directory and write it back out (model.safetensors, config.json, tokenizer).
    Export {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

pub fn run(command: ClipCommand) -> Result<()> {
    match command {
        ClipCommand::Embed {
            model,
            images,
            texts,
            device,
        } => {
            anyhow::ensure!(
                !images.is_empty() || !texts.is_empty(),
                "nothing to embed: give at least one --image or --text"
            );
            let clip = Clip::load(&model, &device.device()?)?;
            let embeddings = clip.embed(&images, &texts)?;
            println!("{}", serde_json::to_string(&embeddings)?);
        }
        ClipCommand::Export { model, out, device } => {
            Clip::load(&model, &device.device()?)?.save_pretrained(&out)?;
            eprintln!("wrote {}", out.display());
        }
    }
    Ok(())
}
