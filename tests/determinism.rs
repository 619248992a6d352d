//! Determinism: the same preset and seeds give the same numbers, for every experiment mmke
//! has (on the tiny presets the tests use; the quick and full presets differ only in sizes).
//! Everything is trained from scratch twice, in two directories, and the tables must also
//! equal the committed golden numbers (`tests/fixtures/golden-tiny-tables.txt`). In a test
//! binary of its own, because the device's random generator is shared by the tests of one
//! process, and tests running beside it would draw from it in between.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use mmke::experiment::load_preset;
use mmke::report::Table;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn values(table: &Table) -> Vec<(String, Vec<f64>)> {
    table
        .rows
        .iter()
        .map(|r| (r.name.clone(), r.values.clone()))
        .collect()
}

/// Every table of every experiment, trained and evaluated in `out`; Figure 5 as its PNG. The
/// editing experiments read `scenes` (MSCKE's with preset `mscke`, UniKE's with `unike`:
/// when the two are the same preset they share one directory and its models).
fn every_experiment(
    out: &Path,
    scenes: &Path,
    mscke: &str,
    unike: &str,
) -> Vec<(String, Vec<(String, Vec<f64>)>)> {
    use mmke::experiment::{Experiment, fusion_ablation, run};
    let device = Device::flex();
    let mut tables = Vec::new();

    let preset: fusion_ablation::Preset = load_preset(
        "fusion-ablation",
        Some(&fixture("tiny-fusion-ablation.toml")),
        "tiny",
    )
    .unwrap();
    let (t, _) = fusion_ablation::run(&preset, None, &out.join("fusion"), &device).unwrap();
    tables.push(("fusion-ablation".to_string(), values(&t)));

    // MSCKE Table 4 measures wall-clock time: not a deterministic number, left out.
    let experiments = [
        ("mscke-table1", mscke),
        ("mscke-table3", mscke),
        ("unike-table1", unike),
        ("unike-table2", unike),
        ("unike-table3", unike),
        ("unike-table4", unike),
        ("unike-fig4", unike),
        ("unike-fig5", unike),
    ];
    for (name, preset) in experiments {
        let dir = out.join(preset);
        let experiment = Experiment::named(name).unwrap();
        let outcome = run(experiment, preset, Some(scenes), None, None, &dir, &device).unwrap();
        for (stem, t) in &outcome.tables {
            tables.push((stem.clone(), values(t)));
        }
    }
    let png = std::fs::read(out.join(unike).join("unike-fig5-pca.png")).unwrap();
    tables.push((
        "unike-fig5-pca.png".to_string(),
        vec![(String::new(), png.iter().map(|&b| b as f64).collect())],
    ));
    tables
}

/// The tables as they print (two decimals), Figure 5's PNG left out.
fn printed(tables: &[(String, Vec<(String, Vec<f64>)>)]) -> String {
    let mut out = String::new();
    for (stem, rows) in tables.iter().filter(|(stem, _)| !stem.ends_with(".png")) {
        out += &format!("## {stem}\n");
        for (name, values) in rows {
            let cells: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
            out += &format!("{name} | {}\n", cells.join(" | "));
        }
    }
    out
}

#[test]
fn the_same_presets_and_seeds_give_identical_numbers_in_every_experiment() {
    let dir = tempfile::tempdir().unwrap();
    // MSCKE's and UniKE's experiments share the tiny preset's models, as they do in
    // experiments/scenes.toml.
    let scenes = fixture("tiny-scenes.toml");
    let first = every_experiment(&dir.path().join("first"), &scenes, "tiny", "tiny");
    let second = every_experiment(&dir.path().join("second"), &scenes, "tiny", "tiny");
    let stems: Vec<&str> = first.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        stems,
        [
            "fusion-ablation",
            "mscke-table1",
            "mscke-table3",
            "unike-table1",
            "unike-table2",
            "unike-table3",
            "unike-table4",
            "unike-fig4a",
            "unike-fig4b",
            "unike-fig4c",
            "unike-fig5",
            "unike-fig5-pca.png"
        ]
    );
    for ((stem, a), (_, b)) in first.iter().zip(&second) {
        assert!(!a.is_empty(), "{stem}: no rows");
        assert_eq!(a, b, "{stem}: the second run differs");
    }
    // The golden numbers: every table of the tiny presets as committed. A change that moves
    // them must say so; `MMKE_BLESS=1` rewrites the file.
    let golden = fixture("golden-tiny-tables.txt");
    let now = printed(&first);
    if std::env::var_os("MMKE_BLESS").is_some() {
        std::fs::write(&golden, &now).unwrap();
    }
    let pinned = std::fs::read_to_string(&golden).unwrap();
    assert!(
        now == pinned,
        "the tiny presets' tables moved from {}:\n{now}",
        golden.display()
    );
}
