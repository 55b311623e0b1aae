//! End-to-end runs on tiny synthetic data, exact resume, and the optimisation pieces.

use crate::objective::ArcFaceHead;
use crate::optim::{clip_global_norm, learning_rate};
use crate::{train, TrainOptions};
use burn::optim::GradientsParams;
use burn::prelude::*;
use qud_config::{Config, ConfigLoader};

fn tiny(dir: &std::path::Path, method: &str, extra: &[&str]) -> Config {
    let mut sets: Vec<String> = [
        "data.format=synthetic",
        "data.synthetic_identities=4",
        "data.synthetic_images_per_identity=2",
        "data.workers=2",
        "student.embedding_dim=32",
        "teacher.embedding_dim=32",
        "teacher.arch=mobilefacenet",
        "teacher.allow_random=true",
        "method.queue_size=6",
        "optim.batch_size=4",
        "optim.lr=0.05",
        "optim.lr_batch_size=4",
        "optim.epochs=2",
        "optim.lr_milestones=[2]",
        "run.log_every=1",
        "run.checkpoint_every=0",
        "run.keep_checkpoints=2",
    ]
    .map(String::from)
    .to_vec();
    sets.push(format!("method.kind={method}"));
    sets.push(format!("run.output_dir={}", dir.display()));
    sets.extend(extra.iter().map(|s| s.to_string()));
    ConfigLoader::new()
        .without_env()
        .set_all(sets)
        .load()
        .unwrap()
}

#[test]
fn qud_resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let straight = tiny(&dir.path().join("straight"), "qud", &[]);
    let full = train(&straight, &TrainOptions::default()).unwrap();
    assert_eq!(full.steps, 4);
    assert_eq!(full.losses.len(), 4);

    let split = tiny(&dir.path().join("split"), "qud", &[]);
    let first = train(
        &split,
        &TrainOptions {
            max_steps: Some(3),
            resume: false,
        },
    )
    .unwrap();
    assert_eq!(first.losses.len(), 3);
    let refused = train(&split, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("already holds checkpoints"), "{refused}");
    let rest = train(
        &split,
        &TrainOptions {
            max_steps: None,
            resume: true,
        },
    )
    .unwrap();
    let resumed: Vec<f32> = first.losses.iter().chain(&rest.losses).copied().collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&resumed),
        bits(&full.losses),
        "{resumed:?} vs {:?}",
        full.losses
    );
    let weights = |p: &std::path::Path| {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut all: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.data().to_vec()))
            .collect();
        all.sort();
        all
    };
    let (a, b) = (
        weights(&rest.student_weights),
        weights(&full.student_weights),
    );
    let differing: Vec<&String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| &x.0)
        .collect();
    assert!(
        differing.is_empty(),
        "final weights differ after resume in {} tensors: {:?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );

    // Artefacts of a run.
    let out = dir.path().join("straight");
    for file in [
        "config.toml",
        "metrics.jsonl",
        "eval.jsonl",
        "student.safetensors",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first_line: serde_json::Value =
        serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "epoch",
        "lr",
        "loss",
        "positive_similarity",
        "negative_similarity",
        "samples_per_s",
    ] {
        assert!(
            !first_line[key].is_null(),
            "metrics.jsonl lacks {key}: {first_line}"
        );
    }
    let checkpoints = crate::checkpoint::list(&out).unwrap();
    assert_eq!(
        checkpoints.iter().map(|c| c.0).collect::<Vec<_>>(),
        vec![2, 4],
        "keeps the last 2"
    );
    let spec = qud_models::BackboneSpec {
        embedding_dim: 32,
        dropout: 0.0,
    };
    let model = qud_models::create("mobilefacenet", &spec, &qud_backend_flex::device()).unwrap();
    qud_models::load_weights(model, &full.student_weights)
        .expect("exported student reloads strictly");
    let resolved = ConfigLoader::new()
        .without_env()
        .file(out.join("config.toml"))
        .load()
        .unwrap();
    assert_eq!(resolved, straight);
}

#[test]
fn resume_refuses_a_config_that_changes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny(dir.path(), "qud", &[]);
    train(
        &config,
        &TrainOptions {
            max_steps: Some(1),
            resume: false,
        },
    )
    .unwrap();
    let changed = tiny(dir.path(), "qud", &["method.queue_size=8"]);
    let err = train(
        &changed,
        &TrainOptions {
            max_steps: None,
            resume: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("method.queue_size") && err.contains("cannot resume"),
        "{err}"
    );
}

#[test]
fn every_method_lowers_its_loss_on_a_fixed_batch() {
    // 4 faces, batch 4: every step sees the same images (in another order, flipped or not).
    for method in ["arcface", "mse", "qud"] {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny(
            dir.path(),
            method,
            &[
                "data.synthetic_images_per_identity=1",
                "optim.epochs=6",
                "optim.lr_milestones=[6]",
                "data.flip_prob=0",
            ],
        );
        let report = train(&config, &TrainOptions::default()).unwrap();
        let (first, last) = (report.losses[0], *report.losses.last().unwrap());
        assert!(
            last < first,
            "{method}: loss {first} -> {last} ({:?})",
            report.losses
        );
    }
}

#[test]
fn a_random_teacher_needs_explicit_permission() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny(dir.path(), "qud", &["teacher.allow_random=false"]);
    let err = train(&config, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("teacher.weights is required"), "{err}");
    let config = tiny(
        dir.path(),
        "mse",
        &[
            "teacher.embedding_dim=64",
            "student.embedding_dim=64",
            "teacher.allow_random=true",
        ],
    );
    let mut config = config;
    config.teacher.embedding_dim = 16;
    let err = train(&config, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("teacher.embedding_dim") || err.contains("differs"),
        "{err}"
    );
}

#[test]
fn global_norm_clipping_matches_torch() {
    let device = qud_backend_flex::device().autodiff();
    let fc = crate::seeded(&device, 1, || {
        crate::setup::initialize_now(burn::nn::LinearConfig::new(3, 2).init(&device))
    });
    let x = Tensor::<2>::from_floats([[1.0, -2.0, 3.0]], &device);
    let loss = fc.forward(x).powi_scalar(2).sum() * 10.0;
    let grads = GradientsParams::from_grads(loss.backward(), &fc);
    let gw = grads
        .get::<2>(fc.weight.id)
        .unwrap()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let gb = grads
        .get::<1>(fc.bias.as_ref().unwrap().id)
        .unwrap()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let expected = gw
        .iter()
        .chain(&gb)
        .map(|g| (*g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let (clipped, norm) = clip_global_norm(&fc, grads, 5.0);
    assert!(
        (norm - expected).abs() < 1e-4 * expected,
        "{norm} vs {expected}"
    );
    assert!(norm > 5.0, "the test needs a norm above the bound");
    let cw = clipped
        .get::<2>(fc.weight.id)
        .unwrap()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let cb = clipped
        .get::<1>(fc.bias.as_ref().unwrap().id)
        .unwrap()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let after = cw
        .iter()
        .chain(&cb)
        .map(|g| (*g as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((after - 5.0).abs() < 1e-4, "clipped norm {after}");
    // Direction kept: every component scaled by the same factor.
    let factor = cw[0] as f64 / gw[0] as f64;
    assert!((factor - 5.0 / (expected + 1e-6)).abs() < 1e-5);
}

#[test]
fn warmup_then_step_decay() {
    let mut o = qud_config::OptimConfig {
        warmup_epochs: 1.0,
        batch_size: 512,
        ..Default::default()
    };
    assert!((learning_rate(&o, 0, 0, 10) - 0.01).abs() < 1e-12);
    assert!((learning_rate(&o, 0, 9, 10) - 0.1).abs() < 1e-12);
    assert!(
        (learning_rate(&o, 7, 75, 10) - 0.01).abs() < 1e-12,
        "milestone 8 applies from epoch index 7"
    );
    o.warmup_epochs = 0.0;
    assert_eq!(learning_rate(&o, 0, 0, 10), 0.1);
}

#[test]
fn arcface_loss_matches_the_formula() {
    // logits: s*cos(theta+m) for the target, s*cos otherwise; mean cross-entropy.
    let device = qud_backend_flex::device();
    let mut head = crate::seeded(&device, 1, || {
        crate::setup::initialize_now(ArcFaceHead::new(3, 2, &device))
    });
    head.weight = burn::module::Param::from_tensor(Tensor::from_floats(
        [[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]],
        &device,
    ));
    let f = Tensor::<2>::from_floats([[0.6, 0.8], [1.0, -0.1]], &device);
    let got = head.loss(f, &[1, 0], 0.5, 64.0).into_scalar::<f32>() as f64;
    let centres = [[1.0, 0.0], [0.0, 1.0], [-(0.5f64).sqrt(), -(0.5f64).sqrt()]];
    let feats = [[0.6, 0.8], [1.0 / 1.01f64.sqrt(), -0.1 / 1.01f64.sqrt()]];
    let mut total = 0.0;
    for (f, target) in feats.iter().zip([1usize, 0]) {
        let logits: Vec<f64> = centres
            .iter()
            .enumerate()
            .map(|(c, w)| {
                let cos = f[0] * w[0] + f[1] * w[1];
                64.0 * if c == target {
                    (cos.acos() + 0.5).cos()
                } else {
                    cos
                }
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        total += m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln() - logits[target];
    }
    let want = total / 2.0;
    assert!((got - want).abs() < 1e-3 * want, "{got} vs {want}");
}

/// A RecordIO training set (labelled, with one corrupt JPEG) trains with `on_bad_sample = skip`,
/// counting the sample, and stops naming its key with `fail`.
#[test]
fn trains_from_recordio_and_skips_or_fails_on_a_corrupt_sample() {
    use qud_data::{encode_face, pack_records, FaceDataset, ImageEncoding, SyntheticFaces};
    let dir = tempfile::tempdir().unwrap();
    let faces = SyntheticFaces::new(4, 2, 5);
    let prefix = dir.path().join("train");
    pack_records(&prefix, faces.len(), Some(4), |i| {
        let sample = faces.get(i)?;
        let bytes = if i == 5 {
            b"\xff\xd8\xff\xe0 corrupt".to_vec()
        } else {
            encode_face(&sample.image, ImageEncoding::Jpeg(95))
        };
        Ok((bytes, sample.label))
    })
    .unwrap();
    let rec = format!("data.root={}", prefix.with_extension("rec").display());
    let config = tiny(
        &dir.path().join("skip"),
        "arcface",
        &[&rec, "data.format=auto", "optim.epochs=1"],
    );
    let report = train(&config, &TrainOptions::default()).unwrap();
    assert_eq!(report.steps, 2);
    let metrics = std::fs::read_to_string(dir.path().join("skip/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"skipped_samples\":1"), "{metrics}");

    let config = tiny(
        &dir.path().join("fail"),
        "arcface",
        &[
            &rec,
            "data.format=recordio",
            "data.on_bad_sample=\"fail\"",
            "optim.epochs=1",
        ],
    );
    let err = train(&config, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.rec key 6: cannot decode image"),
        "{err}"
    );
}

fn tensors(path: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Reading the teacher's features from the cache gives the losses and weights of computing them,
/// a second run reuses the cache, and `require` refuses to run without one.
#[test]
fn the_teacher_cache_changes_the_cost_not_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let off = tiny(&dir.path().join("off"), "qud", &["teacher.cache=\"off\""]);
    let on = tiny(&dir.path().join("on"), "qud", &["teacher.cache=\"auto\""]);
    let computed = train(&off, &TrainOptions::default()).unwrap();
    let cached = train(&on, &TrainOptions::default()).unwrap();
    let caches: Vec<_> = std::fs::read_dir(dir.path().join("teacher-cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    assert_eq!(computed.losses.len(), cached.losses.len());
    for (a, b) in computed.losses.iter().zip(&cached.losses) {
        assert!((a - b).abs() <= 1e-5, "loss {a} computed vs {b} cached");
    }
    for ((name, a), (_, b)) in tensors(&computed.student_weights)
        .iter()
        .zip(&tensors(&cached.student_weights))
    {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-4, "{name} differs by {diff}");
    }

    let built = std::fs::metadata(&caches[0]).unwrap().modified().unwrap();
    let again = tiny(
        &dir.path().join("again"),
        "qud",
        &["teacher.cache=\"require\""],
    );
    let reused = train(&again, &TrainOptions::default()).unwrap();
    assert_eq!(reused.losses, cached.losses);
    assert_eq!(
        std::fs::metadata(&caches[0]).unwrap().modified().unwrap(),
        built
    );

    let elsewhere = format!("teacher.cache_dir={}", dir.path().join("empty").display());
    let refused = tiny(
        &dir.path().join("refused"),
        "qud",
        &["teacher.cache=\"require\"", &elsewhere],
    );
    let err = train(&refused, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no teacher cache") && err.contains("qud cache-teacher"),
        "{err}"
    );
}
