//! TransFace: a ViT face-recognition network, the QUD paper's strongest teacher.
//!
//! Dan et al., "TransFace: Calibrating Transformer Training for Face Recognition from a
//! Data-Centric Perspective", ICCV 2023 (<https://arxiv.org/abs/2308.10133>). Layout and PyTorch
//! attribute names of `backbones/vit.py` in the QUD repository (<https://github.com/jankolf/QUD>),
//! built as `VisionTransformer(img_size=112, patch_size=9, num_classes=512, embed_dim=512,
//! depth=24, num_heads=8, drop_path_rate=0.1, norm_layer="ln", mask_ratio=0.1)` for `transface-b`,
//! so that the published TransFace state dicts load key for key: `patch_embed.proj.weight`,
//! `blocks.3.attn.qkv.weight`, `feature.1.running_var`, `senet.2.weight`, ... TransFace-B has
//! 124,471,040 parameters.
//!
//! Eval-mode network, for a teacher: 9 x 9 patches (144 of them from 112 x 112, the last 4 pixel
//! rows and columns unused as in the reference), a learned position embedding, pre-norm blocks
//! (multi-head attention without qkv bias, a ReLU6 MLP), a final LayerNorm, the patch
//! squeeze-excitation (`senet`: a sigmoid weight per patch) and the BatchNorm'd linear head. The
//! training-time parts of the reference (random patch masking, drop path) are not built, so the
//! trainer refuses a TransFace student.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Relu, Sigmoid};
use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid, softmax};
use qud_backbone::kernels::conv2d as conv2d_fast;
use qud_backbone::layers::{fold_linear_batchnorm, TorchBatchNorm, TorchLinear};
use qud_backbone::{Backbone, MacCounter, OnnxGraph};

/// `(name, embed_dim, depth, num_heads)` of the TransFace sizes the QUD code builds.
const SIZES: [(&str, usize, usize, usize); 3] = [
    ("transface-s", 512, 12, 8),
    ("transface-b", 512, 24, 8),
    ("transface-l", 768, 24, 8),
];
const PATCH: usize = 9;
const SIDE: usize = 112;
const PATCHES: usize = (SIDE / PATCH) * (SIDE / PATCH);

/// The registry names this crate builds.
pub const NAMES: [&str; 3] = [SIZES[0].0, SIZES[1].0, SIZES[2].0];

/// `torch.nn.LayerNorm(D)` over the last dimension: eps 1e-5, `weight` and `bias`.
#[derive(Module, Debug)]
pub struct TorchLayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
}

impl TorchLayerNorm {
    fn new(dim: usize, device: &Device) -> Self {
        Self {
            weight: Initializer::Ones.init([dim], device),
            bias: Initializer::Zeros.init([dim], device),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centred = x - mean;
        let variance = centred.clone().square().mean_dim(2);
        let normalised = centred / (variance + 1e-5).sqrt();
        normalised * self.weight.val().unsqueeze::<3>() + self.bias.val().unsqueeze::<3>()
    }
}

/// `x @ W^T + b` on every token of `[B, T, C]`.
fn tokens(linear: &TorchLinear, x: Tensor<3>) -> Tensor<3> {
    let [b, t, c] = x.dims();
    let y = linear.forward(x.reshape([b * t, c]));
    let out = y.dims()[1];
    y.reshape([b, t, out])
}

/// `trunc_normal_(std=.02)` as `VisionTransformer._init_weights` draws linear weights (the
/// truncation at 2 std is left out: 1 draw in 22 moves, by at most 0.02), zero bias.
fn linear(input: usize, output: usize, bias: bool, device: &Device) -> TorchLinear {
    let mut layer = TorchLinear::new(input, output, bias, device);
    layer.weight = Initializer::Normal {
        mean: 0.0,
        std: 0.02,
    }
    .init([output, input], device);
    layer.bias = bias.then(|| Initializer::Zeros.init([output], device));
    layer
}

/// Multi-head self-attention: `qkv` (no bias) split into heads, softmax(q k^T / sqrt(d)) v,
/// heads joined, `proj`.
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: TorchLinear,
    pub proj: TorchLinear,
    pub num_heads: usize,
}

impl Attention {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let (heads, head_dim) = (self.num_heads, c / self.num_heads);
        let qkv = tokens(&self.qkv, x);
        // The reference reshapes to [B, T, 3, H, d]: q, k and v are consecutive thirds of C.
        let part = |i: usize| {
            qkv.clone()
                .narrow(2, i * c, c)
                .reshape([b, t, heads, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scores = q.matmul(k.swap_dims(2, 3)) * (head_dim as f64).powf(-0.5);
        let mixed = softmax(scores, 3).matmul(v);
        tokens(&self.proj, mixed.swap_dims(1, 2).reshape([b, t, c]))
    }
}

/// The MLP of a block: `fc1`, ReLU6, `fc2`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: TorchLinear,
    pub fc2: TorchLinear,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        tokens(&self.fc2, tokens(&self.fc1, x).clamp(0.0, 6.0))
    }
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: TorchLayerNorm,
    pub attn: Attention,
    pub norm2: TorchLayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn new(dim: usize, heads: usize, device: &Device) -> Self {
        Self {
            norm1: TorchLayerNorm::new(dim, device),
            attn: Attention {
                qkv: linear(dim, 3 * dim, false, device),
                proj: linear(dim, dim, true, device),
                num_heads: heads,
            },
            norm2: TorchLayerNorm::new(dim, device),
            mlp: Mlp {
                fc1: linear(dim, 4 * dim, true, device),
                fc2: linear(4 * dim, dim, true, device),
            },
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x));
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// `PatchEmbed`: a 9 x 9, stride-9 convolution with bias.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

/// A layer of an `nn.Sequential` head, so that its keys keep the PyTorch indices
/// (`feature.1.running_var`, `senet.2.weight`); parameter-free layers hold their places.
// Built once per model and never moved in a loop: the size difference costs nothing.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Layer {
    Linear(TorchLinear),
    BatchNorm(TorchBatchNorm),
    Relu(Relu),
    Sigmoid(Sigmoid),
}

impl Layer {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Linear(linear) => linear.forward(x),
            Self::BatchNorm(bn) => bn.forward(x),
            Self::Relu(_) => relu(x),
            Self::Sigmoid(_) => sigmoid(x),
        }
    }
}

fn sequential(layers: &[Layer], x: Tensor<2>) -> Tensor<2> {
    layers.iter().fold(x, |x, layer| layer.forward(x))
}

/// TransFace for 112 x 112 faces.
#[derive(Module, Debug)]
pub struct TransFace {
    pub patch_embed: PatchEmbed,
    pub pos_embed: Param<Tensor<3>>,
    /// Used by the reference's training-time patch masking only; kept so that its state dicts
    /// load strictly.
    pub mask_token: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: TorchLayerNorm,
    /// Linear (no bias), BatchNorm1d (eps 2e-5), Linear (no bias), BatchNorm1d (eps 2e-5).
    pub feature: Vec<Layer>,
    /// Linear (no bias), ReLU, Linear (no bias), Sigmoid: one weight per patch.
    pub senet: Vec<Layer>,
    pub embedding_dim: usize,
    pub depth: usize,
}

impl TransFace {
    /// `name` is one of [`NAMES`]; `None` otherwise.
    pub fn new(name: &str, embedding_dim: usize, device: &Device) -> Option<Self> {
        let &(_, dim, depth, heads) = SIZES.iter().find(|s| s.0 == name)?;
        let batch_norm = |n| {
            let mut bn = TorchBatchNorm::new(n, device);
            bn.epsilon = 2e-5;
            Layer::BatchNorm(bn)
        };
        Some(Self {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([3, dim], [PATCH, PATCH])
                    .with_stride([PATCH, PATCH])
                    .with_bias(true)
                    .init(device),
            },
            pos_embed: Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, PATCHES, dim], device),
            mask_token: Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, 1, dim], device),
            blocks: (0..depth).map(|_| Block::new(dim, heads, device)).collect(),
            norm: TorchLayerNorm::new(dim, device),
            feature: vec![
                Layer::Linear(linear(dim * PATCHES, dim, false, device)),
                batch_norm(dim),
                Layer::Linear(linear(dim, embedding_dim, false, device)),
                batch_norm(embedding_dim),
            ],
            senet: vec![
                Layer::Linear(linear(dim * PATCHES, PATCHES, false, device)),
                Layer::Relu(Relu::new()),
                Layer::Linear(linear(PATCHES, PATCHES, false, device)),
                Layer::Sigmoid(Sigmoid::new()),
            ],
            embedding_dim,
            depth,
        })
    }

    fn dim(&self) -> usize {
        self.pos_embed.dims()[2]
    }
}

impl Backbone for TransFace {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let [b, _, _, _] = images.dims();
        let dim = self.dim();
        let patches = conv2d_fast(&self.patch_embed.proj, images)
            .reshape([b, dim, PATCHES])
            .swap_dims(1, 2);
        let x = patches + self.pos_embed.val();
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        let x = self.norm.forward(x);
        let weights = sequential(&self.senet, x.clone().reshape([b, PATCHES * dim]));
        let weighted = x * weights.reshape([b, PATCHES, 1]);
        sequential(&self.feature, weighted.reshape([b, PATCHES * dim]))
    }

    fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    fn arch(&self) -> &str {
        match (self.depth, self.dim()) {
            (12, _) => "transface-s",
            (_, 512) => "transface-b",
            _ => "transface-l",
        }
    }

    /// Convolution and linear layers, as TransFace's own count (`extra_gflops` is the attention
    /// products on top: `2 * 144^2 * dim` per block).
    fn macs(&self) -> u64 {
        let mut macs = MacCounter::new(SIDE);
        macs.conv(&self.patch_embed.proj);
        for block in &self.blocks {
            for layer in [
                &block.attn.qkv,
                &block.attn.proj,
                &block.mlp.fc1,
                &block.mlp.fc2,
            ] {
                let [out, input] = layer.weight.dims();
                macs.linear(PATCHES * input, out);
            }
        }
        for layer in self.senet.iter().chain(&self.feature) {
            if let Layer::Linear(linear) = layer {
                let [out, input] = linear.weight.dims();
                macs.linear(input, out);
            }
        }
        macs.total
    }

    fn fold_batchnorm(&mut self) {
        if let [Layer::Linear(l1), Layer::BatchNorm(b1), Layer::Linear(l2), Layer::BatchNorm(b2)] =
            &mut self.feature[..]
        {
            fold_linear_batchnorm(l1, b1);
            fold_linear_batchnorm(l2, b2);
        }
    }

    fn onnx_graph(&self, _graph: &mut OnnxGraph) -> Result<String, qud_backbone::NotExportable> {
        Err(qud_backbone::NotExportable {
            arch: self.arch().to_string(),
            reason: "qud's graph writer has no attention or LayerNorm; export the PyTorch module \
                     (torch.onnx.export) to deploy it"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qud_backbone::num_parameters;

    #[test]
    fn transface_b_has_the_reference_size() {
        // `sum(p.numel() for p in VisionTransformer(img_size=112, patch_size=9,
        // num_classes=512, embed_dim=512, depth=24, num_heads=8).parameters())`.
        let device = qud_backend_flex::device();
        let model = TransFace::new("transface-b", 512, &device).unwrap();
        assert_eq!(num_parameters(&model), 124_471_040);
        // 21.9 GFLOPs as TransFace reports it: twice the multiply-accumulates of its
        // convolution and linear layers.
        assert_eq!(model.macs(), 10_938_200_320);
    }

    #[test]
    fn maps_faces_to_embeddings() {
        let device = qud_backend_flex::device();
        let model = TransFace::new("transface-s", 64, &device).unwrap().valid();
        let x = Tensor::<4>::random(
            [2, 3, 112, 112],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let y = model.forward(x);
        assert_eq!(y.dims(), [2, 64]);
        assert!(y.is_finite().all().into_scalar::<bool>());
        assert_eq!(model.arch(), "transface-s");
    }
}
