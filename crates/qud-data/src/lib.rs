//! Face datasets, decoding, augmentation and batching for qud.
//!
//! A dataset is anything implementing [`FaceDataset`]: random access to 112x112 RGB faces with an
//! optional identity label (QUD needs none; ArcFace does). Shipped: image folders
//! ([`ImageFolder`]) and procedurally generated faces ([`SyntheticFaces`]). The [`Loader`] turns a
//! dataset into shuffled, flipped, normalised batches, decoded in parallel ahead of the training
//! step, reproducibly from a seed and resumable at any batch.
//!
//! Adding a dataset: implement [`FaceDataset`] (`len`, `get`, `num_identities`, `describe`) and
//! construct it in `open_dataset` of qud-trainer.

mod folder;
mod image_ops;
mod loader;
mod synthetic;

pub use folder::ImageFolder;
pub use image_ops::{decode_face, flip_horizontal, normalize_into, FaceImage, FACE_SIZE};
pub use loader::{decode_batch, epoch_plan, Batch, Loader, LoaderOptions};
pub use synthetic::SyntheticFaces;

use std::path::PathBuf;

/// Why a sample or a dataset could not be read. Always names the file or the sample.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: cannot decode image: {reason}")]
    Decode { origin: String, reason: String },
    #[error(
        "{origin}: image is {width}x{height}, expected 112x112 (set data.resize = true to resize)"
    )]
    Size {
        origin: String,
        width: u32,
        height: u32,
    },
    #[error("{}: no images found", .0.display())]
    Empty(PathBuf),
    #[error("sample {index} out of range: the dataset has {len}")]
    OutOfRange { index: usize, len: usize },
}

/// One face and, for labelled sets, its identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub image: FaceImage,
    pub label: Option<u32>,
}

/// Random access to the faces of a training or evaluation set.
pub trait FaceDataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decode sample `index` (0-based, a fixed order).
    fn get(&self, index: usize) -> Result<Sample, DataError>;
    /// Number of identities when the set is labelled.
    fn num_identities(&self) -> Option<usize>;
    /// One line for logs: what, where, how many.
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests;
