//! MSCKE Table 1: Reliability, Locality, Generality and Specificity of FT-LLM, FT-Visual, IKE,
//! SERAC, MEND, MSCKE and MSCKE-MEND, one-step editing on the scenes test split. Trains (or
//! reuses) what the methods need: a CLIP, the text-only and the multimodal scope classifiers,
//! the base VLM, the counterfactual VLM and MEND's networks.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::data::fgvedit;
use crate::data::scenes::ScenesConfig;
use crate::edit::Editor;
use crate::edit::finetune::{FineTuneConfig, FineTuneEditor, Part};
use crate::edit::ike::IkeEditor;
use crate::edit::mend::{Mend, MendConfig, MendEditor};
use crate::edit::serac::{InScope, MemoryEditor};
use crate::edit::speaker::Speaker;
use crate::error::Result;
use crate::eval::editing::{EditMetrics, Score};
use crate::eval::protocol;
use crate::model::scope::{ScopeConfig, ScopeMode};
use crate::report::Table;
use crate::train::clip::ClipTrainConfig;
use crate::train::meta::MetaTrainConfig;
use crate::train::scope::{ScopeRun, ScopeRunConfig, ScopeTrainConfig};
use crate::train::vlm::VlmTrainConfig;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub data: ScenesConfig,
    /// The scenes split the base and counterfactual VLMs learn from, when larger than `data`
    /// (same seed and test count, so its first records and its test split are `data`'s): a
    /// base model knows more of the world than the edits it is evaluated on.
    #[serde(default)]
    pub knowledge: Option<ScenesConfig>,
    pub clip_preset: String,
    pub clip_image_size: usize,
    pub clip: ClipTrainConfig,
    /// The multimodal classifier (MSCKE); SERAC's is the same in text-only mode.
    pub scope_model: ScopeConfig,
    pub scope_train: ScopeTrainConfig,
    pub vlm_preset: String,
    pub vlm: VlmTrainConfig,
    pub counterfactual_preset: String,
    pub counterfactual: VlmTrainConfig,
    pub finetune_steps: usize,
    pub finetune_lr: f64,
    pub ike_demonstrations: usize,
    pub mend: MendConfig,
    pub mend_train: MetaTrainConfig,
    /// Table 3's second base model.
    pub transfer: super::mscke_table3::Transfer,
    /// Test records evaluated (the first ones).
    pub eval_records: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub method: String,
    pub metrics: EditMetrics,
    pub specificity: Score,
    pub seconds: f64,
}

/// Trains what is missing under `out`, evaluates every method and writes
/// `mscke-table1.{md,csv,json,png}`. Values in the table are token accuracy in %; the JSON
/// has exact match too.
pub fn run(
    preset: &Preset,
    data: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<(Table, Vec<MethodResult>)> {
    let data_dir = prepare(preset, data, out, device)?;
    let train_device = device.clone().autodiff();
    let mend_dir = out.join("mend");
    let mut records = fgvedit::read(&data_dir.join("test.json"), &data_dir)?.records;
    records.truncate(preset.eval_records);
    let pool = fgvedit::read(&data_dir.join("train.json"), &data_dir)?.records;

    let memory_editor = |scope: &str| -> Result<MemoryEditor> {
        let mut run = ScopeRun::load(&out.join(scope), device)?;
        let batcher = run.batcher(&[])?;
        Ok(MemoryEditor::new(
            run.model,
            batcher,
            Speaker::load(&out.join("vlm"), device)?,
            Speaker::load(&out.join("counterfactual"), device)?,
            device,
        ))
    };
    let mend = || -> Result<MendEditor> {
        let speaker = Speaker::load(&out.join("vlm"), &train_device)?;
        let (net, _) = crate::edit::mend::load::<Mend>(&mend_dir, &speaker.model, &train_device)?;
        Ok(MendEditor::new(speaker, net, &train_device))
    };
    let mscke_mend = || -> Result<MemoryEditor> {
        let mut run = ScopeRun::load(&out.join("scope-multimodal"), device)?;
        let batcher = run.batcher(&[])?;
        let in_scope = InScope::Mend {
            editor: Box::new(mend()?),
            applied: None,
        };
        Ok(MemoryEditor::with(
            run.model,
            batcher,
            Speaker::load(&out.join("vlm"), device)?,
            in_scope,
            device,
        ))
    };
    let finetune = |part| -> Result<FineTuneEditor> {
        let config = FineTuneConfig {
            part,
            steps: preset.finetune_steps,
            lr: preset.finetune_lr,
        };
        let speaker = Speaker::load(&out.join("vlm"), &train_device)?;
        Ok(FineTuneEditor::new(speaker, config, &train_device))
    };
    let mut methods: Vec<(&str, Box<dyn Editor>)> = vec![
        ("FT-LLM", Box::new(finetune(Part::LastLmLayer)?)),
        ("FT-Visual", Box::new(finetune(Part::Visual)?)),
        (
            "IKE",
            Box::new(IkeEditor::new(
                Speaker::load(&out.join("vlm"), device)?,
                &pool,
                preset.ike_demonstrations,
                device,
            )),
        ),
        ("SERAC", Box::new(memory_editor("scope-text")?)),
        ("MEND", Box::new(mend()?)),
        ("MSCKE", Box::new(memory_editor("scope-multimodal")?)),
        ("MSCKE-MEND", Box::new(mscke_mend()?)),
    ];
    let mut results = Vec::new();
    for (name, editor) in &mut methods {
        eprintln!("evaluating {name} on {} edits", records.len());
        let start = Instant::now();
        let metrics = protocol::one_step(editor.as_mut(), &records)?;
        results.push(MethodResult {
            method: name.to_string(),
            specificity: metrics.specificity(),
            metrics,
            seconds: start.elapsed().as_secs_f64(),
        });
    }

    let mut table = Table::new(
        "MSCKE Table 1 on scenes (token accuracy, %)",
        "method",
        &["Reliability", "Locality", "Generality", "Specificity"],
    );
    for r in &results {
        let m = &r.metrics;
        table.push(
            &r.method,
            [m.reliability, m.t_locality, m.t_generality, r.specificity]
                .iter()
                .map(|s| 100.0 * s.token_accuracy)
                .collect(),
        );
    }
    let details = serde_json::json!({ "preset": preset, "data": data_dir, "methods": results });
    table.write(out, "mscke-table1", &details)?;
    Ok((table, results))
}

/// Trains what is missing under `out` (CLIP, both scope classifiers, the base and the
/// counterfactual VLM, MEND) and returns the data directory. Shared with `mscke-table4`.
pub fn prepare(
    preset: &Preset,
    data: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<PathBuf> {
    let data_dir = super::data_dir(out, data, &preset.data)?;

    let train_device = device.clone().autodiff();
    let clip_dir = super::pretrained_clip(
        out,
        &preset.clip_preset,
        preset.clip_image_size,
        &preset.clip,
        &train_device,
    )?;
    // The two classifiers train side by side, each exactly as it would alone.
    let classifiers = [
        ("scope-text", ScopeMode::TextOnly),
        ("scope-multimodal", ScopeMode::Multimodal),
    ]
    .map(|(name, mode)| {
        let config = ScopeRunConfig {
            model: ScopeConfig {
                mode,
                ..preset.scope_model.clone()
            },
            train: preset.scope_train.clone(),
        };
        (name, config)
    });
    std::thread::scope(|scope| {
        let trainings = classifiers.each_ref().map(|(name, config)| {
            let (clip_dir, data_dir, train_device) = (&clip_dir, &data_dir, &train_device);
            scope.spawn(move || {
                super::trained_scope(out, name, config, clip_dir, data_dir, train_device)
            })
        });
        trainings.into_iter().try_for_each(|t| {
            t.join()
                .expect("a classifier training thread panicked")
                .map(drop)
        })
    })?;
    super::trained_vlms(
        out,
        out,
        data,
        &preset.data,
        preset.knowledge.as_ref(),
        &data_dir,
        &clip_dir,
        preset.clip_image_size,
        super::VlmSpec {
            preset: &preset.vlm_preset,
            train: &preset.vlm,
        },
        super::VlmSpec {
            preset: &preset.counterfactual_preset,
            train: &preset.counterfactual,
        },
        &train_device,
    )?;

    super::trained_hypernet::<Mend>(
        out,
        &preset.mend,
        &preset.mend_train,
        &data_dir,
        &train_device,
    )?;
    Ok(data_dir)
}
