//! Parity with PyTorch on fixtures written by `models/fixtures/make_fixtures.py` (torch 2.15,
//! seeds and formula in that script).

use super::*;
use burn::module::Module;
use qud_backbone::{load_weights, save_safetensors};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `models/fixtures/<name>`, beside this crate.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name)
}

fn read_tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn tensor<const D: usize>(shape: &[usize], values: Vec<f32>, device: &Device) -> Tensor<D> {
    let shape: [usize; D] = shape.try_into().unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

/// ||a - b|| / ||b||
fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

/// The script's `formula(key, shape)`, value for value.
fn formula(key: &str, shape: &[usize]) -> Vec<f32> {
    let phase = crc32fast::hash(key.as_bytes()) as f64 / 2f64.powi(32) * 2.0 * std::f64::consts::PI;
    scaled_like_the_script(key, shape, &["input"], |i| (0.7 * i as f64 + phase).sin())
}

/// The script's `hashed(key, shape)`: `formula`'s kinds of tensor, filled with splitmix64 noise
/// of unit variance instead of a sine (whose weight matrices are of rank 2).
fn hashed(key: &str, shape: &[usize]) -> Vec<f32> {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let start = (crc32fast::hash(key.as_bytes()) as u64)
        .wrapping_mul(GOLDEN)
        .wrapping_add(GOLDEN);
    scaled_like_the_script(key, shape, &["input", "probe"], |i| {
        let mut z = start.wrapping_add(i as u64);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 / 2f64.powi(53) * 2.0 - 1.0) * 3f64.sqrt()
    })
}

/// What both of the script's generators make of raw values `v(i)` for the tensor `key`: running
/// variances `1 + v^2 / 2`, other vectors near their identity (`1 + 0.2 v` for a BatchNorm
/// weight, `0.2 v` for biases and PReLU slopes), weight tensors `v / sqrt(fan-in)`, and the
/// `unscaled` keys (the faces) `v` itself.
fn scaled_like_the_script(
    key: &str,
    shape: &[usize],
    unscaled: &[&str],
    v: impl Fn(usize) -> f64,
) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let leaf = key.rsplit('.').next().unwrap();
    let is_prelu = key.contains(".prelu.") || key.starts_with("prelu");
    (0..n)
        .map(|i| {
            let v = v(i);
            let v = if leaf == "running_var" {
                1.0 + 0.5 * v * v
            } else if shape.len() == 1 {
                0.2 * v
                    + if leaf == "weight" && !is_prelu {
                        1.0
                    } else {
                        0.0
                    }
            } else if !unscaled.contains(&key) {
                v * (1.0 / (n / shape[0]) as f64).sqrt()
            } else {
                v
            };
            v as f32
        })
        .collect()
}

/// Export `model` to learn its keys and shapes, then load formula values for every key.
fn load_formula_weights<M: Module>(model: M, dir: &Path) -> M {
    load_weights_from(model, dir, formula)
}

/// Export `model` to learn its keys and shapes, then load `values(key, shape)` for every key.
fn load_weights_from<M: Module>(model: M, dir: &Path, values: fn(&str, &[usize]) -> Vec<f32>) -> M {
    let names = dir.join("names.safetensors");
    save_safetensors(&model, &names).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = read_tensors(&names)
        .into_iter()
        .map(|(k, (shape, _))| (k, shape))
        .collect();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(k, shape)| {
            let bytes = values(&k, &shape)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (k, shape, bytes)
        })
        .collect();
    let views = data.iter().map(|(k, shape, bytes)| {
        (
            k.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
        )
    });
    let path = dir.join("formula.safetensors");
    std::fs::write(&path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    load_weights(model, &path).unwrap()
}

#[test]
fn pytorch_fixture_mobilefacenet_eval_train_and_export() {
    let device = qud_backend_flex::device();
    let io = read_tensors(&fixture("mobilefacenet_d128_io.safetensors"));
    let (shape, x) = io["input"].clone();
    let pth = fixture("mobilefacenet_d128.pth");

    // Eval mode: a real torch.save file, running statistics.
    let model = load_weights(MobileFaceNet::new(128, &device), &pth).unwrap();
    let eval = model.valid();
    let y = values(eval.forward(tensor(&shape, x.clone(), &device)));
    let err = relative_l2(&y, &io["eval_output"].1);
    assert!(
        err < 1e-4,
        "eval output differs from PyTorch: relative L2 {err}"
    );

    // Train mode: batch statistics and PyTorch's running-statistics update.
    let train = device.clone().autodiff();
    let model = load_weights(MobileFaceNet::new(128, &train), &pth).unwrap();
    let y = values(model.forward(tensor(&shape, x.clone(), &train)));
    let err = relative_l2(&y, &io["train_output"].1);
    assert!(
        err < 1e-4,
        "train output differs from PyTorch: relative L2 {err}"
    );
    for (name, stat) in [
        ("conv1.bn.running_var", &model.conv1.bn.running_var),
        ("conv1.bn.running_mean", &model.conv1.bn.running_mean),
        (
            "output_layer.bn.running_var",
            &model.output_layer.bn.running_var,
        ),
    ] {
        let err = relative_l2(&values(stat.value_sync()), &io[name].1);
        assert!(err < 1e-4, "{name} after one train step: relative L2 {err}");
    }

    // Export with PyTorch names; it loads back here strictly and gives the same output.
    // `make_fixtures.py --verify-export` loads the same file into PyTorch.
    let dir = tempfile::tempdir().unwrap();
    let out_dir = std::env::var_os("QUD_EXPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or(dir.path().into());
    let exported = out_dir.join("mobilefacenet_d128.safetensors");
    save_safetensors(&eval, &exported).unwrap();
    let keys: Vec<String> = read_tensors(&exported).into_keys().collect();
    assert!(
        keys.contains(&"conv_3.model.0.conv_dw.prelu.weight".to_string()),
        "{keys:?}"
    );
    assert!(keys.contains(&"output_layer.bn.running_var".to_string()));
    let reloaded = load_weights(MobileFaceNet::new(128, &device), &exported).unwrap();
    let y2 = values(reloaded.valid().forward(tensor(&shape, x, &device)));
    assert_eq!(y2, y_eval(&eval, &io));
}

fn y_eval(model: &MobileFaceNet, io: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Vec<f32> {
    let (shape, x) = io["input"].clone();
    values(model.forward(tensor(&shape, x, &qud_backend_flex::device())))
}

#[test]
fn pytorch_fixture_iresnets_from_the_weight_formula() {
    let device = qud_backend_flex::device();
    let io = read_tensors(&fixture("iresnet_formula_io.safetensors"));
    let x = formula("input", &[2, 3, 112, 112]);
    let dir = tempfile::tempdir().unwrap();
    for arch in ["iresnet18", "iresnet50", "iresnet100"] {
        let model = IResNet::new(arch, 512, 0.0, &device).unwrap();
        let model = load_formula_weights(model, dir.path()).valid();
        let y = values(model.forward(tensor(&[2, 3, 112, 112], x.clone(), &device)));
        let err = relative_l2(&y, &io[arch].1);
        assert!(err < 1e-4, "{arch}: relative L2 {err} against PyTorch");
    }
}

#[test]
fn strict_import_lists_every_problem() {
    let device = qud_backend_flex::device();
    let dir = tempfile::tempdir().unwrap();
    // A MobileFaceNet file loaded into another architecture: missing and unexpected keys.
    let err = load_weights(
        IResNet::new("iresnet18", 128, 0.0, &device).unwrap(),
        &fixture("mobilefacenet_d128.pth"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mobilefacenet_d128.pth"), "{err}");
    assert!(
        err.contains("missing from the file: layer1.0.bn1.weight"),
        "{err}"
    );
    assert!(
        err.contains("not in the model: conv_23.conv.conv.weight"),
        "{err}"
    );
    assert!(!err.contains("num_batches_tracked"), "{err}");

    // Same keys, another embedding size: a shape mismatch names the tensor.
    let err = load_weights(
        MobileFaceNet::new(256, &device),
        &fixture("mobilefacenet_d128.pth"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("output_layer.linear.weight"), "{err}");

    let missing = dir.path().join("nope.pth");
    let err = load_weights(MobileFaceNet::new(128, &device), &missing).unwrap_err();
    assert!(err.to_string().contains("nope.pth"), "{err}");
    let odd = dir.path().join("weights.onnx");
    std::fs::write(&odd, b"x").unwrap();
    let err = load_weights(MobileFaceNet::new(128, &device), &odd).unwrap_err();
    assert!(err.to_string().contains("cannot tell the format"), "{err}");
}

/// `.pth` (a zip holding a pickle) and safetensors files with bytes changed in their headers,
/// indexes and pickle, or cut short: the weights load (only tensor bytes changed) or the error
/// names the file; no panic gets out, whatever the readers underneath do.
#[test]
fn damaged_weight_files_load_or_fail_cleanly() {
    let device = qud_backend_flex::device();
    let dir = tempfile::tempdir().unwrap();
    let pth = std::fs::read(fixture("mobilefacenet_d128.pth")).unwrap();
    let exported = dir.path().join("exported.safetensors");
    let model = load_weights(
        MobileFaceNet::new(128, &device),
        &fixture("mobilefacenet_d128.pth"),
    )
    .unwrap();
    save_safetensors(&model, &exported).unwrap();
    let safetensors = std::fs::read(&exported).unwrap();
    let mut state = 0x77_u64;
    let mut next = move |below: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % below.max(1)
    };
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..48 {
        let (name, original) = match case % 2 {
            0 => ("damaged.pth", &pth),
            _ => ("damaged.safetensors", &safetensors),
        };
        let mut bytes = original.clone();
        // The structure lives at the ends: the zip's first entry (the pickle) and its central
        // directory, the safetensors JSON header.
        for _ in 0..1 + next(3) {
            let span = 4096.min(bytes.len());
            let at = match next(2) {
                0 => next(span),
                _ => bytes.len() - 1 - next(span),
            };
            bytes[at] ^= 1 + next(255) as u8;
        }
        if case % 5 == 4 {
            bytes.truncate(next(bytes.len()));
        }
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        match load_weights(MobileFaceNet::new(128, &device), &path) {
            Ok(_) => loaded += 1,
            Err(e) => {
                assert!(e.to_string().contains(name), "{e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "{loaded} loaded, {refused} refused");
}

/// Folding BatchNorms into the neighbouring weights computes the same function: on the real
/// PyTorch MobileFaceNet file (random running statistics, see `make_fixtures.py`) and on
/// iresnet18 with the formula weights (running variances 1..1.5, affine 1 +- 0.2).
#[test]
fn folded_batchnorm_keeps_the_embeddings() {
    let device = qud_backend_flex::device();
    let io = read_tensors(&fixture("mobilefacenet_d128_io.safetensors"));
    let (shape, x) = io["input"].clone();
    let mfn = load_weights(
        MobileFaceNet::new(128, &device),
        &fixture("mobilefacenet_d128.pth"),
    )
    .unwrap();
    let mut folded = AnyBackbone::MobileFaceNet(mfn.clone());
    folded.fold_batchnorm();
    let plain = values(mfn.forward(tensor(&shape, x.clone(), &device)));
    let y = values(folded.forward(tensor(&shape, x, &device)));
    let err = relative_l2(&y, &plain);
    assert!(err < 1e-5, "MobileFaceNet folded vs not: relative L2 {err}");
    assert!(relative_l2(&y, &io["eval_output"].1) < 1e-4);
    let AnyBackbone::MobileFaceNet(m) = &folded else {
        unreachable!()
    };
    assert!(m.conv1.bn.folded && m.output_layer.bn.folded);
    assert!(m.conv1.conv.bias.is_some());

    let dir = tempfile::tempdir().unwrap();
    let x = formula("input", &[2, 3, 112, 112]);
    let model = IResNet::new("iresnet18", 512, 0.0, &device).unwrap();
    let model = load_formula_weights(model, dir.path()).valid();
    let plain = values(model.forward(tensor(&[2, 3, 112, 112], x.clone(), &device)));
    let mut folded = AnyBackbone::IResNet(model);
    folded.fold_batchnorm();
    let y = values(folded.forward(tensor(&[2, 3, 112, 112], x, &device)));
    let err = relative_l2(&y, &plain);
    assert!(err < 1e-5, "iresnet18 folded vs not: relative L2 {err}");
    let AnyBackbone::IResNet(m) = &folded else {
        unreachable!()
    };
    // The pre-activation BatchNorm of a block precedes a padded conv and is kept.
    assert!(m.bn2.folded && m.features.folded && m.layer1[0].bn3.folded);
    assert!(!m.layer1[0].bn1.folded);
}

/// `make_mixfacenet_fixture.py`'s `noise_input()`: two faces of hashed noise.
fn noise_input(device: &Device) -> Tensor<4> {
    tensor(
        &[2, 3, 112, 112],
        hashed("input", &[2, 3, 112, 112]),
        device,
    )
}

/// Against the QUD repository's own `mixnet_s(512, width_scale=1.0, gdw_size=512, shuffle=True)`
/// (`fixtures/make_mixfacenet_fixture.py`, torch 2.15 in float64, weights `hashed(key, shape)`): eval
/// output, one train-mode forward with its running statistics, and the gradients of
/// `sum(y * hashed("probe"))`. In eval mode the BatchNorms' stored statistics do not rescale the
/// activations, and the input's signal fades through stages 2-4 (the two faces end 7e-4 apart on
/// a scale of 1.9), so the train-mode output and the gradients are the input-sensitive checks.
#[test]
fn pytorch_fixture_shufflemixfacenet_eval_train_gradients_and_export() {
    use qud_mixfacenet::UnitConv;
    let device = qud_backend_flex::device();
    let io = read_tensors(&fixture("mixfacenet_hashed_io.safetensors"));
    let dir = tempfile::tempdir().unwrap();

    let model = load_weights_from(ShuffleMixFaceNet::new(512, &device), dir.path(), hashed);
    let eval = model.valid();
    let y_eval = values(eval.forward(noise_input(&device)));
    let err = relative_l2(&y_eval, &io["eval_output"].1);
    assert!(err < 1e-4, "eval output: relative L2 {err} against PyTorch");

    let train = device.clone().autodiff();
    let model = load_weights_from(ShuffleMixFaceNet::new(512, &train), dir.path(), hashed);
    let y = model.forward(noise_input(&train));
    let probe = tensor::<2>(&[2, 512], hashed("probe", &[2, 512]), &train);
    let grads = (y.clone() * probe).sum().backward();
    let err = relative_l2(&values(y), &io["train_output"].1);
    assert!(
        err < 1e-4,
        "train output: relative L2 {err} against PyTorch"
    );

    let f = &model.features;
    fn mixed(conv: &UnitConv) -> &qud_mixfacenet::MixConvBlock {
        match conv {
            UnitConv::Mixed(block) => block,
            UnitConv::Single(_) => panic!("a mixed block"),
        }
    }
    let stage2 = f.stage2.unit1.as_ref().unwrap();
    let stage3 = f.stage3.unit1.as_ref().unwrap();
    let stage4 = f.stage4.unit4.as_ref().unwrap();
    for (name, stat) in [
        (
            "features.stage2.unit1.conv1.bn.running_mean",
            &mixed(&stage2.conv1).bn.running_mean,
        ),
        (
            "features_norm.running_var",
            &model.features_norm.running_var,
        ),
    ] {
        let err = relative_l2(&values(stat.value_sync()), &io[name].1);
        assert!(err < 1e-4, "{name} after one train step: relative L2 {err}");
    }
    let grad = |t: Tensor<1>| values(t.grad(&grads).unwrap());
    let grad4 = |t: Tensor<4>| values(t.grad(&grads).unwrap());
    let prelu = f.init_block.conv1.activ.as_ref().unwrap();
    let se2 = stage2.se.as_ref().unwrap();
    let se3 = stage3.se.as_ref().unwrap();
    for (name, got) in [
        (
            "features.init_block.conv1.activ.weight",
            grad(prelu.weight.val()),
        ),
        (
            "features.stage2.unit1.conv1.conv.1.weight",
            grad4(mixed(&stage2.conv1).conv[1].weight.val()),
        ),
        (
            "features.stage2.unit1.se.conv1.bias",
            grad(se2.conv1.bias.as_ref().unwrap().val()),
        ),
        (
            "features.stage4.unit4.conv1.conv.4.weight",
            grad4(mixed(&stage4.conv1).conv[4].weight.val()),
        ),
        (
            "features.stage3.unit1.se.conv2.weight",
            grad4(se3.conv2.weight.val()),
        ),
        (
            "features_norm.bias",
            grad(model.features_norm.bias.as_ref().unwrap().val()),
        ),
    ] {
        // PyTorch's own float32 gradients are 1.5e-3 from these float64 ones.
        let err = relative_l2(&got, &io[&format!("grad.{name}")].1);
        assert!(err < 4e-3, "gradient of {name}: relative L2 {err}");
    }
    assert!(
        model
            .features_norm
            .weight
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .is_none(),
        "features_norm.weight stays frozen"
    );

    // Export with PyTorch names: `make_mixfacenet_fixture.py --verify-export` loads it into the
    // QUD module strictly; here it loads back and gives the same output.
    let out_dir = std::env::var_os("QUD_EXPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or(dir.path().into());
    let exported = out_dir.join("shufflemixfacenet_s.safetensors");
    save_safetensors(&eval, &exported).unwrap();
    let keys: Vec<String> = read_tensors(&exported).into_keys().collect();
    for key in [
        "features.stage2.unit1.conv1.conv.1.weight",
        "features.init_block.conv2.conv1.conv.weight",
        "feautre_layer.pw_conv.conv.weight",
    ] {
        assert!(keys.contains(&key.to_string()), "{key} not in {keys:?}");
    }
    let reloaded = load_weights(ShuffleMixFaceNet::new(512, &device), &exported).unwrap();
    let y2 = values(reloaded.valid().forward(noise_input(&device)));
    assert_eq!(y2, y_eval);
}

/// Against the QUD repository's own TransFace-B (`fixtures/make_transface_fixture.py`, torch
/// 2.15, weights `hashed(key, shape)`): the eval-mode output of two noise faces, which differ by
/// 0.89 on a scale of 12 there.
#[test]
fn pytorch_fixture_transface_b_eval() {
    let device = qud_backend_flex::device();
    let io = read_tensors(&fixture("transface_hashed_io.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let model = TransFace::new("transface-b", 512, &device).unwrap();
    let mut model = load_weights_from(model, dir.path(), hashed).valid();
    let y = values(model.forward(noise_input(&device)));
    let err = relative_l2(&y, &io["eval_output"].1);
    assert!(err < 1e-4, "eval output: relative L2 {err} against PyTorch");
    // The head's BatchNorms folded into its linear layers: the same function.
    model.fold_batchnorm();
    let folded = values(model.forward(noise_input(&device)));
    let err = relative_l2(&folded, &y);
    assert!(err < 1e-5, "folded head: relative L2 {err}");
}
