//! Shuffled, flipped, normalised batches, decoded in parallel ahead of the training step.
//!
//! The order and the flips of an epoch are a pure function of `(seed, epoch)`
//! ([`epoch_plan`]), so a run resumed at batch `b` of epoch `e` sees exactly the batches an
//! uninterrupted run would have seen.

use crate::{normalize_into, DataError, FaceDataset, FACE_SIZE};
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// How batches are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub shuffle: bool,
    /// Probability of a horizontal flip per sample.
    pub flip_prob: f64,
    pub seed: u64,
    /// Leave out the last, smaller batch of an epoch.
    pub drop_last: bool,
    /// Threads decoding one batch; 0 = one per core.
    pub workers: usize,
    /// Batches decoded ahead.
    pub prefetch: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            batch_size: 64,
            shuffle: true,
            flip_prob: 0.5,
            seed: 0,
            drop_last: true,
            workers: 0,
            prefetch: 2,
        }
    }
}

/// `(sample index, flipped)` for every sample of epoch `epoch`, in visiting order.
pub fn epoch_plan(len: usize, epoch: usize, options: &LoaderOptions) -> Vec<(usize, bool)> {
    let mut rng = ChaCha8Rng::seed_from_u64(
        options.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut order: Vec<usize> = (0..len).collect();
    if options.shuffle {
        for i in (1..len).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
    }
    order
        .into_iter()
        .map(|i| {
            (
                i,
                options.flip_prob > 0.0 && rng.random_bool(options.flip_prob.min(1.0)),
            )
        })
        .collect()
}

/// A decoded batch: `[B, 3, 112, 112]` floats in [-1, 1] plus where each sample came from.
#[derive(Clone, Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub indices: Vec<usize>,
    pub flips: Vec<bool>,
    pub labels: Vec<Option<u32>>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    pub fn tensor(&self, device: &Device) -> Tensor<4> {
        Tensor::from_data(
            TensorData::new(self.images.clone(), [self.len(), 3, FACE_SIZE, FACE_SIZE]),
            device,
        )
    }

    /// The identity labels, when every sample has one.
    pub fn labels(&self) -> Option<Vec<u32>> {
        self.labels.iter().copied().collect()
    }
}

/// Decode the samples `plan` into one batch, splitting the work over `workers` threads.
pub fn decode_batch(
    dataset: &dyn FaceDataset,
    plan: &[(usize, bool)],
    workers: usize,
) -> Result<Batch, DataError> {
    let per_image = 3 * FACE_SIZE * FACE_SIZE;
    let mut images = vec![0f32; plan.len() * per_image];
    let mut labels = vec![None; plan.len()];
    let workers = workers.clamp(1, plan.len().max(1));
    let chunk = plan.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| -> Result<(), DataError> {
        let jobs: Vec<_> = images
            .chunks_mut(chunk * per_image)
            .zip(labels.chunks_mut(chunk))
            .zip(plan.chunks(chunk))
            .map(|((out, labels), plan)| {
                scope.spawn(move || -> Result<(), DataError> {
                    for ((&(index, flip), out), label) in
                        plan.iter().zip(out.chunks_mut(per_image)).zip(labels)
                    {
                        let sample = dataset.get(index)?;
                        normalize_into(&sample.image, flip, out);
                        *label = sample.label;
                    }
                    Ok(())
                })
            })
            .collect();
        for job in jobs {
            job.join().expect("decoder thread panicked")?;
        }
        Ok(())
    })?;
    Ok(Batch {
        images,
        indices: plan.iter().map(|p| p.0).collect(),
        flips: plan.iter().map(|p| p.1).collect(),
        labels,
    })
}

/// Batches of a dataset, epoch by epoch.
#[derive(Clone)]
pub struct Loader {
    dataset: Arc<dyn FaceDataset>,
    options: LoaderOptions,
}

impl Loader {
    pub fn new(dataset: Arc<dyn FaceDataset>, options: LoaderOptions) -> Self {
        assert!(options.batch_size > 0, "batch size must be > 0");
        Self { dataset, options }
    }

    pub fn dataset(&self) -> &Arc<dyn FaceDataset> {
        &self.dataset
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.options
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.dataset.len();
        if self.options.drop_last {
            n / self.options.batch_size
        } else {
            n.div_ceil(self.options.batch_size)
        }
    }

    /// The batches of `epoch` from batch `start` on, decoded by a background thread that stays
    /// `prefetch` batches ahead. Dropping the iterator stops the thread.
    pub fn epoch(&self, epoch: usize, start: usize) -> Receiver<Result<Batch, DataError>> {
        let plan = epoch_plan(self.dataset.len(), epoch, &self.options);
        let batches = self.batches_per_epoch();
        let (tx, rx) = sync_channel(self.options.prefetch.max(1));
        let dataset = self.dataset.clone();
        let batch_size = self.options.batch_size;
        let workers = match self.options.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        std::thread::spawn(move || {
            for b in start..batches {
                let end = ((b + 1) * batch_size).min(plan.len());
                let batch = decode_batch(dataset.as_ref(), &plan[b * batch_size..end], workers);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        rx
    }
}
