//! `mmke train`: CLIP pre-training, scope classifiers, VLMs, MEND and KE. Every knob is in the
//! command's config file (`configs/*.toml`); `--set KEY=VALUE` overrides one value of it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mmke::experiment::scenes::ClipSpec;
use mmke::train::meta::MetaTrainConfig;
use mmke::train::scope::ScopeRunConfig;
use mmke::train::vlm::VlmTrainConfig;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::DeviceArgs;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Pre-train a small CLIP from scratch on scenes image-caption pairs (symmetric InfoNCE;
    /// configs/clip.toml).
    Clip {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        out: PathBuf,
        /// Continue from the checkpoint in --out.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Train a scope classifier (BCE) from a CLIP directory on a scenes/FGVEdit train.json
    /// (configs/scope-*.toml).
    Scope {
        #[command(flatten)]
        config: ConfigArgs,
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
    /// train.json (configs/vlm.toml); prints the teacher-forced exact match on test.json's
    /// pre-edit questions.
    Vlm(VlmArgs),
    /// Train the counterfactual model (configs/counterfactual.toml): a VLM that reads the edit
    /// ("{src} >> {alt} || ") before the query and answers as after the edit; prints its
    /// exact match on test.json.
    Counterfactual(VlmArgs),
    /// Train SERAC's counterfactual model beside a Hugging Face MLLM (the `train` table of
    /// configs/counterfactual.toml): a causal LM reading the model's visual tokens through a
    /// new projection, on the edits of train.json; writes OUT/projection.bpk and
    /// OUT/language_model.bpk.
    CounterfactualMllm {
        #[command(flatten)]
        config: ConfigArgs,
        /// A Hugging Face BLIP-2 or LLaVA directory.
        #[arg(long)]
        model: PathBuf,
        /// The dtype the model (and the counterfactual LM, which trains in it) is held in.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: crate::mllm::Precision,
        /// A causal LM directory (OPTForCausalLM, LlamaForCausalLM) to start from (default: a
        /// copy of the model's LM).
        #[arg(long)]
        lm: Option<PathBuf>,
        /// Directory with train.json (FGVEdit or MMEdit) and the images it names.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Meta-train MEND's gradient networks for a trained VLM on the edits of train.json
    /// (configs/mend.toml); writes OUT/mend.{json,bpk}.
    Mend(MetaArgs),
    /// Meta-train KE's hypernetwork (a BiLSTM over the edit conditioning the gradient's
    /// update) like MEND (configs/ke.toml); writes OUT/ke.{json,bpk}.
    Ke(MetaArgs),
}

/// A training's configuration file and the values overridden on the command line.
#[derive(Args)]
pub struct ConfigArgs {
    /// The configuration (configs/*.toml): every knob of the training.
    #[arg(long)]
    config: PathBuf,
    /// Overrides one value of the file, as TOML (`--set train.steps=60`, `--set
    /// preset='"vlm-tiny"'`); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn load<T: DeserializeOwned>(&self) -> Result<T> {
        let path = &self.config;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        for assignment in &self.set {
            mmke::experiment::spec::merge(&mut table, override_table(assignment)?);
        }
        T::deserialize(toml::Value::Table(table))
            .with_context(|| format!("{} (with {:?})", path.display(), self.set))
    }
}

/// `a.b=VALUE` as the table `{ a = { b = VALUE } }`.
fn override_table(assignment: &str) -> Result<toml::Table> {
    let (key, value) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment}: not KEY=VALUE"))?;
    let mut value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .with_context(|| format!("--set {assignment}: the value is not TOML"))?
        .remove("v")
        .expect("parsed");
    for part in key.trim().rsplit('.') {
        let mut table = toml::Table::new();
        table.insert(part.to_string(), value);
        value = toml::Value::Table(table);
    }
    match value {
        toml::Value::Table(table) => Ok(table),
        _ => unreachable!("a key has at least one part"),
    }
}

/// A VLM training's file: the preset, the vision tower's input size and the training.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VlmFile {
    preset: String,
    image_size: usize,
    train: VlmTrainConfig,
}

/// A meta-training's file: the network and its training.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile<C> {
    config: C,
    train: MetaTrainConfig,
}

/// What MEND's and KE's meta-training share.
#[derive(Args)]
pub struct MetaArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// A directory written by `mmke train vlm`, or a Hugging Face MLLM directory (BLIP-2,
    /// LLaVA).
    #[arg(long)]
    model: PathBuf,
    /// The dtype a Hugging Face --model is held and computed in (the network trains in f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::mllm::Precision,
    /// Directory with train.json and the images it names.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

impl MetaArgs {
    fn run<N: mmke::edit::mend::Hypernetwork>(self) -> Result<()>
    where
        N::Config: DeserializeOwned,
    {
        let file: NetworkFile<N::Config> = self.config.load()?;
        let device = self.device.device()?.autodiff();
        let losses = mmke::train::meta::run::<N>(
            &mmke::edit::speaker::ModelDir::new(&self.model, self.dtype.dtype()),
            &self.data,
            &file.config,
            &file.train,
            &self.out,
            self.resume,
            &device,
        )?;
        println!(
            "last {} steps: edit loss {:.4} -> {:.4} after the update, locality KL {:.4}",
            file.train.checkpoint_every, losses.before, losses.after, losses.locality_kl
        );
        eprintln!("wrote {}", self.out.display());
        Ok(())
    }
}

#[derive(Args)]
pub struct VlmArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Directory with train.json, test.json, tokenizer.json and the images.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// A CLIP directory (e.g. from `mmke train clip`) whose vision tower starts the VLM's.
    #[arg(long)]
    clip: Option<PathBuf>,
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

impl VlmArgs {
    fn run(self, knowledge: mmke::train::vlm::Knowledge) -> Result<()> {
        let file: VlmFile = self.config.load()?;
        let device = self.device.device()?.autodiff();
        let exact = mmke::train::vlm::run(
            knowledge,
            &file.preset,
            file.image_size,
            self.clip.as_deref(),
            &self.data,
            &file.train,
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
            config,
            out,
            resume,
            device,
        } => {
            let spec: ClipSpec = config.load()?;
            let device = device.device()?.autodiff();
            mmke::train::clip::pretrain(
                &spec.preset,
                spec.image_size,
                &spec.train,
                &out,
                resume,
                &device,
            )?;
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
            let config: ScopeRunConfig = config.load()?;
            let device = device.device()?.autodiff();
            let report = mmke::train::scope::run(&config, &clip, &data, &out, resume, &device)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        TrainCommand::Vlm(args) => args.run(mmke::train::vlm::Knowledge::PreEdit)?,
        TrainCommand::CounterfactualMllm {
            config,
            model,
            dtype,
            lm,
            data,
            out,
            device,
        } => {
            let file: VlmFile = config.load()?;
            let device = device.device()?.autodiff();
            let loss = mmke::train::counterfactual::run(
                &mmke::edit::speaker::ModelDir::new(model, dtype.dtype()),
                lm.as_deref(),
                &data,
                &file.train,
                &out,
                &device,
            )?;
            println!("answer loss over the last steps: {loss:.4}");
            eprintln!("wrote {}", out.display());
        }
        TrainCommand::Counterfactual(args) => {
            args.run(mmke::train::vlm::Knowledge::Counterfactual)?
        }
        TrainCommand::Mend(args) => args.run::<mmke::edit::mend::Mend>()?,
        TrainCommand::Ke(args) => args.run::<mmke::edit::ke::Ke>()?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_is_a_nested_table() {
        let table = override_table("train.optim.warmup=5").unwrap();
        assert_eq!(table["train"]["optim"]["warmup"].as_integer(), Some(5));
        let table = override_table("preset=\"vlm-tiny\"").unwrap();
        assert_eq!(table["preset"].as_str(), Some("vlm-tiny"));
        assert!(override_table("steps").is_err());
        assert!(
            override_table("preset=vlm-tiny").is_err(),
            "a string is quoted"
        );
    }
}
