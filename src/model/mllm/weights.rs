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

/// How many bytes of a file one pass reads at most (a pass maps the file, reads its group of
/// tensors and unmaps it, so the file's pages never all count in memory at once).
pub const GROUP_BYTES: u64 = 32 << 20;

/// Loads every weight file of `dir` into `module` (see the module docs), every float tensor
/// cast to `dtype`. A file is read in groups of whole layers of about `group_bytes`
/// ([`GROUP_BYTES`]), each by its own pass over a fresh memory map: the peak memory is the
/// loaded weights plus one group's pages and copies, not the weights plus the whole file.
pub fn load_dir<M: ModuleSnapshot>(
    mut module: M,
    dir: &Path,
    keys: &KeyMap,
    dtype: DType,
    group_bytes: u64,
) -> Result<M> {
    let files = weight_files(dir)?;
    let remapper = burn::store::KeyRemapper::from_patterns(keys.renames.to_vec())
        .expect("the renaming patterns are valid regexes");
    let renames = remapper.to_regex_pairs();
    let mut applied = HashSet::new();
    let mut skipped = HashSet::new();
    let mut missing: Option<Vec<(String, String)>> = None;
    for file in &files {
        let weights_error = |reason: String| Error::Weights {
            path: file.clone(),
            reason,
        };
        // The module paths of the file's tensors, grouped by layer prefix.
        let renamed: Vec<(String, u64)> = header(file)?
            .into_iter()
            .map(|t| {
                let name = renames.iter().fold(t.name, |name, (re, to)| {
                    re.replace_all(&name, to.as_str()).into_owned()
                });
                (name, t.bytes)
            })
            .collect();
        for (i, group) in groups(&renamed, group_bytes).into_iter().enumerate() {
            let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype));
            let mut store = SafetensorsStore::from_file(file)
                .with_from_adapter(adapter)
                .allow_partial(true)
                .validate(false)
                .skip_enum_variants(true)
                .with_regex(group);
            for (from, to) in keys.renames {
                store = store.with_key_remapping(*from, *to);
            }
            let result = module
                .load_from(&mut store)
                .map_err(|e| weights_error(format!("cannot read safetensors: {e}")))?;
            if i == 0 {
                check_applied(&result, file, keys.unused)?;
            } else if let Some(error) = result.errors.first() {
                return Err(weights_error(format!("{error}")));
            }
            applied.extend(result.applied);
            skipped.extend(result.skipped);
            missing.get_or_insert(result.missing);
        }
    }
    // Found in a file but in none of the groups that were read: a grouping bug, never silent.
    if let Some(path) = skipped.iter().find(|p| !applied.contains(*p)) {
        return Err(Error::Weights {
            path: dir.to_path_buf(),
            reason: format!("tensor '{path}' was found but not loaded"),
        });
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

/// Sums the tensors of every weight file of `dir` from the safetensors headers, without
/// reading the weights.
pub fn summary(dir: &Path) -> Result<WeightSummary> {
    let mut summary = WeightSummary::default();
    for file in weight_files(dir)? {
        for tensor in header(&file)? {
            summary.tensors += 1;
            summary.parameters += tensor.elements;
            *summary.dtypes.entry(tensor.dtype).or_default() += tensor.elements;
        }
        summary.files += 1;
        summary.bytes_on_disk += std::fs::metadata(&file)
            .map_err(|e| Error::io(&file, e))?
            .len();
    }
    Ok(summary)
}

/// One tensor of a safetensors header.
struct HeaderTensor {
    name: String,
    dtype: String,
    elements: u64,
    bytes: u64,
}

/// The tensors a safetensors file declares: an 8-byte little-endian length, then JSON
/// `{name: {dtype, shape, data_offsets}}`.
fn header(file: &Path) -> Result<Vec<HeaderTensor>> {
    use std::io::Read;
    let invalid = |reason: String| Error::Weights {
        path: file.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let size = f.metadata().map_err(|e| Error::io(file, e))?.len();
    let mut length = [0u8; 8];
    f.read_exact(&mut length)
        .map_err(|_| invalid("shorter than a safetensors header".into()))?;
    let length = u64::from_le_bytes(length);
    if length > size.saturating_sub(8) || length > 100 << 20 {
        return Err(invalid(format!(
            "header length {length} does not fit the file"
        )));
    }
    let mut bytes = vec![0u8; length as usize];
    f.read_exact(&mut bytes).map_err(|e| Error::io(file, e))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("unreadable header: {e}")))?;
    header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let shape = info["shape"]
                .as_array()
                .ok_or_else(|| invalid(format!("tensor '{name}' has no shape")))?;
            let offsets = info["data_offsets"].as_array();
            let offset = |i: usize| offsets.and_then(|o| o.get(i)).and_then(|v| v.as_u64());
            Ok(HeaderTensor {
                name: name.clone(),
                dtype: info["dtype"].as_str().unwrap_or("?").to_string(),
                elements: shape.iter().map(|d| d.as_u64().unwrap_or(0)).product(),
                bytes: offset(1)
                    .unwrap_or(0)
                    .saturating_sub(offset(0).unwrap_or(0)),
            })
        })
        .collect()
}

/// Regexes over module paths, each matching whole layers (a key's prefix up to its layer
/// index, or its module outside layer stacks) of about `group_bytes` in all.
fn groups(tensors: &[(String, u64)], group_bytes: u64) -> Vec<String> {
    let mut prefixes: Vec<(String, u64)> = Vec::new();
    for (name, bytes) in tensors {
        let parts: Vec<&str> = name.split('.').collect();
        // Up to a layer index; outside layer stacks, the tensor's module.
        let cut = parts
            .iter()
            .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(parts.len().saturating_sub(1), |i| i + 1);
        let prefix = parts[..cut.max(1)].join(".");
        match prefixes.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, total)) => *total += bytes,
            None => prefixes.push((prefix, *bytes)),
        }
    }
    let mut groups: Vec<(Vec<String>, u64)> = Vec::new();
    for (prefix, bytes) in prefixes {
        match groups.last_mut() {
            Some((members, total)) if *total + bytes <= group_bytes => {
                members.push(prefix);
                *total += bytes;
            }
            _ => groups.push((vec![prefix], bytes)),
        }
    }
    groups
        .into_iter()
        .map(|(members, _)| {
            let alternatives: Vec<String> = members.iter().map(|m| m.replace('.', r"\.")).collect();
            // A prefix is a whole path component: `layers.1` is not `layers.10`.
            format!(r"^({})(\.|$)", alternatives.join("|"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::groups;

    #[test]
    fn groups_hold_whole_layers_and_match_whole_components() {
        let tensors: Vec<(String, u64)> = [
            ("query_tokens", 10),
            ("language_model.model.layers.1.mlp.up_proj.weight", 40),
            ("language_model.model.layers.1.input_layernorm.weight", 5),
            ("language_model.model.layers.10.mlp.up_proj.weight", 40),
            ("language_model.model.norm.weight", 5),
        ]
        .iter()
        .map(|(n, b)| (n.to_string(), *b))
        .collect();
        assert_eq!(
            groups(&tensors, 50),
            [
                r"^(query_tokens)(\.|$)",
                r"^(language_model\.model\.layers\.1)(\.|$)",
                r"^(language_model\.model\.layers\.10|language_model\.model\.norm)(\.|$)",
            ]
        );
        let everything = groups(&tensors, u64::MAX);
        assert_eq!(everything.len(), 1);
    }
}
