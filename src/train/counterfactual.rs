//! Training SERAC's counterfactual model beside a real MLLM
//! ([`CounterfactualMllm`]): the projection and the LM learn, with the answer's cross-entropy,
//! the edits' counterfactual examples ([`counterfactual_examples`]: the edit in the context,
//! then a query, answered as the world after the edit answers it). The base model's image path
//! stays frozen. The scenes VLM's counterfactual model trains with [`super::vlm`] instead.

use burn::optim::GradientsParams;
use burn::tensor::Device;
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::vlm::VlmTrainConfig;
use crate::data::lm::{LmExample, counterfactual_examples};
use crate::data::record::EditRecord;
use crate::edit::speaker::Speaker;
use crate::error::{Error, Result};
use crate::model::answer::answer_nll;
use crate::model::editable::EditableModel;
use crate::model::mllm::counterfactual::CounterfactualMllm;

/// Trains `speaker`'s projection and LM on `records` (an autodiff `device`) for
/// `config.steps` batches of `config.batch_size` examples, alternately on images and text
/// alone, at `config.lr` under `config.optim`'s schedule (the scenes-only knobs - object
/// words, referents, repeats - do not apply); the mean loss of the last tenth of the steps.
pub fn train(
    speaker: &mut Speaker<CounterfactualMllm>,
    records: &[EditRecord],
    config: &VlmTrainConfig,
    device: &Device,
) -> Result<f64> {
    let examples: Vec<LmExample> = records.iter().flat_map(counterfactual_examples).collect();
    let (images, texts): (Vec<&LmExample>, Vec<&LmExample>) =
        examples.iter().partition(|e| e.image.is_some());
    let groups: Vec<Vec<&LmExample>> = [images, texts]
        .into_iter()
        .filter(|g| !g.is_empty())
        .collect();
    if groups.is_empty() {
        return Err(Error::Input(
            "the counterfactual model needs edit records to learn from".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut optim = config.optim.init();
    let tail = (config.steps / 10).max(1);
    let mut recent = Vec::new();
    let progress = super::progress_bar(config.steps, 0);
    for step in 0..config.steps {
        let group = &groups[step % groups.len()];
        // Drawn with replacement.
        let batch: Vec<&LmExample> = (0..config.batch_size.max(1))
            .map(|_| group[rng.random_range(0..group.len())])
            .collect();
        let batch = speaker.batcher.batch(&batch, device)?;
        let logits = speaker
            .model
            .forward(
                batch.pixels.clone(),
                batch.ids.clone(),
                batch.mask.clone(),
                &speaker.hooks,
            )
            .logits;
        let loss = answer_nll(logits, &batch);
        if step + tail >= config.steps {
            recent.push(loss.clone().into_scalar::<f32>() as f64);
        }
        let grads = GradientsParams::from_grads(loss.backward(), &speaker.model);
        let lr = config.optim.lr(config.lr, step, config.steps);
        speaker.model = optim.step(lr, speaker.model.clone(), grads);
        progress.inc(1);
    }
    progress.finish();
    Ok(recent.iter().sum::<f64>() / recent.len().max(1) as f64)
}

/// `mmke train counterfactual-mllm`: the counterfactual model beside the Hugging Face MLLM in
/// `model_dir`, starting from the causal LM in `lm_dir` (else a copy of the model's LM),
/// trained on the edits of `data_dir/train.json` (FGVEdit or MMEdit) and saved into `out`
/// (an autodiff `device`); the mean loss of the last steps.
pub fn run(
    model: &crate::edit::speaker::ModelDir,
    lm_dir: Option<&std::path::Path>,
    data_dir: &std::path::Path,
    config: &VlmTrainConfig,
    out: &std::path::Path,
    device: &Device,
) -> Result<f64> {
    let records = crate::data::read_edits(&data_dir.join("train.json"), data_dir)?.records;
    let base = Speaker::load_mllm(model, device)?;
    let mut speaker = Speaker::counterfactual(&base, lm_dir, device)?;
    let loss = train(&mut speaker, &records, config, device)?;
    crate::model::mllm::counterfactual::save(&speaker.model, out)?;
    Ok(loss)
}
