//! Training throughput (samples/s) on the flex CPU backend, each next to the same step in PyTorch
//! (`python/train.py`, same thread count) when python3 has torch, with the ratio:
//! - a MobileFaceNet train step alone (forward, backward, SGD + global-norm clipping) at batch
//!   32 and 128;
//! - a QUD step: MobileFaceNet student, iresnet50 teacher (eval mode, no graph), queue of 1,024,
//!   batch 64, with peak memory.
//!
//! One warm-up step, then 3 timed steps. Not criterion: a step takes seconds.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use qud_backbone::Backbone;
use std::time::Instant;

const BATCH: usize = 64;
const STEPS: usize = 3;

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Samples/s of `python/train.py` with `args` after the thread count, or why there is none.
fn pytorch(threads: usize, args: &[&str]) -> Result<(f64, f64), String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/train.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(threads.to_string())
        .args(args)
        .output()
        .map_err(|e| format!("no PyTorch reference: {python}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "PyTorch reference failed: {}",
            err.lines().last().unwrap_or("")
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    match (fields.next().flatten(), fields.next().flatten()) {
        (Some(rate), Some(peak)) => Ok((rate, peak)),
        _ => Err(format!("PyTorch reference: unreadable output {text:?}")),
    }
}

/// Samples/s of a MobileFaceNet train step at `batch`: forward in train mode, a loss on the
/// normalised embedding, backward, global-norm clipping and SGD.
fn student_step(device: &Device, batch: usize) -> f64 {
    let train_device = device.clone().autodiff();
    let spec = qud_models::BackboneSpec::default();
    let mut student = qud_trainer::Student {
        backbone: qud_models::create("mobilefacenet", &spec, &train_device).expect("student"),
        head: None,
    };
    let mut optim = qud_trainer::optim::sgd(&qud_config::OptimConfig::default());
    let x = Tensor::<4>::from_data(
        TensorData::new(qud_bench::random_faces(batch), [batch, 3, 112, 112]),
        &train_device,
    );
    let target = qud_loss::l2_normalize(Tensor::<2>::ones([batch, 512], &train_device));
    let mut times = Vec::new();
    for step in 0..=STEPS {
        let start = Instant::now();
        let features = qud_loss::l2_normalize(student.backbone.forward(x.clone()));
        let loss = (features * target.clone()).sum().neg();
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        let (grads, _) = qud_trainer::optim::clip_global_norm(&student, grads, 5.0);
        student = optim.step(0.1 * batch as f64 / 512.0, student, grads);
        let _ = student.backbone.embedding_dim();
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    (STEPS * batch) as f64 / times.iter().sum::<f64>()
}

fn main() {
    let backend = std::env::var("QUD_BENCH_BACKEND").unwrap_or_else(|_| "flex".into());
    let device = qud_backends::device(&backend, "cpu").expect("backend");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let train_device = device.clone().autodiff();
    let spec = qud_models::BackboneSpec::default();
    // As the trainer runs its teacher: eval mode, BatchNorm folded.
    let mut teacher = qud_models::create("iresnet50", &spec, &device)
        .expect("teacher")
        .valid();
    teacher.fold_batchnorm();
    let student = qud_models::create("mobilefacenet", &spec, &train_device).expect("student");
    let mut student = qud_trainer::Student {
        backbone: student,
        head: None,
    };
    let optim_config = qud_config::OptimConfig::default();
    let mut optim = qud_trainer::optim::sgd(&optim_config);
    let mut queue = qud_queue::FeatureQueue::new(1024, 512, qud_queue::QueueKind::Fifo, 0, &device);
    let x = Tensor::<4>::from_data(
        TensorData::new(qud_bench::random_faces(BATCH), [BATCH, 3, 112, 112]),
        &device,
    );
    let mut times = Vec::new();
    for step in 0..=STEPS {
        let start = Instant::now();
        let k = qud_loss::l2_normalize(teacher.forward(x.clone()));
        let features = student.backbone.forward(x.clone().autodiff());
        let out = qud_loss::info_nce(
            qud_loss::l2_normalize(features),
            k.clone(),
            queue.negatives(),
            0.1,
        );
        queue.enqueue(k).expect("finite keys");
        let grads = GradientsParams::from_grads(out.loss.backward(), &student);
        let (grads, _) = qud_trainer::optim::clip_global_norm(&student, grads, 5.0);
        student = optim.step(0.1 * BATCH as f64 / 512.0, student, grads);
        let _ = student.backbone.embedding_dim();
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let rate = (STEPS * BATCH) as f64 / times.iter().sum::<f64>();
    let peak = peak_rss_mb().unwrap_or(f64::NAN);
    println!("QUD step, MobileFaceNet <- iresnet50, batch {BATCH}, {threads} threads");
    println!("qud ({backend}):   {rate:>7.2} samples/s, peak RSS {peak:.0} MB");
    match pytorch(threads, &[]) {
        Ok((theirs, their_peak)) => {
            println!("PyTorch:        {theirs:>7.2} samples/s, peak RSS {their_peak:.0} MB");
            println!("ratio: {:.2}x", rate / theirs);
        }
        Err(why) => println!("{why}"),
    }
    // After the QUD step: its peak memory is the one reported.
    for batch in [32, 128] {
        let ours = student_step(&device, batch);
        println!("MobileFaceNet train step, batch {batch}, {threads} threads");
        println!("qud ({backend}):   {ours:>7.2} samples/s");
        match pytorch(threads, &["student", &batch.to_string()]) {
            Ok((theirs, _)) => {
                println!("PyTorch:        {theirs:>7.2} samples/s");
                println!("ratio: {:.2}x", ours / theirs);
            }
            Err(why) => println!("{why}"),
        }
    }
}
