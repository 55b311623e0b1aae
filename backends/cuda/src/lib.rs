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
