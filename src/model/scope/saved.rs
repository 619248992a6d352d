//! A trained scope classifier on disk, loaded with its input pipeline: `run.toml` (the run's
//! configuration; its `[model]` table is the classifier's), `model.bpk` (every weight) and
//! `clip/` (the fine-tuned CLIP in Hugging Face layout with its tokenizer and preprocessor),
//! as `mmke train scope` writes it. An export (`mmke export`) has `config.json` and
//! `model.safetensors` in place of the first two.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;
use serde::Deserialize;

use super::{ScopeClassifier, ScopeConfig};
use crate::data::batch::ScopeBatcher;
use crate::data::image::ImagePreprocessor;
use crate::data::pairs::ScopePair;
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result, write_atomic};
use crate::model::clip::{Clip, ClipConfig, ClipModel};
use crate::model::objects::{ObjectWords, scenes_object_words};

/// The part of a run's configuration the classifier is built from (the rest is how it was
/// trained, kept as written).
#[derive(Deserialize)]
struct ModelPart {
    model: ScopeConfig,
}

/// A trained classifier with its tokenizer and image preprocessing.
pub struct ScopeRun {
    /// The classifier's configuration.
    pub config: ScopeConfig,
    /// The whole run configuration as written (model and training), for exports.
    pub run_config: serde_json::Value,
    pub clip_config: ClipConfig,
    pub model: ScopeClassifier,
    tokenizer: Option<TextTokenizer>,
    pub preprocessor: ImagePreprocessor,
}

impl ScopeRun {
    /// Loads the run (or export) in `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let exported = !dir.join("run.toml").is_file() && dir.join("config.json").is_file();
        let run_config: serde_json::Value = if exported {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::Json { path, error: e })?
        } else {
            let path = dir.join("run.toml");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            toml::from_str(&text).map_err(|e| Error::Config {
                path,
                reason: e.to_string(),
            })?
        };
        let config = ModelPart::deserialize(&run_config)
            .map_err(|e| Error::Config {
                path: dir.to_path_buf(),
                reason: format!("the run configuration's [model]: {e}"),
            })?
            .model;
        let clip = Clip::load(&dir.join("clip"), device)?;
        let model = ScopeClassifier::new(
            &config,
            ClipModel::new(&clip.config, device),
            &clip.config,
            device,
        )
        .with_object_words(object_words(&config, &clip.tokenizer, dir)?);
        let model = if exported {
            crate::model::clip::weights::load_safetensors(model, &dir.join("model.safetensors"))?
        } else {
            let weights = dir.join("model.bpk");
            model.try_load_file(&weights).map_err(|e| Error::Weights {
                path: weights,
                reason: e.to_string(),
            })?
        };
        Ok(Self {
            config,
            run_config,
            clip_config: clip.config,
            model,
            tokenizer: Some(clip.tokenizer),
            preprocessor: clip.preprocessor,
        })
    }

    /// Writes the classifier to `out` for sharing: `model.safetensors` (every weight, PyTorch
    /// layout), `config.json` (the run config) and `clip/` (the fine-tuned CLIP in Hugging Face
    /// layout, which `transformers` reads; its tokenizer and preprocessor from `source/clip`).
    /// [`ScopeRun::load`] reads it back.
    pub fn export(&self, source: &Path, out: &Path) -> Result<()> {
        let clip_out = out.join("clip");
        std::fs::create_dir_all(&clip_out).map_err(|e| Error::io(&clip_out, e))?;
        crate::model::clip::weights::save_safetensors(&self.model, &out.join("model.safetensors"))?;
        let json = serde_json::to_string_pretty(&self.run_config).expect("a config serializes");
        write_atomic(&out.join("config.json"), json.as_bytes())?;
        self.model
            .clip
            .save_pretrained(&self.clip_config, &clip_out)?;
        for file in ["tokenizer.json", "preprocessor_config.json"] {
            let path = source.join("clip").join(file);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            write_atomic(&clip_out.join(file), &bytes)?;
        }
        Ok(())
    }

    /// The batcher for `pairs` (it takes the run's tokenizer: call once).
    pub fn batcher(&mut self, pairs: &[ScopePair]) -> Result<ScopeBatcher> {
        let tokenizer = self
            .tokenizer
            .take()
            .expect("ScopeRun::batcher is called once");
        ScopeBatcher::new(tokenizer, self.preprocessor.clone(), pairs)
    }
}

/// The scenes names an object readout (`model.object_readout`) reads, in `clip`'s vocabulary;
/// an error naming `dir` where that is not a scenes CLIP.
pub fn object_words(
    model: &ScopeConfig,
    tokenizer: &TextTokenizer,
    dir: &Path,
) -> Result<Option<ObjectWords>> {
    if !model.reads_objects() {
        return Ok(None);
    }
    scenes_object_words(tokenizer)
        .map(Some)
        .ok_or_else(|| Error::Config {
            path: dir.to_path_buf(),
            reason:
                "object_readout: the CLIP's tokenizer lacks the scenes' attribute and cell names"
                    .into(),
        })
}
