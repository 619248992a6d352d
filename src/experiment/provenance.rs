//! What made a trained artifact, and whether it may be reused.
//!
//! Every directory an experiment trains into holds `provenance.json`: the artifact's kind,
//! the configuration it was trained with, the identity of the data it saw (a checksum of
//! `train.json` and `test.json`) and the provenance of the artifacts it was built on (the
//! CLIP under a VLM, the VLM under MEND). An experiment reuses a directory only when the
//! provenance it would train with now is identical; otherwise it clears the directory, says
//! why, and retrains. The provenance is written before training starts, so a run interrupted
//! mid-training resumes only from checkpoints of its own configuration.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result, write_atomic};

pub const FILE: &str = "provenance.json";

/// The identity of a data directory: CRC-32 of its `train.json` and `test.json`.
pub fn data(dir: &Path) -> Result<Value> {
    let mut sums = serde_json::Map::new();
    for name in ["train.json", "test.json"] {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        sums.insert(
            name.to_string(),
            json!(format!("{:08x}", crc32fast::hash(&bytes))),
        );
    }
    Ok(Value::Object(sums))
}

/// The identity of the edited model: [`base_model`] of its directory, and for a Hugging Face
/// MLLM the dtype it is held in (what was trained against f32 weights is not reused for bf16).
pub fn edited_model(model: &crate::edit::speaker::ModelDir) -> Result<Value> {
    let mut identity = base_model(&model.path)?;
    if model.is_mllm()
        && let Value::Object(map) = &mut identity
    {
        map.insert("dtype".into(), json!(format!("{:?}", model.dtype)));
    }
    Ok(identity)
}

/// The identity of a base model: a scenes VLM's stored provenance, or, for a Hugging Face
/// model directory (an MLLM or a causal LM, trained elsewhere), CRC-32 of its `config.json` and each weight file's
/// name and size (hashing gigabytes of weights on every run would cost minutes).
pub fn base_model(dir: &Path) -> Result<Value> {
    if dir.join("vlm.json").is_file() || !dir.join("config.json").is_file() {
        return Ok(read(dir));
    }
    let config = dir.join("config.json");
    let bytes = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
    let mut weights = serde_json::Map::new();
    for file in crate::model::mllm::weights::weight_files(dir)? {
        let size = std::fs::metadata(&file)
            .map_err(|e| Error::io(&file, e))?
            .len();
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        weights.insert(name.unwrap_or_default(), json!(size));
    }
    Ok(json!({
        "kind": "mllm",
        "config.json": format!("{:08x}", crc32fast::hash(&bytes)),
        "weights": weights,
    }))
}

/// The provenance stored in `dir` (`null` when there is none).
pub fn read(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join(FILE))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null)
}

/// Whether `dir` holds a finished artifact (`dir/finished` exists) made by `wanted`. When it
/// does not, `dir` is cleared if another configuration made (or began) it, saying which
/// fields differ, and `wanted` is written there for the training about to run.
pub fn reusable(dir: &Path, finished: &str, wanted: &Value) -> Result<bool> {
    let stored = read(dir);
    if &stored == wanted {
        if dir.join(finished).is_file() {
            return Ok(true);
        }
        return Ok(false); // begun with this configuration: resume it
    }
    if dir.exists() {
        let changed = if stored.is_null() {
            "no provenance.json".to_string()
        } else {
            differences(&stored, wanted, "").join(", ")
        };
        eprintln!("{}: retraining ({changed})", dir.display());
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let text = serde_json::to_string_pretty(wanted).expect("JSON serializes");
    write_atomic(&dir.join(FILE), text.as_bytes())?;
    Ok(false)
}

/// The paths (`a.b.c`) at which two JSON values differ.
fn differences(a: &Value, b: &Value, at: &str) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    differences(
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        &path,
                    )
                })
                .collect()
        }
        _ if a == b => Vec::new(),
        _ => vec![if at.is_empty() {
            "everything".into()
        } else {
            at.to_string()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_reused_only_under_its_own_provenance() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vlm");
        let a = json!({"kind": "vlm", "train": {"steps": 3}});
        let b = json!({"kind": "vlm", "train": {"steps": 4}});
        assert!(!reusable(&dir, "model.bpk", &a).unwrap());
        std::fs::write(dir.join("checkpoint.bin"), b"x").unwrap();
        // Same provenance, not finished: resume (the checkpoint stays).
        assert!(!reusable(&dir, "model.bpk", &a).unwrap());
        assert!(dir.join("checkpoint.bin").is_file());
        std::fs::write(dir.join("model.bpk"), b"x").unwrap();
        assert!(reusable(&dir, "model.bpk", &a).unwrap());
        // Another configuration: cleared, and its provenance written.
        assert!(!reusable(&dir, "model.bpk", &b).unwrap());
        assert!(!dir.join("model.bpk").exists() && !dir.join("checkpoint.bin").exists());
        assert_eq!(read(&dir), b);
        assert_eq!(differences(&a, &b, ""), ["train.steps"]);
    }
}
