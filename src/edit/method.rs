//! Every editing method of both papers as data: a [`Method`] (read from an experiment file or
//! written in code) names the method and its options, and [`Method::build`] makes the editor
//! from the trained models of one base model ([`Models`]), on an autodiff device where the
//! method trains or differentiates at edit time.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::Editor;
use super::finetune::{FineTuneConfig, FineTuneEditor, Part};
use super::ike::IkeEditor;
use super::ke::Ke;
use super::mend::{HypernetEditor, Hypernetwork, Mend};
use super::serac::{InScope, MemoryEditor};
use super::speaker::{ModelDir, Speaker};
use super::tpatcher::{TPatcherConfig, TPatcherEditor};
use super::unike::{Prepared, UniKeConfig, UniKeEditor};
use crate::data::record::EditRecord;
use crate::error::{Error, Result};
use crate::model::editable::EditableModel;
use crate::model::mllm::MllmNet;
use crate::model::scope::{ScopeClassifier, ScopeRun};
use crate::model::vlm::Vlm;

/// An editing method and its options. In a TOML file: `{ kind = "ft-llm", steps = 10, lr =
/// 1e-3 }`, `{ kind = "mscke", classifier = "scope-multimodal" }`, `{ kind = "unike", ... }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Method {
    /// FT-LLM: Adam steps on the edit, the last LM layer trainable.
    FtLlm { steps: usize, lr: f64 },
    /// FT-Visual: Adam steps on the edit, the projector and the last vision layer trainable.
    FtVisual { steps: usize, lr: f64 },
    /// IKE: the edit and `demonstrations` training edits as in-context demonstrations.
    Ike { demonstrations: usize },
    /// SERAC: a text-only scope classifier (`classifier`, a trained run) routes in-scope
    /// queries to the counterfactual model.
    Serac { classifier: String },
    /// MSCKE: the same with the multimodal scope classifier; with `mend` (a meta-trained
    /// network next to the base model) the in-scope model is the base model edited by MEND
    /// with the routed edit alone (MSCKE-MEND).
    Mscke {
        classifier: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mend: Option<String>,
    },
    /// MEND: the network `network` (next to the base model) turns the edit's gradient into a
    /// weight update.
    Mend { network: String },
    /// KE: the network `network` predicts the weight update from the edit.
    Ke { network: String },
    /// T-Patcher: trained neurons appended to the last FFN, one patch per edit.
    TPatcher(TPatcherConfig),
    /// UniKE: intrinsic key-value pairs and latent in-context editing, coupled by the
    /// knowledge encoders ([`Models::knowledge`]).
    #[serde(rename = "unike")]
    UniKe(UniKeConfig),
}

/// What methods are built from: one base model and what was trained for it.
pub struct Models<'a> {
    /// The base model: a scenes VLM (`mmke train vlm`) or a Hugging Face MLLM, and its dtype.
    pub base: ModelDir,
    /// Where MEND's and KE's networks (meta-trained for the base model) are found by name.
    pub networks: PathBuf,
    /// The counterfactual model SERAC and MSCKE route to (`mmke train counterfactual`; beside
    /// a real MLLM, what [`crate::train::counterfactual`] trained, when it did).
    pub counterfactual: PathBuf,
    /// Beside a real MLLM, the causal LM the counterfactual model starts from, when this
    /// directory holds one (`config.json` and weights; else a copy of the base model's LM).
    pub counterfactual_lm: PathBuf,
    /// Where scope classifiers are found by name.
    pub classifiers: PathBuf,
    /// Training edits: IKE's demonstrations, T-Patcher's memory of unrelated queries, UniKE's.
    pub pool: &'a [EditRecord],
    /// UniKE's knowledge memory and encoders, built from the base model.
    pub knowledge: Option<&'a Prepared>,
}

impl<'a> Models<'a> {
    /// The models of an experiment directory (`vlm/`, `counterfactual/`, the classifiers and
    /// the networks side by side), as `mmke experiment` lays them out.
    pub fn in_dir(dir: &Path, pool: &'a [EditRecord]) -> Self {
        Self {
            base: ModelDir::f32(dir.join("vlm")),
            networks: dir.to_path_buf(),
            counterfactual: dir.join("counterfactual"),
            counterfactual_lm: dir.join("counterfactual-lm"),
            classifiers: dir.to_path_buf(),
            pool,
            knowledge: None,
        }
    }

    /// A base model from anywhere (a Hugging Face MLLM directory, say), what was trained for
    /// it in `dir` (the networks, the classifiers, the counterfactual model; its LM in
    /// `dir/counterfactual-lm` when there is one).
    pub fn with_base(base: &ModelDir, dir: &Path, pool: &'a [EditRecord]) -> Self {
        Self {
            base: base.clone(),
            ..Self::in_dir(dir, pool)
        }
    }

    /// The directory of `network`.
    fn network(&self, network: &str) -> PathBuf {
        self.networks.join(network)
    }

    /// The scope classifier `classifier` and its batcher.
    fn router(
        &self,
        classifier: &str,
        device: &Device,
    ) -> Result<(ScopeClassifier, crate::data::batch::ScopeBatcher)> {
        let mut run = ScopeRun::load(&self.classifiers.join(classifier), device)?;
        let batcher = run.batcher(&[])?;
        Ok((run.model, batcher))
    }

    /// The causal LM a real MLLM's counterfactual model starts from, if one is given.
    pub fn counterfactual_lm(&self) -> Option<&Path> {
        let dir = self.counterfactual_lm.as_path();
        dir.join("config.json").is_file().then_some(dir)
    }

    /// Whether the base model is a Hugging Face MLLM (BLIP-2, LLaVA) rather than a scenes VLM.
    pub fn real_mllm(&self) -> bool {
        self.base.is_mllm()
    }
}

/// Loads a base model `M` on a device.
type LoadBase<'a, M> = &'a dyn Fn(&Device) -> Result<Speaker<M>>;

/// Makes the counterfactual model `C` beside a base model `M`.
type LoadCounterfactual<'a, M, C> = &'a dyn Fn(&Speaker<M>, &Device) -> Result<Speaker<C>>;

/// How one kind of base model (`M`) and its counterfactual model (`C`) load.
struct Loaders<'a, M, C> {
    base: LoadBase<'a, M>,
    counterfactual: LoadCounterfactual<'a, M, C>,
}

fn hypernet<N: Hypernetwork, M: EditableModel>(
    models: &Models,
    base: LoadBase<M>,
    network: &str,
    device: &Device,
) -> Result<HypernetEditor<N, M>> {
    let speaker = base(device)?;
    let (net, _) = super::mend::load::<N>(&models.network(network), &speaker.model, device)?;
    Ok(HypernetEditor::new(speaker, net, device))
}

impl Method {
    /// Whether the method trains or differentiates when it edits (it then runs on the
    /// autodiff version of the device it is built for).
    pub fn needs_autodiff(&self) -> bool {
        !matches!(
            self,
            Method::Ike { .. } | Method::Serac { .. } | Method::Mscke { mend: None, .. }
        )
    }

    /// The editor for `models` on `device` (a plain device: methods that need gradients make
    /// its autodiff version themselves). The base model is a scenes VLM or a Hugging Face MLLM
    /// directory; beside an MLLM, SERAC's and MSCKE's counterfactual model is the causal LM in
    /// `models.counterfactual_lm` when that is a model directory, else a copy of the base
    /// model's LM, reading the base model's visual tokens through a new projection
    /// ([`crate::model::mllm::counterfactual::CounterfactualMllm`]), with the weights trained
    /// into `models.counterfactual` when they are there.
    pub fn build(&self, models: &Models, device: &Device) -> Result<Box<dyn Editor>> {
        if models.real_mllm() {
            let lm = models.counterfactual_lm();
            // Loaded once per device; each editor's copy shares the weights until it changes
            // them (MSCKE-MEND holds the model twice: a checkpoint's size, not twice it).
            let loaded = std::cell::RefCell::new(Vec::<(Device, Speaker<MllmNet>)>::new());
            let base = |device: &Device| {
                if let Some((_, speaker)) = loaded.borrow().iter().find(|(d, _)| d == device) {
                    return Ok(speaker.clone());
                }
                let speaker = Speaker::load_mllm(&models.base, device)?;
                loaded.borrow_mut().push((device.clone(), speaker.clone()));
                Ok(speaker)
            };
            let counterfactual = |base: &Speaker<MllmNet>, device: &Device| {
                let mut speaker = Speaker::counterfactual(base, lm, device)?;
                if crate::model::mllm::counterfactual::is_trained(&models.counterfactual) {
                    speaker.model = crate::model::mllm::counterfactual::load(
                        speaker.model,
                        &models.counterfactual,
                    )?;
                }
                Ok(speaker)
            };
            self.build_with(
                models,
                Loaders {
                    base: &base,
                    counterfactual: &counterfactual,
                },
                device,
            )
        } else {
            let base = |device: &Device| Speaker::load(&models.base.path, device);
            let counterfactual =
                |_: &Speaker<Vlm>, device: &Device| Speaker::load(&models.counterfactual, device);
            self.build_with(
                models,
                Loaders {
                    base: &base,
                    counterfactual: &counterfactual,
                },
                device,
            )
        }
    }

    fn build_with<M: EditableModel, C: EditableModel>(
        &self,
        models: &Models,
        load: Loaders<M, C>,
        device: &Device,
    ) -> Result<Box<dyn Editor>> {
        let plain = device.clone().without_autodiff();
        let train = plain.clone().autodiff();
        let finetune = |part, steps, lr| -> Result<Box<dyn Editor>> {
            let config = FineTuneConfig { part, steps, lr };
            let speaker = (load.base)(&train)?;
            Ok(Box::new(FineTuneEditor::new(speaker, config, &train)))
        };
        Ok(match self {
            Method::FtLlm { steps, lr } => finetune(Part::LastLmLayer, *steps, *lr)?,
            Method::FtVisual { steps, lr } => finetune(Part::Visual, *steps, *lr)?,
            Method::Ike { demonstrations } => Box::new(IkeEditor::new(
                (load.base)(&plain)?,
                models.pool,
                *demonstrations,
                &plain,
            )),
            Method::Serac { classifier }
            | Method::Mscke {
                classifier,
                mend: None,
            } => {
                // The order in which models are made is the order in which they draw from the
                // device's generator: the classifier, the base, the counterfactual model.
                let (classifier, batcher) = models.router(classifier, &plain)?;
                let base = (load.base)(&plain)?;
                let counterfactual = (load.counterfactual)(&base, &plain)?;
                Box::new(MemoryEditor::with(
                    classifier,
                    batcher,
                    base,
                    InScope::<M, C>::Counterfactual(Box::new(counterfactual)),
                    &plain,
                ))
            }
            Method::Mscke {
                classifier,
                mend: Some(network),
            } => {
                let (classifier, batcher) = models.router(classifier, &plain)?;
                let in_scope = InScope::<M, C>::Mend {
                    editor: Box::new(hypernet::<Mend, M>(models, load.base, network, &train)?),
                    applied: None,
                };
                let base = (load.base)(&plain)?;
                Box::new(MemoryEditor::with(
                    classifier, batcher, base, in_scope, &plain,
                ))
            }
            Method::Mend { network } => {
                Box::new(hypernet::<Mend, M>(models, load.base, network, &train)?)
            }
            Method::Ke { network } => {
                Box::new(hypernet::<Ke, M>(models, load.base, network, &train)?)
            }
            Method::TPatcher(config) => Box::new(TPatcherEditor::new(
                (load.base)(&train)?,
                models.pool,
                config.clone(),
                &train,
            )?),
            Method::UniKe(config) => {
                let knowledge = models.knowledge.ok_or_else(|| Error::Config {
                    path: models.base.path.clone(),
                    reason: "UniKE needs the knowledge memory and encoders built from this \
                             base model (Models::knowledge)"
                        .into(),
                })?;
                let prepared = Prepared {
                    memory: knowledge.memory.clone(),
                    encoders: knowledge.encoders.clone(),
                };
                Box::new(UniKeEditor::new(
                    (load.base)(&train)?,
                    prepared,
                    models.pool,
                    config.clone(),
                    &train,
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_read_from_toml_with_their_options() {
        #[derive(Deserialize)]
        struct File {
            methods: Vec<Method>,
        }
        let file: File = toml::from_str(
            r#"methods = [
                { kind = "ft-llm", steps = 10, lr = 1e-3 },
                { kind = "mscke", classifier = "scope-multimodal", mend = "mend" },
                { kind = "t-patcher", neurons = 2, steps = 10, lr = 1e-2, activation_weight = 1.0, memory_weight = 1.0, margin = 0.5, memory_queries = 40 },
            ]"#,
        )
        .unwrap();
        assert_eq!(
            file.methods[0],
            Method::FtLlm {
                steps: 10,
                lr: 1e-3
            }
        );
        assert_eq!(
            file.methods[1],
            Method::Mscke {
                classifier: "scope-multimodal".into(),
                mend: Some("mend".into())
            }
        );
        assert!(matches!(&file.methods[2], Method::TPatcher(c) if c.memory_queries == 40));
        assert!(file.methods[1].needs_autodiff());
        let err = toml::from_str::<File>(r#"methods = [{ kind = "ike", demos = 1 }]"#);
        assert!(err.is_err(), "an unknown option is an error");
    }
}
