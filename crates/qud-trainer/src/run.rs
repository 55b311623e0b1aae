//! The loop, top to bottom: set up, then for every batch one step of the configured method.

use crate::checkpoint::{self, Position};
use crate::optim::{clip_global_norm, learning_rate, scale_gradients, sgd};
use crate::parallel;
use crate::precision::LossScale;
use crate::progress::Progress;
use crate::setup::{build_student, build_teacher, eval_sets, open_dataset, Teacher};
use crate::{io_error, TrainError};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use qud_backbone::{cast_trainable, Backbone, FaceEmbedder};
use qud_config::{Config, MethodKind, Precision};
use qud_data::{Batch, Loader};
use qud_eval::SetScore;
use qud_loss::{feature_mse, info_nce, l2_normalize};
use qud_queue::FeatureQueue;
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

    fn write(&mut self, value: serde_json::Value) {
        let _ = writeln!(self.0, "{value}");
    }
}

/// Train as `config` says, writing everything under `config.run.output_dir`.
pub fn train(config: &Config, options: &TrainOptions) -> Result<TrainReport, TrainError> {
    config
        .validate()
        .map_err(|e| TrainError::Config(qud_config::ConfigError::Invalid(e).to_string()))?;
    let out = config.run.output_dir.clone();
    std::fs::create_dir_all(&out).map_err(io_error(&out))?;
    if !options.resume && !checkpoint::list(&out)?.is_empty() {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints: resume it (--resume) or choose another run.output_dir",
            out.display()
        )));
    }
    config
        .write_toml(&out.join("config.toml"))
        .map_err(|e| TrainError::Config(e.to_string()))?;

    let devices = crate::setup::run_devices(config)?;
    let device = devices[0].clone();
    let train_device = device.clone().autodiff();
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
        return Err(TrainError::Config(format!(
            "optim.batch_size = {} exceeds the {} training samples",
            config.optim.batch_size,
            dataset.len()
        )));
    }
    let method = config.method.kind;
    let (teacher, student) =
        crate::setup::seeded(&device, config.run.seed, || -> Result<_, TrainError> {
            let teacher = match method {
                MethodKind::Qud | MethodKind::Mse => Some(build_teacher(config, &device)?),
                MethodKind::Arcface => None,
            };
            Ok((
                teacher,
                crate::setup::initialize_now(build_student(
                    config,
                    dataset.num_identities(),
                    &train_device,
                )?),
            ))
        })?;
    crate::precision::check_supported(config.run.precision, &devices)?;
    let compute_dtype = crate::precision::compute_dtype(config.run.precision);
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
        method,
        steps_per_epoch
    );
    let queue = (method == MethodKind::Qud).then(|| {
        FeatureQueue::new(
            config.method.queue_size,
            config.student.embedding_dim,
            config.method.queue_kind,
            config.run.seed,
            &device,
        )
    });
    let mut loss_scale = (config.run.precision == Precision::F16).then(LossScale::new);
    let (mut student, mut optim, mut queue, mut position) = if options.resume {
        let restored = checkpoint::load_latest(&out, config, student, sgd(&config.optim), &device)?;
        tracing::info!("resuming at step {}", restored.position.step);
        if loss_scale.is_some() {
            loss_scale = restored.position.loss_scale.or(loss_scale);
        }
        (
            restored.student,
            restored.optim,
            restored.queue.or(queue),
            restored.position,
        )
    } else {
        (
            student,
            sgd(&config.optim),
            queue,
            Position::new(config, 0, 0, 0),
        )
    };
    let cache = match &teacher {
        Some(teacher) => crate::setup::teacher_cache(config, dataset.as_ref(), teacher, &device)?,
        None => None,
    };
    let eval_sets = eval_sets(config)?;
    let mut metrics = JsonLines::open(&out.join("metrics.jsonl"))?;
    let mut eval_log = JsonLines::open(&out.join("eval.jsonl"))?;
    let mut last_checkpoint = String::from("(none yet)");
    let mut losses = Vec::new();
    let mut final_eval = Vec::new();
    let run_eval = |student: &crate::Student, step: usize, epoch: usize, log: &mut JsonLines| {
        let mut model = student.backbone.valid();
        model.fold_batchnorm();
        let scores: Vec<SetScore> = eval_sets
            .iter()
            .map(|set| qud_eval::evaluate(&model, set, config.eval.batch_size, &device))
            .collect();
        for s in &scores {
            tracing::info!(
                "eval step {step}: {} accuracy {:.2}% (+-{:.2}) xnorm {:.3}",
                s.name,
                100.0 * s.scores.accuracy,
                100.0 * s.scores.accuracy_std,
                s.xnorm
            );
            log.write(json!({"step": step, "epoch": epoch, "set": s.name, "accuracy": s.scores.accuracy,
                "accuracy_std": s.scores.accuracy_std, "val": s.scores.val, "far": s.scores.far, "xnorm": s.xnorm}));
        }
        scores
    };

    let start_epoch = position.epoch;
    let mut reported_bad = std::collections::HashSet::new();
    let mut timer = Instant::now();
    let mut since_log = 0usize;
    let progress = Progress::new(
        position.step,
        config.optim.epochs * steps_per_epoch,
        config.optim.batch_size,
        "img",
    );
    let mut epoch_seconds = Vec::new();
    'epochs: for epoch in start_epoch..config.optim.epochs {
        let epoch_start = Instant::now();
        let first_batch = if epoch == start_epoch {
            position.batch
        } else {
            0
        };
        let mut skipped_samples = 0usize;
        for (b, batch) in loader.epoch(epoch, first_batch).into_iter().enumerate() {
            let batch = batch?;
            for (index, why) in &batch.skipped {
                if reported_bad.insert(*index) {
                    tracing::warn!("skipping sample {index}: {why}");
                }
            }
            skipped_samples += batch.skipped.len();
            if batch.is_empty() {
                return Err(TrainError::Config(format!(
                    "epoch {epoch} batch {}: no sample of the batch could be decoded",
                    first_batch + b
                )));
            }
            let step = position.step;
            let lr = learning_rate(&config.optim, epoch, step, steps_per_epoch);
            let want_similarities = since_log + 1 >= config.run.log_every;
            let batch_len = batch.len();
            let pieces = batch.split(devices.len());
            let negatives = queue.as_ref().map(FeatureQueue::negatives);
            let shards = parallel::for_each_rank(&devices, |rank| {
                let piece = &pieces[rank];
                if piece.is_empty() {
                    return Ok(None);
                }
                let replica;
                let model = if rank == 0 {
                    &student
                } else {
                    replica = parallel::replica(&student, &devices[rank]);
                    &replica
                };
                shard_step(ShardInputs {
                    config,
                    model,
                    teacher: teacher_replicas[rank].as_ref().or(teacher.as_ref()),
                    cache: cache.as_ref(),
                    device: &devices[rank],
                    piece,
                    negatives: negatives.clone(),
                    weight: piece.len() as f64 / batch_len as f64,
                    loss_scale: loss_scale.map_or(1.0, |l| l.scale),
                    compute_dtype,
                    want_similarities,
                })
                .map(Some)
            });
            let shards: Vec<ShardStep> = shards
                .into_iter()
                .collect::<Result<Vec<_>, TrainError>>()?
                .into_iter()
                .flatten()
                .collect();
            let loss_value: f32 = shards.iter().map(|s| s.loss).sum();
            if !loss_value.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    value: loss_value,
                    last_checkpoint: last_checkpoint.clone(),
                });
            }
            let similarities = want_similarities
                .then(|| {
                    shards.iter().try_fold((0.0, 0.0), |(p, n), s| {
                        let (sp, sn) = s.similarities?;
                        Some((p + s.share * sp, n + s.share * sn))
                    })
                })
                .flatten();
            if let Some(queue) = queue.as_mut() {
                let keys: Vec<Tensor<2>> = shards
                    .iter()
                    .filter_map(|s| s.keys.clone())
                    .map(|k| k.to_device(&device))
                    .collect();
                queue.enqueue(Tensor::cat(keys, 0))?;
            }
            let grads = parallel::sum_gradients(
                &student,
                shards.into_iter().map(|s| s.grads).collect(),
                &device,
            );
            let grads = match loss_scale {
                Some(l) => scale_gradients(&student, grads, 1.0 / l.scale),
                None => grads,
            };
            let (grads, grad_norm) = clip_global_norm(&student, grads, config.optim.grad_clip);
            let apply = match loss_scale.as_mut() {
                Some(l) => l.update(grad_norm.is_finite()),
                None => true,
            };
            if apply {
                student = optim.step(lr, student, grads);
            } else {
                tracing::warn!(
                    "step {}: f16 gradients overflowed; step skipped, loss scale now {}",
                    step + 1,
                    loss_scale.map_or(1.0, |l| l.scale)
                );
            }
            losses.push(loss_value);

            position = Position::new(config, step + 1, epoch, first_batch + b + 1);
            if progress.is_drawn() {
                let detail = format!("epoch {epoch} loss {loss_value:.4}");
                progress.draw(step + 1, "train", &detail);
            }
            since_log += 1;
            if since_log >= config.run.log_every {
                let rate = (since_log * batch_len) as f64 / timer.elapsed().as_secs_f64();
                let (pos, neg) = similarities.unzip();
                tracing::info!("epoch {epoch} step {} loss {loss_value:.4} lr {lr:.5} |g| {grad_norm:.3} {rate:.1} img/s", step + 1);
                metrics.write(json!({"step": step + 1, "epoch": epoch, "lr": lr, "loss": loss_value,
                    "grad_norm": grad_norm, "positive_similarity": pos, "negative_similarity": neg, "samples_per_s": rate}));
                timer = Instant::now();
                since_log = 0;
            }
            let epoch_done = first_batch + b + 1 == steps_per_epoch;
            if epoch_done && skipped_samples > 0 {
                tracing::warn!("epoch {epoch}: {skipped_samples} undecodable samples skipped");
                metrics.write(json!({"epoch": epoch, "skipped_samples": skipped_samples}));
            }
            if epoch_done {
                position = Position::new(config, step + 1, epoch + 1, 0);
            }
            let every = |n: usize| n > 0 && (step + 1) % n == 0;
            let interrupted = options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
            let stop = interrupted || options.max_steps.is_some_and(|m| step + 1 >= m);
            if epoch_done || stop || every(config.run.checkpoint_every) {
                let keep = config.run.keep_checkpoints;
                position.loss_scale = loss_scale;
                let dir =
                    checkpoint::save(&out, &position, &student, &optim, queue.as_ref(), keep)?;
                last_checkpoint = dir.display().to_string();
            }
            let epoch_eval = epoch_done
                && (epoch + 1 == config.optim.epochs
                    || config.eval.every_epochs > 0 && (epoch + 1) % config.eval.every_epochs == 0);
            if !eval_sets.is_empty() && (epoch_eval || every(config.eval.every_steps)) {
                final_eval = run_eval(&student, step + 1, epoch, &mut eval_log);
                record_best(&out, &final_eval, step + 1)?;
            }
            if epoch_done {
                epoch_seconds.push(epoch_start.elapsed().as_secs_f64());
            }
            if stop {
                tracing::info!(
                    "stopping after step {}{}; checkpoint {last_checkpoint} (continue with --resume)",
                    step + 1,
                    if interrupted { " on a signal" } else { " as asked" }
                );
                break 'epochs;
            }
        }
    }
    let student_weights = out.join("student.safetensors");
    qud_models::save_safetensors(&student.backbone.valid(), &student_weights)?;
    let title = format!(
        "qud run {}: {} student, {:?}",
        out.display(),
        config.student.arch,
        config.method.kind
    );
    let report = crate::report::render(&out, &title, &final_eval);
    write_atomic(&out.join("report.html"), report.as_bytes())?;
    Ok(TrainReport {
        output_dir: out,
        steps: position.step,
        losses,
        final_eval,
        student_weights,
        epoch_seconds,
    })
}

/// What one device needs for its share of a step.
struct ShardInputs<'a> {
    config: &'a Config,
    model: &'a crate::Student,
    teacher: Option<&'a Teacher>,
    cache: Option<&'a crate::TeacherCache>,
    device: &'a Device,
    piece: &'a Batch,
    /// The queue before this batch (QUD), on the main device.
    negatives: Option<Tensor<2>>,
    /// This piece's share of the batch: its mean loss counts that much in the batch's mean.
    weight: f64,
    /// The f16 loss scale (1 otherwise): the backward runs on the loss times this.
    loss_scale: f64,
    /// The student's compute dtype under mixed precision.
    compute_dtype: Option<FloatDType>,
    want_similarities: bool,
}

/// What one device's share of a step produced.
struct ShardStep {
    /// The loss of the piece, weighted by its share.
    loss: f32,
    share: f32,
    grads: (GradientsParams, Device),
    /// The teacher's features of the piece (QUD), to enqueue.
    keys: Option<Tensor<2>>,
    /// Mean cosine similarity to the positive and to the queue (QUD, when logging).
    similarities: Option<(f32, f32)>,
}

/// One device's share of a step: the student's features of its piece, the method's loss
/// (weighted by the piece's share of the batch) and its gradients.
fn shard_step(s: ShardInputs<'_>) -> Result<ShardStep, TrainError> {
    let method = &s.config.method;
    let x = s.piece.tensor(s.device);
    // The teacher's normalised features: from the cache, or computed.
    let teacher_features = |x: Tensor<4>| -> Result<Tensor<2>, TrainError> {
        let teacher = s.teacher.expect("distillation has a teacher");
        Ok(match s.cache {
            Some(cache) => Tensor::from_data(
                TensorData::new(
                    cache.rows(&s.piece.indices, &s.piece.flips)?,
                    [s.piece.len(), teacher.output_dim()],
                ),
                s.device,
            ),
            None => l2_normalize(teacher.embed_faces(x)),
        })
    };
    let features = match s.compute_dtype {
        None => s.model.backbone.forward(x.clone().autodiff()),
        Some(dtype) => cast_trainable(s.model.backbone.clone(), dtype)
            .forward(x.clone().cast(dtype).autodiff())
            .cast(FloatDType::F32),
    };
    let (loss, keys, similarities) = match method.kind {
        MethodKind::Qud => {
            let k = teacher_features(x)?;
            let negatives = s.negatives.expect("QUD has a queue").to_device(s.device);
            let out = info_nce(l2_normalize(features), k.clone(), negatives, method.tau);
            let sims = s
                .want_similarities
                .then(|| (out.positive_similarity(), out.negative_similarity()));
            (out.loss, Some(k), sims)
        }
        MethodKind::Mse => {
            let k = teacher_features(x)?;
            (feature_mse(l2_normalize(features), k), None, None)
        }
        MethodKind::Arcface => {
            let labels = s
                .piece
                .labels()
                .ok_or_else(|| TrainError::Config("arcface needs labelled samples".into()))?;
            let head = s.model.head.as_ref().expect("arcface has a head");
            let loss = head.loss(features, &labels, method.margin, method.scale);
            (loss, None, None)
        }
    };
    // One device: the loss as it is (bit for bit the single-device run).
    let loss = if s.weight == 1.0 {
        loss
    } else {
        loss.mul_scalar(s.weight)
    };
    let value = loss.clone().without_autodiff().into_scalar::<f32>();
    let loss = if s.loss_scale == 1.0 {
        loss
    } else {
        loss.mul_scalar(s.loss_scale)
    };
    let grads = GradientsParams::from_grads(loss.backward(), s.model);
    Ok(ShardStep {
        loss: value,
        share: s.weight as f32,
        grads: (grads, s.device.clone()),
        keys,
        similarities,
    })
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
