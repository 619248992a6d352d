//! Loading a Hugging Face model directory's weights: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, in any float dtype (cast to f32 as each tensor is
//! read from the memory-mapped file), with key renamings for the layouts that differ from the
//! module tree. Every parameter must be found with its shape and every tensor in the files
//! must be used (or be one the caller names as knowingly unused): anything else is an error
//! naming the tensor and the file.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use burn::store::{
    FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::DType;

use crate::error::{Error, Result};

/// The weight files of a model directory, in order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index.clone(),
            error: e,
        })?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::Weights {
                path: index.clone(),
                reason: "no \"weight_map\" object".into(),
            })?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(Error::Weights {
                path: missing.clone(),
                reason: format!("listed in {} but not there", index.display()),
            });
        }
        Ok(files)
    } else if single.is_file() {
        Ok(vec![single])
    } else {
        Err(Error::Weights {
            path: dir.to_path_buf(),
            reason: "no model.safetensors or model.safetensors.index.json".into(),
        })
    }
}

/// How a directory's keys relate to the module tree.
pub struct KeyMap<'a> {
    /// `(regex, replacement)` renamings from file keys to module paths, applied in order.
    pub renames: &'a [(&'a str, &'a str)],
    /// File keys (after renaming) that may be present and are deliberately not used.
    pub unused: &'a dyn Fn(&str) -> bool,
}

/// Loads every weight file of `dir` into `module` (see the module docs).
pub fn load_dir<M: ModuleSnapshot>(mut module: M, dir: &Path, keys: &KeyMap) -> Result<M> {
    let files = weight_files(dir)?;
    let mut applied = HashSet::new();
    let mut missing: Option<Vec<(String, String)>> = None;
    for file in &files {
        let weights_error = |reason: String| Error::Weights {
            path: file.clone(),
            reason,
        };
        let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
        let mut store = SafetensorsStore::from_file(file)
            .with_from_adapter(adapter)
            .allow_partial(true)
            .validate(false)
            .skip_enum_variants(true);
        for (from, to) in keys.renames {
            store = store.with_key_remapping(*from, *to);
        }
        let result = module
            .load_from(&mut store)
            .map_err(|e| weights_error(format!("cannot read safetensors: {e}")))?;
        if let Some(error) = result.errors.first() {
            return Err(weights_error(format!(
                "{error} (shapes in Burn's layout, where Linear weights are [in, out]){}",
                more(result.errors.len())
            )));
        }
        let unused: Vec<&String> = result
            .unused
            .iter()
            .filter(|k| !k.ends_with("position_ids") && !(keys.unused)(k))
            .collect();
        if let Some(key) = unused.first() {
            return Err(weights_error(format!(
                "unexpected tensor '{key}': the config describes no such parameter{}",
                more(unused.len())
            )));
        }
        applied.extend(result.applied);
        missing.get_or_insert(result.missing);
    }
    let missing: Vec<_> = missing
        .unwrap_or_default()
        .into_iter()
        .filter(|(path, _)| !applied.contains(path))
        .collect();
    if let Some((path, container)) = missing.first() {
        return Err(Error::Weights {
            path: dir.to_path_buf(),
            reason: format!(
                "missing tensor '{}' (in none of {}){}",
                hf_name(path, container),
                files
                    .iter()
                    .filter_map(|f| f.file_name())
                    .map(|f| f.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", "),
                more(missing.len())
            ),
        });
    }
    Ok(module)
}

/// The Hugging Face name of a module path: Burn's norm `gamma`/`beta` are `weight`/`bias`.
fn hf_name(path: &str, container: &str) -> String {
    if container.ends_with("Norm") {
        if let Some(stem) = path.strip_suffix(".gamma") {
            return format!("{stem}.weight");
        }
        if let Some(stem) = path.strip_suffix(".beta") {
            return format!("{stem}.bias");
        }
    }
    path.to_string()
}

fn more(count: usize) -> String {
    match count {
        0 | 1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    }
}
