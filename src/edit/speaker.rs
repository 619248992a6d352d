//! A VLM with its tokenizer and preprocessing, as the editors use it: greedy answers,
//! teacher-forced predictions and losses for a prompt on an image (or on text alone). Inputs
//! are laid out exactly as in training (`train::vlm::LmBatcher`).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor};

use crate::data::image::ImagePreprocessor;
use crate::data::lm::{LmBatch, LmBatcher, LmExample};
use crate::data::template::PromptTemplate;
use crate::error::Result;
use crate::model::answer::answer_loss_with;
use crate::model::editable::EditableModel;
use crate::model::lm::Hooks;
use crate::model::vlm::Vlm;

/// The edited model's directory (a scenes VLM, or a Hugging Face MLLM) and the dtype a
/// Hugging Face MLLM's weights are held and computed in (a scenes VLM is f32). Whatever the
/// model's dtype, editors see f32: logits, hidden states and gradients come out in f32, and
/// what an editor adds (patch neurons, weight changes, UniKE's memory) is cast where it is
/// used.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDir {
    pub path: PathBuf,
    pub dtype: burn::tensor::DType,
}

impl ModelDir {
    /// `path` held in f32.
    pub fn f32(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            dtype: burn::tensor::DType::F32,
        }
    }

    /// `path` held in `dtype` (a float dtype).
    pub fn new(path: impl Into<PathBuf>, dtype: burn::tensor::DType) -> Self {
        Self {
            path: path.into(),
            dtype,
        }
    }

    /// Whether this is a Hugging Face MLLM (BLIP-2, LLaVA) rather than a scenes VLM.
    pub fn is_mllm(&self) -> bool {
        crate::model::mllm::is_model_dir(&self.path)
    }
}

/// A query to the edited model: a prompt (templated) on an image, or on text alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub image: Option<PathBuf>,
    pub prompt: String,
}

/// One query's teacher-forced predictions on its answer tokens (and the end token).
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The target ids: the answer's tokens then the end token.
    pub target: Vec<u32>,
    /// The argmax id at each target position.
    pub argmax: Vec<u32>,
    /// The top-k ids at each target position, best first.
    pub top_k: Vec<Vec<u32>>,
}

/// The edited model (the scenes [`Vlm`] or a real MLLM, [`crate::model::mllm::MllmNet`])
/// with its tokenizer and preprocessing. A clone shares the weights until one side changes
/// them.
#[derive(Clone)]
pub struct Speaker<M = Vlm> {
    pub model: M,
    pub batcher: LmBatcher,
    /// Applied in every forward pass (UniKE's latent in-context editing).
    pub hooks: Hooks,
}

impl Speaker<Vlm> {
    /// A VLM saved by `mmke train vlm` / `train counterfactual`, with its tokenizer and the
    /// CLIP preprocessing of its vision tower's input size.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (model, config, tokenizer) = crate::model::vlm::load(dir, device)?;
        let preprocessor = ImagePreprocessor::clip(config.vision.image_size as u32);
        Ok(Self {
            model,
            batcher: LmBatcher::new(
                tokenizer,
                preprocessor,
                config.lm.bos_token_id,
                config.lm.eos_token_id,
            )
            .with_prefix_lm(config.prefix_lm),
            hooks: Hooks::default(),
        })
    }
}

impl Speaker<crate::model::mllm::MllmNet> {
    /// The most tokens of a text on a real MLLM's tokenizer, as editors and training read it.
    pub const MAX_TOKENS: usize = 256;

    /// The Hugging Face MLLM `model` as editors use it ([`Self::from_mllm`], at most
    /// [`Self::MAX_TOKENS`] tokens a text).
    pub fn load_mllm(model: &ModelDir, device: &Device) -> Result<Self> {
        let mllm = crate::model::mllm::Mllm::load_in(&model.path, device, model.dtype)?;
        Self::from_mllm(mllm, Self::MAX_TOKENS)
    }

    /// A real MLLM ([`crate::model::mllm::Mllm`]) as editors use it: its tokenizer (at most
    /// `max_len` tokens a text), preprocessing and BOS/EOS; the image goes where the model's
    /// processor puts it.
    pub fn from_mllm(mllm: crate::model::mllm::Mllm, max_len: usize) -> Result<Self> {
        let path = mllm.dir.join("tokenizer.json");
        let text = mllm.config.text_config();
        let (bos, eos) = match text {
            crate::model::mllm::text::TextConfig::Opt(c) => (c.bos_token_id, c.eos_token_id),
            crate::model::mllm::text::TextConfig::Llama(c) => (
                c.bos_token_id.unwrap_or(1),
                text.eos_token_id().unwrap_or(2),
            ),
        };
        let pad = text.pad_token_id().unwrap_or(0);
        let tokenizer = crate::data::text::TextTokenizer::from_file(&path, max_len, pad)?;
        let mut batcher = LmBatcher::new(tokenizer, mllm.preprocessor, bos, eos);
        let mut model = mllm.net;
        if let crate::model::mllm::MllmConfig::Llava(_) = mllm.config {
            let template = PromptTemplate::for_model(&mllm.dir, PromptTemplate::llava_1_5())?;
            let image = mllm.config.image_token();
            let marker = batcher
                .tokenizer()
                .inner()
                .id_to_token(image)
                .map(|text| (text, image));
            batcher = batcher.with_template(template, marker)?;
            model = model.with_image_at(batcher.image_at().expect("a template"))?;
        }
        Ok(Self {
            model,
            batcher,
            hooks: Hooks::default(),
        })
    }
}

impl Speaker<crate::model::mllm::counterfactual::CounterfactualMllm> {
    /// SERAC's counterfactual model beside the real MLLM of `base`: the causal LM in `lm_dir`
    /// (with its `tokenizer.json`, else the base model's), or a copy of the base model's own
    /// LM, reading the base model's visual tokens through a new projection
    /// ([`crate::model::mllm::counterfactual::CounterfactualMllm`]).
    pub fn counterfactual(
        base: &Speaker<crate::model::mllm::MllmNet>,
        lm_dir: Option<&Path>,
        device: &Device,
    ) -> Result<Self> {
        use crate::model::mllm::counterfactual::CounterfactualMllm;
        use crate::model::mllm::text::{TextConfig, TextModel};
        let Some(dir) = lm_dir else {
            return Ok(Self {
                model: CounterfactualMllm::from_base(&base.model, device),
                batcher: base.batcher.clone(),
                hooks: Hooks::default(),
            });
        };
        let dtype = base.model.language_model().dtype();
        let lm = TextModel::load(dir, device, dtype)?;
        let config: TextConfig =
            crate::error::read_json_config(&dir.join("config.json"), |_: &TextConfig| Ok(()))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let batcher = if tokenizer_path.is_file() {
            let (bos, eos) = match &config {
                TextConfig::Opt(c) => (c.bos_token_id, c.eos_token_id),
                TextConfig::Llama(c) => (
                    c.bos_token_id.unwrap_or(1),
                    config.eos_token_id().unwrap_or(2),
                ),
            };
            let max_len = base.batcher.tokenizer().max_len();
            let pad = config.pad_token_id().unwrap_or(0);
            let tokenizer =
                crate::data::text::TextTokenizer::from_file(&tokenizer_path, max_len, pad)?;
            let batcher = LmBatcher::new(tokenizer, base.batcher.preprocessor().clone(), bos, eos);
            // The base model's template, its sides tokenized apart (this vocabulary has no
            // image marker).
            match base.batcher.template() {
                Some(template) => batcher.with_template(template.clone(), None)?,
                None => batcher,
            }
        } else {
            base.batcher.clone()
        };
        let mut model = CounterfactualMllm::new(&base.model, lm, device);
        if let Some(at) = batcher.image_at() {
            model.image_at = at;
        }
        Ok(Self {
            model,
            batcher,
            hooks: Hooks::default(),
        })
    }
}

impl<M: EditableModel> Speaker<M> {
    /// How many text tokens (BOS, prompt, answer and EOS) fit next to an image, or alone.
    pub fn text_capacity(&self, with_image: bool) -> usize {
        self.model.text_capacity(with_image)
    }

    /// `context + prompt`, the context shortened from the left (whole words) so that the
    /// prompt and `answer` still fit the model's positions: in-context methods lose their
    /// oldest demonstrations rather than the query.
    pub fn fit_context(
        &self,
        context: &str,
        prompt: &str,
        answer: &str,
        with_image: bool,
    ) -> Result<String> {
        let answer_tokens = self.batcher.tokenizer().encode(answer, false)?.len();
        self.fit_context_reserving(context, prompt, answer_tokens, with_image)
    }

    /// [`Speaker::fit_context`] leaving room for `reserved` answer tokens (generation).
    pub fn fit_context_reserving(
        &self,
        context: &str,
        prompt: &str,
        reserved: usize,
        with_image: bool,
    ) -> Result<String> {
        let capacity = self.text_capacity(with_image);
        let count = |text: &str| -> Result<usize> {
            Ok(self.batcher.tokenizer().encode(text, false)?.len())
        };
        // BOS, the prompt in the model's template, the answer and EOS.
        let fixed = self.batcher.prompt_ids(prompt, with_image)?.len() + reserved + 1;
        let mut words: Vec<&str> = context.split(' ').collect();
        while !words.is_empty() && fixed + count(&words.join(" "))? > capacity {
            words.remove(0);
        }
        Ok(format!("{}{prompt}", words.join(" ")))
    }

    /// One example as a batch, refused when it does not fit the model's positions.
    pub fn batch(
        &mut self,
        image: Option<&Path>,
        prompt: &str,
        answer: &str,
        device: &Device,
    ) -> Result<LmBatch> {
        let example = LmExample {
            image: image.map(Path::to_path_buf),
            prompt: prompt.to_string(),
            answer: answer.to_string(),
            grounding: None,
        };
        let batch = self.batcher.batch(&[&example], device)?;
        let capacity = self.text_capacity(image.is_some());
        let length = batch.ids.dims()[1];
        if length > capacity {
            return Err(crate::Error::Config {
                path: image.map(Path::to_path_buf).unwrap_or_default(),
                reason: format!(
                    "prompt and answer take {length} tokens; the model reads at most {capacity} \
                     here ('{prompt}')"
                ),
            });
        }
        Ok(batch)
    }

    /// Teacher-forced cross-entropy of `answer` (mean over its tokens and the end token).
    pub fn loss(
        &mut self,
        image: Option<&Path>,
        prompt: &str,
        answer: &str,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let batch = self.batch(image, prompt, answer, device)?;
        Ok(answer_loss_with(&self.model, &batch, &self.hooks).0)
    }

    /// [`Speaker::predict`] for a [`Query`].
    pub fn predict_query(
        &mut self,
        query: &Query,
        answer: &str,
        k: usize,
        device: &Device,
    ) -> Result<Prediction> {
        self.predict(query.image.as_deref(), &query.prompt, answer, k, device)
    }

    /// Teacher-forced predictions for `answer` after `prompt` on `image`.
    pub fn predict(
        &mut self,
        image: Option<&Path>,
        prompt: &str,
        answer: &str,
        k: usize,
        device: &Device,
    ) -> Result<Prediction> {
        let batch = self.batch(image, prompt, answer, device)?;
        let scored = batch.spans[0].clone();
        let logits = self
            .model
            .forward(batch.pixels, batch.ids, batch.mask, &self.hooks)
            .logits;
        let vocab = logits.dims()[2];
        let n = scored.len();
        let logits = logits.narrow(1, scored.start, n).reshape([n, vocab]);
        let ids = |t: Tensor<2, Int>| -> Vec<u32> {
            let values: Vec<i64> = t.into_data().convert::<i64>().try_into_vec().expect("ids");
            values.into_iter().map(|v| v as u32).collect()
        };
        let target = ids(batch.targets.narrow(1, scored.start, n));
        let k = k.clamp(1, vocab);
        let top = ids(logits.topk_with_indices(k, 1).1);
        let top_k: Vec<Vec<u32>> = top.chunks(k).map(<[u32]>::to_vec).collect();
        Ok(Prediction {
            argmax: top_k.iter().map(|row| row[0]).collect(),
            target,
            top_k,
        })
    }

    /// Greedy answer to `query`, at most `max_new` tokens, decoded.
    pub fn answer_query(
        &mut self,
        query: &Query,
        max_new: usize,
        device: &Device,
    ) -> Result<String> {
        self.answer(query.image.as_deref(), &query.prompt, max_new, device)
    }

    /// Greedy answer to `prompt` on `image`, at most `max_new` tokens, decoded.
    pub fn answer(
        &mut self,
        image: Option<&Path>,
        prompt: &str,
        max_new: usize,
        device: &Device,
    ) -> Result<String> {
        let eos = self.batcher.eos();
        let ids: Vec<u32> = self
            .batcher
            .prompt_ids(prompt, image.is_some())?
            .into_iter()
            .map(|id| id as u32)
            .collect();
        let pixels = image
            .map(|path| self.batcher.pixels(&[path], device))
            .transpose()?;
        let generated = self.model.generate(pixels, &ids, max_new, eos, &self.hooks);
        let answer: Vec<u32> = generated.into_iter().take_while(|&t| t != eos).collect();
        self.batcher.tokenizer().decode(&answer)
    }
}
