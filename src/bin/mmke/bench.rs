//! `mmke bench`: throughput benchmarks.

use anyhow::{Context, Result};
use clap::Subcommand;
use mmke::model::clip::ClipConfig;

use crate::DeviceArgs;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Per-query latency of routing queries through an edit memory of stored z_e.
    Routing {
        /// Memory sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
        edits: Vec<usize>,
        /// Width of z (2 x the aligned width for multimodal classifiers).
        #[arg(long, default_value_t = 256)]
        dim: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Cells of the inverted-file index (default: sqrt of the memory size).
        #[arg(long)]
        lists: Option<usize>,
        /// Cells the index probes per query.
        #[arg(long, default_value_t = 16)]
        probes: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
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
    /// Optimizer steps/s of MSCKE's scope classifier and the base VLM as the quick preset
    /// trains them (one JSON line each).
    Train {
        /// Timed steps per model.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// The CPU's measured f32 fused multiply-add limit (GFLOP/s), for reading the others.
    Fma {
        /// Threads (default: all the machine has, as the other benchmarks use).
        #[arg(long)]
        threads: Option<usize>,
        /// Rounds of multiply-adds per thread and run.
        #[arg(long, default_value_t = 200_000_000)]
        iters: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Routing {
            edits,
            dim,
            batch,
            iters,
            lists,
            probes,
            device,
        } => {
            let device = device.device()?;
            for n in edits {
                let result = mmke::bench::routing(n, dim, batch, iters, lists, probes, &device);
                println!("{}", serde_json::to_string(&result)?);
            }
        }
        BenchCommand::Clip {
            preset,
            batch,
            iters,
            device,
        } => {
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
        BenchCommand::Train { iters, device } => {
            let backend = device.backend.name();
            let device = device.device()?.autodiff();
            let preset: mmke::experiment::tables::Preset =
                mmke::experiment::load_preset("scenes", None, "quick")?;
            let models = preset.models;
            let scope = models
                .classifiers
                .get("scope-multimodal")
                .context("experiments/scenes.toml's quick preset has no scope-multimodal")?;
            let spec = mmke::bench::TrainBenchSpec {
                data: models.data,
                clip_preset: models.clip.preset,
                clip_image_size: models.clip.image_size,
                clip_train: models.clip.train,
                scope: scope.clone(),
                vlm_preset: models.vlm.preset,
                vlm_train: models.vlm.train,
            };
            for result in mmke::bench::train_steps(&spec, iters, backend, &device)? {
                println!("{}", serde_json::to_string(&result)?);
            }
        }
        BenchCommand::Fma {
            threads,
            iters,
            runs,
        } => {
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let result = mmke::bench::fma_peak(threads, iters, runs);
            println!("{}", serde_json::to_string(&result)?);
        }
    }
    Ok(())
}
