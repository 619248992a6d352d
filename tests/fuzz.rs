//! A short round of `mmke fuzz` on every target (the long runs are in docs/reliability.md): mutated
//! fixtures are accepted or rejected with an error value, never a panic.

use std::path::Path;

use mmke::fuzz::{self, Target};

#[test]
fn every_reader_survives_mutated_inputs_without_panicking() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let work = tempfile::tempdir().unwrap();
    for target in Target::ALL {
        let report = fuzz::run(target, 400, 7, &fixtures, work.path()).unwrap();
        assert!(report.panics.is_empty(), "{target:?}: {:?}", report.panics);
        assert_eq!(report.accepted + report.rejected, 400);
        // The mutations do reach the parsers: some inputs are rejected...
        assert!(report.rejected > 0, "{target:?}");
        // ...and the text formats still accept some (small mutations of valid files).
        if !matches!(target, Target::Image | Target::Safetensors) {
            assert!(report.accepted > 0, "{target:?}: nothing accepted");
        }
    }
}
