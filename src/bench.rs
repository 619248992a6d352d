//! Throughput benchmarks, run as commands (`mmke bench ...`), never as timed tests.
//! `tools/bench_clip_torch.py` does the same work in PyTorch so both run side by side.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use serde::Serialize;

use crate::model::clip::{ClipConfig, ClipModel};

#[derive(Debug, Serialize)]
pub struct ClipBenchResult {
    pub implementation: &'static str,
    pub model: String,
    pub backend: String,
    pub threads: usize,
    pub batch: usize,
    pub iters: usize,
    pub images_per_second: f64,
    /// Seconds of each timed iteration.
    pub seconds: Vec<f64>,
}

/// Encodes `iters` batches of random `image_size²` images with a random-weight CLIP vision
/// tower plus projection, after one untimed warm-up batch. Images/s uses the median iteration.
pub fn clip_images(
    preset: &str,
    config: &ClipConfig,
    batch: usize,
    iters: usize,
    backend: &str,
    device: &Device,
) -> ClipBenchResult {
    let model = ClipModel::new(config, device);
    let size = config.vision_config.image_size;
    let pixels = Tensor::<4>::random(
        [batch, 3, size, size],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let run = || {
        let features = model.image_features(pixels.clone());
        // Reading the result back waits for the device to finish.
        let _ = features.into_data();
    };
    run();
    let seconds: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64()
        })
        .collect();
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    ClipBenchResult {
        implementation: "mmke",
        model: preset.to_string(),
        backend: backend.to_string(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        batch,
        iters: seconds.len(),
        images_per_second: batch as f64 / median,
        seconds,
    }
}

#[derive(Debug, Serialize)]
pub struct RoutingBenchResult {
    pub edits: usize,
    pub dim: usize,
    /// Milliseconds to route one query alone (median).
    pub single_query_ms: f64,
    /// Milliseconds per query when `batch` queries are routed together (median).
    pub batched_query_ms: f64,
    pub batch: usize,
}

/// Routing latency of an edit memory holding `edits` random z_e of width `dim`: one query at
/// a time and `batch` at once, median of `iters` after a warm-up.
pub fn routing(
    edits: usize,
    dim: usize,
    batch: usize,
    iters: usize,
    device: &Device,
) -> RoutingBenchResult {
    use crate::edit::memory::EditMemory;
    use crate::model::scope::Similarity;

    let mut memory = EditMemory::new(Similarity::SquaredL2 { scale: 1.0 }, device);
    // Filled in chunks, as edits arrive.
    let chunk = 100_000;
    for start in (0..edits).step_by(chunk) {
        let n = chunk.min(edits - start);
        memory.insert(Tensor::random(
            [n, dim],
            Distribution::Normal(0.0, 1.0),
            device,
        ));
    }
    let median_ms = |queries: usize| {
        let z = Tensor::<2>::random([queries, dim], Distribution::Normal(0.0, 1.0), device);
        let _ = memory.route(z.clone());
        let mut times: Vec<f64> = (0..iters.max(1))
            .map(|_| {
                let start = Instant::now();
                let routes = memory.route(z.clone()).expect("a filled memory");
                assert_eq!(routes.len(), queries);
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2] / queries as f64
    };
    RoutingBenchResult {
        edits,
        dim,
        single_query_ms: median_ms(1),
        batched_query_ms: median_ms(batch),
        batch,
    }
}
