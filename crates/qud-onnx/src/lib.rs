//! ONNX face models (any exporter, any framework) as frozen teachers and evaluation models, run
//! on the CPU by the pure-Rust runtime [tract](https://github.com/sonos/tract).
//!
//! QUD only ever runs its teacher forward, so any face model can teach: [`OnnxFaceModel`]
//! implements [`FaceEmbedder`], which is what evaluation, `qud embed`, the teacher-feature cache
//! and the trainer take. It receives qud's standard input (`[N, 3, 112, 112]` RGB in [-1, 1]) and
//! converts it to the model's own input contract ([`OnnxInput`]: size, channel order, layout,
//! per-channel mean and std over 0..=255 pixels).
//!
//! Two engines run a graph ([`OnnxRuntime`]):
//! - **native** ([`native`]): the common face-model ops (Conv, BatchNormalization, PRelu, Add,
//!   Gemm, ...) mapped onto Burn on the flex CPU device through qud's CPU kernels, batches of
//!   [`NATIVE_BATCH`] whatever batch the export fixed, every op image-wise, including the
//!   dynamic quantisation of `quantize_dynamic` graphs, which it computes per image. With `auto`
//!   (the default) it runs a graph when it maps every node and agrees with tract on a probe
//!   batch at load; the log says which engine runs and why.
//! - **tract**: any graph. Many exports fix the batch dimension at 1 (a `Reshape` to `[1, -1]`
//!   before the embedding layer). Loading probes the graph with a batch of [`PROBE_BATCH`]; when
//!   the output does not come back as `[batch, D]`, the model runs one image at a time instead.
//!   A graph that quantises its input per run (`DynamicQuantizeLinear`) always runs one image at a
//!   time: its scale is computed over the whole input, so in a batch each face's embedding would
//!   depend on the other faces. A call's images are split over `threads` threads, each with its
//!   own plan state.

pub mod export;
pub mod native;

pub use export::{export_onnx, ExportReport, ExportSource, DEFAULT_OPSET};
pub use native::{NativeError, NativeGraph};

use burn::prelude::*;
use qud_backbone::FaceEmbedder;
use qud_config::{ChannelOrder, InputLayout, OnnxInput, OnnxRuntime};
use std::path::{Path, PathBuf};
use tract_onnx::prelude::{
    tvec, DatumExt, Framework, InferenceModelExt, IntoRunnable, TValue, TypedRunnableModel,
};

/// Images per run of a model whose batch dimension is free. Small batches keep each thread's
/// working set in cache; larger ones did not run faster (see the crate README).
pub const PROBE_BATCH: usize = 8;

/// Images per run of the native engine.
pub const NATIVE_BATCH: usize = 64;

/// Ops whose result for one image depends on the other images of the run: graphs with them run
/// one image at a time.
const BATCH_COUPLED_OPS: [&str; 1] = ["DynamicQuantizeLinear"];

/// Side of qud's aligned faces.
const FACE: usize = 112;

type Plan = std::sync::Arc<TypedRunnableModel>;

/// Why an ONNX model could not be loaded or run; always names the file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{}: cannot load the ONNX model: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Contract { path: PathBuf, reason: String },
    #[error("{}: running the model failed: {reason}", path.display())]
    Run { path: PathBuf, reason: String },
    #[error("{}: cannot export the model: {reason}", path.display())]
    Export { path: PathBuf, reason: String },
}

/// A loaded ONNX face model with its input contract.
pub struct OnnxFaceModel {
    path: PathBuf,
    engine: Engine,
    /// Images per run: [`NATIVE_BATCH`]; on tract [`PROBE_BATCH`], or 1 for graphs with a fixed
    /// batch or a batch-coupled op.
    batch: usize,
    input: OnnxInput,
    dim: usize,
    threads: usize,
}

enum Engine {
    Native(Box<native::NativeGraph>),
    Tract(Plan),
}

impl std::fmt::Debug for OnnxFaceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxFaceModel")
            .field("path", &self.path)
            .field("runtime", &self.runtime())
            .field("batch", &self.batch)
            .field("dim", &self.dim)
            .field("input", &self.input)
            .finish()
    }
}

impl OnnxFaceModel {
    /// Load `path` for inputs described by `input`, on the engine `input.runtime` asks for.
    /// Fails, naming the file, when the graph cannot be read or does not map one face of that
    /// shape to one embedding.
    pub fn load(path: &Path, input: &OnnxInput) -> Result<Self, OnnxError> {
        if !path.is_file() {
            return Err(OnnxError::Load {
                path: path.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| OnnxError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let contract = |reason: String| OnnxError::Contract {
            path: path.to_path_buf(),
            reason,
        };
        match input.runtime {
            OnnxRuntime::Tract => Self::load_tract(path, input, &bytes),
            OnnxRuntime::Native => {
                let graph = native::NativeGraph::load(&bytes, &qud_backend_flex::device())
                    .map_err(|e| contract(format!("the native runtime cannot run it: {e}")))?;
                log_quantization(path, &graph);
                let mut model = Self::with_engine(path, input, Engine::Native(Box::new(graph)), 0);
                let faces = probe_faces(2);
                let rows = model.embed_normalized(&faces, 2)?;
                model.dim = rows.len() / 2;
                tracing::info!("{}: runs on qud's native runtime", path.display());
                Ok(model)
            }
            OnnxRuntime::Auto => {
                let tract = Self::load_tract(path, input, &bytes)?;
                let graph = match native::NativeGraph::load(&bytes, &qud_backend_flex::device()) {
                    Ok(graph) => graph,
                    Err(why) => {
                        tracing::info!("{}: runs on tract: {why}", path.display());
                        return Ok(tract);
                    }
                };
                log_quantization(path, &graph);
                let native =
                    Self::with_engine(path, input, Engine::Native(Box::new(graph)), tract.dim);
                let faces = probe_faces(3);
                let want = tract.embed_normalized(&faces, 3)?;
                let verdict = native
                    .embed_normalized(&faces, 3)
                    .map_err(|e| e.to_string())
                    .and_then(|got| agree(&got, &want));
                match verdict {
                    Ok(()) => {
                        tracing::info!(
                            "{}: runs on qud's native runtime (agrees with tract at load)",
                            path.display()
                        );
                        Ok(native)
                    }
                    Err(why) => {
                        tracing::warn!(
                            "{}: qud's native runtime disagrees with tract ({why}); running on \
                             tract",
                            path.display()
                        );
                        Ok(tract)
                    }
                }
            }
        }
    }

    /// tract, with the largest batch the graph accepts that keeps images independent.
    fn load_tract(path: &Path, input: &OnnxInput, bytes: &[u8]) -> Result<Self, OnnxError> {
        let coupled = native::op_types(bytes)
            .unwrap_or_default()
            .into_iter()
            .find(|op| BATCH_COUPLED_OPS.contains(&op.as_str()));
        if let Some(op) = coupled {
            let (plan, dim) = Self::plan(path, input, 1)?;
            tracing::info!(
                "{}: runs on tract one image at a time: its {op} scales each run by its whole \
                 input, so in a batch a face's embedding would depend on the other faces",
                path.display()
            );
            return Ok(Self::with_plan(path, input, plan, 1, dim));
        }
        let (plan, batch, dim) = match Self::plan(path, input, PROBE_BATCH) {
            Ok((plan, dim)) => (plan, PROBE_BATCH, dim),
            Err(batched) => match Self::plan(path, input, 1) {
                Ok((plan, dim)) => {
                    tracing::info!(
                        "{}: runs on tract one image at a time: the graph takes no batch of \
                         {PROBE_BATCH} ({batched})",
                        path.display()
                    );
                    (plan, 1, dim)
                }
                Err(single) => return Err(single),
            },
        };
        Ok(Self::with_plan(path, input, plan, batch, dim))
    }

    fn with_engine(path: &Path, input: &OnnxInput, engine: Engine, dim: usize) -> Self {
        Self {
            path: path.to_path_buf(),
            batch: match engine {
                Engine::Native(_) => NATIVE_BATCH,
                Engine::Tract(_) => 1,
            },
            engine,
            input: input.clone(),
            dim,
            threads: 1,
        }
    }

    fn with_plan(path: &Path, input: &OnnxInput, plan: Plan, batch: usize, dim: usize) -> Self {
        let threads = match input.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Self {
            path: path.to_path_buf(),
            engine: Engine::Tract(plan),
            batch,
            input: input.clone(),
            dim,
            threads,
        }
    }

    /// An optimised plan for `batch` images and the embedding size it yields; an error when the
    /// output is not `[batch, D]` (or `[batch, D, 1, 1]`).
    fn plan(path: &Path, input: &OnnxInput, batch: usize) -> Result<(Plan, usize), OnnxError> {
        let load = |reason: String| OnnxError::Load {
            path: path.to_path_buf(),
            reason,
        };
        let contract = |reason: String| OnnxError::Contract {
            path: path.to_path_buf(),
            reason,
        };
        let s = input.size;
        let shape = match input.layout {
            InputLayout::Nchw => [batch, 3, s, s],
            InputLayout::Nhwc => [batch, s, s, 3],
        };
        // Declared output shapes and value_info are hints that exporters and quantisers often
        // leave pinned to the example's batch of 1; the graph's own ops decide the shapes.
        let model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_path(path)
            .map_err(|e| load(format!("{e:#}")))?;
        if model.input_outlets().map_or(0, |i| i.len()) != 1 {
            return Err(contract("a face model must have exactly one input".into()));
        }
        let typed = model
            .with_input_fact(0, f32::fact(shape).into())
            .and_then(|m| m.into_optimized())
            .map_err(|e| {
                contract(format!(
                    "the graph does not accept an input of shape {shape:?} ({:?} layout, see \
                     teacher.onnx / --onnx-size, --onnx-layout): {e:#}",
                    input.layout
                ))
            })?;
        let out = typed
            .output_fact(0)
            .map_err(|e| contract(format!("{e:#}")))?
            .shape
            .as_concrete()
            .map(<[usize]>::to_vec)
            .ok_or_else(|| contract("the output shape is not fixed".into()))?;
        let dim = match out.as_slice() {
            [b, d] | [b, d, 1, 1] if *b == batch => *d,
            other => {
                return Err(contract(format!(
                    "for {batch} input image(s) the output has shape {other:?}, not [{batch}, D]"
                )))
            }
        };
        let plan = typed.into_runnable().map_err(|e| load(format!("{e:#}")))?;
        Ok((plan, dim))
    }

    /// Load with a fixed number of images per run instead of probing (1 = one image at a time);
    /// for measuring the two strategies against each other.
    pub fn load_with_batch(
        path: &Path,
        input: &OnnxInput,
        batch: usize,
    ) -> Result<Self, OnnxError> {
        let (plan, dim) = Self::plan(path, input, batch.max(1))?;
        Ok(Self::with_plan(path, input, plan, batch.max(1), dim))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Images per run of the graph (1 when tract runs a graph whose batch is fixed).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The engine running the graph: "native" or "tract".
    pub fn runtime(&self) -> &'static str {
        match self.engine {
            Engine::Native(_) => "native",
            Engine::Tract(_) => "tract",
        }
    }

    pub fn input(&self) -> &OnnxInput {
        &self.input
    }

    /// Embeddings of `n` faces given as qud's input (`[n, 3, 112, 112]` RGB in [-1, 1], row
    /// major): `n * D` values.
    pub fn embed_normalized(&self, faces: &[f32], n: usize) -> Result<Vec<f32>, OnnxError> {
        let plane = 3 * FACE * FACE;
        assert_eq!(faces.len(), n * plane, "faces must be [n, 3, 112, 112]");
        if let Engine::Native(graph) = &self.engine {
            return self.embed_native(graph, faces, n);
        }
        let mut out = vec![0f32; n * self.dim];
        let per_thread = n.div_ceil(self.threads.max(1)).max(1);
        let results: Vec<Result<(), OnnxError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = faces
                .chunks(per_thread * plane)
                .zip(out.chunks_mut(per_thread * self.dim))
                .map(|(faces, out)| scope.spawn(move || self.embed_serial(faces, out)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("ONNX worker panicked"))
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(out)
    }

    /// Runs of [`NATIVE_BATCH`] images on the native engine (it spreads each op over the CPU
    /// threads itself).
    fn embed_native(
        &self,
        graph: &native::NativeGraph,
        faces: &[f32],
        n: usize,
    ) -> Result<Vec<f32>, OnnxError> {
        let plane = 3 * FACE * FACE;
        let s = self.input.size;
        let model_plane = 3 * s * s;
        let mut out = Vec::with_capacity(n * self.dim);
        let device = qud_backend_flex::device();
        for chunk in faces.chunks(NATIVE_BATCH * plane) {
            let count = chunk.len() / plane;
            let mut input = vec![0f32; count * model_plane];
            for (face, dst) in chunk.chunks(plane).zip(input.chunks_mut(model_plane)) {
                to_contract(face, &self.input, dst);
            }
            let shape = match self.input.layout {
                InputLayout::Nchw => [count, 3, s, s],
                InputLayout::Nhwc => [count, s, s, 3],
            };
            let x = Tensor::<4>::from_data(TensorData::new(input, shape), &device);
            let rows = graph.run(x).map_err(|e| OnnxError::Run {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
            let [rows_n, dim] = rows.dims();
            if rows_n != count || (self.dim != 0 && dim != self.dim) {
                return Err(OnnxError::Contract {
                    path: self.path.clone(),
                    reason: format!(
                        "for {count} image(s) the output has shape [{rows_n}, {dim}], not \
                         [{count}, {}]",
                        self.dim
                    ),
                });
            }
            let values = rows
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| OnnxError::Run {
                    path: self.path.clone(),
                    reason: format!("output is not f32: {e:?}"),
                })?;
            out.extend_from_slice(&values);
        }
        Ok(out)
    }

    /// One thread's share: runs of `self.batch` images, the last one padded with zeros.
    fn embed_serial(&self, faces: &[f32], out: &mut [f32]) -> Result<(), OnnxError> {
        let Engine::Tract(plan) = &self.engine else {
            unreachable!("the native engine runs in embed_native")
        };
        let plane = 3 * FACE * FACE;
        let s = self.input.size;
        let model_plane = 3 * s * s;
        let mut input = vec![0f32; self.batch * model_plane];
        for (faces, out) in faces
            .chunks(self.batch * plane)
            .zip(out.chunks_mut(self.batch * self.dim))
        {
            input.fill(0.0);
            for (face, dst) in faces.chunks(plane).zip(input.chunks_mut(model_plane)) {
                to_contract(face, &self.input, dst);
            }
            let shape: Vec<usize> = match self.input.layout {
                InputLayout::Nchw => vec![self.batch, 3, s, s],
                InputLayout::Nhwc => vec![self.batch, s, s, 3],
            };
            let tensor = tract_onnx::prelude::Tensor::from_shape(&shape, &input).map_err(|e| {
                OnnxError::Run {
                    path: self.path.clone(),
                    reason: format!("{e:#}"),
                }
            })?;
            let result = plan
                .run(tvec![TValue::from(tensor)])
                .map_err(|e| OnnxError::Run {
                    path: self.path.clone(),
                    reason: format!("{e:#}"),
                })?;
            let values = result[0]
                .to_plain_array_view::<f32>()
                .map_err(|e| OnnxError::Run {
                    path: self.path.clone(),
                    reason: format!("output is not f32: {e:#}"),
                })?;
            // Logical (row-major) order; the padded tail of the last run is dropped.
            out.iter_mut().zip(values.iter()).for_each(|(o, v)| *o = *v);
        }
        Ok(())
    }
}

impl FaceEmbedder for OnnxFaceModel {
    /// Runs on the CPU whatever `images`' device; the result goes back to that device. A failure
    /// inside the graph panics with the file's name: the model ran at load time with this very
    /// shape, so it means a broken runtime, not bad input.
    fn embed_faces(&self, images: Tensor<4>) -> Tensor<2> {
        let device = images.device();
        let [n, c, h, w] = images.shape().dims();
        assert_eq!([c, h, w], [3, FACE, FACE], "faces must be [N, 3, 112, 112]");
        let faces = images
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 faces");
        let rows = self
            .embed_normalized(&faces, n)
            .unwrap_or_else(|e| panic!("{e}"));
        Tensor::from_data(TensorData::new(rows, [n, self.dim]), &device)
    }

    fn output_dim(&self) -> usize {
        self.dim
    }
}

/// `count` deterministic faces in qud's input range with the structure of photographs (smooth
/// gradients and edges), for checking one engine against another at load.
fn probe_faces(count: usize) -> Vec<f32> {
    let mut faces = Vec::with_capacity(count * 3 * FACE * FACE);
    for i in 0..count {
        for c in 0..3 {
            for y in 0..FACE {
                for x in 0..FACE {
                    let (xf, yf) = (x as f32 / FACE as f32, y as f32 / FACE as f32);
                    let wave = ((7.0 + i as f32) * xf + (3.0 + c as f32) * yf).sin();
                    let edge = if (x / 16 + y / 24 + i) % 3 == 0 {
                        0.4
                    } else {
                        -0.3
                    };
                    faces.push((0.5 * wave + edge).clamp(-1.0, 1.0));
                }
            }
        }
    }
    faces
}

/// Whether two engines' embeddings of the same faces agree: within 1e-3 of the larger one's scale,
/// element by element (summation order and folded BatchNorms move the last bits only).
/// Says, at info level, that a dynamically quantised graph quantises each image on its own.
fn log_quantization(path: &Path, graph: &native::NativeGraph) {
    let layers = graph.quantized_layers();
    if layers > 0 {
        tracing::info!(
            "{}: {layers} dynamically quantised layers, each image quantised on its own (as \
             onnxruntime does one image at a time): a face's embedding does not depend on its \
             batch",
            path.display()
        );
    }
}

fn agree(got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} values against {}", got.len(), want.len()));
    }
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    if worst <= 1e-3 * scale {
        Ok(())
    } else {
        Err(format!(
            "largest difference {worst:e} at a scale of {scale:e}"
        ))
    }
}

/// One face from qud's input (`[3, 112, 112]` RGB in [-1, 1]) into the model's contract: pixels
/// back to 0..=255, resized when the model's side is not 112 (bilinear, half-pixel centres, as
/// OpenCV's INTER_LINEAR), channels reordered, `(p - mean) / std`, NCHW or NHWC.
pub fn to_contract(face: &[f32], input: &OnnxInput, out: &mut [f32]) {
    let s = input.size;
    let plane = FACE * FACE;
    for c in 0..3 {
        let src_channel = match input.channels {
            ChannelOrder::Rgb => c,
            ChannelOrder::Bgr => 2 - c,
        };
        let src = &face[src_channel * plane..(src_channel + 1) * plane];
        let (mean, std) = (input.mean[c] as f32, input.std[c] as f32);
        let scale = FACE as f32 / s as f32;
        for y in 0..s {
            for x in 0..s {
                let pixel = if s == FACE {
                    src[y * FACE + x]
                } else {
                    bilinear(
                        src,
                        (x as f32 + 0.5) * scale - 0.5,
                        (y as f32 + 0.5) * scale - 0.5,
                    )
                };
                let value = (pixel * 127.5 + 127.5 - mean) / std;
                let at = match input.layout {
                    InputLayout::Nchw => (c * s + y) * s + x,
                    InputLayout::Nhwc => (y * s + x) * 3 + c,
                };
                out[at] = value;
            }
        }
    }
}

fn bilinear(plane: &[f32], x: f32, y: f32) -> f32 {
    let clamp = |v: f32| v.clamp(0.0, (FACE - 1) as f32);
    let (x, y) = (clamp(x), clamp(y));
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(FACE - 1), (y0 + 1).min(FACE - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let at = |xx: usize, yy: usize| plane[yy * FACE + xx];
    let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
    let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
    top * (1.0 - fy) + bottom * fy
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod real;
