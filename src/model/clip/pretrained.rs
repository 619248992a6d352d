//! A CLIP model directory in Hugging Face layout: `config.json`, `model.safetensors`,
//! `tokenizer.json` and optionally `preprocessor_config.json`.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use serde::Serialize;

use super::{ClipConfig, ClipModel, l2_normalize};
use crate::data::image::ImagePreprocessor;
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result, write_atomic};

/// A loaded CLIP with the tokenizer and image preprocessing that belong to it.
pub struct Clip {
    pub config: ClipConfig,
    pub model: ClipModel,
    pub tokenizer: TextTokenizer,
    pub preprocessor: ImagePreprocessor,
    /// The directory it was loaded from (its tokenizer and preprocessor files are copied
    /// verbatim on export).
    dir: PathBuf,
    device: Device,
}

/// What `mmke clip embed` prints: L2-normalised projected embeddings in input order, and
/// `logits_per_image[i][j] = exp(logit_scale) * cos(image i, text j)` when both are present.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Embeddings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_embeds: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_embeds: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits_per_image: Option<Vec<Vec<f32>>>,
}

impl Clip {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory"),
            ));
        }
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let model =
            ClipModel::new(&config, device).load_safetensors(&dir.join("model.safetensors"))?;
        let text = &config.text_config;
        let tokenizer = TextTokenizer::from_file(
            &dir.join("tokenizer.json"),
            text.max_position_embeddings,
            text.pad_token_id.unwrap_or(0),
        )?;
        let image_size = config.vision_config.image_size as u32;
        let preprocessor_path = dir.join("preprocessor_config.json");
        let preprocessor = if preprocessor_path.is_file() {
            ImagePreprocessor::from_file(&preprocessor_path, image_size)?
        } else {
            ImagePreprocessor::clip(image_size)
        };
        Ok(Self {
            config,
            model,
            tokenizer,
            preprocessor,
            dir: dir.to_path_buf(),
            device: device.clone(),
        })
    }

    /// Writes the model to `out` in the layout it was loaded from: `model.safetensors`,
    /// `config.json`, and the source's `tokenizer.json` and `preprocessor_config.json`.
    /// Every file is written atomically.
    pub fn save_pretrained(&self, out: &Path) -> Result<()> {
        self.model.save_pretrained(&self.config, out)?;
        for file in ["tokenizer.json", "preprocessor_config.json"] {
            let source = self.dir.join(file);
            if source.is_file() {
                let bytes = std::fs::read(&source).map_err(|e| Error::io(&source, e))?;
                write_atomic(&out.join(file), &bytes)?;
            }
        }
        Ok(())
    }

    /// Normalised image embeddings, `[images, projection_dim]`.
    pub fn embed_images(&self, paths: &[PathBuf]) -> Result<Tensor<2>> {
        let pixels = self.preprocessor.batch(paths, &self.device)?;
        Ok(l2_normalize(self.model.image_features(pixels)))
    }

    /// Normalised text embeddings, `[texts, projection_dim]`.
    pub fn embed_texts(&self, texts: &[String]) -> Result<Tensor<2>> {
        let (ids, padding) = self.tokenizer.encode_batch(texts)?.to_tensors(&self.device);
        Ok(l2_normalize(self.model.text_features(ids, padding)))
    }

    pub fn embed(&self, images: &[PathBuf], texts: &[String]) -> Result<Embeddings> {
        let image = (!images.is_empty())
            .then(|| self.embed_images(images))
            .transpose()?;
        let text = (!texts.is_empty())
            .then(|| self.embed_texts(texts))
            .transpose()?;
        let logits = match (&image, &text) {
            (Some(i), Some(t)) => Some(rows(self.model.logits_per_image(i.clone(), t.clone()))),
            _ => None,
        };
        Ok(Embeddings {
            image_embeds: image.map(rows),
            text_embeds: text.map(rows),
            logits_per_image: logits,
        })
    }
}

/// A `[rows, cols]` tensor as nested vectors.
pub fn rows(t: Tensor<2>) -> Vec<Vec<f32>> {
    let [_, cols] = t.dims();
    let values: Vec<f32> = t
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("converted to f32");
    values.chunks(cols.max(1)).map(<[f32]>::to_vec).collect()
}
