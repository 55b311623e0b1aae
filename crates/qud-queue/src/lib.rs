//! FeatureQueue: the ring buffer of teacher features that gives QUD its negatives.
//!
//! QUD (Kolf, Damer, Boutros, BMVC 2024) contrasts each student feature with its own teacher
//! feature (the positive) and with `n` teacher features of earlier batches (the negatives). As in
//! MoCo, the logits of a step use the queue as it was *before* that step; the step's teacher keys
//! are enqueued afterwards, overwriting the oldest rows.
//!
//! The queue starts as `n` Gaussian rows, each L2-normalised, drawn from a seed on the host so
//! that every backend starts from the same rows. Two variants replace rows by similarity once
//! `n` real keys have been written: `simq` overwrites the most cosine-similar row, `dissimq` the
//! least similar one.

pub(crate) mod state;

pub use qud_config::QueueKind;
pub use state::QueueState;

use burn::prelude::*;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::PathBuf;

/// Why an enqueue, a load or a save failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue keys must be [batch, {expected}], got {got:?}")]
    Shape { expected: usize, got: [usize; 2] },
    #[error("queue keys contain NaN or infinity (key rows {rows:?}); the queue is unchanged")]
    NonFinite { rows: Vec<usize> },
    #[error("queue state {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("queue state is inconsistent: {0}")]
    State(String),
}

/// The ring buffer of L2-normalised teacher features on one device.
#[derive(Clone, Debug)]
pub struct FeatureQueue {
    rows: Tensor<2>,
    capacity: usize,
    dim: usize,
    kind: QueueKind,
    /// Row the next FIFO key is written to.
    ptr: usize,
    /// Real keys held, at most `capacity`; below it the queue is still in its fill phase.
    filled: usize,
    /// Keys enqueued over the queue's life.
    total: u64,
}

impl FeatureQueue {
    /// `capacity` random unit rows of size `dim`, reproducible from `seed` on every backend.
    pub fn new(capacity: usize, dim: usize, kind: QueueKind, seed: u64, device: &Device) -> Self {
        assert!(
            capacity > 0 && dim > 0,
            "a queue needs capacity > 0 and dim > 0"
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut values: Vec<f32> = (0..capacity * dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        for row in values.chunks_mut(dim) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        let rows = Tensor::from_data(TensorData::new(values, [capacity, dim]), device);
        Self {
            rows,
            capacity,
            dim,
            kind,
            ptr: 0,
            filled: 0,
            total: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn kind(&self) -> QueueKind {
        self.kind
    }

    /// Row the next FIFO key goes to: `total_enqueued() % capacity()` for a FIFO queue.
    pub fn pointer(&self) -> usize {
        self.ptr
    }

    /// Real keys held (the rest are still the initial random rows).
    pub fn filled(&self) -> usize {
        self.filled
    }

    pub fn total_enqueued(&self) -> u64 {
        self.total
    }

    pub fn device(&self) -> Device {
        self.rows.device()
    }

    /// The negatives as they are now, `[capacity, dim]`, outside any autodiff graph. Later
    /// enqueues do not change a tensor already returned.
    pub fn negatives(&self) -> Tensor<2> {
        self.rows.clone()
    }

    /// Write `keys` (`[batch, dim]`) into the queue.
    ///
    /// FIFO: key `i` goes to row `(pointer + i) % capacity`, so with a batch larger than the
    /// queue only its last `capacity` keys remain; the pointer advances by the batch size.
    /// `simq`/`dissimq`: FIFO until `capacity` real keys have been written, then each further key
    /// in batch order replaces the row (including rows written earlier in the same batch) with the
    /// highest/lowest cosine similarity to it, the lowest index on ties.
    ///
    /// Keys with NaN or infinity are refused and leave the queue unchanged.
    pub fn enqueue(&mut self, keys: Tensor<2>) -> Result<(), QueueError> {
        let [batch, dim] = keys.dims();
        if dim != self.dim {
            return Err(QueueError::Shape {
                expected: self.dim,
                got: [batch, dim],
            });
        }
        if batch == 0 {
            return Ok(());
        }
        let keys = keys.without_autodiff().to_device(&self.rows.device());
        let finite = keys.clone().is_finite().all().into_scalar::<bool>();
        if !finite {
            let bad_rows = keys.is_finite().bool_not().any_dim(1);
            let rows = bad_rows
                .into_data()
                .iter::<bool>()
                .enumerate()
                .filter_map(|(i, bad)| bad.then_some(i))
                .collect();
            return Err(QueueError::NonFinite { rows });
        }
        let fifo_count = match self.kind {
            QueueKind::Fifo => batch,
            QueueKind::Simq | QueueKind::Dissimq => batch.min(self.capacity - self.filled),
        };
        if fifo_count > 0 {
            self.write_fifo(keys.clone().slice(0..fifo_count));
        }
        if fifo_count < batch {
            self.replace_by_similarity(keys.slice(fifo_count..batch));
        }
        self.total += batch as u64;
        Ok(())
    }

    fn write_fifo(&mut self, keys: Tensor<2>) {
        let n = self.capacity;
        let batch = keys.dims()[0];
        let keep = batch.min(n);
        let kept = keys.slice((batch - keep)..batch);
        let start = (self.ptr + batch - keep) % n;
        let first = keep.min(n - start);
        self.rows = self
            .rows
            .clone()
            .slice_assign(s![start..start + first, ..], kept.clone().slice(0..first));
        if keep > first {
            self.rows = self
                .rows
                .clone()
                .slice_assign(s![0..keep - first, ..], kept.slice(first..keep));
        }
        self.ptr = (self.ptr + batch) % n;
        self.filled = (self.filled + batch).min(n);
    }

    /// Replacement after the fill phase. Similarities are computed once on the device as
    /// `keys . rows^T` and `keys . keys^T`; the sequential choice of rows (a key may replace a row
    /// written by an earlier key of the same batch) then runs on the host over those matrices.
    fn replace_by_similarity(&mut self, keys: Tensor<2>) {
        let batch = keys.dims()[0];
        let unit_keys = l2_normalize(keys.clone());
        let key_rows = unit_keys
            .clone()
            .matmul(l2_normalize(self.rows.clone()).transpose())
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 similarities");
        let key_keys = unit_keys
            .clone()
            .matmul(unit_keys.transpose())
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 similarities");
        let n = self.capacity;
        let mut occupant: Vec<Option<usize>> = vec![None; n];
        for i in 0..batch {
            let sim = |j: usize| match occupant[j] {
                Some(k) => key_keys[i * batch + k],
                None => key_rows[i * n + j],
            };
            let mut best = 0;
            for j in 1..n {
                let better = match self.kind {
                    QueueKind::Simq => sim(j) > sim(best),
                    _ => sim(j) < sim(best),
                };
                if better {
                    best = j;
                }
            }
            occupant[best] = Some(i);
        }
        let (targets, sources): (Vec<i64>, Vec<i64>) = occupant
            .iter()
            .enumerate()
            .filter_map(|(row, key)| key.map(|k| (row as i64, k as i64)))
            .unzip();
        let device = self.rows.device();
        let sources =
            Tensor::<1, Int>::from_data(TensorData::new(sources, [targets.len()]), &device);
        let targets =
            Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [targets.len()]), &device);
        let values = keys.select(0, sources);
        self.rows = self.rows.clone().select_assign(
            0,
            targets,
            values,
            burn::tensor::IndexingUpdateOp::Assign,
        );
    }
}

/// `x / max(||x||_2, 1e-12)` along dimension 1, as `torch.nn.functional.normalize`.
fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

#[cfg(test)]
mod tests;
