//! Backend plugin for Burn's wgpu backend: Vulkan, Metal or DX12 GPUs through CubeCL, and CPUs
//! through a software adapter (Mesa lavapipe, Debian `mesa-vulkan-drivers`).
//!
//! Devices: `wgpu` (wgpu's preferred adapter), `wgpu:N` (discrete GPU N), `integrated:N`,
//! `virtual:N`, and `cpu` (a software adapter).
//!
//! Mesa's lavapipe is a stand-in for tests, not for training: its shader compiler (gallivm) gives
//! each shader invocation a budget of 65,535 loop iterations shared by all its loops
//! (`LP_MAX_TGSI_LOOP_ITERATIONS`) and leaves the loops when it is spent, without an error. A
//! Burn reduction whose invocation walks a long row therefore stops early: a row of ones sums to
//! 262,128 whatever its length past that (Mesa 22.3.6), and a training BatchNorm over more than
//! about 65,000 values per channel gets wrong statistics. [`plugin`]'s caveat says so in the log
//! of any run on that adapter.

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

/// What an adapter called `adapter_name` is known to compute wrongly, if anything.
pub fn adapter_caveat(adapter_name: &str) -> Option<String> {
    // Mesa names lavapipe's adapter after its rasteriser: "llvmpipe (LLVM 15.0.6, 256 bits)".
    adapter_name.starts_with("llvmpipe").then(|| {
        format!(
            "the wgpu adapter `{adapter_name}` is Mesa's lavapipe, which ends each shader \
             invocation's loops after 65,535 iterations in all without an error: sums over long \
             rows come out short, so a training BatchNorm over more than about 65,000 values per \
             channel (iresnet's 112 x 112 stem from a batch of 6) gets wrong statistics; train on \
             the flex backend on a CPU"
        )
    })
}

fn caveat(device: &Device) -> Option<String> {
    adapter_caveat(&device.identity()?.name)
}

pub fn plugin() -> BackendPlugin {
    BackendPlugin::new(
        "wgpu",
        "Burn's wgpu backend (Vulkan/Metal/DX12 GPUs; software Vulkan on CPUs)",
        "wgpu, wgpu:N, integrated:N, virtual:N, cpu",
        CAPABILITIES,
        parse,
    )
    .with_caveat(caveat)
}

#[cfg(test)]
mod tests {
    /// On `QUD_WGPU_DEVICE` (default `wgpu`, the first adapter); the caveat names lavapipe.
    #[test]
    #[ignore = "needs a Vulkan adapter (a GPU or Mesa's lavapipe): cargo xtask test --wgpu"]
    fn smoke() {
        let text = std::env::var("QUD_WGPU_DEVICE").unwrap_or_else(|_| "wgpu".into());
        let device = super::plugin().device(&text).unwrap();
        qud_backend_core::smoke_test(&device).unwrap();
        let name = device
            .identity()
            .expect("a wgpu device names its adapter")
            .name;
        let caveat = super::plugin().caveat(&device);
        assert_eq!(
            caveat.is_some(),
            name.starts_with("llvmpipe"),
            "{name}: {caveat:?}"
        );
    }

    #[test]
    fn only_lavapipe_has_a_caveat() {
        let caveat = super::adapter_caveat("llvmpipe (LLVM 15.0.6, 256 bits)").unwrap();
        assert!(
            caveat.contains("`llvmpipe (LLVM 15.0.6, 256 bits)`")
                && caveat.contains("65,535 iterations")
                && caveat.contains("flex"),
            "{caveat}"
        );
        for sound in [
            "NVIDIA H100 80GB HBM3",
            "AMD Radeon 8060S Graphics",
            "Apple M3",
        ] {
            assert_eq!(super::adapter_caveat(sound), None, "{sound}");
        }
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
