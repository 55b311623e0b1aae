//! BatchNorm over channels (dimension 1 of `[N, C, plane]`) on host memory: batch statistics,
//! the normalised output, and the three gradients, each in one pass over the activation.
//!
//! Burn's generic `batch_norm_train` moves the channels to the front with a transposing copy
//! for each reduction and broadcasts every other step: about six passes forward and ten
//! backward, and `copy_2d_tiled` alone was 19% of a MobileFaceNet train step on flex.
//!
//! Reductions are per plane (one channel of one sample), in plane order, then combined per
//! channel in sample order: the same bits on any thread count, so exact resume holds.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::simd;

/// Planes per rayon task: enough work to pay for the task.
fn planes_per_task(plane: usize) -> usize {
    (16_384 / plane.max(1)).max(1)
}

/// Sum of `f(i)` over a plane with eight independent accumulators, so that it vectorises.
#[inline(always)]
fn lane_sum(len: usize, f: impl Fn(usize) -> f32) -> f64 {
    let mut lanes = [0f32; 8];
    let body = len / 8 * 8;
    for base in (0..body).step_by(8) {
        for (k, lane) in lanes.iter_mut().enumerate() {
            *lane += f(base + k);
        }
    }
    let tail: f32 = (body..len).map(&f).sum();
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
}

/// Per-channel mean and biased variance of `x` (`[N, C, plane]`, row-major).
///
/// Each plane contributes its own mean and centred sum of squares (computed while the plane is
/// in cache) and the planes are merged with Chan's formula: as exact as a two-pass variance,
/// with one pass over memory.
pub fn batch_norm_statistics_host(
    x: &[f32],
    channels: usize,
    plane: usize,
) -> (Vec<f32>, Vec<f32>) {
    let per_plane: Vec<(f64, f64)> = x
        .par_chunks(plane)
        .with_min_len(planes_per_task(plane))
        .map(plane_moments)
        .collect();
    let samples = per_plane.len() / channels;
    let mut mean = vec![0f32; channels];
    let mut var = vec![0f32; channels];
    for c in 0..channels {
        let planes = (0..samples).map(|n| per_plane[n * channels + c]);
        let channel_mean = planes.clone().map(|(m, _)| m).sum::<f64>() / samples as f64;
        let m2: f64 = planes
            .map(|(m, m2)| m2 + plane as f64 * (m - channel_mean) * (m - channel_mean))
            .sum();
        mean[c] = channel_mean as f32;
        var[c] = (m2 / (samples * plane) as f64) as f32;
    }
    (mean, var)
}

simd::multiversion! {
    /// A plane's mean and centred sum of squares.
    fn plane_moments(p: &[f32]) -> (f64, f64) {
        let mean = (lane_sum(p.len(), #[inline(always)] |i| p[i]) / p.len() as f64) as f32;
        let m2 = lane_sum(p.len(), #[inline(always)] |i| {
            let d = p[i] - mean;
            d * d
        });
        (mean as f64, m2)
    }
}

/// `scale = gamma / sqrt(var + eps)` per channel: the output is `(x - mean) * scale + beta`.
pub fn batch_norm_scale(gamma: &[f32], var: &[f32], epsilon: f64) -> Vec<f32> {
    gamma
        .iter()
        .zip(var)
        .map(|(&g, &v)| (g as f64 / (v as f64 + epsilon).sqrt()) as f32)
        .collect()
}

/// Per-channel `(mean, scale, beta)` of a normalisation `(x - mean) * scale + beta`.
///
/// `x - mean` is kept apart rather than folded into one shift `beta - mean * scale`: for a
/// channel whose mean is far from zero against its spread, `x * scale` and the shift cancel
/// to a few digits: the first QUD step's gradient norm was 2.2e-4 off the float64 step that way,
/// 2.3e-6 this way.
#[derive(Clone, Copy)]
pub struct Normalisation<'a> {
    pub mean: &'a [f32],
    pub scale: &'a [f32],
    pub beta: &'a [f32],
}

/// `(x - mean[c]) * scale[c] + beta[c]`, a new buffer.
pub fn batch_norm_apply_host(x: &[f32], norm: Normalisation, plane: usize) -> Vec<f32> {
    let per = planes_per_task(plane);
    crate::filled(x.len(), |out| {
        out.par_chunks_mut(plane * per)
            .zip(x.par_chunks(plane * per))
            .enumerate()
            .for_each(|(task, (out, x))| normalise_planes(out, x, norm, task * per, plane));
    })
}

simd::multiversion! {
    /// [`batch_norm_apply_host`] on the planes `first..` of one task.
    fn normalise_planes(
        out: &mut [MaybeUninit<f32>],
        x: &[f32],
        norm: Normalisation,
        first: usize,
        plane: usize,
    ) {
        let channels = norm.scale.len();
        for (k, (out, x)) in out.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
            let c = (first + k) % channels;
            let (m, a, b) = (norm.mean[c], norm.scale[c], norm.beta[c]);
            for (o, &v) in out.iter_mut().zip(x) {
                o.write((v - m) * a + b);
            }
        }
    }
}

/// [`batch_norm_apply_host`] over `x` itself (an inference activation nothing else holds).
pub fn batch_norm_apply_in_place_host(x: &mut [f32], norm: Normalisation, plane: usize) {
    let per = planes_per_task(plane);
    x.par_chunks_mut(plane * per)
        .enumerate()
        .for_each(|(task, x)| normalise_planes_in_place(x, norm, task * per, plane));
}

simd::multiversion! {
    /// [`batch_norm_apply_in_place_host`] on the planes `first..` of one task.
    fn normalise_planes_in_place(x: &mut [f32], norm: Normalisation, first: usize, plane: usize) {
        let channels = norm.scale.len();
        for (k, x) in x.chunks_mut(plane).enumerate() {
            let c = (first + k) % channels;
            let (m, a, b) = (norm.mean[c], norm.scale[c], norm.beta[c]);
            for v in x {
                *v = (*v - m) * a + b;
            }
        }
    }
}

/// Gradients of the training-mode BatchNorm (batch statistics `mean`, biased `var`) given the
/// output gradient: `(x_grad, gamma_grad, beta_grad)`.
///
/// With `xhat = (x - mean) / std`, `beta_grad = sum(dy)`, `gamma_grad = sum(dy * xhat)` and
/// `x_grad = gamma / std * (dy - mean(dy) - xhat * mean(dy * xhat))`, which per channel is
/// `a * ((dy - mean(dy)) - (x - mean) * c)`: one pass for the sums, one for `x_grad`. Both
/// differences stay explicit, as in the forward: where `dy` is close to its mean (or `x` to
/// its), the difference of two nearby floats is exact, while `a * dy - a * mean(dy)` would keep
/// only the rounding of two large products.
pub fn batch_norm_backward_host(
    x: &[f32],
    grad: &[f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let terms = BackwardTerms::new(x, grad, gamma, mean, var, epsilon, plane);
    let per = planes_per_task(plane);
    let x_grad = crate::filled(x.len(), |out| {
        out.par_chunks_mut(plane * per)
            .zip(x.par_chunks(plane * per).zip(grad.par_chunks(plane * per)))
            .enumerate()
            .for_each(|(task, (out, (x, dy)))| {
                x_grad_planes(out, x, dy, &terms.coefficients, task * per, plane)
            });
    });
    (x_grad, terms.gamma_grad, terms.beta_grad)
}

/// [`batch_norm_backward_host`] with `x_grad` written over `grad` (the backward consumes the
/// output's gradient): returns `(gamma_grad, beta_grad)`.
pub fn batch_norm_backward_in_place_host(
    x: &[f32],
    grad: &mut [f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
    plane: usize,
) -> (Vec<f32>, Vec<f32>) {
    let terms = BackwardTerms::new(x, grad, gamma, mean, var, epsilon, plane);
    let per = planes_per_task(plane);
    grad.par_chunks_mut(plane * per)
        .zip(x.par_chunks(plane * per))
        .enumerate()
        .for_each(|(task, (dy, x))| {
            x_grad_planes_in_place(dy, x, &terms.coefficients, task * per, plane)
        });
    (terms.gamma_grad, terms.beta_grad)
}

/// The per-channel results of the backward's first pass: both parameter gradients, and
/// `[a, slope, mean(dy), mean]` of `x_grad = a * ((dy - mean(dy)) - (x - mean) * slope)`.
struct BackwardTerms {
    gamma_grad: Vec<f32>,
    beta_grad: Vec<f32>,
    coefficients: Vec<[f32; 4]>,
}

impl BackwardTerms {
    fn new(
        x: &[f32],
        grad: &[f32],
        gamma: &[f32],
        mean: &[f32],
        var: &[f32],
        epsilon: f64,
        plane: usize,
    ) -> Self {
        assert_eq!(x.len(), grad.len(), "gradient size");
        let channels = gamma.len();
        let per_plane: Vec<(f64, f64)> = x
            .par_chunks(plane)
            .zip(grad.par_chunks(plane))
            .enumerate()
            .with_min_len(planes_per_task(plane))
            .map(|(index, (x, dy))| plane_backward_sums(x, dy, mean[index % channels]))
            .collect();
        let samples = per_plane.len() / channels;
        let count = (samples * plane) as f64;
        let mut gamma_grad = vec![0f32; channels];
        let mut beta_grad = vec![0f32; channels];
        let mut coefficients = vec![[0f32; 4]; channels];
        for c in 0..channels {
            let (sum_dy, sum_dy_centred) = (0..samples)
                .map(|n| per_plane[n * channels + c])
                .fold((0f64, 0f64), |(a, b), (p, q)| (a + p, b + q));
            let inv_std = 1.0 / (var[c] as f64 + epsilon).sqrt();
            let sum_dy_xhat = sum_dy_centred * inv_std;
            gamma_grad[c] = sum_dy_xhat as f32;
            beta_grad[c] = sum_dy as f32;
            let a = gamma[c] as f64 * inv_std;
            let slope = inv_std * sum_dy_xhat / count;
            let mean_dy = sum_dy / count;
            coefficients[c] = [a as f32, slope as f32, mean_dy as f32, mean[c]];
        }
        Self {
            gamma_grad,
            beta_grad,
            coefficients,
        }
    }
}

simd::multiversion! {
    /// A plane's `sum(dy)` and `sum(dy * (x - m))`.
    fn plane_backward_sums(x: &[f32], dy: &[f32], m: f32) -> (f64, f64) {
        let len = x.len().min(dy.len());
        let sum_dy = lane_sum(len, #[inline(always)] |i| dy[i]);
        let sum_dy_centred = lane_sum(len, #[inline(always)] |i| dy[i] * (x[i] - m));
        (sum_dy, sum_dy_centred)
    }
}

simd::multiversion! {
    /// [`batch_norm_backward_host`]'s `x_grad` on the planes `first..` of one task.
    fn x_grad_planes(
        out: &mut [MaybeUninit<f32>],
        x: &[f32],
        dy: &[f32],
        coefficients: &[[f32; 4]],
        first: usize,
        plane: usize,
    ) {
        let planes = out.chunks_mut(plane).zip(x.chunks(plane).zip(dy.chunks(plane)));
        for (k, (out, (x, dy))) in planes.enumerate() {
            let [a, slope, mean_dy, m] = coefficients[(first + k) % coefficients.len()];
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
                o.write(a * ((g - mean_dy) - (v - m) * slope));
            }
        }
    }
}

simd::multiversion! {
    /// [`batch_norm_backward_in_place_host`]'s `x_grad` on the planes `first..` of one task.
    fn x_grad_planes_in_place(
        dy: &mut [f32],
        x: &[f32],
        coefficients: &[[f32; 4]],
        first: usize,
        plane: usize,
    ) {
        for (k, (dy, x)) in dy.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
            let [a, slope, mean_dy, m] = coefficients[(first + k) % coefficients.len()];
            for (g, &v) in dy.iter_mut().zip(x) {
                *g = a * ((*g - mean_dy) - (v - m) * slope);
            }
        }
    }
}
