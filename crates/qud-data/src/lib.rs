//! Face datasets, decoding, augmentation and batching for qud.
//!
//! A dataset is anything implementing [`FaceDataset`]: random access to 112x112 RGB faces with an
//! optional identity label (QUD needs none; ArcFace does). Shipped: image folders
//! ([`ImageFolder`]), insightface RecordIO ([`RecordDataset`]) and procedurally generated faces
//! ([`SyntheticFaces`]). The [`Loader`] turns a
//! dataset into shuffled, flipped, normalised batches, decoded in parallel ahead of the training
//! step, reproducibly from a seed and resumable at any batch.
//!
//! Adding a dataset: implement [`FaceDataset`] (`len`, `get`, `num_identities`, `describe`;
//! `get_into` too for encoded images, through [`decode_face_into`]) and construct it in
//! `open_dataset` of qud-trainer.

pub mod alloc_probe;
mod augment;
mod concat;
mod fingerprint;
mod folder;
mod image_ops;
mod jpeg;
mod loader;
mod open;
mod recordio;
mod synthetic;

pub use augment::{Augment, AugmentError};
pub use concat::ConcatDataset;
pub use fingerprint::{decoded_fingerprint, hash_file, FingerprintMode, Fnv};
pub use folder::ImageFolder;
pub use image_ops::{
    decode_face, decode_face_into, encode_face, flip_horizontal, normalize_into, FaceImage,
    ImageEncoding, FACE_SIZE, MAX_IMAGE_PIXELS,
};
pub use loader::{decode_batch, epoch_plan, flip_for, Batch, EpochBatches, Loader, LoaderOptions};
pub use open::{open, SourceFormat};
pub use recordio::{
    pack_records, read_file, ReadAt, Record, RecordDataset, RecordError, RecordScanner,
    RecordWriter, IR_HEADER_LEN, RECORD_MAGIC,
};
pub use synthetic::{synthetic_pairs, SyntheticFaces};

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
    #[error("{}: {at}: {reason}", path.display())]
    Record {
        path: PathBuf,
        /// Where: `byte N`, `key K, byte N` or `line L` (of an .idx).
        at: String,
        reason: String,
    },
    #[error("{}: no images found", .0.display())]
    Empty(PathBuf),
    #[error("sample {index} out of range: the dataset has {len}")]
    OutOfRange { index: usize, len: usize },
    /// The loader itself failed (not one sample): the epoch cannot go on.
    #[error("data loader: {reason}")]
    Loader { reason: String },
}

/// One face and, for labelled sets, its identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub image: FaceImage,
    pub label: Option<u32>,
}

impl DataError {
    /// A problem with one sample's content (undecodable, wrong size, corrupt record), which
    /// `data.on_bad_sample = "skip"` may step over; I/O errors and missing files are not.
    pub fn is_bad_sample(&self) -> bool {
        matches!(
            self,
            DataError::Decode { .. } | DataError::Size { .. } | DataError::Record { .. }
        )
    }
}

/// Random access to the faces of a training or evaluation set.
pub trait FaceDataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decode sample `index` (0-based, a fixed order).
    fn get(&self, index: usize) -> Result<Sample, DataError>;
    /// Sample `index` straight into the networks' input layout, as [`normalize_into`] writes it
    /// (CHW floats, mirrored when `flip`; `out` holds `3 * 112 * 112`), and its label: what
    /// the loader calls. Sets of encoded images override it to decode without the intermediate
    /// RGB image ([`decode_face_into`]); the result is the same.
    fn get_into(
        &self,
        index: usize,
        flip: bool,
        out: &mut [f32],
    ) -> Result<Option<u32>, DataError> {
        let sample = self.get(index)?;
        normalize_into(&sample.image, flip, out);
        Ok(sample.label)
    }
    /// Sample `index`'s name in exclusion lists and reports: its path under the set's root for
    /// image folders (`identity/file.jpg`, `/`-separated), else its index in decimal.
    fn sample_name(&self, index: usize) -> String {
        index.to_string()
    }
    /// Number of identities when the set is labelled.
    fn num_identities(&self) -> Option<usize>;
    /// One line for logs: what, where, how many.
    fn describe(&self) -> String;
    /// A hash of everything the samples are made from (the teacher cache's key): sets read
    /// from files hash the files as `mode` says ([`hash_file`]); the default hashes every
    /// decoded sample ([`decoded_fingerprint`]), right for generated sets.
    fn fingerprint(&self, mode: FingerprintMode) -> Result<u64, DataError> {
        let _ = mode;
        Ok(decoded_fingerprint(self).finish())
    }
}

#[cfg(test)]
mod tests;
