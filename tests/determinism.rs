//! Determinism: the same preset and seeds give the same numbers. In a test binary of its
//! own, because the device's random generator is shared by the tests of one process, and
//! tests running beside it would draw from it in between.

use burn::tensor::Device;
use mmke::experiment::load_preset;

#[test]
fn the_same_preset_and_seeds_give_identical_numbers_end_to_end() {
    use mmke::experiment::unike::{self, Preset, Which};
    let dir = tempfile::tempdir().unwrap();
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-unike.toml");
    let preset: Preset = load_preset("unike", Some(&file), "tiny").unwrap();
    // Everything trained from scratch twice (CLIP, classifier, VLMs, knowledge, MEND, KE),
    // then every UniKE ablation: the same numbers.
    let run = |name: &str| {
        let out = dir.path().join(name);
        unike::run(Which::Table4, &preset, None, &out, &Device::flex()).unwrap()[0]
            .1
            .rows
            .iter()
            .map(|r| r.values.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(run("first"), run("second"));
}
