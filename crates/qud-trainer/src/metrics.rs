//! The rows of a run's `metrics.jsonl` and `eval.jsonl`: one struct per kind of line, written by
//! the training loop and read back by the report (and by a user's own scripts) under the same
//! field names.

use serde::{Deserialize, Serialize};

/// A logged training step (`metrics.jsonl`, every `run.log_every` steps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRow {
    /// Steps done so far.
    pub step: usize,
    pub epoch: usize,
    pub lr: f64,
    /// The last step's mean loss.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean cosine between student and teacher features of the batch (QUD).
    pub positive_similarity: Option<f32>,
    /// Mean cosine between the student's features and the queue (QUD).
    pub negative_similarity: Option<f32>,
    /// Training throughput since the last logged step.
    pub samples_per_s: f64,
}

/// Samples of an epoch that could not be decoded and were left out (`metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SkippedRow {
    pub epoch: usize,
    pub skipped_samples: usize,
}

/// One verification set scored during training (`eval.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub step: usize,
    pub epoch: usize,
    pub set: String,
    /// Mean 10-fold accuracy, 0..=1.
    pub accuracy: f64,
    pub accuracy_std: f64,
    /// VAL at FAR 1e-3; absent (null) on sets where no fold reaches that FAR.
    pub val: Option<f64>,
    pub far: Option<f64>,
    pub xnorm: f64,
}

/// The rows of type `T` in the JSON-lines file at `path`, skipping lines of other kinds; nothing
/// when the file does not exist.
pub fn read_rows<T: for<'de> Deserialize<'de>>(path: &std::path::Path) -> Vec<T> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
