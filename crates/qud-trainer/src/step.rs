//! One training step, everything it does and nothing else: the student's forward on every
//! device's piece of the batch, the objective's loss against the queue as it was before the batch,
//! backward, the gradients summed onto the main device, the f16 loss scale undone, the global
//! gradient norm clipped, the loss scale updated, SGD, and the objective's state advanced (QUD
//! enqueues the batch's teacher features). The loop (`run.rs`), the parity tests and the
//! benchmarks all step through [`train_step`].

use crate::objective::Objective;
use crate::optim::{clip_global_norm, scale_gradients};
use crate::parallel;
use crate::precision::LossScale;
use crate::setup::{Student, Teacher};
use crate::{TeacherCache, TrainError};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use qud_backbone::{cast_trainable, Backbone, FaceEmbedder};
use qud_data::Batch;
use qud_loss::l2_normalize;

/// What a step changes: the student, the optimizer's momentum, the objective's state (the queue)
/// and the f16 loss scale.
pub struct TrainState {
    pub student: Student,
    pub optim: ModuleOptimizer,
    pub objective: Objective,
    pub loss_scale: Option<LossScale>,
}

/// What a step reads and never changes.
pub struct StepContext<'a> {
    /// The data-parallel devices; the first is the main one, which holds the student, the
    /// optimizer state and the queue.
    pub devices: &'a [Device],
    /// The frozen teacher on the main device, and a copy per other device where it needs one.
    pub teacher: Option<&'a Teacher>,
    pub teacher_replicas: &'a [Option<Teacher>],
    /// The teacher's features, when they are read from the cache instead of computed.
    pub cache: Option<&'a TeacherCache>,
    /// `optim.grad_clip`: the largest global gradient L2 norm (0: no clipping).
    pub grad_clip: f64,
    /// The student's compute dtype under mixed precision.
    pub compute_dtype: Option<FloatDType>,
}

impl<'a> StepContext<'a> {
    /// One device, f32, no cache: what a test or a benchmark drives.
    pub fn single(device: &'a [Device], teacher: Option<&'a Teacher>, grad_clip: f64) -> Self {
        Self {
            devices: device,
            teacher,
            teacher_replicas: &[],
            cache: None,
            grad_clip,
            compute_dtype: None,
        }
    }
}

/// What a step measured.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    /// The batch's mean loss.
    pub loss: f32,
    /// The global gradient norm of the backbone before clipping.
    pub grad_norm: f64,
    /// Mean cosine similarity to the positive and to the queue (QUD, when asked for).
    pub similarities: Option<(f32, f32)>,
    /// False when f16 gradients overflowed and SGD was skipped.
    pub applied: bool,
}

/// One optimisation step at learning rate `lr` on `batch`, global step `step` (0-based, for
/// messages). A non-finite loss stops before anything but BatchNorm statistics has changed.
pub fn train_step(
    mut state: TrainState,
    context: &StepContext<'_>,
    batch: &Batch,
    lr: f64,
    step: usize,
    want_similarities: bool,
) -> Result<(TrainState, StepReport), TrainError> {
    let devices = context.devices;
    let main = &devices[0];
    // One device steps on the batch as it is; several on consecutive pieces of a copy.
    let split;
    let pieces: Vec<&Batch> = if devices.len() == 1 {
        vec![batch]
    } else {
        split = batch.clone().split(devices.len());
        split.iter().collect()
    };
    let negatives = state.objective.negatives();
    let loss_scale = state.loss_scale.map_or(1.0, |l| l.scale);
    let (student, objective) = (&state.student, &state.objective);
    let shards = parallel::for_each_rank(devices, |rank| {
        let piece = pieces[rank];
        if piece.is_empty() {
            return Ok(None);
        }
        let replica;
        let model = if rank == 0 {
            student
        } else {
            replica = parallel::replica(student, &devices[rank]);
            &replica
        };
        let teacher = context
            .teacher_replicas
            .get(rank)
            .and_then(Option::as_ref)
            .or(context.teacher);
        shard_step(Shard {
            context,
            objective,
            model,
            teacher,
            device: &devices[rank],
            piece,
            negatives: negatives.clone(),
            weight: piece.len() as f64 / batch.len() as f64,
            loss_scale,
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
    let loss: f32 = shards.iter().map(|s| s.loss).sum();
    if !loss.is_finite() {
        return Err(TrainError::NonFinite {
            step,
            value: loss,
            last_checkpoint: String::new(),
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
    let mut keys = Vec::new();
    let mut parts = Vec::new();
    for shard in shards {
        keys.extend(shard.keys);
        parts.push(shard.grads);
    }
    state.objective.advance(keys)?;
    let grads = parallel::sum_gradients(&state.student, parts, main);
    let grads = match state.loss_scale {
        Some(l) => scale_gradients(&state.student, grads, 1.0 / l.scale),
        None => grads,
    };
    // The backbone's gradients only, as arcface_torch clips (`backbone.parameters()`); an
    // ArcFace head's class centres are stepped unclipped. QUD and MSE have no head.
    let (grads, grad_norm) = clip_global_norm(&state.student.backbone, grads, context.grad_clip);
    let applied = match state.loss_scale.as_mut() {
        Some(l) => l.update(grad_norm.is_finite()),
        None => true,
    };
    if applied {
        state.student = state.optim.step(lr, state.student, grads);
    } else {
        tracing::warn!(
            "step {}: f16 gradients overflowed; step skipped, loss scale now {}",
            step + 1,
            state.loss_scale.map_or(1.0, |l| l.scale)
        );
    }
    let report = StepReport {
        loss,
        grad_norm,
        similarities,
        applied,
    };
    Ok((state, report))
}

/// What one device needs for its share of a step.
struct Shard<'a> {
    context: &'a StepContext<'a>,
    objective: &'a Objective,
    model: &'a Student,
    teacher: Option<&'a Teacher>,
    device: &'a Device,
    piece: &'a Batch,
    /// The queue before this batch (QUD), on the main device.
    negatives: Option<Tensor<2>>,
    /// This piece's share of the batch: its mean loss counts that much in the batch's mean.
    weight: f64,
    /// The f16 loss scale (1 otherwise): the backward runs on the loss times this.
    loss_scale: f64,
    want_similarities: bool,
}

/// What one device's share of a step produced.
struct ShardStep {
    /// The loss of the piece, weighted by its share.
    loss: f32,
    share: f32,
    grads: (GradientsParams, Device),
    keys: Option<Tensor<2>>,
    similarities: Option<(f32, f32)>,
}

/// One device's share of a step: the student's features of its piece, the objective's loss
/// (weighted by the piece's share of the batch) and its gradients.
fn shard_step(s: Shard<'_>) -> Result<ShardStep, TrainError> {
    let x = s.piece.tensor(s.device);
    let keys = if s.objective.needs_teacher() {
        Some(teacher_features(&s, x.clone())?)
    } else {
        None
    };
    let features = match s.context.compute_dtype {
        None => s.model.backbone.forward(x.autodiff()),
        Some(dtype) => cast_trainable(s.model.backbone.clone(), dtype)
            .forward(x.cast(dtype).autodiff())
            .cast(FloatDType::F32),
    };
    let out = s.objective.shard_loss(
        features,
        keys,
        s.negatives.map(|n| n.to_device(s.device)),
        || {
            s.piece
                .labels()
                .ok_or(TrainError::NoLabels("the batch has unlabelled samples"))
        },
        s.model.head.as_ref(),
        s.want_similarities,
    )?;
    // One device: the loss as it is (bit for bit the single-device run).
    let loss = if s.weight == 1.0 {
        out.loss
    } else {
        out.loss.mul_scalar(s.weight)
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
        keys: out.keys,
        similarities: out.similarities,
    })
}

/// The teacher's normalised features of the piece: from the cache, or computed.
fn teacher_features(s: &Shard<'_>, x: Tensor<4>) -> Result<Tensor<2>, TrainError> {
    let teacher = s.teacher.ok_or(TrainError::NoTeacher)?;
    Ok(match s.context.cache {
        Some(cache) => Tensor::from_data(
            TensorData::new(
                cache.rows(&s.piece.indices, &s.piece.flips)?,
                [s.piece.len(), teacher.output_dim()],
            ),
            s.device,
        ),
        None => l2_normalize(teacher.embed_faces(x)),
    })
}
