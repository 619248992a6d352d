//! Checkpoints of a training run: `DIR/checkpoint/{model-STEP.bpk, optim-STEP.bpk, state.json}`.
//! Each file is written to a temporary sibling, flushed and renamed; `state.json` (naming the
//! step) is replaced last and the files of older steps are removed after it. A run killed at
//! any moment therefore leaves a `state.json` that names a complete pair of files: the new
//! checkpoint, or the previous one.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, temporary_sibling, write_atomic};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Steps completed.
    pub step: usize,
}

fn checkpoint_dir(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

/// The weights and optimizer files of the checkpoint at `step`.
fn files(dir: &Path, step: usize) -> (PathBuf, PathBuf) {
    let c = checkpoint_dir(dir);
    (
        c.join(format!("model-{step}.bpk")),
        c.join(format!("optim-{step}.bpk")),
    )
}

pub fn save<M: Module>(
    dir: &Path,
    model: &M,
    optim: &ModuleOptimizer,
    state: &TrainState,
) -> Result<()> {
    let parent = checkpoint_dir(dir);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let (model_path, optim_path) = files(dir, state.step);
    crate::error::save_module(model, &model_path)?;
    let tmp = temporary_sibling(&optim_path);
    optim.save(&tmp).map_err(|e| Error::Weights {
        path: optim_path.clone(),
        reason: e.to_string(),
    })?;
    crate::error::sync(&tmp)?;
    std::fs::rename(&tmp, &optim_path).map_err(|e| Error::io(&optim_path, e))?;
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    write_atomic(&parent.join("state.json"), json.as_bytes())?;
    // Only now are the older files unreferenced (and leftovers of killed saves).
    let keep = [model_path.file_name(), optim_path.file_name()];
    for entry in std::fs::read_dir(&parent).map_err(|e| Error::io(&parent, e))? {
        let entry = entry.map_err(|e| Error::io(&parent, e))?;
        let name = entry.file_name();
        if name != "state.json" && !keep.contains(&Some(name.as_os_str())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Loads the checkpoint in `dir` into `model` and `optim`, if there is one.
pub fn load<M: Module>(
    dir: &Path,
    model: M,
    optim: ModuleOptimizer,
) -> Result<Option<(M, ModuleOptimizer, TrainState)>> {
    let state_path = checkpoint_dir(dir).join("state.json");
    if !state_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: state_path.clone(),
        error: e,
    })?;
    let (model_path, optim_path) = files(dir, state.step);
    let model = model
        .try_load_file(&model_path)
        .map_err(|e| Error::Weights {
            path: model_path.clone(),
            reason: e.to_string(),
        })?;
    let optim = optim.load(&optim_path).map_err(|e| Error::Weights {
        path: optim_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some((model, optim, state)))
}
