//! Epoch time of QUD distillation with and without the teacher-feature cache: an iresnet50
//! teacher and a MobileFaceNet student on the flex CPU backend, the same 128 synthetic faces,
//! batch 32, in one process. Three runs: two epochs with the cache off; the cache built alone
//! (`qud cache-teacher`); two epochs reading it. Epoch times come from the trainer
//! (`TrainReport::epoch_seconds`: the epoch's batches, steps and checkpoint, not the setup that
//! every run pays once, such as building and hashing a 44M-parameter teacher). Ends with
//! `cache speedup: N.Nx`: the uncached run's later epochs over the cached run's later epochs,
//! each side the median of its three later epochs (an epoch here is four steps, and on a
//! shared machine one epoch of either run moved by a quarter between runs). Not a criterion
//! benchmark: an epoch is one sample.

use std::time::Instant;

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
                    "optim.epochs=4",
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
            println!("{name:<20} epoch {epoch} {seconds:>8.1} s");
        }
        report.epoch_seconds
    };
    println!("QUD epoch, 128 faces, iresnet50 teacher -> MobileFaceNet student, flex, batch 32");
    let off = epochs("no cache", "off");
    let start = Instant::now();
    qud_trainer::prepare_teacher_cache(&config("cached", "auto")).expect("cache build");
    let build = start.elapsed().as_secs_f64();
    println!("{:<28} {build:>8.1} s", "cache build");
    let cached = epochs("cached", "require");
    let (off, first, later) = (median(&off[1..]), build + cached[0], median(&cached[1..]));
    println!("{:<28} {off:>8.2} s", "no cache, later epochs");
    println!("{:<28} {later:>8.2} s", "cached, later epochs");
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
