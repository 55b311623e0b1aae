//! ONNX face models on the whole machine (every core), 128 faces a call: qud's native runtime
//! and tract, against onnxruntime on the same files and threads (`python/ort_models.py`, which
//! `cargo xtask bench onnx` runs in the same command). Models: the exported MobileFaceNet fixture
//! (free batch dimension); the same graph quantised by onnxruntime's `quantize_dynamic` (written
//! to `target/bench-data` by `python/ort_models.py --make`, skipped when absent); and
//! `../shared/models/fr_feature.onnx` (batch fixed at 1) when present.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qud_config::{ChannelOrder, InputLayout, OnnxInput, OnnxRuntime};
use std::path::PathBuf;
use std::time::Duration;

const FACES: usize = 128;

fn cases() -> Vec<(&'static str, PathBuf, OnnxInput)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bgr_nhwc = OnnxInput {
        channels: ChannelOrder::Bgr,
        layout: InputLayout::Nhwc,
        ..Default::default()
    };
    vec![
        (
            "mobilefacenet_export",
            root.join("../qud-onnx/fixtures/mobilefacenet_d128_bgr_nhwc.onnx"),
            bgr_nhwc.clone(),
        ),
        (
            "mobilefacenet_dynamic_quant",
            root.join("../../target/bench-data/mobilefacenet_d128_dynamic_quant.onnx"),
            bgr_nhwc,
        ),
        (
            "fr_feature",
            root.join("../../../shared/models/fr_feature.onnx"),
            OnnxInput {
                mean: [127.0; 3],
                std: [128.0; 3],
                ..Default::default()
            },
        ),
    ]
}

fn onnx(c: &mut Criterion) {
    let faces = qud_bench::random_faces(FACES);
    let mut group = c.benchmark_group("onnx_all_threads");
    group.throughput(Throughput::Elements(FACES as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, path, contract) in cases() {
        if !path.is_file() {
            eprintln!("onnx bench: {} absent, {name} skipped", path.display());
            continue;
        }
        for runtime in [OnnxRuntime::Native, OnnxRuntime::Tract] {
            let input = OnnxInput {
                runtime,
                ..contract.clone()
            };
            let model = match qud_onnx::OnnxFaceModel::load(&path, &input) {
                Ok(model) => model,
                Err(e) => {
                    eprintln!("onnx bench: {name} on {runtime:?}: {e}");
                    continue;
                }
            };
            let id = format!("{name}/{}_batch{}", model.runtime(), model.batch());
            group.bench_function(id, |b| {
                b.iter(|| model.embed_normalized(&faces, FACES).expect("runs"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, onnx);
criterion_main!(benches);
