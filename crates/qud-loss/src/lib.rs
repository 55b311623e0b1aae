//! QUD's InfoNCE-with-queue loss and the feature-MSE distillation baseline.
//!
//! QUD (Kolf, Damer, Boutros, BMVC 2024): for L2-normalised student features `q`, teacher
//! features `k` of the same images and a queue of `n` earlier teacher features,
//!
//! ```text
//! L = mean_i -log( exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.neg_j / tau)) )
//! ```
//!
//! i.e. cross-entropy with target 0 over the logits `[q.k | q.neg^T] / tau` of shape `[N, 1+n]`,
//! as MoCo computes it. Only the student side receives gradients: `k` and the negatives are
//! treated as constants whatever graph they come from.

use burn::prelude::*;

/// `x / max(||x||_2, 1e-12)` along dimension 1, as `torch.nn.functional.normalize(x, dim=1)`.
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// `t` as a constant in `like`'s autodiff context: no graph, no gradient.
fn constant_like(t: Tensor<2>, like: &Tensor<2>) -> Tensor<2> {
    let t = t.without_autodiff();
    if like.is_autodiff() {
        t.autodiff()
    } else {
        t
    }
}

/// The loss and what it was computed from; statistics are read lazily (each is a host sync).
#[derive(Clone, Debug)]
pub struct InfoNceOutput {
    /// Mean cross-entropy, shape `[1]`; differentiable w.r.t. the student features.
    pub loss: Tensor<1>,
    /// `[q.k | q.neg^T] / tau`, shape `[N, 1+n]`.
    pub logits: Tensor<2>,
    pub tau: f64,
}

impl InfoNceOutput {
    pub fn loss_value(&self) -> f32 {
        self.loss.clone().without_autodiff().into_scalar::<f32>()
    }

    /// Mean cosine similarity of each student feature to its teacher feature.
    pub fn positive_similarity(&self) -> f32 {
        let logits = self.logits.clone().without_autodiff();
        logits.slice(s![.., 0..1]).mean().into_scalar::<f32>() * self.tau as f32
    }

    /// Mean cosine similarity of the student features to the queue.
    pub fn negative_similarity(&self) -> f32 {
        let logits = self.logits.clone().without_autodiff();
        logits.slice(s![.., 1..]).mean().into_scalar::<f32>() * self.tau as f32
    }

    /// Fraction of samples whose positive logit beats every negative.
    pub fn top1(&self) -> f32 {
        let logits = self.logits.clone().without_autodiff();
        let [n, _] = logits.dims();
        let hits = logits
            .argmax(1)
            .equal_elem(0)
            .int()
            .sum()
            .into_scalar::<i64>();
        hits as f32 / n as f32
    }
}

/// QUD's contrastive loss. `q`: `[N, D]` normalised student features (tracked); `k`: `[N, D]`
/// normalised teacher features; `negatives`: `[n, D]` queue rows as they were before this batch.
pub fn info_nce(q: Tensor<2>, k: Tensor<2>, negatives: Tensor<2>, tau: f64) -> InfoNceOutput {
    assert!(tau > 0.0, "InfoNCE temperature must be > 0, got {tau}");
    let [batch, dim] = q.dims();
    assert_eq!(
        k.dims(),
        [batch, dim],
        "teacher features must match the student's shape"
    );
    assert_eq!(
        negatives.dims()[1],
        dim,
        "queue width must equal the feature size"
    );
    let k = constant_like(k, &q);
    let negatives = constant_like(negatives, &q);
    let positive = (q.clone() * k).sum_dim(1);
    let negative = q.matmul(negatives.transpose());
    let logits = Tensor::cat(vec![positive, negative], 1).div_scalar(tau);
    // Cross-entropy with target 0 via a max-shifted log-sum-exp: exp() of logits up to 1/tau
    // would overflow f32 for tau below ~0.011 without the shift.
    let shift = logits.clone().detach().max_dim(1);
    let log_sum_exp = (logits.clone() - shift.clone()).exp().sum_dim(1).log() + shift;
    let per_sample = log_sum_exp - logits.clone().slice(s![.., 0..1]);
    InfoNceOutput {
        loss: per_sample.mean(),
        logits,
        tau,
    }
}

/// Feature-distillation baseline: mean over all elements of `(q - k)^2`, with `q` and `k` the
/// normalised student and teacher features (PyTorch `MSELoss()` on normalised features). Only `q`
/// receives gradients.
pub fn feature_mse(q: Tensor<2>, k: Tensor<2>) -> Tensor<1> {
    assert_eq!(
        q.dims(),
        k.dims(),
        "student and teacher features must have the same shape"
    );
    let k = constant_like(k, &q);
    (q - k).powi_scalar(2).mean()
}

#[cfg(test)]
mod tests;
