//! MSCKE Table 3: transferability of the multimodal scope classifier. The classifier of
//! `mscke-table1` (trained alongside the first base model) is used unchanged behind MEND
//! (MSCKE-MEND) and with a second base model (`transfer.vlm_preset`, with its own
//! counterfactual model and MEND), and set against a classifier retrained for each setting.
//! In mmke the classifier never reads the base model, so "retrained" is a fresh training run
//! (seed `transfer.retrain_seed`) on the same edits: the table shows how much a setting's
//! scores depend on which classifier routes them. Runs in mscke-table1's directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::mscke_table1::{Preset, prepare};
use crate::data::fgvedit;
use crate::edit::mend::{HypernetEditor, Mend};
use crate::edit::serac::{InScope, MemoryEditor};
use crate::edit::speaker::Speaker;
use crate::error::Result;
use crate::eval::protocol;
use crate::model::scope::{ScopeConfig, ScopeMode};
use crate::report::Table;
use crate::train::meta::MetaTrainConfig;
use crate::train::scope::{ScopeRun, ScopeRunConfig, ScopeTrainConfig};
use crate::train::vlm::VlmTrainConfig;

/// The second base model of Table 3 and the retrained classifier's seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// A CLIP of its own for the second VLM's vision tower; when absent it shares the first
    /// base model's (as MiniGPT-4 shares BLIP-2's vision encoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_preset: Option<String>,
    /// That CLIP's pre-training; the preset's `clip` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<crate::train::clip::ClipTrainConfig>,
    pub vlm_preset: String,
    pub vlm: VlmTrainConfig,
    pub counterfactual: VlmTrainConfig,
    /// MEND's meta-training for the second base model; the preset's `mend_train` when absent.
    #[serde(default)]
    pub mend_train: Option<MetaTrainConfig>,
    pub retrain_seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TransferResult {
    pub setting: String,
    pub classifier: String,
    /// Reliability, Locality, Generality, Specificity (token accuracy).
    pub scores: [f64; 4],
    /// Wall-clock seconds of the evaluation, run beside the setting's other classifier.
    pub seconds: f64,
}

/// Trains what is missing (mscke-table1's models, the second base model's VLMs and MEND under
/// `out/transfer`, the retrained classifier) and writes `mscke-table3.{md,csv,json,png}`.
pub fn run(
    preset: &Preset,
    data: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<(Table, Vec<TransferResult>)> {
    let data_dir = prepare(preset, data, out, device)?;
    let transfer = &preset.transfer;
    let train_device = device.clone().autodiff();
    let clip_dir = super::pretrained_clip(
        out,
        &preset.clip_preset,
        preset.clip_image_size,
        &preset.clip,
        &train_device,
    )?;
    let second = out.join("transfer");
    let second_clip = match &transfer.clip_preset {
        Some(clip) => super::pretrained_clip(
            &second,
            clip,
            preset.clip_image_size,
            transfer.clip.as_ref().unwrap_or(&preset.clip),
            &train_device,
        )?,
        None => clip_dir.clone(),
    };
    let retrained = ScopeRunConfig {
        model: ScopeConfig {
            mode: ScopeMode::Multimodal,
            ..preset.scope_model.clone()
        },
        train: ScopeTrainConfig {
            seed: transfer.retrain_seed,
            ..preset.scope_train.clone()
        },
    };
    // The retrained classifier trains beside the second model's VLMs and then its MEND
    // (each training exactly as it would alone).
    std::thread::scope(|scope| {
        let classifier = scope.spawn(|| {
            super::trained_scope(
                out,
                "scope-multimodal-retrained",
                &retrained,
                &clip_dir,
                &data_dir,
                &train_device,
            )
        });
        let second_model = super::trained_vlms(
            out,
            &second,
            data,
            &preset.data,
            preset.knowledge.as_ref(),
            &data_dir,
            &second_clip,
            preset.clip_image_size,
            super::VlmSpec {
                preset: &transfer.vlm_preset,
                train: &transfer.vlm,
            },
            super::VlmSpec {
                preset: &transfer.vlm_preset,
                train: &transfer.counterfactual,
            },
            &train_device,
        )
        .and_then(|()| {
            super::trained_hypernet::<Mend>(
                &second,
                &preset.mend,
                transfer.mend_train.as_ref().unwrap_or(&preset.mend_train),
                &data_dir,
                &train_device,
            )
        });
        let classifier = classifier
            .join()
            .expect("the classifier training thread panicked");
        second_model?;
        classifier.map(drop)
    })?;

    let mut records = fgvedit::read(&data_dir.join("test.json"), &data_dir)?.records;
    records.truncate(preset.eval_records);
    let first = preset.vlm_preset.as_str();
    let settings = [
        ("MSCKE", first, out.to_path_buf(), false),
        ("MSCKE-MEND", first, out.to_path_buf(), true),
        ("MSCKE", transfer.vlm_preset.as_str(), second.clone(), false),
        (
            "MSCKE-MEND",
            transfer.vlm_preset.as_str(),
            second.clone(),
            true,
        ),
    ];
    // One setting with one classifier; loads its own models, so the two classifiers of a
    // setting are evaluated side by side on two threads (evaluation keeps about one core
    // busy and draws nothing at random: the results are those of one after the other).
    let evaluate = |(method, vlm, models, mend): &(&str, &str, PathBuf, bool),
                    classifier: &str|
     -> Result<TransferResult> {
        let mut run = ScopeRun::load(&out.join(classifier), device)?;
        let batcher = run.batcher(&[])?;
        let in_scope = if *mend {
            let speaker = Speaker::load(&models.join("vlm"), &train_device)?;
            let (net, _) = crate::edit::mend::load::<Mend>(
                &models.join("mend"),
                &speaker.model,
                &train_device,
            )?;
            InScope::Mend {
                editor: Box::new(HypernetEditor::new(speaker, net, &train_device)),
                applied: None,
            }
        } else {
            InScope::Counterfactual(Speaker::load(&models.join("counterfactual"), device)?)
        };
        let mut editor = MemoryEditor::with(
            run.model,
            batcher,
            Speaker::load(&models.join("vlm"), device)?,
            in_scope,
            device,
        );
        let setting = format!("{method} on {vlm}");
        eprintln!(
            "evaluating {setting} with {classifier} on {} edits",
            records.len()
        );
        let start = Instant::now();
        let m = protocol::one_step(&mut editor, &records)?;
        Ok(TransferResult {
            setting,
            classifier: classifier.to_string(),
            scores: [
                m.reliability.token_accuracy,
                m.t_locality.token_accuracy,
                m.t_generality.token_accuracy,
                m.specificity().token_accuracy,
            ]
            .map(|s| 100.0 * s),
            seconds: start.elapsed().as_secs_f64(),
        })
    };
    let mut results = Vec::new();
    for setting in &settings {
        std::thread::scope(|scope| -> Result<()> {
            let pair = ["scope-multimodal", "scope-multimodal-retrained"]
                .map(|classifier| scope.spawn(|| evaluate(setting, classifier)));
            for evaluation in pair {
                results.push(evaluation.join().expect("an evaluation thread panicked")?);
            }
            Ok(())
        })?;
    }

    let mut table = Table::new(
        &format!(
            "MSCKE Table 3 on scenes: the classifier trained with {first} (transferred) vs \
             retrained (token accuracy, %)"
        ),
        "setting",
        &[
            "Reliability transferred",
            "Reliability retrained",
            "Locality transferred",
            "Locality retrained",
            "Generality transferred",
            "Generality retrained",
            "Specificity transferred",
            "Specificity retrained",
        ],
    );
    for pair in results.chunks(2) {
        let values = (0..4)
            .flat_map(|i| [pair[0].scores[i], pair[1].scores[i]])
            .collect();
        table.push(&pair[0].setting, values);
    }
    let details = serde_json::json!({ "preset": preset, "results": results });
    table.write(out, "mscke-table3", &details)?;
    Ok((table, results))
}
