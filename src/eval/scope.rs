//! Scope-classifier evaluation: accuracy, precision, recall and F1 over all pairs, per pair
//! kind (hard in-scope, hard out-of-scope, ...) and per task (text vs image samples, the
//! paper's Figure 4).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;

use super::metrics::BinaryMetrics;
use crate::data::batch::ScopeBatcher;
use crate::data::pairs::{PairKind, ScopePair, Task};
use crate::error::Result;
use crate::model::scope::{ScopeClassifier, THRESHOLD};

const BATCH: usize = 256;

#[derive(Debug, Serialize)]
pub struct ScopeReport {
    pub overall: BinaryMetrics,
    pub by_kind: BTreeMap<PairKind, BinaryMetrics>,
    pub by_task: BTreeMap<Task, BinaryMetrics>,
}

impl ScopeReport {
    /// `{"all": {...}, "kinds": {"hard-in-scope": {...}, ...}, "tasks": {...}}`, each with
    /// n, accuracy, precision, recall and f1 in % (0-100).
    pub fn percentages(&self) -> serde_json::Value {
        let pct = |m: &BinaryMetrics| {
            serde_json::json!({
                "n": m.n,
                "accuracy": 100.0 * m.accuracy,
                "precision": 100.0 * m.precision,
                "recall": 100.0 * m.recall,
                "f1": 100.0 * m.f1,
            })
        };
        // Keys as they serialize ("hard-in-scope", "image").
        fn by_name<K: Serialize>(
            map: &BTreeMap<K, BinaryMetrics>,
            pct: impl Fn(&BinaryMetrics) -> serde_json::Value,
        ) -> serde_json::Map<String, serde_json::Value> {
            map.iter()
                .map(|(key, m)| {
                    let key = serde_json::to_value(key).expect("keys serialize");
                    (key.as_str().unwrap_or("?").to_string(), pct(m))
                })
                .collect()
        }
        let kinds = by_name(&self.by_kind, pct);
        let tasks = by_name(&self.by_task, pct);
        serde_json::json!({ "all": pct(&self.overall), "kinds": kinds, "tasks": tasks })
    }

    /// A Markdown table: one row overall, one per task, one per pair kind.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| subset | pairs | accuracy | precision | recall | F1 |\n| --- | --- | --- | --- | --- | --- |\n",
        );
        let mut row = |name: String, m: &BinaryMetrics| {
            out += &format!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                m.n,
                100.0 * m.accuracy,
                100.0 * m.precision,
                100.0 * m.recall,
                100.0 * m.f1
            );
        };
        row("all".into(), &self.overall);
        for (task, m) in &self.by_task {
            row(format!("{task:?} samples").to_lowercase(), m);
        }
        for (kind, m) in &self.by_kind {
            row(
                serde_json::to_value(kind)
                    .expect("kinds serialize")
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                m,
            );
        }
        out
    }

    /// Accuracy on one kind of pair (0 when there are none).
    pub fn kind_accuracy(&self, kind: PairKind) -> f64 {
        self.by_kind.get(&kind).map_or(0.0, |m| m.accuracy)
    }
}

/// rho of every pair (in order). Each distinct edit side (image and text) is encoded once,
/// as the edit memory stores z_e once per edit.
pub fn scores(
    model: &ScopeClassifier,
    pairs: &[ScopePair],
    batcher: &ScopeBatcher,
    device: &Device,
) -> Result<Vec<f32>> {
    let mut edit_index: BTreeMap<(&Path, &str, &str), usize> = BTreeMap::new();
    let mut edits: Vec<&ScopePair> = Vec::new();
    let slots: Vec<usize> = pairs
        .iter()
        .map(|p| {
            *edit_index
                .entry((
                    p.edit_image.as_path(),
                    p.edit_question.as_str(),
                    p.edit_target.as_str(),
                ))
                .or_insert_with(|| {
                    edits.push(p);
                    edits.len() - 1
                })
        })
        .collect();
    let mut z_e = Vec::new();
    for chunk in edits.chunks(BATCH) {
        z_e.push(model.encode(&batcher.edits(chunk, device)?));
    }
    let Some(z_e) = (!z_e.is_empty()).then(|| Tensor::cat(z_e, 0)) else {
        return Ok(Vec::new());
    };
    let mut rho = Vec::with_capacity(pairs.len());
    for (chunk, slots) in pairs.chunks(BATCH).zip(slots.chunks(BATCH)) {
        let chunk: Vec<&ScopePair> = chunk.iter().collect();
        let z = model.encode(&batcher.queries(&chunk, device)?);
        let slots: Vec<i64> = slots.iter().map(|&s| s as i64).collect();
        let n = slots.len();
        let index = Tensor::<1, Int>::from_data(TensorData::new(slots, [n]), device);
        let values: Vec<f32> = model
            .similarity(z_e.clone().select(0, index), z)
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32 scores");
        rho.extend(values);
    }
    Ok(rho)
}

pub fn evaluate(
    model: &ScopeClassifier,
    pairs: &[ScopePair],
    batcher: &ScopeBatcher,
    device: &Device,
) -> Result<ScopeReport> {
    let rho = scores(model, pairs, batcher, device)?;
    let predicted: Vec<bool> = rho.iter().map(|&r| r >= THRESHOLD).collect();
    let labels: Vec<bool> = pairs.iter().map(ScopePair::label).collect();
    let subset = |keep: &dyn Fn(&ScopePair) -> bool| {
        let (p, l): (Vec<bool>, Vec<bool>) = pairs
            .iter()
            .zip(predicted.iter().zip(&labels))
            .filter(|(pair, _)| keep(pair))
            .map(|(_, (&p, &l))| (p, l))
            .unzip();
        BinaryMetrics::new(&p, &l)
    };
    let kinds: std::collections::BTreeSet<PairKind> = pairs.iter().map(|p| p.kind).collect();
    Ok(ScopeReport {
        overall: BinaryMetrics::new(&predicted, &labels),
        by_kind: kinds
            .into_iter()
            .map(|k| (k, subset(&|p| p.kind == k)))
            .collect(),
        by_task: [Task::Text, Task::Image]
            .into_iter()
            .map(|t| (t, subset(&|p| p.kind.task() == t)))
            .collect(),
    })
}
