//! Epoch time of QUD distillation with and without the teacher-feature cache: an iresnet50
//! teacher and a MobileFaceNet student on the flex CPU backend, the same 128 synthetic faces,
//! batch 32, in one process. Runs three one-epoch trainings: cache off, cache auto (builds it:
//! the "first epoch"), cache require (reads it: a "later epoch"), and ends with
//! `cache speedup: N.Nx` (off over later). Not a criterion benchmark: an epoch is one sample.

use std::time::Instant;

fn main() {
    let root = qud_bench::data_dir().join("cache-bench");
    let _ = std::fs::remove_dir_all(&root);
    let run = |name: &str, cache: &str| -> f64 {
        let config = qud_config::ConfigLoader::new()
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
                    "optim.epochs=1",
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
            .expect("bench config");
        let start = Instant::now();
        qud_trainer::train(&config, &qud_trainer::TrainOptions::default()).expect("training");
        let seconds = start.elapsed().as_secs_f64();
        println!("{name:<28} {seconds:>8.1} s");
        seconds
    };
    println!("QUD epoch, 128 faces, iresnet50 teacher -> MobileFaceNet student, flex, batch 32");
    let off = run("no cache", "off");
    let first = run("cache, first epoch (build)", "auto");
    let later = run("cache, later epoch", "require");
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
