//! PReLU with one slope per channel (channels on dimension 1) on host memory, forward and
//! backward, each one pass over the activation. Burn composes PReLU from a comparison, a
//! broadcast product and `mask_where`, and differentiates each: in a MobileFaceNet train step on
//! flex that was 14% of the time in `mask_where` alone.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::simd::{self, LANES};

/// Planes (one channel of one sample) per rayon task: enough work to pay for the task.
fn planes_per_task(plane: usize) -> usize {
    (16_384 / plane.max(1)).max(1)
}

/// `y = x` where `x >= 0`, `alpha[c] * x` elsewhere; `x` is `[N, C, plane]` row-major.
pub fn prelu_host(x: &[f32], alpha: &[f32], plane: usize) -> Vec<f32> {
    let per = planes_per_task(plane);
    crate::filled(x.len(), |out| {
        out.par_chunks_mut(plane * per)
            .zip(x.par_chunks(plane * per))
            .enumerate()
            .for_each(|(task, (out, x))| prelu_planes(out, x, alpha, task * per, plane));
    })
}

simd::multiversion! {
    /// [`prelu_host`] on the planes `first..` of one task.
    fn prelu_planes(
        out: &mut [MaybeUninit<f32>],
        x: &[f32],
        alpha: &[f32],
        first: usize,
        plane: usize,
    ) {
        for (k, (out, x)) in out.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
            let a = alpha[(first + k) % alpha.len()];
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(if v >= 0.0 { v } else { a * v });
            }
        }
    }
}

/// [`prelu_host`] overwriting `x`: an inference forward reuses the activation's buffer, where
/// a fresh one would fault in a page every 4 KB.
pub fn prelu_in_place_host(x: &mut [f32], alpha: &[f32], plane: usize) {
    let per = planes_per_task(plane);
    x.par_chunks_mut(plane * per)
        .enumerate()
        .for_each(|(task, x)| prelu_planes_in_place(x, alpha, task * per, plane));
}

simd::multiversion! {
    /// [`prelu_in_place_host`] on the planes `first..` of one task.
    fn prelu_planes_in_place(x: &mut [f32], alpha: &[f32], first: usize, plane: usize) {
        for (k, x) in x.chunks_mut(plane).enumerate() {
            let a = alpha[(first + k) % alpha.len()];
            // A select, not a branch: the signs are random, and a conditional store does not
            // vectorise.
            for v in x {
                *v = if *v >= 0.0 { *v } else { a * *v };
            }
        }
    }
}

/// `x <- prelu(x + bias[c])` with one bias and one slope per channel, overwriting `x`
/// (`[N, C, plane]` row-major): a convolution's bias and the PReLU after it in one pass over the
/// activation instead of two, with the same bits as the two ops.
pub fn bias_prelu_in_place_host(x: &mut [f32], bias: &[f32], alpha: &[f32], plane: usize) {
    assert_eq!(
        bias.len(),
        alpha.len(),
        "one bias and one slope per channel"
    );
    let per = planes_per_task(plane);
    x.par_chunks_mut(plane * per)
        .enumerate()
        .for_each(|(task, x)| bias_prelu_planes_in_place(x, bias, alpha, task * per, plane));
}

simd::multiversion! {
    /// [`bias_prelu_in_place_host`] on the planes `first..` of one task.
    fn bias_prelu_planes_in_place(
        x: &mut [f32],
        bias: &[f32],
        alpha: &[f32],
        first: usize,
        plane: usize,
    ) {
        for (k, x) in x.chunks_mut(plane).enumerate() {
            let c = (first + k) % alpha.len();
            let (b, a) = (bias[c], alpha[c]);
            for v in x {
                let y = *v + b;
                *v = if y >= 0.0 { y } else { a * y };
            }
        }
    }
}

/// The input gradient: `grad` where `x >= 0`, `alpha[c] * grad` elsewhere.
pub fn prelu_input_grad_host(x: &[f32], alpha: &[f32], grad: &[f32], plane: usize) -> Vec<f32> {
    assert_eq!(x.len(), grad.len(), "gradient size");
    let per = planes_per_task(plane);
    crate::filled(x.len(), |out| {
        out.par_chunks_mut(plane * per)
            .zip(x.par_chunks(plane * per).zip(grad.par_chunks(plane * per)))
            .enumerate()
            .for_each(|(task, (out, (x, grad)))| {
                prelu_grad_planes(out, x, grad, alpha, task * per, plane)
            });
    })
}

simd::multiversion! {
    /// [`prelu_input_grad_host`] on the planes `first..` of one task.
    fn prelu_grad_planes(
        out: &mut [MaybeUninit<f32>],
        x: &[f32],
        grad: &[f32],
        alpha: &[f32],
        first: usize,
        plane: usize,
    ) {
        let planes = out.chunks_mut(plane).zip(x.chunks(plane).zip(grad.chunks(plane)));
        for (k, (out, (x, grad))) in planes.enumerate() {
            let a = alpha[(first + k) % alpha.len()];
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
                o.write(if v >= 0.0 { g } else { a * g });
            }
        }
    }
}

/// [`prelu_input_grad_host`] written over `grad`: the backward consumes the output's gradient,
/// so a step needs no fresh buffer for it.
pub fn prelu_input_grad_in_place_host(x: &[f32], alpha: &[f32], grad: &mut [f32], plane: usize) {
    assert_eq!(x.len(), grad.len(), "gradient size");
    let per = planes_per_task(plane);
    grad.par_chunks_mut(plane * per)
        .zip(x.par_chunks(plane * per))
        .enumerate()
        .for_each(|(task, (grad, x))| {
            prelu_grad_planes_in_place(grad, x, alpha, task * per, plane)
        });
}

simd::multiversion! {
    /// [`prelu_input_grad_in_place_host`] on the planes `first..` of one task.
    fn prelu_grad_planes_in_place(
        grad: &mut [f32],
        x: &[f32],
        alpha: &[f32],
        first: usize,
        plane: usize,
    ) {
        for (k, (grad, x)) in grad.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
            scale_negative_inputs(grad, x, alpha[(first + k) % alpha.len()]);
        }
    }
}

/// `grad` where `x >= 0`, `a * grad` elsewhere, over one plane, in place.
#[inline(always)]
pub(crate) fn scale_negative_inputs(grad: &mut [f32], x: &[f32], a: f32) {
    for (g, &v) in grad.iter_mut().zip(x) {
        *g = if v >= 0.0 { *g } else { a * *g };
    }
}

/// The slope gradient: per channel, the sum of `grad * x` where `x < 0` (per plane with eight
/// partial sums, then the planes in sample order: the same bits on any thread count).
pub fn prelu_alpha_grad_host(x: &[f32], grad: &[f32], channels: usize, plane: usize) -> Vec<f32> {
    assert_eq!(x.len(), grad.len(), "gradient size");
    let per_plane: Vec<f32> = x
        .par_chunks(plane)
        .zip(grad.par_chunks(plane))
        .with_min_len(planes_per_task(plane))
        .map(|(x, grad)| negative_part_dot(x, grad))
        .collect();
    let mut out = vec![0f32; channels];
    for (k, s) in per_plane.into_iter().enumerate() {
        out[k % channels] += s;
    }
    out
}

simd::multiversion! {
    /// One plane's share of the slope gradient.
    fn negative_part_dot(x: &[f32], grad: &[f32]) -> f32 {
        negative_part_sum(x, grad)
    }
}

/// `sum(x * grad where x < 0)` with [`LANES`] partial sums, which vectorise (one running sum
/// must be added in order and does not). `min(x, 0) * grad`, not a select: as
/// `if x < 0 { x * grad } else { 0 }` the AVX-512 build spent 23 % of a MobileFaceNet train
/// step here.
#[inline(always)]
pub(crate) fn negative_part_sum(x: &[f32], grad: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (xs, gs) = (x.chunks_exact(LANES), grad.chunks_exact(LANES));
    let mut tail = 0f32;
    for (&v, &g) in xs.remainder().iter().zip(gs.remainder()) {
        tail += if v < 0.0 { v * g } else { 0.0 };
    }
    for (x, g) in xs.zip(gs) {
        for i in 0..LANES {
            lanes[i] += x[i].min(0.0) * g[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Both gradients in one pass over the activation: `grad` becomes the input gradient (as
/// [`prelu_input_grad_in_place_host`]) and the slope gradient is returned (as
/// [`prelu_alpha_grad_host`], the same bits): each plane's share is summed from `grad` before
/// the plane is overwritten, while it is in cache.
pub fn prelu_backward_in_place_host(
    x: &[f32],
    alpha: &[f32],
    grad: &mut [f32],
    plane: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), grad.len(), "gradient size");
    let channels = alpha.len();
    let per = planes_per_task(plane);
    let shares: Vec<Vec<f32>> = grad
        .par_chunks_mut(plane * per)
        .zip(x.par_chunks(plane * per))
        .enumerate()
        .map(|(task, (grad, x))| prelu_backward_planes(grad, x, alpha, task * per, plane))
        .collect();
    let mut out = vec![0f32; channels];
    for (k, s) in shares.into_iter().flatten().enumerate() {
        out[k % channels] += s;
    }
    out
}

simd::multiversion! {
    /// [`prelu_backward_in_place_host`] on the planes `first..` of one task: their slope
    /// gradient shares, in plane order.
    fn prelu_backward_planes(
        grad: &mut [f32],
        x: &[f32],
        alpha: &[f32],
        first: usize,
        plane: usize,
    ) -> Vec<f32> {
        let mut shares = Vec::with_capacity(grad.len().div_ceil(plane.max(1)));
        let planes = grad.chunks_mut(plane).zip(x.chunks(plane));
        for (k, (grad, x)) in planes.enumerate() {
            shares.push(negative_part_sum(x, grad));
            scale_negative_inputs(grad, x, alpha[(first + k) % alpha.len()]);
        }
        shares
    }
}
