//! CLIP's text tower (`text_model`): token and position embeddings, a causal pre-LN encoder,
//! a final LayerNorm, and pooling at the end-of-text token.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm};
use burn::tensor::{Bool, Device, Int, Tensor};

use super::config::ClipTextConfig;
use super::encoder::{ClipEncoder, EncoderDims, layer_norm};

#[derive(Module, Debug)]
pub struct ClipTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipTextEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    eos_token_id: u32,
}

/// The text tower's outputs.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `[batch, seq, hidden]` after the final LayerNorm.
    pub last_hidden_state: Tensor<3>,
    /// `[batch, hidden]`: the hidden state at each sequence's end-of-text token.
    pub pooled: Tensor<2>,
}

impl ClipTextTransformer {
    pub fn new(config: &ClipTextConfig, device: &Device) -> Self {
        let dims = EncoderDims {
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_heads: config.num_attention_heads,
            num_layers: config.num_hidden_layers,
            activation: config.hidden_act,
            layer_norm_eps: config.layer_norm_eps,
        };
        Self {
            embeddings: ClipTextEmbeddings {
                token_embedding: EmbeddingConfig::new(config.vocab_size, config.hidden_size)
                    .init(device),
                position_embedding: EmbeddingConfig::new(
                    config.max_position_embeddings,
                    config.hidden_size,
                )
                .init(device),
            },
            encoder: ClipEncoder::new(&dims, device),
            final_layer_norm: layer_norm(config.hidden_size, config.layer_norm_eps, device),
            eos_token_id: config.eos_token_id,
        }
    }

    /// `input_ids`: `[batch, seq]`; `padding`: `[batch, seq]`, true at padding positions.
    pub fn forward(&self, input_ids: Tensor<2, Int>, padding: Tensor<2, Bool>) -> ClipTextOutput {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let heads = self
            .encoder
            .layers
            .first()
            .map_or(1, |l| l.self_attn.num_heads());

        let positions = self
            .embeddings
            .position_embedding
            .weight
            .val()
            .narrow(0, 0, seq)
            .unsqueeze_dim::<3>(0);
        let x = self.embeddings.token_embedding.forward(input_ids.clone()) + positions;

        // A query attends to earlier positions only, and never to padding. (Burn's
        // `tril_mask` is true outside the lower triangle: exactly the keys j > i to hide.)
        let causal = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &device).unsqueeze_dim::<3>(0);
        let pad_keys = padding.clone().unsqueeze_dim::<3>(1);
        let mask = causal
            .expand([batch, seq, seq])
            .bool_or(pad_keys.expand([batch, seq, seq]))
            .unsqueeze_dim::<4>(1)
            .expand([batch, heads, seq, seq]);

        let hidden = self.encoder.forward(x, Some(mask));
        let last_hidden_state = self.final_layer_norm.forward(hidden);
        let pooled = pool_at_positions(
            last_hidden_state.clone(),
            self.eos_positions(input_ids, padding),
        );
        ClipTextOutput {
            last_hidden_state,
            pooled,
        }
    }

    /// The end-of-text position of each sequence, as `transformers` finds it: with the legacy
    /// `eos_token_id == 2` the position of the largest token id, otherwise the first position
    /// holding `eos_token_id`. Ties and padding resolve to the first real position.
    fn eos_positions(&self, input_ids: Tensor<2, Int>, padding: Tensor<2, Bool>) -> Tensor<1, Int> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        // seq - 1 - j: breaks ties towards the earliest position in a single argmax.
        let earliest = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .neg()
            .add_scalar(seq as i64 - 1)
            .unsqueeze_dim::<2>(0)
            .expand([batch, seq]);
        let key = if self.eos_token_id == 2 {
            input_ids.mul_scalar(seq as i64) + earliest
        } else {
            input_ids
                .equal_elem(self.eos_token_id as i64)
                .int()
                .mul_scalar(seq as i64)
                + earliest
        };
        key.mask_fill(padding, -1).argmax(1).reshape([batch])
    }
}

/// Gathers `hidden[b, positions[b], :]` into `[batch, hidden]`.
pub fn pool_at_positions(hidden: Tensor<3>, positions: Tensor<1, Int>) -> Tensor<2> {
    let [batch, _, dim] = hidden.dims();
    let index = positions.reshape([batch, 1, 1]).expand([batch, 1, dim]);
    hidden.gather(1, index).reshape([batch, dim])
}
