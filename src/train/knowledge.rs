//! What UniKE learns before any edit (§3.3, App. C): triplets (question, true answer,
//! hallucinated answer) from the base model's own mistakes and from edit records, their
//! hidden states in the knowledge memory, and the truthfulness and semantic encoders trained
//! with the contrastive losses of eq. 4 and 5 (Adam, lr 1e-4 in the paper).

use std::path::Path;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::lm::LmExample;
use crate::data::record::EditRecord;
use crate::edit::speaker::Speaker;
use crate::edit::unike::{Prepared, Triplet, knowledge_states};
use crate::error::Result;
use crate::model::answer::answers_right;
use crate::model::editable::EditableModel;
use crate::model::knowledge::{Encoders, KnowledgeMemory, semantic_loss, truthfulness_loss};
use crate::train::vlm::Knowledge;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnowledgeConfig {
    /// At most this many triplets from the base model's mistakes (and as many from edits).
    pub max_triplets: usize,
    /// Width of the truthfulness space.
    pub truth_dim: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Of the cosine similarity s in eq. 4-5.
    pub temperature: f64,
    pub seed: u64,
    /// Triplets per forward pass while the memory's hidden states are collected.
    #[serde(
        default = "default_memory_batch",
        skip_serializing_if = "is_default_memory_batch"
    )]
    pub memory_batch: usize,
}

fn default_memory_batch() -> usize {
    32
}

fn is_default_memory_batch(n: &usize) -> bool {
    *n == default_memory_batch()
}

/// Triplets from `records`: each edit (its question, the target as the truth to learn, the
/// original answer as the model's), and up to `max` pre-edit questions on images the base
/// model gets wrong (its greedy answer as the hallucination).
pub fn collect_triplets<M: EditableModel>(
    speaker: &mut Speaker<M>,
    records: &[EditRecord],
    max: usize,
    device: &Device,
) -> Result<Vec<Triplet>> {
    let mut triplets: Vec<Triplet> = records
        .iter()
        .filter_map(|r| {
            Some(Triplet {
                image: Some(r.image.clone()),
                prompt: r.prompt.clone(),
                pos: r.target.clone(),
                neg: r.original.clone()?,
            })
        })
        .take(max)
        .collect();
    let candidates: Vec<LmExample> = records
        .iter()
        .flat_map(|r| Knowledge::PreEdit.examples(r))
        .filter(|e| e.image.is_some())
        .collect();
    let mut mistakes = 0;
    for chunk in candidates.chunks(256) {
        if mistakes >= max {
            break;
        }
        let right = answers_right(&speaker.model, chunk, &mut speaker.batcher, 64, device)?;
        for (example, ok) in chunk.iter().zip(right) {
            if ok || mistakes >= max {
                continue;
            }
            // As long as the true answer, and a little more: enough to see it is wrong.
            let budget = speaker
                .batcher
                .tokenizer()
                .encode(&example.answer, false)?
                .len()
                + 2;
            let said = speaker.answer(example.image.as_deref(), &example.prompt, budget, device)?;
            if said.trim() == example.answer.trim() || said.trim().is_empty() {
                continue;
            }
            triplets.push(Triplet {
                image: example.image.clone(),
                prompt: example.prompt.clone(),
                pos: example.answer.clone(),
                neg: said,
            });
            mistakes += 1;
        }
    }
    Ok(triplets)
}

/// The knowledge memory of `triplets` (on images) in `layers`, in batches of `batch`.
pub fn build_memory<M: EditableModel>(
    speaker: &mut Speaker<M>,
    triplets: &[Triplet],
    layers: &[usize],
    batch: usize,
    device: &Device,
) -> Result<KnowledgeMemory> {
    let hidden = speaker.model.hidden_size();
    let mut memory = KnowledgeMemory::new(layers.to_vec(), hidden, device);
    for with_image in [true, false] {
        let group: Vec<Triplet> = triplets
            .iter()
            .filter(|t| t.image.is_some() == with_image)
            .cloned()
            .collect();
        for chunk in group.chunks(batch.max(1)) {
            let [sem, pos, neg] = knowledge_states(speaker, chunk, layers, device)?;
            memory.push(sem, pos, neg);
        }
    }
    Ok(memory)
}

/// Eq. 4 and eq. 5 at the first and the last training step.
#[derive(Clone, Copy, Debug)]
pub struct EncoderLosses {
    pub truthfulness: (f32, f32),
    pub semantic: (f32, f32),
}

/// Trains one pair of encoders per memory layer with eq. 4 + eq. 5 on random batches; returns
/// them (on `device`'s inner backend) and each layer's losses.
pub fn train_encoders(
    memory: &KnowledgeMemory,
    config: &KnowledgeConfig,
    device: &Device,
) -> (Vec<Encoders>, Vec<EncoderLosses>) {
    let hidden = memory.hidden();
    let n = memory.len();
    let mut trained = Vec::new();
    let mut losses = Vec::new();
    // Held for the whole training: the encoders draw lazily, at their first use.
    let _initialising = super::seeded(device, config.seed);
    for slot in 0..memory.layers.len() {
        let mut encoders = Encoders::new(hidden, config.truth_dim, device);
        let mut optim = AdamConfig::new().init();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ slot as u64);
        let mut record = EncoderLosses {
            truthfulness: (f32::NAN, f32::NAN),
            semantic: (f32::NAN, f32::NAN),
        };
        for step in 0..config.steps {
            if n < 2 {
                break;
            }
            let chosen: Vec<i64> = sample(&mut rng, n, config.batch_size.min(n))
                .into_iter()
                .map(|i| i as i64)
                .collect();
            let index = Tensor::<1, Int>::from_data(chosen.as_slice(), device);
            let rows = |t: &Tensor<2>| t.clone().select(0, index.clone());
            let (sem, pos, neg) = (
                rows(&memory.sem[slot]),
                rows(&memory.pos[slot]),
                rows(&memory.neg[slot]),
            );
            let truthfulness = truthfulness_loss(
                encoders.truthfulness.forward(pos.clone()),
                encoders.truthfulness.forward(neg.clone()),
                config.temperature,
            );
            let semantic = semantic_loss(
                sem,
                encoders.semantic.forward(pos),
                encoders.semantic.forward(neg),
                config.temperature,
            );
            let values = (
                truthfulness.clone().into_scalar::<f32>(),
                semantic.clone().into_scalar::<f32>(),
            );
            if step == 0 {
                record.truthfulness.0 = values.0;
                record.semantic.0 = values.1;
            }
            record.truthfulness.1 = values.0;
            record.semantic.1 = values.1;
            let loss = truthfulness + semantic;
            let grads = GradientsParams::from_grads(loss.backward(), &encoders);
            encoders = optim.step(config.lr, encoders, grads);
        }
        trained.push(encoders.valid());
        losses.push(record);
    }
    (trained, losses)
}

/// The knowledge memory and encoders for `speaker`'s `layers` from `records`, cached in
/// `dir` (`knowledge.bin`, `encoders.bpk`): built and trained when missing.
pub fn prepare<M: EditableModel>(
    speaker: &mut Speaker<M>,
    records: &[EditRecord],
    layers: &[usize],
    config: &KnowledgeConfig,
    dir: &Path,
    device: &Device,
) -> Result<Prepared> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let memory_path = dir.join("knowledge.bin");
    let encoders_path = dir.join("encoders.bpk");
    let plain = device.clone().without_autodiff();
    let hidden = speaker.model.hidden_size();
    if memory_path.is_file() && encoders_path.is_file() {
        let memory = KnowledgeMemory::load(&memory_path, device)?;
        let template: Vec<Encoders> = (0..layers.len())
            .map(|_| Encoders::new(hidden, config.truth_dim, &plain))
            .collect();
        let encoders =
            template
                .try_load_file(&encoders_path)
                .map_err(|e| crate::Error::Weights {
                    path: encoders_path.clone(),
                    reason: e.to_string(),
                })?;
        return Ok(Prepared { memory, encoders });
    }
    let triplets = collect_triplets(speaker, records, config.max_triplets, device)?;
    eprintln!("knowledge: {} triplets", triplets.len());
    let memory = build_memory(speaker, &triplets, layers, config.memory_batch, device)?;
    let (encoders, losses) = train_encoders(&memory, config, &device.clone().autodiff());
    for (slot, l) in losses.iter().enumerate() {
        eprintln!(
            "encoders of layer {}: truthfulness loss {:.4} -> {:.4}, semantic {:.4} -> {:.4}",
            layers[slot], l.truthfulness.0, l.truthfulness.1, l.semantic.0, l.semantic.1
        );
    }
    memory.save(&memory_path)?;
    crate::error::save_module(&encoders, &encoders_path)?;
    Ok(Prepared { memory, encoders })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn both_contrastive_losses_decrease_under_training() {
        let device = Device::flex();
        let (entries, hidden) = (64, 16);
        // Question states, and answers that move them along a shared "truth" direction.
        let sem = Tensor::<2>::random([entries, hidden], Distribution::Normal(0.0, 1.0), &device);
        let truth = Tensor::<2>::random([1, hidden], Distribution::Normal(0.0, 1.0), &device);
        let noise =
            || Tensor::<2>::random([entries, hidden], Distribution::Normal(0.0, 0.3), &device);
        let pos = sem.clone() + truth.clone() + noise();
        let neg = sem.clone() - truth + noise();
        let mut memory = KnowledgeMemory::new(vec![0], hidden, &device);
        memory.push(vec![sem], vec![pos], vec![neg]);
        let config = KnowledgeConfig {
            max_triplets: 0,
            truth_dim: 8,
            steps: 150,
            batch_size: 32,
            lr: 3e-3,
            temperature: 0.1,
            seed: 0,
            memory_batch: 32,
        };
        let (encoders, losses) = train_encoders(&memory, &config, &device.clone().autodiff());
        for (name, (first, last)) in [
            ("truthfulness", losses[0].truthfulness),
            ("semantic", losses[0].semantic),
        ] {
            assert!(last < 0.8 * first, "{name} loss {first} -> {last}");
        }
        // zeta points from the hallucinated to the truthful mean: positives project higher.
        let z = crate::model::knowledge::zeta(
            &encoders[0].truthfulness,
            memory.pos[0].clone(),
            memory.neg[0].clone(),
        );
        let project = |x: Tensor<2>| {
            encoders[0]
                .truthfulness
                .forward(x)
                .matmul(z.clone().reshape([8, 1]))
                .mean()
                .into_scalar::<f32>()
        };
        assert!(project(memory.pos[0].clone()) > project(memory.neg[0].clone()));
    }
}

#[cfg(test)]
mod editor_tests {
    //! The UniKE editor on a knowledge memory and encoders prepared by this module.
    use super::{KnowledgeConfig, build_memory, collect_triplets, train_encoders};
    use crate::data::lm::LmExample;
    use crate::data::record::EditRecord;
    use crate::edit::Editor;
    use crate::edit::serac::tests::{speaker, two_scenes};
    use crate::edit::speaker::{Query, Speaker};
    use crate::edit::unike::*;
    use crate::model::lm::{AttentionMix, ExtraNeurons, Hooks};
    use burn::tensor::Device;
    use std::sync::Arc;

    fn logits(speaker: &mut Speaker, record: &EditRecord, device: &Device) -> Vec<f32> {
        let example = LmExample {
            image: Some(record.image.clone()),
            prompt: record.prompt.clone(),
            answer: record.target.clone(),
            grounding: None,
        };
        let batch = speaker.batcher.batch(&[&example], device).unwrap();
        speaker
            .model
            .forward(batch.pixels, batch.ids, batch.mask, &speaker.hooks)
            .logits
            .into_data()
            .try_to_vec()
            .unwrap()
    }

    fn config(neurons: usize, in_context: InContext, alpha: Alpha, zeta: ZetaKind) -> UniKeConfig {
        UniKeConfig {
            neurons,
            layers: 2,
            steps: 30,
            lr: 1e-2,
            key_threshold: 0.5,
            in_context,
            top_k: 4,
            alpha,
            zeta,
            beta: 0.1,
            seed: 0,
        }
    }

    fn prepared(speaker: &mut Speaker, records: &[EditRecord], device: &Device) -> Prepared {
        let layers = edited_layers(&speaker.model, 2);
        let triplets = collect_triplets(speaker, records, 6, device).unwrap();
        assert!(triplets.len() >= 2, "every edit record is a triplet");
        let memory = build_memory(speaker, &triplets, &layers, 8, device).unwrap();
        let knowledge = KnowledgeConfig {
            max_triplets: 16,
            truth_dim: 8,
            steps: 5,
            batch_size: 8,
            lr: 1e-3,
            temperature: 0.1,
            seed: 0,
            memory_batch: 8,
        };
        let (encoders, _) = train_encoders(&memory, &knowledge, &device.clone().autodiff());
        Prepared { memory, encoders }
    }

    #[test]
    fn zero_extra_neurons_and_alpha_one_leave_the_model_unchanged() {
        let (dir, records) = two_scenes(3);
        let device = Device::flex();
        let mut plain = speaker(dir.path(), &device);
        let prepared = prepared(&mut plain, &records, &device);
        let before = logits(&mut plain, &records[0], &device);

        // Fresh neurons (zero values) in every edited layer and latent in-context editing with
        // alpha = 1: the same logits.
        let mut hooked = Speaker {
            model: plain.model.clone(),
            batcher: speaker(dir.path(), &device).batcher,
            hooks: Hooks::default(),
        };
        for l in edited_layers(&hooked.model, 2) {
            let layer = &mut hooked.model.lm.model.decoder.layers[l];
            layer.extra.push(ExtraNeurons::new(32, 10, &device));
        }
        let model = hooked.model.clone();
        let mix = |alpha| {
            Some(Arc::new(LatentInContext::new(
                prepared.memory.clone(),
                &model,
                4,
                alpha,
                None,
            )) as Arc<dyn AttentionMix>)
        };
        hooked.hooks.attention_mix = mix(Alpha::Fixed(1.0));
        assert_eq!(logits(&mut hooked, &records[0], &device), before);
        // The hook is live: alpha < 1 changes them.
        hooked.hooks.attention_mix = mix(Alpha::Fixed(0.5));
        assert_ne!(logits(&mut hooked, &records[0], &device), before);
    }

    #[test]
    fn the_editor_draws_from_its_own_generator() {
        // Other tests draw from the device's generator in parallel: an editor that used it
        // would not repeat itself here.
        let (dir, records) = two_scenes(5);
        let device = Device::flex().autodiff();
        let config = config(4, InContext::None, Alpha::Fixed(1.0), ZetaKind::Random);
        let mut base = speaker(dir.path(), &device);
        let prepared = prepared(&mut base, &records, &device);
        let keys = |editor: &UniKeEditor| -> Vec<f32> {
            let layers = &editor.speaker.model.lm.model.decoder.layers;
            let extra = layers.iter().flat_map(|l| l.extra.iter());
            extra
                .flat_map(|e| e.keys.val().into_data().try_to_vec::<f32>().unwrap())
                .collect()
        };
        let edited: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                let mut speaker = speaker(dir.path(), &device);
                speaker.model = base.model.clone();
                let prepared = Prepared {
                    memory: prepared.memory.clone(),
                    encoders: prepared.encoders.clone(),
                };
                let mut editor =
                    UniKeEditor::new(speaker, prepared, &records, config.clone(), &device);
                editor.edit(&records[0]).unwrap();
                keys(&editor)
            })
            .collect();
        assert!(!edited[0].is_empty());
        assert_eq!(edited[0], edited[1], "one seed, one edit, one result");
    }

    #[test]
    fn an_edit_is_learned_and_reset_restores_the_model() {
        let (dir, records) = two_scenes(5);
        let device = Device::flex().autodiff();
        let record = &records[0];
        let query = Query {
            image: Some(record.image.clone()),
            prompt: record.prompt.clone(),
        };
        for config in [
            config(4, InContext::None, Alpha::Fixed(1.0), ZetaKind::None),
            config(4, InContext::Latent, Alpha::Dynamic, ZetaKind::Truthfulness),
        ] {
            let mut base = speaker(dir.path(), &device);
            let prepared = prepared(&mut base, &records, &device);
            let mut editor = UniKeEditor::new(base, prepared, &records, config.clone(), &device);
            let loss = |editor: &mut UniKeEditor| {
                editor
                    .speaker
                    .loss(Some(&record.image), &record.prompt, &record.target, &device)
                    .unwrap()
                    .into_scalar::<f32>()
            };
            let before = loss(&mut editor);
            let predicted = editor.predict(&query, &record.target, 1).unwrap();
            editor.edit(record).unwrap();
            let after = loss(&mut editor);
            // (An untrained model's tiny tied embeddings bound its logits and its positions
            // look alike, so the loss cannot fall far here; the experiments measure how well
            // edits are learned by a trained model.)
            assert!(after < before - 0.2, "{config:?}: loss {before} -> {after}");
            editor.reset();
            assert_eq!(
                editor.predict(&query, &record.target, 1).unwrap(),
                predicted
            );
            assert!(
                editor
                    .speaker
                    .model
                    .lm
                    .model
                    .decoder
                    .layers
                    .iter()
                    .all(|l| l.extra.is_empty())
            );
        }
    }
}
