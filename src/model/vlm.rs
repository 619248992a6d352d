//! The multimodal LLM that gets edited: CLIP's vision tower, a projector (linear or MLP), and
//! the OPT-style LM reading the projected vision tokens as a visual prefix (LLaVA style: each
//! class or patch token becomes one prefix token). Text-only inputs (T-Locality) have no
//! prefix. VQA prompts are `Question: {q} Short answer:`; captions a plain prefix.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::clip::{ClipVisionConfig, ClipVisionTransformer, pool_cells};
use super::lm::{Hooks, LmOutput, OptConfig, OptForCausalLM};
use super::objects::{AttributeProbe, probe_width};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProjectorKind {
    Linear,
    /// Linear, GELU, Linear.
    Mlp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlmConfig {
    pub vision: ClipVisionConfig,
    pub lm: OptConfig,
    pub projector: ProjectorKind,
    /// Pool the patch tokens to `cells x cells` object-level tokens before the projector
    /// ([`pool_cells`]); `None`: one prefix token per patch.
    #[serde(default)]
    pub cells: Option<usize>,
    /// A prefix LM: the image and the prompt attend to each other in full (the prompt's
    /// tokens carry 2 in the attention mask), the answer causally. Visual tokens can then
    /// depend on the question; `false` is OPT's causal attention throughout.
    #[serde(default)]
    pub prefix_lm: bool,
    /// A learned embedding per visual token, added after the projector at the projector's
    /// scale: the LM's own position embeddings (std 0.02) vanish next to visual tokens, and
    /// without them it cannot tell which cell a token is ("the shape in the top left").
    #[serde(default)]
    pub visual_positions: bool,
    /// Object-level tokens: each visual token is replaced by the scenes attribute probe's
    /// distributions over shape, color and size of its cell ([`AttributeProbe`], through
    /// CLIP's `visual_projection`), so the LM reads one disentangled description per cell.
    #[serde(default)]
    pub object_tokens: bool,
}

impl VlmConfig {
    /// `vlm-tiny` (trains in minutes on a CPU) and `vlm-small`, for a vocabulary of
    /// `vocab_size` words and `image_size` inputs; `vlm-tiny-objects` and `vlm-small-objects`
    /// read object-level tokens (a CLIP pre-trained with `attribute_weight` > 0).
    pub fn preset(name: &str, vocab_size: usize, image_size: usize) -> Option<Self> {
        // The vision tower is a scenes CLIP preset's; the LM is sized per preset.
        // `-objects`: the LM reads one object-level token per cell (the attribute probe's
        // distributions, at learned positions) with the prompt in a bidirectional prefix.
        let (base, objects) = match name.strip_suffix("-objects") {
            Some(base) => (base, true),
            None => (name, false),
        };
        let (clip, width, layers, heads) = match base {
            "vlm-tiny" => ("clip-tiny", 128, 4, 4),
            "vlm-small" => ("clip-small", 256, 6, 8),
            _ => return None,
        };
        let clip = super::clip::ClipConfig::scenes_preset(clip, vocab_size, image_size)?;
        Some(Self {
            vision: clip.vision_config,
            lm: OptConfig {
                vocab_size,
                hidden_size: width,
                ffn_dim: 4 * width,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                max_position_embeddings: 160,
                word_embed_proj_dim: Some(width),
                do_layer_norm_before: true,
                activation_function: "relu".into(),
                enable_bias: true,
                tie_word_embeddings: true,
                pad_token_id: 0,
                bos_token_id: 2,
                eos_token_id: 3,
            },
            projector: ProjectorKind::Mlp,
            // One prefix token per cell of the scenes' 3x3 layout.
            cells: objects.then_some(3),
            prefix_lm: objects,
            visual_positions: objects,
            object_tokens: objects,
        })
    }

    /// Visual prefix length: the class token and every patch (or cell).
    pub fn prefix_len(&self) -> usize {
        match self.cells {
            Some(cells) => 1 + cells * cells,
            None => self.vision.num_positions(),
        }
    }
}

#[derive(Module, Debug)]
pub struct Projector {
    pub first: Linear,
    /// Present for the MLP projector.
    pub second: Option<Linear>,
    /// `[visual tokens, lm hidden]`, with [`VlmConfig::visual_positions`].
    pub positions: Option<Param<Tensor<2>>>,
}

impl Projector {
    /// The last linear layer starts at the LM's embedding scale (OPT's init, std 0.02):
    /// visual tokens many times larger than the text tokens would drown the question in the
    /// first attention layer.
    fn new(
        kind: ProjectorKind,
        d_in: usize,
        d_out: usize,
        positions: Option<usize>,
        device: &Device,
    ) -> Self {
        let embedding_scale = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let last = |d_in| {
            LinearConfig::new(d_in, d_out)
                .with_initializer(embedding_scale.clone())
                .init(device)
        };
        // Visual tokens start near std 0.1 (d_out inputs of std 1 times 0.02): so do these.
        let positions = positions.map(|n| {
            Initializer::Normal {
                mean: 0.0,
                std: 0.1,
            }
            .init([n, d_out], device)
        });
        match kind {
            ProjectorKind::Linear => Self {
                first: last(d_in),
                second: None,
                positions,
            },
            ProjectorKind::Mlp => Self {
                first: LinearConfig::new(d_in, d_out).init(device),
                second: Some(last(d_out)),
                positions,
            },
        }
    }

    /// `[batch, tokens, d_in]` to `[batch, tokens, d_out]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, n, d] = x.dims();
        let h = self.first.forward(x.reshape([batch * n, d]));
        let h = match &self.second {
            Some(second) => second.forward(gelu(h)),
            None => h,
        };
        let width = h.dims()[1];
        let h = h.reshape([batch, n, width]);
        match &self.positions {
            Some(positions) => h + positions.val().unsqueeze_dim::<3>(0),
            None => h,
        }
    }
}

#[derive(Module, Debug)]
pub struct Vlm {
    pub vision_model: ClipVisionTransformer,
    /// CLIP's `visual_projection` and the attribute probe, with `object_tokens`.
    pub visual_projection: Option<Linear>,
    pub attribute_probe: Option<AttributeProbe>,
    pub projector: Projector,
    pub lm: OptForCausalLM,
    #[module(skip)]
    cells: Option<usize>,
    #[module(skip)]
    prefix_lm: bool,
}

impl Vlm {
    pub fn new(config: &VlmConfig, device: &Device) -> Self {
        Self {
            vision_model: ClipVisionTransformer::new(&config.vision, device),
            visual_projection: config.object_tokens.then(|| {
                LinearConfig::new(config.vision.hidden_size, config.vision.projection_dim)
                    .with_bias(false)
                    .init(device)
            }),
            attribute_probe: config
                .object_tokens
                .then(|| AttributeProbe::new(config.vision.projection_dim, device)),
            projector: Projector::new(
                config.projector,
                if config.object_tokens {
                    probe_width()
                } else {
                    config.vision.hidden_size
                },
                config.lm.hidden_size,
                config.visual_positions.then(|| config.prefix_len()),
                device,
            ),
            lm: OptForCausalLM::new(&config.lm, device),
            cells: config.cells,
            prefix_lm: config.prefix_lm,
        }
    }

    /// Visual prefix length: one token per vision position (class token and patches), or
    /// the class token and one per cell.
    pub fn prefix_len(&self) -> usize {
        match self.cells {
            Some(cells) => 1 + cells * cells,
            None => self
                .vision_model
                .embeddings
                .position_embedding
                .weight
                .dims()[0],
        }
    }

    /// The visual prefix, `[batch, prefix_len, lm hidden]`.
    pub fn visual_prefix(&self, pixels: Tensor<4>) -> Tensor<3> {
        let mut tokens = self.vision_model.normed_tokens(pixels);
        if let Some(cells) = self.cells {
            tokens = pool_cells(tokens, cells);
        }
        if let (Some(projection), Some(probe)) = (&self.visual_projection, &self.attribute_probe) {
            tokens = probe.distributions(projection.forward(tokens));
        }
        self.projector.forward(tokens)
    }

    /// The LM over `[visual prefix; text]` (or the text alone without `pixels`). The output's
    /// `logits` cover the text positions only: `logits[:, t]` predicts text token `t + 1`.
    /// `hidden_states`, when captured, span the whole sequence.
    pub fn forward(
        &self,
        pixels: Option<Tensor<4>>,
        ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput {
        let [batch, seq] = ids.dims();
        let text = self.lm.embed_tokens(ids);
        let Some(pixels) = pixels else {
            return self.lm.forward_embeds(text, attention_mask, hooks);
        };
        let prefix = self.visual_prefix(pixels);
        let prefix_len = prefix.dims()[1];
        // The visual tokens belong to the bidirectional prefix when the prompt does (the mask
        // of the text's first token: 2 in a prefix-LM batch, else 1).
        let visual_mask = attention_mask
            .clone()
            .narrow(1, 0, 1)
            .expand([batch, prefix_len]);
        let mut out = self.lm.forward_embeds(
            Tensor::cat(vec![prefix, text], 1),
            Tensor::cat(vec![visual_mask, attention_mask], 1),
            hooks,
        );
        out.logits = out.logits.narrow(1, prefix_len, seq);
        out
    }

    /// Greedy decoding of one prompt: up to `max_new` tokens, stopping after `eos`.
    pub fn generate(
        &self,
        pixels: Option<Tensor<4>>,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        hooks: &Hooks,
    ) -> Vec<u32> {
        let device = self.lm.model.decoder.embed_tokens.weight.device();
        let mut ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let mut generated = Vec::new();
        let prompt_mask = if self.prefix_lm { 2 } else { 1 };
        for _ in 0..max_new {
            let n = ids.len();
            let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device);
            let mask: Vec<i64> = (0..n)
                .map(|t| if t < prompt.len() { prompt_mask } else { 1 })
                .collect();
            let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [1, n]), &device);
            let logits = self.forward(pixels.clone(), input, mask, hooks).logits;
            let vocab = logits.dims()[2];
            let next = logits
                .narrow(1, n - 1, 1)
                .reshape([1, vocab])
                .argmax(1)
                .into_scalar::<i64>() as u32;
            generated.push(next);
            if next == eos {
                break;
            }
            ids.push(next as i64);
        }
        generated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn tiny() -> VlmConfig {
        let mut config = VlmConfig::preset("vlm-tiny-objects", 40, 32).unwrap();
        config.lm.hidden_size = 32;
        config.lm.ffn_dim = 64;
        config.lm.num_hidden_layers = 2;
        config.lm.word_embed_proj_dim = Some(32);
        config
    }

    #[test]
    fn text_logits_follow_the_visual_prefix_and_depend_on_the_image() {
        let device = Device::flex();
        let config = tiny();
        let model = Vlm::new(&config, &device);
        assert_eq!(config.prefix_len(), 1 + 9);
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 5, 7, 9], [1, 4]), &device);
        let mask = Tensor::<2, Int>::ones([1, 4], &device);
        let image = |seed| {
            device.seed(seed);
            Tensor::<4>::random([1, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device)
        };
        let hooks = Hooks {
            capture: true,
            ..Hooks::default()
        };
        let a = model.forward(Some(image(1)), ids.clone(), mask.clone(), &hooks);
        assert_eq!(a.logits.dims(), [1, 4, 40]);
        assert_eq!(a.hidden_states[0].dims(), [1, 10 + 4, 32]);
        let b = model.forward(Some(image(2)), ids.clone(), mask.clone(), &Hooks::default());
        let text_only = model.forward(None, ids, mask, &Hooks::default());
        assert_eq!(text_only.logits.dims(), [1, 4, 40]);
        let diff = (a.logits - b.logits).abs().max().into_scalar::<f32>();
        assert!(diff > 1e-4, "the image must matter: {diff}");
    }

    #[test]
    fn a_prefix_lm_sees_the_whole_prompt_and_the_answer_causally() {
        let device = Device::flex();
        let model = Vlm::new(&tiny(), &device);
        let ids = |last: i64| {
            Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 5, 7, 9, last], [1, 5]), &device)
        };
        // BOS and three prompt tokens in the prefix, then one answer token.
        let prefix_mask =
            Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 2, 2, 2, 1], [1, 5]), &device);
        let logits = |ids, mask| model.forward(None, ids, mask, &Hooks::default()).logits;
        let change = |a: Tensor<3>, b: Tensor<3>, t: usize| {
            (a.narrow(1, t, 1) - b.narrow(1, t, 1))
                .abs()
                .max()
                .into_scalar::<f32>()
        };
        // Changing the answer token moves nothing before it.
        let (a, b) = (
            logits(ids(11), prefix_mask.clone()),
            logits(ids(12), prefix_mask.clone()),
        );
        for t in 0..4 {
            assert_eq!(change(a.clone(), b.clone(), t), 0.0, "position {t}");
        }
        // Changing the last prompt token moves the first one (bidirectional), which a causal
        // mask forbids.
        let other =
            Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 5, 7, 8, 11], [1, 5]), &device);
        assert!(change(a.clone(), logits(other.clone(), prefix_mask), 1) > 1e-5);
        let causal = Tensor::<2, Int>::ones([1, 5], &device);
        let c = logits(ids(11), causal.clone());
        assert_eq!(change(c, logits(other, causal), 1), 0.0);
    }

    #[test]
    fn greedy_decoding_stops_at_the_end_token_or_the_limit() {
        let device = Device::flex();
        let model = Vlm::new(&tiny(), &device);
        let out = model.generate(None, &[2, 5, 7], 6, 3, &Hooks::default());
        assert!(!out.is_empty() && out.len() <= 6);
        assert!(out[..out.len() - 1].iter().all(|&t| t != 3));
        // Greedy is deterministic.
        assert_eq!(
            model.generate(None, &[2, 5, 7], 6, 3, &Hooks::default()),
            out
        );
    }
}
