//! MXNet RecordIO (`train.rec` + `train.idx`), the format insightface ships its training sets in.
//!
//! Layout (dmlc-core `recordio.h`, MXNet `recordio.py`): every record is `magic 0xCED7230A`,
//! `lrec = cflag << 29 | length`, the payload, zero padding to 4 bytes. The writer splits a payload
//! wherever the magic sits at a 4-byte-aligned offset inside it (cflag 1 = first part, 2 = middle,
//! 3 = last) and drops that magic; the reader puts it back between the parts. A payload is an
//! `IRHeader {flag u32, label f32, id u64, id2 u64}`, then `flag` f32 labels when `flag > 0`, then
//! the encoded image. The `.idx` is text, `key\toffset` per line.
//!
//! insightface sets start with a header record at key 0 whose `label[0]` is one past the last image
//! key (images are keys `1 .. label[0]-1`) and `label[1]` one past the last identity record; sets
//! without it have an image at every key. Scalar labels below 0 mean "unlabelled" (what
//! [`RecordWriter`] writes for flat folders).

use crate::{
    decode_face, decode_face_into, hash_file, DataError, FaceDataset, FingerprintMode, Fnv, Sample,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
#[cfg(unix)]
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The 4 bytes every record starts with (little endian 0xCED7230A).
pub const RECORD_MAGIC: u32 = 0xCED7_230A;
const LENGTH_MASK: u32 = (1 << 29) - 1;
/// Size of the packed `IRHeader`.
pub const IR_HEADER_LEN: usize = 24;

fn record_error(path: &Path, offset: u64, reason: impl Into<String>) -> DataError {
    DataError::Record {
        path: path.to_path_buf(),
        at: format!("byte {offset}"),
        reason: reason.into(),
    }
}

/// The parsed payload of one record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub flag: u32,
    /// The scalar label (`flag == 0`), or the header's label field (usually 0) otherwise.
    pub label: f32,
    pub id: u64,
    pub id2: u64,
    /// The `flag` labels that follow the header when `flag > 0`.
    pub labels: Vec<f32>,
    /// The encoded image (or nothing, for header and identity records).
    pub data: Vec<u8>,
}

/// A record payload that is not a well-formed `IRHeader` + labels + data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordError(pub String);

impl Record {
    /// An image record with a scalar label, as insightface writes them.
    pub fn image(label: f32, id: u64, data: Vec<u8>) -> Self {
        Self {
            flag: 0,
            label,
            id,
            id2: 0,
            labels: Vec::new(),
            data,
        }
    }

    /// A record carrying a label array (header and identity records).
    pub fn with_labels(labels: Vec<f32>) -> Self {
        Self {
            flag: labels.len() as u32,
            label: 0.0,
            id: 0,
            id2: 0,
            labels,
            data: Vec::new(),
        }
    }

    /// Parse a payload (`IRHeader`, labels, data); the error names what is missing.
    pub fn parse(payload: &[u8]) -> Result<Self, RecordError> {
        Self::decode(payload).map_err(RecordError)
    }

    fn decode(payload: &[u8]) -> Result<Self, String> {
        if payload.len() < IR_HEADER_LEN {
            return Err(format!(
                "payload of {} bytes is shorter than the {IR_HEADER_LEN}-byte IRHeader",
                payload.len()
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(payload[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().unwrap());
        let flag = u32_at(0);
        let labels_end = IR_HEADER_LEN + 4 * flag as usize;
        if payload.len() < labels_end {
            return Err(format!(
                "IRHeader says {flag} labels but the payload has {} bytes",
                payload.len()
            ));
        }
        let labels = payload[IR_HEADER_LEN..labels_end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Self {
            flag,
            label: f32::from_bits(u32_at(4)),
            id: u64_at(8),
            id2: u64_at(16),
            labels,
            data: payload[labels_end..].to_vec(),
        })
    }

    /// The payload bytes (`mx.recordio.pack`).
    pub fn to_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(IR_HEADER_LEN + 4 * self.labels.len() + self.data.len());
        out.extend_from_slice(&(self.labels.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.label.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.id2.to_le_bytes());
        for l in &self.labels {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        out
    }

    /// The identity of an image record: the scalar label, or the first of a label array;
    /// `None` when negative (unlabelled).
    pub fn identity(&self) -> Option<u32> {
        let label = if self.flag > 0 {
            self.labels[0]
        } else {
            self.label
        };
        (label >= 0.0).then_some(label as u32)
    }
}

/// Reading at an offset without moving a cursor (`pread` on Unix), so threads share one file.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for File {
    #[cfg(unix)]
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    #[cfg(not(unix))]
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::io::Seek;
        let mut f = self.try_clone()?;
        f.seek(std::io::SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

/// Read the (possibly split) record starting at `offset`; returns the payload and the offset of
/// the next record.
fn read_record_at(
    file: &impl ReadAt,
    path: &Path,
    offset: u64,
    file_len: u64,
) -> Result<(Vec<u8>, u64), DataError> {
    let mut payload = Vec::new();
    let mut at = offset;
    loop {
        let mut head = [0u8; 8];
        if at + 8 > file_len {
            return Err(record_error(
                path,
                at,
                format!(
                    "truncated record: 8 header bytes needed, the file ends at byte {file_len}"
                ),
            ));
        }
        file.read_exact_at(&mut head, at)
            .map_err(|e| record_error(path, at, e.to_string()))?;
        let magic = u32::from_le_bytes(head[0..4].try_into().unwrap());
        if magic != RECORD_MAGIC {
            return Err(record_error(
                path,
                at,
                format!("bad magic {magic:#010x}, expected {RECORD_MAGIC:#010x}"),
            ));
        }
        let lrec = u32::from_le_bytes(head[4..8].try_into().unwrap());
        let (cflag, len) = (lrec >> 29, (lrec & LENGTH_MASK) as usize);
        let padded = len.div_ceil(4) * 4;
        if at + 8 + padded as u64 > file_len {
            return Err(record_error(
                path,
                at,
                format!(
                    "truncated record: {len} payload bytes announced, the file ends at byte {file_len}"
                ),
            ));
        }
        let continuing = !payload.is_empty() || at != offset;
        match (cflag, continuing) {
            (0 | 1, false) | (2 | 3, true) => {}
            (c, _) => {
                return Err(record_error(
                    path,
                    at,
                    format!("split flag {c} out of sequence (record began at byte {offset})"),
                ))
            }
        }
        let start = payload.len();
        payload.resize(start + len, 0);
        file.read_exact_at(&mut payload[start..], at + 8)
            .map_err(|e| record_error(path, at, e.to_string()))?;
        at += 8 + padded as u64;
        if cflag == 0 || cflag == 3 {
            return Ok((payload, at));
        }
        payload.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    }
}

/// Every record of a `.rec` in file order, without an `.idx`: `(offset, payload)`.
pub struct RecordScanner {
    file: File,
    path: PathBuf,
    len: u64,
    at: u64,
}

impl RecordScanner {
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            at: 0,
        })
    }
}

impl Iterator for RecordScanner {
    type Item = Result<(u64, Vec<u8>), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.len {
            return None;
        }
        let offset = self.at;
        match read_record_at(&self.file, &self.path, offset, self.len) {
            Ok((payload, next)) => {
                self.at = next;
                Some(Ok((offset, payload)))
            }
            Err(e) => {
                self.at = self.len;
                Some(Err(e))
            }
        }
    }
}

/// `path` with its extension replaced (`train.rec` -> `train.idx`).
pub fn sibling(path: &Path, extension: &str) -> PathBuf {
    path.with_extension(extension)
}

fn read_index(idx: &Path, rec_len: u64) -> Result<Vec<(u64, u64)>, DataError> {
    let file = File::open(idx).map_err(|source| DataError::Io {
        path: idx.to_path_buf(),
        source,
    })?;
    let mut entries = Vec::new();
    let mut first_line: HashMap<u64, usize> = HashMap::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| DataError::Io {
            path: idx.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| DataError::Record {
            path: idx.to_path_buf(),
            at: format!("line {}", n + 1),
            reason,
        };
        let mut parts = line.split('\t');
        let (Some(key), Some(offset), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!("expected `key<TAB>offset`, found {line:?}")));
        };
        let key: u64 = key
            .trim()
            .parse()
            .map_err(|_| bad(format!("key {key:?} is not a number")))?;
        let offset: u64 = offset
            .trim()
            .parse()
            .map_err(|_| bad(format!("offset {offset:?} is not a number")))?;
        if offset >= rec_len {
            return Err(bad(format!(
                "offset {offset} of key {key} is beyond the end of the .rec ({rec_len} bytes)"
            )));
        }
        // Two offsets for one key: which image the key means would depend on the reader.
        if let Some(first) = first_line.insert(key, n + 1) {
            return Err(bad(format!("key {key} is already on line {first}")));
        }
        entries.push((key, offset));
    }
    Ok(entries)
}

/// A RecordIO training set: random access to its image records.
#[derive(Debug)]
pub struct RecordDataset {
    path: PathBuf,
    file: File,
    file_len: u64,
    /// Offsets of the image records, in key order.
    images: Vec<(u64, u64)>,
    identities: Option<usize>,
    resize: bool,
}

impl RecordDataset {
    /// Open `prefix.rec` (a path to the `.rec` or `.idx`, or the prefix). Uses the `.idx` when it
    /// exists, otherwise scans the `.rec` once, numbering records from 0 in file order.
    pub fn open(path: &Path, resize: bool) -> Result<Self, DataError> {
        let rec = sibling(path, "rec");
        let idx = sibling(path, "idx");
        let file = File::open(&rec).map_err(|source| DataError::Io {
            path: rec.clone(),
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| DataError::Io {
                path: rec.clone(),
                source,
            })?
            .len();
        let index = if idx.exists() {
            read_index(&idx, file_len)?
        } else {
            tracing::warn!(
                "{}: no .idx next to it; scanning the .rec to index it",
                rec.display()
            );
            let mut entries = Vec::new();
            for (key, record) in RecordScanner::open(&rec)?.enumerate() {
                entries.push((key as u64, record?.0));
            }
            entries
        };
        let by_key: HashMap<u64, u64> = index.iter().copied().collect();
        let mut this = Self {
            path: rec,
            file,
            file_len,
            images: Vec::new(),
            identities: None,
            resize,
        };
        let header = match by_key.get(&0) {
            Some(&offset) => {
                let record = this.record_at(offset, Some(0))?;
                (record.flag > 0).then_some(record)
            }
            None => None,
        };
        match header {
            Some(header) => {
                let end = header.labels[0] as u64;
                for key in 1..end {
                    let offset = *by_key.get(&key).ok_or_else(|| DataError::Record {
                        path: idx.clone(),
                        at: format!("key {key}"),
                        reason: format!(
                            "missing from the index (the header record says images are keys 1..{})",
                            end - 1
                        ),
                    })?;
                    this.images.push((key, offset));
                }
                if let Some(&last) = header.labels.get(1) {
                    this.identities = Some((last as u64).saturating_sub(end) as usize);
                }
            }
            None => {
                let mut keys = index;
                keys.sort_unstable();
                this.images = keys;
            }
        }
        if this.images.is_empty() {
            return Err(DataError::Empty(this.path.clone()));
        }
        Ok(this)
    }

    /// The parsed record at `offset` (`key` only names it in errors).
    pub fn record_at(&self, offset: u64, key: Option<u64>) -> Result<Record, DataError> {
        let (payload, _) =
            read_record_at(&self.file, &self.path, offset, self.file_len).map_err(|e| {
                match (e, key) {
                    (DataError::Record { path, at, reason }, Some(key)) => DataError::Record {
                        path,
                        at: format!("key {key}, {at}"),
                        reason,
                    },
                    (e, _) => e,
                }
            })?;
        Record::parse(&payload).map_err(|RecordError(reason)| DataError::Record {
            path: self.path.clone(),
            at: format!(
                "{}byte {offset}",
                key.map_or(String::new(), |k| format!("key {k}, "))
            ),
            reason,
        })
    }

    /// The key of image `index`.
    pub fn key(&self, index: usize) -> Option<u64> {
        self.images.get(index).map(|k| k.0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl RecordDataset {
    /// Sample `index`'s record and where it is, for errors (`file key K`).
    fn image_record(&self, index: usize) -> Result<(String, Record), DataError> {
        let &(key, offset) = self.images.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.images.len(),
        })?;
        let record = self.record_at(offset, Some(key))?;
        Ok((format!("{} key {key}", self.path.display()), record))
    }
}

impl FaceDataset for RecordDataset {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        let (origin, record) = self.image_record(index)?;
        let image = decode_face(&record.data, &origin, self.resize)?;
        Ok(Sample {
            image,
            label: record.identity(),
        })
    }

    fn get_into(
        &self,
        index: usize,
        flip: bool,
        out: &mut [f32],
    ) -> Result<Option<u32>, DataError> {
        let (origin, record) = self.image_record(index)?;
        decode_face_into(&record.data, &origin, self.resize, flip, out)?;
        Ok(record.identity())
    }

    fn num_identities(&self) -> Option<usize> {
        self.identities
    }

    /// The `.rec`'s content (which holds every image and label) and the sample order.
    fn fingerprint(&self, mode: FingerprintMode) -> Result<u64, DataError> {
        let mut h = Fnv::default()
            .bytes(b"recordio")
            .u64(self.images.len() as u64)
            .u64(self.identities.map_or(u64::MAX, |k| k as u64));
        for &(key, offset) in &self.images {
            h = h.u64(key).u64(offset);
        }
        Ok(hash_file(h, &self.path, mode)?.finish())
    }

    fn describe(&self) -> String {
        format!(
            "RecordIO {} ({} images{})",
            self.path.display(),
            self.images.len(),
            self.identities
                .map_or(String::new(), |n| format!(", {n} identities"))
        )
    }
}

/// Writes a `.rec` and its `.idx` the way MXNet's `MXIndexedRecordIO` does. Both files are
/// written under temporary names and renamed by [`RecordWriter::finish`], so a failed pack leaves
/// nothing half-written behind.
pub struct RecordWriter {
    rec_path: PathBuf,
    idx_path: PathBuf,
    rec: BufWriter<tempfile::NamedTempFile>,
    idx: BufWriter<tempfile::NamedTempFile>,
    offset: u64,
}

impl RecordWriter {
    /// Start `prefix.rec` + `prefix.idx`.
    pub fn create(prefix: &Path) -> Result<Self, DataError> {
        let rec_path = sibling(prefix, "rec");
        let idx_path = sibling(prefix, "idx");
        let dir = rec_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let io = |source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        };
        Ok(Self {
            rec: BufWriter::new(tempfile::NamedTempFile::new_in(dir).map_err(io)?),
            idx: BufWriter::new(tempfile::NamedTempFile::new_in(dir).map_err(io)?),
            rec_path,
            idx_path,
            offset: 0,
        })
    }

    /// Append one record under `key`.
    pub fn write(&mut self, key: u64, record: &Record) -> Result<(), DataError> {
        self.write_payload(key, &record.to_payload())
    }

    /// Append a raw payload, splitting it at every aligned magic as dmlc-core does.
    pub fn write_payload(&mut self, key: u64, payload: &[u8]) -> Result<(), DataError> {
        let rec_path = self.rec_path.clone();
        let io = |source| DataError::Io {
            path: rec_path.clone(),
            source,
        };
        if payload.len() > LENGTH_MASK as usize {
            return Err(record_error(
                &self.rec_path,
                self.offset,
                format!(
                    "key {key}: payload of {} bytes exceeds 2^29-1",
                    payload.len()
                ),
            ));
        }
        writeln!(self.idx, "{key}\t{}", self.offset).map_err(|source| DataError::Io {
            path: self.idx_path.clone(),
            source,
        })?;
        let magic = RECORD_MAGIC.to_le_bytes();
        let mut parts: Vec<(u32, &[u8])> = Vec::new();
        let mut start = 0;
        for i in (0..payload.len() / 4 * 4).step_by(4) {
            if payload[i..i + 4] == magic {
                parts.push((if start == 0 { 1 } else { 2 }, &payload[start..i]));
                start = i + 4;
            }
        }
        parts.push((if start == 0 { 0 } else { 3 }, &payload[start..]));
        let mut written = 0u64;
        for (cflag, part) in parts {
            let lrec = cflag << 29 | part.len() as u32;
            let pad = part.len().div_ceil(4) * 4 - part.len();
            let mut chunk = Vec::with_capacity(8 + part.len() + pad);
            chunk.extend_from_slice(&magic);
            chunk.extend_from_slice(&lrec.to_le_bytes());
            chunk.extend_from_slice(part);
            chunk.extend_from_slice(&[0u8; 3][..pad]);
            self.rec.write_all(&chunk).map_err(io)?;
            written += (8 + part.len() + pad) as u64;
        }
        self.offset += written;
        Ok(())
    }

    /// Flush both files and move them into place.
    pub fn finish(self) -> Result<(), DataError> {
        for (writer, path) in [(self.rec, self.rec_path), (self.idx, self.idx_path)] {
            let io = |source| DataError::Io {
                path: path.clone(),
                source,
            };
            let file = writer.into_inner().map_err(|e| io(e.into_error()))?;
            file.as_file().sync_all().map_err(io)?;
            // NamedTempFile creates 0600; a dataset is meant to be read by others.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::Permissions::from_mode(0o644);
                file.as_file().set_permissions(mode).map_err(io)?;
            }
            file.persist(&path).map_err(|e| io(e.error))?;
        }
        Ok(())
    }
}

/// Pack `dataset` the insightface way: with labels, a header record at key 0, images at keys
/// `1..=N` (grouped by identity, scalar labels) and one record per identity giving its image key
/// range; without labels, images at keys `0..N` with label -1. `encoded(i)` returns the image bytes
/// to store for sample `i`. Returns the number of images written.
pub fn pack_records(
    prefix: &Path,
    len: usize,
    identities: Option<usize>,
    mut sample: impl FnMut(usize) -> Result<(Vec<u8>, Option<u32>), DataError>,
) -> Result<usize, DataError> {
    let mut writer = RecordWriter::create(prefix)?;
    match identities {
        Some(identities) => {
            let mut samples: Vec<(u32, usize)> = Vec::with_capacity(len);
            let mut encoded = Vec::with_capacity(len);
            for i in 0..len {
                let (bytes, label) = sample(i)?;
                let label = label.ok_or_else(|| DataError::Decode {
                    origin: format!("sample {i}"),
                    reason: "a labelled set has an unlabelled sample".into(),
                })?;
                samples.push((label, i));
                encoded.push(bytes);
            }
            samples.sort_by_key(|&(label, i)| (label, i));
            let first_identity_key = len as u64 + 1;
            let end = first_identity_key + identities as u64;
            writer.write(
                0,
                &Record::with_labels(vec![first_identity_key as f32, end as f32]),
            )?;
            let mut ranges = vec![(u64::MAX, 0u64); identities];
            for (k, &(label, i)) in samples.iter().enumerate() {
                let key = k as u64 + 1;
                let range = &mut ranges[label as usize];
                range.0 = range.0.min(key);
                range.1 = key + 1;
                let data = std::mem::take(&mut encoded[i]);
                writer.write(key, &Record::image(label as f32, key, data))?;
            }
            for (id, (start, stop)) in ranges.into_iter().enumerate() {
                let start = if start == u64::MAX { stop } else { start };
                writer.write(
                    first_identity_key + id as u64,
                    &Record::with_labels(vec![start as f32, stop as f32]),
                )?;
            }
        }
        None => {
            for i in 0..len {
                let (bytes, _) = sample(i)?;
                writer.write(i as u64, &Record::image(-1.0, i as u64, bytes))?;
            }
        }
    }
    writer.finish()?;
    Ok(len)
}

/// Read a whole file (helper for packing folders).
pub fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes)
}
