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

/// The tensors of a safetensors file ([`tensors`]) as bits, for bit-for-bit comparisons.
fn tensor_bits(path: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    tensors(path)
        .into_iter()
        .map(|(name, values)| (name, values.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

#[test]
fn qud_resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let straight = tiny(
        &dir.path().join("straight"),
        "qud",
        &["run.export_onnx=true"],
    );
    let full = train(&straight, &TrainOptions::default()).unwrap();
    assert_eq!(full.steps, 4);
    assert_eq!(full.losses.len(), 4);
    assert_eq!(full.epoch_seconds.len(), 2, "{:?}", full.epoch_seconds);
    assert!(full.epoch_seconds.iter().all(|&s| s > 0.0));

    let split = tiny(&dir.path().join("split"), "qud", &[]);
    let first = train(
        &split,
        &TrainOptions {
            max_steps: Some(3),
            ..TrainOptions::default()
        },
    )
    .unwrap();
    assert_eq!(first.losses.len(), 3);
    // Stopped in its second epoch: only the first one finished.
    assert_eq!(first.epoch_seconds.len(), 1);
    let refused = train(&split, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("already holds checkpoints"), "{refused}");
    let rest = train(
        &split,
        &TrainOptions {
            resume: true,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    assert_eq!(rest.epoch_seconds.len(), 1);
    let resumed: Vec<f32> = first.losses.iter().chain(&rest.losses).copied().collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&resumed),
        bits(&full.losses),
        "{resumed:?} vs {:?}",
        full.losses
    );
    let (a, b) = (
        tensor_bits(&rest.student_weights),
        tensor_bits(&full.student_weights),
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
        "student.onnx",
        "report.html",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    // run.export_onnx: the ONNX student embeds as the safetensors student does.
    let device = Device::flex();
    let spec = qud_models::BackboneSpec {
        embedding_dim: 32,
        dropout: 0.0,
    };
    // Under the seeding lock: unlocked draws would shift another test's seeded section.
    let (student, faces) = crate::seeded(&device, 5, || {
        let student = qud_models::create("mobilefacenet", &spec, &device).unwrap();
        let student = qud_models::load_weights(student, &out.join("student.safetensors"))
            .unwrap()
            .valid();
        let faces = Tensor::<4>::random(
            [2, 3, 112, 112],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        (student, faces)
    });
    let onnx =
        qud_onnx::OnnxFaceModel::load(&out.join("student.onnx"), &Default::default()).unwrap();
    use qud_backbone::{Backbone, FaceEmbedder};
    let want = student.forward(faces.clone());
    let got = onnx.embed_faces(faces);
    let difference = (want.clone() - got).abs().max().into_scalar::<f32>();
    let scale = want.abs().max().into_scalar::<f32>();
    assert!(
        difference <= 1e-5 * scale,
        "ONNX student differs by {difference} (scale {scale})"
    );
    let report = std::fs::read_to_string(out.join("report.html")).unwrap();
    // The loss chart: a titled SVG with a line.
    let titled_loss = report.split("<text").any(|t| {
        t.split_once('>')
            .and_then(|(_, body)| body.split_once("</text>"))
            .is_some_and(|(text, _)| text.trim() == "loss")
    });
    assert!(titled_loss && report.contains("<polyline"), "loss curve");
    assert!(
        report.contains("learning rate") && report.contains("[method]"),
        "lr curve, config"
    );
    // Every logged step reads back as the struct the loop wrote, QUD's similarities included.
    let rows: Vec<crate::metrics::StepRow> = crate::metrics::read_rows(&out.join("metrics.jsonl"));
    assert_eq!(rows.len(), full.losses.len(), "log_every = 1");
    assert!(rows
        .iter()
        .all(|r| r.positive_similarity.is_some() && r.negative_similarity.is_some()));
    assert!(rows.windows(2).all(|w| w[1].step == w[0].step + 1));
    assert_eq!(rows.last().unwrap().loss, *full.losses.last().unwrap());
    // The same steps as TensorBoard scalars (one event file per run start).
    let events: Vec<_> = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let scalars = crate::tensorboard::read_scalars(&events[0]).unwrap();
    let losses: Vec<(i64, f32)> = scalars
        .iter()
        .filter(|s| s.tag == "train/loss")
        .map(|s| (s.step, s.value))
        .collect();
    let logged: Vec<(i64, f32)> = rows.iter().map(|r| (r.step as i64, r.loss)).collect();
    assert_eq!(losses, logged);
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
    let device = qud_backend_flex::device();
    // Under the seeding lock: a lazily initialised parameter drawn here would shift the
    // generator's stream under another test's seeded section.
    crate::seeded(&device, 0, || {
        let model = qud_models::create("mobilefacenet", &spec, &device).unwrap();
        qud_models::load_weights(model, &full.student_weights)
            .expect("exported student reloads strictly")
    });
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
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let changed = tiny(dir.path(), "qud", &["method.queue_size=8"]);
    let err = train(
        &changed,
        &TrainOptions {
            resume: true,
            ..TrainOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("method.queue_size") && err.contains("cannot resume"),
        "{err}"
    );
}

/// A tiny QUD run in `dir` stopped after one step: its config, report and checkpoint.
fn one_step_run(dir: &std::path::Path) -> (Config, crate::TrainReport, std::path::PathBuf) {
    let config = tiny(dir, "qud", &[]);
    let once = TrainOptions {
        max_steps: Some(1),
        ..TrainOptions::default()
    };
    let report = train(&config, &once).unwrap();
    let (_, checkpoint) = crate::checkpoint::list(dir).unwrap().pop().unwrap();
    (config, report, checkpoint)
}

/// A QUD checkpoint without its queue cannot be resumed: continuing from fresh random negatives
/// would silently change the run.
#[test]
fn resume_refuses_a_qud_checkpoint_without_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, latest) = one_step_run(dir.path());
    std::fs::remove_file(latest.join("queue.bin")).unwrap();
    let resume = TrainOptions {
        resume: true,
        ..TrainOptions::default()
    };
    let err = train(&config, &resume).unwrap_err().to_string();
    assert!(err.contains("queue.bin"), "{err}");
}

/// A checkpoint whose files changed after they were written (one flipped bit in the student)
/// is refused on resume, naming the file, instead of resuming from damaged weights.
#[test]
fn resume_refuses_a_damaged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (config, report, latest) = one_step_run(dir.path());
    // `qud export --checkpoint`: the checkpoint's student, read with the run's config.toml, is
    // the student the run ended with.
    let (exported, _) = crate::checkpoint_student(&latest).unwrap();
    let path = dir.path().join("from-checkpoint.safetensors");
    qud_models::save_safetensors(&exported, &path).unwrap();
    assert!(tensor_bits(&path) == tensor_bits(&report.student_weights));
    let student = latest.join("student.bpk");
    let mut bytes = std::fs::read(&student).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&student, &bytes).unwrap();
    let resume = TrainOptions {
        resume: true,
        ..TrainOptions::default()
    };
    let err = train(&config, &resume).unwrap_err().to_string();
    assert!(
        err.contains("student.bpk") && err.contains("damaged"),
        "{err}"
    );
    let err = crate::checkpoint_student(&latest).unwrap_err().to_string();
    assert!(
        err.contains("student.bpk") && err.contains("damaged"),
        "{err}"
    );
    bytes[middle] ^= 0x10;
    std::fs::write(&student, &bytes).unwrap();
    // A checkpoint from a qud before checksums (no checksums.json) is still read.
    std::fs::remove_file(latest.join("checksums.json")).unwrap();
    crate::checkpoint::verify(&latest).unwrap();
    train(&config, &resume).unwrap();
}

/// Uniform numbers in [0, 1) from SplitMix64 seeded with `seed`: reproducible test choices.
fn uniform_from(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Any byte of any checkpoint file changed (300 random single-byte changes), or any file cut
/// short: resume refuses the checkpoint. Only `checksums.json` may take a change that leaves
/// its values as they were (JSON whitespace).
#[test]
fn every_damaged_checkpoint_byte_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, checkpoint) = one_step_run(dir.path());
    crate::checkpoint::verify(&checkpoint).unwrap();
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&checkpoint)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 5, "{files:?}");
    let mut uniform = uniform_from(31);
    let (mut caught, mut harmless) = (0, 0);
    for _ in 0..300 {
        let file = &files[(uniform() * files.len() as f64) as usize];
        let mut bytes = std::fs::read(file).unwrap();
        let at = (uniform() * bytes.len() as f64) as usize;
        let original = bytes[at];
        bytes[at] ^= 1 + (uniform() * 255.0) as u8;
        std::fs::write(file, &bytes).unwrap();
        match crate::checkpoint::verify(&checkpoint) {
            Err(e) => {
                let name = file.file_name().unwrap().to_string_lossy();
                assert!(e.to_string().contains("damaged"), "{e}");
                assert!(
                    e.to_string().contains(name.as_ref()) || name == "checksums.json",
                    "{e}"
                );
                caught += 1;
            }
            Ok(()) => {
                assert!(
                    file.ends_with("checksums.json"),
                    "{} changed unseen",
                    file.display()
                );
                harmless += 1;
            }
        }
        bytes[at] = original;
        std::fs::write(file, &bytes).unwrap();
    }
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        std::fs::write(file, &bytes[..bytes.len() - 1]).unwrap();
        assert!(
            crate::checkpoint::verify(&checkpoint).is_err(),
            "{}",
            file.display()
        );
        std::fs::write(file, &bytes).unwrap();
    }
    assert!(caught > 250, "{caught} caught, {harmless} harmless");
    crate::checkpoint::verify(&checkpoint).unwrap();
}

/// Set in the child processes of [`killed_runs_resume_to_the_same_weights`]: the run directory.
const KILLED_RUN: &str = "QUD_TEST_KILLED_RUN";

/// The run [`killed_runs_resume_to_the_same_weights`] kills: 3 epochs of 2 steps, a checkpoint
/// after every step.
fn killable(out: &std::path::Path) -> Config {
    tiny(out, "qud", &["optim.epochs=3", "run.checkpoint_every=1"])
}

/// Crash safety: a run killed with SIGKILL at random moments (in a step, in a checkpoint write,
/// while writing its outputs) and resumed each time ends with the final weights of a run never
/// interrupted, bit for bit. The test binary re-runs itself as the child that is killed.
#[test]
fn killed_runs_resume_to_the_same_weights() {
    if let Some(out) = std::env::var_os(KILLED_RUN) {
        let out = std::path::PathBuf::from(out);
        let resume = !crate::checkpoint::list(&out).unwrap().is_empty();
        let options = TrainOptions {
            resume,
            ..TrainOptions::default()
        };
        train(&killable(&out), &options).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Whether run `out` has written into a checkpoint's `step-N.tmp` since `since` (one left
    // by an earlier kill does not count).
    let writing_checkpoint = |out: &std::path::Path, since: std::time::SystemTime| {
        std::fs::read_dir(crate::checkpoint::directory(out)).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.file_name().to_string_lossy().ends_with(".tmp")
                    && e.metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t >= since)
            })
        })
    };
    // Runs this test's body as a child process in `out`, killed (SIGKILL) `kill_at` seconds in,
    // or with `in_write` as soon as it is seen writing a checkpoint, if it is still running:
    // its run time, or when killed whether that was in a checkpoint write.
    let child_run = |out: &std::path::Path, kill_at: Option<f64>, in_write: bool| {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::killed_runs_resume_to_the_same_weights",
                "--test-threads=1",
            ])
            .env(KILLED_RUN, out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (spawned, since) = (std::time::Instant::now(), std::time::SystemTime::now());
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "a child run failed: {status}");
                return Ok(spawned.elapsed().as_secs_f64());
            }
            if kill_at.is_some_and(|t| spawned.elapsed().as_secs_f64() >= t)
                || (in_write && writing_checkpoint(out, since))
            {
                child.kill().unwrap();
                child.wait().unwrap();
                return Err(writing_checkpoint(out, since));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    // The uninterrupted run, in a child too, so both pay the same start-up; it also builds the
    // teacher cache the killed run then shares.
    let straight = dir.path().join("straight");
    child_run(&straight, None, false).unwrap();
    let run_time = child_run(&dir.path().join("timed"), None, false).unwrap();

    let out = dir.path().join("killed");
    let (mut kills, mut in_checkpoint_writes) = (0, 0);
    // Kill moments spread over the run, reproducibly.
    let mut uniform = uniform_from(0x5EED);
    for attempt in 0.. {
        // Every third child is killed in a checkpoint write, the others at a random moment
        // (start-up, a step, a write, the final outputs). After 40 attempts the child runs to
        // the end, so the test ends whatever the timing.
        let in_write = attempt < 40 && attempt % 3 == 2;
        let kill_at = (attempt < 40 && !in_write).then(|| run_time * uniform());
        match child_run(&out, kill_at, in_write) {
            Ok(_) => break,
            Err(in_write) => {
                kills += 1;
                in_checkpoint_writes += usize::from(in_write);
            }
        }
    }
    eprintln!(
        "a run of {run_time:.2} s killed {kills} times, {in_checkpoint_writes} of them in a \
         checkpoint write"
    );
    assert!(
        kills >= 3,
        "only {kills} kills: the run outpaced the kill moments"
    );
    assert!(
        in_checkpoint_writes >= 1,
        "no kill landed in a checkpoint write"
    );
    // Tensors, not file bytes: burn writes the safetensors metadata in hash-map order.
    assert!(
        tensor_bits(&out.join("student.safetensors"))
            == tensor_bits(&straight.join("student.safetensors")),
        "the killed and resumed run's final weights differ from the uninterrupted run's"
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
    assert!(err.contains("teacher.weights: is required"), "{err}");
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

    // A label beyond the head's classes is an error, not a sample the loss silently ignores.
    let arcface = crate::objective::Objective::ArcFace {
        margin: 0.5,
        scale: 64.0,
    };
    let f = Tensor::<2>::from_floats([[0.6, 0.8], [1.0, -0.1]], &device);
    let err = arcface
        .shard_loss(f.clone(), None, None, || Ok(vec![1, 7]), Some(&head), false)
        .err()
        .expect("label 7 of 3 classes")
        .to_string();
    assert!(
        err.contains("label 7") && err.contains("3 classes"),
        "{err}"
    );
    assert!(arcface
        .shard_loss(f, None, None, || Ok(vec![1, 2]), Some(&head), false)
        .is_ok());
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

/// With `data.augment` on, the teacher runs every step on the augmented faces: no cache is
/// built (`auto`), the losses are not the un-augmented run's, and a second run repeats them
/// exactly (the draws are functions of seed, epoch and sample). `require` is refused up front.
#[test]
fn augmented_runs_teach_every_step_and_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let augment = [
        "teacher.cache=\"auto\"",
        "data.augment.zoom_min=0.8",
        "data.augment.max_shift=4",
        "data.augment.brightness=0.3",
        "data.augment.grayscale_prob=0.5",
    ];
    let run = |name: &str, extra: &[&str]| {
        train(
            &tiny(&dir.path().join(name), "qud", extra),
            &TrainOptions::default(),
        )
        .unwrap()
    };
    let plain = run("plain", &[]);
    let first = run("a", &augment);
    let second = run("b", &augment);
    assert!(
        !dir.path().join("teacher-cache").exists()
            || std::fs::read_dir(dir.path().join("teacher-cache"))
                .unwrap()
                .count()
                == 1,
        "only the plain run may build a cache"
    );
    assert_eq!(first.losses, second.losses);
    assert_ne!(
        first.losses, plain.losses,
        "the augmentation reaches the step"
    );
    assert!(first.losses.iter().all(|l| l.is_finite()));

    let err = ConfigLoader::new()
        .without_env()
        .set_all(["data.augment.brightness=0.2", "teacher.cache=\"require\""])
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("teacher.cache") && err.contains("augment"),
        "{err}"
    );
}

/// `method.mse_scale` multiplies the MSE loss: 512 on 32-d features is the per-sample squared
/// distance times 16, so the first step's loss (before any update) is 512 times the plain one.
#[test]
fn the_mse_scale_multiplies_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let one = ["optim.epochs=1", "optim.lr_milestones=[1]"];
    let plain = train(
        &tiny(&dir.path().join("plain"), "mse", &one),
        &TrainOptions::default(),
    )
    .unwrap();
    let scaled = train(
        &tiny(
            &dir.path().join("scaled"),
            "mse",
            &[one[0], one[1], "method.mse_scale=512"],
        ),
        &TrainOptions::default(),
    )
    .unwrap();
    let (a, b) = (plain.losses[0], scaled.losses[0]);
    assert!((b - 512.0 * a).abs() <= 1e-4 * b, "{b} vs 512 x {a}");
}

/// A raised stop flag (what SIGINT / SIGTERM set in `qud train`) ends the run after the current
/// step with a checkpoint, and the resumed run completes the straight run's losses.
#[test]
fn a_stop_request_checkpoints_and_resumes() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let straight = train(
        &tiny(&dir.path().join("straight"), "mse", &[]),
        &TrainOptions::default(),
    )
    .unwrap();
    let config = tiny(&dir.path().join("stopped"), "mse", &[]);
    let stopped = train(
        &config,
        &TrainOptions {
            stop: Some(Arc::new(AtomicBool::new(true))),
            ..TrainOptions::default()
        },
    )
    .unwrap();
    assert_eq!(stopped.steps, 1, "one step, then the stop is honoured");
    assert!(dir.path().join("stopped/checkpoints/step-1").is_dir());
    let rest = train(
        &config,
        &TrainOptions {
            resume: true,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let all: Vec<f32> = stopped.losses.iter().chain(&rest.losses).copied().collect();
    assert_eq!(all, straight.losses);
}

/// Twenty steps of the QUD repository's loop against `train_step`: `fixtures/make_trajectory.py`
/// (train_parameterized.py with utils/buffer.py's MoCo queue, float64) from
/// models/fixtures/mobilefacenet_d128.pth as the student and, frozen in eval mode, the same
/// weights with BatchNorm statistics measured on the faces as the teacher;
/// 40 faces in order, 5 batches of 8 per epoch, 4 epochs, lr 0.001 (ArcFace 0.0001) with
/// milestones [2, 4], tau
/// 0.1, a queue of 32 from the fixture. Every step's loss and pre-clip gradient norm, every
/// parameter and BatchNorm statistic after the last step (whole, or 64 sampled entries of the
/// large ones), for QUD the final queue and its pointer, for ArcFace (arcface_torch's
/// `PartialFC_V2` + `CombinedMarginLoss`, 4 classes) the class centres. Enqueueing before taking the
/// negatives, dropping the clip, a wrong weight decay, momentum dampening or schedule each move
/// the trajectory far past these bounds.
#[test]
fn trajectory_matches_pytorch() {
    for method in ["qud", "mse", "arcface"] {
        trajectory(method);
    }
}

fn trajectory(method: &str) {
    use crate::objective::Objective;
    use crate::step::{train_step, StepContext, TrainState};
    use burn::module::Module;
    use qud_backbone::Backbone;
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(here.join("fixtures/trajectory.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |name: &str| -> Vec<f32> {
        reference
            .tensor(name)
            .unwrap_or_else(|_| panic!("{name} in the fixture"))
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    const FACES: usize = 40;
    const BATCH: usize = 8;
    const EPOCHS: usize = 4;
    const QUEUE: usize = 32;
    let device = qud_backend_flex::device();
    let spec = qud_models::BackboneSpec {
        embedding_dim: 128,
        dropout: 0.0,
    };
    // Under the seeding lock: a lazily initialised parameter drawn while loading would shift
    // the generator's stream under another test's seeded section (two_devices_... failed so).
    let load = |device: &Device, weights: &str| {
        crate::seeded(device, 0, || {
            let model = qud_models::create("mobilefacenet", &spec, device).unwrap();
            qud_models::load_weights(model, &here.join(weights)).unwrap()
        })
    };
    // The teacher as `build_teacher` makes it: eval mode, BatchNorm folded.
    let mut teacher = load(&device, "fixtures/trajectory_teacher.safetensors").valid();
    teacher.fold_batchnorm();
    let teacher = crate::Teacher::Backbone(Box::new(teacher));
    const CLASSES: usize = 4;
    let train_device = device.clone().autodiff();
    let head = (method == "arcface").then(|| ArcFaceHead {
        weight: burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(get("arcface.head0"), [CLASSES, 128]),
            &train_device,
        )),
    });
    let student = crate::Student {
        backbone: load(
            &train_device,
            "../../models/fixtures/mobilefacenet_d128.pth",
        ),
        head,
    };
    let optim_config = qud_config::OptimConfig {
        // The fixture's: ArcFace's unclipped class centres at s = 64 need a tenth of it to
        // keep float32 near the exact trajectory.
        lr: if method == "arcface" { 0.0001 } else { 0.001 },
        lr_batch_size: BATCH,
        batch_size: BATCH,
        epochs: EPOCHS,
        lr_milestones: vec![2, 4],
        ..Default::default()
    };
    let objective = match method {
        "arcface" => Objective::ArcFace {
            margin: 0.5,
            scale: 64.0,
        },
        "qud" => Objective::Qud {
            queue: qud_queue::FeatureQueue::from_state(
                qud_queue::QueueState {
                    kind: qud_queue::QueueKind::Fifo,
                    capacity: QUEUE,
                    dim: 128,
                    pointer: 0,
                    filled: QUEUE,
                    total: 0,
                    rows: get("queue0"),
                },
                &device,
            )
            .unwrap(),
            tau: 0.1,
        },
        _ => Objective::Mse { scale: 1.0 },
    };
    let dir = tempfile::tempdir().unwrap();
    let before_path = dir.path().join("before.safetensors");
    qud_models::save_safetensors(&student.backbone.clone().valid(), &before_path).unwrap();
    let before: std::collections::HashMap<String, Vec<f32>> =
        tensors(&before_path).into_iter().collect();
    let mut state = TrainState {
        student,
        optim: crate::optim::sgd(&optim_config),
        objective,
        loss_scale: None,
    };
    // The fixture's faces: a plane wave per face plus hash noise.
    let faces: Vec<f32> = (0..(FACES * 3 * 112 * 112) as u64)
        .map(|i| {
            let noise = ((i * 2_654_435_761) % (1 << 32)) as f64 / (1u64 << 32) as f64 * 2.0 - 1.0;
            let (n, c) = (i / (3 * 112 * 112), i / (112 * 112) % 3);
            let (h, w) = ((i / 112 % 112) as f64, (i % 112) as f64);
            let phase = h * (n % 5 + 1) as f64 + w * (n / 5 + 1) as f64;
            let wave = (phase / 112.0 * 2.0 * std::f64::consts::PI + c as f64).sin();
            (0.6 * wave + 0.4 * noise) as f32
        })
        .collect();
    let per_face = 3 * 112 * 112;
    let devices = [device.clone()];
    let context = StepContext::single(&devices, Some(&teacher), 5.0);
    let (want_loss, want_norm) = (
        get(&format!("{method}.loss")),
        get(&format!("{method}.grad_norm")),
    );
    let want_loss32 = get(&format!("{method}.float32_loss"));
    let steps_per_epoch = FACES / BATCH;
    let mut step = 0;
    for epoch in 0..EPOCHS {
        for b in 0..steps_per_epoch {
            let batch = qud_data::Batch {
                images: faces[b * BATCH * per_face..(b + 1) * BATCH * per_face].to_vec(),
                indices: (b * BATCH..(b + 1) * BATCH).collect(),
                flips: vec![false; BATCH],
                labels: (b * BATCH..(b + 1) * BATCH)
                    .map(|n| Some((n % CLASSES) as u32))
                    .collect(),
                skipped: Vec::new(),
            };
            let lr = learning_rate(&optim_config, epoch, step, steps_per_epoch);
            let (next, done) = train_step(state, &context, &batch, lr, step, false).unwrap();
            state = next;
            let (loss, want) = (done.loss, want_loss[step]);
            // QUD's losses to 1e-4, ArcFace's (s = 64: near 30) and MSE's (near 0.005) to 1e-4 of
            // themselves; or to twice PyTorch's own float32 error where a step is worse
            // conditioned than that (BatchNorm over 8 samples: QUD's step 4, clipped from a norm
            // of 23, reads 7.5e-5 off in PyTorch's float32 run and 1.1e-4 here).
            let pytorch_error = (want_loss32[step] - want).abs();
            let tolerance = match method {
                "qud" => 1e-4,
                _ => 1e-4 * want.abs(),
            }
            .max(2.0 * pytorch_error);
            assert!(
                (loss - want).abs() <= tolerance,
                "{method} step {step}: loss {loss} vs PyTorch {want}"
            );
            let (norm, want) = (done.grad_norm, want_norm[step] as f64);
            assert!(
                (norm - want).abs() <= 5e-3 * want,
                "{method} step {step}: gradient norm {norm} vs PyTorch {want}"
            );
            step += 1;
        }
    }
    if let Some(queue) = state.objective.queue() {
        let queue = queue.state();
        assert_eq!(queue.pointer as f32, get("qud.queue_pointer")[0]);
        let worst = queue
            .rows
            .iter()
            .zip(get("qud.queue"))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "queue off PyTorch's by {worst}");
    }

    if let Some(head) = &state.student.head {
        let ours = head
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let (theirs, start) = (get("arcface.head"), get("arcface.head0"));
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let moved = theirs
            .iter()
            .zip(&start)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= 0.05 * moved,
            "class centres off PyTorch's by {worst:.2e}, moved {moved:.2e}"
        );
    }
    let path = dir.path().join("after.safetensors");
    qud_models::save_safetensors(&state.student.backbone.valid(), &path).unwrap();
    let pick = |v: &[f32]| -> Vec<f32> {
        let n = v.len();
        (0..64).map(|i| v[i * n / 64]).collect()
    };
    let mut compared = 0;
    for (name, ours) in tensors(&path) {
        let start = &before[&name];
        let (theirs, ours, start) = if ours.len() <= 4096 {
            (get(&format!("{method}.after.{name}")), ours, start.clone())
        } else {
            let theirs = get(&format!("{method}.after_sample.{name}"));
            (theirs, pick(&ours), pick(start))
        };
        assert_eq!(theirs.len(), ours.len(), "{name}");
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let err = norm(&mut ours.iter().zip(&theirs).map(|(a, b)| (a - b) as f64));
        let size = norm(&mut theirs.iter().map(|b| *b as f64));
        let update = norm(&mut theirs.iter().zip(&start).map(|(b, s)| (b - s) as f64));
        // Parameters to 1e-4 of themselves; BatchNorm's running statistics, the mean of batch
        // statistics over 8 samples of a moving network, as sensitive as the losses: 1e-3.
        let bound = if name.contains("running_") {
            1e-3
        } else {
            1e-4
        };
        assert!(
            err <= bound * size + 1e-7,
            "{method} {name}: off the reference by {:.2e} of its size {size:.2e}",
            err / size.max(1e-30)
        );
        // The finer check: the twenty steps' change of each tensor, to 5 % of itself or 1e-6 of
        // the tensor where the change is smaller than rounding can hold (PyTorch's own float32
        // QUD run ends within 2.3 % of the exact change of BatchNorm biases that move by 1e-5
        // of themselves); a wrong weight decay (1e-5 of every tensor here), momentum, clip or
        // schedule changes it by far more.
        assert!(
            err <= 5e-2 * update + 1e-6 * size,
            "{method} {name}: change off the reference's by {:.2e} of its size {update:.2e}",
            err / update.max(1e-30)
        );
        compared += 1;
    }
    let prefix = format!("{method}.after");
    let listed = reference
        .names()
        .iter()
        .filter(|n| n.starts_with(&prefix))
        .count();
    assert_eq!(compared, listed, "every tensor of the state_dict");
}

/// Evaluation during training: every `eval.every_steps` and at the epoch end, logged to
/// eval.jsonl, the best accuracy per set kept in best.json, and the report's accuracy and ROC.
#[test]
fn evaluates_during_training_and_keeps_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let bins = dir.path().join("bins");
    std::fs::create_dir_all(&bins).unwrap();
    let (images, issame) = qud_data::synthetic_pairs(5, 99, qud_data::ImageEncoding::Png);
    std::fs::write(
        bins.join("pairs.bin"),
        qud_eval::pickle::dump_bin(&images, &issame),
    )
    .unwrap();
    let eval_dir = format!("eval.dir={}", bins.display());
    let config = tiny(
        &dir.path().join("run"),
        "mse",
        &[
            &eval_dir,
            "eval.targets=[\"pairs\", \"absent\"]",
            "eval.every_steps=3",
        ],
    );
    let report = train(&config, &TrainOptions::default()).unwrap();
    assert_eq!(report.final_eval.len(), 1, "the absent set is skipped");
    let out = dir.path().join("run");
    let evals = std::fs::read_to_string(out.join("eval.jsonl")).unwrap();
    // 2 epochs of 2 steps: the epoch ends (steps 2 and 4) and every_steps = 3.
    assert_eq!(logged(&evals, "step"), [2.0, 3.0, 4.0], "{evals}");
    // The same evaluations as TensorBoard scalars.
    let events = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let accuracies: Vec<(i64, f64)> = crate::tensorboard::read_scalars(&events)
        .unwrap()
        .into_iter()
        .filter(|s| s.tag == "eval/pairs/accuracy")
        .map(|s| (s.step, s.value as f64))
        .collect();
    let steps = logged(&evals, "step").into_iter().map(|s| s as i64);
    let want: Vec<(i64, f64)> = steps
        .zip(
            logged(&evals, "accuracy")
                .into_iter()
                .map(|a| a as f32 as f64),
        )
        .collect();
    assert_eq!(accuracies, want);
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("best.json")).unwrap()).unwrap();
    let logged_max = logged(&evals, "accuracy")
        .into_iter()
        .fold(f64::MIN, f64::max);
    assert_eq!(best["pairs"]["accuracy"].as_f64().unwrap(), logged_max);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("verification accuracy %") && html.contains("false accept rate"));

    // eval.every_epochs = 0: no step evaluations, and only the last epoch's end.
    let config = tiny(
        &dir.path().join("last-only"),
        "mse",
        &[
            &eval_dir,
            "eval.targets=[\"pairs\"]",
            "eval.every_steps=0",
            "eval.every_epochs=0",
        ],
    );
    train(&config, &TrainOptions::default()).unwrap();
    let evals = std::fs::read_to_string(dir.path().join("last-only/eval.jsonl")).unwrap();
    assert_eq!(logged(&evals, "step"), [4.0], "{evals}");
}

/// Field `key` of every line of a JSON-lines log.
fn logged(lines: &str, key: &str) -> Vec<f64> {
    lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// An ONNX teacher (a graph with its batch fixed at 1, run by tract) distils like a Burn one, and
/// its teacher cache gives the same losses as running it every step.
#[test]
fn onnx_teacher_trains_with_and_without_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../qud-onnx/fixtures/tiny_fixed_batch.onnx");
    let teacher = format!("teacher.weights={}", onnx.display());
    let cache_dir = format!("teacher.cache_dir={}", dir.path().join("cache").display());
    let common = [
        teacher.as_str(),
        "teacher.allow_random=false",
        "teacher.onnx.mean=[127.0, 127.0, 127.0]",
        "teacher.onnx.std=[128.0, 128.0, 128.0]",
        "student.embedding_dim=16",
        "teacher.embedding_dim=16",
        cache_dir.as_str(),
    ];
    let run = |name: &str, cache: &str| {
        let mut extra = common.to_vec();
        extra.push(cache);
        train(
            &tiny(&dir.path().join(name), "qud", &extra),
            &TrainOptions::default(),
        )
        .unwrap()
    };
    let direct = run("direct", "teacher.cache=off");
    let cached = run("cached", "teacher.cache=auto");
    assert_eq!(direct.losses.len(), 4);
    for (a, b) in direct.losses.iter().zip(&cached.losses) {
        assert!((a - b).abs() < 1e-5, "direct {a} vs cached {b}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
        1,
        "one cache file"
    );

    // A teacher whose output size differs from the student's is refused, naming both sizes.
    let mut extra = common.to_vec();
    extra.extend(["student.embedding_dim=32", "teacher.embedding_dim=32"]);
    let err = train(
        &tiny(&dir.path().join("bad"), "qud", &extra),
        &TrainOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("16") && err.contains("32"), "{err}");
}

/// Two data-parallel devices (replicas on the CPU) with two samples each train as one device
/// with the batch of four whose BatchNorm sees each half apart: DDP's semantics. The reference
/// below is that single-device computation written out: the student forwards each half of the
/// batch, the halves' losses are averaged, one backward, one clipped SGD step, and the whole
/// batch's teacher features are enqueued.
#[test]
fn two_devices_train_as_one_device_with_the_whole_batch() {
    use crate::optim::sgd;
    use crate::setup::{build_student, build_teacher, initialize_now, loader_options, seeded};
    use qud_backbone::{Backbone, FaceEmbedder};
    use qud_loss::{info_nce, l2_normalize};

    let dir = tempfile::tempdir().unwrap();
    let two = [r#"run.devices=["cpu:0", "cpu:1"]"#, "teacher.cache=\"off\""];
    let config = tiny(&dir.path().join("two"), "qud", &two);
    let parallel = train(&config, &TrainOptions::default()).unwrap();
    assert_eq!(parallel.losses.len(), 4);

    let device = Device::flex();
    let dataset = crate::open_dataset(&config).unwrap();
    let (teacher, mut student) = seeded(&device, config.run.seed, || {
        let teacher = build_teacher(&config, &device).unwrap();
        let student = build_student(&config, None, &device.clone().autodiff()).unwrap();
        (teacher, initialize_now(student))
    });
    let mut queue = qud_queue::FeatureQueue::new(
        config.method.queue_size,
        config.student.embedding_dim,
        config.method.queue_kind,
        config.run.seed,
        &device,
    );
    let mut optim = sgd(&config.optim);
    let loader = qud_data::Loader::new(dataset, loader_options(&config));
    let mut losses = Vec::new();
    for epoch in 0..config.optim.epochs {
        for batch in loader.epoch(epoch, 0) {
            let batch = batch.unwrap();
            let lr = learning_rate(&config.optim, epoch, losses.len(), 2);
            let x = batch.tensor(&device);
            let keys = l2_normalize(teacher.embed_faces(x.clone()));
            let half = |h: usize| {
                let features = student
                    .backbone
                    .forward(x.clone().narrow(0, 2 * h, 2).autodiff());
                let keys = keys.clone().narrow(0, 2 * h, 2);
                let out = info_nce(
                    l2_normalize(features),
                    keys,
                    queue.negatives(),
                    config.method.tau,
                );
                out.loss.mul_scalar(0.5)
            };
            let loss = half(0) + half(1);
            losses.push(loss.clone().without_autodiff().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), &student);
            let (grads, _) = clip_global_norm(&student, grads, config.optim.grad_clip);
            student = optim.step(lr, student, grads);
            queue.enqueue(keys).unwrap();
        }
    }

    for (step, (a, b)) in parallel.losses.iter().zip(&losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "step {step}: loss {a} on two devices vs {b} on one: {:?} vs {losses:?}",
            parallel.losses
        );
    }
    // BatchNorm running statistics are device 0's in the parallel run (DDP keeps rank 0's
    // buffers) and both halves' here: they are not part of the comparison.
    let reference = dir.path().join("reference.safetensors");
    qud_models::save_safetensors(&student.backbone.valid(), &reference).unwrap();
    let learned = |path: &std::path::Path| {
        tensors(path)
            .into_iter()
            .filter(|(name, _)| !name.contains("running_") && !name.contains("num_batches"))
            .collect::<Vec<_>>()
    };
    let (a, b) = (learned(&parallel.student_weights), learned(&reference));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(
            diff <= 1e-5,
            "{name} differs by {diff} between two devices and one"
        );
    }
    // The queue holds the teacher features of all four samples of every batch in batch order.
    let restored = crate::checkpoint::load_latest(
        &parallel.output_dir,
        &config,
        student,
        sgd(&config.optim),
        &device,
    )
    .unwrap();
    let saved = restored
        .queue
        .expect("QUD checkpoints its queue")
        .negatives();
    let diff = (saved - queue.negatives()).abs().max().into_scalar::<f32>();
    assert!(diff <= 1e-6, "queue differs by {diff}");

    // Teacher features read from the cache feed the devices the same way.
    let cached = tiny(
        &dir.path().join("two-cached"),
        "qud",
        &[two[0], "teacher.cache=\"auto\""],
    );
    let with_cache = train(&cached, &TrainOptions::default()).unwrap();
    for (a, b) in with_cache.losses.iter().zip(&parallel.losses) {
        assert!(
            (a - b).abs() <= 1e-5,
            "loss {a} with the cache vs {b} without"
        );
    }
}

/// `run.precision = "bf16" | "f16"`: the student computes in the low precision over f32 master
/// weights; the losses follow the f32 run's closely, the saved weights are f32, an f16 run keeps
/// its loss scale in its checkpoints, and a device without the dtype is refused.
#[test]
fn mixed_precision_follows_the_f32_run() {
    let dir = tempfile::tempdir().unwrap();
    let off = "teacher.cache=\"off\"";
    let full = train(
        &tiny(&dir.path().join("f32"), "qud", &[off]),
        &TrainOptions::default(),
    )
    .unwrap();
    for (precision, tolerance) in [("bf16", 0.03), ("f16", 0.004)] {
        let set = format!("run.precision=\"{precision}\"");
        let config = tiny(&dir.path().join(precision), "qud", &[off, &set]);
        let low = train(&config, &TrainOptions::default()).unwrap();
        // Same weights at step 0: only the forward's rounding differs. Later steps follow
        // gradients that differ by that rounding (`low_precision_gradients_point_as_f32`).
        let (a, b) = (low.losses[0], full.losses[0]);
        assert!(
            (a - b).abs() <= tolerance * b,
            "{precision}: first loss {a} vs {b} in f32"
        );
        assert!(low.losses.iter().all(|l| l.is_finite()), "{:?}", low.losses);
        let bytes = std::fs::read(&low.student_weights).unwrap();
        let saved = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(saved
            .tensors()
            .iter()
            .all(|(_, t)| t.dtype() == safetensors::Dtype::F32));
        let (_, last) = crate::checkpoint::list(&low.output_dir)
            .unwrap()
            .pop()
            .unwrap();
        let position = std::fs::read_to_string(last.join("position.json")).unwrap();
        assert_eq!(
            position.contains("\"scale\""),
            precision == "f16",
            "{position}"
        );
    }
    let refused = tiny(
        &dir.path().join("ndarray"),
        "qud",
        &[off, "run.backend=\"ndarray\"", "run.precision=\"bf16\""],
    );
    let err = train(&refused, &TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("run.precision"), "{err}");
}

/// The student's gradients computed in bf16 / f16 over f32 master weights point where the f32
/// ones do, for every parameter: MobileFaceNet at random initialisation, 8 random faces, a loss
/// on the normalised embedding.
#[test]
fn low_precision_gradients_point_as_f32() {
    use crate::setup::{build_student, initialize_now, seeded};
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::FloatDType;
    use qud_backbone::{cast_trainable, Backbone};
    let dir = tempfile::tempdir().unwrap();
    let config = tiny(dir.path(), "qud", &[]);
    let device = Device::flex();
    let student = seeded(&device, 3, || {
        initialize_now(build_student(&config, None, &device.clone().autodiff()).unwrap())
    });
    // Drawn under the seeding lock: an unlocked draw would shift the stream of another test's
    // seeded section running meanwhile (Burn's generator is per process).
    let (x, target) = seeded(&device, 4, || {
        let x = Tensor::<4>::random(
            [8, 3, 112, 112],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let target = Tensor::<2>::random(
            [8, 32],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        (x, target)
    });
    let grads_of = |dtype: Option<FloatDType>| {
        let f = match dtype {
            None => student.backbone.forward(x.clone().autodiff()),
            Some(d) => cast_trainable(student.backbone.clone(), d)
                .forward(x.clone().cast(d).autodiff())
                .cast(FloatDType::F32),
        };
        let loss = (qud_loss::l2_normalize(f) * target.clone().autodiff()).sum();
        let g = GradientsParams::from_grads(loss.backward(), &student);
        struct Flat<'a>(&'a GradientsParams, Vec<f32>);
        impl ModuleVisitor for Flat<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                if let Some(g) = self.0.get::<D>(p.id) {
                    self.1.extend(g.into_data().try_to_vec::<f32>().unwrap());
                }
            }
        }
        let mut flat = Flat(&g, vec![]);
        student.visit(&mut flat);
        flat.1
    };
    let a = grads_of(None);
    for d in [FloatDType::BF16, FloatDType::F16] {
        let b = grads_of(Some(d));
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / na / nb;
        // Measured: bf16 0.962, f16 0.994 (flex, this seed).
        let floor = if d == FloatDType::BF16 { 0.93 } else { 0.98 };
        assert_eq!(a.len(), b.len(), "{d:?}: gradients missing");
        assert!(cosine >= floor, "{d:?}: gradient cosine {cosine} to f32");
        assert!(
            (nb / na - 1.0).abs() < 0.05,
            "{d:?}: gradient norm {nb} vs {na}"
        );
    }
}

/// The wgpu device the `--wgpu` tests run on: `QUD_WGPU_DEVICE` (default `wgpu`), with its name.
fn wgpu_device() -> (String, Device) {
    let name = std::env::var("QUD_WGPU_DEVICE").unwrap_or_else(|_| "wgpu".into());
    let device = qud_backends::device("wgpu", &name)
        .unwrap_or_else(|e| panic!("QUD_WGPU_DEVICE={name}: {e} (build with the wgpu feature)"));
    (name, device)
}

/// On a wgpu adapter (`QUD_WGPU_DEVICE`, default `wgpu`; without a GPU, Mesa's lavapipe is
/// one): the same weights embed the same faces as on flex (1e-4 relative), and five QUD steps
/// from the same weights on the same batches give flex's losses.
#[test]
#[ignore = "needs a Vulkan adapter and the wgpu feature: cargo xtask test --wgpu"]
fn wgpu_matches_flex() {
    let (name, wgpu) = wgpu_device();
    let flex = Device::flex();
    let spec = qud_models::BackboneSpec {
        embedding_dim: 32,
        dropout: 0.0,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut weights = Vec::new();
    for (i, arch) in ["mobilefacenet", "iresnet18"].into_iter().enumerate() {
        let (model, faces) =
            crate::parity::random_backbone_and_faces(arch, &spec, &flex, 40 + i as u64, 3).unwrap();
        let parity = crate::parity::compare(&model, &faces, &flex, &wgpu);
        assert!(
            parity.embedding_difference <= 1e-4,
            "{arch}: wgpu embeddings differ from flex: {parity:?}"
        );
        // Train mode: the gradients of one loss on the same weights and faces agree.
        assert!(
            parity.gradient_cosine > 0.9999,
            "{arch}: gradients differ between wgpu and flex: {parity:?}"
        );
        let path = dir.path().join(format!("{arch}.safetensors"));
        qud_models::save_safetensors(&model, &path).unwrap();
        weights.push(path);
    }

    let from_files = [
        format!("student.init_weights={}", weights[0].display()),
        format!("teacher.weights={}", weights[1].display()),
        "teacher.arch=iresnet18".into(),
        "teacher.allow_random=false".into(),
        "teacher.cache=\"off\"".into(),
        "optim.epochs=3".into(),
        "optim.lr=0.005".into(),
    ];
    let run = |backend: &str, device: &str| {
        let mut sets: Vec<String> = from_files.to_vec();
        sets.push(format!("run.backend={backend:?}"));
        sets.push(format!("run.devices=[{device:?}]"));
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let config = tiny(&dir.path().join(backend), "qud", &sets);
        let options = TrainOptions {
            max_steps: Some(5),
            ..TrainOptions::default()
        };
        train(&config, &options).unwrap().losses
    };
    let (cpu, gpu) = (run("flex", "cpu"), run("wgpu", &name));
    assert_eq!(gpu.len(), 5);
    assert!(gpu.iter().all(|l| l.is_finite()), "{gpu:?}");
    // Step 0 is a forward pass (measured 1.1e-6 on lavapipe); step 1 follows one update, and
    // this tiny run (batch 4, BatchNorm over 4 samples, tau 0.1) amplifies rounding there: two
    // correct CPU implementations, flex with qud's kernels and flex on Burn's own ops
    // (`QUD_CPU_KERNELS=off`), differ by 1.6e-4 at step 1 (gradient norms 266.657 and 266.669),
    // and lavapipe by the same 1.6e-4. A wrong gradient moves it by far more: the update lowers
    // the loss by 0.234 (8 %), and 5e-4 of it is half a percent of that change. Later steps
    // drift further (3.4e-3 between the two CPU implementations at step 4).
    for (step, (a, b)) in gpu.iter().zip(&cpu).enumerate().take(2) {
        let tolerance = [1e-5, 5e-4][step];
        assert!(
            (a - b).abs() <= tolerance * b.abs(),
            "step {step}: loss {a} on wgpu vs {b} on flex: {gpu:?} vs {cpu:?}"
        );
    }
}

/// Long reductions on wgpu: rows of ones summed along their length (exact in f32) give their
/// length, from the 37,632 values per channel of a training BatchNorm at batch 3 and 112 x 112
/// to a million, and a BatchNorm-shaped `[64, 100_352]` (iresnet's stem at batch 8) as well.
///
/// The exception is Mesa's lavapipe, which qud warns about (the wgpu plugin's caveat): its
/// shader compiler gives each invocation 65,535 loop iterations in all and then leaves the loops
/// without an error, so a sum whose invocation walks a long row stops at a fixed count, whatever
/// the length: 262,128 values of a single row on Mesa 22.3.6 (4 values an iteration, 3
/// iterations spent elsewhere), and rows summed by one invocation share the budget (64 rows of
/// 100,352: in each four, the third stops at 61,384 and the fourth at 0). There the test checks that signature: the short sums all
/// stop at the same count, within that budget, so a kernel that is wrong in any other way still
/// fails.
#[test]
#[ignore = "needs a Vulkan adapter and the wgpu feature: cargo xtask test --wgpu"]
fn wgpu_long_row_sums_match_flex() {
    let (name, wgpu) = wgpu_device();
    let sum_of_ones = |rows: usize, length: usize| -> Vec<f32> {
        Tensor::<2>::ones([rows, length], &wgpu)
            .sum_dim(1)
            .into_data()
            .convert::<f32>()
            .try_into_vec()
            .unwrap()
    };
    let lengths = [37_632, 100_352, 262_144, 1_000_000];
    let single: Vec<(usize, f32)> = lengths.iter().map(|&l| (l, sum_of_ones(1, l)[0])).collect();
    let stem = sum_of_ones(64, 100_352);
    let stem_right = stem.iter().all(|s| *s == 100_352.0);
    let short: Vec<(usize, f32)> = single
        .iter()
        .copied()
        .filter(|(l, s)| *s != *l as f32)
        .collect();
    let Some(caveat) = qud_backends::caveat("wgpu", &wgpu) else {
        assert!(
            short.is_empty() && stem_right,
            "{name}: sums of ones differ from their lengths: {single:?}, stem rows {:?}",
            &stem[..8]
        );
        return;
    };
    // lavapipe: the loop budget, and nothing else.
    assert!(caveat.contains("65,535 iterations"), "{caveat}");
    assert_eq!(
        single[0].1, 37_632.0,
        "{name}: below the budget: {single:?}"
    );
    let budget = 4.0 * 65_535.0;
    let stop = short.first().map(|(_, s)| *s);
    assert!(
        short.iter().all(|(l, s)| Some(*s) == stop
            && *s < *l as f32
            && *s > budget - 256.0
            && *s <= budget),
        "{name}: short sums that are not lavapipe's loop budget: {single:?}"
    );
}

/// TransFace runs as a teacher only: as a student it would train without the reference's patch
/// masking and drop path, so the run is refused before anything is built, naming the key.
#[test]
fn a_transface_student_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny(dir.path(), "qud", &["student.arch=transface-s"]);
    let err = train(&config, &TrainOptions::default())
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("student.arch") && err.contains("transface-s is a teacher here"),
        "{err}"
    );
}
