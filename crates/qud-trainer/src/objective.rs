//! The training objectives: what a step computes from the student's and the teacher's features,
//! and the state each one carries from step to step.
//!
//! - `qud`: InfoNCE against the teacher feature and the queue as it was before the batch, then
//!   the batch's teacher features enqueued (qud-loss, qud-queue). Kolf, Damer, Boutros, "Unlocking
//!   the Power of Unlabeled Data: Unsupervised Knowledge Distillation for Face Recognition"
//!   (BMVC 2024), <https://github.com/jankolf/QUD>.
//! - `mse`: MSE between normalised student and teacher features.
//! - `arcface`: supervised additive angular margin (Deng et al., CVPR 2019) over identity labels,
//!   with a learned class-centre matrix (the student's `head`, trained with it); no teacher.

use crate::TrainError;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use qud_config::{Config, MethodKind};
use qud_queue::FeatureQueue;

/// The configured method with its state: QUD owns its queue.
// One per run, moved once per step with the rest of the training state: the size is no cost.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Objective {
    Qud { queue: FeatureQueue, tau: f64 },
    Mse { scale: f64 },
    ArcFace { margin: f64, scale: f64 },
}

/// One shard's loss, and what the step needs from it besides the gradient.
pub(crate) struct ShardLoss {
    pub loss: Tensor<1>,
    /// The teacher's features of the shard, to enqueue (QUD).
    pub keys: Option<Tensor<2>>,
    /// Mean cosine similarity to the positive and to the queue (QUD, when asked).
    pub similarities: Option<(f32, f32)>,
}

impl Objective {
    /// The objective `config.method` names; QUD's queue starts as `method.queue_size` random
    /// unit rows drawn from `run.seed`, on `device`.
    pub fn from_config(config: &Config, device: &Device) -> Self {
        let method = &config.method;
        match method.kind {
            MethodKind::Qud => Objective::Qud {
                queue: FeatureQueue::new(
                    method.queue_size,
                    config.student.embedding_dim,
                    method.queue_kind,
                    config.run.seed,
                    device,
                ),
                tau: method.tau,
            },
            MethodKind::Mse => Objective::Mse {
                scale: method.mse_scale,
            },
            MethodKind::Arcface => Objective::ArcFace {
                margin: method.margin,
                scale: method.scale,
            },
        }
    }

    /// Whether the step needs the teacher's features of the batch.
    pub fn needs_teacher(&self) -> bool {
        !matches!(self, Objective::ArcFace { .. })
    }

    pub fn queue(&self) -> Option<&FeatureQueue> {
        match self {
            Objective::Qud { queue, .. } => Some(queue),
            _ => None,
        }
    }

    /// The queue to continue from (a checkpoint's): QUD's state is its queue, and resuming one
    /// without it would silently restart from random negatives.
    pub fn restore_queue(&mut self, restored: Option<FeatureQueue>) -> Result<(), TrainError> {
        match (self, restored) {
            (Objective::Qud { queue, .. }, Some(restored)) => {
                *queue = restored;
                Ok(())
            }
            (Objective::Qud { .. }, None) => Err(TrainError::NoQueueInCheckpoint),
            _ => Ok(()),
        }
    }

    /// The negatives of this step: the queue as it is before the batch (QUD).
    pub(crate) fn negatives(&self) -> Option<Tensor<2>> {
        self.queue().map(FeatureQueue::negatives)
    }

    /// The loss of one shard from the student's (unnormalised) `features`; `keys` are the
    /// teacher's normalised features of the shard when [`Self::needs_teacher`].
    pub(crate) fn shard_loss(
        &self,
        features: Tensor<2>,
        keys: Option<Tensor<2>>,
        negatives: Option<Tensor<2>>,
        labels: impl FnOnce() -> Result<Vec<u32>, TrainError>,
        head: Option<&ArcFaceHead>,
        want_similarities: bool,
    ) -> Result<ShardLoss, TrainError> {
        let teacher = || {
            keys.clone()
                .expect("distillation has the teacher's features")
        };
        Ok(match self {
            Objective::Qud { tau, .. } => {
                let k = teacher();
                let negatives = negatives.expect("QUD's negatives");
                let out = qud_loss::info_nce(
                    qud_loss::l2_normalize(features),
                    k.clone(),
                    negatives,
                    *tau,
                );
                let similarities = want_similarities
                    .then(|| (out.positive_similarity(), out.negative_similarity()));
                ShardLoss {
                    loss: out.loss,
                    keys: Some(k),
                    similarities,
                }
            }
            Objective::Mse { scale } => ShardLoss {
                loss: qud_loss::feature_mse(qud_loss::l2_normalize(features), teacher()) * *scale,
                keys: None,
                similarities: None,
            },
            Objective::ArcFace { margin, scale } => {
                let head = head.ok_or(TrainError::NoLabels(
                    "the student was built without a class-centre head",
                ))?;
                let labels = labels()?;
                let classes = head.weight.dims()[0];
                // A label past the head would match no class centre: a zero one-hot row, a
                // loss that ignores the sample, and no error anywhere else.
                if let Some(&label) = labels.iter().find(|&&l| l as usize >= classes) {
                    return Err(TrainError::LabelOutOfRange { label, classes });
                }
                ShardLoss {
                    loss: head.loss(features, &labels, *margin, *scale),
                    keys: None,
                    similarities: None,
                }
            }
        })
    }

    /// What the objective keeps of a finished step: QUD enqueues the batch's teacher features
    /// (all shards', in batch order), overwriting the oldest.
    pub(crate) fn advance(&mut self, keys: Vec<Tensor<2>>) -> Result<(), TrainError> {
        if let Objective::Qud { queue, .. } = self {
            let device = queue.device();
            let keys: Vec<Tensor<2>> = keys.into_iter().map(|k| k.to_device(&device)).collect();
            queue.enqueue(Tensor::cat(keys, 0))?;
        }
        Ok(())
    }
}

/// Class centres of the ArcFace head, `[classes, dim]`, as insightface's `PartialFC` weight
/// (normal init, std 0.01).
#[derive(Module, Debug)]
pub struct ArcFaceHead {
    pub weight: Param<Tensor<2>>,
}

impl ArcFaceHead {
    pub fn new(classes: usize, dim: usize, device: &Device) -> Self {
        Self {
            weight: Initializer::Normal {
                mean: 0.0,
                std: 0.01,
            }
            .init([classes, dim], device),
        }
    }

    /// Mean cross-entropy of `s * cos(theta + m)` logits for the target class and `s * cos`
    /// elsewhere, as insightface's arcface_torch computes them (`PartialFC_V2` at sample rate 1:
    /// the cosines clamped to [-1, 1]; `CombinedMarginLoss` with m1 = 1, m3 = 0): the margin is
    /// added under `torch.no_grad()`, so the backward passes through the target logit as if it
    /// were the cosine itself (straight through), and `theta + m` past pi wraps as `cos` does.
    /// <https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch>
    pub fn loss(&self, features: Tensor<2>, labels: &[u32], margin: f64, scale: f64) -> Tensor<1> {
        let device = features.device();
        let [batch, _] = features.dims();
        let classes = self.weight.dims()[0];
        let cosine = qud_loss::l2_normalize(features)
            .matmul(qud_loss::l2_normalize(self.weight.val()).transpose())
            .clamp(-1.0, 1.0);
        let one_hot: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..classes).map(move |c| if c as u32 == l { 1.0 } else { 0.0 }))
            .collect();
        let one_hot = Tensor::<2>::from_data(TensorData::new(one_hot, [batch, classes]), &device);
        // cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), sin(theta) >= 0 on [0, pi].
        let c = cosine.clone().detach();
        let sine = (c.clone().powi_scalar(2).neg() + 1.0).clamp_min(0.0).sqrt();
        let shifted = c.clone() * margin.cos() - sine * margin.sin();
        let margin_term = ((shifted - c) * one_hot.clone()).detach();
        let logits = (cosine + margin_term) * scale;
        (log_softmax(logits, 1) * one_hot).sum_dim(1).mean().neg()
    }
}
