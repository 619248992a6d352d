//! Runnable experiments: each reproduces a table or figure of the papers from a file under
//! `experiments/` that names its presets (`quick`: minutes on a 2-core CPU; `full`: the
//! larger run the papers' claims are checked on), and [`record`] writes each run's record to
//! `docs/results/`. Everything an experiment trains is cached in its output directory with
//! the configuration that made it ([`provenance`]), so a second run (or one resumed after a
//! kill) redoes only what is missing or was made by another configuration.

pub mod claims;
pub mod fusion_ablation;
pub mod provenance;
pub mod record;
pub mod scenes;
pub mod spec;
pub mod tables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::data::scenes::{self as scenes_data_set, ScenesConfig};
use crate::error::{Error, Result};
use crate::report::Table;

/// Every experiment, by the name of its command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Experiment {
    /// MSCKE Table 2: the scope classifier's fusions (a file of its own).
    FusionAblation,
    /// An editing experiment of `experiments/scenes.toml`, by name: the tables its preset's
    /// `[experiments]` lists, on the models its `[models]` define.
    Scenes(&'static str),
}

impl Experiment {
    pub const ALL: [Experiment; 10] = [
        Experiment::FusionAblation,
        Experiment::Scenes("mscke-table1"),
        Experiment::Scenes("mscke-table3"),
        Experiment::Scenes("mscke-table4"),
        Experiment::Scenes("unike-table1"),
        Experiment::Scenes("unike-table2"),
        Experiment::Scenes("unike-table3"),
        Experiment::Scenes("unike-table4"),
        Experiment::Scenes("unike-fig4"),
        Experiment::Scenes("unike-fig5"),
    ];

    /// The experiment called `name`.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Experiment::FusionAblation => "fusion-ablation",
            Experiment::Scenes(name) => name,
        }
    }

    /// The experiment file that holds its presets, and the name of its default output
    /// directory: the experiments that share models share both.
    pub fn file(self) -> &'static str {
        match self {
            Experiment::FusionAblation => "fusion-ablation",
            Experiment::Scenes(_) => "scenes",
        }
    }
}

/// What a run of an experiment produced under its output directory.
pub struct Outcome {
    /// The tables, each with the stem of its files (`{stem}.{md,csv,json,png}`).
    pub tables: Vec<(String, Table)>,
    /// Markdown that goes with the tables (per-run details).
    pub notes: String,
    /// Further files it wrote there (figures).
    pub figures: Vec<String>,
    /// What the papers claim of its tables, checked (by table stem).
    pub claims: Vec<(String, claims::Checked)>,
    /// The preset it ran, as it was read.
    pub preset: serde_json::Value,
}

/// Runs `experiment` with preset `preset` (read by [`load_preset`] from `file`) into `out`,
/// on `data` instead of the preset's scenes split when given.
pub fn run(
    experiment: Experiment,
    preset: &str,
    file: Option<&Path>,
    data: Option<&Path>,
    model: Option<&crate::edit::speaker::ModelDir>,
    out: &Path,
    device: &burn::tensor::Device,
) -> Result<Outcome> {
    let name = experiment.file();
    match experiment {
        Experiment::FusionAblation => {
            if let Some(model) = model {
                return Err(Error::Config {
                    path: model.path.clone(),
                    reason: "fusion-ablation compares scope classifiers: it has no base model \
                             to replace (leave out --model)"
                        .into(),
                });
            }
            let preset: fusion_ablation::Preset = load_preset(name, file, preset)?;
            let (table, results) = fusion_ablation::run(&preset, data, out, device)?;
            let stem = experiment.name().to_string();
            let claims = preset
                .claims
                .iter()
                .map(|c| Ok((stem.clone(), c.check(&table)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok(Outcome {
                tables: vec![(stem, table)],
                notes: fusion_ablation::details_markdown(&results),
                figures: Vec::new(),
                claims,
                preset: to_json(&preset),
            })
        }
        Experiment::Scenes(which) => {
            let preset: tables::Preset = load_preset(name, file, preset)?;
            let produced = tables::run(which, &preset, data, model, out, device)?;
            Ok(Outcome {
                tables: produced.tables,
                notes: String::new(),
                figures: produced.figures,
                claims: produced.claims,
                preset: to_json(&preset),
            })
        }
    }
}

fn to_json(preset: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(preset).expect("a preset serializes")
}

/// An experiment file: a description and named presets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile<P> {
    pub description: String,
    pub presets: BTreeMap<String, P>,
}

/// The experiment files shipped with mmke, used when `experiments/{name}.toml` is not in the
/// working directory.
const BUILTIN: [(&str, &str); 2] = [
    (
        "fusion-ablation",
        include_str!("../../experiments/fusion-ablation.toml"),
    ),
    ("scenes", include_str!("../../experiments/scenes.toml")),
];

/// Reads preset `preset` of experiment `name`: from `file` if given, else from
/// `experiments/{name}.toml` if present, else from the copy built into mmke.
pub fn load_preset<P: DeserializeOwned>(
    name: &str,
    file: Option<&Path>,
    preset: &str,
) -> Result<P> {
    let default = PathBuf::from(format!("experiments/{name}.toml"));
    let (path, text) = match file {
        Some(path) => (path.to_path_buf(), read(path)?),
        None if default.is_file() => (default.clone(), read(&default)?),
        None => {
            let text = BUILTIN
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t.to_string())
                .ok_or_else(|| Error::Config {
                    path: default.clone(),
                    reason: format!("no experiment '{name}'"),
                })?;
            (PathBuf::from(format!("<built-in>/{name}.toml")), text)
        }
    };
    let config_error = |reason: String| Error::Config {
        path: path.clone(),
        reason,
    };
    let mut file: ExperimentFile<toml::Table> =
        toml::from_str(&text).map_err(|e| config_error(e.to_string()))?;
    let presets = std::mem::take(&mut file.presets)
        .into_iter()
        .map(|(name, preset)| (name, toml::Value::Table(preset)))
        .collect();
    let mut resolved = spec::resolve_preset(&presets, preset).map_err(config_error)?;
    for map in ["methods", "models.classifiers"] {
        spec::resolve_bases(&mut resolved, map).map_err(config_error)?;
    }
    P::deserialize(toml::Value::Table(resolved))
        .map_err(|e| config_error(format!("preset '{preset}': {e}")))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Creates `out` and returns the data directory: `data` if the user gave one, else the
/// scenes split of `scenes` cached under `out`.
pub fn data_dir(out: &Path, data: Option<&Path>, scenes: &ScenesConfig) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    match data {
        Some(dir) => Ok(dir.to_path_buf()),
        None => scenes_data(out, scenes),
    }
}

/// A VLM of an experiment: its preset and how it is trained.
pub struct VlmSpec<'a> {
    pub preset: &'a str,
    pub train: &'a crate::train::vlm::VlmTrainConfig,
}

/// `models/vlm` (the base model) and `models/counterfactual`, each trained unless already
/// there, on the split [`knowledge_dir`] picks (generated under `out`), their vision tower
/// from `clip_dir`; the two train side by side on two threads.
#[allow(clippy::too_many_arguments)]
pub fn trained_vlms(
    out: &Path,
    models: &Path,
    user_data: Option<&Path>,
    data: &ScenesConfig,
    knowledge: Option<&ScenesConfig>,
    data_dir: &Path,
    clip_dir: &Path,
    image_size: usize,
    base: VlmSpec,
    counterfactual: VlmSpec,
    train_device: &burn::tensor::Device,
) -> Result<()> {
    use crate::train::vlm::Knowledge;
    let knowledge_dir = knowledge_dir(out, user_data, data, knowledge, data_dir)?;
    // The two are independent and a small model's training keeps about one core busy: they
    // train side by side, each exactly as it would alone.
    std::thread::scope(|scope| {
        let trainings = [
            ("vlm", Knowledge::PreEdit, base),
            ("counterfactual", Knowledge::Counterfactual, counterfactual),
        ]
        .map(|(name, kind, spec)| {
            let knowledge_dir = &knowledge_dir;
            scope.spawn(move || {
                trained_vlm(
                    models,
                    name,
                    kind,
                    spec.preset,
                    image_size,
                    clip_dir,
                    knowledge_dir,
                    spec.train,
                    train_device,
                )
            })
        });
        for training in trainings {
            training.join().expect("a VLM training thread panicked")?;
        }
        Ok(())
    })
}

/// `out/{name}`, a VLM trained on `knowledge` of `data_dir` by `config` (its vision tower
/// from `clip_dir`) unless it is already there.
#[allow(clippy::too_many_arguments)]
fn trained_vlm(
    out: &Path,
    name: &str,
    knowledge: crate::train::vlm::Knowledge,
    preset: &str,
    image_size: usize,
    clip_dir: &Path,
    data_dir: &Path,
    config: &crate::train::vlm::VlmTrainConfig,
    train_device: &burn::tensor::Device,
) -> Result<PathBuf> {
    let dir = out.join(name);
    let wanted = serde_json::json!({
        "kind": name,
        "knowledge": format!("{knowledge:?}"),
        "preset": preset,
        "image_size": image_size,
        "train": config,
        "clip": provenance::read(clip_dir),
        "data": provenance::data(data_dir)?,
    });
    if !provenance::reusable(&dir, "model.bpk", &wanted)? {
        let exact = crate::train::vlm::run(
            knowledge,
            preset,
            image_size,
            Some(clip_dir),
            data_dir,
            config,
            &dir,
            true,
            train_device,
        )?;
        eprintln!("{name}: test exact match {:.2}%", 100.0 * exact);
    }
    Ok(dir)
}

/// `out/{name}`, a scope classifier trained by `config` unless it is already there.
pub fn trained_scope(
    out: &Path,
    name: &str,
    config: &crate::train::scope::ScopeRunConfig,
    clip_dir: &Path,
    data_dir: &Path,
    train_device: &burn::tensor::Device,
) -> Result<PathBuf> {
    let dir = out.join(name);
    let wanted = serde_json::json!({
        "kind": "scope",
        "config": config,
        "clip": provenance::read(clip_dir),
        "data": provenance::data(data_dir)?,
    });
    if !provenance::reusable(&dir, "model.bpk", &wanted)? {
        crate::train::scope::run(config, clip_dir, data_dir, &dir, true, train_device)?;
    }
    Ok(dir)
}

/// The split the VLMs learn from: `knowledge` when given (it must extend `data`: same seed,
/// test count and image size, at least as many train records), else `data_dir`.
fn knowledge_dir(
    out: &Path,
    user_data: Option<&Path>,
    data: &ScenesConfig,
    knowledge: Option<&ScenesConfig>,
    data_dir: &Path,
) -> Result<PathBuf> {
    match (user_data, knowledge) {
        (None, Some(knowledge)) => {
            if (knowledge.seed, knowledge.test, knowledge.image_size)
                != (data.seed, data.test, data.image_size)
                || knowledge.train < data.train
            {
                return Err(Error::Config {
                    path: out.to_path_buf(),
                    reason: "the knowledge split must extend the data split: same seed, test \
                             count and image size, at least as many train records"
                        .into(),
                });
            }
            scenes_data(out, knowledge)
        }
        _ => Ok(data_dir.to_path_buf()),
    }
}

/// `out/{preset}`, a CLIP pre-trained on scenes by `config` unless it is already there.
pub fn pretrained_clip(
    out: &Path,
    preset: &str,
    image_size: usize,
    config: &crate::train::clip::ClipTrainConfig,
    train_device: &burn::tensor::Device,
) -> Result<PathBuf> {
    let dir = out.join(preset);
    let wanted = serde_json::json!({
        "kind": "clip",
        "preset": preset,
        "image_size": image_size,
        "train": config,
        "scenes_generator": scenes_data_set::GENERATOR_VERSION,
    });
    if !provenance::reusable(&dir, "model.safetensors", &wanted)? {
        eprintln!("pre-training {preset} -> {}", dir.display());
        crate::train::clip::pretrain(preset, image_size, config, &dir, true, train_device)?;
    }
    Ok(dir)
}

/// The scenes split of `config` under `cache` (generated once, reused while its `meta.json`
/// records the same config).
pub fn scenes_data(cache: &Path, config: &ScenesConfig) -> Result<PathBuf> {
    let dir = cache.join(format!(
        "scenes-seed{}-train{}-test{}-{}px",
        config.seed, config.train, config.test, config.image_size
    ));
    let meta = dir.join("meta.json");
    let cached = std::fs::read_to_string(&meta)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|meta| serde_json::from_value::<ScenesConfig>(meta["config"].clone()).ok());
    if cached.as_ref() != Some(config) {
        eprintln!("generating {}", dir.display());
        scenes_data_set::write(&dir, config)?;
    }
    Ok(dir)
}

/// `models/{name}`: the hypernetwork meta-trained for the base model `models/vlm` on the
/// edits of `data_dir`'s train split, unless it is already there (an interrupted run resumes).
pub fn trained_hypernet<N: crate::edit::mend::Hypernetwork>(
    models: &Path,
    base: &crate::edit::speaker::ModelDir,
    name: &str,
    config: &N::Config,
    train: &crate::train::meta::MetaTrainConfig,
    data_dir: &Path,
    train_device: &burn::tensor::Device,
) -> Result<PathBuf> {
    let dir = models.join(name);
    let wanted = serde_json::json!({
        "kind": N::NAME,
        "config": config,
        "train": train,
        "vlm": provenance::edited_model(base)?,
        "data": provenance::data(data_dir)?,
    });
    if !provenance::reusable(&dir, &format!("{}.bpk", N::NAME), &wanted)? {
        let losses =
            crate::train::meta::run::<N>(base, data_dir, config, train, &dir, true, train_device)?;
        eprintln!(
            "{name}: edit loss {:.4} -> {:.4} after the update, locality KL {:.4}",
            losses.before, losses.after, losses.locality_kl
        );
    }
    Ok(dir)
}
