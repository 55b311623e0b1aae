//! The backends compiled into this build, and the choice of one by name at run time.
//!
//! Each backend is a plugin crate under `backends/` behind a cargo feature of this crate
//! (`ndarray`, `flex` — the defaults — `wgpu`, `cuda`). Adding one: a crate exposing
//! `plugin() -> BackendPlugin`, a feature here, and a line in [`compiled`].

pub use qud_backend_core::{BackendError, BackendPlugin, Capabilities, Device, DeviceSpec};

/// Every backend compiled into this build, GPU backends first, then the fastest CPU backend.
#[allow(clippy::vec_init_then_push)] // which pushes exist depends on the enabled features
pub fn compiled() -> Vec<BackendPlugin> {
    #[allow(unused_mut)]
    let mut plugins = Vec::new();
    #[cfg(feature = "cuda")]
    plugins.push(qud_backend_cuda::plugin());
    #[cfg(feature = "wgpu")]
    plugins.push(qud_backend_wgpu::plugin());
    #[cfg(feature = "flex")]
    plugins.push(qud_backend_flex::plugin());
    #[cfg(feature = "ndarray")]
    plugins.push(qud_backend_ndarray::plugin());
    plugins
}

/// Names of the compiled backends.
pub fn names() -> Vec<&'static str> {
    compiled().iter().map(|p| p.name).collect()
}

/// The plugin called `name`, or an error listing those compiled in.
pub fn find(name: &str) -> Result<BackendPlugin, BackendError> {
    let wanted = name.trim().to_ascii_lowercase();
    compiled()
        .into_iter()
        .find(|p| p.name == wanted)
        .ok_or_else(|| BackendError::NotCompiled {
            requested: name.into(),
            available: names(),
        })
}

/// The device `device` (`cpu`, `cuda:0`, ...) of the backend `backend`.
pub fn device(backend: &str, device: &str) -> Result<Device, BackendError> {
    find(backend)?.device(device)
}

/// What `device` of `backend` is known to get wrong (see [`BackendPlugin::with_caveat`]), for a
/// warning before a run; `None` for a sound device or an unknown backend.
pub fn caveat(backend: &str, device: &Device) -> Option<String> {
    find(backend).ok()?.caveat(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_compiled_backends_by_name() {
        let names = names();
        assert!(
            names.contains(&"flex") && names.contains(&"ndarray"),
            "{names:?}"
        );
        assert_eq!(find("FLEX").unwrap().name, "flex");
        let dev = device("flex", "cpu").unwrap();
        qud_backend_core::smoke_test(&dev).unwrap();
        assert_eq!(caveat("flex", &dev), None);
    }

    #[test]
    fn unknown_or_missing_backends_list_what_is_compiled() {
        #[cfg(not(feature = "cuda"))]
        {
            let err = find("cuda").unwrap_err().to_string();
            assert!(err.contains("`cuda` is not compiled"), "{err}");
            assert!(err.contains("flex") && err.contains("ndarray"), "{err}");
        }
        let err = device("flex", "cuda:0").unwrap_err().to_string();
        assert!(
            err.contains("flex") && err.contains("cuda:0") && err.contains("cpu"),
            "{err}"
        );
    }
}
