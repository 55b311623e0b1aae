//! Checkpoints: `<out>/checkpoints/step-N/` holding the student (burnpack, with its parameter ids
//! so the optimizer state re-attaches), the optimizer state, the queue and the loop position.
//! Written to `step-N.tmp/` and renamed, so a checkpoint directory is always complete; its
//! `checksums.json` holds every file's size and CRC-32, verified before a resume reads it.

use crate::{io_error, Student, TrainError};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use qud_config::Config;
use qud_queue::FeatureQueue;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the loop stands, and the settings a resumed run must share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Optimisation steps done.
    pub step: usize,
    /// Epoch and batch of the next step.
    pub epoch: usize,
    pub batch: usize,
    pub student_arch: String,
    pub embedding_dim: usize,
    pub method: String,
    pub queue_size: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// The f16 loss scale (`run.precision = "f16"`).
    #[serde(default)]
    pub loss_scale: Option<crate::precision::LossScale>,
}

/// A setting that differs between a checkpoint and the config resuming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} was {was} in the checkpoint, is {is} now")]
pub struct ResumeMismatch {
    pub field: &'static str,
    pub was: String,
    pub is: String,
}

impl Position {
    pub fn new(config: &Config, step: usize, epoch: usize, batch: usize) -> Self {
        Self {
            step,
            epoch,
            batch,
            student_arch: config.student.arch.clone(),
            embedding_dim: config.student.embedding_dim,
            method: format!("{:?}", config.method.kind).to_lowercase(),
            queue_size: config.method.queue_size,
            batch_size: config.optim.batch_size,
            seed: config.run.seed,
            loss_scale: None,
        }
    }

    /// A config that would change the meaning of the resumed run is refused, naming the field.
    pub fn check_resumable(&self, config: &Config) -> Result<(), ResumeMismatch> {
        let now = Position::new(config, self.step, self.epoch, self.batch);
        let fields = [
            ("student.arch", &self.student_arch, &now.student_arch),
            ("method.kind", &self.method, &now.method),
        ];
        for (field, was, is) in fields {
            if was != is {
                return Err(ResumeMismatch {
                    field,
                    was: was.to_string(),
                    is: is.to_string(),
                });
            }
        }
        let numbers = [
            (
                "student.embedding_dim",
                self.embedding_dim,
                now.embedding_dim,
            ),
            ("method.queue_size", self.queue_size, now.queue_size),
            ("optim.batch_size", self.batch_size, now.batch_size),
            ("run.seed", self.seed as usize, now.seed as usize),
        ];
        for (field, was, is) in numbers {
            if was != is {
                return Err(ResumeMismatch {
                    field,
                    was: was.to_string(),
                    is: is.to_string(),
                });
            }
        }
        Ok(())
    }
}

pub fn directory(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Write a checkpoint and keep only the newest `keep`.
pub fn save(
    out: &Path,
    position: &Position,
    student: &Student,
    optim: &ModuleOptimizer,
    queue: Option<&FeatureQueue>,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = directory(out);
    let final_dir = root.join(format!("step-{}", position.step));
    let tmp = root.join(format!("step-{}.tmp", position.step));
    let fail = |reason: String| TrainError::Checkpoint {
        path: final_dir.clone(),
        reason,
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_error(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_error(&tmp))?;
    student
        .clone()
        .save_file(tmp.join("student.bpk"))
        .map_err(|e| fail(format!("student: {e}")))?;
    optim
        .save(tmp.join("optim.bpk"))
        .map_err(|e| fail(format!("optimizer: {e:?}")))?;
    if let Some(queue) = queue {
        queue.save(&tmp.join("queue.bin"))?;
    }
    let state = serde_json::to_string_pretty(position).expect("position serializes");
    std::fs::write(tmp.join("position.json"), state).map_err(io_error(&tmp))?;
    let sums = checksums(&tmp)?;
    let sums = serde_json::to_string_pretty(&sums).expect("checksums serialize");
    std::fs::write(tmp.join(CHECKSUMS), sums).map_err(io_error(&tmp))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io_error(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io_error(&final_dir))?;
    let mut all = list(out)?;
    while all.len() > keep {
        let (_, oldest) = all.remove(0);
        std::fs::remove_dir_all(&oldest).map_err(io_error(&oldest))?;
    }
    Ok(final_dir)
}

/// The file in a checkpoint listing every other file's size and CRC-32.
const CHECKSUMS: &str = "checksums.json";

/// Size and CRC-32 of one checkpoint file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

fn file_sum(path: &Path) -> Result<FileSum, TrainError> {
    let data = std::fs::read(path).map_err(io_error(path))?;
    Ok(FileSum {
        bytes: data.len() as u64,
        crc32: crc32fast::hash(&data),
    })
}

/// Sums of every file in checkpoint directory `dir` but the list itself, by file name.
fn checksums(dir: &Path) -> Result<std::collections::BTreeMap<String, FileSum>, TrainError> {
    let mut sums = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name != CHECKSUMS && path.is_file() {
            sums.insert(name.to_string(), file_sum(&path)?);
        }
    }
    Ok(sums)
}

/// Check every file of checkpoint `dir` against its recorded size and CRC-32.
pub(crate) fn verify(dir: &Path) -> Result<(), TrainError> {
    let fail = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason: format!(
            "{reason}; the checkpoint is damaged (delete it to resume from the one before)"
        ),
    };
    let list = dir.join(CHECKSUMS);
    // A checkpoint directory is renamed into place whole, so one without the list was written
    // by a qud from before checksums: readable, but nothing to check it against.
    if !list.exists() && dir.join("position.json").is_file() {
        tracing::warn!(
            "{}: written before checkpoints had checksums; its files are not verified",
            dir.display()
        );
        return Ok(());
    }
    let text = std::fs::read_to_string(&list).map_err(|e| fail(format!("{CHECKSUMS}: {e}")))?;
    let recorded: std::collections::BTreeMap<String, FileSum> =
        serde_json::from_str(&text).map_err(|e| fail(format!("{CHECKSUMS}: {e}")))?;
    for (name, want) in &recorded {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(fail(format!("{name} is missing")));
        }
        let got = file_sum(&path)?;
        if got != *want {
            return Err(fail(format!(
                "{name} is {} bytes with CRC-32 {:08x}, written as {} bytes with {:08x}",
                got.bytes, got.crc32, want.bytes, want.crc32
            )));
        }
    }
    Ok(())
}

/// Complete checkpoints, oldest first.
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>, TrainError> {
    let root = directory(out);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&root)
        .map_err(io_error(&root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            p.join("position.json").is_file().then_some((step, p))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The student backbone (eval mode) of checkpoint directory `dir` (`<run>/checkpoints/step-N`),
/// its files verified, built from the run's `config.toml`; for an ArcFace run the training set
/// is opened to size the head the checkpoint also holds. Returns the run's config too. What
/// `qud export --checkpoint` writes out, so any checkpoint can leave qud.
pub fn checkpoint_student(dir: &Path) -> Result<(qud_models::AnyBackbone, Config), TrainError> {
    let fail = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    if !dir.join("position.json").is_file() {
        return Err(fail(
            "not a checkpoint directory (no position.json; expected <run>/checkpoints/step-N)"
                .into(),
        ));
    }
    verify(dir)?;
    let run = dir
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| fail("no run directory above it".into()))?;
    let config = qud_config::ConfigLoader::new()
        .without_env()
        .file(run.join("config.toml"))
        .load()
        .map_err(|e| fail(format!("the run's config.toml: {e}")))?;
    let classes = match config.method.kind {
        qud_config::MethodKind::Arcface => crate::open_dataset(&config)?.num_identities(),
        _ => None,
    };
    let mut build = config.clone();
    build.student.init_weights = None;
    let device = Device::flex();
    // Under the seeding lock, as every model construction in a process that may be training:
    // a lazily initialised parameter drawn outside it shifts another thread's seeded stream.
    let student = crate::seeded(&device, 0, || {
        crate::setup::build_student(&build, classes, &device)?
            .try_load_file(dir.join("student.bpk"))
            .map_err(|e| fail(format!("student: {e}")))
    })?;
    Ok((student.backbone.valid(), config))
}

/// Restored state of a checkpoint.
pub struct Restored {
    pub position: Position,
    pub student: Student,
    pub optim: ModuleOptimizer,
    pub queue: Option<FeatureQueue>,
}

/// Load the newest checkpoint of `out` into `student` / `optim` built for the same config.
pub fn load_latest(
    out: &Path,
    config: &Config,
    student: Student,
    optim: ModuleOptimizer,
    queue_device: &Device,
) -> Result<Restored, TrainError> {
    let (_, dir) = list(out)?.pop().ok_or_else(|| TrainError::Checkpoint {
        path: directory(out),
        reason: "no checkpoint to resume from".into(),
    })?;
    let fail = |reason: String| TrainError::Checkpoint {
        path: dir.clone(),
        reason,
    };
    verify(&dir)?;
    let text = std::fs::read_to_string(dir.join("position.json")).map_err(io_error(&dir))?;
    let position: Position =
        serde_json::from_str(&text).map_err(|e| fail(format!("position.json: {e}")))?;
    position
        .check_resumable(config)
        .map_err(|e| fail(format!("cannot resume: {e}")))?;
    let student = student
        .try_load_file(dir.join("student.bpk"))
        .map_err(|e| fail(format!("student: {e}")))?;
    let optim = optim
        .load(dir.join("optim.bpk"))
        .map_err(|e| fail(format!("optimizer: {e:?}")))?;
    let queue_path = dir.join("queue.bin");
    let queue = if queue_path.is_file() {
        Some(FeatureQueue::load(&queue_path, queue_device)?)
    } else {
        None
    };
    Ok(Restored {
        position,
        student,
        optim,
        queue,
    })
}
