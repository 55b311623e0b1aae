//! Layered loading (defaults < file < environment < `--set`), validation and TOML write-back.

use crate::{CacheMode, Config};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use std::fmt;
use std::path::{Path, PathBuf};

/// Why a configuration could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist", .0.display())]
    MissingFile(PathBuf),
    #[error("cannot read config from {source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    #[error("unknown config key `{key}` (from {source_name}); known keys here: {expected}")]
    UnknownKey {
        key: String,
        source_name: String,
        expected: String,
    },
    #[error("bad value for config key `{key}` (from {source_name}): {message}")]
    BadValue {
        key: String,
        source_name: String,
        message: String,
    },
    #[error("`--set {0}` is not of the form section.key=value")]
    BadOverride(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Invalid>),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One broken validation rule: the field, its value and the rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    pub field: &'static str,
    pub value: String,
    pub rule: &'static str,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.rule)
    }
}

/// One named layer of configuration.
struct Layer {
    name: String,
    figment: Figment,
}

/// Builds a [`Config`] from its layers. Later layers override earlier ones.
#[derive(Clone, Debug)]
pub struct ConfigLoader {
    base: Config,
    file: Option<PathBuf>,
    embedded: Option<(String, String)>,
    env_prefix: Option<String>,
    overrides: Vec<String>,
}

impl Default for ConfigLoader {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigLoader {
    /// The paper's defaults, the `QUD_` environment, no file, no overrides.
    pub fn new() -> Self {
        Self {
            base: Config::default(),
            file: None,
            embedded: None,
            env_prefix: Some("QUD_".into()),
            overrides: Vec::new(),
        }
    }

    /// Read a TOML file on top of the defaults; a missing file is an error.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// A TOML text compiled into the binary (the embedded demo), in place of a file.
    pub fn embedded(mut self, name: impl Into<String>, toml_text: impl Into<String>) -> Self {
        self.embedded = Some((name.into(), toml_text.into()));
        self
    }

    /// Read environment variables with this prefix instead of `QUD_`.
    pub fn env_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.env_prefix = Some(prefix.into());
        self
    }

    /// Ignore the environment.
    pub fn without_env(mut self) -> Self {
        self.env_prefix = None;
        self
    }

    /// Add one `section.key=value` override; the value is read as TOML, else as a string.
    pub fn set(mut self, assignment: impl Into<String>) -> Self {
        self.overrides.push(assignment.into());
        self
    }

    /// Add several overrides in order.
    pub fn set_all<I, S>(mut self, assignments: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.overrides
            .extend(assignments.into_iter().map(Into::into));
        self
    }

    fn layers(&self) -> Result<Vec<Layer>, ConfigError> {
        let mut layers = vec![Layer {
            name: "defaults".into(),
            figment: Figment::from(Serialized::defaults(&self.base)),
        }];
        if let Some((name, text)) = &self.embedded {
            layers.push(Layer {
                name: format!("embedded config {name}"),
                figment: Figment::from(Toml::string(text)),
            });
        }
        if let Some(path) = &self.file {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.clone()));
            }
            layers.push(Layer {
                name: format!("config file {}", path.display()),
                figment: Figment::from(Toml::file_exact(path)),
            });
        }
        if let Some(prefix) = &self.env_prefix {
            layers.push(Layer {
                name: format!("environment variables {prefix}*"),
                figment: Figment::from(Env::prefixed(prefix).split("__")),
            });
        }
        for text in &self.overrides {
            layers.push(Layer {
                name: format!("--set {text}"),
                figment: Figment::from(Override::parse(text)?),
            });
        }
        Ok(layers)
    }

    /// Merge the layers, deserialize and validate.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let layers = self.layers()?;
        // Parse errors (bad TOML) belong to one layer: surface them with its name.
        for layer in &layers {
            if let Err(e) = layer.figment.data() {
                return Err(ConfigError::Parse {
                    source_name: layer.name.clone(),
                    message: e.to_string(),
                });
            }
        }
        let merged = layers
            .iter()
            .fold(Figment::new(), |acc, l| acc.merge(l.figment.clone()));
        let config: Config = merged.extract().map_err(|e| describe(e, &layers))?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }
}

/// Turn figment's error into one that names the key and the layer that supplied it.
fn describe(error: figment::Error, layers: &[Layer]) -> ConfigError {
    use figment::error::Kind;
    let error = error
        .into_iter()
        .next()
        .expect("figment errors are non-empty");
    let mut path: Vec<String> = error.path.clone();
    if path.first().map(String::as_str) == Some(Profile::Default.as_str().as_str()) {
        path.remove(0);
    }
    let source_of = |key: &str| {
        // An element of an array (`optim.lr_milestones.0`) comes from where the array does.
        let mut key = key;
        while let Some((array, index)) = key.rsplit_once('.') {
            if !index.chars().all(|c| c.is_ascii_digit()) {
                break;
            }
            key = array;
        }
        layers
            .iter()
            .rev()
            .find(|l| l.figment.find_value(key).is_ok())
            .map(|l| l.name.clone())
            .unwrap_or_else(|| "an unknown source".into())
    };
    match &error.kind {
        Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let key = path.join(".");
            ConfigError::UnknownKey {
                source_name: source_of(&key),
                key,
                expected: expected.join(", "),
            }
        }
        _ => {
            let key = path.join(".");
            ConfigError::BadValue {
                source_name: source_of(&key),
                key,
                message: error.kind.to_string(),
            }
        }
    }
}

/// A single `--set a.b=c` as a figment provider named after the text the user typed.
struct Override {
    text: String,
    data: Dict,
}

impl Override {
    fn parse(text: &str) -> Result<Self, ConfigError> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| ConfigError::BadOverride(text.into()))?;
        let key = key.trim();
        let valid_key = !key.is_empty()
            && key
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !valid_key {
            return Err(ConfigError::BadOverride(text.into()));
        }
        // TOML accepts dotted keys, so `optim.lr = 0.05` is a document by itself. A value that is
        // not valid TOML (a bare path, a name) is taken as a string.
        let as_toml = format!("{key} = {}", value.trim());
        let data = match Toml::string(&as_toml).data() {
            Ok(mut map) => map.remove(&Profile::Default).unwrap_or_default(),
            Err(_) => {
                let quoted = toml::Value::String(value.trim().to_string()).to_string();
                let mut map = Toml::string(&format!("{key} = {quoted}"))
                    .data()
                    .map_err(|_| ConfigError::BadOverride(text.into()))?;
                map.remove(&Profile::Default).unwrap_or_default()
            }
        };
        Ok(Self {
            text: text.into(),
            data,
        })
    }
}

impl Provider for Override {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("--set {}", self.text))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.data.clone())]))
    }
}

/// The largest queue `validate` accepts: 16 GiB of f32 rows (the paper's largest, 16,384 x 512,
/// is 32 MiB).
const MAX_QUEUE_BYTES: usize = 16 << 30;
/// The most decoded-face memory the loader may hold ahead of the step.
const MAX_PREFETCH_BYTES: usize = 64 << 30;

impl Config {
    /// Every rule a value must satisfy; all broken rules are reported at once.
    pub fn validate(&self) -> Result<(), Vec<Invalid>> {
        let mut bad = Vec::new();
        let mut check = |ok: bool, field: &'static str, value: String, rule: &'static str| {
            if !ok {
                bad.push(Invalid { field, value, rule });
            }
        };
        let a = &self.data.augment;
        check(
            a.zoom_min.is_finite() && a.zoom_min > 0.0 && a.zoom_min <= 1.0,
            "data.augment.zoom_min",
            a.zoom_min.to_string(),
            "must be in (0, 1]",
        );
        check(
            a.max_shift.is_finite() && (0.0..=56.0).contains(&a.max_shift),
            "data.augment.max_shift",
            a.max_shift.to_string(),
            "must be in [0, 56] pixels",
        );
        for (field, v) in [
            ("data.augment.brightness", a.brightness),
            ("data.augment.contrast", a.contrast),
            ("data.augment.saturation", a.saturation),
            ("data.augment.grayscale_prob", a.grayscale_prob),
        ] {
            check(
                v.is_finite() && (0.0..=1.0).contains(&v),
                field,
                v.to_string(),
                "must be in [0, 1]",
            );
        }
        check(
            !(a.is_active() && self.teacher.cache == CacheMode::Require),
            "teacher.cache",
            "require".into(),
            "cannot be `require` with data.augment on: the teacher sees each augmented face \
             once, so it runs every step",
        );
        let m = &self.method;
        check(
            m.mse_scale.is_finite() && m.mse_scale > 0.0,
            "method.mse_scale",
            m.mse_scale.to_string(),
            "must be a finite number > 0",
        );
        check(
            m.tau.is_finite() && m.tau > 0.0,
            "method.tau",
            m.tau.to_string(),
            "must be a finite number > 0",
        );
        check(
            m.queue_size > 0,
            "method.queue_size",
            m.queue_size.to_string(),
            "must be >= 1",
        );
        // The queue lives in memory as queue_size x student.embedding_dim f32 rows: a size no
        // machine holds would otherwise abort in the allocator without naming the key.
        let queue_bytes = m
            .queue_size
            .checked_mul(self.student.embedding_dim)
            .and_then(|v| v.checked_mul(4));
        check(
            queue_bytes.is_some_and(|b| b <= MAX_QUEUE_BYTES),
            "method.queue_size",
            m.queue_size.to_string(),
            "the queue (queue_size x student.embedding_dim f32 rows) must fit in 16 GiB",
        );
        check(
            m.margin.is_finite() && (0.0..std::f64::consts::PI).contains(&m.margin),
            "method.margin",
            m.margin.to_string(),
            "must be in [0, pi)",
        );
        check(
            m.scale.is_finite() && m.scale > 0.0,
            "method.scale",
            m.scale.to_string(),
            "must be > 0",
        );

        let o = &self.optim;
        check(
            o.lr.is_finite() && o.lr > 0.0,
            "optim.lr",
            o.lr.to_string(),
            "must be a finite number > 0",
        );
        check(
            o.batch_size > 0,
            "optim.batch_size",
            o.batch_size.to_string(),
            "must be >= 1",
        );
        check(
            o.lr_batch_size > 0,
            "optim.lr_batch_size",
            o.lr_batch_size.to_string(),
            "must be >= 1",
        );
        check(
            (0.0..1.0).contains(&o.momentum),
            "optim.momentum",
            o.momentum.to_string(),
            "must be in [0, 1)",
        );
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "optim.weight_decay",
            o.weight_decay.to_string(),
            "must be >= 0",
        );
        check(
            o.epochs > 0,
            "optim.epochs",
            o.epochs.to_string(),
            "must be >= 1",
        );
        check(
            o.lr_milestones.windows(2).all(|w| w[0] < w[1]),
            "optim.lr_milestones",
            format!("{:?}", o.lr_milestones),
            "must be strictly increasing",
        );
        check(
            o.lr_milestones.iter().all(|&m| m >= 1),
            "optim.lr_milestones",
            format!("{:?}", o.lr_milestones),
            "epochs are counted from 1: every milestone must be >= 1",
        );
        check(
            o.warmup_epochs.is_finite() && o.warmup_epochs >= 0.0,
            "optim.warmup_epochs",
            o.warmup_epochs.to_string(),
            "must be >= 0",
        );
        check(
            o.grad_clip.is_finite() && o.grad_clip >= 0.0,
            "optim.grad_clip",
            o.grad_clip.to_string(),
            "must be >= 0 (0 disables clipping)",
        );

        let d = &self.data;
        check(
            (0.0..=1.0).contains(&d.flip_prob),
            "data.flip_prob",
            d.flip_prob.to_string(),
            "must be in [0, 1]",
        );
        // Each prefetched batch is batch_size decoded faces of 3 x 112 x 112 f32.
        let prefetch_bytes = d
            .prefetch
            .checked_mul(self.optim.batch_size)
            .and_then(|v| v.checked_mul(3 * 112 * 112 * 4));
        check(
            prefetch_bytes.is_some_and(|b| b <= MAX_PREFETCH_BYTES),
            "data.prefetch",
            d.prefetch.to_string(),
            "the prefetched batches (prefetch x optim.batch_size decoded faces) must fit in 64 GiB",
        );
        check(
            d.synthetic_identities > 0,
            "data.synthetic_identities",
            d.synthetic_identities.to_string(),
            "must be >= 1",
        );
        check(
            d.synthetic_images_per_identity > 0,
            "data.synthetic_images_per_identity",
            d.synthetic_images_per_identity.to_string(),
            "must be >= 1",
        );

        check(
            self.student.embedding_dim > 0,
            "student.embedding_dim",
            self.student.embedding_dim.to_string(),
            "must be >= 1",
        );
        check(
            self.method.kind == crate::MethodKind::Arcface
                || self.teacher.embedding_dim == self.student.embedding_dim,
            "teacher.embedding_dim",
            self.teacher.embedding_dim.to_string(),
            "must equal student.embedding_dim for distillation",
        );
        let onnx = &self.teacher.onnx;
        check(
            onnx.size >= 8,
            "teacher.onnx.size",
            onnx.size.to_string(),
            "must be >= 8 pixels",
        );
        check(
            onnx.std.iter().all(|s| s.is_finite() && *s != 0.0)
                && onnx.mean.iter().all(|m| m.is_finite()),
            "teacher.onnx.std",
            format!("{:?} (mean {:?})", onnx.std, onnx.mean),
            "mean must be finite and std finite and non-zero",
        );
        check(
            self.eval.batch_size > 0,
            "eval.batch_size",
            self.eval.batch_size.to_string(),
            "must be >= 1",
        );

        let r = &self.run;
        check(
            !r.devices.is_empty(),
            "run.devices",
            "[]".into(),
            "must name at least one device",
        );
        check(
            r.devices.len() <= 1 || self.optim.batch_size >= 2 * r.devices.len(),
            "optim.batch_size",
            format!("{} over {} devices", self.optim.batch_size, r.devices.len()),
            "is the total over run.devices and must give every device at least 2 samples (BatchNorm needs 2)",
        );
        check(
            r.log_every > 0,
            "run.log_every",
            r.log_every.to_string(),
            "must be >= 1",
        );
        check(
            r.keep_checkpoints > 0,
            "run.keep_checkpoints",
            r.keep_checkpoints.to_string(),
            "must be >= 1",
        );
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad)
        }
    }

    /// The resolved configuration as TOML; loading it back gives the same configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("every config section serializes to TOML")
    }

    /// Write [`Config::to_toml`] atomically: a temporary file beside `path`, then a rename.
    pub fn write_toml(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.to_toml()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}
