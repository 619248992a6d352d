//! UniKE's in-context knowledge in latent space (§3.2-3.3): the knowledge memory of hidden
//! states, the semantic and truthfulness encoders with their contrastive losses (eq. 4, 5),
//! the editing direction zeta, and the retrieval that latent in-context editing attends over.

use std::path::Path;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"MMKEKNW1";

/// Hidden states of in-context knowledge, per edited layer: for every piece of knowledge
/// (question, true answer, hallucinated answer), the layer's input at the last question token
/// (h_sem), at the last token of question + true answer (h_pos) and of question +
/// hallucinated answer (h_neg). (h_sem, h_pos) are the key-value pairs latent in-context
/// editing retrieves; h_neg trains the encoders.
#[derive(Clone, Debug)]
pub struct KnowledgeMemory {
    /// The LM layers the states come from (their inputs).
    pub layers: Vec<usize>,
    /// Per layer, `[entries, hidden]`.
    pub sem: Vec<Tensor<2>>,
    pub pos: Vec<Tensor<2>>,
    pub neg: Vec<Tensor<2>>,
}

impl KnowledgeMemory {
    pub fn new(layers: Vec<usize>, hidden: usize, device: &Device) -> Self {
        let empty = || {
            (0..layers.len())
                .map(|_| Tensor::<2>::zeros([0, hidden], device))
                .collect::<Vec<_>>()
        };
        Self {
            sem: empty(),
            pos: empty(),
            neg: empty(),
            layers,
        }
    }

    pub fn len(&self) -> usize {
        self.sem.first().map_or(0, |t| t.dims()[0])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn hidden(&self) -> usize {
        self.sem.first().map_or(0, |t| t.dims()[1])
    }

    /// Appends entries: per layer, `[n, hidden]` each.
    pub fn push(&mut self, sem: Vec<Tensor<2>>, pos: Vec<Tensor<2>>, neg: Vec<Tensor<2>>) {
        let append = |stored: &mut Vec<Tensor<2>>, new: Vec<Tensor<2>>| {
            for (s, n) in stored.iter_mut().zip(new) {
                *s = Tensor::cat(vec![s.clone(), n.detach()], 0);
            }
        };
        append(&mut self.sem, sem);
        append(&mut self.pos, pos);
        append(&mut self.neg, neg);
    }

    /// The same memory on `device`.
    pub fn to_device(&self, device: &Device) -> Self {
        let moved = |stored: &Vec<Tensor<2>>| -> Vec<Tensor<2>> {
            stored.iter().map(|t| t.clone().to_device(device)).collect()
        };
        Self {
            layers: self.layers.clone(),
            sem: moved(&self.sem),
            pos: moved(&self.pos),
            neg: moved(&self.neg),
        }
    }

    /// Keeps the first `len` entries (drops what was pushed after).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        for stored in [&mut self.sem, &mut self.pos, &mut self.neg] {
            for s in stored.iter_mut() {
                *s = s.clone().narrow(0, 0, len);
            }
        }
    }

    /// Written atomically with a checksum ([`crate::frame`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut values = Vec::new();
        for stored in [&self.sem, &self.pos, &self.neg] {
            for s in stored {
                values.extend(
                    s.clone()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .expect("f32 values"),
                );
            }
        }
        let header = serde_json::json!({
            "layers": self.layers,
            "entries": self.len(),
            "hidden": self.hidden(),
        });
        crate::frame::write(path, MAGIC, &header, &values)
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (header, values) = crate::frame::read(path, MAGIC, "knowledge memory")?;
        let error = |reason: String| Error::Memory {
            path: path.to_path_buf(),
            reason,
        };
        let layers: Vec<usize> = serde_json::from_value(header["layers"].clone())
            .map_err(|e| error(format!("invalid layers: {e}")))?;
        let entries = crate::frame::count(path, &header, "entries")?;
        let hidden = crate::frame::count(path, &header, "hidden")?;
        let block = entries * hidden;
        if values.len() != 3 * layers.len() * block {
            return Err(error(format!(
                "{} values for 3 x {} layers x {entries} entries x {hidden}",
                values.len(),
                layers.len()
            )));
        }
        let mut blocks = values.chunks_exact(block.max(1)).map(|chunk| {
            Tensor::<2>::from_data(TensorData::new(chunk.to_vec(), [entries, hidden]), device)
        });
        let mut take = || -> Vec<Tensor<2>> {
            (0..layers.len())
                .map(|_| {
                    blocks
                        .next()
                        .unwrap_or_else(|| Tensor::zeros([0, hidden], device))
                })
                .collect()
        };
        let (sem, pos, neg) = (take(), take(), take());
        Ok(Self {
            layers,
            sem,
            pos,
            neg,
        })
    }

    /// For each row of `query` (`[n, hidden]`), the indices of the `k` entries of layer slot
    /// `slot` whose h_sem is most cosine-similar, best first: `[n, k]` (k capped at the size,
    /// at least 1; the memory must not be empty - callers check [`Self::is_empty`]).
    pub fn top_k(&self, slot: usize, query: Tensor<2>, k: usize) -> Tensor<2, Int> {
        let device = query.device();
        let (rows, len, k) = self.retrieve(slot, query, k);
        let mut ids = Vec::with_capacity(rows.len() * k);
        for (scores, mut best) in rows.chunks_exact(len).zip(top_k_rows(&rows, len, k)) {
            best.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            ids.extend(best.iter().map(|&i| i as i64));
        }
        let n = ids.len() / k;
        Tensor::from_data(TensorData::new(ids, [n, k]), &device)
    }

    /// The cosine of every query row with every h_sem of `slot`, on the host (`[n * len]`),
    /// with `len` and `k` capped at it.
    fn retrieve(&self, slot: usize, query: Tensor<2>, k: usize) -> (Vec<f32>, usize, usize) {
        let keys = super::clip::l2_normalize(self.sem[slot].clone());
        let scores = super::clip::l2_normalize(query).matmul(keys.transpose());
        let len = self.len();
        let rows = scores
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 scores");
        (rows, len, k.min(len).max(1))
    }
}

/// The indices of the `k` largest values of each row of length `len`, in no order: a
/// selection (linear time) rather than a sort, as retrieval runs in every edited layer of
/// every forward pass.
fn top_k_rows(rows: &[f32], len: usize, k: usize) -> impl Iterator<Item = Vec<usize>> + '_ {
    rows.chunks_exact(len).map(move |scores| {
        let mut order: Vec<usize> = (0..len).collect();
        if k < len {
            order.select_nth_unstable_by(k - 1, |&a, &b| scores[b].total_cmp(&scores[a]));
        }
        order.truncate(k);
        order
    })
}

/// A small MLP encoder (UniKE: "several MLP layers"): `Linear -> GELU -> Linear`.
#[derive(Module, Debug)]
pub struct Encoder {
    pub first: Linear,
    pub second: Linear,
}

impl Encoder {
    pub fn new(input: usize, output: usize, device: &Device) -> Self {
        Self {
            first: LinearConfig::new(input, input).init(device),
            second: LinearConfig::new(input, output).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.second.forward(gelu(self.first.forward(x)))
    }
}

/// The truthfulness and the semantic encoder of one layer. The semantic space has the
/// hidden width, as semantic hidden states are compared with encoded states directly (eq. 5).
#[derive(Module, Debug)]
pub struct Encoders {
    pub truthfulness: Encoder,
    pub semantic: Encoder,
}

impl Encoders {
    pub fn new(hidden: usize, truth_dim: usize, device: &Device) -> Self {
        Self {
            truthfulness: Encoder::new(hidden, truth_dim, device),
            semantic: Encoder::new(hidden, hidden, device),
        }
    }
}

/// s(a, b) of eq. 4-5 for every pair of rows: cosine similarity over a temperature.
fn similarities(a: Tensor<2>, b: Tensor<2>, temperature: f64) -> Tensor<2> {
    super::clip::l2_normalize(a).matmul(super::clip::l2_normalize(b).transpose()) / temperature
}

/// `-log` of the share of each row's softmax mass on columns `0..n`, averaged over rows.
fn mass_loss(scores: Tensor<2>, n: usize) -> Tensor<1> {
    let [rows, _] = scores.dims();
    let mass = softmax(scores, 1)
        .narrow(1, 0, n)
        .sum_dim(1)
        .reshape([rows]);
    mass.clamp_min(1e-12).log().neg().mean()
}

/// Truthfulness contrastive loss (UniKE eq. 4, divided by n): each positive representation
/// is pulled towards all positives and away from the negatives, each negative likewise.
/// `pos`, `neg`: `[n, truth_dim]`, row i from the same question.
pub fn truthfulness_loss(pos: Tensor<2>, neg: Tensor<2>, temperature: f64) -> Tensor<1> {
    let n = pos.dims()[0];
    let all = |first: Tensor<2>, second: Tensor<2>| Tensor::cat(vec![first, second], 0);
    // Rows of positives against [positives; negatives], rows of negatives against
    // [negatives; positives]: the same-truthfulness columns come first in both.
    let pos_scores = similarities(pos.clone(), all(pos.clone(), neg.clone()), temperature);
    let neg_scores = similarities(neg.clone(), all(neg, pos), temperature);
    mass_loss(pos_scores, n) + mass_loss(neg_scores, n)
}

/// Semantic contrastive loss (UniKE eq. 5, divided by n): each semantic hidden state is
/// pulled towards the semantic representations of its own positive and negative knowledge and
/// away from the other questions'. `sem`: the raw h_sem; `pos`, `neg`: the semantic
/// encoder's outputs for h_pos and h_neg; all `[n, hidden]`.
pub fn semantic_loss(
    sem: Tensor<2>,
    pos: Tensor<2>,
    neg: Tensor<2>,
    temperature: f64,
) -> Tensor<1> {
    let [n, _] = sem.dims();
    let to_pos = similarities(sem.clone(), pos, temperature).exp();
    let to_neg = similarities(sem, neg, temperature).exp();
    let pairs = to_pos + to_neg; // [n, n]: exp s(h_sem,i, pos_j) + exp s(h_sem,i, neg_j)
    let device = pairs.device();
    let own = (pairs.clone() * Tensor::<2>::eye(n, &device)).sum_dim(1);
    let all = pairs.sum_dim(1);
    (own / all).reshape([n]).clamp_min(1e-12).log().neg().mean()
}

/// The editing direction zeta: mean truthfulness representation of the positive states minus
/// that of the negative ones (§3.3), `[truth_dim]`.
pub fn zeta(truthfulness: &Encoder, pos: Tensor<2>, neg: Tensor<2>) -> Tensor<1> {
    let mean = |x: Tensor<2>| {
        let encoded = truthfulness.forward(x);
        let d = encoded.dims()[1];
        encoded.mean_dim(0).reshape([d])
    };
    mean(pos) - mean(neg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Bool, Distribution};

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec().unwrap()
    }

    fn scalar(t: Tensor<1>) -> f64 {
        t.into_scalar::<f32>() as f64
    }

    fn memory(entries: usize, hidden: usize, device: &Device) -> KnowledgeMemory {
        let mut m = KnowledgeMemory::new(vec![2, 3], hidden, device);
        let random = || {
            (0..2)
                .map(|_| Tensor::random([entries, hidden], Distribution::Normal(0.0, 1.0), device))
                .collect::<Vec<_>>()
        };
        m.push(random(), random(), random());
        m
    }

    #[test]
    fn truthfulness_loss_matches_a_hand_computed_case() {
        let device = Device::flex();
        let pos = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
        let neg = Tensor::<2>::from_floats([[-1.0, 0.0], [0.0, -1.0]], &device);
        // Every row sees similarities [1, 0] to its own kind and [-1, 0] to the other:
        // -log((e + 1) / (e + 1 + 1/e + 1)), for the positives and for the negatives.
        let e = std::f64::consts::E;
        let expected = 2.0 * -((e + 1.0) / (e + 2.0 + 1.0 / e)).ln();
        let got = scalar(truthfulness_loss(pos, neg, 1.0));
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn semantic_loss_matches_a_hand_computed_case() {
        let device = Device::flex();
        let r = std::f64::consts::FRAC_1_SQRT_2;
        let sem = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
        let pos = Tensor::<2>::from_floats([[1.0, 0.0], [1.0, 1.0]], &device);
        let neg = Tensor::<2>::from_floats([[0.0, 1.0], [0.0, 1.0]], &device);
        let e = |x: f64| x.exp();
        // Row 0: own pair (cos 1, cos 0), other pair (cos r, cos 0).
        let row0 = -((e(1.0) + e(0.0)) / (e(1.0) + e(0.0) + e(r) + e(0.0))).ln();
        // Row 1: own pair (cos r, cos 1), other pair (cos 0, cos 1).
        let row1 = -((e(r) + e(1.0)) / (e(r) + e(1.0) + e(0.0) + e(1.0))).ln();
        let expected = (row0 + row1) / 2.0;
        let got = scalar(semantic_loss(sem, pos, neg, 1.0));
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // The temperature divides every similarity.
        let sharper = scalar(semantic_loss(
            Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device),
            Tensor::<2>::from_floats([[1.0, 0.0], [1.0, 1.0]], &device),
            Tensor::<2>::from_floats([[0.0, 1.0], [0.0, 1.0]], &device),
            0.5,
        ));
        assert!((sharper - expected).abs() > 1e-3);
    }

    #[test]
    fn retrieval_returns_the_true_top_k_by_cosine() {
        let device = Device::flex();
        let m = memory(50, 8, &device);
        let query = Tensor::<2>::random([3, 8], Distribution::Normal(0.0, 1.0), &device);
        let top: Vec<i64> = m
            .top_k(1, query.clone(), 5)
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap();
        let keys = values(m.sem[1].clone());
        let queries = values(query.clone());
        let cosine = |a: &[f32], b: &[f32]| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (norm(a) * norm(b))
        };
        for (row, q) in queries.chunks(8).enumerate() {
            let mut ranked: Vec<(f32, i64)> = keys
                .chunks(8)
                .enumerate()
                .map(|(i, k)| (cosine(q, k), i as i64))
                .collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let expected: Vec<i64> = ranked.iter().take(5).map(|r| r.1).collect();
            assert_eq!(&top[row * 5..row * 5 + 5], expected.as_slice());
        }
    }

    #[test]
    fn attention_over_the_retrieved_entries_equals_masked_attention_over_all() {
        use crate::model::clip::encoder::SelfAttention;
        use burn::tensor::module::attention;
        use burn::tensor::ops::AttentionModuleOptions;
        let device = Device::flex();
        let m = memory(30, 8, &device);
        let layer = SelfAttention::new(8, 2, true, &device);
        let query = Tensor::<2>::random([4, 8], Distribution::Normal(0.0, 1.0), &device);
        let [keys, values_] = layer.project_memory(m.pos[0].clone());
        let top = m.top_k(0, query.clone(), 6);
        let retrieved =
            values(layer.attend(query.clone(), keys.clone(), values_.clone(), top.clone()));
        // The reference: every query over all 30 entries, all but its top 6 masked.
        let ids: Vec<i64> = top.into_data().convert::<i64>().try_into_vec().unwrap();
        let mut outside = vec![true; 4 * 30];
        for (row, best) in ids.chunks(6).enumerate() {
            best.iter()
                .for_each(|&i| outside[row * 30 + i as usize] = false);
        }
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(outside, [4, 30]), &device)
            .reshape([1, 1, 4, 30])
            .expand([1, 2, 4, 30]);
        let heads = |t: Tensor<2>, len: usize| t.reshape([1, len, 2, 4]).swap_dims(1, 2);
        let context = attention(
            heads(layer.q_proj.forward(query), 4),
            heads(keys, 30),
            heads(values_, 30),
            Some(mask),
            None,
            AttentionModuleOptions::default(),
        );
        let masked = values(
            layer
                .out_proj
                .forward(context.swap_dims(1, 2).reshape([4, 8])),
        );
        for (i, (a, b)) in retrieved.iter().zip(&masked).enumerate() {
            assert!((a - b).abs() < 1e-5, "value {i}: {a} vs {b}");
        }
    }

    #[test]
    fn the_memory_survives_save_and_load_bit_for_bit() {
        let device = Device::flex();
        let mut m = memory(20, 8, &device);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("knowledge.bin");
        m.save(&path).unwrap();
        let back = KnowledgeMemory::load(&path, &device).unwrap();
        assert_eq!(back.layers, m.layers);
        for (a, b) in [
            (&m.sem, &back.sem),
            (&m.pos, &back.pos),
            (&m.neg, &back.neg),
        ] {
            for (x, y) in a.iter().zip(b) {
                let bits = |t: &Tensor<2>| -> Vec<u32> {
                    values(t.clone()).iter().map(|v| v.to_bits()).collect()
                };
                assert_eq!(bits(x), bits(y));
            }
        }
        m.truncate(5);
        assert_eq!(m.len(), 5);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 9);
        std::fs::write(&path, bytes).unwrap();
        assert!(KnowledgeMemory::load(&path, &device).is_err());
    }
}
