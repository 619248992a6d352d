//! UniKE's experiments on the scenes benchmark: Table 1 (one-step editing, VQA and caption
//! tasks), Table 2 (sequential editing, K edits accumulated), Table 3 (cross-task: VQA and
//! caption edits in one sequence), Table 4 (ablations) and Figure 4 (number of retrieved
//! states, fixed vs dynamic alpha, the zeta variants). They share one output directory
//! (default `runs/unike/PRESET`) and everything trained in it: the CLIP, the base and the
//! counterfactual VLM, SERAC's classifier, the knowledge memory and the encoders.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::data::fgvedit;
use crate::data::record::EditRecord;
use crate::data::scenes::ScenesConfig;
use crate::edit::Editor;
use crate::edit::finetune::{FineTuneConfig, FineTuneEditor, Part};
use crate::edit::ike::IkeEditor;
use crate::edit::ke::{Ke, KeConfig};
use crate::edit::mend::{HypernetEditor, Mend, MendConfig, MendEditor};
use crate::edit::serac::MemoryEditor;
use crate::edit::speaker::Speaker;
use crate::edit::tpatcher::{TPatcherConfig, TPatcherEditor};
use crate::edit::unike::{
    Alpha, InContext, Prepared, UniKeConfig, UniKeEditor, ZetaKind, edited_layers,
};
use crate::error::Result;
use crate::eval::editing::EditMetrics;
use crate::eval::protocol;
use crate::model::scope::{ScopeConfig, ScopeMode};
use crate::report::Table;
use crate::train::clip::ClipTrainConfig;
use crate::train::knowledge::KnowledgeConfig;
use crate::train::meta::MetaTrainConfig;
use crate::train::scope::{ScopeRun, ScopeRunConfig, ScopeTrainConfig};
use crate::train::vlm::VlmTrainConfig;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub data: ScenesConfig,
    /// A larger split (same seed and test) the VLMs learn from, as in `mscke-table1`.
    #[serde(default)]
    pub knowledge_data: Option<ScenesConfig>,
    pub clip_preset: String,
    pub clip_image_size: usize,
    pub clip: ClipTrainConfig,
    /// SERAC's classifier (trained text-only).
    pub scope_model: ScopeConfig,
    pub scope_train: ScopeTrainConfig,
    pub vlm_preset: String,
    pub vlm: VlmTrainConfig,
    pub counterfactual_preset: String,
    pub counterfactual: VlmTrainConfig,
    /// The knowledge memory and the encoders.
    pub knowledge: KnowledgeConfig,
    /// Full UniKE; the ablations switch parts of it off.
    pub unike: UniKeConfig,
    pub finetune_steps: usize,
    pub finetune_lr: f64,
    pub ike_demonstrations: usize,
    pub tpatcher: TPatcherConfig,
    pub mend: MendConfig,
    pub mend_train: MetaTrainConfig,
    pub ke: KeConfig,
    pub ke_train: MetaTrainConfig,
    /// Test records evaluated per task (the first ones).
    pub eval_records: usize,
    /// Table 2's sequence lengths.
    pub sequential: Vec<usize>,
    /// Figure 4's settings are each evaluated on the first `sweep_records` VQA test records
    /// (at most `eval_records`): thirteen settings of the full method are many CPU-hours.
    pub sweep_records: usize,
    /// Figure 4a: numbers of retrieved hidden states.
    pub top_ks: Vec<usize>,
    /// Figure 4b: fixed alphas (dynamic is added).
    pub alphas: Vec<f64>,
}

/// An editing method of the tables.
#[derive(Clone, Debug)]
pub enum Method {
    /// Fine-tuning the last LM layer.
    FineTune,
    Ike,
    Serac,
    Ke,
    TPatcher,
    Mend,
    UniKe(UniKeConfig),
}

/// Everything the tables share, trained or loaded once.
pub struct Setup {
    out: PathBuf,
    preset: Preset,
    /// Test edits per task.
    pub vqa: Vec<EditRecord>,
    pub caption: Vec<EditRecord>,
    pool: Vec<EditRecord>,
    prepared: Prepared,
    device: Device,
    train_device: Device,
}

impl Setup {
    pub fn new(preset: &Preset, data: Option<&Path>, out: &Path, device: &Device) -> Result<Self> {
        let data_dir = super::data_dir(out, data, &preset.data)?;
        let train_device = device.clone().autodiff();
        let clip_dir = super::pretrained_clip(
            out,
            &preset.clip_preset,
            preset.clip_image_size,
            &preset.clip,
            &train_device,
        )?;
        let scope = ScopeRunConfig {
            model: ScopeConfig {
                mode: ScopeMode::TextOnly,
                ..preset.scope_model.clone()
            },
            train: preset.scope_train.clone(),
        };
        super::trained_scope(
            out,
            "scope-text",
            &scope,
            &clip_dir,
            &data_dir,
            &train_device,
        )?;
        super::trained_vlms(
            out,
            out,
            data,
            &preset.data,
            preset.knowledge_data.as_ref(),
            &data_dir,
            &clip_dir,
            preset.clip_image_size,
            super::VlmSpec {
                preset: &preset.vlm_preset,
                train: &preset.vlm,
            },
            super::VlmSpec {
                preset: &preset.counterfactual_preset,
                train: &preset.counterfactual,
            },
            &train_device,
        )?;
        super::trained_hypernet::<Mend>(
            out,
            &preset.mend,
            &preset.mend_train,
            &data_dir,
            &train_device,
        )?;
        super::trained_hypernet::<Ke>(out, &preset.ke, &preset.ke_train, &data_dir, &train_device)?;
        let mut vqa = fgvedit::read(&data_dir.join("test.json"), &data_dir)?.records;
        vqa.truncate(preset.eval_records);
        let caption: Vec<EditRecord> = vqa.iter().filter_map(EditRecord::caption_edit).collect();
        let pool = fgvedit::read(&data_dir.join("train.json"), &data_dir)?.records;

        let mut base = Speaker::load(&out.join("vlm"), device)?;
        let layers = edited_layers(&base.model, preset.unike.layers);
        // The knowledge memory and its encoders are built from the base model: a changed
        // model or config clears them.
        let knowledge = serde_json::json!({
            "kind": "knowledge",
            "config": preset.knowledge,
            "layers": layers,
            "vlm": super::provenance::read(&out.join("vlm")),
            "data": super::provenance::data(&data_dir)?,
        });
        super::provenance::reusable(&out.join("knowledge"), "encoders.bpk", &knowledge)?;
        let prepared = crate::train::knowledge::prepare(
            &mut base,
            &pool,
            &layers,
            &preset.knowledge,
            &out.join("knowledge"),
            device,
        )?;
        Ok(Self {
            out: out.to_path_buf(),
            preset: preset.clone(),
            vqa,
            caption,
            pool,
            prepared,
            device: device.clone(),
            train_device,
        })
    }

    pub fn editor(&self, method: &Method) -> Result<Box<dyn Editor>> {
        let out = &self.out;
        Ok(match method {
            Method::FineTune => {
                let config = FineTuneConfig {
                    part: Part::LastLmLayer,
                    steps: self.preset.finetune_steps,
                    lr: self.preset.finetune_lr,
                };
                let speaker = Speaker::load(&out.join("vlm"), &self.train_device)?;
                Box::new(FineTuneEditor::new(speaker, config, &self.train_device))
            }
            Method::Ike => Box::new(IkeEditor::new(
                Speaker::load(&out.join("vlm"), &self.device)?,
                &self.pool,
                self.preset.ike_demonstrations,
                &self.device,
            )),
            Method::Serac => {
                let mut run = ScopeRun::load(&out.join("scope-text"), &self.device)?;
                let batcher = run.batcher(&[])?;
                Box::new(MemoryEditor::new(
                    run.model,
                    batcher,
                    Speaker::load(&out.join("vlm"), &self.device)?,
                    Speaker::load(&out.join("counterfactual"), &self.device)?,
                    &self.device,
                ))
            }
            Method::Ke => {
                let speaker = Speaker::load(&out.join("vlm"), &self.train_device)?;
                let (net, _) = crate::edit::mend::load::<Ke>(
                    &out.join("ke"),
                    &speaker.model,
                    &self.train_device,
                )?;
                Box::new(HypernetEditor::new(speaker, net, &self.train_device))
            }
            Method::TPatcher => Box::new(TPatcherEditor::new(
                Speaker::load(&out.join("vlm"), &self.train_device)?,
                &self.pool,
                self.preset.tpatcher.clone(),
                &self.train_device,
            )?),
            Method::Mend => {
                let speaker = Speaker::load(&out.join("vlm"), &self.train_device)?;
                let (net, _) = crate::edit::mend::load::<Mend>(
                    &out.join("mend"),
                    &speaker.model,
                    &self.train_device,
                )?;
                Box::new(MendEditor::new(speaker, net, &self.train_device))
            }
            Method::UniKe(config) => {
                let speaker = Speaker::load(&out.join("vlm"), &self.train_device)?;
                let prepared = Prepared {
                    memory: self.prepared.memory.clone(),
                    encoders: self.prepared.encoders.clone(),
                };
                Box::new(UniKeEditor::new(
                    speaker,
                    prepared,
                    &self.pool,
                    config.clone(),
                    &self.train_device,
                ))
            }
        })
    }

    /// The methods of UniKE's Tables 1-3 that mmke has.
    pub fn methods(&self) -> Vec<(String, Method)> {
        vec![
            ("FT".into(), Method::FineTune),
            ("KE".into(), Method::Ke),
            ("T-Patcher".into(), Method::TPatcher),
            ("MEND".into(), Method::Mend),
            ("IKE".into(), Method::Ike),
            ("SERAC".into(), Method::Serac),
            ("UniKE".into(), Method::UniKe(self.preset.unike.clone())),
        ]
    }

    /// Table 4's rows.
    pub fn ablations(&self) -> Vec<(String, Method)> {
        let full = self.preset.unike.clone();
        let without_collaboration = UniKeConfig {
            alpha: Alpha::Fixed(0.6),
            zeta: ZetaKind::None,
            ..full.clone()
        };
        vec![
            (
                "1 only Intrin".into(),
                Method::UniKe(UniKeConfig {
                    in_context: InContext::None,
                    ..without_collaboration.clone()
                }),
            ),
            (
                "2 only Latent-IKE".into(),
                Method::UniKe(UniKeConfig {
                    neurons: 0,
                    ..without_collaboration.clone()
                }),
            ),
            (
                "3 Intrin+IKE".into(),
                Method::UniKe(UniKeConfig {
                    in_context: InContext::Vanilla,
                    ..without_collaboration.clone()
                }),
            ),
            (
                "4 Intrin+Latent-IKE".into(),
                Method::UniKe(without_collaboration),
            ),
            ("5 UniKE".into(), Method::UniKe(full)),
        ]
    }

    /// Runs `method` through `run` (a protocol over an editor) and times it.
    fn measure(
        &self,
        name: &str,
        method: &Method,
        what: &str,
        run: impl Fn(&mut dyn Editor) -> Result<EditMetrics>,
    ) -> Result<Measured> {
        eprintln!("{name}: {what}");
        let mut editor = self.editor(method)?;
        let start = Instant::now();
        let metrics = run(editor.as_mut())?;
        Ok(Measured {
            method: name.to_string(),
            what: what.to_string(),
            metrics,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub method: String,
    pub what: String,
    pub metrics: EditMetrics,
    pub seconds: f64,
}

const METRICS: [&str; 5] = ["Rel.", "T-Gen.", "M-Gen.", "T-Loc.", "M-Loc."];

/// Rel., T-Gen., M-Gen., T-Loc., M-Loc. (token accuracy, %).
fn five(m: &EditMetrics) -> Vec<f64> {
    [
        m.reliability,
        m.t_generality,
        m.m_generality,
        m.t_locality,
        m.m_locality,
    ]
    .iter()
    .map(|s| 100.0 * s.token_accuracy)
    .collect()
}

fn columns(prefixes: &[&str]) -> Vec<String> {
    prefixes
        .iter()
        .flat_map(|p| METRICS.iter().map(move |m| format!("{p} {m}")))
        .collect()
}

fn table(title: &str, prefixes: &[&str]) -> Table {
    let columns = columns(prefixes);
    let refs: Vec<&str> = columns.iter().map(String::as_str).collect();
    Table::new(title, "method", &refs)
}

/// One-step editing of `methods` on both tasks: one row each, VQA then caption columns.
fn one_step_table(
    setup: &Setup,
    title: &str,
    methods: &[(String, Method)],
) -> Result<(Table, Vec<Measured>)> {
    let mut t = table(title, &["VQA", "IC"]);
    let mut all = Vec::new();
    for (name, method) in methods {
        let vqa = setup.measure(name, method, "one-step VQA", |e| {
            protocol::one_step(e, &setup.vqa)
        })?;
        let ic = setup.measure(name, method, "one-step caption", |e| {
            protocol::one_step(e, &setup.caption)
        })?;
        t.push(name, [five(&vqa.metrics), five(&ic.metrics)].concat());
        all.extend([vqa, ic]);
    }
    Ok((t, all))
}

/// Which table or figure to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Table1,
    Table2,
    Table3,
    Table4,
    Fig4,
    Fig5,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Which::Table1 => "unike-table1",
            Which::Table2 => "unike-table2",
            Which::Table3 => "unike-table3",
            Which::Table4 => "unike-table4",
            Which::Fig4 => "unike-fig4",
            Which::Fig5 => "unike-fig5",
        }
    }
}

/// Produces `which` under `out` (`{name}.{md,csv,json,png}`; Figure 4 writes one file per
/// panel); returns the tables.
pub fn run(
    which: Which,
    preset: &Preset,
    data: Option<&Path>,
    out: &Path,
    device: &Device,
) -> Result<Vec<(String, Table)>> {
    let setup = Setup::new(preset, data, out, device)?;
    let mut tables = Vec::new();
    let mut measured = Vec::new();
    match which {
        Which::Table1 => {
            let (t, m) = one_step_table(
                &setup,
                "UniKE Table 1 on scenes: one-step editing (token accuracy, %)",
                &setup.methods(),
            )?;
            tables.push((which.name().to_string(), t));
            measured.extend(m);
        }
        Which::Table4 => {
            let (t, m) = one_step_table(
                &setup,
                "UniKE Table 4 on scenes: ablations, one-step (token accuracy, %)",
                &setup.ablations(),
            )?;
            tables.push((which.name().to_string(), t));
            measured.extend(m);
        }
        Which::Table2 => {
            let mut t = table(
                "UniKE Table 2 on scenes: sequential editing (token accuracy, %)",
                &["VQA", "IC"],
            );
            for &k in &preset.sequential {
                for (name, method) in setup.methods() {
                    let vqa = setup.measure(&name, &method, &format!("K = {k} VQA"), |e| {
                        protocol::sequential(e, &setup.vqa, k)
                    })?;
                    let ic = setup.measure(&name, &method, &format!("K = {k} caption"), |e| {
                        protocol::sequential(e, &setup.caption, k)
                    })?;
                    t.push(
                        &format!("{name} (K = {k})"),
                        [five(&vqa.metrics), five(&ic.metrics)].concat(),
                    );
                    measured.extend([vqa, ic]);
                }
            }
            tables.push((which.name().to_string(), t));
        }
        Which::Table3 => {
            // Sequences of 10: 5 VQA edits then 5 caption edits of other records.
            let mut mixed = Vec::new();
            for (vqa, caption) in setup.vqa.chunks(5).zip(setup.caption.chunks(5).skip(1)) {
                mixed.extend_from_slice(vqa);
                mixed.extend_from_slice(caption);
            }
            let mut t = table(
                "UniKE Table 3 on scenes: cross-task editing, K = 10 (token accuracy, %)",
                &["all"],
            );
            for (name, method) in setup.methods() {
                let m = setup.measure(&name, &method, "cross-task K = 10", |e| {
                    protocol::sequential(e, &mixed, 10)
                })?;
                t.push(&name, five(&m.metrics));
                measured.push(m);
            }
            tables.push((which.name().to_string(), t));
        }
        Which::Fig5 => {}
        Which::Fig4 => {
            let base = preset.unike.clone();
            let panels: [(&str, &str, Vec<(String, UniKeConfig)>); 3] = [
                (
                    "unike-fig4a",
                    "UniKE Figure 4a: retrieved hidden states K (VQA, token accuracy, %)",
                    preset
                        .top_ks
                        .iter()
                        .map(|&k| {
                            (
                                format!("K = {k}"),
                                UniKeConfig {
                                    top_k: k,
                                    ..base.clone()
                                },
                            )
                        })
                        .collect(),
                ),
                (
                    "unike-fig4b",
                    "UniKE Figure 4b: fixed vs dynamic alpha (VQA, token accuracy, %)",
                    preset
                        .alphas
                        .iter()
                        .map(|&a| (format!("alpha = {a}"), Alpha::Fixed(a)))
                        .chain([("dynamic".to_string(), Alpha::Dynamic)])
                        .map(|(name, alpha)| {
                            (
                                name,
                                UniKeConfig {
                                    alpha,
                                    ..base.clone()
                                },
                            )
                        })
                        .collect(),
                ),
                (
                    "unike-fig4c",
                    "UniKE Figure 4c: zeta variants (VQA, token accuracy, %)",
                    [
                        ("w/o zeta", ZetaKind::None),
                        ("random zeta", ZetaKind::Random),
                        ("semantic zeta", ZetaKind::Semantic),
                        ("truthfulness zeta", ZetaKind::Truthfulness),
                    ]
                    .into_iter()
                    .map(|(name, zeta)| {
                        (
                            name.to_string(),
                            UniKeConfig {
                                zeta,
                                ..base.clone()
                            },
                        )
                    })
                    .collect(),
                ),
            ];
            for (stem, title, settings) in panels {
                let mut t = Table::new(title, "setting", &METRICS);
                for (name, config) in settings {
                    let records = &setup.vqa[..preset.sweep_records.min(setup.vqa.len())];
                    let m = setup.measure(&name, &Method::UniKe(config), stem, |e| {
                        protocol::one_step(e, records)
                    })?;
                    t.push(&name, five(&m.metrics));
                    measured.push(m);
                }
                tables.push((stem.to_string(), t));
            }
        }
    }
    if which == Which::Fig5 {
        figure5(&setup, &out.join("unike-fig5.png"))?;
    }
    let details = serde_json::json!({
        "preset": preset,
        "records": { "vqa": setup.vqa.len(), "caption": setup.caption.len() },
        "knowledge_entries": setup.prepared.memory.len(),
        "runs": measured,
    });
    for (stem, t) in &tables {
        t.write(out, stem, &details)?;
    }
    Ok(tables)
}

/// Figure 5: the positive and negative hidden states of the last edited layer's knowledge,
/// encoded into the semantic and the truthfulness space, each projected on its first two
/// principal components. Disentangling shows as pairs overlapping in the semantic space and
/// two separate clouds in the truthfulness space.
fn figure5(setup: &Setup, path: &Path) -> Result<()> {
    use crate::report::{ScatterPanel, pca_2d, scatter_png};
    let memory = &setup.prepared.memory;
    let slot = memory.layers.len() - 1;
    let n = memory.len().min(400);
    let encoders = &setup.prepared.encoders[slot];
    let device = encoders.semantic.first.weight.val().device();
    let rows = |t: &burn::tensor::Tensor<2>| t.clone().narrow(0, 0, n).to_device(&device);
    let (pos, neg) = (rows(&memory.pos[slot]), rows(&memory.neg[slot]));
    let panel =
        |title: &str, encode: &dyn Fn(burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2>| {
            let both = burn::tensor::Tensor::cat(vec![encode(pos.clone()), encode(neg.clone())], 0);
            let d = both.dims()[1];
            let values: Vec<f32> = both
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32");
            let points = pca_2d(&values, d);
            ScatterPanel {
                title: title.to_string(),
                sets: vec![
                    ("positive (true answer)".into(), points[..n].to_vec()),
                    ("negative (hallucinated)".into(), points[n..].to_vec()),
                ],
            }
        };
    let panels = [
        panel("semantic space", &|x| encoders.semantic.forward(x)),
        panel("truthfulness space", &|x| encoders.truthfulness.forward(x)),
    ];
    scatter_png(
        &format!(
            "UniKE Figure 5 on scenes: layer {} knowledge (PCA)",
            memory.layers[slot]
        ),
        &panels,
        path,
    )
}
