//! Text to token tensors through a Hugging Face `tokenizer.json` (the `tokenizers` crate).
//!
//! Special tokens (CLIP's `<|startoftext|>` / `<|endoftext|>`) come from the tokenizer's own
//! post-processor; sequences are truncated to the model's maximum positions (keeping the
//! end-of-text token) and padded to the longest in the batch.

use std::path::Path;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{Error, Result};

pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: std::path::PathBuf,
}

/// A padded batch of token ids, row-major `[batch, seq]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<i64>,
    /// True at padding positions.
    pub padding: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
}

impl TokenBatch {
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Bool>) {
        let shape = [self.batch, self.seq];
        (
            Tensor::from_data(TensorData::new(self.ids.clone(), shape), device),
            Tensor::from_data(TensorData::new(self.padding.clone(), shape), device),
        )
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`; sequences are cut to `max_len` tokens. Padding uses the
    /// tokenizer's own pad token when it names one, else `<|endoftext|>` (as CLIP does), else
    /// `fallback_pad_id`.
    pub fn from_file(path: &Path, max_len: usize, fallback_pad_id: u32) -> Result<Self> {
        let error = |reason: String| Error::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| error(e.to_string()))?;
        let (pad_id, pad_token) = match tokenizer.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone()),
            None => match tokenizer.token_to_id("<|endoftext|>") {
                Some(id) => (id, "<|endoftext|>".to_string()),
                None => (
                    fallback_pad_id,
                    tokenizer.id_to_token(fallback_pad_id).unwrap_or_default(),
                ),
            },
        };
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(|e| error(e.to_string()))?;
        Ok(Self {
            tokenizer,
            path: path.to_path_buf(),
        })
    }

    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings =
            self.tokenizer
                .encode_batch(inputs, true)
                .map_err(|e| Error::Tokenizer {
                    path: self.path.clone(),
                    reason: e.to_string(),
                })?;
        let seq = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(encodings.len() * seq),
            padding: Vec::with_capacity(encodings.len() * seq),
            batch: encodings.len(),
            seq,
        };
        for encoding in &encodings {
            batch
                .ids
                .extend(encoding.get_ids().iter().map(|&id| id as i64));
            batch
                .padding
                .extend(encoding.get_attention_mask().iter().map(|&m| m == 0));
        }
        Ok(batch)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}
