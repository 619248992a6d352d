//! The language model inside a multimodal LLM: OPT (BLIP-2 OPT) or LLaMA (MiniGPT-4's Vicuna,
//! LLaVA), chosen by the `text_config`'s `model_type`. The enum is transparent in weight
//! names (`language_model.model.decoder...` or `language_model.model.layers...`).

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::llama::{LlamaConfig, LlamaForCausalLM};
use crate::model::lm::{ExtraNeurons, Hooks, KvCache, LmOutput, OptConfig, OptForCausalLM};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type", rename_all = "lowercase")]
pub enum TextConfig {
    Opt(OptConfig),
    Llama(LlamaConfig),
}

impl TextConfig {
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Opt(c) => c.hidden_size,
            Self::Llama(c) => c.hidden_size,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Opt(c) => c.vocab_size,
            Self::Llama(c) => c.vocab_size,
        }
    }

    /// The token that ends an answer.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Self::Opt(c) => Some(c.eos_token_id),
            Self::Llama(c) => match &c.eos_token_id {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32),
                Some(serde_json::Value::Array(ids)) => {
                    ids.first().and_then(|n| n.as_u64()).map(|n| n as u32)
                }
                _ => None,
            },
        }
    }

    /// The padding token, where the config names one.
    pub fn pad_token_id(&self) -> Option<u32> {
        match self {
            Self::Opt(c) => Some(c.pad_token_id),
            Self::Llama(c) => c.pad_token_id,
        }
    }

    pub fn check(&self) -> Result<(), String> {
        match self {
            Self::Opt(c) => c.check(),
            Self::Llama(c) => c.check(),
        }
        .map_err(|e| format!("text_config: {e}"))
    }
}

#[derive(Module, Debug)]
pub enum TextModel {
    Opt(OptForCausalLM),
    Llama(LlamaForCausalLM),
}

impl TextModel {
    pub fn new(config: &TextConfig, device: &Device) -> Self {
        match config {
            TextConfig::Opt(c) => Self::Opt(OptForCausalLM::new(c, device)),
            TextConfig::Llama(c) => Self::Llama(LlamaForCausalLM::new(c, device)),
        }
    }

    /// A causal LM on its own (`OPTForCausalLM`, `LlamaForCausalLM`) from a Hugging Face
    /// model directory (`config.json` and its weight files), held in `dtype`: a small LM for
    /// SERAC's counterfactual model (OPT-125m beside BLIP-2 OPT-2.7B). Also reads `OPTModel`
    /// saves (keys `decoder.*`).
    pub fn load(
        dir: &std::path::Path,
        device: &Device,
        dtype: burn::tensor::DType,
    ) -> crate::Result<Self> {
        super::check_dtype(dtype, device)?;
        let path = dir.join("config.json");
        let config: TextConfig = crate::error::read_json_config(&path, |c: &TextConfig| c.check())?;
        let tied = match &config {
            TextConfig::Opt(_) => true,
            TextConfig::Llama(c) => c.tie_word_embeddings,
        };
        let renames = [(r"^decoder\.", "model.decoder.")];
        let unused = move |key: &str| tied && key == "lm_head.weight";
        super::weights::load_dir(
            Self::new(&config, device),
            dir,
            &super::weights::KeyMap {
                renames: &renames,
                unused: &unused,
            },
            dtype,
            super::weights::GROUP_BYTES,
        )
    }

    /// The dtype of the weights (that of the token embeddings).
    pub fn dtype(&self) -> burn::tensor::DType {
        match self {
            Self::Opt(m) => m.model.decoder.embed_tokens.weight.val().dtype(),
            Self::Llama(m) => m.model.embed_tokens.weight.val().dtype(),
        }
    }

    /// `[batch, seq, hidden]`.
    pub fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            Self::Opt(m) => m.embed_tokens(ids),
            Self::Llama(m) => m.embed_tokens(ids),
        }
    }

    /// Logits `[batch, seq, vocab]` from input embeddings (`attention_mask` 1 for tokens, 0
    /// for padding). OPT numbers positions by the mask, LLaMA `0..seq`, as each does.
    pub fn forward_embeds(&self, embeds: Tensor<3>, attention_mask: Tensor<2, Int>) -> Tensor<3> {
        self.forward_hooked(embeds, attention_mask, &Hooks::default())
            .logits
    }

    /// The forward pass with editing hooks (see [`Hooks`]; on LLaMA the attention shifts and
    /// captures, [`LlamaForCausalLM::forward_hooked`]).
    pub fn forward_hooked(
        &self,
        embeds: Tensor<3>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput {
        match self {
            Self::Opt(m) => m.forward_embeds(embeds, attention_mask, hooks),
            Self::Llama(m) => m.forward_hooked(embeds, attention_mask, hooks),
        }
    }

    /// Logits of new tokens after those in `cache`, extending it (greedy generation).
    pub fn forward_cached(&self, embeds: Tensor<3>, cache: &mut KvCache) -> Tensor<3> {
        match self {
            Self::Opt(m) => m.forward_cached(embeds, cache),
            Self::Llama(m) => m.forward_cached(embeds, cache),
        }
    }

    /// The positions the LM reads (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Opt(m) => {
                m.model.decoder.embed_positions.weight.dims()[0] - crate::model::lm::POSITION_OFFSET
            }
            Self::Llama(m) => m.max_positions(),
        }
    }

    /// The device the weights are on.
    pub fn embed_tokens_device(&self) -> burn::tensor::Device {
        match self {
            Self::Opt(m) => m.model.decoder.embed_tokens.weight.device(),
            Self::Llama(m) => m.model.embed_tokens.weight.device(),
        }
    }

    /// Layer `layer`'s FFN weights (`[in, out]`; OPT: fc1, fc2; LLaMA: gate, up, down).
    pub fn ffn_weights(&self, layer: usize) -> Vec<Tensor<2>> {
        match self {
            Self::Opt(m) => m.ffn_weights(layer),
            Self::Llama(m) => m.ffn_weights(layer),
        }
    }

    /// Adds changes (as [`Self::ffn_weights`] orders them) to layer `layer`'s FFN weights.
    pub fn add_to_ffn_weights(&mut self, layer: usize, deltas: Vec<Tensor<2>>) {
        match self {
            Self::Opt(m) => m.add_to_ffn_weights(layer, deltas),
            Self::Llama(m) => m.add_to_ffn_weights(layer, deltas),
        }
    }

    /// The LM's width.
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Opt(m) => m.model.decoder.embed_tokens.weight.dims()[1],
            Self::Llama(m) => m.model.embed_tokens.weight.dims()[1],
        }
    }

    /// Only the given layers train; every other parameter is frozen.
    pub fn train_only_layers(self, layers: &[usize]) -> Self {
        match self {
            Self::Opt(m) => Self::Opt(m.train_only_layers(layers)),
            Self::Llama(m) => Self::Llama(m.train_only_layers(layers)),
        }
    }

    /// Layer `index`'s extra FFN key-value pairs.
    pub fn extra_neurons(&self, index: usize) -> &[ExtraNeurons] {
        match self {
            Self::Opt(m) => &m.model.decoder.layers[index].extra,
            Self::Llama(m) => &m.model.layers[index].extra,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::Opt(m) => m.num_layers(),
            Self::Llama(m) => m.num_layers(),
        }
    }

    /// Layer `index`'s self-attention as UniKE's latent in-context editing reads it.
    pub fn memory_attention(&self, index: usize) -> &dyn crate::model::lm::MemoryAttention {
        match self {
            Self::Opt(m) => &m.model.decoder.layers[index],
            Self::Llama(m) => &m.model.layers[index],
        }
    }

    /// Layer `index`'s extra FFN key-value pairs (T-Patcher's neurons, UniKE eq. 3).
    pub fn extra_neurons_mut(&mut self, index: usize) -> &mut Vec<ExtraNeurons> {
        match self {
            Self::Opt(m) => &mut m.model.decoder.layers[index].extra,
            Self::Llama(m) => &mut m.model.layers[index].extra,
        }
    }
}
