//! The experiment runner, end to end on a tiny preset: files, cache reuse, determinism.

use burn::tensor::Device;
use mmke::experiment::fusion_ablation::{Preset, run};
use mmke::experiment::load_preset;

#[test]
fn shipped_experiment_files_parse_with_both_presets() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let file = std::path::Path::new(dir).join("experiments/fusion-ablation.toml");
    for preset in ["quick", "full"] {
        let p: Preset = load_preset("fusion-ablation", Some(&file), preset).unwrap();
        assert_eq!(p.fusions.len(), 3, "{preset}");
        assert_eq!(p.clips, ["clip-tiny", "clip-small"], "{preset}");
    }
    // The built-in copy is the same file.
    let builtin: Preset = load_preset("fusion-ablation", None, "quick").unwrap();
    assert_eq!(builtin.train.steps, 600);
    assert!(builtin.clip_overrides.contains_key("clip-small"));
    let err = load_preset::<Preset>("fusion-ablation", Some(&file), "huge").unwrap_err();
    assert!(err.to_string().contains("no preset 'huge'"), "{err}");
    let path = |name: &str| std::path::Path::new(dir).join(format!("experiments/{name}.toml"));
    for preset in ["quick", "full"] {
        let mscke: mmke::experiment::mscke_table1::Preset =
            load_preset("mscke-table1", Some(&path("mscke-table1")), preset).unwrap();
        let unike: mmke::experiment::unike::Preset =
            load_preset("unike-table1", Some(&path("unike")), preset).unwrap();
        // UniKE's models are MSCKE's (the files say so; keep them equal).
        assert_eq!(mscke.vlm, unike.vlm, "{preset}");
        assert_eq!(mscke.counterfactual, unike.counterfactual, "{preset}");
        assert_eq!(mscke.clip, unike.clip, "{preset}");
        assert_eq!(mscke.data, unike.data, "{preset}");
    }
}

#[test]
fn fusion_ablation_writes_table_2_and_reuses_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let preset: Preset = load_preset(
        "fusion-ablation",
        Some(&fixture("tiny-fusion-ablation.toml")),
        "tiny",
    )
    .unwrap();
    let out = dir.path().join("out");
    let device = Device::flex();
    let (table, results) = run(&preset, None, &out, &device).unwrap();
    assert_eq!(table.columns, ["clip-tiny"]);
    let rows: Vec<&str> = table.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(rows, ["concat", "cross-attention", "dot-product"]);
    for (row, result) in table.rows.iter().zip(&results) {
        assert!((0.0..=100.0).contains(&row.values[0]), "{row:?}");
        assert_eq!(row.values[0], result.accuracy);
    }
    for ext in ["md", "csv", "json", "png"] {
        let path = out.join(format!("fusion-ablation.{ext}"));
        assert!(path.is_file(), "{}", path.display());
    }
    let markdown = std::fs::read_to_string(out.join("fusion-ablation.md")).unwrap();
    assert!(markdown.starts_with("| fusion | clip-tiny |"), "{markdown}");

    // A second run trains nothing (the runs are cached) and reports the same numbers.
    let weights = out.join("clip-tiny-dot-product/model.bpk");
    let modified = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let (again, _) = run(&preset, None, &out, &device).unwrap();
    assert_eq!(
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
        modified
    );
    let values =
        |t: &mmke::report::Table| t.rows.iter().map(|r| r.values.clone()).collect::<Vec<_>>();
    assert_eq!(values(&again), values(&table));
}

#[test]
fn mscke_table1_trains_what_it_needs_and_scores_every_method() {
    use mmke::experiment::mscke_table1;
    let dir = tempfile::tempdir().unwrap();
    let preset: mscke_table1::Preset =
        load_preset("mscke-table1", Some(&fixture("tiny-mscke.toml")), "tiny").unwrap();
    let out = dir.path().join("out");
    let (table, results) = mscke_table1::run(&preset, None, &out, &Device::flex()).unwrap();
    let table1 = results.clone();
    let methods: Vec<&str> = table.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        methods,
        [
            "FT-LLM",
            "FT-Visual",
            "IKE",
            "SERAC",
            "MEND",
            "MSCKE",
            "MSCKE-MEND"
        ]
    );
    assert_eq!(
        table.columns,
        ["Reliability", "Locality", "Generality", "Specificity"]
    );
    for (row, result) in table.rows.iter().zip(&results) {
        assert!(
            row.values.iter().all(|v| (0.0..=100.0).contains(v)),
            "{row:?}"
        );
        assert_eq!(result.metrics.reliability.n, 2);
    }
    // FT-Visual changes only the vision side, so a text-only answer cannot change.
    let ft_visual = &results[1];
    assert_eq!(ft_visual.metrics.t_locality.exact_match, 1.0);
    for ext in ["md", "csv", "json", "png"] {
        assert!(out.join(format!("mscke-table1.{ext}")).is_file());
    }
    let shipped: mscke_table1::Preset = load_preset("mscke-table1", None, "quick").unwrap();
    assert_eq!(shipped.eval_records, 20);

    // Table 4 measures the same models, trained once.
    let (table, costs) =
        mmke::experiment::mscke_table4::run(&preset, None, &out, &Device::flex()).unwrap();
    assert_eq!(table.rows.len(), 3);
    for c in &costs {
        assert!(c.ms_per_query > 0.0 && c.parameters > 0, "{c:?}");
        assert_eq!(c.queries, costs[0].queries);
    }
    // The classifier and the two VLMs differ in size; both VLMs share one preset.
    assert_eq!(costs[1].parameters, costs[2].parameters);
    assert!(out.join("mscke-table4.md").is_file());

    // Table 3: four settings, each with the transferred and the retrained classifier.
    let (table, results) =
        mmke::experiment::mscke_table3::run(&preset, None, &out, &Device::flex()).unwrap();
    let rows: Vec<&str> = table.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        rows,
        [
            "MSCKE on vlm-tiny-objects",
            "MSCKE-MEND on vlm-tiny-objects",
            "MSCKE on vlm-small",
            "MSCKE-MEND on vlm-small"
        ]
    );
    assert_eq!(results.len(), 8);
    // The transferred classifier in the first setting is Table 1's MSCKE, same numbers.
    let mscke = &table1[5];
    assert_eq!(
        results[0].scores[0],
        100.0 * mscke.metrics.reliability.token_accuracy
    );
    assert!(out.join("transfer/vlm/model.bpk").is_file());
    assert!(out.join("transfer/mend/mend.bpk").is_file());
    // The second base model's MEND meta-trains by `transfer.mend_train` (3 steps, not 2).
    let step = |dir: &str| {
        let state = std::fs::read_to_string(out.join(dir).join("checkpoint/state.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&state).unwrap()["step"].clone()
    };
    assert_eq!((step("mend"), step("transfer/mend")), (2.into(), 3.into()));

    // A changed preset retrains exactly the models its change affects.
    let artifacts = [
        "clip-tiny/model.safetensors",
        "scope-text/model.bpk",
        "scope-multimodal/model.bpk",
        "vlm/model.bpk",
        "counterfactual/model.bpk",
        "mend/mend.bpk",
    ];
    let stamps = || -> Vec<std::time::SystemTime> {
        artifacts
            .iter()
            .map(|a| std::fs::metadata(out.join(a)).unwrap().modified().unwrap())
            .collect()
    };
    let retrained = |before: &[std::time::SystemTime]| -> Vec<&str> {
        let after = stamps();
        artifacts
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| b != a)
            .map(|(name, _)| name.split('/').next().unwrap())
            .collect()
    };
    let before = stamps();
    mscke_table1::prepare(&preset, None, &out, &Device::flex()).unwrap();
    assert_eq!(retrained(&before), Vec::<&str>::new(), "nothing changed");
    let mut changed = preset.clone();
    changed.counterfactual.steps = 3;
    let before = stamps();
    mscke_table1::prepare(&changed, None, &out, &Device::flex()).unwrap();
    assert_eq!(retrained(&before), ["counterfactual"]);
    assert_eq!(step("counterfactual"), serde_json::Value::from(3));
    // MEND is meta-trained on the base model: it follows it.
    changed.vlm.lr = 2e-3;
    let before = stamps();
    mscke_table1::prepare(&changed, None, &out, &Device::flex()).unwrap();
    assert_eq!(retrained(&before), ["vlm", "mend"]);
    // The CLIP is under everything but MEND's own settings.
    changed.clip.steps = 3;
    let before = stamps();
    mscke_table1::prepare(&changed, None, &out, &Device::flex()).unwrap();
    assert_eq!(
        retrained(&before),
        [
            "clip-tiny",
            "scope-text",
            "scope-multimodal",
            "vlm",
            "counterfactual",
            "mend"
        ]
    );
}

#[test]
fn unike_tables_and_figure_5_run_end_to_end() {
    use mmke::experiment::unike::{self, Preset, Which};
    let dir = tempfile::tempdir().unwrap();
    let preset: Preset = load_preset("unike", Some(&fixture("tiny-unike.toml")), "tiny").unwrap();
    let out = dir.path().join("out");
    let tables = unike::run(Which::Table4, &preset, None, &out, &Device::flex()).unwrap();
    let (stem, table) = &tables[0];
    assert_eq!(stem, "unike-table4");
    let rows: Vec<&str> = table.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        rows,
        [
            "1 only Intrin",
            "2 only Latent-IKE",
            "3 Intrin+IKE",
            "4 Intrin+Latent-IKE",
            "5 UniKE"
        ]
    );
    assert_eq!(table.columns.len(), 10, "five metrics on each task");
    assert!(
        table
            .rows
            .iter()
            .all(|r| r.values.iter().all(|v| (0.0..=100.0).contains(v)))
    );
    for ext in ["md", "csv", "json", "png"] {
        assert!(out.join(format!("unike-table4.{ext}")).is_file());
    }
    assert!(out.join("knowledge/knowledge.bin").is_file());
    unike::run(Which::Fig5, &preset, None, &out, &Device::flex()).unwrap();
    assert!(out.join("unike-fig5.png").is_file());
    // Table 1 scores every method mmke has, in the paper's order.
    let tables = unike::run(Which::Table1, &preset, None, &out, &Device::flex()).unwrap();
    let rows: Vec<&str> = tables[0].1.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        rows,
        ["FT", "KE", "T-Patcher", "MEND", "IKE", "SERAC", "UniKE"]
    );
    assert!(out.join("mend/mend.bpk").is_file() && out.join("ke/ke.bpk").is_file());
    for name in ["quick", "full"] {
        let shipped: Preset = load_preset("unike", None, name).unwrap();
        assert_eq!(shipped.unike.top_k, 40);
    }
}

/// A tiny preset shared with `tests/determinism.rs`.
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
