//! The `Backbone` trait, the PyTorch-compatible layers backbones are built from, and weight
//! import (PyTorch `.pth`, safetensors) and export (safetensors with PyTorch names).
//!
//! Backbones are Burn modules whose field names are the PyTorch attribute names of the reference
//! implementation, so a `state_dict` loads key for key (`layer1.0.bn1.weight`, `prelu.weight`,
//! `features.running_var`, ...) and an export loads back with PyTorch's `load_state_dict`.

pub mod kernels;
pub mod layers;
pub mod onnx_graph;
mod weights;

pub use onnx_graph::OnnxGraph;
pub use weights::{load_weights, save_safetensors, WeightError};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

/// A face-embedding network: `[N, 3, 112, 112]` RGB in [-1, 1] -> `[N, D]` unnormalised
/// embeddings. Train/eval follows Burn: on an autodiff device with training flags on
/// (`Module::train`), BatchNorm uses batch statistics; after `Module::valid()` it uses running
/// statistics.
pub trait Backbone: Module {
    fn forward(&self, images: Tensor<4>) -> Tensor<2>;
    fn embedding_dim(&self) -> usize;
    /// Registry name of the architecture (`mobilefacenet`, `iresnet50`, ...).
    fn arch(&self) -> &str;
    /// Multiply-accumulates of one forward pass on a 112x112 face: convolutions and linear
    /// layers (BatchNorm, PReLU and additions, a few percent, are left out, as ptflops and
    /// insightface's GFLOPs tables count).
    fn macs(&self) -> u64;
    /// For inference only (a teacher, `qud eval`, `qud embed`): fold the eval-mode BatchNorms into
    /// the neighbouring convolution and linear weights where that is exact up to rounding. The
    /// network computes the same function with fewer passes over its activations; it is no longer
    /// fit for training or for export with PyTorch's key names.
    fn fold_batchnorm(&mut self) {}
    /// Write the network as it runs in eval mode into `graph`, from [`OnnxGraph::INPUT`]
    /// (`[N, 3, 112, 112]`), naming nodes and weights as the PyTorch module does; returns the
    /// value holding the `[N, D]` embedding. BatchNorms folded by [`Backbone::fold_batchnorm`]
    /// write nothing. [`NotExportable`] for a network the graph writer does not cover.
    fn onnx_graph(&self, graph: &mut OnnxGraph) -> Result<String, NotExportable>;
}

/// A backbone whose ONNX graph qud does not write, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{arch}: no ONNX export: {reason}")]
pub struct NotExportable {
    pub arch: String,
    pub reason: String,
}

/// Anything that maps aligned faces to embeddings: every [`Backbone`], and models that are not
/// Burn modules (an ONNX teacher run by tract). Evaluation, embedding and the teacher cache take
/// this, so a new kind of model needs only this impl.
pub trait FaceEmbedder {
    /// `[N, 3, 112, 112]` RGB in [-1, 1] (on any device) -> `[N, D]` unnormalised embeddings on
    /// the same device.
    fn embed_faces(&self, images: Tensor<4>) -> Tensor<2>;
    /// `D`.
    fn output_dim(&self) -> usize;
}

impl<M: Backbone> FaceEmbedder for M {
    fn embed_faces(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
    fn output_dim(&self) -> usize {
        self.embedding_dim()
    }
}

/// Counts multiply-accumulates layer by layer, tracking the feature map's side.
#[derive(Clone, Debug)]
pub struct MacCounter {
    /// Current feature-map side (square maps).
    pub side: usize,
    pub total: u64,
}

impl MacCounter {
    /// Start at the input side (112 for faces).
    pub fn new(side: usize) -> Self {
        Self { side, total: 0 }
    }

    /// Count `conv` on the current map and move to its output side.
    pub fn conv(&mut self, conv: &burn::nn::conv::Conv2d) -> &mut Self {
        let [out, in_per_group, kh, kw] = conv.weight.shape().dims();
        let pad = match conv.padding {
            burn::nn::PaddingConfig2d::Explicit(top, _, bottom, _) => top + bottom,
            burn::nn::PaddingConfig2d::Valid => 0,
            burn::nn::PaddingConfig2d::Same => kh - 1,
        };
        let span = conv.dilation[0] * (kh - 1) + 1;
        self.side = (self.side + pad - span) / conv.stride[0] + 1;
        self.total += (self.side * self.side * out * in_per_group * kh * kw) as u64;
        self
    }

    /// Count a dense layer (`inputs x outputs`).
    pub fn linear(&mut self, inputs: usize, outputs: usize) -> &mut Self {
        self.total += (inputs * outputs) as u64;
        self
    }
}

/// Mixed precision: `model` with every trainable parameter cast to `dtype` *inside* the autodiff
/// graph, so that the forward computes in f16 / bf16 while the gradients land, in f32, on the
/// original parameters (the master weights the optimizer keeps). Frozen tensors and BatchNorm
/// running statistics are left as they are; [`layers::TorchBatchNorm`] normalises in f32.
pub fn cast_trainable<M: Module>(model: M, dtype: burn::tensor::FloatDType) -> M {
    struct Cast(burn::tensor::FloatDType);
    impl burn::module::ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if param.val().is_require_grad() {
                param.map(|tensor| tensor.cast(self.0))
            } else {
                param
            }
        }
    }
    model.map(&mut Cast(dtype))
}

/// Parameters as PyTorch counts them (`sum(p.numel() for p in model.parameters())`): every
/// weight, frozen ones included, BatchNorm running statistics excluded.
pub fn num_parameters<M: Module>(model: &M) -> usize {
    struct Counter {
        path: Vec<String>,
        count: usize,
    }
    impl ModuleVisitor for Counter {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let buffer = matches!(
                self.path.last().map(String::as_str),
                Some("running_mean" | "running_var")
            );
            if !buffer {
                self.count += param.shape().num_elements();
            }
        }
    }
    let mut counter = Counter {
        path: Vec::new(),
        count: 0,
    };
    model.visit(&mut counter);
    counter.count
}

#[cfg(test)]
mod tests;
