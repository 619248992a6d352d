//! SERAC's counterfactual model on a real MLLM, as MSCKE's authors released it: a causal LM
//! (OPT-125m beside BLIP-2 OPT-2.7B, or a copy of the base model's own LM) that reads the base
//! model's visual tokens through a new projection, then the routed edit as context and the
//! query. The base model's image path stays frozen; the projection and the LM train.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use std::path::Path;

use burn::tensor::{Device, Int, Tensor};

use super::text::TextModel;
use super::{MllmNet, forward_with_image};
use crate::model::editable::EditableModel;
use crate::model::lm::{ExtraNeurons, Hooks, LmOutput};

#[derive(Module, Debug)]
pub struct CounterfactualMllm {
    /// The base model, frozen: only its image path runs (what replaces its image tokens).
    pub base: MllmNet,
    /// The base LM's width -> this LM's width.
    pub projection: Linear,
    pub language_model: TextModel,
    /// After how many text tokens (BOS first) the image goes: the base model's placement
    /// unless the counterfactual LM's own tokenizer counts the template differently.
    pub image_at: usize,
}

impl CounterfactualMllm {
    /// `language_model` reading `base`'s visual tokens. The projection starts as the identity
    /// when the two widths agree (an untrained counterfactual model then sees the image as the
    /// base LM does), else at Burn's default initialisation.
    pub fn new(base: &MllmNet, language_model: TextModel, device: &Device) -> Self {
        let (from, to) = (base.hidden_size(), language_model.hidden_size());
        let mut projection = LinearConfig::new(from, to).init(device);
        if from == to {
            projection.weight = Param::from_tensor(Tensor::eye(from, device));
            projection.bias = projection
                .bias
                .map(|_| Param::from_tensor(Tensor::zeros([to], device)));
        }
        Self {
            base: base.clone().no_grad(),
            projection,
            language_model,
            image_at: base.image_at(),
        }
    }

    /// The counterfactual model whose LM is a copy of the base model's own.
    pub fn from_base(base: &MllmNet, device: &Device) -> Self {
        Self::new(base, base.language_model().clone(), device)
    }

    /// `[batch, image tokens, hidden]`: the base model's visual tokens in this LM's width.
    pub fn image_embeddings(&self, pixels: Tensor<4>) -> Tensor<3> {
        let visual = self
            .base
            .image_embeddings(pixels.cast(self.base.language_model().dtype()))
            .detach();
        let dtype = self.projection.weight.val().dtype();
        self.projection
            .forward(visual.cast(dtype))
            .cast(self.language_model.dtype())
    }

    fn image_tokens(&self) -> usize {
        self.base.image_tokens()
    }
}

impl EditableModel for CounterfactualMllm {
    /// The image's tokens go after the first [`Self::image_at`] text tokens (first of all, as
    /// in BLIP-2, when that is 0).
    fn forward(
        &self,
        pixels: Option<Tensor<4>>,
        ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput {
        let at = self.image_at.min(ids.dims()[1]);
        let text = self.language_model.embed_tokens(ids);
        let image = pixels.map(|p| self.image_embeddings(p));
        forward_with_image(&self.language_model, text, attention_mask, image, at, hooks)
    }

    fn generate(
        &self,
        pixels: Option<Tensor<4>>,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        hooks: &Hooks,
    ) -> Vec<u32> {
        let device = self.language_model.embed_tokens_device();
        crate::model::editable::greedy_decode(prompt, 1, max_new, eos, &device, |ids, mask| {
            self.forward(pixels.clone(), ids, mask, hooks).logits
        })
    }

    fn text_capacity(&self, with_image: bool) -> usize {
        let image = if with_image { self.image_tokens() } else { 0 };
        self.language_model.max_positions().saturating_sub(image)
    }

    fn sequence_position(&self, t: usize, with_image: bool) -> usize {
        if with_image && t >= self.image_at {
            self.image_tokens() + t
        } else {
            t
        }
    }

    fn num_layers(&self) -> usize {
        self.language_model.num_layers()
    }

    fn hidden_size(&self) -> usize {
        self.language_model.hidden_size()
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.language_model.embed_tokens(ids)
    }

    fn ffn_weights(&self, layer: usize) -> Vec<Tensor<2>> {
        self.language_model.ffn_weights(layer)
    }

    fn add_to_ffn_weights(&mut self, layer: usize, deltas: Vec<Tensor<2>>) {
        self.language_model.add_to_ffn_weights(layer, deltas);
    }

    fn extra_neurons(&self, layer: usize) -> &[ExtraNeurons] {
        self.language_model.extra_neurons(layer)
    }

    fn extra_neurons_mut(&mut self, layer: usize) -> &mut Vec<ExtraNeurons> {
        self.language_model.extra_neurons_mut(layer)
    }

    fn memory_attention(&self, layer: usize) -> &dyn crate::model::lm::MemoryAttention {
        self.language_model.memory_attention(layer)
    }

    fn train_only_lm_layers(self, layers: &[usize]) -> Self {
        let Self {
            base,
            projection,
            language_model,
            image_at,
        } = self;
        Self {
            base,
            projection: projection.no_grad(),
            language_model: language_model.train_only_layers(layers),
            image_at,
        }
    }

    /// The projection alone: the base model's image path stays frozen.
    fn train_only_visual(self) -> Self {
        let Self {
            base,
            projection,
            language_model,
            image_at,
        } = self;
        Self {
            base,
            projection: projection.set_require_grad(true),
            language_model: language_model.no_grad(),
            image_at,
        }
    }
}

/// Writes what trains (`projection.bpk`, `language_model.bpk`) into `out`; the base model is
/// the user's and stays where it is.
pub fn save(model: &CounterfactualMllm, out: &Path) -> crate::Result<()> {
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    crate::error::save_module(&model.projection, &out.join("projection.bpk"))?;
    crate::error::save_module(&model.language_model, &out.join("language_model.bpk"))
}

/// Whether `dir` holds a trained counterfactual model ([`save`]).
pub fn is_trained(dir: &Path) -> bool {
    dir.join("projection.bpk").is_file() && dir.join("language_model.bpk").is_file()
}

/// `model` with the projection and LM trained into `dir`.
pub fn load(mut model: CounterfactualMllm, dir: &Path) -> crate::Result<CounterfactualMllm> {
    let weights_error = |path: &Path, e: &dyn std::fmt::Display| crate::Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let path = dir.join("projection.bpk");
    model.projection = model
        .projection
        .try_load_file(&path)
        .map_err(|e| weights_error(&path, &e))?;
    let path = dir.join("language_model.bpk");
    model.language_model = model
        .language_model
        .try_load_file(&path)
        .map_err(|e| weights_error(&path, &e))?;
    Ok(model)
}
