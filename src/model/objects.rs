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

/// The mean of `text` (`[batch, seq, width]`) over the tokens `weights` (`[batch, seq]`) marks.
pub fn segment_mean(text: &Tensor<3>, weights: Tensor<2>) -> Tensor<2> {
    let [batch, seq, width] = text.dims();
    let count = weights.clone().sum_dim(1).clamp_min(1.0);
    (text.clone() * weights.reshape([batch, seq, 1]))
        .sum_dim(1)
        .reshape([batch, width])
        / count
}

/// One-hot at each row's largest logit going forward, the softmax's gradient going back
/// (straight-through): an edit rewrites exactly one object, and a count over the rewritten
/// cells is not blurred by the attention's tail, while the readout still learns from it.
pub fn straight_through_argmax(logits: Tensor<2>) -> Tensor<2> {
    let soft = softmax(logits, 1);
    let [batch, n] = soft.dims();
    let hard = soft
        .clone()
        .argmax(1)
        .reshape([batch])
        .one_hot::<2>(n)
        .float();
    hard + soft.clone() - soft.detach()
}

/// Above this cosine between an edit's target and a name, the target names that class or
/// cell ([`edit_target_choice`]); below it for every name, the edit rewrites nothing.
pub const TARGET_MATCH: f32 = 0.8;
/// Scale of the cosines in [`edit_target_choice`]: a name that is the target (cosine 1)
/// takes nearly all the weight from one that shares half its words (0.5) or the threshold.
const TARGET_SCALE: f32 = 30.0;

/// What an edit's target names, as soft choices: `[batch, probe_width]` over the probe's
/// classes and `[batch, cells]` over the cells (their sum is the probability that the target
/// names one at all; the rest goes to "no match" at [`TARGET_MATCH`]). `target` is the mean
/// embedding of the target's words, `classes` and `cells` the names' embeddings (zero rows
/// for the "no object" classes, which an edit never names).
pub fn edit_target_choice(
    target: Tensor<2>,
    classes: Tensor<2>,
    cells: Tensor<2>,
) -> (Tensor<2>, Tensor<2>) {
    let [batch, _] = target.dims();
    let width = classes.dims()[0];
    let names = Tensor::cat(vec![classes, cells], 0);
    // sqrt(x + eps): the "no object" names are zero rows, where sqrt's gradient diverges.
    let norm = |x: Tensor<2>| (x.powi_scalar(2).sum_dim(1) + 1e-12).sqrt();
    let norms = norm(names.clone()); // [names, 1]
    let unnamed = norms.clone().lower_elem(1e-5).float();
    let names = names / norms;
    let target = target.clone() / norm(target);
    let cos = target.matmul(names.transpose()); // [batch, names]
    let logits = (cos - unnamed.transpose() * 1e4) * TARGET_SCALE;
    let threshold = Tensor::<2>::full([batch, 1], TARGET_MATCH * TARGET_SCALE, &logits.device());
    let weights = softmax(Tensor::cat(vec![logits, threshold], 1), 1);
    let total = weights.dims()[1];
    (
        weights.clone().narrow(1, 0, width),
        weights.narrow(1, width, total - 1 - width),
    )
}

/// The object tokens of the world an edit describes (the counterfactual model's reading of
/// its edit): `distributions` `[batch, 1 + cells, probe_width]` (class token first), the
/// edited object as weights over the cells `referent` `[batch, cells]`, and what the target
/// names ([`edit_target_choice`]). An attribute class replaces that attribute's distribution
/// in the referred cell; a cell moves the referred object there and leaves its cell empty.
/// With one-hot weights this is exactly the edited scene graph's description; soft weights
/// interpolate, so the readout that finds the referent learns through it.
pub fn rewrite_objects(
    distributions: Tensor<3>,
    referent: Tensor<2>,
    attribute: Tensor<2>,
    position: Tensor<2>,
) -> Tensor<3> {
    let [batch, n, width] = distributions.dims();
    let cells = n - 1;
    let class = distributions.clone().narrow(1, 0, 1);
    let mut objects = distributions.narrow(1, 1, cells);
    let p = referent.reshape([batch, cells, 1]);
    // Attributes: the referred cell's distribution moves to the target's, by how much the
    // target names a class of that attribute.
    let mut parts = Vec::new();
    let mut offset = 0;
    for classes in ATTRIBUTE_CLASSES {
        let target = attribute.clone().narrow(1, offset, classes);
        let named = target.clone().sum_dim(1).reshape([batch, 1, 1]);
        let current = objects.clone().narrow(2, offset, classes);
        let target = target.reshape([batch, 1, classes]);
        parts.push(current.clone() + p.clone() * (target - named * current));
        offset += classes;
    }
    objects = Tensor::cat(parts, 2);
    // Position: the referred object moves to the target cell, its own cell empties.
    let moved = position.clone().sum_dim(1).reshape([batch, 1, 1]);
    let to = (position.clone() / position.sum_dim(1).clamp_min(1e-6)).reshape([batch, cells, 1]);
    let object = (p.clone() * objects.clone()).sum_dim(1); // [batch, 1, width]
    let mut nothing = vec![0f32; width];
    let mut offset = 0;
    for classes in ATTRIBUTE_CLASSES {
        nothing[offset] = 1.0;
        offset += classes;
    }
    let nothing = Tensor::<1>::from_data(TensorData::new(nothing, [width]), &objects.device())
        .reshape([1, 1, width]);
    let stay = (p.clone().neg() + 1.0) * (to.clone().neg() + 1.0);
    let after = objects.clone() * stay + to.clone() * object + p * (to.neg() + 1.0) * nothing;
    objects = objects.clone() + moved * (after - objects);
    Tensor::cat(vec![class, objects], 1)
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

    /// One object per cell as one-hot classes: (shape, color, size) indices, 0 = none.
    fn scene(objects: &[(usize, usize, usize)], device: &Device) -> Tensor<3> {
        let width = probe_width();
        let mut flat = vec![0f32; width]; // the class token
        for &(shape, color, size) in objects {
            let mut row = vec![0f32; width];
            row[shape] = 1.0;
            row[ATTRIBUTE_CLASSES[0] + color] = 1.0;
            row[ATTRIBUTE_CLASSES[0] + ATTRIBUTE_CLASSES[1] + size] = 1.0;
            flat.extend(row);
        }
        let n = 1 + objects.len();
        Tensor::from_data(TensorData::new(flat, [1, n, width]), device)
    }

    fn one_hot(width: usize, at: Option<usize>, device: &Device) -> Tensor<2> {
        let mut v = vec![0f32; width];
        if let Some(i) = at {
            v[i] = 1.0;
        }
        Tensor::from_data(TensorData::new(v, [1, width]), device)
    }

    fn close(a: Tensor<3>, b: Tensor<3>) {
        let a: Vec<f32> = a.into_data().try_to_vec().unwrap();
        let b: Vec<f32> = b.into_data().try_to_vec().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5),
            "{a:?}\n{b:?}"
        );
    }

    #[test]
    fn straight_through_is_one_hot_forward_and_softmax_backward() {
        let device = Device::flex().autodiff();
        let logits = Tensor::<2>::from_data(
            TensorData::new(vec![1f32, 3.0, 2.0, 0.0, -1.0, 0.5], [2, 3]),
            &device,
        )
        .require_grad();
        let out = straight_through_argmax(logits.clone());
        let values: Vec<f32> = out.clone().into_data().try_to_vec().unwrap();
        let want = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        assert!(
            values.iter().zip(want).all(|(v, w)| (v - w).abs() < 1e-6),
            "{values:?}"
        );
        // d/dlogits of out[0][1] is the softmax's: nonzero.
        let weights = Tensor::<2>::from_data(
            TensorData::new(vec![0f32, 1.0, 0.0, 0.0, 0.0, 0.0], [2, 3]),
            &device,
        );
        let grads = (out * weights).sum().backward();
        let g: Vec<f32> = logits
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(g[1] > 0.0 && g[0] < 0.0, "{g:?}");
    }

    #[test]
    fn a_sure_edit_rewrites_exactly_the_edited_scene() {
        let device = Device::flex();
        let width = probe_width();
        // Cell 0: shape 1, color 2, size 1; cell 1 empty; cell 2: shape 3, color 4, size 2.
        let before = scene(&[(1, 2, 1), (0, 0, 0), (3, 4, 2)], &device);
        let referent = one_hot(3, Some(2), &device);
        // Recolor cell 2 to color 6.
        let color = one_hot(width, Some(ATTRIBUTE_CLASSES[0] + 6), &device);
        let after = rewrite_objects(
            before.clone(),
            referent.clone(),
            color,
            one_hot(3, None, &device),
        );
        close(after, scene(&[(1, 2, 1), (0, 0, 0), (3, 6, 2)], &device));
        // Move cell 2's object to cell 1.
        let none = one_hot(width, None, &device);
        let after = rewrite_objects(
            before.clone(),
            referent,
            none.clone(),
            one_hot(3, Some(1), &device),
        );
        close(after, scene(&[(1, 2, 1), (3, 4, 2), (0, 0, 0)], &device));
        // A target that names nothing changes nothing.
        let after = rewrite_objects(
            before.clone(),
            one_hot(3, Some(0), &device),
            none,
            one_hot(3, None, &device),
        );
        close(after, before);
    }

    #[test]
    fn the_target_choice_finds_the_named_class_or_cell_or_nothing() {
        let device = Device::flex();
        // Names in a 4-word space: class 0 is "none" (no words), class 1 = word 0, class 2 =
        // word 1; cells: words 2+3 ("top left") and word 2 alone ("top").
        let e = |w: &[usize]| {
            let mut v = vec![0f32; 4];
            w.iter().for_each(|&i| v[i] = 1.0);
            v
        };
        let rows = |names: &[Vec<f32>]| {
            let flat: Vec<f32> = names.concat();
            Tensor::<2>::from_data(TensorData::new(flat, [names.len(), 4]), &device)
        };
        let classes = rows(&[e(&[]), e(&[0]), e(&[1])]);
        let cells = rows(&[e(&[2, 3]), e(&[2])]);
        let choose = |target: &[usize]| {
            let (a, p) = edit_target_choice(rows(&[e(target)]), classes.clone(), cells.clone());
            let a: Vec<f32> = a.into_data().try_to_vec().unwrap();
            let p: Vec<f32> = p.into_data().try_to_vec().unwrap();
            (a, p)
        };
        let (a, p) = choose(&[1]);
        assert!(
            a[2] > 0.99 && a[0] < 1e-6 && p.iter().sum::<f32>() < 0.01,
            "{a:?} {p:?}"
        );
        let (a, p) = choose(&[2, 3]);
        assert!(p[0] > 0.99 && a.iter().sum::<f32>() < 0.01, "{a:?} {p:?}");
        // "yes" is no class and no cell.
        let (a, p) = choose(&[]);
        assert!(a.iter().chain(&p).sum::<f32>() < 0.01, "{a:?} {p:?}");
    }
}
