//! The qud training loop: one loop for every method (QUD, feature MSE, ArcFace), the SGD schedule
//! of the paper, evaluation during training, checkpoints and exact resume.
//!
//! QUD (Kolf, Damer, Boutros, BMVC 2024), one step as [`train_step`] runs it: student features
//! in train mode, teacher features from the frozen eval-mode teacher, InfoNCE against the queue
//! *before* this batch, enqueue the teacher features, backward, global gradient-norm clip, SGD
//! step. With several `run.devices` a step is data parallel with DDP's semantics (`parallel`).
//! `train` is the loop around it: setup, then per batch the step and the loop's duties.

mod checkpoint;
pub mod metrics;
pub mod objective;
pub mod optim;
mod parallel;
pub mod parity;
pub mod precision;
mod progress;
pub mod report;
mod run;
mod setup;
pub mod step;
pub mod teacher_cache;
pub mod tensorboard;

pub use checkpoint::checkpoint_student;
pub use objective::Objective;
pub use run::{train, TrainOptions, TrainReport};
pub use setup::{initialize_now, open_dataset, prepare_teacher_cache, seeded, Student, Teacher};
pub use step::{train_step, StepContext, StepReport, TrainState};
pub use teacher_cache::{CacheError, CacheKey, TeacherCache};

use std::path::PathBuf;

/// Why a run could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config key whose value cannot work with the rest of the run (beyond what
    /// `Config::validate` checks on its own).
    #[error("{key}: {reason}")]
    Config { key: &'static str, reason: String },
    #[error(transparent)]
    InvalidConfig(#[from] qud_config::ConfigError),
    #[error("{} already holds checkpoints: resume it (--resume) or choose another run.output_dir", .0.display())]
    OutputInUse(PathBuf),
    #[error("optim.batch_size = {batch_size} exceeds the {samples} training samples")]
    BatchLargerThanData { batch_size: usize, samples: usize },
    #[error("epoch {epoch} batch {batch}: no sample of the batch could be decoded")]
    UndecodableBatch { epoch: usize, batch: usize },
    #[error(
        "identity label {label} in the batch, but the ArcFace head has {classes} classes (labels \
         0..{}): the dataset's identity count is wrong", classes.saturating_sub(1)
    )]
    LabelOutOfRange { label: u32, classes: usize },
    #[error("method.kind = \"arcface\" needs identity labels; {0}")]
    NoLabels(&'static str),
    #[error("distillation needs a teacher")]
    NoTeacher,
    #[error("the teacher's embedding size {teacher} differs from the student's {student} (student.embedding_dim)")]
    EmbeddingMismatch { teacher: usize, student: usize },
    #[error("the checkpoint has no queue.bin: a QUD run cannot resume without its queue")]
    NoQueueInCheckpoint,
    #[error("run.precision = {precision}: device {device} does not compute in {dtype}; use \"f32\" there")]
    Precision {
        precision: String,
        device: String,
        dtype: String,
    },
    #[error(transparent)]
    Data(#[from] qud_data::DataError),
    #[error(transparent)]
    Weights(#[from] qud_backbone::WeightError),
    #[error(transparent)]
    Backend(#[from] qud_backends::BackendError),
    #[error(transparent)]
    Eval(#[from] qud_eval::BinError),
    #[error(transparent)]
    Queue(#[from] qud_queue::QueueError),
    #[error(transparent)]
    Cache(#[from] teacher_cache::CacheError),
    #[error(transparent)]
    Onnx(#[from] qud_onnx::OnnxError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error(
        "the loss became {value} at step {step}; the last good checkpoint is {last_checkpoint}"
    )]
    NonFinite {
        step: usize,
        value: f32,
        last_checkpoint: String,
    },
}

pub(crate) fn io_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;
