//! Eval-mode forward throughput (images/s) at batch 64: MobileFaceNet and iresnet50 on every
//! compiled CPU backend, and on flex with BatchNorm folded (iresnet50 on ndarray only with `QUD_BENCH_ALL=1`). The PyTorch reference is `python/backbones.py` (`cargo xtask bench
//! backbones` runs both).

use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qud_backbone::Backbone;
use std::time::Duration;

const BATCH: usize = 64;

fn forward(c: &mut Criterion) {
    let input = qud_bench::random_faces(BATCH);
    for arch in ["mobilefacenet", "iresnet50"] {
        let mut group = c.benchmark_group(format!("forward_b{BATCH}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(2));
        group.measurement_time(Duration::from_secs(if arch == "iresnet50" {
            60
        } else {
            15
        }));
        // `flex_folded`: the same network with its BatchNorms folded into the convolutions, as
        // teachers, `qud eval` and `qud embed` run it.
        for variant in ["flex", "flex_folded", "ndarray"] {
            let backend = variant.trim_end_matches("_folded");
            // ndarray's convolutions make one iresnet50 batch take minutes; QUD_BENCH_ALL=1 runs it.
            if arch == "iresnet50"
                && backend == "ndarray"
                && std::env::var_os("QUD_BENCH_ALL").is_none()
            {
                continue;
            }
            let Ok(device) = qud_backends::device(backend, "cpu") else {
                continue;
            };
            let mut model = qud_models::create(arch, &qud_models::BackboneSpec::default(), &device)
                .expect("registered")
                .valid();
            if variant.ends_with("_folded") {
                model.fold_batchnorm();
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(input.clone(), [BATCH, 3, 112, 112]),
                &device,
            );
            group.bench_function(format!("{arch}/{variant}"), |b| {
                b.iter(|| {
                    model
                        .forward(x.clone())
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .expect("f32")
                })
            });
        }
        group.finish();
    }
}

/// ONNX models through tract, one thread, 16 faces a call: the exported MobileFaceNet fixture
/// (free batch dimension) run 8 images at a time and one at a time, which is how graphs with a
/// batch fixed at 1 run; and `../shared/models/fr_feature.onnx` (batch fixed at 1) when present.
fn onnx_tract(c: &mut Criterion) {
    const FACES: usize = 16;
    let faces = qud_bench::random_faces(FACES);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut group = c.benchmark_group("onnx_tract_1thread");
    group.throughput(Throughput::Elements(FACES as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    let mfn = root.join("../qud-onnx/fixtures/mobilefacenet_d128_bgr_nhwc.onnx");
    let contract = qud_config::OnnxInput {
        channels: qud_config::ChannelOrder::Bgr,
        layout: qud_config::InputLayout::Nhwc,
        threads: 1,
        ..Default::default()
    };
    for batch in [8, 1] {
        let model =
            qud_onnx::OnnxFaceModel::load_with_batch(&mfn, &contract, batch).expect("fixture");
        group.bench_function(format!("mobilefacenet_export/batch{batch}"), |b| {
            b.iter(|| model.embed_normalized(&faces, FACES).expect("runs"))
        });
    }
    let real = root.join("../../../shared/models/fr_feature.onnx");
    if real.is_file() {
        let contract = qud_config::OnnxInput {
            mean: [127.0; 3],
            std: [128.0; 3],
            threads: 1,
            ..Default::default()
        };
        let model = qud_onnx::OnnxFaceModel::load(&real, &contract).expect("fr_feature.onnx");
        group.bench_function("fr_feature/batch1", |b| {
            b.iter(|| model.embed_normalized(&faces, FACES).expect("runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, forward, onnx_tract);
criterion_main!(benches);
