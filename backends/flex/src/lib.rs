//! Backend plugin for Burn's flex CPU backend: pure Rust, SIMD and multi-threaded; qud's CPU
//! backend for real work.

use qud_backend_core::{BackendPlugin, Capabilities, Device, DeviceSpec};

pub const CAPABILITIES: Capabilities = Capabilities {
    gpu: false,
    f16: true,
    bf16: true,
    multi_device: false,
    all_reduce: false,
};

/// The flex CPU device.
pub fn device() -> Device {
    Device::flex()
}

/// `cpu` and `cpu:N`. There is one CPU device; `cpu:1`, `cpu:2`, ... name further replicas on it,
/// so that `run.devices = ["cpu:0", "cpu:1"]` trains data parallel with the numerics of a
/// two-GPU run (BatchNorm statistics per device) at no speedup: for tests and reproduction.
fn parse(spec: &DeviceSpec) -> Option<Device> {
    (spec.kind == "cpu").then(device)
}

pub fn plugin() -> BackendPlugin {
    BackendPlugin::new(
        "flex",
        "Burn's flex CPU backend (default; SIMD, multi-threaded)",
        "cpu, cpu:N (replica N of the one CPU device)",
        CAPABILITIES,
        parse,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn smoke() {
        let device = super::plugin().device("cpu").unwrap();
        qud_backend_core::smoke_test(&device).unwrap();
        assert!(device.supports_dtype(burn::tensor::DType::BF16));
        assert!(super::plugin().device("wgpu:0").is_err());
        assert_eq!(super::plugin().device("cpu:1").unwrap(), device);
    }
}
