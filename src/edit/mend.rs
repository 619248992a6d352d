//! MEND (Mitchell et al.): a learned map from an edit's gradient to a weight change. The
//! gradient of a linear layer's weight is a sum of rank-1 pieces `u_t^T delta_t` (u: the
//! layer's input at token t, delta: the loss gradient w.r.t. its output); MEND normalises each
//! `[u_t; delta_t]`, passes it through a small low-rank residual MLP (the identity at
//! initialisation) and applies `W <- W - lr * sum_t u~_t^T delta~_t` with a learned lr per
//! matrix. mmke edits fc1 and fc2 of the last `layers` LM layers, as the reference does for
//! OPT. KE ([`super::ke`]) shares the [`Hypernetwork`] interface, the editor and the
//! meta-training ([`crate::train::meta`]).

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Editor;
use super::speaker::{Prediction, Query, Speaker};
use crate::data::record::EditRecord;
use crate::error::{Error, Result, write_atomic};
use crate::model::answer::answer_nll;
use crate::model::editable::EditableModel;
use crate::model::lm::Hooks;
use crate::model::vlm::Vlm;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MendConfig {
    /// fc1 and fc2 of the last `layers` LM layers are edited.
    pub layers: usize,
    /// Width of the low-rank residual blocks.
    pub rank: usize,
    /// Residual blocks per matrix network.
    pub blocks: usize,
    /// The per-matrix edit learning rate at initialisation (learned in meta-training).
    pub edit_lr: f64,
}

/// `x + up(relu(down x))`, `up` zero at initialisation (the identity).
#[derive(Module, Debug)]
pub struct LowRankResidual {
    pub down: Linear,
    pub up: Linear,
}

impl LowRankResidual {
    fn new(dim: usize, rank: usize, device: &Device) -> Self {
        Self {
            down: LinearConfig::new(dim, rank).init(device),
            up: LinearConfig::new(rank, dim)
                .with_initializer(Initializer::Zeros)
                .init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.clone() + self.up.forward(relu(self.down.forward(x)))
    }
}

/// The gradient network of one matrix (`[input, output]`).
#[derive(Module, Debug)]
pub struct MatrixNet {
    /// Running mean and (population) variance of `[u; delta]`, and how many rows they saw;
    /// updated in meta-training, never trained by gradient.
    pub mean: Param<Tensor<1>>,
    pub var: Param<Tensor<1>>,
    pub seen: Param<Tensor<1>>,
    pub blocks: Vec<LowRankResidual>,
    /// log of the edit learning rate.
    pub log_lr: Param<Tensor<1>>,
    #[module(skip)]
    pub input: usize,
}

impl MatrixNet {
    fn new(input: usize, output: usize, config: &MendConfig, device: &Device) -> Self {
        let dim = input + output;
        let fixed = |t: Tensor<1>| Param::from_tensor(t).set_require_grad(false);
        Self {
            mean: fixed(Tensor::zeros([dim], device)),
            var: fixed(Tensor::ones([dim], device)),
            seen: fixed(Tensor::zeros([1], device)),
            blocks: (0..config.blocks)
                .map(|_| LowRankResidual::new(dim, config.rank, device))
                .collect(),
            log_lr: Param::from_tensor(Tensor::from_floats([config.edit_lr.ln()], device)),
            input,
        }
    }

    /// The weight change for gradient pieces `u` (`[rows, input]`) and `delta`
    /// (`[rows, output]`): `-lr * u~^T delta~`, `[input, output]`.
    pub fn update(&self, u: Tensor<2>, delta: Tensor<2>) -> Tensor<2> {
        let output = delta.dims()[1];
        let x = Tensor::cat(vec![u, delta], 1);
        let dim = x.dims()[1];
        let x = (x - self.mean.val().reshape([1, dim]))
            / (self.var.val().reshape([1, dim]) + 1e-8).sqrt();
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        let u = x.clone().narrow(1, 0, self.input);
        let delta = x.narrow(1, self.input, output);
        u.transpose().matmul(delta) * self.log_lr.val().exp().neg().reshape([1, 1])
    }

    /// Merges the rows of `[u; delta]` into the running statistics (Chan et al.'s update).
    fn observe(self, u: Tensor<2>, delta: Tensor<2>) -> Self {
        let x = Tensor::cat(vec![u, delta], 1).detach();
        let rows = x.dims()[0] as f64;
        let seen: f32 = self.seen.val().into_scalar();
        let seen = seen as f64;
        let total = seen + rows;
        let batch_mean = x.clone().mean_dim(0).squeeze_dim::<1>(0);
        let batch_var = (x - batch_mean.clone().unsqueeze::<2>())
            .powi_scalar(2)
            .mean_dim(0)
            .squeeze_dim::<1>(0);
        let mean = self.mean.val();
        let shift = batch_mean - mean.clone();
        let new_mean = mean + shift.clone() * (rows / total);
        let new_var = if seen == 0.0 {
            batch_var
        } else {
            (self.var.val() * seen
                + batch_var * rows
                + shift.powi_scalar(2) * (seen * rows / total))
                / total
        };
        Self {
            mean: self.mean.map(|_| new_mean.detach()),
            var: self.var.map(|_| new_var.detach()),
            seen: self.seen.map(|t| (t + rows).detach()),
            ..self
        }
    }
}

/// The gradient pieces of one edited layer: `(u, delta)` of each FFN matrix (fc1, fc2).
pub type LayerGradient = Vec<(Tensor<2>, Tensor<2>)>;

/// MEND's networks for every edited matrix, in layer order (fc1, fc2 of each layer).
#[derive(Module, Debug)]
pub struct Mend {
    pub nets: Vec<MatrixNet>,
    #[module(skip)]
    pub layers: Vec<usize>,
}

/// A learned editor mapping an edit (its gradient pieces and its tokens) to weight changes of
/// fc1 and fc2 in some LM layers: MEND and KE. Meta-trained by [`crate::train::meta`].
pub trait Hypernetwork: Module + Sized {
    type Config: Clone + std::fmt::Debug + Serialize + serde::de::DeserializeOwned;
    /// Stem of its files (`NAME.json`, `NAME.bpk`) and its directory in experiments.
    const NAME: &'static str;
    fn new(config: &Self::Config, model: &impl EditableModel, device: &Device) -> Self;
    /// Why a config is unusable, if it is.
    fn check(config: &Self::Config) -> std::result::Result<(), String>;
    /// The edited LM layers.
    fn layers(&self) -> &[usize];
    /// The weight changes (`[in, out]`) of each FFN matrix (fc1, fc2) per edited layer.
    fn updates(&self, edit: &EditSignal) -> Vec<Vec<Tensor<2>>>;
    /// Merges what an edit tells about the data (MEND's running normalisation).
    fn observe(self, _edit: &EditSignal) -> Self {
        self
    }
}

/// What an edit gives a hypernetwork: its loss before the edit, the gradient pieces of the
/// edited layers and its tokens' embeddings (`[1, seq, hidden]`).
#[derive(Clone, Debug)]
pub struct EditSignal {
    pub loss: f32,
    pub pieces: Vec<LayerGradient>,
    pub tokens: Tensor<3>,
}

impl Hypernetwork for Mend {
    type Config = MendConfig;
    const NAME: &'static str = "mend";

    fn new(config: &MendConfig, model: &impl EditableModel, device: &Device) -> Self {
        let layers = crate::edit::unike::edited_layers(model, config.layers);
        let nets = layers
            .iter()
            .flat_map(|&l| model.ffn_weights(l))
            .map(|w| {
                let [input, output] = w.dims();
                MatrixNet::new(input, output, config, device)
            })
            .collect();
        Self { nets, layers }
    }

    fn check(c: &MendConfig) -> std::result::Result<(), String> {
        (c.layers > 0 && c.rank > 0 && c.edit_lr > 0.0)
            .then_some(())
            .ok_or_else(|| "layers, rank and edit_lr must be positive".to_string())
    }

    fn layers(&self) -> &[usize] {
        &self.layers
    }

    fn updates(&self, edit: &EditSignal) -> Vec<Vec<Tensor<2>>> {
        // One network per matrix, in layer order.
        let mut nets = self.nets.iter();
        edit.pieces
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|(u, delta)| {
                        let net = nets.next().expect("a network per matrix");
                        net.update(u.clone(), delta.clone())
                    })
                    .collect()
            })
            .collect()
    }

    fn observe(mut self, edit: &EditSignal) -> Self {
        let mut nets = std::mem::take(&mut self.nets).into_iter();
        for pieces in &edit.pieces {
            for (u, delta) in pieces.clone() {
                let net = nets.next().expect("a network per matrix");
                self.nets.push(net.observe(u, delta));
            }
        }
        self
    }
}

/// `base` with `updates` of `layers` applied in the forward pass (kept in the autodiff graph).
pub fn hooks_with_updates(
    base: &Hooks,
    layers: &[usize],
    updates: Vec<Vec<Tensor<2>>>,
    num_layers: usize,
) -> Hooks {
    let mut deltas = vec![None; num_layers];
    for (&l, update) in layers.iter().zip(updates) {
        deltas[l] = Some(update);
    }
    Hooks {
        ffn_deltas: deltas,
        ..base.clone()
    }
}

/// Saves `NAME.json` (the config) and `NAME.bpk` in `dir`.
pub fn save<N: Hypernetwork>(net: &N, config: &N::Config, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = serde_json::to_string_pretty(config).expect("config serializes");
    write_atomic(&dir.join(format!("{}.json", N::NAME)), json.as_bytes())?;
    crate::error::save_module(net, &dir.join(format!("{}.bpk", N::NAME)))
}

/// Loads what [`save`] wrote, for `model`.
pub fn load<N: Hypernetwork>(
    dir: &Path,
    model: &impl EditableModel,
    device: &Device,
) -> Result<(N, N::Config)> {
    let config: N::Config =
        crate::error::read_json_config(&dir.join(format!("{}.json", N::NAME)), N::check)?;
    let path = dir.join(format!("{}.bpk", N::NAME));
    let net = N::new(&config, model, device)
        .try_load_file(&path)
        .map_err(|e| Error::Weights {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok((net, config))
}

/// An edit's [`EditSignal`] for `layers`: one forward and backward pass of `speaker` (on an
/// autodiff device).
pub fn edit_signal<M: EditableModel>(
    speaker: &mut Speaker<M>,
    record: &EditRecord,
    layers: &[usize],
    device: &Device,
) -> Result<EditSignal> {
    let batch = speaker.batch(Some(&record.image), &record.prompt, &record.target, device)?;
    let hooks = Hooks {
        ffn_probes: layers.to_vec(),
        ..speaker.hooks.clone()
    };
    let out = speaker.model.forward(
        batch.pixels.clone(),
        batch.ids.clone(),
        batch.mask.clone(),
        &hooks,
    );
    let loss = answer_nll(out.logits, &batch);
    let value = loss.clone().into_scalar::<f32>();
    let grads = loss.backward();
    let pieces = out.probes.iter().map(|p| p.gradients(&grads)).collect();
    Ok(EditSignal {
        loss: value,
        pieces,
        tokens: speaker.model.embed_tokens(batch.ids).detach(),
    })
}

/// Edits by a hypernetwork (MEND, KE): each edit's weight changes are added to the weights
/// (sequential edits accumulate) until `reset`.
pub struct HypernetEditor<N: Hypernetwork, M = Vlm> {
    /// The model as edited so far (an autodiff device; its parameters are frozen).
    pub speaker: Speaker<M>,
    original: M,
    net: N,
    device: Device,
}

pub type MendEditor = HypernetEditor<Mend>;

impl<N: Hypernetwork, M: EditableModel> HypernetEditor<N, M> {
    pub fn new(mut speaker: Speaker<M>, net: N, device: &Device) -> Self {
        speaker.model = speaker.model.no_grad();
        Self {
            original: speaker.model.clone(),
            speaker,
            net: net.no_grad(),
            device: device.clone(),
        }
    }

    /// The edited model and the (autodiff) device it runs on.
    pub fn speaker_and_device(&mut self) -> (&mut Speaker<M>, &Device) {
        (&mut self.speaker, &self.device)
    }

    /// The weights MEND changes, per edited layer (its FFN matrices), for tests and
    /// inspection.
    pub fn edited_weights(&self) -> Vec<Vec<Tensor<2>>> {
        self.net
            .layers()
            .iter()
            .map(|&l| self.speaker.model.ffn_weights(l))
            .collect()
    }
}

impl<N: Hypernetwork, M: EditableModel> Editor for HypernetEditor<N, M> {
    fn edit(&mut self, record: &EditRecord) -> Result<()> {
        let layers = self.net.layers().to_vec();
        let signal = edit_signal(&mut self.speaker, record, &layers, &self.device)?;
        let updates = self.net.updates(&signal);
        for (&l, update) in layers.iter().zip(updates) {
            self.speaker.model.add_to_ffn_weights(l, update);
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

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec().unwrap()
    }

    #[test]
    fn at_initialisation_an_edit_is_a_gradient_step_of_the_chosen_layers_only() {
        let (dir, records) = two_scenes(7);
        let device = Device::flex().autodiff();
        let record = &records[0];
        let config = MendConfig {
            layers: 1,
            rank: 8,
            blocks: 2,
            edit_lr: 0.5,
        };
        let base = speaker(dir.path(), &device);
        let before: Vec<Vec<Vec<f32>>> = base
            .model
            .lm
            .model
            .decoder
            .layers
            .iter()
            .map(|l| vec![values(l.fc1.weight.val()), values(l.fc2.weight.val())])
            .collect();
        let mend = Mend::new(&config, &base.model, &device);
        assert_eq!(mend.layers, [1]);
        let mut editor = MendEditor::new(base, mend, &device);

        // The weight gradient of the edit loss, by autodiff on the weights themselves.
        let mut model = editor.speaker.model.clone();
        model.lm = model.lm.train_only_layers(&[1]);
        let mut plain = Speaker {
            model,
            batcher: speaker(dir.path(), &device).batcher,
            hooks: Hooks::default(),
        };
        let loss = plain
            .loss(Some(&record.image), &record.prompt, &record.target, &device)
            .unwrap();
        let grads = loss.backward();
        let last = &plain.model.lm.model.decoder.layers[1];
        let expected = [
            values(last.fc1.weight.val().grad(&grads).unwrap()),
            values(last.fc2.weight.val().grad(&grads).unwrap()),
        ];

        editor.edit(record).unwrap();
        let after = editor.edited_weights();
        for m in 0..2 {
            let now = values(after[0][m].clone());
            let was = &before[1][m];
            let mut changed = 0;
            for ((now, was), grad) in now.iter().zip(was).zip(&expected[m]) {
                let step = was - 0.5 * grad;
                assert!(
                    (now - step).abs() <= 1e-5 + 1e-4 * step.abs(),
                    "{now} vs {step}"
                );
                changed += usize::from(now != was);
            }
            assert!(changed > 0, "matrix {m} changed");
        }
        // Layer 0 is untouched.
        let first = &editor.speaker.model.lm.model.decoder.layers[0];
        assert_eq!(values(first.fc1.weight.val()), before[0][0]);
        assert_eq!(values(first.fc2.weight.val()), before[0][1]);
        // reset restores the model.
        editor.reset();
        assert_eq!(values(editor.edited_weights()[0][0].clone()), before[1][0]);
    }
}
