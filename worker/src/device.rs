//! Where a worker computes its experts: on the CPU, or on a CUDA GPU when
//! built with the `cuda` feature. A device is chosen once per worker
//! (`--device`); every placement version it loads lives there.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use myriad_proto::spec::ExpertSpec;

use crate::backend::{CpuBackend, ExpertBackend};
use crate::error::WorkerError;

/// A compute device for experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("unknown device `{s}`: expected `cpu`, `cuda` or `cuda:N`")),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Fails with a message that says what is missing when this device
    /// cannot run experts here: a build without the `cuda` feature, a
    /// machine without the CUDA driver, a GPU ordinal it does not have.
    /// Workers call it before they listen, so a wrong `--device` stops
    /// them at once instead of at their first placement.
    pub fn check(&self) -> Result<(), WorkerError> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(n) => cuda_check(*n),
        }
    }

    /// Bytes of memory the device has for experts: 0 for the CPU, whose
    /// budget is the worker's `--capacity`.
    pub fn memory_bytes(&self) -> Result<u64, WorkerError> {
        match self {
            Device::Cpu => Ok(0),
            Device::Cuda(n) => cuda_memory(*n),
        }
    }

    /// Loads the experts `spec` names from the checkpoint in `dir` onto
    /// this device, taking the ones an earlier backend in `loaded` already
    /// holds there instead of loading them again.
    pub fn load(
        &self,
        dir: &Path,
        spec: &ExpertSpec,
        loaded: &[Arc<dyn ExpertBackend>],
    ) -> Result<Arc<dyn ExpertBackend>, WorkerError> {
        match self {
            Device::Cpu => {
                let reuse: Vec<&CpuBackend> = loaded.iter().filter_map(|b| b.as_any().downcast_ref()).collect();
                Ok(Arc::new(CpuBackend::load_reusing(dir, spec, &reuse)?))
            }
            Device::Cuda(n) => cuda_load(*n, dir, spec, loaded),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_check(ordinal: usize) -> Result<(), WorkerError> {
    crate::cuda::check(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_memory(ordinal: usize) -> Result<u64, WorkerError> {
    crate::cuda::memory_bytes(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_load(
    ordinal: usize,
    dir: &Path,
    spec: &ExpertSpec,
    loaded: &[Arc<dyn ExpertBackend>],
) -> Result<Arc<dyn ExpertBackend>, WorkerError> {
    let reuse: Vec<&crate::cuda::CudaBackend> = loaded.iter().filter_map(|b| b.as_any().downcast_ref()).collect();
    Ok(Arc::new(crate::cuda::CudaBackend::load_reusing(ordinal, dir, spec, &reuse)?))
}

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &str = "this myriad was built without CUDA support: build it with `--features cuda`";

#[cfg(not(feature = "cuda"))]
fn cuda_check(_: usize) -> Result<(), WorkerError> {
    Err(WorkerError::Device(NO_CUDA.into()))
}

#[cfg(not(feature = "cuda"))]
fn cuda_memory(_: usize) -> Result<u64, WorkerError> {
    Err(WorkerError::Device(NO_CUDA.into()))
}

#[cfg(not(feature = "cuda"))]
fn cuda_load(
    _: usize,
    _: &Path,
    _: &ExpertSpec,
    _: &[Arc<dyn ExpertBackend>],
) -> Result<Arc<dyn ExpertBackend>, WorkerError> {
    Err(WorkerError::Device(NO_CUDA.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_the_same() {
        for (text, device) in [("cpu", Device::Cpu), ("cuda:0", Device::Cuda(0)), ("cuda:3", Device::Cuda(3))] {
            assert_eq!(text.parse::<Device>(), Ok(device));
            assert_eq!(device.to_string(), text);
        }
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.contains("expected `cpu`, `cuda` or `cuda:N`"), "{bad}: {err}");
        }
    }

    /// Asking for a GPU where none can run says why, before anything loads.
    #[test]
    fn cuda_without_a_driver_is_a_clear_error() {
        let checked = Device::Cuda(0).check();
        // A build with CUDA on a machine with a GPU (the device check's).
        if cfg!(feature = "cuda") && checked.is_ok() {
            return;
        }
        let text = checked.unwrap_err().to_string();
        let why = if cfg!(feature = "cuda") { "no CUDA driver" } else { "built without CUDA support" };
        assert!(text.contains(why), "{text}");
    }
}
