//! `mmke train`: CLIP pre-training, scope classifiers, VLMs, MEND and KE.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mmke::train::clip::ClipTrainConfig;
use mmke::train::scope::ScopeRunConfig;

use crate::DeviceArgs;

#[derive(Subcommand)]
pub enum TrainCommand {
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
pub struct MetaArgs {
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
pub struct VlmArgs {
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
pub struct OptimArgs {
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

pub fn run(command: TrainCommand) -> Result<()> {
    match command {
        TrainCommand::Clip {
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
        } => {
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
        TrainCommand::Scope {
            config,
            clip,
            data,
            out,
            resume,
            device,
        } => {
            let config = ScopeRunConfig::from_file(&config)?;
            let device = device.device()?.autodiff();
            let report = mmke::train::scope::run(&config, &clip, &data, &out, resume, &device)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        TrainCommand::Vlm(args) => {
            args.run(mmke::train::vlm::Knowledge::PreEdit)?;
        }
        TrainCommand::Counterfactual(args) => {
            args.run(mmke::train::vlm::Knowledge::Counterfactual)?;
        }
        TrainCommand::Mend {
            layers,
            rank,
            blocks,
            edit_lr,
            meta,
        } => {
            let config = mmke::edit::mend::MendConfig {
                layers,
                rank,
                blocks,
                edit_lr,
            };
            meta.run::<mmke::edit::mend::Mend>(&config)?;
        }
        TrainCommand::Ke {
            layers,
            hidden,
            edit_lr,
            meta,
        } => {
            let config = mmke::edit::ke::KeConfig {
                layers,
                hidden,
                edit_lr,
            };
            meta.run::<mmke::edit::ke::Ke>(&config)?;
        }
    }
    Ok(())
}
