//! Project automation: `cargo xtask <command>`.
//!
//! - `test [--wgpu]`: the workspace tests on the CPU backends, then a type-check of the GPU
//!   backend plugins (wgpu, and cuda with `DOCS_RS=1` so that burn-cuda's LLVM download is
//!   skipped). `--wgpu` also runs the wgpu smoke test on a Vulkan adapter (see README).
//! - `lint`: `cargo fmt --check` and clippy with `-D warnings` over every crate, GPU ones included.
//! - `ci`: `lint`, then `test`; what `.ci/run` runs.
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
                  (--wgpu: also the wgpu smoke test; needs a Vulkan driver, see README)
  lint            cargo fmt --check, clippy -D warnings on every crate
  ci              lint, then test (what .ci/run runs)
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

fn check_gpu_crates(command: &mut Command) {
    // burn-cuda's build pulls cubecl-llvm, whose build script downloads LLVM unless DOCS_RS is
    // set; a type-check needs no LLVM.
    command.env("DOCS_RS", "1");
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
    check_gpu_crates(&mut check);
    run("type-check of the GPU plugins", check)?;

    if wgpu {
        let mut smoke = cargo();
        smoke.args(["test", "-p", "qud-backend-wgpu"]);
        smoke.env(
            "QUD_WGPU_DEVICE",
            std::env::var("QUD_WGPU_DEVICE").unwrap_or_else(|_| "wgpu".into()),
        );
        run("wgpu smoke test", smoke)?;
    }
    Ok(())
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
    check_gpu_crates(&mut clippy);
    run("clippy", clippy)?;
    Ok(())
}
