//! The library's top-level modules import each other one way only: each may use the modules
//! of the layers below it, never those above or beside it. Read from the sources (`crate::X`
//! paths outside comments), so a new upward import fails here.

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first; a module may import any module of an earlier layer.
const LAYERS: &[&[&str]] = &[
    &["backend"],
    &["error"],
    &["frame", "report"],
    &["data"],
    &["model"],
    &["edit"],
    &["eval"],
    &["train"],
    &["experiment", "bench", "fuzz"],
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer of tests/layers.rs"))
}

/// The top-level modules that the Rust files under `path` name as `crate::X`.
fn imports(path: &Path, out: &mut BTreeSet<String>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            imports(&entry.unwrap().path(), out);
        }
        return;
    }
    if path.extension().is_none_or(|e| e != "rs") {
        return;
    }
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !name.is_empty(),
                "{}: `crate::{{...}}` groups hide the layers: {line}",
                path.display()
            );
            out.insert(name);
        }
    }
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if matches!(name.as_str(), "lib" | "bin") {
            continue;
        }
        let mut used = BTreeSet::new();
        imports(&path, &mut used);
        let own = layer_of(&name);
        for dependency in used
            .iter()
            .filter(|d| **d != name && *d != "Result" && *d != "Error")
        {
            assert!(
                layer_of(dependency) < own,
                "`{name}` imports `{dependency}`, which is not below it"
            );
        }
        seen.push(name);
    }
    seen.sort();
    let mut listed: Vec<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter().map(|s| s.to_string()))
        .collect();
    listed.sort();
    assert_eq!(seen, listed, "every module of src/ is in exactly one layer");
}
