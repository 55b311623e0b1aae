//! Stride-1 3 x 3 depthwise planes (every MobileFaceNet depthwise layer but the three
//! downsampling ones) worked on a zero-padded copy of the plane read as one flat line.
//!
//! With the plane padded to width `W`, the tap `(ky, kx)` of every output is the padded line
//! shifted by `ky * W + kx`: the forward, the input gradient (the same correlation with the
//! kernel turned by 180 degrees, over the padded output gradient) and the weight gradient
//! (nine dot products of the line with the output gradient) each become one loop over the
//! whole plane, whatever its width, instead of a loop per row. Rows of 7 or 14 values (the
//! last two stages) no longer leave the vector lanes mostly empty, and no loop needs edge
//! cases: the padding supplies the zeros. The `W - OW` columns of the line that fall outside
//! the output are computed and dropped (2 of 9 at 7 x 7). Rows of [`WIDE_ROWS`] outputs or
//! more fill the vector lanes on their own: the forward and the input gradient compute those
//! straight into the output row by row, which saves copying the line out.

use crate::simd::{self, Upcoming, LANES};
use crate::Depthwise;
use std::mem::MaybeUninit;

/// Taps of a 3 x 3 kernel, row-major.
const TAPS: usize = 9;

/// Output rows at least this wide are computed straight into the output, one row at a time;
/// narrower ones as one line over the whole padded plane, then copied out without the padding
/// columns (a row of 7 or 14 leaves the vector lanes mostly empty, a row of 28 or 56 does not,
/// and the copy is one more pass).
const WIDE_ROWS: usize = 16;

/// Whether the forward and the weight gradient of `shape` take the flat path.
pub(crate) fn applies(shape: &Depthwise) -> bool {
    let (oh, ow) = shape.output_size();
    shape.kernel == 3
        && (shape.stride == 1 || shape.stride == 2)
        && shape.padding < 3
        && shape.height * shape.width * oh * ow > 0
}

/// A plane of `rows x cols` with `pad` zeros on every side, as the nine taps of a stride-1
/// correlation read it: output `q` (at the padded row stride) reads `source[q + offsets[t]]`.
#[derive(Clone, Copy)]
struct Padded {
    rows: usize,
    cols: usize,
    pad: usize,
}

impl Padded {
    /// Row stride of the padded plane, and of the output line.
    #[inline(always)]
    fn stride(self) -> usize {
        self.cols + 2 * self.pad
    }

    /// Padded values plus the two that the last row's shifts reach past the end.
    #[inline(always)]
    fn len(self) -> usize {
        (self.rows + 2 * self.pad) * self.stride() + 2
    }

    #[inline(always)]
    fn offsets(self) -> [usize; TAPS] {
        let w = self.stride();
        std::array::from_fn(|t| t / 3 * w + t % 3)
    }

    /// Copies `plane` (`rows x cols`) into the padded buffer; the border is never written, so it
    /// stays the zeros the buffer was made with.
    #[inline(always)]
    fn place(self, padded: &mut [f32], plane: &[f32]) {
        let w = self.stride();
        for (r, row) in plane.chunks_exact(self.cols).enumerate() {
            padded[(r + self.pad) * w + self.pad..][..self.cols].copy_from_slice(row);
        }
    }
}

/// A stride-2 plane split into its four phases (even or odd padded row, even or odd padded
/// column), each `rows x stride`, one after the other: the tap `(ky, kx)` of output
/// `(oy, ox)` is phase `(ky % 2, kx % 2)` at `(oy + ky / 2, ox + kx / 2)`, so the strided
/// correlation becomes a stride-1 one over the phases.
#[derive(Clone, Copy)]
struct Phases {
    rows: usize,
    cols: usize,
    pad: usize,
}

impl Phases {
    /// Row stride of each phase, and of the output line.
    #[inline(always)]
    fn stride(self) -> usize {
        (self.cols + 2 * self.pad).div_ceil(2)
    }

    #[inline(always)]
    fn phase_rows(self) -> usize {
        (self.rows + 2 * self.pad).div_ceil(2)
    }

    /// The four phases plus the row and value that the last output row's shifts reach past
    /// the end.
    #[inline(always)]
    fn len(self) -> usize {
        (4 * self.phase_rows() + 1) * self.stride() + 1
    }

    #[inline(always)]
    fn offsets(self) -> [usize; TAPS] {
        let (w, phase) = (self.stride(), self.phase_rows() * self.stride());
        std::array::from_fn(|t| {
            let (ky, kx) = (t / 3, t % 3);
            ((ky % 2) * 2 + kx % 2) * phase + ky / 2 * w + kx / 2
        })
    }

    /// Deals `plane` (`rows x cols`) out into the phases; positions no input reaches are never
    /// written and stay zero.
    #[inline(always)]
    fn place(self, phases: &mut [f32], plane: &[f32]) {
        let (w, phase) = (self.stride(), self.phase_rows() * self.stride());
        let (cols, pad) = (self.cols, self.pad);
        // Input column `x` sits at padded column `x + pad`: the even input columns go to the
        // phase of parity `pad % 2`, the odd ones to the other.
        let (even_parity, odd_parity) = (pad % 2, 1 - pad % 2);
        let (evens, odds) = (cols.div_ceil(2), cols / 2);
        for (y, row) in plane.chunks_exact(cols).enumerate() {
            let r = y + pad;
            let start = |parity: usize, first: usize| {
                ((r % 2) * 2 + parity) * phase + r / 2 * w + (first + pad) / 2
            };
            let (even_start, odd_start) = (start(even_parity, 0), start(odd_parity, 1));
            // The two lines lie in different phases: split the buffer between them.
            let (even_line, odd_line) = if even_start < odd_start {
                let (a, b) = phases.split_at_mut(odd_start);
                (&mut a[even_start..][..evens], &mut b[..odds])
            } else {
                let (a, b) = phases.split_at_mut(even_start);
                (&mut b[..evens], &mut a[odd_start..][..odds])
            };
            for ((e, o), pair) in even_line
                .iter_mut()
                .zip(odd_line.iter_mut())
                .zip(row.chunks_exact(2))
            {
                *e = pair[0];
                *o = pair[1];
            }
            if cols % 2 == 1 {
                even_line[evens - 1] = row[cols - 1];
            }
        }
    }
}

/// The source layout of a stride-1 or stride-2 plane: `(source length, output row stride, tap
/// offsets)`, and the copy into it.
#[derive(Clone, Copy)]
enum Layout {
    Padded(Padded),
    Phases(Phases),
}

impl Layout {
    #[inline(always)]
    fn of(shape: &Depthwise) -> Self {
        let (rows, cols, pad) = (shape.height, shape.width, shape.padding);
        if shape.stride == 1 {
            Layout::Padded(Padded { rows, cols, pad })
        } else {
            Layout::Phases(Phases { rows, cols, pad })
        }
    }

    #[inline(always)]
    fn len(self) -> usize {
        match self {
            Layout::Padded(p) => p.len(),
            Layout::Phases(p) => p.len(),
        }
    }

    #[inline(always)]
    fn stride(self) -> usize {
        match self {
            Layout::Padded(p) => p.stride(),
            Layout::Phases(p) => p.stride(),
        }
    }

    #[inline(always)]
    fn offsets(self) -> [usize; TAPS] {
        match self {
            Layout::Padded(p) => p.offsets(),
            Layout::Phases(p) => p.offsets(),
        }
    }

    #[inline(always)]
    fn place(self, source: &mut [f32], plane: &[f32]) {
        match self {
            Layout::Padded(p) => p.place(source, plane),
            Layout::Phases(p) => p.place(source, plane),
        }
    }
}

/// `scratch` as two zeroed-once buffers of `first` and `second` values (kept between the
/// planes of one task: only their interiors are rewritten).
#[inline(always)]
fn split_scratch(scratch: &mut Vec<f32>, first: usize, second: usize) -> (&mut [f32], &mut [f32]) {
    if scratch.len() != first + second {
        scratch.clear();
        scratch.resize(first + second, 0.0);
    }
    scratch.split_at_mut(first)
}

/// `dst[q] = init + sum_t taps[t] * src[q + offsets[t]]`, the taps added in row-major order
/// after `init` (as the general loop adds them, so the values are the same).
#[inline(always)]
fn correlate(
    taps: &[f32; TAPS],
    offsets: &[usize; TAPS],
    init: f32,
    src: &[f32],
    dst: &mut [MaybeUninit<f32>],
) {
    correlate_requesting(taps, offsets, init, (src, dst), (&Upcoming::default(), 0));
}

/// [`correlate`], requesting the lines of the `upcoming` planes as it goes; `dst[0]` is value
/// `first` of its plane, and the request for value `first + q` goes with output `q` (on the
/// AVX-512 path; the plain loop requests nothing).
#[inline(always)]
fn correlate_requesting(
    taps: &[f32; TAPS],
    offsets: &[usize; TAPS],
    init: f32,
    (src, dst): (&[f32], &mut [MaybeUninit<f32>]),
    (upcoming, first): (&Upcoming, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::SimdLevel::Avx512 {
        // SAFETY: the CPU has AVX-512F (`level` never exceeds the CPU's), all the function is
        // compiled for.
        return unsafe { correlate_avx512(taps, offsets, init, (src, dst), (upcoming, first)) };
    }
    let _ = (upcoming, first);
    correlate_portable(taps, offsets, init, src, dst);
}

/// [`correlate`] as a plain loop, for the compiler to vectorise.
#[inline(always)]
fn correlate_portable(
    taps: &[f32; TAPS],
    offsets: &[usize; TAPS],
    init: f32,
    src: &[f32],
    dst: &mut [MaybeUninit<f32>],
) {
    let n = dst.len();
    let line = |t: usize| &src[offsets[t]..][..n];
    let (l0, l1, l2) = (line(0), line(1), line(2));
    let (l3, l4, l5) = (line(3), line(4), line(5));
    let (l6, l7, l8) = (line(6), line(7), line(8));
    let t = taps;
    for q in 0..n {
        dst[q].write(
            init + t[0] * l0[q]
                + t[1] * l1[q]
                + t[2] * l2[q]
                + t[3] * l3[q]
                + t[4] * l4[q]
                + t[5] * l5[q]
                + t[6] * l6[q]
                + t[7] * l7[q]
                + t[8] * l8[q],
        );
    }
}

/// [`correlate`] sixteen outputs at a time, the last group under a mask: compiled from the plain
/// loop, the rest of a row of 28 (12 of every 28 outputs) or of a 7 x 7 line went through scalar
/// code. Each output takes the same operations in the same order (`init`, then each tap's
/// product added, separate multiply and add): the same bits.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn correlate_avx512(
    taps: &[f32; TAPS],
    offsets: &[usize; TAPS],
    init: f32,
    (src, dst): (&[f32], &mut [MaybeUninit<f32>]),
    (upcoming, first): (&Upcoming, usize),
) {
    use std::arch::x86_64::*;
    let n = dst.len();
    // Loops, not `array::from_fn`: its closure does not inherit this function's target
    // features, so it is a call, and the intrinsic inside it another (3 % of a train step).
    let mut lines: [&[f32]; TAPS] = [&[]; TAPS];
    let mut weights = [_mm512_setzero_ps(); TAPS];
    for t in 0..TAPS {
        lines[t] = &src[offsets[t]..][..n];
        weights[t] = _mm512_set1_ps(taps[t]);
    }
    let start_value = _mm512_set1_ps(init);
    let body = n / LANES * LANES;
    for start in (0..body).step_by(LANES) {
        upcoming.request(first + start);
        // SAFETY: `start + LANES <= body <= n`, within each line and `dst` (all `n` long).
        unsafe {
            let mut acc = start_value;
            for (line, weight) in lines.iter().zip(&weights) {
                let x = _mm512_loadu_ps(line.as_ptr().add(start));
                acc = _mm512_add_ps(acc, _mm512_mul_ps(*weight, x));
            }
            _mm512_storeu_ps(dst.as_mut_ptr().add(start).cast(), acc);
        }
    }
    if body < n {
        let mask: __mmask16 = (1 << (n - body)) - 1;
        upcoming.request(first + body);
        // SAFETY: the mask keeps every load and the store to the `n - body` values from `body`,
        // within each line and `dst`.
        unsafe {
            let mut acc = start_value;
            for (line, weight) in lines.iter().zip(&weights) {
                let x = _mm512_maskz_loadu_ps(mask, line.as_ptr().add(body));
                acc = _mm512_add_ps(acc, _mm512_mul_ps(*weight, x));
            }
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(body).cast(), mask, acc);
        }
    }
}

/// `values` as memory to write (it is initialised already, so nothing is lost).
#[inline(always)]
fn writable(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and only initialised values are ever
    // written through the result.
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Copies the first `cols` values of each `stride`-long row of `line` into the rows of `dst`:
/// the output without the line's padding columns.
#[inline(always)]
fn unpad(line: &[f32], stride: usize, cols: usize, dst: &mut [MaybeUninit<f32>]) {
    for (row, values) in dst.chunks_exact_mut(cols).zip(line.chunks_exact(stride)) {
        for (o, &v) in row.iter_mut().zip(&values[..cols]) {
            o.write(v);
        }
    }
}

/// `sum_q g[q] * src[q + offsets[t]]` for each tap, with [`LANES`] partial sums per tap. Each
/// step also requests the line at the same index of every plane of `upcoming` (planes the
/// caller reads next), so that they arrive while this works from cache.
///
/// The nine taps are spelled out: as a loop over an array of lines, the accumulators stayed in
/// memory and every product was scalar.
#[inline(always)]
fn correlate_sums(
    offsets: &[usize; TAPS],
    src: &[f32],
    g: &[f32],
    upcoming: &Upcoming,
) -> [f32; TAPS] {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::SimdLevel::Avx512 {
        // SAFETY: the CPU has AVX-512F (`level` never exceeds the CPU's), all the function is
        // compiled for.
        return unsafe { correlate_sums_avx512(offsets, src, g, upcoming) };
    }
    correlate_sums_portable(offsets, src, g, upcoming)
}

/// [`correlate_sums`] as plain loops, for the compiler to vectorise.
#[inline(always)]
fn correlate_sums_portable(
    offsets: &[usize; TAPS],
    src: &[f32],
    g: &[f32],
    upcoming: &Upcoming,
) -> [f32; TAPS] {
    let n = g.len();
    let line = |t: usize| &src[offsets[t]..][..n];
    let (l0, l1, l2) = (line(0), line(1), line(2));
    let (l3, l4, l5) = (line(3), line(4), line(5));
    let (l6, l7, l8) = (line(6), line(7), line(8));
    let mut acc = [[0f32; LANES]; TAPS];
    let body = n / LANES * LANES;
    for base in (0..body).step_by(LANES) {
        let gs: &[f32; LANES] = g[base..base + LANES].try_into().expect("a lane's values");
        upcoming.request(base);
        multiply_add(&mut acc[0], gs, &l0[base..]);
        multiply_add(&mut acc[1], gs, &l1[base..]);
        multiply_add(&mut acc[2], gs, &l2[base..]);
        multiply_add(&mut acc[3], gs, &l3[base..]);
        multiply_add(&mut acc[4], gs, &l4[base..]);
        multiply_add(&mut acc[5], gs, &l5[base..]);
        multiply_add(&mut acc[6], gs, &l6[base..]);
        multiply_add(&mut acc[7], gs, &l7[base..]);
        multiply_add(&mut acc[8], gs, &l8[base..]);
    }
    let lines = [l0, l1, l2, l3, l4, l5, l6, l7, l8];
    std::array::from_fn(|t| {
        let tail: f32 = (body..n).map(|q| g[q] * lines[t][q]).sum();
        acc[t].iter().sum::<f32>() + tail
    })
}

/// [`correlate_sums`] with its nine partial sums in registers: compiled from the plain loop,
/// they lived on the stack, and every step loaded, added and stored each of the nine (that loop
/// was most of `activated_gradients_plane`'s samples). Every lane takes the products and sums
/// (separate multiply and add, no FMA) that lane `k` of the plain loop takes, in the same
/// order, and the lanes and the tail are reduced by the same code: the same bits.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn correlate_sums_avx512(
    offsets: &[usize; TAPS],
    src: &[f32],
    g: &[f32],
    upcoming: &Upcoming,
) -> [f32; TAPS] {
    use std::arch::x86_64::*;
    let n = g.len();
    // Loops, not closures: see `correlate_avx512`.
    let mut lines: [&[f32]; TAPS] = [&[]; TAPS];
    for t in 0..TAPS {
        lines[t] = &src[offsets[t]..][..n];
    }
    let mut acc = [_mm512_setzero_ps(); TAPS];
    let body = n / LANES * LANES;
    for base in (0..body).step_by(LANES) {
        upcoming.request(base);
        // SAFETY: `base + LANES <= body <= n`, within `g` and every line (each `n` long).
        unsafe {
            let gs = _mm512_loadu_ps(g.as_ptr().add(base));
            for (sum, line) in acc.iter_mut().zip(&lines) {
                let x = _mm512_loadu_ps(line.as_ptr().add(base));
                *sum = _mm512_add_ps(*sum, _mm512_mul_ps(gs, x));
            }
        }
    }
    let mut sums = [0f32; TAPS];
    for t in 0..TAPS {
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds `LANES` (16) values.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[t]) };
        let mut tail = 0f32;
        for q in body..n {
            tail += g[q] * lines[t][q];
        }
        sums[t] = lanes.iter().sum::<f32>() + tail;
    }
    sums
}

/// `acc[i] += g[i] * x[i]` over one lane's width.
#[inline(always)]
fn multiply_add(acc: &mut [f32; LANES], g: &[f32; LANES], x: &[f32]) {
    let x: &[f32; LANES] = x[..LANES].try_into().expect("a lane's values");
    for i in 0..LANES {
        acc[i] += g[i] * x[i];
    }
}

simd::multiversion! {
    /// One channel plane of the forward: `out` `[OH, OW]` from `input` `[H, W]`.
    pub(crate) fn forward_plane(
        shape: &Depthwise,
        taps: &[f32],
        init: f32,
        input: &[f32],
        out: &mut [MaybeUninit<f32>],
        scratch: &mut Vec<f32>,
    ) {
        let layout = Layout::of(shape);
        let (oh, ow) = shape.output_size();
        let w = layout.stride();
        let taps: &[f32; TAPS] = taps.try_into().expect("nine taps");
        let offsets = layout.offsets();
        if ow >= WIDE_ROWS {
            let (source, _) = split_scratch(scratch, layout.len(), 0);
            layout.place(source, input);
            for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
                correlate(taps, &offsets, init, &source[oy * w..], row);
            }
            return;
        }
        let (source, line) = split_scratch(scratch, layout.len(), oh * w);
        layout.place(source, input);
        correlate(taps, &offsets, init, source, writable(line));
        unpad(line, w, ow, out);
    }
}

/// One channel plane of the input gradient: writes every value of `grad` `[H, W]`.
pub(crate) fn input_grad_plane(
    shape: &Depthwise,
    taps: &[f32],
    grad_output: &[f32],
    grad: &mut [MaybeUninit<f32>],
    scratch: &mut Vec<f32>,
) {
    if shape.stride == 1 {
        same_input_grad_plane(shape, taps, grad_output, grad, scratch);
    } else {
        strided_input_grad_plane(shape, taps, grad_output, grad, scratch);
    }
}

simd::multiversion! {
    /// The input gradient at stride 1: the transposed convolution is the output gradient
    /// padded by `2 - padding`, correlated with the kernel turned by 180 degrees.
    fn same_input_grad_plane(
        shape: &Depthwise,
        taps: &[f32],
        grad_output: &[f32],
        grad: &mut [MaybeUninit<f32>],
        scratch: &mut Vec<f32>,
    ) {
        let (oh, ow) = shape.output_size();
        let padded = Padded { rows: oh, cols: ow, pad: 2 - shape.padding };
        let w = padded.stride();
        let turned: [f32; TAPS] = std::array::from_fn(|t| taps[TAPS - 1 - t]);
        let offsets = padded.offsets();
        if shape.width >= WIDE_ROWS {
            let (source, _) = split_scratch(scratch, padded.len(), 0);
            padded.place(source, grad_output);
            for (iy, row) in grad.chunks_exact_mut(shape.width).enumerate() {
                correlate(&turned, &offsets, 0.0, &source[iy * w..], row);
            }
            return;
        }
        let (source, line) = split_scratch(scratch, padded.len(), shape.height * w);
        padded.place(source, grad_output);
        correlate(&turned, &offsets, 0.0, source, writable(line));
        unpad(line, w, shape.width, grad);
    }
}

simd::multiversion! {
    /// One image's plane of the weight gradient: adds onto the channel's nine `taps`.
    pub(crate) fn weight_grad_plane(
        shape: &Depthwise,
        input: &[f32],
        grad_output: &[f32],
        taps: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let layout = Layout::of(shape);
        let (oh, ow) = shape.output_size();
        let w = layout.stride();
        // The output gradient at the line's row stride; its last `w - ow` columns stay zero.
        let (source, spread) = split_scratch(scratch, layout.len(), oh * w);
        layout.place(source, input);
        for (row, values) in spread.chunks_exact_mut(w).zip(grad_output.chunks_exact(ow)) {
            row[..ow].copy_from_slice(values);
        }
        let sums = correlate_sums(&layout.offsets(), source, spread, &Upcoming::default());
        for (tap, sum) in taps.iter_mut().zip(sums) {
            *tap += sum;
        }
    }
}

simd::multiversion! {
    /// The input gradient at stride 2, phase by phase: input `(iy, ix)` sits at padded
    /// `(r, c) = (iy + p, ix + p)`, and only the taps with `ky = r (mod 2)` and `kx = c (mod 2)`
    /// reach it, from output `(r / 2 - ky / 2, c / 2 - kx / 2)`. So each of the four phases of
    /// the padded input is a small stride-1 correlation of the output gradient (4, 2, 2 and 1
    /// taps), computed over the output gradient with one zero row and column in front, then
    /// dealt back into the plane.
    fn strided_input_grad_plane(
        shape: &Depthwise,
        taps: &[f32],
        grad_output: &[f32],
        grad: &mut [MaybeUninit<f32>],
        scratch: &mut Vec<f32>,
    ) {
        let (p, w) = (shape.padding, shape.width);
        let ow = shape.output_size().1;
        let phases = Phases { rows: shape.height, cols: w, pad: p };
        let (rows, stride) = (phases.phase_rows(), phases.stride() + 1);
        let len = rows * stride;
        let (source, lines) = split_scratch(scratch, (rows + 1) * stride + 1, 4 * len);
        for (oy, row) in grad_output.chunks_exact(ow).enumerate() {
            source[(oy + 1) * stride + 1..][..ow].copy_from_slice(row);
        }
        for (phase, line) in lines.chunks_exact_mut(len).enumerate() {
            let (a, b) = (phase / 2, phase % 2);
            line.fill(0.0);
            for ky in (a..3).step_by(2) {
                for kx in (b..3).step_by(2) {
                    let offset = (1 - ky / 2) * stride + 1 - kx / 2;
                    let tap = taps[ky * 3 + kx];
                    for (v, &g) in line.iter_mut().zip(&source[offset..][..len]) {
                        *v += tap * g;
                    }
                }
            }
        }
        // Even input columns come from the phase of parity `p % 2`, odd ones from the other.
        let (even_parity, odd_parity) = (p % 2, 1 - p % 2);
        let (evens, odds) = (w.div_ceil(2), w / 2);
        for (iy, row) in grad.chunks_exact_mut(w).enumerate() {
            let r = iy + p;
            let line = |parity: usize, first: usize, count: usize| {
                let phase = &lines[((r % 2) * 2 + parity) * len..][..len];
                &phase[r / 2 * stride + (first + p) / 2..][..count]
            };
            let (even, odd) = (line(even_parity, 0, evens), line(odd_parity, 1, odds));
            for ((pair, &e), &o) in row.chunks_exact_mut(2).zip(even).zip(odd) {
                pair[0].write(e);
                pair[1].write(o);
            }
            if w % 2 == 1 {
                row[w - 1].write(even[evens - 1]);
            }
        }
    }
}

/// Whether planes of `shape` take the fused BatchNorm + PReLU + depthwise paths below: stride-1,
/// padding-1 3 x 3 planes (every MobileFaceNet depthwise layer but the downsampling ones), whose
/// padded line has the row stride of the padded output gradient.
pub(crate) fn fuses(shape: &Depthwise) -> bool {
    applies(shape) && shape.stride == 1 && shape.padding == 1
}

/// Writes `PReLU((x - m) * a + b)` of `input` (`affine` is `[m, a, b, slope]`, as
/// `normalise_prelu_plane` computes it) into the interior of the padded `source`: the
/// activation's only copy, made where the correlation reads it.
#[inline(always)]
fn place_activated(padded: Padded, source: &mut [f32], input: &[f32], affine: [f32; 4]) {
    let [m, a, b, slope] = affine;
    let w = padded.stride();
    #[cfg(target_arch = "x86_64")]
    let masked = crate::simd::level() == crate::simd::SimdLevel::Avx512;
    for (r, row) in input.chunks_exact(padded.cols).enumerate() {
        let line = &mut source[(r + padded.pad) * w + padded.pad..][..padded.cols];
        #[cfg(target_arch = "x86_64")]
        if masked {
            // SAFETY: the CPU has AVX-512F.
            unsafe { activate_row_avx512(line, row, affine) };
            continue;
        }
        for (o, &v) in line.iter_mut().zip(row) {
            let y = (v - m) * a + b;
            *o = if y >= 0.0 { y } else { slope * y };
        }
    }
}

/// One row of [`place_activated`] sixteen values at a time, the last group under a mask: rows
/// of 7, 14 or 28 values otherwise end in scalar code. The two fused plane functions took about
/// a fifth fewer `perf` samples this way (MobileFaceNet train step, batch 32). The same
/// operations per value, so the same bits.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn activate_row_avx512(line: &mut [f32], row: &[f32], affine: [f32; 4]) {
    use std::arch::x86_64::*;
    let activation = simd::avx512::Activation::new(affine);
    let n = row.len().min(line.len());
    for start in (0..n).step_by(16) {
        let count = (n - start).min(16);
        let mask: __mmask16 = if count == 16 { !0 } else { (1 << count) - 1 };
        // SAFETY: the mask keeps the load and the store to the `count` values from `start`,
        // within both slices.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(start));
            let (_, y) = activation.normalise(v);
            _mm512_mask_storeu_ps(line.as_mut_ptr().add(start), mask, activation.prelu(y, y));
        }
    }
}

simd::multiversion! {
    /// One plane of the fused forward on a [`fuses`] shape: the activation of `input` written
    /// straight into the padded line, then convolved (no bias) into every value of `out`, while
    /// the `upcoming` planes' lines are requested.
    pub(crate) fn activated_forward_plane(
        shape: &Depthwise,
        affine: [f32; 4],
        taps: &[f32],
        input: &[f32],
        out: &mut [MaybeUninit<f32>],
        scratch: &mut Vec<f32>,
        upcoming: &Upcoming,
    ) {
        let padded = Padded { rows: shape.height, cols: shape.width, pad: 1 };
        let (oh, ow) = shape.output_size();
        let w = padded.stride();
        let taps: &[f32; TAPS] = taps.try_into().expect("nine taps");
        let offsets = padded.offsets();
        let wide = ow >= WIDE_ROWS;
        let (source, line) = split_scratch(scratch, padded.len(), if wide { 0 } else { oh * w });
        place_activated(padded, source, input, affine);
        if wide {
            for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
                let src = &source[oy * w..];
                correlate_requesting(taps, &offsets, 0.0, (src, row), (upcoming, oy * ow));
            }
        } else {
            correlate_requesting(taps, &offsets, 0.0, (source, writable(line)), (upcoming, 0));
            unpad(line, w, ow, out);
        }
    }
}

simd::multiversion! {
    /// Both gradients of one plane of the fused backward on a [`fuses`] shape. The activation
    /// is recomputed into the padded line; the output gradient is padded once, and that one
    /// copy is both the line-stride output gradient of the weight gradient (read one row and
    /// one column in: its padding columns are the zeros the line's extra columns need) and the
    /// padded source of the input gradient. Adds onto the channel's nine `kernel_grad`; writes
    /// every value of `grad`, the activation's gradient. `planes` are the BatchNorm's input plane
    /// and the output gradient's, and the planes of the next call.
    pub(crate) fn activated_gradients_plane(
        shape: &Depthwise,
        affine: [f32; 4],
        taps: &[f32],
        planes: (&[f32], &[f32], &Upcoming),
        grad: &mut [MaybeUninit<f32>],
        kernel_grad: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let (input, grad_output, upcoming) = planes;
        let padded = Padded { rows: shape.height, cols: shape.width, pad: 1 };
        let (oh, ow) = shape.output_size();
        let w = padded.stride();
        let wide = shape.width >= WIDE_ROWS;
        let line_len = if wide { 0 } else { shape.height * w };
        let (source, rest) = split_scratch(scratch, padded.len(), padded.len() + line_len);
        let (padded_grad, line) = rest.split_at_mut(padded.len());
        place_activated(padded, source, input, affine);
        Padded { rows: oh, cols: ow, pad: 1 }.place(padded_grad, grad_output);
        let offsets = padded.offsets();
        let sums = correlate_sums(&offsets, source, &padded_grad[w + 1..][..oh * w], upcoming);
        for (tap, sum) in kernel_grad.iter_mut().zip(sums) {
            *tap += sum;
        }
        let turned: [f32; TAPS] = std::array::from_fn(|t| taps[TAPS - 1 - t]);
        if wide {
            for (iy, row) in grad.chunks_exact_mut(shape.width).enumerate() {
                correlate(&turned, &offsets, 0.0, &padded_grad[iy * w..], row);
            }
        } else {
            correlate(&turned, &offsets, 0.0, padded_grad, writable(line));
            unpad(line, w, shape.width, grad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The masked AVX-512 correlation gives the plain loop's bits, tails included.
        #[test]
        fn masked_correlation_equals_the_plain_one(
            rows in 1usize..20,
            cols in 1usize..20,
            init in -1.0f32..1.0,
            taps in prop::array::uniform9(-2.0f32..2.0),
            src in prop::collection::vec(-2.0f32..2.0, 443),
        ) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let padded = Padded { rows, cols, pad: 1 };
                let src = &src[..padded.len()];
                let offsets = padded.offsets();
                let n = rows * padded.stride();
                let (mut plain, mut masked) = (vec![0f32; n], vec![0f32; n]);
                correlate_portable(&taps, &offsets, init, src, writable(&mut plain));
                // SAFETY: the CPU has AVX-512F (checked above).
                unsafe {
                    let none = (&Upcoming::default(), 0);
                    correlate_avx512(&taps, &offsets, init, (src, writable(&mut masked)), none)
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&masked), bits(&plain));
            }
        }

        /// The nine sums in registers give the plain loop's bits, tails included.
        #[test]
        fn register_correlate_sums_equal_the_plain_ones(
            rows in 1usize..20,
            cols in 1usize..20,
            // Enough for the largest padded plane (21 x 21 + 2) and gradient line (19 x 21).
            src in prop::collection::vec(-2.0f32..2.0, 443),
            g in prop::collection::vec(-2.0f32..2.0, 399),
        ) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let padded = Padded { rows, cols, pad: 1 };
                let (src, g) = (&src[..padded.len()], &g[..rows * padded.stride()]);
                let offsets = padded.offsets();
                let none = Upcoming::default();
                let plain = correlate_sums_portable(&offsets, src, g, &none);
                // SAFETY: the CPU has AVX-512F (checked above).
                let registers = unsafe { correlate_sums_avx512(&offsets, src, g, &none) };
                prop_assert_eq!(registers.map(f32::to_bits), plain.map(f32::to_bits));
            }
        }
    }
}
