//! Backend plugin for Burn's ndarray CPU backend (deprecated upstream, about 5x slower than flex;
//! kept for small property tests and as a second CPU reference).

use qud_backend_core::{BackendPlugin, Capabilities, Device, DeviceSpec};

pub const CAPABILITIES: Capabilities = Capabilities {
    gpu: false,
    f16: false,
    bf16: false,
    multi_device: false,
    all_reduce: false,
};

/// The ndarray CPU device.
#[allow(deprecated)] // burn-ndarray is deprecated in favour of flex; we keep it as a reference.
pub fn device() -> Device {
    Device::ndarray()
}

fn parse(spec: &DeviceSpec) -> Option<Device> {
    (spec.kind == "cpu" && spec.index.unwrap_or(0) == 0).then(device)
}

pub fn plugin() -> BackendPlugin {
    BackendPlugin::new(
        "ndarray",
        "Burn's ndarray CPU backend (reference; slow)",
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
        assert!(super::plugin().device("cpu:1").is_err());
        assert!(super::plugin().device("cuda:0").is_err());
    }
}
