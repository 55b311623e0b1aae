//! The foundation working together: a config drives a queue, the QUD loss and the trainer's SGD,
//! and a tiny linear student learns a frozen linear teacher's embedding without labels. (The
//! trainer's own step, `qud_trainer::train_step`, is held against PyTorch in qud-trainer.)

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::prelude::*;
use qud_config::ConfigLoader;
use qud_loss::{info_nce, l2_normalize};
use qud_queue::FeatureQueue;

#[derive(Module, Debug)]
struct Embed {
    fc: Linear,
}

/// Distil for `steps` steps on `backend`; returns (first loss, last loss, last positive sim).
fn distil(backend: &str, steps: usize) -> (f32, f32, f32) {
    let config = ConfigLoader::new()
        .without_env()
        .set("data.format=synthetic")
        .set("method.queue_size=64")
        .set("optim.batch_size=16")
        .set("optim.lr=0.5")
        .load()
        .unwrap();
    let device = qud_backends::device(backend, "cpu").unwrap();
    device.seed(config.run.seed);
    let (input, dim) = (24, 8);
    let train = device.clone().autodiff();
    let teacher = Embed {
        fc: LinearConfig::new(input, dim).init(&device),
    };
    let mut student = Embed {
        fc: LinearConfig::new(input, dim).init(&train),
    };
    let mut queue = FeatureQueue::new(
        config.method.queue_size,
        dim,
        config.method.queue_kind,
        config.run.seed,
        &device,
    );
    // The trainer's SGD (momentum without dampening, coupled weight decay), as a run builds it.
    let mut optim = qud_trainer::optim::sgd(&config.optim);
    let lr = config.optim.lr_at_epoch(0);
    let batch = config.optim.batch_size;
    let mut losses = Vec::new();
    let mut last_pos = 0.0;
    for _ in 0..steps {
        let x = Tensor::<2>::random(
            [batch, input],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let k = l2_normalize(teacher.fc.forward(x.clone()));
        let q = l2_normalize(student.fc.forward(x.autodiff()));
        let out = info_nce(q, k.clone(), queue.negatives(), config.method.tau);
        losses.push(out.loss_value());
        last_pos = out.positive_similarity();
        let grads = GradientsParams::from_grads(out.loss.backward(), &student);
        student = optim.step(lr, student, grads);
        queue.enqueue(k).unwrap();
    }
    assert_eq!(queue.total_enqueued(), (steps * batch) as u64);
    assert_eq!(queue.pointer(), steps * batch % config.method.queue_size);
    let head: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = losses[steps - 5..].iter().sum::<f32>() / 5.0;
    (head, tail, last_pos)
}

#[test]
fn student_learns_the_teacher_on_every_cpu_backend() {
    for backend in ["flex", "ndarray"] {
        let (head, tail, pos) = distil(backend, 80);
        assert!(
            head.is_finite() && tail.is_finite(),
            "{backend}: {head} {tail}"
        );
        assert!(
            tail < 0.5 * head,
            "{backend}: loss went from {head} to {tail}"
        );
        assert!(pos > 0.9, "{backend}: positive similarity only {pos}");
    }
}

/// Every shipped configuration loads, validates, and keeps the schedule its header promises.
#[test]
fn every_shipped_config_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files: Vec<_> = std::fs::read_dir(root.join("paper"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 21, "paper configs missing: {files:?}");
    for file in files {
        let config = ConfigLoader::new()
            .without_env()
            .file(&file)
            .set("data.root=/data/train")
            .set("teacher.weights=/models/teacher.pth")
            .load()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file.file_stem().unwrap().to_str().unwrap();
        for arch in [&config.teacher.arch, &config.student.arch] {
            assert!(
                qud_models::names().contains(&arch.as_str()),
                "{name}: {arch} is not a registered backbone"
            );
        }
        let (epochs, milestones) = if name.starts_with("casia") || name.starts_with("idiff") {
            (40, vec![22, 30, 40])
        } else {
            (26, vec![8, 14, 20, 25])
        };
        assert_eq!(config.optim.epochs, epochs, "{name}");
        assert_eq!(config.optim.lr_milestones, milestones, "{name}");
        if let Some(tau) = name.strip_prefix("ablation_tau_") {
            let tau: f64 = format!("0.{}", &tau[1..]).parse().unwrap();
            assert_eq!(config.method.tau, tau, "{name}");
        }
        if let Some(n) = name.strip_prefix("ablation_queue_") {
            assert_eq!(
                config.method.queue_size,
                n.parse::<usize>().unwrap(),
                "{name}"
            );
        }
    }
}

/// The real-data configs load and validate, and name an ONNX teacher whose contract is the one
/// `../shared/models/README.md` states for fr_feature.onnx; the augmented one differs from the
/// plain one in its augmentation only.
#[test]
fn real_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/real");
    let load = |name: &str| {
        let file = root.join(name);
        ConfigLoader::new()
            .without_env()
            .file(&file)
            .load()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    };
    let plain = load("lfw_fr_feature.toml");
    let augmented = load("lfw_fr_feature_augment.toml");
    for config in [&plain, &augmented] {
        assert_eq!(config.teacher.format, qud_config::WeightFormat::Onnx);
        assert_eq!(config.teacher.onnx.mean, [127.0; 3]);
        assert_eq!(config.teacher.onnx.std, [128.0; 3]);
        assert_eq!((config.method.tau, config.method.queue_size), (0.1, 1024));
        assert_eq!(config.data.extra_roots.len(), 1);
    }
    assert!(!plain.data.augment.is_active() && augmented.data.augment.is_active());
    let mut same = augmented.clone();
    same.data.augment = plain.data.augment;
    same.run.output_dir = plain.run.output_dir.clone();
    assert_eq!(same, plain);
}
