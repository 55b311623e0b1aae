//! onnxruntime's dynamic uint8 quantisation (ONNX `DynamicQuantizeLinear`) of each image on its
//! own, in place on host memory: the input side of the native ONNX engine's int8 layers.
//!
//! Per image: the range widened to hold 0, `scale = (max - min) / 255` (1 for an all-zero
//! image, as onnxruntime's `GetQuantizationParameter`), `zero_point = round(-min / scale)`, and
//! each value `q = saturate(round(x / scale) + zero_point)`, rounding half to even. The values are
//! left centred, `q - zero_point`: integers, exact in f32, ready for a float convolution.

use rayon::prelude::*;

use crate::simd::{self, LANES};

/// 1.5 x 2^23: adding and subtracting it rounds an f32 below 2^22 in magnitude to an integer,
/// half to even (the FPU's rounding), in a form that vectorises; `round_ties_even` is a libm call
/// per value on baseline x86-64.
const ROUNDER: f32 = 12_582_912.0;

/// Quantises every `per_image` values of `x` (row-major `[N, per_image]`) as one image, in place
/// (see the module docs), and returns each image's scale.
pub fn quantize_u8_per_image_in_place(x: &mut [f32], per_image: usize) -> Vec<f32> {
    assert!(
        per_image > 0 && x.len().is_multiple_of(per_image),
        "{} values are not whole images of {per_image}",
        x.len()
    );
    x.par_chunks_mut(per_image)
        .map(|image| {
            let (lo, hi) = range(image);
            let (lo, hi) = (lo.min(0.0), hi.max(0.0));
            let scale = if hi == lo { 1.0 } else { (hi - lo) / 255.0 };
            // The ONNX operator: saturate, then round (-lo / scale lies in 0..=255 but for
            // rounding).
            let zero_point = round_even((-lo / scale).clamp(0.0, 255.0));
            quantize(image, scale, zero_point);
            scale
        })
        .collect()
}

#[inline(always)]
fn round_even(v: f32) -> f32 {
    (v + ROUNDER) - ROUNDER
}

simd::multiversion! {
    /// The smallest and largest value of `x` (NaN-free input).
    fn range(x: &[f32]) -> (f32, f32) {
        let mut lo = [f32::INFINITY; LANES];
        let mut hi = [f32::NEG_INFINITY; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for chunk in &mut chunks {
            // Comparisons, not `f32::min`: its NaN rule costs a blend per value, these are one
            // `vminps` / `vmaxps` each.
            for k in 0..LANES {
                lo[k] = if chunk[k] < lo[k] { chunk[k] } else { lo[k] };
                hi[k] = if chunk[k] > hi[k] { chunk[k] } else { hi[k] };
            }
        }
        for &v in chunks.remainder() {
            lo[0] = lo[0].min(v);
            hi[0] = hi[0].max(v);
        }
        (
            lo.iter().copied().fold(f32::INFINITY, f32::min),
            hi.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        )
    }
}

simd::multiversion! {
    /// `x <- saturate(round(x / scale) + zero_point) - zero_point`; `|x / scale| <= 255` by the
    /// choice of `scale`, far inside [`ROUNDER`]'s exact range.
    fn quantize(x: &mut [f32], scale: f32, zero_point: f32) {
        for v in x {
            let q = round_even(*v / scale) + zero_point;
            *v = q.clamp(0.0, 255.0) - zero_point;
        }
    }
}
