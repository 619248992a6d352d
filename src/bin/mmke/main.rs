//! The `mmke` command line: parse arguments, pick the device once, call the library. One
//! file per group of subcommands.

mod bench;
mod clip;
mod data;
mod edit;
mod eval;
mod experiment;
mod export;
mod fuzz;
mod mllm;
mod train;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use mmke::backend::{self, Backend};

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
    Clip(clip::ClipCommand),
    /// Datasets: generate the scenes benchmark, validate FGVEdit/MMEdit files.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train models: CLIP pre-training, scope classifiers, VLMs, MEND, KE.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Evaluate trained models.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Export a trained scope classifier as model.safetensors + config.json + clip/ (HF layout).
    Export(export::ExportArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Edit a model and ask it questions: for each query, rho, the route taken, and the answer
    /// before and after the edit (MSCKE/SERAC: a scope classifier, a base and a counterfactual
    /// VLM).
    Edit(edit::EditArgs),
    /// Multimodal LLMs in Hugging Face layout (BLIP-2, LLaVA-1.5): logits, greedy answers.
    #[command(subcommand)]
    Mllm(mllm::MllmCommand),
    /// Reproduce a table or figure of the papers (defined by experiments/NAME.toml).
    #[command(subcommand)]
    Experiment(experiment::ExperimentCommand),
    /// Mutation-fuzz the readers of user files (FGVEdit/MMEdit JSON, config.json,
    /// tokenizer.json, safetensors, images): N mutated fixtures each; reports accepted,
    /// rejected (error values) and panics (there should be none).
    Fuzz(fuzz::FuzzArgs),
}

#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// Compute backend: flex (CPU), wgpu or cuda (each needs its cargo feature).
    #[arg(long, default_value = "flex")]
    pub backend: Backend,
    /// Device index for wgpu/cuda (default: the backend's default device).
    #[arg(long)]
    pub device: Option<usize>,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<burn::tensor::Device> {
        Ok(backend::device(self.backend, self.device)?)
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Clip(command) => clip::run(command),
        Command::Data(command) => data::run(command),
        Command::Train(command) => train::run(command),
        Command::Eval(command) => eval::run(command),
        Command::Export(args) => export::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Edit(args) => edit::run(args),
        Command::Experiment(command) => experiment::run(command),
        Command::Mllm(command) => mllm::run(command),
        Command::Fuzz(args) => fuzz::run(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
