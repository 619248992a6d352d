//! The multimodal edit memory: every stored edit keeps its fused embedding z_e, so routing a
//! query is one encoder pass plus one batched similarity against all of them (MSCKE eq. 1-2):
//! k* = the most similar stored edit, rho its similarity; in scope iff rho >= 0.5.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::index::IvfIndex;
use crate::error::{Error, Result};
use crate::model::scope::{ScopeClassifier, Similarity};

/// The first bytes of a saved edit memory.
const MAGIC: &[u8; 8] = b"MMKEMEM1";

/// Where a query goes: the nearest stored edit and its similarity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Route {
    pub edit: usize,
    pub rho: f32,
}

impl Route {
    pub fn in_scope(&self) -> bool {
        self.rho >= crate::model::scope::THRESHOLD
    }
}

pub struct EditMemory {
    similarity: Similarity,
    /// `[dim, edits]`: z_e as columns (L2-normalised for cosine similarity).
    z_t: Option<Tensor<2>>,
    /// `[1, edits]`: |z_e|^2, for squared distances.
    squared_norms: Option<Tensor<2>>,
    /// Approximate search for large memories ([`EditMemory::build_index`]).
    index: Option<IvfIndex>,
    device: Device,
}

impl EditMemory {
    pub fn new(similarity: Similarity, device: &Device) -> Self {
        Self {
            similarity,
            z_t: None,
            squared_norms: None,
            index: None,
            device: device.clone(),
        }
    }

    /// A memory for `classifier`'s similarity.
    pub fn for_classifier(classifier: &ScopeClassifier, device: &Device) -> Self {
        Self::new(classifier.config().similarity, device)
    }

    pub fn len(&self) -> usize {
        self.z_t.as_ref().map_or(0, |z| z.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores edits by their fused embeddings z_e, `[n, dim]`; they get the next indices.
    pub fn insert(&mut self, z_e: Tensor<2>) {
        let z_e = match self.similarity {
            Similarity::Cosine => crate::model::clip::l2_normalize(z_e),
            Similarity::SquaredL2 { .. } => z_e,
        };
        if let Some(index) = &mut self.index {
            let first = self.z_t.as_ref().map_or(0, |z| z.dims()[1]);
            index.add(&host_rows(z_e.clone()), first, &self.device);
        }
        let norms = z_e.clone().powi_scalar(2).sum_dim(1).transpose();
        let columns = z_e.transpose();
        self.z_t = Some(match self.z_t.take() {
            Some(z) => Tensor::cat(vec![z, columns], 1),
            None => columns,
        });
        self.squared_norms = Some(match self.squared_norms.take() {
            Some(n) => Tensor::cat(vec![n, norms], 1),
            None => norms,
        });
    }

    /// From now on, route through an inverted-file index of `lists` cells probing `probes`
    /// of them (approximate; see [`IvfIndex`]); edits inserted later join it.
    pub fn build_index(&mut self, lists: usize, probes: usize, seed: u64) {
        self.index = self.z_t.as_ref().map(|z_t| {
            let dim = z_t.dims()[0];
            let rows = host_rows(z_t.clone().transpose());
            IvfIndex::build(&rows, dim, lists, probes, seed, &self.device)
        });
    }

    /// Routes each query z, `[queries, dim]`: its nearest stored edit and rho (eq. 1-2).
    /// `None` when the memory is empty.
    pub fn route(&self, z: Tensor<2>) -> Option<Vec<Route>> {
        let (z_t, norms) = (self.z_t.as_ref()?, self.squared_norms.as_ref()?);
        let z = z.to_device(&self.device);
        if let Some(index) = &self.index {
            return self.route_indexed(index, z);
        }
        let (best, rho): (Tensor<2, Int>, Tensor<2>) = match self.similarity {
            Similarity::SquaredL2 { scale } => {
                // argmin |z|^2 + |z_e|^2 - 2 z.z_e  =  argmax 2 z.z_e - |z_e|^2
                let score = z.clone().matmul(z_t.clone()) * 2.0 - norms.clone();
                let (best_score, best) = score.max_dim_with_indices(1);
                let d2 = (z.powi_scalar(2).sum_dim(1) - best_score).clamp_min(0.0);
                (best, (d2 * (-scale)).exp())
            }
            Similarity::Cosine => {
                let cos = crate::model::clip::l2_normalize(z).matmul(z_t.clone());
                let (best_cos, best) = cos.max_dim_with_indices(1);
                (best, (best_cos + 1.0) / 2.0)
            }
        };
        let best: Vec<i64> = best
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .expect("i64 indices");
        let rho: Vec<f32> = rho
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .expect("f32 rho");
        Some(
            best.into_iter()
                .zip(rho)
                .map(|(edit, rho)| Route {
                    edit: edit as usize,
                    rho,
                })
                .collect(),
        )
    }
}

impl EditMemory {
    /// Writes the memory to `path` atomically ([`crate::frame`]): a JSON header (similarity, edits,
    /// width), every z_e as little-endian f32 rows, and a CRC-32 of all that. The index is not
    /// saved (`build_index` again after loading).
    pub fn save(&self, path: &Path) -> Result<()> {
        let (edits, dim, rows) = match &self.z_t {
            Some(z_t) => {
                let [dim, edits] = z_t.dims();
                (edits, dim, host_rows(z_t.clone().transpose()))
            }
            None => (0, 0, Vec::new()),
        };
        let header = serde_json::json!({
            "similarity": self.similarity,
            "edits": edits,
            "dim": dim,
        });
        crate::frame::write(path, MAGIC, &header, &rows)
    }

    /// Reads a memory written by [`EditMemory::save`]; a truncated or corrupted file is an
    /// error (checksum), never a partial memory.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let error = |reason: String| Error::Memory {
            path: path.to_path_buf(),
            reason,
        };
        let (header, values) = crate::frame::read(path, MAGIC, "edit memory")?;
        let similarity: Similarity = serde_json::from_value(header["similarity"].clone())
            .map_err(|e| error(format!("invalid similarity: {e}")))?;
        let edits = crate::frame::count(path, &header, "edits")?;
        let dim = crate::frame::count(path, &header, "dim")?;
        if values.len() != edits * dim {
            return Err(error(format!(
                "{} values of z_e for {edits} edits of width {dim}",
                values.len()
            )));
        }
        let mut memory = Self::new(similarity, device);
        if edits > 0 {
            // Stored rows are already normalised for cosine; insert keeps them as they are.
            let z = Tensor::<2>::from_data(TensorData::new(values, [edits, dim]), device);
            memory.insert(z);
        }
        Ok(memory)
    }

    fn route_indexed(&self, index: &IvfIndex, z: Tensor<2>) -> Option<Vec<Route>> {
        let dim = z.dims()[1];
        let z = match self.similarity {
            Similarity::Cosine => crate::model::clip::l2_normalize(z),
            Similarity::SquaredL2 { .. } => z,
        };
        host_rows(z)
            .chunks(dim)
            .map(|q| {
                let (edit, d2) = index.nearest(q)?;
                let rho = match self.similarity {
                    Similarity::SquaredL2 { scale } => (-(scale as f32) * d2).exp(),
                    // Unit vectors: cos = 1 - d^2 / 2.
                    Similarity::Cosine => (2.0 - d2 / 2.0) / 2.0,
                };
                Some(Route { edit, rho })
            })
            .collect()
    }
}

/// A `[n, d]` tensor's values, row-major, on the host.
fn host_rows(x: Tensor<2>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("f32 values")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn routes_to_the_nearest_stored_edit_with_its_similarity() {
        let device = Device::flex();
        let stored = Tensor::<2>::random([50, 8], Distribution::Normal(0.0, 1.0), &device);
        for similarity in [Similarity::SquaredL2 { scale: 0.5 }, Similarity::Cosine] {
            let mut memory = EditMemory::new(similarity, &device);
            assert!(memory.route(stored.clone()).is_none());
            memory.insert(stored.clone().narrow(0, 0, 20));
            memory.insert(stored.clone().narrow(0, 20, 30));
            assert_eq!(memory.len(), 50);
            // Each stored edit, slightly perturbed, routes back to itself.
            let queries =
                stored.clone() + Tensor::random([50, 8], Distribution::Normal(0.0, 0.01), &device);
            let routes = memory.route(queries).unwrap();
            for (i, route) in routes.iter().enumerate() {
                assert_eq!(route.edit, i, "{similarity:?}");
                assert!(
                    route.rho > 0.99 && route.in_scope(),
                    "{similarity:?}: {route:?}"
                );
            }
        }
        // With an index probing every cell, routes are the exact ones.
        for similarity in [Similarity::SquaredL2 { scale: 0.5 }, Similarity::Cosine] {
            let mut memory = EditMemory::new(similarity, &device);
            memory.insert(stored.clone().narrow(0, 0, 40));
            let queries = Tensor::<2>::random([20, 8], Distribution::Normal(0.0, 1.0), &device);
            let exact = memory.route(queries.clone()).unwrap();
            memory.build_index(4, 4, 0);
            memory.insert(stored.clone().narrow(0, 40, 10));
            let stored_last = memory.route(stored.clone().narrow(0, 45, 1)).unwrap();
            assert_eq!(
                stored_last[0].edit, 45,
                "inserted after the index was built"
            );
            let indexed = memory.route(queries).unwrap();
            for (a, b) in exact.iter().zip(&indexed) {
                if a.edit != b.edit {
                    // Only a later insert can be nearer than the exact route of the first 40.
                    assert!(
                        b.edit >= 40 && b.rho >= a.rho,
                        "{similarity:?}: {a:?} {b:?}"
                    );
                } else {
                    assert!((a.rho - b.rho).abs() < 1e-4, "{similarity:?}: {a:?} {b:?}");
                }
            }
        }
        // A far query is out of scope under the squared distance.
        let mut memory = EditMemory::new(Similarity::SquaredL2 { scale: 1.0 }, &device);
        memory.insert(Tensor::zeros([3, 8], &device));
        let far = memory.route(Tensor::ones([1, 8], &device) * 3.0).unwrap();
        assert!((far[0].rho - (-72.0f32).exp()).abs() < 1e-6 && !far[0].in_scope());
    }

    #[test]
    fn a_saved_memory_reloads_to_the_same_routes_and_corruption_is_detected() {
        let device = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let stored = Tensor::<2>::random([300, 16], Distribution::Normal(0.0, 1.0), &device);
        let queries = Tensor::<2>::random([40, 16], Distribution::Normal(0.0, 1.0), &device);
        for similarity in [Similarity::SquaredL2 { scale: 0.25 }, Similarity::Cosine] {
            let mut memory = EditMemory::new(similarity, &device);
            memory.insert(stored.clone());
            memory.save(&path).unwrap();
            let loaded = EditMemory::load(&path, &device).unwrap();
            assert_eq!(loaded.len(), 300);
            let (a, b) = (
                memory.route(queries.clone()).unwrap(),
                loaded.route(queries.clone()).unwrap(),
            );
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.edit, y.edit, "{similarity:?}");
                assert!((x.rho - y.rho).abs() < 1e-6, "{similarity:?}");
            }
        }
        let bytes = std::fs::read(&path).unwrap();
        // Truncated, or one byte flipped anywhere: a clear error, never a partial memory.
        for broken in [bytes[..bytes.len() / 2].to_vec(), {
            let mut b = bytes.clone();
            let middle = b.len() / 2;
            b[middle] ^= 0x10;
            b
        }] {
            std::fs::write(&path, &broken).unwrap();
            let err = EditMemory::load(&path, &device).err().unwrap().to_string();
            assert!(
                err.contains("memory.bin") && err.contains("checksum"),
                "{err}"
            );
        }
        std::fs::write(&path, b"not a memory").unwrap();
        let err = EditMemory::load(&path, &device).err().unwrap().to_string();
        assert!(err.contains("not an mmke edit memory"), "{err}");
        // An empty memory round-trips too.
        EditMemory::new(Similarity::Cosine, &device)
            .save(&path)
            .unwrap();
        assert!(EditMemory::load(&path, &device).unwrap().is_empty());
    }

    #[test]
    fn a_million_edits_are_inserted_saved_reloaded_and_queried() {
        let device = Device::flex();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let (edits, dim, batch) = (1_000_000, 16, 100_000);
        let mut memory = EditMemory::new(Similarity::SquaredL2 { scale: 1.0 }, &device);
        let mut probes = Vec::new();
        // Host-side random numbers: the device's generator is shared with (and reseeded by)
        // tests running in parallel, which could repeat a batch.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for start in (0..edits).step_by(batch) {
            let values: Vec<f32> = (0..batch * dim)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let z = Tensor::<2>::from_data(TensorData::new(values, [batch, dim]), &device);
            // One stored edit of every batch is queried later.
            probes.push((start + 777, z.clone().narrow(0, 777, 1)));
            memory.insert(z);
        }
        assert_eq!(memory.len(), edits);
        memory.save(&path).unwrap();
        let loaded = EditMemory::load(&path, &device).unwrap();
        assert_eq!(loaded.len(), edits);
        let queries = Tensor::cat(probes.iter().map(|(_, z)| z.clone()).collect(), 0);
        let routes = loaded.route(queries).unwrap();
        for ((edit, _), route) in probes.iter().zip(&routes) {
            assert_eq!(route.edit, *edit);
            assert!(route.rho > 0.999 && route.in_scope());
        }
    }
}
