//! T-Patcher (Huang et al.): each edit adds a few patch neurons (extra FFN key-value pairs) to
//! the last LM layer, trained on the edit's loss plus two losses on the patch's key: an
//! activation loss that makes it fire where the edit's answer is predicted, and a memory loss
//! that keeps it below zero (silent after the ReLU) on FFN inputs of unrelated queries.

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Editor;
use super::speaker::{Prediction, Query, Speaker};
use crate::data::record::EditRecord;
use crate::error::Result;
use crate::model::editable::EditableModel;
use crate::model::lm::{ExtraNeurons, Hooks};
use crate::model::vlm::Vlm;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TPatcherConfig {
    /// Patch neurons per edit.
    pub neurons: usize,
    /// Adam steps and learning rate per edit.
    pub steps: usize,
    pub lr: f64,
    /// Weight of the activation loss `exp(-a)` at the edit's answer positions.
    pub activation_weight: f64,
    /// Weight of the memory loss `exp(a + margin)` on unrelated inputs.
    pub memory_weight: f64,
    /// Pre-activation the memory loss pushes unrelated inputs below (negated).
    pub margin: f64,
    /// Unrelated queries (from the pool) whose FFN inputs form the memory.
    pub memory_queries: usize,
}

/// The last layer's FFN inputs of `examples` (prompt, answer, image), all positions of each,
/// stacked: `[rows, hidden]`; with `answer_only`, only the positions that predict the answer.
fn ffn_inputs<M: EditableModel>(
    speaker: &mut Speaker<M>,
    examples: &[(Option<&std::path::Path>, &str, &str)],
    answer_only: bool,
    device: &Device,
) -> Result<Tensor<2>> {
    let layer = speaker.model.num_layers() - 1;
    let hooks = Hooks {
        capture: true,
        ..speaker.hooks.clone()
    };
    let mut rows = Vec::new();
    for &(image, prompt, answer) in examples {
        let batch = speaker.batch(image, prompt, answer, device)?;
        let with_image = batch.pixels.is_some();
        let out = speaker
            .model
            .forward(batch.pixels.clone(), batch.ids, batch.mask, &hooks);
        let [_, total, hidden] = out.ffn_inputs[layer].dims();
        let x = out.ffn_inputs[layer]
            .clone()
            .reshape([total, hidden])
            .detach();
        rows.push(if answer_only {
            let span = batch.spans[0].clone();
            let start = speaker.model.sequence_position(span.start, with_image);
            // The answer's positions follow each other in the sequence too.
            x.narrow(0, start, span.len())
        } else {
            x
        });
    }
    Ok(Tensor::cat(rows, 0))
}

pub struct TPatcherEditor<M = Vlm> {
    /// The model as edited so far (an autodiff device; its own parameters frozen).
    pub speaker: Speaker<M>,
    original: M,
    config: TPatcherConfig,
    /// FFN inputs of unrelated queries, `[rows, hidden]`.
    memory: Tensor<2>,
    device: Device,
}

impl<M: EditableModel> TPatcherEditor<M> {
    /// `pool`: records whose locality queries (text and image) fill the memory.
    pub fn new(
        mut speaker: Speaker<M>,
        pool: &[EditRecord],
        config: TPatcherConfig,
        device: &Device,
    ) -> Result<Self> {
        speaker.model = speaker.model.no_grad();
        let mut examples = Vec::new();
        for record in pool {
            if let Some(q) = &record.m_loc {
                examples.push((
                    Some(q.image.as_path()),
                    q.prompt.as_str(),
                    q.answer.as_str(),
                ));
            }
            if let Some(q) = &record.loc {
                examples.push((None, q.prompt.as_str(), q.answer.as_str()));
            }
            if examples.len() >= config.memory_queries {
                break;
            }
        }
        examples.truncate(config.memory_queries);
        let memory = ffn_inputs(&mut speaker, &examples, false, device)?;
        Ok(Self {
            original: speaker.model.clone(),
            speaker,
            config,
            memory,
            device: device.clone(),
        })
    }

    /// The patch neurons' activations on `query`'s last-layer FFN inputs (every position),
    /// `[rows, patch neurons]` summed over edits' patches: zero where the patches are silent.
    pub fn patch_activations(&mut self, query: &Query, answer: &str) -> Result<Tensor<2>> {
        let x = ffn_inputs(
            &mut self.speaker,
            &[(query.image.as_deref(), &query.prompt, answer)],
            false,
            &self.device,
        )?;
        let layer = self.speaker.model.num_layers() - 1;
        let patches = self.speaker.model.extra_neurons(layer);
        Ok(Tensor::cat(
            patches.iter().map(|p| p.activations(x.clone())).collect(),
            1,
        ))
    }
}

impl<M: EditableModel> Editor for TPatcherEditor<M> {
    fn edit(&mut self, record: &EditRecord) -> Result<()> {
        let edit = ffn_inputs(
            &mut self.speaker,
            &[(Some(&record.image), &record.prompt, &record.target)],
            true,
            &self.device,
        )?;
        let [positions, _] = edit.dims();
        let n = self.config.neurons;
        // Keys start at the edit's inputs (neuron j at answer position j, cycling), scaled so
        // that the pre-activation there is 1.
        let order: Vec<i64> = (0..n).map(|j| (j % positions) as i64).collect();
        let q = edit.clone().select(
            0,
            Tensor::<1, burn::tensor::Int>::from_data(order.as_slice(), &self.device),
        );
        let norm2 = q.clone().powi_scalar(2).sum_dim(1).clamp_min(1e-6);
        let patch = ExtraNeurons::with_keys((q / norm2).transpose());
        let layer = self.speaker.model.num_layers() - 1;
        self.speaker.model.extra_neurons_mut(layer).push(patch);

        let mut optim = AdamConfig::new().init();
        for _ in 0..self.config.steps {
            let edit_loss = self.speaker.loss(
                Some(&record.image),
                &record.prompt,
                &record.target,
                &self.device,
            )?;
            let patch = self
                .speaker
                .model
                .extra_neurons(layer)
                .last()
                .expect("the patch just added");
            // Activation loss: fire at the edit's answer positions (each neuron at its best).
            let at_edit = patch.pre_activations(edit.clone()).max_dim(0);
            let activation = at_edit.neg().exp().mean();
            // Memory loss: stay below -margin on unrelated inputs.
            let on_memory = patch.pre_activations(self.memory.clone());
            let memory = (on_memory + self.config.margin).exp().mean();
            let loss = edit_loss
                + activation * self.config.activation_weight
                + memory * self.config.memory_weight;
            let grads = GradientsParams::from_grads(loss.backward(), &self.speaker.model);
            let model = self.speaker.model.clone();
            self.speaker.model = optim.step(self.config.lr, model, grads);
        }
        let patches = self.speaker.model.extra_neurons_mut(layer);
        if let Some(last) = patches.pop() {
            patches.push(last.no_grad());
        }
        Ok(())
    }

    fn predict(&mut self, query: &Query, answer: &str, k: usize) -> Result<Prediction> {
        self.speaker.predict_query(query, answer, k, &self.device)
    }

    fn answer(&mut self, query: &Query, max_new: usize) -> Result<String> {
        self.speaker.answer_query(query, max_new, &self.device)
    }

    fn reset(&mut self) {
        self.speaker.model = self.original.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::serac::tests::{reseeded, speaker, two_scenes};

    #[test]
    fn a_trained_patch_learns_the_edit_and_is_silent_on_a_locality_input() {
        let (dir, records) = two_scenes(11);
        let device = Device::flex().autodiff();
        let record = &records[0];
        let config = TPatcherConfig {
            neurons: 2,
            steps: 40,
            lr: 5e-2,
            activation_weight: 1.0,
            memory_weight: 1.0,
            margin: 0.5,
            memory_queries: 4,
        };
        // The memory holds the unrelated queries of both records (scenes' text facts recur
        // across records, so a user's memory holds them too); the locality input checked
        // below is this record's.
        let mut base = speaker(dir.path(), &device);
        base.model = reseeded(base.model, 11); // one exact model, whatever runs beside
        let mut editor = TPatcherEditor::new(base, &records, config, &device).unwrap();
        let loss = |e: &mut TPatcherEditor| {
            e.speaker
                .loss(Some(&record.image), &record.prompt, &record.target, &device)
                .unwrap()
                .into_scalar::<f32>()
        };
        let before = loss(&mut editor);
        editor.edit(record).unwrap();
        let after = loss(&mut editor);
        assert!(
            after < before - 0.2,
            "the edit is learned: {before} -> {after}"
        );

        let fired = |e: &mut TPatcherEditor, query: &Query, answer: &str| -> f32 {
            e.patch_activations(query, answer)
                .unwrap()
                .max()
                .into_scalar::<f32>()
        };
        let edit = Query {
            image: Some(record.image.clone()),
            prompt: record.prompt.clone(),
        };
        let on_edit = fired(&mut editor, &edit, &record.target);
        let loc = record.loc.as_ref().expect("scenes records have T-Locality");
        let text = Query {
            image: None,
            prompt: loc.prompt.clone(),
        };
        let on_locality = fired(&mut editor, &text, &loc.answer);
        assert!(
            on_edit > 0.0 && on_locality == 0.0,
            "fired {on_edit} on the edit, {on_locality} on the locality input"
        );
        editor.reset();
        assert!((loss(&mut editor) - before).abs() < 1e-6);
    }
}
