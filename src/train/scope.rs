//! Training a scope classifier with binary cross-entropy on (edit, query) pairs (MSCKE
//! eq. 9-11). Each batch is half in-scope, half out-of-scope pairs; within a label the kind of
//! pair (rephrase, hard in-scope, near, locality, ...) is drawn uniformly so rare hard pairs
//! are seen as often as easy ones. Step `s` draws from its own random stream, so a resumed run
//! sees exactly the batches an uninterrupted one would.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use crate::data::batch::ScopeBatcher;
use crate::data::pairs::pairs;
use crate::data::pairs::{PairKind, ScopePair};
use crate::error::{Error, Result, write_atomic};
use crate::eval::scope::ScopeReport;
use crate::eval::scope::evaluate;
use crate::model::clip::Clip;
use crate::model::objects::AttributeProbe;
use crate::model::scope::ScopeConfig;
use crate::model::scope::saved::{ScopeRun, object_words};
use crate::model::scope::{ScopeClassifier, bce};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeTrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Keep CLIP's weights fixed and train only alignment and fusion.
    #[serde(default)]
    pub freeze_clip: bool,
    /// Keep CLIP's vision tower (and the attribute probe) fixed but fine-tune its text
    /// encoder: z's text half must learn what a question asks, which frozen caption features
    /// do not say, while the cells the attention compares stay the pre-trained ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_vision: bool,
    /// Learning rate of CLIP's weights when fine-tuned (default: `lr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_lr: Option<f64>,
    pub validate_every: usize,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Weight of [`attention_loss`] (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attention_weight: f64,
    /// The share of the training edits (the last ones) held out for validation.
    #[serde(
        default = "default_held_out",
        skip_serializing_if = "is_default_held_out"
    )]
    pub held_out: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn default_held_out() -> f64 {
    0.1
}

fn is_default_held_out(x: &f64) -> bool {
    *x == default_held_out()
}

/// How many of `n` training edits `held_out` holds out (rounded down).
pub fn held_out_count(n: usize, held_out: f64) -> usize {
    // The epsilon keeps 10 x 0.1 at 1, not 0.9999...
    ((n as f64 * held_out) + 1e-9).floor() as usize
}

/// Cross-entropy of the fusion's attention logits (`[batch, 1 + cells]`, class token first,
/// or `[batch, cells]` from an object readout) against the cell each row's text refers to,
/// mean over the rows that have one (`cells`).
/// Grounding supervision from the scenes' scene graphs, for training only: the attention
/// learns to point at the object before z compares it.
pub fn attention_loss(logits: Tensor<2>, cells: &[Option<u8>]) -> Option<Tensor<1>> {
    // The 3x3 layout's cells, after the class token where there is one.
    let offset = match logits.dims()[1] {
        9 => 0,
        10 => 1,
        _ => return None,
    };
    let (rows, targets): (Vec<i64>, Vec<i64>) = cells
        .iter()
        .enumerate()
        .filter_map(|(row, cell)| cell.map(|c| (row as i64, offset + c as i64)))
        .unzip();
    if rows.is_empty() {
        return None;
    }
    let device = logits.device();
    let n = rows.len();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
    let ce = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
    Some(ce.forward(logits.select(0, rows), targets))
}

/// Pairs grouped by label and kind, for stratified sampling.
struct Strata<'a> {
    by_label: [Vec<Vec<&'a ScopePair>>; 2],
}

impl<'a> Strata<'a> {
    fn new(pairs: &'a [ScopePair]) -> Self {
        let mut groups: BTreeMap<PairKind, Vec<&ScopePair>> = BTreeMap::new();
        for pair in pairs {
            groups.entry(pair.kind).or_default().push(pair);
        }
        let mut by_label: [Vec<Vec<&ScopePair>>; 2] = Default::default();
        for (kind, group) in groups {
            by_label[kind.in_scope() as usize].push(group);
        }
        Self { by_label }
    }

    fn sample(&self, n: usize, rng: &mut impl Rng) -> Vec<&'a ScopePair> {
        (0..n)
            .filter_map(|i| {
                let kinds = &self.by_label[i % 2];
                kinds
                    .choose(rng)
                    .and_then(|group| group.choose(rng).copied())
            })
            .collect()
    }
}

/// Trains `model` (on an autodiff device) and returns it with its last validation report
/// (none when `valid` is empty or the run had already finished). With `resume`, continues
/// from the checkpoint in `dir` if there is one.
pub fn train(
    model: ScopeClassifier,
    train: &[ScopePair],
    valid: &[ScopePair],
    batcher: &ScopeBatcher,
    config: &ScopeTrainConfig,
    dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<(ScopeClassifier, Option<ScopeReport>)> {
    train_initialising(
        model, train, valid, batcher, config, dir, resume, None, device,
    )
}

/// [`train`], releasing `initialising` (held since the device was seeded for `model`) once
/// every parameter has its initial values.
#[allow(clippy::too_many_arguments)]
fn train_initialising(
    mut model: ScopeClassifier,
    train: &[ScopePair],
    valid: &[ScopePair],
    batcher: &ScopeBatcher,
    config: &ScopeTrainConfig,
    dir: &Path,
    resume: bool,
    initialising: Option<std::sync::MutexGuard<'static, ()>>,
    device: &Device,
) -> Result<(ScopeClassifier, Option<ScopeReport>)> {
    if config.freeze_clip {
        model.clip = model.clip.no_grad();
    }
    if config.freeze_clip || config.freeze_vision {
        model.clip.vision_model = model.clip.vision_model.no_grad();
        model.clip.visual_projection = model.clip.visual_projection.no_grad();
        model.attribute_probe = model.attribute_probe.map(|p| p.no_grad());
    }
    let mut optim = AdamConfig::new().init();
    let mut state = TrainState::default();
    if resume && let Some((m, o, s)) = checkpoint::load(dir, model.clone(), optim.clone())? {
        (model, optim, state) = (m, o, s);
        eprintln!("resuming {} at step {}", dir.display(), state.step);
    }
    let strata = Strata::new(train);
    let progress = super::progress_bar(config.steps, state.step);
    let mut recent_loss = Vec::new();
    let mut last_report = None;
    // Step `step`'s pairs and the loss on them.
    let batch_of = |step: usize| {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(step as u64);
        strata.sample(config.batch_size, &mut rng)
    };
    let loss_of = |model: &ScopeClassifier, batch: &[&ScopePair], device: &Device| {
        let edits = batcher.edits(batch, device)?;
        let queries = batcher.queries(batch, device)?;
        let labels = ScopeBatcher::labels(batch, device);
        let (z_e, edit_attention) = model.encode_with_attention(&edits);
        let (z, query_attention) = model.encode_with_attention(&queries);
        let log_rho = model.log_similarity(z_e, z);
        let mut loss = bce(log_rho, labels);
        if config.attention_weight > 0.0 {
            let edit_cells: Vec<Option<u8>> = batch.iter().map(|p| p.edit_cell).collect();
            let query_cells: Vec<Option<u8>> = batch
                .iter()
                .map(|p| p.query_cell.filter(|_| p.query_image.is_some()))
                .collect();
            for (logits, cells) in [(edit_attention, edit_cells), (query_attention, query_cells)] {
                if let Some(term) = logits.and_then(|l| attention_loss(l, &cells)) {
                    loss = loss + term * config.attention_weight;
                }
            }
        }
        Ok::<_, crate::Error>(loss)
    };
    if initialising.is_some() && state.step < config.steps {
        let first = batch_of(state.step);
        model = super::draw_as_on_flex(model, device, |model, host| {
            loss_of(model, &first, host).map(drop)
        })?;
    }
    // Every parameter has its initial values: trainings beside may draw theirs.
    drop(initialising);
    while state.step < config.steps {
        let batch = batch_of(state.step);
        let loss = loss_of(&model, &batch, device)?;
        recent_loss.push(loss.clone().into_scalar::<f32>() as f64);
        let mut grads = loss.backward();
        if let Some(clip_lr) = config.clip_lr.filter(|_| !config.freeze_clip) {
            let clip_grads = GradientsParams::from_module(&mut grads, &model.clip);
            model = optim.step(clip_lr, model, clip_grads);
        }
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(config.lr, model, grads);
        state.step += 1;
        progress.inc(1);

        let validate = state.step % config.validate_every == 0 || state.step == config.steps;
        if validate && !valid.is_empty() {
            let mean = recent_loss.iter().sum::<f64>() / recent_loss.len().max(1) as f64;
            recent_loss.clear();
            let report = evaluate(
                &model.valid(),
                valid,
                batcher,
                &device.clone().without_autodiff(),
            )?;
            let message = format!(
                "loss {mean:.4}  valid acc {:.3}  hard-in {:.3}  hard-out {:.3}",
                report.overall.accuracy,
                report.kind_accuracy(PairKind::HardInScope),
                report.kind_accuracy(PairKind::HardOutOfScope),
            );
            progress.suspend(|| eprintln!("step {}: {message}", state.step));
            progress.set_message(message);
            last_report = Some(report);
        }
        if state.step % config.checkpoint_every == 0 || state.step == config.steps {
            checkpoint::save(dir, &model, &optim, &state)?;
        }
    }
    progress.finish();
    Ok((model, last_report))
}

/// A training run's configuration (`configs/scope-*.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeRunConfig {
    pub model: ScopeConfig,
    pub train: ScopeTrainConfig,
}

impl ScopeRunConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// Trains a scope classifier from the CLIP in `clip_dir` on `data_dir/train.json` (the last
/// `train.held_out` of its records held out for validation) and writes the run to `out`.
pub fn run(
    config: &ScopeRunConfig,
    clip_dir: &Path,
    data_dir: &Path,
    out: &Path,
    resume: bool,
    device: &Device,
) -> Result<ScopeReport> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let run_toml = toml::to_string(config).expect("a run config serializes");
    write_atomic(&out.join("run.toml"), run_toml.as_bytes())?;

    let records = crate::data::read_edits(&data_dir.join("train.json"), data_dir)?.records;
    let held_out = records.len() - held_out_count(records.len(), config.train.held_out);
    let train_pairs: Vec<ScopePair> = records[..held_out].iter().flat_map(pairs).collect();
    let valid_pairs: Vec<ScopePair> = records[held_out..].iter().flat_map(pairs).collect();

    let clip = Clip::load(clip_dir, device)?;
    let all: Vec<ScopePair> = train_pairs.iter().chain(&valid_pairs).cloned().collect();
    let words = object_words(&config.model, &clip.tokenizer, clip_dir)?;
    let batcher = ScopeBatcher::new(clip.tokenizer, clip.preprocessor.clone(), &all)?;
    let initialising = super::seeded(device, config.train.seed);
    let init = super::init_device(device);
    let clip_model = clip.model.fork(&init);
    let mut model = ScopeClassifier::new(&config.model, clip_model, &clip.config, &init)
        .with_object_words(words);
    if model.attribute_probe.is_some() {
        let path = clip_dir.join(crate::model::objects::PROBE_FILE);
        let probe = AttributeProbe::new(clip.config.projection_dim, &init)
            .try_load_file(&path)
            .map_err(|e| Error::Weights {
                path: path.clone(),
                reason: format!("an object readout needs the CLIP's attribute probe: {e}"),
            })?;
        model.attribute_probe = Some(probe);
    }
    let (model, report) = train_initialising(
        model,
        &train_pairs,
        &valid_pairs,
        &batcher,
        &config.train,
        out,
        resume,
        Some(initialising),
        device,
    )?;
    let model = model.valid();

    let clip_out = out.join("clip");
    model.clip.save_pretrained(&clip.config, &clip_out)?;
    for file in ["tokenizer.json", "preprocessor_config.json"] {
        let bytes =
            std::fs::read(clip_dir.join(file)).map_err(|e| Error::io(&clip_dir.join(file), e))?;
        write_atomic(&clip_out.join(file), &bytes)?;
    }
    crate::error::save_module(&model, &out.join("model.bpk"))?;
    match report {
        Some(report) => Ok(report),
        None => evaluate(
            &model,
            &valid_pairs,
            &batcher,
            &device.clone().without_autodiff(),
        ),
    }
}

/// Evaluates the trained run (or export) in `checkpoint` on every pair of `data` (images under
/// `image_root`) and writes the report next to it as `eval-{data stem}.json`.
pub fn evaluate_run(
    checkpoint: &Path,
    data: &Path,
    image_root: &Path,
    device: &Device,
) -> Result<ScopeReport> {
    let mut run = ScopeRun::load(checkpoint, device)?;
    let pairs = crate::data::pairs::read_pairs(data, image_root)?;
    let batcher = run.batcher(&pairs)?;
    let report = crate::eval::scope::evaluate(&run.model, &pairs, &batcher, device)?;
    let stem = data
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    let out = checkpoint.join(format!("eval-{stem}.json"));
    let json = serde_json::to_string_pretty(&report).expect("a report serializes");
    write_atomic(&out, json.as_bytes())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_out_share_rounds_down_exactly() {
        // The counts a tenth gave before it was a knob.
        for n in [0, 6, 9, 10, 30, 70, 360, 400, 2000, 2001] {
            assert_eq!(held_out_count(n, 0.1), n / 10, "{n}");
        }
        assert_eq!(held_out_count(400, 0.25), 100);
        assert_eq!(held_out_count(400, 0.0), 0);
    }

    #[test]
    fn the_attention_loss_scores_the_cell_after_the_class_token() {
        let device = Device::flex();
        // Row 0 points at token 3 (cell 2), row 1 at token 1 (cell 0); row 2 has no cell.
        let mut flat = vec![0f32; 30];
        flat[3] = 20.0;
        flat[10 + 1] = 20.0;
        let logits = Tensor::<2>::from_data(TensorData::new(flat, [3, 10]), &device);
        let loss = |cells: &[Option<u8>]| {
            attention_loss(logits.clone(), cells)
                .unwrap()
                .into_scalar::<f32>()
        };
        assert!(loss(&[Some(2), Some(0), None]) < 1e-3);
        assert!(loss(&[Some(0), Some(2), None]) > 10.0);
        assert!(attention_loss(logits.clone(), &[None, None, None]).is_none());
        // Not the 3x3 layout's tokens: nothing to supervise.
        let patches = Tensor::<2>::zeros([1, 17], &device);
        assert!(attention_loss(patches, &[Some(1)]).is_none());
    }
}
