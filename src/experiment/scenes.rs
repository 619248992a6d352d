//! The models the editing experiments share, defined once per preset (`[presets.P.models]` of
//! `experiments/scenes.toml`), and the workspace that trains each of them when a table first
//! needs it (reusing what its output directory holds when the same configuration made it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::provenance;
use crate::data::record::EditRecord;
use crate::data::scenes::ScenesConfig;
use crate::edit::ke::{Ke, KeConfig};
use crate::edit::mend::{Mend, MendConfig};
use crate::edit::method::{Method, Models};
use crate::edit::speaker::{ModelDir, Speaker};
use crate::edit::unike::{Prepared, edited_layers};
use crate::error::{Error, Result};
use crate::train::clip::ClipTrainConfig;
use crate::train::knowledge::KnowledgeConfig;
use crate::train::meta::MetaTrainConfig;
use crate::train::scope::ScopeRunConfig;
use crate::train::vlm::VlmTrainConfig;

/// A CLIP pre-trained on scenes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipSpec {
    pub preset: String,
    pub image_size: usize,
    pub train: ClipTrainConfig,
}

/// A VLM of a preset and how it is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlmSpec {
    pub preset: String,
    pub train: VlmTrainConfig,
}

/// A meta-trained editing network (MEND's or KE's) for a base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum NetworkSpec {
    Mend {
        config: MendConfig,
        train: MetaTrainConfig,
    },
    Ke {
        config: KeConfig,
        train: MetaTrainConfig,
    },
}

/// A second base model (MSCKE Table 3) with its counterfactual model and networks, under
/// `transfer/` of the output directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferSpec {
    /// A CLIP of its own for its vision tower; when absent it shares the first base model's
    /// (as MiniGPT-4 reads BLIP-2's vision encoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<ClipSpec>,
    pub vlm: VlmSpec,
    pub counterfactual: VlmSpec,
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkSpec>,
}

/// Every model of a preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsSpec {
    /// The scenes split the edits come from.
    pub data: ScenesConfig,
    /// A larger split the base and counterfactual VLMs learn from (same seed and test count,
    /// so its first records and its test split are `data`'s): a base model knows more of the
    /// world than the edits it is evaluated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge_data: Option<ScenesConfig>,
    pub clip: ClipSpec,
    pub vlm: VlmSpec,
    pub counterfactual: VlmSpec,
    /// Scope classifiers by name (SERAC's text-only one, MSCKE's multimodal one, ...).
    #[serde(default)]
    pub classifiers: BTreeMap<String, ScopeRunConfig>,
    /// MEND's and KE's networks by name, for the base model.
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkSpec>,
    /// UniKE's knowledge memory and encoders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knowledge: Option<KnowledgeConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferSpec>,
}

/// Which base model a method is built on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Base {
    First,
    Transfer,
}

/// What a set of tables needs trained.
#[derive(Clone, Debug, Default)]
pub struct Needs {
    pub classifiers: BTreeSet<String>,
    pub networks: BTreeSet<(String, bool)>,
    pub transfer: bool,
    /// UniKE's knowledge, for this many edited layers.
    pub knowledge_layers: Option<usize>,
}

impl Needs {
    /// Adds what `method` needs on `base`.
    pub fn method(&mut self, method: &Method, base: Base) -> Result<()> {
        let transfer = base == Base::Transfer;
        self.transfer |= transfer;
        match method {
            Method::Serac { classifier }
            | Method::Mscke {
                classifier,
                mend: None,
            } => {
                self.classifiers.insert(classifier.clone());
            }
            Method::Mscke {
                classifier,
                mend: Some(network),
            } => {
                self.classifiers.insert(classifier.clone());
                self.networks.insert((network.clone(), transfer));
            }
            Method::Mend { network } | Method::Ke { network } => {
                self.networks.insert((network.clone(), transfer));
            }
            Method::UniKe(config) => self.knowledge(config.layers)?,
            Method::FtLlm { .. }
            | Method::FtVisual { .. }
            | Method::Ike { .. }
            | Method::TPatcher(_) => {}
        }
        Ok(())
    }

    /// UniKE's knowledge for `layers` edited layers (one count per run).
    pub fn knowledge(&mut self, layers: usize) -> Result<()> {
        match self.knowledge_layers {
            Some(n) if n != layers => Err(Error::Config {
                path: PathBuf::from("experiments"),
                reason: format!(
                    "UniKE methods edit {n} and {layers} layers: the knowledge memory is built \
                     for one count per run"
                ),
            }),
            _ => {
                self.knowledge_layers = Some(layers);
                Ok(())
            }
        }
    }
}

/// An output directory and the models trained in it.
pub struct Workspace {
    pub out: PathBuf,
    pub data_dir: PathBuf,
    spec: ModelsSpec,
    user_data: Option<PathBuf>,
    /// A Hugging Face MLLM directory that replaces the first base model (and its
    /// counterfactual VLM) when given.
    model: Option<ModelDir>,
    /// Every test edit, in order.
    pub test: Vec<EditRecord>,
    /// The training edits (IKE's demonstrations, T-Patcher's and UniKE's pools).
    pub pool: Vec<EditRecord>,
    pub knowledge: Option<Prepared>,
    pub device: Device,
    train_device: Device,
}

impl Workspace {
    /// The workspace in `out` for `spec`, on `data` (FGVEdit files) instead of the preset's
    /// scenes split when given; generates the split when it is not there yet.
    pub fn new(
        spec: &ModelsSpec,
        data: Option<&Path>,
        model: Option<&ModelDir>,
        out: &Path,
        device: &Device,
    ) -> Result<Self> {
        let data_dir = super::data_dir(out, data, &spec.data)?;
        let test = crate::data::read_edits(&data_dir.join("test.json"), &data_dir)?.records;
        let pool = crate::data::read_edits(&data_dir.join("train.json"), &data_dir)?.records;
        let device = device.clone().without_autodiff();
        Ok(Self {
            out: out.to_path_buf(),
            data_dir,
            spec: spec.clone(),
            user_data: data.map(Path::to_path_buf),
            model: model.cloned(),
            test,
            pool,
            knowledge: None,
            train_device: device.clone().autodiff(),
            device,
        })
    }

    /// The directory of the base model `base` and of what was trained for it.
    pub fn base_dir(&self, base: Base) -> PathBuf {
        match base {
            Base::First => self.out.clone(),
            Base::Transfer => self.out.join("transfer"),
        }
    }

    /// The base model `base`: the scenes VLM trained in its directory, or the model given.
    pub fn base_model(&self, base: Base) -> ModelDir {
        match (&self.model, base) {
            (Some(model), Base::First) => model.clone(),
            _ => ModelDir::f32(self.base_dir(base).join("vlm")),
        }
    }

    /// What methods are built from on `base` (beside a given MLLM, the counterfactual model
    /// reads its visual tokens: see [`crate::edit::method::Method::build`]).
    pub fn models(&self, base: Base) -> Models<'_> {
        let dir = self.base_dir(base);
        Models {
            base: self.base_model(base),
            networks: dir.clone(),
            counterfactual: dir.join("counterfactual"),
            counterfactual_lm: dir.join("counterfactual-lm"),
            classifiers: self.out.clone(),
            pool: &self.pool,
            knowledge: self.knowledge.as_ref(),
        }
    }

    /// Trains what `needs` asks for and is not there yet: the CLIP, the classifiers (side by
    /// side), the base and counterfactual VLMs (side by side), the networks, the second base
    /// model and UniKE's knowledge.
    pub fn prepare(&mut self, needs: &Needs) -> Result<()> {
        if needs.transfer
            && let Some(model) = &self.model
        {
            return Err(Error::Config {
                path: model.path.clone(),
                reason: "MSCKE Table 3 transfers the classifier to a second scenes VLM; with \
                         --model run the one-base-model tables"
                    .into(),
            });
        }
        let (out, train_device) = (&self.out, &self.train_device);
        let spec = &self.spec;
        let clip_dir = super::pretrained_clip(
            out,
            &spec.clip.preset,
            spec.clip.image_size,
            &spec.clip.train,
            train_device,
        )?;
        let classifiers = needs
            .classifiers
            .iter()
            .map(|name| {
                spec.classifiers
                    .get(name)
                    .map(|config| (name.as_str(), config))
                    .ok_or_else(|| self.undefined("classifier", name))
            })
            .collect::<Result<Vec<_>>>()?;
        // Each trains exactly as it would alone.
        std::thread::scope(|scope| {
            let trainings: Vec<_> = classifiers
                .iter()
                .map(|(name, config)| {
                    let (clip_dir, data_dir) = (&clip_dir, &self.data_dir);
                    scope.spawn(move || {
                        super::trained_scope(out, name, config, clip_dir, data_dir, train_device)
                    })
                })
                .collect();
            trainings.into_iter().try_for_each(|t| {
                t.join()
                    .expect("a classifier training thread panicked")
                    .map(drop)
            })
        })?;
        match &self.model {
            None => self.base_models(Base::First, &clip_dir, &spec.vlm, &spec.counterfactual)?,
            Some(model) => self.counterfactual_beside(model)?,
        }
        self.networks(needs, false, &spec.networks)?;
        if needs.transfer {
            let transfer = spec.transfer.as_ref().ok_or_else(|| Error::Config {
                path: self.out.clone(),
                reason: "a table asks for the second base model: the preset's models have no \
                         [transfer]"
                    .into(),
            })?;
            let second = self.base_dir(Base::Transfer);
            let clip_dir = match &transfer.clip {
                Some(clip) => super::pretrained_clip(
                    &second,
                    &clip.preset,
                    clip.image_size,
                    &clip.train,
                    train_device,
                )?,
                None => clip_dir.clone(),
            };
            self.base_models(
                Base::Transfer,
                &clip_dir,
                &transfer.vlm,
                &transfer.counterfactual,
            )?;
            self.networks(needs, true, &transfer.networks)?;
        }
        if let Some(layers) = needs.knowledge_layers {
            self.prepare_knowledge(layers)?;
        }
        Ok(())
    }

    fn undefined(&self, what: &str, name: &str) -> Error {
        Error::Config {
            path: self.out.clone(),
            reason: format!("no {what} '{name}' in the preset's models"),
        }
    }

    fn base_models(
        &self,
        base: Base,
        clip_dir: &Path,
        vlm: &VlmSpec,
        counterfactual: &VlmSpec,
    ) -> Result<()> {
        super::trained_vlms(
            &self.out,
            &self.base_dir(base),
            self.user_data.as_deref(),
            &self.spec.data,
            self.spec.knowledge_data.as_ref(),
            &self.data_dir,
            clip_dir,
            self.spec.clip.image_size,
            super::VlmSpec {
                preset: &vlm.preset,
                train: &vlm.train,
            },
            super::VlmSpec {
                preset: &counterfactual.preset,
                train: &counterfactual.train,
            },
            &self.train_device,
        )
    }

    /// The counterfactual model beside the given MLLM, trained (in `counterfactual/`) with the
    /// preset's counterfactual training unless that is there already.
    fn counterfactual_beside(&self, model: &ModelDir) -> Result<()> {
        let models = self.models(Base::First);
        let dir = &models.counterfactual;
        let train = &self.spec.counterfactual.train;
        let wanted = serde_json::json!({
            "kind": "counterfactual-mllm",
            "train": train,
            "base": provenance::edited_model(model)?,
            "lm": models.counterfactual_lm().map(provenance::base_model).transpose()?,
            "data": provenance::data(&self.data_dir)?,
        });
        if provenance::reusable(dir, "language_model.bpk", &wanted)? {
            return Ok(());
        }
        let loss = crate::train::counterfactual::run(
            model,
            models.counterfactual_lm(),
            &self.data_dir,
            train,
            dir,
            &self.train_device,
        )?;
        eprintln!("counterfactual model: answer loss {loss:.4} over the last steps");
        Ok(())
    }

    fn networks(
        &self,
        needs: &Needs,
        transfer: bool,
        specs: &BTreeMap<String, NetworkSpec>,
    ) -> Result<()> {
        let which = if transfer {
            Base::Transfer
        } else {
            Base::First
        };
        let (dir, base) = (self.base_dir(which), self.base_model(which));
        for (name, _) in needs.networks.iter().filter(|(_, t)| *t == transfer) {
            let spec = specs
                .get(name)
                .ok_or_else(|| self.undefined("network", name))?;
            match spec {
                NetworkSpec::Mend { config, train } => super::trained_hypernet::<Mend>(
                    &dir,
                    &base,
                    name,
                    config,
                    train,
                    &self.data_dir,
                    &self.train_device,
                )?,
                NetworkSpec::Ke { config, train } => super::trained_hypernet::<Ke>(
                    &dir,
                    &base,
                    name,
                    config,
                    train,
                    &self.data_dir,
                    &self.train_device,
                )?,
            };
        }
        Ok(())
    }

    /// UniKE's knowledge memory and encoders for the last `layers` layers of the base model,
    /// built once (a changed model or config clears them).
    /// The knowledge of base model `speaker` (in `base`) for its last `layers` layers.
    fn knowledge_of<M: crate::model::editable::EditableModel>(
        &self,
        mut speaker: Speaker<M>,
        base: &ModelDir,
        layers: usize,
        config: &crate::train::knowledge::KnowledgeConfig,
    ) -> Result<Prepared> {
        let layers = edited_layers(&speaker.model, layers);
        let dir = self.out.join("knowledge");
        let wanted = serde_json::json!({
            "kind": "knowledge",
            "config": config,
            "layers": layers,
            "vlm": provenance::edited_model(base)?,
            "data": provenance::data(&self.data_dir)?,
        });
        provenance::reusable(&dir, "encoders.bpk", &wanted)?;
        crate::train::knowledge::prepare(
            &mut speaker,
            &self.pool,
            &layers,
            config,
            &dir,
            &self.device,
        )
    }

    fn prepare_knowledge(&mut self, layers: usize) -> Result<()> {
        let config = self
            .spec
            .knowledge
            .clone()
            .ok_or_else(|| self.undefined("knowledge", "knowledge"))?;
        let base = self.base_model(Base::First);
        if base.is_mllm() {
            let speaker = Speaker::load_mllm(&base, &self.device)?;
            self.knowledge = Some(self.knowledge_of(speaker, &base, layers, &config)?);
        } else {
            let speaker = Speaker::load(&base.path, &self.device)?;
            self.knowledge = Some(self.knowledge_of(speaker, &base, layers, &config)?);
        }
        Ok(())
    }
}
