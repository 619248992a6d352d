//! Edit a model and ask it, then run a protocol: MSCKE (the multimodal scope classifier routing
//! in-scope queries to the counterfactual model) on the models `mmke experiment mscke-table1
//! --preset quick` trains. The edit is the first test record with hard questions; the example
//! asks its edit question, its hard in-scope question (another referring expression for the
//! edited object) and its hard out-of-scope one (the same attribute of another object), before
//! and after, then scores the method by one-step editing. The first block of `main` is
//! README's snippet.
//!
//! Run: `cargo run --release --example edit [RUN_DIR]` (default `runs/scenes/quick`, else the
//! tests' tiny preset, trained in a few seconds).

#[path = "common/mod.rs"]
mod common;

use anyhow::Context;
use mmke::data::fgvedit;
use mmke::edit::method::{Method, Models};
use mmke::edit::speaker::Query;
use mmke::eval::protocol;

fn main() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let dir = common::run_dir(std::env::args().nth(1), scratch.path())?;
    let split = common::scenes_split(&dir)?;
    let device = burn::tensor::Device::flex();
    let records = fgvedit::read(&split.join("test.json"), &split)?.records;
    let method = Method::Mscke {
        classifier: "scope-multimodal".into(),
        mend: None,
    };
    let mut editor = method.build(&Models::in_dir(&dir, &[]), &device)?;
    let record = &records[0];
    let query = Query {
        image: Some(record.image.clone()),
        prompt: record.prompt.clone(),
    };
    println!("{} -> {}", record.prompt, record.target);
    println!("before: {:?}", editor.answer(&query, 4)?);
    editor.edit(record)?;
    println!("after:  {:?}", editor.answer(&query, 4)?);
    editor.reset();
    let metrics = protocol::one_step(editor.as_mut(), &records[..records.len().min(5)])?;
    println!(
        "Reliability {:.1}%, Specificity {:.1}%",
        100.0 * metrics.reliability.token_accuracy,
        100.0 * metrics.specificity().token_accuracy
    );

    // The hard questions of a record that has them.
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
        .map(|(_, prompt, _)| editor.answer(&query(prompt), 4))
        .collect::<mmke::Result<Vec<_>>>()?;
    println!("\nedit: {} -> {}", record.prompt, record.target);
    editor.edit(record)?;
    for ((kind, prompt, expected), before) in questions.iter().zip(before) {
        let after = editor.answer(&query(prompt), 4)?;
        println!("{kind}: {prompt}");
        println!(
            "    before {before:?}, after {after:?}; after the edit it should say {expected:?}"
        );
    }
    Ok(())
}
