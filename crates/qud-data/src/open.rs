//! From a path to a training set: every on-disk format qud reads, recognised in one place, for
//! the trainer and the command line alike. Adding a format is its reader's file plus one arm
//! here (and a [`SourceFormat`] variant when users should be able to name it).

use crate::{DataError, FaceDataset, ImageFolder, RecordDataset};
use std::path::Path;
use std::sync::Arc;

/// How a path holds faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// Decide from the path: a directory is an image folder, `x.rec` / `x.idx` (or a path with a
    /// `.rec` beside it) is RecordIO.
    Auto,
    /// A folder of images, identity sub-folders allowed ([`ImageFolder`]).
    Folder,
    /// insightface's RecordIO `.rec` + `.idx` ([`RecordDataset`]).
    Recordio,
}

impl SourceFormat {
    /// The format of `path` itself: `Auto` resolved, or a clear error naming the path.
    pub fn of(self, path: &Path) -> Result<Self, DataError> {
        match self {
            Self::Auto if path.is_dir() => Ok(Self::Folder),
            Self::Auto
                if path.extension().is_some_and(|e| e == "rec" || e == "idx")
                    || path.with_extension("rec").is_file() =>
            {
                Ok(Self::Recordio)
            }
            Self::Auto => Err(DataError::Record {
                path: path.to_path_buf(),
                at: "path".into(),
                reason: if path.exists() {
                    "neither an image folder nor a RecordIO .rec".into()
                } else {
                    "no such file or folder".into()
                },
            }),
            known => Ok(known),
        }
    }
}

/// The faces under `path`, read as `format`; `resize` lets images that are not 112 x 112 in.
pub fn open(
    path: &Path,
    format: SourceFormat,
    resize: bool,
) -> Result<Arc<dyn FaceDataset>, DataError> {
    Ok(match format.of(path)? {
        SourceFormat::Recordio => Arc::new(RecordDataset::open(path, resize)?),
        SourceFormat::Folder | SourceFormat::Auto => Arc::new(ImageFolder::open(path, resize)?),
    })
}
