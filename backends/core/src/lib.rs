//! Shared vocabulary of qud's backend plugins: device strings, capabilities, the plugin record.
//!
//! Burn 0.22 tensors carry their backend in their [`Device`], so nothing else in qud is generic
//! over a backend: a plugin only has to turn on its Burn feature and turn a device string such as
//! `cpu`, `cuda:1` or `wgpu:0` into a `Device`.

pub use burn::tensor::Device;
use std::fmt;
use std::str::FromStr;

/// Why a backend or a device could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("backend `{requested}` is not compiled into this build; compiled in: {}", available.join(", "))]
    NotCompiled {
        requested: String,
        available: Vec<&'static str>,
    },
    #[error("device `{text}`: {reason}")]
    BadDevice { text: String, reason: String },
    /// Compiled in, but what it needs at run time is missing (a driver library).
    #[error("backend `{backend}` cannot run here: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("backend `{backend}` has no device `{device}`; it accepts: {accepted}")]
    UnsupportedDevice {
        backend: &'static str,
        device: String,
        accepted: &'static str,
    },
}

/// A parsed device string: `kind` or `kind:index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub kind: String,
    pub index: Option<usize>,
}

impl FromStr for DeviceSpec {
    type Err = BackendError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| BackendError::BadDevice {
            text: text.into(),
            reason: reason.into(),
        };
        let trimmed = text.trim();
        let (kind, index) = match trimmed.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse::<usize>()
                    .map_err(|_| bad("the part after `:` must be a device index (0, 1, ...)"))?;
                (kind, Some(index))
            }
            None => (trimmed, None),
        };
        if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad(
                "expected `kind` or `kind:index`, e.g. `cpu`, `cuda:0`, `wgpu:1`",
            ));
        }
        Ok(Self {
            kind: kind.to_ascii_lowercase(),
            index,
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}:{i}", self.kind),
            None => f.write_str(&self.kind),
        }
    }
}

/// What a backend can do; decides what the trainer may ask of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Runs on an accelerator.
    pub gpu: bool,
    /// Half precision storage and arithmetic (on a GPU: where the adapter reports it).
    pub f16: bool,
    pub bf16: bool,
    /// Several devices of this backend can be used in one process.
    pub multi_device: bool,
    /// Burn's `all_reduce` collective works (NCCL on CUDA only).
    pub all_reduce: bool,
}

/// One backend plugin: its name, how it parses devices and what it can do.
#[derive(Clone, Copy)]
pub struct BackendPlugin {
    pub name: &'static str,
    pub summary: &'static str,
    /// The device strings it accepts, for error messages and `--help`.
    pub accepted_devices: &'static str,
    pub capabilities: Capabilities,
    device: fn(&DeviceSpec) -> Option<Device>,
    /// What the backend needs at run time, checked before a device is handed out.
    available: fn() -> Result<(), String>,
    /// What an opened device is known to get wrong, for the log.
    caveat: fn(&Device) -> Option<String>,
}

impl BackendPlugin {
    /// `device` returns `None` for a spec the backend has no device for.
    pub const fn new(
        name: &'static str,
        summary: &'static str,
        accepted_devices: &'static str,
        capabilities: Capabilities,
        device: fn(&DeviceSpec) -> Option<Device>,
    ) -> Self {
        Self {
            name,
            summary,
            accepted_devices,
            capabilities,
            device,
            available: || Ok(()),
            caveat: |_| None,
        }
    }

    /// Check `available` (a driver library that must load, ...) before any device is made: a
    /// missing one is [`BackendError::Unavailable`] with its reason, instead of a failure inside
    /// the backend's device thread.
    pub const fn with_run_time_check(mut self, available: fn() -> Result<(), String>) -> Self {
        self.available = available;
        self
    }

    /// Name what `caveat` says a device gets wrong (a driver that computes some kernels
    /// wrongly), so that a run on it can say so before it starts; `None` for a sound device.
    pub const fn with_caveat(mut self, caveat: fn(&Device) -> Option<String>) -> Self {
        self.caveat = caveat;
        self
    }

    /// What `device` (one of this backend's) is known to get wrong, if anything. May open the
    /// device.
    pub fn caveat(&self, device: &Device) -> Option<String> {
        (self.caveat)(device)
    }

    /// Parse `text` (`cpu`, `cuda:1`, ...) into a device of this backend.
    pub fn device(&self, text: &str) -> Result<Device, BackendError> {
        let spec: DeviceSpec = text.parse()?;
        (self.available)().map_err(|reason| BackendError::Unavailable {
            backend: self.name,
            reason,
        })?;
        (self.device)(&spec).ok_or_else(|| BackendError::UnsupportedDevice {
            backend: self.name,
            device: text.into(),
            accepted: self.accepted_devices,
        })
    }
}

impl fmt::Debug for BackendPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendPlugin")
            .field("name", &self.name)
            .field("capabilities", &self.capabilities)
            .finish()
    }
}

/// A smoke-test check that gave the wrong answer (or none).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{check} gave {got}")]
pub struct SmokeFailure {
    pub check: &'static str,
    pub got: String,
}

/// The smoke test every plugin runs on its device: a matmul, a reduction and a gradient.
pub fn smoke_test(device: &Device) -> Result<(), SmokeFailure> {
    let fail = |check, got: String| SmokeFailure { check, got };
    use burn::tensor::Tensor;
    let a = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], device);
    let b = Tensor::<2>::from_floats([[0.5, -1.0], [2.0, 0.25]], device);
    let product: Vec<f32> = a
        .clone()
        .matmul(b)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| fail("matmul", format!("{e:?}")))?;
    if product != [4.5, -0.5, 9.5, -2.0] {
        return Err(fail("matmul", format!("{product:?}")));
    }
    let x = Tensor::<2>::from_floats([[1.0, -2.0], [3.0, 0.5]], &device.clone().autodiff())
        .require_grad();
    let grads = x.clone().powi_scalar(2).sum().backward();
    let grad: Vec<f32> = x
        .grad(&grads)
        .ok_or_else(|| fail("d(sum x^2)/dx", "no gradient".into()))?
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| fail("d(sum x^2)/dx", format!("{e:?}")))?;
    if grad != [2.0, -4.0, 6.0, 1.0] {
        return Err(fail("d(sum x^2)/dx", format!("{grad:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        let spec: DeviceSpec = "cuda:1".parse().unwrap();
        assert_eq!(
            spec,
            DeviceSpec {
                kind: "cuda".into(),
                index: Some(1)
            }
        );
        assert_eq!(spec.to_string(), "cuda:1");
        let spec: DeviceSpec = " CPU ".parse().unwrap();
        assert_eq!(
            spec,
            DeviceSpec {
                kind: "cpu".into(),
                index: None
            }
        );
        for bad in ["", "cuda:", "cuda:x", ":0", "cu da", "cuda:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(
                matches!(err, BackendError::BadDevice { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
    }

    /// A plugin whose run-time check fails hands out no device, and says why.
    #[test]
    fn a_failed_run_time_check_names_the_backend_and_the_reason() {
        let plugin = BackendPlugin::new(
            "fake",
            "a backend whose driver is absent",
            "cpu",
            Capabilities {
                gpu: true,
                f16: false,
                bf16: false,
                multi_device: false,
                all_reduce: false,
            },
            |_| None,
        )
        .with_run_time_check(|| Err("libfake.so.1 cannot be loaded".into()));
        let err = plugin.device("cpu").unwrap_err();
        assert!(matches!(
            err,
            BackendError::Unavailable {
                backend: "fake",
                ..
            }
        ));
        assert!(err.to_string().contains("libfake.so.1"), "{err}");
    }
}
