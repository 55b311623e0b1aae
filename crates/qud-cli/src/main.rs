//! `qud`: train (any config, or the embedded demo), evaluate and inspect face models.

mod demo;
mod ident;
mod tools;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use clap::{Parser, Subcommand};
use qud_backbone::{Backbone, FaceEmbedder};
use qud_config::ConfigLoader;
use std::path::PathBuf;

/// A count option that must be at least `min`: clap refuses smaller values, naming the option,
/// before anything runs (a 0 here used to panic deep inside).
fn at_least(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..)
}

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
    Train(TrainArgs),
    /// Build (or verify) the teacher-feature cache a config's run will read, before training.
    CacheTeacher(CacheTeacherArgs),
    /// The embedded default: synthetic faces, an ArcFace teacher, a QUD student, evaluation.
    Demo(DemoArgs),
    /// Score a backbone on verification .bin sets (flip TTA, 10 folds, as insightface), or score
    /// embeddings made anywhere (`--embeddings emb.npy --issame issame.npy|.txt`).
    Eval(EvalArgs),
    /// IJB-B / IJB-C 1:1 template verification as insightface evaluates it: TAR at FAR 1e-6 ..
    /// 1e-1 over `<root>/meta/<set>_*.txt` and `<root>/loose_crop/`.
    EvalIjb(EvalIjbArgs),
    /// 1:N identification as MegaFace scores it: rank-1 identification rate and TAR at FAR of
    /// probes against a gallery padded with distractors. Each set is an image set (identity
    /// folders, a .rec; distractors need no identities) embedded by the model, or .npy embeddings.
    EvalIdent(EvalIdentArgs),
    /// Embed faces (an image folder, a RecordIO .rec or a .bin) and write float32 [N, D] rows in
    /// input order (.npy).
    Embed(EmbedArgs),
    /// Pack an image folder (identity sub-folders, or flat and unlabelled) into insightface
    /// RecordIO: `<prefix>.rec` + `<prefix>.idx`.
    Pack(PackArgs),
    /// Write synthetic faces (a folder, or RecordIO when OUT ends in .rec) and optionally a
    /// verification .bin of held-out synthetic identities.
    Synth(SynthArgs),
    /// Export a registered backbone and its weights (or a training checkpoint's student) to
    /// ONNX (opset 13+: BatchNorms folded, a dynamic batch, input `input` [N, 3, 112, 112] RGB in
    /// [-1, 1], output `embedding` [N, D] unnormalised, the contract and the source weights in
    /// the metadata) and/or to safetensors with PyTorch's key names.
    Export(ExportArgs),
    /// Parameters (as PyTorch counts them) and multiply-accumulates at 112x112 of an architecture.
    Inspect(InspectArgs),
    /// The compiled backends and the registered architectures.
    List,
}

#[derive(clap::Args)]
struct TrainArgs {
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
}

#[derive(clap::Args)]
struct CacheTeacherArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args)]
struct DemoArgs {
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args)]
struct EvalArgs {
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
}

#[derive(clap::Args)]
struct EvalIjbArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The set's folder: `meta/` and `loose_crop/`.
    #[arg(long)]
    root: PathBuf,
    #[arg(long, value_parser = ["ijbb", "ijbc"])]
    set: String,
    /// Also write the scores as JSON and the ROC (`roc_<set>.svg`) beside it.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Per-image embeddings (.npy): read when the file exists, written after embedding
    /// otherwise; re-scoring with other switches then skips the network.
    #[arg(long)]
    embeddings: Option<PathBuf>,
    /// Embed images only, not f(x) + f(flipped x).
    #[arg(long)]
    no_flip: bool,
    /// L2-normalise each image's feature before pooling (insightface's use_norm_score off).
    #[arg(long)]
    no_norm_score: bool,
    /// Do not weight image features by their detector score.
    #[arg(long)]
    no_detector_score: bool,
}

#[derive(clap::Args)]
struct EvalIdentArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Probe faces: identity folders, a labelled .rec, or any set with --probe-labels
    /// ([N, D] .npy embeddings included).
    #[arg(long)]
    probe: PathBuf,
    /// One identity per line, in the probe set's order (needed for .npy and flat folders).
    #[arg(long)]
    probe_labels: Option<PathBuf>,
    /// Gallery faces, as --probe; without it the probes are their own gallery (MegaFace's
    /// FaceScrub protocol: each face against every other face of its identity).
    #[arg(long)]
    gallery: Option<PathBuf>,
    #[arg(long, requires = "gallery")]
    gallery_labels: Option<PathBuf>,
    /// The distractor set: any image set or .npy, streamed --block faces at a time.
    #[arg(long)]
    distractors: PathBuf,
    /// A list of faces to leave out (repeatable; insightface's MegaFace noise lists): one name
    /// per line, `identity/file.jpg` or a file name for image folders, a row index otherwise.
    #[arg(long)]
    exclude: Vec<PathBuf>,
    /// False accept rates to report TAR at (repeatable).
    #[arg(long, default_values_t = [1e-6])]
    far: Vec<f64>,
    /// Distractors per matrix product.
    #[arg(long, default_value_t = 8192, value_parser = at_least(1))]
    block: usize,
    /// Embed images only, not f(x) + f(flipped x).
    #[arg(long)]
    no_flip: bool,
    /// Resize images that are not 112x112 instead of refusing them.
    #[arg(long)]
    resize: bool,
    /// Also write the scores as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EmbedArgs {
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
}

#[derive(clap::Args)]
struct PackArgs {
    folder: PathBuf,
    prefix: PathBuf,
    /// Resize images that are not 112x112 (re-encoded as JPEG) instead of refusing them.
    #[arg(long)]
    resize: bool,
    #[arg(long, default_value_t = 95)]
    quality: u8,
}

#[derive(clap::Args)]
struct SynthArgs {
    out: PathBuf,
    #[arg(long, default_value_t = 100, value_parser = at_least(1))]
    identities: usize,
    #[arg(long, default_value_t = 20, value_parser = at_least(1))]
    images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JPEG quality of the faces (insightface packs at 95).
    #[arg(long, default_value_t = 95)]
    quality: u8,
    /// Also write this verification .bin (4 pairs per held-out identity, half genuine).
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Held-out identities of the .bin; impostor pairs need at least 3.
    #[arg(long, default_value_t = 50, value_parser = at_least(3))]
    pair_identities: usize,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Registered architecture (`qud list`).
    #[arg(long, required_unless_present = "checkpoint")]
    arch: Option<String>,
    /// PyTorch state_dict (.pth/.pt) or safetensors with the architecture's key names
    /// (a run's `student.safetensors`).
    #[arg(long, conflicts_with_all = ["random_init", "checkpoint"])]
    weights: Option<PathBuf>,
    /// No weights: the architecture as initialised from this seed.
    #[arg(long, value_name = "SEED", conflicts_with = "checkpoint")]
    random_init: Option<u64>,
    /// A checkpoint directory of a run (`<run>/checkpoints/step-N`), verified and read
    /// with the run's `config.toml`, instead of --arch/--weights.
    #[arg(long, conflicts_with = "arch")]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 512, value_parser = at_least(1))]
    embedding_dim: usize,
    /// The ONNX file to write.
    #[arg(long, required_unless_present = "safetensors")]
    onnx: Option<PathBuf>,
    /// The safetensors file to write (PyTorch key names, loadable by the PyTorch module).
    #[arg(long)]
    safetensors: Option<PathBuf>,
    #[arg(long, default_value_t = qud_onnx::DEFAULT_OPSET)]
    opset: i64,
}

#[derive(clap::Args)]
struct InspectArgs {
    #[arg(long)]
    arch: String,
    #[arg(long, default_value_t = 512, value_parser = at_least(1))]
    embedding_dim: usize,
}

/// The model `eval` and `embed` run: a registered backbone with its weights on a backend, or an
/// ONNX face model (`--onnx`, run by tract on the CPU) with its input contract.
#[derive(clap::Args)]
struct ModelArgs {
    /// Registered architecture (`qud list`).
    #[arg(long, conflicts_with = "onnx")]
    arch: Option<String>,
    /// PyTorch state_dict (.pth/.pt) or safetensors with the architecture's PyTorch key names.
    #[arg(long, conflicts_with_all = ["onnx", "random_init"])]
    weights: Option<PathBuf>,
    /// No weights: the architecture as initialised from this seed (an untrained baseline row).
    #[arg(long, value_name = "SEED", conflicts_with = "onnx")]
    random_init: Option<u64>,
    #[arg(long, default_value_t = 512, value_parser = at_least(1))]
    embedding_dim: usize,
    #[arg(long, default_value_t = 64, value_parser = at_least(1))]
    batch_size: usize,
    #[arg(long, default_value = "flex")]
    backend: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// An ONNX face model instead of --arch/--weights; its input is described by the --onnx-*
    /// flags (defaults: insightface's 112x112 RGB NCHW, (x - 127.5) / 127.5).
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// Side of the model's square input; faces are resized from 112 when it differs.
    #[arg(long, default_value_t = 112)]
    onnx_size: usize,
    #[arg(long, value_enum, default_value_t = Channels::Rgb)]
    onnx_channels: Channels,
    #[arg(long, value_enum, default_value_t = Layout::Nchw)]
    onnx_layout: Layout,
    /// Per-channel mean over 0..=255 pixels, in the model's channel order: one value or three.
    #[arg(long, value_delimiter = ',', default_value = "127.5")]
    onnx_mean: Vec<f64>,
    /// Per-channel std, like --onnx-mean.
    #[arg(long, value_delimiter = ',', default_value = "127.5")]
    onnx_std: Vec<f64>,
    /// Threads running the ONNX model; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    onnx_threads: usize,
    /// Engine for the ONNX model: auto (qud's own runner when it maps every op and agrees with
    /// tract at load, else tract), native or tract.
    #[arg(long, value_enum, default_value_t = Runtime::Auto)]
    onnx_runtime: Runtime,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Channels {
    Rgb,
    Bgr,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Layout {
    Nchw,
    Nhwc,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Runtime {
    Auto,
    Native,
    Tract,
}

impl ModelArgs {
    /// The ONNX input contract the flags describe.
    fn onnx_input(&self) -> Result<qud_config::OnnxInput> {
        let three = |v: &[f64], flag: &str| -> Result<[f64; 3]> {
            if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                bail!("--{flag} must be finite numbers, got {bad}");
            }
            match *v {
                [a] => Ok([a; 3]),
                [a, b, c] => Ok([a, b, c]),
                _ => bail!("--{flag} takes one value or three, got {}", v.len()),
            }
        };
        let std = three(&self.onnx_std, "onnx-std")?;
        if std.contains(&0.0) {
            bail!("--onnx-std must not be 0");
        }
        Ok(qud_config::OnnxInput {
            size: self.onnx_size,
            channels: match self.onnx_channels {
                Channels::Bgr => qud_config::ChannelOrder::Bgr,
                Channels::Rgb => qud_config::ChannelOrder::Rgb,
            },
            layout: match self.onnx_layout {
                Layout::Nhwc => qud_config::InputLayout::Nhwc,
                Layout::Nchw => qud_config::InputLayout::Nchw,
            },
            mean: three(&self.onnx_mean, "onnx-mean")?,
            std,
            threads: self.onnx_threads,
            runtime: match self.onnx_runtime {
                Runtime::Native => qud_config::OnnxRuntime::Native,
                Runtime::Tract => qud_config::OnnxRuntime::Tract,
                Runtime::Auto => qud_config::OnnxRuntime::Auto,
            },
        })
    }

    /// The model in eval mode, its device, and a name for tables.
    fn load(&self) -> Result<(Box<dyn FaceEmbedder>, burn::tensor::Device, String)> {
        let device = qud_backends::device(&self.backend, &self.device)?;
        if let Some(path) = &self.onnx {
            let model = qud_onnx::OnnxFaceModel::load(path, &self.onnx_input()?)?;
            let name = path
                .file_stem()
                .map_or("onnx".into(), |s| s.to_string_lossy().to_string());
            return Ok((Box::new(model), device, name));
        }
        let Some(arch) = &self.arch else {
            bail!("--arch with --weights or --random-init (or --onnx) is required");
        };
        let (mut model, name) = backbone(
            arch,
            self.weights.as_deref(),
            self.random_init,
            self.embedding_dim,
            &device,
        )?;
        model.fold_batchnorm();
        Ok((Box::new(model), device, name))
    }
}

/// Registered backbone `arch` in eval mode with `weights` (or initialised from `random_init`),
/// and a name for tables.
fn backbone(
    arch: &str,
    weights: Option<&std::path::Path>,
    random_init: Option<u64>,
    embedding_dim: usize,
    device: &burn::tensor::Device,
) -> Result<(qud_models::AnyBackbone, String)> {
    let spec = qud_models::BackboneSpec {
        embedding_dim,
        dropout: 0.0,
    };
    let model = match (weights, random_init) {
        (Some(weights), _) => {
            qud_models::load_weights(qud_models::create(arch, &spec, device)?, weights)?
        }
        (None, Some(seed)) => qud_trainer::seeded(device, seed, || {
            qud_models::create(arch, &spec, device).map(qud_trainer::initialize_now)
        })?,
        (None, None) => bail!("--weights or --random-init SEED is required with --arch"),
    };
    let name = match random_init {
        Some(seed) if weights.is_none() => format!("{arch} (random init, seed {seed})"),
        _ => arch.to_string(),
    };
    Ok((model.valid(), name))
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
        Command::Train(args) => args.run(),
        Command::Demo(args) => args.run(),
        Command::CacheTeacher(args) => args.run(),
        Command::Eval(args) => args.run(),
        Command::EvalIjb(args) => args.run(),
        Command::EvalIdent(args) => args.run(),
        Command::Embed(args) => args.run(),
        Command::Pack(args) => args.run(),
        Command::Synth(args) => args.run(),
        Command::Export(args) => args.run(),
        Command::Inspect(args) => args.run(),
        Command::List => list(),
    }
}

impl TrainArgs {
    /// `qud train`.
    fn run(self) -> Result<()> {
        let Self {
            config,
            set,
            resume,
            max_steps,
        } = self;
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
}

impl DemoArgs {
    /// `qud demo`.
    fn run(self) -> Result<()> {
        let Self { set } = self;
        demo::run(&set)
    }
}

impl CacheTeacherArgs {
    /// `qud cache-teacher`.
    fn run(self) -> Result<()> {
        let Self { config, set } = self;
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
}

impl EvalArgs {
    /// `qud eval`.
    fn run(self) -> Result<()> {
        let Self {
            model,
            bins,
            targets,
            embeddings,
            issame,
            json,
        } = self;
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
                let (model, device, name) = model.load()?;
                let mut scores = Vec::new();
                for target in &targets {
                    let path = bins.join(format!("{target}.bin"));
                    if !path.is_file() {
                        tracing::warn!("{} not found, skipped", path.display());
                        continue;
                    }
                    let set = qud_eval::PairSet::load_scorable(&path)?;
                    scores.push(qud_eval::evaluate(&*model, &set, batch_size, &device));
                }
                if scores.is_empty() {
                    bail!("none of {} found in {}", targets.join(", "), bins.display());
                }
                (name, scores)
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
}

impl EvalIjbArgs {
    /// `qud eval-ijb`.
    fn run(self) -> Result<()> {
        let Self {
            model,
            root,
            set,
            json,
            embeddings,
            no_flip,
            no_norm_score,
            no_detector_score,
        } = self;
        init_logging(None);
        let meta = qud_eval::ijb::IjbMeta::load(&root, &set)?;
        tracing::info!(
            "{set}: {} images, {} template pairs",
            meta.images.len(),
            meta.pairs.len()
        );
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (name, features) = match embeddings.as_deref().filter(|p| p.is_file()) {
            Some(path) => {
                let rows = qud_eval::read_npy_rows(path)?;
                if rows.len() != meta.images.len() {
                    bail!(
                        "{}: {} rows, but {set} has {} images",
                        path.display(),
                        rows.len(),
                        meta.images.len()
                    );
                }
                ("embeddings".to_string(), rows)
            }
            None => {
                let batch_size = model.batch_size;
                let (model, device, name) = model.load()?;
                let rows = qud_eval::ijb::embed_ijb(
                    &*model, &root, &meta, batch_size, !no_flip, threads, &device,
                )?;
                if let Some(path) = &embeddings {
                    qud_eval::write_npy(path, &rows).with_context(|| path.display().to_string())?;
                }
                (name, rows)
            }
        };
        let score = qud_eval::ijb::score_ijb(
            &set,
            &meta,
            &features,
            !no_norm_score,
            !no_detector_score,
            threads,
        );
        let header: Vec<String> = score
            .tar_at_far
            .iter()
            .map(|(far, _)| format!("{far:>8.0e}"))
            .collect();
        let values: Vec<String> = score
            .tar_at_far
            .iter()
            .map(|(_, tar)| format!("{:>8.2}", tar * 100.0))
            .collect();
        println!(
            "{set}: {} templates, {} pairs; TAR (%) at FAR\n{:<16}{}\n{:<16}{}",
            score.templates,
            score.pairs,
            "FAR",
            header.join(""),
            name,
            values.join("")
        );
        if let Some(path) = json {
            tools::write_atomic(&path, serde_json::to_string_pretty(&score)?.as_bytes())?;
            let plot = path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(format!("roc_{set}.svg"));
            let title = format!("{set} 1:1 ({} pairs)", score.pairs);
            let svg = qud_eval::roc_svg(&title, &[(name.as_str(), &score.roc)]);
            tools::write_atomic(&plot, svg.as_bytes())?;
            println!(
                "scores -> {}, ROC plot -> {}",
                path.display(),
                plot.display()
            );
        }
        Ok(())
    }
}

impl EvalIdentArgs {
    /// `qud eval-ident`.
    fn run(self) -> Result<()> {
        let Self {
            model,
            probe,
            probe_labels,
            gallery,
            gallery_labels,
            distractors,
            exclude,
            far,
            block,
            no_flip,
            resize,
            json,
        } = self;
        init_logging(None);
        let device = qud_backends::device(&model.backend, &model.device)?;
        let exclude = ident::read_exclusions(&exclude)?;
        let mut embedder =
            ident::Embedder::new(|| model.load(), model.batch_size, !no_flip, resize);
        let probes = ident::labelled_set(
            "probe",
            &probe,
            probe_labels.as_deref(),
            &exclude,
            &mut embedder,
        )?;
        let gallery = gallery
            .map(|g| {
                ident::labelled_set(
                    "gallery",
                    &g,
                    gallery_labels.as_deref(),
                    &exclude,
                    &mut embedder,
                )
            })
            .transpose()?;
        let (count, blocks) =
            ident::distractor_blocks(&distractors, block, &exclude, &mut embedder)?;
        let score =
            qud_eval::ident::identify(&probes, gallery.as_ref(), blocks, count, &far, &device)?;
        ident::report(&score, json.as_deref())
    }
}

impl EmbedArgs {
    /// `qud embed`.
    fn run(self) -> Result<()> {
        let Self {
            model,
            input,
            out,
            flip_sum,
            resize,
        } = self;
        init_logging(None);
        let batch_size = model.batch_size;
        let (model, device, _) = model.load()?;
        let embedding_dim = model.output_dim();
        let faces = tools::faces_of(&input, resize)?;
        let embedded = qud_eval::embed(&*model, &faces, batch_size, flip_sum, &device);
        qud_eval::write_npy(&out, &embedded.raw).with_context(|| out.display().to_string())?;
        println!(
            "{} embeddings of size {embedding_dim} -> {}",
            embedded.raw.len(),
            out.display()
        );
        Ok(())
    }
}

impl PackArgs {
    /// `qud pack`.
    fn run(self) -> Result<()> {
        let Self {
            folder,
            prefix,
            resize,
            quality,
        } = self;
        init_logging(None);
        tools::pack(&folder, &prefix, resize, quality)
    }
}

impl SynthArgs {
    /// `qud synth`.
    fn run(self) -> Result<()> {
        let Self {
            out,
            identities,
            images,
            seed,
            quality,
            pairs,
            pair_identities,
        } = self;
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
}

impl ExportArgs {
    /// `qud export`.
    fn run(self) -> Result<()> {
        let Self {
            arch,
            weights,
            random_init,
            checkpoint,
            embedding_dim,
            onnx,
            safetensors,
            opset,
        } = self;
        let device = qud_backends::device("flex", "cpu")?;
        let (model, name, source) = match (&checkpoint, &arch) {
            (Some(dir), _) => {
                let (model, config) = qud_trainer::checkpoint_student(dir)?;
                let source = qud_onnx::ExportSource::file(&dir.join("student.bpk"))
                    .with_context(|| format!("reading {}", dir.display()))?;
                (model, config.student.arch, source)
            }
            (None, Some(arch)) => {
                let (model, name) = backbone(
                    arch,
                    weights.as_deref(),
                    random_init,
                    embedding_dim,
                    &device,
                )?;
                let source = match &weights {
                    Some(path) => qud_onnx::ExportSource::file(path)
                        .with_context(|| format!("reading {}", path.display()))?,
                    None => qud_onnx::ExportSource {
                        weights: name.clone(),
                        checksum: None,
                    },
                };
                (model, name, source)
            }
            (None, None) => bail!("--arch or --checkpoint is required"),
        };
        if let Some(path) = &safetensors {
            qud_models::save_safetensors(&model, path)?;
            println!("{}: {name}, PyTorch key names", path.display());
        }
        if let Some(path) = &onnx {
            let started = std::time::Instant::now();
            let report = qud_onnx::export_onnx(&model, &source, path, opset)?;
            println!(
                "{}: {name}, {} nodes, {} parameters, {:.1} MB, opset {opset}, in {:.2} s",
                path.display(),
                report.nodes,
                report.parameters,
                report.bytes as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

impl InspectArgs {
    /// `qud inspect`.
    fn run(self) -> Result<()> {
        let Self {
            arch,
            embedding_dim,
        } = self;
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
}

/// `qud list`.
fn list() -> Result<()> {
    for p in qud_backends::compiled() {
        println!(
            "backend {:8} devices: {:40} {}",
            p.name, p.accepted_devices, p.summary
        );
    }
    println!("architectures: {}", qud_models::names().join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::Parser;

    /// `eval-ident` on `.npy` inputs: no model is loaded, and the rows an exclusion list names
    /// (probe rows by index, distractor rows by index) are left out of the scoring.
    #[test]
    fn eval_ident_leaves_out_the_excluded_rows() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../qud-eval/fixtures/ident");
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("noise.txt");
        std::fs::write(&list, "# noise\n0\n1\n2\n\n1999\n").unwrap();
        let exclude = crate::ident::read_exclusions(&[list]).unwrap();
        let mut embedder = crate::ident::Embedder::new(
            || anyhow::bail!("no model for .npy inputs"),
            64,
            true,
            false,
        );
        let probes = crate::ident::labelled_set(
            "probe",
            &fixtures.join("probes.npy"),
            Some(&fixtures.join("probe_labels.txt")),
            &exclude,
            &mut embedder,
        )
        .unwrap();
        assert_eq!(probes.len(), 57);
        assert!(
            !probes.labels.contains(&"id00".to_string()),
            "rows 0-2 are id00's"
        );
        let (count, blocks) = crate::ident::distractor_blocks(
            &fixtures.join("distractors.npy"),
            300,
            &exclude,
            &mut embedder,
        )
        .unwrap();
        assert_eq!(count, 1996);
        let device = qud_backends::device("flex", "cpu").unwrap();
        let score =
            qud_eval::ident::identify(&probes, None, blocks, count, &[1e-3], &device).unwrap();
        assert_eq!(score.distractors, 1996);
        assert_eq!(score.trials, 19 * 3 * 2);

        // Without labels a .npy probe set is refused, naming the flag.
        let err = crate::ident::labelled_set(
            "probe",
            &fixtures.join("probes.npy"),
            None,
            &exclude,
            &mut embedder,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--probe-labels"), "{err}");
    }

    /// Counts that used to panic inside (issue 31) are refused by the parser, naming the option.
    #[test]
    fn counts_below_their_minimum_are_refused_by_name() {
        for (args, option) in [
            (
                &["qud", "synth", "out", "--identities", "0"][..],
                "--identities",
            ),
            (&["qud", "synth", "out", "--images", "0"][..], "--images"),
            (
                &["qud", "synth", "out", "--pair-identities", "2"][..],
                "--pair-identities",
            ),
            (
                &[
                    "qud",
                    "inspect",
                    "--arch",
                    "mobilefacenet",
                    "--embedding-dim",
                    "0",
                ][..],
                "--embedding-dim",
            ),
            (
                &[
                    "qud",
                    "embed",
                    "--arch",
                    "mobilefacenet",
                    "--random-init",
                    "0",
                    "--embedding-dim",
                    "0",
                    "--input",
                    "in",
                    "--out",
                    "out.npy",
                ][..],
                "--embedding-dim",
            ),
        ] {
            let err = Cli::try_parse_from(args)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(option), "{args:?}: {err}");
        }
        assert!(Cli::try_parse_from(["qud", "synth", "out", "--pair-identities", "3"]).is_ok());
    }

    /// A non-finite ONNX input contract (it once wrote NaN embeddings with exit 0) is refused.
    #[test]
    fn non_finite_onnx_contracts_are_refused() {
        for (flag, value) in [
            ("--onnx-mean", "nan"),
            ("--onnx-std", "inf"),
            ("--onnx-std", "0"),
        ] {
            let cli = Cli::try_parse_from([
                "qud", "embed", "--onnx", "m.onnx", "--input", "in", "--out", "o.npy", flag, value,
            ])
            .unwrap();
            let super::Command::Embed(embed) = cli.command else {
                panic!("parsed as embed");
            };
            let err = embed.model.onnx_input().unwrap_err().to_string();
            assert!(err.contains(&flag[2..]), "{flag} {value}: {err}");
        }
    }
}
