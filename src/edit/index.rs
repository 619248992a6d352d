//! An inverted-file (IVF) index over stored z_e, for edit memories too large to scan per
//! query. k-means splits the memory into `lists` cells; a query is compared with the
//! centroids, then exactly with the edits of its `probes` nearest cells. Approximate: a query
//! whose nearest edit lies in an unprobed cell gets the best one it saw (`mmke bench routing`
//! reports the recall against the exact scan).

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

/// One cell: the ids of its edits and their vectors, contiguous.
#[derive(Clone, Debug, Default)]
struct Cell {
    ids: Vec<u32>,
    vectors: Vec<f32>,
    squared_norms: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct IvfIndex {
    dim: usize,
    /// `[lists * dim]`, row-major.
    centroids: Vec<f32>,
    centroid_norms: Vec<f32>,
    cells: Vec<Cell>,
    pub probes: usize,
}

/// k-means iterations when building.
const ITERATIONS: usize = 8;
/// Training points per list for k-means (the rest are only assigned).
const POINTS_PER_LIST: usize = 32;

impl IvfIndex {
    /// Builds an index of `lists` cells over `vectors` (`[n, dim]` row-major; id = row),
    /// using `device` for the k-means matrix products.
    pub fn build(
        vectors: &[f32],
        dim: usize,
        lists: usize,
        probes: usize,
        seed: u64,
        device: &Device,
    ) -> Self {
        let n = vectors.len() / dim;
        assert!(n > 0 && lists > 0, "an index needs vectors and lists");
        let lists = lists.min(n);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let train: Vec<usize> = sample(&mut rng, n, (lists * POINTS_PER_LIST).min(n)).into_vec();
        let rows = |ids: &[usize]| -> Vec<f32> {
            ids.iter()
                .flat_map(|&i| vectors[i * dim..(i + 1) * dim].iter().copied())
                .collect()
        };
        let train_vectors = rows(&train);
        let mut centroids = rows(&train[..lists]);
        for _ in 0..ITERATIONS {
            let assigned = assign(&train_vectors, &centroids, dim, device);
            let mut sums = vec![0f64; lists * dim];
            let mut counts = vec![0usize; lists];
            for (point, &cell) in train_vectors.chunks(dim).zip(&assigned) {
                counts[cell] += 1;
                for (s, &x) in sums[cell * dim..(cell + 1) * dim].iter_mut().zip(point) {
                    *s += x as f64;
                }
            }
            for cell in 0..lists {
                let centroid = &mut centroids[cell * dim..(cell + 1) * dim];
                if counts[cell] == 0 {
                    // An empty cell restarts at a random training point.
                    let i = sample(&mut rng, train.len(), 1).index(0);
                    centroid.copy_from_slice(&train_vectors[i * dim..(i + 1) * dim]);
                } else {
                    for (c, &s) in centroid.iter_mut().zip(&sums[cell * dim..(cell + 1) * dim]) {
                        *c = (s / counts[cell] as f64) as f32;
                    }
                }
            }
        }
        let mut index = Self {
            dim,
            centroid_norms: centroids.chunks(dim).map(squared_norm).collect(),
            centroids,
            cells: vec![Cell::default(); lists],
            probes: probes.clamp(1, lists),
        };
        index.add(vectors, 0, device);
        index
    }

    pub fn lists(&self) -> usize {
        self.cells.len()
    }

    /// Adds `vectors` (`[n, dim]`) with ids `first_id..`, each to its nearest cell.
    pub fn add(&mut self, vectors: &[f32], first_id: usize, device: &Device) {
        let chunk = 65_536 * self.dim;
        for (c, part) in vectors.chunks(chunk).enumerate() {
            let assigned = assign(part, &self.centroids, self.dim, device);
            for (i, (point, &cell)) in part.chunks(self.dim).zip(&assigned).enumerate() {
                let cell = &mut self.cells[cell];
                cell.ids.push((first_id + c * 65_536 + i) as u32);
                cell.vectors.extend_from_slice(point);
                cell.squared_norms.push(squared_norm(point));
            }
        }
    }

    /// The stored vector nearest to `query` among the `probes` nearest cells:
    /// `(id, squared distance)`, or `None` if those cells are empty.
    pub fn nearest(&self, query: &[f32]) -> Option<(usize, f32)> {
        assert_eq!(query.len(), self.dim);
        // argmin |q - c|^2 = argmin |c|^2 - 2 q.c
        let mut cells: Vec<(f32, usize)> = self
            .centroids
            .chunks(self.dim)
            .zip(&self.centroid_norms)
            .enumerate()
            .map(|(i, (c, &norm))| (norm - 2.0 * dot(query, c), i))
            .collect();
        let probes = self.probes.min(cells.len());
        cells.select_nth_unstable_by(probes - 1, |a, b| a.0.total_cmp(&b.0));
        let q2 = squared_norm(query);
        let mut best: Option<(usize, f32)> = None;
        for &(_, c) in &cells[..probes] {
            let cell = &self.cells[c];
            for ((v, &norm), &id) in cell
                .vectors
                .chunks(self.dim)
                .zip(&cell.squared_norms)
                .zip(&cell.ids)
            {
                let d2 = (q2 + norm - 2.0 * dot(query, v)).max(0.0);
                if best.is_none_or(|(_, b)| d2 < b) {
                    best = Some((id as usize, d2));
                }
            }
        }
        best
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators so the compiler vectorises the loop.
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum::<f32>()
}

fn squared_norm(a: &[f32]) -> f32 {
    dot(a, a)
}

/// The nearest centroid of each point, by one matrix product on `device`.
fn assign(points: &[f32], centroids: &[f32], dim: usize, device: &Device) -> Vec<usize> {
    let n = points.len() / dim;
    let lists = centroids.len() / dim;
    let p = Tensor::<2>::from_data(TensorData::new(points.to_vec(), [n, dim]), device);
    let c = Tensor::<2>::from_data(TensorData::new(centroids.to_vec(), [lists, dim]), device);
    let c2 = c.clone().powi_scalar(2).sum_dim(1).transpose(); // [1, lists]
    let score = p.matmul(c.transpose()) * 2.0 - c2;
    let best: Tensor<2, Int> = score.argmax(1);
    best.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("i64 indices")
        .into_iter()
        .map(|i| i as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn probing_every_list_is_exact_and_few_probes_find_near_duplicates() {
        let device = Device::flex();
        let (n, dim) = (3000, 16);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let vectors: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut index = IvfIndex::build(&vectors, dim, 32, 32, 0, &device);
        assert_eq!(index.cells.iter().map(|c| c.ids.len()).sum::<usize>(), n);
        let exact = |q: &[f32]| {
            (0..n)
                .map(|i| {
                    let v = &vectors[i * dim..(i + 1) * dim];
                    (
                        i,
                        q.iter().zip(v).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
                    )
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
        };
        for _ in 0..50 {
            let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (id, d2) = index.nearest(&q).unwrap();
            let (want, want_d2) = exact(&q);
            assert_eq!(id, want);
            assert!((d2 - want_d2).abs() < 1e-4);
        }
        // Slightly perturbed stored vectors route back to themselves with 4 of 32 probes.
        index.probes = 4;
        for i in (0..n).step_by(97) {
            let q: Vec<f32> = vectors[i * dim..(i + 1) * dim]
                .iter()
                .map(|x| x + rng.random_range(-0.01..0.01))
                .collect();
            assert_eq!(index.nearest(&q).unwrap().0, i);
        }
    }

    #[test]
    fn added_vectors_get_the_next_ids() {
        let device = Device::flex();
        let base: Vec<f32> = (0..64 * 4).map(|k| (k % 13) as f32).collect();
        let mut index = IvfIndex::build(&base, 4, 4, 4, 0, &device);
        index.add(&[100.0, 100.0, 100.0, 100.0], 64, &device);
        assert_eq!(
            index.nearest(&[99.0, 100.0, 100.0, 100.0]).unwrap(),
            (64, 1.0)
        );
    }
}
