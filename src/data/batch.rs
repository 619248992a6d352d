//! Burn datasets and batchers: image-question-answer items become CLIP-preprocessed image
//! tensors and padded token tensors. Loading and tokenizing happen in `Dataset::get` (which
//! can fail with a clear error); batching only stacks and pads.

use std::path::PathBuf;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::image::ImagePreprocessor;
use super::record::EditRecord;
use super::text::{TextTokenizer, TokenBatch};

/// One side of a pair, batched: token ids, and optionally images.
#[derive(Clone, Debug)]
pub struct ScopeInput {
    pub ids: Tensor<2, Int>,
    pub padding: Tensor<2, Bool>,
    /// `[batch, 3, h, w]` and `[batch, 1]` (1 where the row really has an image; rows without
    /// one hold zeros and are encoded as text-only).
    pub images: Option<(Tensor<4>, Tensor<2>)>,
    /// `[batch, seq]`, 1 on the tokens an object readout reads (the edit's question, not its
    /// target); `None`: every token that is not padding.
    pub focus: Option<Tensor<2>>,
}

/// A question on an image with the answer expected from the model.
#[derive(Clone, Debug, PartialEq)]
pub struct VqaItem {
    pub image: PathBuf,
    pub prompt: String,
    pub answer: String,
}

impl VqaItem {
    /// The edit itself: the edit prompt on the edit image, answered with the new target.
    pub fn edit(record: &EditRecord) -> Self {
        Self {
            image: record.image.clone(),
            prompt: record.prompt.clone(),
            answer: record.target.clone(),
        }
    }
}

/// An item loaded and tokenized.
#[derive(Clone, Debug)]
pub struct EncodedVqa {
    /// CHW floats, CLIP-normalized.
    pub pixels: Vec<f32>,
    pub height: usize,
    pub width: usize,
    /// Prompt ids with the tokenizer's special tokens.
    pub prompt: Vec<i64>,
    /// Answer ids without special tokens.
    pub answer: Vec<i64>,
}

pub struct VqaDataset {
    items: Vec<VqaItem>,
    preprocessor: ImagePreprocessor,
    tokenizer: Arc<TextTokenizer>,
}

impl VqaDataset {
    pub fn new(
        items: Vec<VqaItem>,
        preprocessor: ImagePreprocessor,
        tokenizer: Arc<TextTokenizer>,
    ) -> Self {
        Self {
            items,
            preprocessor,
            tokenizer,
        }
    }
}

impl Dataset<EncodedVqa> for VqaDataset {
    fn get(&self, index: usize) -> Result<EncodedVqa, DatasetError> {
        let item = &self.items[index];
        let image = self
            .preprocessor
            .load_image(&item.image)
            .map_err(DatasetError::new)?;
        let (height, width) = self.preprocessor.output_size(image.height(), image.width());
        Ok(EncodedVqa {
            pixels: self.preprocessor.apply(&image),
            height: height as usize,
            width: width as usize,
            prompt: self
                .tokenizer
                .encode(&item.prompt, true)
                .map_err(DatasetError::new)?,
            answer: self
                .tokenizer
                .encode(&item.answer, false)
                .map_err(DatasetError::new)?,
        })
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

#[derive(Clone, Debug)]
pub struct VqaBatch {
    /// `[batch, 3, height, width]`.
    pub pixels: Tensor<4>,
    /// `[batch, prompt_len]`, right-padded; `prompt_padding` is true at padding.
    pub prompt_ids: Tensor<2, Int>,
    pub prompt_padding: Tensor<2, Bool>,
    /// `[batch, answer_len]`, right-padded.
    pub answer_ids: Tensor<2, Int>,
    pub answer_padding: Tensor<2, Bool>,
}

#[derive(Clone, Debug)]
pub struct VqaBatcher {
    pub pad_id: u32,
}

impl Batcher<EncodedVqa, VqaBatch> for VqaBatcher {
    /// Items must share one image size (they do whenever the preprocessor crops).
    fn batch(&self, items: Vec<EncodedVqa>, device: &Device) -> VqaBatch {
        let (height, width) = items.first().map_or((0, 0), |i| (i.height, i.width));
        assert!(
            items.iter().all(|i| (i.height, i.width) == (height, width)),
            "a batch needs one image size: configure a center crop"
        );
        let pixels: Vec<f32> = items
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        let pixels = Tensor::from_data(
            TensorData::new(pixels, [items.len(), 3, height, width]),
            device,
        );
        let prompts: Vec<_> = items.iter().map(|i| i.prompt.clone()).collect();
        let answers: Vec<_> = items.iter().map(|i| i.answer.clone()).collect();
        let (prompt_ids, prompt_padding) =
            TokenBatch::pad(&prompts, self.pad_id).to_tensors(device);
        let (answer_ids, answer_padding) =
            TokenBatch::pad(&answers, self.pad_id).to_tensors(device);
        VqaBatch {
            pixels,
            prompt_ids,
            prompt_padding,
            answer_ids,
            answer_padding,
        }
    }
}

/// Turns scope pairs into the two `ScopeInput`s of the classifier, with every image
/// preprocessed once and kept in memory.
pub struct ScopeBatcher {
    pub tokenizer: TextTokenizer,
    pub preprocessor: ImagePreprocessor,
    images: std::collections::HashMap<PathBuf, Vec<f32>>,
    size: (usize, usize),
}

impl ScopeBatcher {
    /// Preprocesses every image the pairs mention.
    pub fn new(
        tokenizer: TextTokenizer,
        preprocessor: ImagePreprocessor,
        pairs: &[super::pairs::ScopePair],
    ) -> crate::Result<Self> {
        let Some((h, w)) = preprocessor.crop else {
            return Err(crate::Error::Config {
                path: pairs
                    .first()
                    .map(|p| p.edit_image.clone())
                    .unwrap_or_default(),
                reason: "scope batches need one image size: the preprocessor must center-crop"
                    .into(),
            });
        };
        let mut batcher = Self {
            tokenizer,
            preprocessor,
            images: Default::default(),
            size: (h as usize, w as usize),
        };
        for pair in pairs {
            for path in std::iter::once(&pair.edit_image).chain(&pair.query_image) {
                if !batcher.images.contains_key(path) {
                    let pixels = batcher.preprocessor.load(path)?;
                    batcher.images.insert(path.clone(), pixels);
                }
            }
        }
        Ok(batcher)
    }

    /// Loads and preprocesses the images not seen yet (queries that arrive after `new`).
    pub fn preload<'a>(
        &mut self,
        paths: impl IntoIterator<Item = &'a PathBuf>,
    ) -> crate::Result<()> {
        for path in paths {
            if !self.images.contains_key(path) {
                let pixels = self.preprocessor.load(path)?;
                self.images.insert(path.clone(), pixels);
            }
        }
        Ok(())
    }

    /// One side of the classifier's input: texts with their images (preloaded), if any.
    pub fn side<'a>(
        &self,
        texts: impl Iterator<Item = &'a str>,
        images: &[Option<&PathBuf>],
        device: &Device,
    ) -> crate::Result<ScopeInput> {
        let texts: Vec<&str> = texts.collect();
        let (ids, padding) = self.tokenizer.encode_batch(&texts)?.to_tensors(device);
        let images = self.pixels(images, device);
        Ok(ScopeInput {
            ids,
            padding,
            images,
            focus: None,
        })
    }

    /// The edit side for `(question, target, image)` triples: "question target" on the edit
    /// image, the object readout's focus on the question's tokens (the common prefix of its
    /// encoding and the whole text's).
    pub fn edit_side(
        &self,
        edits: &[(&str, &str, &PathBuf)],
        device: &Device,
    ) -> crate::Result<ScopeInput> {
        let texts: Vec<String> = edits.iter().map(|(q, t, _)| format!("{q} {t}")).collect();
        let batch = self.tokenizer.encode_batch(&texts)?;
        let mut focus = vec![0f32; batch.batch * batch.seq];
        for (row, (question, _, _)) in edits.iter().enumerate() {
            let question = self.tokenizer.encode(question, true)?;
            let whole = &batch.ids[row * batch.seq..(row + 1) * batch.seq];
            let shared = question
                .iter()
                .zip(whole)
                .take_while(|(a, b)| a == b)
                .count();
            focus[row * batch.seq..row * batch.seq + shared].fill(1.0);
        }
        let (ids, padding) = batch.to_tensors(device);
        let images: Vec<Option<&PathBuf>> = edits.iter().map(|(_, _, i)| Some(*i)).collect();
        Ok(ScopeInput {
            ids,
            padding,
            images: self.pixels(&images, device),
            focus: Some(Tensor::from_data(
                TensorData::new(focus, [batch.batch, batch.seq]),
                device,
            )),
        })
    }

    /// `[batch, 3, h, w]` pixels and `[batch, 1]` has-image flags; `None` without any image.
    fn pixels(
        &self,
        images: &[Option<&PathBuf>],
        device: &Device,
    ) -> Option<(Tensor<4>, Tensor<2>)> {
        if images.iter().all(Option::is_none) {
            None
        } else {
            let (h, w) = self.size;
            let plane = 3 * h * w;
            let mut pixels = Vec::with_capacity(images.len() * plane);
            let mut has = Vec::with_capacity(images.len());
            for image in images {
                match image {
                    Some(path) => {
                        pixels.extend_from_slice(&self.images[*path]);
                        has.push(1.0f32);
                    }
                    None => {
                        pixels.extend(std::iter::repeat_n(0.0, plane));
                        has.push(0.0);
                    }
                }
            }
            let n = images.len();
            Some((
                Tensor::from_data(TensorData::new(pixels, [n, 3, h, w]), device),
                Tensor::from_data(TensorData::new(has, [n, 1]), device),
            ))
        }
    }

    /// The edit side of the pairs: edit image with "question + target".
    pub fn edits(
        &self,
        pairs: &[&super::pairs::ScopePair],
        device: &Device,
    ) -> crate::Result<ScopeInput> {
        let edits: Vec<(&str, &str, &PathBuf)> = pairs
            .iter()
            .map(|p| {
                (
                    p.edit_question.as_str(),
                    p.edit_target.as_str(),
                    &p.edit_image,
                )
            })
            .collect();
        self.edit_side(&edits, device)
    }

    /// The query side of the pairs: query image (if any) with the question.
    pub fn queries(
        &self,
        pairs: &[&super::pairs::ScopePair],
        device: &Device,
    ) -> crate::Result<ScopeInput> {
        let images: Vec<_> = pairs.iter().map(|p| p.query_image.as_ref()).collect();
        self.side(pairs.iter().map(|p| p.query_text.as_str()), &images, device)
    }

    /// 0/1 labels, `[batch]`.
    pub fn labels(pairs: &[&super::pairs::ScopePair], device: &Device) -> Tensor<1> {
        let labels: Vec<f32> = pairs.iter().map(|p| p.label() as u8 as f32).collect();
        let n = labels.len();
        Tensor::from_data(TensorData::new(labels, [n]), device)
    }
}
