//! Epoch time of QUD distillation with and without the teacher-feature cache: an iresnet50
//! teacher and a MobileFaceNet student on the flex CPU backend, the same 128 synthetic faces,
//! batch 32, in one process. The cache is built first, alone (`qud cache-teacher`); then three
//! rounds, each a two-epoch run with the cache off and one reading it. Epoch times come from
//! the trainer (`TrainReport::epoch_seconds`: the epoch's batches, steps and checkpoint, not the
//! setup that every run pays once, such as building and hashing a 44M-parameter teacher). Ends
//! with `cache speedup: N.Nx`: the median over the rounds of the uncached run's second epoch
//! over the median of the cached run's second epoch. The rounds interleave the two sides so
//! that both see the same machine: on a shared one, an epoch (four steps here) moved by a
//! quarter from one minute to the next, and when all uncached epochs ran before all cached
//! ones the ratio followed whichever minute each side fell in. Not a criterion benchmark: an
//! epoch is one sample.

use std::time::Instant;

/// Rounds of one uncached and one cached run.
const ROUNDS: usize = 3;

fn main() {
    let root = qud_bench::data_dir().join("cache-bench");
    let _ = std::fs::remove_dir_all(&root);
    let config = |name: &str, cache: &str| {
        qud_config::ConfigLoader::new()
            .without_env()
            .set_all(
                [
                    "data.format=synthetic",
                    "data.synthetic_identities=8",
                    "data.synthetic_images_per_identity=16",
                    "teacher.arch=iresnet50",
                    "teacher.allow_random=true",
                    "student.arch=mobilefacenet",
                    "method.kind=qud",
                    "method.queue_size=64",
                    "optim.batch_size=32",
                    "optim.epochs=2",
                    "optim.lr_milestones=[]",
                    "run.checkpoint_every=0",
                    "run.log_every=1000",
                ]
                .map(String::from)
                .into_iter()
                .chain([
                    format!("teacher.cache={cache}"),
                    format!("run.output_dir={}", root.join(name).display()),
                ]),
            )
            .load()
            .expect("bench config")
    };
    let epochs = |name: &str, cache: &str| -> Vec<f64> {
        let report =
            qud_trainer::train(&config(name, cache), &Default::default()).expect("training");
        for (epoch, seconds) in report.epoch_seconds.iter().enumerate() {
            println!("{name:<28} epoch {epoch} {seconds:>6.1} s");
        }
        report.epoch_seconds
    };
    println!("QUD epoch, 128 faces, iresnet50 teacher -> MobileFaceNet student, flex, batch 32");
    let start = Instant::now();
    qud_trainer::prepare_teacher_cache(&config("cached", "auto")).expect("cache build");
    let build = start.elapsed().as_secs_f64();
    println!("{:<28} {build:>8.1} s", "cache build");
    let (mut off, mut cached, mut first_cached) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        off.push(epochs(&format!("no cache, round {round}"), "off")[1]);
        let seconds = epochs(&format!("cached, round {round}"), "require");
        first_cached.push(seconds[0]);
        cached.push(seconds[1]);
    }
    let (off, later) = (median(&off), median(&cached));
    let first = build + median(&first_cached);
    println!("{:<28} {off:>8.2} s", "no cache, second epochs");
    println!("{:<28} {later:>8.2} s", "cached, second epochs");
    println!("{:<28} {first:>8.1} s", "first epoch (build + epoch)");
    let cache_file = std::fs::read_dir(root.join("teacher-cache"))
        .expect("cache folder")
        .flatten()
        .next()
        .expect("a cache file");
    let bytes = cache_file.metadata().expect("cache size").len();
    println!(
        "cache size: {bytes} bytes, {:.0} bytes per image (both flips, f32, 512-d)",
        bytes as f64 / 128.0
    );
    println!("first epoch with cache / without: {:.2}x", first / off);
    println!("cache speedup: {:.1}x", off / later);
}

/// The median of `values` (the upper middle one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
