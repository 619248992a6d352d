//! Object-level tokens for the scenes world. A linear probe reads, from each cell token of a
//! scenes CLIP, the shape, color and size of the object in that cell (each with "no object"
//! as class 0). CLIP pre-training fits it from the scene graph (dense supervision, a stand-in
//! for what real MLLMs learn from web-scale data); a VLM with `object_tokens` reads the
//! probe's distributions instead of the raw tokens. No editor ever sees a scene graph.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::text::TextTokenizer;

/// Classes per attribute: shape, color, size, each with "no object" first.
pub const ATTRIBUTE_CLASSES: [usize; 3] = [1 + 6, 1 + 8, 1 + 2];

/// The probe's file in a CLIP directory written by `mmke train clip`.
pub const PROBE_FILE: &str = "attribute-probe.bpk";

/// Width of the probe's output: every attribute's classes side by side.
pub fn probe_width() -> usize {
    ATTRIBUTE_CLASSES.iter().sum()
}

#[derive(Module, Debug)]
pub struct AttributeProbe {
    pub linear: Linear,
}

impl AttributeProbe {
    /// A probe over `dim`-wide (CLIP-projected) tokens.
    pub fn new(dim: usize, device: &Device) -> Self {
        Self {
            linear: LinearConfig::new(dim, probe_width()).init(device),
        }
    }

    /// `[batch, n, dim]` tokens to `[batch, n, probe_width]` logits.
    pub fn logits(&self, tokens: Tensor<3>) -> Tensor<3> {
        self.linear.forward(tokens)
    }

    /// Each attribute's softmax, side by side: `[batch, n, probe_width]`.
    pub fn distributions(&self, tokens: Tensor<3>) -> Tensor<3> {
        let logits = self.logits(tokens);
        let mut parts = Vec::new();
        let mut offset = 0;
        for classes in ATTRIBUTE_CLASSES {
            parts.push(softmax(logits.clone().narrow(2, offset, classes), 2));
            offset += classes;
        }
        Tensor::cat(parts, 2)
    }
}

/// The vocabulary ids of what each probe class and each cell is called (see
/// [`crate::model::vlm::VlmConfig::object_words`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectWords {
    /// Per probe output column ([`probe_width`]), the ids of its name; empty for "no object".
    pub classes: Vec<Vec<u32>>,
    /// Per cell in reading order, the ids of its name ("top", "left").
    pub cells: Vec<Vec<u32>>,
    /// The number words from zero up, for [`crate::model::vlm::VlmConfig::count_token`].
    #[serde(default)]
    pub numbers: Vec<Vec<u32>>,
    /// Tokens that split a prompt into an edit context and the query (the counterfactual
    /// model's `>>` and `||`): the referent readout then reads each part.
    #[serde(default)]
    pub separators: Vec<u32>,
}

impl ObjectWords {
    /// Readouts per prompt: the query's, and the context's where there are separators.
    pub fn readouts(&self) -> usize {
        1 + !self.separators.is_empty() as usize
    }

    /// `[rows, ids]` summing matrix and the flat ids it sums over: row `r` of
    /// `matrix @ embed(ids)` is the sum of the embeddings of `names[r]`.
    pub fn summing(names: &[Vec<u32>], device: &Device) -> (Tensor<2>, Tensor<2, Int>) {
        let ids: Vec<i64> = names.iter().flatten().map(|&id| id as i64).collect();
        let n = ids.len().max(1);
        let mut matrix = vec![0f32; names.len() * n];
        let mut column = 0;
        for (row, name) in names.iter().enumerate() {
            for _ in name {
                matrix[row * n + column] = 1.0;
                column += 1;
            }
        }
        let ids = if ids.is_empty() { vec![0] } else { ids };
        (
            Tensor::from_data(TensorData::new(matrix, [names.len(), n]), device),
            Tensor::from_data(TensorData::new(ids, [1, n]), device),
        )
    }
}

/// A question-conditioned readout over object tokens: the prompt's mean word embedding
/// attends over the cells' word-space keys (cosine, identity-initialised projections, learned
/// scale). The VLM's referent and count tokens and the scope classifier's attention use it.
#[derive(Module, Debug)]
pub struct ReferentReadout {
    pub query: Linear,
    pub key: Linear,
    /// Log of the cosine similarities' scale.
    pub log_scale: Param<Tensor<1>>,
    /// The logit above which a cell counts as matching the prompt ([`Self::count`]).
    pub threshold: Param<Tensor<1>>,
}

impl ReferentReadout {
    pub fn new(width: usize, device: &Device) -> Self {
        let identity = || {
            let mut linear = LinearConfig::new(width, width)
                .with_bias(false)
                .init(device);
            linear.weight = Param::from_tensor(Tensor::eye(width, device));
            linear
        };
        Self {
            query: identity(),
            key: identity(),
            // Cosines of a few shared words out of a dozen are ~0.2: a scale of 20 makes
            // that a clear preference from the start.
            log_scale: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![20f32.ln()], [1]),
                device,
            )),
            threshold: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![2f32], [1]),
                device,
            )),
        }
    }

    /// `logits` less the count threshold: a cell matches the prompt where this is positive.
    pub fn match_logits(&self, logits: Tensor<2>) -> Tensor<2> {
        logits - self.threshold.val().reshape([1, 1])
    }

    /// The soft number of occupied cells the prompt matches, as weights over the numbers
    /// `0..numbers` (`[batch, numbers]`): `n = sum_k occupied_k sigmoid(logit_k - threshold)`,
    /// then a softmax of `-2 (n - j)^2` over `j`.
    pub fn count(&self, logits: Tensor<2>, occupied: Tensor<2>, numbers: usize) -> Tensor<2> {
        let [batch, _] = logits.dims();
        let n = (burn::tensor::activation::sigmoid(self.match_logits(logits)) * occupied)
            .sum_dim(1)
            .reshape([batch, 1]);
        let values: Vec<f32> = (0..numbers).map(|j| j as f32).collect();
        let j = Tensor::<1>::from_data(TensorData::new(values, [numbers]), &n.device())
            .reshape([1, numbers]);
        burn::tensor::activation::softmax((n - j).powi_scalar(2) * -2.0, 1)
    }

    /// `query` `[batch, width]` over `keys` `[batch, n, width]`: the `values`' weighted mean,
    /// `[batch, 1, width]`, and the attention logits `[batch, n]`.
    pub fn forward(
        &self,
        query: Tensor<2>,
        keys: Tensor<3>,
        values: Tensor<3>,
    ) -> (Tensor<3>, Tensor<2>) {
        let unit = |x: Tensor<3>| {
            let norm = x.clone().powi_scalar(2).sum_dim(2).sqrt().clamp_min(1e-6);
            x / norm
        };
        let q = unit(self.query.forward(query.unsqueeze_dim::<3>(1)));
        let k = unit(self.key.forward(keys));
        let scale = self.log_scale.val().exp().reshape([1, 1, 1]);
        let logits = q.matmul(k.swap_dims(1, 2)) * scale;
        let [batch, _, n] = logits.dims();
        let weights = burn::tensor::activation::softmax(logits.clone(), 2);
        (weights.matmul(values), logits.reshape([batch, n]))
    }
}

/// The scenes world's names in `tokenizer`'s vocabulary: the probe's classes (shape, color,
/// size, each after its "no object"), the cells and the numbers; `None` where a name is not
/// in the vocabulary (not a scenes tokenizer).
pub fn scenes_object_words(tokenizer: &TextTokenizer) -> Option<ObjectWords> {
    use crate::data::scenes::scene::{Cell, Color, Shape, Size};
    let ids = |name: &str| -> Option<Vec<u32>> {
        name.split_whitespace()
            .map(|w| tokenizer.inner().token_to_id(w))
            .collect()
    };
    let none = || Some(Vec::new());
    let mut classes = vec![none()];
    classes.extend(Shape::ALL.iter().map(|s| ids(s.name())));
    classes.push(none());
    classes.extend(Color::ALL.iter().map(|c| ids(c.name())));
    classes.push(none());
    classes.extend(Size::ALL.iter().map(|s| ids(s.name())));
    Some(ObjectWords {
        classes: classes.into_iter().collect::<Option<_>>()?,
        cells: Cell::ALL
            .iter()
            .map(|c| ids(c.name()))
            .collect::<Option<_>>()?,
        numbers: crate::data::scenes::language::NUMBERS
            .iter()
            .map(|n| ids(n))
            .collect::<Option<_>>()?,
        separators: Vec::new(),
    })
}

/// Per cell token, the expected sum of its attribute names' embeddings under the probe's
/// `distributions` (`[batch, 1 + cells, probe_width]`) plus the cell's name (none for the
/// class token in front): `[batch, 1 + cells, hidden]`. `embed_names` maps names (lists of
/// ids) to the sum of their words' embeddings, `[names, hidden]`.
pub fn object_word_embeddings(
    words: &ObjectWords,
    distributions: Tensor<3>,
    embed_names: impl Fn(&[Vec<u32>]) -> Tensor<2>,
) -> Tensor<3> {
    let [batch, n, width] = distributions.dims();
    let classes = embed_names(&words.classes);
    let hidden = classes.dims()[1];
    let attributes = distributions
        .reshape([batch * n, width])
        .matmul(classes)
        .reshape([batch, n, hidden]);
    let mut cells = vec![Vec::new(); n - words.cells.len()];
    cells.extend(words.cells.iter().cloned());
    attributes + embed_names(&cells).unsqueeze_dim::<3>(0)
}

/// [`ObjectWords::summing`] applied to an embedding table lookup: per name, the sum of its
/// words' embeddings, `[names, hidden]`.
pub fn embed_names(
    names: &[Vec<u32>],
    embed: impl Fn(Tensor<2, Int>) -> Tensor<3>,
    device: &Device,
) -> Tensor<2> {
    let (matrix, ids) = ObjectWords::summing(names, device);
    let embeddings = embed(ids);
    let [_, k, hidden] = embeddings.dims();
    matrix.matmul(embeddings.reshape([k, hidden]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn each_attribute_is_a_distribution() {
        let device = Device::flex();
        let probe = AttributeProbe::new(8, &device);
        let tokens = Tensor::<3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
        let d = probe.distributions(tokens);
        assert_eq!(d.dims(), [2, 3, probe_width()]);
        let mut offset = 0;
        for classes in ATTRIBUTE_CLASSES {
            let sums: Vec<f32> = d
                .clone()
                .narrow(2, offset, classes)
                .sum_dim(2)
                .into_data()
                .try_to_vec()
                .unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
            offset += classes;
        }
    }
}
