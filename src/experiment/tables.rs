//! The tables and figures of the editing experiments, as data (`[presets.P.tables.STEM]` of
//! `experiments/scenes.toml`) and the one runner that produces them: an editing table is a
//! protocol run over a list of methods on one or more tasks; MSCKE's transfer (Table 3) and
//! cost (Table 4) tables and UniKE's Figure 5 are kinds of their own.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use serde::{Deserialize, Serialize};

use super::claims::{Checked, Claim};
use super::scenes::{Base, ModelsSpec, Needs, Workspace};
use crate::data::lm::edit_context;
use crate::data::record::EditRecord;
use crate::edit::Editor;
use crate::edit::method::Method;
use crate::edit::serac::MemoryEditor;
use crate::edit::speaker::{Query, Speaker};
use crate::error::{Error, Result};
use crate::eval::editing::{EditMetrics, LocalityK, Metric};
use crate::eval::protocol;
use crate::model::scope::ScopeRun;
use crate::report::Table;

/// A preset of the editing experiments.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub models: ModelsSpec,
    /// Every method a table may name, by the name its rows print.
    pub methods: BTreeMap<String, Method>,
    /// Test records a table evaluates (the first ones) unless it says otherwise.
    pub eval_records: usize,
    pub tables: BTreeMap<String, TableSpec>,
    /// Each experiment command and the tables it produces.
    pub experiments: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TableSpec {
    Editing(EditingTable),
    Transfer(TransferTable),
    Cost(CostTable),
    KnowledgePca(KnowledgePca),
}

/// A protocol over methods: one row per method (and sequence length), one column per task and
/// metric; values are token accuracy in %.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditingTable {
    pub title: String,
    #[serde(default = "method_header")]
    pub row_header: String,
    pub protocol: Protocol,
    /// Column groups: each task's records, its columns prefixed by its name (if any).
    pub tasks: Vec<Task>,
    /// (column name, metric).
    pub metrics: Vec<(String, Metric)>,
    pub rows: Vec<Row>,
    /// How a row is named: `{name}` and, for sequential editing, `{k}`.
    #[serde(default = "name_label")]
    pub label: String,
    /// Test records evaluated (the first ones); the preset's `eval_records` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<usize>,
    /// The top-k of the locality comparison (default: the reference code's).
    #[serde(default)]
    pub locality_k: LocalityK,
    /// What the papers claim of this table, checked in its record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<Claim>,
}

fn method_header() -> String {
    "method".into()
}

fn name_label() -> String {
    "{name}".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Each edit alone on the unedited model (`eval::protocol::one_step`).
    OneStep,
    /// Sequences of K edits accumulated, for each K (`eval::protocol::sequential`).
    Sequential(Vec<usize>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    #[serde(default)]
    pub name: String,
    pub records: Records,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Records {
    /// The test edits (VQA).
    Vqa,
    /// Their caption edits.
    Caption,
    /// Alternating blocks of this many VQA edits and as many caption edits of other records.
    CrossTask(usize),
}

/// A row: a method by its name, or printed under another name.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Row {
    Method(String),
    Named { name: String, method: String },
}

impl Row {
    fn names(&self) -> (&str, &str) {
        match self {
            Row::Method(m) => (m, m),
            Row::Named { name, method } => (name, method),
        }
    }
}

/// MSCKE Table 3: methods on the first and the second base model, each routed by every
/// classifier of `classifiers` (the first is the transferred one).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferTable {
    pub methods: Vec<String>,
    pub classifiers: Vec<String>,
    /// Column-name suffix of each classifier.
    pub labels: Vec<String>,
    /// The top-k of the locality comparison (default: the reference code's).
    #[serde(default)]
    pub locality_k: LocalityK,
    /// What the papers claim of this table, checked in its record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<Claim>,
}

/// MSCKE Table 4: time per query and size of a memory method's classifier, base model and
/// counterfactual model, measured side by side.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostTable {
    pub method: String,
    /// What the papers claim of this table, checked in its record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<Claim>,
}

/// UniKE Figure 5: the knowledge of `method`'s last edited layer in its semantic and
/// truthfulness spaces (PCA), as `{stem}-pca.png`, and a table of how well each space
/// separates the true from the hallucinated states.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnowledgePca {
    pub method: String,
    /// Entries drawn (the first ones).
    pub entries: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<Claim>,
}

/// One protocol run of one method.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub method: String,
    pub what: String,
    pub metrics: EditMetrics,
    pub seconds: f64,
}

impl TableSpec {
    /// What the papers claim of the table.
    pub fn claims(&self) -> &[Claim] {
        match self {
            TableSpec::Editing(t) => &t.claims,
            TableSpec::Transfer(t) => &t.claims,
            TableSpec::Cost(t) => &t.claims,
            TableSpec::KnowledgePca(t) => &t.claims,
        }
    }
}

/// What a run of an experiment's tables produced.
pub struct Produced {
    pub tables: Vec<(String, Table)>,
    /// Each table's claims, checked (by table stem).
    pub claims: Vec<(String, Checked)>,
    /// Further files written (figures).
    pub figures: Vec<String>,
}

impl Preset {
    fn method(&self, name: &str) -> Result<&Method> {
        self.methods.get(name).ok_or_else(|| Error::Config {
            path: "experiments".into(),
            reason: format!("no method '{name}' in the preset's [methods]"),
        })
    }

    fn table(&self, stem: &str) -> Result<&TableSpec> {
        self.tables.get(stem).ok_or_else(|| Error::Config {
            path: "experiments".into(),
            reason: format!("no table '{stem}' in the preset's [tables]"),
        })
    }

    /// The tables of experiment `name`.
    pub fn tables_of(&self, name: &str) -> Result<Vec<(&str, &TableSpec)>> {
        let stems = self.experiments.get(name).ok_or_else(|| Error::Config {
            path: "experiments".into(),
            reason: format!("no experiment '{name}' in the preset's [experiments]"),
        })?;
        stems
            .iter()
            .map(|s| Ok((s.as_str(), self.table(s)?)))
            .collect()
    }

    /// What `tables` need trained.
    pub fn needs(&self, tables: &[(&str, &TableSpec)]) -> Result<Needs> {
        let mut needs = Needs::default();
        for (_, table) in tables {
            match table {
                TableSpec::Editing(t) => {
                    for row in &t.rows {
                        needs.method(self.method(row.names().1)?, Base::First)?;
                    }
                }
                TableSpec::Transfer(t) => {
                    for name in &t.methods {
                        for classifier in &t.classifiers {
                            let method = with_classifier(self.method(name)?, classifier)?;
                            needs.method(&method, Base::First)?;
                            needs.method(&method, Base::Transfer)?;
                        }
                    }
                }
                TableSpec::Cost(t) => needs.method(self.method(&t.method)?, Base::First)?,
                TableSpec::KnowledgePca(t) => needs.method(self.method(&t.method)?, Base::First)?,
            }
        }
        Ok(needs)
    }
}

/// `method` routed by `classifier` instead of its own (a memory method).
fn with_classifier(method: &Method, classifier: &str) -> Result<Method> {
    match method {
        Method::Serac { .. } => Ok(Method::Serac {
            classifier: classifier.into(),
        }),
        Method::Mscke { mend, .. } => Ok(Method::Mscke {
            classifier: classifier.into(),
            mend: mend.clone(),
        }),
        other => Err(Error::Config {
            path: "experiments".into(),
            reason: format!("{other:?} has no scope classifier to transfer"),
        }),
    }
}

/// Trains what experiment `name`'s tables need (in `out`, on `data` when given), produces
/// them, checks their claims and writes each `{stem}.{md,csv,json,png}` there (Figure 5 only
/// writes its PNG).
pub fn run(
    name: &str,
    preset: &Preset,
    data: Option<&Path>,
    model: Option<&crate::edit::speaker::ModelDir>,
    out: &Path,
    device: &burn::tensor::Device,
) -> Result<Produced> {
    let specs = preset.tables_of(name)?;
    let mut workspace = Workspace::new(&preset.models, data, model, out, device)?;
    workspace.prepare(&preset.needs(&specs)?)?;
    let (mut tables, mut claims, mut figures) = (Vec::new(), Vec::new(), Vec::new());
    for (stem, spec) in specs {
        let (table, details) = match spec {
            TableSpec::Editing(t) => editing_table(preset, t, &workspace)?,
            TableSpec::Transfer(t) => transfer_table(preset, t, &workspace)?,
            TableSpec::Cost(t) => cost_table(preset, t, &workspace)?,
            TableSpec::KnowledgePca(t) => {
                let file = format!("{stem}-pca.png");
                let table = knowledge_pca(t, &workspace, &out.join(&file))?;
                figures.push(file);
                (table, serde_json::json!({}))
            }
        };
        // The claims are checked once the table is safe on disk (a claim naming a row the
        // table lacks is an error, not a lost run).
        let mut details =
            serde_json::json!({ "preset": preset, "table": spec, "details": details });
        table.write(out, stem, &details)?;
        let checked = spec
            .claims()
            .iter()
            .map(|c| c.check(&table))
            .collect::<Result<Vec<_>>>()?;
        details["claims"] = serde_json::to_value(&checked).expect("claims serialize");
        table.write(out, stem, &details)?;
        claims.extend(checked.into_iter().map(|c| (stem.to_string(), c)));
        tables.push((stem.to_string(), table));
    }
    Ok(Produced {
        tables,
        claims,
        figures,
    })
}

/// The first `n` test edits and their caption edits.
fn tasks(workspace: &Workspace, n: usize) -> (Vec<EditRecord>, Vec<EditRecord>) {
    let vqa: Vec<EditRecord> = workspace.test.iter().take(n).cloned().collect();
    let caption = vqa.iter().filter_map(EditRecord::caption_edit).collect();
    (vqa, caption)
}

fn records_of(which: &Records, vqa: &[EditRecord], caption: &[EditRecord]) -> Vec<EditRecord> {
    match which {
        Records::Vqa => vqa.to_vec(),
        Records::Caption => caption.to_vec(),
        Records::CrossTask(block) => {
            let mut mixed = Vec::new();
            for (v, c) in vqa.chunks(*block).zip(caption.chunks(*block).skip(1)) {
                mixed.extend_from_slice(v);
                mixed.extend_from_slice(c);
            }
            mixed
        }
    }
}

/// Builds `method`'s editor on `base` and runs `protocol` over it, timed.
fn measure(
    workspace: &Workspace,
    name: &str,
    method: &Method,
    base: Base,
    what: &str,
    protocol: impl FnOnce(&mut dyn Editor) -> Result<EditMetrics>,
) -> Result<Measured> {
    eprintln!("{name}: {what}");
    let mut editor = method.build(&workspace.models(base), &workspace.device)?;
    let start = Instant::now();
    let metrics = protocol(editor.as_mut())?;
    Ok(Measured {
        method: name.to_string(),
        what: what.to_string(),
        metrics,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn editing_table(
    preset: &Preset,
    spec: &EditingTable,
    workspace: &Workspace,
) -> Result<(Table, serde_json::Value)> {
    let (vqa, caption) = tasks(workspace, spec.records.unwrap_or(preset.eval_records));
    let task_records: Vec<Vec<EditRecord>> = spec
        .tasks
        .iter()
        .map(|t| records_of(&t.records, &vqa, &caption))
        .collect();
    let columns: Vec<String> = spec
        .tasks
        .iter()
        .flat_map(|t| {
            spec.metrics
                .iter()
                .map(move |(m, _)| match t.name.as_str() {
                    "" => m.clone(),
                    task => format!("{task} {m}"),
                })
        })
        .collect();
    let refs: Vec<&str> = columns.iter().map(String::as_str).collect();
    let mut table = Table::new(&spec.title, &spec.row_header, &refs);
    let ks: Vec<Option<usize>> = match &spec.protocol {
        Protocol::OneStep => vec![None],
        Protocol::Sequential(ks) => ks.iter().map(|&k| Some(k)).collect(),
    };
    let mut measured = Vec::new();
    for k in ks {
        for row in &spec.rows {
            let (name, method_name) = row.names();
            let method = preset.method(method_name)?;
            let mut values = Vec::new();
            for (task, records) in spec.tasks.iter().zip(&task_records) {
                let what = match k {
                    None => format!("one-step {}", task_label(task)),
                    Some(k) => format!("K = {k} {}", task_label(task)),
                };
                let m = measure(workspace, name, method, Base::First, &what, |e| match k {
                    None => protocol::sequential(e, records, 1, spec.locality_k),
                    Some(k) => protocol::sequential(e, records, k, spec.locality_k),
                })?;
                values.extend(
                    spec.metrics
                        .iter()
                        .map(|(_, metric)| 100.0 * metric.of(&m.metrics).token_accuracy),
                );
                measured.push(m);
            }
            let label = spec
                .label
                .replace("{name}", name)
                .replace("{k}", &k.map_or(String::new(), |k| k.to_string()));
            table.push(&label, values);
        }
    }
    let details = serde_json::json!({
        "records": { "vqa": vqa.len(), "caption": caption.len() },
        "runs": measured,
    });
    Ok((table, details))
}

fn task_label(task: &Task) -> String {
    match &task.records {
        Records::Vqa => "VQA".into(),
        Records::Caption => "caption".into(),
        Records::CrossTask(block) => format!("cross-task ({block} + {block})"),
    }
}

/// One setting of Table 3 with one classifier.
#[derive(Clone, Debug, Serialize)]
pub struct TransferResult {
    pub setting: String,
    pub classifier: String,
    /// Reliability, Locality, Generality, Specificity (token accuracy, %).
    pub scores: [f64; 4],
    /// Wall-clock seconds, evaluated beside the setting's other classifiers.
    pub seconds: f64,
}

const TRANSFER_METRICS: [(&str, Metric); 4] = [
    ("Reliability", Metric::Reliability),
    ("Locality", Metric::TLocality),
    ("Generality", Metric::TGenerality),
    ("Specificity", Metric::Specificity),
];

fn transfer_table(
    preset: &Preset,
    spec: &TransferTable,
    workspace: &Workspace,
) -> Result<(Table, serde_json::Value)> {
    let (records, _) = tasks(workspace, preset.eval_records);
    let transfer = preset
        .models
        .transfer
        .as_ref()
        .ok_or_else(|| Error::Config {
            path: workspace.out.clone(),
            reason: "a transfer table needs [models.transfer]".into(),
        })?;
    let first = preset.models.vlm.preset.as_str();
    let bases = [(Base::First, first), (Base::Transfer, &transfer.vlm.preset)];
    let mut results = Vec::new();
    for (base, vlm) in bases {
        for name in &spec.methods {
            let method = preset.method(name)?;
            let setting = format!("{name} on {vlm}");
            // The classifiers of a setting are evaluated side by side (evaluation keeps about
            // one core busy and draws nothing at random).
            std::thread::scope(|scope| -> Result<()> {
                let runs: Vec<_> = spec
                    .classifiers
                    .iter()
                    .map(|classifier| {
                        let (setting, records) = (&setting, &records);
                        scope.spawn(move || -> Result<TransferResult> {
                            let method = with_classifier(method, classifier)?;
                            let m = measure(
                                workspace,
                                setting,
                                &method,
                                base,
                                &format!("with {classifier}"),
                                |e| protocol::sequential(e, records, 1, spec.locality_k),
                            )?;
                            Ok(TransferResult {
                                setting: setting.clone(),
                                classifier: classifier.clone(),
                                scores: TRANSFER_METRICS.map(|(_, metric)| {
                                    100.0 * metric.of(&m.metrics).token_accuracy
                                }),
                                seconds: m.seconds,
                            })
                        })
                    })
                    .collect();
                for run in runs {
                    results.push(run.join().expect("an evaluation thread panicked")?);
                }
                Ok(())
            })?;
        }
    }
    let columns: Vec<String> = TRANSFER_METRICS
        .iter()
        .flat_map(|(m, _)| spec.labels.iter().map(move |l| format!("{m} {l}")))
        .collect();
    let refs: Vec<&str> = columns.iter().map(String::as_str).collect();
    let mut table = Table::new(
        &format!(
            "MSCKE Table 3 on scenes: the classifier trained with {first} ({}) vs {} \
             (token accuracy, %)",
            spec.labels[0],
            spec.labels[1..].join(", ")
        ),
        "setting",
        &refs,
    );
    for group in results.chunks(spec.classifiers.len()) {
        let values = (0..TRANSFER_METRICS.len())
            .flat_map(|i| group.iter().map(move |r| r.scores[i]))
            .collect();
        table.push(&group[0].setting, values);
    }
    Ok((table, serde_json::json!({ "results": results })))
}

/// Time and size of one component of Table 4.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub component: String,
    pub queries: usize,
    pub ms_per_query: f64,
    pub parameters: usize,
    /// f32 parameters, MB.
    pub megabytes: f64,
}

fn cost_table(
    preset: &Preset,
    spec: &CostTable,
    workspace: &Workspace,
) -> Result<(Table, serde_json::Value)> {
    let classifier = match preset.method(&spec.method)? {
        Method::Serac { classifier }
        | Method::Mscke {
            classifier,
            mend: None,
        } => classifier,
        other => {
            return Err(Error::Config {
                path: "experiments".into(),
                reason: format!("a cost table measures a memory method, not {other:?}"),
            });
        }
    };
    let (records, _) = tasks(workspace, preset.eval_records);
    let device = &workspace.device;
    let models = workspace.models(Base::First);
    // (query, answer, the edit it belongs to): each edit query and its M-Locality query.
    let mut queries = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let edit = Query {
            image: Some(r.image.clone()),
            prompt: r.prompt.clone(),
        };
        queries.push((edit, r.target.clone(), i));
        if let Some(q) = &r.m_loc {
            let query = Query {
                image: Some(q.image.clone()),
                prompt: q.prompt.clone(),
            };
            queries.push((query, q.answer.clone(), i));
        }
    }
    if models.real_mllm() {
        return Err(crate::Error::Config {
            path: models.base.path.clone(),
            reason: "the cost table times the scenes VLMs beside the classifier; with --model \
                     run the editing tables"
                .into(),
        });
    }
    let mut scope = ScopeRun::load(&models.classifiers.join(classifier), device)?;
    let batcher = scope.batcher(&[])?;
    let classifier_params = scope.model.num_params();
    let mut base = Speaker::load(&models.base.path, device)?;
    let mut counterfactual = Speaker::load(&models.counterfactual, device)?;
    let sizes = [
        classifier_params,
        base.model.num_params(),
        counterfactual.model.num_params(),
    ];
    let mut router = MemoryEditor::new(
        scope.model,
        batcher,
        Speaker::load(&models.base.path, device)?,
        Speaker::load(&models.counterfactual, device)?,
        device,
    );
    for r in &records {
        router.edit(r)?;
    }
    // Each component once before timing (image caches, allocations), then every query.
    let time = |f: &mut dyn FnMut(usize) -> Result<()>| -> Result<f64> {
        f(0)?;
        let start = Instant::now();
        for i in 0..queries.len() {
            f(i)?;
        }
        Ok(start.elapsed().as_secs_f64() * 1000.0 / queries.len().max(1) as f64)
    };
    let classifier_ms = time(&mut |i| {
        router.route(std::slice::from_ref(&queries[i].0))?;
        Ok(())
    })?;
    let base_ms = time(&mut |i| {
        let (q, answer, _) = &queries[i];
        base.predict(q.image.as_deref(), &q.prompt, answer, 1, device)?;
        Ok(())
    })?;
    let counterfactual_ms = time(&mut |i| {
        let (q, answer, edit) = &queries[i];
        let prompt = format!("{}{}", edit_context(&records[*edit]), q.prompt);
        counterfactual.predict(q.image.as_deref(), &prompt, answer, 1, device)?;
        Ok(())
    })?;
    let names = [
        "multimodal scope classifier",
        "base model",
        "counterfactual model",
    ];
    let costs: Vec<Cost> = names
        .iter()
        .zip([classifier_ms, base_ms, counterfactual_ms])
        .zip(sizes)
        .map(|((name, ms), parameters)| Cost {
            component: name.to_string(),
            queries: queries.len(),
            ms_per_query: ms,
            parameters,
            megabytes: parameters as f64 * 4.0 / 1e6,
        })
        .collect();
    let mut table = Table::new(
        &format!(
            "MSCKE Table 4 on scenes: inference time per query ({} edits stored) and size",
            records.len()
        ),
        "component",
        &["time per query (ms)", "parameters (M)", "size (MB, f32)"],
    );
    for c in &costs {
        table.push(
            &c.component,
            vec![c.ms_per_query, c.parameters as f64 / 1e6, c.megabytes],
        );
    }
    let details = serde_json::json!({ "device": format!("{device:?}"), "costs": costs });
    Ok((table, details))
}

/// Figure 5: the positive and negative hidden states of the last edited layer's knowledge,
/// encoded into the semantic and the truthfulness space, each projected on its first two
/// principal components. Disentangling shows as pairs overlapping in the semantic space and
/// two separate clouds in the truthfulness space. The table measures it in each full space:
/// the share of states (positive and negative) nearer their own class's centroid
/// ([`nearest_centroid_accuracy`]; 50 is no separation, 100 two clean clouds).
fn knowledge_pca(spec: &KnowledgePca, workspace: &Workspace, path: &Path) -> Result<Table> {
    use crate::report::{ScatterPanel, pca_2d, scatter_png};
    let prepared = workspace.knowledge.as_ref().ok_or_else(|| Error::Config {
        path: workspace.out.clone(),
        reason: format!("{}: Figure 5 needs a UniKE method", spec.method),
    })?;
    let memory = &prepared.memory;
    let slot = memory.layers.len() - 1;
    let n = memory.len().min(spec.entries);
    let encoders = &prepared.encoders[slot];
    let device = encoders.semantic.first.weight.val().device();
    let rows = |t: &burn::tensor::Tensor<2>| t.clone().narrow(0, 0, n).to_device(&device);
    let (pos, neg) = (rows(&memory.pos[slot]), rows(&memory.neg[slot]));
    let mut table = Table::new(
        "UniKE Figure 5: true vs hallucinated knowledge",
        "space",
        &["separation"],
    );
    let mut panel =
        |title: &str, encode: &dyn Fn(burn::tensor::Tensor<2>) -> burn::tensor::Tensor<2>| {
            let both = burn::tensor::Tensor::cat(vec![encode(pos.clone()), encode(neg.clone())], 0);
            let d = both.dims()[1];
            let values: Vec<f32> = both
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("f32");
            table.push(title, vec![nearest_centroid_accuracy(&values, d, n)]);
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
    )?;
    Ok(table)
}

/// The share (%) of `2 n` points (rows of `values`, `d` wide: `n` positives, then `n`
/// negatives) nearer (Euclidean) their own class's centroid than the other's.
pub fn nearest_centroid_accuracy(values: &[f32], d: usize, n: usize) -> f64 {
    let centroid = |rows: std::ops::Range<usize>| -> Vec<f64> {
        let mut c = vec![0f64; d];
        for r in rows.clone() {
            for (k, v) in values[r * d..(r + 1) * d].iter().enumerate() {
                c[k] += *v as f64;
            }
        }
        c.iter().map(|v| v / rows.len().max(1) as f64).collect()
    };
    let (pos, neg) = (centroid(0..n), centroid(n..2 * n));
    let distance = |r: usize, c: &[f64]| -> f64 {
        values[r * d..(r + 1) * d]
            .iter()
            .zip(c)
            .map(|(v, c)| (*v as f64 - c).powi(2))
            .sum()
    };
    let right = (0..2 * n)
        .filter(|&r| {
            let (own, other) = if r < n { (&pos, &neg) } else { (&neg, &pos) };
            distance(r, own) < distance(r, other)
        })
        .count();
    100.0 * right as f64 / (2 * n).max(1) as f64
}

#[cfg(test)]
mod separation_tests {
    use super::nearest_centroid_accuracy;

    #[test]
    fn nearest_centroid_accuracy_tells_two_clouds_from_one() {
        // Two points a class in 2-d: far apart, then the same points in both classes.
        let apart = [0.0, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0];
        assert_eq!(nearest_centroid_accuracy(&apart, 2, 2), 100.0);
        let mixed = [0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 5.0, 5.0];
        assert_eq!(nearest_centroid_accuracy(&mixed, 2, 2), 0.0);
    }
}
