//! Fusion of aligned text and image features into one vector z (MSCKE eq. 6-7).
//!
//! The text side is one vector per example (the aligned CLIP text embedding h^t); the image
//! side is the aligned class token and patch tokens h^i. Every variant returns
//! `[h^t ; image part]`, so the text-only case (no image) is the same layout with a zero image
//! part:
//! - `Concat`: the image part is the class token.
//! - `DotProduct` (the released default): softmax(tau * h^t · h^i_j) over the tokens, and the
//!   attention-weighted sum of the tokens - the parts of the image the text asks about. As in
//!   the released code the logits are raw dot products (no 1/sqrt(d)), times a learned
//!   temperature tau (initially 1): with 1/sqrt(d) the attention of a freshly aligned space
//!   stays near-uniform (measured: max weight 0.019 over 65 tokens after 600 steps), and the
//!   attended vector degenerates to the image mean, the same for every question.
//! - `CrossAttention`: the same with learned query/key/value projections to `attention_dim`
//!   and an output projection back to `d`.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FusionKind {
    Concat,
    CrossAttention,
    DotProduct,
}

impl FusionKind {
    pub const ALL: [FusionKind; 3] = [
        FusionKind::Concat,
        FusionKind::CrossAttention,
        FusionKind::DotProduct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FusionKind::Concat => "concat",
            FusionKind::CrossAttention => "cross-attention",
            FusionKind::DotProduct => "dot-product",
        }
    }
}

/// Learned projections of the cross-attention variant.
#[derive(Module, Debug)]
pub struct CrossAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
}

#[derive(Module, Debug)]
pub struct Fusion {
    /// Present for `CrossAttention` only.
    pub cross: Option<CrossAttention>,
    /// log tau, the dot-product attention's learned temperature (`DotProduct` only).
    pub log_temperature: Option<Param<Tensor<1>>>,
    #[module(skip)]
    kind: FusionKind,
}

impl Fusion {
    pub fn new(kind: FusionKind, dim: usize, attention_dim: usize, device: &Device) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let cross = (kind == FusionKind::CrossAttention).then(|| CrossAttention {
            query: linear(dim, attention_dim),
            key: linear(dim, attention_dim),
            value: linear(dim, attention_dim),
            output: linear(attention_dim, dim),
        });
        let log_temperature = (kind == FusionKind::DotProduct)
            .then(|| Param::from_tensor(Tensor::zeros([1], device)));
        Self {
            cross,
            log_temperature,
            kind,
        }
    }

    pub fn kind(&self) -> FusionKind {
        self.kind
    }

    /// `text`: `[batch, d]`; `tokens`: `[batch, 1 + patches, d]` (class token first).
    /// Returns z: `[batch, 2d]`.
    pub fn forward(&self, text: Tensor<2>, tokens: Tensor<3>) -> Tensor<2> {
        self.forward_with_query(text.clone(), text, tokens)
    }

    /// [`Self::forward`] with the attention's query (`[batch, d]`) apart from z's text half.
    pub fn forward_with_query(
        &self,
        text: Tensor<2>,
        query: Tensor<2>,
        tokens: Tensor<3>,
    ) -> Tensor<2> {
        self.forward_with_attention(text, query, tokens).0
    }

    /// [`Self::forward_with_query`] and, for the attention variants, the attention logits
    /// over the tokens (`[batch, tokens]`).
    pub fn forward_with_attention(
        &self,
        text: Tensor<2>,
        query: Tensor<2>,
        tokens: Tensor<3>,
    ) -> (Tensor<2>, Option<Tensor<2>>) {
        let [batch, n, d] = tokens.dims();
        let (image, logits) = match (self.kind, &self.cross) {
            (FusionKind::Concat, _) => (tokens.narrow(1, 0, 1).reshape([batch, d]), None),
            (FusionKind::DotProduct, _) => {
                let tau = self
                    .log_temperature
                    .as_ref()
                    .expect("built with its temperature")
                    .val()
                    .exp()
                    .reshape([1, 1, 1]);
                // Raw dot products times tau: undo attend's 1/sqrt(d).
                let q = query.reshape([batch, 1, d]) * tau * (d as f64).sqrt();
                let (image, logits) = attend(q, tokens.clone(), tokens);
                (image, Some(logits))
            }
            (FusionKind::CrossAttention, Some(c)) => {
                let a = c.query.weight.dims()[1];
                let flat = tokens.reshape([batch * n, d]);
                let q = c.query.forward(query).reshape([batch, 1, a]);
                let k = c.key.forward(flat.clone()).reshape([batch, n, a]);
                let v = c.value.forward(flat).reshape([batch, n, a]);
                let (image, logits) = attend(q, k, v);
                (c.output.forward(image), Some(logits))
            }
            (FusionKind::CrossAttention, None) => unreachable!("built with its projections"),
        };
        (Tensor::cat(vec![text, image], 1), logits)
    }

    /// z for text without an image: the image part is zero.
    pub fn text_only(&self, text: Tensor<2>) -> Tensor<2> {
        let zeros = text.zeros_like();
        Tensor::cat(vec![text, zeros], 1)
    }
}

/// softmax(q kᵀ / sqrt(d)) v for one query per example: `[b, 1, d] x [b, n, d]` -> `[b, d]`,
/// and the logits `[b, n]`.
fn attend(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> (Tensor<2>, Tensor<2>) {
    let [batch, _, d] = q.dims();
    let n = k.dims()[1];
    let dv = v.dims()[2];
    let scores = q.matmul(k.swap_dims(1, 2)) / (d as f64).sqrt();
    (
        softmax(scores.clone(), 2).matmul(v).reshape([batch, dv]),
        scores.reshape([batch, n]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn every_fusion_returns_text_then_image_part() {
        let device = Device::flex();
        let text = Tensor::<2>::random([3, 8], Distribution::Default, &device);
        let tokens = Tensor::<3>::random([3, 5, 8], Distribution::Default, &device);
        for kind in FusionKind::ALL {
            let fusion = Fusion::new(kind, 8, 6, &device);
            let z = fusion.forward(text.clone(), tokens.clone());
            assert_eq!(z.dims(), [3, 16], "{kind:?}");
            let head: Vec<f32> = z.clone().narrow(1, 0, 8).into_data().try_to_vec().unwrap();
            let want: Vec<f32> = text.clone().into_data().try_to_vec().unwrap();
            assert_eq!(head, want, "{kind:?}");
            assert_eq!(fusion.text_only(text.clone()).dims(), [3, 16]);
        }
    }

    #[test]
    fn the_learned_temperature_sharpens_dot_product_attention() {
        let device = Device::flex();
        let tokens = Tensor::<3>::from_floats([[[1.0, 0.0], [0.0, 1.0]]], &device);
        let text = Tensor::<2>::from_floats([[0.0, 1.0]], &device);
        let mut fusion = Fusion::new(FusionKind::DotProduct, 2, 2, &device);
        let image_part = |f: &Fusion| -> Vec<f32> {
            f.forward(text.clone(), tokens.clone())
                .narrow(1, 2, 2)
                .into_data()
                .try_to_vec()
                .unwrap()
        };
        // tau = 1: softmax([0, 1]) = [0.269, 0.731].
        let soft = image_part(&fusion);
        assert!((soft[1] - 0.7311).abs() < 1e-3, "{soft:?}");
        fusion.log_temperature = Some(Param::from_tensor(Tensor::from_floats([3.0], &device)));
        let sharp = image_part(&fusion);
        assert!(sharp[1] > 0.99, "{sharp:?}");
    }

    #[test]
    fn dot_product_attends_to_the_token_matching_the_text() {
        let device = Device::flex();
        // Two tokens; the text equals the second, scaled up so softmax is nearly one-hot.
        let tokens = Tensor::<3>::from_floats([[[1.0, 0.0], [0.0, 1.0]]], &device) * 20.0;
        let text = Tensor::<2>::from_floats([[0.0, 20.0]], &device);
        let z = Fusion::new(FusionKind::DotProduct, 2, 2, &device).forward(text, tokens);
        let z: Vec<f32> = z.into_data().try_to_vec().unwrap();
        assert!(
            (z[2] - 0.0).abs() < 1e-3 && (z[3] - 20.0).abs() < 1e-3,
            "{z:?}"
        );
    }
}
