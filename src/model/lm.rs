//! A decoder-only language model following OPT (`transformers`' `OPTForCausalLM`): learned
//! positions with OPT's offset of 2, pre-LayerNorm blocks, a ReLU FFN `fc1`/`fc2`, a final
//! LayerNorm, and an LM head tied to the token embeddings. The module tree mirrors the
//! Hugging Face key names (`model.decoder.layers.0.self_attn.q_proj.weight`, ...), so real OPT
//! weights load without a remapping table.
//!
//! The hooks editing needs live here too: every layer's output can be captured, a layer's FFN
//! can carry extra key-value pairs (UniKE eq. 3, T-Patcher's neurons), a shift can be added
//! after a layer's self-attention (UniKE eq. 2/7), and training can be restricted to chosen
//! layers.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Bool, DType, Device, Gradients, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::clip::encoder::{SelfAttention, layer_norm};
use crate::error::Result;

/// OPT's embedding initialisation (`init_std` = 0.02). Burn's default, N(0, 1), makes the
/// tied LM head's first logits so large that training crawls.
const OPT_INIT: Initializer = Initializer::Normal {
    mean: 0.0,
    std: 0.02,
};

/// OPT's learned positions start at index 2 (`OPTLearnedPositionalEmbedding.offset`).
pub const POSITION_OFFSET: usize = 2;

/// The fields of a Hugging Face OPT `config.json` that define the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    #[serde(default = "relu_name")]
    pub activation_function: String,
    #[serde(default = "yes")]
    pub enable_bias: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "one")]
    pub pad_token_id: u32,
    #[serde(default = "two")]
    pub bos_token_id: u32,
    #[serde(default = "two")]
    pub eos_token_id: u32,
}

fn yes() -> bool {
    true
}
fn relu_name() -> String {
    "relu".into()
}
fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}

impl OptConfig {
    /// Reads and checks a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_json_config(path, Self::check)
    }

    /// The sizes fit together and the variant is the one implemented.
    pub fn check(&self) -> std::result::Result<(), String> {
        crate::error::check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("ffn_dim", self.ffn_dim),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        if !self.do_layer_norm_before {
            return Err(
                "post-LayerNorm OPT (do_layer_norm_before = false, OPT-350m) is not \
                        supported"
                    .into(),
            );
        }
        if self.activation_function != "relu" {
            return Err(format!(
                "activation_function '{}': only relu is supported",
                self.activation_function
            ));
        }
        if !self.tie_word_embeddings {
            return Err("an untied LM head is not supported".into());
        }
        if self
            .word_embed_proj_dim
            .is_some_and(|d| d != self.hidden_size)
        {
            return Err(
                "word_embed_proj_dim != hidden_size (project_in/out) is not supported".into(),
            );
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Extra FFN key-value pairs appended to a layer (UniKE eq. 3; T-Patcher's patch neurons):
/// `FFN(x) + relu(x K + b) V`.
#[derive(Module, Debug)]
pub struct ExtraNeurons {
    /// `[hidden, n]`.
    pub keys: Param<Tensor<2>>,
    /// `[n]`.
    pub key_bias: Param<Tensor<1>>,
    /// `[n, hidden]`.
    pub values: Param<Tensor<2>>,
    /// UniKE eq. 6: a learnable map of the editing direction zeta added to every value.
    pub zeta: Option<ZetaShift>,
}

/// UniKE eq. 6: `beta * W_zeta zeta`, added to every extra value vector.
#[derive(Module, Debug)]
pub struct ZetaShift {
    /// W_zeta, `[truth dim, hidden]`, learnable.
    pub projection: Param<Tensor<2>>,
    /// zeta, `[1, truth dim]`, fixed.
    pub zeta: Param<Tensor<2>>,
    #[module(skip)]
    pub beta: f64,
}

impl ZetaShift {
    /// W_zeta starts at zero, so the shift grows only as far as the edit's loss asks.
    pub fn new(zeta: Tensor<1>, hidden: usize, beta: f64) -> Self {
        let d = zeta.dims()[0];
        let device = zeta.device();
        Self {
            projection: Param::from_tensor(Tensor::zeros([d, hidden], &device)),
            zeta: Param::from_tensor(zeta.reshape([1, d])).set_require_grad(false),
            beta,
        }
    }

    /// `[1, hidden]`.
    pub fn shift(&self) -> Tensor<2> {
        self.zeta.val().matmul(self.projection.val()) * self.beta
    }
}

impl ExtraNeurons {
    /// `n` neurons with small random keys and zero values: the layer's output is unchanged
    /// until they are trained.
    pub fn new(hidden: usize, n: usize, device: &Device) -> Self {
        use burn::tensor::Distribution;
        let std = 1.0 / (hidden as f64).sqrt();
        Self::with_keys(Tensor::random(
            [hidden, n],
            Distribution::Normal(0.0, std),
            device,
        ))
    }

    /// Neurons with the given keys (`[hidden, n]`), zero key biases and zero values.
    pub fn with_keys(keys: Tensor<2>) -> Self {
        let [hidden, n] = keys.dims();
        let device = keys.device();
        Self {
            keys: Param::from_tensor(keys),
            key_bias: Param::from_tensor(Tensor::zeros([n], &device)),
            values: Param::from_tensor(Tensor::zeros([n, hidden], &device)),
            zeta: None,
        }
    }

    /// The value vectors in use: `W_V^extra (+ beta * W_zeta zeta)` (eq. 3 / eq. 6).
    pub fn value_vectors(&self) -> Tensor<2> {
        match &self.zeta {
            Some(zeta) => self.values.val() + zeta.shift(),
            None => self.values.val(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.dims()[1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The neurons' pre-activations `x K + b`, `[rows, n]`, for `x`: `[rows, hidden]`.
    pub fn pre_activations(&self, x: Tensor<2>) -> Tensor<2> {
        let n = self.len();
        x.matmul(self.keys.val()) + self.key_bias.val().reshape([1, n])
    }

    /// The neurons' activations `relu(x K + b)`, `[rows, n]`.
    pub fn activations(&self, x: Tensor<2>) -> Tensor<2> {
        relu(self.pre_activations(x))
    }

    /// What the neurons add to the FFN's output for `x`, `[rows, hidden]`: computed in the
    /// neurons' dtype (f32), returned in `x`'s (the model's).
    pub fn output(&self, x: Tensor<2>) -> Tensor<2> {
        let dtype = x.dtype();
        self.activations(x.cast(self.keys.val().dtype()))
            .matmul(self.value_vectors())
            .cast(dtype)
    }
}

#[derive(Module, Debug)]
pub struct OptDecoderLayer {
    pub self_attn: SelfAttention,
    pub self_attn_layer_norm: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub final_layer_norm: LayerNorm,
    /// Extra key-value pairs (one group per edit), absent in pre-trained weights.
    pub extra: Vec<ExtraNeurons>,
}

/// What a forward pass adds to or reads from the layers.
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    /// Per layer, a shift added to the self-attention output before the residual,
    /// broadcastable to `[batch, seq, hidden]` (UniKE eq. 2/7).
    pub attention_shift: Vec<Option<Tensor<3>>>,
    /// Rewrites chosen layers' self-attention output from the layer's input (UniKE's latent
    /// in-context editing, eq. 2/7).
    pub attention_mix: Option<std::sync::Arc<dyn AttentionMix>>,
    /// Keep every layer's input and output (`hidden_states` of the output).
    pub capture: bool,
    /// Layers whose FFN matrices report their inputs and gradients ([`FfnProbe`]; MEND, KE).
    pub ffn_probes: Vec<usize>,
    /// Per layer, changes of its FFN matrices' weights (`[in, out]`, Burn's layout; OPT: fc1,
    /// fc2; LLaMA: gate, up, down) applied in the forward pass and kept in the autodiff graph
    /// (meta-training differentiates through them).
    pub ffn_deltas: Vec<Option<Vec<Tensor<2>>>>,
}

/// What a probed FFN matrix saw in a forward pass: its input u and a zero tensor added to its
/// output, whose gradient is the gradient w.r.t. the output (delta). The weight's gradient is
/// `sum_t u_t^T delta_t`, the rank-1 pieces MEND transforms.
#[derive(Clone, Debug)]
pub struct FfnProbe {
    pub layer: usize,
    /// Each FFN matrix's input, `[rows, in]` (OPT: fc1, fc2; LLaMA: gate, up, down).
    pub inputs: Vec<Tensor<2>>,
    /// Each matrix's output probe, `[rows, out]`.
    pub outputs: Vec<Tensor<2>>,
}

impl FfnProbe {
    /// `(u, delta)` of each matrix after a backward pass.
    pub fn gradients(&self, grads: &Gradients) -> Vec<(Tensor<2>, Tensor<2>)> {
        self.inputs
            .iter()
            .zip(&self.outputs)
            .map(|(input, output)| {
                let delta = output
                    .grad(grads)
                    .unwrap_or_else(|| output.clone().detach().zeros_like());
                (
                    input.clone().detach().cast(DType::F32),
                    delta.cast(DType::F32),
                )
            })
            .collect()
    }
}

/// A layer's FFN matrices applied with the hooks' weight changes and probes (OPT's and
/// LLaMA's alike): call [`Self::apply`] for each matrix in order, then [`Self::finish`].
pub(crate) struct FfnHook<'a> {
    layer: usize,
    delta: Option<&'a Vec<Tensor<2>>>,
    probe: bool,
    inputs: Vec<Tensor<2>>,
    outputs: Vec<Tensor<2>>,
}

impl<'a> FfnHook<'a> {
    pub(crate) fn new(layer: usize, hooks: &'a Hooks) -> Self {
        Self {
            layer,
            delta: hooks.ffn_deltas.get(layer).and_then(Option::as_ref),
            probe: hooks.ffn_probes.contains(&layer),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// Whether the hooks touch this layer at all.
    pub(crate) fn active(&self) -> bool {
        self.delta.is_some() || self.probe
    }

    /// Matrix `m` (`linear`) on `input` (`[rows, in]`), plus its change, probed.
    pub(crate) fn apply(&mut self, m: usize, linear: &Linear, input: Tensor<2>) -> Tensor<2> {
        let mut out = linear.forward(input.clone());
        if let Some(delta) = self.delta {
            out = out + input.clone().matmul(delta[m].clone().cast(input.dtype()));
        }
        if self.probe {
            let zero = out.clone().detach().zeros_like().require_grad();
            out = out + zero.clone();
            self.inputs.push(input);
            self.outputs.push(zero);
        }
        out
    }

    pub(crate) fn finish(self) -> Option<FfnProbe> {
        self.probe.then(|| FfnProbe {
            layer: self.layer,
            inputs: self.inputs,
            outputs: self.outputs,
        })
    }
}

/// A rewrite of a layer's self-attention output.
pub trait AttentionMix: std::fmt::Debug + Send + Sync {
    /// The output to use in layer `index` instead of `h_input`, its self-attention output
    /// (`[batch, seq, hidden]`), given the layer and its input `x` (the residual stream before
    /// the layer). `None` leaves the layer alone.
    fn mix(
        &self,
        index: usize,
        layer: &dyn MemoryAttention,
        x: &Tensor<3>,
        h_input: &Tensor<3>,
    ) -> Option<Tensor<3>>;
}

/// A decoder layer's self-attention as UniKE's latent in-context editing reads it (OPT and
/// LLaMA alike): its pre-attention norm, and attention over memory states instead of the
/// sequence. Tensors go in and come out in f32 (the editors' dtype); the layer computes in
/// its own.
pub trait MemoryAttention {
    /// The layer's normalisation of its input before self-attention (`[.., hidden]`).
    fn attention_norm(&self, x: Tensor<3>) -> Tensor<3>;
    /// The keys and values of (normalised) memory states `[m, hidden]`, computed once.
    fn project_memory(&self, memory: Tensor<2>) -> [Tensor<2>; 2];
    /// Each (normalised) query row `[n, hidden]` attending to its retrieved entries `ids`
    /// (`[n, k]`) of the projected memory, through the layer's output projection.
    fn attend(
        &self,
        queries: Tensor<2>,
        keys: Tensor<2>,
        values: Tensor<2>,
        ids: Tensor<2, Int>,
    ) -> Tensor<2>;
}

impl MemoryAttention for OptDecoderLayer {
    fn attention_norm(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = self.fc1.weight.val().dtype();
        self.self_attn_layer_norm
            .forward(x.cast(dtype))
            .cast(DType::F32)
    }

    fn project_memory(&self, memory: Tensor<2>) -> [Tensor<2>; 2] {
        let dtype = self.fc1.weight.val().dtype();
        self.self_attn
            .project_memory(memory.cast(dtype))
            .map(|t| t.cast(DType::F32))
    }

    fn attend(
        &self,
        queries: Tensor<2>,
        keys: Tensor<2>,
        values: Tensor<2>,
        ids: Tensor<2, Int>,
    ) -> Tensor<2> {
        let dtype = self.fc1.weight.val().dtype();
        self.self_attn
            .attend(
                queries.cast(dtype),
                keys.cast(dtype),
                values.cast(dtype),
                ids,
            )
            .cast(DType::F32)
    }
}

impl OptDecoderLayer {
    fn new(config: &OptConfig, device: &Device) -> Self {
        let d = config.hidden_size;
        let eps = 1e-5;
        let linear = |i, o| {
            LinearConfig::new(i, o)
                .with_bias(config.enable_bias)
                .init(device)
        };
        Self {
            self_attn: SelfAttention::new(
                d,
                config.num_attention_heads,
                config.enable_bias,
                device,
            ),
            self_attn_layer_norm: layer_norm(d, eps, device),
            fc1: linear(d, config.ffn_dim),
            fc2: linear(config.ffn_dim, d),
            final_layer_norm: layer_norm(d, eps, device),
            extra: Vec::new(),
        }
    }

    /// The FFN on normalised `x`, `[rows, hidden]`: `fc2(relu(fc1 x))` plus the extra pairs.
    pub fn ffn(&self, x: Tensor<2>) -> Tensor<2> {
        let out = self.fc2.forward(relu(self.fc1.forward(x.clone())));
        self.extra
            .iter()
            .fold(out, |out, extra| out + extra.output(x.clone()))
    }

    /// [`Self::ffn`] with the hooks' weight changes and probes for layer `index`.
    fn ffn_hooked(
        &self,
        index: usize,
        x: Tensor<2>,
        hooks: &Hooks,
    ) -> (Tensor<2>, Option<FfnProbe>) {
        let mut hook = FfnHook::new(index, hooks);
        if !hook.active() {
            return (self.ffn(x), None);
        }
        let hidden = relu(hook.apply(0, &self.fc1, x.clone()));
        let out = hook.apply(1, &self.fc2, hidden);
        let out = self
            .extra
            .iter()
            .fold(out, |out, extra| out + extra.output(x.clone()));
        (out, hook.finish())
    }

    /// The layer's output, its FFN input (after `final_layer_norm`) and its FFN probe.
    fn forward(
        &self,
        index: usize,
        x: Tensor<3>,
        mask: Tensor<4, Bool>,
        hooks: &Hooks,
        cache: Option<&mut Option<[Tensor<4>; 2]>>,
    ) -> (Tensor<3>, Tensor<3>, Option<FfnProbe>) {
        let [batch, seq, d] = x.dims();
        let mut attn = self.self_attn.forward_cached(
            self.self_attn_layer_norm.forward(x.clone()),
            Some(mask),
            cache,
        );
        if let Some(mixed) = hooks
            .attention_mix
            .as_ref()
            .and_then(|mix| mix.mix(index, self, &x, &attn))
        {
            attn = mixed.cast(attn.dtype());
        }
        if let Some(shift) = hooks.attention_shift.get(index).and_then(Option::as_ref) {
            attn = attn.clone() + shift.clone().cast(attn.dtype());
        }
        let x = x + attn;
        let normed = self
            .final_layer_norm
            .forward(x.clone())
            .reshape([batch * seq, d]);
        let (ffn, probe) = self.ffn_hooked(index, normed.clone(), hooks);
        let out = x + ffn.reshape([batch, seq, d]);
        (out, normed.reshape([batch, seq, d]), probe)
    }
}

#[derive(Module, Debug)]
pub struct OptDecoder {
    pub embed_tokens: Embedding,
    pub embed_positions: Embedding,
    pub final_layer_norm: LayerNorm,
    pub layers: Vec<OptDecoderLayer>,
}

#[derive(Module, Debug)]
pub struct OptModel {
    pub decoder: OptDecoder,
}

/// `OPTForCausalLM`; the LM head is the token embedding matrix (tied).
#[derive(Module, Debug)]
pub struct OptForCausalLM {
    pub model: OptModel,
}

/// Logits and, when captured, the hidden states: `hidden_states[0]` is the embedding output,
/// `hidden_states[i + 1]` layer i's output (the last after the final LayerNorm), as in
/// `transformers`.
#[derive(Debug, Clone)]
pub struct LmOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<3>,
    pub hidden_states: Vec<Tensor<3>>,
    /// When captured, each layer's FFN input (normalised), `[batch, seq, hidden]`.
    pub ffn_inputs: Vec<Tensor<3>>,
    /// The probes of `Hooks::ffn_probes`, in layer order.
    pub probes: Vec<FfnProbe>,
    /// `[batch, seq, hidden]` after the final LayerNorm.
    pub last_hidden_state: Tensor<3>,
    /// A VLM's referent readout logits over the cells, `[batch, cells]`
    /// ([`crate::model::vlm::VlmConfig::referent_token`]).
    pub referent_logits: Option<Tensor<2>>,
}

impl OptForCausalLM {
    pub fn new(config: &OptConfig, device: &Device) -> Self {
        let d = config.hidden_size;
        Self {
            model: OptModel {
                decoder: OptDecoder {
                    embed_tokens: EmbeddingConfig::new(config.vocab_size, d)
                        .with_initializer(OPT_INIT)
                        .init(device),
                    embed_positions: EmbeddingConfig::new(
                        config.max_position_embeddings + POSITION_OFFSET,
                        d,
                    )
                    .with_initializer(OPT_INIT)
                    .init(device),
                    final_layer_norm: layer_norm(d, 1e-5, device),
                    layers: (0..config.num_hidden_layers)
                        .map(|_| OptDecoderLayer::new(config, device))
                        .collect(),
                },
            },
        }
    }

    /// Loads `model.safetensors` (Hugging Face keys; a stored `lm_head.weight`, the tied copy
    /// of the embeddings, is ignored).
    pub fn load_safetensors(self, path: &Path) -> Result<Self> {
        super::clip::weights::load_safetensors_ignoring(self, path, &["lm_head.weight"])
    }

    pub fn num_layers(&self) -> usize {
        self.model.decoder.layers.len()
    }

    /// Layer `layer`'s fc1 and fc2 weights (`[in, out]`).
    pub fn ffn_weights(&self, layer: usize) -> Vec<Tensor<2>> {
        let l = &self.model.decoder.layers[layer];
        vec![l.fc1.weight.val(), l.fc2.weight.val()]
    }

    /// Adds `[fc1, fc2]` changes to layer `layer`'s weights, detached.
    pub fn add_to_ffn_weights(&mut self, layer: usize, deltas: Vec<Tensor<2>>) {
        let l = &mut self.model.decoder.layers[layer];
        let [fc1, fc2]: [Tensor<2>; 2] = deltas.try_into().expect("fc1's and fc2's changes");
        let add = |w: Tensor<2>, d: Tensor<2>| (w.clone() + d.cast(w.dtype())).detach();
        l.fc1.weight = l.fc1.weight.clone().map(|w| add(w, fc1));
        l.fc2.weight = l.fc2.weight.clone().map(|w| add(w, fc2));
    }

    /// Only the given layers train; every other parameter (embeddings included) is frozen.
    pub fn train_only_layers(mut self, layers: &[usize]) -> Self {
        self = self.set_require_grad(false);
        let decoder = &mut self.model.decoder;
        decoder.layers = std::mem::take(&mut decoder.layers)
            .into_iter()
            .enumerate()
            .map(|(i, layer)| layer.set_require_grad(layers.contains(&i)))
            .collect();
        self
    }

    /// `ids`: `[batch, seq]`; `attention_mask`: `[batch, seq]`, 1 for tokens and 0 for padding
    /// (positions count the tokens, as OPT's do).
    pub fn forward(&self, ids: Tensor<2, Int>, attention_mask: Tensor<2, Int>) -> LmOutput {
        self.forward_with(ids, attention_mask, &Hooks::default())
    }

    pub fn forward_with(
        &self,
        ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput {
        let embeds = self.embed_tokens(ids);
        self.forward_embeds(embeds, attention_mask, hooks)
    }

    /// Token embeddings, `[batch, seq, hidden]`.
    pub fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.model.decoder.embed_tokens.forward(ids)
    }

    /// The forward pass from input embeddings (token embeddings, or a visual prefix followed
    /// by them): positions are added here. `attention_mask` is 0 for padding, 1 for a causal
    /// token and 2 for a token of the bidirectional prefix (a prefix LM, as PaliGemma: the
    /// image and the prompt attend to each other in full, the answer causally); with only 0s
    /// and 1s this is OPT's causal LM.
    pub fn forward_embeds(
        &self,
        embeds: Tensor<3>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput {
        let decoder = &self.model.decoder;
        let heads = decoder
            .layers
            .first()
            .map_or(1, |l| l.self_attn.num_heads());
        let mask = attention_mask_4d(attention_mask.clone(), heads);
        let attention_mask = attention_mask.clamp_max(1);
        // OPT: position = (number of tokens up to here) - 1, padding at -1; plus the offset.
        let positions = (attention_mask.clone().cumsum(1) * attention_mask.clone() - 1)
            + POSITION_OFFSET as i64;
        let mut x = embeds + decoder.embed_positions.forward(positions);

        let mut hidden_states = Vec::new();
        let mut ffn_inputs = Vec::new();
        let mut probes = Vec::new();
        for (i, layer) in decoder.layers.iter().enumerate() {
            if hooks.capture {
                hidden_states.push(x.clone());
            }
            let (out, ffn_input, probe) = layer.forward(i, x, mask.clone(), hooks, None);
            x = out;
            probes.extend(probe);
            if hooks.capture {
                ffn_inputs.push(ffn_input);
            }
        }
        let last_hidden_state = decoder.final_layer_norm.forward(x);
        if hooks.capture {
            hidden_states.push(last_hidden_state.clone());
        }
        LmOutput {
            logits: self.lm_head(last_hidden_state.clone()),
            hidden_states,
            ffn_inputs,
            probes,
            last_hidden_state,
            referent_logits: None,
        }
    }

    /// Logits of the new tokens `embeds` (`[batch, new, hidden]`, unpadded) after the ones in
    /// `cache`, which they extend; positions continue from the cached tokens (OPT's offset of
    /// 2 included). Greedy generation at one position's cost per token.
    pub fn forward_cached(&self, embeds: Tensor<3>, cache: &mut KvCache) -> Tensor<3> {
        let decoder = &self.model.decoder;
        let [batch, new, _] = embeds.dims();
        let device = embeds.device();
        let heads = decoder
            .layers
            .first()
            .map_or(1, |l| l.self_attn.num_heads());
        let mask = cache.causal_mask(batch, heads, new, &device);
        let start = (cache.len + POSITION_OFFSET) as i64;
        let positions = Tensor::<1, Int>::arange(start..start + new as i64, &device)
            .reshape([1, new])
            .expand([batch, new]);
        let mut x = embeds + decoder.embed_positions.forward(positions);
        let hooks = Hooks::default();
        for (i, (layer, kv)) in decoder
            .layers
            .iter()
            .zip(cache.layers.iter_mut())
            .enumerate()
        {
            x = layer.forward(i, x, mask.clone(), &hooks, Some(kv)).0;
        }
        cache.len += new;
        self.lm_head(decoder.final_layer_norm.forward(x))
    }

    /// Logits from final hidden states through the tied embedding matrix.
    pub fn lm_head(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [batch, seq, d] = hidden.dims();
        let embeddings = self.model.decoder.embed_tokens.weight.val(); // [vocab, d]
        let vocab = embeddings.dims()[0];
        hidden
            .reshape([batch * seq, d])
            .matmul(embeddings.transpose())
            .reshape([batch, seq, vocab])
    }
}

/// The `[batch, heads, seq, seq]` attention mask of a decoder, true where a query may not
/// attend to a key: later keys and padding keys (`attention_mask` 0; kept on the diagonal so
/// no row is entirely masked), except that tokens of a bidirectional prefix (mask value 2)
/// see each other in full.
pub fn attention_mask_4d(attention_mask: Tensor<2, Int>, heads: usize) -> Tensor<4, Bool> {
    let [batch, seq] = attention_mask.dims();
    let device = attention_mask.device();
    let prefix = attention_mask.clone().equal_elem(2);
    let causal = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &device)
        .reshape([1, 1, seq, seq])
        .expand([batch, heads, seq, seq]);
    let off_diagonal = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &device)
        .bool_or(Tensor::<2, Bool>::triu_mask([seq, seq], 0, &device))
        .reshape([1, 1, seq, seq])
        .expand([batch, heads, seq, seq]);
    let padding = attention_mask
        .equal_elem(0)
        .reshape([batch, 1, 1, seq])
        .expand([batch, heads, seq, seq])
        .bool_and(off_diagonal);
    let both_in_prefix = prefix
        .clone()
        .reshape([batch, 1, seq, 1])
        .expand([batch, heads, seq, seq])
        .bool_and(
            prefix
                .reshape([batch, 1, 1, seq])
                .expand([batch, heads, seq, seq]),
        );
    causal.bool_or(padding).bool_and(both_in_prefix.bool_not())
}

/// Keys and values of the tokens decoded so far, per layer (`[batch, kv heads, tokens,
/// head_dim]`), so that each new token costs one position of work (greedy generation).
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<Option<[Tensor<4>; 2]>>,
    /// Tokens cached so far.
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// `[batch, heads, new, len + new]`, true where new token i may not see key j
    /// (`j > len + i`): causal over the cached and the new tokens.
    pub fn causal_mask(
        &self,
        batch: usize,
        heads: usize,
        new: usize,
        device: &Device,
    ) -> Tensor<4, Bool> {
        let keys = self.len + new;
        let masked: Vec<bool> = (0..new)
            .flat_map(|i| (0..keys).map(move |j| j > self.len + i))
            .collect();
        Tensor::<2, Bool>::from_data(TensorData::new(masked, [new, keys]), device)
            .reshape([1, 1, new, keys])
            .expand([batch, heads, new, keys])
    }
}
