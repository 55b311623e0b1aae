//! The `Backbone` trait, the PyTorch-compatible layers backbones are built from, and weight
//! import (PyTorch `.pth`, safetensors) and export (safetensors with PyTorch names).
//!
//! Backbones are Burn modules whose field names are the PyTorch attribute names of the reference
//! implementation, so a `state_dict` loads key for key (`layer1.0.bn1.weight`, `prelu.weight`,
//! `features.running_var`, ...) and an export loads back with PyTorch's `load_state_dict`.

pub mod layers;
mod weights;

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
