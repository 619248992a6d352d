//! The device a test suite runs on: flex unless `MMKE_TEST_BACKEND` names another backend
//! compiled into the tests (`wgpu` on Mesa's lavapipe in CI), with the same tolerances
//! everywhere.

use burn::tensor::Device;

/// The backend `MMKE_TEST_BACKEND` names (default flex), on its first device.
pub fn device() -> Device {
    let backend = std::env::var("MMKE_TEST_BACKEND").unwrap_or_else(|_| "flex".into());
    let backend = backend
        .parse()
        .unwrap_or_else(|e| panic!("MMKE_TEST_BACKEND: {e}"));
    mmke::backend::device(backend, None).unwrap_or_else(|e| panic!("MMKE_TEST_BACKEND: {e}"))
}
