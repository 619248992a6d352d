//! A VLM with its tokenizer and preprocessing, as the editors use it: greedy answers,
//! teacher-forced predictions and losses for a prompt on an image (or on text alone).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::data::image::ImagePreprocessor;
use crate::data::text::TextTokenizer;
use crate::error::Result;
use crate::model::vlm::Vlm;

/// A query to the edited model: a prompt (templated) on an image, or on text alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub image: Option<PathBuf>,
    pub prompt: String,
}

/// A VLM with what it needs to read prompts and images and to write answers.
pub struct Speaker {
    pub model: Vlm,
    pub tokenizer: TextTokenizer,
    pub preprocessor: ImagePreprocessor,
    pub bos: u32,
    pub eos: u32,
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

impl Speaker {
    /// A VLM saved by `mmke train vlm` / `train counterfactual`, with its tokenizer and the
    /// CLIP preprocessing of its vision tower's input size.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (model, config, tokenizer) = crate::train::vlm::load(dir, device)?;
        Ok(Self {
            model,
            tokenizer,
            preprocessor: ImagePreprocessor::clip(config.vision.image_size as u32),
            bos: config.lm.bos_token_id,
            eos: config.lm.eos_token_id,
        })
    }

    fn pixels(&self, image: Option<&Path>, device: &Device) -> Result<Option<Tensor<4>>> {
        let Some(path) = image else {
            return Ok(None);
        };
        let image = self.preprocessor.load_image(path)?;
        let (h, w) = self.preprocessor.output_size(image.height(), image.width());
        Ok(Some(Tensor::<4>::from_data(
            TensorData::new(
                self.preprocessor.apply(&image),
                [1, 3, h as usize, w as usize],
            ),
            device,
        )))
    }

    /// The logits at the target positions of `answer` after `prompt` on `image` (teacher
    /// forced), `[answer tokens + 1, vocab]`, and the target ids (the answer, then the end).
    pub fn answer_logits(
        &self,
        image: Option<&Path>,
        prompt: &str,
        answer: &str,
        device: &Device,
    ) -> Result<(Tensor<2>, Vec<u32>)> {
        let mut ids: Vec<i64> = vec![self.bos as i64];
        ids.extend(self.tokenizer.encode(prompt, false)?);
        let start = ids.len();
        ids.extend(self.tokenizer.encode(answer, false)?);
        ids.push(self.eos as i64);
        let n = ids.len();
        let target: Vec<u32> = ids[start..].iter().map(|&t| t as u32).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device);
        let mask = Tensor::<2, Int>::ones([1, n], device);
        let logits = self
            .model
            .forward(
                self.pixels(image, device)?,
                input,
                mask,
                &Default::default(),
            )
            .logits;
        let vocab = logits.dims()[2];
        // Position t predicts token t + 1.
        let logits = logits
            .narrow(1, start - 1, target.len())
            .reshape([target.len(), vocab]);
        Ok((logits, target))
    }

    /// Teacher-forced cross-entropy of `answer` (mean over its tokens and the end token).
    pub fn loss(
        &self,
        image: Option<&Path>,
        prompt: &str,
        answer: &str,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let (logits, target) = self.answer_logits(image, prompt, answer, device)?;
        let n = target.len();
        let target: Vec<i64> = target.into_iter().map(i64::from).collect();
        let target = Tensor::<2, Int>::from_data(TensorData::new(target, [n, 1]), device);
        Ok(burn::tensor::activation::log_softmax(logits, 1)
            .gather(1, target)
            .mean()
            .neg())
    }

    /// Teacher-forced predictions for `answer` after `prompt` on `image`.
    pub fn predict(
        &self,
        image: Option<&Path>,
        prompt: &str,
        answer: &str,
        k: usize,
        device: &Device,
    ) -> Result<Prediction> {
        let (logits, target) = self.answer_logits(image, prompt, answer, device)?;
        let vocab = logits.dims()[1];
        let k = k.clamp(1, vocab);
        let (_, top) = logits.topk_with_indices(k, 1);
        let top: Vec<u32> = top
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("i64 ids")
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let top_k: Vec<Vec<u32>> = top.chunks(k).map(<[u32]>::to_vec).collect();
        Ok(Prediction {
            argmax: top_k.iter().map(|row| row[0]).collect(),
            target,
            top_k,
        })
    }

    /// Greedy answer to `prompt` on `image`, at most `max_new` tokens, decoded.
    pub fn answer(
        &self,
        image: Option<&Path>,
        prompt: &str,
        max_new: usize,
        device: &Device,
    ) -> Result<String> {
        let mut ids = vec![self.bos];
        ids.extend(
            self.tokenizer
                .encode(prompt, false)?
                .into_iter()
                .map(|id| id as u32),
        );
        let generated = self
            .model
            .generate(self.pixels(image, device)?, &ids, max_new, self.eos);
        let answer: Vec<u32> = generated
            .into_iter()
            .take_while(|&t| t != self.eos)
            .collect();
        self.tokenizer
            .inner()
            .decode(&answer, true)
            .map_err(|e| crate::Error::Tokenizer {
                path: PathBuf::from("tokenizer.json"),
                reason: format!("cannot decode {answer:?}: {e}"),
            })
    }
}
