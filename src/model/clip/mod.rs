//! CLIP in Hugging Face layout: the module tree mirrors `transformers`' `CLIPModel` key names
//! (`vision_model.encoder.layers.0.self_attn.q_proj.weight`, ...), so `model.safetensors`
//! loads with no remapping table.

pub mod config;
pub mod encoder;
pub mod pretrained;
pub mod text;
pub mod vision;
pub mod weights;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Int, Tensor};

pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use pretrained::{Clip, Embeddings};
pub use text::{ClipTextOutput, ClipTextTransformer};
pub use vision::{ClipVisionOutput, ClipVisionTransformer};

#[derive(Module, Debug)]
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    pub text_projection: Linear,
    pub visual_projection: Linear,
    /// Stored with shape `[1]`; the file's rank-0 tensor is reshaped on load and export.
    pub logit_scale: Param<Tensor<1>>,
}

impl ClipModel {
    /// A randomly initialised CLIP of the given sizes.
    pub fn new(config: &ClipConfig, device: &Device) -> Self {
        let projection = |d_in| {
            LinearConfig::new(d_in, config.projection_dim)
                .with_bias(false)
                .init(device)
        };
        Self {
            text_model: ClipTextTransformer::new(&config.text_config, device),
            vision_model: ClipVisionTransformer::new(&config.vision_config, device),
            text_projection: projection(config.text_config.hidden_size),
            visual_projection: projection(config.vision_config.hidden_size),
            logit_scale: Param::from_tensor(Tensor::from_floats(
                [config.logit_scale_init_value as f32],
                device,
            )),
        }
    }

    /// Projected (not normalised) text features, `[batch, projection_dim]`.
    pub fn text_features(&self, input_ids: Tensor<2, Int>, padding: Tensor<2, Bool>) -> Tensor<2> {
        let pooled = self.text_model.forward(input_ids, padding).pooled;
        self.text_projection.forward(pooled)
    }

    /// Projected (not normalised) image features, `[batch, projection_dim]`.
    pub fn image_features(&self, pixel_values: Tensor<4>) -> Tensor<2> {
        let pooled = self.vision_model.forward(pixel_values).pooled;
        self.visual_projection.forward(pooled)
    }

    /// Every output token through `post_layernorm` and `visual_projection`, as CLIP treats
    /// its class token: `[batch, 1 + patches, projection_dim]`, class token first (so row 0
    /// is `image_features`).
    pub fn image_tokens(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let tokens = self.vision_model.normed_tokens(pixel_values);
        let [batch, n, d] = tokens.dims();
        let projected = self
            .visual_projection
            .forward(tokens.reshape([batch * n, d]));
        let p = projected.dims()[1];
        projected.reshape([batch, n, p])
    }

    /// `exp(logit_scale) * cos(image i, text j)` for L2-normalised embeddings.
    pub fn logits_per_image(&self, image_embeds: Tensor<2>, text_embeds: Tensor<2>) -> Tensor<2> {
        let scale = self.logit_scale.val().exp().reshape([1, 1]);
        image_embeds.matmul(text_embeds.transpose()) * scale
    }
}

/// Divides each row by its L2 norm.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Object-level tokens: the class token, then the patch grid average-pooled to `cells x cells`
/// (`[batch, 1 + patches, d]` -> `[batch, 1 + cells^2, d]`). With a grid that `cells` divides
/// (9x9 patches, 3x3 cells) each pooled token covers exactly one cell of the scene layout.
pub fn pool_cells(tokens: Tensor<3>, cells: usize) -> Tensor<3> {
    let [batch, n, d] = tokens.dims();
    let grid = ((n - 1) as f64).sqrt().round() as usize;
    assert_eq!(grid * grid, n - 1, "a square patch grid");
    let class = tokens.clone().narrow(1, 0, 1);
    let patches = tokens
        .narrow(1, 1, n - 1)
        .swap_dims(1, 2)
        .reshape([batch, d, grid, grid]);
    let pooled = burn::tensor::module::adaptive_avg_pool2d(patches, [cells, cells])
        .reshape([batch, d, cells * cells])
        .swap_dims(1, 2);
    Tensor::cat(vec![class, pooled], 1)
}
