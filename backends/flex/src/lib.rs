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
    static ALLOCATOR: std::sync::Once = std::sync::Once::new();
    ALLOCATOR.call_once(keep_freed_memory);
    Device::flex()
}

/// Has glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.
///
/// A training step allocates and frees the same few hundred activation-sized buffers (tens of
/// MB each) every step. By default glibc serves blocks that large with a fresh `mmap` and
/// unmaps them on free, so every step faults in and zeroes every page again: 8% of a
/// MobileFaceNet train step was page faults and page clearing. Served from the heap and never
/// trimmed, the pages stay mapped from the first step on (MobileFaceNet train step at batch 128:
/// 19 to 25 samples/s). Peak memory stays what the step needs; it is not returned between steps.
/// Trimming is off altogether (-1, as mallopt(3) documents), not merely above `i32::MAX`: a free
/// top of heap over 2 GB (a batch-128 step after a batch-32 one) was handed back after every
/// step, and each step faulted 2 GB in again (540,000 faults; 46 against 55 samples/s).
/// A user's own `GLIBC_TUNABLES` wins.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only changes malloc's parameters; both calls are valid for any value.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        }
    }
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
