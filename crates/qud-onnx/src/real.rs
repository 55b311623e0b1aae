//! The real-data check: `../shared/models/fr_feature.onnx` on the real LFW `.bin`, against the
//! reference accuracy its README states (onnxruntime embeddings, insightface protocol, flip).
//!
//! `../shared` sits beside the repository in development and is absent for users, so the check
//! is ignored by `cargo test` and run by `cargo xtask real-check`. `QUD_SHARED` points elsewhere.

use super::*;
use std::path::PathBuf;
use std::time::Instant;

fn shared() -> PathBuf {
    std::env::var_os("QUD_SHARED").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
        PathBuf::from,
    )
}

/// The reference LFW accuracy (percent, flip) from the models README: the number after
/// "LFW accuracy (insightface protocol, flip):".
fn reference_accuracy(readme: &str) -> Option<f64> {
    let tail = &readme[readme.find("LFW accuracy (insightface protocol, flip):")?..];
    let after = tail.split_once(':')?.1.trim_start();
    let number: String = after
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number.parse().ok()
}

#[test]
fn reference_accuracy_is_read_from_the_readme() {
    let text = "- LFW accuracy (insightface protocol, flip): 99.00 (std 0.4714); flip = ...";
    assert_eq!(reference_accuracy(text), Some(99.0));
    assert_eq!(reference_accuracy("no such line"), None);
}

#[test]
#[ignore = "needs ../shared (models/fr_feature.onnx, data/lfw.bin): cargo xtask real-check"]
fn real_lfw_check_fr_feature_onnx() {
    let root = shared();
    let (model_path, readme, lfw) = (
        root.join("models/fr_feature.onnx"),
        root.join("models/README.md"),
        root.join("data/lfw.bin"),
    );
    assert!(
        model_path.is_file() && readme.is_file() && lfw.is_file(),
        "{} lacks models/fr_feature.onnx, models/README.md or data/lfw.bin (set QUD_SHARED)",
        root.display()
    );
    let want = reference_accuracy(&std::fs::read_to_string(&readme).unwrap())
        .expect("the models README states the LFW accuracy with flip");
    // fr_feature.onnx: RGB, NCHW, (x - 127) / 128, batch fixed at 1 (models README).
    let contract = OnnxInput {
        mean: [127.0; 3],
        std: [128.0; 3],
        ..OnnxInput::default()
    };
    let set = qud_eval::PairSet::load(&lfw).unwrap();
    let device = qud_backend_flex::device();
    for runtime in [OnnxRuntime::Tract, OnnxRuntime::Native] {
        let model = OnnxFaceModel::load(
            &model_path,
            &OnnxInput {
                runtime,
                ..contract.clone()
            },
        )
        .unwrap();
        // tract runs the graph as exported, batch fixed at 1; the native runtime any batch.
        let batch = if runtime == OnnxRuntime::Tract {
            1
        } else {
            NATIVE_BATCH
        };
        assert_eq!(model.batch(), batch, "{runtime:?}");
        let start = Instant::now();
        let score = qud_eval::evaluate(&model, &set, 64, &device);
        let seconds = start.elapsed().as_secs_f64();
        let got = score.scores.accuracy * 100.0;
        eprintln!(
            "real-check: fr_feature.onnx on {runtime:?}, {} ({} pairs): LFW accuracy {got:.2} +- \
             {:.2} with flip (reference {want:.2}), XNorm {:.4}, {:.0} faces/s",
            lfw.display(),
            score.pairs,
            score.scores.accuracy_std * 100.0,
            score.xnorm,
            2.0 * set.faces.len() as f64 / seconds,
        );
        assert!(
            (got - want).abs() <= 0.05,
            "{runtime:?}: LFW accuracy {got:.3} differs from the reference {want:.2} by more \
             than 0.05 points"
        );
    }
}
