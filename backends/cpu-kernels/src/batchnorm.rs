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

use crate::simd::{self, Upcoming, LANES};

/// Planes per rayon task: enough work to pay for the task.
fn planes_per_task(plane: usize) -> usize {
    (16_384 / plane.max(1)).max(1)
}

/// Sum of `f(a[i], b[i])` over a plane with [`LANES`] independent accumulators (lane `k` takes
/// `i = k, k + LANES, ...`), then the lanes in f64.
///
/// Over whole chunks of `LANES`, so that it vectorises: indexed by `i` through a closure, the
/// bounds checks kept every lane scalar (`vaddss`), and the BatchNorm sums were 20 % of a
/// MobileFaceNet train step.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    lane_sum_requesting(a, b, f, &Upcoming::default())
}

/// [`lane_sum`], requesting the lines of the `upcoming` planes as it goes, one per line summed:
/// the same additions in the same order.
#[inline(always)]
fn lane_sum_requesting(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> f32,
    upcoming: &Upcoming,
) -> f64 {
    let len = a.len().min(b.len());
    let (a, b) = (a[..len].chunks_exact(LANES), b[..len].chunks_exact(LANES));
    let tail: f32 = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    let mut lanes = [0f32; LANES];
    for (i, (xs, ys)) in a.zip(b).enumerate() {
        upcoming.request(i * LANES);
        for k in 0..LANES {
            lanes[k] += f(xs[k], ys[k]);
        }
    }
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
}

/// Planes `n` and `n + 1` of the `count` planes of a channel, to request while a loop works on
/// plane `n - 1` (two ahead: the BatchNorm moments took a twelfth fewer samples than with one);
/// nothing past the last plane.
#[inline(always)]
fn next_plane<'a>(n: usize, count: usize, planes: impl Fn(usize) -> &'a [f32]) -> Upcoming<'a> {
    Upcoming {
        reads: [
            if n < count { planes(n) } else { &[] },
            if n + 1 < count { planes(n + 1) } else { &[] },
        ],
        writes: &[],
    }
}

/// A channel's mean and biased variance from its planes' `(mean, centred sum of squares)`, in
/// sample order (Chan's formula).
fn merge_moments(planes: impl Iterator<Item = (f64, f64)> + Clone, plane: usize) -> (f32, f32) {
    let samples = planes.clone().count();
    let channel_mean = planes.clone().map(|(m, _)| m).sum::<f64>() / samples as f64;
    let m2: f64 = planes
        .map(|(m, m2)| m2 + plane as f64 * (m - channel_mean) * (m - channel_mean))
        .sum();
    (channel_mean as f32, (m2 / (samples * plane) as f64) as f32)
}

/// Training-mode BatchNorm, `(output, mean, biased variance)`, one task per channel: the
/// channel's planes are read for their statistics and normalised right after, from cache (a
/// channel of a MobileFaceNet batch-32 activation is 400 KB at 56 x 56), where a pass for the
/// statistics and then a pass for the output read the whole activation from memory twice.
/// The values are those of the two passes.
pub fn batch_norm_train_host(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    normalise_train(x, gamma, beta, Then::Nothing, epsilon, plane)
}

/// Training-mode BatchNorm followed by PReLU with one slope per channel (`alpha` `[C]`):
/// `(output, mean, biased variance)`. Each normalised plane goes through PReLU before it is
/// written, so the BatchNorm's own output never exists: no buffer, no pass over it. The values
/// are those of [`batch_norm_train_host`] then `prelu_host`, bit for bit.
pub fn batch_norm_prelu_train_host(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    alpha: &[f32],
    epsilon: f64,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(alpha.len(), gamma.len(), "one slope per channel");
    normalise_train(x, gamma, beta, Then::Prelu(alpha), epsilon, plane)
}

/// Training-mode BatchNorm whose output is added to `shortcut` (the input of a residual unit,
/// `x`'s shape): `(output + shortcut, mean, biased variance)`. The sum is written as each plane
/// is normalised, so neither the BatchNorm's output nor a separate pass for the sum exists. The
/// values are those of [`batch_norm_train_host`] then the sum, bit for bit.
pub fn batch_norm_add_train_host(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    shortcut: &[f32],
    epsilon: f64,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(shortcut.len(), x.len(), "a shortcut of the input's shape");
    normalise_train(x, gamma, beta, Then::Add(shortcut), epsilon, plane)
}

/// What [`normalise_train`] does to each normalised plane before writing it.
#[derive(Clone, Copy)]
enum Then<'a> {
    Nothing,
    /// PReLU with one slope per channel.
    Prelu(&'a [f32]),
    /// Add the plane of the same index of this buffer.
    Add(&'a [f32]),
}

/// [`batch_norm_train_host`], then `then` on each plane.
fn normalise_train(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    then: Then,
    epsilon: f64,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let channels = gamma.len();
    let samples = x.len() / (channels * plane).max(1);
    assert_eq!(x.len(), samples * channels * plane, "input size");
    let mut statistics = vec![(0f32, 0f32); channels];
    let out = crate::filled(x.len(), |out| {
        let planes = ChannelPlanes::new(out, channels, plane);
        statistics
            .par_iter_mut()
            .enumerate()
            .for_each(|(c, statistics)| {
                let index = |n: usize| n * channels + c;
                let input = |n: usize| &x[index(n) * plane..][..plane];
                let moments: Vec<(f64, f64)> = (0..samples)
                    .map(|n| plane_moments(input(n), &next_plane(n + 1, samples, input)))
                    .collect();
                let (mean, var) = merge_moments(moments.into_iter(), plane);
                let scale = scale_of(gamma[c], var, epsilon);
                for n in 0..samples {
                    if n + 1 < samples {
                        // SAFETY: as below; the plane is released at once.
                        simd::prefetch(unsafe { planes.get(index(n + 1)) });
                        if let Then::Add(shortcut) = then {
                            simd::prefetch(&shortcut[index(n + 1) * plane..][..plane]);
                        }
                    }
                    // SAFETY: only this task, channel `c`'s, takes the planes of channel `c`.
                    let out = unsafe { planes.get(index(n)) };
                    match then {
                        Then::Nothing => normalise_plane(out, input(n), mean, scale, beta[c]),
                        Then::Prelu(alpha) => {
                            normalise_prelu_plane(out, input(n), mean, scale, beta[c], alpha[c])
                        }
                        Then::Add(shortcut) => {
                            let shortcut = &shortcut[index(n) * plane..][..plane];
                            normalise_add_plane(out, (input(n), shortcut), mean, scale, beta[c])
                        }
                    }
                }
                *statistics = (mean, var);
            });
    });
    let (mean, var) = statistics.into_iter().unzip();
    (out, mean, var)
}

/// The planes of one buffer (`[N, C, plane]`) for a loop with one task per channel: channel
/// `c`'s planes, `n * C + c`, are spread through the buffer, so no split of the slice hands
/// them to one task; each task asks for its own channel's only.
struct ChannelPlanes<'a, T> {
    start: *mut T,
    len: usize,
    plane: usize,
    _buffer: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: a shared `ChannelPlanes` only hands out planes through `get`, whose callers keep
// them disjoint between threads.
unsafe impl<T: Send> Sync for ChannelPlanes<'_, T> {}

impl<'a, T> ChannelPlanes<'a, T> {
    fn new(buffer: &'a mut [T], channels: usize, plane: usize) -> Self {
        assert_eq!(buffer.len() % (channels * plane).max(1), 0, "whole planes");
        Self {
            start: buffer.as_mut_ptr(),
            len: buffer.len(),
            plane,
            _buffer: std::marker::PhantomData,
        }
    }

    /// Plane `index`.
    ///
    /// # Safety
    /// No two live results may be the same plane.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, index: usize) -> &mut [T] {
        assert!(
            (index + 1) * self.plane <= self.len,
            "plane {index} out of range"
        );
        // SAFETY: in bounds (asserted); the caller keeps planes from aliasing.
        unsafe { std::slice::from_raw_parts_mut(self.start.add(index * self.plane), self.plane) }
    }
}

simd::multiversion! {
    /// A plane's mean and centred sum of squares. The first pass also requests the lines of
    /// the `upcoming` planes, so that they arrive while this one is summed.
    fn plane_moments(p: &[f32], upcoming: &Upcoming) -> (f64, f64) {
        let sum = lane_sum_requesting(p, p, #[inline(always)] |x, _| x, upcoming);
        let mean = (sum / p.len() as f64) as f32;
        let m2 = lane_sum(p, p, #[inline(always)] |x, _| (x - mean) * (x - mean));
        (mean as f64, m2)
    }
}

/// `scale = gamma / sqrt(var + eps)` per channel: the output is `(x - mean) * scale + beta`.
pub fn batch_norm_scale(gamma: &[f32], var: &[f32], epsilon: f64) -> Vec<f32> {
    gamma
        .iter()
        .zip(var)
        .map(|(&g, &v)| scale_of(g, v, epsilon))
        .collect()
}

fn scale_of(gamma: f32, var: f32, epsilon: f64) -> f32 {
    (gamma as f64 / (var as f64 + epsilon).sqrt()) as f32
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

/// `out = (x - m) * a + b` over one plane.
#[inline(always)]
fn normalise_into(out: &mut [MaybeUninit<f32>], x: &[f32], m: f32, a: f32, b: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write((v - m) * a + b);
    }
}

simd::multiversion! {
    /// [`normalise_into`] for one plane, on its own.
    fn normalise_plane(out: &mut [MaybeUninit<f32>], x: &[f32], m: f32, a: f32, b: f32) {
        normalise_into(out, x, m, a, b);
    }
}

simd::multiversion! {
    /// [`normalise_into`] then PReLU with slope `slope`, for one plane.
    fn normalise_prelu_plane(
        out: &mut [MaybeUninit<f32>],
        x: &[f32],
        m: f32,
        a: f32,
        b: f32,
        slope: f32,
    ) {
        for (o, &v) in out.iter_mut().zip(x) {
            let y = (v - m) * a + b;
            o.write(if y >= 0.0 { y } else { slope * y });
        }
    }
}

simd::multiversion! {
    /// [`normalise_into`] plus the shortcut's plane: `planes` are `(x, shortcut)`.
    fn normalise_add_plane(
        out: &mut [MaybeUninit<f32>],
        planes: (&[f32], &[f32]),
        m: f32,
        a: f32,
        b: f32,
    ) {
        let (x, shortcut) = planes;
        for ((o, &v), &s) in out.iter_mut().zip(x).zip(shortcut) {
            o.write((v - m) * a + b + s);
        }
    }
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
            normalise_into(out, x, norm.mean[c], norm.scale[c], norm.beta[c]);
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
    assert_eq!(x.len(), grad.len(), "gradient size");
    let backward = Backward::new(x, gamma, mean, var, epsilon, plane);
    let mut parameter_grads = vec![(0f32, 0f32); gamma.len()];
    let x_grad = crate::filled(x.len(), |out| {
        let planes = ChannelPlanes::new(out, gamma.len(), plane);
        parameter_grads
            .par_iter_mut()
            .enumerate()
            .for_each(|(c, parameter_grads)| {
                let dy = |n: usize| &grad[backward.index(n, c) * plane..][..plane];
                let (coefficients, grads) = backward.channel(c, dy);
                for n in 0..backward.samples {
                    // SAFETY: only this task, channel `c`'s, takes the planes of channel `c`.
                    let out = unsafe { planes.get(backward.index(n, c)) };
                    x_grad_plane(out, backward.input(n, c), dy(n), coefficients);
                }
                *parameter_grads = grads;
            });
    });
    let (gamma_grad, beta_grad) = parameter_grads.into_iter().unzip();
    (x_grad, gamma_grad, beta_grad)
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
    assert_eq!(x.len(), grad.len(), "gradient size");
    let backward = Backward::new(x, gamma, mean, var, epsilon, plane);
    let planes = ChannelPlanes::new(grad, gamma.len(), plane);
    let mut parameter_grads = vec![(0f32, 0f32); gamma.len()];
    parameter_grads
        .par_iter_mut()
        .enumerate()
        .for_each(|(c, parameter_grads)| {
            let dy = |n: usize| -> &[f32] {
                // SAFETY: (both `get`s) only this task, channel `c`'s, takes the planes of
                // channel `c`, and each plane is held once at a time.
                unsafe { planes.get(backward.index(n, c)) }
            };
            let (coefficients, grads) = backward.channel(c, dy);
            for n in 0..backward.samples {
                // SAFETY: as above.
                let dy = unsafe { planes.get(backward.index(n, c)) };
                x_grad_plane_in_place(dy, backward.input(n, c), coefficients);
            }
            *parameter_grads = grads;
        });
    parameter_grads.into_iter().unzip()
}

/// Gradients of [`batch_norm_prelu_train_host`] given its output's gradient, which is
/// overwritten with `x_grad`: returns `(gamma_grad, beta_grad, alpha_grad)`.
///
/// The BatchNorm's output `y` (PReLU's input) was never stored: it is recomputed from `x`
/// exactly as the forward computed it, and the gradient through PReLU (`dy`) with it. Per channel: one pass for the sums (PReLU's slope share and
/// BatchNorm's two), then one for `x_grad`, while the channel's planes are in cache. The sums
/// are taken by the same functions, in the same order, as PReLU's backward then BatchNorm's:
/// the same bits as the two ops.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_prelu_backward_in_place_host(
    x: &[f32],
    grad: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    alpha: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
    plane: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), grad.len(), "gradient size");
    assert_eq!(alpha.len(), gamma.len(), "one slope per channel");
    let backward = Backward::new(x, gamma, mean, var, epsilon, plane);
    let planes = ChannelPlanes::new(grad, gamma.len(), plane);
    let mut channel_grads = vec![(0f32, 0f32, 0f32); gamma.len()];
    channel_grads.par_iter_mut().enumerate().for_each_init(
        PreluSums::scratch,
        |scratch, (c, channel_grads)| {
            let affine = [
                mean[c],
                scale_of(gamma[c], var[c], epsilon),
                beta[c],
                alpha[c],
            ];
            let mut sums = PreluSums::default();
            for n in 0..backward.samples {
                let mut upcoming = Upcoming::default();
                if n + 1 < backward.samples {
                    // SAFETY: as below; the plane is only read, and released before it is
                    // taken again.
                    let next: &[f32] = unsafe { planes.get(backward.index(n + 1, c)) };
                    upcoming.reads = [backward.input(n + 1, c), next];
                }
                // SAFETY: (both `get`s) only this task, channel `c`'s, takes the planes of
                // channel `c`, and each plane is held once at a time.
                let dz = unsafe { planes.get(backward.index(n, c)) };
                sums.add((backward.input(n, c), dz, &upcoming), affine, scratch);
            }
            // SAFETY: as above.
            *channel_grads =
                backward.prelu_x_grad_pass(c, affine, sums, |i| unsafe { planes.get(i) });
        },
    );
    unzip3(channel_grads)
}

/// The per-channel `(gamma, beta, alpha)` gradients as three vectors.
fn unzip3(channel_grads: Vec<(f32, f32, f32)>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (g, b, a) in channel_grads {
        out.0.push(g);
        out.1.push(b);
        out.2.push(a);
    }
    out
}

/// One channel's sums from the first pass of a BatchNorm + PReLU backward, in sample order.
#[derive(Default)]
struct PreluSums {
    alpha_grad: f32,
    sum_dy: f64,
    sum_dy_centred: f64,
}

impl PreluSums {
    /// Scratch planes for [`Self::add`], one pair per task (the AVX-512 path does not use them).
    fn scratch() -> (Vec<f32>, Vec<f32>) {
        (Vec::new(), Vec::new())
    }

    /// Adds the plane `x` with its activation gradient `dz` (`affine` `[m, scale, beta, slope]`).
    /// The AVX-512 path requests the `upcoming` planes' lines as it goes.
    fn add(
        &mut self,
        (x, dz, upcoming): (&[f32], &[f32], &Upcoming),
        affine: [f32; 4],
        (y, dy): &mut (Vec<f32>, Vec<f32>),
    ) {
        y.resize(x.len(), 0.0);
        dy.resize(x.len(), 0.0);
        let (share, (sum_dy, sum_dy_centred)) =
            prelu_backward_plane_sums(x, dz, y, dy, affine, upcoming);
        self.alpha_grad += share;
        self.sum_dy += sum_dy;
        self.sum_dy_centred += sum_dy_centred;
    }
}

/// One plane of [`batch_norm_prelu_backward_in_place_host`]'s first pass: PReLU's slope share
/// (`sum(min(y, 0) * dz)`, `y` the BatchNorm's output recomputed from `x`) and BatchNorm's
/// `(sum(dy), sum(dy * (x - m)))`, `dy` the gradient through PReLU. `affine` is `[m, scale,
/// beta, slope]`; `y` and `dy` are scratch planes. On AVX-512 one pass with the three sums in
/// registers ([`prelu_backward_plane_sums_avx512`]); otherwise through the scratch planes.
/// The same bits either way.
fn prelu_backward_plane_sums(
    x: &[f32],
    dz: &[f32],
    y: &mut [f32],
    dy: &mut [f32],
    affine: [f32; 4],
    upcoming: &Upcoming,
) -> (f32, (f64, f64)) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::SimdLevel::Avx512 {
        // SAFETY: the CPU has AVX-512F (`level` never exceeds the CPU's), all the function is
        // compiled for.
        return unsafe { prelu_backward_plane_sums_avx512(x, dz, affine, upcoming) };
    }
    let _ = upcoming;
    prelu_backward_plane_sums_scratch(x, dz, y, dy, affine)
}

/// [`prelu_backward_plane_sums`] in one pass, written with AVX-512 intrinsics: every lane
/// takes the values and operations (separate multiplies and adds, no FMA) that lane `k` of the
/// scratch version's sixteen partial sums takes, in the same order, and the lanes and the tail
/// are reduced by the same code, so the bits are the scratch version's. (The one pass written
/// as plain loops had measured slower than the scratch planes.) In `perf` samples of a
/// MobileFaceNet train step at batch 32: the scratch version 9.2 %, this one 6.5 %, now bound
/// by its two loads.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn prelu_backward_plane_sums_avx512(
    x: &[f32],
    dz: &[f32],
    affine: [f32; 4],
    upcoming: &Upcoming,
) -> (f32, (f64, f64)) {
    use std::arch::x86_64::*;
    let [m, a, b, slope] = affine;
    let len = x.len().min(dz.len());
    let body = len / LANES * LANES;
    let activation = simd::avx512::Activation::new(affine);
    let zero = _mm512_setzero_ps();
    let (mut share, mut sum_dy, mut sum_dy_centred) = (zero, zero, zero);
    for base in (0..body).step_by(LANES) {
        upcoming.request(base);
        // SAFETY: `base + LANES <= body <= len`, within both slices.
        let (v, g) = unsafe {
            (
                _mm512_loadu_ps(x.as_ptr().add(base)),
                _mm512_loadu_ps(dz.as_ptr().add(base)),
            )
        };
        let (centred, value) = activation.normalise(v);
        let dy = activation.prelu(value, g);
        share = _mm512_add_ps(share, _mm512_mul_ps(_mm512_min_ps(value, zero), g));
        sum_dy = _mm512_add_ps(sum_dy, dy);
        sum_dy_centred = _mm512_add_ps(sum_dy_centred, _mm512_mul_ps(dy, centred));
    }
    let lanes = |sums: __m512| {
        let mut out = [0f32; LANES];
        // SAFETY: `out` holds `LANES` (16) values.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sums) };
        out
    };
    let (share, sum_dy, sum_dy_centred) = (lanes(share), lanes(sum_dy), lanes(sum_dy_centred));
    let (x_tail, dz_tail) = (&x[body..len], &dz[body..len]);
    let mut share_tail = 0f32;
    let (mut dy_tail, mut centred_tail) = ([0f32; LANES], [0f32; LANES]);
    for (i, (&v, &g)) in x_tail.iter().zip(dz_tail).enumerate() {
        let value = (v - m) * a + b;
        share_tail += if value < 0.0 { value * g } else { 0.0 };
        let dy = if value >= 0.0 { g } else { slope * g };
        dy_tail[i] = dy;
        centred_tail[i] = dy * (v - m);
    }
    let tail = len - body;
    let (dy_tail, centred_tail) = (&dy_tail[..tail], &centred_tail[..tail]);
    let reduce = |lanes: [f32; LANES], tail: &[f32]| {
        let tail: f32 = tail.iter().copied().sum();
        lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
    };
    (
        share.iter().sum::<f32>() + share_tail,
        (
            reduce(sum_dy, dy_tail),
            reduce(sum_dy_centred, centred_tail),
        ),
    )
}

simd::multiversion! {
    /// [`prelu_backward_plane_sums`] through the scratch planes `y` and `dy`, by the functions
    /// the two ops use.
    fn prelu_backward_plane_sums_scratch(
        x: &[f32],
        dz: &[f32],
        y: &mut [f32],
        dy: &mut [f32],
        affine: [f32; 4],
    ) -> (f32, (f64, f64)) {
        let [m, a, b, slope] = affine;
        for (((y, dy), &v), &g) in y.iter_mut().zip(dy.iter_mut()).zip(x).zip(dz) {
            let value = (v - m) * a + b;
            *y = value;
            *dy = if value >= 0.0 { g } else { slope * g };
        }
        let share = crate::prelu::negative_part_sum(y, dz);
        let sum_dy = lane_sum(dy, x, #[inline(always)] |g, _| g);
        let sum_dy_centred = lane_sum(dy, x, #[inline(always)] |g, v| g * (v - m));
        (share, (sum_dy, sum_dy_centred))
    }
}

simd::multiversion! {
    /// One plane of [`batch_norm_prelu_backward_in_place_host`]'s second pass: `dz` becomes
    /// `dy` (through PReLU, `y` recomputed) and then `x_grad`, in one loop.
    fn prelu_then_x_grad_plane(
        x: &[f32],
        dz: &mut [f32],
        affine: [f32; 4],
        coefficients: [f32; 4],
    ) {
        let [m, a, b, slope] = affine;
        let [scale, grad_slope, mean_dy, _] = coefficients;
        for (g, &v) in dz.iter_mut().zip(x) {
            let y = (v - m) * a + b;
            let dy = if y >= 0.0 { *g } else { slope * *g };
            *g = scale * ((dy - mean_dy) - (v - m) * grad_slope);
        }
    }
}

/// Training-mode BatchNorm, PReLU, then a depthwise convolution without bias (`weight`
/// `[C, 1, k, k]`, `conv`'s geometry on `x`), as one op: `(convolution output, mean, biased
/// variance)`. One task per channel: its planes' statistics, then each plane normalised and
/// through PReLU into a scratch plane (in cache) and convolved from there, so the activation
/// between the two layers, MobileFaceNet's widest, is never written. The values are those of
/// [`batch_norm_prelu_train_host`] then [`crate::depthwise_conv2d_host`], bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_prelu_depthwise_train_host(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    alpha: &[f32],
    weight: &[f32],
    epsilon: f64,
    conv: &crate::Depthwise,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (channels, plane) = (gamma.len(), conv.height * conv.width);
    assert_eq!(
        conv.channels, channels,
        "one BatchNorm channel per depthwise channel"
    );
    assert_eq!(alpha.len(), channels, "one slope per channel");
    assert_eq!(x.len(), conv.batch * channels * plane, "input size");
    let taps = conv.kernel * conv.kernel;
    assert_eq!(weight.len(), channels * taps, "weight size");
    let (oh, ow) = conv.output_size();
    let mut statistics = vec![(0f32, 0f32); channels];
    let out = crate::filled(conv.batch * channels * oh * ow, |out| {
        let outputs = ChannelPlanes::new(out, channels, oh * ow);
        statistics.par_iter_mut().enumerate().for_each_init(
            || (vec![0f32; plane], Vec::new()),
            |(normalised, scratch), (c, statistics)| {
                let index = |n: usize| n * channels + c;
                let input = |n: usize| &x[index(n) * plane..][..plane];
                let moments: Vec<(f64, f64)> = (0..conv.batch)
                    .map(|n| plane_moments(input(n), &next_plane(n + 1, conv.batch, input)))
                    .collect();
                let (mean, var) = merge_moments(moments.into_iter(), plane);
                let scale = scale_of(gamma[c], var, epsilon);
                let kernel = &weight[c * taps..][..taps];
                let affine = [mean, scale, beta[c], alpha[c]];
                let fused = crate::flat::fuses(conv);
                for n in 0..conv.batch {
                    // The next output plane: requested line by line as the fused plane function
                    // works from cache, all at once before the other path.
                    let mut upcoming = Upcoming::default();
                    if n + 1 < conv.batch {
                        // SAFETY: as below; the plane is only used for its addresses, and
                        // released before it is taken again.
                        upcoming.writes = unsafe { outputs.get(index(n + 1)) };
                        if !fused {
                            simd::prefetch(upcoming.writes);
                        }
                    }
                    if fused {
                        // SAFETY: only this task, channel `c`'s, takes the planes of channel `c`.
                        let out = unsafe { outputs.get(index(n)) };
                        crate::flat::activated_forward_plane(
                            conv,
                            affine,
                            kernel,
                            input(n),
                            out,
                            scratch,
                            &upcoming,
                        );
                        continue;
                    }
                    normalise_prelu_plane(
                        as_uninit(normalised),
                        input(n),
                        mean,
                        scale,
                        beta[c],
                        alpha[c],
                    );
                    // SAFETY: only this task, channel `c`'s, takes the planes of channel `c`.
                    let out = unsafe { outputs.get(index(n)) };
                    crate::depthwise_plane_forward(conv, (kernel, 0.0), normalised, out, scratch);
                }
                *statistics = (mean, var);
            },
        );
    });
    let (mean, var) = statistics.into_iter().unzip();
    (out, mean, var)
}

/// The gradients of [`batch_norm_prelu_depthwise_train_host`] given its output's gradient
/// `grad`: `(x_grad, gamma_grad, beta_grad, alpha_grad, weight_grad)`. Per channel, first pass,
/// plane by plane: the convolution's input recomputed (normalised, through PReLU) for its
/// weight gradient, its input gradient written where `x_grad` goes, and the BatchNorm and PReLU
/// sums taken from it; second pass: that plane turned into `x_grad`, from cache. Neither the
/// convolution's input nor its gradient goes through memory. The values are those of the
/// depthwise convolution's gradients then [`batch_norm_prelu_backward_in_place_host`], bit for
/// bit.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn batch_norm_prelu_depthwise_backward_host(
    x: &[f32],
    grad: &[f32],
    gamma: &[f32],
    beta: &[f32],
    alpha: &[f32],
    weight: &[f32],
    (mean, var, epsilon): (&[f32], &[f32], f64),
    conv: &crate::Depthwise,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (channels, plane) = (gamma.len(), conv.height * conv.width);
    let (oh, ow) = conv.output_size();
    assert_eq!(grad.len(), conv.batch * channels * oh * ow, "gradient size");
    let taps = conv.kernel * conv.kernel;
    assert_eq!(weight.len(), channels * taps, "weight size");
    let backward = Backward::new(x, gamma, mean, var, epsilon, plane);
    let mut weight_grad = vec![0f32; channels * taps];
    let mut channel_grads = vec![(0f32, 0f32, 0f32); channels];
    let x_grad = crate::filled(x.len(), |x_grad| {
        let planes = ChannelPlanes::new(x_grad, channels, plane);
        channel_grads
            .par_iter_mut()
            .zip(weight_grad.par_chunks_mut(taps))
            .enumerate()
            .for_each_init(
                // Per task, kept across its channels: the flat kernels' padded planes are zeroed
                // once and only their interiors rewritten.
                || (Vec::new(), PreluSums::scratch(), Vec::new(), Vec::new()),
                |(normalised, sums_scratch, input_scratch, weight_scratch),
                 (c, (channel_grads, kernel_grad))| {
                    let (m, b, slope) = (mean[c], beta[c], alpha[c]);
                    let affine = [m, scale_of(gamma[c], var[c], epsilon), b, slope];
                    let kernel = &weight[c * taps..][..taps];
                    let mut sums = PreluSums::default();
                    let output_grad = |n: usize| &grad[backward.index(n, c) * oh * ow..][..oh * ow];
                    let fused = crate::flat::fuses(conv);
                    for n in 0..backward.samples {
                        // The next planes of channel `c`: requested line by line as the fused
                        // plane function works from cache, all at once before the other path.
                        let mut upcoming = Upcoming::default();
                        if n + 1 < backward.samples {
                            // SAFETY: as below; the plane is only read for its addresses, and
                            // released before it is taken again.
                            let next_grad: &[MaybeUninit<f32>] =
                                unsafe { planes.get(backward.index(n + 1, c)) };
                            upcoming.reads = [backward.input(n + 1, c), output_grad(n + 1)];
                            upcoming.writes = next_grad;
                            if !fused {
                                upcoming.reads.iter().for_each(|p| simd::prefetch(p));
                                simd::prefetch(next_grad);
                            }
                        }
                        let input = backward.input(n, c);
                        let g = output_grad(n);
                        // SAFETY: (both `get`s) only this task, channel `c`'s, takes the planes
                        // of channel `c`, and each plane is held once at a time.
                        let dz = unsafe { planes.get(backward.index(n, c)) };
                        if fused {
                            crate::flat::activated_gradients_plane(
                                conv,
                                affine,
                                kernel,
                                (input, g, &upcoming),
                                dz,
                                kernel_grad,
                                weight_scratch,
                            );
                        } else {
                            normalised.resize(plane, 0.0);
                            normalise_prelu_plane(
                                as_uninit(normalised),
                                input,
                                m,
                                affine[1],
                                b,
                                slope,
                            );
                            crate::depthwise_plane_weight_grad(
                                conv,
                                normalised,
                                g,
                                kernel_grad,
                                weight_scratch,
                            );
                            crate::depthwise_plane_input_grad(conv, kernel, g, dz, input_scratch);
                        }
                        // SAFETY: either path writes every value of the plane.
                        let dz = unsafe { assume_init(dz) };
                        sums.add((input, dz, &Upcoming::default()), affine, sums_scratch);
                    }
                    // SAFETY: as above; every value of each plane was written in the first pass.
                    *channel_grads = backward.prelu_x_grad_pass(c, affine, sums, |i| unsafe {
                        assume_init(planes.get(i))
                    });
                },
            );
    });
    let (gamma_grad, beta_grad, alpha_grad) = unzip3(channel_grads);
    (x_grad, gamma_grad, beta_grad, alpha_grad, weight_grad)
}

/// `values` as memory to write (it is initialised already, so nothing is lost).
fn as_uninit(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and only initialised values are
    // ever written through the result.
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// A plane every value of which has been written.
///
/// # Safety
/// Every element of `plane` must be initialised.
unsafe fn assume_init(plane: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: the caller's guarantee, and `MaybeUninit<f32>` has the layout of `f32`.
    unsafe { &mut *(plane as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// What the backward of every channel shares.
struct Backward<'a> {
    x: &'a [f32],
    gamma: &'a [f32],
    mean: &'a [f32],
    var: &'a [f32],
    epsilon: f64,
    plane: usize,
    samples: usize,
}

impl<'a> Backward<'a> {
    fn new(
        x: &'a [f32],
        gamma: &'a [f32],
        mean: &'a [f32],
        var: &'a [f32],
        epsilon: f64,
        plane: usize,
    ) -> Self {
        let samples = x.len() / (gamma.len() * plane).max(1);
        assert_eq!(x.len(), samples * gamma.len() * plane, "input size");
        Self {
            x,
            gamma,
            mean,
            var,
            epsilon,
            plane,
            samples,
        }
    }

    fn index(&self, n: usize, c: usize) -> usize {
        n * self.gamma.len() + c
    }

    fn input(&self, n: usize, c: usize) -> &'a [f32] {
        &self.x[self.index(n, c) * self.plane..][..self.plane]
    }

    /// Channel `c`'s `[a, slope, mean(dy), mean]` of `x_grad = a * ((dy - mean(dy)) - (x -
    /// mean) * slope)`, and its `(gamma_grad, beta_grad)`, from its planes' sums in sample
    /// order (the same bits on any thread count).
    fn channel<'g>(&self, c: usize, dy: impl Fn(usize) -> &'g [f32]) -> ([f32; 4], (f32, f32)) {
        let (sum_dy, sum_dy_centred) = (0..self.samples)
            .map(|n| {
                let upcoming = if n + 1 < self.samples {
                    Upcoming {
                        reads: [self.input(n + 1, c), dy(n + 1)],
                        writes: &[],
                    }
                } else {
                    Upcoming::default()
                };
                plane_backward_sums(self.input(n, c), dy(n), self.mean[c], &upcoming)
            })
            .fold((0f64, 0f64), |(a, b), (p, q)| (a + p, b + q));
        self.coefficients(c, sum_dy, sum_dy_centred)
    }

    /// [`Self::channel`] from the channel's `sum(dy)` and `sum(dy * (x - mean))`.
    fn coefficients(&self, c: usize, sum_dy: f64, sum_dy_centred: f64) -> ([f32; 4], (f32, f32)) {
        let count = (self.samples * self.plane) as f64;
        let inv_std = 1.0 / (self.var[c] as f64 + self.epsilon).sqrt();
        let sum_dy_xhat = sum_dy_centred * inv_std;
        let a = self.gamma[c] as f64 * inv_std;
        let slope = inv_std * sum_dy_xhat / count;
        let mean_dy = sum_dy / count;
        (
            [a as f32, slope as f32, mean_dy as f32, self.mean[c]],
            (sum_dy_xhat as f32, sum_dy as f32),
        )
    }

    /// The second pass of a BatchNorm + PReLU backward for channel `c` (`affine` `[m, scale,
    /// beta, slope]`): each plane `plane(index)` of the activation's gradient becomes `x_grad`,
    /// from cache. Returns the channel's `(gamma_grad, beta_grad, alpha_grad)`.
    fn prelu_x_grad_pass<'p>(
        &self,
        c: usize,
        affine: [f32; 4],
        sums: PreluSums,
        mut plane: impl FnMut(usize) -> &'p mut [f32],
    ) -> (f32, f32, f32) {
        let (coefficients, (gamma_grad, beta_grad)) =
            self.coefficients(c, sums.sum_dy, sums.sum_dy_centred);
        for n in 0..self.samples {
            let dz = plane(self.index(n, c));
            prelu_then_x_grad_plane(self.input(n, c), dz, affine, coefficients);
        }
        (gamma_grad, beta_grad, sums.alpha_grad)
    }
}

simd::multiversion! {
    /// A plane's `sum(dy)` and `sum(dy * (x - m))`, requesting the `upcoming` planes' lines in
    /// the first pass.
    fn plane_backward_sums(x: &[f32], dy: &[f32], m: f32, upcoming: &Upcoming) -> (f64, f64) {
        let sum_dy = lane_sum_requesting(dy, x, #[inline(always)] |g, _| g, upcoming);
        let sum_dy_centred = lane_sum(dy, x, #[inline(always)] |g, v| g * (v - m));
        (sum_dy, sum_dy_centred)
    }
}

simd::multiversion! {
    /// `x_grad` of one plane into a fresh buffer.
    fn x_grad_plane(out: &mut [MaybeUninit<f32>], x: &[f32], dy: &[f32], coefficients: [f32; 4]) {
        let [a, slope, mean_dy, m] = coefficients;
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
            o.write(a * ((g - mean_dy) - (v - m) * slope));
        }
    }
}

simd::multiversion! {
    /// `x_grad` of one plane written over its `dy`.
    fn x_grad_plane_in_place(dy: &mut [f32], x: &[f32], coefficients: [f32; 4]) {
        let [a, slope, mean_dy, m] = coefficients;
        for (g, &v) in dy.iter_mut().zip(x) {
            *g = a * ((*g - mean_dy) - (v - m) * slope);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The one-pass AVX-512 sums give the scratch version's bits, tails included.
        #[test]
        fn one_pass_backward_sums_equal_the_scratch_ones(
            values in prop::collection::vec((-4.0f32..4.0, -2.0f32..2.0), 1..120),
            m in -1.0f32..1.0,
            a in 0.1f32..3.0,
            b in -1.0f32..1.0,
            slope in -0.5f32..0.5,
        ) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let (x, dz): (Vec<f32>, Vec<f32>) = values.into_iter().unzip();
                let (mut y, mut dy) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                let affine = [m, a, b, slope];
                let scratch = prelu_backward_plane_sums_scratch(&x, &dz, &mut y, &mut dy, affine);
                // SAFETY: the CPU has AVX-512F (checked above).
                let one_pass =
                    unsafe { prelu_backward_plane_sums_avx512(&x, &dz, affine, &Upcoming::default()) };
                prop_assert_eq!(one_pass.0.to_bits(), scratch.0.to_bits());
                prop_assert_eq!(one_pass.1 .0.to_bits(), scratch.1 .0.to_bits());
                prop_assert_eq!(one_pass.1 .1.to_bits(), scratch.1 .1.to_bits());
            }
        }
    }
}
