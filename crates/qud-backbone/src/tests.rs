use crate::layers::*;
use crate::*;
use burn::module::Module;

fn device() -> Device {
    qud_backend_flex::device()
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

#[test]
fn batch_norm_matches_pytorch_train_and_eval() {
    // torch.manual_seed(0); bn = nn.BatchNorm2d(2); x = [[[[1,2],[3,4]],[[0,0],[0,8]]],
    // [[[5,6],[7,8]],[[2,2],[2,2]]]]; per channel 8 values:
    // channel 0: mean 4.5, biased var 5.25, unbiased 6.0; channel 1: mean 2.0, biased 6.0,
    // unbiased 48/7. After one train step: running_mean = 0.1 * mean, running_var = 0.9 + 0.1 * unbiased.
    let train = device().autodiff();
    let bn = TorchBatchNorm::new(2, &train);
    let x = Tensor::<4>::from_floats(
        [
            [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]],
            [[[5.0, 6.0], [7.0, 8.0]], [[2.0, 2.0], [2.0, 2.0]]],
        ],
        &train,
    );
    let y = floats(bn.forward(x.clone()));
    let expect0 = (1.0 - 4.5) / (5.25f32 + 1e-5).sqrt();
    assert!((y[0] - expect0).abs() < 1e-5, "{} vs {expect0}", y[0]);
    let mean = floats(bn.running_mean.value_sync());
    let var = floats(bn.running_var.value_sync());
    assert!(
        (mean[0] - 0.45).abs() < 1e-6 && (mean[1] - 0.2).abs() < 1e-6,
        "{mean:?}"
    );
    assert!((var[0] - (0.9 + 0.6)).abs() < 1e-5, "{var:?}");
    assert!((var[1] - (0.9 + 0.1 * 48.0 / 7.0)).abs() < 1e-5, "{var:?}");

    // Eval mode normalises with the running statistics and leaves them alone.
    let eval = bn.valid();
    let y = floats(eval.forward(x.without_autodiff()));
    let expect = (1.0 - 0.45) / (1.5f32 + 1e-5).sqrt();
    assert!((y[0] - expect).abs() < 1e-5, "{} vs {expect}", y[0]);
    assert_eq!(floats(eval.running_var.value()), var);
}

#[test]
fn batch_norm_without_affine_has_no_parameters() {
    let bn = TorchBatchNorm::without_affine(4, &device());
    assert_eq!(num_parameters(&bn), 0);
    let bn = TorchBatchNorm::new(4, &device());
    assert_eq!(num_parameters(&bn), 8);
}

#[test]
fn linear_uses_pytorch_layout() {
    let mut fc = TorchLinear::new(3, 2, true, &device());
    fc.weight = burn::module::Param::from_tensor(Tensor::from_floats(
        [[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]],
        &device(),
    ));
    fc.bias = Some(burn::module::Param::from_tensor(Tensor::from_floats(
        [0.5, -0.5],
        &device(),
    )));
    let y = floats(fc.forward(Tensor::from_floats([[1.0, 2.0, 3.0]], &device())));
    assert_eq!(y, vec![1.0 - 3.0 + 0.5, 2.0 + 2.0 - 0.5]);
    assert_eq!(num_parameters(&fc), 8);
}

#[test]
fn prelu_has_one_slope_per_channel() {
    let mut p = TorchPRelu::new(2, &device());
    p.weight = burn::module::Param::from_tensor(Tensor::from_floats([0.5, 0.1], &device()));
    let y = floats(p.forward(Tensor::<4>::from_floats([[[[-2.0]], [[-2.0]]]], &device())));
    assert_eq!(y, vec![-1.0, -0.2]);
}

/// A layer of an `nn.Sequential` whose parameter-free entries hold their index.
#[derive(Module, Debug)]
enum GapLayer {
    Linear(TorchLinear),
    Relu(burn::nn::Relu),
}

#[derive(Module, Debug)]
struct GapHead {
    senet: Vec<GapLayer>,
}

/// `fixtures/sequential_gap.pth` (`make_sequential_gap.py`): keys `senet.0.weight` and
/// `senet.2.weight` load into the layers at those indices, strictly, from the torch.save file
/// and from qud's own safetensors export (burn-store would renumber the second to `senet.1`).
#[test]
fn sequential_indices_keep_their_gaps() {
    let device = qud_backend_flex::device();
    let head = || GapHead {
        senet: vec![
            GapLayer::Linear(TorchLinear::new(2, 3, false, &device)),
            GapLayer::Relu(burn::nn::Relu::new()),
            GapLayer::Linear(TorchLinear::new(3, 2, false, &device)),
        ],
    };
    let pth = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sequential_gap.pth");
    let loaded = load_weights(head(), &pth).unwrap();
    let GapLayer::Linear(last) = &loaded.senet[2] else {
        panic!("a linear layer at index 2");
    };
    let values = last.weight.val().into_data().try_to_vec::<f32>().unwrap();
    let want: Vec<f32> = (0..6).map(|i| 0.1 * i as f32).collect();
    assert_eq!(values, want);

    let dir = tempfile::tempdir().unwrap();
    let exported = dir.path().join("head.safetensors");
    save_safetensors(&loaded, &exported).unwrap();
    let again = load_weights(head(), &exported).unwrap();
    let GapLayer::Linear(last) = &again.senet[2] else {
        panic!("a linear layer at index 2");
    };
    assert_eq!(
        last.weight.val().into_data().try_to_vec::<f32>().unwrap(),
        want
    );
}

/// The fused training ops of [`TorchBatchNorm`] give what their parts give, output and running
/// statistics, with the CPU kernels (the default) and with Burn's ops
/// (`cargo test -p qud-backbone --no-default-features`, which `cargo xtask test` runs).
#[test]
fn fused_training_ops_equal_their_parts() {
    let train = device().autodiff();
    let channels = 4;
    let x = Tensor::<4>::random(
        [2, channels, 6, 6],
        burn::tensor::Distribution::Normal(0.5, 2.0),
        &train,
    );
    let shortcut = Tensor::<4>::random(
        [2, channels, 6, 6],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &train,
    );
    let mut prelu = TorchPRelu::new(channels, &train);
    prelu.weight =
        burn::module::Param::from_tensor(Tensor::from_floats([0.1, 0.3, -0.2, 0.7], &train));
    let conv = conv2d([channels, channels], 3, 1, 1, channels, 0.3, &train);
    let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{what}: {worst}");
    };
    type Run<'a> = &'a dyn Fn(&TorchBatchNorm) -> Tensor<4>;
    let cases: [(&str, Run, Run); 3] = [
        (
            "batch norm + PReLU",
            &|bn| bn.forward_prelu(x.clone(), &prelu),
            &|bn| prelu.forward(bn.forward(x.clone())),
        ),
        (
            "batch norm + shortcut",
            &|bn| bn.forward_add(x.clone(), shortcut.clone()),
            &|bn| shortcut.clone() + bn.forward(x.clone()),
        ),
        (
            "batch norm + PReLU + depthwise",
            &|bn| bn.forward_prelu_depthwise(x.clone(), &prelu, &conv),
            &|bn| crate::kernels::conv2d(&conv, prelu.forward(bn.forward(x.clone()))),
        ),
    ];
    for (what, fused, parts) in cases {
        let (a, b) = (
            TorchBatchNorm::new(channels, &train),
            TorchBatchNorm::new(channels, &train),
        );
        close(floats(fused(&a)), floats(parts(&b)), what);
        close(
            floats(a.running_var.value_sync()),
            floats(b.running_var.value_sync()),
            what,
        );
    }
}
