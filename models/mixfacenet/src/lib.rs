//! ShuffleMixFaceNet-S: MixFaceNets' mixed-kernel depthwise network with channel shuffle, the third
//! student of the QUD code.
//!
//! Boutros et al., "MixFaceNets: Extremely Efficient Face Recognition Networks", IJCB 2021
//! (<https://arxiv.org/abs/2107.13046>), after Tan & Le, "MixConv", 2019. Layout, hyper-parameters
//! and PyTorch attribute names of `backbones/mixnetm.py` in the QUD repository
//! (<https://github.com/jankolf/QUD>), built as `mixnet_s(embedding_size=D, width_scale=1.0,
//! gdw_size=512, shuffle=True)`, so that its `state_dict` loads key for key:
//! `features.stage2.unit1.conv1.conv.0.weight`, `features.stage2.unit1.se.conv1.bias`,
//! `feautre_layer.pw_conv.conv.weight` (sic), `features_norm.running_var`, ... With D = 512 it has
//! 2,680,918 parameters.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};
use qud_backbone::kernels::conv2d as conv2d_fast;
use qud_backbone::layers::{fold_conv_batchnorm, TorchBatchNorm, TorchPRelu};
use qud_backbone::{Backbone, MacCounter, OnnxGraph};

/// One stage's units: output channels, expansion-conv kernel count, depthwise kernel count,
/// projection kernel count, expansion factor and squeeze-excitation factor (0: none).
type UnitSpec = (usize, usize, usize, usize, usize, usize);

/// MixNet-S as `get_mixnet("s")` lists it: stem 16 channels, then four stages.
const MIXNET_S: [&[UnitSpec]; 4] = [
    &[(24, 2, 1, 2, 6, 0), (24, 2, 1, 2, 3, 0)],
    &[
        (40, 1, 3, 1, 6, 2),
        (40, 2, 2, 2, 6, 2),
        (40, 2, 2, 2, 6, 2),
        (40, 2, 2, 2, 6, 2),
    ],
    &[
        (80, 1, 3, 2, 6, 4),
        (80, 1, 2, 2, 6, 4),
        (80, 1, 2, 2, 6, 4),
    ],
    &[
        (120, 2, 3, 2, 6, 2),
        (120, 2, 4, 2, 3, 2),
        (120, 2, 4, 2, 3, 2),
        (200, 1, 5, 1, 6, 2),
        (200, 1, 4, 2, 6, 2),
        (200, 1, 4, 2, 6, 2),
    ],
];
const STEM: usize = 16;
/// Channels of the last 1 x 1 block before the 7 x 7 head (`gdw_size`).
const GDW: usize = 512;

/// The activation after a block: PyTorch's `nn.PReLU(C)` (stem and first stage), Swish
/// (`x * sigmoid(x)`, later stages) or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    PRelu,
    Swish,
    None,
}

/// `nn.Conv2d` without bias, square kernel, `kaiming_uniform_` as `MixNet._init_params` draws it.
fn conv(
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    let padding = kernel / 2;
    Conv2dConfig::new([input, output], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_groups(groups)
        .with_bias(false)
        .with_initializer(Initializer::KaimingUniform {
            gain: 2f64.sqrt(),
            fan_out_only: false,
        })
        .init(device)
}

/// `nn.Conv2d(C, C', 1, bias=True)` with a zero bias (the squeeze-excitation layers).
fn conv1x1_biased(input: usize, output: usize, device: &Device) -> Conv2d {
    let mut layer = conv(input, output, 1, 1, 1, device);
    layer.bias = Some(Initializer::Zeros.init([output], device));
    layer
}

/// The channel counts MixConv splits `channels` into: equal parts, the remainder to the first.
fn split_channels(channels: usize, parts: usize) -> Vec<usize> {
    let mut split = vec![channels / parts; parts];
    split[0] += channels - channels / parts * parts;
    split
}

/// `ConvBlock` of the QUD code: convolution, BatchNorm2d (absent in the head's pointwise layer)
/// and an activation (`activ`, a PReLU's slopes when it has any).
#[derive(Module, Debug)]
pub struct ConvBlock {
    pub conv: Conv2d,
    pub bn: Option<TorchBatchNorm>,
    pub activ: Option<TorchPRelu>,
    pub swish: bool,
}

impl ConvBlock {
    fn new(conv: Conv2d, batch_norm: bool, act: Act, device: &Device) -> Self {
        let channels = conv.weight.dims()[0];
        Self {
            conv,
            bn: batch_norm.then(|| TorchBatchNorm::new(channels, device)),
            activ: (act == Act::PRelu).then(|| TorchPRelu::new(channels, device)),
            swish: act == Act::Swish,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = conv2d_fast(&self.conv, x);
        normalise_activate(self.bn.as_ref(), self.activ.as_ref(), self.swish, x)
    }

    fn fold(&mut self) {
        if let Some(bn) = &mut self.bn {
            fold_conv_batchnorm(&mut self.conv, bn);
        }
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let x = g.conv(x, &self.conv, &format!("{name}.conv"));
        onnx_normalise_activate(
            g,
            &x,
            self.bn.as_ref(),
            self.activ.as_ref(),
            self.swish,
            name,
        )
    }
}

fn normalise_activate(
    bn: Option<&TorchBatchNorm>,
    prelu: Option<&TorchPRelu>,
    swish: bool,
    x: Tensor<4>,
) -> Tensor<4> {
    let x = match (bn, prelu) {
        (Some(bn), Some(prelu)) => return bn.forward_prelu(x, prelu),
        (Some(bn), None) => bn.forward(x),
        (None, Some(prelu)) => return prelu.forward(x),
        (None, None) => x,
    };
    if swish {
        silu(x)
    } else {
        x
    }
}

fn onnx_normalise_activate(
    g: &mut OnnxGraph,
    x: &str,
    bn: Option<&TorchBatchNorm>,
    prelu: Option<&TorchPRelu>,
    swish: bool,
    name: &str,
) -> String {
    let mut x = x.to_string();
    if let Some(bn) = bn {
        x = g.batch_norm(&x, bn, &format!("{name}.bn"));
    }
    if let Some(prelu) = prelu {
        x = g.prelu(&x, prelu, &format!("{name}.activ"));
    }
    if swish {
        x = onnx_swish(g, &x, &format!("{name}.activ"));
    }
    x
}

fn onnx_swish(g: &mut OnnxGraph, x: &str, name: &str) -> String {
    let gate = g.node(
        "Sigmoid",
        &format!("{name}.sigmoid"),
        vec![x.into()],
        vec![],
    );
    g.node("Mul", &format!("{name}.mul"), vec![x.into(), gate], vec![])
}

/// `MixConvBlock`: the input's channels split into parts, each convolved by its own kernel size
/// (`conv.0`, `conv.1`, ...: 3 x 3, 5 x 5, ... depthwise, or 1 x 1 dense per part), concatenated,
/// then BatchNorm and the activation.
#[derive(Module, Debug)]
pub struct MixConvBlock {
    pub conv: Vec<Conv2d>,
    pub bn: TorchBatchNorm,
    pub activ: Option<TorchPRelu>,
    pub swish: bool,
}

impl MixConvBlock {
    /// Depthwise parts with kernels 3, 5, 7, ... (`kernels` of them) at `stride`.
    fn depthwise(
        channels: usize,
        kernels: usize,
        stride: usize,
        act: Act,
        device: &Device,
    ) -> Self {
        let convs = split_channels(channels, kernels)
            .into_iter()
            .enumerate()
            .map(|(i, c)| conv(c, c, 3 + 2 * i, stride, c, device))
            .collect();
        Self::with(convs, channels, act, device)
    }

    /// 1 x 1 parts: part `i` of the input to part `i` of the output.
    fn pointwise(input: usize, output: usize, parts: usize, act: Act, device: &Device) -> Self {
        let convs = split_channels(input, parts)
            .into_iter()
            .zip(split_channels(output, parts))
            .map(|(i, o)| conv(i, o, 1, 1, 1, device))
            .collect();
        Self::with(convs, output, act, device)
    }

    fn with(convs: Vec<Conv2d>, output: usize, act: Act, device: &Device) -> Self {
        Self {
            conv: convs,
            bn: TorchBatchNorm::new(output, device),
            activ: (act == Act::PRelu).then(|| TorchPRelu::new(output, device)),
            swish: act == Act::Swish,
        }
    }

    /// Input channels each part reads.
    fn input_split(&self) -> Vec<usize> {
        self.conv
            .iter()
            .map(|c| c.weight.dims()[1] * c.groups)
            .collect()
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let parts = x.split_with_sizes(self.input_split(), 1);
        let x = Tensor::cat(
            parts
                .into_iter()
                .zip(&self.conv)
                .map(|(part, conv)| conv2d_fast(conv, part))
                .collect(),
            1,
        );
        normalise_activate(Some(&self.bn), self.activ.as_ref(), self.swish, x)
    }

    /// The parts as one convolution with the same output: depthwise parts zero-padded to the
    /// largest kernel (their centres align, each padding being half its kernel), 1 x 1 parts as
    /// one block-diagonal 1 x 1 convolution. Exact; used by the ONNX export.
    fn merged(&self) -> Conv2d {
        let device = self.conv[0].weight.device();
        let depthwise = self.conv[0].groups > 1;
        let outputs: usize = self.conv.iter().map(|c| c.weight.dims()[0]).sum();
        let inputs: usize = self.input_split().iter().sum();
        let kernel = self.conv.iter().map(|c| c.weight.dims()[2]).max().unwrap();
        let per_group = if depthwise { 1 } else { inputs };
        let mut weight = vec![0f32; outputs * per_group * kernel * kernel];
        let (mut out0, mut in0) = (0, 0);
        for part in &self.conv {
            let [o, i, k, _] = part.weight.dims();
            let values = part.weight.val().into_data().try_to_vec::<f32>().unwrap();
            let shift = (kernel - k) / 2;
            for oc in 0..o {
                for ic in 0..i {
                    for y in 0..k {
                        for x in 0..k {
                            let column = if depthwise { 0 } else { in0 + ic };
                            let at = (((out0 + oc) * per_group + column) * kernel + y + shift)
                                * kernel
                                + x
                                + shift;
                            weight[at] = values[((oc * i + ic) * k + y) * k + x];
                        }
                    }
                }
            }
            out0 += o;
            in0 += i * part.groups;
        }
        let stride = self.conv[0].stride[0];
        let mut merged = conv(
            inputs,
            outputs,
            kernel,
            stride,
            if depthwise { outputs } else { 1 },
            &device,
        );
        merged.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(weight, [outputs, per_group, kernel, kernel]),
            &device,
        ));
        merged
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let merged = self.merged();
        let x = g.conv(x, &merged, &format!("{name}.conv"));
        onnx_normalise_activate(g, &x, Some(&self.bn), self.activ.as_ref(), self.swish, name)
    }

    fn count(&self, macs: &mut MacCounter) {
        let side = macs.side;
        let mut out_side = side;
        for conv in &self.conv {
            macs.side = side;
            macs.conv(conv);
            out_side = macs.side;
        }
        macs.side = out_side;
    }
}

/// A unit's convolution: one kernel (`ConvBlock`) or several (`MixConvBlock`), as the QUD code
/// chooses by the kernel count.
// Built once per model and never moved in a loop: the size difference costs nothing.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum UnitConv {
    Single(ConvBlock),
    Mixed(MixConvBlock),
}

impl UnitConv {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Single(block) => block.forward(x),
            Self::Mixed(block) => block.forward(x),
        }
    }

    fn fold(&mut self) {
        match self {
            Self::Single(block) => block.fold(),
            // Several convolutions share one BatchNorm: left as it is.
            Self::Mixed(_) => {}
        }
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        match self {
            Self::Single(block) => block.onnx(g, x, name),
            Self::Mixed(block) => block.onnx(g, x, name),
        }
    }

    fn count(&self, macs: &mut MacCounter) {
        match self {
            Self::Single(block) => {
                macs.conv(&block.conv);
            }
            Self::Mixed(block) => block.count(macs),
        }
    }
}

/// `SEBlock`: global average pool, 1 x 1 reduction with bias, the unit's activation, 1 x 1
/// expansion with bias, sigmoid, and the input scaled by it.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    pub conv1: Conv2d,
    pub activ: Option<TorchPRelu>,
    pub swish: bool,
    pub conv2: Conv2d,
}

impl SqueezeExcite {
    fn new(channels: usize, reduction: usize, act: Act, device: &Device) -> Self {
        let mid = channels / reduction;
        Self {
            conv1: conv1x1_biased(channels, mid, device),
            activ: (act == Act::PRelu).then(|| TorchPRelu::new(mid, device)),
            swish: act == Act::Swish,
            conv2: conv1x1_biased(mid, channels, device),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let pooled = x.clone().mean_dim(3).mean_dim(2);
        let w = self.conv1.forward(pooled);
        let w = normalise_activate(None, self.activ.as_ref(), self.swish, w);
        x * sigmoid(self.conv2.forward(w))
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let w = g.node(
            "GlobalAveragePool",
            &format!("{name}.pool"),
            vec![x.into()],
            vec![],
        );
        let w = g.conv(&w, &self.conv1, &format!("{name}.conv1"));
        let w = onnx_normalise_activate(g, &w, None, self.activ.as_ref(), self.swish, name);
        let w = g.conv(&w, &self.conv2, &format!("{name}.conv2"));
        let w = g.node("Sigmoid", &format!("{name}.sigmoid"), vec![w], vec![]);
        g.node("Mul", &format!("{name}.scale"), vec![x.into(), w], vec![])
    }
}

/// `MixUnit`: optional 1 x 1 expansion, (mixed) depthwise convolution, optional
/// squeeze-excitation, 1 x 1 projection, the input added when shapes allow, then a channel
/// shuffle over two groups.
#[derive(Module, Debug)]
pub struct MixUnit {
    pub exp_conv: Option<UnitConv>,
    pub conv1: UnitConv,
    pub se: Option<SqueezeExcite>,
    pub conv2: UnitConv,
    pub residual: bool,
}

impl MixUnit {
    fn new(input: usize, spec: UnitSpec, stride: usize, act: Act, device: &Device) -> Self {
        let (output, exp_kernels, dw_kernels, proj_kernels, expansion, se) = spec;
        let mid = expansion * input;
        let pointwise = |i, o, parts, act| match parts {
            1 => UnitConv::Single(ConvBlock::new(
                conv(i, o, 1, 1, 1, device),
                true,
                act,
                device,
            )),
            _ => UnitConv::Mixed(MixConvBlock::pointwise(i, o, parts, act, device)),
        };
        Self {
            exp_conv: (expansion > 1).then(|| pointwise(input, mid, exp_kernels, act)),
            conv1: match dw_kernels {
                1 => UnitConv::Single(ConvBlock::new(
                    conv(mid, mid, 3, stride, mid, device),
                    true,
                    act,
                    device,
                )),
                _ => UnitConv::Mixed(MixConvBlock::depthwise(
                    mid, dw_kernels, stride, act, device,
                )),
            },
            se: (se > 0).then(|| SqueezeExcite::new(mid, expansion * se, act, device)),
            conv2: pointwise(mid, output, proj_kernels, Act::None),
            residual: input == output && stride == 1,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut y = match &self.exp_conv {
            Some(exp) => exp.forward(x.clone()),
            None => x.clone(),
        };
        y = self.conv1.forward(y);
        if let Some(se) = &self.se {
            y = se.forward(y);
        }
        y = self.conv2.forward(y);
        if self.residual {
            y = y + x;
        }
        channel_shuffle(y)
    }

    fn fold(&mut self) {
        if let Some(exp) = &mut self.exp_conv {
            exp.fold();
        }
        self.conv1.fold();
        self.conv2.fold();
    }

    fn count(&self, macs: &mut MacCounter) {
        if let Some(exp) = &self.exp_conv {
            exp.count(macs);
        }
        self.conv1.count(macs);
        if let Some(se) = &self.se {
            let side = macs.side;
            macs.side = 1;
            macs.conv(&se.conv1).conv(&se.conv2);
            macs.side = side;
        }
        self.conv2.count(macs);
    }

    fn onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> String {
        let mut y = x.to_string();
        if let Some(exp) = &self.exp_conv {
            y = exp.onnx(g, &y, &format!("{name}.exp_conv"));
        }
        y = self.conv1.onnx(g, &y, &format!("{name}.conv1"));
        if let Some(se) = &self.se {
            y = se.onnx(g, &y, &format!("{name}.se"));
        }
        y = self.conv2.onnx(g, &y, &format!("{name}.conv2"));
        if self.residual {
            y = g.add(x, &y, &format!("{name}.add"));
        }
        onnx_channel_shuffle(
            g,
            &y,
            self.conv2.output_channels(),
            &format!("{name}.shuffle"),
        )
    }
}

impl UnitConv {
    fn output_channels(&self) -> usize {
        match self {
            Self::Single(block) => block.conv.weight.dims()[0],
            Self::Mixed(block) => block.bn.num_features,
        }
    }
}

/// `channel_shuffle2(x, 2)`: output channel `g * (C / 2) + i` is input channel `2 * i + g`.
fn channel_shuffle(x: Tensor<4>) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c / 2, 2, h, w])
        .swap_dims(1, 2)
        .reshape([n, c, h, w])
}

/// The shuffle as a 1 x 1 convolution with a permutation matrix (exact: one 1 per row), so that
/// the exported graph needs no 5-D reshape.
fn onnx_channel_shuffle(g: &mut OnnxGraph, x: &str, channels: usize, name: &str) -> String {
    let mut weight = vec![0f32; channels * channels];
    let half = channels / 2;
    for out in 0..channels {
        let source = (out % half) * 2 + out / half;
        weight[out * channels + source] = 1.0;
    }
    let device = burn::tensor::Device::default();
    let mut shuffle = conv(channels, channels, 1, 1, 1, &device);
    shuffle.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(weight, [channels, channels, 1, 1]),
        &device,
    ));
    g.conv(x, &shuffle, name)
}

/// `MixInitBlock`: 3 x 3 stride-2 convolution to 16 channels, then a residual unit.
#[derive(Module, Debug)]
pub struct InitBlock {
    pub conv1: ConvBlock,
    pub conv2: MixUnit,
}

/// A stage's units, `unit1`, `unit2`, ... as the PyTorch `Sequential` names them (up to eight).
#[derive(Module, Debug)]
pub struct Stage {
    pub unit1: Option<MixUnit>,
    pub unit2: Option<MixUnit>,
    pub unit3: Option<MixUnit>,
    pub unit4: Option<MixUnit>,
    pub unit5: Option<MixUnit>,
    pub unit6: Option<MixUnit>,
    pub unit7: Option<MixUnit>,
    pub unit8: Option<MixUnit>,
}

impl Stage {
    fn units(&self) -> impl Iterator<Item = &MixUnit> {
        [
            &self.unit1,
            &self.unit2,
            &self.unit3,
            &self.unit4,
            &self.unit5,
            &self.unit6,
            &self.unit7,
            &self.unit8,
        ]
        .into_iter()
        .flatten()
    }

    fn units_mut(&mut self) -> impl Iterator<Item = &mut MixUnit> {
        [
            &mut self.unit1,
            &mut self.unit2,
            &mut self.unit3,
            &mut self.unit4,
            &mut self.unit5,
            &mut self.unit6,
            &mut self.unit7,
            &mut self.unit8,
        ]
        .into_iter()
        .flatten()
    }
}

/// `features`: the stem and the four stages.
#[derive(Module, Debug)]
pub struct Features {
    pub init_block: InitBlock,
    pub stage1: Stage,
    pub stage2: Stage,
    pub stage3: Stage,
    pub stage4: Stage,
}

/// `DwsConvBlock` of the head: 7 x 7 depthwise with BatchNorm, then 1 x 1 to the embedding without
/// BatchNorm; neither activated.
#[derive(Module, Debug)]
pub struct DwsConvBlock {
    pub dw_conv: ConvBlock,
    pub pw_conv: ConvBlock,
}

/// ShuffleMixFaceNet-S for 112 x 112 faces.
#[derive(Module, Debug)]
pub struct ShuffleMixFaceNet {
    pub features: Features,
    pub tail: ConvBlock,
    /// The QUD code's spelling, kept so that its state dicts load.
    pub feautre_layer: DwsConvBlock,
    /// `BatchNorm1d(D)` whose weight stays 1 (`requires_grad = False`).
    pub features_norm: TorchBatchNorm,
    pub embedding_dim: usize,
}

impl ShuffleMixFaceNet {
    pub fn new(embedding_dim: usize, device: &Device) -> Self {
        let stem = ConvBlock::new(conv(3, STEM, 3, 2, 1, device), true, Act::PRelu, device);
        let init_block = InitBlock {
            conv1: stem,
            conv2: MixUnit::new(STEM, (STEM, 1, 1, 1, 1, 0), 1, Act::PRelu, device),
        };
        let mut input = STEM;
        let mut stages = MIXNET_S.iter().enumerate().map(|(i, specs)| {
            let mut units = specs.iter().enumerate().map(|(j, &spec)| {
                // Stride 2 opens stages 2 and 3 and halves stage 4 at its middle unit.
                let stride = match i {
                    1 | 2 if j == 0 => 2,
                    3 if j == specs.len() / 2 => 2,
                    _ => 1,
                };
                let act = if i == 0 { Act::PRelu } else { Act::Swish };
                let unit = MixUnit::new(input, spec, stride, act, device);
                input = spec.0;
                Some(unit)
            });
            let mut next = || units.next().flatten();
            Stage {
                unit1: next(),
                unit2: next(),
                unit3: next(),
                unit4: next(),
                unit5: next(),
                unit6: next(),
                unit7: next(),
                unit8: next(),
            }
        });
        let features = Features {
            init_block,
            stage1: stages.next().unwrap(),
            stage2: stages.next().unwrap(),
            stage3: stages.next().unwrap(),
            stage4: stages.next().unwrap(),
        };
        let last = MIXNET_S[3].last().unwrap().0;
        Self {
            features,
            tail: ConvBlock::new(conv(last, GDW, 1, 1, 1, device), true, Act::PRelu, device),
            feautre_layer: DwsConvBlock {
                dw_conv: ConvBlock::new(conv_valid(GDW, 7, device), true, Act::None, device),
                pw_conv: ConvBlock::new(
                    conv(GDW, embedding_dim, 1, 1, 1, device),
                    false,
                    Act::None,
                    device,
                ),
            },
            features_norm: TorchBatchNorm::new(embedding_dim, device).with_frozen_weight(),
            embedding_dim,
        }
    }

    fn stages(&self) -> [&Stage; 4] {
        let f = &self.features;
        [&f.stage1, &f.stage2, &f.stage3, &f.stage4]
    }
}

/// The head's 7 x 7 depthwise convolution, unpadded.
fn conv_valid(channels: usize, kernel: usize, device: &Device) -> Conv2d {
    let mut layer = conv(channels, channels, kernel, 1, channels, device);
    layer.padding = PaddingConfig2d::Explicit(0, 0, 0, 0);
    layer
}

impl Backbone for ShuffleMixFaceNet {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let init = &self.features.init_block;
        let mut x = init.conv2.forward(init.conv1.forward(images));
        for stage in self.stages() {
            for unit in stage.units() {
                x = unit.forward(x);
            }
        }
        let x = self.tail.forward(x);
        let x = self.feautre_layer.dw_conv.forward(x);
        let x: Tensor<2> = self.feautre_layer.pw_conv.forward(x).flatten(1, 3);
        self.features_norm.forward(x)
    }

    fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    fn arch(&self) -> &str {
        "shufflemixfacenet-s"
    }

    fn macs(&self) -> u64 {
        let mut macs = MacCounter::new(112);
        let init = &self.features.init_block;
        macs.conv(&init.conv1.conv);
        init.conv2.count(&mut macs);
        for stage in self.stages() {
            for unit in stage.units() {
                unit.count(&mut macs);
            }
        }
        macs.conv(&self.tail.conv)
            .conv(&self.feautre_layer.dw_conv.conv)
            .conv(&self.feautre_layer.pw_conv.conv);
        macs.total
    }

    fn fold_batchnorm(&mut self) {
        let f = &mut self.features;
        f.init_block.conv1.fold();
        f.init_block.conv2.fold();
        for stage in [&mut f.stage1, &mut f.stage2, &mut f.stage3, &mut f.stage4] {
            stage.units_mut().for_each(MixUnit::fold);
        }
        self.tail.fold();
        self.feautre_layer.dw_conv.fold();
    }

    fn onnx_graph(&self, g: &mut OnnxGraph) -> Result<String, qud_backbone::NotExportable> {
        let init = &self.features.init_block;
        let mut x = init
            .conv1
            .onnx(g, OnnxGraph::INPUT, "features.init_block.conv1");
        x = init.conv2.onnx(g, &x, "features.init_block.conv2");
        for (s, stage) in self.stages().into_iter().enumerate() {
            for (u, unit) in stage.units().enumerate() {
                x = unit.onnx(g, &x, &format!("features.stage{}.unit{}", s + 1, u + 1));
            }
        }
        x = self.tail.onnx(g, &x, "tail");
        x = self
            .feautre_layer
            .dw_conv
            .onnx(g, &x, "feautre_layer.dw_conv");
        x = self
            .feautre_layer
            .pw_conv
            .onnx(g, &x, "feautre_layer.pw_conv");
        let x = g.flatten(&x, "flatten");
        Ok(g.batch_norm(&x, &self.features_norm, "features_norm"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qud_backbone::num_parameters;

    #[test]
    fn has_the_reference_parameter_count() {
        // `sum(p.numel() for p in mixnet_s(512, width_scale=1.0, gdw_size=512).parameters())`.
        let model = ShuffleMixFaceNet::new(512, &qud_backend_flex::device());
        assert_eq!(num_parameters(&model), 2_680_918);
    }

    #[test]
    fn channel_shuffle_takes_even_channels_then_odd_ones() {
        // torch: channel_shuffle2(torch.arange(6.).view(1, 6, 1, 1), 2).flatten() == [0, 2, 4, 1, 3, 5]
        let device = qud_backend_flex::device();
        let x = Tensor::<1, Int>::arange(0..6, &device)
            .float()
            .reshape([1, 6, 1, 1]);
        let y = channel_shuffle(x).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(y, [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]);
    }

    #[test]
    fn maps_faces_to_embeddings_in_both_modes() {
        let device = qud_backend_flex::device();
        let train = device.clone().autodiff();
        let model = ShuffleMixFaceNet::new(64, &train);
        let x = Tensor::<4>::random(
            [2, 3, 112, 112],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &train,
        );
        assert_eq!(model.forward(x.clone()).dims(), [2, 64]);
        let y = model.valid().forward(x.without_autodiff());
        assert_eq!(y.dims(), [2, 64]);
        assert!(y.is_finite().all().into_scalar::<bool>());
    }
}
