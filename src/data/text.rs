//! Text to token tensors through a Hugging Face `tokenizer.json` (the `tokenizers` crate).
//!
//! Special tokens (CLIP's `<|startoftext|>` / `<|endoftext|>`, the scenes tokenizer's
//! `[BOS]` / `[EOS]`) come from the tokenizer's own post-processor; sequences are truncated to
//! the model's maximum positions (keeping the end token) and padded to the longest in a batch.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: std::path::PathBuf,
    pad_id: u32,
    /// Ids of the texts encoded so far, by (special tokens, text): a training loop encodes
    /// the same few thousand texts every step, which was a fifteenth of a scope classifier's
    /// step. Shared by clones (they are the same tokenizer); at most [`MEMO_TEXTS`] texts.
    memo: Arc<Mutex<HashMap<(bool, String), Vec<i64>>>>,
}

/// The most texts [`TextTokenizer`] remembers; later ones are encoded each time.
const MEMO_TEXTS: usize = 1 << 17;

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
    /// Right-pads `sequences` with `pad_id` to the longest one.
    pub fn pad(sequences: &[Vec<i64>], pad_id: u32) -> Self {
        let seq = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut batch = TokenBatch {
            ids: Vec::with_capacity(sequences.len() * seq),
            padding: Vec::with_capacity(sequences.len() * seq),
            batch: sequences.len(),
            seq,
        };
        for s in sequences {
            batch.ids.extend(s);
            batch
                .ids
                .extend(std::iter::repeat_n(pad_id as i64, seq - s.len()));
            batch.padding.extend(std::iter::repeat_n(false, s.len()));
            batch
                .padding
                .extend(std::iter::repeat_n(true, seq - s.len()));
        }
        batch
    }

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
    /// `[PAD]`, else `fallback_pad_id`.
    pub fn from_file(path: &Path, max_len: usize, fallback_pad_id: u32) -> Result<Self> {
        let error = |reason: String| Error::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        // `tokenizers` panics on some malformed files (found by `mmke fuzz`): a bad file is an
        // error here, never a crash.
        let parsed = std::panic::catch_unwind(|| Tokenizer::from_file(path))
            .map_err(|_| error("malformed tokenizer.json (the parser panicked)".into()))?;
        let mut tokenizer = parsed.map_err(|e| error(e.to_string()))?;
        let pad_id = match tokenizer.get_padding() {
            Some(p) => p.pad_id,
            None => ["<|endoftext|>", "[PAD]"]
                .iter()
                .find_map(|t| tokenizer.token_to_id(t))
                .unwrap_or(fallback_pad_id),
        };
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(|e| error(e.to_string()))?;
        Ok(Self {
            tokenizer,
            path: path.to_path_buf(),
            pad_id,
            memo: Default::default(),
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The most tokens a text is cut to.
    pub fn max_len(&self) -> usize {
        self.tokenizer
            .get_truncation()
            .map_or(usize::MAX, |t| t.max_length)
    }

    /// Token ids of one text, with the tokenizer's special tokens when `special` is set.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let key = (special, text.to_string());
        if let Some(ids) = self
            .memo
            .lock()
            .expect("the memo is never poisoned")
            .get(&key)
        {
            return Ok(ids.clone());
        }
        let encoding = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: format!("cannot encode {text:?}: {e}"),
            })?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| id as i64).collect();
        let mut memo = self.memo.lock().expect("the memo is never poisoned");
        if memo.len() < MEMO_TEXTS {
            memo.insert(key, ids.clone());
        }
        Ok(ids)
    }

    /// Encodes texts with special tokens and pads them into one batch.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<TokenBatch> {
        let sequences = texts
            .iter()
            .map(|t| self.encode(t.as_ref(), true))
            .collect::<Result<Vec<_>>>()?;
        Ok(TokenBatch::pad(&sequences, self.pad_id))
    }

    /// The text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                reason: format!("cannot decode {ids:?}: {e}"),
            })
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_the_longest_sequence() {
        let batch = TokenBatch::pad(&[vec![5, 6, 7], vec![8]], 0);
        assert_eq!(batch.seq, 3);
        assert_eq!(batch.ids, [5, 6, 7, 8, 0, 0]);
        assert_eq!(batch.padding, [false, false, false, false, true, true]);
    }

    #[test]
    fn a_remembered_encoding_is_the_tokenizer_s_own() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tiny/tokenizer.json");
        let tokenizer = TextTokenizer::from_file(&path, 16, 0).unwrap();
        let fresh = |text: &str, special: bool| -> Vec<i64> {
            let encoding = tokenizer.inner().encode(text, special).unwrap();
            encoding.get_ids().iter().map(|&id| id as i64).collect()
        };
        for special in [true, false] {
            let first = tokenizer.encode("a red cube", special).unwrap();
            assert_eq!(first, fresh("a red cube", special));
            // The second answer comes from the memo, and equals the first.
            assert_eq!(tokenizer.encode("a red cube", special).unwrap(), first);
        }
        // With and without special tokens are remembered apart.
        assert_ne!(
            tokenizer.encode("a red cube", true).unwrap(),
            tokenizer.encode("a red cube", false).unwrap()
        );
        assert_eq!(tokenizer.memo.lock().unwrap().len(), 2);
    }
}
