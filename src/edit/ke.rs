//! KE, Knowledge Editor (De Cao et al.): a hypernetwork conditioned on the edit. A
//! bidirectional LSTM reads the edit's tokens (question and new answer, as the LM embeds them);
//! its mean state c predicts, per edited matrix `W` (`[in, out]`), vectors `a, b` (in), `g, d`
//! (out) and a gate `eta`, and the update is the gradient reshaped by them:
//! `dW = sigmoid(eta) * ((sigmoid(a) g^T) * grad W + sigmoid(b) d^T)` (KE's constrained
//! update, element-wise product). At initialisation only `g`'s bias is non-zero, making the
//! update a plain gradient step of `edit_lr`. Meta-trained like MEND ([`crate::train::meta`]).

use burn::module::{Module, Param};
use burn::nn::{BiLstm, BiLstmConfig, Initializer, Linear, LinearConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::mend::{EditSignal, Hypernetwork};
use crate::model::editable::EditableModel;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeConfig {
    /// fc1 and fc2 of the last `layers` LM layers are edited.
    pub layers: usize,
    /// Hidden size of each LSTM direction.
    pub hidden: usize,
    /// The update at initialisation is `-edit_lr * grad W`.
    pub edit_lr: f64,
}

/// The predictions of one matrix's update from the condition vector.
#[derive(Module, Debug)]
pub struct KeHead {
    pub a: Linear,
    pub b: Linear,
    pub g: Linear,
    pub d: Linear,
    pub eta: Linear,
}

impl KeHead {
    fn new(condition: usize, input: usize, output: usize, edit_lr: f64, device: &Device) -> Self {
        let zero = |i, o| {
            LinearConfig::new(i, o)
                .with_initializer(Initializer::Zeros)
                .init(device)
        };
        let mut g = zero(condition, output);
        // sigmoid(0) * sigmoid(0) * g = -edit_lr  =>  g = -4 edit_lr.
        g.bias = Some(Param::from_tensor(Tensor::full(
            [output],
            -4.0 * edit_lr,
            device,
        )));
        Self {
            a: zero(condition, input),
            b: zero(condition, input),
            g,
            d: zero(condition, output),
            eta: zero(condition, 1),
        }
    }

    /// The update of a matrix with gradient `grad` (`[in, out]`) for condition `c` (`[1, dim]`).
    fn update(&self, c: Tensor<2>, grad: Tensor<2>) -> Tensor<2> {
        let scale = sigmoid(self.a.forward(c.clone()))
            .transpose()
            .matmul(self.g.forward(c.clone()));
        let shift = sigmoid(self.b.forward(c.clone()))
            .transpose()
            .matmul(self.d.forward(c.clone()));
        (scale * grad + shift) * sigmoid(self.eta.forward(c))
    }
}

#[derive(Module, Debug)]
pub struct Ke {
    pub lstm: BiLstm,
    /// fc1 and fc2 of each edited layer, in order.
    pub heads: Vec<KeHead>,
    #[module(skip)]
    pub layers: Vec<usize>,
}

impl Hypernetwork for Ke {
    type Config = KeConfig;
    const NAME: &'static str = "ke";

    fn new(config: &KeConfig, model: &impl EditableModel, device: &Device) -> Self {
        let layers = crate::edit::unike::edited_layers(model, config.layers);
        let embedding = model.hidden_size();
        let heads = layers
            .iter()
            .flat_map(|&l| model.ffn_weights(l))
            .map(|w| {
                let [input, output] = w.dims();
                KeHead::new(2 * config.hidden, input, output, config.edit_lr, device)
            })
            .collect();
        Self {
            lstm: BiLstmConfig::new(embedding, config.hidden, true).init(device),
            heads,
            layers,
        }
    }

    fn check(c: &KeConfig) -> std::result::Result<(), String> {
        (c.layers > 0 && c.hidden > 0 && c.edit_lr > 0.0)
            .then_some(())
            .ok_or_else(|| "layers, hidden and edit_lr must be positive".to_string())
    }

    fn layers(&self) -> &[usize] {
        &self.layers
    }

    fn updates(&self, edit: &EditSignal) -> Vec<Vec<Tensor<2>>> {
        let (states, _) = self.lstm.forward(edit.tokens.clone(), None);
        let c = states.mean_dim(1).squeeze_dim::<2>(1); // [1, 2 hidden]
        // One head per matrix, in layer order.
        let mut heads = self.heads.iter();
        edit.pieces
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|(u, delta)| {
                        let head = heads.next().expect("a head per matrix");
                        head.update(c.clone(), u.clone().transpose().matmul(delta.clone()))
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::Editor;
    use crate::edit::mend::HypernetEditor;
    use crate::edit::serac::tests::{speaker, two_scenes};

    #[test]
    fn at_initialisation_a_ke_edit_lowers_the_edit_loss_and_reset_restores() {
        let (dir, records) = two_scenes(13);
        let device = Device::flex().autodiff();
        let record = &records[0];
        let config = KeConfig {
            layers: 2,
            hidden: 8,
            edit_lr: 1.0,
        };
        let base = speaker(dir.path(), &device);
        let ke = Ke::new(&config, &base.model, &device);
        assert_eq!(ke.layers, [0, 1]);
        let mut editor = HypernetEditor::new(base, ke, &device);
        let loss = |e: &mut HypernetEditor<Ke>| {
            e.speaker
                .loss(Some(&record.image), &record.prompt, &record.target, &device)
                .unwrap()
                .into_scalar::<f32>()
        };
        let before = loss(&mut editor);
        editor.edit(record).unwrap();
        let after = loss(&mut editor);
        assert!(
            after < before,
            "a gradient step lowers the loss: {before} -> {after}"
        );
        editor.reset();
        assert_eq!(loss(&mut editor), before);
    }
}
