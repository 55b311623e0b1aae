//! IJB-C-sized 1:1 scoring: pooling of per-image features into templates, the dot-product score
//! of every template pair, the ROC and TAR at FAR, on random 512-d features; then the NumPy +
//! scikit-learn reference (`python/ijb.py`, insightface's algorithm) on a set of the same sizes,
//! and the ratio. Not criterion: one run of each takes seconds to minutes.
//!
//! Sizes as IJB-C 1:1: 23,124 templates, 15,658,489 pairs; 10 images per template in 1-4 medias
//! (231,240 images). `QUD_IJB_SCALE=0.1` scales templates, images and pairs down.

use qud_eval::ijb::{
    image_features, pair_scores, roc_curve, tar_at_far, template_features, IjbMeta, IJB_FARS,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

const TEMPLATES: usize = 23_124;
const PAIRS: usize = 15_658_489;
const IMAGES_PER_TEMPLATE: usize = 10;
const DIM: usize = 512;

fn main() {
    let scale: f64 = std::env::var("QUD_IJB_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let templates = ((TEMPLATES as f64 * scale) as usize).max(10);
    let pairs = ((PAIRS as f64 * scale) as usize).max(100);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut meta = IjbMeta::default();
    let mut media = 0i64;
    for t in 0..templates {
        let medias = rng.random_range(1..=4);
        for i in 0..IMAGES_PER_TEMPLATE {
            if i == 0 || i * medias / IMAGES_PER_TEMPLATE != (i - 1) * medias / IMAGES_PER_TEMPLATE
            {
                media += 1;
            }
            meta.templates.push(t as i64);
            meta.medias.push(media);
            meta.detector_scores.push(rng.random_range(0.5..1.0));
        }
    }
    for _ in 0..pairs {
        let (a, b) = (
            rng.random_range(0..templates),
            rng.random_range(0..templates),
        );
        meta.pairs.push((a as i64, b as i64));
        meta.labels.push(rng.random_bool(0.01));
    }
    let images = meta.templates.len();
    let features: Vec<Vec<f32>> = (0..images)
        .map(|_| (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "IJB 1:1 scoring: {templates} templates, {images} images, {pairs} pairs, {DIM}-d, \
         {threads} threads"
    );
    // The stages of `qud_eval::ijb::score_ijb`, timed one by one.
    let start = Instant::now();
    let mut stage = Instant::now();
    let mut lap = |name: &str| {
        println!("  {name:<28} {:>7.2} s", stage.elapsed().as_secs_f64());
        stage = Instant::now();
    };
    let image = image_features(&features, &meta.detector_scores, true, true);
    lap("image features");
    let pooled = template_features(&image, &meta.templates, &meta.medias);
    lap("template pooling");
    let scores = pair_scores(&pooled, &meta.pairs, threads);
    lap("pair scores");
    let (fpr, tpr, _) = roc_curve(&meta.labels, &scores);
    lap("ROC");
    let tars = tar_at_far(&fpr, &tpr, &IJB_FARS);
    let ours = start.elapsed().as_secs_f64();
    println!("qud:   {ours:>8.2} s (TAR at FAR 1e-4: {:.4})", tars[2]);
    drop(features);

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ijb.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match std::process::Command::new(&python)
        .arg(&script)
        .args([templates, images, pairs].map(|v| v.to_string()))
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            match text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            {
                Some(theirs) => {
                    println!("NumPy: {theirs:>8.2} s (insightface's algorithm, scikit-learn ROC)");
                    println!("speedup: {:.1}x", theirs / ours);
                }
                None => println!("NumPy reference: unreadable output {text:?}"),
            }
        }
        Ok(out) => println!(
            "NumPy reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ),
        Err(e) => println!("no NumPy reference: {python}: {e}"),
    }
}
