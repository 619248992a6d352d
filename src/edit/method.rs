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
use super::speaker::Speaker;
use super::tpatcher::{TPatcherConfig, TPatcherEditor};
use super::unike::{Prepared, UniKeConfig, UniKeEditor};
use crate::data::record::EditRecord;
use crate::error::{Error, Result};
use crate::model::scope::ScopeRun;

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
    /// The base model's directory (`mmke train vlm`); MEND's and KE's networks are found next
    /// to it (they are meta-trained for it).
    pub base: PathBuf,
    /// The counterfactual model SERAC and MSCKE route to (`mmke train counterfactual`).
    pub counterfactual: PathBuf,
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
            base: dir.join("vlm"),
            counterfactual: dir.join("counterfactual"),
            classifiers: dir.to_path_buf(),
            pool,
            knowledge: None,
        }
    }

    /// The directory of `network`, next to the base model.
    fn network(&self, network: &str) -> PathBuf {
        self.base
            .parent()
            .map_or_else(|| PathBuf::from(network), |p| p.join(network))
    }

    /// A memory editor routing by `classifier`; `in_scope` makes the in-scope model (called
    /// after the classifier loads, as is `base_first` for the base model: the order in which
    /// models are made is the order in which they draw from the device's generator).
    fn memory_editor(
        &self,
        classifier: &str,
        base_first: bool,
        in_scope: impl FnOnce() -> Result<InScope>,
        device: &Device,
    ) -> Result<MemoryEditor> {
        let mut run = ScopeRun::load(&self.classifiers.join(classifier), device)?;
        let batcher = run.batcher(&[])?;
        let (base, in_scope) = if base_first {
            let base = Speaker::load(&self.base, device)?;
            (base, in_scope()?)
        } else {
            let in_scope = in_scope()?;
            (Speaker::load(&self.base, device)?, in_scope)
        };
        Ok(MemoryEditor::with(
            run.model, batcher, base, in_scope, device,
        ))
    }

    fn hypernet<N: Hypernetwork>(
        &self,
        network: &str,
        device: &Device,
    ) -> Result<HypernetEditor<N>> {
        let speaker = Speaker::load(&self.base, device)?;
        let (net, _) = super::mend::load::<N>(&self.network(network), &speaker.model, device)?;
        Ok(HypernetEditor::new(speaker, net, device))
    }
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
    /// its autodiff version themselves).
    pub fn build(&self, models: &Models, device: &Device) -> Result<Box<dyn Editor>> {
        let plain = device.clone().without_autodiff();
        let train = plain.clone().autodiff();
        let finetune = |part, steps, lr| -> Result<Box<dyn Editor>> {
            let config = FineTuneConfig { part, steps, lr };
            let speaker = Speaker::load(&models.base, &train)?;
            Ok(Box::new(FineTuneEditor::new(speaker, config, &train)))
        };
        Ok(match self {
            Method::FtLlm { steps, lr } => finetune(Part::LastLmLayer, *steps, *lr)?,
            Method::FtVisual { steps, lr } => finetune(Part::Visual, *steps, *lr)?,
            Method::Ike { demonstrations } => Box::new(IkeEditor::new(
                Speaker::load(&models.base, &plain)?,
                models.pool,
                *demonstrations,
                &plain,
            )),
            Method::Serac { classifier }
            | Method::Mscke {
                classifier,
                mend: None,
            } => Box::new(models.memory_editor(
                classifier,
                true,
                || {
                    let counterfactual = Speaker::load(&models.counterfactual, &plain)?;
                    Ok(InScope::Counterfactual(counterfactual))
                },
                &plain,
            )?),
            Method::Mscke {
                classifier,
                mend: Some(network),
            } => Box::new(models.memory_editor(
                classifier,
                false,
                || {
                    Ok(InScope::Mend {
                        editor: Box::new(models.hypernet::<Mend>(network, &train)?),
                        applied: None,
                    })
                },
                &plain,
            )?),
            Method::Mend { network } => Box::new(models.hypernet::<Mend>(network, &train)?),
            Method::Ke { network } => Box::new(models.hypernet::<Ke>(network, &train)?),
            Method::TPatcher(config) => Box::new(TPatcherEditor::new(
                Speaker::load(&models.base, &train)?,
                models.pool,
                config.clone(),
                &train,
            )?),
            Method::UniKe(config) => {
                let knowledge = models.knowledge.ok_or_else(|| Error::Config {
                    path: models.base.clone(),
                    reason: "UniKE needs the knowledge memory and encoders built from this \
                             base model (Models::knowledge)"
                        .into(),
                })?;
                let prepared = Prepared {
                    memory: knowledge.memory.clone(),
                    encoders: knowledge.encoders.clone(),
                };
                Box::new(UniKeEditor::new(
                    Speaker::load(&models.base, &train)?,
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
