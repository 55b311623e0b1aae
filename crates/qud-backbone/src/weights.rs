//! Weight files: strict import from PyTorch `state_dict`s and safetensors, export to safetensors
//! with PyTorch names.

use burn::module::Module;
use burn::store::{ApplyResult, ModuleSnapshot, PytorchStore, SafetensorsStore};
use std::path::{Path, PathBuf};

/// Why weights could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("weight file {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("cannot tell the format of {}: expected .pth, .pt, .bin or .safetensors", .0.display())]
    UnknownFormat(PathBuf),
    #[error("cannot read weights from {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("weights in {} do not match the model:\n{}", path.display(), problems.join("\n"))]
    Mismatch {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("cannot write {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
}

/// Buffers PyTorch saves that have no counterpart here.
fn ignorable(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

/// Load `path` into `model`, strictly: every model tensor must be in the file with its shape, and
/// every file tensor (`num_batches_tracked` aside) must belong to the model. A `module.` prefix
/// (DDP checkpoints) is stripped. `.pth`/`.pt`/`.bin` are read as `torch.save` files (a bare
/// `state_dict`, or one under a `state_dict` key), `.safetensors` as safetensors.
pub fn load_weights<M: Module>(model: M, path: &Path) -> Result<M, WeightError> {
    // A malformed file must be an error naming it, whatever the readers underneath do with it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_strict(model, path)))
        .unwrap_or_else(|payload| {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(WeightError::Read {
                path: path.to_path_buf(),
                message: format!("malformed file (the reader panicked: {why})"),
            })
        })
}

fn load_strict<M: Module>(mut model: M, path: &Path) -> Result<M, WeightError> {
    if !path.is_file() {
        return Err(WeightError::Missing(path.to_path_buf()));
    }
    let read_error = |message: String| WeightError::Read {
        path: path.to_path_buf(),
        message,
    };
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let result = match extension.as_deref() {
        Some("pth" | "pt" | "bin") => {
            // Keys as PyTorch wrote them: burn-store would otherwise renumber an
            // `nn.Sequential`'s indices around its parameter-free layers (`senet.2` -> `senet.1`),
            // while qud's modules keep those layers in place, as the PyTorch module does.
            let mut store = PytorchStore::from_file(path)
                .with_key_remapping(r"^module\.", "")
                .map_indices_contiguous(false)
                .allow_partial(true);
            match model.load_from(&mut store) {
                Ok(result) => result,
                Err(first) => {
                    // Training scripts often save {"state_dict": ..., "epoch": ...}.
                    let mut nested = PytorchStore::from_file(path)
                        .with_top_level_key("state_dict")
                        .with_key_remapping(r"^module\.", "")
                        .map_indices_contiguous(false)
                        .allow_partial(true);
                    model
                        .load_from(&mut nested)
                        .map_err(|_| read_error(first.to_string()))?
                }
            }
        }
        Some("safetensors") => {
            // Enum modules (a block that is one convolution or several) are PyTorch attributes
            // with no variant in their key, as the PyTorch store reads them by default.
            let mut store = SafetensorsStore::from_file(path)
                .with_key_remapping(r"^module\.", "")
                .skip_enum_variants(true)
                .allow_partial(true);
            model
                .load_from(&mut store)
                .map_err(|e| read_error(e.to_string()))?
        }
        _ => return Err(WeightError::UnknownFormat(path.to_path_buf())),
    };
    check_strict(&result, path)?;
    Ok(model)
}

fn check_strict(result: &ApplyResult, path: &Path) -> Result<(), WeightError> {
    let mut problems: Vec<String> = Vec::new();
    for error in &result.errors {
        problems.push(format!("  - {error}"));
    }
    for (key, _) in &result.missing {
        problems.push(format!("  - missing from the file: {key}"));
    }
    for key in result.unused.iter().filter(|k| !ignorable(k)) {
        problems.push(format!("  - not in the model: {key}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(WeightError::Mismatch {
            path: path.to_path_buf(),
            problems,
        })
    }
}

/// Write `model` as safetensors with its PyTorch key names, atomically (temporary file, then
/// rename). PyTorch reads it with `safetensors.torch.load_file` and
/// `model.load_state_dict(tensors, strict=False)` (only `num_batches_tracked` is absent).
pub fn save_safetensors<M: Module>(model: &M, path: &Path) -> Result<(), WeightError> {
    let write_error = |message: String| WeightError::Write {
        path: path.to_path_buf(),
        message,
    };
    let tmp = path.with_extension("safetensors.tmp");
    let mut store = SafetensorsStore::from_file(&tmp).skip_enum_variants(true);
    model
        .save_into(&mut store)
        .map_err(|e| write_error(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| write_error(e.to_string()))
}
