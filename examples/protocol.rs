//! Evaluate an editor with a protocol: FT-LLM (a few gradient steps on the last LM layer)
//! through one-step editing on the first test edits of an MSCKE Table 1 run, every metric
//! of both papers as token accuracy and exact match.
//!
//! Run: `cargo run --release --example protocol [RUN_DIR]` (default `runs/mscke-table1/quick`,
//! else the tests' tiny preset, trained in a few seconds).

#[path = "common/mod.rs"]
mod common;

use mmke::data::fgvedit;
use mmke::edit::finetune::{FineTuneConfig, FineTuneEditor, Part};
use mmke::edit::speaker::Speaker;
use mmke::eval::protocol;

fn main() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let dir = common::run_dir(std::env::args().nth(1), scratch.path())?;
    // Fine-tuning needs gradients: the editor works on an autodiff device.
    let device = burn::tensor::Device::flex().autodiff();

    let data = common::scenes_split(&dir)?;
    let mut records = fgvedit::read(&data.join("test.json"), &data)?.records;
    records.truncate(5);
    let config = FineTuneConfig {
        part: Part::LastLmLayer,
        steps: 10,
        lr: 1e-3,
    };
    let base = Speaker::load(&dir.join("vlm"), &device)?;
    let mut editor = FineTuneEditor::new(base, config, &device);
    // Pre-edit predictions first, then per record: edit, measure, reset.
    let metrics = protocol::one_step(&mut editor, &records)?;
    println!("FT-LLM, one-step, {} edits:", records.len());
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    println!("Specificity (eq. 12): {:?}", metrics.specificity());
    Ok(())
}
