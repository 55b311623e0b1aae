//! The embedded default run (`qud demo`, `cargo xtask train`): a teacher trained with ArcFace on
//! synthetic identities (cached), a QUD student distilled from it without labels, and both
//! scored on held-out synthetic identities written as an insightface `.bin`.

use anyhow::{bail, Context, Result};
use burn::module::Module;
use qud_config::{Config, ConfigLoader};
use qud_eval::SetScore;
use std::path::Path;

/// configs/demo.toml, compiled in so the demo needs no file.
pub const DEMO_TOML: &str = include_str!("../../../configs/demo.toml");

/// Seed of the held-out identities: disjoint from the training identities' seed.
const EVAL_SEED: u64 = 7_777;

/// An evaluation table: one row per model, one column per set (accuracy % and its std).
pub fn table(rows: &[(&str, &Vec<SetScore>)]) -> String {
    let Some((_, first)) = rows.first() else {
        return String::new();
    };
    let mut out = format!("{:<14}", "model");
    for s in first.iter() {
        out += &format!(" | {:>18}", s.name);
    }
    out += " |    VAL@FAR1e-3 | XNorm\n";
    for (name, scores) in rows {
        out += &format!("{name:<14}");
        for s in scores.iter() {
            out += &format!(
                " | {:>9.2} +- {:>5.2}",
                100.0 * s.scores.accuracy,
                100.0 * s.scores.accuracy_std
            );
        }
        let val = scores.first().map_or(0.0, |s| s.scores.val);
        let xnorm = scores.first().map_or(0.0, |s| s.xnorm);
        out += &format!(" | {:>14.4} | {xnorm:.3}\n", val);
    }
    out
}

/// `identities x 4` held-out faces as 2 same and 2 different pairs per identity.
fn write_eval_set(path: &Path, identities: usize) -> Result<()> {
    let (images, issame) =
        qud_data::synthetic_pairs(identities, EVAL_SEED, qud_data::ImageEncoding::Png);
    crate::tools::write_atomic(path, &qud_eval::pickle::dump_bin(&images, &issame))
}

fn teacher_config(student: &Config, dir: &Path, user: &[String]) -> Result<Config> {
    let mut sets = vec![
        "method.kind=arcface".to_string(),
        "method.margin=0.3".into(),
        "method.scale=32.0".into(),
        "optim.epochs=10".into(),
        "optim.lr_milestones=[8]".into(),
        format!("student.embedding_dim={}", student.teacher.embedding_dim),
        format!("student.arch={}", student.teacher.arch),
        format!("run.output_dir={}", dir.display()),
    ];
    sets.extend(user.iter().cloned());
    Ok(ConfigLoader::new()
        .embedded("configs/demo.toml", DEMO_TOML)
        .set_all(sets)
        .load()?)
}

/// The file that marks a run directory as the demo's own, and so the demo's to replace.
const DEMO_MARKER: &str = ".qud-demo";

/// An empty run directory for a demo stage at `dir`: a directory the demo made before (it holds
/// the marker) is emptied; one it did not make is used only when empty, never deleted.
fn fresh_run_dir(dir: &Path) -> Result<()> {
    if dir.join(DEMO_MARKER).is_file() {
        std::fs::remove_dir_all(dir).with_context(|| dir.display().to_string())?;
    } else if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| dir.display().to_string())?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{}: exists, is not empty and was not made by `qud demo`; the demo deletes only \
                 its own run directories: choose another run.output_dir or remove it yourself",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    std::fs::write(
        dir.join(DEMO_MARKER),
        b"made by qud demo; replaced by its next run\n",
    )
    .with_context(|| dir.display().to_string())?;
    Ok(())
}

pub fn run(user_sets: &[String]) -> Result<()> {
    let config = ConfigLoader::new()
        .embedded("configs/demo.toml", DEMO_TOML)
        .set_all(user_sets.iter().cloned())
        .load()?;
    let root = config
        .run
        .output_dir
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    crate::init_logging(Some(&root.join("demo.log")));
    let started = std::time::Instant::now();

    let eval_dir = config
        .eval
        .dir
        .clone()
        .context("the demo config names eval.dir")?;
    let eval_bin = eval_dir.join("synthetic_pairs.bin");
    if !eval_bin.is_file() {
        write_eval_set(&eval_bin, 25)?;
        tracing::info!("wrote the held-out evaluation set {}", eval_bin.display());
    }

    let teacher_dir = root.join("teacher");
    let teacher_weights = teacher_dir.join("student.safetensors");
    let teacher_cfg = teacher_config(&config, &teacher_dir, user_sets)?;
    if teacher_weights.is_file() {
        tracing::info!("reusing the cached teacher {}", teacher_weights.display());
    } else {
        tracing::info!("stage 1: training the teacher with ArcFace on labelled synthetic faces");
        fresh_run_dir(&teacher_dir)?;
        qud_trainer::train(&teacher_cfg, &Default::default())?;
    }

    tracing::info!("stage 2: distilling the student with QUD (no labels)");
    let mut student_cfg = config.clone();
    student_cfg.teacher.weights = Some(teacher_weights.clone());
    fresh_run_dir(&student_cfg.run.output_dir)?;
    let report = qud_trainer::train(&student_cfg, &Default::default())?;

    let device = qud_backends::device(&config.run.backend, &config.run.devices[0])?;
    let spec = qud_models::BackboneSpec {
        embedding_dim: config.teacher.embedding_dim,
        dropout: 0.0,
    };
    let teacher = qud_models::load_weights(
        qud_models::create(&config.teacher.arch, &spec, &device)?,
        &teacher_weights,
    )?
    .valid();
    let set = qud_eval::PairSet::load_scorable(&eval_bin)?;
    let teacher_scores = vec![qud_eval::evaluate(
        &teacher,
        &set,
        config.eval.batch_size,
        &device,
    )];
    let student_scores = match report.final_eval.is_empty() {
        true => {
            let student = qud_models::load_weights(
                qud_models::create(&config.student.arch, &spec, &device)?,
                &report.student_weights,
            )?
            .valid();
            vec![qud_eval::evaluate(
                &student,
                &set,
                config.eval.batch_size,
                &device,
            )]
        }
        false => report.final_eval.clone(),
    };
    println!(
        "\nHeld-out synthetic identities ({} pairs), accuracy % (10 folds, flip TTA):\n{}",
        set.issame.len(),
        table(&[("teacher", &teacher_scores), ("student", &student_scores)])
    );
    if let (Some(t), Some(s)) = (teacher_scores.first(), student_scores.first()) {
        let plot = root.join(format!("roc_{}.svg", t.name));
        let title = format!("{}: teacher vs QUD student ({} pairs)", t.name, t.pairs);
        let svg = qud_eval::roc_svg(&title, &[("teacher", &t.roc), ("student", &s.roc)]);
        crate::tools::write_atomic(&plot, svg.as_bytes())?;
        println!("ROC plot: {}", plot.display());
    }
    println!(
        "student weights (PyTorch names): {}",
        report.student_weights.display()
    );
    println!(
        "run directory: {} ({:.0} s)",
        root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{fresh_run_dir, DEMO_MARKER};

    /// The demo replaces only directories it made; anything else that is not empty is refused
    /// and left as it was (issue 31: `--set run.output_dir=X` deleted X).
    #[test]
    fn the_demo_deletes_only_its_own_run_directories() {
        let root = tempfile::tempdir().unwrap();
        let ours = root.path().join("student");
        fresh_run_dir(&ours).unwrap();
        std::fs::write(ours.join("metrics.jsonl"), "{}").unwrap();
        fresh_run_dir(&ours).unwrap();
        assert!(ours.join(DEMO_MARKER).is_file());
        assert!(
            !ours.join("metrics.jsonl").exists(),
            "the demo's own run is replaced"
        );

        let theirs = root.path().join("important");
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join("thesis.tex"), "years of work").unwrap();
        let err = fresh_run_dir(&theirs).unwrap_err().to_string();
        assert!(
            err.contains("important") && err.contains("not made by"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(theirs.join("thesis.tex")).unwrap(),
            "years of work"
        );

        let empty = root.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        fresh_run_dir(&empty).unwrap();
        assert!(empty.join(DEMO_MARKER).is_file());
    }
}
