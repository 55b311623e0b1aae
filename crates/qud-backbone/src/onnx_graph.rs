//! A network as an ONNX graph: operators over named values and weights as initializers, written
//! by each backbone ([`crate::Backbone::onnx_graph`]) layer by layer in forward order. It knows
//! no protobuf: `qud-onnx` turns it into an ONNX `ModelProto`.
//!
//! Operators are those of the ONNX standard (opset 13): `Conv`, `BatchNormalization`, `PRelu`,
//! `Add`, `Flatten`, `Gemm`. BatchNorms already folded into their neighbours
//! ([`crate::Backbone::fold_batchnorm`]) write nothing.

use crate::layers::{TorchBatchNorm, TorchLinear, TorchPRelu};
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::prelude::*;

/// An operator attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum Attribute {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// One operator: `op` over `inputs`, producing `output`.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: &'static str,
    pub name: String,
    pub inputs: Vec<String>,
    pub output: String,
    pub attributes: Vec<(&'static str, Attribute)>,
}

/// A constant tensor of the graph (float32).
#[derive(Clone, Debug, PartialEq)]
pub struct Initializer {
    pub name: String,
    pub dims: Vec<usize>,
    pub values: Vec<f32>,
}

/// The graph being written: the input is the value [`OnnxGraph::INPUT`], `[N, 3, 112, 112]`.
#[derive(Clone, Debug, Default)]
pub struct OnnxGraph {
    pub nodes: Vec<Node>,
    pub initializers: Vec<Initializer>,
}

fn values<const D: usize>(tensor: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let dims = tensor.dims().to_vec();
    let data = tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .expect("float32 weights");
    (dims, data)
}

impl OnnxGraph {
    /// Name of the graph's input value.
    pub const INPUT: &'static str = "input";

    pub fn new() -> Self {
        Self::default()
    }

    /// Add a constant named `name` and return its name.
    pub fn constant(&mut self, name: &str, dims: Vec<usize>, values: Vec<f32>) -> String {
        assert_eq!(dims.iter().product::<usize>(), values.len(), "{name}");
        self.initializers.push(Initializer {
            name: name.to_string(),
            dims,
            values,
        });
        name.to_string()
    }

    fn tensor<const D: usize>(&mut self, name: &str, tensor: Tensor<D>) -> String {
        let (dims, values) = values(tensor);
        self.constant(name, dims, values)
    }

    /// Append `op` named `name` over `inputs`; its output value is `name` too.
    pub fn node(
        &mut self,
        op: &'static str,
        name: &str,
        inputs: Vec<String>,
        attributes: Vec<(&'static str, Attribute)>,
    ) -> String {
        self.nodes.push(Node {
            op,
            name: name.to_string(),
            inputs,
            output: name.to_string(),
            attributes,
        });
        name.to_string()
    }

    /// `conv` (PyTorch name `name`: weights `name.weight`, `name.bias`) applied to `x`.
    pub fn conv(&mut self, x: &str, conv: &Conv2d, name: &str) -> String {
        let weight = self.tensor(&format!("{name}.weight"), conv.weight.val());
        let mut inputs = vec![x.to_string(), weight];
        if let Some(bias) = &conv.bias {
            inputs.push(self.tensor(&format!("{name}.bias"), bias.val()));
        }
        let [top, left, bottom, right] = match conv.padding {
            PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
            PaddingConfig2d::Valid => [0; 4],
            PaddingConfig2d::Same => {
                let [kh, kw] = conv.kernel_size;
                [(kh - 1) / 2, (kw - 1) / 2, kh / 2, kw / 2]
            }
        };
        let ints = |v: &[usize]| Attribute::Ints(v.iter().map(|&x| x as i64).collect());
        let attributes = vec![
            ("kernel_shape", ints(&conv.kernel_size)),
            ("strides", ints(&conv.stride)),
            ("dilations", ints(&conv.dilation)),
            ("pads", ints(&[top, left, bottom, right])),
            ("group", Attribute::Int(conv.groups as i64)),
        ];
        self.node("Conv", name, inputs, attributes)
    }

    /// Eval-mode `bn` (running statistics) applied to `x`; `x` itself when `bn` is folded.
    pub fn batch_norm(&mut self, x: &str, bn: &TorchBatchNorm, name: &str) -> String {
        if bn.folded {
            return x.to_string();
        }
        let n = bn.num_features;
        let device = bn.running_mean.value().device();
        let weight = bn
            .weight
            .as_ref()
            .map_or(Tensor::ones([n], &device), |w| w.val());
        let bias = bn
            .bias
            .as_ref()
            .map_or(Tensor::zeros([n], &device), |b| b.val());
        let inputs = vec![
            x.to_string(),
            self.tensor(&format!("{name}.weight"), weight),
            self.tensor(&format!("{name}.bias"), bias),
            self.tensor(&format!("{name}.running_mean"), bn.running_mean.value()),
            self.tensor(&format!("{name}.running_var"), bn.running_var.value()),
        ];
        let epsilon = vec![("epsilon", Attribute::Float(bn.epsilon as f32))];
        self.node("BatchNormalization", name, inputs, epsilon)
    }

    /// `prelu` over the channels of the `[N, C, H, W]` value `x`.
    pub fn prelu(&mut self, x: &str, prelu: &TorchPRelu, name: &str) -> String {
        let (dims, slopes) = values(prelu.weight.val());
        // ONNX broadcasts the slope from the right: [C, 1, 1] against [N, C, H, W].
        let slope = self.constant(&format!("{name}.weight"), vec![dims[0], 1, 1], slopes);
        self.node("PRelu", name, vec![x.to_string(), slope], Vec::new())
    }

    pub fn add(&mut self, a: &str, b: &str, name: &str) -> String {
        self.node("Add", name, vec![a.to_string(), b.to_string()], Vec::new())
    }

    /// `[N, ...]` to `[N, rest]`.
    pub fn flatten(&mut self, x: &str, name: &str) -> String {
        let axis = vec![("axis", Attribute::Int(1))];
        self.node("Flatten", name, vec![x.to_string()], axis)
    }

    /// `linear` (PyTorch layout `[out, in]`) applied to the `[N, in]` value `x`.
    pub fn linear(&mut self, x: &str, linear: &TorchLinear, name: &str) -> String {
        let weight = self.tensor(&format!("{name}.weight"), linear.weight.val());
        let mut inputs = vec![x.to_string(), weight];
        if let Some(bias) = &linear.bias {
            inputs.push(self.tensor(&format!("{name}.bias"), bias.val()));
        }
        let transposed = vec![("transB", Attribute::Int(1))];
        self.node("Gemm", name, inputs, transposed)
    }

    /// Rename the value `from` (a node's output) to `to`, where it is made and where it is used.
    pub fn rename(&mut self, from: &str, to: &str) {
        for node in &mut self.nodes {
            if node.output == from {
                node.output = to.to_string();
            }
            for input in &mut node.inputs {
                if input == from {
                    *input = to.to_string();
                }
            }
        }
    }
}
