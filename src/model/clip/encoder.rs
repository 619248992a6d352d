//! The pre-LayerNorm transformer encoder shared by CLIP's text and vision towers.
//! Field names mirror `transformers`' `CLIPEncoder`, so weights load without remapping.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor};

use super::config::Activation;

/// Sizes of one encoder stack (the text and vision configs both provide them).
#[derive(Clone, Copy, Debug)]
pub struct EncoderDims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
}

pub fn layer_norm(dim: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNormConfig::new(dim).with_epsilon(eps).init(device)
}

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    linear_with_bias(d_in, d_out, true, device)
}

pub fn linear_with_bias(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

/// `linear` over the last dimension of `[batch, seq, d_in]`, as one `[batch * seq, d_in]`
/// matmul: on the CPU backend one large gemm is faster than a broadcast batch of small ones.
pub fn apply(linear: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [batch, seq, d_in] = x.dims();
    let y = linear.forward(x.reshape([batch * seq, d_in]));
    let d_out = y.dims()[1];
    y.reshape([batch, seq, d_out])
}

/// Multi-head self-attention with separate q/k/v projections (`self_attn`), as CLIP and OPT
/// name them.
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    num_heads: usize,
}

impl SelfAttention {
    pub fn new(hidden: usize, num_heads: usize, bias: bool, device: &Device) -> Self {
        let linear = || {
            LinearConfig::new(hidden, hidden)
                .with_bias(bias)
                .init(device)
        };
        Self {
            q_proj: linear(),
            k_proj: linear(),
            v_proj: linear(),
            out_proj: linear(),
            num_heads,
        }
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// `x`: `[batch, seq, hidden]`; `mask`: `[batch, heads, seq, seq]`, true where a query may
    /// not attend to a key.
    pub fn forward(&self, x: Tensor<3>, mask: Option<Tensor<4, Bool>>) -> Tensor<3> {
        self.forward_cached(x, mask, None)
    }

    /// [`Self::forward`] after the tokens whose keys and values `cache` holds (`[batch, heads,
    /// tokens, head_dim]`), extending it by these (a decoder's greedy generation).
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        mask: Option<Tensor<4, Bool>>,
        cache: Option<&mut Option<[Tensor<4>; 2]>>,
    ) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let heads = |t: Tensor<3>| {
            t.reshape([batch, seq, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let q = heads(apply(&self.q_proj, x.clone()));
        let mut k = heads(apply(&self.k_proj, x.clone()));
        let mut v = heads(apply(&self.v_proj, x));
        if let Some(cache) = cache {
            [k, v] = extend_cache(cache, k, v);
        }
        // softmax(q kᵀ / sqrt(head_dim)) v, the scale `transformers` applies to q.
        let context = attention(q, k, v, mask, None, AttentionModuleOptions::default());
        let context = context.swap_dims(1, 2).reshape([batch, seq, hidden]);
        apply(&self.out_proj, context)
    }

    /// The keys and values of other states `memory` (`[m, hidden]`) under this layer's
    /// projections, computed once and attended over many times (UniKE's knowledge memory).
    pub fn project_memory(&self, memory: Tensor<2>) -> [Tensor<2>; 2] {
        [
            self.k_proj.forward(memory.clone()),
            self.v_proj.forward(memory),
        ]
    }

    /// Attention of each query row (`[n, hidden]`) over its own entries of projected memory
    /// states (`keys`, `values`: `[m, hidden]` from [`Self::project_memory`]): row i attends
    /// to the entries `ids[i]` (`[n, k]`) only - what in-context states contribute to a
    /// query (UniKE eq. 2's `Attn(X_input, X_know, X_know)` over the retrieved X_know).
    pub fn attend(
        &self,
        queries: Tensor<2>,
        keys: Tensor<2>,
        values: Tensor<2>,
        ids: Tensor<2, Int>,
    ) -> Tensor<2> {
        let head_dim = queries.dims()[1] / self.num_heads;
        let heads = [self.num_heads, self.num_heads];
        let context = attend_retrieved(
            self.q_proj.forward(queries),
            keys,
            values,
            ids,
            heads,
            head_dim,
        );
        self.out_proj.forward(context)
    }
}

/// Attention of each projected query row (`[n, heads * head_dim]`) over its own retrieved
/// rows `ids[i]` (`[n, k]`) of projected keys and values (`[m, kv_heads * head_dim]`),
/// `heads = [query heads, kv heads]`: kv head j serves query heads j*r .. j*r + r - 1 (r =
/// heads / kv heads; 1 without grouping). The context, `[n, heads * head_dim]`, before the
/// output projection.
pub fn attend_retrieved(
    q: Tensor<2>,
    keys: Tensor<2>,
    values: Tensor<2>,
    ids: Tensor<2, Int>,
    [heads, kv_heads]: [usize; 2],
    head_dim: usize,
) -> Tensor<2> {
    let n = q.dims()[0];
    let k = ids.dims()[1];
    let r = heads / kv_heads;
    let ids = ids.reshape([n * k]);
    // [n, heads, k, head_dim]: each row's retrieved entries, split into heads.
    let retrieved = |t: Tensor<2>| {
        t.select(0, ids.clone())
            .reshape([n, k, kv_heads, 1, head_dim])
            .expand([n, k, kv_heads, r, head_dim])
            .reshape([n, k, heads, head_dim])
            .swap_dims(1, 2)
    };
    let q = q.reshape([n, 1, heads, head_dim]).swap_dims(1, 2);
    let context = attention(
        q,
        retrieved(keys),
        retrieved(values),
        None,
        None,
        AttentionModuleOptions::default(),
    );
    context.reshape([n, heads * head_dim])
}

/// The two-layer MLP of an encoder layer (`mlp`).
#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    activation: Activation,
}

impl ClipMlp {
    pub fn new(dims: &EncoderDims, device: &Device) -> Self {
        Self {
            fc1: linear(dims.hidden_size, dims.intermediate_size, device),
            fc2: linear(dims.intermediate_size, dims.hidden_size, device),
            activation: dims.activation,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = apply(&self.fc1, x);
        let h = match self.activation {
            Activation::QuickGelu => crate::model::fused::quick_gelu(h),
            Activation::Gelu => gelu(h),
        };
        apply(&self.fc2, h)
    }
}

/// One pre-LN residual block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: SelfAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub fn new(dims: &EncoderDims, device: &Device) -> Self {
        Self {
            self_attn: SelfAttention::new(dims.hidden_size, dims.num_heads, true, device),
            layer_norm1: layer_norm(dims.hidden_size, dims.layer_norm_eps, device),
            mlp: ClipMlp::new(dims, device),
            layer_norm2: layer_norm(dims.hidden_size, dims.layer_norm_eps, device),
        }
    }

    pub fn forward(&self, x: Tensor<3>, mask: Option<Tensor<4, Bool>>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), mask);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    pub fn new(dims: &EncoderDims, device: &Device) -> Self {
        Self {
            layers: (0..dims.num_layers)
                .map(|_| ClipEncoderLayer::new(dims, device))
                .collect(),
        }
    }

    pub fn forward(&self, mut x: Tensor<3>, mask: Option<Tensor<4, Bool>>) -> Tensor<3> {
        for layer in &self.layers {
            x = layer.forward(x, mask.clone());
        }
        x
    }
}

/// `[k, v]` extended by the cache's earlier ones along the token axis, the cache updated.
pub fn extend_cache(
    cache: &mut Option<[Tensor<4>; 2]>,
    k: Tensor<4>,
    v: Tensor<4>,
) -> [Tensor<4>; 2] {
    let kv = match cache.take() {
        Some([pk, pv]) => [Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)],
        None => [k, v],
    };
    *cache = Some(kv.clone());
    kv
}
