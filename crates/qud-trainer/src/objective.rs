//! The training objectives: what a step computes from the student's and the teacher's features.
//!
//! - `qud`: InfoNCE against the teacher feature and the queue, then enqueue the teacher features
//!   (qud-loss, qud-queue).
//! - `mse`: MSE between normalised student and teacher features.
//! - `arcface`: supervised additive angular margin (Deng et al., CVPR 2019) over identity labels,
//!   with a learned class-centre matrix; no teacher.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

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
    /// elsewhere. When `theta + m` would pass pi the target logit falls back to
    /// `cos - m sin(m)` (insightface's `th`/`mm` guard keeps the logit monotone).
    pub fn loss(&self, features: Tensor<2>, labels: &[u32], margin: f64, scale: f64) -> Tensor<1> {
        let device = features.device();
        let [batch, _] = features.dims();
        let classes = self.weight.dims()[0];
        let cosine = qud_loss::l2_normalize(features)
            .matmul(qud_loss::l2_normalize(self.weight.val()).transpose())
            .clamp(-1.0 + 1e-7, 1.0 - 1e-7);
        let one_hot: Vec<f32> = labels
            .iter()
            .flat_map(|&l| (0..classes).map(move |c| if c as u32 == l { 1.0 } else { 0.0 }))
            .collect();
        let one_hot = Tensor::<2>::from_data(TensorData::new(one_hot, [batch, classes]), &device);
        let sine = (cosine.clone().powi_scalar(2).neg() + 1.0).sqrt();
        let with_margin = cosine.clone() * margin.cos() - sine * margin.sin();
        let threshold = (std::f64::consts::PI - margin).cos();
        let fallback = cosine.clone() - margin * margin.sin();
        let target = with_margin.mask_where(cosine.clone().lower_equal_elem(threshold), fallback);
        let logits = (cosine.clone() + (target - cosine) * one_hot.clone()) * scale;
        (log_softmax(logits, 1) * one_hot).sum_dim(1).mean().neg()
    }
}
