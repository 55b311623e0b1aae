//! The iResNet family of insightface `arcface_torch` (`backbones/iresnet.py`): iresnet18, 34,
//! 50, 100 and 200, the usual ArcFace teachers.
//!
//! Duta et al., "Improved Residual Networks", 2020, as adapted by insightface (Deng et al.,
//! ArcFace, CVPR 2019). Attribute names follow the PyTorch module so that a `backbone.pth` loads
//! key for key: `conv1.weight`, `layer1.0.bn1.weight`, `layer2.0.downsample.0.weight`,
//! `fc.weight`, `features.running_var`, ...

use burn::nn::conv::Conv2d;
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use qud_backbone::kernels::conv2d as conv2d_fast;
use qud_backbone::layers::{
    conv2d, fold_batchnorm_linear, fold_conv_batchnorm, fold_linear_batchnorm, TorchBatchNorm,
    TorchLinear, TorchPRelu,
};
use qud_backbone::{Backbone, MacCounter, OnnxGraph};

/// Blocks per stage of each depth, as insightface defines them.
pub const DEPTHS: &[(&str, [usize; 4])] = &[
    ("iresnet18", [2, 2, 2, 2]),
    ("iresnet34", [3, 4, 6, 3]),
    ("iresnet50", [3, 4, 14, 3]),
    ("iresnet100", [3, 13, 30, 3]),
    ("iresnet200", [6, 26, 60, 6]),
];

/// insightface initialises every convolution N(0, 0.1).
const CONV_STD: f64 = 0.1;

/// `IBasicBlock`: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (possibly
/// downsampled) input.
#[derive(Module, Debug)]
pub struct IBasicBlock {
    pub bn1: TorchBatchNorm,
    pub conv1: Conv2d,
    pub bn2: TorchBatchNorm,
    pub prelu: TorchPRelu,
    pub conv2: Conv2d,
    pub bn3: TorchBatchNorm,
    /// `Sequential(conv1x1(stride), BatchNorm2d)`: keys `downsample.0.*`, `downsample.1.*`.
    pub downsample: Option<(Conv2d, TorchBatchNorm)>,
}

impl IBasicBlock {
    fn new(input: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let downsample = (stride != 1 || input != planes).then(|| {
            (
                conv2d([input, planes], 1, stride, 0, 1, CONV_STD, device),
                TorchBatchNorm::new(planes, device),
            )
        });
        Self {
            bn1: TorchBatchNorm::new(input, device),
            conv1: conv2d([input, planes], 3, 1, 1, 1, CONV_STD, device),
            bn2: TorchBatchNorm::new(planes, device),
            prelu: TorchPRelu::new(planes, device),
            conv2: conv2d([planes, planes], 3, stride, 1, 1, CONV_STD, device),
            bn3: TorchBatchNorm::new(planes, device),
            downsample,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let out = conv2d_fast(&self.conv1, self.bn1.forward(x.clone()));
        let out = conv2d_fast(&self.conv2, self.bn2.forward_prelu(out, &self.prelu));
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(conv2d_fast(conv, x)),
            None => x,
        };
        self.bn3.forward_add(out, identity)
    }

    /// `bn2` and `bn3` and the downsampling BatchNorm follow convolutions; `bn1` precedes a
    /// padded one and stays.
    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let out = g.batch_norm(x, &self.bn1, &format!("{name}.bn1"));
        let out = g.conv(&out, &self.conv1, &format!("{name}.conv1"));
        let out = g.batch_norm(&out, &self.bn2, &format!("{name}.bn2"));
        let out = g.prelu(&out, &self.prelu, &format!("{name}.prelu"));
        let out = g.conv(&out, &self.conv2, &format!("{name}.conv2"));
        let out = g.batch_norm(&out, &self.bn3, &format!("{name}.bn3"));
        let identity = match &self.downsample {
            Some((conv, bn)) => {
                let y = g.conv(x, conv, &format!("{name}.downsample.0"));
                g.batch_norm(&y, bn, &format!("{name}.downsample.1"))
            }
            None => x.to_string(),
        };
        g.add(&out, &identity, &format!("{name}.add"))
    }

    fn fold(&mut self) {
        fold_conv_batchnorm(&mut self.conv1, &mut self.bn2);
        fold_conv_batchnorm(&mut self.conv2, &mut self.bn3);
        if let Some((conv, bn)) = &mut self.downsample {
            fold_conv_batchnorm(conv, bn);
        }
    }
}

/// An iResNet for 112x112 faces.
#[derive(Module, Debug)]
pub struct IResNet {
    pub conv1: Conv2d,
    pub bn1: TorchBatchNorm,
    pub prelu: TorchPRelu,
    pub layer1: Vec<IBasicBlock>,
    pub layer2: Vec<IBasicBlock>,
    pub layer3: Vec<IBasicBlock>,
    pub layer4: Vec<IBasicBlock>,
    pub bn2: TorchBatchNorm,
    pub dropout: Dropout,
    pub fc: TorchLinear,
    /// BatchNorm1d whose weight stays 1 (not trained), as insightface sets it.
    pub features: TorchBatchNorm,
    pub arch: String,
    pub embedding_dim: usize,
}

impl IResNet {
    /// `arch` is one of [`DEPTHS`]; `dropout` is insightface's `dropout` (0 by default).
    pub fn new(arch: &str, embedding_dim: usize, dropout: f64, device: &Device) -> Option<Self> {
        let (_, blocks) = DEPTHS.iter().find(|(name, _)| *name == arch)?;
        let mut input = 64;
        // Each stage halves the resolution in its first block.
        let mut stage = |planes: usize, count: usize| -> Vec<IBasicBlock> {
            (0..count)
                .map(|i| {
                    let block = IBasicBlock::new(input, planes, if i == 0 { 2 } else { 1 }, device);
                    input = planes;
                    block
                })
                .collect()
        };
        let layer1 = stage(64, blocks[0]);
        let layer2 = stage(128, blocks[1]);
        let layer3 = stage(256, blocks[2]);
        let layer4 = stage(512, blocks[3]);
        Some(Self {
            conv1: conv2d([3, 64], 3, 1, 1, 1, CONV_STD, device),
            bn1: TorchBatchNorm::new(64, device),
            prelu: TorchPRelu::new(64, device),
            layer1,
            layer2,
            layer3,
            layer4,
            bn2: TorchBatchNorm::new(512, device),
            dropout: DropoutConfig::new(dropout).init(),
            fc: TorchLinear::new(512 * 7 * 7, embedding_dim, true, device),
            features: TorchBatchNorm::new(embedding_dim, device).with_frozen_weight(),
            arch: arch.to_string(),
            embedding_dim,
        })
    }
}

impl Backbone for IResNet {
    fn macs(&self) -> u64 {
        let mut macs = MacCounter::new(112);
        macs.conv(&self.conv1);
        for block in [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .into_iter()
            .flatten()
        {
            let side = macs.side;
            if let Some((conv, _)) = &block.downsample {
                macs.conv(conv);
                macs.side = side;
            }
            macs.conv(&block.conv1).conv(&block.conv2);
        }
        macs.linear(512 * 7 * 7, self.embedding_dim);
        macs.total
    }

    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self
            .bn1
            .forward_prelu(conv2d_fast(&self.conv1, images), &self.prelu);
        let x = [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .into_iter()
            .flatten()
            .fold(x, |x, block| block.forward(x));
        let x: Tensor<2> = self.bn2.forward(x).flatten(1, 3);
        self.features
            .forward(self.fc.forward(self.dropout.forward(x)))
    }

    fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    fn arch(&self) -> &str {
        &self.arch
    }

    fn onnx_graph(&self, g: &mut OnnxGraph) -> Result<String, qud_backbone::NotExportable> {
        let x = g.conv(OnnxGraph::INPUT, &self.conv1, "conv1");
        let x = g.batch_norm(&x, &self.bn1, "bn1");
        let mut x = g.prelu(&x, &self.prelu, "prelu");
        for (stage, blocks) in [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .into_iter()
            .enumerate()
        {
            for (i, block) in blocks.iter().enumerate() {
                x = block.onnx(g, &x, &format!("layer{}.{i}", stage + 1));
            }
        }
        let x = g.batch_norm(&x, &self.bn2, "bn2");
        // Dropout is the identity in eval mode.
        let x = g.flatten(&x, "flatten");
        let x = g.linear(&x, &self.fc, "fc");
        Ok(g.batch_norm(&x, &self.features, "features"))
    }

    fn fold_batchnorm(&mut self) {
        fold_conv_batchnorm(&mut self.conv1, &mut self.bn1);
        for block in [
            &mut self.layer1,
            &mut self.layer2,
            &mut self.layer3,
            &mut self.layer4,
        ]
        .into_iter()
        .flatten()
        {
            block.fold();
        }
        // Dropout between `bn2` and `fc` is the identity at inference.
        fold_batchnorm_linear(&mut self.bn2, &mut self.fc);
        fold_linear_batchnorm(&mut self.fc, &mut self.features);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qud_backbone::num_parameters;

    #[test]
    fn has_the_reference_parameter_counts() {
        let device = qud_backend_flex::device();
        let count = |arch| num_parameters(&IResNet::new(arch, 512, 0.0, &device).unwrap());
        assert_eq!(count("iresnet50"), 43_590_848);
        assert_eq!(count("iresnet100"), 65_156_160);
    }

    #[test]
    fn iresnet18_embeds_faces() {
        let device = qud_backend_flex::device();
        let model = IResNet::new("iresnet18", 32, 0.0, &device).unwrap();
        let x = Tensor::<4>::random(
            [1, 3, 112, 112],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let y = model.forward(x);
        assert_eq!(y.dims(), [1, 32]);
        assert!(IResNet::new("iresnet19", 512, 0.0, &device).is_none());
    }
}
