//! MobileFaceNet as QUD and cavaface define it (not insightface's `mbf`).
//!
//! Chen et al., "MobileFaceNets", 2018; layer layout and PyTorch attribute names of
//! cavaface's `backbone/mobilefacenet.py` (GDC head, `BatchNorm1d(D, affine=False)` embedding
//! norm as in QUD's student), so that its `state_dict` loads key for key:
//! `conv1.conv.weight`, `conv_3.model.0.conv_dw.prelu.weight`, `output_layer.linear.weight`, ...
//! With D = 512 it has 1,199,488 parameters.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use qud_backbone::kernels::conv2d as conv2d_fast;
use qud_backbone::layers::{
    conv2d, fold_conv_batchnorm, fold_linear_batchnorm, kaiming_fan_out_std, TorchBatchNorm,
    TorchLinear, TorchPRelu,
};
use qud_backbone::{Backbone, MacCounter, OnnxGraph};

/// Hyper-parameters of one convolution: channels, square kernel, stride, padding, groups.
#[derive(Clone, Copy, Debug)]
struct ConvSpec {
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl ConvSpec {
    fn pointwise(input: usize, output: usize) -> Self {
        Self {
            input,
            output,
            kernel: 1,
            stride: 1,
            padding: 0,
            groups: 1,
        }
    }

    fn build(self, device: &Device) -> Conv2d {
        conv2d(
            [self.input, self.output],
            self.kernel,
            self.stride,
            self.padding,
            self.groups,
            kaiming_fan_out_std(self.output, self.kernel),
            device,
        )
    }
}

/// `Conv_block`: conv (no bias) -> BatchNorm2d -> PReLU per channel.
#[derive(Module, Debug)]
pub struct ConvBlock {
    pub conv: Conv2d,
    pub bn: TorchBatchNorm,
    pub prelu: TorchPRelu,
}

impl ConvBlock {
    fn new(spec: ConvSpec, device: &Device) -> Self {
        Self {
            conv: spec.build(device),
            bn: TorchBatchNorm::new(spec.output, device),
            prelu: TorchPRelu::new(spec.output, device),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn
            .forward_prelu(conv2d_fast(&self.conv, x), &self.prelu)
    }

    /// `next.forward(self.forward(x))` for a depthwise `next`: this block's BatchNorm, PReLU and
    /// `next`'s convolution run as one op in training
    /// ([`TorchBatchNorm::forward_prelu_depthwise`]), so the widest activation of a
    /// `Depth_Wise` unit is never stored. The same values.
    pub fn forward_into(&self, next: &ConvBlock, x: Tensor<4>) -> Tensor<4> {
        let expanded = conv2d_fast(&self.conv, x);
        let convolved = self
            .bn
            .forward_prelu_depthwise(expanded, &self.prelu, &next.conv);
        next.bn.forward_prelu(convolved, &next.prelu)
    }

    fn fold(&mut self) {
        fold_conv_batchnorm(&mut self.conv, &mut self.bn);
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let x = g.conv(x, &self.conv, &format!("{name}.conv"));
        let x = g.batch_norm(&x, &self.bn, &format!("{name}.bn"));
        g.prelu(&x, &self.prelu, &format!("{name}.prelu"))
    }
}

/// `Linear_block`: conv (no bias) -> BatchNorm2d, no activation.
#[derive(Module, Debug)]
pub struct LinearBlock {
    pub conv: Conv2d,
    pub bn: TorchBatchNorm,
}

impl LinearBlock {
    fn new(spec: ConvSpec, device: &Device) -> Self {
        Self {
            conv: spec.build(device),
            bn: TorchBatchNorm::new(spec.output, device),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(conv2d_fast(&self.conv, x))
    }

    /// `shortcut + self.forward(x)`, the BatchNorm and the sum as one op in training.
    pub fn forward_add(&self, x: Tensor<4>, shortcut: Tensor<4>) -> Tensor<4> {
        self.bn.forward_add(conv2d_fast(&self.conv, x), shortcut)
    }

    fn fold(&mut self) {
        fold_conv_batchnorm(&mut self.conv, &mut self.bn);
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let x = g.conv(x, &self.conv, &format!("{name}.conv"));
        g.batch_norm(&x, &self.bn, &format!("{name}.bn"))
    }
}

/// `Depth_Wise`: 1x1 expansion to `groups` channels, depthwise 3x3, 1x1 linear projection,
/// plus the input when `residual`.
#[derive(Module, Debug)]
pub struct DepthWise {
    pub conv: ConvBlock,
    pub conv_dw: ConvBlock,
    pub project: LinearBlock,
    pub residual: bool,
}

impl DepthWise {
    fn new(
        input: usize,
        output: usize,
        stride: usize,
        groups: usize,
        residual: bool,
        device: &Device,
    ) -> Self {
        Self {
            conv: ConvBlock::new(ConvSpec::pointwise(input, groups), device),
            conv_dw: ConvBlock::new(
                ConvSpec {
                    input: groups,
                    output: groups,
                    kernel: 3,
                    stride,
                    padding: 1,
                    groups,
                },
                device,
            ),
            project: LinearBlock::new(ConvSpec::pointwise(groups, output), device),
            residual,
        }
    }

    fn fold(&mut self) {
        self.conv.fold();
        self.conv_dw.fold();
        self.project.fold();
    }

    fn count(&self, macs: &mut MacCounter) {
        macs.conv(&self.conv.conv)
            .conv(&self.conv_dw.conv)
            .conv(&self.project.conv);
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let y = self.conv.onnx(g, x, &format!("{name}.conv"));
        let y = self.conv_dw.onnx(g, &y, &format!("{name}.conv_dw"));
        let y = self.project.onnx(g, &y, &format!("{name}.project"));
        match self.residual {
            true => g.add(x, &y, &format!("{name}.add")),
            false => y,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let expanded = self.conv.forward_into(&self.conv_dw, x.clone());
        if self.residual {
            self.project.forward_add(expanded, x)
        } else {
            self.project.forward(expanded)
        }
    }
}

/// `Residual`: `blocks` residual `Depth_Wise` units at stride 1 (`model` is a `Sequential`).
#[derive(Module, Debug)]
pub struct Residual {
    pub model: Vec<DepthWise>,
}

impl Residual {
    fn new(channels: usize, blocks: usize, groups: usize, device: &Device) -> Self {
        Self {
            model: (0..blocks)
                .map(|_| DepthWise::new(channels, channels, 1, groups, true, device))
                .collect(),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.model.iter().fold(x, |x, block| block.forward(x))
    }

    fn fold(&mut self) {
        self.model.iter_mut().for_each(DepthWise::fold);
    }

    fn count(&self, macs: &mut MacCounter) {
        for block in &self.model {
            block.count(macs);
        }
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let mut x = x.to_string();
        for (i, block) in self.model.iter().enumerate() {
            x = block.onnx(g, &x, &format!("{name}.model.{i}"));
        }
        x
    }
}

/// The GDC head: 7x7 depthwise linear conv -> flatten -> Linear (no bias) -> BatchNorm1d
/// without affine parameters.
#[derive(Module, Debug)]
pub struct Gdc {
    pub conv_6_dw: LinearBlock,
    pub linear: TorchLinear,
    pub bn: TorchBatchNorm,
}

impl Gdc {
    fn new(embedding_dim: usize, device: &Device) -> Self {
        Self {
            conv_6_dw: LinearBlock::new(
                ConvSpec {
                    input: 512,
                    output: 512,
                    kernel: 7,
                    stride: 1,
                    padding: 0,
                    groups: 512,
                },
                device,
            ),
            linear: TorchLinear::new(512, embedding_dim, false, device).kaiming_fan_out(),
            bn: TorchBatchNorm::without_affine(embedding_dim, device),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x: Tensor<2> = self.conv_6_dw.forward(x).flatten(1, 3);
        self.bn.forward(self.linear.forward(x))
    }
}

/// MobileFaceNet for 112x112 faces.
#[derive(Module, Debug)]
pub struct MobileFaceNet {
    pub conv1: ConvBlock,
    pub conv2_dw: ConvBlock,
    pub conv_23: DepthWise,
    pub conv_3: Residual,
    pub conv_34: DepthWise,
    pub conv_4: Residual,
    pub conv_45: DepthWise,
    pub conv_5: Residual,
    pub conv_6_sep: ConvBlock,
    pub output_layer: Gdc,
    pub embedding_dim: usize,
}

impl MobileFaceNet {
    pub fn new(embedding_dim: usize, device: &Device) -> Self {
        let conv3x3 = |input, output, stride, groups| ConvSpec {
            input,
            output,
            kernel: 3,
            stride,
            padding: 1,
            groups,
        };
        Self {
            conv1: ConvBlock::new(conv3x3(3, 64, 2, 1), device),
            conv2_dw: ConvBlock::new(conv3x3(64, 64, 1, 64), device),
            conv_23: DepthWise::new(64, 64, 2, 128, false, device),
            conv_3: Residual::new(64, 4, 128, device),
            conv_34: DepthWise::new(64, 128, 2, 256, false, device),
            conv_4: Residual::new(128, 6, 256, device),
            conv_45: DepthWise::new(128, 128, 2, 512, false, device),
            conv_5: Residual::new(128, 2, 256, device),
            conv_6_sep: ConvBlock::new(ConvSpec::pointwise(128, 512), device),
            output_layer: Gdc::new(embedding_dim, device),
            embedding_dim,
        }
    }
}

impl Backbone for MobileFaceNet {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.conv1.forward_into(&self.conv2_dw, images);
        let x = self.conv_3.forward(self.conv_23.forward(x));
        let x = self.conv_4.forward(self.conv_34.forward(x));
        let x = self.conv_5.forward(self.conv_45.forward(x));
        self.output_layer.forward(self.conv_6_sep.forward(x))
    }

    fn macs(&self) -> u64 {
        let mut macs = MacCounter::new(112);
        macs.conv(&self.conv1.conv).conv(&self.conv2_dw.conv);
        for (down, blocks) in [
            (&self.conv_23, &self.conv_3),
            (&self.conv_34, &self.conv_4),
            (&self.conv_45, &self.conv_5),
        ] {
            down.count(&mut macs);
            blocks.count(&mut macs);
        }
        macs.conv(&self.conv_6_sep.conv)
            .conv(&self.output_layer.conv_6_dw.conv)
            .linear(512, self.embedding_dim);
        macs.total
    }

    fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    fn arch(&self) -> &str {
        "mobilefacenet"
    }

    fn onnx_graph(&self, g: &mut OnnxGraph) -> Result<String, qud_backbone::NotExportable> {
        let x = self.conv1.onnx(g, OnnxGraph::INPUT, "conv1");
        let x = self.conv2_dw.onnx(g, &x, "conv2_dw");
        let x = self.conv_23.onnx(g, &x, "conv_23");
        let x = self.conv_3.onnx(g, &x, "conv_3");
        let x = self.conv_34.onnx(g, &x, "conv_34");
        let x = self.conv_4.onnx(g, &x, "conv_4");
        let x = self.conv_45.onnx(g, &x, "conv_45");
        let x = self.conv_5.onnx(g, &x, "conv_5");
        let x = self.conv_6_sep.onnx(g, &x, "conv_6_sep");
        let head = &self.output_layer;
        let x = head.conv_6_dw.onnx(g, &x, "output_layer.conv_6_dw");
        let x = g.flatten(&x, "output_layer.flatten");
        let x = g.linear(&x, &head.linear, "output_layer.linear");
        Ok(g.batch_norm(&x, &head.bn, "output_layer.bn"))
    }

    fn fold_batchnorm(&mut self) {
        self.conv1.fold();
        self.conv2_dw.fold();
        for (down, blocks) in [
            (&mut self.conv_23, &mut self.conv_3),
            (&mut self.conv_34, &mut self.conv_4),
            (&mut self.conv_45, &mut self.conv_5),
        ] {
            down.fold();
            blocks.fold();
        }
        self.conv_6_sep.fold();
        let head = &mut self.output_layer;
        head.conv_6_dw.fold();
        fold_linear_batchnorm(&mut head.linear, &mut head.bn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qud_backbone::num_parameters;

    #[test]
    fn has_the_reference_parameter_count() {
        let model = MobileFaceNet::new(512, &qud_backend_flex::device());
        assert_eq!(num_parameters(&model), 1_199_488);
        let small = MobileFaceNet::new(128, &qud_backend_flex::device());
        assert_eq!(num_parameters(&small), 1_199_488 - 512 * 384);
    }

    #[test]
    fn maps_faces_to_embeddings_in_both_modes() {
        let device = qud_backend_flex::device();
        let train = device.clone().autodiff();
        let model = MobileFaceNet::new(64, &train);
        let x = Tensor::<4>::random(
            [2, 3, 112, 112],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &train,
        );
        let y = model.forward(x.clone());
        assert_eq!(y.dims(), [2, 64]);
        let eval = model.valid();
        let y = eval.forward(x.without_autodiff());
        assert_eq!(y.dims(), [2, 64]);
        assert!(y.is_finite().all().into_scalar::<bool>());
    }
}
