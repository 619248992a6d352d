//! Edit a model and ask it: MSCKE (the multimodal scope classifier routing in-scope queries to
//! the counterfactual model) on the models `mmke experiment mscke-table1 --preset quick`
//! trains. The edit is the first test record with hard questions; the example asks its edit
//! question, its hard in-scope question (another referring expression for the edited object)
//! and its hard out-of-scope one (the same attribute of another object), before and after.
//!
//! Run: `cargo run --release --example edit [RUN_DIR]` (default `runs/mscke-table1/quick`, else
//! the tests' tiny preset, trained in a few seconds).

#[path = "common/mod.rs"]
mod common;

use anyhow::Context;
use mmke::data::fgvedit;
use mmke::edit::serac::MemoryEditor;
use mmke::edit::speaker::{Query, Speaker};
use mmke::train::scope::ScopeRun;

fn main() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let dir = common::run_dir(std::env::args().nth(1), scratch.path())?;
    let device = burn::tensor::Device::flex();

    let mut scope = ScopeRun::load(&dir.join("scope-multimodal"), &device)?;
    let batcher = scope.batcher(&[])?;
    let base = Speaker::load(&dir.join("vlm"), &device)?;
    let counterfactual = Speaker::load(&dir.join("counterfactual"), &device)?;
    let mut editor = MemoryEditor::new(scope.model, batcher, base, counterfactual, &device);

    let data = common::scenes_split(&dir)?;
    let records = fgvedit::read(&data.join("test.json"), &data)?.records;
    let record = records
        .iter()
        .find(|r| r.fg_gen.is_some() && r.fg_loc.is_some())
        .context("no test record with hard questions")?;
    let (hard_in, hard_out) = (
        record.fg_gen.as_ref().unwrap(),
        record.fg_loc.as_ref().unwrap(),
    );
    let questions = [
        ("edit", &record.prompt, &record.target),
        ("hard in-scope", &hard_in.prompt, &hard_in.answer),
        ("hard out-of-scope", &hard_out.prompt, &hard_out.answer),
    ];
    let query = |prompt: &str| Query {
        image: Some(record.image.clone()),
        prompt: prompt.to_string(),
    };

    let before = questions
        .iter()
        .map(|(_, prompt, _)| editor.answer_with_route(&query(prompt), 4))
        .collect::<mmke::Result<Vec<_>>>()?;
    println!("edit: {} -> {}", record.prompt, record.target);
    editor.edit(record)?;
    for ((kind, prompt, expected), before) in questions.iter().zip(before) {
        let after = editor.answer_with_route(&query(prompt), 4)?;
        let rho = after.route.map_or(0.0, |r| r.rho);
        let route = if after.edited {
            "counterfactual"
        } else {
            "base"
        };
        println!("{kind}: {prompt}");
        println!(
            "    before {:?}, after {:?} (rho {rho:.3}, {route}); after the edit it should say {expected:?}",
            before.text, after.text
        );
    }
    Ok(())
}
