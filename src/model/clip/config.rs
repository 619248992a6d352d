//! CLIP configuration, read straight from a Hugging Face `config.json`.
//!
//! Field names and defaults follow `transformers`' `CLIPConfig`, `CLIPTextConfig` and
//! `CLIPVisionConfig`, so any `config.json` written by `transformers` deserializes as is
//! (unknown keys are ignored) and the one mmke writes loads back into `transformers`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The MLP activation of a CLIP encoder layer (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI's CLIP.
    QuickGelu,
    /// The exact (erf) GELU.
    Gelu,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// Decides text pooling: `2` (legacy configs, OpenAI's included) pools at the largest
    /// token id, anything else at the first occurrence of this id.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: 49407,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// Patches per side: the image is cut into `grid × grid` patches.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens of the vision encoder: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }
}

impl ClipConfig {
    /// `openai/clip-vit-base-patch32`.
    pub fn vit_base_patch32() -> Self {
        Self {
            text_config: ClipTextConfig {
                eos_token_id: 2,
                ..ClipTextConfig::default()
            },
            ..Self::default()
        }
    }

    /// `openai/clip-vit-large-patch14`.
    pub fn vit_large_patch14() -> Self {
        Self {
            text_config: ClipTextConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                projection_dim: 768,
                num_attention_heads: 12,
                eos_token_id: 2,
                ..ClipTextConfig::default()
            },
            vision_config: ClipVisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                projection_dim: 768,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                patch_size: 14,
                ..ClipVisionConfig::default()
            },
            projection_dim: 768,
            ..Self::default()
        }
    }

    /// A named preset: `clip-vit-base-patch32` or `clip-vit-large-patch14` (an `openai/`
    /// prefix is accepted).
    pub fn preset(name: &str) -> Option<Self> {
        match name.trim_start_matches("openai/") {
            "clip-vit-base-patch32" => Some(Self::vit_base_patch32()),
            "clip-vit-large-patch14" => Some(Self::vit_large_patch14()),
            _ => None,
        }
    }

    /// CLIPs sized for the scenes benchmark and trained from scratch in mmke, for its word-level
    /// tokenizer (`[PAD]` 0, `[BOS]` 2, `[EOS]` 3): `clip-tiny` plays the role of ViT-B/32 in
    /// MSCKE's Table 2 and `clip-small` that of ViT-L/14. At an `image_size` divisible by 3
    /// the patches are the cells of the scenes' 3x3 layout (96 px: 32-pixel patches, one
    /// token per cell); otherwise 8-pixel patches.
    pub fn scenes_preset(name: &str, vocab_size: usize, image_size: usize) -> Option<Self> {
        let (width, layers, heads, patch) = match name {
            "clip-tiny" => (64, 2, 4, 8),
            "clip-small" => (128, 4, 4, 8),
            _ => return None,
        };
        // One patch per cell of the scenes' 3x3 layout when the size allows: each patch token
        // then sees exactly one object (objects never leave their cell).
        let patch = if image_size % 3 == 0 {
            image_size / 3
        } else {
            patch
        };
        Some(Self {
            text_config: ClipTextConfig {
                vocab_size,
                hidden_size: width,
                intermediate_size: 4 * width,
                projection_dim: width,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                max_position_embeddings: 64,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
                pad_token_id: Some(0),
                bos_token_id: Some(2),
                eos_token_id: 3,
            },
            vision_config: ClipVisionConfig {
                hidden_size: width,
                intermediate_size: 4 * width,
                projection_dim: width,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_channels: 3,
                image_size,
                patch_size: patch,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: width,
            logit_scale_init_value: 2.6592,
        })
    }

    /// Reads a Hugging Face `config.json` and checks that its sizes fit together.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_json_config(path, Self::validate)
    }

    /// Checks the invariants the modules rely on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        if t.num_attention_heads == 0 || t.hidden_size % t.num_attention_heads != 0 {
            return Err(format!(
                "text_config.hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0 {
            return Err(format!(
                "vision_config.hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if self.projection_dim == 0 {
            return Err("projection_dim is 0".into());
        }
        Ok(())
    }

    /// The `config.json` that `transformers`' `CLIPModel.from_pretrained` reads.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("a CLIP config always serializes");
        let object = value
            .as_object_mut()
            .expect("a struct serializes to an object");
        object.insert("architectures".into(), serde_json::json!(["CLIPModel"]));
        object.insert("model_type".into(), serde_json::json!("clip"));
        object["text_config"]["model_type"] = serde_json::json!("clip_text_model");
        object["vision_config"]["model_type"] = serde_json::json!("clip_vision_model");
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_legacy_openai_config_with_missing_keys() {
        // The shape of OpenAI's config.json: nested configs with a subset of keys.
        let json = r#"{
            "projection_dim": 512, "logit_scale_init_value": 2.6592,
            "text_config": {"eos_token_id": 2, "hidden_act": "quick_gelu", "unknown_key": 3},
            "vision_config": {"patch_size": 32, "hidden_act": "quick_gelu"},
            "architectures": ["CLIPModel"]
        }"#;
        let config: ClipConfig = serde_json::from_str(json).unwrap();
        assert_eq!(config, ClipConfig::vit_base_patch32());
        assert_eq!(config.vision_config.num_positions(), 50);
    }

    #[test]
    fn large_preset_has_257_positions() {
        let config = ClipConfig::preset("openai/clip-vit-large-patch14").unwrap();
        assert_eq!(config.vision_config.num_positions(), 257);
        assert!(config.validate().is_ok());
        assert!(ClipConfig::preset("clip-vit-huge").is_none());
    }

    #[test]
    fn rejects_sizes_that_do_not_fit() {
        let mut config = ClipConfig::default();
        config.vision_config.image_size = 100;
        assert!(config.validate().unwrap_err().contains("patch_size"));
    }

    #[test]
    fn hf_json_round_trips() {
        let config = ClipConfig::vit_large_patch14();
        let json = config.to_hf_json();
        assert_eq!(json["model_type"], "clip");
        let back: ClipConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
    }
}
