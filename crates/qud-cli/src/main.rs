//! `qud`: train (any config, or the embedded demo), evaluate and inspect face models.

mod demo;
mod tools;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use clap::{Parser, Subcommand};
use qud_backbone::Backbone;
use qud_config::ConfigLoader;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "qud",
    version,
    about = "Unsupervised knowledge distillation for face recognition (QUD)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train as a config says (defaults < --config < QUD_* environment < --set).
    Train {
        #[arg(long)]
        config: Option<PathBuf>,
        /// `section.key=value`, repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue the run in run.output_dir from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Stop after this many steps (a checkpoint is written).
        #[arg(long)]
        max_steps: Option<usize>,
    },
    /// Build (or verify) the teacher-feature cache a config's run will read, before training.
    CacheTeacher {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// The embedded default: synthetic faces, an ArcFace teacher, a QUD student, evaluation.
    Demo {
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Score a backbone on verification .bin sets (flip TTA, 10 folds, as insightface), or score
    /// embeddings made anywhere (`--embeddings emb.npy --issame issame.npy|.txt`).
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Folder holding `<target>.bin` files.
        #[arg(long, required_unless_present = "embeddings")]
        bins: Option<PathBuf>,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "lfw,cfp_fp,agedb_30,calfw,cplfw"
        )]
        targets: Vec<String>,
        /// `[2P, D]` float32/float64 .npy of embeddings, pairs consecutive (instead of a model).
        #[arg(long, requires = "issame", conflicts_with = "bins")]
        embeddings: Option<PathBuf>,
        /// `P` pair labels: a bool/int .npy or a text file of 1/0 lines.
        #[arg(long)]
        issame: Option<PathBuf>,
        /// Also write the scores as JSON, and a ROC plot per target (`roc_<target>.svg`) beside it.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Embed faces (an image folder, a RecordIO .rec or a .bin) and write float32 [N, D] rows in
    /// input order (.npy).
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// A folder of images (sorted; identity sub-folders allowed), a RecordIO .rec (image
        /// records in key order) or a verification .bin.
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Write embedding(image) + embedding(flipped image).
        #[arg(long)]
        flip_sum: bool,
        /// Resize images that are not 112x112 instead of refusing them.
        #[arg(long)]
        resize: bool,
    },
    /// Pack an image folder (identity sub-folders, or flat and unlabelled) into insightface
    /// RecordIO: `<prefix>.rec` + `<prefix>.idx`.
    Pack {
        folder: PathBuf,
        prefix: PathBuf,
        /// Resize images that are not 112x112 (re-encoded as JPEG) instead of refusing them.
        #[arg(long)]
        resize: bool,
        #[arg(long, default_value_t = 95)]
        quality: u8,
    },
    /// Write synthetic faces (a folder, or RecordIO when OUT ends in .rec) and optionally a
    /// verification .bin of held-out synthetic identities.
    Synth {
        out: PathBuf,
        #[arg(long, default_value_t = 100)]
        identities: usize,
        #[arg(long, default_value_t = 20)]
        images: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// JPEG quality of the faces (insightface packs at 95).
        #[arg(long, default_value_t = 95)]
        quality: u8,
        /// Also write this verification .bin (4 pairs per held-out identity, half genuine).
        #[arg(long)]
        pairs: Option<PathBuf>,
        #[arg(long, default_value_t = 50)]
        pair_identities: usize,
    },
    /// Parameters (as PyTorch counts them) and multiply-accumulates at 112x112 of an architecture.
    Inspect {
        #[arg(long)]
        arch: String,
        #[arg(long, default_value_t = 512)]
        embedding_dim: usize,
    },
    /// The compiled backends and the registered architectures.
    List,
}

/// A backbone with its weights, on a backend, for `eval` and `embed`.
#[derive(clap::Args)]
struct ModelArgs {
    /// Registered architecture (`qud list`).
    #[arg(long)]
    arch: Option<String>,
    /// PyTorch state_dict (.pth/.pt) or safetensors with the architecture's PyTorch key names.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    embedding_dim: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value = "flex")]
    backend: String,
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl ModelArgs {
    /// The model in eval mode and its device.
    fn load(&self) -> Result<(qud_models::AnyBackbone, burn::tensor::Device)> {
        let device = qud_backends::device(&self.backend, &self.device)?;
        let spec = qud_models::BackboneSpec {
            embedding_dim: self.embedding_dim,
            dropout: 0.0,
        };
        let (Some(arch), Some(weights)) = (&self.arch, &self.weights) else {
            bail!("--arch and --weights are required");
        };
        let model = qud_models::create(arch, &spec, &device)?;
        Ok((qud_models::load_weights(model, weights)?.valid(), device))
    }
}

fn init_logging(log_file: Option<&std::path::Path>) {
    use tracing_subscriber::prelude::*;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let file = log_file.and_then(|p| {
        std::fs::create_dir_all(p.parent()?).ok()?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()?;
        Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .with_target(false),
        )
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .try_init();
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train {
            config,
            set,
            resume,
            max_steps,
        } => {
            let mut loader = ConfigLoader::new();
            if let Some(path) = config {
                loader = loader.file(path);
            }
            let config = loader.set_all(set).load()?;
            init_logging(Some(&config.run.output_dir.join("train.log")));
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                // A second signal while the step finishes exits at once.
                signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
                signal_hook::flag::register(signal, stop.clone())?;
            }
            let options = qud_trainer::TrainOptions {
                max_steps,
                resume,
                stop: Some(stop),
            };
            let report = qud_trainer::train(&config, &options)?;
            println!("{}", demo::table(&[("student", &report.final_eval)]));
            println!(
                "student weights (PyTorch names): {}",
                report.student_weights.display()
            );
            Ok(())
        }
        Command::Demo { set } => demo::run(&set),
        Command::CacheTeacher { config, set } => {
            let mut loader = ConfigLoader::new();
            if let Some(path) = config {
                loader = loader.file(path);
            }
            let config = loader.set_all(set).load()?;
            init_logging(None);
            let path = qud_trainer::prepare_teacher_cache(&config)?;
            println!("teacher cache: {}", path.display());
            Ok(())
        }
        Command::Eval {
            model,
            bins,
            targets,
            embeddings,
            issame,
            json,
        } => {
            init_logging(None);
            let (label, scores) = match (embeddings, issame) {
                (Some(embeddings), Some(issame)) => {
                    let rows = qud_eval::read_npy_rows(&embeddings)?;
                    let labels = qud_eval::read_issame(&issame)?;
                    let name = embeddings
                        .file_stem()
                        .map_or("embeddings".into(), |s| s.to_string_lossy().to_string());
                    let score = qud_eval::score_embeddings(&name, &rows, &labels)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", embeddings.display()))?;
                    ("embeddings".to_string(), vec![score])
                }
                _ => {
                    let bins = bins.context("--bins or --embeddings is required")?;
                    let batch_size = model.batch_size;
                    let (model, device) = model.load()?;
                    let mut scores = Vec::new();
                    for target in &targets {
                        let path = bins.join(format!("{target}.bin"));
                        if !path.is_file() {
                            tracing::warn!("{} not found, skipped", path.display());
                            continue;
                        }
                        let set = qud_eval::PairSet::load(&path)?;
                        scores.push(qud_eval::evaluate(&model, &set, batch_size, &device));
                    }
                    if scores.is_empty() {
                        bail!("none of {} found in {}", targets.join(", "), bins.display());
                    }
                    (model.arch().to_string(), scores)
                }
            };
            println!("{}", demo::table(&[(label.as_str(), &scores)]));
            if let Some(path) = json {
                tools::write_atomic(&path, serde_json::to_string_pretty(&scores)?.as_bytes())?;
                let dir = path.parent().unwrap_or(std::path::Path::new("."));
                for score in &scores {
                    let plot = dir.join(format!("roc_{}.svg", score.name));
                    let title = format!("{} ({} pairs)", score.name, score.pairs);
                    let svg = qud_eval::roc_svg(&title, &[(label.as_str(), &score.roc)]);
                    tools::write_atomic(&plot, svg.as_bytes())?;
                    println!("ROC plot -> {}", plot.display());
                }
            }
            Ok(())
        }
        Command::Embed {
            model,
            input,
            out,
            flip_sum,
            resize,
        } => {
            init_logging(None);
            let (batch_size, embedding_dim) = (model.batch_size, model.embedding_dim);
            let (model, device) = model.load()?;
            let faces = tools::faces_of(&input, resize)?;
            let embedded = qud_eval::embed(&model, &faces, batch_size, flip_sum, &device);
            qud_eval::write_npy(&out, &embedded.raw).with_context(|| out.display().to_string())?;
            println!(
                "{} embeddings of size {embedding_dim} -> {}",
                embedded.raw.len(),
                out.display()
            );
            Ok(())
        }
        Command::Pack {
            folder,
            prefix,
            resize,
            quality,
        } => {
            init_logging(None);
            tools::pack(&folder, &prefix, resize, quality)
        }
        Command::Synth {
            out,
            identities,
            images,
            seed,
            quality,
            pairs,
            pair_identities,
        } => {
            init_logging(None);
            tools::synth(
                &out,
                identities,
                images,
                seed,
                quality,
                pairs.as_deref().map(|p| (p, pair_identities)),
            )
        }
        Command::Inspect {
            arch,
            embedding_dim,
        } => {
            let device = qud_backends::device("flex", "cpu")?;
            let spec = qud_models::BackboneSpec {
                embedding_dim,
                dropout: 0.0,
            };
            let model = qud_models::create(&arch, &spec, &device)?;
            println!(
                "{arch}: {} parameters, {:.3} GMACs at 112x112, embedding {embedding_dim}",
                qud_backbone::num_parameters(&model),
                qud_backbone::Backbone::macs(&model) as f64 / 1e9
            );
            Ok(())
        }
        Command::List => {
            for p in qud_backends::compiled() {
                println!(
                    "backend {:8} devices: {:40} {}",
                    p.name, p.accepted_devices, p.summary
                );
            }
            println!("architectures: {}", qud_models::names().join(", "));
            Ok(())
        }
    }
}
