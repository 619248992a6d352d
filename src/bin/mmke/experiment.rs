//! `mmke experiment NAME`: reproduce a table or figure of the papers, and write its record
//! to docs/results.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mmke::edit::speaker::ModelDir;

use crate::DeviceArgs;

/// What every experiment takes.
#[derive(Args)]
pub struct ExperimentArgs {
    /// Preset of the experiment file: quick (minutes on a CPU) or full (the larger run).
    #[arg(long, default_value = "quick")]
    preset: String,
    /// Experiment file (default: experiments/FILE.toml, else the copy built into mmke).
    #[arg(long)]
    file: Option<PathBuf>,
    /// A directory with train.json and test.json (FGVEdit's or MMEdit's schema, told apart by
    /// their keys; images relative to it) instead of the preset's scenes split.
    #[arg(long)]
    data: Option<PathBuf>,
    /// A Hugging Face MLLM directory (BLIP-2 OPT or LLaMA, LLaVA) to edit instead of the
    /// scenes VLM: the editing tables run on it (the scope classifiers, MEND, KE and UniKE's
    /// knowledge are trained for it on the data).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The dtype --model is held and computed in: bf16 or f16 take half f32's memory (the
    /// editors still read f32 logits and train f32 parameters of their own).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::mllm::Precision,
    /// Output directory; what it already holds is reused (default: runs/FILE/PRESET, FILE
    /// being `scenes` for every editing experiment: they share their models; with --model,
    /// runs/MODEL/PRESET, MODEL being the model directory's name).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the run's record goes: `EXPERIMENT-PRESET.md` (the tables, the command, the
    /// commit, the models trained and reused, the wall time, the machine) and the tables'
    /// CSV, JSON and PNG (default: docs/results; with --model, OUT/results).
    #[arg(long)]
    results: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

impl ExperimentArgs {
    fn out(&self, name: &str) -> PathBuf {
        let model = self.model.as_ref().and_then(|m| m.file_name());
        let name = model.map_or_else(|| name.into(), |m| m.to_os_string());
        self.out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(name).join(&self.preset))
    }

    /// Where the record goes: a run on a model of the user's stays out of the project's
    /// own results.
    fn results(&self, out: &std::path::Path) -> PathBuf {
        match (&self.results, &self.model) {
            (Some(results), _) => results.clone(),
            (None, Some(_)) => out.join("results"),
            (None, None) => PathBuf::from("docs/results"),
        }
    }
}

#[derive(Subcommand)]
pub enum ExperimentCommand {
    /// MSCKE Table 2: concat / cross-attention / dot-product fusion x two CLIP sizes.
    FusionAblation(ExperimentArgs),
    /// MSCKE Table 1: FT-LLM, FT-Visual, IKE, SERAC, MEND, MSCKE and MSCKE-MEND, one-step.
    MsckeTable1(ExperimentArgs),
    /// MSCKE Table 3: the multimodal classifier transferred (behind MEND, with a second base
    /// model) vs retrained.
    MsckeTable3(ExperimentArgs),
    /// MSCKE Table 4: inference time per query and size of the scope classifier, the base and
    /// the counterfactual model.
    MsckeTable4(ExperimentArgs),
    /// UniKE Table 1: one-step editing on the VQA and caption tasks (FT, KE, T-Patcher, MEND,
    /// IKE, SERAC, UniKE).
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
    /// UniKE Figure 5: true vs hallucinated knowledge in the semantic and the truthfulness
    /// space: how well each separates them (table) and their PCA (PNG).
    UnikeFig5(ExperimentArgs),
}

impl ExperimentCommand {
    fn split(self) -> (mmke::experiment::Experiment, ExperimentArgs) {
        use mmke::experiment::Experiment as E;
        let (name, args) = match self {
            ExperimentCommand::FusionAblation(a) => return (E::FusionAblation, a),
            ExperimentCommand::MsckeTable1(a) => ("mscke-table1", a),
            ExperimentCommand::MsckeTable3(a) => ("mscke-table3", a),
            ExperimentCommand::MsckeTable4(a) => ("mscke-table4", a),
            ExperimentCommand::UnikeTable1(a) => ("unike-table1", a),
            ExperimentCommand::UnikeTable2(a) => ("unike-table2", a),
            ExperimentCommand::UnikeTable3(a) => ("unike-table3", a),
            ExperimentCommand::UnikeTable4(a) => ("unike-table4", a),
            ExperimentCommand::UnikeFig4(a) => ("unike-fig4", a),
            ExperimentCommand::UnikeFig5(a) => ("unike-fig5", a),
        };
        (
            E::named(name).expect("every command is an experiment"),
            args,
        )
    }
}

pub fn run(command: ExperimentCommand) -> Result<()> {
    let (experiment, args) = command.split();
    let out = args.out(experiment.file());
    let device = args.device.device()?;
    if args.model.is_none() && args.dtype.dtype() != burn::tensor::DType::F32 {
        anyhow::bail!("--dtype sets the dtype of --model: the scenes VLMs are f32");
    }
    let model = (args.model.as_ref()).map(|m| ModelDir::new(m, args.dtype.dtype()));
    let commit = mmke::experiment::record::commit();
    let (started, clock) = (std::time::SystemTime::now(), std::time::Instant::now());
    let outcome = mmke::experiment::run(
        experiment,
        &args.preset,
        args.file.as_deref(),
        args.data.as_deref(),
        model.as_ref(),
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
        &args.results(&out),
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
    Ok(())
}
