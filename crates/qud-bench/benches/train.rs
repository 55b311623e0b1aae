//! QUD training throughput (samples/s) and peak memory: MobileFaceNet student, iresnet50 teacher
//! (eval mode, no graph), queue of 1,024, batch 64, SGD + global-norm clipping, on the flex CPU
//! backend; then the same step in PyTorch (`python/train.py`, QUD formulation, same thread count)
//! when python3 has torch, and the ratio. One warm-up step, then 3 timed steps. Not criterion:
//! a step takes seconds.

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

fn main() {
    let backend = std::env::var("QUD_BENCH_BACKEND").unwrap_or_else(|_| "flex".into());
    let device = qud_backends::device(&backend, "cpu").expect("backend");
    let train_device = device.clone().autodiff();
    let spec = qud_models::BackboneSpec::default();
    let teacher = qud_models::create("iresnet50", &spec, &device)
        .expect("teacher")
        .valid();
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
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("QUD step, MobileFaceNet <- iresnet50, batch {BATCH}, {threads} threads");
    println!("qud ({backend}):   {rate:>7.2} samples/s, peak RSS {peak:.0} MB");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/train.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match std::process::Command::new(&python)
        .arg(&script)
        .arg(threads.to_string())
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut fields = text.split_whitespace();
            let (Some(theirs), Some(their_peak)) = (
                fields.next().and_then(|v| v.parse::<f64>().ok()),
                fields.next().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                println!("PyTorch reference: unreadable output {text:?}");
                return;
            };
            println!("PyTorch:        {theirs:>7.2} samples/s, peak RSS {their_peak:.0} MB");
            println!("ratio: {:.2}x", rate / theirs);
        }
        Ok(out) => println!(
            "PyTorch reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => println!("no PyTorch reference: {python}: {e}"),
    }
}
