//! CLIP's vision tower (`vision_model`): patch embedding, class token, position embeddings,
//! `pre_layrnorm` (sic, the Hugging Face name), the encoder, and `post_layernorm` on the
//! class token.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm};
use burn::tensor::{Device, Tensor};

use super::config::ClipVisionConfig;
use super::encoder::{ClipEncoder, EncoderDims, layer_norm};

#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings {
    pub class_embedding: Param<Tensor<1>>,
    pub patch_embedding: Conv2d,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipVisionTransformer {
    pub embeddings: ClipVisionEmbeddings,
    pub pre_layrnorm: LayerNorm,
    pub encoder: ClipEncoder,
    pub post_layernorm: LayerNorm,
}

/// The vision tower's outputs.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `[batch, 1 + patches, hidden]`: the encoder's output, class token first (before
    /// `post_layernorm`, as in `transformers`).
    pub last_hidden_state: Tensor<3>,
    /// `[batch, hidden]`: `post_layernorm` of the class token.
    pub pooled: Tensor<2>,
}

impl ClipVisionOutput {
    /// `[batch, patches, hidden]`: the patch tokens, which the attention fusions attend over.
    pub fn patch_tokens(&self) -> Tensor<3> {
        let [_, tokens, _] = self.last_hidden_state.dims();
        self.last_hidden_state.clone().narrow(1, 1, tokens - 1)
    }
}

impl ClipVisionTransformer {
    /// Every output token (class token first) through `post_layernorm`, as CLIP treats its
    /// class token: `[batch, 1 + patches, hidden]`.
    pub fn normed_tokens(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let hidden = self.forward(pixel_values).last_hidden_state;
        let [batch, n, d] = hidden.dims();
        self.post_layernorm
            .forward(hidden.reshape([batch * n, d]))
            .reshape([batch, n, d])
    }

    pub fn new(config: &ClipVisionConfig, device: &Device) -> Self {
        let dims = EncoderDims {
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_heads: config.num_attention_heads,
            num_layers: config.num_hidden_layers,
            activation: config.hidden_act,
            layer_norm_eps: config.layer_norm_eps,
        };
        let d = config.hidden_size;
        let patch = config.patch_size;
        Self {
            embeddings: ClipVisionEmbeddings {
                class_embedding: Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                }
                .init([d], device),
                patch_embedding: Conv2dConfig::new([config.num_channels, d], [patch, patch])
                    .with_stride([patch, patch])
                    .with_bias(false)
                    .init(device),
                position_embedding: EmbeddingConfig::new(config.num_positions(), d).init(device),
            },
            pre_layrnorm: layer_norm(d, config.layer_norm_eps, device),
            encoder: ClipEncoder::new(&dims, device),
            post_layernorm: layer_norm(d, config.layer_norm_eps, device),
        }
    }

    /// Patch embeddings with the class token first and the position embeddings added,
    /// `[batch, 1 + patches, hidden]` (before `pre_layrnorm`).
    fn embed(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let batch = pixel_values.dims()[0];
        let patches = self.embeddings.patch_embedding.forward(pixel_values); // [b, d, g, g]
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([batch, d, gh * gw]).swap_dims(1, 2);
        let class = self
            .embeddings
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .expand([batch, 1, d]);
        let positions = self
            .embeddings
            .position_embedding
            .weight
            .val()
            .unsqueeze_dim::<3>(0);
        Tensor::cat(vec![class, patches], 1) + positions
    }

    /// `transformers`' `hidden_states` up to layer `layers`: the encoder's input (after
    /// `pre_layrnorm`), then each layer's output; `layers + 1` tensors.
    pub fn hidden_states(&self, pixel_values: Tensor<4>, layers: usize) -> Vec<Tensor<3>> {
        let mut x = self.pre_layrnorm.forward(self.embed(pixel_values));
        let mut states = vec![x.clone()];
        for layer in self.encoder.layers.iter().take(layers) {
            x = layer.forward(x, None);
            states.push(x.clone());
        }
        states
    }

    /// `pixel_values`: `[batch, channels, image_size, image_size]`, CLIP-normalized.
    pub fn forward(&self, pixel_values: Tensor<4>) -> ClipVisionOutput {
        let batch = pixel_values.dims()[0];
        let x = self.embed(pixel_values);
        let d = x.dims()[2];
        let last_hidden_state = self.encoder.forward(self.pre_layrnorm.forward(x), None);
        let class_token = last_hidden_state
            .clone()
            .narrow(1, 0, 1)
            .reshape([batch, d]);
        let pooled = self.post_layernorm.forward(class_token);
        ClipVisionOutput {
            last_hidden_state,
            pooled,
        }
    }
}
