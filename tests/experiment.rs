//! The experiment runner, end to end on a tiny preset: files, cache reuse, determinism.

use std::path::PathBuf;

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

    // The editing experiments: `full` inherits `quick` and states what differs.
    use mmke::edit::method::Method;
    use mmke::experiment::tables;
    let quick: tables::Preset = load_preset("scenes", None, "quick").unwrap();
    let full: tables::Preset = load_preset("scenes", None, "full").unwrap();
    for preset in [&quick, &full] {
        for experiment in mmke::experiment::Experiment::ALL.iter().skip(1) {
            let specs = preset.tables_of(experiment.name()).unwrap();
            preset.needs(&specs).unwrap();
        }
    }
    assert_eq!((quick.eval_records, full.eval_records), (20, 100));
    assert_eq!(
        (quick.models.vlm.train.steps, full.models.vlm.train.steps),
        (1000, 3000)
    );
    assert_eq!(
        quick.models.vlm.train.batch_size,
        full.models.vlm.train.batch_size
    );
    assert_eq!(full.models.data.seed, quick.models.data.seed);
    // A classifier defined from another differs from it where it says.
    let classifiers = &full.models.classifiers;
    let (multimodal, text) = (&classifiers["scope-multimodal"], &classifiers["scope-text"]);
    assert_eq!(multimodal.train, text.train);
    assert_eq!(text.train.steps, 3000);
    assert_ne!(multimodal.model.mode, text.model.mode);
    let Method::UniKe(ablation) = &quick.methods["1 only Intrin"] else {
        panic!("an ablation of UniKE is UniKE")
    };
    let Method::UniKe(unike) = &quick.methods["UniKE"] else {
        panic!()
    };
    assert_eq!(
        (ablation.top_k, ablation.neurons),
        (unike.top_k, unike.neurons)
    );
    assert_ne!(ablation.in_context, unike.in_context);
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
fn editing_tables_train_what_they_need_once_and_retrain_what_a_change_affects() {
    use mmke::experiment::scenes::Workspace;
    use mmke::experiment::{Experiment, tables};
    let dir = tempfile::tempdir().unwrap();
    let file = fixture("tiny-scenes.toml");
    let preset: tables::Preset = load_preset("scenes", Some(&file), "tiny").unwrap();
    let out = dir.path().join("out");
    let device = Device::flex();
    let run = |name: &str| {
        let experiment = Experiment::named(name).unwrap();
        mmke::experiment::run(experiment, "tiny", Some(&file), None, None, &out, &device).unwrap()
    };
    // Table 1 writes its files; the numbers are the golden ones of tests/determinism.rs.
    run("mscke-table1");
    for ext in ["md", "csv", "json", "png"] {
        assert!(out.join(format!("mscke-table1.{ext}")).is_file());
    }
    // Table 4 measures the same models, trained once.
    let clip = out.join("clip-tiny/model.safetensors");
    let stamp = |path: &std::path::Path| std::fs::metadata(path).unwrap().modified().unwrap();
    let clip_made = stamp(&clip);
    let outcome = run("mscke-table4");
    assert_eq!(stamp(&clip), clip_made);
    let table = &outcome.tables[0].1;
    assert_eq!(table.rows.len(), 3);
    for row in &table.rows {
        assert!(row.values[0] > 0.0 && row.values[1] > 0.0, "{row:?}");
    }
    // Both VLMs share one preset: the same size.
    assert_eq!(table.rows[1].values[1], table.rows[2].values[1]);
    // Figure 5 writes its PCA plot and its separation table (and builds UniKE's knowledge).
    let outcome = run("unike-fig5");
    assert_eq!(outcome.figures, ["unike-fig5-pca.png"]);
    assert!(
        out.join("unike-fig5-pca.png").is_file() && out.join("knowledge/knowledge.bin").is_file()
    );
    let separation = &outcome.tables[0].1;
    let spaces: Vec<&str> = separation.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(spaces, ["semantic space", "truthfulness space"]);
    assert!(
        separation
            .rows
            .iter()
            .all(|r| (0.0..=100.0).contains(&r.values[0]))
    );
    // Table 3 trains the second base model and its MEND by their own settings (3 steps).
    run("mscke-table3");
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
        artifacts.iter().map(|a| stamp(&out.join(a))).collect()
    };
    let needs = preset
        .needs(&preset.tables_of("mscke-table1").unwrap())
        .unwrap();
    let prepare = |preset: &tables::Preset| -> Vec<&str> {
        let before = stamps();
        let mut workspace = Workspace::new(&preset.models, None, None, &out, &device).unwrap();
        workspace.prepare(&needs).unwrap();
        artifacts
            .iter()
            .zip(before.iter().zip(stamps()))
            .filter(|(_, (b, a))| **b != *a)
            .map(|(name, _)| name.split('/').next().unwrap())
            .collect()
    };
    assert_eq!(prepare(&preset), Vec::<&str>::new(), "nothing changed");
    let mut changed = preset.clone();
    changed.models.counterfactual.train.steps = 3;
    assert_eq!(prepare(&changed), ["counterfactual"]);
    assert_eq!(step("counterfactual"), serde_json::Value::from(3));
    // MEND is meta-trained on the base model: it follows it.
    changed.models.vlm.train.lr = 2e-3;
    assert_eq!(prepare(&changed), ["vlm", "mend"]);
    // The CLIP is under everything but MEND's own settings.
    changed.models.clip.train.steps = 3;
    assert_eq!(
        prepare(&changed),
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

/// A tiny preset shared with `tests/determinism.rs`.
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `mmke experiment ... --model DIR --data FGVEDIT`: the editing tables run on a Hugging Face
/// MLLM (the tiny LLaVA the tests ship) with every method of the table, nothing trains a
/// scenes VLM, and what is trained for the model (MEND, UniKE's knowledge) names it in its
/// provenance; the tables that need the scenes VLMs say so.
#[test]
fn editing_tables_run_on_a_real_mllm_directory() {
    use mmke::experiment::Experiment;
    let file = fixture("tiny-scenes.toml");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mllm/llava/hub");
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mllm/image16.png"),
        data.path().join("a.png"),
    )
    .unwrap();
    let record = |i: usize| {
        let w = |k: usize| format!("w{}", 3 + (i * 7 + k * 5) % 66);
        serde_json::json!({
            "src": format!("{} {} {}", w(0), w(1), w(2)), "alt": w(3),
            "rephrase": format!("{} {} {}", w(0), w(4), w(2)), "image": "a.png",
            "loc": format!("{} {}", w(5), w(6)), "loc_ans": w(7),
            "fg_gen_q": format!("{} {}", w(0), w(8)), "fg_gen_a": w(3),
            "fg_loc_q": format!("{} {}", w(9), w(10)), "fg_loc_a": w(11)
        })
    };
    let write = |name: &str, n: usize, from: usize| {
        let records: Vec<_> = (from..from + n).map(record).collect();
        let text = serde_json::Value::Array(records).to_string();
        std::fs::write(data.path().join(name), text).unwrap();
    };
    write("train.json", 6, 0);
    write("test.json", 4, 6);
    let out = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let run_in = |name: &str, dtype: burn::tensor::DType| {
        let experiment = Experiment::named(name).unwrap();
        mmke::experiment::run(
            experiment,
            "tiny",
            Some(&file),
            Some(data.path()),
            Some(&mmke::edit::speaker::ModelDir::new(&model, dtype)),
            out.path(),
            &device,
        )
    };
    let run = |name: &str| run_in(name, burn::tensor::DType::F32);
    let provenance = |artifact: &str| -> serde_json::Value {
        let text =
            std::fs::read_to_string(out.path().join(artifact).join("provenance.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    for name in ["mscke-table1", "unike-table1"] {
        let outcome = run(name).unwrap();
        let (_, table) = &outcome.tables[0];
        let rows: Vec<&str> = table.rows.iter().map(|r| r.name.as_str()).collect();
        let expected: &[&str] = if name == "mscke-table1" {
            &[
                "FT-LLM",
                "FT-Visual",
                "IKE",
                "SERAC",
                "MEND",
                "MSCKE",
                "MSCKE-MEND",
            ]
        } else {
            &["FT", "KE", "T-Patcher", "MEND", "IKE", "SERAC", "UniKE"]
        };
        assert_eq!(rows, expected, "{name}");
    }
    assert!(!out.path().join("vlm").exists(), "a scenes VLM was trained");
    assert!(
        out.path()
            .join("counterfactual/language_model.bpk")
            .is_file()
    );
    for artifact in ["mend", "knowledge"] {
        let provenance = provenance(artifact);
        assert_eq!(
            provenance["vlm"]["kind"], "mllm",
            "{artifact}: {provenance}"
        );
        assert_eq!(
            provenance["vlm"]["dtype"], "F32",
            "{artifact}: {provenance}"
        );
    }
    // The same table on the model held in bf16: what was trained for it in f32 is not
    // reused.
    let outcome = run_in("mscke-table1", burn::tensor::DType::BF16).unwrap();
    assert_eq!(outcome.tables[0].1.rows.len(), 7);
    assert_eq!(provenance("mend")["vlm"]["dtype"], "BF16");
    for name in ["mscke-table3", "mscke-table4"] {
        let error = run(name).err().expect("needs the scenes VLMs").to_string();
        assert!(error.contains("--model"), "{name}: {error}");
    }
}
