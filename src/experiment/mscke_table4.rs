//! MSCKE Table 4: the cost of MSCKE's parts, measured side by side in one run on the models of
//! `mscke-table1` (same presets and output directory): inference time per query of the
//! multimodal scope classifier (routing a query against every stored edit), the base model and
//! the counterfactual model (one teacher-forced forward pass each), and their sizes.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use serde::Serialize;

use super::mscke_table1::{Preset, prepare};
use crate::data::fgvedit;
use crate::data::lm::edit_context;
use crate::edit::serac::MemoryEditor;
use crate::edit::speaker::{Query, Speaker};
use crate::error::Result;
use crate::report::Table;
use crate::train::scope::ScopeRun;

#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub component: String,
    pub queries: usize,
    pub ms_per_query: f64,
    pub parameters: usize,
    /// f32 parameters, MB.
    pub megabytes: f64,
}

/// Measures the three components on the first `eval_records` test edits (the edit query and,
/// when there is one, the M-Locality query of each) and writes `mscke-table4.{md,csv,json,png}`.
pub fn run(
    preset: &Preset,
    data: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<(Table, Vec<Cost>)> {
    let data_dir = prepare(preset, data, out, device)?;
    let mut records = fgvedit::read(&data_dir.join("test.json"), &data_dir)?.records;
    records.truncate(preset.eval_records);
    // (query, answer, the edit it belongs to)
    let mut queries = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let edit = Query {
            image: Some(r.image.clone()),
            prompt: r.prompt.clone(),
        };
        queries.push((edit, r.target.clone(), i));
        if let Some(q) = &r.m_loc {
            let query = Query {
                image: Some(q.image.clone()),
                prompt: q.prompt.clone(),
            };
            queries.push((query, q.answer.clone(), i));
        }
    }

    let mut scope = ScopeRun::load(&out.join("scope-multimodal"), device)?;
    let batcher = scope.batcher(&[])?;
    let classifier_params = scope.model.num_params();
    let mut base = Speaker::load(&out.join("vlm"), device)?;
    let mut counterfactual = Speaker::load(&out.join("counterfactual"), device)?;
    let sizes = [
        classifier_params,
        base.model.num_params(),
        counterfactual.model.num_params(),
    ];
    let mut router = MemoryEditor::new(
        scope.model,
        batcher,
        Speaker::load(&out.join("vlm"), device)?,
        Speaker::load(&out.join("counterfactual"), device)?,
        device,
    );
    for r in &records {
        router.edit(r)?;
    }

    // Each component once before timing (image caches, allocations), then every query.
    let time = |f: &mut dyn FnMut(usize) -> Result<()>| -> Result<f64> {
        f(0)?;
        let start = Instant::now();
        for i in 0..queries.len() {
            f(i)?;
        }
        Ok(start.elapsed().as_secs_f64() * 1000.0 / queries.len().max(1) as f64)
    };
    let classifier_ms = time(&mut |i| {
        router.route(std::slice::from_ref(&queries[i].0))?;
        Ok(())
    })?;
    let base_ms = time(&mut |i| {
        let (q, answer, _) = &queries[i];
        base.predict(q.image.as_deref(), &q.prompt, answer, 1, device)?;
        Ok(())
    })?;
    let counterfactual_ms = time(&mut |i| {
        let (q, answer, edit) = &queries[i];
        let prompt = format!("{}{}", edit_context(&records[*edit]), q.prompt);
        counterfactual.predict(q.image.as_deref(), &prompt, answer, 1, device)?;
        Ok(())
    })?;

    let names = [
        "multimodal scope classifier",
        "base model",
        "counterfactual model",
    ];
    let costs: Vec<Cost> = names
        .iter()
        .zip([classifier_ms, base_ms, counterfactual_ms])
        .zip(sizes)
        .map(|((name, ms), parameters)| Cost {
            component: name.to_string(),
            queries: queries.len(),
            ms_per_query: ms,
            parameters,
            megabytes: parameters as f64 * 4.0 / 1e6,
        })
        .collect();
    let mut table = Table::new(
        &format!(
            "MSCKE Table 4 on scenes: inference time per query ({} edits stored) and size",
            records.len()
        ),
        "component",
        &["time per query (ms)", "parameters (M)", "size (MB, f32)"],
    );
    for c in &costs {
        table.push(
            &c.component,
            vec![c.ms_per_query, c.parameters as f64 / 1e6, c.megabytes],
        );
    }
    let details = serde_json::json!({
        "preset": preset,
        "device": format!("{device:?}"),
        "costs": costs,
    });
    table.write(out, "mscke-table4", &details)?;
    Ok((table, costs))
}
