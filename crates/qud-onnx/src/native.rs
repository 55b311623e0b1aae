//! qud's own runner for ONNX face models: the graph's ops mapped onto Burn on the flex CPU
//! device, convolutions and PReLU through qud's CPU kernels (the code qud's own backbones run).
//!
//! It maps the op set of the face-recognition exports in use (insightface's ArcFace ResNets and
//! MobileFaceNets, PyTorch exports of them): Conv, BatchNormalization (inference), PRelu, Relu,
//! Sigmoid, Add / Sub / Mul / Div, Gemm, MatMul, Flatten, Reshape, Transpose, the
//! channel-reversing Slice of a BGR wrapper, GlobalAveragePool, Identity, Dropout and Constant.
//! Every one of them treats each image on its own, so a graph whose batch was fixed at 1 (a
//! `Reshape` to `[1, -1]`, common in exports) runs any batch here, and no image's embedding can
//! depend on the other images of its batch. A graph with any other op, or with an op used in a
//! way that would mix images, is [`NativeError::Unsupported`] and runs on tract instead.
//!
//! At load, a BatchNormalization (or a per-channel constant Mul / Add) that follows a Conv or a
//! Gemm whose output nothing else reads is folded into that layer's weights, and a Reshape of a
//! constant is computed.
//!
//! Graphs quantised by onnxruntime's `quantize_dynamic` are mapped too: each
//! `DynamicQuantizeLinear -> ConvInteger / MatMulInteger -> Cast -> Mul(scales)` chain becomes one
//! step (see [`fuse_dynamic_quantization`]) that quantises *every image on its own*, as
//! onnxruntime does for a batch of one, and runs the integer product on the float kernels.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use prost::Message;
use std::collections::HashMap;
use tract_onnx::pb;

/// Why a graph cannot run on qud's runner.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("node `{node}` ({op}) is not one qud's runner maps: {why}")]
    Unsupported {
        op: String,
        node: String,
        why: String,
    },
    #[error("malformed ONNX graph: {0}")]
    Malformed(String),
    #[error("the graph does not fit this input: {0}")]
    Shapes(String),
}

fn unsupported(node: &pb::NodeProto, why: impl Into<String>) -> NativeError {
    NativeError::Unsupported {
        op: node.op_type.clone(),
        node: node.name.clone(),
        why: why.into(),
    }
}

/// A constant of the graph: an initializer or a `Constant` node's value.
#[derive(Clone, Debug)]
enum Constant {
    F32 {
        dims: Vec<usize>,
        values: Vec<f32>,
    },
    I64(Vec<i64>),
    /// uint8 or int8: the quantised weights and zero points of `quantize_dynamic`.
    Int8 {
        dims: Vec<usize>,
        values: Vec<i32>,
    },
}

impl Constant {
    fn from_proto(t: &pb::TensorProto) -> Result<Self, String> {
        if !t.external_data.is_empty() || t.data_location == Some(1) {
            return Err(format!("tensor `{}` is stored outside the file", t.name));
        }
        let dims = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("tensor `{}`: dim {d}", t.name)))
            .collect::<Result<Vec<_>, _>>()?;
        let count = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor `{}`: size overflows", t.name))?;
        let raw = &t.raw_data;
        let check = |len: usize| -> Result<(), String> {
            if len == count {
                Ok(())
            } else {
                Err(format!(
                    "tensor `{}` holds {len} values for dims {dims:?}",
                    t.name
                ))
            }
        };
        match t.data_type {
            // FLOAT
            1 => {
                let values: Vec<f32> = if raw.is_empty() {
                    t.float_data.clone()
                } else {
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                };
                check(values.len())?;
                Ok(Self::F32 { dims, values })
            }
            // INT64, INT32
            7 | 6 => {
                let values: Vec<i64> = match (t.data_type, raw.is_empty()) {
                    (7, false) => raw
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .collect(),
                    (7, true) => t.int64_data.clone(),
                    (_, false) => raw
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                        .collect(),
                    (_, true) => t.int32_data.iter().map(|&v| v as i64).collect(),
                };
                check(values.len())?;
                Ok(Self::I64(values))
            }
            // UINT8, INT8
            2 | 3 => {
                let values: Vec<i32> = match (t.data_type, raw.is_empty()) {
                    (2, false) => raw.iter().map(|&b| i32::from(b)).collect(),
                    (_, false) => raw.iter().map(|&b| i32::from(b as i8)).collect(),
                    // int32_data holds each 8-bit value widened.
                    (_, true) => t.int32_data.clone(),
                };
                check(values.len())?;
                Ok(Self::Int8 { dims, values })
            }
            other => Err(format!(
                "tensor `{}` has ONNX data type {other}, not float32 or an integer",
                t.name
            )),
        }
    }
}

/// How two dynamic values combine, element by element (NumPy broadcasting).
#[derive(Clone, Copy, Debug)]
enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

/// An op with its parameters in host memory, before folding and upload.
#[derive(Clone, Debug)]
enum HostOp {
    Conv {
        weight: Vec<f32>,
        /// `[out, in / groups, kh, kw]`
        dims: [usize; 4],
        bias: Option<Vec<f32>>,
        stride: [usize; 2],
        /// top, left, bottom, right
        pads: [usize; 4],
        dilation: [usize; 2],
        groups: usize,
        /// The slopes of a PReLU that reads only this layer's output, one per output channel,
        /// fused in by [`fuse_prelu`].
        prelu: Option<Vec<f32>>,
    },
    /// `x * scale + shift` with one value per channel, or one for all (length 1).
    Affine {
        scale: Option<Vec<f32>>,
        shift: Option<Vec<f32>>,
    },
    PRelu(Vec<f32>),
    Binary(Binary),
    Relu,
    Sigmoid,
    /// `[N, ...]` to `[N, rest]`; the width, when the graph states it, is checked.
    ToRows(Option<usize>),
    /// `[N, ...]` to `[N, c, h, w]`.
    ToMaps([usize; 3]),
    Transpose([usize; 4]),
    Flip(usize),
    GlobalAveragePool,
    Identity,
    /// `x W + b` with `W` `[k, m]`, row major.
    Linear {
        weight: Vec<f32>,
        k: usize,
        m: usize,
        bias: Option<Vec<f32>>,
    },
    /// A fused dynamic-quantisation chain: `inner` (a bias-free Conv or Linear whose weights are
    /// the centred integers `w_q - w_zero_point`) applied to each image quantised on its own,
    /// times `image scale x scale` per output channel, plus `shift`.
    DynamicQuant {
        inner: Box<HostOp>,
        scale: Vec<f32>,
        shift: Option<Vec<f32>>,
    },
}

#[derive(Clone, Debug)]
struct HostStep {
    op: HostOp,
    inputs: Vec<String>,
    output: String,
}

/// A value flowing through the graph: rows (`[N, D]`) or feature maps (`[N, C, H, W]`).
enum Value {
    Rows(Tensor<2>),
    Maps(Tensor<4>),
}

enum Op {
    Conv(Conv2d),
    /// A bias-free convolution, then `prelu(y + bias[c])` in one pass over its output; slope 1
    /// (exactly `y + bias`) where no PReLU was fused in. flex adds a convolution's bias as a
    /// separate broadcast pass.
    ConvPrelu {
        conv: Conv2d,
        bias: Vec<f32>,
        slope: Vec<f32>,
    },
    Affine {
        scale: Option<Tensor<1>>,
        shift: Option<Tensor<1>>,
    },
    PRelu(Tensor<1>),
    Binary(Binary),
    Relu,
    Sigmoid,
    ToRows(Option<usize>),
    ToMaps([usize; 3]),
    Transpose([usize; 4]),
    Flip(usize),
    GlobalAveragePool,
    Identity,
    Linear {
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    },
    DynamicQuant {
        inner: Box<Op>,
        scale: Vec<f32>,
        shift: Option<Tensor<1>>,
    },
}

struct Step {
    op: Op,
    inputs: Vec<usize>,
    output: usize,
    /// Slots read for the last time by this step, emptied after it.
    frees: Vec<usize>,
}

/// A face model's graph ready to run on the flex CPU device.
pub struct NativeGraph {
    steps: Vec<Step>,
    slots: usize,
    input: usize,
    output: usize,
    device: Device,
    quantized_layers: usize,
}

impl std::fmt::Debug for NativeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeGraph")
            .field("steps", &self.steps.len())
            .field("quantized_layers", &self.quantized_layers)
            .finish()
    }
}

/// The op types of a model file, in node order (for the batch policy of the tract path).
pub(crate) fn op_types(bytes: &[u8]) -> Result<Vec<String>, NativeError> {
    let model = pb::ModelProto::decode(bytes).map_err(|e| NativeError::Malformed(e.to_string()))?;
    Ok(model
        .graph
        .map(|g| g.node.into_iter().map(|n| n.op_type).collect())
        .unwrap_or_default())
}

impl NativeGraph {
    /// Maps the ONNX model in `bytes` onto `device` (a flex device), or says which node it cannot
    /// map.
    pub fn load(bytes: &[u8], device: &Device) -> Result<Self, NativeError> {
        let model =
            pb::ModelProto::decode(bytes).map_err(|e| NativeError::Malformed(e.to_string()))?;
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(1, |o| o.version);
        let graph = model
            .graph
            .ok_or_else(|| NativeError::Malformed("the model has no graph".into()))?;
        let mut constants: HashMap<String, Constant> = HashMap::new();
        for t in &graph.initializer {
            // Quantised weights (uint8, int8) and other types are not mapped: tract runs those.
            let c = Constant::from_proto(t).map_err(|why| NativeError::Unsupported {
                op: "initializer".into(),
                node: t.name.clone(),
                why,
            })?;
            constants.insert(t.name.clone(), c);
        }
        let inputs: Vec<&pb::ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !constants.contains_key(&i.name))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(NativeError::Malformed(format!(
                "a face model has one input, this graph has {}",
                inputs.len()
            )));
        };
        let [output] = graph.output.as_slice() else {
            return Err(NativeError::Malformed(format!(
                "a face model has one output, this graph has {}",
                graph.output.len()
            )));
        };
        let (nodes, quantized_layers) =
            fuse_dynamic_quantization(&graph.node, &mut constants, &output.name);
        // Rank of every dynamic value, known statically: the input is an image batch.
        let mut ranks: HashMap<String, usize> = HashMap::from([(input.name.clone(), 4)]);
        let mut steps = Vec::new();
        for node in &nodes {
            if !(node.domain.is_empty() || node.domain == "ai.onnx") {
                return Err(unsupported(node, format!("domain `{}`", node.domain)));
            }
            if node.op_type == "Constant" {
                let value = node
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| unsupported(node, "only a tensor `value` is mapped"))?;
                let c = Constant::from_proto(value).map_err(|e| unsupported(node, e))?;
                for out in &node.output {
                    constants.insert(out.clone(), c.clone());
                }
                continue;
            }
            if let Some(c) = constant_reshape(node, &constants) {
                constants.insert(node.output[0].clone(), c);
                continue;
            }
            let step = map_node(node, opset, &constants, &ranks)?;
            let rank = output_rank(&step.op, ranks[&step.inputs[0]]);
            ranks.insert(step.output.clone(), rank);
            steps.push(step);
        }
        if !ranks.contains_key(&output.name) {
            return Err(NativeError::Malformed(format!(
                "the output `{}` is not computed from the input",
                output.name
            )));
        }
        let steps = fuse_prelu(fold_affine(steps, &output.name), &output.name);
        let mut graph = Self::upload(steps, &input.name, &output.name, device);
        graph.quantized_layers = quantized_layers;
        Ok(graph)
    }

    /// How many Conv / MatMul layers run dynamically quantised, each image quantised on its own.
    pub fn quantized_layers(&self) -> usize {
        self.quantized_layers
    }

    fn upload(steps: Vec<HostStep>, input: &str, output: &str, device: &Device) -> Self {
        let mut slot_of: HashMap<String, usize> = HashMap::from([(input.to_string(), 0)]);
        for step in &steps {
            let next = slot_of.len();
            slot_of.entry(step.output.clone()).or_insert(next);
        }
        let mut last_use: HashMap<usize, usize> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            for name in &step.inputs {
                last_use.insert(slot_of[name], i);
            }
        }
        let output_slot = slot_of[output];
        let steps = steps
            .into_iter()
            .enumerate()
            .map(|(i, step)| {
                let op = upload_op(step.op, device);
                let inputs: Vec<usize> = step.inputs.iter().map(|n| slot_of[n]).collect();
                let mut frees: Vec<usize> = inputs
                    .iter()
                    .copied()
                    .filter(|s| last_use.get(s) == Some(&i) && *s != output_slot)
                    .collect();
                frees.dedup();
                Step {
                    op,
                    inputs,
                    output: slot_of[&step.output],
                    frees,
                }
            })
            .collect();
        Self {
            steps,
            slots: slot_of.len(),
            input: 0,
            output: output_slot,
            device: device.clone(),
            quantized_layers: 0,
        }
    }

    /// The embeddings (`[N, D]`) of `input`, a batch in the model's own input layout and
    /// normalisation. An error names the step whose shapes did not fit.
    pub fn run(&self, input: Tensor<4>) -> Result<Tensor<2>, NativeError> {
        self.run_steps(input).map_err(NativeError::Shapes)
    }

    fn run_steps(&self, input: Tensor<4>) -> Result<Tensor<2>, String> {
        let mut slots: Vec<Option<Value>> = (0..self.slots).map(|_| None).collect();
        slots[self.input] = Some(Value::Maps(input.to_device(&self.device)));
        for (i, step) in self.steps.iter().enumerate() {
            // The last reader takes the value (a kernel may then overwrite it in place).
            let first = step.inputs[0];
            let x = if step.frees.contains(&first) && !step.inputs[1..].contains(&first) {
                slots[first].take()
            } else {
                slots[first].as_ref().map(clone)
            }
            .ok_or_else(|| format!("step {i}: an input was freed early"))?;
            let value = |s: usize| -> Result<&Value, String> {
                slots[s]
                    .as_ref()
                    .ok_or_else(|| format!("step {i}: an input was freed early"))
            };
            let second = step.inputs.get(1).map(|&s| value(s)).transpose()?;
            let out = self.apply(i, &step.op, x, second)?;
            for &s in &step.frees {
                slots[s] = None;
            }
            slots[step.output] = Some(out);
        }
        match slots[self.output].take() {
            Some(Value::Rows(r)) => Ok(r),
            Some(Value::Maps(m)) => {
                let [n, c, h, w] = m.dims();
                if h * w != 1 {
                    return Err(format!(
                        "the output is [{n}, {c}, {h}, {w}], not one embedding per image"
                    ));
                }
                Ok(m.reshape([n, c]))
            }
            None => Err("the output was never computed".into()),
        }
    }

    /// Step `i`'s op on its input `x` (and, for a binary op, `second`). `x` is owned: where no
    /// later step reads it, the kernels overwrite its buffer instead of allocating one.
    fn apply(&self, i: usize, op: &Op, x: Value, second: Option<&Value>) -> Result<Value, String> {
        Ok(match (op, x) {
            (Op::Conv(conv), Value::Maps(x)) => Value::Maps(qud_cpu_kernels::conv2d(conv, x)),
            (Op::ConvPrelu { conv, bias, slope }, Value::Maps(x)) => {
                let y = qud_cpu_kernels::conv2d(conv, x);
                let (dims, device) = (y.dims(), y.device());
                // The convolution's fresh output is moved out, not copied, and back in.
                let mut values: Vec<f32> = y
                    .into_data()
                    .try_into_vec()
                    .expect("the runner's values are f32");
                qud_cpu_kernels::bias_prelu_in_place_host(
                    &mut values,
                    bias,
                    slope,
                    dims[2] * dims[3],
                );
                Value::Maps(Tensor::from_data(TensorData::new(values, dims), &device))
            }
            (Op::Affine { scale, shift }, x) => {
                let mut x = x;
                if let Some(s) = scale {
                    x = per_channel(x, s, |a, b| a * b, |a, b| a * b);
                }
                if let Some(t) = shift {
                    x = per_channel(x, t, |a, b| a + b, |a, b| a + b);
                }
                x
            }
            (Op::PRelu(slope), Value::Maps(x)) => {
                Value::Maps(qud_cpu_kernels::prelu(x, slope.clone()))
            }
            (Op::PRelu(slope), Value::Rows(x)) => {
                Value::Rows(qud_cpu_kernels::prelu(x, slope.clone()))
            }
            (Op::Binary(kind), x) => {
                let y = second.ok_or_else(|| format!("step {i}: {kind:?} of one value"))?;
                binary(*kind, x, y)
                    .ok_or_else(|| format!("step {i}: {kind:?} of values of different ranks"))?
            }
            (Op::Relu, Value::Maps(x)) => Value::Maps(burn::tensor::activation::relu(x)),
            (Op::Relu, Value::Rows(x)) => Value::Rows(burn::tensor::activation::relu(x)),
            (Op::Sigmoid, Value::Maps(x)) => Value::Maps(burn::tensor::activation::sigmoid(x)),
            (Op::Sigmoid, Value::Rows(x)) => Value::Rows(burn::tensor::activation::sigmoid(x)),
            (Op::ToRows(width), x) => {
                let rows = match x {
                    Value::Maps(m) => {
                        let [n, c, h, w] = m.dims();
                        m.reshape([n, c * h * w])
                    }
                    Value::Rows(r) => r,
                };
                let [_, d] = rows.dims();
                if width.is_some_and(|w| w != d) {
                    return Err(format!(
                        "step {i}: the graph reshapes to {width:?} values per image, the \
                         image has {d}"
                    ));
                }
                Value::Rows(rows)
            }
            (Op::ToMaps([c, h, w]), x) => {
                let (n, d) = match &x {
                    Value::Maps(m) => {
                        let [n, a, b, e] = m.dims();
                        (n, a * b * e)
                    }
                    Value::Rows(r) => {
                        let [n, d] = r.dims();
                        (n, d)
                    }
                };
                if c * h * w != d {
                    return Err(format!(
                        "step {i}: cannot reshape {d} values per image to [{c}, {h}, {w}]"
                    ));
                }
                let flat = match x {
                    Value::Maps(m) => m.reshape([n, d]),
                    Value::Rows(r) => r,
                };
                Value::Maps(flat.reshape([n, *c, *h, *w]))
            }
            (Op::Transpose(perm), Value::Maps(x)) => Value::Maps(x.permute(*perm)),
            (Op::Flip(axis), Value::Maps(x)) => Value::Maps(x.flip([*axis])),
            (Op::Flip(axis), Value::Rows(x)) if *axis == 1 => Value::Rows(x.flip([1])),
            (Op::GlobalAveragePool, Value::Maps(x)) => Value::Maps(x.mean_dim(3).mean_dim(2)),
            (Op::Identity, x) => x,
            (Op::Linear { weight, bias }, x) => {
                let rows = match x {
                    Value::Rows(r) => r,
                    Value::Maps(_) => {
                        return Err(format!("step {i}: a matrix product of feature maps"))
                    }
                };
                let [_, d] = rows.dims();
                let [k, m] = weight.dims();
                if d != k {
                    return Err(format!(
                        "step {i}: a matrix product of {d} values with a [{k}, {m}] weight"
                    ));
                }
                let y = rows.matmul(weight.clone());
                Value::Rows(match bias {
                    Some(b) => y + b.clone().reshape([1, m]),
                    None => y,
                })
            }
            (
                Op::DynamicQuant {
                    inner,
                    scale,
                    shift,
                },
                x,
            ) => {
                let (centred, image_scales) = quantize_per_image(x);
                let y = self.apply(i, inner, centred, None)?;
                let mut y = rescale(y, &image_scales, scale, &self.device);
                if let Some(t) = shift {
                    y = per_channel(y, t, |a, b| a + b, |a, b| a + b);
                }
                y
            }
            _ => return Err(format!("step {i}: the op does not apply to this value")),
        })
    }
}

/// A host op's parameters on `device`.
fn upload_op(op: HostOp, device: &Device) -> Op {
    match op {
        HostOp::Conv {
            weight,
            dims,
            bias,
            stride,
            pads,
            dilation,
            groups,
            prelu,
        } => {
            let [out, per_group, kh, kw] = dims;
            let [top, left, bottom, right] = pads;
            let mut conv = Conv2dConfig::new([per_group * groups, out], [kh, kw])
                .with_stride(stride)
                .with_dilation(dilation)
                .with_groups(groups)
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .with_bias(false)
                .init(device);
            conv.weight =
                Param::from_tensor(Tensor::from_data(TensorData::new(weight, dims), device));
            match (bias, prelu) {
                (None, None) => Op::Conv(conv),
                (bias, slope) => Op::ConvPrelu {
                    conv,
                    bias: bias.unwrap_or_else(|| vec![0.0; out]),
                    slope: slope.unwrap_or_else(|| vec![1.0; out]),
                },
            }
        }
        HostOp::Affine { scale, shift } => Op::Affine {
            scale: scale.map(|v| vector(v, device)),
            shift: shift.map(|v| vector(v, device)),
        },
        HostOp::PRelu(slope) => Op::PRelu(vector(slope, device)),
        HostOp::Binary(kind) => Op::Binary(kind),
        HostOp::Relu => Op::Relu,
        HostOp::Sigmoid => Op::Sigmoid,
        HostOp::ToRows(width) => Op::ToRows(width),
        HostOp::ToMaps(dims) => Op::ToMaps(dims),
        HostOp::Transpose(perm) => Op::Transpose(perm),
        HostOp::Flip(axis) => Op::Flip(axis),
        HostOp::GlobalAveragePool => Op::GlobalAveragePool,
        HostOp::Identity => Op::Identity,
        HostOp::Linear { weight, k, m, bias } => Op::Linear {
            weight: Tensor::from_data(TensorData::new(weight, [k, m]), device),
            bias: bias.map(|v| vector(v, device)),
        },
        HostOp::DynamicQuant {
            inner,
            scale,
            shift,
        } => Op::DynamicQuant {
            inner: Box::new(upload_op(*inner, device)),
            scale,
            shift: shift.map(|t| vector(t, device)),
        },
    }
}

fn vector(v: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = v.len();
    Tensor::<1>::from_data(TensorData::new(v, [n]), device)
}

fn clone(x: &Value) -> Value {
    match x {
        Value::Rows(r) => Value::Rows(r.clone()),
        Value::Maps(m) => Value::Maps(m.clone()),
    }
}

/// `x op v` with `v` one value per channel (dimension 1) or one for all.
fn per_channel(
    x: Value,
    v: &Tensor<1>,
    rows: impl Fn(Tensor<2>, Tensor<2>) -> Tensor<2>,
    maps: impl Fn(Tensor<4>, Tensor<4>) -> Tensor<4>,
) -> Value {
    let n = v.dims()[0];
    match x {
        Value::Rows(r) => Value::Rows(rows(r, v.clone().reshape([1, n]))),
        Value::Maps(m) => Value::Maps(maps(m, v.clone().reshape([1, n, 1, 1]))),
    }
}

fn binary(kind: Binary, x: Value, y: &Value) -> Option<Value> {
    fn apply<const D: usize>(kind: Binary, a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
        match kind {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
        }
    }
    match (x, y) {
        (Value::Rows(a), Value::Rows(b)) => Some(Value::Rows(apply(kind, a, b.clone()))),
        (Value::Maps(a), Value::Maps(b)) => Some(Value::Maps(apply(kind, a, b.clone()))),
        _ => None,
    }
}

fn output_rank(op: &HostOp, input_rank: usize) -> usize {
    match op {
        HostOp::DynamicQuant { inner, .. } => output_rank(inner, input_rank),
        HostOp::ToRows(_) | HostOp::Linear { .. } => 2,
        HostOp::ToMaps(_) | HostOp::Conv { .. } | HostOp::GlobalAveragePool => 4,
        _ => input_rank,
    }
}

fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn int_attr(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn ints_attr(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

/// One node as a host step, or why it cannot be one.
fn map_node(
    node: &pb::NodeProto,
    opset: i64,
    constants: &HashMap<String, Constant>,
    ranks: &HashMap<String, usize>,
) -> Result<HostStep, NativeError> {
    let op = node.op_type.as_str();
    let input = |i: usize| node.input.get(i).filter(|s| !s.is_empty());
    let dynamic = |i: usize| input(i).filter(|n| ranks.contains_key(*n));
    let constant = |i: usize| input(i).and_then(|n| constants.get(n));
    let floats = |i: usize, what: &str| -> Result<(Vec<usize>, Vec<f32>), NativeError> {
        match constant(i) {
            Some(Constant::F32 { dims, values }) => Ok((dims.clone(), values.clone())),
            _ => Err(unsupported(node, format!("{what} is not a float constant"))),
        }
    };
    let output = node
        .output
        .first()
        .cloned()
        .ok_or_else(|| NativeError::Malformed(format!("node `{}` has no output", node.name)))?;
    // Extra outputs (Dropout's mask, BatchNormalization's training statistics) must be unused:
    // the runner computes only the first.
    let first = dynamic(0).cloned();
    let step = |op: HostOp, inputs: Vec<String>| HostStep {
        op,
        inputs,
        output: output.clone(),
    };
    let x = || {
        first
            .clone()
            .ok_or_else(|| unsupported(node, "its first input is not computed from the image"))
    };
    let rank = |name: &str| ranks[name];
    match op {
        "Conv" => {
            let (dims, weight) = floats(1, "the weight")?;
            let Ok(dims) = <[usize; 4]>::try_from(dims.as_slice()) else {
                return Err(unsupported(node, "only 2-D convolutions are mapped"));
            };
            let bias = match input(2) {
                Some(_) => Some(floats(2, "the bias")?.1),
                None => None,
            };
            let pair = |name: &str| -> Result<[usize; 2], NativeError> {
                match ints_attr(node, name).as_deref() {
                    None | Some([]) => Ok([1, 1]),
                    Some(&[a, b]) if a > 0 && b > 0 => Ok([a as usize, b as usize]),
                    Some(v) => Err(unsupported(node, format!("{name} {v:?}"))),
                }
            };
            let auto_pad =
                attr(node, "auto_pad").map(|a| String::from_utf8_lossy(&a.s).to_string());
            let pads = match (auto_pad.as_deref(), ints_attr(node, "pads").as_deref()) {
                (Some("VALID"), _) | (None | Some("NOTSET"), None) => [0; 4],
                (None | Some("NOTSET"), Some(&[t, l, b, r])) if t.min(l).min(b).min(r) >= 0 => {
                    [t as usize, l as usize, b as usize, r as usize]
                }
                (pad, pads) => return Err(unsupported(node, format!("padding {pad:?} {pads:?}"))),
            };
            let groups = int_attr(node, "group", 1);
            if groups < 1 || dims[0] % groups as usize != 0 {
                return Err(unsupported(node, format!("group {groups}")));
            }
            if let Some(k) = ints_attr(node, "kernel_shape") {
                if k != [dims[2] as i64, dims[3] as i64] {
                    return Err(unsupported(node, format!("kernel_shape {k:?} vs weight")));
                }
            }
            Ok(step(
                HostOp::Conv {
                    weight,
                    dims,
                    bias,
                    stride: pair("strides")?,
                    pads,
                    dilation: pair("dilations")?,
                    groups: groups as usize,
                    prelu: None,
                },
                vec![x()?],
            ))
        }
        "BatchNormalization" => {
            if int_attr(node, "training_mode", 0) != 0 {
                return Err(unsupported(node, "training mode"));
            }
            let eps = attr(node, "epsilon").map_or(1e-5, |a| a.f);
            let (_, gamma) = floats(1, "the scale")?;
            let (_, beta) = floats(2, "the bias")?;
            let (_, mean) = floats(3, "the mean")?;
            let (_, var) = floats(4, "the variance")?;
            let c = gamma.len();
            if [beta.len(), mean.len(), var.len()] != [c; 3] {
                return Err(unsupported(node, "parameters of different lengths"));
            }
            // In f64, as PyTorch's fold does, so that folding changes no value by more than
            // rounding.
            let scale: Vec<f32> = (0..c)
                .map(|i| (gamma[i] as f64 / (var[i] as f64 + eps as f64).sqrt()) as f32)
                .collect();
            let shift = (0..c)
                .map(|i| (beta[i] as f64 - mean[i] as f64 * scale[i] as f64) as f32)
                .collect();
            Ok(step(
                HostOp::Affine {
                    scale: Some(scale),
                    shift: Some(shift),
                },
                vec![x()?],
            ))
        }
        "PRelu" => {
            let (dims, slope) = floats(1, "the slope")?;
            let per_channel = slope.len() == 1
                || match rank(&x()?) {
                    4 => {
                        dims.iter().filter(|&&d| d != 1).count() <= 1
                            && dims.len() >= 3
                            && dims[dims.len() - 2..] == [1, 1]
                    }
                    _ => dims.iter().filter(|&&d| d != 1).count() <= 1,
                };
            if !per_channel {
                return Err(unsupported(node, format!("slope of shape {dims:?}")));
            }
            Ok(step(HostOp::PRelu(slope), vec![x()?]))
        }
        "Relu" => Ok(step(HostOp::Relu, vec![x()?])),
        "Sigmoid" => Ok(step(HostOp::Sigmoid, vec![x()?])),
        "Identity" | "Dropout" => Ok(step(HostOp::Identity, vec![x()?])),
        "Flatten" => match int_attr(node, "axis", 1) {
            1 => Ok(step(HostOp::ToRows(None), vec![x()?])),
            a => Err(unsupported(node, format!("axis {a}"))),
        },
        "Reshape" => {
            let shape = match constant(1) {
                Some(Constant::I64(v)) => v.clone(),
                _ => return Err(unsupported(node, "the shape is not a constant")),
            };
            // The first entry is the batch: 0 (copy), -1, or the 1 of a batch-1 export.
            let batch_first = matches!(shape.first(), Some(-1..=1));
            match shape.as_slice() {
                [_, -1] if batch_first => Ok(step(HostOp::ToRows(None), vec![x()?])),
                [_, d] if batch_first && *d > 0 => {
                    Ok(step(HostOp::ToRows(Some(*d as usize)), vec![x()?]))
                }
                [_, c, h, w] if batch_first && *c > 0 && *h > 0 && *w > 0 => Ok(step(
                    HostOp::ToMaps([*c as usize, *h as usize, *w as usize]),
                    vec![x()?],
                )),
                _ => Err(unsupported(node, format!("target shape {shape:?}"))),
            }
        }
        "Transpose" => {
            let perm = ints_attr(node, "perm").unwrap_or_default();
            match <[i64; 4]>::try_from(perm.as_slice()) {
                Ok(p) if p[0] == 0 && rank(&x()?) == 4 => {
                    let mut sorted = p;
                    sorted.sort_unstable();
                    if sorted != [0, 1, 2, 3] {
                        return Err(unsupported(node, format!("perm {p:?}")));
                    }
                    Ok(step(HostOp::Transpose(p.map(|v| v as usize)), vec![x()?]))
                }
                _ => Err(unsupported(
                    node,
                    format!("perm {perm:?} (only image-wise 4-D permutations are mapped)"),
                )),
            }
        }
        "Slice" => {
            let ints = |i: usize, attr_name: &str| -> Option<Vec<i64>> {
                if opset < 10 {
                    ints_attr(node, attr_name)
                } else {
                    match constant(i) {
                        Some(Constant::I64(v)) => Some(v.clone()),
                        _ => None,
                    }
                }
            };
            let (Some(starts), Some(ends)) = (ints(1, "starts"), ints(2, "ends")) else {
                return Err(unsupported(node, "starts and ends must be constants"));
            };
            let axes = ints(3, "axes").unwrap_or_else(|| (0..starts.len() as i64).collect());
            let steps = ints(4, "steps").unwrap_or_else(|| vec![1; starts.len()]);
            let r = rank(&x()?) as i64;
            match (
                starts.as_slice(),
                ends.as_slice(),
                axes.as_slice(),
                steps.as_slice(),
            ) {
                // The whole axis, reversed: start at the last element, end before the first.
                (&[s], &[e], &[a], &[-1])
                    if (s == -1 || s >= i32::MAX as i64) && e <= i32::MIN as i64 =>
                {
                    let axis = if a < 0 { a + r } else { a };
                    if axis < 1 || axis >= r {
                        return Err(unsupported(node, format!("axis {a}")));
                    }
                    Ok(step(HostOp::Flip(axis as usize), vec![x()?]))
                }
                (&[0], &[e], &[_], &[1]) if e >= i32::MAX as i64 => {
                    Ok(step(HostOp::Identity, vec![x()?]))
                }
                _ => Err(unsupported(
                    node,
                    format!(
                        "starts {starts:?} ends {ends:?} axes {axes:?} steps {steps:?} (only a \
                         whole axis, reversed or not)"
                    ),
                )),
            }
        }
        "GlobalAveragePool" => Ok(step(HostOp::GlobalAveragePool, vec![x()?])),
        "Gemm" | "MatMul" => {
            let gemm = op == "Gemm";
            if gemm && int_attr(node, "transA", 0) != 0 {
                return Err(unsupported(node, "transA"));
            }
            if rank(&x()?) != 2 {
                return Err(unsupported(node, "a matrix product of feature maps"));
            }
            let (dims, b) = floats(1, "the weight")?;
            let [r, c] = dims.as_slice() else {
                return Err(unsupported(node, format!("weight of shape {dims:?}")));
            };
            let (r, c) = (*r, *c);
            let trans_b = gemm && int_attr(node, "transB", 0) != 0;
            let alpha = if gemm {
                attr(node, "alpha").map_or(1.0, |a| a.f)
            } else {
                1.0
            };
            let beta = if gemm {
                attr(node, "beta").map_or(1.0, |a| a.f)
            } else {
                1.0
            };
            let (k, m) = if trans_b { (c, r) } else { (r, c) };
            let mut weight = vec![0f32; k * m];
            for i in 0..k {
                for j in 0..m {
                    let v = if trans_b { b[j * c + i] } else { b[i * c + j] };
                    weight[i * m + j] = alpha * v;
                }
            }
            let bias = match (gemm, input(2)) {
                (true, Some(_)) => {
                    let (_, bias) = floats(2, "the bias")?;
                    match bias.len() {
                        1 => Some(vec![beta * bias[0]; m]),
                        n if n == m => Some(bias.iter().map(|v| beta * v).collect()),
                        n => return Err(unsupported(node, format!("a bias of {n} values"))),
                    }
                }
                _ => None,
            };
            Ok(step(HostOp::Linear { weight, k, m, bias }, vec![x()?]))
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let kind = match op {
                "Add" => Binary::Add,
                "Sub" => Binary::Sub,
                "Mul" => Binary::Mul,
                _ => Binary::Div,
            };
            match (dynamic(0), dynamic(1)) {
                (Some(a), Some(b)) => {
                    if rank(a) != rank(b) {
                        return Err(unsupported(node, "operands of different ranks"));
                    }
                    Ok(step(HostOp::Binary(kind), vec![a.clone(), b.clone()]))
                }
                (Some(a), None) | (None, Some(a)) => {
                    let constant_first = dynamic(0).is_none();
                    let at = usize::from(!constant_first);
                    let (dims, values) = floats(at, "the other operand")?;
                    if !per_channel_shape(&dims, rank(a)) {
                        return Err(unsupported(
                            node,
                            format!(
                                "a constant of shape {dims:?} (one per channel or one for all)"
                            ),
                        ));
                    }
                    let affine = match (kind, constant_first) {
                        (Binary::Add, _) => HostOp::Affine {
                            scale: None,
                            shift: Some(values),
                        },
                        (Binary::Sub, false) => HostOp::Affine {
                            scale: None,
                            shift: Some(values.iter().map(|v| -v).collect()),
                        },
                        (Binary::Sub, true) => HostOp::Affine {
                            scale: Some(vec![-1.0]),
                            shift: Some(values),
                        },
                        (Binary::Mul, _) => HostOp::Affine {
                            scale: Some(values),
                            shift: None,
                        },
                        (Binary::Div, false) => HostOp::Affine {
                            scale: Some(values.iter().map(|v| 1.0 / v).collect()),
                            shift: None,
                        },
                        (Binary::Div, true) => {
                            return Err(unsupported(node, "a constant divided by the image"))
                        }
                    };
                    Ok(step(affine, vec![a.clone()]))
                }
                (None, None) => Err(unsupported(node, "no operand is computed from the image")),
            }
        }
        FUSED_QUANT_CONV | FUSED_QUANT_MATMUL => {
            // The float op on the centred integer weights (input 1), then the weight scales.
            let mut float = node.clone();
            float.op_type = if op == FUSED_QUANT_CONV {
                "Conv"
            } else {
                "MatMul"
            }
            .into();
            float.input.truncate(2);
            let inner = map_node(&float, opset, constants, ranks)?.op;
            let channels = match &inner {
                HostOp::Conv { dims, .. } => dims[0],
                HostOp::Linear { m, .. } => *m,
                _ => unreachable!("Conv and MatMul map to these"),
            };
            let (_, scale) = floats(2, "the weight scale")?;
            if scale.len() != 1 && scale.len() != channels {
                return Err(unsupported(
                    node,
                    format!("{} weight scales for {channels} channels", scale.len()),
                ));
            }
            Ok(step(
                HostOp::DynamicQuant {
                    inner: Box::new(inner),
                    scale,
                    shift: None,
                },
                vec![x()?],
            ))
        }
        _ => Err(unsupported(node, "op not mapped")),
    }
}

/// The op types of the steps [`fuse_dynamic_quantization`] writes.
const FUSED_QUANT_CONV: &str = "DynamicQuantizeLinear+ConvInteger";
const FUSED_QUANT_MATMUL: &str = "DynamicQuantizeLinear+MatMulInteger";

/// The graph's nodes with every chain `quantize_dynamic` writes for a Conv or a MatMul,
///
/// ```text
/// x_q, x_scale, x_zp = DynamicQuantizeLinear(x)
/// scales = Mul(x_scale, w_scale)               (w_scale: one, or one per output channel)
/// y = Mul(Cast(ConvInteger(x_q, w_q, x_zp, w_zp)), scales)     (or MatMulInteger)
/// ```
///
/// replaced by one node `FUSED_QUANT_*(x, w_q - w_zp, w_scale) -> y` with the ConvInteger's
/// attributes (the centred weights are added to `constants` as floats), and the nodes nothing
/// reads any more dropped; and the number of chains fused. A chain that differs in any way is
/// left as it is (and then maps to nothing: the graph runs on tract).
fn fuse_dynamic_quantization(
    nodes: &[pb::NodeProto],
    constants: &mut HashMap<String, Constant>,
    graph_output: &str,
) -> (Vec<pb::NodeProto>, usize) {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for out in &node.output {
            producer.insert(out, i);
        }
        for input in node.input.iter().filter(|n| !n.is_empty()) {
            readers.entry(input).or_default().push(i);
        }
    }
    let only_reader = |name: &str, op: &str| match readers.get(name).map(Vec::as_slice) {
        Some(&[r]) if nodes[r].op_type == op && name != graph_output => Some(r),
        _ => None,
    };
    let mut out: Vec<Option<pb::NodeProto>> = nodes.iter().cloned().map(Some).collect();
    let mut fused = 0;
    for (i, node) in nodes.iter().enumerate() {
        let kind = match node.op_type.as_str() {
            "ConvInteger" => FUSED_QUANT_CONV,
            "MatMulInteger" => FUSED_QUANT_MATMUL,
            _ => continue,
        };
        let chain = || -> Option<(String, Constant, String, usize, usize, String)> {
            let [x_q, w_q, x_zp, w_zp] = node.input.as_slice() else {
                return None;
            };
            let dql = &nodes[*producer.get(x_q.as_str())?];
            if dql.op_type != "DynamicQuantizeLinear"
                || dql.output.len() != 3
                || &dql.output[0] != x_q
                || &dql.output[2] != x_zp
            {
                return None;
            }
            let cast = only_reader(&node.output[0], "Cast")?;
            // Cast to FLOAT.
            if int_attr(&nodes[cast], "to", 0) != 1 {
                return None;
            }
            let mul = only_reader(&nodes[cast].output[0], "Mul")?;
            let scales = nodes[mul]
                .input
                .iter()
                .find(|n| **n != nodes[cast].output[0])?;
            let scale_mul = &nodes[*producer.get(scales.as_str())?];
            let w_scale = match scale_mul.input.as_slice() {
                [a, b] if *a == dql.output[1] => b,
                [a, b] if *b == dql.output[1] => a,
                _ => return None,
            };
            if scale_mul.op_type != "Mul"
                || !matches!(constants.get(w_scale), Some(Constant::F32 { .. }))
            {
                return None;
            }
            let centred = centred_weights(
                constants.get(w_q)?,
                constants.get(w_zp)?,
                kind == FUSED_QUANT_CONV,
            )?;
            Some((
                dql.input[0].clone(),
                centred,
                w_scale.clone(),
                cast,
                mul,
                format!("{w_q}:centred"),
            ))
        };
        let Some((x, centred, w_scale, cast, mul, centred_name)) = chain() else {
            continue;
        };
        constants.insert(centred_name.clone(), centred);
        out[i] = Some(pb::NodeProto {
            op_type: kind.into(),
            input: vec![x, centred_name, w_scale],
            output: vec![nodes[mul].output[0].clone()],
            ..node.clone()
        });
        out[cast] = None;
        out[mul] = None;
        fused += 1;
    }
    // Drop what nothing reads now (the DynamicQuantizeLinear and scale Mul of each chain).
    let mut needed: std::collections::HashSet<String> = [graph_output.to_string()].into();
    let mut kept: Vec<pb::NodeProto> = Vec::new();
    for node in out.into_iter().rev().flatten() {
        if node.output.iter().any(|o| needed.contains(o)) {
            needed.extend(node.input.iter().cloned());
            kept.push(node);
        }
    }
    kept.reverse();
    (kept, fused)
}

/// `w_q - w_zp` as floats (exact: 8-bit integers), with the zero point one for all or one per
/// output channel (dimension 0 of a Conv weight, 1 of a MatMul's `[k, m]`).
fn centred_weights(w_q: &Constant, w_zp: &Constant, conv: bool) -> Option<Constant> {
    let (Constant::Int8 { dims, values }, Constant::Int8 { values: zp, .. }) = (w_q, w_zp) else {
        return None;
    };
    let channels = if conv { *dims.first()? } else { *dims.get(1)? };
    if zp.len() != 1 && zp.len() != channels {
        return None;
    }
    let per_channel = values.len() / channels.max(1);
    let values = values
        .iter()
        .enumerate()
        .map(|(j, &w)| {
            let c = if conv { j / per_channel } else { j % channels };
            (w - zp[if zp.len() == 1 { 0 } else { c }]) as f32
        })
        .collect();
    Some(Constant::F32 {
        dims: dims.clone(),
        values,
    })
}

/// A Reshape of a float constant (`quantize_dynamic` reshapes each Conv's bias to `[1, C, 1, 1]`),
/// computed at load.
fn constant_reshape(
    node: &pb::NodeProto,
    constants: &HashMap<String, Constant>,
) -> Option<Constant> {
    if node.op_type != "Reshape" {
        return None;
    }
    let Some(Constant::F32 { dims, values }) = constants.get(node.input.first()?) else {
        return None;
    };
    let Some(Constant::I64(shape)) = constants.get(node.input.get(1)?) else {
        return None;
    };
    let allow_zero = int_attr(node, "allowzero", 0) != 0;
    let mut new: Vec<usize> = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (j, &d) in shape.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(j);
                new.push(1);
            }
            0 if !allow_zero => new.push(*dims.get(j)?),
            d => new.push(usize::try_from(d).ok()?),
        }
    }
    let known: usize = new.iter().product();
    if let Some(j) = infer {
        if known == 0 || values.len() % known != 0 {
            return None;
        }
        new[j] = values.len() / known;
    }
    (new.iter().product::<usize>() == values.len()).then(|| Constant::F32 {
        dims: new,
        values: values.clone(),
    })
}

/// Each image of `x` quantised on its own as ONNX's DynamicQuantizeLinear does
/// ([`qud_cpu_kernels::quantize_u8_per_image_in_place`]), returned centred (`q - zp`, integers as
/// floats) with each image's scale. onnxruntime runs a batch of one image this way.
fn quantize_per_image(x: Value) -> (Value, Vec<f32>) {
    let (shape, device, data) = match x {
        Value::Rows(r) => (r.dims().to_vec(), r.device(), r.into_data()),
        Value::Maps(m) => (m.dims().to_vec(), m.device(), m.into_data()),
    };
    let mut values: Vec<f32> = data.try_into_vec().expect("the runner's values are f32");
    let per_image = shape[1..].iter().product::<usize>();
    let scales = qud_cpu_kernels::quantize_u8_per_image_in_place(&mut values, per_image);
    let centred = TensorData::new(values, shape.clone());
    let value = match shape.len() {
        2 => Value::Rows(Tensor::from_data(centred, &device)),
        _ => Value::Maps(Tensor::from_data(centred, &device)),
    };
    (value, scales)
}

/// `y` (integer products) times `image_scales[n] x scale[c]`, the factor multiplied first in
/// f32 as onnxruntime's scale Mul does.
fn rescale(y: Value, image_scales: &[f32], scale: &[f32], device: &Device) -> Value {
    let n = image_scales.len();
    let channels = match &y {
        Value::Rows(r) => r.dims()[1],
        Value::Maps(m) => m.dims()[1],
    };
    let factors: Vec<f32> = image_scales
        .iter()
        .flat_map(|s| (0..channels).map(move |c| s * scale[if scale.len() == 1 { 0 } else { c }]))
        .collect();
    let factors = Tensor::<2>::from_data(TensorData::new(factors, [n, channels]), device);
    match y {
        Value::Rows(r) => Value::Rows(r * factors),
        Value::Maps(m) => Value::Maps(m * factors.reshape([n, channels, 1, 1])),
    }
}

/// Whether a constant of `dims` broadcasts against a rank-`rank` value as one number per channel
/// (dimension 1) or one number for all.
fn per_channel_shape(dims: &[usize], rank: usize) -> bool {
    let count: usize = dims.iter().product();
    if count == 1 {
        return dims.len() <= rank;
    }
    // NumPy broadcasting aligns trailing dimensions: a per-channel constant of a rank-4 value is
    // [C, 1, 1] or [1, C, 1, 1], of a rank-2 value [C] or [1, C].
    let trailing = rank - 1;
    dims.len() <= rank
        && dims.len() >= trailing
        && dims[..dims.len() - trailing].iter().all(|&d| d == 1)
        && dims[dims.len() - trailing + 1..].iter().all(|&d| d == 1)
}

/// Fuses every PReLU into the convolution that feeds it when nothing else reads that layer's
/// output: the bias and the PReLU then take one pass over the activation (run after
/// [`fold_affine`], whose folds must come first).
fn fuse_prelu(steps: Vec<HostStep>, graph_output: &str) -> Vec<HostStep> {
    let mut readers: HashMap<String, usize> = HashMap::new();
    for step in &steps {
        for name in &step.inputs {
            *readers.entry(name.clone()).or_default() += 1;
        }
    }
    let mut out: Vec<HostStep> = Vec::with_capacity(steps.len());
    for step in steps {
        if let HostOp::PRelu(slope) = &step.op {
            let source = &step.inputs[0];
            let alone = readers.get(source) == Some(&1) && source != graph_output;
            if let Some(producer) = out.iter_mut().rev().find(|s| &s.output == source) {
                if let HostOp::Conv { dims, prelu, .. } = &mut producer.op {
                    let channels = dims[0];
                    if alone && prelu.is_none() && (slope.len() == 1 || slope.len() == channels) {
                        *prelu = Some(match slope.as_slice() {
                            [one] => vec![*one; channels],
                            all => all.to_vec(),
                        });
                        producer.output = step.output.clone();
                        continue;
                    }
                }
            }
        }
        out.push(step);
    }
    out
}

/// Folds every `Affine` step into the Conv or Linear step that feeds it when nothing else reads
/// that layer's output: `(W x + b) s + t = (W s) x + (b s + t)`, per output channel.
fn fold_affine(steps: Vec<HostStep>, graph_output: &str) -> Vec<HostStep> {
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for step in &steps {
        for name in &step.inputs {
            *readers.entry(name.as_str()).or_default() += 1;
        }
    }
    let readers: HashMap<String, usize> = readers
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut out: Vec<HostStep> = Vec::with_capacity(steps.len());
    for step in steps {
        if let HostOp::Affine { scale, shift } = &step.op {
            let source = &step.inputs[0];
            let foldable = readers.get(source) == Some(&1) && source != graph_output;
            if let Some(producer) = out.iter_mut().rev().find(|s| &s.output == source) {
                if foldable && fold_into(&mut producer.op, scale.as_deref(), shift.as_deref()) {
                    producer.output = step.output.clone();
                    continue;
                }
            }
        }
        out.push(step);
    }
    out
}

fn fold_into(op: &mut HostOp, scale: Option<&[f32]>, shift: Option<&[f32]>) -> bool {
    // A shift after a quantised layer's rescale (its bias) joins that step.
    if let (HostOp::DynamicQuant { shift: own, .. }, None, Some(t)) = (&mut *op, scale, shift) {
        if own.is_none() {
            *own = Some(t.to_vec());
            return true;
        }
        return false;
    }
    let channels = match op {
        HostOp::Conv { dims, .. } => dims[0],
        HostOp::Linear { m, .. } => *m,
        _ => return false,
    };
    let pick = |v: Option<&[f32]>, default: f32, o: usize| match v {
        None => default,
        Some([one]) => *one,
        Some(v) => v[o],
    };
    if [scale, shift]
        .iter()
        .flatten()
        .any(|v| v.len() != 1 && v.len() != channels)
    {
        return false;
    }
    match op {
        HostOp::Conv {
            weight, dims, bias, ..
        } => {
            let per_out = dims[1] * dims[2] * dims[3];
            let b = bias.get_or_insert_with(|| vec![0.0; channels]);
            for o in 0..channels {
                let (s, t) = (pick(scale, 1.0, o), pick(shift, 0.0, o));
                weight[o * per_out..(o + 1) * per_out]
                    .iter_mut()
                    .for_each(|w| *w *= s);
                b[o] = b[o] * s + t;
            }
        }
        HostOp::Linear {
            weight, k, m, bias, ..
        } => {
            let b = bias.get_or_insert_with(|| vec![0.0; *m]);
            for o in 0..*m {
                let (s, t) = (pick(scale, 1.0, o), pick(shift, 0.0, o));
                for i in 0..*k {
                    weight[i * *m + o] *= s;
                }
                b[o] = b[o] * s + t;
            }
        }
        _ => unreachable!("checked above"),
    }
    true
}
