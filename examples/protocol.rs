//! Evaluate an editor with a protocol: FT-LLM (a few gradient steps on the last LM layer)
//! through one-step editing on the first test edits of an MSCKE Table 1 run, every metric
//! of both papers as token accuracy and exact match.
//!
//! Run: `cargo run --release --example protocol [RUN_DIR]` (default `runs/scenes/quick`, else
//! the tests' tiny preset, trained in a few seconds).

#[path = "common/mod.rs"]
mod common;

use mmke::data::fgvedit;
use mmke::edit::method::{Method, Models};
use mmke::eval::protocol;

fn main() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let dir = common::run_dir(std::env::args().nth(1), scratch.path())?;
    // Fine-tuning needs gradients: the method builds its editor on the autodiff device.
    let device = burn::tensor::Device::flex();

    let data = common::scenes_split(&dir)?;
    let mut records = fgvedit::read(&data.join("test.json"), &data)?.records;
    records.truncate(5);
    let method = Method::FtLlm {
        steps: 10,
        lr: 1e-3,
    };
    let mut editor = method.build(&Models::in_dir(&dir, &[]), &device)?;
    // Pre-edit predictions first, then per record: edit, measure, reset.
    let metrics = protocol::one_step(editor.as_mut(), &records)?;
    println!("FT-LLM, one-step, {} edits:", records.len());
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    println!("Specificity (eq. 12): {:?}", metrics.specificity());
    Ok(())
}
