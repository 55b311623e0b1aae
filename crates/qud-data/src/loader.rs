//! Shuffled, flipped, normalised batches, decoded in parallel ahead of the training step.
//!
//! The order of an epoch is a pure function of `(seed, epoch)` and each flip a pure function of
//! `(seed, epoch, sample index)` ([`epoch_plan`], [`flip_for`]), so a run resumed at batch `b` of
//! epoch `e` sees exactly the batches an uninterrupted run would have seen, whatever the number of
//! decoding threads. With `world > 1` every rank gets a disjoint shard of the epoch.

use crate::{Augment, DataError, FaceDataset, FACE_SIZE};
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
    /// This process's shard and the number of shards (data-parallel ranks or devices).
    pub rank: usize,
    pub world: usize,
    /// Leave out samples that fail to decode (counted in [`Batch::skipped`]) instead of failing.
    pub skip_bad_samples: bool,
    /// Applied to each decoded, flipped face, drawn from `(seed, epoch, sample index)`.
    pub augment: Augment,
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
            rank: 0,
            world: 1,
            skip_bad_samples: true,
            augment: Augment::default(),
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether sample `index` is flipped in `epoch`: a hash of `(seed, epoch, index)` against `prob`,
/// so the teacher-feature cache and a resumed run agree with the original run.
pub fn flip_for(seed: u64, epoch: usize, index: usize, prob: f64) -> bool {
    if prob <= 0.0 {
        return false;
    }
    let h = splitmix64(splitmix64(splitmix64(seed) ^ epoch as u64) ^ index as u64);
    // 53 random bits -> [0, 1)
    ((h >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < prob
}

/// `(sample index, flipped)` for every sample this rank visits in `epoch`, in order. The shuffle
/// is shared by all ranks; rank `r` of `w` takes positions `r, r + w, ...`. With `drop_last` every
/// rank gets `len / w` samples (the remainder is left out, as PyTorch's `DistributedSampler` with
/// `drop_last`); otherwise the first `len % w` ranks get one more.
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
    let world = options.world.max(1);
    let take = if options.drop_last {
        len / world
    } else {
        len.div_ceil(world)
    };
    order
        .into_iter()
        .skip(options.rank)
        .step_by(world)
        .take(take)
        .map(|i| (i, flip_for(options.seed, epoch, i, options.flip_prob)))
        .collect()
}

/// A decoded batch: `[B, 3, 112, 112]` floats in [-1, 1] plus where each sample came from.
#[derive(Clone, Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub indices: Vec<usize>,
    pub flips: Vec<bool>,
    pub labels: Vec<Option<u32>>,
    /// Samples of this batch's plan that were left out because they could not be decoded:
    /// `(sample index, why)`.
    pub skipped: Vec<(usize, String)>,
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

    /// The batch cut into `parts` consecutive pieces, in order, whose sizes differ by at most one
    /// (the first `len % parts` get the extra sample): one per data-parallel device, so that the
    /// pieces concatenated in rank order are the batch again. `skipped` stays with the first.
    /// One part is the batch itself, not a copy.
    pub fn split(self, parts: usize) -> Vec<Batch> {
        let parts = parts.max(1);
        if parts == 1 {
            return vec![self];
        }
        let pixels = 3 * FACE_SIZE * FACE_SIZE;
        let (base, extra) = (self.len() / parts, self.len() % parts);
        let mut start = 0;
        (0..parts)
            .map(|rank| {
                let end = start + base + usize::from(rank < extra);
                let piece = Batch {
                    images: self.images[start * pixels..end * pixels].to_vec(),
                    indices: self.indices[start..end].to_vec(),
                    flips: self.flips[start..end].to_vec(),
                    labels: self.labels[start..end].to_vec(),
                    skipped: if rank == 0 {
                        self.skipped.clone()
                    } else {
                        Vec::new()
                    },
                };
                start = end;
                piece
            })
            .collect()
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// `dataset.get_into`, with a panic in a decoder (a bug a hostile file found) turned into that
/// sample's decode error, so it is skipped or reported like any bad sample instead of taking
/// the loader down.
fn decode_guarded(
    dataset: &dyn FaceDataset,
    index: usize,
    flip: bool,
    out: &mut [f32],
) -> Result<Option<u32>, DataError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dataset.get_into(index, flip, out)
    }))
    .unwrap_or_else(|payload| {
        Err(DataError::Decode {
            origin: format!("{}, sample {index}", dataset.describe()),
            reason: format!("the decoder panicked: {}", panic_message(payload.as_ref())),
        })
    })
}

/// Decode the samples `plan` into one batch, splitting the work over `workers` threads. A sample
/// that cannot be decoded fails the batch, unless `skip_bad` and the fault is the sample's own
/// ([`DataError::is_bad_sample`]): then it is left out and listed in [`Batch::skipped`].
pub fn decode_batch(
    dataset: &dyn FaceDataset,
    plan: &[(usize, bool)],
    workers: usize,
    skip_bad: bool,
) -> Result<Batch, DataError> {
    let per_image = 3 * FACE_SIZE * FACE_SIZE;
    let mut images = vec![0f32; plan.len() * per_image];
    let mut labels = vec![None; plan.len()];
    let mut faults: Vec<Option<String>> = vec![None; plan.len()];
    let workers = workers.clamp(1, plan.len().max(1));
    let chunk = plan.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| -> Result<(), DataError> {
        let jobs: Vec<_> = images
            .chunks_mut(chunk * per_image)
            .zip(labels.chunks_mut(chunk))
            .zip(faults.chunks_mut(chunk))
            .zip(plan.chunks(chunk))
            .map(|(((out, labels), faults), plan)| {
                scope.spawn(move || -> Result<(), DataError> {
                    for (((&(index, flip), out), label), fault) in plan
                        .iter()
                        .zip(out.chunks_mut(per_image))
                        .zip(labels)
                        .zip(faults)
                    {
                        match decode_guarded(dataset, index, flip, out) {
                            Ok(sample_label) => *label = sample_label,
                            Err(e) if skip_bad && e.is_bad_sample() => {
                                *fault = Some(e.to_string());
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for job in jobs {
            job.join().map_err(|payload| DataError::Loader {
                reason: format!("a decoding thread panicked: {}", panic_message(&payload)),
            })??;
        }
        Ok(())
    })?;
    if faults.iter().all(Option::is_none) {
        // The usual case: the decoded buffer is the batch, no compaction copy.
        return Ok(Batch {
            images,
            indices: plan.iter().map(|p| p.0).collect(),
            flips: plan.iter().map(|p| p.1).collect(),
            labels,
            skipped: Vec::new(),
        });
    }
    let mut batch = Batch {
        images: Vec::with_capacity(images.len()),
        indices: Vec::with_capacity(plan.len()),
        flips: Vec::with_capacity(plan.len()),
        labels: Vec::with_capacity(plan.len()),
        skipped: Vec::new(),
    };
    for (i, fault) in faults.into_iter().enumerate() {
        let (index, flip) = plan[i];
        match fault {
            Some(why) => batch.skipped.push((index, why)),
            None => {
                batch
                    .images
                    .extend_from_slice(&images[i * per_image..(i + 1) * per_image]);
                batch.indices.push(index);
                batch.flips.push(flip);
                batch.labels.push(labels[i]);
            }
        }
    }
    Ok(batch)
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

    /// Batches this rank draws per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let len = self.dataset.len();
        let world = self.options.world.max(1);
        let n = if self.options.drop_last {
            len / world
        } else {
            (len + world - 1 - self.options.rank) / world
        };
        if self.options.drop_last {
            n / self.options.batch_size
        } else {
            n.div_ceil(self.options.batch_size)
        }
    }

    /// The batches of `epoch` from batch `start` on, decoded by a background thread that stays
    /// `prefetch` batches ahead. Dropping the iterator stops the thread. Every batch arrives or
    /// an error does: a thread that ends early (a panic) is an error, not the end of the epoch.
    pub fn epoch(&self, epoch: usize, start: usize) -> EpochBatches {
        let plan = epoch_plan(self.dataset.len(), epoch, &self.options);
        let batches = self.batches_per_epoch();
        let (tx, rx) = sync_channel(self.options.prefetch.max(1));
        let dataset = self.dataset.clone();
        let batch_size = self.options.batch_size;
        let skip_bad = self.options.skip_bad_samples;
        let (augment, seed) = (self.options.augment, self.options.seed);
        let workers = match self.options.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        std::thread::spawn(move || {
            for b in start..batches {
                let end = ((b + 1) * batch_size).min(plan.len());
                let batch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut batch = decode_batch(
                        dataset.as_ref(),
                        &plan[b * batch_size..end],
                        workers,
                        skip_bad,
                    )?;
                    if !augment.is_identity() {
                        let per_image = 3 * FACE_SIZE * FACE_SIZE;
                        let images = batch.images.chunks_mut(per_image);
                        for (image, &index) in images.zip(&batch.indices) {
                            augment.apply(seed, epoch, index, image);
                        }
                    }
                    Ok(batch)
                }))
                .unwrap_or_else(|payload| {
                    Err(DataError::Loader {
                        reason: format!(
                            "batch {b} of epoch {epoch}: {}",
                            panic_message(payload.as_ref())
                        ),
                    })
                });
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        EpochBatches {
            batches: rx,
            remaining: batches.saturating_sub(start),
            epoch,
        }
    }
}

/// The batches of one epoch, as [`Loader::epoch`] delivers them.
pub struct EpochBatches {
    batches: Receiver<Result<Batch, DataError>>,
    remaining: usize,
    epoch: usize,
}

impl Iterator for EpochBatches {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        match self.batches.recv() {
            Ok(batch) => {
                if batch.is_err() {
                    self.remaining = 0;
                }
                Some(batch)
            }
            Err(_) => {
                let missing = self.remaining + 1;
                self.remaining = 0;
                Some(Err(DataError::Loader {
                    reason: format!(
                        "the loader thread stopped with {missing} batches of epoch {} undelivered",
                        self.epoch
                    ),
                }))
            }
        }
    }
}
