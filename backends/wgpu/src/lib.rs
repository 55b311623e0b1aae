//! Backend plugin for Burn's wgpu backend: Vulkan, Metal or DX12 GPUs through CubeCL, and CPUs
//! through a software adapter (Mesa lavapipe, Debian `mesa-vulkan-drivers`).
//!
//! Devices: `wgpu` (wgpu's preferred adapter), `wgpu:N` (discrete GPU N), `integrated:N`,
//! `virtual:N`, and `cpu` (a software adapter).

use burn::tensor::DeviceKind;
use qud_backend_core::{BackendPlugin, Capabilities, Device, DeviceSpec};

/// f16 depends on the adapter: check `Device::supports_dtype` at run time.
pub const CAPABILITIES: Capabilities = Capabilities {
    gpu: true,
    f16: true,
    bf16: false,
    multi_device: true,
    all_reduce: false,
};

fn parse(spec: &DeviceSpec) -> Option<Device> {
    let kind = match (spec.kind.as_str(), spec.index) {
        ("wgpu" | "gpu", None) => DeviceKind::DefaultDevice,
        ("wgpu" | "gpu" | "discrete", Some(i)) => DeviceKind::DiscreteGpu(i),
        ("integrated", i) => DeviceKind::IntegratedGpu(i.unwrap_or(0)),
        ("virtual", i) => DeviceKind::VirtualGpu(i.unwrap_or(0)),
        ("cpu", None | Some(0)) => DeviceKind::Cpu,
        _ => return None,
    };
    Some(Device::wgpu(kind))
}

pub fn plugin() -> BackendPlugin {
    BackendPlugin::new(
        "wgpu",
        "Burn's wgpu backend (Vulkan/Metal/DX12 GPUs; software Vulkan on CPUs)",
        "wgpu, wgpu:N, integrated:N, virtual:N, cpu",
        CAPABILITIES,
        parse,
    )
}

#[cfg(test)]
mod tests {
    /// On `QUD_WGPU_DEVICE` (default `wgpu`, the first adapter).
    #[test]
    #[ignore = "needs a Vulkan adapter (a GPU or Mesa's lavapipe): cargo xtask test --wgpu"]
    fn smoke() {
        let text = std::env::var("QUD_WGPU_DEVICE").unwrap_or_else(|_| "wgpu".into());
        let device = super::plugin().device(&text).unwrap();
        qud_backend_core::smoke_test(&device).unwrap();
    }

    #[test]
    fn parses_devices_without_touching_hardware() {
        let p = super::plugin();
        for ok in ["wgpu", "wgpu:1", "integrated:0", "cpu"] {
            assert!(p.device(ok).is_ok(), "{ok}");
        }
        for bad in ["cuda:0", "cpu:3"] {
            assert!(p.device(bad).is_err(), "{bad}");
        }
    }
}
