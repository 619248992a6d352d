//! Real multimodal LLMs in Hugging Face layout: BLIP-2 (OPT, or LLaMA as in MiniGPT-4) and
//! LLaVA-1.5, loaded from a model directory (`config.json`, `model.safetensors` or its
//! shards, `tokenizer.json`, `preprocessor_config.json`) whatever transformers version wrote
//! it. [`Mllm`] is the loaded model with its tokenizer and image preprocessing: `forward`
//! takes the processor's inputs and gives the logits, `generate` answers a prompt greedily.

pub mod blip2;
pub mod counterfactual;
pub mod io;
pub mod llama;
pub mod llava;
pub mod text;
pub mod weights;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use image::imageops::FilterType;

use self::blip2::{Blip2Config, Blip2ForConditionalGeneration};
use self::llava::{LlavaConfig, LlavaForConditionalGeneration};
use self::text::{TextConfig, TextModel};
use self::weights::KeyMap;
use crate::data::image::{ImagePreprocessor, Resize};
use crate::error::{Error, Result};
use crate::model::lm::KvCache;

/// A `config.json`'s architecture, by its `model_type`.
#[derive(Clone, Debug, PartialEq)]
pub enum MllmConfig {
    /// `blip-2`.
    Blip2(Blip2Config),
    /// `llava`.
    Llava(LlavaConfig),
}

impl MllmConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json_error = |error| Error::Json {
            path: path.to_path_buf(),
            error,
        };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(json_error)?;
        let config = match json["model_type"].as_str() {
            Some("blip-2") => Self::Blip2(serde_json::from_value(json).map_err(json_error)?),
            Some("llava") => Self::Llava(serde_json::from_value(json).map_err(json_error)?),
            other => {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    reason: format!(
                        "model_type {other:?}: mmke loads \"blip-2\" and \"llava\" models"
                    ),
                });
            }
        };
        config.check().map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// `blip-2 (opt)`, `blip-2 (llama)`, `llava (llama)`.
    pub fn architecture(&self) -> String {
        let text = match self.text_config() {
            TextConfig::Opt(_) => "opt",
            TextConfig::Llama(_) => "llama",
        };
        match self {
            Self::Blip2(_) => format!("blip-2 ({text})"),
            Self::Llava(_) => format!("llava ({text})"),
        }
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        match self {
            Self::Blip2(c) => c.check(),
            Self::Llava(c) => c.check(),
        }
    }

    pub fn text_config(&self) -> &TextConfig {
        match self {
            Self::Blip2(c) => &c.text_config,
            Self::Llava(c) => &c.text_config,
        }
    }

    pub fn image_token(&self) -> u32 {
        match self {
            Self::Blip2(c) => c.image_token_index.expect("a checked config"),
            Self::Llava(c) => c.image_token_index,
        }
    }

    /// Image tokens per image: BLIP-2's query tokens, LLaVA's selected features.
    pub fn image_tokens(&self) -> usize {
        match self {
            Self::Blip2(c) => c.num_query_tokens,
            Self::Llava(c) => c.image_tokens(),
        }
    }

    pub fn image_size(&self) -> usize {
        match self {
            Self::Blip2(c) => c.vision_config.image_size,
            Self::Llava(c) => c.vision_config.image_size,
        }
    }
}

/// The network, by architecture (transparent in weight names).
#[derive(Module, Debug)]
pub enum MllmNet {
    Blip2(Blip2ForConditionalGeneration),
    Llava(LlavaForConditionalGeneration),
}

impl MllmNet {
    pub fn new(config: &MllmConfig, device: &Device) -> Self {
        match config {
            MllmConfig::Blip2(c) => Self::Blip2(Blip2ForConditionalGeneration::new(c, device)),
            MllmConfig::Llava(c) => Self::Llava(LlavaForConditionalGeneration::new(c, device)),
        }
    }

    pub fn language_model(&self) -> &TextModel {
        match self {
            Self::Blip2(m) => &m.language_model,
            Self::Llava(m) => &m.language_model,
        }
    }

    pub fn language_model_mut(&mut self) -> &mut TextModel {
        match self {
            Self::Blip2(m) => &mut m.language_model,
            Self::Llava(m) => &mut m.language_model,
        }
    }

    /// `[batch, image tokens, LM hidden]`: what replaces each image's tokens.
    pub fn image_embeddings(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        match self {
            Self::Blip2(m) => m.image_features(pixel_values).projected,
            Self::Llava(m) => m.image_features(pixel_values).projected,
        }
    }

    /// The forward pass editors use, with the scenes VLM's contract
    /// ([`crate::model::vlm::Vlm::forward`]): `ids` are the text alone (BOS first), the image
    /// (if any) goes where the architecture's processor puts it - BLIP-2's query tokens before
    /// BOS, LLaVA's features right after it - and `logits` cover the text positions only
    /// (`logits[:, t]` predicts text token `t + 1`). A mask value of 2 (the scenes VLM's
    /// bidirectional prefix) counts as 1: these LMs are causal throughout.
    pub fn forward_text(
        &self,
        pixels: Option<Tensor<4>>,
        ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        hooks: &crate::model::lm::Hooks,
    ) -> crate::model::lm::LmOutput {
        let lm = self.language_model();
        let seq = ids.dims()[1];
        let text = lm.embed_tokens(ids);
        let image = pixels.map(|p| self.image_embeddings(p.cast(lm.dtype())));
        let at = self.image_at().min(seq);
        forward_with_image(lm, text, attention_mask, image, at, hooks)
    }

    /// After how many text tokens the image goes in [`Self::forward_text`]: BLIP-2's before
    /// BOS, LLaVA's where its prompt template puts it (right after BOS without one).
    pub fn image_at(&self) -> usize {
        match self {
            Self::Blip2(_) => 0,
            Self::Llava(m) => m.image_at,
        }
    }

    /// The model with its image after `at` text tokens (a prompt template's placement,
    /// `LmBatcher::image_at`); BLIP-2's image always comes first.
    pub fn with_image_at(mut self, at: usize) -> Result<Self> {
        match &mut self {
            Self::Blip2(_) if at != 0 => Err(Error::Input(format!(
                "BLIP-2's image comes before BOS: it cannot follow {at} text tokens"
            ))),
            Self::Blip2(_) => Ok(self),
            Self::Llava(m) => {
                m.image_at = at;
                Ok(self)
            }
        }
    }

    /// Greedy decoding with [`Self::forward_text`]'s contract (the scenes VLM's `generate`):
    /// `prompt` is text ids (BOS first), the hooks apply at every step; up to `max_new`
    /// tokens, stopping after `eos`. (Without hooks, [`Mllm::generate`] is faster: it caches
    /// keys and values.)
    pub fn generate_text(
        &self,
        pixels: Option<Tensor<4>>,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        hooks: &crate::model::lm::Hooks,
    ) -> Vec<u32> {
        let device = self.language_model().embed_tokens_device();
        crate::model::editable::greedy_decode(prompt, 1, max_new, eos, &device, |ids, mask| {
            self.forward_text(pixels.clone(), ids, mask, hooks).logits
        })
    }

    /// How many text tokens fit the LM's positions next to an image (its image tokens take
    /// theirs), or alone.
    pub fn text_capacity(&self, with_image: bool) -> usize {
        let positions = self.language_model().max_positions();
        let image = if with_image { self.image_tokens() } else { 0 };
        positions.saturating_sub(image)
    }

    /// Image tokens per image (BLIP-2's queries, LLaVA's selected features).
    pub fn image_tokens(&self) -> usize {
        match self {
            Self::Blip2(m) => m.query_tokens.dims()[1],
            Self::Llava(m) => m.image_tokens(),
        }
    }
}

/// `lm`'s forward pass over text embeddings `[batch, seq, hidden]` with `image` embeddings
/// `[batch, n, hidden]` (if any) placed after the first `at` text tokens; the logits cover the
/// text positions only. A mask value of 2 (the scenes VLM's bidirectional prefix) counts as
/// 1: these LMs are causal throughout.
pub(crate) fn forward_with_image(
    lm: &TextModel,
    text: Tensor<3>,
    attention_mask: Tensor<2, Int>,
    image: Option<Tensor<3>>,
    at: usize,
    hooks: &crate::model::lm::Hooks,
) -> crate::model::lm::LmOutput {
    let attention_mask = attention_mask.clamp_max(1);
    let Some(image) = image else {
        return in_f32(lm.forward_hooked(text, attention_mask, hooks));
    };
    let [batch, seq, _] = text.dims();
    let n = image.dims()[1];
    let ones = Tensor::<2, Int>::ones([batch, n], &text.device());
    // `narrow` refuses empty ranges: a zero-length side is left out.
    fn around<const D: usize, K: burn::tensor::kind::Basic>(
        t: Tensor<D, K>,
        at: usize,
        middle: Tensor<D, K>,
    ) -> Tensor<D, K> {
        let len = t.dims()[1];
        let mut parts = Vec::new();
        if at > 0 {
            parts.push(t.clone().narrow(1, 0, at));
        }
        parts.push(middle);
        if at < len {
            parts.push(t.narrow(1, at, len - at));
        }
        Tensor::cat(parts, 1)
    }
    let embeds = around(text, at, image);
    let mask = around(attention_mask, at, ones);
    let mut out = lm.forward_hooked(embeds, mask, hooks);
    let logits = out.logits.clone();
    let mut parts = Vec::new();
    if at > 0 {
        parts.push(logits.clone().narrow(1, 0, at));
    }
    if at < seq {
        parts.push(logits.narrow(1, at + n, seq - at));
    }
    out.logits = Tensor::cat(parts, 1);
    in_f32(out)
}

/// The editors' view of a forward pass: every output in f32, whatever dtype the model
/// computes in (losses, gradients and edit memories are f32).
fn in_f32(out: crate::model::lm::LmOutput) -> crate::model::lm::LmOutput {
    let f32 = |t: Tensor<3>| t.cast(DType::F32);
    crate::model::lm::LmOutput {
        logits: f32(out.logits),
        hidden_states: out.hidden_states.into_iter().map(f32).collect(),
        ffn_inputs: out.ffn_inputs.into_iter().map(f32).collect(),
        last_hidden_state: f32(out.last_hidden_state),
        ..out
    }
}

/// The key renamings of each architecture: the hub's (4.x) layout is the module tree; 5.x's
/// fresh saves and 4.52+'s in-memory names are mapped onto it.
fn key_map(config: &MllmConfig) -> (Vec<(&'static str, &'static str)>, Box<dyn Fn(&str) -> bool>) {
    let common = vec![
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.vision_model\.", "vision_model."),
        (r"^model\.qformer\.", "qformer."),
        (r"^model\.query_tokens$", "query_tokens"),
        (r"^model\.language_projection\.", "language_projection."),
    ];
    match config {
        MllmConfig::Blip2(c) => {
            let tied = matches!(&c.text_config, TextConfig::Opt(_))
                || matches!(&c.text_config, TextConfig::Llama(l) if l.tie_word_embeddings);
            let text_path = !c.qformer_config.use_qformer_text_input;
            let unused = move |key: &str| {
                (tied && key == "language_model.lm_head.weight")
                    // The Q-Former's text path (unused when generating): its FFN and embeddings.
                    || (text_path
                        && key.starts_with("qformer.")
                        && (key.contains(".intermediate.")
                            || key.contains(".output.dense")
                                && !key.contains("attention.output")
                            || key.contains(".output.LayerNorm")
                                && !key.contains("attention.output")
                            || key.starts_with("qformer.embeddings.")))
            };
            (common, Box::new(unused))
        }
        MllmConfig::Llava(c) => {
            let tied = matches!(&c.text_config, TextConfig::Llama(l) if l.tie_word_embeddings)
                || matches!(&c.text_config, TextConfig::Opt(_));
            let mut renames = common;
            // 5.x saves the CLIP tower without its `vision_model` level.
            renames.push((
                r"^vision_tower\.(embeddings|encoder|pre_layrnorm|post_layernorm)\.",
                "vision_tower.vision_model.$1.",
            ));
            let unused = move |key: &str| tied && key == "language_model.lm_head.weight";
            (renames, Box::new(unused))
        }
    }
}

/// Whether `dir` holds a Hugging Face MLLM mmke loads (a `config.json` whose `model_type` is
/// `blip-2` or `llava`), as opposed to a scenes VLM (`vlm.json`).
pub fn is_model_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .is_ok_and(|json| matches!(json["model_type"].as_str(), Some("blip-2") | Some("llava")))
}

/// Refuses to hold weights in `dtype` on a device that cannot compute in it (wgpu's WGSL has
/// no bf16: its kernels would compute garbage), or in a dtype that is not a float.
pub fn check_dtype(dtype: DType, device: &Device) -> Result<()> {
    if !dtype.is_float() {
        return Err(Error::Input(format!("{dtype:?} is not a float dtype")));
    }
    if !device.supports_dtype(dtype) {
        return Err(Error::Input(format!(
            "{dtype:?} is not supported on {device:?} (its kernels cannot compute in it): \
             use f32, or a half precision the device supports"
        )));
    }
    Ok(())
}

/// A multimodal LLM loaded from a Hugging Face model directory.
#[derive(Debug)]
pub struct Mllm {
    pub config: MllmConfig,
    pub net: MllmNet,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub preprocessor: ImagePreprocessor,
    pub dir: PathBuf,
}

impl Mllm {
    /// Loads `dir` in f32: its config, every weight file, and, where present,
    /// `tokenizer.json` and `preprocessor_config.json` (else the architecture's default
    /// preprocessing).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_in(dir, device, DType::F32)
    }

    /// [`Self::load`] with the weights held, and the forward pass computed, in `dtype`
    /// (`BF16` or `F16` halve the memory of f32; a file already in that dtype is not
    /// converted).
    pub fn load_in(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_grouped(dir, device, dtype, weights::GROUP_BYTES)
    }

    /// [`Self::load_in`], reading the weight files in groups of about `group_bytes`.
    fn load_grouped(dir: &Path, device: &Device, dtype: DType, group_bytes: u64) -> Result<Self> {
        check_dtype(dtype, device)?;
        let config = MllmConfig::from_file(&dir.join("config.json"))?;
        let (renames, unused) = key_map(&config);
        let net = weights::load_dir(
            MllmNet::new(&config, device),
            dir,
            &KeyMap {
                renames: &renames,
                unused: &*unused,
            },
            dtype,
            group_bytes,
        )?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.is_file() {
            Some(
                tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| Error::Config {
                    path: tokenizer_path.clone(),
                    reason: format!("cannot read the tokenizer: {e}"),
                })?,
            )
        } else {
            None
        };
        let size = config.image_size() as u32;
        let preprocessor_path = dir.join("preprocessor_config.json");
        let preprocessor = if preprocessor_path.is_file() {
            ImagePreprocessor::from_file(&preprocessor_path, size)?
        } else {
            default_preprocessor(&config)
        };
        Ok(Self {
            config,
            net,
            tokenizer,
            preprocessor,
            dir: dir.to_path_buf(),
        })
    }

    /// The dtype the weights are held and computed in.
    pub fn dtype(&self) -> DType {
        self.net.language_model().dtype()
    }

    /// Logits `[batch, seq, vocab]` for the processor's inputs: `pixel_values`
    /// `[batch, 3, H, W]`, `input_ids` `[batch, seq]` holding each image's tokens where its
    /// processor put them, `attention_mask` `[batch, seq]`.
    pub fn forward(
        &self,
        pixel_values: Tensor<4>,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        let embeds = self.input_embeddings(pixel_values, input_ids)?;
        Ok(self
            .net
            .language_model()
            .forward_embeds(embeds, attention_mask))
    }

    /// The LM's input embeddings: token embeddings with each image's features in place of
    /// its image tokens.
    pub fn input_embeddings(
        &self,
        pixel_values: Tensor<4>,
        input_ids: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        let [batch, seq] = input_ids.dims();
        let images = pixel_values.dims()[0];
        if images != batch {
            return Err(Error::Input(format!(
                "{images} images for {batch} prompts: mmke places one image per prompt"
            )));
        }
        let ids: Vec<i64> = input_ids
            .clone()
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| Error::Input(format!("input_ids: {e:?}")))?;
        let tokens = self.net.language_model().embed_tokens(input_ids);
        let features = self.net.image_embeddings(pixel_values.cast(self.dtype()));
        merge_image_features(
            tokens,
            features,
            &ids,
            seq,
            self.config.image_token() as i64,
        )
    }

    /// The ids the model's processor builds for one image and `prompt`: BLIP-2 puts its
    /// query tokens before the tokenized prompt (BOS first); LLaVA expands `<image>` in the
    /// prompt to one token per feature, then tokenizes (BOS first).
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| Error::Config {
            path: self.dir.join("tokenizer.json"),
            reason: "no tokenizer.json in the model directory".into(),
        })?;
        let encode = |text: &str| -> Result<Vec<u32>> {
            Ok(tokenizer
                .encode(text, true)
                .map_err(|e| Error::Input(format!("cannot tokenize {text:?}: {e}")))?
                .get_ids()
                .to_vec())
        };
        let n = self.config.image_tokens();
        let image = self.config.image_token();
        match &self.config {
            MllmConfig::Blip2(_) => {
                let mut ids = vec![image; n];
                ids.extend(encode(prompt)?);
                Ok(ids)
            }
            MllmConfig::Llava(_) => {
                let marker = tokenizer.id_to_token(image).ok_or_else(|| {
                    Error::Input(format!("the tokenizer has no image token (id {image})"))
                })?;
                if prompt.matches(marker.as_str()).count() != 1 {
                    return Err(Error::Input(format!(
                        "a LLaVA prompt holds the image as one {marker:?}, e.g. \
                         \"USER: {marker}\\nWhat is shown? ASSISTANT:\"; got {prompt:?}"
                    )));
                }
                // As the processor: the marker repeated with nothing between (a space would
                // become tokens of its own in a SentencePiece vocabulary).
                let expanded = marker.repeat(n);
                let ids = encode(&prompt.replace(marker.as_str(), &expanded))?;
                let found = ids.iter().filter(|&&i| i == image).count();
                if found != n {
                    return Err(Error::Input(format!(
                        "the prompt tokenizes to {found} image tokens, the model needs {n}"
                    )));
                }
                Ok(ids)
            }
        }
    }

    /// Greedy decoding of up to `max_new_tokens` after `ids`, for one image
    /// (`[1, 3, H, W]`); stops at the LM's end-of-sequence token. The prompt runs once; each
    /// new token attends to the cached keys and values of the ones before it.
    pub fn generate(
        &self,
        pixel_values: Tensor<4>,
        ids: &[u32],
        max_new_tokens: usize,
    ) -> Result<Vec<u32>> {
        let device = pixel_values.device();
        let lm = self.net.language_model();
        let eos = self.config.text_config().eos_token_id();
        let prompt: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let seq = prompt.len();
        let input = Tensor::<2, Int>::from_data(TensorData::new(prompt.clone(), [1, seq]), &device);
        let embeds = self.input_embeddings(pixel_values, input)?;
        let mut cache = KvCache::new(lm.num_layers());
        let mut logits = lm.forward_cached(embeds, &mut cache);
        let mut answer = Vec::new();
        for _ in 0..max_new_tokens {
            let [_, n, vocab] = logits.dims();
            let last = logits.narrow(1, n - 1, 1).reshape([vocab]);
            let next = last.argmax(0).into_scalar::<i64>() as u32;
            answer.push(next);
            if Some(next) == eos || answer.len() == max_new_tokens {
                break;
            }
            let token =
                Tensor::<2, Int>::from_data(TensorData::new(vec![next as i64], [1, 1]), &device);
            logits = lm.forward_cached(lm.embed_tokens(token), &mut cache);
        }
        Ok(answer)
    }

    /// Decodes generated ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| Error::Config {
            path: self.dir.join("tokenizer.json"),
            reason: "no tokenizer.json in the model directory".into(),
        })?;
        tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Input(format!("cannot decode {ids:?}: {e}")))
    }
}

/// The processor's defaults when a directory has no `preprocessor_config.json`: BLIP's
/// straight resize, CLIP's shortest-side resize and center crop for LLaVA.
fn default_preprocessor(config: &MllmConfig) -> ImagePreprocessor {
    let size = config.image_size() as u32;
    match config {
        MllmConfig::Blip2(_) => ImagePreprocessor {
            resize: Some(Resize::Exact(size, size)),
            filter: FilterType::CatmullRom,
            crop: None,
            ..ImagePreprocessor::clip(size)
        },
        MllmConfig::Llava(_) => ImagePreprocessor::clip(size),
    }
}

/// `tokens` (`[batch, seq, d]`) with row b's image tokens (`ids` flat, `[batch, seq]`)
/// replaced in order by `features[b]` (`[batch, n, d]`); each row must hold exactly `n`.
pub fn merge_image_features(
    tokens: Tensor<3>,
    features: Tensor<3>,
    ids: &[i64],
    seq: usize,
    image_token: i64,
) -> Result<Tensor<3>> {
    let [batch, _, d] = tokens.dims();
    let n = features.dims()[1];
    let mut index = Vec::with_capacity(batch * seq);
    for (b, row) in ids.chunks(seq).enumerate() {
        let mut k = 0;
        for (t, &id) in row.iter().enumerate() {
            if id == image_token {
                if k < n {
                    index.push((batch * seq + b * n + k) as i64);
                }
                k += 1;
            } else {
                index.push((b * seq + t) as i64);
            }
        }
        if k != n {
            return Err(Error::Input(format!(
                "prompt {b} holds {k} image tokens (id {image_token}); the image gives {n} \
                 features"
            )));
        }
    }
    let device = tokens.device();
    let all = Tensor::cat(
        vec![
            tokens.reshape([batch * seq, d]),
            features.reshape([batch * n, d]),
        ],
        0,
    );
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [batch * seq]), &device);
    Ok(all.select(0, index).reshape([batch, seq, d]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loading in many small groups (one per layer) gives the same model as in one.
    #[test]
    fn grouped_loading_gives_the_same_weights() {
        let device = Device::default();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mllm/llava/hub");
        let whole = Mllm::load_grouped(&dir, &device, DType::F32, u64::MAX).unwrap();
        let parts = Mllm::load_grouped(&dir, &device, DType::F32, 1).unwrap();
        let flat = |m: &Mllm| -> Vec<f32> {
            let ids =
                Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9], [1, 3]), &device);
            let embeds = m.net.language_model().embed_tokens(ids);
            let mask = Tensor::<2, Int>::ones([1, 3], &device);
            let logits = m.net.language_model().forward_embeds(embeds, mask);
            let pixels = Tensor::<4>::ones([1, 3, 16, 16], &device);
            let image = m.net.image_embeddings(pixels);
            let mut v: Vec<f32> = logits.into_data().try_to_vec().unwrap();
            v.extend(image.into_data().try_to_vec::<f32>().unwrap());
            v
        };
        assert_eq!(flat(&whole), flat(&parts));
    }
}

impl crate::model::editable::EditableModel for MllmNet {
    fn forward(
        &self,
        pixels: Option<Tensor<4>>,
        ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
        hooks: &crate::model::lm::Hooks,
    ) -> crate::model::lm::LmOutput {
        self.forward_text(pixels, ids, attention_mask, hooks)
    }

    fn generate(
        &self,
        pixels: Option<Tensor<4>>,
        prompt: &[u32],
        max_new: usize,
        eos: u32,
        hooks: &crate::model::lm::Hooks,
    ) -> Vec<u32> {
        self.generate_text(pixels, prompt, max_new, eos, hooks)
    }

    fn text_capacity(&self, with_image: bool) -> usize {
        MllmNet::text_capacity(self, with_image)
    }

    fn sequence_position(&self, t: usize, with_image: bool) -> usize {
        let n = if with_image { self.image_tokens() } else { 0 };
        if t < self.image_at() { t } else { n + t }
    }

    fn num_layers(&self) -> usize {
        self.language_model().num_layers()
    }

    fn hidden_size(&self) -> usize {
        self.language_model().hidden_size()
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.language_model().embed_tokens(ids).cast(DType::F32)
    }

    fn ffn_weights(&self, layer: usize) -> Vec<Tensor<2>> {
        let weights = self.language_model().ffn_weights(layer);
        weights.into_iter().map(|w| w.cast(DType::F32)).collect()
    }

    fn add_to_ffn_weights(&mut self, layer: usize, deltas: Vec<Tensor<2>>) {
        self.language_model_mut().add_to_ffn_weights(layer, deltas);
    }

    fn extra_neurons(&self, layer: usize) -> &[crate::model::lm::ExtraNeurons] {
        self.language_model().extra_neurons(layer)
    }

    fn extra_neurons_mut(&mut self, layer: usize) -> &mut Vec<crate::model::lm::ExtraNeurons> {
        self.language_model_mut().extra_neurons_mut(layer)
    }

    fn memory_attention(&self, layer: usize) -> &dyn crate::model::lm::MemoryAttention {
        self.language_model().memory_attention(layer)
    }

    fn train_only_lm_layers(self, layers: &[usize]) -> Self {
        match self.no_grad() {
            Self::Blip2(mut m) => {
                m.language_model = m.language_model.train_only_layers(layers);
                Self::Blip2(m)
            }
            Self::Llava(mut m) => {
                m.language_model = m.language_model.train_only_layers(layers);
                Self::Llava(m)
            }
        }
    }

    /// BLIP-2: `language_projection` and the last vision layer; LLaVA: the projector and the
    /// last CLIP layer its features read.
    fn train_only_visual(self) -> Self {
        match self.no_grad() {
            Self::Blip2(mut m) => {
                m.language_projection = m.language_projection.set_require_grad(true);
                let layers = &mut m.vision_model.encoder.layers;
                if let Some(last) = layers.pop() {
                    layers.push(last.set_require_grad(true));
                }
                Self::Blip2(m)
            }
            Self::Llava(mut m) => {
                m.multi_modal_projector = m.multi_modal_projector.set_require_grad(true);
                // The last layer the features read (LLaVA-1.5 reads the penultimate one).
                if let Some(last) = m.last_feature_layer() {
                    let layers = std::mem::take(&mut m.vision_tower.vision_model.encoder.layers);
                    m.vision_tower.vision_model.encoder.layers = layers
                        .into_iter()
                        .enumerate()
                        .map(|(i, l)| {
                            if i == last {
                                l.set_require_grad(true)
                            } else {
                                l
                            }
                        })
                        .collect();
                }
                Self::Llava(m)
            }
        }
    }
}
