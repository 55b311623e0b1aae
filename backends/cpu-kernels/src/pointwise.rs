//! The products of a 1 x 1 convolution's forward pass and input gradient, `out[m, P] = A[m, k] *
//! image[k, P]` for each image, with an AVX-512 kernel that reads the image where it lies.
//!
//! In NCHW an image is already the right-hand matrix, rows of positions, so the kernel loads it
//! sixteen positions at a time as it is and only the small left-hand matrix (the weight, or its
//! transpose) is packed, once per call. `gemm` packs the image into panels for every product
//! (per image), a copy of the whole activation, and sizes its blocks for large depths where
//! MobileFaceNet's are 64 to 512.

// Everything but the entry points serves the AVX-512 kernel.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Rows of the output a kernel call computes (left-hand rows packed together).
pub(crate) const ROWS: usize = 8;
/// Vectors of sixteen positions a kernel call computes per row: `ROWS x COLUMNS` accumulators,
/// 24 of the 32 AVX-512 registers.
const COLUMNS: usize = 3;
/// Positions a full kernel call covers.
const BLOCK: usize = COLUMNS * 16;
/// Values of the right-hand matrix and output one pass over the tiles reads and writes.
const CHUNK_VALUES: usize = 96 << 10;

/// The left-hand matrix `A[m, k]` in tiles of [`ROWS`] rows, each tile `[k, ROWS]` (the rows of
/// one depth step side by side), rows past `m` zero.
pub(crate) struct PackedLhs {
    values: Vec<f32>,
    rows: usize,
    depth: usize,
}

impl PackedLhs {
    /// Packs `A[m, k]`, element `(i, j)` at `a[i * row_stride + j * depth_stride]`.
    pub(crate) fn new(
        a: &[f32],
        (rows, depth): (usize, usize),
        (row_stride, depth_stride): (usize, usize),
    ) -> Self {
        let tiles = rows.div_ceil(ROWS);
        let mut values = vec![0f32; tiles * depth * ROWS];
        for (t, tile) in values.chunks_exact_mut(depth * ROWS).enumerate() {
            for (j, step) in tile.chunks_exact_mut(ROWS).enumerate() {
                for (r, v) in step.iter_mut().enumerate() {
                    let i = t * ROWS + r;
                    if i < rows {
                        *v = a[i * row_stride + j * depth_stride];
                    }
                }
            }
        }
        Self {
            values,
            rows,
            depth,
        }
    }
}

/// Whether [`product`] runs on this CPU.
pub(crate) fn available() -> bool {
    crate::simd::level() == crate::simd::SimdLevel::Avx512
}

/// Rows `first_row..first_row + out.len() / positions` of `lhs * image[depth, positions]` into
/// `out`, every element written; `first_row` a multiple of [`ROWS`]. `next`, the image and
/// output of the product that follows on this thread, if any, is requested into the
/// second-level cache as this one runs. Only where [`available`].
pub(crate) fn product(
    lhs: &PackedLhs,
    (image, positions): (&[f32], usize),
    (first_row, out): (usize, &mut [MaybeUninit<f32>]),
    next: Option<(&[f32], *const f32)>,
) {
    assert!(available(), "the pointwise kernel needs AVX-512");
    assert_eq!(image.len(), lhs.depth * positions, "image size");
    if out.is_empty() {
        return;
    }
    let rows = out.len() / positions.max(1);
    assert!(
        first_row % ROWS == 0 && rows * positions == out.len() && first_row + rows <= lhs.rows,
        "output rows {first_row}.. ({} values) of {} rows of {positions}",
        out.len(),
        lhs.rows
    );
    if let Some((image, _)) = next {
        assert_eq!(image.len(), lhs.depth * positions, "next image size");
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 is present (asserted); the sizes are asserted above.
    unsafe {
        product_avx512(lhs, (image, positions), (first_row, rows, out), next)
    }
}

/// Row pieces `[0, len)` of `rows` rows `stride` values apart from `base`, to request line by line.
#[derive(Clone, Copy)]
struct Rows {
    base: *const f32,
    stride: usize,
    rows: usize,
    len: usize,
}

/// Lines to request, one per [`Requests::next`] call, walking the row pieces in order.
struct Requests {
    pieces: [Rows; 2],
    piece: usize,
    row: usize,
    offset: usize,
}

impl Requests {
    /// The input and output columns `[start, end)` of an image.
    fn columns(
        image: *const f32,
        out: *const f32,
        (depth, rows): (usize, usize),
        positions: usize,
        (start, end): (usize, usize),
    ) -> Self {
        let piece = |base: *const f32, rows| Rows {
            base: base.wrapping_add(start),
            stride: positions,
            rows,
            len: end - start,
        };
        Self {
            pieces: [piece(image, depth), piece(out, rows)],
            piece: 0,
            row: 0,
            offset: 0,
        }
    }

    fn none() -> Self {
        let empty = Rows {
            base: std::ptr::null(),
            stride: 0,
            rows: 0,
            len: 0,
        };
        Self {
            pieces: [empty; 2],
            piece: 2,
            row: 0,
            offset: 0,
        }
    }

    /// Requests the next line, if any is left.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn next(&mut self) {
        while self.piece < 2 {
            let piece = self.pieces[self.piece];
            if self.row < piece.rows {
                let line = piece
                    .base
                    .wrapping_add(self.row * piece.stride + self.offset);
                // SAFETY: a prefetch never faults; the address lies in the piece.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(line.cast()) };
                self.offset += 16;
                if self.offset >= piece.len {
                    self.offset = 0;
                    self.row += 1;
                }
                return;
            }
            self.piece += 1;
            self.row = 0;
        }
    }
}

/// [`product`]'s loop: passes over the columns, blocks of columns, tiles of rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn product_avx512(
    lhs: &PackedLhs,
    (image, positions): (&[f32], usize),
    (first_row, rows, out): (usize, usize, &mut [MaybeUninit<f32>]),
    next: Option<(&[f32], *const f32)>,
) {
    // SAFETY: the caller ([`product`]) has checked AVX-512F and sized `image` (`depth` rows of
    // `positions`), `lhs` (whole packed tiles) and `out` (`rows` rows of `positions`); every
    // offset below stays inside them.
    unsafe {
        let depth = lhs.depth;
        let c_base = out.as_mut_ptr().cast::<f32>();
        let b_base = image.as_ptr();
        // Positions per pass over the tiles: the image's columns and output of a pass, and those
        // of the next pass (requested during this one), stay in the second-level cache while every
        // tile of rows reads them.
        let chunk = ((CHUNK_VALUES / (depth + rows).max(1)) / BLOCK).max(1) * BLOCK;
        let mut start = 0;
        while start < positions {
            let end = positions.min(start + chunk);
            let mut requests = if end < positions {
                Requests::columns(
                    b_base,
                    c_base,
                    (depth, rows),
                    positions,
                    (end, positions.min(end + chunk)),
                )
            } else if let Some((image, out)) = next {
                Requests::columns(
                    image.as_ptr(),
                    out,
                    (depth, rows),
                    positions,
                    (0, positions.min(chunk)),
                )
            } else {
                Requests::none()
            };
            let mut blocks = Blocks::new(end - start);
            while let Some((offset, vectors, last_mask)) = blocks.next() {
                let first = start + offset;
                let b = (b_base.add(first), positions);
                // Every tile of rows reads this block of columns, from the first-level cache
                // after the first; the packed rows stream through in order.
                for t in 0..rows.div_ceil(ROWS) {
                    let a = lhs
                        .values
                        .as_ptr()
                        .add((first_row / ROWS + t) * depth * ROWS);
                    let valid = ROWS.min(rows - t * ROWS);
                    let c = (c_base.add(t * ROWS * positions + first), positions, valid);
                    let r = &mut requests;
                    match vectors {
                        3 => tile::<3>(a, depth, b, last_mask, c, r),
                        2 => tile::<2>(a, depth, b, last_mask, c, r),
                        _ => tile::<1>(a, depth, b, last_mask, c, r),
                    }
                }
            }
            start = end;
        }
    }
}

/// `ROWS x V` vectors of the output: `c[r, 16 v ..] = sum_j a[j, r] * b[j, 16 v ..]` (`a` one
/// packed tile), the last vector of each row masked to `last_mask`; rows from `valid` on are not
/// stored.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const V: usize>(
    a: *const f32,
    depth: usize,
    (b, b_stride): (*const f32, usize),
    last_mask: __mmask16,
    (c, c_stride, valid): (*mut f32, usize, usize),
    requests: &mut Requests,
) {
    // SAFETY: AVX-512F (the caller's target feature); `a` holds `depth` packed rows of
    // `ROWS`, `b` `depth` rows of `b_stride` with `V` vectors (the last masked) from it, and `c`
    // `valid` rows of `c_stride`: what [`product_avx512`] passes.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; ROWS];
        let mut masks = [0xffffu16; V];
        masks[V - 1] = last_mask;
        for j in 0..depth {
            let row = b.add(j * b_stride);
            requests.next();
            let mut bv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm512_maskz_loadu_ps(masks[v], row.add(16 * v));
            }
            let step = a.add(j * ROWS);
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*step.add(r));
                for (acc, &b) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(av, b, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().take(valid).enumerate() {
            for (v, (&acc, &m)) in acc.iter().zip(&masks).enumerate() {
                _mm512_mask_storeu_ps(c.add(r * c_stride + 16 * v), m, acc);
            }
        }
    }
}

/// Columns `[0, width)` cut into kernel blocks of one to [`COLUMNS`] vectors, as even as they
/// come (64 columns: two blocks of two vectors, not three and one: a one-vector block does 8
/// multiply-adds for 9 loads): `(first column, vectors, mask of the last vector)`.
struct Blocks {
    width: usize,
    vectors: usize,
    blocks: usize,
    index: usize,
    first: usize,
}

impl Blocks {
    fn new(width: usize) -> Self {
        let vectors = width.div_ceil(16);
        Self {
            width,
            vectors,
            blocks: vectors.div_ceil(COLUMNS),
            index: 0,
            first: 0,
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn next(&mut self) -> Option<(usize, usize, __mmask16)> {
        if self.index >= self.blocks {
            return None;
        }
        let vectors =
            self.vectors / self.blocks + usize::from(self.index < self.vectors % self.blocks);
        let first = self.first;
        let width = (16 * vectors).min(self.width - first);
        self.index += 1;
        self.first += width;
        Some((first, vectors, mask(width - 16 * (vectors - 1))))
    }
}

/// The first `count` (1 to 16) lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn mask(count: usize) -> __mmask16 {
    if count >= 16 {
        0xffff
    } else {
        (1u16 << count) - 1
    }
}
