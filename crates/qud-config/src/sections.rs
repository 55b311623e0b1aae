//! The sections of a run's configuration, with the paper's values as defaults.
//!
//! Defaults are the training setup of QUD (Kolf, Damer, Boutros, BMVC 2024): tau 0.1, n 1024, SGD
//! lr 0.1 at batch 512, momentum 0.9, weight decay 5e-4, clip 5, MS1MV2 schedule of 26 epochs with
//! milestones 8, 14, 20, 25.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A whole run: every section the trainer, the data pipeline and the evaluator read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data: DataConfig,
    pub teacher: TeacherConfig,
    pub student: StudentConfig,
    pub method: MethodConfig,
    pub optim: OptimConfig,
    pub eval: EvalConfig,
    pub run: RunConfig,
}

/// Where the training faces come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Decide from `root`: a `.rec` file or a prefix with `.rec`/`.idx` is RecordIO, a directory
    /// is an image folder.
    Auto,
    /// insightface RecordIO (`train.rec` + `train.idx`).
    Recordio,
    /// `root/<identity>/*.jpg|png`, or a flat folder of unlabelled images.
    Folder,
    /// Procedurally generated faces (no files needed): the embedded demo.
    Synthetic,
}

/// What to do with a training sample that cannot be decoded (corrupt image, wrong size, damaged
/// record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadSample {
    /// Leave it out of its batch, log it once and count it in the epoch summary.
    Skip,
    /// Stop the run with an error naming the sample.
    Fail,
}

/// `[data]`: the training set and its augmentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub format: DataFormat,
    /// File or directory of the training set; unused for `synthetic`.
    pub root: Option<PathBuf>,
    /// More image folders or `.rec` files of the same format, appended after `root` in this order
    /// (one training set from several sources).
    pub extra_roots: Vec<PathBuf>,
    /// Resize images that are not 112x112 instead of refusing them.
    pub resize: bool,
    /// Probability of a horizontal flip per sample (the paper's only augmentation).
    pub flip_prob: f64,
    /// Decoding worker threads; 0 = one per core.
    pub workers: usize,
    /// Batches decoded ahead of the training step.
    pub prefetch: usize,
    /// A sample that cannot be decoded: `skip` (counted) or `fail`.
    pub on_bad_sample: OnBadSample,
    /// Identities of the synthetic set.
    pub synthetic_identities: usize,
    /// Images per identity of the synthetic set.
    pub synthetic_images_per_identity: usize,
    /// Augmentations beyond the flip; any of them makes the teacher run every step.
    pub augment: AugmentConfig,
}

/// `[data.augment]`: augmentations beyond the flip (`qud_data::Augment`), off by default (the
/// paper flips only). The teacher sees the same augmented face as the student, so with any of
/// them on the teacher runs every step: `teacher.cache = "require"` is refused, `"auto"` builds
/// no cache.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Smallest side of a random crop, as a fraction of the face, scaled back to 112 (1 = off).
    pub zoom_min: f64,
    /// Largest shift of the crop's centre, in pixels, each axis.
    pub max_shift: f64,
    /// Brightness factor in [1 - b, 1 + b].
    pub brightness: f64,
    /// Contrast factor in [1 - c, 1 + c].
    pub contrast: f64,
    /// Saturation factor in [1 - s, 1 + s].
    pub saturation: f64,
    /// Probability of a grayscale face.
    pub grayscale_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            zoom_min: 1.0,
            max_shift: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            grayscale_prob: 0.0,
        }
    }
}

impl AugmentConfig {
    /// Whether any augmentation is on.
    pub fn is_active(&self) -> bool {
        *self != Self::default()
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: DataFormat::Auto,
            root: None,
            extra_roots: Vec::new(),
            resize: false,
            flip_prob: 0.5,
            workers: 0,
            prefetch: 4,
            on_bad_sample: OnBadSample::Skip,
            synthetic_identities: 64,
            synthetic_images_per_identity: 16,
            augment: AugmentConfig::default(),
        }
    }
}

/// Format of a teacher's weight file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// From the file extension.
    Auto,
    /// A PyTorch `state_dict` saved with `torch.save`.
    Pth,
    Safetensors,
    Onnx,
}

/// Use of the teacher-feature cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Build on first use, reuse afterwards.
    Auto,
    Off,
    /// Refuse to train without a matching cache.
    Require,
}

/// Storage precision of cached teacher features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDtype {
    F32,
    F16,
}

/// How the teacher cache recognises its training set (`teacher.cache_fingerprint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheFingerprint {
    Content,
    Metadata,
}

/// `[teacher]`: the frozen, pretrained network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherConfig {
    /// Registry name of the architecture (ignored for ONNX teachers).
    pub arch: String,
    /// The weight file (`.pth`, `.safetensors`) or the ONNX model (`.onnx`); `path` is accepted
    /// as another name for it.
    #[serde(alias = "path")]
    pub weights: Option<PathBuf>,
    pub format: WeightFormat,
    pub embedding_dim: usize,
    /// Permit a randomly initialised teacher (tests only).
    pub allow_random: bool,
    pub cache: CacheMode,
    pub cache_dtype: CacheDtype,
    /// Where caches live; default `<run.output_dir>/../teacher-cache`, shared by sibling runs.
    pub cache_dir: Option<PathBuf>,
    /// What the cache key reads of the training files: `content` (every byte, at disk speed)
    /// or `metadata` (sizes and modification times: for sets too large to read at each start;
    /// an edit that keeps a file's size and time goes unseen).
    pub cache_fingerprint: CacheFingerprint,
    /// Superseded by `cache_fingerprint` (it chose between 64 sampled images and all of them;
    /// every fingerprint now covers every file): still read, so the `config.toml` of earlier
    /// runs loads, and never written.
    #[serde(skip_serializing)]
    pub cache_full_hash: Option<bool>,
    /// What an ONNX teacher (`format = "onnx"`) expects as input.
    pub onnx: OnnxInput,
}

/// Channel order of an ONNX model's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// Memory layout of an ONNX model's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputLayout {
    Nchw,
    Nhwc,
}

/// Which engine runs an ONNX face model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnnxRuntime {
    /// qud's own runner when every op of the graph is one it maps (the common face-model ops:
    /// Conv, BatchNormalization, PRelu, Add, Gemm, ...) and it agrees with tract on a probe
    /// batch at load; tract otherwise.
    #[default]
    Auto,
    /// qud's own runner (Burn on the flex CPU device with qud's CPU kernels); an error for a
    /// graph it cannot run.
    Native,
    /// tract, the general ONNX runtime.
    Tract,
}

/// The input contract of an ONNX face model: a `size` x `size` face in `channels` order and
/// `layout`, each channel given as `(pixel - mean) / std` with pixels in 0..=255. The defaults
/// are insightface's ArcFace exports (RGB, NCHW, (x - 127.5) / 127.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnnxInput {
    pub size: usize,
    pub channels: ChannelOrder,
    pub layout: InputLayout,
    /// Per channel, in the model's channel order.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Threads running the model; 0 = one per core.
    pub threads: usize,
    /// Which engine runs the graph.
    pub runtime: OnnxRuntime,
}

impl Default for OnnxInput {
    fn default() -> Self {
        Self {
            size: 112,
            channels: ChannelOrder::Rgb,
            layout: InputLayout::Nchw,
            mean: [127.5; 3],
            std: [127.5; 3],
            threads: 0,
            runtime: OnnxRuntime::Auto,
        }
    }
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            arch: "iresnet50".into(),
            weights: None,
            format: WeightFormat::Auto,
            embedding_dim: 512,
            allow_random: false,
            cache: CacheMode::Auto,
            cache_dtype: CacheDtype::F32,
            cache_dir: None,
            cache_fingerprint: CacheFingerprint::Content,
            cache_full_hash: None,
            onnx: OnnxInput::default(),
        }
    }
}

/// `[student]`: the network being trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StudentConfig {
    pub arch: String,
    pub embedding_dim: usize,
    /// Start from these weights instead of a fresh initialisation.
    pub init_weights: Option<PathBuf>,
}

impl Default for StudentConfig {
    fn default() -> Self {
        Self {
            arch: "mobilefacenet".into(),
            embedding_dim: 512,
            init_weights: None,
        }
    }
}

/// The training objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// InfoNCE against the teacher's feature and a queue of earlier teacher features.
    Qud,
    /// MSE between normalised student and teacher features (feature-KD baseline).
    Mse,
    /// Supervised additive angular margin (teachers and no-KD baselines).
    Arcface,
}

/// How the queue replaces rows once it is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// Overwrite the oldest row.
    Fifo,
    /// Replace the most cosine-similar row.
    Simq,
    /// Replace the least cosine-similar row.
    Dissimq,
}

/// `[method]`: what is optimised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodConfig {
    pub kind: MethodKind,
    /// InfoNCE temperature.
    pub tau: f64,
    /// Number of negatives held in the queue.
    pub queue_size: usize,
    pub queue_kind: QueueKind,
    /// ArcFace additive angular margin.
    pub margin: f64,
    /// ArcFace logit scale.
    pub scale: f64,
    /// Factor on the MSE loss. PyTorch's `MSELoss()` averages over the embedding's dimensions
    /// too, which on unit vectors makes gradients of about 1e-2 at the start; `embedding_dim`
    /// (512) makes it the per-sample squared distance `2 - 2 cos`.
    pub mse_scale: f64,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            kind: MethodKind::Qud,
            tau: 0.1,
            queue_size: 1024,
            queue_kind: QueueKind::Fifo,
            margin: 0.5,
            scale: 64.0,
            mse_scale: 1.0,
        }
    }
}

/// `[optim]`: SGD and its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Learning rate at `lr_batch_size`; the run uses `lr * batch_size / lr_batch_size`.
    pub lr: f64,
    pub lr_batch_size: usize,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Total batch over all devices.
    pub batch_size: usize,
    pub epochs: usize,
    /// Epochs (counted from 1) after which the LR is divided by 10.
    pub lr_milestones: Vec<usize>,
    pub warmup_epochs: f64,
    /// Global gradient L2-norm bound; 0 disables clipping.
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            lr_batch_size: 512,
            momentum: 0.9,
            weight_decay: 5e-4,
            batch_size: 512,
            epochs: 26,
            lr_milestones: vec![8, 14, 20, 25],
            warmup_epochs: 0.0,
            grad_clip: 5.0,
        }
    }
}

impl OptimConfig {
    /// The learning rate actually used at epoch 0: `lr` scaled linearly with the batch.
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / self.lr_batch_size as f64
    }

    /// Step decay as the reference: `lr0 * 0.1^(#milestones m with m - 1 <= epoch)`, epoch from 0.
    pub fn lr_at_epoch(&self, epoch: usize) -> f64 {
        let passed = self
            .lr_milestones
            .iter()
            .filter(|&&m| m as i64 - 1 <= epoch as i64)
            .count();
        self.scaled_lr() * 0.1f64.powi(passed as i32)
    }
}

/// `[eval]`: verification during and after training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Directory holding `lfw.bin`, `cfp_fp.bin`, ...
    pub dir: Option<PathBuf>,
    pub targets: Vec<String>,
    /// Evaluate every this many steps; 0 = never by steps.
    pub every_steps: usize,
    /// Evaluate at the end of every this many epochs, and always after the last; 0 = after the
    /// last epoch only.
    pub every_epochs: usize,
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            dir: None,
            targets: ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]
                .map(String::from)
                .to_vec(),
            every_steps: 2000,
            every_epochs: 1,
            batch_size: 128,
        }
    }
}

/// Numeric precision of training: `f16` / `bf16` run the student's forward and backward in that
/// dtype over f32 master weights (loss, queue, teacher, BatchNorm and optimizer state in f32;
/// f16 with dynamic loss scaling). qud-trainer's `precision` module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

/// `[run]`: where outputs go and how the run is executed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub output_dir: PathBuf,
    pub seed: u64,
    /// Backend plugin name: `flex`, `ndarray`, `wgpu`, `cuda`.
    pub backend: String,
    /// Devices of that backend: `cpu`, `cuda:0`, `wgpu:1`, ... Several: data parallel with
    /// DDP's semantics, the first being the main device (qud-trainer's `parallel`).
    pub devices: Vec<String>,
    pub precision: Precision,
    /// Write a checkpoint every this many steps (and at each epoch end); 0 = epoch ends only.
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// Append to `metrics.jsonl` every this many steps.
    pub log_every: usize,
    /// Also write the final student as `student.onnx` (`qud export`'s format).
    pub export_onnx: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/qud"),
            seed: 42,
            backend: "flex".into(),
            devices: vec!["cpu".into()],
            precision: Precision::F32,
            checkpoint_every: 2000,
            keep_checkpoints: 3,
            log_every: 50,
            export_onnx: false,
        }
    }
}
