//! Training the base VLM with LM cross-entropy on what it should know before any edit: every
//! question about the unedited scene with its answer under S (the scope questions, the edit
//! question and its rephrase with the original answer), the caption of the edit image, the
//! question on another image, and the text-only T-Locality facts. Teacher-forced: the loss and the exact-match score cover the
//! answer tokens and the end token.

use std::path::Path;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use crate::data::image::ImagePreprocessor;
use crate::data::lm::{
    Grounding, LmBatch, LmBatcher, LmExample, counterfactual_examples,
    counterfactual_examples_by_kind, pre_edit_examples,
};
use crate::data::record::EditRecord;
use crate::data::text::TextTokenizer;
use crate::error::Result;
use crate::model::answer::{answer_nll, answer_scores_of, exact_match};
use crate::model::lm::Hooks;
use crate::model::vlm::Vlm;
use crate::model::vlm::save;

/// Which knowledge a VLM is trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knowledge {
    /// The base model: the world before any edit ([`pre_edit_examples`]).
    PreEdit,
    /// The counterfactual model: the world after the edit in its context
    /// ([`counterfactual_examples`]).
    Counterfactual,
}

impl Knowledge {
    pub fn examples(self, record: &EditRecord) -> Vec<LmExample> {
        match self {
            Knowledge::PreEdit => pre_edit_examples(record),
            Knowledge::Counterfactual => counterfactual_examples(record),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlmTrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Every `text_every`-th batch holds text-only examples (when there are any).
    pub text_every: usize,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Keep the (pre-trained) vision tower fixed; only the projector and the LM learn.
    #[serde(default)]
    pub freeze_vision: bool,
    #[serde(default)]
    pub optim: super::OptimConfig,
    /// Counterfactual training: each example whose answer the edit changes is listed this
    /// many times (they are a small minority; 0 or 1: once).
    #[serde(default, skip_serializing_if = "is_default")]
    pub edited_repeat: usize,
    /// Counterfactual training with object words: the model rewrites its object tokens into
    /// the world its edit describes before it answers ([`crate::model::vlm::VlmConfig::rewrite_objects`]).
    #[serde(default, skip_serializing_if = "is_default")]
    pub rewrite_objects: bool,
    /// Weight of [`referent_loss`] (0: none).
    #[serde(default)]
    pub referent_weight: f64,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// The referent loss, on the referent readout's logits over the cells (`[batch, cells]`, one
/// row per example of `batch`) and its match logits (the same less the count threshold): for
/// attribute questions, cross-entropy against the referred cell; for every grounded question,
/// binary cross-entropy of each cell matching (the count token counts the matches). Means
/// over the grounded examples; also the share of referents picked right. Dense supervision
/// from the scene graph, for pre-training only: the model learns to find the objects a
/// question is about before it reads them.
pub fn referent_loss(
    logits: Tensor<2>,
    match_logits: Tensor<2>,
    batch: &LmBatch,
) -> Option<(Tensor<1>, f64)> {
    let [_, cells] = logits.dims();
    let device = logits.device();
    let rows_of = |f: &dyn Fn(&Grounding) -> bool| -> Vec<i64> {
        (0..batch.groundings.len())
            .filter(|&b| batch.groundings[b].as_ref().is_some_and(f))
            .map(|b| b as i64)
            .collect()
    };
    let select = |t: Tensor<2>, rows: &[i64]| {
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(rows.to_vec(), [rows.len()]), &device);
        t.select(0, index)
    };
    let grounded = rows_of(&|_| true);
    if grounded.is_empty() {
        return None;
    }
    let targets: Vec<f32> = grounded
        .iter()
        .flat_map(|&b| {
            batch.groundings[b as usize]
                .as_ref()
                .expect("grounded")
                .targets(cells)
        })
        .collect();
    let targets =
        Tensor::<2>::from_data(TensorData::new(targets, [grounded.len(), cells]), &device);
    let x = select(match_logits, &grounded);
    let bce = -(targets.clone() * burn::tensor::activation::log_sigmoid(x.clone())
        + (targets.neg() + 1.0) * burn::tensor::activation::log_sigmoid(x.neg()))
    .mean();
    let referents = rows_of(&|g| matches!(g, Grounding::Referent(_)));
    if referents.is_empty() {
        return Some((bce, f64::NAN));
    }
    let cells_of: Vec<i64> = referents
        .iter()
        .map(|&b| match &batch.groundings[b as usize] {
            Some(Grounding::Referent(c)) => *c as i64,
            _ => unreachable!("referent rows"),
        })
        .collect();
    let count = cells_of.len();
    let cells_of = Tensor::<1, Int>::from_data(TensorData::new(cells_of, [count]), &device);
    let logits = select(logits, &referents);
    let right = logits
        .clone()
        .detach()
        .argmax(1)
        .reshape([count])
        .equal(cells_of.clone())
        .float()
        .mean()
        .into_scalar::<f32>() as f64;
    let ce = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
    Some((ce.forward(logits, cells_of) + bce, right))
}

/// Trains `model` (on an autodiff device); with `resume`, continues from `dir`'s checkpoint.
/// The parameters `model` has not drawn yet are drawn from the device's generator seeded
/// with `config.seed`.
pub fn train(
    mut model: Vlm,
    examples: &[LmExample],
    batcher: &mut LmBatcher,
    config: &VlmTrainConfig,
    dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<Vlm> {
    if config.freeze_vision {
        model.vision_model = model.vision_model.no_grad();
        model.visual_projection = model.visual_projection.map(|p| p.no_grad());
        model.attribute_probe = model.attribute_probe.map(|p| p.no_grad());
    }
    // Burn draws a parameter's initial values from the device's one generator at the
    // parameter's first use, here in the first step. From seeding until every parameter has
    // its values the lock is held, so trainings on parallel threads draw exactly what each
    // draws alone.
    let initialising = Some(super::seeded(device, config.seed));
    let mut optim = config.optim.init();
    let mut state = TrainState::default();
    if resume && let Some((m, o, s)) = checkpoint::load(dir, model.clone(), optim.clone())? {
        (model, optim, state) = (m, o, s);
        eprintln!("resuming {} at step {}", dir.display(), state.step);
    }
    let (visual, text): (Vec<&LmExample>, Vec<&LmExample>) =
        examples.iter().partition(|e| e.image.is_some());
    let progress = super::progress_bar(config.steps, state.step);
    let mut referent_right = f64::NAN;
    // Step `step`'s examples.
    let chosen_at = |step: usize| -> Vec<&LmExample> {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(step as u64);
        let text_turn =
            !text.is_empty() && (visual.is_empty() || (step + 1) % config.text_every.max(1) == 0);
        let pool = if text_turn { &text } else { &visual };
        (0..config.batch_size)
            .filter_map(|_| pool.choose(&mut rng).copied())
            .collect()
    };
    // The loss on `chosen`, the answers' scores and the referent readout's accuracy.
    let mut loss_of = |model: &Vlm, chosen: &[&LmExample], device: &Device| -> Result<_> {
        let batch = batcher.batch(chosen, device)?;
        let hooks = Hooks::default();
        let out = model.forward(
            batch.pixels.clone(),
            batch.ids.clone(),
            batch.mask.clone(),
            &hooks,
        );
        let mut loss = answer_nll(out.logits.clone(), &batch);
        let answer_loss = loss.clone();
        let right = answer_scores_of(out.logits, &batch);
        let mut referent_share = None;
        if config.referent_weight > 0.0
            && let (Some(logits), Some(readout)) = (&out.referent_logits, &model.referent)
            && let Some((referent, share)) =
                referent_loss(logits.clone(), readout.match_logits(logits.clone()), &batch)
        {
            loss = loss + referent * config.referent_weight;
            referent_share = Some(share);
        }
        Ok((loss, answer_loss, right, referent_share))
    };
    if initialising.is_some() && state.step < config.steps {
        let first = chosen_at(state.step);
        model = super::draw_as_on_flex(model, device, |model, host| {
            loss_of(model, &first, host).map(drop)
        })?;
    }
    // Every parameter has its initial values: trainings beside may draw theirs.
    drop(initialising);
    while state.step < config.steps {
        let chosen = chosen_at(state.step);
        let (loss, answer_loss, right, referent_share) = loss_of(&model, &chosen, device)?;
        let value = answer_loss.into_scalar::<f32>();
        if let Some(share) = referent_share {
            referent_right = share;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = config.optim.lr(config.lr, state.step, config.steps);
        model = optim.step(lr, model, grads);
        state.step += 1;
        progress.inc(1);
        let share = right.iter().filter(|s| s.exact()).count() as f64 / right.len().max(1) as f64;
        let message =
            format!("loss {value:.4}  batch exact match {share:.2}  referent {referent_right:.2}");
        progress.set_message(message.clone());
        if state.step % config.checkpoint_every == 0 || state.step == config.steps {
            checkpoint::save(dir, &model, &optim, &state)?;
            let name = dir.display();
            progress.suspend(|| eprintln!("{name}: step {}: {message}", state.step));
        }
    }
    progress.finish();
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::lm::tests::scenes_tokenizer;

    #[test]
    fn the_referent_loss_rewards_the_referred_cell_and_the_matches() {
        let device = Device::flex();
        let example = |grounding| LmExample {
            image: None,
            prompt: "q".into(),
            answer: "a".into(),
            grounding,
        };
        let examples = [
            example(Some(Grounding::Referent(1))),
            example(Some(Grounding::Matches(vec![0, 2]))),
            example(None),
        ];
        let (_dir, tokenizer) = scenes_tokenizer();
        let mut batcher = LmBatcher::new(tokenizer, ImagePreprocessor::clip(16), 2, 3);
        let batch = batcher
            .batch(&examples.iter().collect::<Vec<_>>(), &device)
            .unwrap();
        let logits = |rows: [[f32; 3]; 3]| {
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            Tensor::<2>::from_data(TensorData::new(flat, [3, 3]), &device)
        };
        // Right: cell 1 for the referent, cells 0 and 2 matching (and the ungrounded row
        // wrong, which must not count).
        let right = logits([[-5., 5., -5.], [5., -5., 5.], [5., 5., 5.]]);
        let wrong = logits([[5., -5., -5.], [-5., 5., -5.], [-5., -5., -5.]]);
        let (good, share) = referent_loss(right.clone(), right, &batch).unwrap();
        let (bad, bad_share) = referent_loss(wrong.clone(), wrong, &batch).unwrap();
        assert_eq!((share, bad_share), (1.0, 0.0));
        let (good, bad) = (good.into_scalar::<f32>(), bad.into_scalar::<f32>());
        assert!(good < 0.05 && bad > 5.0, "{good} {bad}");
        // Nothing grounded: no loss.
        let plain = batcher.batch(&[&examples[2]], &device).unwrap();
        let one = Tensor::<2>::zeros([1, 3], &device);
        assert!(referent_loss(one.clone(), one, &plain).is_none());
    }
}

/// Trains preset `preset` on `knowledge` of `data_dir/train.json` (scenes or FGVEdit schema,
/// with its `tokenizer.json`), the vision tower optionally initialised from the CLIP in
/// `clip_dir`; writes the model to `out` and returns the teacher-forced exact match on the
/// same knowledge of `data_dir/test.json`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    knowledge: Knowledge,
    preset: &str,
    image_size: usize,
    clip_dir: Option<&Path>,
    data_dir: &Path,
    config: &VlmTrainConfig,
    out: &Path,
    resume: bool,
    device: &Device,
) -> Result<f64> {
    use crate::model::vlm::VlmConfig;
    let tokenizer_path = data_dir.join("tokenizer.json");
    let tokenizer = TextTokenizer::from_file(&tokenizer_path, 256, 0)?;
    let vocab = tokenizer.inner().get_vocab_size(true);
    let vlm_config =
        VlmConfig::preset(preset, vocab, image_size).ok_or_else(|| crate::Error::Config {
            path: out.to_path_buf(),
            reason: format!("unknown VLM preset '{preset}': expected vlm-tiny, vlm-small, vlm-tiny-objects or vlm-small-objects"),
        })?;
    let mut words = crate::model::objects::scenes_object_words(&tokenizer);
    // The counterfactual model reads the edit in its context apart from the query.
    if knowledge == Knowledge::Counterfactual
        && let Some(words) = &mut words
    {
        words.separators = [">>", "||"]
            .iter()
            .filter_map(|s| tokenizer.inner().token_to_id(s))
            .collect();
    }
    let mut vlm_config = vlm_config.with_object_words(words);
    vlm_config.rewrite_objects = config.rewrite_objects
        && knowledge == Knowledge::Counterfactual
        && vlm_config.object_words.is_some();
    let read = |name: &str| -> Result<Vec<LmExample>> {
        let file = data_dir.join(name);
        Ok(crate::data::fgvedit::read(&file, data_dir)?
            .records
            .iter()
            .flat_map(|r| knowledge.examples(r))
            .collect())
    };
    let train_examples = match knowledge {
        Knowledge::Counterfactual if config.edited_repeat > 1 => {
            let file = data_dir.join("train.json");
            crate::data::fgvedit::read(&file, data_dir)?
                .records
                .iter()
                .flat_map(counterfactual_examples_by_kind)
                .flat_map(|(example, kind)| {
                    let times = if kind.in_scope() {
                        config.edited_repeat
                    } else {
                        1
                    };
                    std::iter::repeat_n(example, times)
                })
                .collect()
        }
        _ => read("train.json")?,
    };
    let test_examples = read("test.json")?;
    let lm = &vlm_config.lm;
    let mut batcher = LmBatcher::new(
        tokenizer,
        ImagePreprocessor::clip(image_size as u32),
        lm.bos_token_id,
        lm.eos_token_id,
    )
    .with_prefix_lm(vlm_config.prefix_lm);
    // The preset sizes the LM; a given CLIP brings its own vision tower (two base models may
    // share one, as BLIP-2 and MiniGPT-4 share their ViT).
    let clip = clip_dir
        .map(|dir| crate::model::clip::Clip::load(dir, device))
        .transpose()?;
    if let (Some(dir), Some(clip)) = (clip_dir, &clip) {
        if clip.config.vision_config.image_size != image_size {
            return Err(crate::Error::Config {
                path: dir.join("config.json"),
                reason: format!(
                    "its vision tower reads {} px images, not {image_size}",
                    clip.config.vision_config.image_size
                ),
            });
        }
        vlm_config.vision = clip.config.vision_config.clone();
    }
    let mut model = Vlm::new(&vlm_config, device);
    if let (Some(dir), Some(clip)) = (clip_dir, clip) {
        model.vision_model = clip.model.vision_model;
        if vlm_config.object_tokens {
            let probe_path = dir.join(crate::model::objects::PROBE_FILE);
            let probe = crate::model::objects::AttributeProbe::new(
                vlm_config.vision.projection_dim,
                device,
            )
            .try_load_file(&probe_path)
            .map_err(|e| crate::Error::Weights {
                path: probe_path.clone(),
                reason: format!("object tokens need the CLIP's attribute probe: {e}"),
            })?;
            model.visual_projection = Some(clip.model.visual_projection);
            model.attribute_probe = Some(probe);
        }
    }
    let model = train(
        model,
        &train_examples,
        &mut batcher,
        config,
        out,
        resume,
        device,
    )?;
    let model = model.valid();
    save(&model, &vlm_config, &tokenizer_path, out)?;
    let plain = device.clone().without_autodiff();
    exact_match(&model, &test_examples, &mut batcher, 64, &plain)
}
