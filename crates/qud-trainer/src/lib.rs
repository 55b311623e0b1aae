//! The qud training loop: one loop for every method (QUD, feature MSE, ArcFace), the SGD schedule
//! of the paper, evaluation during training, checkpoints and exact resume.
//!
//! QUD (Kolf, Damer, Boutros, BMVC 2024), one step as [`train_step`] runs it: student features
//! in train mode, teacher features from the frozen eval-mode teacher, InfoNCE against the queue
//! *before* this batch, enqueue the teacher features, backward, global gradient-norm clip, SGD
//! step. With several `run.devices` a step is data parallel with DDP's semantics (`parallel`).
//! `train` is the loop around it: setup, then per batch the step and the loop's duties.

mod checkpoint;
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
    #[error("{0}")]
    Config(String),
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
