//! SGD as the paper configures it, the learning-rate schedule, and global gradient-norm clipping.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{
    decay::WeightDecayConfig, momentum::MomentumConfig, GradientsParams, ModuleOptimizer, SgdConfig,
};
use burn::prelude::*;
use qud_config::OptimConfig;

/// SGD with momentum (dampening 0, as torch; Burn defaults to 0.1) and coupled weight decay on
/// every parameter.
pub fn sgd(config: &OptimConfig) -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new()
                .with_momentum(config.momentum)
                .with_dampening(0.0)
                .with_nesterov(false),
        ))
        .with_weight_decay(
            (config.weight_decay > 0.0).then(|| WeightDecayConfig::new(config.weight_decay as f32)),
        )
        .init()
}

/// Learning rate of global step `step` (0-based) in epoch `epoch`: the reference's per-epoch
/// step decay, times a linear warmup over the first `warmup_epochs` epochs when set.
pub fn learning_rate(
    config: &OptimConfig,
    epoch: usize,
    step: usize,
    steps_per_epoch: usize,
) -> f64 {
    let lr = config.lr_at_epoch(epoch);
    let warmup_steps = (config.warmup_epochs * steps_per_epoch as f64).round() as usize;
    if step < warmup_steps {
        lr * (step + 1) as f64 / warmup_steps as f64
    } else {
        lr
    }
}

/// Scale all gradients so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` (Burn's own clipping works per tensor). Returns the norm
/// before clipping. `max_norm <= 0` only measures.
pub fn clip_global_norm<M: Module>(
    model: &M,
    grads: GradientsParams,
    max_norm: f64,
) -> (GradientsParams, f64) {
    struct SquaredNorm<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredNorm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.cast(burn::tensor::FloatDType::F32).powi_scalar(2).sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut squared = SquaredNorm {
        grads: &grads,
        total: None,
    };
    model.visit(&mut squared);
    let norm = squared
        .total
        .map_or(0.0, |t| (t.into_scalar::<f32>() as f64).sqrt());
    // torch: clip_coef = max_norm / (total_norm + 1e-6), applied when below 1.
    let factor = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && factor < 1.0 {
        (scale_gradients(model, grads, factor), norm)
    } else {
        (grads, norm)
    }
}

/// Every gradient of `model`'s parameters times `factor`.
pub fn scale_gradients<M: Module>(
    model: &M,
    mut grads: GradientsParams,
    factor: f64,
) -> GradientsParams {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale {
        grads: &mut grads,
        factor,
    });
    grads
}
