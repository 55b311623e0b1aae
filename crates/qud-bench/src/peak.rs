//! The machine's fp32 peak, measured: every core running independent fused multiply-adds on the
//! widest vectors it has, the ceiling the "percent of peak" goals are read against.

use std::time::Instant;

/// Measured fp32 peak in GFLOP/s over `threads` threads, and the instructions that reached it;
/// `None` where no FMA instructions are available to this build.
pub fn fp32_peak(threads: usize) -> Option<(f64, &'static str)> {
    let (per_call, isa) = kernel()?;
    let calls = 20_000usize;
    let run = || {
        let start = Instant::now();
        let mut sink = 0.0f32;
        for _ in 0..calls {
            sink += per_call.0();
        }
        std::hint::black_box(sink);
        start.elapsed().as_secs_f64()
    };
    run(); // clocks up
    let mut best = f64::MAX;
    for _ in 0..3 {
        let slowest = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(run)).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("peak thread"))
                .fold(0.0f64, f64::max)
        });
        best = best.min(slowest);
    }
    let flops = (threads.max(1) * calls) as f64 * per_call.1;
    Some((flops / best / 1e9, isa))
}

/// One call's function and the flops it performs.
type Kernel = (fn() -> f32, f64);

const ROUNDS: usize = 1_000;
/// Independent accumulators: enough to cover the FMA latency on two ports.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
fn kernel() -> Option<(Kernel, &'static str)> {
    if std::arch::is_x86_feature_detected!("avx512f") {
        let flops = (ROUNDS * CHAINS * 16 * 2) as f64;
        // SAFETY: avx512f was detected at run time.
        return Some(((|| unsafe { x86::fma512() }, flops), "AVX-512 FMA"));
    }
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let flops = (ROUNDS * CHAINS * 8 * 2) as f64;
        // SAFETY: avx2 and fma were detected at run time.
        return Some(((|| unsafe { x86::fma256() }, flops), "AVX2 FMA"));
    }
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn kernel() -> Option<(Kernel, &'static str)> {
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, ROUNDS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512() -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); CHAINS];
        let (a, b) = (_mm512_set1_ps(0.999_9), _mm512_set1_ps(1e-4));
        for _ in 0..ROUNDS {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256() -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); CHAINS];
        let (a, b) = (_mm256_set1_ps(0.999_9), _mm256_set1_ps(1e-4));
        for _ in 0..ROUNDS {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut lanes = [0.0f32; 8];
        for &x in &acc {
            let mut v = [0.0f32; 8];
            // SAFETY: `v` holds the 8 floats the store writes.
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), x) };
            for (l, e) in lanes.iter_mut().zip(v) {
                *l += e;
            }
        }
        lanes.iter().sum()
    }
}
