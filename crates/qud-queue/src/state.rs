//! Bit-exact queue state for checkpoints: in memory and as a checksummed file.
//!
//! File layout (little endian): `b"QUDQUEUE"`, u32 version (1), u32 kind (0 fifo, 1 simq,
//! 2 dissimq), u64 capacity, u64 dim, u64 pointer, u64 filled, u64 total, capacity * dim f32 rows,
//! u64 FNV-1a hash of everything before it.

use crate::{FeatureQueue, QueueError, QueueKind};
use burn::prelude::*;
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"QUDQUEUE";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 5 * 8;

/// Everything a queue is, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueState {
    pub kind: QueueKind,
    pub capacity: usize,
    pub dim: usize,
    pub pointer: usize,
    pub filled: usize,
    pub total: u64,
    /// Row-major `[capacity, dim]`.
    pub rows: Vec<f32>,
}

impl FeatureQueue {
    /// Copy the queue to the host.
    pub fn state(&self) -> QueueState {
        QueueState {
            kind: self.kind,
            capacity: self.capacity,
            dim: self.dim,
            pointer: self.ptr,
            filled: self.filled,
            total: self.total,
            rows: self
                .rows
                .to_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 queue rows"),
        }
    }

    /// Rebuild a queue on `device` from its state.
    pub fn from_state(state: QueueState, device: &Device) -> Result<Self, QueueError> {
        let bad = |why: String| Err(QueueError::State(why));
        if state.capacity == 0 || state.dim == 0 {
            return bad(format!(
                "capacity {} and dim {} must be > 0",
                state.capacity, state.dim
            ));
        }
        if state.rows.len() != state.capacity * state.dim {
            return bad(format!(
                "{} row values for a {}x{} queue",
                state.rows.len(),
                state.capacity,
                state.dim
            ));
        }
        if state.pointer >= state.capacity || state.filled > state.capacity {
            return bad(format!(
                "pointer {} / filled {} out of range for capacity {}",
                state.pointer, state.filled, state.capacity
            ));
        }
        Ok(Self {
            rows: Tensor::from_data(
                TensorData::new(state.rows, [state.capacity, state.dim]),
                device,
            ),
            capacity: state.capacity,
            dim: state.dim,
            kind: state.kind,
            ptr: state.pointer,
            filled: state.filled,
            total: state.total,
        })
    }

    /// Write the state atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), QueueError> {
        self.state().save(path)
    }

    /// Read a state written by [`FeatureQueue::save`] onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, QueueError> {
        let state = QueueState::load(path)?;
        Self::from_state(state, device).map_err(|e| QueueError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

impl QueueState {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.rows.len() * 4 + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&kind_code(self.kind).to_le_bytes());
        for v in [
            self.capacity as u64,
            self.dim as u64,
            self.pointer as u64,
            self.filled as u64,
            self.total,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in &self.rows {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let hash = fnv1a(&out);
        out.extend_from_slice(&hash.to_le_bytes());
        out
    }

    /// Parse [`QueueState::to_bytes`]; `origin` names the source in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self, QueueError> {
        let fail = |reason: String| QueueError::File {
            path: origin.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER_LEN + 8 {
            return Err(fail(format!(
                "truncated: {} bytes, header needs {}",
                bytes.len(),
                HEADER_LEN + 8
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(fail("not a qud queue file (bad magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(fail(format!(
                "unsupported version {version}, expected {VERSION}"
            )));
        }
        let kind = match u32_at(12) {
            0 => QueueKind::Fifo,
            1 => QueueKind::Simq,
            2 => QueueKind::Dissimq,
            k => return Err(fail(format!("unknown queue kind code {k}"))),
        };
        let [capacity, dim, pointer, filled, total] = [16, 24, 32, 40, 48].map(u64_at);
        let values = capacity
            .checked_mul(dim)
            .filter(|v| *v <= (bytes.len() / 4) as u64)
            .ok_or_else(|| {
                fail(format!(
                    "header claims {capacity}x{dim} rows, more than the file holds"
                ))
            })? as usize;
        let expected_len = HEADER_LEN + values * 4 + 8;
        if bytes.len() != expected_len {
            return Err(fail(format!(
                "truncated or padded: {} bytes, a {capacity}x{dim} queue takes {expected_len}",
                bytes.len()
            )));
        }
        let body = &bytes[..expected_len - 8];
        if fnv1a(body) != u64_at(expected_len - 8) {
            return Err(fail("checksum mismatch: the file is corrupted".into()));
        }
        let rows = body[HEADER_LEN..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Self {
            kind,
            capacity: capacity as usize,
            dim: dim as usize,
            pointer: pointer as usize,
            filled: filled as usize,
            total,
            rows,
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), QueueError> {
        let fail = |e: std::io::Error| QueueError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(fail)?;
        file.write_all(&self.to_bytes()).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    }

    pub fn load(path: &Path) -> Result<Self, QueueError> {
        let bytes = std::fs::read(path).map_err(|e| QueueError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes, path)
    }
}

fn kind_code(kind: QueueKind) -> u32 {
    match kind {
        QueueKind::Fifo => 0,
        QueueKind::Simq => 1,
        QueueKind::Dissimq => 2,
    }
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
