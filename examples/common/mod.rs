//! What the examples share: the models of an MSCKE Table 1 run to work on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use mmke::experiment::{load_preset, mscke_table1};

/// The directory of an `mscke-table1` run: `arg` if given, else `runs/mscke-table1/quick` if
/// a quick run is there, else the tests' tiny preset trained now under `scratch` (a few
/// seconds; its models know little, but every call is the same).
pub fn run_dir(arg: Option<String>, scratch: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = arg {
        return Ok(PathBuf::from(dir));
    }
    let quick = PathBuf::from("runs/mscke-table1/quick");
    if quick.join("counterfactual/model.bpk").is_file() {
        return Ok(quick);
    }
    eprintln!(
        "no quick run in {} (`mmke experiment mscke-table1 --preset quick`): training the tiny preset",
        quick.display()
    );
    let preset: mscke_table1::Preset = load_preset(
        "mscke-table1",
        Some(Path::new("tests/fixtures/tiny-mscke.toml")),
        "tiny",
    )?;
    mscke_table1::prepare(&preset, None, scratch, &burn::tensor::Device::flex())?;
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
