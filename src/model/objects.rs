//! Object-level tokens for the scenes world. A linear probe reads, from each cell token of a
//! scenes CLIP, the shape, color and size of the object in that cell (each with "no object"
//! as class 0). CLIP pre-training fits it from the scene graph (dense supervision, a stand-in
//! for what real MLLMs learn from web-scale data); a VLM with `object_tokens` reads the
//! probe's distributions instead of the raw tokens. No editor ever sees a scene graph.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

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
