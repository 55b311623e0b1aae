//! MegaFace-sized 1:N identification (`qud_eval::ident`): 3,530 probes of 80 identities against
//! 1,000,000 distractors, 512-d, on the flex device; next to the machine's matrix-product peak
//! measured in the same run (a 2048^3 product on the same device) and to the same algorithm in
//! NumPy (`python/ident.py`). Not criterion: one run takes tens of seconds.
//! `QUD_IDENT_SCALE=0.1` scales the distractors down.

use burn::prelude::*;
use qud_eval::ident::{identify, Embeddings};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;

const PROBES: usize = 3_530;
const IDENTITIES: usize = 80;
const DISTRACTORS: usize = 1_000_000;
const DIM: usize = 512;
const BLOCK: usize = 8_192;

fn gaussian(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// Best GFLOP/s of a few `m x k` by `k x n` products on `device`.
fn matmul_gflops(device: &Device, m: usize, k: usize, n: usize) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let a = Tensor::<2>::from_data(TensorData::new(gaussian(&mut rng, m * k), [m, k]), device);
    let b = Tensor::<2>::from_data(TensorData::new(gaussian(&mut rng, k * n), [k, n]), device);
    let _ = a.clone().matmul(b.clone()).into_data();
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let _ = a.clone().matmul(b.clone()).into_data();
            2.0 * (m * k * n) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

fn main() {
    let scale: f64 = std::env::var("QUD_IDENT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let distractors = ((DISTRACTORS as f64 * scale) as usize).max(BLOCK);
    let device = qud_backend_flex_device();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "1:N identification: {PROBES} probes ({IDENTITIES} identities), {distractors} distractors, \
         {DIM}-d, {threads} threads, flex"
    );
    let peak = matmul_gflops(&device, 2048, 2048, 2048);
    let block = matmul_gflops(&device, PROBES, DIM, BLOCK);
    println!("  matrix product 2048^3:           {peak:>7.1} GFLOP/s (the peak)");
    println!("  one block, {PROBES} x {DIM} x {BLOCK}: {block:>7.1} GFLOP/s");

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let centres = gaussian(&mut rng, IDENTITIES * DIM);
    let mut rows = gaussian(&mut rng, PROBES * DIM);
    let labels = (0..PROBES)
        .map(|p| {
            let id = p % IDENTITIES;
            for (v, c) in rows[p * DIM..(p + 1) * DIM]
                .iter_mut()
                .zip(&centres[id * DIM..(id + 1) * DIM])
            {
                *v = 2.0 * *v + c;
            }
            format!("id{id}")
        })
        .collect();
    let probes = Embeddings::normalized(rows, DIM, labels);
    // Sixteen distinct blocks, cycled: the run times the scoring, not a random generator.
    let pool: Vec<Vec<f32>> = (0..16)
        .map(|_| Embeddings::normalized(gaussian(&mut rng, BLOCK * DIM), DIM, Vec::new()).rows)
        .collect();
    let blocks = (0..distractors.div_ceil(BLOCK)).map(|b| {
        let rows = BLOCK.min(distractors - b * BLOCK);
        Ok::<_, String>(pool[b % pool.len()][..rows * DIM].to_vec())
    });
    let score = identify(&probes, None, blocks, distractors, &[1e-6], &device).expect("scored");
    println!(
        "qud:   {:>8.2} s, {:.1} GFLOP/s = {:.0} % of the peak (rank-1 {:.4}, TAR at 1e-6 {:.4})",
        score.seconds,
        score.gflops,
        100.0 * score.gflops / peak,
        score.rank1,
        score.tar_at_far[0].tar
    );

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ident.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match std::process::Command::new(&python)
        .arg(&script)
        .args([PROBES, IDENTITIES, distractors, DIM, BLOCK].map(|v| v.to_string()))
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            match text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                Some(theirs) => {
                    println!("NumPy: {theirs:>8.2} s (the same blocks and rules, float32 BLAS)");
                    println!("speedup: {:.2}x", theirs / score.seconds);
                }
                None => println!("NumPy reference: unreadable output {text:?}"),
            }
        }
        Ok(out) => println!(
            "NumPy reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => println!("no NumPy reference: {python}: {e}"),
    }
}

fn qud_backend_flex_device() -> Device {
    qud_backends::device("flex", "cpu").expect("the flex device")
}
