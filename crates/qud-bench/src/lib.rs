//! Inputs shared by the benchmarks and their Python references: files under
//! `target/bench-data/`, written once and reused, so both sides measure the same bytes.

pub mod peak;
pub mod steps;

use qud_data::{encode_face, pack_records, FaceDataset, ImageEncoding, SyntheticFaces};
use rand::SeedableRng;
use rand_distr::Distribution;
use std::path::PathBuf;

/// `target/bench-data` (or `$QUD_BENCH_DATA`).
pub fn data_dir() -> PathBuf {
    let dir = std::env::var_os("QUD_BENCH_DATA").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-data"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("bench data folder");
    dir
}

/// A `.rec` of `images` synthetic faces as JPEG quality 95 (as insightface packs its sets),
/// written on first use.
pub fn synthetic_rec(images: usize) -> PathBuf {
    let prefix = data_dir().join(format!("faces_{images}"));
    let rec = prefix.with_extension("rec");
    if !rec.is_file() {
        let faces = SyntheticFaces::new(images.div_ceil(20), 20, 1);
        pack_records(&prefix, images, faces.num_identities(), |i| {
            let sample = faces.get(i)?;
            Ok((
                encode_face(&sample.image, ImageEncoding::Jpeg(95)),
                sample.label,
            ))
        })
        .expect("writing the benchmark .rec");
    }
    rec
}

/// `2 * pairs` unit-norm 512-d embeddings (genuine pairs correlated) and labels, also written as
/// `pairs_<n>.f32` / `pairs_<n>.issame` for the NumPy reference.
pub fn embedding_pairs(pairs: usize) -> (Vec<Vec<f32>>, Vec<bool>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(pairs as u64);
    let normal = rand_distr::StandardNormal;
    let mut rows = Vec::with_capacity(2 * pairs);
    let mut issame = Vec::with_capacity(pairs);
    for p in 0..pairs {
        let same = p % 2 == 0;
        let a: Vec<f32> = (0..512).map(|_| normal.sample(&mut rng)).collect();
        let b: Vec<f32> = a
            .iter()
            .map(|v| {
                let noise: f32 = normal.sample(&mut rng);
                if same {
                    v + 1.1 * noise
                } else {
                    noise
                }
            })
            .collect();
        for row in [a, b] {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            rows.push(row.iter().map(|v| v / n).collect());
        }
        issame.push(same);
    }
    let dir = data_dir();
    let raw: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v: &f32| v.to_le_bytes())
        .collect();
    std::fs::write(dir.join(format!("pairs_{pairs}.f32")), raw).expect("bench data");
    let labels: Vec<u8> = issame.iter().map(|s| u8::from(*s)).collect();
    std::fs::write(dir.join(format!("pairs_{pairs}.issame")), labels).expect("bench data");
    (rows, issame)
}

/// Random faces in [-1, 1], `[batch, 3, 112, 112]`.
pub fn random_faces(batch: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let uniform = rand_distr::Uniform::new(-1.0f32, 1.0).expect("range");
    (0..batch * 3 * 112 * 112)
        .map(|_| uniform.sample(&mut rng))
        .collect()
}
