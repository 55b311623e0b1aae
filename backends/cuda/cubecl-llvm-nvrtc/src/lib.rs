//! qud's offline stand-in for `cubecl-llvm` 0.11.3: what `cubecl-cuda` names from it, without LLVM.
//!
//! `cubecl-cuda` 0.11.3 compiles kernels one of two ways: CUDA C++ through NVRTC, or CubeCL's IR
//! through pliron and LLVM to PTX. It always links the second, and the real `cubecl-llvm`'s build
//! script downloads an LLVM 23.1 bundle, so no CUDA build works offline. qud selects the NVRTC
//! compiler (`cubecl-cuda/cpp`, turned on by `qud-backend-cuda`), and this crate gives the LLVM
//! path's types with the same names and shapes so that `cubecl-cuda` compiles unchanged. The LLVM
//! compiler here refuses every kernel with an error that says why; nothing selects it.
//!
//! Which items: the `cubecl_llvm::` paths used in `cubecl-cuda-0.11.3/src/{compiler.rs, runtime.rs,
//! compute/context.rs}`. When Burn or CubeCL is upgraded, compare that list again (see
//! `../README.md`).

use core::fmt;

use cubecl_core::ir::nvidia::SmArch;
use cubecl_core::prelude::KernelDefinition;
use cubecl_environment::backtrace::BackTrace;
use cubecl_server::compiler::CompilationError;
use cubecl_server::kernel::BufferIOAttr;

pub mod nvptx {
    //! The NVPTX target's PTX version choice.
    pub mod ptx_version {
        //! The PTX ISA version a driver loads, which `cubecl-cuda` puts in its kernel cache key.
        use core::fmt;

        /// A PTX ISA version as the NVPTX target spells it: 8.7 is `87`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        impl PtxVersion {
            /// The newest PTX version a CUDA driver of version `driver` (12.8 is `12080`) loads,
            /// by the first CUDA release that loads each; `None` before CUDA 10.0.
            pub fn for_driver(driver: i32) -> Option<Self> {
                // (first CUDA driver, PTX ISA) from NVIDIA's PTX ISA release notes, newest first.
                const FIRST_DRIVER: [(i32, u32); 24] = [
                    (13030, 93),
                    (13020, 92),
                    (13010, 91),
                    (13000, 90),
                    (12090, 88),
                    (12080, 87),
                    (12050, 85),
                    (12040, 84),
                    (12030, 83),
                    (12020, 82),
                    (12010, 81),
                    (12000, 80),
                    (11080, 78),
                    (11070, 77),
                    (11060, 76),
                    (11050, 75),
                    (11040, 74),
                    (11030, 73),
                    (11020, 72),
                    (11010, 71),
                    (11000, 70),
                    (10020, 65),
                    (10010, 64),
                    (10000, 63),
                ];
                FIRST_DRIVER
                    .iter()
                    .find(|(first, _)| driver >= *first)
                    .map(|&(_, ptx)| Self(ptx))
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }
    }
}

pub mod shared {
    //! The compiler front: options, artifacts and the device-feature narrowing.
    pub use crate::{NvptxModule, PlironArtifact, PlironCompiler, PlironOptions};

    pub mod lowered_features {
        //! The LLVM path's narrowing of a device's advertised features.
        use cubecl_core::ir::DeviceProperties;

        /// The GPU target a device's features would be narrowed for.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            Nvptx,
        }

        /// Leaves `props` as they are. `cubecl-cuda` calls this only when the LLVM compiler is its
        /// default, which qud never selects; the NVRTC compiler honours every advertised feature.
        pub fn restrict_features(_props: &mut DeviceProperties, _target: GpuTarget) {}
    }
}

pub mod target {
    //! The compilation targets.
    pub use crate::LlvmTarget;
}

/// The LLVM targets; only NVPTX is named by `cubecl-cuda`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LlvmTarget {
    #[default]
    Cpu,
    Nvptx,
}

/// The LLVM compiler, which this build does not have.
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    pub target: LlvmTarget,
}

/// The LLVM compiler's options, as `cubecl-cuda` fills them.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    /// An AMD architecture in the real crate; `cubecl-cuda` always passes `None`.
    pub arch: Option<()>,
    pub sm_arch: Option<SmArch>,
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    pub grid_constants: bool,
}

/// A PTX module as the LLVM compiler would emit it.
#[derive(Clone, Debug)]
pub struct NvptxModule {
    /// NUL-terminated PTX assembly.
    pub ptx: Vec<core::ffi::c_char>,
    pub entrypoint: String,
    pub ir: String,
    pub shared_memory_size: usize,
    pub io: Vec<BufferIOAttr>,
}

/// What the LLVM compiler produces.
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    NvptxCode(NvptxModule),
}

impl fmt::Display for PlironArtifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlironArtifact::NvptxCode(module) => f.write_str(&module.ir),
        }
    }
}

impl PlironCompiler {
    /// Refuses `kernel`: this build compiles CUDA kernels with NVRTC only.
    pub fn compile(
        &mut self,
        kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Err(CompilationError::Generic {
            reason: format!(
                "kernel `{}`: this CUDA build has no LLVM compiler (qud patches cubecl-llvm out so \
                 that it builds offline); its kernels compile through NVRTC, which \
                 cubecl-cuda's `cpp` feature selects",
                kernel.settings.kernel_name
            ),
            backtrace: BackTrace::capture(),
        })
    }

    /// The source language tag the real compiler reports for GPU targets.
    pub fn lang_tag(&self) -> &'static str {
        "llvm"
    }
}

#[cfg(test)]
mod tests {
    use super::nvptx::ptx_version::PtxVersion;

    #[test]
    fn a_driver_gets_the_newest_ptx_it_loads() {
        assert_eq!(PtxVersion::for_driver(12080).unwrap().to_string(), "ptx87");
        assert_eq!(PtxVersion::for_driver(12060).unwrap().to_string(), "ptx85");
        assert_eq!(PtxVersion::for_driver(13050).unwrap().to_string(), "ptx93");
        assert_eq!(PtxVersion::for_driver(9020), None);
    }
}
