//! Training the base VLM with LM cross-entropy on what it should know before any edit: every
//! question about the unedited scene with its answer under S (the scope questions, the edit
//! question and its rephrase with the original answer), the caption of the edit image, the
//! question on another image, and the text-only T-Locality facts. Teacher-forced: the loss and the exact-match score cover the
//! answer tokens and the end token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use crate::data::image::ImagePreprocessor;
use crate::data::pairs::PairKind;
use crate::data::record::EditRecord;
use crate::data::text::TextTokenizer;
use crate::error::Result;
use crate::model::lm::Hooks;
use crate::model::vlm::Vlm;

/// A prompt and the answer the model should give, on an image or on text alone.
#[derive(Clone, Debug, PartialEq)]
pub struct LmExample {
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub answer: String,
    /// Which cells the prompt is about, when the data says (scenes scope questions): the
    /// target of the [`referent_loss`] while pre-training.
    pub grounding: Option<Grounding>,
}

/// The cells a question is about (cells in reading order, 0-8).
#[derive(Clone, Debug, PartialEq)]
pub enum Grounding {
    /// The one object an attribute question's expression refers to.
    Referent(u8),
    /// The objects a count or existence question picks out (possibly none).
    Matches(Vec<u8>),
}

impl Grounding {
    /// A scope question's grounding on the unedited image.
    pub fn of(query: &crate::data::record::ScopeQuery) -> Option<Self> {
        match (query.cell, &query.matches) {
            (Some(cell), _) => Some(Grounding::Referent(cell)),
            (None, Some(cells)) => Some(Grounding::Matches(cells.clone())),
            (None, None) => None,
        }
    }

    /// A scope question's grounding in the world `record`'s edit describes: a moved object is
    /// where the edit put it; an edit changes one object, so a count or existence answer that
    /// changes means the edited cell joined or left the matches. `None` without the edited
    /// cell (not a scenes record).
    pub fn after_edit(
        query: &crate::data::record::ScopeQuery,
        record: &crate::data::record::EditRecord,
    ) -> Option<Self> {
        let edited = record.edit_cell?;
        let moved = |c: u8| match record.moved_to {
            Some(to) if c == edited => to,
            _ => c,
        };
        match Self::of(query)? {
            Grounding::Referent(c) => Some(Grounding::Referent(moved(c))),
            Grounding::Matches(cells) => {
                let mut cells: Vec<u8> = cells.into_iter().map(moved).collect();
                if record.moved_to.is_none() && query.answer_before != query.answer_after {
                    match cells.iter().position(|&c| c == edited) {
                        Some(i) => {
                            cells.remove(i);
                        }
                        None => cells.push(edited),
                    }
                }
                Some(Grounding::Matches(cells))
            }
        }
    }

    /// Per cell of `cells`, 1 where the question is about it.
    fn targets(&self, cells: usize) -> Vec<f32> {
        let mut out = vec![0.0; cells];
        match self {
            Grounding::Referent(c) => out[*c as usize] = 1.0,
            Grounding::Matches(cs) => cs.iter().for_each(|&c| out[c as usize] = 1.0),
        }
        out
    }
}

/// What the unedited model should answer about `record`: everything true of S.
pub fn pre_edit_examples(record: &EditRecord) -> Vec<LmExample> {
    let on = |image: &Path, prompt: &str, answer: &str| LmExample {
        image: Some(image.to_path_buf()),
        prompt: prompt.to_string(),
        answer: answer.to_string(),
        grounding: None,
    };
    let mut out: Vec<LmExample> = record
        .scope
        .iter()
        .map(|q| LmExample {
            grounding: Grounding::of(q),
            ..on(&record.image, &q.prompt, &q.answer_before)
        })
        .collect();
    if let Some(original) = &record.original {
        out.push(on(&record.image, &record.prompt, original));
        if let Some(rephrase) = &record.rephrase {
            out.push(on(&record.image, rephrase, original));
        }
    }
    if record.scope.is_empty()
        && let Some(q) = &record.fg_loc
    {
        out.push(on(&q.image, &q.prompt, &q.answer));
    }
    if let Some(q) = &record.m_loc {
        out.push(on(&q.image, &q.prompt, &q.answer));
    }
    if let Some(caption) = &record.caption {
        out.push(on(&record.image, &caption.prompt, &caption.before));
    }
    if let Some(q) = &record.loc {
        out.push(LmExample {
            image: None,
            prompt: q.prompt.clone(),
            answer: q.answer.clone(),
            grounding: None,
        });
    }
    out
}

/// The edit as the counterfactual model reads it before the query (`{src} >> {alt} || `, as
/// in the reference implementation).
pub fn edit_context(record: &EditRecord) -> String {
    format!("{} >> {} || ", record.prompt, record.target)
}

/// What the counterfactual model should answer about `record`: every question on the edit
/// image as under S' (in-scope ones with their new answer, the rest unchanged), the edit
/// question, its rephrase and the rephrased image with the target, each after the edit
/// context; and the same for the captioning edit of the change, when the record has one.
pub fn counterfactual_examples(record: &EditRecord) -> Vec<LmExample> {
    counterfactual_examples_by_kind(record)
        .into_iter()
        .map(|(example, _)| example)
        .collect()
}

/// [`counterfactual_examples`], each with the kind of question it is about the edit (the
/// scope classifier's pair kinds; the caption edit's are `edit`, `rephrase` and
/// `image-rephrase`). `kind.in_scope()`: the edit changes the answer.
pub fn counterfactual_examples_by_kind(record: &EditRecord) -> Vec<(LmExample, PairKind)> {
    let context = edit_context(record);
    let on = |image: &Path, prompt: &str, answer: &str| LmExample {
        image: Some(image.to_path_buf()),
        prompt: format!("{context}{prompt}"),
        answer: answer.to_string(),
        grounding: None,
    };
    let mut out = vec![(
        on(&record.image, &record.prompt, &record.target),
        PairKind::Edit,
    )];
    if let Some(rephrase) = &record.rephrase {
        out.push((
            on(&record.image, rephrase, &record.target),
            PairKind::Rephrase,
        ));
    }
    if let Some(image) = &record.image_rephrase {
        out.push((
            on(image, &record.prompt, &record.target),
            PairKind::ImageRephrase,
        ));
    }
    // Only the referent is supervised: with the count and existence questions' matches too,
    // existence questions fell from 96-99% to 51-76% (quick split, 800 steps).
    out.extend(record.scope.iter().map(|q| {
        let example = LmExample {
            grounding: Grounding::after_edit(q, record)
                .filter(|g| matches!(g, Grounding::Referent(_))),
            ..on(&record.image, &q.prompt, &q.answer_after)
        };
        (example, PairKind::of_scope_query(q))
    }));
    if record.scope.is_empty() {
        for (q, kind) in record
            .fg_gen
            .iter()
            .map(|q| (q, PairKind::HardInScope))
            .chain(record.fg_loc.iter().map(|q| (q, PairKind::HardOutOfScope)))
        {
            out.push((on(&q.image, &q.prompt, &q.answer), kind));
        }
    }
    // The captioning edit of the same change, read the same way.
    if let Some(caption) = record.caption_edit() {
        let context = edit_context(&caption);
        let mut queries = vec![(
            caption.image.clone(),
            caption.prompt.clone(),
            PairKind::Edit,
        )];
        queries.extend(
            caption
                .rephrase
                .iter()
                .map(|r| (caption.image.clone(), r.clone(), PairKind::Rephrase)),
        );
        queries.extend(
            caption
                .image_rephrase
                .iter()
                .map(|i| (i.clone(), caption.prompt.clone(), PairKind::ImageRephrase)),
        );
        out.extend(queries.into_iter().map(|(image, prompt, kind)| {
            let example = LmExample {
                image: Some(image),
                prompt: format!("{context}{prompt}"),
                answer: caption.target.clone(),
                grounding: None,
            };
            (example, kind)
        }));
    }
    out
}

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

/// Examples as tensors: `[BOS] prompt answer [EOS]`, right-padded, and per position the
/// token it should predict (the next one) where that token is part of the answer or the end.
pub struct LmBatch {
    pub pixels: Option<Tensor<4>>,
    pub ids: Tensor<2, Int>,
    pub mask: Tensor<2, Int>,
    /// `[batch, seq]`: the next token at answer positions, 0 elsewhere.
    pub targets: Tensor<2, Int>,
    /// `[batch, seq]`: 1 at answer positions.
    pub weights: Tensor<2>,
    /// Per example, the positions whose predictions are scored (the answer's tokens and the
    /// end token are predicted there).
    pub spans: Vec<std::ops::Range<usize>>,
    /// Per example, [`LmExample::grounding`].
    pub groundings: Vec<Option<Grounding>>,
}

/// Tokenizes examples and keeps preprocessed images in memory.
pub struct LmBatcher {
    tokenizer: TextTokenizer,
    preprocessor: ImagePreprocessor,
    images: HashMap<PathBuf, Vec<f32>>,
    bos: i64,
    eos: i64,
    /// Mark the BOS and prompt tokens as the bidirectional prefix (mask value 2) for a
    /// prefix-LM VLM.
    prefix_lm: bool,
}

impl LmBatcher {
    pub fn new(
        tokenizer: TextTokenizer,
        preprocessor: ImagePreprocessor,
        bos: u32,
        eos: u32,
    ) -> Self {
        Self {
            tokenizer,
            preprocessor,
            images: HashMap::new(),
            bos: bos as i64,
            eos: eos as i64,
            prefix_lm: false,
        }
    }

    /// Batches for a prefix-LM model ([`crate::model::vlm::VlmConfig::prefix_lm`]).
    pub fn with_prefix_lm(mut self, prefix_lm: bool) -> Self {
        self.prefix_lm = prefix_lm;
        self
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn bos(&self) -> u32 {
        self.bos as u32
    }

    pub fn eos(&self) -> u32 {
        self.eos as u32
    }

    /// The preprocessed images, `[n, 3, h, w]` (each loaded once, then kept).
    pub fn pixels(&mut self, paths: &[&Path], device: &Device) -> Result<Tensor<4>> {
        let mut flat = Vec::new();
        for &path in paths {
            if !self.images.contains_key(path) {
                let pixels = self.preprocessor.load(path)?;
                self.images.insert(path.to_path_buf(), pixels);
            }
            flat.extend_from_slice(&self.images[path]);
        }
        let (h, w) = self.preprocessor.crop.ok_or_else(|| crate::Error::Config {
            path: paths.first().map(|p| p.to_path_buf()).unwrap_or_default(),
            reason: "VLM batches need one image size: the preprocessor must center-crop".into(),
        })?;
        let shape = [paths.len(), 3, h as usize, w as usize];
        Ok(Tensor::from_data(TensorData::new(flat, shape), device))
    }

    /// All examples must either have an image or not.
    pub fn batch(&mut self, examples: &[&LmExample], device: &Device) -> Result<LmBatch> {
        let with_image = examples.first().is_some_and(|e| e.image.is_some());
        assert!(
            examples.iter().all(|e| e.image.is_some() == with_image),
            "a batch is all image or all text-only examples"
        );
        let mut sequences = Vec::with_capacity(examples.len());
        let mut answer_spans = Vec::with_capacity(examples.len());
        for e in examples {
            let prompt = self.tokenizer.encode(&e.prompt, false)?;
            let answer = self.tokenizer.encode(&e.answer, false)?;
            let mut ids = vec![self.bos];
            ids.extend(prompt);
            let start = ids.len();
            ids.extend(answer);
            ids.push(self.eos);
            answer_spans.push((start, ids.len()));
            sequences.push(ids);
        }
        let n = examples.len();
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![self.tokenizer.pad_id() as i64; n * seq];
        let mut mask = vec![0i64; n * seq];
        let mut targets = vec![0i64; n * seq];
        let mut weights = vec![0f32; n * seq];
        for (b, (tokens, &(start, end))) in sequences.iter().zip(&answer_spans).enumerate() {
            let prefix_mask = if self.prefix_lm { 2 } else { 1 };
            for (t, &id) in tokens.iter().enumerate() {
                ids[b * seq + t] = id;
                mask[b * seq + t] = if t < start { prefix_mask } else { 1 };
            }
            // Position t predicts token t + 1: the answer and the end token.
            for t in start - 1..end - 1 {
                targets[b * seq + t] = tokens[t + 1];
                weights[b * seq + t] = 1.0;
            }
        }
        let pixels = if with_image {
            let paths: Vec<&Path> = examples
                .iter()
                .map(|e| e.image.as_deref().expect("checked above"))
                .collect();
            Some(self.pixels(&paths, device)?)
        } else {
            None
        };
        let int = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [n, seq]), device);
        Ok(LmBatch {
            pixels,
            ids: int(ids),
            mask: int(mask),
            targets: int(targets),
            weights: Tensor::from_data(TensorData::new(weights, [n, seq]), device),
            spans: answer_spans
                .iter()
                .map(|&(start, end)| start - 1..end - 1)
                .collect(),
            groundings: examples.iter().map(|e| e.grounding.clone()).collect(),
        })
    }
}

/// Teacher-forced cross-entropy over the answer positions (mean per answer token), and per
/// example whether every answer token (and the end) is the argmax.
pub fn answer_loss(model: &Vlm, batch: &LmBatch) -> (Tensor<1>, Vec<bool>) {
    answer_loss_with(model, batch, &Hooks::default())
}

/// The teacher-forced cross-entropy of `batch`'s answers under `logits` (`[n, seq, vocab]`):
/// the mean over the weighted positions.
pub fn answer_nll(logits: Tensor<3>, batch: &LmBatch) -> Tensor<1> {
    let [n, seq, _] = logits.dims();
    let log_p = log_softmax(logits, 2)
        .gather(2, batch.targets.clone().reshape([n, seq, 1]))
        .reshape([n, seq]);
    let weights = batch.weights.clone();
    (log_p * weights.clone()).sum().neg() / weights.sum().clamp_min(1.0)
}

/// KL(base || edited) of the next-token distributions at `batch`'s weighted positions, mean
/// over them: how far an edit moved the model on an input it should leave alone.
pub fn locality_kl(base: Tensor<3>, edited: Tensor<3>, batch: &LmBatch) -> Tensor<1> {
    let [n, seq, _] = base.dims();
    let log_base = log_softmax(base, 2);
    let kl = (log_base.clone().exp() * (log_base - log_softmax(edited, 2)))
        .sum_dim(2)
        .reshape([n, seq]);
    let weights = batch.weights.clone();
    (kl * weights.clone()).sum() / weights.sum().clamp_min(1.0)
}

/// [`answer_loss`] with `hooks` in the forward pass.
pub fn answer_loss_with(model: &Vlm, batch: &LmBatch, hooks: &Hooks) -> (Tensor<1>, Vec<bool>) {
    let (loss, scores) = answer_loss_and_scores(model, batch, hooks);
    (loss, scores.iter().map(AnswerScore::exact).collect())
}

/// How many of an answer's scored positions (its tokens and the end token) are the argmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerScore {
    pub right: usize,
    pub positions: usize,
}

impl AnswerScore {
    pub fn exact(&self) -> bool {
        self.right == self.positions
    }
}

fn answer_loss_and_scores(
    model: &Vlm,
    batch: &LmBatch,
    hooks: &Hooks,
) -> (Tensor<1>, Vec<AnswerScore>) {
    let logits = model
        .forward(
            batch.pixels.clone(),
            batch.ids.clone(),
            batch.mask.clone(),
            hooks,
        )
        .logits;
    let loss = answer_nll(logits.clone(), batch);
    (loss, answer_scores_of(logits, batch))
}

/// The [`AnswerScore`]s of `batch`'s examples under `logits`.
fn answer_scores_of(logits: Tensor<3>, batch: &LmBatch) -> Vec<AnswerScore> {
    let [n, seq, _] = logits.dims();
    let weights = batch.weights.clone();
    let correct = logits
        .argmax(2)
        .reshape([n, seq])
        .equal(batch.targets.clone())
        .float();
    let per_example = |t: Tensor<2>| -> Vec<f32> {
        t.sum_dim(1)
            .reshape([n])
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32 values")
    };
    let right = per_example(correct * weights.clone());
    let positions = per_example(weights);
    right
        .iter()
        .zip(&positions)
        .map(|(&r, &p)| AnswerScore {
            right: r.round() as usize,
            positions: p.round() as usize,
        })
        .collect()
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

/// Per example of `examples` (in order), its teacher-forced [`AnswerScore`]; run in batches
/// of `batch_size`.
pub fn answer_scores(
    model: &Vlm,
    examples: &[LmExample],
    batcher: &mut LmBatcher,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<AnswerScore>> {
    let unscored = AnswerScore {
        right: 0,
        positions: 0,
    };
    let mut scores = vec![unscored; examples.len()];
    for with_image in [true, false] {
        let group: Vec<usize> = (0..examples.len())
            .filter(|&i| examples[i].image.is_some() == with_image)
            .collect();
        for chunk in group.chunks(batch_size.max(1)) {
            let chosen: Vec<&LmExample> = chunk.iter().map(|&i| &examples[i]).collect();
            let batch = batcher.batch(&chosen, device)?;
            let (_, batch_scores) = answer_loss_and_scores(model, &batch, &Hooks::default());
            for (&i, score) in chunk.iter().zip(batch_scores) {
                scores[i] = score;
            }
        }
    }
    Ok(scores)
}

/// Per example of `examples` (in order), whether its teacher-forced answer is exactly right;
/// run in batches of `batch_size`.
pub fn answers_right(
    model: &Vlm,
    examples: &[LmExample],
    batcher: &mut LmBatcher,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<bool>> {
    let scores = answer_scores(model, examples, batcher, batch_size, device)?;
    Ok(scores.iter().map(AnswerScore::exact).collect())
}

/// Teacher-forced exact match over `examples`, in batches of `batch_size`.
pub fn exact_match(
    model: &Vlm,
    examples: &[LmExample],
    batcher: &mut LmBatcher,
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let right = answers_right(model, examples, batcher, batch_size, device)?;
    Ok(right.iter().filter(|&&r| r).count() as f64 / examples.len().max(1) as f64)
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
    let mut initialising = Some(super::initialising());
    device.seed(config.seed);
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
    while state.step < config.steps {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(state.step as u64);
        let text_turn = !text.is_empty()
            && (visual.is_empty() || (state.step + 1) % config.text_every.max(1) == 0);
        let pool = if text_turn { &text } else { &visual };
        let chosen: Vec<&LmExample> = (0..config.batch_size)
            .filter_map(|_| pool.choose(&mut rng).copied())
            .collect();
        let batch = batcher.batch(&chosen, device)?;
        let hooks = Hooks::default();
        let out = model.forward(
            batch.pixels.clone(),
            batch.ids.clone(),
            batch.mask.clone(),
            &hooks,
        );
        let mut loss = answer_nll(out.logits.clone(), &batch);
        let value = loss.clone().into_scalar::<f32>();
        let right = answer_scores_of(out.logits, &batch);
        if config.referent_weight > 0.0
            && let (Some(logits), Some(readout)) = (&out.referent_logits, &model.referent)
            && let Some((referent, share)) =
                referent_loss(logits.clone(), readout.match_logits(logits.clone()), &batch)
        {
            loss = loss + referent * config.referent_weight;
            referent_right = share;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = config.optim.lr(config.lr, state.step, config.steps);
        model = optim.step(lr, model, grads);
        state.step += 1;
        if initialising.is_some() {
            model.visit(&mut super::Materialise);
            initialising = None;
        }
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

    /// The scenes vocabulary's tokenizer, from the file it is read from (kept in the dir).
    fn scenes_tokenizer() -> (tempfile::TempDir, TextTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let json = crate::data::scenes::word_level_tokenizer()
            .to_string(false)
            .unwrap();
        std::fs::write(&path, json).unwrap();
        let tokenizer = TextTokenizer::from_file(&path, 64, 0).unwrap();
        (dir, tokenizer)
    }

    #[test]
    fn counterfactual_examples_say_which_kind_of_question_they_are() {
        let mut record =
            EditRecord::vqa(PathBuf::from("x.png"), "what size is the circle?", "large");
        record.rephrase = Some("how big is the circle?".into());
        let scope = |prompt: &str, before: &str, after: &str| crate::data::record::ScopeQuery {
            prompt: prompt.into(),
            answer_before: before.into(),
            answer_after: after.into(),
            in_scope: before != after,
            hard: false,
            near: false,
            cell: Some(4),
            matches: None,
        };
        record.scope = vec![
            scope("what size is the red shape?", "small", "large"),
            scope("what color is the circle?", "red", "red"),
        ];
        let marked = counterfactual_examples_by_kind(&record);
        let kinds: Vec<PairKind> = marked.iter().map(|(_, kind)| *kind).collect();
        assert_eq!(
            kinds,
            [
                PairKind::Edit,
                PairKind::Rephrase,
                PairKind::InScope,
                PairKind::OutOfScope
            ]
        );
        assert_eq!(marked[2].0.answer, "large");
        assert_eq!(marked[3].0.answer, "red");
        assert!(
            marked
                .iter()
                .all(|(e, _)| e.prompt.starts_with(&edit_context(&record)))
        );
        let plain: Vec<LmExample> = marked.into_iter().map(|(e, _)| e).collect();
        assert_eq!(counterfactual_examples(&record), plain);
    }

    #[test]
    fn groundings_after_an_edit_follow_the_edited_object() {
        use crate::data::record::ScopeQuery;
        let query =
            |cell: Option<u8>, matches: Option<Vec<u8>>, before: &str, after: &str| ScopeQuery {
                prompt: "q".into(),
                answer_before: before.into(),
                answer_after: after.into(),
                in_scope: before != after,
                hard: false,
                near: false,
                cell,
                matches,
            };
        let mut record =
            EditRecord::vqa(PathBuf::from("x.png"), "what color is the circle?", "red");
        // Not a scenes record: nothing is known.
        assert_eq!(
            Grounding::after_edit(&query(Some(4), None, "a", "a"), &record),
            None
        );
        record.edit_cell = Some(4);
        // A recolored object: the referent stays; a count that changes gains or loses it.
        let referent = query(Some(4), None, "blue", "red");
        assert_eq!(
            Grounding::after_edit(&referent, &record),
            Some(Grounding::Referent(4))
        );
        let gains = query(None, Some(vec![1]), "one", "two");
        assert_eq!(
            Grounding::after_edit(&gains, &record),
            Some(Grounding::Matches(vec![1, 4]))
        );
        let loses = query(None, Some(vec![4, 1]), "yes", "no");
        assert_eq!(
            Grounding::after_edit(&loses, &record),
            Some(Grounding::Matches(vec![1]))
        );
        let same = query(None, Some(vec![4]), "one", "one");
        assert_eq!(
            Grounding::after_edit(&same, &record),
            Some(Grounding::Matches(vec![4]))
        );
        // A moved object is found where the edit put it.
        record.moved_to = Some(8);
        assert_eq!(
            Grounding::after_edit(&referent, &record),
            Some(Grounding::Referent(8))
        );
        assert_eq!(
            Grounding::after_edit(&same, &record),
            Some(Grounding::Matches(vec![8]))
        );
    }

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

    #[test]
    fn targets_are_the_answer_and_end_tokens_shifted_by_one() {
        let (_dir, tokenizer) = scenes_tokenizer();
        let id = |w: &str| tokenizer.encode(w, false).unwrap()[0];
        let (red, what, color) = (id("red"), id("what"), id("color"));
        let mut batcher = LmBatcher::new(tokenizer, ImagePreprocessor::clip(16), 2, 3);
        let example = LmExample {
            image: None,
            prompt: "what color".into(),
            answer: "red".into(),
            grounding: None,
        };
        let batch = batcher.batch(&[&example], &Device::flex()).unwrap();
        let ids: Vec<i64> = batch
            .ids
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap();
        assert_eq!(ids, [2, what, color, red, 3]);
        let targets: Vec<i64> = batch
            .targets
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap();
        // Position 2 ("color") predicts "red", position 3 ("red") the end token.
        assert_eq!(targets, [0, 0, red, 3, 0]);
        let weights: Vec<f32> = batch.weights.into_data().try_to_vec().unwrap();
        assert_eq!(weights, [0.0, 0.0, 1.0, 1.0, 0.0]);
    }
}

/// A VLM saved by [`save`]: the model, its config and its tokenizer.
pub fn load(
    dir: &Path,
    device: &Device,
) -> Result<(Vlm, crate::model::vlm::VlmConfig, TextTokenizer)> {
    let config: crate::model::vlm::VlmConfig =
        crate::error::read_json_config(&dir.join("vlm.json"), |_| Ok(()))?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), 256, 0)?;
    let weights = dir.join("model.bpk");
    let model = Vlm::new(&config, device)
        .try_load_file(&weights)
        .map_err(|e| crate::Error::Weights {
            path: weights,
            reason: e.to_string(),
        })?;
    Ok((model, config, tokenizer))
}

/// A trained base VLM on disk: `vlm.json` (the config), `model.bpk`, `tokenizer.json`.
pub fn save(
    model: &Vlm,
    config: &crate::model::vlm::VlmConfig,
    tokenizer: &Path,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let json = serde_json::to_string_pretty(config).expect("a config serializes");
    crate::error::write_atomic(&out.join("vlm.json"), json.as_bytes())?;
    let bytes = std::fs::read(tokenizer).map_err(|e| crate::Error::io(tokenizer, e))?;
    crate::error::write_atomic(&out.join("tokenizer.json"), &bytes)?;
    checkpoint::save_module(model, &out.join("model.bpk"))
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
