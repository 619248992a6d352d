//! `mmke eval`: score a trained scope classifier or VLM on a split.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use crate::DeviceArgs;

#[derive(Subcommand)]
pub enum EvalCommand {
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

pub fn run(command: EvalCommand) -> Result<()> {
    match command {
        EvalCommand::Scope {
            checkpoint,
            data,
            images,
            json,
            device,
        } => {
            let device = device.device()?;
            let root = image_root(images, &data);
            let report = mmke::train::scope::evaluate_run(&checkpoint, &data, &root, &device)?;
            if json {
                println!("{}", serde_json::to_string(&report.percentages())?);
            } else {
                print!("{}", report.markdown());
            }
        }
        EvalCommand::Vlm {
            model,
            data,
            images,
            counterfactual,
            records,
            json,
            device,
        } => {
            let device = device.device()?;
            let root = image_root(images, &data);
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
                    .flat_map(mmke::data::lm::pre_edit_examples)
                    .collect();
                mmke::eval::knowledge::evaluate(&speaker.model, &examples, &mut batcher, &device)?
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.markdown());
            }
        }
    }
    Ok(())
}

/// Where a data file's images are: `images` if given, else the file's directory.
fn image_root(images: Option<PathBuf>, data: &std::path::Path) -> PathBuf {
    images.unwrap_or_else(|| data.parent().map(PathBuf::from).unwrap_or_default())
}
