//! Scoring a VLM's answers: teacher-forced cross-entropy over the answer tokens, exact match,
//! top-k agreement for locality, per batch or over a list of examples.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};

use crate::data::lm::{LmBatch, LmBatcher, LmExample};
use crate::error::Result;
use crate::model::editable::EditableModel;
use crate::model::lm::Hooks;

/// Teacher-forced cross-entropy over the answer positions (mean per answer token), and per
/// example whether every answer token (and the end) is the argmax.
pub fn answer_loss(model: &impl EditableModel, batch: &LmBatch) -> (Tensor<1>, Vec<bool>) {
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
pub fn answer_loss_with(
    model: &impl EditableModel,
    batch: &LmBatch,
    hooks: &Hooks,
) -> (Tensor<1>, Vec<bool>) {
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
    model: &impl EditableModel,
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
pub(crate) fn answer_scores_of(logits: Tensor<3>, batch: &LmBatch) -> Vec<AnswerScore> {
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

/// Per example of `examples` (in order), its teacher-forced [`AnswerScore`]; run in batches
/// of `batch_size`.
pub fn answer_scores(
    model: &impl EditableModel,
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
    model: &impl EditableModel,
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
    model: &impl EditableModel,
    examples: &[LmExample],
    batcher: &mut LmBatcher,
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let right = answers_right(model, examples, batcher, batch_size, device)?;
    Ok(right.iter().filter(|&&r| r).count() as f64 / examples.len().max(1) as f64)
}
