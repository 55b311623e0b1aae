//! Dense convolution (groups = 1) on host memory: im2col and one large matrix product per chunk
//! of images, for the forward pass and both gradients.
//!
//! Flex builds im2col tiles of at most 512 output positions, one image at a time, and multiplies
//! each tile by the whole weight matrix, so the GEMM repacks the weights for every tile: in
//! iresnet50's last stage (7 x 7 outputs, 512 x 4,608 weights) that is a 9.4 MB repack per 49
//! outputs. It also converts every input to NHWC on one thread first. Here the columns of a chunk
//! of images go through one product, with chunks sized to give the GEMM at least
//! [`MIN_COLUMNS`] columns while the column matrix stays under [`COLUMN_BUDGET`] floats, and the
//! chunks run on the rayon threads.

use crate::simd;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Columns a product should have before chunking stops adding images.
const MIN_COLUMNS: usize = 1024;
/// Largest column matrix, in f32 values (16 MB), that chunking builds.
const COLUMN_BUDGET: usize = 4 << 20;

/// Shape and hyper-parameters of a dense convolution on NCHW data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dense {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    /// Square kernel side.
    pub kernel: usize,
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Dense {
    /// Output `(height, width)`, as PyTorch computes it.
    #[inline(always)]
    pub fn output_size(&self) -> (usize, usize) {
        let side = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (side(self.height), side(self.width))
    }

    fn positions(&self) -> usize {
        let (oh, ow) = self.output_size();
        oh * ow
    }

    /// Rows of the column matrix: one per (input channel, kernel row, kernel column), the order
    /// of a PyTorch weight `[O, C, k, k]` read as `[O, C k k]`.
    fn rows(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// A 1 x 1 convolution that reads every input position once: its column matrix for one
    /// image is the image itself.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Images per chunk: every chunk but the last has this many.
    fn images_per_chunk(&self) -> usize {
        // A 1 x 1 convolution multiplies each image where it lies. Gathering images into one
        // wider product costs two copies of the activation (`group`, `ungroup`), more than the
        // wider product saves even at 7 x 7 positions: MobileFaceNet train step at batch 32,
        // 44 samples/s gathering up to 1,024 columns, 48 one image at a time.
        if self.is_pointwise() {
            return 1;
        }
        self.chunk_images(self.positions(), self.rows(), MIN_COLUMNS, COLUMN_BUDGET)
    }

    /// Images per chunk for products of `columns` columns an image and `floats` scratch values
    /// a column: at least `min_columns` columns when `budget` values allow it.
    fn chunk_images(
        &self,
        columns: usize,
        floats: usize,
        min_columns: usize,
        budget: usize,
    ) -> usize {
        let columns = columns.max(1);
        let wanted = min_columns.div_ceil(columns);
        let affordable = (budget / (floats * columns).max(1)).max(1);
        let per = wanted.min(affordable).clamp(1, self.batch.max(1));
        // Even chunks, and at least one per thread when the batch allows it.
        let threads = rayon::current_num_threads().max(1);
        let chunks = self.batch.div_ceil(per).next_multiple_of(threads);
        self.batch.div_ceil(chunks.min(self.batch).max(1)).max(1)
    }

    /// For kernel offset `k` along an axis of `size` inputs and `outputs` outputs: the outputs
    /// `first..end` that read inside the input, and the input index of `first`.
    #[inline(always)]
    fn valid_span(&self, k: usize, size: usize, outputs: usize) -> (usize, usize, usize) {
        let (s, p) = (self.stride, self.padding);
        let first = p.saturating_sub(k).div_ceil(s).min(outputs);
        let end = (size + p).saturating_sub(k).div_ceil(s).min(outputs);
        if first >= end {
            return (0, 0, 0);
        }
        (first, end, first * s + k - p)
    }
}

thread_local! {
    /// Column matrices reused across calls on the same thread: a fresh 16 MB buffer would fault
    /// in 4,096 pages each time.
    static SCRATCH: RefCell<[Vec<f32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` with two scratch buffers of `a` and `b` values (contents unspecified). A nested call
/// on the same thread (rayon work stealing inside a product) gets fresh buffers.
fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let [mut first, mut second] = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    first.resize(a, 0.0);
    second.resize(b, 0.0);
    let result = f(&mut first[..a], &mut second[..b]);
    SCRATCH.with(|s| *s.borrow_mut() = [first, second]);
    result
}

/// Runs `f(chunk index, chunk of out, parallelism)` over `out` cut into pieces of `chunk_len`:
/// the chunks in parallel when there are enough of them to occupy the threads, one after the
/// other with a parallel product otherwise.
fn for_each_chunk<F>(out: &mut [f32], chunk_len: usize, f: F)
where
    F: Fn(usize, &mut [f32], Parallelism) + Sync + Send,
{
    let chunks = out.len().div_ceil(chunk_len.max(1));
    if chunks >= rayon::current_num_threads() {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, o)| f(i, o, Parallelism::None));
    } else {
        out.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, o)| f(i, o, Parallelism::Rayon(0)));
    }
}

/// `dst[m x n] (+)= lhs[m x k] * rhs[k x n]`, every matrix given by (column, row) strides.
#[allow(clippy::too_many_arguments)]
fn product(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    dst_strides: (isize, isize),
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (isize, isize),
    rhs: &[f32],
    rhs_strides: (isize, isize),
    parallelism: Parallelism,
) {
    let dst = (dst.as_mut_ptr(), dst.len(), dst_strides);
    // SAFETY: `dst` is a valid, exclusively borrowed slice of initialised values.
    unsafe {
        product_raw(
            dims,
            dst,
            accumulate,
            (lhs, lhs_strides),
            (rhs, rhs_strides),
            parallelism,
        )
    }
}

/// [`product`] into memory nothing has written yet, which it initialises: every element the
/// strides reach is written.
#[allow(clippy::too_many_arguments)]
fn product_into_uninit(
    dims: (usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    dst_strides: (isize, isize),
    lhs: &[f32],
    lhs_strides: (isize, isize),
    rhs: &[f32],
    rhs_strides: (isize, isize),
    parallelism: Parallelism,
) {
    let dst = (dst.as_mut_ptr().cast::<f32>(), dst.len(), dst_strides);
    // SAFETY: `dst` is exclusively borrowed. With `accumulate` false `gemm` never loads from
    // it: gemm-common 0.19 sets alpha to zero when `read_dst` is false, and its kernels store
    // `beta * lhs * rhs` without reading `dst` at alpha zero (later depth blocks read only
    // what the first one stored); for k = 0 it stores zeros.
    unsafe {
        product_raw(
            dims,
            dst,
            false,
            (lhs, lhs_strides),
            (rhs, rhs_strides),
            parallelism,
        )
    }
}

/// The call to `gemm` behind [`product`] and [`product_into_uninit`].
///
/// # Safety
/// `dst` (pointer, length, strides) must be exclusively this call's, and initialised when
/// `accumulate` is set.
unsafe fn product_raw(
    (m, n, k): (usize, usize, usize),
    (dst, dst_len, dst_strides): (*mut f32, usize, (isize, isize)),
    accumulate: bool,
    (lhs, lhs_strides): (&[f32], (isize, isize)),
    (rhs, rhs_strides): (&[f32], (isize, isize)),
    parallelism: Parallelism,
) {
    let last = |(cs, rs): (isize, isize), rows: usize, cols: usize| {
        (rows.saturating_sub(1) as isize * rs + cols.saturating_sub(1) as isize * cs) as usize
    };
    assert!(m * n == 0 || last(dst_strides, m, n) < dst_len);
    assert!(m * k == 0 || last(lhs_strides, m, k) < lhs.len());
    assert!(k * n == 0 || last(rhs_strides, k, n) < rhs.len());
    // SAFETY: the asserts above keep every element the strides reach inside its slice, and
    // the caller lends `dst` exclusively, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_strides.0,
            dst_strides.1,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.0,
            lhs_strides.1,
            rhs.as_ptr(),
            rhs_strides.0,
            rhs_strides.1,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A 1 x 1 convolution's forward (`weight` `[O, C]` times each image `[C, P]`) or input
/// gradient (`weight^T` times each `[O, P]` gradient), one product per image written straight
/// into the new buffer: no zeroing pass first.
fn pointwise_products(
    s: &Dense,
    (inputs, input_len): (&[f32], usize),
    output_len: usize,
    (weight, weight_strides): (&[f32], (isize, isize)),
    (m, k): (usize, usize),
) -> Vec<f32> {
    let positions = s.positions();
    if crate::pointwise::available() {
        let (columns, rows) = weight_strides;
        let lhs =
            crate::pointwise::PackedLhs::new(weight, (m, k), (rows as usize, columns as usize));
        let threads = rayon::current_num_threads();
        return crate::filled(s.batch * output_len, |out| {
            if s.batch < threads {
                // Fewer images than threads: each image's rows split between them.
                let per = m.div_ceil(threads).next_multiple_of(crate::pointwise::ROWS);
                for (out, x) in out.chunks_mut(output_len).zip(inputs.chunks(input_len)) {
                    out.par_chunks_mut(per * positions)
                        .enumerate()
                        .for_each(|(part, out)| {
                            crate::pointwise::product(&lhs, (x, positions), (part * per, out), None)
                        });
                }
                return;
            }
            // The address only: the next image's output is requested, never touched here.
            let base = out.as_ptr() as usize;
            let next = |n: usize| {
                (n + 1 < s.batch).then(|| {
                    let out = base + (n + 1) * output_len * std::mem::size_of::<f32>();
                    (
                        &inputs[(n + 1) * input_len..][..input_len],
                        out as *const f32,
                    )
                })
            };
            out.par_chunks_mut(output_len)
                .zip(inputs.par_chunks(input_len))
                .enumerate()
                .for_each(|(n, (out, x))| {
                    crate::pointwise::product(&lhs, (x, positions), (0, out), next(n))
                });
        });
    }
    crate::filled(s.batch * output_len, |out| {
        let image = |(out, x): (&mut [MaybeUninit<f32>], &[f32]), parallelism| {
            product_into_uninit(
                (m, positions, k),
                out,
                (1, positions as isize),
                weight,
                weight_strides,
                x,
                (1, positions as isize),
                parallelism,
            )
        };
        let images = out.chunks_mut(output_len).zip(inputs.chunks(input_len));
        if s.batch >= rayon::current_num_threads() {
            out.par_chunks_mut(output_len)
                .zip(inputs.par_chunks(input_len))
                .for_each(|pair| image(pair, Parallelism::None));
        } else {
            images.for_each(|pair| image(pair, Parallelism::Rayon(0)));
        }
    })
}

simd::multiversion! {
    /// The column matrix `[C k k, images x OH x OW]` of the images `first..first + count`.
    fn im2col(s: &Dense, x: &[f32], first: usize, count: usize, col: &mut [f32]) {
        let (oh, ow) = s.output_size();
        let (plane, image) = (s.height * s.width, s.in_channels * s.height * s.width);
        let columns = count * oh * ow;
        for c in 0..s.in_channels {
            for ky in 0..s.kernel {
                let (y0, y1, iy0) = s.valid_span(ky, s.height, oh);
                for kx in 0..s.kernel {
                    let (x0, x1, ix0) = s.valid_span(kx, s.width, ow);
                    let row = (c * s.kernel + ky) * s.kernel + kx;
                    let row = &mut col[row * columns..(row + 1) * columns];
                    for i in 0..count {
                        let src = &x[(first + i) * image + c * plane..][..plane];
                        let dst = &mut row[i * oh * ow..(i + 1) * oh * ow];
                        for (oy, out) in dst.chunks_exact_mut(ow).enumerate() {
                            if oy < y0 || oy >= y1 || x0 >= x1 {
                                out.fill(0.0);
                                continue;
                            }
                            let line = &src[(iy0 + (oy - y0) * s.stride) * s.width..][..s.width];
                            out[..x0].fill(0.0);
                            out[x1..].fill(0.0);
                            if s.stride == 1 {
                                out[x0..x1].copy_from_slice(&line[ix0..ix0 + (x1 - x0)]);
                            } else {
                                for (o, v) in out[x0..x1]
                                    .iter_mut()
                                    .zip(line[ix0..].iter().step_by(s.stride))
                                {
                                    *o = *v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds the column-matrix gradient `[C k k, images x OH x OW]` back onto the input gradient of
/// the chunk's images (`dx`, `[images, C, H, W]`): the transpose of [`im2col`].
fn col2im(s: &Dense, dcol: &[f32], count: usize, dx: &mut [f32]) {
    let (oh, ow) = s.output_size();
    let (plane, image) = (s.height * s.width, s.in_channels * s.height * s.width);
    let columns = count * oh * ow;
    for i in 0..count {
        for c in 0..s.in_channels {
            let dst = &mut dx[i * image + c * plane..][..plane];
            for ky in 0..s.kernel {
                let (y0, y1, iy0) = s.valid_span(ky, s.height, oh);
                for kx in 0..s.kernel {
                    let (x0, x1, ix0) = s.valid_span(kx, s.width, ow);
                    if x0 >= x1 {
                        continue;
                    }
                    let row = (c * s.kernel + ky) * s.kernel + kx;
                    let src = &dcol[row * columns + i * oh * ow..][..oh * ow];
                    for oy in y0..y1 {
                        let from = &src[oy * ow + x0..oy * ow + x1];
                        let iy = iy0 + (oy - y0) * s.stride;
                        let line = &mut dst[iy * s.width..][..s.width];
                        if s.stride == 1 {
                            for (d, g) in line[ix0..ix0 + from.len()].iter_mut().zip(from) {
                                *d += g;
                            }
                        } else {
                            for (d, g) in line[ix0..].iter_mut().step_by(s.stride).zip(from) {
                                *d += g;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `[images, R, P]` (as NCHW lays out a chunk) into `[R, images x P]` (as the products want it).
fn group(rows: usize, positions: usize, count: usize, nchw: &[f32], grouped: &mut [f32]) {
    for i in 0..count {
        for r in 0..rows {
            grouped[r * count * positions + i * positions..][..positions]
                .copy_from_slice(&nchw[(i * rows + r) * positions..][..positions]);
        }
    }
}

/// The inverse of [`group`].
fn ungroup(rows: usize, positions: usize, count: usize, grouped: &[f32], nchw: &mut [f32]) {
    for i in 0..count {
        for r in 0..rows {
            nchw[(i * rows + r) * positions..][..positions]
                .copy_from_slice(&grouped[r * count * positions + i * positions..][..positions]);
        }
    }
}

/// Dense convolution without bias: `x` `[N, C, H, W]`, `weight` `[O, C, k, k]`; returns
/// `[N, O, OH, OW]`.
pub fn dense_conv2d_host(s: &Dense, x: &[f32], weight: &[f32]) -> Vec<f32> {
    if winograd_applies(s) {
        return winograd_conv2d(s, x, weight);
    }
    im2col_conv2d(s, x, weight)
}

/// The forward pass through im2col: any kernel and stride.
fn im2col_conv2d(s: &Dense, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (rows, positions, o) = (s.rows(), s.positions(), s.out_channels);
    if s.is_pointwise() {
        let image = (x, rows * positions);
        return pointwise_products(
            s,
            image,
            o * positions,
            (weight, (1, rows as isize)),
            (o, rows),
        );
    }
    let per = s.images_per_chunk();
    let mut out = vec![0.0f32; s.batch * o * positions];
    if out.is_empty() {
        return out;
    }
    for_each_chunk(&mut out, per * o * positions, |chunk, out, parallelism| {
        let (first, count) = (chunk * per, out.len() / (o * positions));
        let n = count * positions;
        let weights = (weight, (1, rows as isize));
        with_scratch(
            rows * n,
            if count == 1 { 0 } else { o * n },
            |col, grouped| {
                im2col(s, x, first, count, col);
                let (lhs, lhs_strides) = weights;
                if count == 1 {
                    product(
                        (o, n, rows),
                        out,
                        (1, n as isize),
                        false,
                        lhs,
                        lhs_strides,
                        col,
                        (1, n as isize),
                        parallelism,
                    );
                } else {
                    product(
                        (o, n, rows),
                        grouped,
                        (1, n as isize),
                        false,
                        lhs,
                        lhs_strides,
                        col,
                        (1, n as isize),
                        parallelism,
                    );
                    ungroup(o, positions, count, grouped, out);
                }
            },
        );
    });
    out
}

/// The input gradient `[N, C, H, W]` from the output gradient `[N, O, OH, OW]` and the weight.
pub fn dense_conv2d_input_grad_host(s: &Dense, grad: &[f32], weight: &[f32]) -> Vec<f32> {
    let (rows, positions, o) = (s.rows(), s.positions(), s.out_channels);
    if s.is_pointwise() {
        // W^T: element (row r, output channel j) of the [C, O] matrix is weight[j * rows + r].
        let weights_t = (weight, (rows as isize, 1));
        return pointwise_products(
            s,
            (grad, o * positions),
            rows * positions,
            weights_t,
            (rows, o),
        );
    }
    let per = s.images_per_chunk();
    let image = s.in_channels * s.height * s.width;
    let mut dx = vec![0.0f32; s.batch * image];
    if dx.is_empty() {
        return dx;
    }
    // W^T: element (row r, output channel j) of the [C k k, O] matrix is weight[j * rows + r].
    let weights_t = (rows as isize, 1);
    for_each_chunk(&mut dx, per * image, |chunk, dx, parallelism| {
        let (first, count) = (chunk * per, dx.len() / image);
        let n = count * positions;
        let dy = &grad[first * o * positions..][..n * o];
        with_scratch(
            rows * n,
            if count == 1 { 0 } else { o * n },
            |dcol, grouped| {
                let dy: &[f32] = if count == 1 {
                    dy
                } else {
                    group(o, positions, count, dy, grouped);
                    grouped
                };
                product(
                    (rows, n, o),
                    dcol,
                    (1, n as isize),
                    false,
                    weight,
                    weights_t,
                    dy,
                    (1, n as isize),
                    parallelism,
                );
                col2im(s, dcol, count, dx);
            },
        );
    });
    dx
}

/// The weight gradient `[O, C, k, k]` from the input `[N, C, H, W]` and the output gradient.
/// Summed per thread over a fixed split of the batch, then over the threads in order: the same
/// bits on every run with the same thread count.
pub fn dense_conv2d_weight_grad_host(s: &Dense, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (rows, positions, o) = (s.rows(), s.positions(), s.out_channels);
    let per = s.images_per_chunk();
    let chunks = s.batch.div_ceil(per);
    let threads = rayon::current_num_threads().clamp(1, chunks.max(1));
    let parallel_chunks = chunks >= rayon::current_num_threads();
    let parallelism = if parallel_chunks {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    };
    // gemm packs the operand whose rows run along the output's columns by gathering each value
    // apart (both operands hold the summed positions contiguously): computing `dW^T` instead
    // when it has fewer rows makes that the output gradient, the smaller of the two in a
    // MobileFaceNet projection (`[O, P]` against `[4 O, P]` of input).
    let transposed = o < rows;
    let dw_strides = if transposed {
        (o as isize, 1)
    } else {
        (1, rows as isize)
    };
    let partial = |part: usize| {
        let mut dw = vec![0.0f32; o * rows];
        let (start, end) = (part * chunks / threads, (part + 1) * chunks / threads);
        for chunk in start..end {
            let first = chunk * per;
            let count = per.min(s.batch - first);
            let n = count * positions;
            let dy = &grad[first * o * positions..][..n * o];
            let accumulate = chunk > start;
            // dW[O, C k k] += dY[O, n] * col[C k k, n]^T.
            if count == 1 && s.is_pointwise() {
                let image = s.in_channels * s.height * s.width;
                let x = &x[first * image..][..image];
                product(
                    (o, rows, n),
                    &mut dw,
                    dw_strides,
                    accumulate,
                    dy,
                    (1, n as isize),
                    x,
                    (n as isize, 1),
                    parallelism,
                );
                continue;
            }
            with_scratch(
                rows * n,
                if count == 1 { 0 } else { o * n },
                |col, grouped| {
                    im2col(s, x, first, count, col);
                    let dy: &[f32] = if count == 1 {
                        dy
                    } else {
                        group(o, positions, count, dy, grouped);
                        grouped
                    };
                    product(
                        (o, rows, n),
                        &mut dw,
                        dw_strides,
                        accumulate,
                        dy,
                        (1, n as isize),
                        col,
                        (n as isize, 1),
                        parallelism,
                    );
                },
            );
        }
        dw
    };
    let partials: Vec<Vec<f32>> = if parallel_chunks {
        (0..threads).into_par_iter().map(partial).collect()
    } else {
        (0..threads).map(partial).collect()
    };
    let mut partials = partials.into_iter();
    let mut dw = partials.next().unwrap_or_else(|| vec![0.0; o * rows]);
    for p in partials {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    if !transposed {
        return dw;
    }
    let mut out = vec![0.0f32; o * rows];
    for (r, column) in dw.chunks_exact(o).enumerate() {
        for (i, &v) in column.iter().enumerate() {
            out[i * rows + r] = v;
        }
    }
    out
}

/// Output tiles per Winograd product before chunking stops adding images.
const MIN_TILES: usize = 512;
/// Largest transformed input plus product, in f32 values (32 MB), that chunking builds.
const WINOGRAD_BUDGET: usize = 8 << 20;

/// Winograd F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
/// CVPR 2016, arXiv:1509.09308): 3 x 3 stride-1 convolutions, where iresnet spends nearly all of
/// its time, as 16 products of `[O, C]` by `[C, tiles]` on 2 x 2 output tiles, 16 multiplies a
/// tile per channel pair instead of 36. Its rounding error stays at the level of f32 (the
/// transforms only add and halve); the tests hold it to 1e-5 relative of Burn's convolution.
/// Worth it from 64 channels, iresnet's narrowest, at every stage: one convolution at batch 64,
/// Winograd against im2col (Intel AVX-512 box, `gemm` without debug assertions): 64 channels at
/// 56 x 56, 72 against 115-141 ms; 128 at 28 x 28, 63-66 against 79-93 ms; 256 at 14 x 14, 39-42
/// against 65-117 ms; 512 at 7 x 7, 62-69 against 74-81 ms. (With `gemm`'s debug assertions on,
/// its short products of depth 64 were slow enough that im2col won at 64 channels.)
pub(crate) fn winograd_applies(s: &Dense) -> bool {
    s.kernel == 3
        && s.stride == 1
        && s.in_channels >= WINOGRAD_MIN_CHANNELS
        && s.out_channels >= WINOGRAD_MIN_CHANNELS
}

/// Input and output channels from which [`winograd_applies`].
const WINOGRAD_MIN_CHANNELS: usize = 64;

/// `G g G^T` of every 3 x 3 filter, as 16 matrices `[O, C]` (one per 4 x 4 tile element).
fn winograd_weights(s: &Dense, weight: &[f32]) -> Vec<f32> {
    let (o, c) = (s.out_channels, s.in_channels);
    let mut u = vec![0.0f32; 16 * o * c];
    for (pair, g) in weight.chunks_exact(9).enumerate() {
        // G g: 4 x 3, then (G g) G^T: 4 x 4.
        let mut gg = [[0.0f32; 3]; 4];
        for j in 0..3 {
            let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
            gg[0][j] = g0;
            gg[1][j] = 0.5 * (g0 + g1 + g2);
            gg[2][j] = 0.5 * (g0 - g1 + g2);
            gg[3][j] = g2;
        }
        for (i, [t0, t1, t2]) in gg.into_iter().enumerate() {
            let row = [t0, 0.5 * (t0 + t1 + t2), 0.5 * (t0 - t1 + t2), t2];
            for (k, value) in row.into_iter().enumerate() {
                u[(i * 4 + k) * o * c + pair] = value;
            }
        }
    }
    u
}

simd::multiversion! {
    /// `B^T d B` of every 4 x 4 input tile of the chunk's images, as 16 matrices `[C, tiles]`.
    ///
    /// Worked a row of tiles at a time so that every loop runs over consecutive tiles and
    /// vectorises: `B^T d B` is the same combination along columns then rows, and tile `tx` starts
    /// at padded column `2 tx`, so the column step reads a padded input row at even and odd
    /// positions, and the row step combines four column-transformed rows element by element.
    fn winograd_input(s: &Dense, x: &[f32], first: usize, count: usize, v: &mut [f32]) {
        let (oh, ow) = s.output_size();
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        let tiles = count * th * tw;
        let (plane, image) = (s.height * s.width, s.in_channels * s.height * s.width);
        let (h, w, p) = (s.height, s.width, s.padding);
        // Padded rows and columns the tiles read: tile (ty, tx) covers rows 2 ty..2 ty + 4.
        let (rows, columns) = (2 * th + 2, 2 * tw + 2);
        let mut line = vec![0.0f32; columns];
        // The column step of every padded row, one `[rows, tw]` matrix per column combination.
        let mut across: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0.0f32; rows * tw]);
        for c in 0..s.in_channels {
            for i in 0..count {
                let src = &x[(first + i) * image + c * plane..][..plane];
                for r in 0..rows {
                    line.fill(0.0);
                    if let Some(y) = (r < h + p).then(|| r.checked_sub(p)).flatten() {
                        let (from, to) = (p.min(columns), (p + w).min(columns));
                        line[from..to].copy_from_slice(&src[y * w..][..to - from]);
                    }
                    let [k0, k1, k2, k3] = across.each_mut().map(|k| &mut k[r * tw..][..tw]);
                    for t in 0..tw {
                        let d = &line[2 * t..2 * t + 4];
                        k0[t] = d[0] - d[2];
                        k1[t] = d[1] + d[2];
                        k2[t] = d[2] - d[1];
                        k3[t] = d[1] - d[3];
                    }
                }
                for ty in 0..th {
                    let tile = (i * th + ty) * tw;
                    for (k, column_step) in across.iter().enumerate() {
                        let row = |r: usize| &column_step[(2 * ty + r) * tw..][..tw];
                        let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
                        let at = |e: usize| e * s.in_channels * tiles + c * tiles + tile;
                        combine(&mut v[at(k)..][..tw], d0, d2, |a, b| a - b);
                        combine(&mut v[at(4 + k)..][..tw], d1, d2, |a, b| a + b);
                        combine(&mut v[at(8 + k)..][..tw], d2, d1, |a, b| a - b);
                        combine(&mut v[at(12 + k)..][..tw], d1, d3, |a, b| a - b);
                    }
                }
            }
        }
    }
}

/// `dst[t] = f(a[t], b[t])`: one vectorisable pass.
#[inline(always)]
fn combine(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *o = f(x, y);
    }
}

simd::multiversion! {
    /// `A^T m A` of every tile's 16 products: the chunk's `[images, O, OH, OW]` output, a row of
    /// tiles at a time (as [`winograd_input`], so that the loops run over consecutive tiles).
    fn winograd_output(s: &Dense, m: &[f32], count: usize, out: &mut [f32]) {
        let (oh, ow) = s.output_size();
        let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
        let tiles = count * th * tw;
        let o = s.out_channels;
        // `A^T m` for one row of tiles: `[2][4][tw]`.
        let mut down = vec![0.0f32; 8 * tw];
        for i in 0..count {
            for oc in 0..o {
                let dst = &mut out[(i * o + oc) * oh * ow..][..oh * ow];
                for ty in 0..th {
                    let tile = (i * th + ty) * tw;
                    let at = |e: usize| &m[e * o * tiles + oc * tiles + tile..][..tw];
                    let (top, bottom) = down.split_at_mut(4 * tw);
                    for q in 0..4 {
                        let (m0, m1, m2, m3) = (at(q), at(4 + q), at(8 + q), at(12 + q));
                        let (t0, t1) = (&mut top[q * tw..][..tw], &mut bottom[q * tw..][..tw]);
                        for t in 0..tw {
                            t0[t] = m0[t] + m1[t] + m2[t];
                            t1[t] = m1[t] - m2[t] - m3[t];
                        }
                    }
                    for r in 0..2 {
                        let y = 2 * ty + r;
                        if y >= oh {
                            break;
                        }
                        let row = &down[r * 4 * tw..][..4 * tw];
                        let (a, b, c, d) = (
                            &row[..tw],
                            &row[tw..2 * tw],
                            &row[2 * tw..3 * tw],
                            &row[3 * tw..],
                        );
                        let line = &mut dst[y * ow..][..ow];
                        let pairs = ow / 2;
                        for (t, pair) in line[..2 * pairs].chunks_exact_mut(2).enumerate() {
                            pair[0] = a[t] + b[t] + c[t];
                            pair[1] = b[t] - c[t] - d[t];
                        }
                        if ow % 2 == 1 {
                            line[ow - 1] = a[pairs] + b[pairs] + c[pairs];
                        }
                    }
                }
            }
        }
    }
}

/// The forward pass through Winograd F(2x2, 3x3): see [`winograd_applies`].
fn winograd_conv2d(s: &Dense, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (oh, ow) = s.output_size();
    let (o, c) = (s.out_channels, s.in_channels);
    let tiles_per_image = oh.div_ceil(2) * ow.div_ceil(2);
    let per = s.chunk_images(tiles_per_image, 16 * (c + o), MIN_TILES, WINOGRAD_BUDGET);
    let mut out = vec![0.0f32; s.batch * o * oh * ow];
    if out.is_empty() {
        return out;
    }
    let u = winograd_weights(s, weight);
    for_each_chunk(&mut out, per * o * oh * ow, |chunk, out, parallelism| {
        let (first, count) = (chunk * per, out.len() / (o * oh * ow));
        let tiles = count * tiles_per_image;
        with_scratch(16 * c * tiles, 16 * o * tiles, |v, m| {
            winograd_input(s, x, first, count, v);
            for e in 0..16 {
                product(
                    (o, tiles, c),
                    &mut m[e * o * tiles..][..o * tiles],
                    (1, tiles as isize),
                    false,
                    &u[e * o * c..][..o * c],
                    (1, c as isize),
                    &v[e * c * tiles..][..c * tiles],
                    (1, tiles as isize),
                    parallelism,
                );
            }
            winograd_output(s, m, count, out);
        });
    });
    out
}
