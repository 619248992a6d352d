//! Where a test suite runs and what it reads: the device (flex unless `MMKE_TEST_BACKEND`
//! names another backend compiled into the tests, e.g. `wgpu` on Mesa's lavapipe in CI), the
//! project root its fixtures and configs are under and the `mmke` binary it runs (the build's,
//! unless `MMKE_TEST_ROOT` / `MMKE_TEST_BIN` point at a copy: `tools/gpu-check` runs the
//! tests on a machine without the sources).

use std::path::PathBuf;

use burn::tensor::Device;

/// The backend `MMKE_TEST_BACKEND` names (default flex), on its first device.
pub fn device() -> Device {
    let backend = std::env::var("MMKE_TEST_BACKEND").unwrap_or_else(|_| "flex".into());
    let backend = backend
        .parse()
        .unwrap_or_else(|e| panic!("MMKE_TEST_BACKEND: {e}"));
    mmke::backend::device(backend, None).unwrap_or_else(|e| panic!("MMKE_TEST_BACKEND: {e}"))
}

/// The project root: `MMKE_TEST_ROOT`, else the crate's directory.
#[allow(dead_code)]
pub fn root() -> PathBuf {
    std::env::var_os("MMKE_TEST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `mmke` binary: `MMKE_TEST_BIN`, else the one this build made.
#[allow(dead_code)]
pub fn mmke_bin() -> PathBuf {
    std::env::var_os("MMKE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mmke")))
}
