//! Training throughput (samples/s) on the flex CPU backend, each next to the same step in PyTorch
//! (`python/train.py`, same thread count) when python3 has torch, with the ratio:
//! - a MobileFaceNet train step alone (forward, backward, SGD + global-norm clipping) at batch
//!   32 and 128;
//! - a QUD step: MobileFaceNet student, iresnet50 teacher (eval mode, no graph), queue of 1,024,
//!   batch 64, with peak memory.
//!
//! The student's rows also give the arithmetic rate (three times the forward's multiply-adds
//! per image: forward, input gradient, weight gradient) as a share of the machine's fp32 peak,
//! measured first (`qud_bench::peak`).
//!
//! One warm-up step, then 3 timed steps. Not criterion: a step takes seconds.

use qud_backbone::Backbone;
use qud_bench::steps::{qud_step, student_step, ReferenceError, Timing};

const BATCH: usize = 64;
const TIMING: Timing = Timing {
    warmup: 1,
    steps: 3,
};

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Samples/s and peak RSS of `python/train.py` with `args` after the thread count.
fn pytorch(threads: usize, args: &[&str]) -> Result<(f64, f64), ReferenceError> {
    let args: Vec<String> = std::iter::once(threads.to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    qud_bench::steps::pytorch_reference(&args)
}

fn main() {
    let backend = std::env::var("QUD_BENCH_BACKEND").unwrap_or_else(|_| "flex".into());
    let device = qud_backends::device(&backend, "cpu").expect("backend");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Measured before anything else runs: the machine's ceiling for the student's share below.
    let peak = qud_bench::peak::fp32_peak(threads);
    if let Some((gflops, isa)) = peak {
        println!("fp32 peak ({isa}, {threads} threads, measured): {gflops:.0} GFLOP/s");
    }
    let student_macs = qud_models::create(
        "mobilefacenet",
        &qud_models::BackboneSpec::default(),
        &device,
    )
    .expect("registered")
    .macs() as f64;
    let rate = qud_step(&device, "iresnet50", BATCH, false, TIMING);
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    println!("QUD step, MobileFaceNet <- iresnet50, batch {BATCH}, {threads} threads");
    println!("qud ({backend}):   {rate:>7.2} samples/s, peak RSS {rss:.0} MB");
    match pytorch(threads, &[]) {
        Ok((theirs, their_peak)) => {
            println!("PyTorch:        {theirs:>7.2} samples/s, peak RSS {their_peak:.0} MB");
            println!("ratio: {:.2}x", rate / theirs);
        }
        Err(why) => println!("{why}"),
    }
    // After the QUD step: its peak memory is the one reported.
    for batch in [32, 128] {
        let ours = student_step(&device, batch, TIMING);
        println!("MobileFaceNet train step, batch {batch}, {threads} threads");
        println!("qud ({backend}):   {ours:>7.2} samples/s");
        let gflops = 3.0 * 2.0 * student_macs * ours / 1e9;
        match peak {
            Some((top, _)) => println!(
                "                {gflops:.1} GFLOP/s, {:.1} % of the fp32 peak",
                100.0 * gflops / top
            ),
            None => println!("                {gflops:.1} GFLOP/s"),
        }
        match pytorch(threads, &["student", &batch.to_string()]) {
            Ok((theirs, _)) => {
                println!("PyTorch:        {theirs:>7.2} samples/s");
                println!("ratio: {:.2}x", ours / theirs);
            }
            Err(why) => println!("{why}"),
        }
    }
}
