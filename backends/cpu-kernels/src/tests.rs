//! The host kernel against Burn's own convolution on the flex backend.

use super::*;
use burn::nn::conv::Conv2dConfig;
use proptest::prelude::*;

fn burn_conv(shape: &Depthwise, bias: bool, device: &Device) -> Conv2d {
    Conv2dConfig::new(
        [shape.channels, shape.channels],
        [shape.kernel, shape.kernel],
    )
    .with_stride([shape.stride, shape.stride])
    .with_padding(PaddingConfig2d::Explicit(
        shape.padding,
        shape.padding,
        shape.padding,
        shape.padding,
    ))
    .with_groups(shape.channels)
    .with_bias(bias)
    .with_initializer(burn::nn::Initializer::Uniform {
        min: -1.0,
        max: 1.0,
    })
    .init(device)
}

/// The largest difference relative to `b`'s largest value, or to 0.01 when every value of `b` is
/// smaller: a bias gradient is a sum of tens of terms of size 1 that can cancel down to 1e-3, where
/// two summation orders differ by a few 1e-7 (a 1 x 1 convolution over 2 x 9 x 2 values gave
/// 3.7e-4 relative to its 1e-3).
fn max_relative_difference(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-2f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn depthwise_kernel_matches_burn(
        batch in 1usize..3,
        channels in 1usize..6,
        height in 1usize..12,
        width in 1usize..12,
        kernel in prop_oneof![Just(1usize), Just(3), Just(5), Just(7)],
        stride in 1usize..4,
        padding in 0usize..4,
        bias in any::<bool>(),
    ) {
        prop_assume!(padding < kernel);
        let shape = Depthwise { batch, channels, height, width, kernel, stride, padding };
        prop_assume!(height + 2 * padding >= kernel && width + 2 * padding >= kernel);
        let device = qud_backend_flex::device();
        let conv = burn_conv(&shape, bias, &device);
        let x = Tensor::<4>::random(
            [batch, channels, height, width],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let want = conv.forward(x.clone());
        let got = conv2d(&conv, x);
        prop_assert_eq!(got.dims(), want.dims());
        let (got, want) = (
            got.into_data().try_into_vec::<f32>().unwrap(),
            want.into_data().try_into_vec::<f32>().unwrap(),
        );
        let diff = max_relative_difference(&got, &want);
        prop_assert!(diff < 1e-5, "{shape:?} bias {bias}: max relative difference {diff}");
    }
}

#[test]
fn only_depthwise_f32_convolutions_on_the_host_take_the_kernel() {
    let device = qud_backend_flex::device();
    let shape = Depthwise {
        batch: 1,
        channels: 4,
        height: 6,
        width: 6,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let conv = burn_conv(&shape, false, &device);
    let x = Tensor::<4>::zeros([1, 4, 6, 6], &device);
    assert!(is_host_cpu(&device) && is_flex(&device) && is_flex(&device.clone().autodiff()));
    assert_eq!(depthwise_shape(&conv, &x), Some(shape));
    // A dense convolution is not depthwise.
    let dense = Conv2dConfig::new([4, 4], [3, 3]).init(&device);
    assert_eq!(depthwise_shape(&dense, &x), None);
}

/// Values in [-1, 1) from `seed` (a tiny LCG: tests running in parallel share Burn's generator).
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A BatchNorm result's output and statistics and the gradients of its input, gamma and beta
/// for the upstream gradient `values(seed + 3, ..)`, as flat vectors; and all the gradients, for
/// the caller's other parameters.
fn batch_norm_outputs(
    result: BatchNormTrain<4>,
    seed: u64,
    (x, gamma, beta): (&Tensor<4>, &Tensor<1>, &Tensor<1>),
) -> (Vec<Vec<f32>>, burn::tensor::Gradients) {
    let upstream = tracked(seed + 3, result.output.dims(), &result.output.device()).detach();
    let grads = (result.output.clone() * upstream).sum().backward();
    let outputs = vec![
        flat(result.output),
        flat(result.mean),
        flat(result.variance),
        flat(x.grad(&grads).unwrap()),
        flat(gamma.grad(&grads).unwrap()),
        flat(beta.grad(&grads).unwrap()),
    ];
    (outputs, grads)
}

/// A tensor's values in order.
fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// `values(seed, ..)` as a tensor of `dims` on `device`, a leaf tracked for its gradient.
fn tracked<const D: usize>(seed: u64, dims: [usize; D], device: &Device) -> Tensor<D> {
    let len = dims.iter().product();
    Tensor::<1>::from_data(TensorData::new(values(seed, len), [len]), device)
        .reshape(dims)
        .detach()
        .require_grad()
}

/// The output and the gradients of the input, the weight and the bias, through `conv2d` (the
/// extension on flex under autodiff) or through Burn's convolution, for one upstream gradient.
fn gradients(shape: &Depthwise, bias: bool, seed: u64, extension: bool) -> Vec<Vec<f32>> {
    use burn::module::Param;
    let device = qud_backend_flex::device().autodiff();
    let Depthwise {
        batch: n,
        channels: c,
        height: h,
        width: w,
        kernel: k,
        ..
    } = *shape;
    let tensor = |seed: u64, dims: Vec<usize>| {
        let len = dims.iter().product();
        Tensor::<1>::from_data(TensorData::new(values(seed, len), [len]), &device)
    };
    let mut conv = burn_conv(shape, bias, &device);
    conv.weight = Param::from_tensor(tensor(seed, vec![c * k * k]).reshape([c, 1, k, k]));
    if bias {
        conv.bias = Some(Param::from_tensor(tensor(seed + 1, vec![c])));
    }
    let x = tensor(seed + 2, vec![n * c * h * w])
        .reshape([n, c, h, w])
        .detach()
        .require_grad();
    let y = if extension {
        conv2d(&conv, x.clone())
    } else {
        conv.forward(x.clone())
    };
    let upstream = tensor(seed + 3, y.dims().to_vec())
        .reshape(y.dims())
        .detach();
    let grads = (y.clone() * upstream).sum().backward();
    let flat = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
    let mut out = vec![
        flat(y.without_autodiff()),
        flat(x.grad(&grads).expect("input gradient")),
        flat(conv.weight.grad(&grads).expect("weight gradient")),
    ];
    if let Some(b) = &conv.bias {
        let grad = b.grad(&grads).expect("bias gradient");
        out.push(grad.into_data().try_into_vec::<f32>().unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn depthwise_gradients_match_burn(
        batch in 1usize..3,
        channels in 1usize..5,
        height in 1usize..10,
        width in 1usize..10,
        kernel in prop_oneof![Just(1usize), Just(3), Just(5)],
        stride in 1usize..4,
        padding in 0usize..3,
        bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        prop_assume!(padding < kernel);
        let shape = Depthwise { batch, channels, height, width, kernel, stride, padding };
        prop_assume!(height + 2 * padding >= kernel && width + 2 * padding >= kernel);
        gradients_match_burn(&shape, bias, seed)?;
    }
}

/// The output and the input, weight and bias gradients of [`conv2d`] against Burn's own
/// convolution, on inputs drawn from `seed`.
fn gradients_match_burn(shape: &Depthwise, bias: bool, seed: u64) -> Result<(), TestCaseError> {
    let ours = gradients(shape, bias, seed, true);
    let burn = gradients(shape, bias, seed, false);
    prop_assert_eq!(ours.len(), burn.len());
    let names = ["output", "input grad", "weight grad", "bias grad"];
    for (what, (a, b)) in names.iter().zip(ours.iter().zip(&burn)) {
        prop_assert_eq!(a.len(), b.len());
        let diff = max_relative_difference(a, b);
        // Gradients are sums over the batch and the plane, added in another order than
        // Burn's: f32 rounding reaches a few 1e-5 of the largest value there.
        let tolerance = if *what == "output" { 1e-5 } else { 1e-4 };
        prop_assert!(
            diff < tolerance,
            "{shape:?} bias {bias}: {what} max relative difference {diff}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// 3 x 3 at stride 1 or 2 (all of MobileFaceNet's depthwise layers): the flat planes
    /// (`flat.rs`: padded for stride 1, split into phases for stride 2), odd and even sides
    /// from 1 up (rows of 16 outputs or more are computed one at a time) and every padding.
    #[test]
    fn depthwise_3x3_flat_planes_match_burn(
        batch in 1usize..3,
        channels in 1usize..4,
        height in 1usize..20,
        width in 1usize..40,
        stride in 1usize..=2,
        padding in 0usize..=2,
        bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        prop_assume!(height + 2 * padding >= 3 && width + 2 * padding >= 3);
        let shape = Depthwise { batch, channels, height, width, kernel: 3, stride, padding };
        gradients_match_burn(&shape, bias, seed)?;
    }
}

/// The output and the gradients of the input and the slopes of PReLU on `dims` (channels on
/// dimension 1), through [`prelu`] (the extension on flex under autodiff) or Burn's.
fn prelu_gradients<const D: usize>(dims: [usize; D], seed: u64, extension: bool) -> Vec<Vec<f32>> {
    let device = qud_backend_flex::device().autodiff();
    let len = dims.iter().product();
    let x = Tensor::<1>::from_data(TensorData::new(values(seed, len), [len]), &device)
        .reshape(dims)
        .require_grad();
    let channels = dims[1];
    let alpha = Tensor::<1>::from_data(
        TensorData::new(values(seed + 1, channels), [channels]),
        &device,
    )
    .require_grad();
    let y = if extension {
        prelu(x.clone(), alpha.clone())
    } else {
        burn::tensor::activation::prelu(x.clone(), alpha.clone())
    };
    let upstream = Tensor::<1>::from_data(TensorData::new(values(seed + 2, len), [len]), &device)
        .reshape(dims);
    let grads = (y.clone() * upstream).sum().backward();
    let flat = |t: Tensor<D>| t.into_data().try_into_vec::<f32>().unwrap();
    vec![
        flat(y),
        x.grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap(),
        alpha
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn prelu_matches_burn(
        batch in 1usize..4,
        channels in 1usize..9,
        height in 1usize..12,
        width in 1usize..12,
        flat in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let (ours, burn) = if flat {
            (prelu_gradients([batch, channels], seed, true), prelu_gradients([batch, channels], seed, false))
        } else {
            let dims = [batch, channels, height, width];
            (prelu_gradients(dims, seed, true), prelu_gradients(dims, seed, false))
        };
        for (what, (a, b)) in ["output", "input grad", "slope grad"].iter().zip(ours.iter().zip(&burn)) {
            prop_assert_eq!(a.len(), b.len());
            if *what == "slope grad" {
                // Summed over the batch and the plane in another order than Burn: each of the
                // `terms` products of values in [-1, 1] may round differently, so the sums may
                // differ by a few f32 epsilons per term, however much they cancel.
                let terms = if flat { batch } else { batch * height * width };
                let bound = 4.0 * f32::EPSILON * terms as f32;
                let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                prop_assert!(diff <= bound, "{batch}x{channels}x{height}x{width} flat {flat}: slope grad differs by {diff} (bound {bound})");
                continue;
            }
            let diff = max_relative_difference(a, b);
            prop_assert!(diff == 0.0, "{batch}x{channels}x{height}x{width} flat {flat}: {what} max relative difference {diff}");
        }
    }
}

/// The output and the gradients of the input, the weight and the bias of a dense convolution,
/// through `conv2d` (the extension on flex under autodiff) or through Burn's convolution.
fn dense_gradients(shape: &Dense, bias: bool, seed: u64, extension: bool) -> Vec<Vec<f32>> {
    use burn::module::Param;
    let device = qud_backend_flex::device().autodiff();
    let Dense {
        batch: n,
        in_channels: c,
        out_channels: o,
        height: h,
        width: w,
        kernel: k,
        stride,
        padding,
    } = *shape;
    let tensor = |seed: u64, len: usize| {
        Tensor::<1>::from_data(TensorData::new(values(seed, len), [len]), &device)
    };
    let mut conv = Conv2dConfig::new([c, o], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_bias(bias)
        .init(&device);
    conv.weight = Param::from_tensor(tensor(seed, o * c * k * k).reshape([o, c, k, k]));
    if bias {
        conv.bias = Some(Param::from_tensor(tensor(seed + 1, o)));
    }
    let x = tensor(seed + 2, n * c * h * w)
        .reshape([n, c, h, w])
        .detach()
        .require_grad();
    let y = if extension {
        assert_eq!(dense_shape(&conv, &x), Some(*shape));
        conv2d(&conv, x.clone())
    } else {
        conv.forward(x.clone())
    };
    let upstream = tensor(seed + 3, y.dims().iter().product()).reshape(y.dims());
    let grads = (y.clone() * upstream.clone()).sum().backward();
    let flat = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().unwrap();
    let mut out = vec![
        flat(y.without_autodiff()),
        flat(x.grad(&grads).expect("input gradient")),
        flat(conv.weight.grad(&grads).expect("weight gradient")),
    ];
    if let Some(b) = &conv.bias {
        let grad = b.grad(&grads).expect("bias gradient");
        out.push(grad.into_data().try_into_vec::<f32>().unwrap());
        // Per output channel, the sum of the magnitudes of the terms its bias gradient adds.
        let terms = upstream.abs().sum_dims(&[0, 2, 3]).reshape([o]);
        out.push(terms.into_data().try_into_vec::<f32>().unwrap());
    }
    out
}

fn assert_dense_matches_burn(shape: &Dense, bias: bool, seed: u64) -> Result<(), String> {
    let ours = dense_gradients(shape, bias, seed, true);
    let burn = dense_gradients(shape, bias, seed, false);
    for (what, (a, b)) in ["output", "input grad", "weight grad", "bias grad"]
        .iter()
        .zip(ours.iter().zip(&burn))
    {
        if a.len() != b.len() {
            return Err(format!(
                "{shape:?}: {what} has {} values, Burn {}",
                a.len(),
                b.len()
            ));
        }
        // Sums over channels, taps, the batch and the plane, in another order than Burn's. A
        // bias gradient is one sum per channel of every output's gradient, which may cancel to
        // almost nothing: its rounding is bounded by the size of its terms, not of the result
        // (`(n - 1) eps sum |terms|` for `n` terms in any order), so it is measured against
        // those (a sum of 40 terms that cancelled to a few hundredths read 1.3e-5 against itself).
        let diff = if *what == "bias grad" {
            let terms = &burn[4];
            a.iter()
                .zip(b)
                .zip(terms)
                .map(|((x, y), t)| (x - y).abs() / t.max(1e-2))
                .fold(0.0, f32::max)
        } else {
            max_relative_difference(a, b)
        };
        if diff >= 1e-5 {
            return Err(format!(
                "{shape:?} bias {bias}: {what} max relative difference {diff}"
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Small planes: several images share one product (the regrouping paths).
    #[test]
    fn dense_convolution_matches_burn(
        batch in 1usize..6,
        in_channels in 1usize..6,
        out_channels in 1usize..6,
        height in 1usize..10,
        width in 1usize..10,
        kernel in prop_oneof![Just(1usize), Just(3), Just(5)],
        stride in 1usize..3,
        padding in 0usize..3,
        bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        prop_assume!(padding < kernel && height + 2 * padding >= kernel && width + 2 * padding >= kernel);
        let shape = Dense { batch, in_channels, out_channels, height, width, kernel, stride, padding };
        prop_assert!(assert_dense_matches_burn(&shape, bias, seed).is_ok(), "{:?}", assert_dense_matches_burn(&shape, bias, seed));
    }
}

/// Planes of more than 1,024 outputs: one image a product, the 1 x 1 case without a column
/// matrix, batches split over the threads, and Winograd on a large plane.
#[test]
fn dense_convolution_on_large_planes_matches_burn() {
    for (kernel, stride, padding) in [(1, 1, 0), (3, 1, 1), (3, 2, 1), (1, 2, 0)] {
        let shape = Dense {
            batch: 3,
            in_channels: 5,
            out_channels: 7,
            height: 66,
            width: 70,
            kernel,
            stride,
            padding,
        };
        assert_dense_matches_burn(&shape, kernel == 3, 7).unwrap();
    }
    // Winograd with more than 512 tiles an image (odd sides: a half-filled last tile).
    let shape = Dense {
        batch: 3,
        in_channels: 128,
        out_channels: 129,
        height: 45,
        width: 47,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    assert!(dense::winograd_applies(&shape));
    assert_dense_matches_burn(&shape, true, 11).unwrap();
}

#[test]
fn grouped_convolutions_are_not_dense() {
    let device = qud_backend_flex::device();
    let x = Tensor::<4>::zeros([1, 4, 6, 6], &device);
    let grouped = Conv2dConfig::new([4, 4], [3, 3])
        .with_groups(2)
        .init(&device);
    assert_eq!(dense_shape(&grouped, &x), None);
    let depthwise = Conv2dConfig::new([4, 4], [3, 3])
        .with_groups(4)
        .init(&device);
    assert_eq!(dense_shape(&depthwise, &x), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// 3 x 3 stride 1 with 64 channels or more: the Winograd forward, odd and even sizes,
    /// inside and padded borders.
    #[test]
    fn winograd_convolution_matches_burn(
        batch in 1usize..4,
        in_channels in 64usize..131,
        out_channels in 64usize..131,
        height in 1usize..12,
        width in 1usize..12,
        padding in 0usize..3,
        seed in any::<u64>(),
    ) {
        prop_assume!(height + 2 * padding >= 3 && width + 2 * padding >= 3);
        let shape = Dense { batch, in_channels, out_channels, height, width, kernel: 3, stride: 1, padding };
        prop_assert!(dense::winograd_applies(&shape));
        let result = assert_dense_matches_burn(&shape, seed % 2 == 0, seed);
        prop_assert!(result.is_ok(), "{:?}", result);
    }
}

/// Outside autodiff a uniquely held activation is overwritten in place; a shared one is not.
#[test]
fn inference_prelu_overwrites_only_an_unshared_activation() {
    let device = qud_backend_flex::device();
    let dims = [2, 3, 5, 7];
    let len = dims.iter().product();
    let x =
        || Tensor::<1>::from_data(TensorData::new(values(5, len), [len]), &device).reshape(dims);
    let alpha = Tensor::<1>::from_data(TensorData::new(values(6, 3), [3]), &device);
    let want = burn::tensor::activation::prelu(x(), alpha.clone())
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let unshared = prelu(x(), alpha.clone())
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    assert_eq!(unshared, want);
    let kept = x();
    let shared = prelu(kept.clone(), alpha)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    assert_eq!(shared, want);
    assert_eq!(
        kept.into_data().try_into_vec::<f32>().unwrap(),
        values(5, len)
    );
}

/// Which training-mode BatchNorm [`batch_norm_gradients`] runs.
#[derive(Clone, Copy, PartialEq)]
enum BatchNormPath {
    /// Burn's `batch_norm_train`.
    Burn,
    /// [`batch_norm_train`] (the extension on flex under autodiff).
    Kernels,
    /// [`batch_norm_train`] then [`prelu`].
    KernelsThenPrelu,
    /// [`batch_norm_prelu_train`], the two as one op.
    Fused,
}

/// Training-mode BatchNorm (then PReLU, on the last two paths) on flex under autodiff: output,
/// mean, variance, and the gradients of the input, gamma and beta (and alpha, with PReLU) for
/// one upstream gradient. `offset` moves the input's mean away from zero.
fn batch_norm_gradients(
    dims: [usize; 4],
    offset: f32,
    seed: u64,
    path: BatchNormPath,
) -> Vec<Vec<f32>> {
    let device = qud_backend_flex::device().autodiff();
    let len = dims.iter().product();
    let channels = dims[1];
    let tensor = |seed: u64, len: usize| {
        Tensor::<1>::from_data(TensorData::new(values(seed, len), [len]), &device)
    };
    let x = tensor(seed, len)
        .add_scalar(offset)
        .reshape(dims)
        .detach()
        .require_grad();
    let gamma = tracked(seed + 1, [channels], &device);
    let beta = tracked(seed + 2, [channels], &device);
    let alpha = tracked(seed + 4, [channels], &device);
    let (g, b, a) = (gamma.clone(), beta.clone(), alpha.clone());
    let result = match path {
        BatchNormPath::Burn => {
            let r = burn::tensor::module::batch_norm_train(x.clone(), g, b, 1e-5);
            BatchNormTrain {
                output: r.output,
                mean: r.mean,
                variance: r.variance,
            }
        }
        BatchNormPath::Kernels => batch_norm_train(x.clone(), g, b, 1e-5),
        BatchNormPath::KernelsThenPrelu => {
            let r = batch_norm_train(x.clone(), g, b, 1e-5);
            BatchNormTrain {
                output: prelu(r.output, a),
                ..r
            }
        }
        BatchNormPath::Fused => batch_norm_prelu_train(x.clone(), g, b, a, 1e-5),
    };
    let (mut out, grads) = batch_norm_outputs(result, seed, (&x, &gamma, &beta));
    if matches!(path, BatchNormPath::KernelsThenPrelu | BatchNormPath::Fused) {
        out.push(flat(alpha.grad(&grads).unwrap()));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn batch_norm_matches_burn(
        batch in 1usize..5,
        channels in 1usize..9,
        height in 2usize..12,
        width in 4usize..12,
        offset in prop_oneof![Just(0.0f32), Just(8.0f32)],
        seed in any::<u64>(),
    ) {
        let dims = [batch, channels, height, width];
        let ours = batch_norm_gradients(dims, offset, seed, BatchNormPath::Kernels);
        let burn = batch_norm_gradients(dims, offset, seed, BatchNormPath::Burn);
        let what = ["output", "mean", "variance", "input grad", "gamma grad", "beta grad"];
        // gamma and beta's gradients are sums of `count` terms of about unit size that cancel:
        // the sum can come out near zero while its rounding error scales with the terms, so
        // they are measured against the sum's typical size, sqrt(count), when that is larger.
        let count = (batch * height * width) as f32;
        for (what, (a, b)) in what.iter().zip(ours.iter().zip(&burn)) {
            prop_assert_eq!(a.len(), b.len());
            let floor = if matches!(*what, "gamma grad" | "beta grad") { count.sqrt() } else { 1e-3 };
            let scale = b.iter().fold(floor, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale;
            // Around 8 an f32 input carries 16x less absolute precision than around 0.5, so each
            // `x - mean` differs by ~1e-6 between any two summation orders, and the sums over the
            // batch and the plane add that up: both implementations drift from exact by 1e-5.
            let tolerance = if offset == 0.0 { 1e-5 } else { 5e-5 };
            prop_assert!(diff <= tolerance, "{dims:?} offset {offset}: {what} max relative difference {diff}");
        }
    }
}

#[test]
fn inference_batch_norm_matches_burn_and_overwrites_only_an_unshared_activation() {
    let device = qud_backend_flex::device();
    let dims = [2, 3, 5, 7];
    let len = dims.iter().product();
    let x =
        || Tensor::<1>::from_data(TensorData::new(values(7, len), [len]), &device).reshape(dims);
    let per_channel =
        |seed: u64| Tensor::<1>::from_data(TensorData::new(values(seed, 3), [3]), &device);
    let (gamma, beta, mean) = (per_channel(8), per_channel(9), per_channel(10));
    let variance = per_channel(11).abs().add_scalar(0.1);
    let run = |x: Tensor<4>, ours: bool| {
        let args = (gamma.clone(), beta.clone(), mean.clone(), variance.clone());
        let y = if ours {
            batch_norm(x, args.0, args.1, args.2, args.3, 1e-5)
        } else {
            burn::tensor::module::batch_norm(x, args.0, args.1, args.2, args.3, 1e-5)
        };
        y.into_data().try_into_vec::<f32>().unwrap()
    };
    let want = run(x(), false);
    let unshared = run(x(), true);
    assert!(max_relative_difference(&unshared, &want) <= 1e-6);
    let kept = x();
    let shared = run(kept.clone(), true);
    assert_eq!(shared, unshared);
    assert_eq!(
        kept.into_data().try_into_vec::<f32>().unwrap(),
        values(7, len)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The backward kernels that write over the consumed output gradient give the same bits as
    /// the ones that write a fresh buffer (autodiff takes either, depending on whether the
    /// gradient is shared).
    #[test]
    fn in_place_gradients_equal_fresh_ones(
        samples in 1usize..4,
        channels in 1usize..6,
        plane in 1usize..40,
        seed in any::<u64>(),
    ) {
        let len = samples * channels * plane;
        let (x, dy) = (values(seed, len), values(seed ^ 1, len));
        let gamma = values(seed ^ 2, channels);
        let (_, mean, var) = batchnorm::batch_norm_train_host(&x, &gamma, &gamma, 1e-5, plane);
        let (x_grad, gamma_grad, beta_grad) =
            batchnorm::batch_norm_backward_host(&x, &dy, &gamma, &mean, &var, 1e-5, plane);
        let mut over = dy.clone();
        let (gamma_grad2, beta_grad2) = batchnorm::batch_norm_backward_in_place_host(
            &x, &mut over, &gamma, &mean, &var, 1e-5, plane,
        );
        prop_assert_eq!(&over, &x_grad);
        prop_assert_eq!(&gamma_grad2, &gamma_grad);
        prop_assert_eq!(&beta_grad2, &beta_grad);

        let fresh = prelu_input_grad_host(&x, &gamma, &dy, plane);
        let mut over = dy.clone();
        prelu_input_grad_in_place_host(&x, &gamma, &mut over, plane);
        prop_assert_eq!(&over, &fresh);
        let mut both = dy.clone();
        let alpha_grad = prelu_backward_in_place_host(&x, &gamma, &mut both, plane);
        prop_assert_eq!(&both, &fresh);
        prop_assert_eq!(alpha_grad, prelu_alpha_grad_host(&x, &dy, channels, plane));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The fused BatchNorm + PReLU gives the two ops' bits: output, statistics and all four
    /// gradients (planes from 8 values, below and above the 8-lane sums' width).
    #[test]
    fn fused_batch_norm_prelu_equals_the_two_ops(
        batch in 1usize..5,
        channels in 1usize..9,
        height in 2usize..12,
        width in 4usize..12,
        offset in prop_oneof![Just(0.0f32), Just(0.7f32)],
        seed in any::<u64>(),
    ) {
        let dims = [batch, channels, height, width];
        let fused = batch_norm_gradients(dims, offset, seed, BatchNormPath::Fused);
        let separate = batch_norm_gradients(dims, offset, seed, BatchNormPath::KernelsThenPrelu);
        let what = ["output", "mean", "variance", "input grad", "gamma grad", "beta grad", "alpha grad"];
        for (what, (a, b)) in what.iter().zip(fused.iter().zip(&separate)) {
            let differing = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            prop_assert_eq!(differing, 0, "{:?} offset {}: {} differs in {} of {}", dims, offset, what, differing, a.len());
        }
    }
}

/// BatchNorm + PReLU + depthwise convolution on `dims` through the one op
/// ([`batch_norm_prelu_depthwise_train`]) or through the two ([`batch_norm_prelu_train`] then
/// [`conv2d`]): the output, the statistics and every gradient (input, gamma, beta, alpha,
/// convolution weight).
fn fused_depthwise_gradients(
    dims: [usize; 4],
    (kernel, stride, padding): (usize, usize, usize),
    seed: u64,
    one_op: bool,
) -> Vec<Vec<f32>> {
    use burn::module::Param;
    let device = qud_backend_flex::device().autodiff();
    let channels = dims[1];
    let tensor = |seed: u64, len: usize| {
        Tensor::<1>::from_data(TensorData::new(values(seed, len), [len]), &device)
    };
    let x = tracked(seed, dims, &device);
    let gamma = tracked(seed + 1, [channels], &device);
    let beta = tracked(seed + 2, [channels], &device);
    let alpha = tracked(seed + 4, [channels], &device);
    let mut conv = Conv2dConfig::new([channels, channels], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_groups(channels)
        .with_bias(false)
        .init(&device);
    let taps = tensor(seed + 5, channels * kernel * kernel);
    conv.weight = Param::from_tensor(taps.reshape([channels, 1, kernel, kernel]));
    let parameters = (gamma.clone(), beta.clone(), alpha.clone());
    let result = if one_op {
        batch_norm_prelu_depthwise_train(x.clone(), parameters, &conv, 1e-5)
    } else {
        let (g, b, a) = parameters;
        let r = batch_norm_prelu_train(x.clone(), g, b, a, 1e-5);
        BatchNormTrain {
            output: conv2d(&conv, r.output),
            ..r
        }
    };
    let (mut out, grads) = batch_norm_outputs(result, seed, (&x, &gamma, &beta));
    out.push(flat(alpha.grad(&grads).unwrap()));
    out.push(flat(conv.weight.grad(&grads).unwrap()));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// MobileFaceNet's 3 x 3 at stride 1 and 2 (the flat planes) and other kernels (the
    /// general loops): the one op gives the two ops' bits.
    #[test]
    fn fused_batch_norm_prelu_depthwise_equals_the_two_ops(
        batch in 1usize..4,
        channels in 1usize..6,
        height in 3usize..12,
        width in 3usize..20,
        conv in prop_oneof![Just((3usize, 1usize, 1usize)), Just((3, 2, 1)), Just((3, 1, 0)), Just((5, 2, 2)), Just((1, 1, 0))],
        seed in any::<u64>(),
    ) {
        let dims = [batch, channels, height, width];
        prop_assume!(height * width >= 8);
        let one = fused_depthwise_gradients(dims, conv, seed, true);
        let two = fused_depthwise_gradients(dims, conv, seed, false);
        let what = ["output", "mean", "variance", "input grad", "gamma grad", "beta grad", "alpha grad", "weight grad"];
        for (what, (a, b)) in what.iter().zip(one.iter().zip(&two)) {
            prop_assert_eq!(a.len(), b.len(), "{}", what);
            let differing = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            prop_assert_eq!(differing, 0, "{:?} conv {:?}: {} differs in {} of {}", dims, conv, what, differing, a.len());
        }
    }
}

/// BatchNorm plus a shortcut on `dims` through the one op ([`batch_norm_add_train`]) or the two
/// ([`batch_norm_train`], then the sum): the output, the statistics and the input, gamma, beta
/// and shortcut gradients.
fn batch_norm_add_gradients(dims: [usize; 4], seed: u64, one_op: bool) -> Vec<Vec<f32>> {
    let device = qud_backend_flex::device().autodiff();
    let x = tracked(seed, dims, &device);
    let gamma = tracked(seed + 1, [dims[1]], &device);
    let beta = tracked(seed + 2, [dims[1]], &device);
    let shortcut = tracked(seed + 4, dims, &device);
    let result = if one_op {
        batch_norm_add_train(
            x.clone(),
            gamma.clone(),
            beta.clone(),
            shortcut.clone(),
            1e-5,
        )
    } else {
        let r = batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        BatchNormTrain {
            output: r.output + shortcut.clone(),
            ..r
        }
    };
    let (mut out, grads) = batch_norm_outputs(result, seed, (&x, &gamma, &beta));
    out.push(flat(shortcut.grad(&grads).unwrap()));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A residual unit's last BatchNorm and sum as one op give the two ops' bits, the
    /// shortcut's gradient included.
    #[test]
    fn fused_batch_norm_add_equals_the_two_ops(
        batch in 1usize..4,
        channels in 1usize..6,
        height in 2usize..10,
        width in 4usize..20,
        seed in any::<u64>(),
    ) {
        let dims = [batch, channels, height, width];
        let one = batch_norm_add_gradients(dims, seed, true);
        let two = batch_norm_add_gradients(dims, seed, false);
        let what = ["output", "mean", "variance", "input grad", "gamma grad", "beta grad", "shortcut grad"];
        for (what, (a, b)) in what.iter().zip(one.iter().zip(&two)) {
            prop_assert_eq!(a.len(), b.len(), "{}", what);
            let differing = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            prop_assert_eq!(differing, 0, "{:?}: {} differs in {} of {}", dims, what, differing, a.len());
        }
    }
}

/// `lhs[m, k] * image[k, positions]` in f64, the reference for the pointwise kernel.
fn plain_product(lhs: &[f32], image: &[f32], (m, k, positions): (usize, usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; m * positions];
    for i in 0..m {
        for p in 0..positions {
            let sum: f64 = (0..k)
                .map(|j| lhs[i * k + j] as f64 * image[j * positions + p] as f64)
                .sum();
            out[i * positions + p] = sum as f32;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The AVX-512 1 x 1 kernel against an f64 product: every output written (the buffer starts
    /// as NaN), rows in tiles of eight with a partial last one, positions in blocks of up to 48
    /// with a masked last vector, several passes over the tiles when depth + rows is large, rows
    /// split between calls, the weight read through either stride (forward or transposed).
    #[test]
    fn pointwise_kernel_matches_the_plain_product(
        m in 1usize..40,
        k in 1usize..40,
        positions in 1usize..200,
        wide in any::<bool>(),
        transposed in any::<bool>(),
        split in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // Nothing to test where the kernel cannot run (the products go to `gemm` there);
        // `prop_assume!` would fail the test once every case was rejected.
        if !pointwise::available() {
            return Ok(());
        }
        // Wide: past the per-pass budget of 96K values, so that one image takes several passes.
        let (m, k) = if wide { (m + 600, k + 600) } else { (m, k) };
        let (lhs, image) = (values(seed, m * k), values(seed + 1, k * positions));
        let next = values(seed + 2, k * positions);
        // The weight as stored: `[m, k]`, or `[k, m]` read transposed.
        let (stored, strides) = if transposed {
            let mut t = vec![0f32; m * k];
            for i in 0..m {
                for j in 0..k {
                    t[j * m + i] = lhs[i * k + j];
                }
            }
            (t, (1, m))
        } else {
            (lhs.clone(), (k, 1))
        };
        let packed = pointwise::PackedLhs::new(&stored, (m, k), strides);
        let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); m * positions];
        let first = if split { (m / 2).next_multiple_of(pointwise::ROWS).min(m) } else { 0 };
        let (top, bottom) = out.split_at_mut(first * positions);
        pointwise::product(&packed, (&image, positions), (0, top), Some((&next, bottom.as_ptr().cast())));
        pointwise::product(&packed, (&image, positions), (first, bottom), None);
        // SAFETY: initialised as NaN above.
        let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        let expected = plain_product(&lhs, &image, (m, k, positions));
        for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
            // Sums of k products of values in [-1, 1] in another order, with FMA.
            prop_assert!((got - want).abs() <= 1e-5 * k as f32, "element {i}: {got} against {want}");
        }
    }
}

/// Every SIMD build of the kernels (AVX-512, AVX2 + FMA, portable) gives the same bits, forward
/// and backward: each level up to the CPU's is forced in turn (`simd::cap_level`), so an AVX-512
/// machine runs all three and an AVX2 one two. Shapes are MobileFaceNet's own (3 x 3 depthwise
/// at strides 1 and 2 on flat planes, a 7 x 7, 1 x 1 and 3 x 3 dense layers, the fused
/// BatchNorm ops) plus odd sizes for the loops' tails.
#[test]
fn every_simd_level_gives_the_same_bits() {
    use crate::simd::{cap_level, detected, SimdLevel};
    let run = || -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        for (stride, height) in [(1, 14), (2, 28), (1, 9)] {
            let shape = Depthwise {
                batch: 2,
                channels: 5,
                height,
                width: height + 1,
                kernel: 3,
                stride,
                padding: 1,
            };
            out.extend(gradients(&shape, true, 11 + stride as u64, true));
        }
        let seven = Depthwise {
            batch: 2,
            channels: 3,
            height: 7,
            width: 7,
            kernel: 7,
            stride: 1,
            padding: 0,
        };
        out.extend(gradients(&seven, false, 5, true));
        for (kernel, stride, padding) in [(1, 1, 0), (3, 2, 1), (3, 1, 1)] {
            let dense = Dense {
                batch: 2,
                in_channels: 6,
                out_channels: 19,
                height: 13,
                width: 11,
                kernel,
                stride,
                padding,
            };
            out.extend(dense_gradients(&dense, true, 3, true));
        }
        for (stride, size) in [(1, 14), (2, 15)] {
            out.extend(fused_depthwise_gradients(
                [2, 4, size, size],
                (3, stride, 1),
                7,
                true,
            ));
            out.extend(fused_depthwise_gradients(
                [2, 4, size, size],
                (3, stride, 1),
                7,
                false,
            ));
        }
        out.extend(batch_norm_add_gradients([2, 5, 9, 7], 13, true));
        out.extend(prelu_gradients([2, 5, 9, 7], 17, true));
        let mut biased = values(37, 2 * 5 * 99);
        bias_prelu_in_place_host(&mut biased, &values(41, 5), &values(43, 5), 99);
        out.push(biased);
        let mut quantized = values(19, 3 * 1001);
        let scales = quantize_u8_per_image_in_place(&mut quantized, 1001);
        out.push(quantized);
        out.push(scales);
        out
    };
    let levels: Vec<SimdLevel> = [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512]
        .into_iter()
        .filter(|l| *l <= detected())
        .collect();
    let mut results = Vec::new();
    for &level in &levels {
        cap_level(Some(level));
        assert_eq!(crate::simd::level(), level);
        results.push(run());
    }
    cap_level(None);
    let bits = |r: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        r.iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    for (level, result) in levels.iter().zip(&results).skip(1) {
        assert!(
            bits(result) == bits(&results[0]),
            "{level:?} differs from the portable build"
        );
    }
    eprintln!("checked {levels:?} (this CPU: {:?})", detected());
}

/// `QUD_CPU_KERNELS=off` sends every op to Burn: run in a child process with it set, a dense
/// and a depthwise convolution are exactly Burn's, and `enabled()` says so.
#[test]
fn the_kernels_can_be_switched_off() {
    const CHILD: &str = "QUD_TEST_KERNELS_OFF_CHILD";
    if std::env::var_os(CHILD).is_some() {
        assert!(!enabled());
        let device = qud_backend_flex::device();
        for groups in [1, 4] {
            let conv = Conv2dConfig::new([4, 4], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_groups(groups)
                .init(&device);
            let x = Tensor::<4>::from_data(
                TensorData::new(values(3, 2 * 4 * 64), [2, 4, 8, 8]),
                &device,
            );
            let ours = flat(conv2d(&conv, x.clone()));
            let burns = flat(conv.forward(x));
            assert_eq!(ours, burns, "groups {groups}");
        }
        return;
    }
    assert!(enabled(), "on unless QUD_CPU_KERNELS=off");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["tests::the_kernels_can_be_switched_off", "--exact"])
        .env(CHILD, "1")
        .env("QUD_CPU_KERNELS", "off")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&child.stdout);
    assert!(
        child.status.success() && text.contains("1 passed"),
        "the child run with QUD_CPU_KERNELS=off failed:\n{text}{}",
        String::from_utf8_lossy(&child.stderr)
    );
}

/// The reference for [`quantize_u8_per_image_in_place`]: ONNX's DynamicQuantizeLinear as
/// onnxruntime computes it (its `GetQuantizationParameter`, then `round(x / scale) + zp`
/// saturated, half to even), one image at a time, centred.
fn quantize_reference(image: &[f32]) -> (Vec<f32>, f32) {
    let lo = image.iter().copied().fold(0f32, f32::min);
    let hi = image.iter().copied().fold(0f32, f32::max);
    let scale = if hi == lo { 1.0 } else { (hi - lo) / 255.0 };
    let zp = (-lo / scale).clamp(0.0, 255.0).round_ties_even();
    let q = image
        .iter()
        .map(|v| ((v / scale).round_ties_even() + zp).clamp(0.0, 255.0) - zp)
        .collect();
    (q, scale)
}

/// Per-image quantisation matches the operator value for value (at this CPU's level;
/// `every_simd_level_gives_the_same_bits` holds the other levels to it): random images (odd
/// lengths, the vector loop's remainder), all-positive, all-negative and all-zero ones, and one
/// whose scale is exactly 1 with values on the halves (ties round to even).
#[test]
fn per_image_quantization_is_the_onnx_operator() {
    let per_image = 1001;
    let mut images = values(23, 2 * per_image);
    images.extend(values(29, per_image).iter().map(|v| v.abs() + 0.25));
    images.extend(values(31, per_image).iter().map(|v| -v.abs() - 3.0));
    images.extend(vec![0.0; per_image]);
    let mut ties: Vec<f32> = (0..per_image).map(|k| (k % 200) as f32 - 99.5).collect();
    (ties[0], ties[1]) = (-127.5, 127.5);
    images.extend(ties);
    let mut got = images.clone();
    let scales = quantize_u8_per_image_in_place(&mut got, per_image);
    for (k, image) in images.chunks(per_image).enumerate() {
        let (want, scale) = quantize_reference(image);
        assert_eq!(scales[k].to_bits(), scale.to_bits(), "image {k}'s scale");
        let got = &got[k * per_image..(k + 1) * per_image];
        assert_eq!(got, want.as_slice(), "image {k}");
    }
    // The tie image: scale 1, zero point 128 (127.5 rounded to even), halves to even.
    assert_eq!(scales[5], 1.0);
    let ties = &got[5 * per_image..];
    assert_eq!(&ties[2..6], &[-98.0, -96.0, -96.0, -94.0]);
}

/// The fused bias + PReLU pass gives the bits of the two ops it replaces (Burn's broadcast add,
/// then qud's PReLU), on planes of odd size.
#[test]
fn bias_and_prelu_in_one_pass_are_the_two_ops() {
    let device = qud_backend_flex::device();
    let (n, c, h, w) = (3, 5, 7, 9);
    let x = values(47, n * c * h * w);
    let bias = values(53, c);
    let alpha = values(59, c);
    let tensor = |v: &[f32], shape: Vec<usize>| {
        Tensor::<4>::from_data(TensorData::new(v.to_vec(), shape), &device)
    };
    let two_ops = prelu(
        tensor(&x, vec![n, c, h, w]) + tensor(&bias, vec![1, c, 1, 1]),
        Tensor::<1>::from_data(TensorData::new(alpha.clone(), [c]), &device),
    );
    let mut fused = x.clone();
    bias_prelu_in_place_host(&mut fused, &bias, &alpha, h * w);
    assert_eq!(fused, flat(two_ops));
}
