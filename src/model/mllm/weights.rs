//! Loading a Hugging Face model directory's weights: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` lists, in any float dtype (cast to the dtype asked for, f32
//! or half precision, as each tensor is read from the memory-mapped file), with key renamings for the layouts that differ from the
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
use crate::model::clip::weights::{check_applied, hf_name, more};

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

/// Loads every weight file of `dir` into `module` (see the module docs), every float tensor
/// cast to `dtype`.
pub fn load_dir<M: ModuleSnapshot>(
    mut module: M,
    dir: &Path,
    keys: &KeyMap,
    dtype: DType,
) -> Result<M> {
    let files = weight_files(dir)?;
    let mut applied = HashSet::new();
    let mut missing: Option<Vec<(String, String)>> = None;
    for file in &files {
        let weights_error = |reason: String| Error::Weights {
            path: file.clone(),
            reason,
        };
        let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype));
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
        check_applied(&result, file, keys.unused)?;
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

/// What a directory's weight files hold, read from their headers alone.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct WeightSummary {
    pub files: usize,
    pub tensors: usize,
    pub parameters: u64,
    /// Parameters per stored dtype (`F32`, `BF16`, ...).
    pub dtypes: std::collections::BTreeMap<String, u64>,
    pub bytes_on_disk: u64,
}

impl WeightSummary {
    /// Bytes the parameters take in memory at `bytes_per_parameter` (4 for f32, 2 for bf16).
    pub fn memory(&self, bytes_per_parameter: u64) -> u64 {
        self.parameters * bytes_per_parameter
    }
}

/// Sums the tensors of every weight file of `dir` from the safetensors headers (an 8-byte
/// little-endian length, then JSON: `{name: {dtype, shape, data_offsets}}`), without reading
/// the weights.
pub fn summary(dir: &Path) -> Result<WeightSummary> {
    use std::io::Read;
    let mut summary = WeightSummary::default();
    for file in weight_files(dir)? {
        let invalid = |reason: String| Error::Weights {
            path: file.clone(),
            reason,
        };
        let mut f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        let size = f.metadata().map_err(|e| Error::io(&file, e))?.len();
        let mut length = [0u8; 8];
        f.read_exact(&mut length)
            .map_err(|_| invalid("shorter than a safetensors header".into()))?;
        let length = u64::from_le_bytes(length);
        if length > size.saturating_sub(8) || length > 100 << 20 {
            return Err(invalid(format!(
                "header length {length} does not fit the file"
            )));
        }
        let mut header = vec![0u8; length as usize];
        f.read_exact(&mut header).map_err(|e| Error::io(&file, e))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| invalid(format!("unreadable header: {e}")))?;
        for (name, info) in header.iter().filter(|(n, _)| *n != "__metadata__") {
            let shape = info["shape"]
                .as_array()
                .ok_or_else(|| invalid(format!("tensor '{name}' has no shape")))?;
            let count: u64 = shape.iter().map(|d| d.as_u64().unwrap_or(0)).product();
            let dtype = info["dtype"].as_str().unwrap_or("?").to_string();
            summary.tensors += 1;
            summary.parameters += count;
            *summary.dtypes.entry(dtype).or_default() += count;
        }
        summary.files += 1;
        summary.bytes_on_disk += size;
    }
    Ok(summary)
}
