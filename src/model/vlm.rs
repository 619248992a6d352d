//! The multimodal LLM that gets edited: CLIP's vision tower, a projector (linear or MLP), and
//! the OPT-style LM reading the projected vision tokens as a visual prefix (LLaVA style: each
//! class or patch token becomes one prefix token). Text-only inputs (T-Locality) have no
//! prefix. VQA prompts are `Question: {q} Short answer:`; captions a plain prefix.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::clip::{ClipVisionConfig, ClipVisionTransformer, pool_cells};
use super::lm::{Hooks, LmOutput, OptConfig, OptForCausalLM};
use super::objects::{
    AttributeProbe, ObjectWords, ReferentReadout, edit_target_choice, probe_width, rewrite_objects,
    segment_mean,
};

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
    /// With `object_tokens`: each cell token also carries the LM's own embeddings of the words
    /// that name what the probe sees there (the expectation, under the probe's distributions,
    /// of the attribute words' embeddings, plus the cell's name). The question's "red" then
    /// matches the red object's token directly (one attention hop), a soft caption per cell.
    #[serde(default)]
    pub object_words: Option<ObjectWords>,
    /// A question-conditioned visual token after the cells (InstructBLIP's idea in one
    /// attention): the prompt's mean word embedding attends over the cell tokens (cosine,
    /// learned projections starting at the identity), and their weighted mean is appended to
    /// the prefix. Needs `prefix_lm` (the prompt is what carries mask value 2).
    #[serde(default)]
    pub referent_token: bool,
    /// With `referent_token` and the number words in `object_words`: one more token, the
    /// number of cells the prompt matches ([`ReferentReadout::count`]) as a soft choice among
    /// the number words' embeddings ("how many red shapes" reads it as "what color" reads the
    /// referent).
    #[serde(default)]
    pub count_token: bool,
    /// The counterfactual model's reading of its edit (with object words and separators):
    /// before answering, the object tokens are rewritten into the world the edit describes
    /// ([`rewrite_objects`]): the context's readout finds the edited object, the words
    /// between the separators say which class or cell it now has. Questions about it then
    /// read its new attributes, questions about anything else the unchanged ones.
    #[serde(default)]
    pub rewrite_objects: bool,
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
            object_words: None,
            referent_token: false,
            count_token: false,
            rewrite_objects: false,
        })
    }

    /// The `-objects` presets' reading of the scenes for a vocabulary with their names:
    /// `words` in the cell tokens, with the referent and count tokens; `None` (another
    /// world's vocabulary) leaves the cell tokens as they are.
    pub fn with_object_words(mut self, words: Option<ObjectWords>) -> Self {
        let on = self.object_tokens && words.is_some();
        self.object_words = words.filter(|_| self.object_tokens);
        self.referent_token = on;
        self.count_token = on;
        self
    }

    /// The class token and every patch (or cell).
    pub fn visual_tokens(&self) -> usize {
        match self.cells {
            Some(cells) => 1 + cells * cells,
            None => self.vision.num_positions(),
        }
    }

    /// Visual prefix length: [`Self::visual_tokens`] and the readouts' tokens.
    pub fn prefix_len(&self) -> usize {
        let readouts = self.object_words.as_ref().map_or(1, ObjectWords::readouts);
        self.visual_tokens() + readouts * (self.referent_token as usize + self.count_token as usize)
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

/// The parts of a prompt (`prompt` `[batch, seq]`: 1 on its tokens) that get a readout each:
/// the whole prompt without `separators`; else the query after the last separator and the
/// context before the first.
pub fn prompt_segments(
    ids: Tensor<2, Int>,
    prompt: Tensor<2>,
    separators: &[u32],
) -> Vec<Tensor<2>> {
    match split_at_separators(ids, separators) {
        None => vec![prompt],
        Some([after_last, before_first, _]) => {
            vec![prompt.clone() * after_last, prompt * before_first]
        }
    }
}

/// The edit's target in a prompt with `separators`: 1 on the tokens between the first and
/// the last separator (`{src} >> {alt} || {query}`: the words of `alt`).
pub fn edit_target_span(
    ids: Tensor<2, Int>,
    prompt: Tensor<2>,
    separators: &[u32],
) -> Option<Tensor<2>> {
    let [after_last, before_first, marks] = split_at_separators(ids, separators)?;
    let outside = after_last + before_first + marks;
    Some(prompt * (outside.neg() + 1.0))
}

/// 0/1 masks `[batch, seq]`: after the last separator, before the first, the separators.
fn split_at_separators(ids: Tensor<2, Int>, separators: &[u32]) -> Option<[Tensor<2>; 3]> {
    let (&first, rest) = separators.split_first()?;
    let [batch, seq] = ids.dims();
    let mut marks = ids.clone().equal_elem(first as i64).float();
    for &s in rest {
        marks = marks + ids.clone().equal_elem(s as i64).float();
    }
    let seen = marks.clone().cumsum(1);
    let total = seen.clone().narrow(1, seq - 1, 1).expand([batch, seq]);
    let after_last = (total - seen.clone() + marks.clone())
        .equal_elem(0.0)
        .float();
    let before_first = seen.equal_elem(0.0).float();
    Some([after_last, before_first, marks])
}

#[derive(Module, Debug)]
pub struct Vlm {
    pub vision_model: ClipVisionTransformer,
    /// CLIP's `visual_projection` and the attribute probe, with `object_tokens`.
    pub visual_projection: Option<Linear>,
    pub attribute_probe: Option<AttributeProbe>,
    pub projector: Projector,
    pub referent: Option<ReferentReadout>,
    pub lm: OptForCausalLM,
    #[module(skip)]
    cells: Option<usize>,
    #[module(skip)]
    prefix_lm: bool,
    #[module(skip)]
    object_words: Option<ObjectWords>,
    #[module(skip)]
    count_token: bool,
    #[module(skip)]
    rewrite_objects: bool,
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
                config.visual_positions.then(|| config.visual_tokens()),
                device,
            ),
            referent: config
                .referent_token
                .then(|| ReferentReadout::new(config.lm.hidden_size, device)),
            count_token: config.count_token,
            rewrite_objects: config.rewrite_objects,
            lm: OptForCausalLM::new(&config.lm, device),
            cells: config.cells,
            prefix_lm: config.prefix_lm,
            object_words: config.object_words.clone(),
        }
    }

    /// Visual prefix length: one token per vision position (class token and patches), or
    /// the class token and one per cell.
    pub fn prefix_len(&self) -> usize {
        let tokens = match self.cells {
            Some(cells) => 1 + cells * cells,
            None => self
                .vision_model
                .embeddings
                .position_embedding
                .weight
                .dims()[0],
        };
        let readouts = self.object_words.as_ref().map_or(1, ObjectWords::readouts);
        tokens + readouts * (self.referent.is_some() as usize + self.count_token as usize)
    }

    /// The visual prefix for a prompt: [`Self::visual_prefix`] and, with a referent token,
    /// the cells' weighted mean under the prompt's (mask value 2) mean embedding.
    fn prompted_prefix(
        &self,
        pixels: Tensor<4>,
        ids: Tensor<2, Int>,
        text: Tensor<3>,
        attention_mask: Tensor<2, Int>,
    ) -> (Tensor<3>, Option<Tensor<2>>) {
        let Some(readout) = &self.referent else {
            return (self.visual_tokens(pixels).0, None);
        };
        let prompt = attention_mask.equal_elem(2).float();
        // With separators, the query is the prompt after the last one and the context (the
        // edit's question) the prompt before the first; each gets its own readout.
        let separators = self
            .object_words
            .as_ref()
            .map(|w| w.separators.clone())
            .unwrap_or_default();
        let segments = prompt_segments(ids.clone(), prompt.clone(), &separators);
        let mut objects = self.perceive(pixels);
        if let (true, Some(names), Some(target)) = (
            self.rewrite_objects,
            &self.object_words,
            edit_target_span(ids, prompt, &separators),
        ) {
            // The context's referent among the objects as perceived, then the edit applied.
            let keys = super::objects::object_word_embeddings(names, objects.clone(), |n| {
                self.embed_names(n)
            });
            let cells = keys.dims()[1] - 1;
            let context = segment_mean(&text, segments[1].clone());
            let (_, logits) = readout.forward(
                context,
                keys.clone().narrow(1, 1, cells),
                keys.narrow(1, 1, cells),
            );
            let referent = super::objects::straight_through_argmax(logits);
            let (attribute, position) = edit_target_choice(
                segment_mean(&text, target),
                self.embed_names(&names.classes),
                self.embed_names(&names.cells),
            );
            objects = rewrite_objects(objects, referent, attribute, position);
        }
        let (prefix, words) = self.tokens_of(objects);
        let mut tokens = vec![prefix.clone()];
        let mut query_logits = None;
        for weights in segments {
            let (segment_tokens, logits) = self.readout(readout, &prefix, &words, &text, weights);
            tokens.extend(segment_tokens);
            query_logits.get_or_insert(logits);
        }
        (Tensor::cat(tokens, 1), query_logits)
    }

    /// The referent (and count) tokens of one prompt segment (`weights` `[batch, seq]`: 1 on
    /// its tokens) and the readout's logits over the cells.
    fn readout(
        &self,
        readout: &ReferentReadout,
        prefix: &Tensor<3>,
        words: &Option<(Tensor<3>, Tensor<2>)>,
        text: &Tensor<3>,
        weights: Tensor<2>,
    ) -> (Vec<Tensor<3>>, Tensor<2>) {
        let n = prefix.dims()[1];
        let query = segment_mean(text, weights);
        // Keys in word space where there is one: the question's words match the cells' names.
        let cells = prefix.clone().narrow(1, 1, n - 1);
        let keys = match words {
            Some((w, _)) => w.clone().narrow(1, 1, n - 1),
            None => cells.clone(),
        };
        let (referent, logits) = readout.forward(query, keys, cells);
        let mut tokens = vec![referent];
        if let (true, Some((_, occupied)), Some(names)) =
            (self.count_token, words, &self.object_words)
        {
            let weights = readout.count(
                logits.clone(),
                occupied.clone().narrow(1, 1, n - 1),
                names.numbers.len(),
            );
            let numbers = self.embed_names(&names.numbers);
            tokens.push(weights.matmul(numbers).unsqueeze_dim::<3>(1));
        }
        (tokens, logits)
    }

    /// The visual tokens, `[batch, class + cells or patches, lm hidden]` (no referent token).
    pub fn visual_prefix(&self, pixels: Tensor<4>) -> Tensor<3> {
        self.visual_tokens(pixels).0
    }

    /// [`Self::visual_prefix`] and, with object words, their word-embedding part and each
    /// token's probability of holding an object (`[batch, tokens]`).
    fn visual_tokens(&self, pixels: Tensor<4>) -> (Tensor<3>, Option<(Tensor<3>, Tensor<2>)>) {
        self.tokens_of(self.perceive(pixels))
    }

    /// What the projector reads: the vision tower's tokens (pooled to cells), or with
    /// `object_tokens` the probe's distributions over each cell's attributes.
    fn perceive(&self, pixels: Tensor<4>) -> Tensor<3> {
        let mut tokens = self.vision_model.normed_tokens(pixels);
        if let Some(cells) = self.cells {
            tokens = pool_cells(tokens, cells);
        }
        if let (Some(projection), Some(probe)) = (&self.visual_projection, &self.attribute_probe) {
            tokens = probe.distributions(projection.forward(tokens));
        }
        tokens
    }

    /// [`Self::visual_tokens`] from what [`Self::perceive`] gives.
    fn tokens_of(&self, tokens: Tensor<3>) -> (Tensor<3>, Option<(Tensor<3>, Tensor<2>)>) {
        let prefix = self.projector.forward(tokens.clone());
        match &self.object_words {
            Some(words) => {
                let [batch, n, _] = tokens.dims();
                // Column 0 is the probe's "no object" shape.
                let occupied = tokens.clone().narrow(2, 0, 1).reshape([batch, n]).neg() + 1.0;
                let words = super::objects::object_word_embeddings(words, tokens, |names| {
                    self.embed_names(names)
                });
                (prefix + words.clone(), Some((words, occupied)))
            }
            None => (prefix, None),
        }
    }

    /// Per name (a list of ids), the sum of its words' embeddings: `[names, hidden]`.
    fn embed_names(&self, names: &[Vec<u32>]) -> Tensor<2> {
        let device = self.lm.model.decoder.embed_tokens.weight.device();
        super::objects::embed_names(names, |ids| self.lm.embed_tokens(ids), &device)
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
        let text = self.lm.embed_tokens(ids.clone());
        let Some(pixels) = pixels else {
            return self.lm.forward_embeds(text, attention_mask, hooks);
        };
        let (prefix, referent_logits) =
            self.prompted_prefix(pixels, ids, text.clone(), attention_mask.clone());
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
        out.referent_logits = referent_logits;
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
        let prompt_mask = if self.prefix_lm { 2 } else { 1 };
        super::editable::greedy_decode(prompt, prompt_mask, max_new, eos, &device, |ids, mask| {
            self.forward(pixels.clone(), ids, mask, hooks).logits
        })
    }
}

/// A VLM saved by [`save`]: the model, its config and its tokenizer.
pub fn load(
    dir: &Path,
    device: &Device,
) -> crate::Result<(Vlm, VlmConfig, crate::data::text::TextTokenizer)> {
    let config: VlmConfig = crate::error::read_json_config(&dir.join("vlm.json"), |_| Ok(()))?;
    let tokenizer =
        crate::data::text::TextTokenizer::from_file(&dir.join("tokenizer.json"), 256, 0)?;
    let weights = dir.join("model.bpk");
    let model = Vlm::new(&config, device)
        .try_load_file(&weights)
        .map_err(|e| crate::Error::Weights {
            path: weights,
            reason: e.to_string(),
        })?;
    Ok((model, config, tokenizer))
}

/// A trained base VLM on disk: `vlm.json` (the config), `model.bpk`, `tokenizer.json`.
pub fn save(model: &Vlm, config: &VlmConfig, tokenizer: &Path, out: &Path) -> crate::Result<()> {
    std::fs::create_dir_all(out).map_err(|e| crate::Error::io(out, e))?;
    let json = serde_json::to_string_pretty(config).expect("a config serializes");
    crate::error::write_atomic(&out.join("vlm.json"), json.as_bytes())?;
    let bytes = std::fs::read(tokenizer).map_err(|e| crate::Error::io(tokenizer, e))?;
    crate::error::write_atomic(&out.join("tokenizer.json"), &bytes)?;
    crate::error::save_module(model, &out.join("model.bpk"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::TensorData;

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

    /// One token per name: the probe's classes from id 4 ("no object" unnamed), the cells from
    /// `cells`, `numbers` number words from `numbers_from`.
    fn words(cells: u32, numbers_from: u32, numbers: usize, separators: [u32; 2]) -> ObjectWords {
        let names = |n: usize, from: u32| (0..n as u32).map(|i| vec![from + i]).collect();
        let mut classes: Vec<Vec<u32>> = names(crate::model::objects::probe_width(), 4);
        classes[0].clear();
        ObjectWords {
            classes,
            cells: names(9, cells),
            numbers: names(numbers, numbers_from),
            separators: separators.to_vec(),
        }
    }

    #[test]
    fn readouts_add_their_tokens_to_the_prefix_and_score_the_cells() {
        let device = Device::flex();
        let config = tiny().with_object_words(Some(words(10, 20, 5, [30, 31])));
        assert!(config.referent_token && config.count_token);
        // Cells and class token, then referent + count for the query and for the context.
        assert_eq!(config.prefix_len(), 10 + 2 * 2);
        let model = Vlm::new(&config, &device);
        assert_eq!(model.prefix_len(), config.prefix_len());
        // [BOS] context >> alt || query, all prompt (prefix-LM mask 2), then the answer.
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(vec![2i64, 5, 30, 6, 31, 7, 8, 9], [1, 8]),
            &device,
        );
        let mask = Tensor::<2, Int>::from_data(
            TensorData::new(vec![2i64, 2, 2, 2, 2, 2, 2, 1], [1, 8]),
            &device,
        );
        let image = Tensor::<4>::random([1, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        let hooks = Hooks {
            capture: true,
            ..Hooks::default()
        };
        let out = model.forward(Some(image), ids, mask, &hooks);
        assert_eq!(out.hidden_states[0].dims(), [1, 14 + 8, 32]);
        assert_eq!(out.logits.dims(), [1, 8, 40]);
        assert_eq!(out.referent_logits.map(|l| l.dims()), Some([1, 9]));
        // Another world's vocabulary: no readouts.
        let plain = tiny().with_object_words(None);
        assert!(!plain.referent_token && plain.prefix_len() == 10);
    }

    #[test]
    fn the_rewrite_changes_what_the_model_sees_only_where_the_target_names_something() {
        let device = Device::flex();
        let config = tiny().with_object_words(Some(words(24, 33, 3, [36, 37])));
        let plain = Vlm::new(&config, &device);
        let rewriting = Vlm {
            rewrite_objects: true,
            ..plain.clone()
        };
        let image = Tensor::<4>::random([1, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        // [BOS] context >> target || query, then the answer.
        let logits = |model: &Vlm, target: i64| -> Vec<f32> {
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(vec![2i64, 25, 36, target, 37, 7, 8, 9], [1, 8]),
                &device,
            );
            let mask = Tensor::<2, Int>::from_data(
                TensorData::new(vec![2i64, 2, 2, 2, 2, 2, 2, 1], [1, 8]),
                &device,
            );
            let out = model.forward(Some(image.clone()), ids, mask, &Hooks::default());
            out.logits.into_data().try_to_vec().unwrap()
        };
        let diff = |target| {
            let (a, b) = (logits(&plain, target), logits(&rewriting, target));
            a.iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        // Token 35 names nothing: nothing is rewritten (up to rounding).
        assert!(diff(35) < 1e-5, "{}", diff(35));
        // Token 6 is a shape class, token 30 a cell: the edited object changes.
        for target in [6, 30] {
            assert!(diff(target) > 1e-3, "target {target}: {}", diff(target));
        }
    }

    #[test]
    fn the_readout_starts_at_the_cell_whose_words_the_prompt_shares() {
        let device = Device::flex();
        let width = 64;
        let readout = ReferentReadout::new(width, &device);
        device.seed(5);
        let words = Tensor::<2>::random([6, width], Distribution::Normal(0.0, 1.0), &device);
        let word = |i: usize| words.clone().narrow(0, i, 1);
        // Cells hold words {0, 1}, {2, 3}, {4}; the prompt says words 2 and 5.
        let keys = Tensor::cat(vec![word(0) + word(1), word(2) + word(3), word(4)], 0)
            .unsqueeze_dim::<3>(0);
        let query = word(2) + word(5);
        let values = Tensor::<2>::eye(3, &device).reshape([1, 3, 3]);
        let (referent, logits) = readout.forward(query, keys, values);
        let picked: Vec<f32> = referent.into_data().try_to_vec().unwrap();
        assert!(picked[1] > 0.9, "{picked:?}");
        assert_eq!(logits.dims(), [1, 3]);
        // The count: two cells clearly above the threshold, one below, one empty.
        let logits =
            Tensor::<2>::from_data(TensorData::new(vec![12f32, 12., -8., 12.], [1, 4]), &device);
        let occupied =
            Tensor::<2>::from_data(TensorData::new(vec![1f32, 1., 1., 0.], [1, 4]), &device);
        let weights: Vec<f32> = readout
            .count(logits, occupied, 5)
            .into_data()
            .try_to_vec()
            .unwrap();
        let best = (0..5)
            .max_by(|&a, &b| weights[a].total_cmp(&weights[b]))
            .unwrap();
        assert_eq!(best, 2, "{weights:?}");
    }

    #[test]
    fn separators_split_the_prompt_into_query_and_context() {
        let device = Device::flex();
        // [BOS] src >> alt || query [answer]: the separators are 8 and 9.
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(vec![2i64, 5, 8, 6, 9, 7, 7, 11], [1, 8]),
            &device,
        );
        let prompt = Tensor::<2>::from_data(
            TensorData::new(vec![1f32, 1., 1., 1., 1., 1., 1., 0.], [1, 8]),
            &device,
        );
        let parts = prompt_segments(ids.clone(), prompt.clone(), &[8, 9]);
        let rows: Vec<Vec<f32>> = parts
            .into_iter()
            .map(|p| p.into_data().try_to_vec().unwrap())
            .collect();
        assert_eq!(rows[0], [0., 0., 0., 0., 0., 1., 1., 0.], "the query");
        assert_eq!(rows[1], [1., 1., 0., 0., 0., 0., 0., 0.], "the context");
        assert_eq!(prompt_segments(ids, prompt, &[]).len(), 1);
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

impl super::editable::EditableModel for Vlm {
    fn forward(
        &self,
        pixels: Option<Tensor<4>>,
        ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput {
        Vlm::forward(self, pixels, ids, attention_mask, hooks)
    }

    fn generate(
        &self,
        pixels: Option<Tensor<4>>,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        hooks: &Hooks,
    ) -> Vec<u32> {
        Vlm::generate(self, pixels, prompt, max_new, eos, hooks)
    }

    fn text_capacity(&self, with_image: bool) -> usize {
        let positions =
            self.lm.model.decoder.embed_positions.weight.dims()[0] - super::lm::POSITION_OFFSET;
        let prefix = if with_image { self.prefix_len() } else { 0 };
        positions.saturating_sub(prefix)
    }

    fn sequence_position(&self, t: usize, with_image: bool) -> usize {
        if with_image { self.prefix_len() + t } else { t }
    }

    fn num_layers(&self) -> usize {
        self.lm.num_layers()
    }

    fn hidden_size(&self) -> usize {
        self.lm.model.decoder.embed_tokens.weight.dims()[1]
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.lm.embed_tokens(ids)
    }

    fn ffn_weights(&self, layer: usize) -> Vec<Tensor<2>> {
        self.lm.ffn_weights(layer)
    }

    fn add_to_ffn_weights(&mut self, layer: usize, deltas: Vec<Tensor<2>>) {
        self.lm.add_to_ffn_weights(layer, deltas);
    }

    fn extra_neurons(&self, layer: usize) -> &[super::lm::ExtraNeurons] {
        &self.lm.model.decoder.layers[layer].extra
    }

    fn extra_neurons_mut(&mut self, layer: usize) -> &mut Vec<super::lm::ExtraNeurons> {
        &mut self.lm.model.decoder.layers[layer].extra
    }

    fn memory_attention(&self, layer: usize) -> &dyn crate::model::lm::MemoryAttention {
        &self.lm.model.decoder.layers[layer]
    }

    fn train_only_lm_layers(self, layers: &[usize]) -> Self {
        let mut model = self.no_grad();
        model.lm = model.lm.train_only_layers(layers);
        model
    }

    fn train_only_visual(self) -> Self {
        let mut model = self.no_grad();
        model.projector = model.projector.set_require_grad(true);
        let layers = &mut model.vision_model.encoder.layers;
        if let Some(last) = layers.pop() {
            layers.push(last.set_require_grad(true));
        }
        model
    }
}
