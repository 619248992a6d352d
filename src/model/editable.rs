//! What an editor needs of the model it edits, so that every editor runs on the scenes VLM
//! and on the real MLLMs alike: a forward pass over text ids with the image placed by the
//! model (logits over the text positions), greedy generation, the LM's layers for extra
//! neurons, and which parts may train.

use burn::module::Module;
use burn::tensor::{Int, Tensor};

use super::lm::{ExtraNeurons, Hooks, LmOutput, MemoryAttention};

pub trait EditableModel: Module + 'static {
    /// Logits over the text positions of `ids` (`[batch, seq]`, BOS first); the image, if
    /// any, goes where the model reads it. Hidden states and FFN inputs, when captured, span
    /// the whole sequence (see [`Self::sequence_position`]).
    fn forward(
        &self,
        pixels: Option<Tensor<4>>,
        ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        hooks: &Hooks,
    ) -> LmOutput;

    /// Greedy decoding after `prompt` (text ids), at most `max_new` tokens, stopping after
    /// `eos`; the hooks apply at every step.
    fn generate(
        &self,
        pixels: Option<Tensor<4>>,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        hooks: &Hooks,
    ) -> Vec<u32>;

    /// How many text tokens fit next to an image, or alone.
    fn text_capacity(&self, with_image: bool) -> usize;

    /// Where text token `t` sits in the whole sequence (the image's tokens take places too).
    fn sequence_position(&self, t: usize, with_image: bool) -> usize;

    fn num_layers(&self) -> usize;

    /// The LM's width.
    fn hidden_size(&self) -> usize;

    /// Token embeddings, `[batch, seq, hidden]`.
    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3>;

    /// Layer `layer`'s FFN weights in the order the hooks number them (`[in, out]`; OPT:
    /// fc1, fc2; LLaMA: gate, up, down).
    fn ffn_weights(&self, layer: usize) -> Vec<Tensor<2>>;

    /// Adds `deltas` (as [`Self::ffn_weights`] orders them) to layer `layer`'s FFN weights,
    /// outside the autodiff graph (a hypernetwork's edit).
    fn add_to_ffn_weights(&mut self, layer: usize, deltas: Vec<Tensor<2>>);

    /// Layer `layer`'s extra FFN key-value pairs (T-Patcher's patches, UniKE eq. 3).
    fn extra_neurons(&self, layer: usize) -> &[ExtraNeurons];

    fn extra_neurons_mut(&mut self, layer: usize) -> &mut Vec<ExtraNeurons>;

    /// Layer `layer`'s self-attention as UniKE's latent in-context editing reads it.
    fn memory_attention(&self, layer: usize) -> &dyn MemoryAttention;

    /// The model with only the LM layers `layers` trainable (FT-LLM).
    fn train_only_lm_layers(self, layers: &[usize]) -> Self;

    /// The model with only the visual bridge (projector) and the last vision layer trainable
    /// (FT-Visual).
    fn train_only_visual(self) -> Self;
}

/// Greedy decoding without a cache: `logits(ids, mask)` is the model's forward pass over the
/// whole sequence so far (`[1, n]` ids, the mask's prompt positions set to `prompt_mask`, the
/// generated ones to 1); up to `max_new` tokens, stopping after `eos`.
pub fn greedy_decode(
    prompt: &[u32],
    prompt_mask: i64,
    max_new: usize,
    eos: u32,
    device: &burn::tensor::Device,
    mut logits: impl FnMut(Tensor<2, Int>, Tensor<2, Int>) -> Tensor<3>,
) -> Vec<u32> {
    use burn::tensor::TensorData;
    let mut ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut generated = Vec::new();
    for _ in 0..max_new {
        let n = ids.len();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), device);
        let mask: Vec<i64> = (0..n)
            .map(|t| if t < prompt.len() { prompt_mask } else { 1 })
            .collect();
        let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [1, n]), device);
        let out = logits(input, mask);
        let vocab = out.dims()[2];
        let next = out
            .narrow(1, n - 1, 1)
            .reshape([vocab])
            .argmax(0)
            .into_scalar::<i64>() as u32;
        generated.push(next);
        if next == eos {
            break;
        }
        ids.push(next as i64);
    }
    generated
}
