//! Loading and saving CLIP weights in Hugging Face's safetensors layout, through burn-store.
//!
//! `PyTorchToBurnAdapter` transposes `Linear` weights and maps LayerNorm `weight`/`bias` to
//! Burn's `gamma`/`beta`; `FloatCastAdapter` turns f16/bf16/f64 files into f32; and
//! [`ScalarAdapter`] reshapes the rank-0 `logit_scale` to Burn's `[1]` and back. Every
//! tensor the model needs must be in the file with its shape, and every tensor in the file
//! must be used (only the `position_ids` buffers older exports carry are ignored): anything
//! else is an error naming the tensor and the file.

use std::path::Path;

use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleContext, ModuleSnapshot,
    PyTorchToBurnAdapter, SafetensorsStore,
};
use burn::tensor::DType;

use super::{ClipConfig, ClipModel};
use crate::error::{Error, Result, write_atomic};

/// The key of CLIP's temperature, a rank-0 tensor in Hugging Face files.
const LOGIT_SCALE: &str = "logit_scale";

/// Reshapes `logit_scale` between the file's rank-0 tensor and the module's `[1]`.
#[derive(Clone, Copy, Debug)]
struct ScalarAdapter {
    rank0_in_file: bool,
}

impl ModuleAdapter for ScalarAdapter {
    fn adapt(&self, mut tensor: PackTensor, _ctx: ModuleContext<'_>) -> PackTensor {
        let is_logit_scale = tensor.name == LOGIT_SCALE || tensor.name.ends_with(".logit_scale");
        if is_logit_scale && tensor.shape.num_elements() == 1 {
            // Same bytes, another shape: no byte length changes.
            tensor.shape = if self.rank0_in_file {
                [1].into()
            } else {
                burn::tensor::Shape::new([]).into()
            };
        }
        tensor
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(*self)
    }
}

impl ClipModel {
    /// Loads `model.safetensors` (Hugging Face keys) into this model, whose sizes must match.
    pub fn load_safetensors(self, path: &Path) -> Result<Self> {
        load_safetensors(self, path)
    }

    /// Writes `model.safetensors` and `config.json` into `dir` in the layout `transformers`'
    /// `CLIPModel.from_pretrained` reads. Both files are written atomically.
    pub fn save_pretrained(&self, config: &ClipConfig, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        save_safetensors(self, &dir.join("model.safetensors"))?;
        let json = serde_json::to_string_pretty(&config.to_hf_json())
            .expect("a JSON value always serializes");
        write_atomic(&dir.join("config.json"), json.as_bytes())
    }
}

/// Loads a safetensors file in PyTorch layout into `module`: every parameter must be present
/// with its shape and every tensor in the file must be used (old `position_ids` buffers
/// aside), else an error names the tensor and the file.
pub fn load_safetensors<M: ModuleSnapshot>(module: M, path: &Path) -> Result<M> {
    load_safetensors_ignoring(module, path, &[])
}

/// [`load_safetensors`], where the tensors named in `ignored` may be in the file unused (a
/// tied LM head's stored copy, for instance).
pub fn load_safetensors_ignoring<M: ModuleSnapshot>(
    mut module: M,
    path: &Path,
    ignored: &[&str],
) -> Result<M> {
    let weights_error = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(weights_error("no such weights file".into()));
    }
    let adapter = PyTorchToBurnAdapter
        .chain(FloatCastAdapter::to(DType::F32))
        .chain(ScalarAdapter {
            rank0_in_file: true,
        });
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(adapter)
        .allow_partial(true)
        .validate(false);
    let result = module
        .load_from(&mut store)
        .map_err(|e| weights_error(format!("cannot read safetensors: {e}")))?;
    check_applied(&result, path, &|k| ignored.contains(&k))?;
    if let Some((missing, container)) = result.missing.first() {
        return Err(weights_error(format!(
            "missing tensor '{}'{}",
            hf_name(missing, container),
            more(result.missing.len())
        )));
    }
    Ok(module)
}

/// The errors of loading one file: a tensor that failed (its shape), or one in the file the
/// module has no place for (unless `unused` allows it, or it is an old `position_ids`
/// buffer). Missing tensors are the caller's to judge (a shard holds only some).
pub(crate) fn check_applied(
    result: &burn::store::ApplyResult,
    path: &Path,
    unused: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let weights_error = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(error) = result.errors.first() {
        return Err(weights_error(format!(
            "{error} (shapes in Burn's layout, where Linear weights are [in, out]){}",
            more(result.errors.len())
        )));
    }
    let unexpected: Vec<_> = result
        .unused
        .iter()
        .filter(|k| !k.ends_with("position_ids") && !unused(k))
        .collect();
    if let Some(key) = unexpected.first() {
        return Err(weights_error(format!(
            "unexpected tensor '{key}': the config describes no such parameter{}",
            more(unexpected.len())
        )));
    }
    Ok(())
}

/// Writes `module` as safetensors in PyTorch layout (Linear weights `[out, in]`, LayerNorm
/// `weight`/`bias`, rank-0 `logit_scale`), atomically, with the `format=pt` metadata
/// `transformers` requires.
pub fn save_safetensors<M: ModuleSnapshot>(module: &M, path: &Path) -> Result<()> {
    let adapter = BurnToPyTorchAdapter.chain(ScalarAdapter {
        rank0_in_file: false,
    });
    let tmp = crate::error::temporary_sibling(path);
    let mut store = SafetensorsStore::from_file(&tmp)
        .with_to_adapter(adapter)
        .metadata("format", "pt")
        .overwrite(true);
    module.save_into(&mut store).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: format!("cannot write: {e}"),
    })?;
    crate::error::sync(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The Hugging Face name of a module path: Burn's norms' `gamma`/`beta` are `weight`/`bias`.
pub(crate) fn hf_name(path: &str, container: &str) -> String {
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

pub(crate) fn more(count: usize) -> String {
    match count {
        0 | 1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    }
}
