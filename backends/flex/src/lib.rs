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

fn parse(spec: &DeviceSpec) -> Option<Device> {
    (spec.kind == "cpu" && spec.index.unwrap_or(0) == 0).then(device)
}

pub fn plugin() -> BackendPlugin {
    BackendPlugin::new(
        "flex",
        "Burn's flex CPU backend (default; SIMD, multi-threaded)",
        "cpu",
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
    }
}
