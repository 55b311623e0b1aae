//! Verification scoring (10 folds, 400 + 4000 thresholds, as insightface) on 6,000 and 7,000
//! pairs of 512-d embeddings, and MobileFaceNet embedding extraction with flip TTA. The reference
//! is `python/eval.py` (NumPy + scikit-learn, insightface's `verification.py` protocol).

use burn::module::Module;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qud_data::FaceImage;
use std::time::Duration;

fn verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify_10fold");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for pairs in [6000, 7000] {
        let (rows, issame) = qud_bench::embedding_pairs(pairs);
        group.throughput(Throughput::Elements(pairs as u64));
        group.bench_function(format!("pairs_{pairs}"), |b| {
            b.iter(|| qud_eval::verify(&rows, &issame, 10))
        });
    }
    group.finish();
}

fn embed(c: &mut Criterion) {
    const FACES: usize = 64;
    let faces: Vec<FaceImage> = (0..FACES)
        .map(|i| {
            FaceImage::from_rgb(
                (0..112 * 112 * 3)
                    .map(|p| ((p * 7 + i * 13) % 256) as u8)
                    .collect(),
            )
        })
        .collect();
    let mut group = c.benchmark_group("embed_flip_tta");
    group.throughput(Throughput::Elements(FACES as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    for backend in ["flex", "ndarray"] {
        // ndarray takes about 17 s per 64 faces here; QUD_BENCH_ALL=1 runs it.
        if backend == "ndarray" && std::env::var_os("QUD_BENCH_ALL").is_none() {
            continue;
        }
        let Ok(device) = qud_backends::device(backend, "cpu") else {
            continue;
        };
        let model = qud_models::create("mobilefacenet", &Default::default(), &device)
            .expect("registered")
            .valid();
        group.bench_function(format!("mobilefacenet/{backend}"), |b| {
            b.iter(|| qud_eval::embed(&model, &faces, 64, true, &device))
        });
    }
    group.finish();
}

criterion_group!(benches, verify, embed);
criterion_main!(benches);
