//! TensorBoard event files of a run's scalars (`<output_dir>/tensorboard/events.out.tfevents.*`),
//! so that `tensorboard --logdir runs/` shows qud runs as it shows arcface_torch's.
//!
//! The format, written here by hand (two messages and a checksum; no crate needed): a TFRecord
//! stream of `Event` protocol buffers (tensorflow/core/util/event.proto). Each record is the
//! payload length (u64, little-endian), its masked CRC-32C, the payload, and the payload's masked
//! CRC-32C. The first event names the file version (`brain.Event:2`); each scalar is an `Event`
//! with `wall_time`, `step` and a `Summary` holding one `Value { tag, simple_value }`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends scalar events to one event file; a new file per run start, as TensorBoard expects.
pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard's writers name theirs.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        // Two run starts within a second (a resume right after a stop) get distinct files.
        let path = (0..)
            .map(|n| {
                dir.join(format!(
                    "events.out.tfevents.{}.{host}.{}.{n}",
                    now.as_secs(),
                    std::process::id()
                ))
            })
            .find(|p| !p.exists())
            .expect("an unused name");
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        let mut writer = Self {
            file: std::io::BufWriter::new(file),
            path,
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        writer.file.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One scalar at `step`, flushed so that a running TensorBoard sees it.
    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) -> std::io::Result<()> {
        self.scalars(step, &[(tag, value)])
    }

    /// Several scalars at `step` (one event each), then one flush.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> std::io::Result<()> {
        for &(tag, value) in values {
            let mut summary_value = Vec::new();
            put_bytes(&mut summary_value, 1, tag.as_bytes());
            put_float(&mut summary_value, 2, value as f32);
            let mut summary = Vec::new();
            put_bytes(&mut summary, 1, &summary_value);
            let mut event = Vec::new();
            put_double(&mut event, 1, wall_time());
            put_varint_field(&mut event, 2, step as u64);
            put_bytes(&mut event, 5, &summary);
            self.record(&event)?;
        }
        self.file.flush()
    }

    fn record(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let length = (payload.len() as u64).to_le_bytes();
        self.file.write_all(&length)?;
        self.file.write_all(&masked_crc32c(&length).to_le_bytes())?;
        self.file.write_all(payload)?;
        self.file.write_all(&masked_crc32c(payload).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

fn put_double(out: &mut Vec<u8>, field: u64, value: f64) {
    put_varint(out, (field << 3) | 1);
    out.extend(value.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u64, value: f32) {
    put_varint(out, (field << 3) | 5);
    out.extend(value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend(bytes);
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: records are short and
/// written a few at a time per logged step.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masking of a CRC, so that a CRC of data holding CRCs stays well distributed.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Why an event file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct EventFileError {
    pub path: PathBuf,
    pub reason: String,
}

/// One scalar read back from an event file.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: i64,
    pub value: f32,
}

/// The scalars of the event file at `path` (any writer's: TensorFlow's, PyTorch's, ours), every
/// record's checksums verified. For tests and for users' scripts without TensorFlow.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>, EventFileError> {
    let error = |reason: String| EventFileError {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let bad = |at: usize, why: &str| error(format!("record at byte {at}: {why}"));
    let mut scalars = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes.get(at..at + 12).ok_or_else(|| bad(at, "truncated"))?;
        let length = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
        if u32::from_le_bytes(header[8..].try_into().unwrap()) != masked_crc32c(&header[..8]) {
            return Err(bad(at, "length checksum mismatch"));
        }
        let payload = bytes
            .get(at + 12..at + 12 + length)
            .ok_or_else(|| bad(at, "truncated"))?;
        let stored = bytes
            .get(at + 12 + length..at + 16 + length)
            .ok_or_else(|| bad(at, "truncated"))?;
        if u32::from_le_bytes(stored.try_into().unwrap()) != masked_crc32c(payload) {
            return Err(bad(at, "payload checksum mismatch"));
        }
        let event = fields(payload).ok_or_else(|| bad(at, "not an Event message"))?;
        let step = event
            .iter()
            .find_map(|f| matches!(f, (2, Field::Varint(_))).then(|| f.1.varint()))
            .unwrap_or(0) as i64;
        for (_, summary) in event.iter().filter(|(n, _)| *n == 5) {
            let Field::Bytes(summary) = summary else {
                continue;
            };
            let summary = fields(summary).ok_or_else(|| bad(at, "bad Summary"))?;
            for (_, value) in summary.iter().filter(|(n, _)| *n == 1) {
                let Field::Bytes(value) = value else { continue };
                let value = fields(value).ok_or_else(|| bad(at, "bad Summary.Value"))?;
                let tag = value.iter().find_map(|(n, f)| match (n, f) {
                    (1, Field::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                    _ => None,
                });
                let simple = value.iter().find_map(|(n, f)| match (n, f) {
                    (2, Field::Fixed32(v)) => Some(f32::from_le_bytes(*v)),
                    _ => None,
                });
                if let (Some(tag), Some(value)) = (tag, simple) {
                    scalars.push(Scalar { tag, step, value });
                }
            }
        }
        at += 16 + length;
    }
    Ok(scalars)
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

impl Field<'_> {
    fn varint(&self) -> u64 {
        match self {
            Field::Varint(v) => *v,
            _ => 0,
        }
    }
}

/// The top-level fields of a protocol-buffer message, `None` when it is malformed.
fn fields(mut bytes: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    fn varint(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut bytes)?),
            1 => {
                bytes = bytes.get(8..)?;
                Field::Fixed64
            }
            2 => {
                let n = varint(&mut bytes)? as usize;
                let (value, rest) = (bytes.get(..n)?, bytes.get(n..)?);
                bytes = rest;
                Field::Bytes(value)
            }
            5 => {
                let value = bytes.get(..4)?.try_into().ok()?;
                bytes = &bytes[4..];
                Field::Fixed32(value)
            }
            _ => return None,
        };
        out.push((key >> 3, field));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// `fixtures/tensorboard/torch.tfevents` was written by PyTorch's TensorBoard writer
    /// (`fixtures/tensorboard/make_fixture.py`); it reads as those calls wrote it.
    #[test]
    fn reads_pytorch_event_files() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tensorboard/torch.tfevents");
        let scalars = read_scalars(&path).unwrap();
        let expected: Vec<Scalar> = [
            ("train/loss", 1, 2.5f32),
            ("train/loss", 2, 2.25),
            ("eval/lfw/accuracy", 2, 0.75),
        ]
        .into_iter()
        .map(|(tag, step, value)| Scalar {
            tag: tag.into(),
            step,
            value,
        })
        .collect();
        assert_eq!(scalars, expected);
    }

    #[test]
    fn written_scalars_read_back_and_corruption_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path()).unwrap();
        writer
            .scalars(10, &[("train/loss", 6.5), ("train/lr", 0.1)])
            .unwrap();
        writer.scalar("train/loss", 20, 6.25).unwrap();
        let path = writer.path().to_path_buf();
        assert!(path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("events.out.tfevents."));
        let second = EventWriter::create(dir.path()).unwrap();
        assert_ne!(second.path(), path, "a second run start gets its own file");
        drop((writer, second));

        let scalars = read_scalars(&path).unwrap();
        let got: Vec<(String, i64, f32)> = scalars
            .into_iter()
            .map(|s| (s.tag, s.step, s.value))
            .collect();
        assert_eq!(
            got,
            [
                ("train/loss".to_string(), 10, 6.5),
                ("train/lr".to_string(), 10, 0.1),
                ("train/loss".to_string(), 20, 6.25)
            ]
        );

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = read_scalars(&path).unwrap_err().to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains("tfevents"),
            "{err}"
        );
    }
}
