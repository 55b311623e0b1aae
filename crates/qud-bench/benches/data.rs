//! Training-input throughput (images/s): decode JPEG + flip + normalise + batch, from a `.rec` of
//! 1,024 synthetic faces (JPEG quality 95), at 1 and 2 decoding threads. The reference is
//! `python/data.py` (PIL + torch transforms on the same record bytes).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qud_data::{decode_batch, epoch_plan, FaceDataset, LoaderOptions, RecordDataset};
use std::time::Duration;

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

criterion_group!(benches, decode);
criterion_main!(benches);
