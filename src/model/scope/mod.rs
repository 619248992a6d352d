//! MSCKE's multimodal scope classifier (and SERAC's text-only one): does a query fall under a
//! stored edit? rho = Sim(z_e, z_test) in [0, 1]; in scope iff rho >= 0.5 (eq. 1-3, 8).
//!
//! Both sides are encoded the same way: CLIP text features (and, in multimodal mode, CLIP
//! class and patch tokens), aligned into one space by A_t and A_i (eq. 4-5), fused (eq. 6-7).
//! The edit side reads the edit image with "question + target", the query side the query
//! image (if any) with the question.

pub mod saved;

pub use saved::ScopeRun;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::clip::{ClipConfig, ClipModel, pool_cells};
use super::fusion::{Fusion, FusionKind};
use super::objects::{
    AttributeProbe, ObjectWords, ReferentReadout, object_word_embeddings, segment_mean,
};

/// rho >= this: in scope.
pub const THRESHOLD: f32 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScopeMode {
    /// SERAC: text features only.
    TextOnly,
    /// MSCKE: text and image features, fused.
    Multimodal,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Similarity {
    /// exp(-||z_e - z||^2 * scale), the released default.
    SquaredL2 { scale: f64 },
    /// (1 + cos(z_e, z)) / 2.
    Cosine,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    pub mode: ScopeMode,
    #[serde(default = "default_fusion")]
    pub fusion: FusionKind,
    #[serde(default = "default_similarity")]
    pub similarity: Similarity,
    /// Width of the aligned space (A_t, A_i outputs).
    #[serde(default = "default_dim")]
    pub dim: usize,
    /// Width of the cross-attention projections.
    #[serde(default = "default_dim")]
    pub attention_dim: usize,
    /// Learn a diagonal metric: z is scaled per dimension by learned weights before the
    /// similarity, so that Sim compares `W^(1/2) z_e` and `W^(1/2) z` (a learned metric in
    /// the sense of eq. 8).
    #[serde(default)]
    pub learned_metric: bool,
    /// Attend over the class token and `cells x cells` pooled object-level tokens rather
    /// than every patch ([`pool_cells`]).
    #[serde(default)]
    pub cells: Option<usize>,
    /// The attention's query gets its own alignment A_q (identity at first) instead of
    /// sharing h^t: the query must point at the object the question refers to, while z's
    /// text half should say what is asked whichever expression names the object.
    #[serde(default)]
    pub query_projection: bool,
    /// Dot-product fusion over object tokens in word space (the VLM's referent readout): the
    /// keys are CLIP's token embeddings of the names the attribute probe reads in each cell
    /// plus the cell's name, the query the mean token embedding of the question (the edit's
    /// question without its target), cosine attention; the values stay the aligned cell
    /// tokens. Needs a scenes CLIP with its attribute probe and the 3x3 cell tokens; the
    /// other fusions and the text-only classifier ignore it.
    #[serde(default)]
    pub object_readout: bool,
}

fn default_fusion() -> FusionKind {
    FusionKind::DotProduct
}
fn default_similarity() -> Similarity {
    Similarity::SquaredL2 { scale: 1.0 }
}
fn default_dim() -> usize {
    128
}

impl ScopeConfig {
    pub fn multimodal(fusion: FusionKind) -> Self {
        Self {
            mode: ScopeMode::Multimodal,
            fusion,
            similarity: default_similarity(),
            dim: default_dim(),
            attention_dim: default_dim(),
            learned_metric: false,
            cells: None,
            query_projection: false,
            object_readout: false,
        }
    }

    /// Whether the classifier has an object readout ([`Self::object_readout`]).
    pub fn reads_objects(&self) -> bool {
        self.object_readout
            && self.mode == ScopeMode::Multimodal
            && self.fusion == FusionKind::DotProduct
    }

    pub fn text_only() -> Self {
        Self {
            mode: ScopeMode::TextOnly,
            ..Self::multimodal(FusionKind::DotProduct)
        }
    }
}

pub use crate::data::batch::ScopeInput;

#[derive(Module, Debug)]
pub struct ScopeClassifier {
    pub clip: ClipModel,
    /// A_t (eq. 4-5).
    pub align_text: Linear,
    /// A_i (eq. 4-5).
    pub align_image: Linear,
    /// A_q, with [`ScopeConfig::query_projection`].
    pub align_query: Option<Linear>,
    pub fusion: Fusion,
    /// log of the per-dimension metric scale (with `learned_metric`).
    pub metric_log_scale: Option<Param<Tensor<1>>>,
    /// With `object_readout`: the CLIP's attribute probe and the word-space attention.
    pub attribute_probe: Option<AttributeProbe>,
    pub readout: Option<ReferentReadout>,
    #[module(skip)]
    object_words: Option<ObjectWords>,
    #[module(skip)]
    config: ScopeConfig,
}

impl ScopeClassifier {
    pub fn new(
        config: &ScopeConfig,
        clip: ClipModel,
        clip_config: &ClipConfig,
        device: &Device,
    ) -> Self {
        let p = clip_config.projection_dim;
        let readout = config.reads_objects();
        Self {
            clip,
            align_text: identity_linear(p, config.dim, device),
            align_image: identity_linear(p, config.dim, device),
            align_query: config
                .query_projection
                .then(|| identity_linear(p, config.dim, device)),
            fusion: Fusion::new(config.fusion, config.dim, config.attention_dim, device),
            metric_log_scale: config.learned_metric.then(|| {
                let width = match config.mode {
                    ScopeMode::TextOnly => config.dim,
                    ScopeMode::Multimodal => 2 * config.dim,
                };
                Param::from_tensor(Tensor::zeros([width], device))
            }),
            attribute_probe: readout.then(|| AttributeProbe::new(p, device)),
            readout: readout
                .then(|| ReferentReadout::new(clip_config.text_config.hidden_size, device)),
            object_words: None,
            config: config.clone(),
        }
    }

    /// The names the object readout's keys are made of (ids in the CLIP's vocabulary).
    pub fn with_object_words(mut self, words: Option<ObjectWords>) -> Self {
        self.object_words = words;
        self
    }

    pub fn config(&self) -> &ScopeConfig {
        &self.config
    }

    /// z for a batch (eq. 6-7): `[batch, dim]` text-only, `[batch, 2 dim]` multimodal.
    pub fn encode(&self, input: &ScopeInput) -> Tensor<2> {
        self.encode_with_attention(input).0
    }

    /// [`Self::encode`] and, where the fusion attends over image tokens, its attention logits
    /// (`[batch, tokens]`; meaningless on rows without an image).
    pub fn encode_with_attention(&self, input: &ScopeInput) -> (Tensor<2>, Option<Tensor<2>>) {
        let (z, logits) = self.encode_unscaled(input);
        let z = match &self.metric_log_scale {
            Some(log_scale) => {
                let width = log_scale.dims()[0];
                z * log_scale.val().exp().reshape([1, width])
            }
            None => z,
        };
        (z, logits)
    }

    fn encode_unscaled(&self, input: &ScopeInput) -> (Tensor<2>, Option<Tensor<2>>) {
        let text = self
            .clip
            .text_features(input.ids.clone(), input.padding.clone());
        let h_t = self.align_text.forward(text.clone());
        if self.config.mode == ScopeMode::TextOnly {
            return (h_t, None);
        }
        let Some((pixels, has_image)) = &input.images else {
            return (self.fusion.text_only(h_t), None);
        };
        let (z, logits) = match (&self.readout, &self.attribute_probe) {
            (Some(readout), Some(probe)) => {
                let (image, logits) = self.object_readout(readout, probe, input, pixels.clone());
                (Tensor::cat(vec![h_t.clone(), image], 1), Some(logits))
            }
            _ => {
                let query = match &self.align_query {
                    Some(a_q) => a_q.forward(text),
                    None => h_t.clone(),
                };
                self.fusion.forward_with_attention(
                    h_t.clone(),
                    query,
                    self.image_tokens(pixels.clone()),
                )
            }
        };
        let text_only = self.fusion.text_only(h_t);
        // Rows without an image keep the text-only encoding.
        let mask = has_image.clone();
        (z * mask.clone() + text_only * (mask.neg() + 1.0), logits)
    }

    /// [`ScopeConfig::object_readout`]: the aligned cell tokens' mean under the word-space
    /// attention, `[batch, dim]`, and the attention logits over the cells, `[batch, cells]`.
    fn object_readout(
        &self,
        readout: &ReferentReadout,
        probe: &AttributeProbe,
        input: &ScopeInput,
        pixels: Tensor<4>,
    ) -> (Tensor<2>, Tensor<2>) {
        let words = self
            .object_words
            .as_ref()
            .expect("an object readout is built with its words (with_object_words)");
        let tokens = self.clip_tokens(pixels);
        let aligned = self.align(tokens.clone());
        let [batch, n, dim] = aligned.dims();
        let embedding = &self.clip.text_model.embeddings.token_embedding;
        let device = aligned.device();
        let keys = object_word_embeddings(words, probe.distributions(tokens), |names| {
            super::objects::embed_names(names, |ids| embedding.forward(ids), &device)
        });
        let focus = match &input.focus {
            Some(focus) => focus.clone(),
            None => input.padding.clone().bool_not().float(),
        };
        let query = segment_mean(&embedding.forward(input.ids.clone()), focus);
        let (image, logits) =
            readout.forward(query, keys.narrow(1, 1, n - 1), aligned.narrow(1, 1, n - 1));
        (image.reshape([batch, dim]), logits)
    }

    /// CLIP's projected class and patch (or cell) tokens, `[batch, 1 + patches, p]`.
    fn clip_tokens(&self, pixels: Tensor<4>) -> Tensor<3> {
        let tokens = self.clip.image_tokens(pixels);
        match self.config.cells {
            Some(cells) => pool_cells(tokens, cells),
            None => tokens,
        }
    }

    /// A_i over every token.
    fn align(&self, tokens: Tensor<3>) -> Tensor<3> {
        let [batch, n, p] = tokens.dims();
        let aligned = self.align_image.forward(tokens.reshape([batch * n, p]));
        let dim = aligned.dims()[1];
        aligned.reshape([batch, n, dim])
    }

    /// Aligned class and patch (or cell) tokens, `[batch, 1 + patches, dim]`: CLIP's projected
    /// tokens through A_i.
    pub fn image_tokens(&self, pixels: Tensor<4>) -> Tensor<3> {
        self.align(self.clip_tokens(pixels))
    }

    /// log rho for aligned rows, `z_e[i]` against `z[i]`, `[batch]`. For the released
    /// similarity it is exactly `-scale * d^2`, which training uses so that the loss keeps
    /// its gradient where rho itself underflows.
    pub fn log_similarity(&self, z_e: Tensor<2>, z: Tensor<2>) -> Tensor<1> {
        let batch = z.dims()[0];
        let log_rho = match self.config.similarity {
            Similarity::SquaredL2 { scale } => (z_e - z).powi_scalar(2).sum_dim(1) * (-scale),
            Similarity::Cosine => {
                let dot = (z_e.clone() * z.clone()).sum_dim(1);
                let norms = (norm(z_e) * norm(z)).clamp_min(1e-12);
                ((dot / norms + 1.0) / 2.0).clamp_min(1e-12).log()
            }
        };
        log_rho.reshape([batch])
    }

    /// rho for aligned rows: `z_e[i]` against `z[i]` (eq. 8), `[batch]`, in [0, 1].
    pub fn similarity(&self, z_e: Tensor<2>, z: Tensor<2>) -> Tensor<1> {
        self.log_similarity(z_e, z).exp()
    }

    /// rho of every query against every stored edit: `[queries, edits]`.
    pub fn similarity_matrix(&self, z: Tensor<2>, z_e: Tensor<2>) -> Tensor<2> {
        match self.config.similarity {
            Similarity::SquaredL2 { scale } => squared_distances(z, z_e).mul_scalar(-scale).exp(),
            Similarity::Cosine => {
                let cos =
                    super::clip::l2_normalize(z).matmul(super::clip::l2_normalize(z_e).transpose());
                (cos + 1.0) / 2.0
            }
        }
    }
}

/// A linear map `d_in -> d_out` that starts as the (zero-padded or truncated) identity, so
/// the aligned space starts as CLIP's own: text-over-patch dot products are then CLIP's, which
/// grounding pre-training (`mmke train clip --grounding-weight`) has taught where to look.
fn identity_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    let mut linear = LinearConfig::new(d_in, d_out).init(device);
    let eye: Vec<f32> = (0..d_in * d_out)
        .map(|k| if k / d_out == k % d_out { 1.0 } else { 0.0 })
        .collect();
    let weight = Tensor::from_data(TensorData::new(eye, [d_in, d_out]), device);
    linear.weight = Param::from_tensor(weight);
    linear.bias = linear
        .bias
        .map(|b| Param::from_tensor(b.val().zeros_like()));
    linear
}

fn norm(x: Tensor<2>) -> Tensor<2> {
    x.powi_scalar(2).sum_dim(1).sqrt()
}

/// ||a_i - b_j||^2 for all pairs, `[a, b]`, as |a|^2 + |b|^2 - 2 a.b (one matmul).
pub fn squared_distances(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    let a2 = a.clone().powi_scalar(2).sum_dim(1); // [n, 1]
    let b2 = b.clone().powi_scalar(2).sum_dim(1).transpose(); // [1, m]
    (a2 + b2 - a.matmul(b.transpose()) * 2.0).clamp_min(0.0)
}

/// Binary cross-entropy (eq. 11) from log rho against 0/1 labels, averaged:
/// -[y log rho + (1 - y) log(1 - rho)].
pub fn bce(log_rho: Tensor<1>, labels: Tensor<1>) -> Tensor<1> {
    // log(1 - rho) diverges as rho -> 1; keep rho <= 1 - 1e-6 for that term only.
    let log_rho = log_rho.clamp_max(0.0);
    let log_not = (log_rho.clone().exp().neg() + 1.0).clamp_min(1e-6).log();
    let positive = labels.clone() * log_rho;
    let negative = (labels.neg() + 1.0) * log_not;
    (positive + negative).mean().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::clip::ClipConfig;
    use burn::tensor::Distribution;
    use burn::tensor::{Bool, Int};

    #[test]
    fn the_learned_metric_scales_each_dimension_of_z() {
        let device = Device::flex();
        let clip_config = ClipConfig::scenes_preset("clip-tiny", 20, 16).unwrap();
        let config = ScopeConfig {
            learned_metric: true,
            ..ScopeConfig::text_only()
        };
        let mut model = ScopeClassifier::new(
            &config,
            ClipModel::new(&clip_config, &device),
            &clip_config,
            &device,
        );
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 5, 3], [1, 3]), &device);
        let input = ScopeInput {
            ids,
            padding: Tensor::<2, Bool>::from_data(TensorData::new(vec![false; 3], [1, 3]), &device),
            images: None,
            focus: None,
        };
        // Starts as the identity metric.
        let plain: Vec<f32> = model
            .encode_unscaled(&input)
            .0
            .into_data()
            .try_to_vec()
            .unwrap();
        let scaled: Vec<f32> = model.encode(&input).into_data().try_to_vec().unwrap();
        assert_eq!(plain, scaled);
        // exp(log scale) multiplies each dimension.
        let log_scale = Tensor::<1>::random([config.dim], Distribution::Normal(0.0, 1.0), &device);
        let factors: Vec<f32> = log_scale.clone().exp().into_data().try_to_vec().unwrap();
        model.metric_log_scale = Some(Param::from_tensor(log_scale));
        let scaled: Vec<f32> = model.encode(&input).into_data().try_to_vec().unwrap();
        for ((s, p), f) in scaled.iter().zip(&plain).zip(&factors) {
            assert!((s - p * f).abs() < 1e-5 * (1.0 + s.abs()));
        }
    }
}
