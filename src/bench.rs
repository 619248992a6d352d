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
    /// The matrix products' floating-point operations per image ([`vision_gflop_per_image`]).
    pub gflop_per_image: f64,
    /// `images_per_second * gflop_per_image`.
    pub gflops: f64,
    /// Seconds of each timed iteration.
    pub seconds: Vec<f64>,
}

/// GFLOP of one image through a CLIP vision tower and its projection, counting the matrix
/// products (2 per multiply-add: the patch embedding, each layer's q/k/v/out projections,
/// attention scores and mix, the MLP, the projection of the class token); the element-wise
/// ops are a few percent more. `tools/bench_clip_torch.py` counts the same.
pub fn vision_gflop_per_image(config: &crate::model::clip::ClipVisionConfig) -> f64 {
    let (d, f) = (config.hidden_size as f64, config.intermediate_size as f64);
    let grid = (config.image_size / config.patch_size) as f64;
    let patch = (config.num_channels * config.patch_size * config.patch_size) as f64;
    let t = grid * grid + 1.0;
    let embed = (t - 1.0) * patch * d;
    let layer = 4.0 * t * d * d + 2.0 * t * t * d + 2.0 * t * d * f;
    let projection = d * config.projection_dim as f64;
    2.0 * (embed + config.num_hidden_layers as f64 * layer + projection) / 1e9
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
        gflop_per_image: vision_gflop_per_image(&config.vision_config),
        gflops: batch as f64 / median * vision_gflop_per_image(&config.vision_config),
        seconds,
    }
}

#[derive(Debug, Serialize)]
pub struct RoutingBenchResult {
    pub edits: usize,
    pub dim: usize,
    /// Exact scan: milliseconds to route one query alone (median).
    pub single_query_ms: f64,
    /// Exact scan: milliseconds per query when `batch` queries are routed together (median).
    pub batched_query_ms: f64,
    pub batch: usize,
    /// The inverted-file index on the same memory.
    pub ivf: IvfBenchResult,
}

#[derive(Debug, Serialize)]
pub struct IvfBenchResult {
    pub lists: usize,
    pub probes: usize,
    pub build_seconds: f64,
    /// Milliseconds to route one query (median).
    pub single_query_ms: f64,
    /// Share of near-duplicate queries (a stored z_e plus N(0, 0.05^2) noise per component,
    /// rho around 0.5 against their source) routed to the same edit as the exact scan.
    pub recall_at_1: f64,
    /// Share of random queries with the same in/out-of-scope decision as the exact scan.
    pub decision_agreement: f64,
}

/// Routing latency of an edit memory holding `edits` random z_e of width `dim`: one query at
/// a time and `batch` at once with the exact scan, then with an inverted-file index of
/// `lists` cells (default sqrt(edits)) probing `probes`; medians of `iters` after a warm-up.
pub fn routing(
    edits: usize,
    dim: usize,
    batch: usize,
    iters: usize,
    lists: Option<usize>,
    probes: usize,
    device: &Device,
) -> RoutingBenchResult {
    use crate::edit::memory::EditMemory;
    use crate::model::scope::Similarity;

    let mut memory = EditMemory::new(Similarity::SquaredL2 { scale: 1.0 }, device);
    // Filled in chunks, as edits arrive; the first chunk is kept to make near-duplicates.
    let chunk = 100_000;
    let mut first = None;
    for start in (0..edits).step_by(chunk) {
        let n = chunk.min(edits - start);
        let z = Tensor::<2>::random([n, dim], Distribution::Normal(0.0, 1.0), device);
        first.get_or_insert_with(|| z.clone());
        memory.insert(z);
    }
    let median_ms = |memory: &EditMemory, z: &Tensor<2>| {
        let queries = z.dims()[0];
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
    let random = |n| Tensor::<2>::random([n, dim], Distribution::Normal(0.0, 1.0), device);
    let single = random(1);
    let batched = random(batch);
    let single_query_ms = median_ms(&memory, &single);
    let batched_query_ms = median_ms(&memory, &batched);

    let probe_n = 200.min(edits);
    let first = first.expect("at least one edit");
    let near = first.clone().narrow(0, 0, probe_n)
        + Tensor::random([probe_n, dim], Distribution::Normal(0.0, 0.05), device);
    let far = random(probe_n);
    let exact_near = memory.route(near.clone()).expect("a filled memory");
    let exact_far = memory.route(far.clone()).expect("a filled memory");

    let lists = lists.unwrap_or_else(|| (edits as f64).sqrt().round().max(1.0) as usize);
    let start = Instant::now();
    memory.build_index(lists, probes, 0);
    let build_seconds = start.elapsed().as_secs_f64();
    let ivf_near = memory.route(near).expect("a filled memory");
    let ivf_far = memory.route(far).expect("a filled memory");
    let share = |hits: usize| hits as f64 / probe_n as f64;
    RoutingBenchResult {
        edits,
        dim,
        single_query_ms,
        batched_query_ms,
        batch,
        ivf: IvfBenchResult {
            lists,
            probes,
            build_seconds,
            single_query_ms: median_ms(&memory, &single),
            recall_at_1: share(
                exact_near
                    .iter()
                    .zip(&ivf_near)
                    .filter(|(a, b)| a.edit == b.edit)
                    .count(),
            ),
            decision_agreement: share(
                exact_far
                    .iter()
                    .zip(&ivf_far)
                    .filter(|(a, b)| a.in_scope() == b.in_scope())
                    .count(),
            ),
        },
    }
}

/// This process's peak resident memory in bytes (`VmHWM` of `/proc/self/status`; `None`
/// where there is no such file, as outside Linux).
pub fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[derive(Debug, Serialize)]
pub struct TrainBenchResult {
    pub implementation: &'static str,
    /// `scope-multimodal` (MSCKE's classifier) or `vlm` (the base VLM).
    pub model: String,
    pub backend: String,
    pub threads: usize,
    /// The training batch of the preset.
    pub batch: usize,
    /// Timed optimizer steps.
    pub steps: usize,
    pub steps_per_second: f64,
    /// What a step works on (`vocab`, and the mean padded token widths of the batches), for
    /// `tools/bench_train_torch.py`'s replica: [`scope_shapes`], [`vlm_shapes`].
    pub shapes: std::collections::BTreeMap<&'static str, usize>,
}

/// Batches [`train_steps`] samples to measure their widths (mean over them, rounded).
const SHAPE_BATCHES: usize = 20;

fn mean_width(widths: &[usize]) -> usize {
    (widths.iter().sum::<usize>() as f64 / widths.len().max(1) as f64).round() as usize
}

/// The scope classifier's batch widths on `data_dir`'s training pairs, tokenized as its
/// training loop does: `edit_tokens` ("question target"), `query_tokens`, and `vocab`.
pub fn scope_shapes(
    clip_dir: &std::path::Path,
    data_dir: &std::path::Path,
    batch: usize,
) -> crate::Result<std::collections::BTreeMap<&'static str, usize>> {
    use rand::SeedableRng;
    use rand::seq::IndexedRandom;
    let records = crate::data::read_edits(&data_dir.join("train.json"), data_dir)?.records;
    let pairs: Vec<_> = records.iter().flat_map(crate::data::pairs::pairs).collect();
    let clip = crate::model::clip::Clip::load(clip_dir, &Device::flex())?;
    let vocab = clip.tokenizer.inner().get_vocab_size(true);
    let batcher = crate::data::batch::ScopeBatcher::new(clip.tokenizer, clip.preprocessor, &pairs)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut edits, mut queries) = (Vec::new(), Vec::new());
    for _ in 0..SHAPE_BATCHES {
        let chosen: Vec<_> = (0..batch).filter_map(|_| pairs.choose(&mut rng)).collect();
        edits.push(batcher.edits(&chosen, &Device::flex())?.ids.dims()[1]);
        queries.push(batcher.queries(&chosen, &Device::flex())?.ids.dims()[1]);
    }
    Ok([
        ("vocab", vocab),
        ("edit_tokens", mean_width(&edits)),
        ("query_tokens", mean_width(&queries)),
    ]
    .into())
}

/// The base VLM's batch widths on `data_dir`'s pre-edit examples, batched as its training
/// loop does: `tokens` (an image batch), `prompt_tokens` (its bidirectional prefix: BOS and
/// prompt), `text_tokens` (a text-only batch), and `vocab`.
pub fn vlm_shapes(
    data_dir: &std::path::Path,
    image_size: usize,
    batch: usize,
) -> crate::Result<std::collections::BTreeMap<&'static str, usize>> {
    use rand::SeedableRng;
    use rand::seq::IndexedRandom;
    let tokenizer =
        crate::data::text::TextTokenizer::from_file(&data_dir.join("tokenizer.json"), 256, 0)?;
    let vocab = tokenizer.inner().get_vocab_size(true);
    let examples: Vec<_> = crate::data::fgvedit::read(&data_dir.join("train.json"), data_dir)?
        .records
        .iter()
        .flat_map(|r| crate::train::vlm::Knowledge::PreEdit.examples(r))
        .collect();
    let (visual, text): (Vec<_>, Vec<_>) = examples.iter().partition(|e| e.image.is_some());
    let mut batcher = crate::data::lm::LmBatcher::new(
        tokenizer,
        crate::data::image::ImagePreprocessor::clip(image_size as u32),
        2,
        3,
    )
    .with_prefix_lm(true);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut tokens, mut prompts, mut texts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SHAPE_BATCHES {
        let chosen: Vec<_> = (0..batch)
            .filter_map(|_| visual.choose(&mut rng).copied())
            .collect();
        let lm = batcher.batch(&chosen, &Device::flex())?;
        tokens.push(lm.ids.dims()[1]);
        let prefix = lm.mask.equal_elem(2).int().sum().into_scalar::<i64>() as usize;
        prompts.push(prefix / chosen.len().max(1));
        let chosen: Vec<_> = (0..batch)
            .filter_map(|_| text.choose(&mut rng).copied())
            .collect();
        if !chosen.is_empty() {
            texts.push(batcher.batch(&chosen, &Device::flex())?.ids.dims()[1]);
        }
    }
    Ok([
        ("vocab", vocab),
        ("tokens", mean_width(&tokens)),
        ("prompt_tokens", mean_width(&prompts)),
        ("text_tokens", mean_width(&texts)),
    ]
    .into())
}

/// What [`train_steps`] trains: the quick preset's models (`mmke bench train` reads them
/// from experiments/scenes.toml).
pub struct TrainBenchSpec {
    pub data: crate::data::scenes::ScenesConfig,
    pub clip_preset: String,
    pub clip_image_size: usize,
    pub clip_train: crate::train::clip::ClipTrainConfig,
    /// MSCKE's multimodal scope classifier.
    pub scope: crate::train::scope::ScopeRunConfig,
    pub vlm_preset: String,
    pub vlm_train: crate::train::vlm::VlmTrainConfig,
}

/// Optimizer steps per second of the scenes models the experiments train most, as `mmke
/// experiment` trains them (MSCKE's multimodal scope classifier and the base VLM, at their
/// preset's sizes and batch, through the real training loops): a CLIP pre-trained one step
/// gives both their vision tower, then each model trains `1` and `1 + steps` steps on a small
/// scenes split; the difference of the two wall times over `steps` is one step's (set-up, the
/// first step's kernel compilation and the final evaluation cancel). `device` must be an
/// autodiff device.
pub fn train_steps(
    spec: &TrainBenchSpec,
    steps: usize,
    backend: &str,
    device: &Device,
) -> crate::Result<Vec<TrainBenchResult>> {
    let temp = tempfile::tempdir().map_err(|e| crate::Error::io(&std::env::temp_dir(), e))?;
    let dir = temp.path().to_path_buf();
    let data = dir.join("scenes");
    let scenes = crate::data::scenes::ScenesConfig {
        train: 64,
        test: 8,
        ..spec.data.clone()
    };
    crate::data::scenes::write(&data, &scenes)?;
    let clip_dir = dir.join("clip");
    let clip_train = crate::train::clip::ClipTrainConfig {
        steps: 1,
        checkpoint_every: 1,
        ..spec.clip_train.clone()
    };
    crate::train::clip::pretrain(
        &spec.clip_preset,
        spec.clip_image_size,
        &clip_train,
        &clip_dir,
        false,
        device,
    )?;
    let timed =
        |run: &mut dyn FnMut(usize, &std::path::Path) -> crate::Result<()>| -> crate::Result<f64> {
            let mut seconds = [0.0; 2];
            for (i, n) in [1, 1 + steps].into_iter().enumerate() {
                let start = Instant::now();
                run(n, &dir.join(format!("run-{n}")))?;
                seconds[i] = start.elapsed().as_secs_f64();
            }
            Ok(steps as f64 / (seconds[1] - seconds[0]).max(1e-9))
        };
    let mut results = Vec::new();
    let scope = &spec.scope;
    let per_second = timed(&mut |n, out| {
        let mut config = scope.clone();
        config.train.steps = n;
        config.train.validate_every = n;
        config.train.checkpoint_every = n;
        crate::train::scope::run(&config, &clip_dir, &data, out, false, device).map(drop)
    })?;
    results.push(TrainBenchResult {
        implementation: "mmke",
        model: "scope-multimodal".into(),
        backend: backend.into(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        batch: scope.train.batch_size,
        steps,
        steps_per_second: per_second,
        shapes: scope_shapes(&clip_dir, &data, scope.train.batch_size)?,
    });
    let per_second = timed(&mut |n, out| {
        let mut train = spec.vlm_train.clone();
        train.steps = n;
        train.checkpoint_every = n;
        crate::train::vlm::run(
            crate::train::vlm::Knowledge::PreEdit,
            &spec.vlm_preset,
            spec.clip_image_size,
            Some(&clip_dir),
            &data,
            &train,
            out,
            false,
            device,
        )
        .map(drop)
    })?;
    results.push(TrainBenchResult {
        implementation: "mmke",
        model: "vlm".into(),
        backend: backend.into(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        batch: spec.vlm_train.batch_size,
        steps,
        steps_per_second: per_second,
        shapes: vlm_shapes(&data, spec.clip_image_size, spec.vlm_train.batch_size)?,
    });
    Ok(results)
}

#[derive(Debug, Serialize)]
pub struct FmaPeakResult {
    /// The widest fused multiply-add the CPU has: `avx512f`, `avx2+fma`, or `scalar`.
    pub instructions: &'static str,
    /// f32 lanes per instruction.
    pub lanes: usize,
    pub threads: usize,
    /// The best of the runs: the measured FMA limit of `threads` cores, in GFLOP/s (2 per
    /// multiply-add).
    pub gflops: f64,
    /// GFLOP/s of each run.
    pub runs: Vec<f64>,
}

/// Independent accumulators per thread: enough to cover the FMA latency (4 cycles) on two
/// ports, and few enough to stay in registers (16 ymm with AVX2, two of them the operands).
const ACCUMULATORS: usize = 12;

/// The CPU's f32 multiply-add limit, measured: `threads` threads each run `iters` rounds of
/// [`ACCUMULATORS`] independent fused multiply-adds on registers (nothing from memory), in
/// the widest instructions the CPU has; the best of `runs`. What GFLOP/s a matrix product
/// reaches is read against this.
pub fn fma_peak(threads: usize, iters: u64, runs: usize) -> FmaPeakResult {
    let (instructions, lanes, kernel) = fma_kernel();
    let runs: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            let sums: Vec<f32> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads.max(1))
                    .map(|_| s.spawn(move || kernel(iters)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("no panic"))
                    .collect()
            });
            let seconds = start.elapsed().as_secs_f64();
            // The sums are used, so the loops cannot be optimised away.
            assert!(sums.iter().all(|x| x.is_finite()), "{sums:?}");
            let flop = (threads.max(1) as u64 * iters * (ACCUMULATORS * lanes * 2) as u64) as f64;
            flop / seconds / 1e9
        })
        .collect();
    FmaPeakResult {
        instructions,
        lanes,
        threads: threads.max(1),
        gflops: runs.iter().copied().fold(0.0, f64::max),
        runs,
    }
}

type FmaKernel = fn(u64) -> f32;

#[cfg(target_arch = "x86_64")]
fn fma_kernel() -> (&'static str, usize, FmaKernel) {
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        ("avx512f", 16, |iters| unsafe { x86::fma_avx512(iters) })
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        ("avx2+fma", 8, |iters| unsafe { x86::fma_avx2(iters) })
    } else {
        ("scalar", 1, fma_scalar)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_kernel() -> (&'static str, usize, FmaKernel) {
    ("scalar", 1, fma_scalar)
}

fn fma_scalar(iters: u64) -> f32 {
    let mut acc = [1.0f32; ACCUMULATORS];
    for _ in 0..iters {
        for x in &mut acc {
            *x = std::hint::black_box(*x).mul_add(0.999_99, 1e-6);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ACCUMULATORS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub fn fma_avx512(iters: u64) -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_99), _mm512_set1_ps(1e-6));
        let mut acc = [_mm512_set1_ps(1.0); ACCUMULATORS];
        for _ in 0..iters {
            for x in &mut acc {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let total = acc
            .into_iter()
            .fold(_mm512_setzero_ps(), |t, x| _mm512_add_ps(t, x));
        _mm512_reduce_add_ps(total)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn fma_avx2(iters: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.999_99), _mm256_set1_ps(1e-6));
        let mut acc = [_mm256_set1_ps(1.0); ACCUMULATORS];
        for _ in 0..iters {
            for x in &mut acc {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let total = acc
            .into_iter()
            .fold(_mm256_setzero_ps(), |t, x| _mm256_add_ps(t, x));
        let half = _mm_add_ps(
            _mm256_castps256_ps128(total),
            _mm256_extractf128_ps::<1>(total),
        );
        let quarter = _mm_hadd_ps(half, half);
        _mm_cvtss_f32(_mm_hadd_ps(quarter, quarter))
    }
}
