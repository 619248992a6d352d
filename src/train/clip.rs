//! Pre-training a small CLIP from scratch on the scenes generator's image-caption pairs with
//! the symmetric InfoNCE loss, so that scope classifiers start from a pre-trained CLIP as in
//! the paper. Every step draws fresh scenes (step `s` from its own stream), so the model never
//! sees the same pair twice and a resumed run sees exactly the data an uninterrupted one would.

use std::path::Path;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use crate::data::image::ImagePreprocessor;
use crate::data::scenes;
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result, write_atomic};
use crate::model::clip::ClipConfig;
use crate::model::clip::{ClipModel, l2_normalize, pool_cells};
use crate::model::objects::{ATTRIBUTE_CLASSES, AttributeProbe, PROBE_FILE};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipTrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// Side of the rendered scenes, before CLIP preprocessing.
    pub scene_size: u32,
    pub checkpoint_every: usize,
    /// Weight of the grounding loss next to InfoNCE (0: InfoNCE only).
    #[serde(default)]
    pub grounding_weight: f64,
    /// Grounding and attribute supervision act on the class token and the patch grid pooled
    /// to `cells x cells` object-level tokens (`None`: on every patch).
    #[serde(default)]
    pub cells: Option<usize>,
    /// Weight of the dense attribute loss ([`attribute_loss`]; needs a 3x3 token grid: the
    /// patches of a 96-px scenes CLIP, or `cells = 3`).
    #[serde(default)]
    pub attribute_weight: f64,
    #[serde(default)]
    pub optim: super::OptimConfig,
}

/// What CLIP pre-training trains: CLIP itself and a linear probe that reads each cell token's
/// object attributes (dense supervision from the scene graph; the probe is saved next to the
/// CLIP for object-token VLMs, and no editor ever sees a scene graph).
#[derive(Module, Debug)]
pub struct ClipPretraining {
    pub clip: ClipModel,
    /// Present with `attribute_weight > 0`.
    pub attributes: Option<AttributeProbe>,
}

/// Per cell of the 3x3 layout, the classes of the object there ([`ATTRIBUTE_CLASSES`]).
pub fn cell_attributes(scene: &scenes::scene::Scene) -> [[usize; 3]; 9] {
    use scenes::scene::{Color, Shape, Size};
    fn class<T: PartialEq>(all: &[T], value: T) -> usize {
        1 + all.iter().position(|x| *x == value).expect("a known value")
    }
    let mut out = [[0; 3]; 9];
    for o in &scene.objects {
        out[o.cell.0 as usize] = [
            class(&Shape::ALL, o.shape),
            class(&Color::ALL, o.color),
            class(&Size::ALL, o.size),
        ];
    }
    out
}

/// Dense attribute supervision: cross-entropy of each cell token's predicted shape, color
/// and size (or "none") against the scene graph, mean over cells and attributes; and the
/// share of cells whose three predictions are all right, then of the occupied cells, the
/// shares with the right shape, color and size.
pub fn attribute_loss(logits: Tensor<3>, targets: &[[usize; 3]]) -> (Tensor<1>, [f64; 4]) {
    let [batch, cells, _] = logits.dims();
    let device = logits.device();
    let logits = logits.reshape([batch * cells, ATTRIBUTE_CLASSES.iter().sum::<usize>()]);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let mut loss = Tensor::<1>::zeros([1], &device);
    let mut right = Tensor::<1>::ones([batch * cells], &device);
    let mut offset = 0;
    let mut accuracy = [0.0; 4];
    // Only cells holding an object count for the per-attribute accuracies.
    let occupied: Vec<f32> = targets.iter().map(|t| (t[0] > 0) as u8 as f32).collect();
    let occupied = Tensor::<1>::from_data(TensorData::new(occupied, [batch * cells]), &device);
    let objects = occupied.clone().sum().into_scalar::<f32>().max(1.0) as f64;
    for (a, &classes) in ATTRIBUTE_CLASSES.iter().enumerate() {
        let column: Vec<i64> = targets.iter().map(|t| t[a] as i64).collect();
        let column = Tensor::<1, Int>::from_data(TensorData::new(column, [batch * cells]), &device);
        let part = logits.clone().narrow(1, offset, classes);
        let hit = part
            .clone()
            .detach()
            .argmax(1)
            .reshape([batch * cells])
            .equal(column.clone())
            .float();
        accuracy[1 + a] =
            (hit.clone() * occupied.clone()).sum().into_scalar::<f32>() as f64 / objects;
        right = right * hit;
        loss = loss + ce.forward(part, column);
        offset += classes;
    }
    accuracy[0] = right.mean().into_scalar::<f32>() as f64;
    (loss / ATTRIBUTE_CLASSES.len() as f64, accuracy)
}

/// Symmetric InfoNCE over a batch of matching (image, text) embeddings: cross-entropy of
/// `exp(s) * cos` logits against the diagonal, in both directions, averaged.
pub fn info_nce(model: &ClipModel, image_embeds: Tensor<2>, text_embeds: Tensor<2>) -> Tensor<1> {
    let n = image_embeds.dims()[0];
    let device = image_embeds.device();
    let logits = model.logits_per_image(l2_normalize(image_embeds), l2_normalize(text_embeds));
    let targets = Tensor::<1, Int>::arange(0..n as i64, &device);
    let ce = CrossEntropyLossConfig::new().init(&device);
    (ce.forward(logits.clone(), targets.clone()) + ce.forward(logits.transpose(), targets)) / 2.0
}

/// Phrase grounding: cross-entropy between the softmax over image tokens of the raw dot
/// products `question · token` and the uniform distribution over the patches of the object the
/// question refers to. This is exactly the attention of the dot-product fusion, so it teaches
/// CLIP where "the cross" or "the shape in the top left" is; InfoNCE alone supervises only the
/// class token.
pub fn grounding_loss(question: Tensor<2>, tokens: Tensor<3>, target: Tensor<2>) -> Tensor<1> {
    let [batch, n, p] = tokens.dims();
    let scores = question
        .reshape([batch, 1, p])
        .matmul(tokens.swap_dims(1, 2))
        .reshape([batch, n]);
    (log_softmax(scores, 1) * target).sum_dim(1).mean().neg()
}

/// Share of questions whose highest-scoring image token lies on their object (the target's
/// support): 1 for perfect grounding, about 0.1 for a random pick.
pub fn pointing_accuracy(question: Tensor<2>, tokens: Tensor<3>, target: Tensor<2>) -> f64 {
    let [batch, n, p] = tokens.dims();
    let best = question
        .reshape([batch, 1, p])
        .matmul(tokens.swap_dims(1, 2))
        .reshape([batch, n])
        .argmax(1);
    let hit = target.gather(1, best).greater_elem(0.0).float().mean();
    hit.into_scalar::<f32>() as f64
}

/// The target of [`grounding_loss`]: over `[class, patches...]` of a `grid x grid` patch
/// grid, uniform on the patches whose centre lies in `cell` of the scene's 3x3 grid.
pub fn cell_target(cell: scenes::scene::Cell, grid: usize) -> Vec<f32> {
    let third = |i: usize| ((3 * (2 * i + 1)) / (2 * grid)) as u8;
    let inside: Vec<bool> = std::iter::once(false)
        .chain(
            (0..grid * grid)
                .map(|k| third(k / grid) == cell.row() && third(k % grid) == cell.col()),
        )
        .collect();
    let count = inside.iter().filter(|&&b| b).count().max(1) as f32;
    inside
        .iter()
        .map(|&b| if b { 1.0 / count } else { 0.0 })
        .collect()
}

/// One batch of fresh scenes as tensors: pixels, captions then questions (one text batch),
/// and the grounding targets.
struct Batch {
    pixels: Tensor<4>,
    ids: Tensor<2, Int>,
    padding: Tensor<2, Bool>,
    target: Tensor<2>,
    /// Per image, per cell of the 3x3 layout: [`cell_attributes`].
    attributes: Vec<[usize; 3]>,
}

fn batch(
    step: usize,
    config: &ClipTrainConfig,
    tokenizer: &TextTokenizer,
    preprocessor: &ImagePreprocessor,
    grid: usize,
    device: &Device,
) -> Result<Batch> {
    let n = config.batch_size;
    let mut pixels = Vec::new();
    let mut texts = vec![String::new(); 2 * n];
    let mut target = Vec::new();
    let mut attributes = Vec::new();
    for i in 0..n {
        let scene = scenes::pretrain_scene(config.seed, (step * n + i) as u64, config.scene_size);
        pixels.extend(preprocessor.apply(&image::DynamicImage::ImageRgb8(scene.image)));
        texts[i] = scene.caption;
        texts[n + i] = scene.question;
        target.extend(cell_target(scene.cell, grid));
        attributes.extend(cell_attributes(&scene.scene));
    }
    let (h, w) = preprocessor.output_size(config.scene_size, config.scene_size);
    let pixels = Tensor::from_data(
        TensorData::new(pixels, [n, 3, h as usize, w as usize]),
        device,
    );
    let (ids, padding) = tokenizer.encode_batch(&texts)?.to_tensors(device);
    let target = Tensor::from_data(TensorData::new(target, [n, 1 + grid * grid]), device);
    Ok(Batch {
        pixels,
        ids,
        padding,
        target,
        attributes,
    })
}

/// One pre-training step's losses.
struct StepLosses {
    /// What the step minimises.
    loss: burn::tensor::Tensor<1>,
    /// InfoNCE's value.
    contrastive: f64,
    /// The attribute loss and the accuracies (all, shape, color, size), when it is trained.
    attributes: Option<(f64, [f64; 4])>,
    /// The grounding loss and the pointing accuracy, when it is trained.
    grounding: Option<(f64, f64)>,
}

/// Trains `model` (on an autodiff device); with `resume`, continues from `dir`'s checkpoint.
pub fn train(
    mut model: ClipPretraining,
    tokenizer: &TextTokenizer,
    preprocessor: &ImagePreprocessor,
    config: &ClipTrainConfig,
    dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<ClipPretraining> {
    // Its shape gives the grid; it draws its initial values first (see below).
    let position = &model.clip.vision_model.embeddings.position_embedding.weight;
    let patches = position.lazy_shape()[0] - 1;
    let grid = config.cells.unwrap_or_else(|| grid_side(patches));
    if config.attribute_weight > 0.0 && grid != 3 {
        return Err(Error::Config {
            path: dir.to_path_buf(),
            reason: format!(
                "the attribute loss reads one token per cell of the 3x3 layout, not a {grid}x{grid} \
                 grid: set cells = 3"
            ),
        });
    }
    let mut optim = config.optim.init();
    let mut state = TrainState::default();
    if resume && let Some((m, o, s)) = checkpoint::load(dir, model.clone(), optim.clone())? {
        (model, optim, state) = (m, o, s);
        eprintln!("resuming {} at step {}", dir.display(), state.step);
    }
    let progress = super::progress_bar(config.steps, state.step);
    let (mut grounding_value, mut pointing) = (f64::NAN, f64::NAN);
    let (mut attribute_value, mut attribute_accuracy) = (f64::NAN, [f64::NAN; 4]);
    // Step `step`'s loss and what it is made of.
    let loss_at = |model: &ClipPretraining, step: usize, device: &Device| -> Result<StepLosses> {
        let b = batch(step, config, tokenizer, preprocessor, grid, device)?;
        let n = config.batch_size;
        let mut tokens = model.clip.image_tokens(b.pixels);
        if let Some(cells) = config.cells {
            tokens = pool_cells(tokens, cells);
        }
        let [_, t, p] = tokens.dims();
        let texts = model.clip.text_features(b.ids, b.padding);
        let contrastive = info_nce(
            &model.clip,
            tokens.clone().narrow(1, 0, 1).reshape([n, p]),
            texts.clone().narrow(0, 0, n),
        );
        let mut out = StepLosses {
            contrastive: contrastive.clone().into_scalar::<f32>() as f64,
            loss: contrastive,
            attributes: None,
            grounding: None,
        };
        if let Some(probe) = &model.attributes {
            let logits = probe.logits(tokens.clone().narrow(1, 1, t - 1));
            let (attributes, accuracy) = attribute_loss(logits, &b.attributes);
            let value = attributes.clone().into_scalar::<f32>() as f64;
            out.attributes = Some((value, accuracy));
            out.loss = out.loss + attributes * config.attribute_weight;
        }
        if config.grounding_weight > 0.0 {
            let questions = texts.narrow(0, n, n);
            debug_assert_eq!(t, 1 + grid * grid);
            let pointing = pointing_accuracy(
                questions.clone().detach(),
                tokens.clone().detach(),
                b.target.clone(),
            );
            let grounding = grounding_loss(questions, tokens, b.target);
            out.grounding = Some((grounding.clone().into_scalar::<f32>() as f64, pointing));
            out.loss = out.loss + grounding * config.grounding_weight;
        }
        Ok(out)
    };
    if state.step == 0 && config.steps > 0 {
        model = super::draw_as_on_flex(model, device, |model, host| {
            drop(
                model
                    .clip
                    .vision_model
                    .embeddings
                    .position_embedding
                    .weight
                    .val(),
            );
            loss_at(model, 0, host).map(drop)
        })?;
    }
    while state.step < config.steps {
        let step = loss_at(&model, state.step, device)?;
        let (value, loss) = (step.contrastive, step.loss);
        if let Some((value, accuracy)) = step.attributes {
            (attribute_value, attribute_accuracy) = (value, accuracy);
        }
        if let Some((value, share)) = step.grounding {
            (grounding_value, pointing) = (value, share);
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = config.optim.lr(config.lr, state.step, config.steps);
        model = optim.step(lr, model, grads);
        // Keep the temperature in CLIP's range: exp(s) <= 100.
        model.clip.logit_scale = model
            .clip
            .logit_scale
            .map(|s| s.clamp_max(100f32.ln()).detach().require_grad());
        state.step += 1;
        progress.inc(1);
        let message = format!(
            "InfoNCE {value:.4}  grounding {grounding_value:.4}  pointing {pointing:.3}  \
             attributes {attribute_value:.4}  cells right {:.3} (shape {:.3} color {:.3} size {:.3})",
            attribute_accuracy[0],
            attribute_accuracy[1],
            attribute_accuracy[2],
            attribute_accuracy[3]
        );
        progress.set_message(message.clone());
        if state.step % config.checkpoint_every == 0 || state.step == config.steps {
            checkpoint::save(dir, &model, &optim, &state)?;
            progress.suspend(|| eprintln!("step {}: {message}", state.step));
        }
    }
    progress.finish();
    Ok(model)
}

/// The side of a square patch grid of `patches` patches.
fn grid_side(patches: usize) -> usize {
    let side = (patches as f64).sqrt().round() as usize;
    assert_eq!(side * side, patches, "a square patch grid");
    side
}

/// Pre-trains CLIP preset `preset` (`clip-tiny`, `clip-small`) on scenes and writes it to `out`
/// in Hugging Face layout (`config.json`, `model.safetensors`, `tokenizer.json`,
/// `preprocessor_config.json`), loadable by `Clip::load` and by `transformers`.
pub fn pretrain(
    preset: &str,
    image_size: usize,
    config: &ClipTrainConfig,
    out: &Path,
    resume: bool,
    device: &Device,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let word_level = scenes::word_level_tokenizer();
    let clip_config =
        ClipConfig::scenes_preset(preset, word_level.get_vocab_size(true), image_size).ok_or_else(
            || Error::Config {
                path: out.to_path_buf(),
                reason: format!("unknown CLIP preset '{preset}': expected clip-tiny or clip-small"),
            },
        )?;
    let tokenizer_path = out.join("tokenizer.json");
    let json = word_level
        .to_string(false)
        .expect("a word-level tokenizer serializes");
    write_atomic(&tokenizer_path, json.as_bytes())?;
    let preprocessor_json = ImagePreprocessor::clip_json(image_size as u32);
    write_atomic(
        &out.join("preprocessor_config.json"),
        preprocessor_json.as_bytes(),
    )?;
    let train_json =
        serde_json::to_string_pretty(&serde_json::json!({"preset": preset, "train": config}))
            .expect("JSON serializes");
    write_atomic(&out.join("train_config.json"), train_json.as_bytes())?;

    let tokenizer = TextTokenizer::from_file(
        &tokenizer_path,
        clip_config.text_config.max_position_embeddings,
        0,
    )?;
    let preprocessor = ImagePreprocessor::clip(image_size as u32);
    // Held for the whole pre-training: its parameters draw lazily, at their first use.
    let _initialising = super::seeded(device, config.seed);
    let model = ClipPretraining {
        clip: ClipModel::new(&clip_config, device),
        attributes: (config.attribute_weight > 0.0)
            .then(|| AttributeProbe::new(clip_config.projection_dim, device)),
    };
    let model = train(
        model,
        &tokenizer,
        &preprocessor,
        config,
        out,
        resume,
        device,
    )?;
    let model = model.valid();
    if let Some(probe) = &model.attributes {
        crate::error::save_module(probe, &out.join(PROBE_FILE))?;
    }
    model.clip.save_pretrained(&clip_config, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::scenes::scene::Cell;

    #[test]
    fn cell_targets_cover_the_cells_patches() {
        // 8x8 patches over a 3x3 grid: patch centres 0-2 | 3-4 | 5-7 in each direction.
        for (cell, patches) in [
            (0u8, vec![0, 1, 2, 8, 9, 10, 16, 17, 18]),
            (4, vec![27, 28, 35, 36]),
        ] {
            let target = cell_target(Cell(cell), 8);
            assert_eq!(target.len(), 65);
            assert_eq!(target[0], 0.0, "never the class token");
            let hot: Vec<usize> = (0..64).filter(|&k| target[1 + k] > 0.0).collect();
            assert_eq!(hot, patches, "cell {cell}");
        }
        for cell in Cell::ALL {
            let sum: f32 = cell_target(cell, 8).iter().sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn the_attribute_loss_scores_each_cell_against_its_object() {
        use crate::data::scenes::scene::{Color, Object, Scene, Shape, Size};
        let scene = Scene {
            objects: vec![Object {
                shape: Shape::Star,
                color: Color::Blue,
                size: Size::Large,
                cell: Cell(4),
            }],
        };
        let targets = cell_attributes(&scene);
        // Star is shape 4 of 6, blue color 3 of 8, large size 2 of 2 (0 is "no object").
        assert_eq!(targets[4], [4, 3, 2]);
        assert!(
            targets
                .iter()
                .enumerate()
                .all(|(c, t)| c == 4 || *t == [0, 0, 0])
        );
        let device = Device::flex();
        let width: usize = ATTRIBUTE_CLASSES.iter().sum();
        let logits_for = |targets: &[[usize; 3]]| {
            let mut v = vec![0f32; targets.len() * width];
            for (i, t) in targets.iter().enumerate() {
                let mut offset = 0;
                for (a, classes) in ATTRIBUTE_CLASSES.iter().enumerate() {
                    v[i * width + offset + t[a]] = 20.0;
                    offset += classes;
                }
            }
            Tensor::<3>::from_data(TensorData::new(v, [1, targets.len(), width]), &device)
        };
        let (loss, accuracy) = attribute_loss(logits_for(&targets), &targets);
        assert!(loss.into_scalar::<f32>() < 1e-6);
        assert_eq!(accuracy, [1.0; 4]);
        // Predicting "no object" everywhere: 8 of 9 cells right, the object's attributes wrong.
        let empty = [[0usize; 3]; 9];
        let (loss, accuracy) = attribute_loss(logits_for(&empty), &targets);
        assert!(loss.into_scalar::<f32>() > 1.0);
        assert!((accuracy[0] - 8.0 / 9.0).abs() < 1e-6);
        assert_eq!(&accuracy[1..], [0.0; 3]);
    }

    #[test]
    fn grounding_loss_is_the_cross_entropy_of_the_attention() {
        let device = Device::flex();
        let question = Tensor::<2>::from_floats([[1.0, 0.0]], &device);
        let tokens = Tensor::<3>::from_floats([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], &device);
        let target = Tensor::<2>::from_floats([[0.0, 1.0, 0.0]], &device);
        // Scores [0, 1, 0]: -log(e / (2 + e)) = log(2 + e) - 1.
        let loss = grounding_loss(question.clone(), tokens.clone(), target.clone());
        let loss = loss.into_scalar::<f32>();
        // The best token (1) is on the object.
        assert_eq!(pointing_accuracy(question, tokens, target), 1.0);
        let want = (2.0f32 + std::f32::consts::E).ln() - 1.0;
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
    }
}
