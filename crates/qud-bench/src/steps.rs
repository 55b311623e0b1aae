//! Timed training steps on any device, as the trainer computes them: the `train` benchmark (CPU,
//! next to PyTorch) and `cargo xtask gpu-check` (one GPU) measure the same code.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use qud_backbone::Backbone;
use std::time::Instant;

/// Warm-up steps (untimed: first-use allocation, GPU kernel compilation and autotuning) and timed
/// steps of one measurement.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: usize,
    pub steps: usize,
}

/// Samples/s of a MobileFaceNet train step at `batch` on `device`: forward in train mode, a loss
/// on the normalised embedding, backward, global-norm clipping and SGD.
pub fn student_step(device: &Device, batch: usize, timing: Timing) -> f64 {
    let train_device = device.clone().autodiff();
    let spec = qud_models::BackboneSpec::default();
    // An Option so that each step can move the student through the optimizer.
    let mut student = Some(qud_trainer::Student {
        backbone: qud_models::create("mobilefacenet", &spec, &train_device).expect("student"),
        head: None,
    });
    let mut optim = qud_trainer::optim::sgd(&qud_config::OptimConfig::default());
    let x = Tensor::<4>::from_data(
        TensorData::new(crate::random_faces(batch), [batch, 3, 112, 112]),
        &train_device,
    );
    let target = qud_loss::l2_normalize(Tensor::<2>::ones([batch, 512], &train_device));
    timed(device, batch, timing, || {
        let net = student.take().expect("the student");
        let features = qud_loss::l2_normalize(net.backbone.forward(x.clone()));
        let loss = (features * target.clone()).sum().neg();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let (grads, _) = qud_trainer::optim::clip_global_norm(&net, grads, 5.0);
        student = Some(optim.step(0.1 * batch as f64 / 512.0, net, grads));
    })
}

/// Samples/s of a QUD step at `batch` on `device`, through the trainer's own
/// [`qud_trainer::train_step`]: MobileFaceNet student, `teacher_arch` (the paper's iresnet50) in
/// eval mode with BatchNorm folded (as the trainer builds it), queue of 1,024, InfoNCE at tau
/// 0.1, global-norm clipping, SGD. With `cached`, the teacher's keys are read from a teacher
/// cache built first (a file in the temporary directory), instead of the teacher's forward pass.
pub fn qud_step(
    device: &Device,
    teacher_arch: &str,
    batch: usize,
    cached: bool,
    timing: Timing,
) -> f64 {
    use qud_data::FaceDataset;
    use qud_trainer::{Objective, StepContext, TrainState};
    let spec = qud_models::BackboneSpec::default();
    let mut teacher = qud_models::create(teacher_arch, &spec, device)
        .expect("teacher")
        .valid();
    teacher.fold_batchnorm();
    let teacher = qud_trainer::Teacher::Backbone(Box::new(teacher));
    let faces = qud_data::SyntheticFaces::new(batch, 1, 7);
    let face = 3 * 112 * 112;
    let mut images = vec![0.0; batch * face];
    for (i, out) in images.chunks_exact_mut(face).enumerate() {
        faces.get_into(i, false, out).expect("synthetic face");
    }
    let batch_of_faces = qud_data::Batch {
        images,
        indices: (0..batch).collect(),
        flips: vec![false; batch],
        labels: vec![None; batch],
        skipped: Vec::new(),
    };
    let cache_path = std::env::temp_dir().join(format!("qud-bench-{}.cache", std::process::id()));
    let cache = cached.then(|| {
        let key = qud_trainer::CacheKey {
            teacher: 1,
            dataset: 2,
            preprocessing: 3,
        };
        let dtype = qud_config::CacheDtype::F32;
        qud_trainer::TeacherCache::build(&cache_path, key, dtype, &faces, &teacher, device, 32, 2)
            .expect("teacher cache")
    });
    let mut state = Some(TrainState {
        student: qud_trainer::Student {
            backbone: qud_models::create("mobilefacenet", &spec, &device.clone().autodiff())
                .expect("student"),
            head: None,
        },
        optim: qud_trainer::optim::sgd(&qud_config::OptimConfig::default()),
        objective: Objective::Qud {
            queue: qud_queue::FeatureQueue::new(1024, 512, qud_queue::QueueKind::Fifo, 0, device),
            tau: 0.1,
        },
        loss_scale: None,
    });
    let devices = [device.clone()];
    let mut context = StepContext::single(&devices, Some(&teacher), 5.0);
    context.cache = cache.as_ref();
    let lr = 0.1 * batch as f64 / 512.0;
    let mut step = 0;
    let rate = timed(device, batch, timing, || {
        let current = state.take().expect("the training state");
        let (next, _) =
            qud_trainer::train_step(current, &context, &batch_of_faces, lr, step, false)
                .expect("a finite QUD step");
        state = Some(next);
        step += 1;
    });
    drop(cache);
    let _ = std::fs::remove_file(&cache_path);
    rate
}

/// `batch * steps / seconds` over the timed steps of `step`, waiting for `device` to finish
/// each step's work (GPU backends queue it).
fn timed(device: &Device, batch: usize, timing: Timing, mut step: impl FnMut()) -> f64 {
    let mut seconds = 0.0;
    for i in 0..timing.warmup + timing.steps {
        let start = Instant::now();
        step();
        device.sync().expect("device work finishes");
        if i >= timing.warmup {
            seconds += start.elapsed().as_secs_f64();
        }
    }
    (timing.steps * batch) as f64 / seconds
}

/// Why a PyTorch reference gave no number: the benchmarks print it in place of the row.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("no PyTorch reference: {python}: {source}")]
    Spawn {
        python: String,
        source: std::io::Error,
    },
    #[error("no PyTorch reference: {0}")]
    Unavailable(String),
    #[error("PyTorch reference failed: {0}")]
    Failed(String),
    #[error("PyTorch reference: unreadable output {0:?}")]
    Unreadable(String),
}

/// `(samples/s, peak RSS in MB)` printed by `python/train.py` run with `args`, or why there is
/// none (no Python, no torch, a failed run).
pub fn pytorch_reference(args: &[String]) -> Result<(f64, f64), ReferenceError> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/train.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|source| ReferenceError::Spawn {
            python: python.clone(),
            source,
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(ReferenceError::Failed(
            err.lines().last().unwrap_or("").to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    match (fields.next().flatten(), fields.next().flatten()) {
        (Some(rate), Some(peak)) => Ok((rate, peak)),
        _ => Err(ReferenceError::Unreadable(text.into_owned())),
    }
}
