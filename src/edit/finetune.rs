//! Fine-tuning baselines of MSCKE's Table 1: FT-LLM fine-tunes the last LM layer on the edit,
//! FT-Visual the projector and the last vision layer. A few Adam steps on the edit's
//! teacher-forced loss; edits accumulate in the weights until `reset` restores the original.

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::Editor;
use super::speaker::{Prediction, Query, Speaker};
use crate::data::record::EditRecord;
use crate::error::Result;
use crate::model::editable::EditableModel;
use crate::model::vlm::Vlm;

/// Which part of the VLM an edit may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// FT-LLM: the last LM layer.
    LastLmLayer,
    /// FT-Visual: the projector and the last vision layer.
    Visual,
}

impl Part {
    /// `model` with only this part trainable.
    pub fn restrict<M: EditableModel>(self, model: M) -> M {
        match self {
            Part::LastLmLayer => {
                let last = model.num_layers() - 1;
                model.train_only_lm_layers(&[last])
            }
            Part::Visual => model.train_only_visual(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FineTuneConfig {
    pub part: Part,
    /// Adam steps per edit.
    pub steps: usize,
    pub lr: f64,
}

pub struct FineTuneEditor<M = Vlm> {
    /// The model as edited so far, on an autodiff device.
    pub speaker: Speaker<M>,
    original: M,
    config: FineTuneConfig,
    device: Device,
}

impl<M: EditableModel> FineTuneEditor<M> {
    /// `speaker.model` must live on an autodiff device (`device`).
    pub fn new(mut speaker: Speaker<M>, config: FineTuneConfig, device: &Device) -> Self {
        speaker.model = config.part.restrict(speaker.model);
        Self {
            original: speaker.model.clone(),
            speaker,
            config,
            device: device.clone(),
        }
    }
}

impl<M: EditableModel> Editor for FineTuneEditor<M> {
    fn edit(&mut self, record: &EditRecord) -> Result<()> {
        let mut optim = AdamConfig::new().init();
        for _ in 0..self.config.steps {
            let loss = self.speaker.loss(
                Some(&record.image),
                &record.prompt,
                &record.target,
                &self.device,
            )?;
            let grads = GradientsParams::from_grads(loss.backward(), &self.speaker.model);
            let model = self.speaker.model.clone();
            self.speaker.model = optim.step(self.config.lr, model, grads);
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
    use crate::edit::serac::tests::{speaker, two_scenes};

    fn weights(model: &Vlm) -> [Vec<f32>; 3] {
        let lm = &model.lm.model.decoder.layers;
        [
            lm[0].fc1.weight.val().into_data().try_to_vec().unwrap(),
            lm[lm.len() - 1]
                .fc1
                .weight
                .val()
                .into_data()
                .try_to_vec()
                .unwrap(),
            model
                .projector
                .first
                .weight
                .val()
                .into_data()
                .try_to_vec()
                .unwrap(),
        ]
    }

    #[test]
    fn fine_tuning_learns_the_edit_changes_only_its_part_and_resets() {
        let (dir, records) = two_scenes(4);
        let device = Device::flex().autodiff();
        let record = &records[0];
        let query = Query {
            image: Some(record.image.clone()),
            prompt: record.prompt.clone(),
        };
        // Which weights each part may change: [first LM layer, last LM layer, projector].
        for (part, changes) in [
            (Part::LastLmLayer, [false, true, false]),
            (Part::Visual, [false, false, true]),
        ] {
            device.seed(1);
            let config = FineTuneConfig {
                part,
                steps: 15,
                lr: 1e-2,
            };
            let mut editor = FineTuneEditor::new(speaker(dir.path(), &device), config, &device);
            let loss = |e: &mut FineTuneEditor| {
                e.speaker
                    .loss(Some(&record.image), &record.prompt, &record.target, &device)
                    .unwrap()
                    .into_scalar::<f32>()
            };
            let before_loss = loss(&mut editor);
            let before_weights = weights(&editor.speaker.model);
            let before = editor.predict(&query, &record.target, 10).unwrap();
            let said = editor.answer(&query, 3).unwrap();
            editor.edit(record).unwrap();
            let after_loss = loss(&mut editor);
            // An untrained model's tied embeddings (OPT's init, std 0.02) bound its logits,
            // so the loss cannot fall far from ln(vocab); it must fall.
            assert!(
                after_loss < before_loss - 0.1,
                "{part:?}: {before_loss} -> {after_loss}"
            );
            let after_weights = weights(&editor.speaker.model);
            for (i, &changed) in changes.iter().enumerate() {
                assert_eq!(
                    before_weights[i] != after_weights[i],
                    changed,
                    "{part:?} weight {i}"
                );
            }
            editor.reset();
            assert_eq!(weights(&editor.speaker.model), before_weights);
            assert_eq!(editor.predict(&query, &record.target, 10).unwrap(), before);
            assert_eq!(editor.answer(&query, 3).unwrap(), said);
        }
    }
}
