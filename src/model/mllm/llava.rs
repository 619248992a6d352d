//! LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP's vision tower read at
//! `vision_feature_layer` (the penultimate layer's output by default, without
//! `post_layernorm`), the class token dropped (`default`) or kept (`full`), a two-layer GELU
//! projector, and the LLaMA LM reading one image token per feature. Field names are the
//! hub's keys (`vision_tower.vision_model...`); 5.x's are mapped onto them when loading.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::text::{TextConfig, TextModel};
use crate::model::clip::{ClipVisionConfig, ClipVisionTransformer};

/// `vision_feature_layer`: one layer index (negative counts from the end of
/// `hidden_states`) or several, whose features are concatenated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayer {
    One(i64),
    Many(Vec<i64>),
}

impl FeatureLayer {
    pub fn layers(&self) -> Vec<i64> {
        match self {
            Self::One(l) => vec![*l],
            Self::Many(ls) => ls.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSelect {
    /// Drop the class token.
    Default,
    /// Keep it.
    Full,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    pub text_config: TextConfig,
    #[serde(default = "default_image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "default_act")]
    pub projector_hidden_act: String,
    #[serde(default = "default_select")]
    pub vision_feature_select_strategy: FeatureSelect,
    #[serde(default = "default_layer")]
    pub vision_feature_layer: FeatureLayer,
    #[serde(default = "yes")]
    pub multimodal_projector_bias: bool,
}

fn default_image_token() -> u32 {
    32000
}
fn default_act() -> String {
    "gelu".into()
}
fn default_select() -> FeatureSelect {
    FeatureSelect::Default
}
fn default_layer() -> FeatureLayer {
    FeatureLayer::One(-2)
}
fn yes() -> bool {
    true
}

impl LlavaConfig {
    /// `hidden_states` has one entry per layer plus the embeddings.
    fn layer_indices(&self) -> Result<Vec<usize>, String> {
        let states = self.vision_config.num_hidden_layers as i64 + 1;
        self.vision_feature_layer
            .layers()
            .into_iter()
            .map(|l| {
                let i = if l < 0 { states + l } else { l };
                if (0..states).contains(&i) {
                    Ok(i as usize)
                } else {
                    Err(format!(
                        "vision_feature_layer {l} is outside the tower's {states} hidden states"
                    ))
                }
            })
            .collect()
    }

    pub fn check(&self) -> Result<(), String> {
        if self.projector_hidden_act != "gelu" {
            return Err(format!(
                "projector_hidden_act '{}': only gelu is supported",
                self.projector_hidden_act
            ));
        }
        let v = &self.vision_config;
        if v.hidden_size % v.num_attention_heads != 0 || v.image_size % v.patch_size != 0 {
            return Err("vision_config: sizes do not fit together".into());
        }
        self.layer_indices()?;
        self.text_config.check()
    }

    /// Image tokens per image: one per selected feature.
    pub fn image_tokens(&self) -> usize {
        let patches = (self.vision_config.image_size / self.vision_config.patch_size).pow(2);
        match self.vision_feature_select_strategy {
            FeatureSelect::Default => patches,
            FeatureSelect::Full => patches + 1,
        }
    }
}

/// `vision_tower`: `CLIPVisionModel`, whose only child is `vision_model`.
#[derive(Module, Debug)]
pub struct ClipVisionModel {
    pub vision_model: ClipVisionTransformer,
}

#[derive(Module, Debug)]
pub struct LlavaMultiModalProjector {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

#[derive(Module, Debug)]
pub struct LlavaForConditionalGeneration {
    pub vision_tower: ClipVisionModel,
    pub multi_modal_projector: LlavaMultiModalProjector,
    pub language_model: TextModel,
    /// How many text tokens (BOS first) the image follows in the editors' layout: 1 (right
    /// after BOS) unless a prompt template puts it later (`LmBatcher::with_template`).
    pub image_at: usize,
    #[module(skip)]
    layers: Vec<usize>,
    #[module(skip)]
    keep_class: bool,
}

/// The image path's outputs.
#[derive(Debug, Clone)]
pub struct LlavaImageOutput {
    /// `[batch, tokens, vision hidden x layers]`: the selected features.
    pub vision: Tensor<3>,
    /// `[batch, tokens, LM hidden]`: what replaces the image tokens' embeddings.
    pub projected: Tensor<3>,
}

impl LlavaForConditionalGeneration {
    /// `config` must have passed [`LlavaConfig::check`].
    pub fn new(config: &LlavaConfig, device: &Device) -> Self {
        let layers = config.layer_indices().expect("a checked config");
        let d_in = config.vision_config.hidden_size * layers.len();
        let d = config.text_config.hidden_size();
        let bias = config.multimodal_projector_bias;
        let linear = |i, o| LinearConfig::new(i, o).with_bias(bias).init(device);
        Self {
            vision_tower: ClipVisionModel {
                vision_model: ClipVisionTransformer::new(&config.vision_config, device),
            },
            multi_modal_projector: LlavaMultiModalProjector {
                linear_1: linear(d_in, d),
                linear_2: linear(d, d),
            },
            language_model: TextModel::new(&config.text_config, device),
            image_at: 1,
            layers,
            keep_class: config.vision_feature_select_strategy == FeatureSelect::Full,
        }
    }

    /// The deepest vision encoder layer whose output the features read (`None` when they
    /// read only the embeddings): `hidden_states[i]` is layer `i - 1`'s output.
    pub fn last_feature_layer(&self) -> Option<usize> {
        self.layers
            .iter()
            .copied()
            .max()
            .and_then(|i| i.checked_sub(1))
    }

    /// Image tokens per image: the tower's patches, and its class token under `full`.
    pub fn image_tokens(&self) -> usize {
        let positions = self
            .vision_tower
            .vision_model
            .embeddings
            .position_embedding
            .weight
            .dims()[0];
        positions - usize::from(!self.keep_class)
    }

    pub fn image_features(&self, pixel_values: Tensor<4>) -> LlavaImageOutput {
        let deepest = self.layers.iter().copied().max().unwrap_or(0);
        let states = self
            .vision_tower
            .vision_model
            .hidden_states(pixel_values, deepest);
        let selected: Vec<Tensor<3>> = self.layers.iter().map(|&i| states[i].clone()).collect();
        let mut vision = Tensor::cat(selected, 2);
        if !self.keep_class {
            let [_, n, _] = vision.dims();
            vision = vision.narrow(1, 1, n - 1);
        }
        let [batch, n, width] = vision.dims();
        let p = &self.multi_modal_projector;
        let h = gelu(
            p.linear_1
                .forward(vision.clone().reshape([batch * n, width])),
        );
        let projected = p.linear_2.forward(h);
        let d = projected.dims()[1];
        LlavaImageOutput {
            vision,
            projected: projected.reshape([batch, n, d]),
        }
    }
}
