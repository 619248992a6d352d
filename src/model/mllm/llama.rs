//! LLaMA (`transformers`' `LlamaForCausalLM`, also Vicuna's): RMSNorm, rotary positions
//! (half-split `rotate_half`), grouped-query attention and a SwiGLU MLP. The module tree
//! mirrors the Hugging Face keys (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, RmsNorm, RmsNormConfig};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::clip::encoder::{apply, extend_cache, linear_with_bias as linear};
use crate::model::lm::{
    ExtraNeurons, FfnHook, FfnProbe, Hooks, KvCache, LmOutput, attention_mask_4d,
};

/// The fields of a Hugging Face LLaMA `config.json`; missing ones take `LlamaConfig`'s
/// defaults, as the abbreviated `text_config` of LLaVA-1.5's hub config relies on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None`: as many as the attention heads (no grouping).
    pub num_key_value_heads: Option<usize>,
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// The hub's (4.x) spelling of the RoPE base.
    pub rope_theta: Option<f64>,
    /// 5.x's spelling: `{rope_type, rope_theta}`.
    pub rope_parameters: Option<RopeParameters>,
    /// 4.x's scaled-RoPE settings; only `null` (plain RoPE) is implemented.
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    pub rope_theta: f64,
}

fn default_rope_type() -> String {
    "default".into()
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            // transformers' LlamaConfig defaults; configs often leave them out.
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::Value::from(2)),
            pad_token_id: None,
        }
    }
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE base from either spelling (10000 when neither is given).
    pub fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// The sizes fit together and the variant is the one implemented.
    pub fn check(&self) -> Result<(), String> {
        crate::error::check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ])?;
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {} (and no head_dim)",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act '{}': only silu is supported",
                self.hidden_act
            ));
        }
        let scaled = self
            .rope_scaling
            .as_ref()
            .is_some_and(|s| !s.is_null() && s.get("rope_type").is_none_or(|t| t != "default"));
        let typed = self
            .rope_parameters
            .as_ref()
            .is_some_and(|p| p.rope_type != "default");
        if scaled || typed {
            return Err(
                "scaled RoPE (rope_scaling / a rope_type other than default) is \
                        not supported"
                    .into(),
            );
        }
        Ok(())
    }
}

#[derive(Module, Debug)]
pub struct LlamaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

impl LlamaAttention {
    fn new(config: &LlamaConfig, device: &Device) -> Self {
        let (d, hd, bias) = (config.hidden_size, config.head_dim(), config.attention_bias);
        let heads = config.num_attention_heads;
        let kv_heads = config.kv_heads();
        Self {
            q_proj: linear(d, heads * hd, bias, device),
            k_proj: linear(d, kv_heads * hd, bias, device),
            v_proj: linear(d, kv_heads * hd, bias, device),
            o_proj: linear(heads * hd, d, bias, device),
            heads,
            kv_heads,
            head_dim: hd,
        }
    }

    /// `x`: `[batch, seq, hidden]`; `rope`: cos and sin of its positions; `mask`: true where a
    /// query may not attend to a key; `cache`: the earlier tokens' keys and values, extended
    /// by these.
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: Tensor<4, Bool>,
        cache: Option<&mut Option<[Tensor<4>; 2]>>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let hd = self.head_dim;
        let split = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, hd]).swap_dims(1, 2);
        let q = rope.rotate(split(apply(&self.q_proj, x.clone()), self.heads));
        let mut k = rope.rotate(split(apply(&self.k_proj, x.clone()), self.kv_heads));
        let mut v = split(apply(&self.v_proj, x), self.kv_heads);
        if let Some(cache) = cache {
            [k, v] = extend_cache(cache, k, v);
        }
        let keys = k.dims()[2];
        // Grouped-query attention: key/value head j serves query heads j*r .. j*r + r - 1.
        let r = self.heads / self.kv_heads;
        let repeat = |t: Tensor<4>| {
            t.reshape([batch, self.kv_heads, 1, keys, hd])
                .expand([batch, self.kv_heads, r, keys, hd])
                .reshape([batch, self.heads, keys, hd])
        };
        let context = attention(
            q,
            repeat(k),
            repeat(v),
            Some(mask),
            None,
            AttentionModuleOptions::default(),
        );
        let context = context
            .swap_dims(1, 2)
            .reshape([batch, seq, self.heads * hd]);
        apply(&self.o_proj, context)
    }

    /// [`crate::model::lm::MemoryAttention::attend`] with grouped-query heads. No rotary
    /// position on either side: rotating a query and a key by the same position leaves their
    /// product as it is, so the retrieved states count as if at the query's own position.
    fn attend_memory(
        &self,
        queries: Tensor<2>,
        keys: Tensor<2>,
        values: Tensor<2>,
        ids: Tensor<2, Int>,
    ) -> Tensor<2> {
        let q = self.q_proj.forward(queries);
        let heads = [self.heads, self.kv_heads];
        let context = crate::model::clip::encoder::attend_retrieved(
            q,
            keys,
            values,
            ids,
            heads,
            self.head_dim,
        );
        self.o_proj.forward(context)
    }
}

impl crate::model::lm::MemoryAttention for LlamaDecoderLayer {
    fn attention_norm(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = self.self_attn.k_proj.weight.val().dtype();
        self.input_layernorm.forward(x.cast(dtype)).cast(DType::F32)
    }

    fn project_memory(&self, memory: Tensor<2>) -> [Tensor<2>; 2] {
        let memory = memory.cast(self.self_attn.k_proj.weight.val().dtype());
        [
            self.self_attn.k_proj.forward(memory.clone()),
            self.self_attn.v_proj.forward(memory),
        ]
        .map(|t| t.cast(DType::F32))
    }

    fn attend(
        &self,
        queries: Tensor<2>,
        keys: Tensor<2>,
        values: Tensor<2>,
        ids: Tensor<2, Int>,
    ) -> Tensor<2> {
        let dtype = self.self_attn.k_proj.weight.val().dtype();
        self.self_attn
            .attend_memory(
                queries.cast(dtype),
                keys.cast(dtype),
                values.cast(dtype),
                ids,
            )
            .cast(DType::F32)
    }
}

/// Rotary position embedding for positions `start..start + seq`: `inv_freq =
/// theta^(-2i/hd)`, `emb = cat(freqs, freqs)`.
struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rope {
    fn new(start: usize, seq: usize, head_dim: usize, theta: f64, device: &Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        for t in start..start + seq {
            // Computed in f64 and rounded once (transformers computes the angles in f32).
            let angles: Vec<f32> = (0..half)
                .map(|i| {
                    let inv_freq = (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32;
                    t as f32 * inv_freq
                })
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let tensor = |v: Vec<f32>| {
            Tensor::<1>::from_floats(v.as_slice(), device).reshape([1, 1, seq, head_dim])
        };
        Self {
            cos: tensor(cos),
            sin: tensor(sin),
        }
    }

    /// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x2, x1)`; `x`:
    /// `[batch, heads, seq, head_dim]`.
    fn rotate(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, heads, seq, hd] = x.dims();
        let half = hd / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = self
            .cos
            .clone()
            .cast(x.dtype())
            .expand([batch, heads, seq, hd]);
        let sin = self
            .sin
            .clone()
            .cast(x.dtype())
            .expand([batch, heads, seq, hd]);
        x * cos + rotated * sin
    }
}

#[derive(Module, Debug)]
pub struct LlamaMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl LlamaMlp {
    /// `down_proj(silu(gate_proj(x)) * up_proj(x))`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(apply(&self.gate_proj, x.clone()));
        apply(&self.down_proj, gate * apply(&self.up_proj, x))
    }
}

#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    pub self_attn: LlamaAttention,
    pub mlp: LlamaMlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// Extra key-value pairs (UniKE eq. 3, T-Patcher), absent in pre-trained weights. SwiGLU
    /// has no "off" state (silu(x) != 0 for x < 0), so they are a parallel ReLU side-FFN on
    /// the MLP's input, `relu(x K + b) V` added to its output: a neuron that does not fire
    /// changes nothing, as on OPT.
    pub extra: Vec<ExtraNeurons>,
}

impl LlamaDecoderLayer {
    fn new(config: &LlamaConfig, device: &Device) -> Self {
        let (d, i, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(config.rms_norm_eps)
                .init(device)
        };
        Self {
            self_attn: LlamaAttention::new(config, device),
            mlp: LlamaMlp {
                gate_proj: linear(d, i, bias, device),
                up_proj: linear(d, i, bias, device),
                down_proj: linear(i, d, bias, device),
            },
            input_layernorm: norm(),
            post_attention_layernorm: norm(),
            extra: Vec::new(),
        }
    }

    /// The layer's output, its MLP input (after `post_attention_layernorm`) and its MLP
    /// probe; the hooks' shift for layer `index` is added to the self-attention output before
    /// the residual (UniKE eq. 2/7), their weight changes and probes apply to gate, up and
    /// down (MEND's rank-1 pieces: u = the normed input for gate and up, silu(gate) * up for
    /// down; delta = the gradient at each projection's output).
    fn forward(
        &self,
        index: usize,
        x: Tensor<3>,
        rope: &Rope,
        mask: Tensor<4, Bool>,
        hooks: &Hooks,
        cache: Option<&mut Option<[Tensor<4>; 2]>>,
    ) -> (Tensor<3>, Tensor<3>, Option<FfnProbe>) {
        let shift = hooks.attention_shift.get(index).and_then(Option::as_ref);
        let mut attn =
            self.self_attn
                .forward(self.input_layernorm.forward(x.clone()), rope, mask, cache);
        if let Some(mixed) = hooks
            .attention_mix
            .as_ref()
            .and_then(|mix| mix.mix(index, self, &x, &attn))
        {
            attn = mixed.cast(attn.dtype());
        }
        if let Some(shift) = shift {
            attn = attn.clone() + shift.clone().cast(attn.dtype());
        }
        let x = x + attn;
        let normed = self.post_attention_layernorm.forward(x.clone());
        let [batch, seq, d] = normed.dims();
        let rows = normed.clone().reshape([batch * seq, d]);
        let mut hook = FfnHook::new(index, hooks);
        let (mlp, probe) = if hook.active() {
            let gate = silu(hook.apply(0, &self.mlp.gate_proj, rows.clone()));
            let up = hook.apply(1, &self.mlp.up_proj, rows.clone());
            let down = hook.apply(2, &self.mlp.down_proj, gate * up);
            (down.reshape([batch, seq, d]), hook.finish())
        } else {
            (self.mlp.forward(normed.clone()), None)
        };
        let mlp = self.extra.iter().fold(mlp, |out, extra| {
            let side = extra.output(rows.clone()).reshape([batch, seq, d]);
            out + side
        });
        (x + mlp, normed, probe)
    }
}

#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaDecoderLayer>,
    pub norm: RmsNorm,
}

/// `LlamaForCausalLM`; `lm_head` is absent when the config ties it to the embeddings.
#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    pub model: LlamaModel,
    pub lm_head: Option<Linear>,
    #[module(skip)]
    theta: f64,
    #[module(skip)]
    max_positions: usize,
}

impl LlamaForCausalLM {
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        let d = config.hidden_size;
        Self {
            model: LlamaModel {
                embed_tokens: EmbeddingConfig::new(config.vocab_size, d).init(device),
                layers: (0..config.num_hidden_layers)
                    .map(|_| LlamaDecoderLayer::new(config, device))
                    .collect(),
                norm: RmsNormConfig::new(d)
                    .with_epsilon(config.rms_norm_eps)
                    .init(device),
            },
            lm_head: (!config.tie_word_embeddings)
                .then(|| linear(d, config.vocab_size, false, device)),
            theta: config.theta(),
            max_positions: config.max_position_embeddings,
        }
    }

    /// Token embeddings, `[batch, seq, hidden]`.
    pub fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.model.embed_tokens.forward(ids)
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    /// Layer `layer`'s gate, up and down weights (`[in, out]`).
    pub fn ffn_weights(&self, layer: usize) -> Vec<Tensor<2>> {
        let m = &self.model.layers[layer].mlp;
        vec![
            m.gate_proj.weight.val(),
            m.up_proj.weight.val(),
            m.down_proj.weight.val(),
        ]
    }

    /// Adds `[gate, up, down]` changes to layer `layer`'s weights, detached.
    pub fn add_to_ffn_weights(&mut self, layer: usize, deltas: Vec<Tensor<2>>) {
        let m = &mut self.model.layers[layer].mlp;
        let [gate, up, down]: [Tensor<2>; 3] =
            deltas.try_into().expect("gate's, up's and down's changes");
        let add = |w: Tensor<2>, d: Tensor<2>| (w.clone() + d.cast(w.dtype())).detach();
        m.gate_proj.weight = m.gate_proj.weight.clone().map(|w| add(w, gate));
        m.up_proj.weight = m.up_proj.weight.clone().map(|w| add(w, up));
        m.down_proj.weight = m.down_proj.weight.clone().map(|w| add(w, down));
    }

    /// Only the given layers train; every other parameter (embeddings included) is frozen.
    pub fn train_only_layers(mut self, layers: &[usize]) -> Self {
        self = self.no_grad();
        self.model.layers = std::mem::take(&mut self.model.layers)
            .into_iter()
            .enumerate()
            .map(|(i, layer)| layer.set_require_grad(layers.contains(&i)))
            .collect();
        self
    }

    /// `max_position_embeddings` (RoPE has no table; transformers' limit is the config's).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Logits and what the hooks ask for, from input embeddings; positions are `0..seq` (as
    /// `transformers` numbers them without a cache), padding keys masked. The hooks: per-layer
    /// attention shifts, captured hidden states (`hidden_states[0]` the embeddings, `[i + 1]`
    /// layer i's output, the last after the final norm, as in `transformers`), MLP inputs,
    /// the MLP's weight changes and probes (gate, up, down), and UniKE's attention mix.
    pub fn forward_hooked(
        &self,
        embeds: Tensor<3>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput {
        let [_, seq, _] = embeds.dims();
        let layers = &self.model.layers;
        let (heads, head_dim) = layers
            .first()
            .map_or((1, 2), |l| (l.self_attn.heads, l.self_attn.head_dim));
        let rope = Rope::new(0, seq, head_dim, self.theta, &embeds.device());
        let mask = attention_mask_4d(attention_mask, heads);
        let mut x = embeds;
        let mut hidden_states = Vec::new();
        let mut ffn_inputs = Vec::new();
        let mut probes = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            if hooks.capture {
                hidden_states.push(x.clone());
            }
            let (out, normed, probe) = layer.forward(i, x, &rope, mask.clone(), hooks, None);
            x = out;
            probes.extend(probe);
            if hooks.capture {
                ffn_inputs.push(normed);
            }
        }
        let last_hidden_state = self.model.norm.forward(x);
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
    /// `cache`, which they extend: greedy generation at one position's cost per token.
    pub fn forward_cached(&self, embeds: Tensor<3>, cache: &mut KvCache) -> Tensor<3> {
        let [batch, new, _] = embeds.dims();
        let layers = &self.model.layers;
        let (heads, head_dim) = layers
            .first()
            .map_or((1, 2), |l| (l.self_attn.heads, l.self_attn.head_dim));
        let device = embeds.device();
        let rope = Rope::new(cache.len, new, head_dim, self.theta, &device);
        let mask = cache.causal_mask(batch, heads, new, &device);
        let mut x = embeds;
        let hooks = Hooks::default();
        for (i, (layer, kv)) in layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            x = layer.forward(i, x, &rope, mask.clone(), &hooks, Some(kv)).0;
        }
        cache.len += new;
        self.lm_head(self.model.norm.forward(x))
    }

    fn lm_head(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => apply(head, hidden),
            None => {
                let [batch, seq, d] = hidden.dims();
                let embeddings = self.model.embed_tokens.weight.val();
                let vocab = embeddings.dims()[0];
                hidden
                    .reshape([batch * seq, d])
                    .matmul(embeddings.transpose())
                    .reshape([batch, seq, vocab])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lm::MemoryAttention;
    use burn::tensor::{Distribution, TensorData};

    /// One retrieved entry takes all the attention: query head h reads kv head h / r (r query
    /// heads per kv head), so the output is o_proj of the entry's values, repeated that way.
    #[test]
    fn memory_attention_shares_each_kv_head_among_its_query_heads() {
        let device = Device::flex();
        let config = LlamaConfig {
            hidden_size: 12,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: Some(5),
            ..LlamaConfig::default()
        };
        let layer = LlamaDecoderLayer::new(&config, &device);
        let memory = Tensor::<2>::random([3, 12], Distribution::Normal(0.0, 1.0), &device);
        let queries = Tensor::<2>::random([2, 12], Distribution::Normal(0.0, 1.0), &device);
        let [keys, values] = layer.project_memory(memory);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 0], [2, 1]), &device);
        let got = layer.attend(queries, keys, values.clone(), ids);
        // [2 rows, 2 kv heads, 5] -> [2 rows, 4 heads, 5]: heads 0, 1 read kv head 0.
        let picked = values.select(0, Tensor::from_data([2i64, 0], &device));
        let repeated = picked
            .reshape([2, 2, 1, 5])
            .expand([2, 2, 2, 5])
            .reshape([2, 20]);
        let want = layer.self_attn.o_proj.forward(repeated);
        let diff = (got - want).abs().max().into_scalar::<f32>();
        assert!(diff < 1e-5, "differs by {diff}");
    }
}
