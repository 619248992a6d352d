//! The one place where a `--backend` name and a `--device` index become a Burn `Device`.
//!
//! Burn 0.22 chooses the backend at run time; the cargo features decide which backends the
//! binary carries. A backend that was not compiled in, or a device index that does not exist,
//! is refused with a clear error: mmke never falls back to another device silently.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A compute backend mmke can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Burn's pure-Rust CPU backend (the default).
    Flex,
    /// WGPU: Vulkan, Metal, DirectX, or Mesa's lavapipe on a CPU-only Linux machine.
    Wgpu,
    /// NVIDIA CUDA.
    Cuda,
    /// Burn's ndarray CPU backend (deprecated in Burn 0.22; the `ndarray` feature, with
    /// OpenBLAS under `ndarray-openblas`): a candidate measured against flex, not a default.
    Ndarray,
}

impl Backend {
    pub const ALL: [Backend; 4] = [
        Backend::Flex,
        Backend::Wgpu,
        Backend::Cuda,
        Backend::Ndarray,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
            Backend::Ndarray => "ndarray",
        }
    }

    /// Whether this binary was built with the cargo feature of this backend.
    pub fn compiled(self) -> bool {
        match self {
            Backend::Flex => cfg!(feature = "flex"),
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Cuda => cfg!(feature = "cuda"),
            Backend::Ndarray => cfg!(feature = "ndarray"),
        }
    }

    /// The backends this binary carries, e.g. `["flex", "wgpu"]`.
    pub fn available() -> Vec<&'static str> {
        Self::ALL
            .iter()
            .filter(|b| b.compiled())
            .map(|b| b.name())
            .collect()
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| BackendError::Unknown(s.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend '{0}': expected one of flex, wgpu, cuda, ndarray")]
    Unknown(String),
    #[error(
        "backend '{backend}' is not compiled into this binary (rebuild with `--features {backend}`); available: {}",
        Backend::available().join(", ")
    )]
    NotCompiled { backend: Backend },
    #[error("backend '{backend}' has no device {index}: {found} device(s) found")]
    NoSuchDevice {
        backend: Backend,
        index: usize,
        found: usize,
    },
    #[error("backend '{backend}' is the host CPU and has only device 0, got --device {index}")]
    CpuIndex { backend: Backend, index: usize },
}

/// Turns a backend and an optional device index into a Burn device.
///
/// `index` `None` means the backend's default device. For `wgpu` and `cuda` an explicit index
/// is checked against the devices the backend enumerates on this machine.
pub fn device(backend: Backend, index: Option<usize>) -> Result<Device, BackendError> {
    if !backend.compiled() {
        return Err(BackendError::NotCompiled { backend });
    }
    match backend {
        Backend::Flex => flex(index),
        Backend::Wgpu => wgpu(index),
        Backend::Cuda => cuda(index),
        Backend::Ndarray => ndarray(index),
    }
}

#[cfg(feature = "flex")]
fn flex(index: Option<usize>) -> Result<Device, BackendError> {
    match index {
        None | Some(0) => Ok(Device::flex()),
        Some(index) => Err(BackendError::CpuIndex {
            backend: Backend::Flex,
            index,
        }),
    }
}

#[cfg(not(feature = "flex"))]
fn flex(_: Option<usize>) -> Result<Device, BackendError> {
    Err(BackendError::NotCompiled {
        backend: Backend::Flex,
    })
}

#[cfg(feature = "wgpu")]
fn wgpu(index: Option<usize>) -> Result<Device, BackendError> {
    use burn::tensor::{DeviceKind, DeviceType};
    match index {
        None => Ok(Device::wgpu(DeviceKind::DefaultDevice)),
        Some(index) => pick(
            Backend::Wgpu,
            Device::enumerate(DeviceType::Wgpu).into_iter().collect(),
            index,
        ),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(_: Option<usize>) -> Result<Device, BackendError> {
    Err(BackendError::NotCompiled {
        backend: Backend::Wgpu,
    })
}

#[cfg(feature = "ndarray")]
fn ndarray(index: Option<usize>) -> Result<Device, BackendError> {
    match index {
        #[allow(deprecated)]
        None | Some(0) => Ok(Device::ndarray()),
        Some(index) => Err(BackendError::CpuIndex {
            backend: Backend::Ndarray,
            index,
        }),
    }
}

#[cfg(not(feature = "ndarray"))]
fn ndarray(_: Option<usize>) -> Result<Device, BackendError> {
    Err(BackendError::NotCompiled {
        backend: Backend::Ndarray,
    })
}

#[cfg(feature = "cuda")]
fn cuda(index: Option<usize>) -> Result<Device, BackendError> {
    use burn::tensor::DeviceType;
    // Enumerating also tells us whether a CUDA driver and device exist at all: refuse here
    // rather than fail on the first kernel.
    let devices = Device::enumerate(DeviceType::Cuda).into_iter().collect();
    pick(Backend::Cuda, devices, index.unwrap_or(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: Option<usize>) -> Result<Device, BackendError> {
    Err(BackendError::NotCompiled {
        backend: Backend::Cuda,
    })
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn pick(backend: Backend, devices: Vec<Device>, index: usize) -> Result<Device, BackendError> {
    let found = devices.len();
    devices
        .into_iter()
        .nth(index)
        .ok_or(BackendError::NoSuchDevice {
            backend,
            index,
            found,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_and_rejects_others() {
        assert_eq!("flex".parse::<Backend>().unwrap(), Backend::Flex);
        assert_eq!("cuda".parse::<Backend>().unwrap(), Backend::Cuda);
        let err = "tpu".parse::<Backend>().unwrap_err().to_string();
        assert!(err.contains("unknown backend 'tpu'"), "{err}");
    }

    #[test]
    fn refuses_a_backend_not_compiled_in() {
        for backend in Backend::ALL.into_iter().filter(|b| !b.compiled()) {
            let err = device(backend, None).unwrap_err().to_string();
            assert!(err.contains("not compiled"), "{err}");
            assert!(err.contains(&format!("--features {backend}")), "{err}");
        }
    }

    #[cfg(feature = "flex")]
    #[test]
    fn flex_has_only_device_zero() {
        assert!(device(Backend::Flex, Some(0)).is_ok());
        let err = device(Backend::Flex, Some(3)).unwrap_err().to_string();
        assert!(err.contains("--device 3"), "{err}");
    }
}
