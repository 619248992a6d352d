//! What the examples share: the models of a scenes experiment run to work on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use mmke::experiment::{load_preset, scenes::Workspace, tables};

/// The directory of a scenes experiment run: `arg` if given, else `runs/scenes/quick` if a
/// quick run trained its models there, else the models MSCKE Table 1 needs on the tests' tiny
/// preset, trained now under `scratch` (a few seconds; they know little, but every call is
/// the same).
pub fn run_dir(arg: Option<String>, scratch: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = arg {
        return Ok(PathBuf::from(dir));
    }
    let quick = PathBuf::from("runs/scenes/quick");
    if quick.join("scope-multimodal/model.bpk").is_file() {
        return Ok(quick);
    }
    eprintln!(
        "no quick run in {} (`mmke experiment mscke-table1 --preset quick`): training the tiny preset",
        quick.display()
    );
    let file = Path::new("tests/fixtures/tiny-scenes.toml");
    let preset: tables::Preset = load_preset("scenes", Some(file), "tiny")?;
    let needs = preset.needs(&preset.tables_of("mscke-table1")?)?;
    let device = burn::tensor::Device::flex();
    Workspace::new(&preset.models, None, None, scratch, &device)?.prepare(&needs)?;
    Ok(scratch.to_path_buf())
}

/// The scenes split an experiment generated under `dir`.
pub fn scenes_split(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("scenes-"))
        })
        .with_context(|| format!("no scenes split under {}", dir.display()))
}
