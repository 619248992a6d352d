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
