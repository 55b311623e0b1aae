//! Teacher-feature cache: the frozen teacher's L2-normalised embedding of every (sample, flip) of
//! the training set, computed once and read back every epoch.
//!
//! The teacher is in eval mode and the only augmentation is the horizontal flip, so its output
//! for (image i, flip b) never changes; with an iresnet50 teacher that is about 90 % of a QUD
//! step's arithmetic. File layout (little endian):
//!
//! ```text
//! header (64 bytes): "QUDTCH01", version u32, dtype u32 (0 f32, 1 f16), dim u32, block_rows u32,
//!                    samples u64, key [u64; 3], crc32 of the preceding 52 bytes (u32), padding
//! block table:       crc32 of each block of `block_rows` rows (u32 each)
//! rows:              row 2*i + flip = embedding of sample i (flipped when flip = 1)
//! ```
//!
//! A cache is used only when its key (teacher weights, dataset, preprocessing, dtype) matches and
//! every checksum holds; it is built into a temporary file and renamed, so concurrent runs and
//! crashes never leave a half-written cache under the final name. Rows are read with `pread`
//! (a system call of a few hundred nanoseconds per row, nothing beside a step): unlike a memory
//! map, a file truncated under a running job is an error naming it, not a SIGBUS.

use burn::prelude::*;
use qud_backbone::FaceEmbedder;
use qud_config::CacheDtype;
use qud_data::{decode_batch, FaceDataset, FingerprintMode, Fnv, ReadAt};
use qud_loss::l2_normalize;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const MAGIC: &[u8; 8] = b"QUDTCH01";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 64;
const BLOCK_ROWS: usize = 1024;

/// Why a cache file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: no teacher cache there", .0.display())]
    Missing(PathBuf),
    #[error("{}: built for another {what} (cache key differs)", path.display())]
    KeyMismatch { path: PathBuf, what: &'static str },
    #[error("{}: corrupt teacher cache: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot fingerprint the training set for the cache key: {0}")]
    Fingerprint(qud_data::DataError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the cached features depend on; any change means other features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheKey {
    /// Teacher architecture, embedding size and weights.
    pub teacher: u64,
    /// The training set ([`dataset_key`]).
    pub dataset: u64,
    /// Decoding and normalisation.
    pub preprocessing: u64,
}

/// The teacher part of the key: architecture, size and the weight file's length and CRC-32 (or,
/// for a random test teacher, the seed it was drawn from).
pub fn teacher_key(
    arch: &str,
    dim: usize,
    weights: Option<&Path>,
    seed: u64,
) -> Result<u64, CacheError> {
    let mut h = Fnv::default().bytes(arch.as_bytes()).u64(dim as u64);
    match weights {
        Some(path) => {
            let io = |source| CacheError::Io {
                path: path.to_path_buf(),
                source,
            };
            let mut file = File::open(path).map_err(io)?;
            let mut crc = crc32fast::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut len = 0u64;
            loop {
                let n = file.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                crc.update(&buf[..n]);
                len += n as u64;
            }
            h = h.u64(len).u64(crc.finalize() as u64);
        }
        None => h = h.bytes(b"random teacher").u64(seed),
    }
    Ok(h.finish())
}

/// The dataset part of the key: the set's own fingerprint ([`FaceDataset::fingerprint`]: its
/// files' bytes, or their sizes and times with `Metadata`) and its size.
pub fn dataset_key(dataset: &dyn FaceDataset, mode: FingerprintMode) -> Result<u64, CacheError> {
    let fingerprint = dataset.fingerprint(mode).map_err(CacheError::Fingerprint)?;
    Ok(Fnv::default()
        .u64(dataset.len() as u64)
        .u64(fingerprint)
        .finish())
}

fn dtype_code(dtype: CacheDtype) -> u32 {
    match dtype {
        CacheDtype::F32 => 0,
        CacheDtype::F16 => 1,
    }
}

fn row_bytes(dim: usize, dtype: CacheDtype) -> usize {
    dim * if dtype == CacheDtype::F16 { 2 } else { 4 }
}

struct Header {
    dtype: CacheDtype,
    dim: usize,
    block_rows: usize,
    samples: usize,
    key: CacheKey,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut out = [0u8; HEADER_LEN as usize];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&dtype_code(self.dtype).to_le_bytes());
        out[16..20].copy_from_slice(&(self.dim as u32).to_le_bytes());
        out[20..24].copy_from_slice(&(self.block_rows as u32).to_le_bytes());
        out[24..32].copy_from_slice(&(self.samples as u64).to_le_bytes());
        out[32..40].copy_from_slice(&self.key.teacher.to_le_bytes());
        out[40..48].copy_from_slice(&self.key.dataset.to_le_bytes());
        out[48..56].copy_from_slice(&self.key.preprocessing.to_le_bytes());
        let crc = crc32fast::hash(&out[..56]);
        out[56..60].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self, CacheError> {
        let corrupt = |reason: &str| CacheError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
            return Err(corrupt("not a qud teacher cache (bad magic)"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        if crc32fast::hash(&bytes[..56]) != u32_at(56) {
            return Err(corrupt("header checksum mismatch"));
        }
        if u32_at(8) != VERSION {
            return Err(corrupt("unknown format version"));
        }
        let dtype = match u32_at(12) {
            0 => CacheDtype::F32,
            1 => CacheDtype::F16,
            _ => return Err(corrupt("unknown dtype")),
        };
        Ok(Self {
            dtype,
            dim: u32_at(16) as usize,
            block_rows: u32_at(20) as usize,
            samples: u64_at(24) as usize,
            key: CacheKey {
                teacher: u64_at(32),
                dataset: u64_at(40),
                preprocessing: u64_at(48),
            },
        })
    }
}

/// An opened, verified teacher cache.
#[derive(Debug)]
pub struct TeacherCache {
    path: PathBuf,
    file: File,
    dim: usize,
    dtype: CacheDtype,
    samples: usize,
    data_offset: u64,
}

impl TeacherCache {
    /// Open `path` and check that it was built for `key`, `dim`, `dtype` and `samples`, that its
    /// size is exact and that the header and every block checksum hold.
    pub fn open(
        path: &Path,
        key: CacheKey,
        dim: usize,
        dtype: CacheDtype,
        samples: usize,
    ) -> Result<Self, CacheError> {
        let io = |source| CacheError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheError::Missing(path.to_path_buf()))
            }
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        let corrupt = |reason: String| CacheError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if len < HEADER_LEN {
            return Err(corrupt(format!("truncated: {len} bytes")));
        }
        let mut head = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0).map_err(io)?;
        let header = Header::decode(&head, path)?;
        let mismatch = |what| CacheError::KeyMismatch {
            path: path.to_path_buf(),
            what,
        };
        if header.key.teacher != key.teacher || header.dim != dim {
            return Err(mismatch("teacher"));
        }
        if header.key.dataset != key.dataset || header.samples != samples {
            return Err(mismatch("dataset"));
        }
        if header.key.preprocessing != key.preprocessing {
            return Err(mismatch("preprocessing"));
        }
        if header.dtype != dtype {
            return Err(mismatch("dtype"));
        }
        let rows = 2 * samples;
        let blocks = rows.div_ceil(header.block_rows.max(1));
        let data_offset = HEADER_LEN + 4 * blocks as u64;
        let expected = data_offset + (rows * row_bytes(dim, dtype)) as u64;
        if len != expected {
            return Err(corrupt(format!(
                "{len} bytes, expected {expected} (truncated or overlong)"
            )));
        }
        let mut table = vec![0u8; 4 * blocks];
        file.read_exact_at(&mut table, HEADER_LEN).map_err(io)?;
        let block_bytes = (header.block_rows * row_bytes(dim, dtype)) as u64;
        let mut block = Vec::new();
        for (b, crc) in table.chunks_exact(4).enumerate() {
            let start = data_offset + b as u64 * block_bytes;
            block.resize((expected - start).min(block_bytes) as usize, 0);
            file.read_exact_at(&mut block, start).map_err(io)?;
            if crc32fast::hash(&block) != u32::from_le_bytes(crc.try_into().unwrap()) {
                return Err(corrupt(format!(
                    "block {b} (rows {}..) checksum mismatch",
                    b * header.block_rows
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            dim,
            dtype,
            samples,
            data_offset,
        })
    }

    /// Build the cache for `dataset` with `teacher` (eval mode) on `device`, `batch` samples at a
    /// time, decoding with `workers` threads; draws a progress bar on a terminal, logs progress
    /// every 10 s elsewhere. Writes a temporary file next to `path`, then renames it.
    #[allow(clippy::too_many_arguments)]
    pub fn build<M: FaceEmbedder + ?Sized>(
        path: &Path,
        key: CacheKey,
        dtype: CacheDtype,
        dataset: &dyn FaceDataset,
        teacher: &M,
        device: &Device,
        batch: usize,
        workers: usize,
    ) -> Result<Self, CacheError> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let io = |source| CacheError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let dim = teacher.output_dim();
        let samples = dataset.len();
        let rows = 2 * samples;
        let blocks = rows.div_ceil(BLOCK_ROWS);
        let header = Header {
            dtype,
            dim,
            block_rows: BLOCK_ROWS,
            samples,
            key,
        };
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        out.write_all(&header.encode()).map_err(io)?;
        out.write_all(&vec![0u8; 4 * blocks]).map_err(io)?;
        let mut crcs = Vec::with_capacity(blocks);
        let mut block = crc32fast::Hasher::new();
        let mut in_block = 0usize;
        let progress = crate::progress::Progress::new(0, samples, 1, "samples");
        let mut last_log = Instant::now();
        let batch = batch.max(1);
        for start in (0..samples).step_by(batch) {
            let plan: Vec<(usize, bool)> = (start..(start + batch).min(samples))
                .map(|i| (i, false))
                .collect();
            let decoded =
                decode_batch(dataset, &plan, workers, true).map_err(|e| CacheError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("cannot read the training set: {e}"),
                })?;
            let mut features = vec![0f32; 2 * plan.len() * dim];
            if !decoded.is_empty() {
                let x = decoded.tensor(device);
                let plain = l2_normalize(teacher.embed_faces(x.clone()));
                let flipped = l2_normalize(teacher.embed_faces(x.flip([3])));
                let to_vec = |t: Tensor<2>| t.into_data().try_into_vec_as::<f32>().expect("f32");
                let (plain, flipped) = (to_vec(plain), to_vec(flipped));
                // Skipped (undecodable) samples keep zero rows: training skips them too.
                for (k, &index) in decoded.indices.iter().enumerate() {
                    let row = 2 * (index - start);
                    features[row * dim..(row + 1) * dim]
                        .copy_from_slice(&plain[k * dim..(k + 1) * dim]);
                    features[(row + 1) * dim..(row + 2) * dim]
                        .copy_from_slice(&flipped[k * dim..(k + 1) * dim]);
                }
            }
            for row in features.chunks(dim) {
                let bytes: Vec<u8> = match dtype {
                    CacheDtype::F32 => row.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    CacheDtype::F16 => row
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                };
                out.write_all(&bytes).map_err(io)?;
                block.update(&bytes);
                in_block += 1;
                if in_block == BLOCK_ROWS {
                    crcs.push(std::mem::take(&mut block).finalize());
                    in_block = 0;
                }
            }
            let done = start + plan.len();
            progress.draw(done, "teacher cache", "");
            if !progress.is_drawn() && (last_log.elapsed().as_secs_f64() > 10.0 || done == samples)
            {
                let (rate, left) = progress.rate_and_eta(done);
                tracing::info!(
                    "teacher cache: {:.1}% ({done}/{samples} samples, {rate:.1}/s, {} left)",
                    100.0 * done as f64 / samples as f64,
                    crate::progress::clock(left)
                );
                last_log = Instant::now();
            }
        }
        if in_block > 0 {
            crcs.push(block.finalize());
        }
        let mut tmp = out.into_inner().map_err(|e| io(e.into_error()))?;
        tmp.seek(SeekFrom::Start(HEADER_LEN)).map_err(io)?;
        let table: Vec<u8> = crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        tmp.write_all(&table).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        tracing::info!(
            "teacher cache written: {} ({} bytes per image)",
            path.display(),
            2 * row_bytes(dim, dtype)
        );
        Self::open(path, key, dim, dtype, samples)
    }

    /// The cached features of `(index, flip)` pairs as `[B, dim]` f32 rows.
    pub fn rows(&self, indices: &[usize], flips: &[bool]) -> Result<Vec<f32>, CacheError> {
        let width = row_bytes(self.dim, self.dtype);
        let mut out = Vec::with_capacity(indices.len() * self.dim);
        let mut buf = vec![0u8; width];
        for (&i, &flip) in indices.iter().zip(flips) {
            if i >= self.samples {
                return Err(CacheError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("sample {i} beyond the {} cached", self.samples),
                });
            }
            let offset = self.data_offset + ((2 * i + usize::from(flip)) * width) as u64;
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => CacheError::Corrupt {
                        path: self.path.clone(),
                        reason: format!(
                            "the file shrank while in use: row {} is gone (was it \
                             truncated or rebuilt in place?)",
                            2 * i + usize::from(flip)
                        ),
                    },
                    _ => CacheError::Io {
                        path: self.path.clone(),
                        source: e,
                    },
                })?;
            match self.dtype {
                CacheDtype::F32 => out.extend(
                    buf.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
                ),
                CacheDtype::F16 => out.extend(
                    buf.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32()),
                ),
            }
        }
        Ok(out)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use qud_backbone::Backbone;
    use qud_data::SyntheticFaces;

    fn teacher(device: &Device) -> qud_models::AnyBackbone {
        let spec = qud_models::BackboneSpec {
            embedding_dim: 16,
            dropout: 0.0,
        };
        crate::seeded(device, 3, || {
            crate::setup::initialize_now(
                qud_models::create("mobilefacenet", &spec, device).unwrap(),
            )
        })
        .valid()
    }

    const KEY: CacheKey = CacheKey {
        teacher: 1,
        dataset: 2,
        preprocessing: 3,
    };

    #[test]
    fn cached_rows_are_the_teachers_features_and_damage_is_detected() {
        let device = qud_backend_flex::device();
        let dir = tempfile::tempdir().unwrap();
        let data = SyntheticFaces::new(2, 3, 1);
        let model = teacher(&device);
        let path = dir.path().join("c.qtc");
        let cache =
            TeacherCache::build(&path, KEY, CacheDtype::F32, &data, &model, &device, 4, 2).unwrap();

        // Against the teacher run directly on samples 5 (flipped) and 1.
        let plan = [(5, true), (1, false)];
        let batch = decode_batch(&data, &plan, 1, false).unwrap();
        let want = l2_normalize(model.forward(batch.tensor(&device)))
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let got = cache.rows(&[5, 1], &[true, false]).unwrap();
        let diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "cache differs from the teacher by {diff}");

        let reopen = |key: CacheKey, dtype: CacheDtype| {
            TeacherCache::open(&path, key, 16, dtype, data.len()).map(|_| ())
        };
        reopen(KEY, CacheDtype::F32).unwrap();
        for (key, what) in [
            (CacheKey { teacher: 9, ..KEY }, "teacher"),
            (CacheKey { dataset: 9, ..KEY }, "dataset"),
            (
                CacheKey {
                    preprocessing: 9,
                    ..KEY
                },
                "preprocessing",
            ),
        ] {
            let err = reopen(key, CacheDtype::F32).unwrap_err();
            assert!(
                matches!(err, CacheError::KeyMismatch { what: w, .. } if w == what),
                "{err}"
            );
        }
        assert!(matches!(
            reopen(KEY, CacheDtype::F16),
            Err(CacheError::KeyMismatch { what: "dtype", .. })
        ));

        // Truncated under an open cache (by hand, or a disk-full copy): the next read is an
        // error naming the file; through the memory map this once read as SIGBUS.
        let pristine = std::fs::read(&path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(pristine.len() as u64 / 2)
            .unwrap();
        let m = cache.rows(&[5], &[true]).unwrap_err().to_string();
        assert!(
            m.contains("c.qtc") && m.contains("shrank while in use"),
            "{m}"
        );
        std::fs::write(&path, &pristine).unwrap();
        assert_eq!(cache.rows(&[5, 1], &[true, false]).unwrap(), got);

        // 300 random single-byte changes anywhere: each refused, but in the 4 header padding
        // bytes nothing reads.
        let mut state = 0x0BAD_u64;
        let mut next = move |below: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) as usize) % below
        };
        for _ in 0..300 {
            let mut bytes = pristine.clone();
            let at = next(bytes.len());
            bytes[at] ^= 1 + next(255) as u8;
            std::fs::write(&path, &bytes).unwrap();
            let opened = reopen(KEY, CacheDtype::F32);
            assert_eq!(
                opened.is_ok(),
                (60..64).contains(&at),
                "byte {at}: {opened:?}"
            );
        }

        let damaged = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            reopen(KEY, CacheDtype::F32).unwrap_err().to_string()
        };
        let m = damaged(&pristine[..pristine.len() - 7]);
        assert!(m.contains("truncated or overlong"), "{m}");
        let mut flipped = pristine.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        let m = damaged(&flipped);
        assert!(
            m.contains("block 0") && m.contains("checksum mismatch"),
            "{m}"
        );
        let mut header = pristine.clone();
        header[17] ^= 1;
        let m = damaged(&header);
        assert!(m.contains("header checksum"), "{m}");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            reopen(KEY, CacheDtype::F32),
            Err(CacheError::Missing(_))
        ));
    }

    /// The cache is keyed by sample index and flip, so each rank of a sharded loader, and a loader
    /// resumed mid-epoch, reads exactly the rows the teacher computes for its own batches.
    #[test]
    fn sharded_and_resumed_loaders_read_their_own_rows() {
        let device = qud_backend_flex::device();
        let dir = tempfile::tempdir().unwrap();
        let data = std::sync::Arc::new(SyntheticFaces::new(3, 4, 2));
        let model = teacher(&device);
        let path = dir.path().join("c.qtc");
        let cache = TeacherCache::build(
            &path,
            KEY,
            CacheDtype::F32,
            data.as_ref(),
            &model,
            &device,
            4,
            1,
        )
        .unwrap();
        let (mut seen, mut flips) = (Vec::new(), Vec::new());
        for rank in 0..2 {
            let options = qud_data::LoaderOptions {
                batch_size: 2,
                world: 2,
                rank,
                seed: 5,
                workers: 1,
                ..Default::default()
            };
            let loader = qud_data::Loader::new(data.clone(), options);
            let straight: Vec<_> = loader.epoch(1, 0).map(Result::unwrap).collect();
            let resumed: Vec<_> = loader.epoch(1, 1).map(Result::unwrap).collect();
            assert_eq!((straight.len(), resumed.len()), (3, 2));
            for (batch, again) in straight[1..].iter().zip(&resumed) {
                assert_eq!(
                    (&batch.indices, &batch.flips),
                    (&again.indices, &again.flips)
                );
            }
            for batch in &straight {
                let want = l2_normalize(model.forward(batch.tensor(&device)))
                    .into_data()
                    .try_into_vec_as::<f32>()
                    .unwrap();
                let got = cache.rows(&batch.indices, &batch.flips).unwrap();
                let diff = want
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-5, "rank {rank}: cache differs by {diff}");
                seen.extend(batch.indices.iter().copied());
                flips.extend(batch.flips.iter().copied());
            }
        }
        // Both flips occur, and the two ranks read disjoint samples covering the set.
        assert!(flips.contains(&true) && flips.contains(&false));
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }

    /// f16 storage: every component within 5e-4 of the f32 cache (unit vectors, so components are
    /// below 1 and f16's relative step 2^-11 bounds the error).
    #[test]
    fn half_precision_cache_stays_close_to_f32() {
        let device = qud_backend_flex::device();
        let dir = tempfile::tempdir().unwrap();
        let data = SyntheticFaces::new(2, 2, 4);
        let model = teacher(&device);
        let build = |name: &str, dtype| {
            TeacherCache::build(
                &dir.path().join(name),
                KEY,
                dtype,
                &data,
                &model,
                &device,
                3,
                1,
            )
            .unwrap()
        };
        let (full, half) = (build("f32", CacheDtype::F32), build("f16", CacheDtype::F16));
        let all: Vec<usize> = (0..data.len()).collect();
        for flip in [false, true] {
            let flips = vec![flip; all.len()];
            let a = full.rows(&all, &flips).unwrap();
            let b = half.rows(&all, &flips).unwrap();
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 5e-4, "f16 cache off by {diff}");
        }
        let f32_size = std::fs::metadata(full.path()).unwrap().len();
        let f16_size = std::fs::metadata(half.path()).unwrap().len();
        assert!(f16_size < f32_size * 6 / 10, "{f16_size} vs {f32_size}");
    }
}
