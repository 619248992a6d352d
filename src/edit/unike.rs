//! UniKE (Pan et al.): intrinsic editing as extra FFN key-value pairs (eq. 3) and in-context
//! editing as feature shifting in latent space (eq. 2), coupled through the truthfulness
//! direction zeta (eq. 6) and the dynamic alpha of the semantic space (eq. 7). The paper's
//! ablations are switches of [`UniKeConfig`].
//!
//! An edit (1) stores the edit's own hidden states in the knowledge memory, so latent
//! in-context editing can retrieve it, then (2) trains a fresh group of extra neurons in each
//! edited layer on the edit's loss, everything else frozen and the in-context shift active
//! (the states after in-context editing feed the FFN, as in the paper's Figure 3a).

use std::path::PathBuf;
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Editor;
use super::ike::IkeContext;
use super::speaker::{Prediction, Query, Speaker};
use crate::data::lm::LmExample;
use crate::data::record::EditRecord;
use crate::error::Result;
use crate::model::editable::EditableModel;
use crate::model::knowledge::{Encoders, KnowledgeMemory, zeta};
use crate::model::lm::{AttentionMix, ExtraNeurons, Hooks, MemoryAttention, ZetaShift};
use crate::model::vlm::Vlm;

/// How in-context knowledge enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InContext {
    None,
    /// Vanilla IKE: demonstrations and the edit as a text prompt.
    Vanilla,
    /// Latent IKE: retrieved hidden states shift the self-attention output (eq. 2).
    Latent,
}

/// The mixing weight of eq. 2.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Alpha {
    Fixed(f64),
    /// Cosine between the semantic encoding of h_know and the input state (eq. 7).
    Dynamic,
}

/// The direction that regulates the extra values (eq. 6; the Figure 4c variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZetaKind {
    None,
    /// A random direction of the truthfulness zeta's norm.
    Random,
    /// The same construction in the semantic space.
    Semantic,
    /// Mean truthful minus mean hallucinated representation (the paper's).
    Truthfulness,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniKeConfig {
    /// Extra key-value pairs per edited layer and edit (0: no intrinsic editing).
    pub neurons: usize,
    /// The last `layers` LM layers are edited (both kinds of editing).
    pub layers: usize,
    /// Adam steps and learning rate of intrinsic editing.
    pub steps: usize,
    pub lr: f64,
    /// A new neuron's key fires on inputs whose cosine with the edit's input exceeds this.
    pub key_threshold: f64,
    pub in_context: InContext,
    /// Retrieved hidden states per position (K).
    pub top_k: usize,
    pub alpha: Alpha,
    pub zeta: ZetaKind,
    /// beta of eq. 6.
    pub beta: f64,
    /// Seeds the editor's own generator (the keys' noise, a random zeta), so a run is
    /// repeatable; the device's generator is left alone.
    #[serde(default)]
    pub seed: u64,
}

/// The LM layers UniKE edits: the last `count`.
pub fn edited_layers(model: &impl EditableModel, count: usize) -> Vec<usize> {
    let n = model.num_layers();
    (n.saturating_sub(count)..n).collect()
}

/// One piece of in-context knowledge: a question with its truthful and hallucinated answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Triplet {
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub pos: String,
    pub neg: String,
}

/// States of a batch at two positions of each example, per layer `[n, hidden]`.
struct Captured {
    /// The layer input at the last prompt token.
    question: Vec<Tensor<2>>,
    /// The layer input at the last answer token.
    last: Vec<Tensor<2>>,
    /// The FFN inputs (normalised) at the positions that predict the answer and the end
    /// token, `[span, hidden]` per layer (of the first example).
    ffn_span: Vec<Tensor<2>>,
}

/// Runs `examples` (all with an image or all without) through `speaker` with its hooks and
/// captures [`Captured`] in `layers`.
fn capture<M: EditableModel>(
    speaker: &mut Speaker<M>,
    examples: &[LmExample],
    layers: &[usize],
    device: &Device,
) -> Result<Captured> {
    let refs: Vec<&LmExample> = examples.iter().collect();
    let batch = speaker.batcher.batch(&refs, device)?;
    let hooks = Hooks {
        capture: true,
        ..speaker.hooks.clone()
    };
    let with_image = batch.pixels.is_some();
    let model = &speaker.model;
    let at_text = |t: usize| model.sequence_position(t, with_image);
    let out = model.forward(batch.pixels.clone(), batch.ids, batch.mask, &hooks);
    let [n, total, hidden] = out.hidden_states[0].dims();
    let rows = |at: &dyn Fn(&std::ops::Range<usize>) -> usize| {
        let index: Vec<i64> = batch
            .spans
            .iter()
            .enumerate()
            .map(|(b, span)| (b * total + at_text(at(span))) as i64)
            .collect();
        Tensor::<1, burn::tensor::Int>::from_data(index.as_slice(), device)
    };
    // span.start: the last prompt token; span.end - 1: the last answer token.
    let question = rows(&|s| s.start);
    let last = rows(&|s| s.end - 1);
    let pick = |states: &[Tensor<3>], index: &Tensor<1, burn::tensor::Int>| -> Vec<Tensor<2>> {
        layers
            .iter()
            .map(|&l| {
                states[l]
                    .clone()
                    .reshape([n * total, hidden])
                    .select(0, index.clone())
                    .detach()
            })
            .collect()
    };
    let span = batch.spans[0].clone();
    let span_rows: Vec<i64> = span.map(|t| at_text(t) as i64).collect();
    let span_rows = Tensor::<1, burn::tensor::Int>::from_data(span_rows.as_slice(), device);
    Ok(Captured {
        question: pick(&out.hidden_states, &question),
        last: pick(&out.hidden_states, &last),
        ffn_span: pick(&out.ffn_inputs, &span_rows),
    })
}

/// The hidden states of `triplets` in `layers` (each layer's input), per layer `[n, hidden]`:
/// h_sem at the last question token, h_pos and h_neg at the last token of question + answer.
/// `triplets` must all have an image or all not.
pub fn knowledge_states<M: EditableModel>(
    speaker: &mut Speaker<M>,
    triplets: &[Triplet],
    layers: &[usize],
    device: &Device,
) -> Result<[Vec<Tensor<2>>; 3]> {
    let examples = |answer: fn(&Triplet) -> &String| -> Vec<LmExample> {
        triplets
            .iter()
            .map(|t| LmExample {
                image: t.image.clone(),
                prompt: t.prompt.clone(),
                answer: answer(t).clone(),
                grounding: None,
            })
            .collect()
    };
    let pos = capture(speaker, &examples(|t| &t.pos), layers, device)?;
    let neg = capture(speaker, &examples(|t| &t.neg), layers, device)?;
    Ok([pos.question, pos.last, neg.last])
}

/// Latent in-context editing (eq. 2, 7) as a forward-pass hook on the edited layers.
#[derive(Debug)]
pub struct LatentInContext {
    memory: KnowledgeMemory,
    /// Per memory slot, the keys and values of LN(h_pos) under the layer's attention: the
    /// base model is frozen, so they are computed once per memory, not once per forward.
    projected: Vec<[Tensor<2>; 2]>,
    top_k: usize,
    alpha: Alpha,
    /// Per memory slot, for the dynamic alpha.
    encoders: Option<Vec<Encoders>>,
}

impl LatentInContext {
    /// The hook over `memory` for `model`'s edited layers; `encoders` for the dynamic alpha.
    pub fn new(
        memory: KnowledgeMemory,
        model: &impl EditableModel,
        top_k: usize,
        alpha: Alpha,
        encoders: Option<Vec<Encoders>>,
    ) -> Self {
        let projected = memory
            .layers
            .iter()
            .zip(&memory.pos)
            .map(|(&l, pos)| {
                let layer = model.memory_attention(l);
                let normed = layer
                    .attention_norm(pos.clone().unsqueeze::<3>())
                    .squeeze_dim::<2>(0);
                layer.project_memory(normed).map(|t| t.detach())
            })
            .collect();
        Self {
            memory,
            projected,
            top_k,
            alpha,
            encoders,
        }
    }
}

impl AttentionMix for LatentInContext {
    fn mix(
        &self,
        index: usize,
        layer: &dyn MemoryAttention,
        x: &Tensor<3>,
        h_input: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        let slot = self.memory.layers.iter().position(|&l| l == index)?;
        if self.memory.is_empty() {
            return None;
        }
        // The memory, the encoders and `layer`'s memory attention work in f32.
        let x = x.clone().cast(burn::tensor::DType::F32);
        let h_input = h_input.clone().cast(burn::tensor::DType::F32);
        let [batch, seq, hidden] = x.dims();
        let n = batch * seq;
        let query = x.clone().reshape([n, hidden]);
        // Top-K h_sem by cosine with the pre-attention state, then attention over their h_pos.
        let retrieved = self.memory.top_k(slot, query.clone(), self.top_k);
        let normed = layer.attention_norm(x.clone()).reshape([n, hidden]);
        let [keys, values] = self.projected[slot].clone();
        let h_know = layer.attend(normed, keys, values, retrieved);
        let alpha = match (self.alpha, &self.encoders) {
            (Alpha::Dynamic, Some(encoders)) => {
                // eq. 7: relevance = Sim(Enc_sem(h_know), h_input[-1]), per position, kept in
                // [0, 1]. §3.3 says the knowledge is included with this weight ("a smaller
                // alpha effectively reduces its inclusion magnitude"); eq. 7 as printed puts it
                // on h_input instead, which would include unrelated knowledge the most. mmke
                // follows the text: alpha = 1 - relevance on h_input.
                let semantic = encoders[slot].semantic.forward(h_know.clone());
                let cosine = crate::model::clip::l2_normalize(semantic)
                    * crate::model::clip::l2_normalize(query);
                let relevance = cosine.sum_dim(1).clamp(0.0, 1.0).reshape([batch, seq, 1]);
                relevance.neg() + 1.0
            }
            (Alpha::Fixed(a), _) => Tensor::full([batch, seq, 1], a, &x.device()),
            (Alpha::Dynamic, None) => panic!("a dynamic alpha needs the semantic encoders"),
        };
        let h_know = h_know.reshape([batch, seq, hidden]);
        Some(h_input * alpha.clone() + h_know * (alpha.neg() + 1.0))
    }
}

/// What UniKE learned before editing: the knowledge memory and the encoders (one pair per
/// edited layer; zeta is derived from them when an editor is made).
pub struct Prepared {
    pub memory: KnowledgeMemory,
    pub encoders: Vec<Encoders>,
}

/// UniKE on the scenes VLM or a real MLLM (`M`).
pub struct UniKeEditor<M = Vlm> {
    /// The model as edited so far (an autodiff device).
    pub speaker: Speaker<M>,
    original: M,
    config: UniKeConfig,
    layers: Vec<usize>,
    memory: KnowledgeMemory,
    base_entries: usize,
    encoders: Vec<Encoders>,
    /// Per edited layer (None: no regulation).
    zetas: Vec<Option<Tensor<1>>>,
    ike: IkeContext,
    /// The editor's random draws, seeded by `config.seed`.
    rng: ChaCha8Rng,
    device: Device,
}

/// A `shape` tensor of draws from N(0, std^2) by `rng` (no device state involved).
fn normal<const D: usize>(
    rng: &mut ChaCha8Rng,
    shape: [usize; D],
    std: f64,
    device: &Device,
) -> Tensor<D> {
    let dist = rand_distr::Normal::new(0.0, std as f32).expect("a finite standard deviation");
    let values: Vec<f32> = (&mut *rng)
        .sample_iter(dist)
        .take(shape.iter().product())
        .collect();
    Tensor::from_data(burn::tensor::TensorData::new(values, shape), device)
}

impl<M: EditableModel> UniKeEditor<M> {
    /// `speaker` on an autodiff `device`; `prepared` from [`crate::train::knowledge`];
    /// `pool`: demonstrations for vanilla IKE.
    pub fn new(
        mut speaker: Speaker<M>,
        prepared: Prepared,
        pool: &[EditRecord],
        config: UniKeConfig,
        device: &Device,
    ) -> Self {
        speaker.model = speaker.model.no_grad();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let layers = edited_layers(&speaker.model, config.layers);
        assert_eq!(
            prepared.memory.layers, layers,
            "the knowledge memory must hold the edited layers"
        );
        let memory = prepared.memory.to_device(device);
        let encoders: Vec<Encoders> = prepared
            .encoders
            .into_iter()
            .map(|e| e.to_device(device).no_grad())
            .collect();
        let zetas = encoders
            .iter()
            .enumerate()
            .map(|(slot, encoders)| {
                if memory.is_empty() {
                    return None;
                }
                let (pos, neg) = (memory.pos[slot].clone(), memory.neg[slot].clone());
                let truthful = || zeta(&encoders.truthfulness, pos.clone(), neg.clone());
                match config.zeta {
                    ZetaKind::None => None,
                    ZetaKind::Truthfulness => Some(truthful()),
                    ZetaKind::Semantic => Some(zeta(&encoders.semantic, pos.clone(), neg.clone())),
                    ZetaKind::Random => {
                        let truthful = truthful();
                        let norm = truthful.clone().powi_scalar(2).sum().sqrt();
                        let random = normal(&mut rng, truthful.dims(), 1.0, device);
                        let random_norm = random.clone().powi_scalar(2).sum().sqrt();
                        Some(random / random_norm * norm)
                    }
                }
                .map(|z| z.detach())
            })
            .collect();
        let base_entries = memory.len();
        let mut editor = Self {
            original: speaker.model.clone(),
            speaker,
            config,
            layers,
            memory,
            base_entries,
            encoders,
            zetas,
            ike: IkeContext::new(pool, 1),
            rng,
            device: device.clone(),
        };
        editor.install_hooks();
        editor
    }

    fn install_hooks(&mut self) {
        self.speaker.hooks.attention_mix =
            (self.config.in_context == InContext::Latent).then(|| {
                Arc::new(LatentInContext::new(
                    self.memory.clone(),
                    &self.speaker.model,
                    self.config.top_k,
                    self.config.alpha,
                    (self.config.alpha == Alpha::Dynamic).then(|| self.encoders.clone()),
                )) as Arc<dyn AttentionMix>
            });
    }

    fn prompt(&self, query: &Query, answer: &str) -> Result<String> {
        let answer_tokens = self
            .speaker
            .batcher
            .tokenizer()
            .encode(answer, false)?
            .len();
        self.prompt_reserving(query, answer_tokens)
    }

    /// The query's prompt, after vanilla IKE's demonstrations when they are on, leaving room
    /// for `reserved` answer tokens.
    fn prompt_reserving(&self, query: &Query, reserved: usize) -> Result<String> {
        match self.config.in_context {
            InContext::Vanilla => self.speaker.fit_context_reserving(
                &self.ike.context(query),
                &query.prompt,
                reserved,
                query.image.is_some(),
            ),
            _ => Ok(query.prompt.clone()),
        }
    }

    /// Intrinsic editing: a fresh group of neurons in each edited layer, keys aimed at the
    /// edit's FFN input, values (and W_zeta) trained on the edit's loss.
    fn intrinsic(&mut self, record: &EditRecord) -> Result<()> {
        let query = Query {
            image: Some(record.image.clone()),
            prompt: record.prompt.clone(),
        };
        let prompt = self.prompt(&query, &record.target)?;
        // The FFN inputs of each edited layer where the answer is predicted: neuron j's key
        // points at position j (cycling), so every answer position has neurons to fire.
        let example = LmExample {
            image: Some(record.image.clone()),
            prompt: prompt.clone(),
            answer: record.target.clone(),
            grounding: None,
        };
        let ffn = capture(&mut self.speaker, &[example], &self.layers, &self.device)?.ffn_span;
        let n = self.config.neurons;
        for (slot, &l) in self.layers.iter().enumerate() {
            let [positions, hidden] = ffn[slot].dims();
            let order: Vec<i64> = (0..n).map(|j| (j % positions) as i64).collect();
            let q = ffn[slot].clone().select(
                0,
                Tensor::<1, burn::tensor::Int>::from_data(order.as_slice(), &self.device),
            ); // [n, hidden]
            // x . k = cos(x, q) |x| / |q|: 1 at q, below the threshold for unrelated inputs.
            let norm2 = q.clone().powi_scalar(2).sum_dim(1).clamp_min(1e-6); // [n, 1]
            let noise = normal(
                &mut self.rng,
                [n, hidden],
                0.01 / (hidden as f64).sqrt(),
                &self.device,
            );
            let mut neurons = ExtraNeurons::with_keys((q / norm2 + noise).transpose());
            neurons.key_bias =
                Param::from_tensor(Tensor::full([n], -self.config.key_threshold, &self.device));
            if let Some(zeta) = &self.zetas[slot] {
                neurons.zeta = Some(ZetaShift::new(zeta.clone(), hidden, self.config.beta));
            }
            self.speaker.model.extra_neurons_mut(l).push(neurons);
        }
        let mut optim = AdamConfig::new().init();
        for _ in 0..self.config.steps {
            let loss =
                self.speaker
                    .loss(Some(&record.image), &prompt, &record.target, &self.device)?;
            let grads = GradientsParams::from_grads(loss.backward(), &self.speaker.model);
            let model = self.speaker.model.clone();
            self.speaker.model = optim.step(self.config.lr, model, grads);
        }
        // Done learning: this edit's neurons stay as they are during later edits.
        for &l in &self.layers {
            let extra = self.speaker.model.extra_neurons_mut(l);
            if let Some(last) = extra.pop() {
                extra.push(last.no_grad());
            }
        }
        Ok(())
    }
}

impl<M: EditableModel> Editor for UniKeEditor<M> {
    fn edit(&mut self, record: &EditRecord) -> Result<()> {
        if self.config.in_context == InContext::Latent {
            let neg = record
                .original
                .clone()
                .unwrap_or_else(|| record.target.clone());
            let triplet = Triplet {
                image: Some(record.image.clone()),
                prompt: record.prompt.clone(),
                pos: record.target.clone(),
                neg,
            };
            let [sem, pos, neg] =
                knowledge_states(&mut self.speaker, &[triplet], &self.layers, &self.device)?;
            self.memory.push(sem, pos, neg);
            self.install_hooks();
        }
        self.ike.push(record);
        if self.config.neurons > 0 {
            self.intrinsic(record)?;
        }
        Ok(())
    }

    fn predict(&mut self, query: &Query, answer: &str, k: usize) -> Result<Prediction> {
        let prompt = self.prompt(query, answer)?;
        self.speaker
            .predict(query.image.as_deref(), &prompt, answer, k, &self.device)
    }

    fn answer(&mut self, query: &Query, max_new: usize) -> Result<String> {
        let prompt = self.prompt_reserving(query, max_new)?;
        self.speaker
            .answer(query.image.as_deref(), &prompt, max_new, &self.device)
    }

    fn reset(&mut self) {
        self.speaker.model = self.original.clone();
        self.memory.truncate(self.base_entries);
        self.ike.clear();
        self.install_hooks();
    }
}
