//! Meta-training of the hypernetworks (MEND, KE): for a training edit, its gradient pieces
//! (and tokens) go through the network, the resulting weight change is applied in the forward
//! pass (differentiably), and the network learns from `edit_weight * NLL(edit target on an equivalent input)` plus
//! `locality_weight * KL(base || edited)` on an unrelated input (0.1 and 1.0 in the
//! reference). The base model stays frozen.

use std::path::Path;

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use crate::data::record::EditRecord;
use crate::edit::mend::{Hypernetwork, edit_signal, hooks_with_updates};
use crate::edit::speaker::Speaker;
use crate::error::Result;
use crate::model::answer::{answer_nll, locality_kl};
use crate::model::editable::EditableModel;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaTrainConfig {
    pub steps: usize,
    pub lr: f64,
    /// Weight of the edit's NLL after the update.
    pub edit_weight: f64,
    /// Weight of the locality KL.
    pub locality_weight: f64,
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Also learn from the captioning edits of the records (scenes records have them): a
    /// network that only saw short VQA answers overshoots on a caption's many tokens.
    #[serde(default)]
    pub captions: bool,
}

/// Losses of a meta-training run, averaged over the last `checkpoint_every` steps.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MetaLosses {
    /// The edit loss before the update.
    pub before: f64,
    /// After the update, on the equivalent input.
    pub after: f64,
    pub locality_kl: f64,
}

/// Meta-trains `net` on the edits of `records` (each needs a locality query) with the frozen
/// model of `speaker` (on an autodiff `device`); checkpoints in `dir`. `initialising` (held
/// since the device was seeded for `net`, see [`super::initialising`]) is released once every
/// parameter has its initial values.
#[allow(clippy::too_many_arguments)]
pub fn meta_train<N: Hypernetwork, M: EditableModel>(
    mut net: N,
    speaker: &mut Speaker<M>,
    records: &[EditRecord],
    config: &MetaTrainConfig,
    dir: &Path,
    resume: bool,
    mut initialising: Option<std::sync::MutexGuard<'static, ()>>,
    device: &Device,
) -> Result<(N, MetaLosses)> {
    let records: Vec<&EditRecord> = records
        .iter()
        .filter(|r| r.m_loc.is_some() || r.loc.is_some())
        .collect();
    if records.is_empty() {
        return Err(crate::Error::Config {
            path: dir.to_path_buf(),
            reason: format!("{} needs edit records with a locality query", N::NAME),
        });
    }
    speaker.model = speaker.model.clone().no_grad();
    let num_layers = speaker.model.num_layers();
    let mut optim = AdamConfig::new().init();
    let mut state = TrainState::default();
    if resume && let Some((m, o, s)) = checkpoint::load(dir, net.clone(), optim.clone())? {
        (net, optim, state) = (m, o, s);
        eprintln!("resuming {} at step {}", dir.display(), state.step);
    }
    let progress = super::progress_bar(config.steps, state.step);
    let mut recent = Vec::new();
    let mut last = MetaLosses::default();
    while state.step < config.steps {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(state.step as u64);
        let record = records[rng.random_range(0..records.len())];

        let layers = net.layers().to_vec();
        let signal = edit_signal(speaker, record, &layers, device)?;
        net = net.observe(&signal);
        let hooks = hooks_with_updates(&speaker.hooks, &layers, net.updates(&signal), num_layers);
        let before = signal.loss;

        // Edit success on an equivalent input: the rephrased question when there is one.
        let prompt = record.rephrase.as_deref().unwrap_or(&record.prompt);
        let batch = speaker.batch(Some(&record.image), prompt, &record.target, device)?;
        let logits = speaker
            .model
            .forward(
                batch.pixels.clone(),
                batch.ids.clone(),
                batch.mask.clone(),
                &hooks,
            )
            .logits;
        let after = answer_nll(logits, &batch);

        // Locality: an unrelated question (on another image when there is one).
        let (image, prompt, answer) = match (&record.m_loc, &record.loc) {
            (Some(q), _) => (Some(q.image.as_path()), &q.prompt, &q.answer),
            (None, Some(q)) => (None, &q.prompt, &q.answer),
            (None, None) => unreachable!("filtered above"),
        };
        let batch = speaker.batch(image, prompt, answer, device)?;
        let forward = |hooks| {
            speaker
                .model
                .forward(
                    batch.pixels.clone(),
                    batch.ids.clone(),
                    batch.mask.clone(),
                    hooks,
                )
                .logits
        };
        let base = forward(&speaker.hooks).detach();
        let kl = locality_kl(base, forward(&hooks), &batch);

        let loss = after.clone() * config.edit_weight + kl.clone() * config.locality_weight;
        recent.push([
            before as f64,
            after.into_scalar::<f32>() as f64,
            kl.into_scalar::<f32>() as f64,
        ]);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(config.lr, net, grads);
        state.step += 1;
        if initialising.is_some() {
            net.visit(&mut super::Materialise);
            initialising = None;
        }
        progress.inc(1);

        if state.step % config.checkpoint_every == 0 || state.step == config.steps {
            let n = recent.len().max(1) as f64;
            let mean = |i: usize| recent.iter().map(|r| r[i]).sum::<f64>() / n;
            last = MetaLosses {
                before: mean(0),
                after: mean(1),
                locality_kl: mean(2),
            };
            recent.clear();
            progress.suspend(|| {
                eprintln!(
                    "step {}: edit loss {:.4} -> {:.4}  locality KL {:.4}",
                    state.step, last.before, last.after, last.locality_kl
                )
            });
            checkpoint::save(dir, &net, &optim, &state)?;
        }
    }
    progress.finish();
    Ok((net, last))
}

/// `mmke train mend|ke`: meta-trains the hypernetwork for `model` (a scenes
/// VLM written by `mmke train vlm`, or a Hugging Face MLLM directory: BLIP-2, LLaVA) on the
/// edits of `data_dir/train.json`; writes `out/NAME.{json,bpk}`. `device` must be an autodiff
/// device.
pub fn run<N: Hypernetwork>(
    model: &crate::edit::speaker::ModelDir,
    data_dir: &Path,
    net_config: &N::Config,
    config: &MetaTrainConfig,
    out: &Path,
    resume: bool,
    device: &Device,
) -> Result<MetaLosses> {
    if model.is_mllm() {
        let speaker = Speaker::load_mllm(model, device)?;
        run_with::<N, _>(speaker, data_dir, net_config, config, out, resume, device)
    } else {
        let speaker = Speaker::load(&model.path, device)?;
        run_with::<N, _>(speaker, data_dir, net_config, config, out, resume, device)
    }
}

fn run_with<N: Hypernetwork, M: EditableModel>(
    mut speaker: Speaker<M>,
    data_dir: &Path,
    net_config: &N::Config,
    config: &MetaTrainConfig,
    out: &Path,
    resume: bool,
    device: &Device,
) -> Result<MetaLosses> {
    let mut records = crate::data::read_edits(&data_dir.join("train.json"), data_dir)?.records;
    if config.captions {
        let captions: Vec<EditRecord> = records
            .iter()
            .filter_map(EditRecord::caption_edit)
            .collect();
        records.extend(captions);
    }
    let initialising = super::seeded(device, config.seed);
    let net = N::new(net_config, &speaker.model, device);
    let (net, losses) = meta_train(
        net,
        &mut speaker,
        &records,
        config,
        out,
        resume,
        Some(initialising),
        device,
    )?;
    crate::edit::mend::save(&net, net_config, out)?;
    Ok(losses)
}
