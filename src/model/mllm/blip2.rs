//! BLIP-2 (`Blip2ForConditionalGeneration`): an EVA ViT (`vision_model`), the Q-Former
//! (`qformer`, BERT-style, post-LN) reading it through cross-attention from learned
//! `query_tokens`, `language_projection` into the LM's width, and the LM (`language_model`:
//! OPT, or LLaMA for MiniGPT-4's shape). Field names are the Hugging Face keys.

#![allow(non_snake_case)] // `LayerNorm` is the BERT-style key name.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::text::{TextConfig, TextModel};
use crate::model::clip::encoder::{apply, layer_norm, linear_with_bias as linear};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Blip2VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
}

impl Default for Blip2VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Blip2QFormerConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub cross_attention_frequency: usize,
    /// The vision tower's width; `Blip2Config` sets it from `vision_config`.
    pub encoder_hidden_size: Option<usize>,
    /// The Q-Former's text path (InstructBLIP's prompt in the Q-Former); unused here.
    pub use_qformer_text_input: bool,
}

impl Default for Blip2QFormerConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            cross_attention_frequency: 2,
            encoder_hidden_size: None,
            use_qformer_text_input: false,
        }
    }
}

/// A Hugging Face `Blip2Config` (`config.json` of `Blip2ForConditionalGeneration`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Blip2Config {
    #[serde(default)]
    pub vision_config: Blip2VisionConfig,
    #[serde(default)]
    pub qformer_config: Blip2QFormerConfig,
    pub text_config: TextConfig,
    #[serde(default = "default_query_tokens")]
    pub num_query_tokens: usize,
    /// The token whose embeddings the projected queries replace; configs written before
    /// transformers placed image tokens lack it.
    #[serde(default, alias = "image_token_id")]
    pub image_token_index: Option<u32>,
}

fn default_query_tokens() -> usize {
    32
}

impl Blip2Config {
    pub fn check(&self) -> Result<(), String> {
        let v = &self.vision_config;
        let q = &self.qformer_config;
        if v.hidden_act != "gelu" || q.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act '{}' / '{}': only gelu is supported",
                v.hidden_act, q.hidden_act
            ));
        }
        if v.hidden_size % v.num_attention_heads != 0 || q.hidden_size % q.num_attention_heads != 0
        {
            return Err("a hidden size is not a multiple of its number of heads".into());
        }
        if v.image_size % v.patch_size != 0 {
            return Err(format!(
                "image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if q.cross_attention_frequency == 0 {
            return Err("cross_attention_frequency must be positive".into());
        }
        if self.image_token_index.is_none() {
            return Err(
                "no image_token_index: this config predates image tokens in the \
                        prompt; add the processor's image token id (\"image_token_index\")"
                    .into(),
            );
        }
        self.text_config.check()
    }
}

/// Unmasked multi-head attention of `q` (`[b, n, h*d]`) over `k`, `v` (`[b, m, h*d]`).
fn multi_head(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    let [batch, n, width] = q.dims();
    let m = k.dims()[1];
    let hd = width / heads;
    let split = |t: Tensor<3>, len: usize| t.reshape([batch, len, heads, hd]).swap_dims(1, 2);
    let context = attention(
        split(q, n),
        split(k, m),
        split(v, m),
        None,
        None,
        AttentionModuleOptions::default(),
    );
    context.swap_dims(1, 2).reshape([batch, n, width])
}

#[derive(Module, Debug)]
pub struct Blip2VisionEmbeddings {
    /// `[1, 1, hidden]`.
    pub class_embedding: Param<Tensor<3>>,
    pub patch_embedding: Conv2d,
    /// `[1, patches + 1, hidden]`, a raw parameter (no `.weight`).
    pub position_embedding: Param<Tensor<3>>,
}

/// The fused `qkv` projection (its bias stored whole: q, zeros for k, v) and `projection`.
#[derive(Module, Debug)]
pub struct Blip2Attention {
    pub qkv: Linear,
    pub projection: Linear,
    #[module(skip)]
    heads: usize,
}

impl Blip2Attention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = x.dims()[2];
        let qkv = apply(&self.qkv, x);
        let part = |i: usize| qkv.clone().narrow(2, i * d, d);
        let context = multi_head(part(0), part(1), part(2), self.heads);
        apply(&self.projection, context)
    }
}

#[derive(Module, Debug)]
pub struct Blip2Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Module, Debug)]
pub struct Blip2EncoderLayer {
    pub self_attn: Blip2Attention,
    pub layer_norm1: LayerNorm,
    pub mlp: Blip2Mlp,
    pub layer_norm2: LayerNorm,
}

impl Blip2EncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let h = gelu(apply(&self.mlp.fc1, self.layer_norm2.forward(x.clone())));
        x + apply(&self.mlp.fc2, h)
    }
}

#[derive(Module, Debug)]
pub struct Blip2Encoder {
    pub layers: Vec<Blip2EncoderLayer>,
}

/// The EVA ViT: pre-LN layers, exact GELU, no pre-LayerNorm, `post_layernorm` on every token.
#[derive(Module, Debug)]
pub struct Blip2VisionModel {
    pub embeddings: Blip2VisionEmbeddings,
    pub encoder: Blip2Encoder,
    pub post_layernorm: LayerNorm,
}

impl Blip2VisionModel {
    fn new(c: &Blip2VisionConfig, device: &Device) -> Self {
        let d = c.hidden_size;
        let patches = (c.image_size / c.patch_size).pow(2);
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let layer = || Blip2EncoderLayer {
            self_attn: Blip2Attention {
                qkv: linear(d, 3 * d, c.qkv_bias, device),
                projection: linear(d, d, true, device),
                heads: c.num_attention_heads,
            },
            layer_norm1: layer_norm(d, c.layer_norm_eps, device),
            mlp: Blip2Mlp {
                fc1: linear(d, c.intermediate_size, true, device),
                fc2: linear(c.intermediate_size, d, true, device),
            },
            layer_norm2: layer_norm(d, c.layer_norm_eps, device),
        };
        Self {
            embeddings: Blip2VisionEmbeddings {
                class_embedding: init.init([1, 1, d], device),
                patch_embedding: Conv2dConfig::new([c.num_channels, d], [c.patch_size; 2])
                    .with_stride([c.patch_size; 2])
                    .init(device),
                position_embedding: init.init([1, patches + 1, d], device),
            },
            encoder: Blip2Encoder {
                layers: (0..c.num_hidden_layers).map(|_| layer()).collect(),
            },
            post_layernorm: layer_norm(d, c.layer_norm_eps, device),
        }
    }

    /// `[batch, 1 + patches, hidden]`, after `post_layernorm` (what the Q-Former reads).
    pub fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let batch = pixel_values.dims()[0];
        let patches = self.embeddings.patch_embedding.forward(pixel_values);
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([batch, d, gh * gw]).swap_dims(1, 2);
        let class = self.embeddings.class_embedding.val().expand([batch, 1, d]);
        let x = Tensor::cat(vec![class, patches], 1) + self.embeddings.position_embedding.val();
        let x = self
            .encoder
            .layers
            .iter()
            .fold(x, |x, layer| layer.forward(x));
        self.post_layernorm.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct QFormerMultiHeadAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    #[module(skip)]
    heads: usize,
}

/// `dense`, then `LayerNorm(dense(x) + residual)`.
#[derive(Module, Debug)]
pub struct QFormerOutput {
    pub dense: Linear,
    pub LayerNorm: LayerNorm,
}

impl QFormerOutput {
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.LayerNorm.forward(apply(&self.dense, x) + residual)
    }
}

#[derive(Module, Debug)]
pub struct QFormerAttention {
    pub attention: QFormerMultiHeadAttention,
    pub output: QFormerOutput,
}

impl QFormerAttention {
    /// Attention of `x` over `context` (itself for self-attention), then the output block.
    fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let a = &self.attention;
        let mixed = multi_head(
            apply(&a.query, x.clone()),
            apply(&a.key, context.clone()),
            apply(&a.value, context),
            a.heads,
        );
        self.output.forward(mixed, x)
    }
}

#[derive(Module, Debug)]
pub struct QFormerIntermediate {
    pub dense: Linear,
}

#[derive(Module, Debug)]
pub struct QFormerLayer {
    pub attention: QFormerAttention,
    /// Present in layers `j % cross_attention_frequency == 0`.
    pub crossattention: Option<QFormerAttention>,
    pub intermediate_query: QFormerIntermediate,
    pub output_query: QFormerOutput,
}

impl QFormerLayer {
    fn forward(&self, x: Tensor<3>, image: Tensor<3>) -> Tensor<3> {
        let mut x = self.attention.forward(x.clone(), x);
        if let Some(cross) = &self.crossattention {
            x = cross.forward(x, image);
        }
        let h = gelu(apply(&self.intermediate_query.dense, x.clone()));
        self.output_query.forward(h, x)
    }
}

#[derive(Module, Debug)]
pub struct QFormerEncoder {
    pub layer: Vec<QFormerLayer>,
}

#[derive(Module, Debug)]
pub struct Blip2QFormerModel {
    pub layernorm: LayerNorm,
    pub encoder: QFormerEncoder,
}

impl Blip2QFormerModel {
    fn new(c: &Blip2QFormerConfig, vision_width: usize, device: &Device) -> Self {
        let d = c.hidden_size;
        let encoder_width = c.encoder_hidden_size.unwrap_or(vision_width);
        let attention = |kv_width: usize| QFormerAttention {
            attention: QFormerMultiHeadAttention {
                query: linear(d, d, true, device),
                key: linear(kv_width, d, true, device),
                value: linear(kv_width, d, true, device),
                heads: c.num_attention_heads,
            },
            output: QFormerOutput {
                dense: linear(d, d, true, device),
                LayerNorm: layer_norm(d, c.layer_norm_eps, device),
            },
        };
        let layer = |j: usize| QFormerLayer {
            attention: attention(d),
            crossattention: (j % c.cross_attention_frequency == 0)
                .then(|| attention(encoder_width)),
            intermediate_query: QFormerIntermediate {
                dense: linear(d, c.intermediate_size, true, device),
            },
            output_query: QFormerOutput {
                dense: linear(c.intermediate_size, d, true, device),
                LayerNorm: layer_norm(d, c.layer_norm_eps, device),
            },
        };
        Self {
            layernorm: layer_norm(d, c.layer_norm_eps, device),
            encoder: QFormerEncoder {
                layer: (0..c.num_hidden_layers).map(layer).collect(),
            },
        }
    }

    /// The queries (`[batch, Q, hidden]`) after every layer, reading `image`.
    pub fn forward(&self, queries: Tensor<3>, image: Tensor<3>) -> Tensor<3> {
        let x = self.layernorm.forward(queries);
        self.encoder
            .layer
            .iter()
            .fold(x, |x, layer| layer.forward(x, image.clone()))
    }
}

#[derive(Module, Debug)]
pub struct Blip2ForConditionalGeneration {
    pub vision_model: Blip2VisionModel,
    /// `[1, Q, qformer hidden]`.
    pub query_tokens: Param<Tensor<3>>,
    pub qformer: Blip2QFormerModel,
    pub language_projection: Linear,
    pub language_model: TextModel,
}

/// The image path's outputs, for parity checks and for editors that read them.
#[derive(Debug, Clone)]
pub struct Blip2ImageOutput {
    /// `[batch, 1 + patches, vision hidden]`.
    pub vision: Tensor<3>,
    /// `[batch, Q, qformer hidden]`.
    pub qformer: Tensor<3>,
    /// `[batch, Q, LM hidden]`: what replaces the image tokens' embeddings.
    pub projected: Tensor<3>,
}

impl Blip2ForConditionalGeneration {
    pub fn new(config: &Blip2Config, device: &Device) -> Self {
        let q = &config.qformer_config;
        Self {
            vision_model: Blip2VisionModel::new(&config.vision_config, device),
            query_tokens: Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, config.num_query_tokens, q.hidden_size], device),
            qformer: Blip2QFormerModel::new(q, config.vision_config.hidden_size, device),
            language_projection: linear(
                q.hidden_size,
                config.text_config.hidden_size(),
                true,
                device,
            ),
            language_model: TextModel::new(&config.text_config, device),
        }
    }

    pub fn image_features(&self, pixel_values: Tensor<4>) -> Blip2ImageOutput {
        let vision = self.vision_model.forward(pixel_values);
        let batch = vision.dims()[0];
        let [_, q, h] = self.query_tokens.dims();
        let queries = self.query_tokens.val().expand([batch, q, h]);
        let qformer = self.qformer.forward(queries, vision.clone());
        let projected = apply(&self.language_projection, qformer.clone());
        Blip2ImageOutput {
            vision,
            qformer,
            projected,
        }
    }
}
