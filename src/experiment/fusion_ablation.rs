//! MSCKE Table 2: scope accuracy of the multimodal scope classifier with concatenation,
//! cross-attention and dot-product fusion, for two CLIP sizes (`clip-tiny` in the role of
//! ViT-B/32, `clip-small` in that of ViT-L/14), on the scenes test split.

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::data::pairs::PairKind;
use crate::data::scenes::ScenesConfig;
use crate::error::Result;
use crate::eval::scope::ScopeReport;
use crate::model::fusion::FusionKind;
use crate::model::scope::ScopeConfig;
use crate::report::Table;
use crate::train::clip::ClipTrainConfig;
use crate::train::scope::evaluate_run;
use crate::train::scope::{ScopeRunConfig, ScopeTrainConfig};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The scenes split (ignored when the user passes `--data`).
    pub data: ScenesConfig,
    /// CLIP presets: Table 2's columns.
    pub clips: Vec<String>,
    /// CLIP input size.
    pub clip_image_size: usize,
    pub clip: ClipTrainConfig,
    /// A CLIP preset's own pre-training where `clip` does not suit it (clip-small's InfoNCE
    /// does not move at clip-tiny's learning rate).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub clip_overrides: std::collections::BTreeMap<String, ClipTrainConfig>,
    /// Fusions: Table 2's rows.
    pub fusions: Vec<FusionKind>,
    /// The classifier; `fusion` is set per row.
    pub model: ScopeConfig,
    pub train: ScopeTrainConfig,
    /// What the paper claims of Table 2, checked in the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<super::claims::Claim>,
}

/// One trained classifier's results on the test split, in %.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub clip: String,
    pub fusion: FusionKind,
    pub accuracy: f64,
    pub hard_in_scope: f64,
    pub hard_out_of_scope: f64,
    pub text_samples: f64,
    pub image_samples: f64,
    pub train_seconds: f64,
}

impl RunResult {
    fn new(clip: &str, fusion: FusionKind, report: &ScopeReport, train_seconds: f64) -> Self {
        let task = |t| {
            report
                .by_task
                .get(&t)
                .map_or(f64::NAN, |m| 100.0 * m.accuracy)
        };
        Self {
            clip: clip.to_string(),
            fusion,
            accuracy: 100.0 * report.overall.accuracy,
            hard_in_scope: 100.0 * report.kind_accuracy(PairKind::HardInScope),
            hard_out_of_scope: 100.0 * report.kind_accuracy(PairKind::HardOutOfScope),
            text_samples: task(crate::data::pairs::Task::Text),
            image_samples: task(crate::data::pairs::Task::Image),
            train_seconds,
        }
    }
}

/// Runs the ablation into `out` (CLIPs, classifiers, and `fusion-ablation.{md,csv,json,png}`)
/// and returns Table 2 and the per-run details. `data`: a directory with `train.json` and
/// `test.json` (FGVEdit schema, images relative to it) instead of the preset's scenes split.
pub fn run(
    preset: &Preset,
    data: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<(Table, Vec<RunResult>)> {
    let data_dir = super::data_dir(out, data, &preset.data)?;
    let train_device = device.clone().autodiff();
    let mut results = Vec::new();
    for clip in &preset.clips {
        let start = Instant::now();
        let clip_dir = super::pretrained_clip(
            out,
            clip,
            preset.clip_image_size,
            preset.clip_overrides.get(clip).unwrap_or(&preset.clip),
            &train_device,
        )?;
        let clip_seconds = start.elapsed().as_secs_f64();
        for &fusion in &preset.fusions {
            let config = ScopeRunConfig {
                model: ScopeConfig {
                    fusion,
                    ..preset.model.clone()
                },
                train: preset.train.clone(),
            };
            let start = Instant::now();
            let name = format!("{clip}-{}", fusion.name());
            let run_dir =
                super::trained_scope(out, &name, &config, &clip_dir, &data_dir, &train_device)?;
            let seconds =
                start.elapsed().as_secs_f64() + clip_seconds / preset.fusions.len() as f64;
            let report = evaluate_run(&run_dir, &data_dir.join("test.json"), &data_dir, device)?;
            results.push(RunResult::new(clip, fusion, &report, seconds));
        }
    }

    let columns: Vec<&str> = preset.clips.iter().map(String::as_str).collect();
    let mut table = Table::new(
        "Table 2: scope accuracy (%) on the test split",
        "fusion",
        &columns,
    );
    for &fusion in &preset.fusions {
        let values = preset
            .clips
            .iter()
            .map(|clip| {
                results
                    .iter()
                    .find(|r| &r.clip == clip && r.fusion == fusion)
                    .map_or(f64::NAN, |r| r.accuracy)
            })
            .collect();
        table.push(fusion.name(), values);
    }
    let details = serde_json::json!({ "preset": preset, "data": data_dir, "runs": results });
    table.write(out, "fusion-ablation", &details)?;
    Ok((table, results))
}

/// The per-run details as a Markdown table (accuracy overall, on text and image samples, on
/// hard in- and out-of-scope questions).
pub fn details_markdown(results: &[RunResult]) -> String {
    let mut out = String::from(
        "| CLIP | fusion | all | text samples | image samples | hard in-scope | hard out-of-scope |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in results {
        out += &format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            r.clip,
            r.fusion.name(),
            r.accuracy,
            r.text_samples,
            r.image_samples,
            r.hard_in_scope,
            r.hard_out_of_scope
        );
    }
    out
}
