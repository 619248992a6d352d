//! The `mmke` command line: parse arguments, pick the device once, call the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mmke::backend::{self, Backend};
use mmke::data::check::CheckSummary;
use mmke::data::scenes::{self, ScenesConfig};
use mmke::data::{Format, ImageCheck, ImageRoots, Task, mmedit, reader};
use mmke::model::clip::{Clip, ClipConfig};

#[derive(Parser)]
#[command(name = "mmke", version, about = "Multimodal knowledge editing on Burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// CLIP: embed images and texts, export weights.
    #[command(subcommand)]
    Clip(ClipCommand),
    /// Datasets: generate the scenes benchmark, validate FGVEdit/MMEdit files.
    #[command(subcommand)]
    Data(DataCommand),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Generate the synthetic fine-grained benchmark (FGVEdit schema + MMEdit keys + exact scope).
    Scenes {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 2000)]
        train: usize,
        #[arg(long, default_value_t = 500)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of the square images in pixels (64 for the small models, 224 for real CLIP).
        #[arg(long, default_value_t = 64)]
        image_size: u32,
    },
    /// Validate a FGVEdit or MMEdit file (every image decoded) and print a summary.
    Check {
        file: PathBuf,
        /// Root of the relative image paths (COCO root for MMEdit).
        #[arg(long)]
        images: PathBuf,
        #[arg(long, value_enum, default_value = "fgvedit")]
        format: FormatArg,
        /// MMEdit's rephrased-image root (default: --images).
        #[arg(long)]
        rephrase_images: Option<PathBuf>,
        /// MMEdit task (default: caption when the file name says so, else vqa).
        #[arg(long, value_enum)]
        task: Option<TaskArg>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Fgvedit,
    Mmedit,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TaskArg {
    Vqa,
    Caption,
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// Compute backend: flex (CPU), wgpu or cuda (each needs its cargo feature).
    #[arg(long, default_value = "flex")]
    backend: Backend,
    /// Device index for wgpu/cuda (default: the backend's default device).
    #[arg(long)]
    device: Option<usize>,
}

impl DeviceArgs {
    fn device(&self) -> Result<burn::tensor::Device> {
        Ok(backend::device(self.backend, self.device)?)
    }
}

#[derive(Subcommand)]
enum ClipCommand {
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

#[derive(Subcommand)]
enum BenchCommand {
    /// Images/s of a random-weight CLIP vision tower (plus projection).
    Clip {
        /// clip-vit-base-patch32 or clip-vit-large-patch14.
        #[arg(long, default_value = "clip-vit-base-patch32")]
        preset: String,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Clip(ClipCommand::Embed {
            model,
            images,
            texts,
            device,
        }) => {
            anyhow::ensure!(
                !images.is_empty() || !texts.is_empty(),
                "nothing to embed: give at least one --image or --text"
            );
            let clip = Clip::load(&model, &device.device()?)?;
            let embeddings = clip.embed(&images, &texts)?;
            println!("{}", serde_json::to_string(&embeddings)?);
        }
        Command::Clip(ClipCommand::Export { model, out, device }) => {
            Clip::load(&model, &device.device()?)?.save_pretrained(&out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Data(DataCommand::Scenes {
            out,
            train,
            test,
            seed,
            image_size,
        }) => {
            anyhow::ensure!(image_size >= 16, "--image-size must be at least 16");
            let config = ScenesConfig {
                train,
                test,
                seed,
                image_size,
            };
            let counts = scenes::write(&out, &config)?;
            println!("{}", serde_json::to_string_pretty(&counts)?);
        }
        Command::Data(DataCommand::Check {
            file,
            images,
            format,
            rephrase_images,
            task,
        }) => {
            let format = match format {
                FormatArg::Fgvedit => Format::FgvEdit,
                FormatArg::Mmedit => Format::MmEdit(match task {
                    Some(TaskArg::Vqa) => Task::Vqa,
                    Some(TaskArg::Caption) => Task::Caption,
                    None => mmedit::task_of(&file),
                }),
            };
            let roots = ImageRoots {
                images,
                rephrase: rephrase_images,
            };
            let report = reader::read_report(&file, format, &roots, ImageCheck::Decode)?;
            let summary = CheckSummary::new(&report);
            print!("{summary}");
            anyhow::ensure!(
                summary.is_valid(),
                "{}: {} invalid records",
                file.display(),
                summary.invalid
            );
        }
        Command::Bench(BenchCommand::Clip {
            preset,
            batch,
            iters,
            device,
        }) => {
            let config = ClipConfig::preset(&preset)
                .with_context(|| format!("unknown preset '{preset}'"))?;
            let result = mmke::bench::clip_images(
                &preset,
                &config,
                batch,
                iters,
                device.backend.name(),
                &device.device()?,
            );
            println!("{}", serde_json::to_string(&result)?);
        }
    }
    Ok(())
}
