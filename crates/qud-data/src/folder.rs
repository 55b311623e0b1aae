//! Image folders: `root/<identity>/*.jpg|png` (labelled, identities in sorted folder order) or a
//! flat folder of unlabelled faces (synthetic sets often come that way).

use crate::{
    decode_face, decode_face_into, hash_file, DataError, FaceDataset, FingerprintMode, Fnv, Sample,
};
use std::path::{Path, PathBuf};

/// Faces on disk, in a deterministic order (sorted by path).
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<(PathBuf, Option<u32>)>,
    identities: Option<usize>,
    skipped: usize,
    resize: bool,
}

fn is_image(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("jpg" | "jpeg" | "png")
    )
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort();
    Ok(entries)
}

impl ImageFolder {
    /// Scan `root`. With identity sub-folders the set is labelled and files directly in `root`
    /// are skipped; without, every image in `root` is an unlabelled sample. Files that are not
    /// JPEG/PNG by extension are skipped and counted ([`ImageFolder::skipped`]).
    pub fn open(root: &Path, resize: bool) -> Result<Self, DataError> {
        let entries = sorted_entries(root)?;
        let dirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
        let mut files = Vec::new();
        let mut skipped = 0;
        let identities = if dirs.is_empty() {
            for path in &entries {
                if is_image(path) {
                    files.push((path.clone(), None));
                } else {
                    skipped += 1;
                }
            }
            None
        } else {
            skipped += entries.len() - dirs.len();
            for (label, dir) in dirs.iter().enumerate() {
                for path in sorted_entries(dir)? {
                    if path.is_file() && is_image(&path) {
                        files.push((path, Some(label as u32)));
                    } else {
                        skipped += 1;
                    }
                }
            }
            Some(dirs.len())
        };
        if files.is_empty() {
            return Err(DataError::Empty(root.to_path_buf()));
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            identities,
            skipped,
            resize,
        })
    }

    /// Entries that were not images (or not in an identity folder) and were left out.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    pub fn path(&self, index: usize) -> Option<&Path> {
        self.files.get(index).map(|(p, _)| p.as_path())
    }
}

impl ImageFolder {
    /// Sample `index`'s file: `(its path, for errors; its bytes; its label)`.
    fn read(&self, index: usize) -> Result<(String, Vec<u8>, Option<u32>), DataError> {
        let (path, label) = self.files.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.files.len(),
        })?;
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        Ok((path.display().to_string(), bytes, *label))
    }
}

impl FaceDataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn sample_name(&self, index: usize) -> String {
        let path = &self.files[index].0;
        let relative = path.strip_prefix(&self.root).unwrap_or(path);
        relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let (origin, bytes, label) = self.read(index)?;
        let image = decode_face(&bytes, &origin, self.resize)?;
        Ok(Sample { image, label })
    }

    fn get_into(
        &self,
        index: usize,
        flip: bool,
        out: &mut [f32],
    ) -> Result<Option<u32>, DataError> {
        let (origin, bytes, label) = self.read(index)?;
        decode_face_into(&bytes, &origin, self.resize, flip, out)?;
        Ok(label)
    }

    fn num_identities(&self) -> Option<usize> {
        self.identities
    }

    /// Each file's path under the root (so a moved set keeps its key), label and content.
    fn fingerprint(&self, mode: FingerprintMode) -> Result<u64, DataError> {
        let mut h = Fnv::default()
            .bytes(b"image folder")
            .u64(self.files.len() as u64);
        for (path, label) in &self.files {
            let name = path.strip_prefix(&self.root).unwrap_or(path);
            h = h
                .bytes(name.to_string_lossy().as_bytes())
                .u64(label.map_or(u64::MAX, u64::from));
            h = hash_file(h, path, mode)?;
        }
        Ok(h.finish())
    }

    fn describe(&self) -> String {
        match self.identities {
            Some(n) => format!(
                "image folder {}: {} faces of {n} identities ({} entries skipped)",
                self.root.display(),
                self.files.len(),
                self.skipped
            ),
            None => format!(
                "image folder {}: {} unlabelled faces ({} entries skipped)",
                self.root.display(),
                self.files.len(),
                self.skipped
            ),
        }
    }
}
