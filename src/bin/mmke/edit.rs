//! `mmke edit`: edit a model and ask it questions (MSCKE / SERAC: a scope classifier, a base
//! and a counterfactual VLM); for each query, rho, the route taken, and the answer before and
//! after the edit.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mmke::model::scope::ScopeRun;

use crate::DeviceArgs;

#[derive(Args)]
pub struct EditArgs {
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
}

pub fn run(args: EditArgs) -> Result<()> {
    let EditArgs {
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
    } = args;
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
        .map(|q| editor.answer_with_route(q, max_new_tokens))
        .collect::<mmke::Result<_>>()?;
    editor.edit(&edit)?;
    for (query, before) in queries.iter().zip(before) {
        let after = editor.answer_with_route(query, max_new_tokens)?;
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
    Ok(())
}
