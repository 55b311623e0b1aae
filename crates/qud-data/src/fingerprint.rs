//! Fingerprints of a dataset's content: what the teacher cache is keyed on, so a cache is never
//! read for other images than it was built from.
//!
//! Sets read from files hash the files: by default their bytes (CRC-32 at disk speed, every file,
//! so replacing one image changes the key), or with [`FingerprintMode::Metadata`] only their
//! sizes and modification times, for sets so large that reading them once per run start costs
//! more than it is worth (an edit that keeps a file's size and time then goes unseen). Generated
//! sets hash their decoded samples.

use crate::{DataError, FaceDataset};
use std::io::Read;
use std::path::Path;

/// FNV-1a, 64 bit: a stable hash (a key must not change between Rust releases).
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        self
    }
    pub fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// What a dataset's fingerprint reads of its files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FingerprintMode {
    /// Every byte of every file.
    Content,
    /// Each file's size and modification time.
    Metadata,
}

/// `h` extended by file `path` as `mode` reads it: its length, then its bytes' CRC-32 or its
/// modification time.
pub fn hash_file(h: Fnv, path: &Path, mode: FingerprintMode) -> Result<Fnv, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let h = h.u64(meta.len());
    Ok(match mode {
        FingerprintMode::Metadata => {
            let modified = meta.modified().map_err(io)?;
            let since = modified
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            h.u64(since.as_secs()).u64(u64::from(since.subsec_nanos()))
        }
        FingerprintMode::Content => {
            let mut crc = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                crc.update(&buf[..n]);
            }
            h.u64(u64::from(crc.finalize()))
        }
    })
}

/// The fingerprint of a set by its decoded samples: every sample's pixels and label (an
/// undecodable sample hashes its error). What sets without files of their own use.
pub fn decoded_fingerprint<D: FaceDataset + ?Sized>(dataset: &D) -> Fnv {
    let mut h = Fnv::default()
        .u64(dataset.len() as u64)
        .u64(dataset.num_identities().map_or(u64::MAX, |k| k as u64));
    for i in 0..dataset.len() {
        h = match dataset.get(i) {
            Ok(s) => h
                .u64(i as u64)
                .u64(u64::from(crc32fast::hash(&s.image.rgb)))
                .u64(s.label.map_or(u64::MAX, u64::from)),
            Err(e) => h.u64(i as u64).bytes(e.to_string().as_bytes()),
        };
    }
    h
}
