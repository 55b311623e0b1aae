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

fn max_relative_difference(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
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
fn only_depthwise_inference_on_the_host_takes_the_kernel() {
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
    assert!(is_host_cpu(&device));
    assert_eq!(depthwise_shape(&conv, &x), Some(shape));
    // A dense convolution is not depthwise.
    let dense = Conv2dConfig::new([4, 4], [3, 3]).init(&device);
    assert_eq!(depthwise_shape(&dense, &x), None);
    // Training (autodiff) keeps Burn's path, so gradients flow: the output is tracked.
    let ad = device.clone().autodiff();
    let conv = burn_conv(&shape, true, &ad);
    let x = Tensor::<4>::ones([1, 4, 6, 6], &ad).require_grad();
    let grads = conv2d(&conv, x.clone()).sum().backward();
    assert!(x.grad(&grads).is_some());
}
