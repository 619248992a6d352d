//! CLIP parity with Hugging Face `transformers`, on the fixtures `tools/make_clip_fixture.py`
//! writes (two tiny random CLIPs that differ in every size and in activation).
//!
//! Tolerances: 1e-4 (max |diff|) for text embeddings and for images already at the model's
//! input size; 2e-2 for images that need resizing, because the `image` crate's bicubic
//! (Catmull-Rom) and PIL's fixed-point bicubic round some pixels differently by one level.

use std::path::{Path, PathBuf};

use mmke::model::clip::pretrained::rows;
use mmke::model::clip::{Clip, ClipConfig, ClipModel, Embeddings, l2_normalize};
use serde::Deserialize;

#[path = "common/env.rs"]
mod test_env;
use test_env::device;

const EXACT_TOL: f32 = 1e-4;
const RESIZED_TOL: f32 = 2e-2;

#[derive(Deserialize)]
struct Expected {
    images: Vec<String>,
    texts: Vec<String>,
    input_ids: Vec<Vec<i64>>,
    attention_mask: Vec<Vec<i64>>,
    pixel_values_first: Vec<f32>,
    image_embeds: Vec<Vec<f32>>,
    text_embeds: Vec<Vec<f32>>,
    logits_per_image: Vec<Vec<f32>>,
    exact_size_images: Vec<String>,
    #[serde(default)]
    text_embeds_bf16: Option<Vec<Vec<f32>>>,
}

fn fixtures() -> PathBuf {
    test_env::root().join("tests/fixtures")
}

fn expected(model: &str) -> Expected {
    let path = fixtures().join(model).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn image_paths(e: &Expected) -> Vec<PathBuf> {
    e.images
        .iter()
        .map(|n| fixtures().join("images").join(n))
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row width");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Checks `got` against the reference, row by row, with the tolerance each image deserves.
fn assert_matches(model: &str, got: &Embeddings, e: &Expected, logit_scale: f32) {
    let text = got.text_embeds.as_ref().expect("text embeddings");
    let diff = max_diff(text, &e.text_embeds);
    eprintln!("{model}: text embeddings max |diff| {diff:.2e}");
    assert!(
        diff <= EXACT_TOL,
        "{model}: text embeddings differ by {diff}"
    );

    let images = got.image_embeds.as_ref().expect("image embeddings");
    let logits = got.logits_per_image.as_ref().expect("logits");
    for (i, name) in e.images.iter().enumerate() {
        let tol = if e.exact_size_images.contains(name) {
            EXACT_TOL
        } else {
            RESIZED_TOL
        };
        let diff = max_diff(&images[i..=i], &e.image_embeds[i..=i]);
        eprintln!("{model}: image {name} max |diff| {diff:.2e}");
        assert!(
            diff <= tol,
            "{model}: image {name} differs by {diff} (tolerance {tol})"
        );
        // logits = exp(s) * cos: a cosine error of at most tol + EXACT_TOL per unit vector.
        let bound = logit_scale.exp() * (tol + EXACT_TOL) * 2.0;
        let diff = max_diff(&logits[i..=i], &e.logits_per_image[i..=i]);
        assert!(
            diff <= bound,
            "{model}: logits of {name} differ by {diff} (bound {bound})"
        );
    }
}

fn check_model(model: &str) {
    let e = expected(model);
    let clip = Clip::load(&fixtures().join(model), &device()).unwrap();
    let got = clip.embed(&image_paths(&e), &e.texts).unwrap();
    assert_matches(model, &got, &e, clip.config.logit_scale_init_value as f32);
}

#[test]
fn quick_gelu_legacy_pooling_model_matches_transformers() {
    check_model("clip-tiny");
}

#[test]
fn gelu_eos_pooling_f16_model_matches_transformers() {
    check_model("clip-tiny-gelu");
}

#[test]
fn tokenization_matches_the_reference_ids_padding_and_truncation() {
    for model in ["clip-tiny", "clip-tiny-gelu"] {
        let e = expected(model);
        let clip = Clip::load(&fixtures().join(model), &device()).unwrap();
        let batch = clip.tokenizer.encode_batch(&e.texts).unwrap();
        let ids: Vec<Vec<i64>> = batch.ids.chunks(batch.seq).map(<[i64]>::to_vec).collect();
        assert_eq!(ids, e.input_ids, "{model}");
        let padding: Vec<bool> = e.attention_mask.concat().iter().map(|&m| m == 0).collect();
        assert_eq!(batch.padding, padding, "{model}");
        // The long text is cut to max_position_embeddings and still ends with end-of-text.
        assert_eq!(batch.seq, clip.config.text_config.max_position_embeddings);
    }
}

#[test]
fn exact_size_image_preprocesses_like_transformers() {
    let e = expected("clip-tiny");
    let clip = Clip::load(&fixtures().join("clip-tiny"), &device()).unwrap();
    let pixels = clip.preprocessor.load(&image_paths(&e)[0]).unwrap();
    assert_eq!(pixels.len(), e.pixel_values_first.len());
    let diff = pixels
        .iter()
        .zip(&e.pixel_values_first)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff <= 1e-5, "pixel values differ by {diff}");
}

#[test]
fn bf16_weights_load_converted_to_f32() {
    let dir = fixtures().join("clip-tiny-gelu");
    let e = expected("clip-tiny-gelu");
    let config = ClipConfig::from_file(&dir.join("config.json")).unwrap();
    let model = ClipModel::new(&config, &device())
        .load_safetensors(&dir.join("model.bf16.safetensors"))
        .unwrap();
    let clip = Clip::load(&dir, &device()).unwrap();
    let (ids, padding) = clip
        .tokenizer
        .encode_batch(&e.texts)
        .unwrap()
        .to_tensors(&device());
    let got = rows(l2_normalize(model.text_features(ids, padding)));
    let diff = max_diff(&got, e.text_embeds_bf16.as_ref().unwrap());
    assert!(diff <= EXACT_TOL, "bf16 text embeddings differ by {diff}");
}

/// Rewrites the fixture's safetensors with `edit` applied to its tensors.
fn edited_weights(
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> (tempfile::TempDir, PathBuf) {
    let bytes = std::fs::read(fixtures().join("clip-tiny/model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    (dir, path)
}

fn load_error(path: &Path) -> String {
    let config = ClipConfig::from_file(&fixtures().join("clip-tiny/config.json")).unwrap();
    match ClipModel::new(&config, &device()).load_safetensors(path) {
        Ok(_) => panic!("{} loaded although it is broken", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_tensor_is_named_with_the_file() {
    let (_dir, path) =
        edited_weights(|t| t.retain(|(n, ..)| n != "vision_model.post_layernorm.weight"));
    let err = load_error(&path);
    assert!(
        err.contains("missing tensor 'vision_model.post_layernorm.weight'"),
        "{err}"
    );
    assert!(err.contains("broken.safetensors"), "{err}");
}

#[test]
fn a_misshapen_tensor_is_named() {
    let (_dir, path) = edited_weights(|t| {
        let proj = t
            .iter_mut()
            .find(|(n, ..)| n == "text_projection.weight")
            .unwrap();
        proj.2.swap(0, 1); // [24, 32] -> [32, 24]: same bytes, wrong shape
    });
    let err = load_error(&path);
    assert!(
        err.contains("text_projection.weight") && err.contains("Shape mismatch"),
        "{err}"
    );
}

#[test]
fn an_unexpected_tensor_is_named() {
    let (_dir, path) = edited_weights(|t| {
        let extra = t.iter().find(|(n, ..)| n == "logit_scale").unwrap().clone();
        t.push((
            "vision_model.encoder.layers.7.extra".into(),
            extra.1,
            extra.2,
            extra.3,
        ));
    });
    let err = load_error(&path);
    assert!(
        err.contains("unexpected tensor 'vision_model.encoder.layers.7.extra'"),
        "{err}"
    );
}

#[test]
fn export_round_trips_in_hugging_face_layout() {
    let source = fixtures().join("clip-tiny");
    let clip = Clip::load(&source, &device()).unwrap();
    let out = tempfile::tempdir().unwrap();
    clip.model
        .save_pretrained(&clip.config, out.path())
        .unwrap();

    // Same keys, shapes and (f32) bytes as the file transformers wrote.
    let original = std::fs::read(source.join("model.safetensors")).unwrap();
    let exported = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let original = safetensors::SafeTensors::deserialize(&original).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&exported).unwrap();
    let exported = safetensors::SafeTensors::deserialize(&exported).unwrap();
    let mut names = original.names();
    names.sort();
    let mut exported_names = exported.names();
    exported_names.sort();
    assert_eq!(names, exported_names);
    for name in names {
        let (a, b) = (
            original.tensor(name).unwrap(),
            exported.tensor(name).unwrap(),
        );
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert_eq!(a.data(), b.data(), "{name}");
    }
    let format = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format"))
        .cloned();
    assert_eq!(
        format.as_deref(),
        Some("pt"),
        "transformers needs format=pt"
    );

    let config = ClipConfig::from_file(&out.path().join("config.json")).unwrap();
    assert_eq!(config, clip.config);
}
