//! Checkpoints of a training run: `DIR/checkpoint/{model.bpk, optim.bpk, state.json}`, each
//! written to a temporary file and renamed, so an interrupted run never leaves a corrupt one.
//! `state.json` is written last: a checkpoint without it is incomplete and ignored.

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

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let c = dir.join("checkpoint");
    (
        c.join("model.bpk"),
        c.join("optim.bpk"),
        c.join("state.json"),
    )
}

pub fn save<M: Module>(
    dir: &Path,
    model: &M,
    optim: &ModuleOptimizer,
    state: &TrainState,
) -> Result<()> {
    let (model_path, optim_path, state_path) = paths(dir);
    let parent = model_path.parent().expect("a checkpoint directory");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    // The old state goes first, so a crash below leaves no state.json pointing at new weights.
    let _ = std::fs::remove_file(&state_path);
    let weights_error = |path: &Path, e: String| Error::Weights {
        path: path.to_path_buf(),
        reason: e,
    };
    save_module(model, &model_path)?;
    let tmp = temporary_sibling(&optim_path);
    optim
        .save(&tmp)
        .map_err(|e| weights_error(&optim_path, e.to_string()))?;
    crate::error::sync(&tmp)?;
    std::fs::rename(&tmp, &optim_path).map_err(|e| Error::io(&optim_path, e))?;
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    write_atomic(&state_path, json.as_bytes())
}

/// Loads the checkpoint in `dir` into `model` and `optim`, if there is a complete one.
pub fn load<M: Module>(
    dir: &Path,
    model: M,
    optim: ModuleOptimizer,
) -> Result<Option<(M, ModuleOptimizer, TrainState)>> {
    let (model_path, optim_path, state_path) = paths(dir);
    if !state_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: state_path.clone(),
        error: e,
    })?;
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

/// Writes `module` as a burnpack file through a temporary sibling and a rename.
pub fn save_module<M: Module>(module: &M, path: &Path) -> Result<()> {
    let tmp = temporary_sibling(path);
    module.clone().save_file(&tmp).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::error::sync(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
