//! The loop, top to bottom: set up, then for every batch one step of the configured method.

use crate::checkpoint::{self, Position};
use crate::objective::Objective;
use crate::optim::{learning_rate, sgd};
use crate::precision::LossScale;
use crate::progress::Progress;
use crate::setup::{build_student, build_teacher, eval_sets, open_dataset, Teacher};
use crate::step::{train_step, StepContext, StepReport, TrainState};
use crate::{io_error, TrainError};
use burn::module::Module;
use burn::tensor::Device;
use qud_backbone::Backbone;
use qud_config::{Config, Precision};
use qud_data::{Batch, Loader};
use qud_eval::SetScore;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// How far to run, and whether to continue an earlier run in the same output directory.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Stop after this many optimisation steps in total (for tests and smoke runs).
    pub max_steps: Option<usize>,
    pub resume: bool,
    /// Set from outside (SIGINT / SIGTERM in `qud train`): the run finishes the current step,
    /// writes a checkpoint and returns, resumable with `resume`.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What a finished (or stopped) run produced.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub output_dir: PathBuf,
    pub steps: usize,
    /// Loss of every step run by this call.
    pub losses: Vec<f32>,
    pub final_eval: Vec<SetScore>,
    pub student_weights: PathBuf,
    /// Wall-clock seconds of every epoch this call finished, from its first batch to the end
    /// of its last step (checkpoint and evaluation included; setup, such as building the
    /// teacher cache, not).
    pub epoch_seconds: Vec<f64>,
}

struct JsonLines(std::fs::File);

impl JsonLines {
    fn open(path: &std::path::Path) -> Result<Self, TrainError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_error(path))?;
        Ok(Self(file))
    }

    fn write(&mut self, row: &impl serde::Serialize) {
        if let Ok(line) = serde_json::to_string(row) {
            let _ = writeln!(self.0, "{line}");
        }
    }
}

/// Train as `config` says, writing everything under `config.run.output_dir`: set up, then for
/// every batch one [`train_step`] followed by the loop's duties (log, checkpoint, evaluate, stop).
pub fn train(config: &Config, options: &TrainOptions) -> Result<TrainReport, TrainError> {
    let Setup {
        mut run,
        devices,
        teacher,
        teacher_replicas,
        cache,
        mut state,
        mut position,
    } = prepare(config, options)?;
    let context = StepContext {
        devices: &devices,
        teacher: teacher.as_ref(),
        teacher_replicas: &teacher_replicas,
        cache: cache.as_ref(),
        grad_clip: config.optim.grad_clip,
        compute_dtype: crate::precision::compute_dtype(config.run.precision),
    };
    let total_steps = config.optim.epochs * run.steps_per_epoch;
    let progress = Progress::new(position.step, total_steps, config.optim.batch_size, "img");
    let (mut timer, mut since_log) = (Instant::now(), 0usize);
    let (mut losses, mut epoch_seconds, mut final_eval) = (Vec::new(), Vec::new(), Vec::new());
    let start_epoch = position.epoch;
    'epochs: for epoch in start_epoch..config.optim.epochs {
        let epoch_start = Instant::now();
        let first_batch = if epoch == start_epoch {
            position.batch
        } else {
            0
        };
        let mut skipped_samples = 0usize;
        for (b, batch) in run.loader.epoch(epoch, first_batch).enumerate() {
            let batch = run.usable(batch?, epoch, first_batch + b, &mut skipped_samples)?;
            let step = position.step;
            let lr = learning_rate(&config.optim, epoch, step, run.steps_per_epoch);
            let want_similarities = since_log + 1 >= config.run.log_every;
            let (next, done) = train_step(state, &context, &batch, lr, step, want_similarities)
                .map_err(|e| run.name_last_checkpoint(e))?;
            state = next;
            losses.push(done.loss);
            let epoch_done = first_batch + b + 1 == run.steps_per_epoch;
            position = match epoch_done {
                true => Position::new(config, step + 1, epoch + 1, 0),
                false => Position::new(config, step + 1, epoch, first_batch + b + 1),
            };
            if progress.is_drawn() {
                let detail = format!("epoch {epoch} loss {:.4}", done.loss);
                progress.draw(step + 1, "train", &detail);
            }
            since_log += 1;
            if since_log >= config.run.log_every {
                let rate = (since_log * batch.len()) as f64 / timer.elapsed().as_secs_f64();
                run.log_step(step + 1, epoch, lr, &done, rate);
                (timer, since_log) = (Instant::now(), 0);
            }
            if epoch_done && skipped_samples > 0 {
                tracing::warn!("epoch {epoch}: {skipped_samples} undecodable samples skipped");
                run.metrics.write(&crate::metrics::SkippedRow {
                    epoch,
                    skipped_samples,
                });
            }
            let stop = run.stop_requested(step + 1);
            run.checkpoint(&mut position, &state, epoch_done || stop.is_some())?;
            if let Some(scores) =
                run.evaluate_if_due(&state.student, step + 1, epoch, epoch_done)?
            {
                final_eval = scores;
            }
            if epoch_done {
                epoch_seconds.push(epoch_start.elapsed().as_secs_f64());
            }
            if let Some(why) = stop {
                tracing::info!(
                    "stopping after step {} {why}; checkpoint {} (continue with --resume)",
                    step + 1,
                    run.last_checkpoint
                );
                break 'epochs;
            }
        }
    }
    let student_weights = run.finish(&state.student, &final_eval)?;
    Ok(TrainReport {
        output_dir: run.out,
        steps: position.step,
        losses,
        final_eval,
        student_weights,
        epoch_seconds,
    })
}

/// A run ready for its first step.
struct Setup<'a> {
    run: Run<'a>,
    devices: Vec<Device>,
    teacher: Option<Teacher>,
    /// A copy of a backbone teacher for each data-parallel device other than the main one.
    teacher_replicas: Vec<Option<Teacher>>,
    cache: Option<crate::TeacherCache>,
    state: TrainState,
    position: Position,
}

/// What the loop keeps besides the training state: data, outputs, logs and evaluation sets.
struct Run<'a> {
    config: &'a Config,
    options: &'a TrainOptions,
    /// The main device: evaluation runs there.
    device: Device,
    out: PathBuf,
    loader: Loader,
    steps_per_epoch: usize,
    eval_sets: Vec<qud_eval::PairSet>,
    metrics: JsonLines,
    eval_log: JsonLines,
    /// The same scalars for TensorBoard (`<out>/tensorboard/`); `None` when it cannot be written.
    tensorboard: Option<crate::tensorboard::EventWriter>,
    last_checkpoint: String,
    reported_bad: std::collections::HashSet<usize>,
}

/// Validate, create the output directory, open the data, build the teacher and the student (or
/// resume them from the newest checkpoint), and the teacher cache.
fn prepare<'a>(config: &'a Config, options: &'a TrainOptions) -> Result<Setup<'a>, TrainError> {
    config
        .validate()
        .map_err(qud_config::ConfigError::Invalid)?;
    let out = config.run.output_dir.clone();
    std::fs::create_dir_all(&out).map_err(io_error(&out))?;
    if !options.resume && !checkpoint::list(&out)?.is_empty() {
        return Err(TrainError::OutputInUse(out));
    }
    config.write_toml(&out.join("config.toml"))?;

    let devices = crate::setup::run_devices(config)?;
    let device = devices[0].clone();
    if devices.len() > 1 {
        tracing::info!(
            "data parallel over {} devices {:?}: BatchNorm statistics per device, as PyTorch DDP",
            devices.len(),
            config.run.devices
        );
        if devices[1..].contains(&device) {
            tracing::warn!("run.devices names one device more than once: its replicas give a multi-device run's numerics, not its speed");
        }
    }
    let dataset = open_dataset(config)?;
    tracing::info!("data: {}", dataset.describe());
    let loader = Loader::new(dataset.clone(), crate::setup::loader_options(config));
    let steps_per_epoch = loader.batches_per_epoch();
    if steps_per_epoch == 0 {
        return Err(TrainError::BatchLargerThanData {
            batch_size: config.optim.batch_size,
            samples: dataset.len(),
        });
    }
    let mut objective = Objective::from_config(config, &device);
    let (teacher, student) =
        crate::setup::seeded(&device, config.run.seed, || -> Result<_, TrainError> {
            let teacher = match objective.needs_teacher() {
                true => Some(build_teacher(config, &device)?),
                false => None,
            };
            let train_device = device.clone().autodiff();
            let student = build_student(config, dataset.num_identities(), &train_device)?;
            Ok((teacher, crate::setup::initialize_now(student)))
        })?;
    crate::precision::check_supported(config.run.precision, &devices)?;
    let teacher_replicas: Vec<Option<Teacher>> = devices
        .iter()
        .enumerate()
        .map(|(rank, d)| match &teacher {
            Some(t) if rank > 0 && *d != device => t.replica(d),
            _ => None,
        })
        .collect();
    tracing::info!(
        "student {} ({} parameters), method {:?}, {} steps per epoch",
        student.backbone.arch(),
        qud_backbone::num_parameters(&student.backbone),
        config.method.kind,
        steps_per_epoch
    );
    let mut loss_scale = (config.run.precision == Precision::F16).then(LossScale::new);
    let (student, optim, position) = if options.resume {
        let restored = checkpoint::load_latest(&out, config, student, sgd(&config.optim), &device)?;
        tracing::info!("resuming at step {}", restored.position.step);
        if loss_scale.is_some() {
            loss_scale = restored.position.loss_scale.or(loss_scale);
        }
        objective.restore_queue(restored.queue)?;
        (restored.student, restored.optim, restored.position)
    } else {
        (student, sgd(&config.optim), Position::new(config, 0, 0, 0))
    };
    let cache = match &teacher {
        Some(teacher) => crate::setup::teacher_cache(config, dataset.as_ref(), teacher, &device)?,
        None => None,
    };
    let run = Run {
        config,
        options,
        device: device.clone(),
        eval_sets: eval_sets(config)?,
        metrics: JsonLines::open(&out.join("metrics.jsonl"))?,
        eval_log: JsonLines::open(&out.join("eval.jsonl"))?,
        tensorboard: crate::tensorboard::EventWriter::create(&out.join("tensorboard"))
            .map_err(|e| tracing::warn!("no TensorBoard events in {}: {e}", out.display()))
            .ok(),
        out,
        loader,
        steps_per_epoch,
        last_checkpoint: String::from("(none yet)"),
        reported_bad: Default::default(),
    };
    Ok(Setup {
        run,
        devices,
        teacher,
        teacher_replicas,
        cache,
        state: TrainState {
            student,
            optim,
            objective,
            loss_scale,
        },
        position,
    })
}

impl Run<'_> {
    /// The batch, its undecodable samples warned about once per run and counted; an error when
    /// nothing of it could be decoded.
    fn usable(
        &mut self,
        batch: Batch,
        epoch: usize,
        index: usize,
        skipped: &mut usize,
    ) -> Result<Batch, TrainError> {
        for (sample, why) in &batch.skipped {
            if self.reported_bad.insert(*sample) {
                tracing::warn!("skipping sample {sample}: {why}");
            }
        }
        *skipped += batch.skipped.len();
        if batch.is_empty() {
            return Err(TrainError::UndecodableBatch {
                epoch,
                batch: index,
            });
        }
        Ok(batch)
    }

    /// A step's error, with the checkpoint to go back to where that helps.
    fn name_last_checkpoint(&self, error: TrainError) -> TrainError {
        match error {
            TrainError::NonFinite { step, value, .. } => TrainError::NonFinite {
                step,
                value,
                last_checkpoint: self.last_checkpoint.clone(),
            },
            other => other,
        }
    }

    fn log_step(&mut self, step: usize, epoch: usize, lr: f64, done: &StepReport, rate: f64) {
        let (loss, grad_norm) = (done.loss, done.grad_norm);
        let (pos, neg) = done.similarities.unzip();
        tracing::info!("epoch {epoch} step {step} loss {loss:.4} lr {lr:.5} |g| {grad_norm:.3} {rate:.1} img/s");
        self.metrics.write(&crate::metrics::StepRow {
            step,
            epoch,
            lr,
            loss,
            grad_norm,
            positive_similarity: pos,
            negative_similarity: neg,
            samples_per_s: rate,
        });
        let mut scalars = vec![
            ("train/loss", loss as f64),
            ("train/lr", lr),
            ("train/grad_norm", grad_norm),
            ("train/samples_per_s", rate),
        ];
        scalars.extend(pos.map(|p| ("train/positive_similarity", p as f64)));
        scalars.extend(neg.map(|n| ("train/negative_similarity", n as f64)));
        self.tensorboard_write(step, &scalars);
    }

    /// Scalars to the TensorBoard file; a failure is warned about once and ends the file.
    fn tensorboard_write(&mut self, step: usize, scalars: &[(&str, f64)]) {
        if let Some(writer) = &mut self.tensorboard {
            if let Err(e) = writer.scalars(step, scalars) {
                tracing::warn!("TensorBoard events stop: {}: {e}", writer.path().display());
                self.tensorboard = None;
            }
        }
    }

    /// Why the run stops after `steps` steps, if it does: a signal, or `max_steps`.
    fn stop_requested(&self, steps: usize) -> Option<&'static str> {
        let interrupted = self
            .options
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        if interrupted {
            Some("on a signal")
        } else if self.options.max_steps.is_some_and(|m| steps >= m) {
            Some("as asked")
        } else {
            None
        }
    }

    /// Write a checkpoint when `due` or every `run.checkpoint_every` steps.
    fn checkpoint(
        &mut self,
        position: &mut Position,
        state: &TrainState,
        due: bool,
    ) -> Result<(), TrainError> {
        let every = self.config.run.checkpoint_every;
        if !(due || every > 0 && position.step.is_multiple_of(every)) {
            return Ok(());
        }
        position.loss_scale = state.loss_scale;
        let queue = state.objective.queue();
        let keep = self.config.run.keep_checkpoints;
        let dir = checkpoint::save(
            &self.out,
            position,
            &state.student,
            &state.optim,
            queue,
            keep,
        )?;
        self.last_checkpoint = dir.display().to_string();
        Ok(())
    }

    /// Evaluate at the end of every `eval.every_epochs`-th and of the last epoch, and every
    /// `eval.every_steps` steps; log to eval.jsonl and keep best.json.
    fn evaluate_if_due(
        &mut self,
        student: &crate::Student,
        step: usize,
        epoch: usize,
        epoch_done: bool,
    ) -> Result<Option<Vec<SetScore>>, TrainError> {
        let eval = &self.config.eval;
        let epoch_due = epoch_done
            && (epoch + 1 == self.config.optim.epochs
                || eval.every_epochs > 0 && (epoch + 1).is_multiple_of(eval.every_epochs));
        let step_due = eval.every_steps > 0 && step.is_multiple_of(eval.every_steps);
        if self.eval_sets.is_empty() || !(epoch_due || step_due) {
            return Ok(None);
        }
        let mut model = student.backbone.valid();
        model.fold_batchnorm();
        let scores: Vec<SetScore> = self
            .eval_sets
            .iter()
            .map(|set| qud_eval::evaluate(&model, set, eval.batch_size, &self.device))
            .collect();
        for s in &scores {
            let (accuracy, std) = (100.0 * s.scores.accuracy, 100.0 * s.scores.accuracy_std);
            tracing::info!(
                "eval step {step}: {} accuracy {accuracy:.2}% (+-{std:.2}) xnorm {:.3}",
                s.name,
                s.xnorm
            );
            let finite = |v: f64| v.is_finite().then_some(v);
            self.eval_log.write(&crate::metrics::EvalRow {
                step,
                epoch,
                set: s.name.clone(),
                accuracy: s.scores.accuracy,
                accuracy_std: s.scores.accuracy_std,
                val: finite(s.scores.val),
                far: finite(s.scores.far),
                xnorm: s.xnorm,
            });
            let set = &s.name;
            let mut scalars = vec![
                (format!("eval/{set}/accuracy"), s.scores.accuracy),
                (format!("eval/{set}/xnorm"), s.xnorm),
            ];
            scalars.extend(finite(s.scores.val).map(|v| (format!("eval/{set}/val"), v)));
            let scalars: Vec<(&str, f64)> = scalars.iter().map(|(t, v)| (t.as_str(), *v)).collect();
            self.tensorboard_write(step, &scalars);
        }
        record_best(&self.out, &scores, step)?;
        Ok(Some(scores))
    }

    /// The student's weights under PyTorch's names, and the report; returns the weights' path.
    fn finish(
        &self,
        student: &crate::Student,
        final_eval: &[SetScore],
    ) -> Result<PathBuf, TrainError> {
        let student_weights = self.out.join("student.safetensors");
        let backbone = student.backbone.valid();
        qud_models::save_safetensors(&backbone, &student_weights)?;
        if self.config.run.export_onnx {
            let onnx = self.out.join("student.onnx");
            let source = qud_onnx::ExportSource::file(&student_weights).map_err(io_error(&onnx))?;
            qud_onnx::export_onnx(&backbone, &source, &onnx, qud_onnx::DEFAULT_OPSET)?;
            tracing::info!("student exported to {}", onnx.display());
        }
        let title = format!(
            "qud run {}: {} student, {:?}",
            self.out.display(),
            self.config.student.arch,
            self.config.method.kind
        );
        let report = crate::report::render(&self.out, &title, final_eval);
        write_atomic(&self.out.join("report.html"), report.as_bytes())?;
        Ok(student_weights)
    }
}

/// Keep `<out>/best.json`: per verification set, the best accuracy so far and its step. Read back
/// from the file, so a resumed run continues the same record.
fn record_best(out: &std::path::Path, scores: &[SetScore], step: usize) -> Result<(), TrainError> {
    let path = out.join("best.json");
    let mut best: serde_json::Map<String, serde_json::Value> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut changed = false;
    for s in scores {
        let previous = best
            .get(&s.name)
            .and_then(|b| b["accuracy"].as_f64())
            .unwrap_or(f64::MIN);
        if s.scores.accuracy > previous {
            tracing::info!(
                "new best on {}: {:.2}% at step {step}",
                s.name,
                100.0 * s.scores.accuracy
            );
            best.insert(
                s.name.clone(),
                json!({"accuracy": s.scores.accuracy, "accuracy_std": s.scores.accuracy_std, "step": step}),
            );
            changed = true;
        }
    }
    if changed {
        write_atomic(&path, &serde_json::to_vec_pretty(&best).expect("json"))?;
    }
    Ok(())
}

/// Write `path` through `<path>.tmp` and a rename, so readers never see half a file.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_error(path))
}
