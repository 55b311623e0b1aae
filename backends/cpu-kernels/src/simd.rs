//! Run-time choice of instruction set for the kernels' hot loops: the crate is compiled for
//! baseline x86-64 (SSE2, 4 lanes), so each loop that should use the CPU's wider vectors is also
//! compiled with AVX2 + FMA (8 lanes) and AVX-512 (16 lanes), and the widest that [`level`]
//! allows runs: the CPU's, unless capped by `QUD_SIMD` or [`cap_level`] (so that tests run the
//! narrower builds on any machine).
//!
//! Rust never contracts `a * b + c` into a fused multiply-add on its own, so every version
//! rounds exactly as the portable one does: the results are identical, only the width changes.

/// Defines `fn $name(args) -> ret` that runs `$body` compiled for the widest of AVX-512, AVX2 +
/// FMA or the baseline that [`level`] allows (a cached load and a compare per call).
/// The body must be a plain function of its arguments; what it calls should be
/// `#[inline(always)]` so that it is compiled for the same instructions.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                portable($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            match $crate::simd::level() {
                // SAFETY: `level` never exceeds what the CPU supports, and `avx512` is compiled
                // for AVX-512F, AVX2 and FMA, which `SimdLevel::Avx512` stands for.
                $crate::simd::SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                // SAFETY: as above, for AVX2 and FMA.
                $crate::simd::SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                $crate::simd::SimdLevel::Portable => {}
            }
            portable($($arg),*)
        }
    };
}

pub(crate) use multiversion;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The instruction sets the kernels choose from, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Baseline x86-64 (SSE2), or any other architecture.
    Portable,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512F (with AVX2 + FMA).
    Avx512,
}

impl SimdLevel {
    /// `portable`, `avx2` or `avx512`, as `QUD_SIMD` takes them.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "portable" | "sse2" | "none" => Some(Self::Portable),
            "avx2" => Some(Self::Avx2),
            "avx512" | "avx-512" => Some(Self::Avx512),
            _ => None,
        }
    }
}

/// The widest level this CPU runs.
pub fn detected() -> SimdLevel {
    static DETECTED: OnceLock<SimdLevel> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    })
}

/// No cap set by [`cap_level`]: the environment's, if any, applies.
const UNSET: u8 = u8::MAX;
static CAP: AtomicU8 = AtomicU8::new(UNSET);

/// The level the kernels run at: the CPU's, capped by [`cap_level`] or else by the environment
/// variable `QUD_SIMD` (`portable`, `avx2`, `avx512`), so that the narrower builds of every
/// multiversioned loop can be run and checked on a machine that has the wider ones. A cap above
/// the CPU's level changes nothing.
pub fn level() -> SimdLevel {
    static FROM_ENV: OnceLock<Option<SimdLevel>> = OnceLock::new();
    let cap = match CAP.load(Ordering::Relaxed) {
        0 => Some(SimdLevel::Portable),
        1 => Some(SimdLevel::Avx2),
        2 => Some(SimdLevel::Avx512),
        _ => *FROM_ENV.get_or_init(|| {
            let name = std::env::var("QUD_SIMD").ok()?;
            let parsed = SimdLevel::parse(&name);
            if parsed.is_none() {
                eprintln!("QUD_SIMD={name} is not portable, avx2 or avx512; ignored");
            }
            parsed
        }),
    };
    cap.map_or(detected(), |cap| cap.min(detected()))
}

/// Cap the level for the whole process from now on (`None`: back to `QUD_SIMD` or the CPU's).
/// Every level gives the same bits (see the module docs), so a cap changes speed only; tests use
/// it to run each build.
pub fn cap_level(cap: Option<SimdLevel>) {
    let value = match cap {
        None => UNSET,
        Some(SimdLevel::Portable) => 0,
        Some(SimdLevel::Avx2) => 1,
        Some(SimdLevel::Avx512) => 2,
    };
    CAP.store(value, Ordering::Relaxed);
}

/// Partial sums of the kernels' reductions (independent accumulators, lane `k` taking every
/// `LANES`-th value): one AVX-512 register, two AVX2 ones. With eight (one AVX2 register) the
/// AVX-512 builds summed half-width: MobileFaceNet's train step on flex went from 70.2 and 68.7
/// to 72.7 and 72.8 samples/s at batch 32, from 68.1 and 67.5 to 70.0 and 70.0 at batch 128
/// (alternating runs of the two builds, Intel AVX-512 2-core machine).
pub(crate) const LANES: usize = 16;

/// The BatchNorm + PReLU arithmetic of the loops written with AVX-512 intrinsics, shared so that
/// they all round as the plain loops do.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// `PReLU((x - m) * a + b)`'s `[m, a, b, slope]`, one per lane.
    #[derive(Clone, Copy)]
    pub(crate) struct Activation {
        m: __m512,
        a: __m512,
        b: __m512,
        slope: __m512,
    }

    impl Activation {
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(crate) fn new([m, a, b, slope]: [f32; 4]) -> Self {
            Self {
                m: _mm512_set1_ps(m),
                a: _mm512_set1_ps(a),
                b: _mm512_set1_ps(b),
                slope: _mm512_set1_ps(slope),
            }
        }

        /// `(x - m, (x - m) * a + b)`, with a separate multiply and add (no FMA), as the plain
        /// loops compute it.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(crate) fn normalise(self, x: __m512) -> (__m512, __m512) {
            let centred = _mm512_sub_ps(x, self.m);
            (
                centred,
                _mm512_add_ps(_mm512_mul_ps(centred, self.a), self.b),
            )
        }

        /// `if y >= 0 { v } else { slope * v }` per lane: PReLU of `y` when `v` is `y`, its
        /// gradient when `v` is the output gradient. A NaN `y` takes the slope, as there.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub(crate) fn prelu(self, y: __m512, v: __m512) -> __m512 {
            let below = _mm512_cmp_ps_mask::<_CMP_NGE_UQ>(y, _mm512_setzero_ps());
            _mm512_mask_mul_ps(v, below, self.slope, v)
        }
    }
}

/// The planes that the next call of a plane function reads (`reads`) and writes (`writes`):
/// a plane function that works from cache requests their lines as it goes (see
/// [`prefetch_line`]). Channel `c`'s planes lie `C` planes apart, and the hardware
/// prefetcher, which stops at 4 KB pages, is slow to find each one.
#[derive(Default)]
pub(crate) struct Upcoming<'a> {
    pub reads: [&'a [f32]; 2],
    pub writes: &'a [std::mem::MaybeUninit<f32>],
}

impl Upcoming<'_> {
    /// Requests the line holding index `at` of every upcoming plane (one call per [`LANES`]
    /// values, a line's worth).
    #[inline(always)]
    pub(crate) fn request(&self, at: usize) {
        prefetch_line(self.reads[0], at);
        prefetch_line(self.reads[1], at);
        prefetch_line(self.writes, at);
    }
}

/// Asks the CPU to bring `values` into its second-level cache ahead of use, one request per
/// 64-byte line (to the first level, a plane's worth of requests stalled on the line fill
/// buffers). For loops over the planes of one channel, which lie `C` planes apart: each plane
/// starts a new stream, and the hardware prefetcher, which does not cross 4 KB pages, has to
/// learn each one afresh. Planes about to be written are requested the same way: the lines
/// arrive exclusive when no other core holds them, so the stores do not wait either.
#[inline(always)]
pub(crate) fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let start = values.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(values)).step_by(64) {
            // SAFETY: prefetching is a hint and never faults; the address lies in `values`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// [`prefetch`] of the line of `values` that holds index `at` (nothing past the end): one line
/// at a time, from inside a loop over another plane, so that the requests do not pile up.
#[inline(always)]
pub(crate) fn prefetch_line<T>(values: &[T], at: usize) {
    if let Some(value) = values.get(at) {
        prefetch(std::slice::from_ref(value));
    }
}
