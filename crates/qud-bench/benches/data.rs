//! Training-input throughput (images/s): decode JPEG + flip + normalise + batch, from a `.rec` of
//! 1,024 synthetic faces (JPEG quality 95), at 1 and 2 decoding threads. The reference is
//! `python/data.py` (PIL + torch transforms on the same record bytes).
//!
//! First, memory: the loader streams one epoch of a 200,000-image `.rec` (written once under
//! `target/bench-data/`, about 1.7 GB) and the resident set size is sampled as it goes; it must
//! stay flat, bounded by the prefetch depth, not grow with the file. `QUD_BENCH_STREAM=0` skips it.

use criterion::{criterion_group, Criterion, Throughput};
use qud_data::{
    decode_batch, encode_face, epoch_plan, pack_records, FaceDataset, ImageEncoding, Loader,
    LoaderOptions, RecordDataset, SyntheticFaces,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAM_IMAGES: usize = 200_000;

const BATCH: usize = 128;

fn decode(c: &mut Criterion) {
    let rec = qud_bench::synthetic_rec(1024);
    let set = RecordDataset::open(&rec, false).expect("bench .rec");
    let plan = epoch_plan(set.len(), 0, &LoaderOptions::default());
    let mut group = c.benchmark_group("decode_batch");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    for threads in [1, 2] {
        let mut next = 0;
        group.bench_function(format!("rec_jpeg95/threads_{threads}"), |b| {
            b.iter(|| {
                let start = next * BATCH % (set.len() - BATCH);
                next += 1;
                decode_batch(&set, &plan[start..start + BATCH], threads, false).expect("decodes")
            })
        });
    }
    group.finish();
}

/// Resident and peak resident set size in MB, from `/proc/self/status` (Linux).
fn rss_mb() -> Option<(f64, f64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn stream_memory() {
    let prefix = qud_bench::data_dir().join(format!("stream_{STREAM_IMAGES}"));
    let rec = prefix.with_extension("rec");
    if !rec.is_file() {
        // 1,024 distinct JPEGs, repeated: the loader's memory does not depend on the pixels.
        let faces = SyntheticFaces::new(64, 16, 7);
        let encoded: Vec<Vec<u8>> = (0..faces.len())
            .map(|i| encode_face(&faces.get(i).unwrap().image, ImageEncoding::Jpeg(95)))
            .collect();
        pack_records(&prefix, STREAM_IMAGES, None, |i| {
            Ok((encoded[i % encoded.len()].clone(), None))
        })
        .expect("writing the streaming .rec");
    }
    let Some((before, _)) = rss_mb() else {
        println!("streaming memory: /proc/self/status unreadable, not measured");
        return;
    };
    let set = Arc::new(RecordDataset::open(&rec, false).expect("streaming .rec"));
    let file_mb = std::fs::metadata(&rec).map_or(0.0, |m| m.len() as f64 / 1e6);
    let options = LoaderOptions {
        batch_size: 128,
        workers: 2,
        ..LoaderOptions::default()
    };
    let prefetch = options.prefetch;
    let loader = Loader::new(set, options);
    let batches = loader.batches_per_epoch();
    let start = Instant::now();
    let (mut images, mut checksum, mut samples) = (0usize, 0f64, Vec::new());
    for (b, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch.expect("streaming batch");
        images += batch.len();
        checksum += f64::from(batch.images[b % batch.images.len()]);
        if b % (batches / 10).max(1) == 0 || b + 1 == batches {
            samples.push((images, rss_mb().map_or(0.0, |r| r.0)));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (after, peak) = rss_mb().unwrap_or_default();
    println!(
        "streaming memory: {images} images from a {file_mb:.0} MB .rec in {seconds:.1} s \
         ({:.0} images/s, batch 128, 2 workers, prefetch {prefetch}; checksum {checksum:.1})",
        images as f64 / seconds
    );
    let trace: Vec<String> = samples
        .iter()
        .map(|(n, mb)| format!("{}k: {mb:.0}", n / 1000))
        .collect();
    println!("  RSS (MB) by images read: {}", trace.join(", "));
    println!(
        "  RSS before {before:.0} MB, after {after:.0} MB, peak {peak:.0} MB: \
         {:.0} MB above the start for a {file_mb:.0} MB file",
        peak - before
    );
}

criterion_group!(benches, decode);

fn main() {
    if std::env::var("QUD_BENCH_STREAM").map_or(true, |v| v != "0") {
        stream_memory();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
