//! The `mmke` command line: parse arguments, pick the device once, call the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mmke::backend::{self, Backend};
use mmke::data::check::CheckSummary;
use mmke::data::scenes::{self, ScenesConfig};
use mmke::data::{Format, ImageCheck, ImageRoots, Task, mmedit, reader};
use mmke::model::clip::{Clip, ClipConfig};
use mmke::train::clip::ClipTrainConfig;
use mmke::train::scope::{ScopeRun, ScopeRunConfig};

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
    /// Train models: CLIP pre-training, scope classifiers.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Evaluate trained models.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Export a trained scope classifier as model.safetensors + config.json + clip/ (HF layout).
    Export {
        /// A run directory written by `mmke train scope`.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Edit a model and ask it questions: for each query, rho, the route taken, and the answer
    /// before and after the edit (MSCKE/SERAC: a scope classifier, a base and a counterfactual
    /// VLM).
    Edit {
        /// A scope-classifier run or export (`mmke train scope` / `mmke export`).
        #[arg(long)]
        scope: PathBuf,
        /// The base VLM (`mmke train vlm`).
        #[arg(long)]
        base: PathBuf,
        /// The counterfactual VLM (`mmke train counterfactual`).
        #[arg(long)]
        counterfactual: PathBuf,
        /// The edit image.
        #[arg(long)]
        image: PathBuf,
        /// The edit question (the VQA template is applied).
        #[arg(long)]
        question: String,
        /// The new answer.
        #[arg(long)]
        target: String,
        /// A question on the edit image (repeatable).
        #[arg(long = "query")]
        queries: Vec<String>,
        /// A question without an image (repeatable).
        #[arg(long = "text-query")]
        text_queries: Vec<String>,
        #[arg(long, default_value_t = 5)]
        max_new_tokens: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Reproduce a table or figure of the papers (defined by experiments/NAME.toml).
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// Mutation-fuzz the readers of user files (FGVEdit/MMEdit JSON, config.json,
    /// tokenizer.json, safetensors, images): N mutated fixtures each; reports accepted,
    /// rejected (error values) and panics (there should be none).
    Fuzz {
        /// Targets (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        target: Vec<mmke::fuzz::Target>,
        #[arg(long, default_value_t = 10_000)]
        inputs: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The seed inputs (the committed fixtures).
        #[arg(long, default_value = "tests/fixtures")]
        fixtures: PathBuf,
    },
}

/// What every experiment takes.
#[derive(Args)]
struct ExperimentArgs {
    /// Preset of the experiment file: quick (minutes on a CPU) or full (the larger run).
    #[arg(long, default_value = "quick")]
    preset: String,
    /// Experiment file (default: experiments/NAME.toml, else the copy built into mmke).
    #[arg(long)]
    file: Option<PathBuf>,
    /// A directory with train.json and test.json (FGVEdit schema, images relative to it)
    /// instead of the preset's scenes split.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory; what it already holds is reused (default: runs/NAME/PRESET).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the run's record goes: `EXPERIMENT-PRESET.md` (the tables, the command, the
    /// commit, the models trained and reused, the wall time, the machine) and the tables'
    /// CSV, JSON and PNG.
    #[arg(long, default_value = "docs/results")]
    results: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
}

impl ExperimentArgs {
    fn out(&self, name: &str) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(name).join(&self.preset))
    }
}

#[derive(Subcommand)]
enum ExperimentCommand {
    /// MSCKE Table 2: concat / cross-attention / dot-product fusion x two CLIP sizes.
    FusionAblation(ExperimentArgs),
    /// MSCKE Table 1: FT-LLM, FT-Visual, IKE, SERAC, MEND, MSCKE and MSCKE-MEND, one-step.
    MsckeTable1(ExperimentArgs),
    /// MSCKE Table 3: the multimodal classifier transferred (behind MEND, with vlm-small)
    /// vs retrained (the models of mscke-table1: its presets and directory).
    MsckeTable3(ExperimentArgs),
    /// MSCKE Table 4: inference time per query and size of the scope classifier, the base and
    /// the counterfactual model (the models of mscke-table1: its presets and directory).
    MsckeTable4(ExperimentArgs),
    /// UniKE Table 1: one-step editing on the VQA and caption tasks (FT, KE, T-Patcher, MEND,
    /// IKE, SERAC, UniKE).
    /// The UniKE experiments share experiments/unike.toml and runs/unike/PRESET.
    UnikeTable1(ExperimentArgs),
    /// UniKE Table 2: sequential editing (K edits accumulate).
    UnikeTable2(ExperimentArgs),
    /// UniKE Table 3: cross-task editing (5 VQA + 5 caption edits per sequence).
    UnikeTable3(ExperimentArgs),
    /// UniKE Table 4: ablations (intrinsic only, latent IKE only, + vanilla IKE, without
    /// collaboration, full).
    UnikeTable4(ExperimentArgs),
    /// UniKE Figure 4: retrieved states K, fixed vs dynamic alpha, zeta variants.
    UnikeFig4(ExperimentArgs),
    /// UniKE Figure 5: positive and negative knowledge in the semantic and the truthfulness
    /// space (PCA), as PNG.
    UnikeFig5(ExperimentArgs),
}

impl ExperimentCommand {
    fn split(self) -> (mmke::experiment::Experiment, ExperimentArgs) {
        use mmke::experiment::{Experiment as E, unike::Which};
        match self {
            ExperimentCommand::FusionAblation(a) => (E::FusionAblation, a),
            ExperimentCommand::MsckeTable1(a) => (E::MsckeTable1, a),
            ExperimentCommand::MsckeTable3(a) => (E::MsckeTable3, a),
            ExperimentCommand::MsckeTable4(a) => (E::MsckeTable4, a),
            ExperimentCommand::UnikeTable1(a) => (E::Unike(Which::Table1), a),
            ExperimentCommand::UnikeTable2(a) => (E::Unike(Which::Table2), a),
            ExperimentCommand::UnikeTable3(a) => (E::Unike(Which::Table3), a),
            ExperimentCommand::UnikeTable4(a) => (E::Unike(Which::Table4), a),
            ExperimentCommand::UnikeFig4(a) => (E::Unike(Which::Fig4), a),
            ExperimentCommand::UnikeFig5(a) => (E::Unike(Which::Fig5), a),
        }
    }
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Pre-train a small CLIP from scratch on scenes image-caption pairs (symmetric InfoNCE).
    Clip {
        /// clip-tiny or clip-small.
        #[arg(long, default_value = "clip-tiny")]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 400)]
        steps: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// CLIP input size (scenes are rendered at --scene-size and resized to it).
        #[arg(long, default_value_t = 64)]
        image_size: usize,
        #[arg(long, default_value_t = 64)]
        scene_size: u32,
        #[arg(long, default_value_t = 100)]
        checkpoint_every: usize,
        /// Weight of the phrase-grounding loss next to InfoNCE (0 = InfoNCE only).
        #[arg(long, default_value_t = 1.0)]
        grounding_weight: f64,
        /// Supervise the class token and the patches pooled to N x N cell tokens (0: every
        /// patch).
        #[arg(long, default_value_t = 3)]
        cells: usize,
        /// Weight of the dense attribute loss on the cell tokens (needs --cells 3).
        #[arg(long, default_value_t = 1.0)]
        attribute_weight: f64,
        #[command(flatten)]
        optim: OptimArgs,
        /// Continue from the checkpoint in --out.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Train a scope classifier (BCE) from a CLIP directory on a scenes/FGVEdit train.json.
    Scope {
        /// A run config (configs/scope-*.toml).
        #[arg(long)]
        config: PathBuf,
        /// CLIP directory in Hugging Face layout (e.g. from `mmke train clip`).
        #[arg(long)]
        clip: PathBuf,
        /// Directory with train.json and the images it names.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Train the base VLM (LM cross-entropy) on the pre-edit knowledge of a scenes/FGVEdit
    /// train.json; prints the teacher-forced exact match on test.json's pre-edit questions.
    Vlm(VlmArgs),
    /// Train the counterfactual model: a VLM that reads the edit ("{src} >> {alt} || ")
    /// before the query and answers as after the edit; prints its exact match on test.json.
    Counterfactual(VlmArgs),
    /// Meta-train MEND's gradient networks for a trained VLM on the edits of train.json
    /// (0.1 x edit NLL + 1.0 x locality KL by default); writes OUT/mend.{json,bpk}.
    Mend {
        /// fc1 and fc2 of the last N LM layers are edited.
        #[arg(long, default_value_t = 3)]
        layers: usize,
        #[arg(long, default_value_t = 64)]
        rank: usize,
        #[arg(long, default_value_t = 2)]
        blocks: usize,
        /// Initial per-matrix edit learning rate (learned).
        #[arg(long, default_value_t = 1e-4)]
        edit_lr: f64,
        #[command(flatten)]
        meta: MetaArgs,
    },
    /// Meta-train KE's hypernetwork (a BiLSTM over the edit conditioning the gradient's
    /// update) like MEND; writes OUT/ke.{json,bpk}.
    Ke {
        /// fc1 and fc2 of the last N LM layers are edited.
        #[arg(long, default_value_t = 3)]
        layers: usize,
        /// Hidden size of each LSTM direction.
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        /// The update at initialisation is -edit_lr x gradient.
        #[arg(long, default_value_t = 1.0)]
        edit_lr: f64,
        #[command(flatten)]
        meta: MetaArgs,
    },
}

/// What MEND's and KE's meta-training share.
#[derive(Args)]
struct MetaArgs {
    /// A directory written by `mmke train vlm`.
    #[arg(long)]
    model: PathBuf,
    /// Directory with train.json and the images it names.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.1)]
    edit_weight: f64,
    #[arg(long, default_value_t = 1.0)]
    locality_weight: f64,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also learn from the captioning edits of the records.
    #[arg(long)]
    captions: bool,
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

impl MetaArgs {
    fn run<N: mmke::edit::mend::Hypernetwork>(self, net: &N::Config) -> Result<()> {
        let config = mmke::train::meta::MetaTrainConfig {
            steps: self.steps,
            lr: self.lr,
            edit_weight: self.edit_weight,
            locality_weight: self.locality_weight,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            captions: self.captions,
        };
        let device = self.device.device()?.autodiff();
        let losses = mmke::train::meta::run::<N>(
            &self.model,
            &self.data,
            net,
            &config,
            &self.out,
            self.resume,
            &device,
        )?;
        println!(
            "last {} steps: edit loss {:.4} -> {:.4} after the update, locality KL {:.4}",
            self.checkpoint_every, losses.before, losses.after, losses.locality_kl
        );
        eprintln!("wrote {}", self.out.display());
        Ok(())
    }
}

#[derive(Args)]
struct VlmArgs {
    /// vlm-tiny or vlm-small.
    #[arg(long, default_value = "vlm-tiny")]
    preset: String,
    /// Directory with train.json, test.json, tokenizer.json and the images.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// A CLIP directory (e.g. from `mmke train clip`) whose vision tower starts the VLM's.
    #[arg(long)]
    clip: Option<PathBuf>,
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Every Nth batch is text-only (T-Locality facts).
    #[arg(long, default_value_t = 8)]
    text_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    image_size: usize,
    #[arg(long, default_value_t = 200)]
    checkpoint_every: usize,
    #[arg(long)]
    resume: bool,
    /// Keep the vision tower (from --clip) fixed: only the projector and the LM learn.
    #[arg(long)]
    freeze_vision: bool,
    /// Weight of the referent loss (`-objects` presets on scenes data: the question's
    /// readout over the cells learns which cells the question is about).
    #[arg(long, default_value_t = 0.0)]
    referent_weight: f64,
    /// Counterfactual model: list each example whose answer the edit changes this many times
    #[arg(long, default_value_t = 1)]
    edited_repeat: usize,
    /// Counterfactual model on scenes data: rewrite the object tokens into the edited world
    /// before answering
    #[arg(long)]
    rewrite_objects: bool,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The optimiser and schedule (`mmke::train::OptimConfig`); the defaults are Adam at a
/// constant rate.
#[derive(clap::Args, Debug)]
struct OptimArgs {
    /// AdamW's decoupled weight decay (0: Adam).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Cosine decay of the learning rate after warm-up, to --min-lr-ratio times --lr.
    #[arg(long)]
    cosine: bool,
    #[arg(long, default_value_t = 0.0)]
    min_lr_ratio: f64,
    /// Clip each gradient to this L2 norm.
    #[arg(long)]
    clip_norm: Option<f64>,
}

impl OptimArgs {
    fn config(&self) -> mmke::train::OptimConfig {
        mmke::train::OptimConfig {
            weight_decay: self.weight_decay,
            warmup: self.warmup,
            cosine: self.cosine,
            min_lr_ratio: self.min_lr_ratio,
            clip_norm: self.clip_norm,
        }
    }
}

impl VlmArgs {
    fn run(self, knowledge: mmke::train::vlm::Knowledge) -> Result<()> {
        let config = mmke::train::vlm::VlmTrainConfig {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            text_every: self.text_every,
            checkpoint_every: self.checkpoint_every,
            seed: self.seed,
            freeze_vision: self.freeze_vision,
            optim: self.optim.config(),
            referent_weight: self.referent_weight,
            edited_repeat: self.edited_repeat,
            rewrite_objects: self.rewrite_objects,
        };
        let device = self.device.device()?.autodiff();
        let exact = mmke::train::vlm::run(
            knowledge,
            &self.preset,
            self.image_size,
            self.clip.as_deref(),
            &self.data,
            &config,
            &self.out,
            self.resume,
            &device,
        )?;
        println!("test exact match (teacher-forced): {:.2}%", 100.0 * exact);
        eprintln!("wrote {}", self.out.display());
        Ok(())
    }
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Teacher-forced exact match of a trained VLM (`mmke train vlm` or `counterfactual`) on
    /// a file's pre-edit (or, with --counterfactual, post-edit) questions, overall and per
    /// question family.
    Vlm {
        /// A directory written by `mmke train vlm` / `mmke train counterfactual`.
        #[arg(long)]
        model: PathBuf,
        /// An FGVEdit-schema file (e.g. DIR/test.json).
        #[arg(long)]
        data: PathBuf,
        /// Root of its image paths (default: the file's directory).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Score the counterfactual knowledge (edit in context, answers as after the edit).
        #[arg(long)]
        counterfactual: bool,
        /// Only the first N records.
        #[arg(long)]
        records: Option<usize>,
        /// Print one JSON object (`all` and `families`, each with n, exact_match and
        /// token_accuracy in %; with --counterfactual also `kinds`, per kind of question about
        /// the edit) instead of the Markdown tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Accuracy, precision, recall, F1 of a trained scope classifier, overall, per pair kind
    /// and per task (text vs image samples).
    Scope {
        /// A run directory written by `mmke train scope`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// An FGVEdit-schema file (e.g. DIR/test.json).
        #[arg(long)]
        data: PathBuf,
        /// Root of its image paths (default: the file's directory).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Print one JSON object (`all`, `kinds`, `tasks`, each with n, accuracy, precision,
        /// recall and f1 in %) instead of the Markdown table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
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
        Command::Train(TrainCommand::Clip {
            preset,
            out,
            steps,
            batch_size,
            lr,
            seed,
            image_size,
            scene_size,
            checkpoint_every,
            grounding_weight,
            cells,
            attribute_weight,
            optim,
            resume,
            device,
        }) => {
            let config = ClipTrainConfig {
                steps,
                batch_size,
                lr,
                seed,
                scene_size,
                checkpoint_every,
                grounding_weight,
                cells: (cells > 0).then_some(cells),
                attribute_weight,
                optim: optim.config(),
            };
            let device = device.device()?.autodiff();
            mmke::train::clip::pretrain(&preset, image_size, &config, &out, resume, &device)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Train(TrainCommand::Scope {
            config,
            clip,
            data,
            out,
            resume,
            device,
        }) => {
            let config = ScopeRunConfig::from_file(&config)?;
            let device = device.device()?.autodiff();
            let report = mmke::train::scope::run(&config, &clip, &data, &out, resume, &device)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Train(TrainCommand::Vlm(args)) => {
            args.run(mmke::train::vlm::Knowledge::PreEdit)?;
        }
        Command::Train(TrainCommand::Counterfactual(args)) => {
            args.run(mmke::train::vlm::Knowledge::Counterfactual)?;
        }
        Command::Train(TrainCommand::Mend {
            layers,
            rank,
            blocks,
            edit_lr,
            meta,
        }) => {
            let config = mmke::edit::mend::MendConfig {
                layers,
                rank,
                blocks,
                edit_lr,
            };
            meta.run::<mmke::edit::mend::Mend>(&config)?;
        }
        Command::Train(TrainCommand::Ke {
            layers,
            hidden,
            edit_lr,
            meta,
        }) => {
            let config = mmke::edit::ke::KeConfig {
                layers,
                hidden,
                edit_lr,
            };
            meta.run::<mmke::edit::ke::Ke>(&config)?;
        }
        Command::Eval(EvalCommand::Scope {
            checkpoint,
            data,
            images,
            json,
            device,
        }) => {
            let device = device.device()?;
            let root =
                images.unwrap_or_else(|| data.parent().map(PathBuf::from).unwrap_or_default());
            let report = mmke::eval::scope::evaluate_run(&checkpoint, &data, &root, &device)?;
            if json {
                println!("{}", serde_json::to_string(&report.percentages())?);
            } else {
                print!("{}", report.markdown());
            }
        }
        Command::Eval(EvalCommand::Vlm {
            model,
            data,
            images,
            counterfactual,
            records,
            json,
            device,
        }) => {
            let device = device.device()?;
            let root =
                images.unwrap_or_else(|| data.parent().map(PathBuf::from).unwrap_or_default());
            let mut file = mmke::data::fgvedit::read(&data, &root)?.records;
            file.truncate(records.unwrap_or(usize::MAX));
            let speaker = mmke::edit::speaker::Speaker::load(&model, &device)?;
            let mut batcher = speaker.batcher;
            let report = if counterfactual {
                mmke::eval::knowledge::evaluate_counterfactual(
                    &speaker.model,
                    &file,
                    &mut batcher,
                    &device,
                )?
            } else {
                let examples: Vec<_> = file
                    .iter()
                    .flat_map(mmke::train::vlm::pre_edit_examples)
                    .collect();
                mmke::eval::knowledge::evaluate(&speaker.model, &examples, &mut batcher, &device)?
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.markdown());
            }
        }
        Command::Export { checkpoint, out } => {
            let device = backend::device(Backend::Flex, None)?;
            ScopeRun::load(&checkpoint, &device)?.export(&checkpoint, &out)?;
            eprintln!("wrote {}", out.display());
        }
        Command::Edit {
            scope,
            base,
            counterfactual,
            image,
            question,
            target,
            queries,
            text_queries,
            max_new_tokens,
            device,
        } => {
            use mmke::edit::serac::MemoryEditor;
            use mmke::edit::speaker::{Query, Speaker};
            let device = device.device()?;
            let mut run = ScopeRun::load(&scope, &device)?;
            let batcher = run.batcher(&[])?;
            let mut editor = MemoryEditor::new(
                run.model,
                batcher,
                Speaker::load(&base, &device)?,
                Speaker::load(&counterfactual, &device)?,
                &device,
            );
            let edit = mmke::data::record::EditRecord::vqa(image.clone(), &question, &target);
            let queries: Vec<Query> = std::iter::once(question.clone())
                .chain(queries)
                .map(|q| Query {
                    image: Some(image.clone()),
                    prompt: mmke::data::record::vqa_prompt(&q),
                })
                .chain(text_queries.into_iter().map(|q| Query {
                    image: None,
                    prompt: q,
                }))
                .collect();
            let before: Vec<_> = queries
                .iter()
                .map(|q| editor.answer(q, max_new_tokens))
                .collect::<mmke::Result<_>>()?;
            editor.edit(&edit)?;
            for (query, before) in queries.iter().zip(before) {
                let after = editor.answer(query, max_new_tokens)?;
                let route = after.route.expect("one stored edit");
                println!(
                    "{}",
                    serde_json::json!({
                        "query": query.prompt,
                        "image": query.image.is_some(),
                        "rho": route.rho,
                        "route": if after.edited { "counterfactual" } else { "base" },
                        "before": before.text,
                        "after": after.text,
                    })
                );
            }
        }
        Command::Fuzz {
            target,
            inputs,
            seed,
            fixtures,
        } => {
            let targets = if target.is_empty() {
                mmke::fuzz::Target::ALL.to_vec()
            } else {
                target
            };
            let work = std::env::temp_dir().join(format!("mmke-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&work)?;
            let mut panicked = false;
            for target in targets {
                let start = std::time::Instant::now();
                let report = mmke::fuzz::run(target, inputs, seed, &fixtures, &work)?;
                println!(
                    "{target:?}: {} inputs, {} accepted, {} rejected, {} panics ({:.1} s)",
                    report.inputs,
                    report.accepted,
                    report.rejected,
                    report.panics.len(),
                    start.elapsed().as_secs_f64()
                );
                for (i, message) in report.panics.iter().take(5) {
                    println!("  input {i}: {message}");
                }
                panicked |= !report.panics.is_empty();
            }
            std::fs::remove_dir_all(&work)?;
            if panicked {
                anyhow::bail!("a reader panicked");
            }
        }
        Command::Experiment(command) => {
            let (experiment, args) = command.split();
            let out = args.out(experiment.file());
            let device = args.device.device()?;
            let commit = mmke::experiment::record::commit();
            let (started, clock) = (std::time::SystemTime::now(), std::time::Instant::now());
            let outcome = mmke::experiment::run(
                experiment,
                &args.preset,
                args.file.as_deref(),
                args.data.as_deref(),
                &out,
                &device,
            )?;
            for (stem, table) in &outcome.tables {
                println!("{}", table.markdown());
                eprintln!("wrote {}/{stem}.{{md,csv,json,png}}", out.display());
            }
            if !outcome.notes.is_empty() {
                println!("{}", outcome.notes);
            }
            for figure in &outcome.figures {
                eprintln!("wrote {}/{figure}", out.display());
            }
            let record = mmke::experiment::record::write(
                &args.results,
                &mmke::experiment::record::Measurement {
                    experiment,
                    preset: &args.preset,
                    outcome: &outcome,
                    out: &out,
                    data: args.data.as_deref(),
                    command: std::iter::once("mmke".to_string())
                        .chain(std::env::args().skip(1))
                        .collect::<Vec<_>>()
                        .join(" "),
                    commit,
                    backend: args.device.backend.name(),
                    started,
                    wall: clock.elapsed(),
                },
            )?;
            eprintln!("wrote {}", record.display());
        }
        Command::Bench(BenchCommand::Routing {
            edits,
            dim,
            batch,
            iters,
            lists,
            probes,
            device,
        }) => {
            let device = device.device()?;
            for n in edits {
                let result = mmke::bench::routing(n, dim, batch, iters, lists, probes, &device);
                println!("{}", serde_json::to_string(&result)?);
            }
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
