//! Everything a run is built from: the dataset, the student, the frozen teacher, the eval sets.

use crate::objective::ArcFaceHead;
use crate::teacher_cache::{dataset_key, teacher_key, CacheError, CacheKey, TeacherCache};
use crate::TrainError;
use burn::module::Module;
use burn::prelude::*;
use qud_backbone::{Backbone, FaceEmbedder};
use qud_config::{
    CacheDtype, CacheFingerprint, CacheMode, Config, DataFormat, MethodKind, WeightFormat,
};
use qud_data::{ConcatDataset, FaceDataset, FingerprintMode, Fnv, SyntheticFaces};
use qud_eval::PairSet;
use qud_models::{AnyBackbone, BackboneSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The trained network: the backbone, plus the class centres when the method is ArcFace.
#[derive(Module, Debug)]
pub struct Student {
    pub backbone: AnyBackbone,
    pub head: Option<ArcFaceHead>,
}

/// Burn's random initialisers draw from one generator per backend, shared by every thread of the
/// process. Seeding it and building the models happen under this lock, so that a run's initial
/// weights depend on `run.seed` only, also when several runs share a process (tests).
static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seed `device`'s generator and run `build` with nobody else drawing from it meanwhile.
pub fn seeded<T>(device: &Device, seed: u64, build: impl FnOnce() -> T) -> T {
    let _guard = INIT_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    build()
}

/// Burn parameters initialise lazily, on first use; draw every value now (under [`seeded`]).
pub fn initialize_now<M: Module>(module: M) -> M {
    struct Touch;
    impl burn::module::ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
    module
}

/// The training set the config names: `data.root`, followed by `data.extra_roots` when given.
pub fn open_dataset(config: &Config) -> Result<Arc<dyn FaceDataset>, TrainError> {
    let data = &config.data;
    if data.format == DataFormat::Synthetic
        || data.root.is_none() && data.format == DataFormat::Auto
    {
        if !data.extra_roots.is_empty() {
            return Err(TrainError::Config {
                key: "data.extra_roots",
                reason: "needs data.root (it lists sources read after it)".into(),
            });
        }
        return Ok(Arc::new(SyntheticFaces::new(
            data.synthetic_identities,
            data.synthetic_images_per_identity,
            config.run.seed,
        )));
    }
    let root = data.root.as_deref().ok_or_else(|| TrainError::Config {
        key: "data.root",
        reason: "is required unless data.format = \"synthetic\"".into(),
    })?;
    let mut parts = Vec::new();
    for path in std::iter::once(root).chain(data.extra_roots.iter().map(PathBuf::as_path)) {
        parts.push(open_source(path, data.format, data.resize)?);
    }
    Ok(if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Arc::new(ConcatDataset::new(parts))
    })
}

/// One source of the training set, through the one format table (`qud_data::open`).
fn open_source(
    path: &Path,
    format: DataFormat,
    resize: bool,
) -> Result<Arc<dyn FaceDataset>, TrainError> {
    let format = match format {
        DataFormat::Folder => qud_data::SourceFormat::Folder,
        DataFormat::Recordio => qud_data::SourceFormat::Recordio,
        DataFormat::Auto | DataFormat::Synthetic => qud_data::SourceFormat::Auto,
    };
    Ok(qud_data::open(path, format, resize)?)
}

fn spec(embedding_dim: usize) -> BackboneSpec {
    BackboneSpec {
        embedding_dim,
        dropout: 0.0,
    }
}

/// A fresh student (and ArcFace head) on the training device.
pub(crate) fn build_student(
    config: &Config,
    classes: Option<usize>,
    device: &Device,
) -> Result<Student, TrainError> {
    if qud_models::TEACHER_ONLY.contains(&config.student.arch.trim().to_ascii_lowercase().as_str())
    {
        return Err(TrainError::Config {
            key: "student.arch",
            reason: format!(
                "{} is a teacher here: its training-time patch masking and drop path are not \
                 built, so it would not train as the reference does",
                config.student.arch
            ),
        });
    }
    let backbone = qud_models::create(
        &config.student.arch,
        &spec(config.student.embedding_dim),
        device,
    )
    .map_err(|e| TrainError::Config {
        key: "student.arch",
        reason: e.to_string(),
    })?;
    let backbone = match &config.student.init_weights {
        Some(path) => qud_models::load_weights(backbone, path)?,
        None => backbone,
    };
    let head = match config.method.kind {
        MethodKind::Arcface => {
            let classes = classes.ok_or(TrainError::NoLabels("the training set has none"))?;
            Some(ArcFaceHead::new(
                classes,
                config.student.embedding_dim,
                device,
            ))
        }
        _ => None,
    };
    Ok(Student { backbone, head })
}

/// The frozen teacher: one of qud's backbones (eval mode, plain device, never in the optimizer)
/// or an ONNX face model run by tract on the CPU.
#[derive(Debug)]
pub enum Teacher {
    Backbone(Box<AnyBackbone>),
    Onnx(qud_onnx::OnnxFaceModel),
}

impl Teacher {
    /// The teacher for another data-parallel device: a copy of a backbone teacher there; `None`
    /// when this one serves every device (an ONNX model runs on the host whatever the device).
    pub(crate) fn replica(&self, device: &Device) -> Option<Teacher> {
        match self {
            // `valid()` gives the copy running-state cells of its own.
            Teacher::Backbone(model) => {
                Some(Teacher::Backbone(Box::new(model.valid().to_device(device))))
            }
            Teacher::Onnx(_) => None,
        }
    }
}

impl FaceEmbedder for Teacher {
    fn embed_faces(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Teacher::Backbone(model) => model.forward(images),
            Teacher::Onnx(model) => model.embed_faces(images),
        }
    }
    fn output_dim(&self) -> usize {
        match self {
            Teacher::Backbone(model) => model.embedding_dim(),
            Teacher::Onnx(model) => model.output_dim(),
        }
    }
}

/// Whether `teacher` names an ONNX model: `format = "onnx"`, or `auto` with a `.onnx` file.
fn is_onnx(t: &qud_config::TeacherConfig) -> bool {
    match t.format {
        WeightFormat::Onnx => true,
        WeightFormat::Auto => t
            .weights
            .as_deref()
            .and_then(|p| p.extension())
            .is_some_and(|e| e.eq_ignore_ascii_case("onnx")),
        _ => false,
    }
}

/// The frozen teacher the config names. Backbones are built on `device` in eval mode (draw
/// random weights under [`seeded`]); ONNX models are loaded with `teacher.onnx`'s contract.
pub(crate) fn build_teacher(config: &Config, device: &Device) -> Result<Teacher, TrainError> {
    let t = &config.teacher;
    let teacher = if is_onnx(t) {
        let path = t.weights.as_deref().ok_or_else(|| TrainError::Config {
            key: "teacher.weights",
            reason: "teacher.format = \"onnx\" needs the .onnx file".into(),
        })?;
        let model = qud_onnx::OnnxFaceModel::load(path, &t.onnx)?;
        tracing::info!(
            "ONNX teacher {} ({} image(s) per run, {}-d output)",
            path.display(),
            model.batch(),
            model.output_dim()
        );
        Teacher::Onnx(model)
    } else {
        let model = qud_models::create(&t.arch, &spec(t.embedding_dim), device).map_err(|e| {
            TrainError::Config {
                key: "teacher.arch",
                reason: e.to_string(),
            }
        })?;
        let model = match (&t.weights, t.allow_random) {
            (Some(path), _) => qud_models::load_weights(model, path)?,
            (None, true) => model,
            (None, false) => {
                return Err(TrainError::Config {
                    key: "teacher.weights",
                    reason: "is required: a randomly initialised teacher teaches nothing (set \
                             teacher.allow_random = true only in tests)"
                        .into(),
                })
            }
        };
        let mut model = initialize_now(model).valid();
        model.fold_batchnorm();
        Teacher::Backbone(Box::new(model))
    };
    if teacher.output_dim() != config.student.embedding_dim {
        return Err(TrainError::EmbeddingMismatch {
            teacher: teacher.output_dim(),
            student: config.student.embedding_dim,
        });
    }
    Ok(teacher)
}

/// The teacher's identity for the cache key: the architecture (or the ONNX input contract) and
/// the weight file's length and CRC-32.
fn teacher_identity(config: &Config) -> Result<u64, TrainError> {
    let t = &config.teacher;
    let arch = if is_onnx(t) {
        let o = &t.onnx;
        format!(
            "onnx size {} {:?} {:?} mean {:?} std {:?}",
            o.size, o.channels, o.layout, o.mean, o.std
        )
    } else {
        t.arch.clone()
    };
    Ok(teacher_key(
        &arch,
        t.embedding_dim,
        t.weights.as_deref(),
        config.run.seed,
    )?)
}

/// The teacher-feature cache for this config's dataset and teacher (`teacher.cache`): opened when
/// one with a matching key and intact checksums exists, otherwise built (auto) or refused
/// (require). `None` when the cache is off or the method has no teacher.
pub(crate) fn teacher_cache(
    config: &Config,
    dataset: &dyn FaceDataset,
    teacher: &Teacher,
    device: &Device,
) -> Result<Option<TeacherCache>, TrainError> {
    let t = &config.teacher;
    if t.cache == CacheMode::Off || config.method.kind == MethodKind::Arcface {
        return Ok(None);
    }
    // The cache holds both flips of every face; a face augmented otherwise is seen once, so the
    // teacher runs on it every step (validation refuses `require` with augmentation on).
    if config.data.augment.is_active() {
        tracing::info!(
            "data.augment is on: the teacher runs every step on the augmented faces (no cache)"
        );
        return Ok(None);
    }
    let key = CacheKey {
        teacher: teacher_identity(config)?,
        dataset: dataset_key(
            dataset,
            match t.cache_fingerprint {
                CacheFingerprint::Content => FingerprintMode::Content,
                CacheFingerprint::Metadata => FingerprintMode::Metadata,
            },
        )?,
        preprocessing: Fnv::default()
            .bytes(b"rgb u8 -> (x/255 - 0.5)/0.5, NCHW, flip = mirror width; l2-normalised")
            .u64(u64::from(config.data.resize))
            .finish(),
    };
    let dir = t.cache_dir.clone().unwrap_or_else(|| {
        config
            .run
            .output_dir
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("teacher-cache")
    });
    let dtype = match t.cache_dtype {
        CacheDtype::F32 => "f32",
        CacheDtype::F16 => "f16",
    };
    let path = dir.join(format!(
        "{:016x}-{:016x}-{dtype}.qtc",
        key.teacher, key.dataset
    ));
    let dim = teacher.output_dim();
    match TeacherCache::open(&path, key, dim, t.cache_dtype, dataset.len()) {
        Ok(cache) => {
            tracing::info!("teacher features from the cache {}", path.display());
            return Ok(Some(cache));
        }
        Err(e) if t.cache == CacheMode::Require => {
            return Err(TrainError::Config {
                key: "teacher.cache",
                reason: format!(
                    "\"require\": {e}; build it with `qud cache-teacher --config FILE`"
                ),
            })
        }
        Err(CacheError::Missing(_)) => {
            tracing::info!("building the teacher cache {}", path.display())
        }
        Err(e @ (CacheError::KeyMismatch { .. } | CacheError::Corrupt { .. })) => {
            tracing::warn!("{e}; rebuilding it")
        }
        Err(e) => return Err(e.into()),
    }
    let cache = TeacherCache::build(
        &path,
        key,
        t.cache_dtype,
        dataset,
        teacher,
        device,
        config.eval.batch_size,
        config.data.workers.max(1),
    )?;
    Ok(Some(cache))
}

/// The device a run computes on: the first of `run.devices` (default `cpu`) on `run.backend`.
pub(crate) fn run_device(config: &Config) -> Result<Device, TrainError> {
    let name = config.run.devices.first().map_or("cpu", String::as_str);
    open_device(&config.run.backend, name)
}

/// The device `name` of `backend`, with a warning in the log where the backend knows the device
/// to compute some kernels wrongly (lavapipe's loop limit).
fn open_device(backend: &str, name: &str) -> Result<Device, TrainError> {
    let device = qud_backends::device(backend, name)?;
    if let Some(caveat) = qud_backends::caveat(backend, &device) {
        tracing::warn!("run.backend={backend:?}, device {name}: {caveat}");
    }
    Ok(device)
}

/// How the run draws its batches: the global batch, shuffled and flipped from the seed; data
/// parallelism cuts each batch into per-device pieces afterwards.
pub(crate) fn loader_options(config: &Config) -> qud_data::LoaderOptions {
    qud_data::LoaderOptions {
        batch_size: config.optim.batch_size,
        shuffle: true,
        flip_prob: config.data.flip_prob,
        seed: config.run.seed,
        drop_last: true,
        workers: config.data.workers,
        prefetch: config.data.prefetch,
        rank: 0,
        world: 1,
        skip_bad_samples: config.data.on_bad_sample == qud_config::OnBadSample::Skip,
        augment: augment(&config.data.augment),
    }
}

fn augment(a: &qud_config::AugmentConfig) -> qud_data::Augment {
    qud_data::Augment {
        zoom_min: a.zoom_min,
        max_shift: a.max_shift,
        brightness: a.brightness,
        contrast: a.contrast,
        saturation: a.saturation,
        grayscale_prob: a.grayscale_prob,
    }
}

/// Every device of `run.devices`, in rank order; the first is the main one.
pub(crate) fn run_devices(config: &Config) -> Result<Vec<Device>, TrainError> {
    if config.run.devices.is_empty() {
        return Ok(vec![run_device(config)?]);
    }
    config
        .run
        .devices
        .iter()
        .map(|name| open_device(&config.run.backend, name))
        .collect()
}

/// `qud cache-teacher`: make sure the cache of `config` exists and is intact; returns its path.
pub fn prepare_teacher_cache(config: &Config) -> Result<std::path::PathBuf, TrainError> {
    let device = run_device(config)?;
    let dataset = open_dataset(config)?;
    let teacher = seeded(&device, config.run.seed, || build_teacher(config, &device))?;
    let mut config = config.clone();
    if config.teacher.cache == CacheMode::Off {
        config.teacher.cache = CacheMode::Auto;
    }
    if config.method.kind == MethodKind::Arcface {
        return Err(TrainError::Config {
            key: "method.kind",
            reason: "\"arcface\" has no teacher to cache".into(),
        });
    }
    let cache =
        teacher_cache(&config, dataset.as_ref(), &teacher, &device)?.expect("the cache is on");
    Ok(cache.path().to_path_buf())
}

/// The verification sets of `eval.targets` found in `eval.dir`; missing ones are named in a warning.
pub(crate) fn eval_sets(config: &Config) -> Result<Vec<PairSet>, TrainError> {
    let Some(dir) = &config.eval.dir else {
        return Ok(Vec::new());
    };
    let mut sets = Vec::new();
    let mut missing = Vec::new();
    for target in &config.eval.targets {
        let path = dir.join(format!("{target}.bin"));
        if path.is_file() {
            sets.push(PairSet::load_scorable(&path)?);
        } else {
            missing.push(target.as_str());
        }
    }
    if !missing.is_empty() {
        tracing::warn!(
            "eval sets not found in {}: {}",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(sets)
}
