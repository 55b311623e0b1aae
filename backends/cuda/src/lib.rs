//! Backend plugin for Burn's CUDA backend (NVIDIA GPUs; NCCL all-reduce across devices).
//!
//! It builds offline: the workspace patches cubecl-llvm (whose build script downloads LLVM) out for
//! a stand-in, and this crate selects cubecl-cuda's NVRTC compiler (see this crate's README). At
//! run time the NVIDIA driver and NVRTC must be installed. Devices: `cuda` (the default device),
//! `cuda:N`.

use qud_backend_core::{BackendPlugin, Capabilities, Device, DeviceSpec};

pub const CAPABILITIES: Capabilities = Capabilities {
    gpu: true,
    f16: true,
    bf16: true,
    multi_device: true,
    all_reduce: true,
};

fn parse(spec: &DeviceSpec) -> Option<Device> {
    match (spec.kind.as_str(), spec.index) {
        ("cuda" | "gpu", None) => Some(Device::cuda(burn::tensor::DeviceIndex::Default)),
        ("cuda" | "gpu", Some(i)) => Some(Device::cuda(i)),
        _ => None,
    }
}

pub fn plugin() -> BackendPlugin {
    BackendPlugin::new(
        "cuda",
        "Burn's CUDA backend (NVIDIA GPUs, NCCL collectives)",
        "cuda, cuda:N",
        CAPABILITIES,
        parse,
    )
    .with_run_time_check(driver_loads)
}

/// The NVIDIA driver library loads: without it cudarc panics in the device's thread.
#[cfg(unix)]
fn driver_loads() -> Result<(), String> {
    for name in [c"libcuda.so.1", c"libcuda.so"] {
        // SAFETY: `name` is a NUL-terminated string; the handle is closed right away and no
        // symbol of the library is used here (cudarc loads it again for itself).
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            // SAFETY: `handle` came from `dlopen` above and is closed once.
            unsafe { libc::dlclose(handle) };
            return Ok(());
        }
    }
    Err(
        "the NVIDIA driver library (libcuda.so.1) cannot be loaded: install the NVIDIA \
         driver, or put its directory on LD_LIBRARY_PATH (NVRTC, libnvrtc, is needed too)"
            .into(),
    )
}

#[cfg(not(unix))]
fn driver_loads() -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    /// On `QUD_CUDA_DEVICE` (default `cuda`).
    #[test]
    #[ignore = "needs an NVIDIA GPU: cargo xtask gpu-check --backend cuda"]
    fn smoke() {
        let text = std::env::var("QUD_CUDA_DEVICE").unwrap_or_else(|_| "cuda".into());
        let device = super::plugin().device(&text).unwrap();
        qud_backend_core::smoke_test(&device).unwrap();
    }
}
