//! `cargo xtask gpu-check`: qud on one GPU, in three parts, each printed as it finishes.
//! 1. Parity with the flex CPU backend: MobileFaceNet and the teacher from the same weights embed
//!    the same faces (1e-4 relative) and give the same train-mode gradients (cosine > 0.9999).
//! 2. A QUD run through the trainer on synthetic faces (the teacher with random weights,
//!    MobileFaceNet student): every loss finite, the last tenth lower than the first.
//! 3. Samples/s of the QUD step (MobileFaceNet <- teacher) with and without the teacher cache,
//!    next to the same step in PyTorch on the same GPU when python3 has torch with CUDA.
//!
//! Set by xtask from its options: QUD_GPU_BACKEND (cuda | wgpu), QUD_GPU_DEVICE, QUD_GPU_TEACHER
//! (iresnet50), QUD_GPU_BATCH
//! (256), QUD_GPU_STEPS (200, the run's length), QUD_GPU_IMAGES (4,096 synthetic faces),
//! QUD_GPU_TIMED (20 timed steps after 5 warm-up ones). Exits non-zero when a check fails.

use qud_bench::steps::{qud_step, ReferenceError, Timing};
use std::time::Instant;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a count"))
        })
        .unwrap_or(default)
}

fn main() {
    let backend = std::env::var("QUD_GPU_BACKEND").unwrap_or_else(|_| "cuda".into());
    let name = std::env::var("QUD_GPU_DEVICE").unwrap_or_else(|_| match backend.as_str() {
        "cuda" => "cuda:0".into(),
        _ => backend.clone(),
    });
    let teacher = std::env::var("QUD_GPU_TEACHER").unwrap_or_else(|_| "iresnet50".into());
    let batch = setting("QUD_GPU_BATCH", 256);
    let steps = setting("QUD_GPU_STEPS", 200);
    let images = setting("QUD_GPU_IMAGES", 4096);
    let timing = Timing {
        warmup: 5,
        steps: setting("QUD_GPU_TIMED", 20),
    };
    let device = qud_backends::device(&backend, &name)
        .unwrap_or_else(|e| panic!("{backend} device {name}: {e}"));
    let flex = qud_backends::device("flex", "cpu").expect("the flex backend");
    let mut failures = Vec::new();
    println!("gpu-check on {backend} device {name:?}");
    if let Some(caveat) = qud_backends::caveat(&backend, &device) {
        println!("caveat: {caveat}");
    }

    println!("\n1. parity with flex (same weights, 8 faces)");
    let spec = qud_models::BackboneSpec::default();
    for (i, arch) in ["mobilefacenet", teacher.as_str()].into_iter().enumerate() {
        let start = Instant::now();
        let (model, faces) =
            qud_trainer::parity::random_backbone_and_faces(arch, &spec, &flex, 60 + i as u64, 8)
                .expect("a registered backbone");
        let parity = qud_trainer::parity::compare(&model, &faces, &flex, &device);
        let pass = parity.embedding_difference <= 1e-4 && parity.gradient_cosine > 0.9999;
        println!(
            "{arch:<14} embeddings {:.1e} relative, gradient cosine {:.6}  {} ({:.0} s)",
            parity.embedding_difference,
            parity.gradient_cosine,
            if pass { "ok" } else { "FAIL" },
            start.elapsed().as_secs_f64()
        );
        if let Some((name, cosine)) = parity.worst_parameter.as_ref().filter(|_| !pass) {
            println!("  least agreeing gradient: {name}, cosine {cosine:.6}");
        }
        if !pass {
            failures.push(format!("parity of {arch}: {parity:?}"));
        }
    }

    println!("\n2. QUD run: {steps} steps at batch {batch} on {images} synthetic faces");
    let root = qud_bench::data_dir().join("gpu-check");
    let _ = std::fs::remove_dir_all(&root);
    let identities = images.div_ceil(16);
    let config = qud_config::ConfigLoader::new()
        .without_env()
        .set_all([
            "data.format=synthetic".into(),
            format!("data.synthetic_identities={identities}"),
            "data.synthetic_images_per_identity=16".into(),
            format!("teacher.arch={teacher:?}"),
            "teacher.allow_random=true".into(),
            "teacher.cache=off".into(),
            "student.arch=mobilefacenet".into(),
            "method.kind=qud".into(),
            format!("optim.batch_size={batch}"),
            "optim.epochs=1000".into(),
            "optim.lr_milestones=[]".into(),
            "run.checkpoint_every=0".into(),
            "run.log_every=10".into(),
            format!("run.backend={backend:?}"),
            format!("run.devices=[{name:?}]"),
            format!("run.output_dir={:?}", root.display().to_string()),
        ])
        .load()
        .expect("gpu-check config");
    let options = qud_trainer::TrainOptions {
        max_steps: Some(steps),
        ..qud_trainer::TrainOptions::default()
    };
    let start = Instant::now();
    match qud_trainer::train(&config, &options) {
        Ok(report) => {
            let seconds = start.elapsed().as_secs_f64();
            let losses = &report.losses;
            let tenth = (losses.len() / 10).max(1);
            let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
            let (first, last) = (
                mean(&losses[..tenth]),
                mean(&losses[losses.len() - tenth..]),
            );
            let finite = losses.iter().all(|l| l.is_finite());
            let pass = finite && losses.len() == steps && last < first;
            println!(
                "{} steps in {seconds:.0} s ({:.0} samples/s with data loading and checkpoints): \
                 loss {first:.4} over the first tenth, {last:.4} over the last  {}",
                losses.len(),
                (losses.len() * batch) as f64 / seconds,
                if pass { "ok" } else { "FAIL" }
            );
            if !pass {
                failures.push(format!("QUD run: losses {losses:?}"));
            }
        }
        Err(e) => {
            println!("FAIL: {e}");
            failures.push(format!("QUD run: {e}"));
        }
    }

    println!(
        "\n3. QUD step, MobileFaceNet <- {teacher}, batch {batch} ({} warm-up, {} timed steps)",
        timing.warmup, timing.steps
    );
    println!(
        "{:<28} {:>12} {:>14} {:>8}",
        "", "samples/s", "PyTorch", "ratio"
    );
    for cached in [false, true] {
        let ours = qud_step(&device, &teacher, batch, cached, timing);
        let label = if cached {
            "with the teacher cache"
        } else {
            "teacher computed"
        };
        let reference = pytorch(&teacher, batch, cached, timing);
        match &reference {
            Ok(theirs) => println!(
                "{label:<28} {ours:>12.1} {theirs:>14.1} {:>7.2}x",
                ours / theirs
            ),
            Err(_) => println!("{label:<28} {ours:>12.1} {:>14} {:>8}", "-", "-"),
        }
        if let (Err(why), false) = (&reference, cached) {
            println!("  ({why})");
        }
    }
    if !failures.is_empty() {
        eprintln!("\ngpu-check failed:\n{}", failures.join("\n"));
        std::process::exit(1);
    }
    println!("\ngpu-check passed");
}

/// Samples/s of `python/train.py`'s QUD step on the GPU (`cuda`), or why there is none.
fn pytorch(
    teacher: &str,
    batch: usize,
    cached: bool,
    timing: Timing,
) -> Result<f64, ReferenceError> {
    if teacher != "iresnet50" {
        return Err(ReferenceError::Unavailable(format!(
            "python/train.py has no {teacher} teacher"
        )));
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import torch; assert torch.cuda.is_available()"])
        .output()
        .map_err(|source| ReferenceError::Spawn {
            python: python.clone(),
            source,
        })?;
    if !probe.status.success() {
        return Err(ReferenceError::Unavailable(format!(
            "{python} has no torch with a CUDA device"
        )));
    }
    let mut args: Vec<String> = ["1", "qud", &batch.to_string(), "cuda"]
        .map(String::from)
        .into();
    if cached {
        args.push("cached".into());
    }
    args.extend([timing.warmup.to_string(), timing.steps.to_string()]);
    qud_bench::steps::pytorch_reference(&args).map(|(rate, _)| rate)
}
