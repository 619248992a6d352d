//! Pre-training a small CLIP from scratch on the scenes generator's image-caption pairs with
//! the symmetric InfoNCE loss, so that scope classifiers start from a pre-trained CLIP as in
//! the paper. Every step draws fresh scenes (step `s` from its own stream), so the model never
//! sees the same pair twice and a resumed run sees exactly the data an uninterrupted one would.

use std::path::Path;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, TrainState};
use crate::data::image::ImagePreprocessor;
use crate::data::scenes;
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result, write_atomic};
use crate::model::clip::ClipConfig;
use crate::model::clip::{ClipModel, l2_normalize};

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

/// One batch of fresh scenes and their captions, as tensors.
fn batch(
    step: usize,
    config: &ClipTrainConfig,
    tokenizer: &TextTokenizer,
    preprocessor: &ImagePreprocessor,
    device: &Device,
) -> Result<(Tensor<4>, Tensor<2, Int>, Tensor<2, burn::tensor::Bool>)> {
    let mut pixels = Vec::new();
    let mut captions = Vec::new();
    for i in 0..config.batch_size {
        let (image, caption) = scenes::captioned_scene(
            config.seed,
            (step * config.batch_size + i) as u64,
            config.scene_size,
        );
        pixels.extend(preprocessor.apply(&image::DynamicImage::ImageRgb8(image)));
        captions.push(caption);
    }
    let (h, w) = preprocessor.output_size(config.scene_size, config.scene_size);
    let shape = [config.batch_size, 3, h as usize, w as usize];
    let pixels = Tensor::from_data(TensorData::new(pixels, shape), device);
    let (ids, padding) = tokenizer.encode_batch(&captions)?.to_tensors(device);
    Ok((pixels, ids, padding))
}

/// Trains `model` (on an autodiff device); with `resume`, continues from `dir`'s checkpoint.
pub fn train(
    mut model: ClipModel,
    tokenizer: &TextTokenizer,
    preprocessor: &ImagePreprocessor,
    config: &ClipTrainConfig,
    dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<ClipModel> {
    let mut optim = AdamConfig::new().init();
    let mut state = TrainState::default();
    if resume && let Some((m, o, s)) = checkpoint::load(dir, model.clone(), optim.clone())? {
        (model, optim, state) = (m, o, s);
        eprintln!("resuming {} at step {}", dir.display(), state.step);
    }
    let progress = super::progress_bar(config.steps, state.step);
    while state.step < config.steps {
        let (pixels, ids, padding) = batch(state.step, config, tokenizer, preprocessor, device)?;
        let loss = info_nce(
            &model,
            model.image_features(pixels),
            model.text_features(ids, padding),
        );
        let value = loss.clone().into_scalar::<f32>() as f64;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(config.lr, model, grads);
        // Keep the temperature in CLIP's range: exp(s) <= 100.
        model.logit_scale = model
            .logit_scale
            .map(|s| s.clamp_max(100f32.ln()).detach().require_grad());
        state.step += 1;
        progress.inc(1);
        progress.set_message(format!("InfoNCE {value:.4}"));
        if state.step % config.checkpoint_every == 0 || state.step == config.steps {
            checkpoint::save(dir, &model, &optim, &state)?;
            progress.suspend(|| eprintln!("step {}: InfoNCE {value:.4}", state.step));
        }
    }
    progress.finish();
    Ok(model)
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
    device.seed(config.seed);
    let model = ClipModel::new(&clip_config, device);
    let model = train(
        model,
        &tokenizer,
        &preprocessor,
        config,
        out,
        resume,
        device,
    )?;
    model.valid().save_pretrained(&clip_config, out)
}
