//! Hand-written CPU kernels, forward and backward, each with Burn's generic path as the fallback.
//!
//! [`prelu`] is a drop-in for `burn::tensor::activation::prelu` with one slope per channel: on
//! flex its output and both gradients take one pass each over the activation (`prelu.rs`).
//!
//! [`conv2d`] is a drop-in for `Conv2d::forward`. A depthwise convolution (one filter per channel)
//! on a host CPU device runs [`depthwise_conv2d_host`], a direct loop over each channel's plane,
//! split over the rayon threads: Burn's flex backend lowers a grouped convolution to one small
//! matrix product per group, which for depthwise filters (9 multiply-accumulates per output)
//! costs far more than the arithmetic. A dense one (groups = 1) on flex runs
//! [`dense_conv2d_host`], im2col and one large GEMM per chunk of images (`dense.rs` says why).
//! Both have their own backward on flex under autodiff. Every other case calls Burn.
//!
//! [`batch_norm_train`] and [`batch_norm`] are drop-ins for Burn's: on flex in f32, one pass each
//! for the statistics, the output and the gradients (`batchnorm.rs`).

mod batchnorm;
pub(crate) mod dense;
mod extension;
mod flat;
mod pointwise;
mod prelu;
mod quantize;
pub mod simd;

pub use dense::{
    dense_conv2d_host, dense_conv2d_input_grad_host, dense_conv2d_weight_grad_host, Dense,
};
pub use extension::{
    BatchNormAddBackend, BatchNormBackend, BatchNormPreluBackend, BatchNormPreluDepthwiseBackend,
    DenseConvBackend, DepthwiseBackend, PreluBackend,
};
pub use prelu::{
    bias_prelu_in_place_host, prelu_alpha_grad_host, prelu_backward_in_place_host, prelu_host,
    prelu_in_place_host, prelu_input_grad_host, prelu_input_grad_in_place_host,
};
pub use quantize::quantize_u8_per_image_in_place;

use burn::backend::Dispatch;
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use rayon::prelude::*;

/// A vector of `len` floats that `fill` writes, every one of them: a buffer the kernel overwrites
/// whole needs no zeroing pass first (`vec![0.0; len]` on reused heap memory is a `memset`,
/// 8 % of a MobileFaceNet train step over the BatchNorm and PReLU outputs).
pub(crate) fn filled(len: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialised the first `len` elements (every caller writes each element of
    // its output exactly once: outputs and inputs are zipped chunk for chunk, sizes asserted).
    unsafe { out.set_len(len) };
    out
}

/// `plane` of a [`filled`] buffer, zeroed for a kernel that adds into it: zeroed here, just
/// before the kernel writes it, it is in cache, where a `memset` of the whole buffer first is
/// one more pass over memory.
fn zeroed(plane: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    plane.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every element was initialised on the line above, and `MaybeUninit<f32>` has the
    // layout of `f32`.
    unsafe { &mut *(plane as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// Shape and hyper-parameters of a depthwise convolution on NCHW data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depthwise {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Square kernel side.
    pub kernel: usize,
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Depthwise {
    /// Output `(height, width)`, as PyTorch computes it.
    pub fn output_size(&self) -> (usize, usize) {
        let side = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (side(self.height), side(self.width))
    }

    /// The input row that output row `oy` reads through kernel row `ky`; `None` in the padding.
    #[inline(always)]
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.padding)
            .filter(|&iy| iy < self.height)
    }

    /// For kernel column `kx`: the output columns `first..end` whose input column lies inside
    /// the row, and the input column of `first` (the next ones follow at the stride).
    #[inline(always)]
    fn columns(&self, kx: usize, output_width: usize) -> Option<(usize, usize, usize)> {
        let (s, p) = (self.stride, self.padding);
        let first = p.saturating_sub(kx).div_ceil(s);
        let end = (self.width + p)
            .saturating_sub(kx)
            .div_ceil(s)
            .min(output_width);
        (first < end).then(|| (first, end, first * s + kx - p))
    }
}

impl Depthwise {
    /// Calls `f(ky, kx, iy, (first, end, start))` for every tap of output row `oy` whose input
    /// row `iy` and output columns `first..end` (input column `start` onwards, at the stride) lie
    /// inside the plane: the walk the forward and both gradients share.
    #[inline(always)]
    fn for_each_tap(
        &self,
        oy: usize,
        output_width: usize,
        mut f: impl FnMut(usize, usize, usize, (usize, usize, usize)),
    ) {
        for ky in 0..self.kernel {
            let Some(iy) = self.input_row(oy, ky) else {
                continue;
            };
            for kx in 0..self.kernel {
                if let Some(span) = self.columns(kx, output_width) {
                    f(ky, kx, iy, span);
                }
            }
        }
    }
}

/// Depthwise convolution on host memory: `input` `[N, C, H, W]`, `weight` `[C, 1, k, k]`, optional
/// `bias` `[C]`; returns `[N, C, OH, OW]`. Taps are added in row-major kernel order after the bias.
pub fn depthwise_conv2d_host(
    shape: &Depthwise,
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let Depthwise {
        channels: c,
        height: h,
        width: w,
        kernel: k,
        ..
    } = *shape;
    assert_eq!(input.len(), shape.batch * c * h * w, "input size");
    assert_eq!(weight.len(), c * k * k, "weight size");
    let (oh, ow) = shape.output_size();
    let len = shape.batch * c * oh * ow;
    if len == 0 {
        return Vec::new();
    }
    filled(len, |out| {
        out.par_chunks_mut(oh * ow)
            .zip(input.par_chunks(h * w))
            .enumerate()
            .for_each_init(Vec::new, |scratch, (plane, (out, input))| {
                let channel = plane % c;
                let taps = &weight[channel * k * k..(channel + 1) * k * k];
                let init = bias.map_or(0.0, |b| b[channel]);
                depthwise_plane_forward(shape, (taps, init), input, out, scratch);
            });
    })
}

/// One channel plane of [`depthwise_conv2d_host`] (`init`: the channel's bias, or 0), on the
/// path for `shape`: the flat 3 x 3 planes (`flat.rs`) or the general loops.
///
/// Writes every value of `out`: the flat planes straight, the general loops after zeroing it.
fn depthwise_plane_forward(
    shape: &Depthwise,
    (taps, init): (&[f32], f32),
    input: &[f32],
    out: &mut [std::mem::MaybeUninit<f32>],
    scratch: &mut Vec<f32>,
) {
    if flat::applies(shape) {
        flat::forward_plane(shape, taps, init, input, out, scratch);
    } else {
        depthwise_forward_plane(shape, taps, init, input, zeroed(out));
    }
}

/// One plane of [`depthwise_conv2d_input_grad_host`], on its path. Writes every value of
/// `grad`: the flat planes straight, the general loops (which add) after zeroing it.
fn depthwise_plane_input_grad(
    shape: &Depthwise,
    taps: &[f32],
    grad_output: &[f32],
    grad: &mut [std::mem::MaybeUninit<f32>],
    scratch: &mut Vec<f32>,
) {
    if flat::applies(shape) {
        flat::input_grad_plane(shape, taps, grad_output, grad, scratch);
    } else {
        depthwise_input_grad_plane(shape, taps, grad_output, zeroed(grad));
    }
}

/// One image's plane of [`depthwise_conv2d_weight_grad_host`] (adds onto `taps`), on its path.
fn depthwise_plane_weight_grad(
    shape: &Depthwise,
    input: &[f32],
    grad_output: &[f32],
    taps: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    if flat::applies(shape) {
        flat::weight_grad_plane(shape, input, grad_output, taps, scratch);
    } else {
        depthwise_weight_grad_plane(shape, input, grad_output, taps);
    }
}

simd::multiversion! {
    /// One channel plane of [`depthwise_conv2d_host`]: `out` `[OH, OW]` from `input` `[H, W]`.
    fn depthwise_forward_plane(
        shape: &Depthwise,
        taps: &[f32],
        init: f32,
        input: &[f32],
        out: &mut [f32],
    ) {
        let (k, s, w) = (shape.kernel, shape.stride, shape.width);
        let ow = shape.output_size().1;
        for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
            row.fill(init);
            shape.for_each_tap(oy, ow, #[inline(always)] |ky, kx, iy, (first, end, start)| {
                let tap = taps[ky * k + kx];
                let line = &input[iy * w..(iy + 1) * w];
                if s == 1 {
                    let line = &line[start..start + (end - first)];
                    for (o, v) in row[first..end].iter_mut().zip(line) {
                        *o += tap * v;
                    }
                } else {
                    for (o, v) in row[first..end]
                        .iter_mut()
                        .zip(line[start..].iter().step_by(s))
                    {
                        *o += tap * v;
                    }
                }
            });
        }
    }
}

/// The input gradient of [`depthwise_conv2d_host`]: `grad_output` `[N, C, OH, OW]` and `weight`
/// `[C, 1, k, k]` give `[N, C, H, W]`, each output's gradient scattered back onto the inputs its
/// taps read.
pub fn depthwise_conv2d_input_grad_host(
    shape: &Depthwise,
    grad_output: &[f32],
    weight: &[f32],
) -> Vec<f32> {
    let Depthwise {
        channels: c,
        height: h,
        width: w,
        kernel: k,
        ..
    } = *shape;
    let (oh, ow) = shape.output_size();
    assert_eq!(
        grad_output.len(),
        shape.batch * c * oh * ow,
        "gradient size"
    );
    assert_eq!(weight.len(), c * k * k, "weight size");
    let len = shape.batch * c * h * w;
    if len == 0 || oh * ow == 0 {
        return vec![0f32; len];
    }
    filled(len, |grad| {
        grad.par_chunks_mut(h * w)
            .zip(grad_output.par_chunks(oh * ow))
            .enumerate()
            .for_each_init(Vec::new, |scratch, (plane, (grad, grad_output))| {
                let taps = &weight[(plane % c) * k * k..(plane % c + 1) * k * k];
                depthwise_plane_input_grad(shape, taps, grad_output, grad, scratch);
            });
    })
}

simd::multiversion! {
    /// One channel plane of [`depthwise_conv2d_input_grad_host`]: adds onto `grad` `[H, W]`.
    fn depthwise_input_grad_plane(
        shape: &Depthwise,
        taps: &[f32],
        grad_output: &[f32],
        grad: &mut [f32],
    ) {
        let (k, s, w) = (shape.kernel, shape.stride, shape.width);
        let ow = shape.output_size().1;
        for (oy, row) in grad_output.chunks_exact(ow).enumerate() {
            shape.for_each_tap(oy, ow, #[inline(always)] |ky, kx, iy, (first, end, start)| {
                let tap = taps[ky * k + kx];
                let line = &mut grad[iy * w + start..][..(end - first - 1) * s + 1];
                if s == 1 {
                    for (g, o) in line.iter_mut().zip(&row[first..end]) {
                        *g += tap * o;
                    }
                } else {
                    // Indexing: `step_by` over a mutable slice does not vectorise and was
                    // 7x slower here.
                    for (j, o) in row[first..end].iter().enumerate() {
                        line[j * s] += tap * o;
                    }
                }
            });
        }
    }
}

/// The weight gradient of [`depthwise_conv2d_host`]: `input` `[N, C, H, W]` and `grad_output`
/// `[N, C, OH, OW]` give `[C, 1, k, k]`, each tap's products summed over the batch and the
/// output plane (per channel in parallel).
pub fn depthwise_conv2d_weight_grad_host(
    shape: &Depthwise,
    input: &[f32],
    grad_output: &[f32],
) -> Vec<f32> {
    let Depthwise {
        batch: n,
        channels: c,
        height: h,
        width: w,
        kernel: k,
        ..
    } = *shape;
    let (oh, ow) = shape.output_size();
    assert_eq!(input.len(), n * c * h * w, "input size");
    assert_eq!(grad_output.len(), n * c * oh * ow, "gradient size");
    let mut grad = vec![0f32; c * k * k];
    grad.par_chunks_mut(k * k)
        .enumerate()
        .for_each_init(Vec::new, |scratch, (channel, taps)| {
            let planes = |image: usize| {
                let plane = image * c + channel;
                (
                    &input[plane * h * w..(plane + 1) * h * w],
                    &grad_output[plane * oh * ow..(plane + 1) * oh * ow],
                )
            };
            for image in 0..n {
                if image + 1 < n {
                    let (input, grad_output) = planes(image + 1);
                    simd::prefetch(input);
                    simd::prefetch(grad_output);
                }
                let (input, grad_output) = planes(image);
                depthwise_plane_weight_grad(shape, input, grad_output, taps, scratch);
            }
        });
    grad
}

simd::multiversion! {
    /// One image's plane of [`depthwise_conv2d_weight_grad_host`]: adds onto the channel's `taps`.
    fn depthwise_weight_grad_plane(
        shape: &Depthwise,
        input: &[f32],
        grad_output: &[f32],
        taps: &mut [f32],
    ) {
        let (k, s, w) = (shape.kernel, shape.stride, shape.width);
        let ow = shape.output_size().1;
        for (oy, row) in grad_output.chunks_exact(ow).enumerate() {
            shape.for_each_tap(oy, ow, #[inline(always)] |ky, kx, iy, (first, end, start)| {
                let grads = &row[first..end];
                let line = &input[iy * w + start..][..(grads.len() - 1) * s + 1];
                taps[ky * k + kx] += if s == 1 {
                    dot(line, grads)
                } else {
                    grads.iter().enumerate().map(#[inline(always)] |(j, g)| line[j * s] * g).sum()
                };
            });
        }
    }
}

/// `a . b` with eight partial sums, which the compiler keeps in one vector register (a single
/// running sum must be added in order and does not vectorise).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Whether the kernels here run at all: `QUD_CPU_KERNELS=off` (or `0`, `false`) sends every op
/// to Burn's own implementation, for A/B checks and debugging. Read once per process.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        let off = std::env::var("QUD_CPU_KERNELS").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "off" | "0" | "false"
            )
        });
        if off {
            // This crate has no logging dependency; one line, once.
            eprintln!("QUD_CPU_KERNELS=off: Burn's own ops run instead of qud's CPU kernels");
        }
        !off
    })
}

/// A CPU backend whose tensors live in host memory (flex, ndarray), with the kernels enabled.
fn is_host_cpu(device: &Device) -> bool {
    if !enabled() {
        return false;
    }
    let name = format!("{:?}", device.as_dispatch());
    name.starts_with("Flex") || name.starts_with("NdArray")
}

/// `burn::tensor::activation::prelu` with one slope per channel (`alpha` `[C]`, `x` `[N, C, ...]`):
/// on flex in f32, autodiff or not, the host kernels of [`PreluBackend`]; Burn's otherwise.
pub fn prelu<const D: usize>(x: Tensor<D>, alpha: Tensor<1>) -> Tensor<D> {
    let f32 = burn::tensor::DType::F32;
    let channels_match = D >= 2 && alpha.dims()[0] == x.dims()[1];
    if !(channels_match && x.dtype() == f32 && alpha.dtype() == f32 && is_flex(&x.device())) {
        return burn::tensor::activation::prelu(x, alpha);
    }
    Tensor::from_dispatch(<Dispatch as PreluBackend>::prelu_channels(
        x.into_dispatch(),
        alpha.into_dispatch(),
    ))
}

/// The flex backend, with or without autodiff: the one the extensions here serve (when the
/// kernels are [`enabled`]).
fn is_flex(device: &Device) -> bool {
    enabled()
        && format!("{:?}", device.clone().without_autodiff().as_dispatch()).starts_with("Flex")
}

/// Batch statistics per channel and the normalised output, as `burn::tensor::module::batch_norm_train`.
pub struct BatchNormTrain<const D: usize> {
    pub output: Tensor<D>,
    pub mean: Tensor<1>,
    /// Biased (divided by the number of values per channel).
    pub variance: Tensor<1>,
}

impl<const D: usize> BatchNormTrain<D> {
    /// A backend extension's `(output, mean, biased variance)`.
    fn from_dispatch(
        (output, mean, variance): (
            burn::backend::tensor::FloatTensor<Dispatch>,
            burn::backend::tensor::FloatTensor<Dispatch>,
            burn::backend::tensor::FloatTensor<Dispatch>,
        ),
    ) -> Self {
        Self {
            output: Tensor::from_dispatch(output),
            mean: Tensor::from_dispatch(mean),
            variance: Tensor::from_dispatch(variance),
        }
    }
}

/// [`batch_norm_prelu_train`] then `conv` (a depthwise convolution) on its output, as one op:
/// the result's `output` is the convolution's, `mean` and `variance` the BatchNorm's. On flex in
/// f32 with a depthwise `conv` without bias, the host kernels of
/// [`BatchNormPreluDepthwiseBackend`], which never store the activation between the two layers
/// (neither forward nor for the backward, which recomputes it per plane); the two ops
/// otherwise. The same values either way, bit for bit on flex.
pub fn batch_norm_prelu_depthwise_train(
    x: Tensor<4>,
    (gamma, beta, alpha): (Tensor<1>, Tensor<1>, Tensor<1>),
    conv: &Conv2d,
    epsilon: f64,
) -> BatchNormTrain<4> {
    let shape = depthwise_shape(conv, &x);
    let fused = batch_norm_on_host(&x)
        && alpha.dtype() == burn::tensor::DType::F32
        && alpha.dims()[0] == x.dims()[1]
        && conv.bias.is_none()
        && conv.weight.val().dtype() == burn::tensor::DType::F32
        // One channel: `conv2d` takes it as a dense convolution; the two ops then.
        && dense_shape(conv, &x).is_none();
    let shape = match shape {
        Some(shape) if fused => shape,
        _ => {
            let result = batch_norm_prelu_train(x, gamma, beta, alpha, epsilon);
            return BatchNormTrain {
                output: conv2d(conv, result.output),
                ..result
            };
        }
    };
    BatchNormTrain::from_dispatch(
        <Dispatch as BatchNormPreluDepthwiseBackend>::batch_norm_prelu_depthwise_train(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            alpha.into_dispatch(),
            conv.weight.val().into_dispatch(),
            shape.stride,
            shape.padding,
            epsilon,
        ),
    )
}

/// Whether the batch-norm kernels serve `x`: f32 on flex, with planes (everything after the
/// channel dimension) long enough to stream through. `[N, C]` features go to Burn.
fn batch_norm_on_host<const D: usize>(x: &Tensor<D>) -> bool {
    let plane: usize = x.dims()[2.min(D)..].iter().product();
    D >= 3 && plane >= 8 && x.dtype() == burn::tensor::DType::F32 && is_flex(&x.device())
}

/// `burn::tensor::module::batch_norm_train` (channels on dimension 1): on flex in f32, the host
/// kernels of [`BatchNormBackend`], one pass each for the statistics, the output and, under
/// autodiff, each gradient; Burn's otherwise. The statistics are constants (no graph).
pub fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> BatchNormTrain<D> {
    if !batch_norm_on_host(&x) {
        let result = burn::tensor::module::batch_norm_train(x, gamma, beta, epsilon);
        return BatchNormTrain {
            output: result.output,
            mean: result.mean.detach(),
            variance: result.variance.detach(),
        };
    }
    BatchNormTrain::from_dispatch(<Dispatch as BatchNormBackend>::batch_norm_train_channels(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    ))
}

/// [`batch_norm_train`] with `shortcut` (`x`'s shape) added to its output, a residual unit's
/// last BatchNorm and sum: on flex in f32, one op ([`BatchNormAddBackend`]) that writes the sum
/// as it normalises, in parallel over the channels, where the sum alone was one more pass over
/// memory on one thread; the two ops otherwise. The same values either way, bit for bit on
/// flex. `output` is the sum.
pub fn batch_norm_add_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    shortcut: Tensor<D>,
    epsilon: f64,
) -> BatchNormTrain<D> {
    if !batch_norm_on_host(&x) || shortcut.dims() != x.dims() || shortcut.dtype() != x.dtype() {
        let result = batch_norm_train(x, gamma, beta, epsilon);
        return BatchNormTrain {
            output: shortcut + result.output,
            ..result
        };
    }
    BatchNormTrain::from_dispatch(
        <Dispatch as BatchNormAddBackend>::batch_norm_add_train_channels(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            shortcut.into_dispatch(),
            epsilon,
        ),
    )
}

/// [`batch_norm_train`] then [`prelu`] (slopes `alpha` `[C]`): on flex in f32, one op whose
/// BatchNorm output is never stored (forward or for the backward, which recomputes it); the two
/// ops otherwise. The same values either way.
pub fn batch_norm_prelu_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    alpha: Tensor<1>,
    epsilon: f64,
) -> BatchNormTrain<D> {
    let fused = batch_norm_on_host(&x)
        && alpha.dtype() == burn::tensor::DType::F32
        && alpha.dims()[0] == x.dims()[1];
    if !fused {
        let result = batch_norm_train(x, gamma, beta, epsilon);
        return BatchNormTrain {
            output: prelu(result.output, alpha),
            ..result
        };
    }
    BatchNormTrain::from_dispatch(
        <Dispatch as BatchNormPreluBackend>::batch_norm_prelu_train_channels(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            alpha.into_dispatch(),
            epsilon,
        ),
    )
}

/// `burn::tensor::module::batch_norm` (given statistics): on flex in f32 outside autodiff, one
/// pass of `(x - mean) * scale + beta` per channel, over `x`'s own buffer when nothing else holds it.
pub fn batch_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    variance: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    if x.device().is_autodiff() || !batch_norm_on_host(&x) {
        return burn::tensor::module::batch_norm(x, gamma, beta, mean, variance, epsilon);
    }
    Tensor::from_dispatch(<Dispatch as BatchNormBackend>::batch_norm_channels(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        mean.into_dispatch(),
        variance.into_dispatch(),
        epsilon,
    ))
}

/// The zero padding of `conv` when it is the same on all four sides.
fn symmetric_padding(conv: &Conv2d) -> Option<usize> {
    match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right)
            if top == left && top == bottom && top == right =>
        {
            Some(top)
        }
        PaddingConfig2d::Valid => Some(0),
        _ => None,
    }
}

/// The depthwise parameters of `conv` on `input`, when the host kernel applies to it.
fn depthwise_shape(conv: &Conv2d, input: &Tensor<4>) -> Option<Depthwise> {
    let [batch, channels, height, width] = input.dims();
    let [out, per_group, kh, kw] = conv.weight.dims();
    let padding = symmetric_padding(conv)?;
    let applies = conv.groups == channels
        && out == channels
        && per_group == 1
        && kh == kw
        && conv.stride[0] == conv.stride[1]
        && conv.dilation == [1, 1]
        && height + 2 * padding >= kh
        && width + 2 * padding >= kw;
    applies.then_some(Depthwise {
        batch,
        channels,
        height,
        width,
        kernel: kh,
        stride: conv.stride[0],
        padding,
    })
}

/// The dense parameters of `conv` on `input`, when the host kernel applies to it.
fn dense_shape(conv: &Conv2d, input: &Tensor<4>) -> Option<Dense> {
    let [batch, in_channels, height, width] = input.dims();
    let [out_channels, per_group, kh, kw] = conv.weight.dims();
    let padding = symmetric_padding(conv)?;
    let applies = conv.groups == 1
        && per_group == in_channels
        && kh == kw
        && conv.stride[0] == conv.stride[1]
        && conv.dilation == [1, 1]
        && height + 2 * padding >= kh
        && width + 2 * padding >= kw;
    applies.then_some(Dense {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel: kh,
        stride: conv.stride[0],
        padding,
    })
}

/// `out` plus `conv`'s bias (`[O]`) on every output channel, when it has one.
fn with_bias(conv: &Conv2d, out: Tensor<4>) -> Tensor<4> {
    match &conv.bias {
        Some(bias) => {
            let channels = bias.dims()[0];
            out + bias.val().reshape([1, channels, 1, 1])
        }
        None => out,
    }
}

/// `conv.forward(input)`, through the host kernels when `input` is f32 and `conv` is depthwise
/// or dense (groups = 1): on flex as a backend extension (inference and training: the backward
/// pass is host kernels too); for depthwise also on the other host CPU backends outside autodiff
/// by reading the data out; through Burn otherwise (GPUs, f16 / bf16, other shapes).
pub fn conv2d(conv: &Conv2d, input: Tensor<4>) -> Tensor<4> {
    let device = input.device();
    let f32 = input.dtype() == burn::tensor::DType::F32;
    if f32 && is_flex(&device) {
        // 1 x 1 layers too, in inference as well: image by image into unzeroed buffers, this
        // kernel's forward took MobileFaceNet's 1 x 1 layers from 140-145 ms (flex's own path)
        // to 105-107 ms of a batch-64 forward (`cargo xtask bench backbones`' breakdown).
        if let Some(shape) = dense_shape(conv, &input) {
            let out = <Dispatch as DenseConvBackend>::dense_conv2d(
                input.into_dispatch(),
                conv.weight.val().into_dispatch(),
                shape.stride,
                shape.padding,
            );
            return with_bias(conv, Tensor::from_dispatch(out));
        }
    }
    let shape = match depthwise_shape(conv, &input) {
        Some(shape) if f32 => shape,
        _ => return conv.forward(input),
    };
    if is_flex(&device) {
        let out = <Dispatch as DepthwiseBackend>::depthwise_conv2d(
            input.into_dispatch(),
            conv.weight.val().into_dispatch(),
            shape.stride,
            shape.padding,
        );
        return with_bias(conv, Tensor::from_dispatch(out));
    }
    if device.is_autodiff() || !is_host_cpu(&device) {
        return conv.forward(input);
    }
    // Taking the tensor's data moves its buffer out when nothing else holds it, and the slices
    // below borrow it: no copy on the way in.
    let x = input.into_data();
    let weight = conv
        .weight
        .val()
        .reshape([shape.channels * shape.kernel * shape.kernel])
        .into_data();
    let bias = conv.bias.as_ref().map(|b| b.val().into_data());
    let slice = |d: &TensorData| -> Vec<f32> { d.try_to_vec::<f32>().expect("f32 parameters") };
    let (weight, bias) = (slice(&weight), bias.as_ref().map(slice));
    let x = x.as_slice::<f32>().expect("an f32 tensor's data is f32");
    let out = depthwise_conv2d_host(&shape, x, &weight, bias.as_deref());
    let (oh, ow) = shape.output_size();
    Tensor::from_data(
        TensorData::new(out, [shape.batch, shape.channels, oh, ow]),
        &device,
    )
}

#[cfg(test)]
mod tests;
