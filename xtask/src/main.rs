//! Project automation: `cargo xtask <command>`.
//!
//! - `test [--wgpu]`: the workspace tests on the CPU backends, qud-backbone's tests on Burn's ops
//!   (without its `cpu-kernels` feature), then a type-check of the GPU backend plugins (wgpu and
//!   cuda). `--wgpu` also runs the wgpu plugin's tests and the wgpu tests of the trainer (parity
//!   with flex, five QUD steps, long sums) on a Vulkan adapter (see README).
//! - `gpu-build`: the CLI built with both GPU plugins (offline: CUDA kernels compile through
//!   NVRTC, `backends/cuda/README.md`), then run on flex.
//! - `lint`: `cargo fmt --check` and clippy with `-D warnings` over every crate, GPU ones included.
//! - `ci`: `lint`, then `test`; what `.ci/run` runs.
//! - `bench <backbones|data|eval>`: the criterion benchmarks of qud-bench, then the PyTorch /
//!   NumPy reference on the same inputs when Python has the modules, and the ratio.
//! - `real-check`: the ONNX teacher `../shared/models/fr_feature.onnx` on the real LFW `.bin`
//!   against its README's accuracy, and every real face in `../shared/data` decoded: the tests
//!   `cargo test` leaves out as needing `../shared`.
//! - `gpu-check [--backend cuda|wgpu] [--device NAME] [--teacher ARCH] [--batch N] [--steps N] [--images N]
//!   [--timed N]`: parity with the CPU backend, a QUD run and QUD-step samples/s on one GPU
//!   (`qud-bench`'s `gpu` benchmark); cuda when it builds here, wgpu otherwise.
//! - `train [--config FILE] [--set k=v]... [--resume] [--max-steps N]`: without arguments the
//!   embedded demo (`qud demo`), otherwise `qud train` with those arguments.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::Instant;

/// Crates whose build needs a GPU toolchain; type-checked, not built, by `test`.
const GPU_CRATES: &[&str] = &["qud-backend-wgpu", "qud-backend-cuda"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = args
        .split_first()
        .map(|(c, r)| (c.as_str(), r))
        .unwrap_or(("help", &[]));
    match command {
        "test" => test(rest),
        "train" => train(rest),
        "lint" => lint(),
        "bench" => bench(rest),
        "real-check" => real_check(),
        "gpu-check" => gpu_check(rest),
        "gpu-build" => gpu_build(),
        "ci" => {
            lint()?;
            test(rest)
        }
        "help" | "--help" | "-h" => {
            println!("{}", HELP);
            Ok(())
        }
        other => bail!("unknown xtask command `{other}`\n\n{HELP}"),
    }
}

const HELP: &str = "\
usage: cargo xtask <command>

  test [--wgpu]   workspace tests on the CPU backends + type-check of the GPU plugins
                  (--wgpu: also the wgpu tests; needs a Vulkan driver, see README)
  lint            cargo fmt --check, clippy -D warnings on every crate
  ci              lint, then test (what .ci/run runs)
  bench NAME      backbones | data | eval: criterion benchmark, then the PyTorch/NumPy
                  reference on the same inputs (when python3 has torch/numpy), and the ratio;
                  cache: QUD epoch time with and without the teacher-feature cache;
                  train: QUD step samples/s and peak memory against the PyTorch step;
                  ijb: IJB-C-sized pooling + scoring + ROC against insightface's NumPy code;
                  ident: MegaFace-sized 1:N identification (1M distractors) against the
                  machine's matrix-product peak and NumPy
  real-check      the real-data check: ../shared/models/fr_feature.onnx (run by tract) on the
                  real LFW .bin (../shared/data/lfw.bin) must give the accuracy its README
                  states, to 0.05 points; the real LFW .bin and training faces all decode
                  (the ignored tests that need ../shared, which `cargo test` leaves out)
  gpu-build       the CLI with the cuda and wgpu plugins (builds offline), then run on flex
  gpu-check [--backend cuda|wgpu] [--device NAME] [--teacher ARCH] [--batch N] [--steps N]
            [--images N] [--timed N]
                  on one GPU: parity with the CPU backend (MobileFaceNet and the teacher,
                  iresnet50 unless --teacher), a QUD run
                  of --steps (200) at --batch (256) on --images (4096) synthetic faces, and
                  QUD-step samples/s with and without the teacher cache next to PyTorch on CUDA;
                  cuda unless --backend wgpu
  train [ARGS]    no ARGS: the embedded demo (synthetic faces, ArcFace teacher, QUD student);
                  otherwise `qud train ARGS`, e.g. --config configs/paper/ms1mv2_r50_qud.toml
                  --set data.root=/data/ms1m --set teacher.weights=r50.pth";

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(what: &str, mut command: Command) -> Result<()> {
    eprintln!("xtask: {what}: {command:?}");
    let start = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    eprintln!("xtask: {what} took {:.0} s", start.elapsed().as_secs_f64());
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn exclude_gpu(command: &mut Command) {
    for krate in GPU_CRATES {
        command.args(["--exclude", krate]);
    }
}

fn test(args: &[String]) -> Result<()> {
    let wgpu = args.iter().any(|a| a == "--wgpu");
    if let Some(bad) = args.iter().find(|a| *a != "--wgpu") {
        bail!("unknown option `{bad}` for xtask test");
    }
    let mut tests = cargo();
    tests.args(["test", "--workspace"]);
    exclude_gpu(&mut tests);
    run("CPU tests", tests)?;

    // The layers on Burn's own ops: qud-backbone built without its `cpu-kernels` feature.
    let mut without_kernels = cargo();
    without_kernels.args(["test", "-p", "qud-backbone", "--no-default-features"]);
    run(
        "qud-backbone tests without the CPU kernels",
        without_kernels,
    )?;

    let mut check = cargo();
    check.args([
        "check",
        "--all-targets",
        "-p",
        "qud-backends",
        "--features",
        "qud-backends/wgpu,qud-backends/cuda",
    ]);
    for krate in GPU_CRATES {
        check.args(["-p", krate]);
    }
    run("type-check of the GPU plugins", check)?;

    if wgpu {
        let mut smoke = cargo();
        smoke.args([
            "test",
            "-p",
            "qud-backend-wgpu",
            "-p",
            "qud-trainer",
            "--features",
            "qud-backends/wgpu",
            "--",
            // The wgpu plugin's own tests too: CI only type-checks that crate.
            "--include-ignored",
            "smoke",
            "parses_devices_without_touching_hardware",
            "only_lavapipe_has_a_caveat",
            "wgpu_matches_flex",
            "wgpu_long_row_sums_match_flex",
        ]);
        smoke.env(
            "QUD_WGPU_DEVICE",
            std::env::var("QUD_WGPU_DEVICE").unwrap_or_else(|_| "wgpu".into()),
        );
        run(
            "wgpu plugin tests, parity with flex, five QUD steps and long sums",
            smoke,
        )?;
    }
    Ok(())
}

/// The real-data check alone, with its output shown: the same test `test` runs, by name, in
/// the same build as the workspace tests.
fn real_check() -> Result<()> {
    let mut check = cargo();
    check.args(["test", "--workspace"]);
    exclude_gpu(&mut check);
    check.args(["real_lfw", "--", "--ignored", "--nocapture"]);
    run("real-data check", check)
}

/// Build and run `qud-bench`'s `gpu` benchmark with `backend`'s plugin, its options passed as
/// the QUD_GPU_* variables it reads.
fn gpu_check(args: &[String]) -> Result<()> {
    let mut backend = None;
    let mut settings = Vec::new();
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .with_context(|| format!("xtask gpu-check: {flag} needs a value"))?;
        match flag.as_str() {
            "--backend" if ["cuda", "wgpu"].contains(&value.as_str()) => {
                backend = Some(value.clone())
            }
            "--backend" => bail!("xtask gpu-check: --backend is cuda or wgpu, not `{value}`"),
            "--device" | "--teacher" | "--batch" | "--steps" | "--images" | "--timed" => {
                let variable = format!("QUD_GPU_{}", flag[2..].to_ascii_uppercase());
                settings.push((variable, value.clone()));
            }
            other => bail!("unknown option `{other}` for xtask gpu-check"),
        }
    }
    let bench = |backend: &str| {
        let mut command = bench_command("gpu");
        command.args(["--features", &format!("qud-backends/{backend}")]);
        command
    };
    let backend = match backend {
        Some(b) => b,
        None => {
            let mut build = bench("cuda");
            build.arg("--no-run");
            match run("build of the gpu check with cuda", build) {
                Ok(()) => "cuda".into(),
                Err(e) => {
                    eprintln!("xtask: {e}; using wgpu (Vulkan) on the same GPU");
                    "wgpu".into()
                }
            }
        }
    };
    let mut check = bench(&backend);
    check
        .env("QUD_GPU_BACKEND", &backend)
        .envs(settings.clone());
    run(&format!("gpu check on {backend}"), check)?;
    // The backend plugin's own smoke test, which `cargo test` leaves out (it needs the GPU).
    let mut smoke = cargo();
    smoke.args([
        "test",
        "-p",
        &format!("qud-backend-{backend}"),
        "--",
        "--ignored",
        "smoke",
    ]);
    if let Some((_, device)) = settings.iter().find(|(k, _)| k == "QUD_GPU_DEVICE") {
        smoke.env(
            format!("QUD_{}_DEVICE", backend.to_ascii_uppercase()),
            device,
        );
    }
    run(&format!("{backend} smoke test"), smoke)
}

/// The CLI with both GPU plugins, built as a user would (no `DOCS_RS`, no LLVM bundle), then run
/// on flex: the GPU plugins must not change the CPU path.
fn gpu_build() -> Result<()> {
    let mut build = cargo();
    build.args([
        "build",
        "-p",
        "qud-cli",
        "--features",
        "qud-cli/cuda,qud-cli/wgpu",
    ]);
    run("build of the CLI with the cuda and wgpu plugins", build)?;
    let qud = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/qud");
    let mut list = Command::new(&qud);
    list.arg("list");
    run("qud list (with the GPU plugins)", list)?;
    let mut inspect = Command::new(&qud);
    inspect.args(["inspect", "--arch", "mobilefacenet", "--backend", "flex"]);
    run("qud inspect on flex", inspect)
}

fn train(args: &[String]) -> Result<()> {
    let mut qud = cargo();
    // The dev profile: dependencies are optimised (see Cargo.toml) and shared with the tests.
    qud.args(["run", "--quiet", "-p", "qud-cli", "--bin", "qud", "--"]);
    if args.is_empty() {
        qud.arg("demo");
    } else {
        qud.arg("train").args(args);
    }
    run("qud", qud)
}

fn lint() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run("rustfmt", fmt)?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        "qud-backends/wgpu,qud-backends/cuda",
        "--",
        "-D",
        "warnings",
    ]);
    run("clippy", clippy)?;
    Ok(())
}

/// `(benchmark id, items per second)` of every criterion result under `target/criterion` whose
/// id starts with `prefix`, from the median time per iteration.
fn criterion_rates(prefix: &str) -> Result<Vec<(String, f64)>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.ends_with("new/benchmark.json") {
                let read = |p: &std::path::Path| -> Result<serde_json::Value> {
                    Ok(serde_json::from_slice(&std::fs::read(p)?)?)
                };
                let meta = read(&path)?;
                let estimates = read(&path.with_file_name("estimates.json"))?;
                let id = meta["full_id"].as_str().unwrap_or_default().to_string();
                let items = meta["throughput"]["Elements"].as_f64().unwrap_or(1.0);
                let ns = estimates["median"]["point_estimate"]
                    .as_f64()
                    .unwrap_or(f64::NAN);
                if id.starts_with(prefix) {
                    out.push((id, items / (ns * 1e-9)));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Run a reference script; `None` (with the reason printed) when Python or its modules are
/// missing.
fn python_reference(script: &str, args: &[String], modules: &str) -> Option<serde_json::Value> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("xtask: no reference run: `{python} -c 'import {modules}'` failed");
        return None;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/qud-bench/python")
        .join(script);
    eprintln!(
        "xtask: reference: {python} {} {}",
        path.display(),
        args.join(" ")
    );
    let output = Command::new(&python).arg(&path).args(args).output().ok()?;
    if !output.status.success() {
        eprintln!(
            "xtask: reference failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.lines().last()?).ok()
}

fn bench(args: &[String]) -> Result<()> {
    let Some(name) = args.first().map(String::as_str) else {
        bail!("usage: cargo xtask bench <backbones|data|eval|onnx|cache|train|ijb|ident>");
    };
    if ![
        "backbones",
        "data",
        "eval",
        "onnx",
        "cache",
        "train",
        "ijb",
        "ident",
    ]
    .contains(&name)
    {
        bail!(
            "unknown benchmark `{name}`: backbones, data, eval, onnx, cache, train, ijb or ident"
        );
    }
    let bench = bench_command(name);
    if ["cache", "train", "ijb", "ident"].contains(&name) {
        // Whole epochs or steps, timed by the benchmark itself, which runs its PyTorch
        // reference (train) and prints its own table.
        return run("benchmark", bench);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data");
    // The quantised model of the onnx benchmark is onnxruntime's own output: made first, by the
    // reference script (the row is skipped without Python).
    let ort = (name == "onnx").then(|| {
        let args = ["--make".to_string(), data.display().to_string()];
        python_reference("ort_models.py", &args, "onnxruntime, numpy")
    });
    let mut criterion = bench;
    criterion.args(&args[1..]);
    run("criterion", criterion)?;
    println!("\n{name}: {threads} CPU threads, dev profile (dependencies opt-level 3)");
    match name {
        "backbones" => {
            let ours = criterion_rates("forward_b64")?;
            let torch = python_reference("backbones.py", &[threads.to_string()], "torch");
            println!(
                "{:<36} {:>12} {:>14} {:>8}",
                "forward, batch 64", "images/s", "PyTorch img/s", "ratio"
            );
            for (id, rate) in ours {
                let arch = id.split('/').nth(1).unwrap_or_default();
                let reference = torch
                    .as_ref()
                    .and_then(|t| t["images_per_s"][arch].as_f64());
                print_row(&id, rate, reference);
            }
            if let Some(t) = &torch {
                println!("PyTorch {} with {} threads", t["torch"], t["threads"]);
            }
        }
        "onnx" => {
            let ort = ort.flatten();
            println!(
                "{:<36} {:>12} {:>14} {:>8}",
                "ONNX, all threads, 128 faces a call", "images/s", "onnxruntime", "ratio"
            );
            for (id, rate) in criterion_rates("onnx_all_threads")? {
                let model = id.split('/').nth(1).unwrap_or_default();
                // onnxruntime at the batch a user would run it: 64 for a free batch (batch 1
                // for a quantised graph, the batch-safe way), 1 for a graph fixed at 1.
                let batch = if model.contains("quant") || model == "fr_feature" {
                    1
                } else {
                    64
                };
                let reference = ort
                    .as_ref()
                    .and_then(|t| t["images_per_s"][format!("{model}/batch{batch}")].as_f64());
                print_row(&id, rate, reference);
            }
            if let Some(t) = &ort {
                println!(
                    "onnxruntime {} with {} threads: {}",
                    t["onnxruntime"], t["threads"], t["images_per_s"]
                );
            }
        }
        "data" => {
            let ours = criterion_rates("decode_batch")?;
            let rec = data.join("faces_1024.rec").display().to_string();
            let reference = python_reference("data.py", &[rec], "torch, PIL, numpy");
            println!(
                "{:<36} {:>12} {:>14} {:>8}",
                "decode+flip+normalise", "images/s", "PIL+torch img/s", "ratio"
            );
            for (id, rate) in ours {
                let threads = id.rsplit('_').next().unwrap_or("1").to_string();
                let r = reference
                    .as_ref()
                    .and_then(|t| t["images_per_s"][&threads].as_f64());
                print_row(&id, rate, r);
            }
        }
        _ => {
            let ours = criterion_rates("verify_10fold")?;
            let reference =
                python_reference("eval.py", &[data.display().to_string()], "numpy, sklearn");
            println!(
                "{:<36} {:>12} {:>14} {:>8}",
                "10-fold verification", "pairs/s", "NumPy pairs/s", "ratio"
            );
            for (id, rate) in ours {
                let pairs = id.rsplit('_').next().unwrap_or_default().to_string();
                let r = reference.as_ref().and_then(|t| {
                    let seconds = t["seconds"][&pairs].as_f64()?;
                    Some(pairs.parse::<f64>().ok()? / seconds)
                });
                print_row(&id, rate, r);
            }
            for (id, rate) in criterion_rates("embed_flip_tta")? {
                print_row(&id, rate, None);
            }
        }
    }
    Ok(())
}

/// `cargo bench` of `qud-bench`'s benchmark `name`. The dev profile builds dependencies at
/// opt-level 3 (Cargo.toml) and shares them with the tests, so a benchmark costs no second build
/// of Burn.
fn bench_command(name: &str) -> Command {
    let mut bench = cargo();
    bench.args([
        "bench",
        "--profile",
        "dev",
        "-p",
        "qud-bench",
        "--bench",
        name,
    ]);
    bench
}

fn print_row(id: &str, rate: f64, reference: Option<f64>) {
    match reference {
        Some(r) => println!("{id:<36} {rate:>12.1} {r:>14.1} {:>7.2}x", rate / r),
        None => println!("{id:<36} {rate:>12.1} {:>14} {:>8}", "-", "-"),
    }
}
