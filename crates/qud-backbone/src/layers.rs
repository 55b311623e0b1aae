//! Layers with PyTorch's semantics, parameter names and tensor layouts.
//!
//! Burn's `BatchNorm` names its affine parameters `gamma`/`beta` and feeds its running variance
//! the *biased* batch variance; Burn's `Linear` stores its weight as `[in, out]`; its `PRelu`
//! calls its slope `alpha`. Face-recognition weights come from PyTorch, so the layers here keep
//! PyTorch's names (`weight`, `bias`, `running_mean`, `running_var`), layouts (`[out, in]`) and
//! update rules (unbiased running variance), and a `state_dict` maps onto them key for key with
//! no adapter. (They are deliberately not named `BatchNorm`/`Linear`/`PRelu`: burn-store's
//! PyTorch adapter renames and transposes tensors of modules with those names.)

use burn::module::{Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// `torch.nn.BatchNorm1d/2d`: eps 1e-5, momentum 0.1, running variance from the unbiased batch
/// variance; `affine = false` has no `weight`/`bias`.
#[derive(Module, Debug)]
pub struct TorchBatchNorm {
    pub weight: Option<Param<Tensor<1>>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
    pub training: Param<burn::module::Flag>,
    pub num_features: usize,
    pub momentum: f64,
    pub epsilon: f64,
    /// Folded into a neighbouring layer's weights (see [`fold_conv_batchnorm`]): `forward` passes
    /// its input through. Inference only.
    pub folded: bool,
}

impl TorchBatchNorm {
    /// Affine batch norm with weight 1 and bias 0, as PyTorch initialises it.
    pub fn new(num_features: usize, device: &Device) -> Self {
        Self::build(num_features, true, device)
    }

    /// `affine=False`: normalisation only.
    pub fn without_affine(num_features: usize, device: &Device) -> Self {
        Self::build(num_features, false, device)
    }

    fn build(num_features: usize, affine: bool, device: &Device) -> Self {
        let weight = affine.then(|| Initializer::Ones.init([num_features], device));
        let bias = affine.then(|| Initializer::Zeros.init([num_features], device));
        Self {
            weight,
            bias,
            running_mean: RunningState::new(Tensor::zeros([num_features], device)),
            running_var: RunningState::new(Tensor::ones([num_features], device)),
            training: Param::from_bool(true),
            num_features,
            momentum: 0.1,
            epsilon: 1e-5,
            folded: false,
        }
    }

    /// Keep the weight at its value and out of training (insightface's `features` layer).
    pub fn with_frozen_weight(mut self) -> Self {
        self.weight = self.weight.map(|w| w.set_require_grad(false));
        self
    }

    fn affine(&self, device: &Device) -> (Tensor<1>, Tensor<1>) {
        let n = self.num_features;
        // Under mixed precision the parameters arrive cast to f16 / bf16 (`cast_trainable`).
        let f32 = |t: Tensor<1>| {
            if t.dtype() == DType::F32 {
                t
            } else {
                t.cast(FloatDType::F32)
            }
        };
        let weight = match &self.weight {
            Some(w) => f32(w.val()),
            None => Tensor::ones([n], device),
        };
        let bias = match &self.bias {
            Some(b) => f32(b.val()),
            None => Tensor::zeros([n], device),
        };
        (weight, bias)
    }

    /// `[N, C]` or `[N, C, H, W]`. Batch statistics (and a running-stat update) on an autodiff
    /// device in training mode, running statistics otherwise, as Burn decides train/eval.
    ///
    /// Mixed precision: an f16 / bf16 input is normalised in f32 (statistics, affine and running
    /// statistics stay f32) and the output cast back, as PyTorch's autocast does.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if self.folded {
            return input;
        }
        let dtype = input.dtype();
        if dtype != DType::F32 {
            return self.forward(input.cast(FloatDType::F32)).cast(dtype);
        }
        let device = input.device();
        let (weight, bias) = self.affine(&device);
        if !self.uses_batch_statistics(&device) {
            let mean = self.running_mean.value().to_device(&device);
            let var = self.running_var.value().to_device(&device);
            return crate::kernels::batch_norm(input, weight, bias, mean, var, self.epsilon);
        }
        let per_channel = input.shape().num_elements() / self.num_features;
        let result = crate::kernels::batch_norm_train(input, weight, bias, self.epsilon);
        self.update_running_statistics(result, per_channel)
    }

    /// `shortcut + self.forward(input)`, a residual unit's last BatchNorm and its sum: in
    /// training on flex one op (`qud_cpu_kernels::batch_norm_add_train`) that writes the sum as
    /// it normalises. The same values as the two calls.
    pub fn forward_add<const D: usize>(&self, input: Tensor<D>, shortcut: Tensor<D>) -> Tensor<D> {
        let Some((weight, bias)) = self.fused_training(&input) else {
            return shortcut + self.forward(input);
        };
        let per_channel = input.shape().num_elements() / self.num_features;
        let result =
            crate::kernels::batch_norm_add_train(input, weight, bias, shortcut, self.epsilon);
        self.update_running_statistics(result, per_channel)
    }

    /// The f32 `(weight, bias)` when `input` is normalised with its own batch statistics in f32
    /// (training on an autodiff device, not folded): the case the fused training ops serve.
    fn fused_training<const D: usize>(&self, input: &Tensor<D>) -> Option<(Tensor<1>, Tensor<1>)> {
        let device = input.device();
        let fused =
            !self.folded && input.dtype() == DType::F32 && self.uses_batch_statistics(&device);
        fused.then(|| self.affine(&device))
    }

    /// `prelu.forward(self.forward(input))`, the pair every MobileFaceNet `Conv_block` and
    /// iResNet block has: in training on flex, one op that never stores the BatchNorm's output
    /// (`qud_cpu_kernels::batch_norm_prelu_train`), the same values.
    pub fn forward_prelu<const D: usize>(&self, input: Tensor<D>, prelu: &TorchPRelu) -> Tensor<D> {
        let Some((weight, bias)) = self.fused_training(&input) else {
            return prelu.forward(self.forward(input));
        };
        let per_channel = input.shape().num_elements() / self.num_features;
        let alpha = prelu.weight.val();
        let result =
            crate::kernels::batch_norm_prelu_train(input, weight, bias, alpha, self.epsilon);
        self.update_running_statistics(result, per_channel)
    }

    /// `conv` (a depthwise convolution) on [`Self::forward_prelu`]'s output. In training on flex
    /// one op (`qud_cpu_kernels::batch_norm_prelu_depthwise_train`): the activation between
    /// PReLU and the convolution is never stored. The same values as the two calls.
    pub fn forward_prelu_depthwise(
        &self,
        input: Tensor<4>,
        prelu: &TorchPRelu,
        conv: &burn::nn::conv::Conv2d,
    ) -> Tensor<4> {
        let Some((weight, bias)) = self.fused_training(&input) else {
            return crate::kernels::conv2d(conv, self.forward_prelu(input, prelu));
        };
        let per_channel = input.shape().num_elements() / self.num_features;
        let alpha = prelu.weight.val();
        let result = crate::kernels::batch_norm_prelu_depthwise_train(
            input,
            (weight, bias, alpha),
            conv,
            self.epsilon,
        );
        self.update_running_statistics(result, per_channel)
    }

    /// Batch statistics (training on an autodiff device), or the running ones.
    fn uses_batch_statistics(&self, device: &Device) -> bool {
        device.is_autodiff() && self.training.is_enabled()
    }

    /// Fold a training step's batch statistics into the running ones; the step's output.
    fn update_running_statistics<const D: usize>(
        &self,
        result: crate::kernels::BatchNormTrain<D>,
        per_channel: usize,
    ) -> Tensor<D> {
        let device = result.output.device();
        // PyTorch feeds the running variance the unbiased estimate.
        let unbias = per_channel as f64 / (per_channel.max(2) - 1) as f64;
        let m = self.momentum;
        let running_mean = self.running_mean.value_sync().to_device(&device);
        let running_var = self.running_var.value_sync().to_device(&device);
        let running_mean = running_mean.mul_scalar(1.0 - m) + result.mean.mul_scalar(m);
        let running_var = running_var.mul_scalar(1.0 - m) + result.variance.mul_scalar(m * unbias);
        self.running_mean.update(running_mean.detach());
        self.running_var.update(running_var.detach());
        // `update` parks the value per thread until the next read; commit it now so that a
        // checkpoint or export written right after this step holds it.
        self.running_mean.value_sync();
        self.running_var.value_sync();
        result.output
    }

    /// The eval-mode map as `y = x * scale + shift` per channel.
    pub fn scale_shift(&self) -> (Tensor<1>, Tensor<1>) {
        let var = self.running_var.value();
        let (weight, bias) = self.affine(&var.device());
        let scale = weight / var.add_scalar(self.epsilon).sqrt();
        let shift = bias - self.running_mean.value() * scale.clone();
        (scale, shift)
    }
}

// BatchNorm folding for inference: an eval-mode BatchNorm is a per-channel affine map, so next to
// a convolution or linear layer it can live in that layer's weights, and the network runs one
// pass over each activation less. Only folds that are exact up to rounding are offered: a
// BatchNorm *before* a padded convolution (iResNet's `bn1` in each block) is not one, as the
// padding zeros would be shifted too.

/// `weight` scaled by `bn`'s scale per output channel (dimension 0) and the bias that completes
/// the fold; marks `bn` folded.
fn fold_output_channels<const D: usize>(
    weight: Tensor<D>,
    bias: Option<Tensor<1>>,
    bn: &mut TorchBatchNorm,
) -> (Param<Tensor<D>>, Option<Param<Tensor<1>>>) {
    let (scale, shift) = bn.scale_shift();
    let mut per_channel = [1usize; D];
    per_channel[0] = scale.dims()[0];
    let weight = weight * scale.clone().reshape(per_channel);
    let bias = match bias {
        Some(b) => b * scale + shift,
        None => shift,
    };
    bn.folded = true;
    (Param::from_tensor(weight), Some(Param::from_tensor(bias)))
}

/// Fold `bn`, which follows `conv`, into `conv`'s weight and bias; `bn` becomes a pass-through.
pub fn fold_conv_batchnorm(conv: &mut Conv2d, bn: &mut TorchBatchNorm) {
    if !bn.folded {
        let bias = conv.bias.as_ref().map(Param::val);
        (conv.weight, conv.bias) = fold_output_channels(conv.weight.val(), bias, bn);
    }
}

/// Fold `bn`, which follows `linear`, into it; `bn` becomes a pass-through.
pub fn fold_linear_batchnorm(linear: &mut TorchLinear, bn: &mut TorchBatchNorm) {
    if !bn.folded {
        let bias = linear.bias.as_ref().map(Param::val);
        (linear.weight, linear.bias) = fold_output_channels(linear.weight.val(), bias, bn);
    }
}

/// Fold `bn`, whose `[N, C, H, W]` output is flattened into `linear`'s input, into `linear`
/// (`W (x s + t) + b = (W s) x + (W t + b)`); `bn` becomes a pass-through.
pub fn fold_batchnorm_linear(bn: &mut TorchBatchNorm, linear: &mut TorchLinear) {
    if bn.folded {
        return;
    }
    let (scale, shift) = bn.scale_shift();
    let [out, input] = linear.weight.dims();
    let channels = scale.dims()[0];
    let spatial = input / channels;
    // Flattening is channel-major: input feature c * H * W + p belongs to channel c.
    let expand = |v: Tensor<1>| -> Tensor<1> {
        v.reshape([channels, 1])
            .expand([channels, spatial])
            .reshape([input])
    };
    let (scale, shift) = (expand(scale), expand(shift));
    let weight = linear.weight.val();
    let moved = weight
        .clone()
        .matmul(shift.reshape([input, 1]))
        .reshape([out]);
    let bias = match &linear.bias {
        Some(b) => b.val() + moved,
        None => moved,
    };
    linear.weight = Param::from_tensor(weight * scale.reshape([1, input]));
    linear.bias = Some(Param::from_tensor(bias));
    bn.folded = true;
}

/// `torch.nn.PReLU(num_parameters)`: one slope per channel, named `weight`, initialised 0.25.
#[derive(Module, Debug)]
pub struct TorchPRelu {
    pub weight: Param<Tensor<1>>,
}

impl TorchPRelu {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            weight: Initializer::Constant { value: 0.25 }.init([channels], device),
        }
    }

    /// Channels on dimension 1. On flex, one pass over the activation forward and backward
    /// (`qud_cpu_kernels::prelu`); Burn's PReLU elsewhere.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        crate::kernels::prelu(input, self.weight.val())
    }
}

/// `torch.nn.Linear`: weight `[out, in]` as PyTorch stores it, optional bias.
#[derive(Module, Debug)]
pub struct TorchLinear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl TorchLinear {
    /// PyTorch's default initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    pub fn new(input: usize, output: usize, bias: bool, device: &Device) -> Self {
        let bound = 1.0 / (input as f64).sqrt();
        let uniform = Initializer::Uniform {
            min: -bound,
            max: bound,
        };
        Self {
            weight: uniform.init([output, input], device),
            bias: bias.then(|| uniform.init([output], device)),
        }
    }

    /// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: N(0, 2 / out).
    pub fn kaiming_fan_out(mut self) -> Self {
        let [out, input] = self.weight.dims();
        let std = (2.0 / out as f64).sqrt();
        let device = self.weight.device();
        self.weight = Initializer::Normal { mean: 0.0, std }.init([out, input], &device);
        self
    }

    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let y = input.matmul(self.weight.val().transpose());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }
}

/// A bias-free `torch.nn.Conv2d` with square kernel, stride, padding and groups; weights drawn
/// N(0, std) (kaiming fan_out: `std = sqrt(2 / (out * k * k))`).
pub fn conv2d(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    std: f64,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_groups(groups)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// `nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")` std for a conv weight
/// `[out, in/groups, k, k]`: PyTorch's fan_out is `out * k * k`, independent of groups.
pub fn kaiming_fan_out_std(out_channels: usize, kernel: usize) -> f64 {
    (2.0 / (out_channels * kernel * kernel) as f64).sqrt()
}
