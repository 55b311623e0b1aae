//! Parity of ONNX exports, run by tract and by qud's native runtime, with qud's own backbones, with
//! PyTorch and with onnxruntime; the engine choice; batch independence; contract errors.
//!
//! Fixtures: `fixtures/make_onnx_fixtures.py` (PyTorch 2.15 `torch.onnx.export`, opset 13,
//! checked against onnxruntime there).

use super::*;
use qud_backbone::Backbone;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// `[3, 112, 112]` in [-1, 1] of the fixture script's `face_pixels(i)`:
/// `(7 i + 31 c + 3 y + 5 x) mod 256`.
fn face(i: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * FACE * FACE);
    for c in 0..3 {
        for y in 0..FACE {
            for x in 0..FACE {
                let u = ((7 * i + 31 * c + 3 * y + 5 * x) % 256) as f32;
                out.push((u / 255.0 - 0.5) / 0.5);
            }
        }
    }
    out
}

fn faces(n: usize, device: &Device) -> Tensor<4> {
    let data: Vec<f32> = (0..n).flat_map(face).collect();
    Tensor::from_data(TensorData::new(data, [n, 3, FACE, FACE]), device)
}

fn rows(t: Tensor<2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn bgr_nhwc() -> OnnxInput {
    OnnxInput {
        channels: ChannelOrder::Bgr,
        layout: InputLayout::Nhwc,
        ..OnnxInput::default()
    }
}

/// `contract` on one engine.
fn on(runtime: OnnxRuntime, contract: OnnxInput) -> OnnxInput {
    OnnxInput {
        runtime,
        ..contract
    }
}

/// Images per run each engine uses for a graph with a free batch dimension.
fn free_batch(runtime: OnnxRuntime) -> usize {
    match runtime {
        OnnxRuntime::Tract => PROBE_BATCH,
        _ => NATIVE_BATCH,
    }
}

const ENGINES: [OnnxRuntime; 2] = [OnnxRuntime::Tract, OnnxRuntime::Native];

#[test]
fn onnx_export_of_mobilefacenet_matches_the_burn_backbone() {
    let device = qud_backend_flex::device();
    let spec = qud_models::BackboneSpec {
        embedding_dim: 128,
        dropout: 0.0,
    };
    let pth =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/mobilefacenet_d128.pth");
    let burn_model = qud_models::load_weights(
        qud_models::create("mobilefacenet", &spec, &device).unwrap(),
        &pth,
    )
    .unwrap()
    .valid();
    for runtime in ENGINES {
        let onnx = OnnxFaceModel::load(
            &fixture("mobilefacenet_d128_bgr_nhwc.onnx"),
            &on(runtime, bgr_nhwc()),
        )
        .unwrap();
        assert_eq!(
            onnx.batch(),
            free_batch(runtime),
            "{runtime:?}: a free batch"
        );
        assert_eq!(onnx.output_dim(), 128);

        // 11 faces: on tract one full run of PROBE_BATCH and a padded one, split over threads.
        let x = faces(11, &device);
        let want = rows(burn_model.forward(x.clone()));
        let got = rows(onnx.embed_faces(x));
        let scale = nan_max(want.iter().map(|v| v.abs()));
        let worst = nan_max(want.iter().zip(&got).map(|(a, b)| (a - b).abs()));
        assert!(
            worst <= 1e-4 * scale.max(1.0),
            "{runtime:?} vs Burn: max difference {worst} (scale {scale})"
        );
    }
}

#[test]
fn thread_count_does_not_change_embeddings() {
    let device = qud_backend_flex::device();
    let path = fixture("mobilefacenet_d128_bgr_nhwc.onnx");
    let x = faces(5, &device);
    let one = OnnxFaceModel::load(
        &path,
        &OnnxInput {
            threads: 1,
            ..on(OnnxRuntime::Tract, bgr_nhwc())
        },
    )
    .unwrap();
    let three = OnnxFaceModel::load(
        &path,
        &OnnxInput {
            threads: 3,
            ..on(OnnxRuntime::Tract, bgr_nhwc())
        },
    )
    .unwrap();
    assert_eq!(rows(one.embed_faces(x.clone())), rows(three.embed_faces(x)));
}

#[test]
fn graph_with_batch_fixed_at_one_runs_per_image_and_matches_pytorch() {
    #[derive(serde::Deserialize)]
    struct Io {
        faces: Vec<usize>,
        outputs: Vec<Vec<f32>>,
    }
    let io: Io =
        serde_json::from_slice(&std::fs::read(fixture("tiny_fixed_batch_io.json")).unwrap())
            .unwrap();
    let contract = OnnxInput {
        mean: [127.0; 3],
        std: [128.0; 3],
        ..OnnxInput::default()
    };
    let data: Vec<f32> = io.faces.iter().flat_map(|&i| face(i)).collect();
    for runtime in ENGINES {
        let model = OnnxFaceModel::load(
            &fixture("tiny_fixed_batch.onnx"),
            &on(runtime, contract.clone()),
        )
        .unwrap();
        // tract runs the graph as exported; the native runtime maps the batch-1 Reshape to a
        // per-image one and runs any batch.
        let batch = if runtime == OnnxRuntime::Tract {
            1
        } else {
            NATIVE_BATCH
        };
        assert_eq!(model.batch(), batch, "{runtime:?}");
        assert_eq!(model.output_dim(), 16);
        let got = model.embed_normalized(&data, io.faces.len()).unwrap();
        for (i, want) in io.outputs.iter().enumerate() {
            for (d, w) in want.iter().enumerate() {
                let g = got[i * 16 + d];
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{runtime:?}: face {i} dim {d}: {g} vs PyTorch {w}"
                );
            }
        }
    }
}

/// The tiny graph with an op the native runtime does not map (LeakyRelu after the PReLU):
/// written next to `dir`'s other files.
fn with_unmapped_op(dir: &Path) -> PathBuf {
    use prost::Message;
    let bytes = std::fs::read(fixture("tiny_fixed_batch.onnx")).unwrap();
    let mut proto = tract_onnx::pb::ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let at = graph
        .node
        .iter()
        .position(|n| n.op_type == "PRelu")
        .unwrap();
    let prelu_out = graph.node[at].output[0].clone();
    for node in &mut graph.node {
        for input in &mut node.input {
            if *input == prelu_out {
                *input = "leaky".into();
            }
        }
    }
    graph.node.insert(
        at + 1,
        tract_onnx::pb::NodeProto {
            input: vec![prelu_out],
            output: vec!["leaky".into()],
            name: "the_leaky_one".into(),
            op_type: "LeakyRelu".into(),
            ..Default::default()
        },
    );
    let path = dir.join("unmapped.onnx");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path
}

/// `auto` runs a graph natively when every node maps, on tract otherwise; `native` refuses the
/// unmappable graph naming the node and its op.
#[test]
fn auto_picks_the_native_runtime_when_every_node_maps() {
    let contract = OnnxInput {
        mean: [127.0; 3],
        std: [128.0; 3],
        ..OnnxInput::default()
    };
    let mapped = OnnxFaceModel::load(&fixture("tiny_fixed_batch.onnx"), &contract).unwrap();
    assert_eq!(mapped.runtime(), "native");
    let nhwc = OnnxFaceModel::load(&fixture("mobilefacenet_d128_bgr_nhwc.onnx"), &bgr_nhwc());
    assert_eq!(nhwc.unwrap().runtime(), "native", "Transpose and Slice map");

    let dir = tempfile::tempdir().unwrap();
    let unmapped = with_unmapped_op(dir.path());
    let auto = OnnxFaceModel::load(&unmapped, &contract).unwrap();
    assert_eq!(auto.runtime(), "tract");
    assert_eq!(auto.batch(), 1);
    let err = OnnxFaceModel::load(&unmapped, &on(OnnxRuntime::Native, contract))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unmapped.onnx") && err.contains("the_leaky_one") && err.contains("LeakyRelu"),
        "{err}"
    );
}

/// On the native runtime a face's embedding is the same alone or among others, for a graph
/// exported with its batch fixed at 1 and for one with a free batch.
#[test]
fn native_embeddings_do_not_depend_on_the_batch() {
    let cases = [
        (
            "tiny_fixed_batch.onnx",
            OnnxInput {
                mean: [127.0; 3],
                std: [128.0; 3],
                ..OnnxInput::default()
            },
        ),
        ("mobilefacenet_d128_bgr_nhwc.onnx", bgr_nhwc()),
    ];
    for (name, contract) in cases {
        let model =
            OnnxFaceModel::load(&fixture(name), &on(OnnxRuntime::Native, contract)).unwrap();
        let data: Vec<f32> = (0..5).flat_map(face).collect();
        let together = model.embed_normalized(&data, 5).unwrap();
        let dim = model.output_dim();
        for i in 0..5 {
            let alone = model.embed_normalized(&face(i), 1).unwrap();
            let difference = relative_difference(&alone, &together[i * dim..(i + 1) * dim]);
            // Rounding only (the matrix product blocks rows differently per batch size); a
            // batch-coupled graph moves values by percents (see the quantised fixture).
            assert!(difference <= 1e-5, "{name}: face {i} moved by {difference}");
        }
    }
}

/// A dynamically quantised graph (onnxruntime's `quantize_dynamic`: its scale is taken over the
/// whole input) runs one image at a time on tract, and quantised per image in batches on the
/// native engine, so each face gets the embedding onnxruntime gives it alone, not one that
/// depends on its batch (the fixture records that onnxruntime's batch of 3 moves the values by
/// `batch_drift`). Two fixtures: uint8 weights per tensor, and int8 weights per output channel.
#[test]
fn dynamically_quantised_graphs_run_one_image_at_a_time() {
    for stem in ["tiny_dynamic_quant", "tiny_dynamic_quant_per_channel"] {
        quantised_fixture_runs_as_onnxruntime_one_image_at_a_time(stem);
    }
}

fn quantised_fixture_runs_as_onnxruntime_one_image_at_a_time(stem: &str) {
    #[derive(serde::Deserialize)]
    struct Io {
        faces: Vec<usize>,
        outputs: Vec<Vec<f32>>,
        batch_drift: f32,
    }
    let io: Io =
        serde_json::from_slice(&std::fs::read(fixture(&format!("{stem}_io.json"))).unwrap())
            .unwrap();
    let model = fixture(&format!("{stem}.onnx"));
    // The fixture script's dim_face(i): face_pixels(i) at contrast 0.3 + 0.35 i.
    let dim_face = |i: usize| -> Vec<f32> {
        face(i)
            .iter()
            .map(|v| {
                let u = ((v * 0.5 + 0.5) * 255.0).round() as f64;
                let u = (u * (0.3 + 0.35 * i as f64)).floor().min(255.0) as f32;
                (u / 255.0 - 0.5) / 0.5
            })
            .collect()
    };
    let contract = OnnxInput {
        mean: [127.0; 3],
        std: [128.0; 3],
        ..OnnxInput::default()
    };
    let data: Vec<f32> = io.faces.iter().flat_map(|&i| dim_face(i)).collect();
    let want: Vec<f32> = io.outputs.concat();
    let tract = OnnxFaceModel::load(
        &model,
        &OnnxInput {
            runtime: OnnxRuntime::Tract,
            ..contract.clone()
        },
    )
    .unwrap();
    assert_eq!((tract.runtime(), tract.batch()), ("tract", 1));
    let got = tract.embed_normalized(&data, io.faces.len()).unwrap();
    let difference = nan_max(want.iter().zip(&got).map(|(a, b)| (a - b).abs()));
    assert!(
        difference < io.batch_drift / 4.0,
        "{stem}: tract one at a time vs onnxruntime one at a time: {difference} (a batch moves \
         them by {})",
        io.batch_drift
    );

    // The native engine fuses the quantised chains and quantises each image on its own, so it
    // runs whole batches and still gives onnxruntime's one-image-at-a-time embeddings (measured:
    // equal to the last bit here).
    let native = OnnxFaceModel::load(&model, &contract).unwrap();
    assert_eq!((native.runtime(), native.batch()), ("native", NATIVE_BATCH));
    let batched = native.embed_normalized(&data, io.faces.len()).unwrap();
    let difference = nan_max(want.iter().zip(&batched).map(|(a, b)| (a - b).abs()));
    assert!(
        difference < 1e-5,
        "{stem}: native, quantised per image, vs onnxruntime one at a time: {difference} (a \
         batch moves them by {})",
        io.batch_drift
    );
    let dim = want.len() / io.faces.len();
    for (k, face) in data.chunks(data.len() / io.faces.len()).enumerate() {
        let alone = native.embed_normalized(face, 1).unwrap();
        let in_batch = &batched[k * dim..(k + 1) * dim];
        let moved = nan_max(alone.iter().zip(in_batch).map(|(a, b)| (a - b).abs()));
        assert!(
            moved <= 1e-6,
            "{stem}: face {k} alone vs in its batch: {moved}"
        );
    }
}

#[test]
fn contract_errors_name_the_file_and_the_problem() {
    let path = fixture("tiny_fixed_batch.onnx");
    let wrong_size = OnnxFaceModel::load(
        &path,
        &OnnxInput {
            size: 96,
            ..OnnxInput::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(wrong_size.contains("tiny_fixed_batch.onnx"), "{wrong_size}");
    assert!(wrong_size.contains("96"), "{wrong_size}");

    let missing = OnnxFaceModel::load(Path::new("/nonexistent/m.onnx"), &OnnxInput::default())
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/nonexistent/m.onnx") && missing.contains("no such file"));

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf").unwrap();
    let err = OnnxFaceModel::load(&garbage, &OnnxInput::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("garbage.onnx") && err.contains("cannot load"),
        "{err}"
    );
}

#[test]
fn contract_conversion_reorders_channels_and_layout() {
    let f = face(4);
    let plane = FACE * FACE;
    let contract = OnnxInput {
        mean: [10.0, 20.0, 30.0],
        std: [2.0, 4.0, 8.0],
        ..bgr_nhwc()
    };
    let mut out = vec![0f32; 3 * plane];
    to_contract(&f, &contract, &mut out);
    for (y, x) in [(0, 0), (5, 77), (111, 111)] {
        for c in 0..3 {
            // model channel c is BGR: RGB channel 2 - c.
            let pixel = f[(2 - c) * plane + y * FACE + x] * 127.5 + 127.5;
            let want = (pixel - contract.mean[c] as f32) / contract.std[c] as f32;
            let got = out[(y * FACE + x) * 3 + c];
            assert!((got - want).abs() < 1e-4, "({y},{x},{c}): {got} vs {want}");
        }
    }
}

#[test]
fn resizing_keeps_a_constant_face_constant_and_scales_a_ramp() {
    let plane = FACE * FACE;
    // Constant 0.5 in every channel; and a horizontal ramp in channel 0.
    let mut f = vec![0.5f32; 3 * plane];
    for y in 0..FACE {
        for x in 0..FACE {
            f[y * FACE + x] = x as f32 / (FACE - 1) as f32 * 2.0 - 1.0;
        }
    }
    let contract = OnnxInput {
        size: 128,
        mean: [0.0; 3],
        std: [1.0; 3],
        ..OnnxInput::default()
    };
    let mut out = vec![0f32; 3 * 128 * 128];
    to_contract(&f, &contract, &mut out);
    let want_const = 0.5 * 127.5 + 127.5;
    assert!(out[128 * 128..]
        .iter()
        .all(|v| (v - want_const).abs() < 1e-3));
    // The ramp stays monotone along x, spans the range, and is the same in every row.
    let row = &out[..128];
    assert!(row.windows(2).all(|w| w[1] >= w[0]));
    assert!(row[0] < 1.0 && row[127] > 254.0);
    for (a, b) in out[128 * 5..128 * 6].iter().zip(row) {
        assert!((a - b).abs() < 1e-3, "rows differ: {a} vs {b}");
    }
}

// ---- Export (`export.rs`) ----------------------------------------------------------------------

/// The real PyTorch MobileFaceNet of `models/fixtures` (128-d, random running statistics).
fn mobilefacenet_d128(device: &Device) -> qud_models::AnyBackbone {
    let spec = qud_models::BackboneSpec {
        embedding_dim: 128,
        dropout: 0.0,
    };
    let pth =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures/mobilefacenet_d128.pth");
    qud_models::load_weights(
        qud_models::create("mobilefacenet", &spec, device).unwrap(),
        &pth,
    )
    .unwrap()
    .valid()
}

/// iresnet18 (32-d) whose BatchNorms are not the identity: every running mean, running variance,
/// BatchNorm weight and bias from a formula of its own, the rest from [`formula_value`].
fn iresnet18_with_statistics(device: &Device, dir: &Path) -> qud_models::AnyBackbone {
    let spec = qud_models::BackboneSpec {
        embedding_dim: 32,
        dropout: 0.0,
    };
    let model = qud_models::create("iresnet18", &spec, device).unwrap();
    let is_bn = |name: &str| {
        name.contains("bn") || name.starts_with("features") || name.contains("downsample.1")
    };
    rewritten(
        model,
        &dir.join("statistics.safetensors"),
        &|name: &str, shape: &[usize], k: usize| {
            let formula = formula_value(name, shape, k);
            if !(is_bn(name) && shape.len() == 1) {
                return formula;
            }
            let k = k as f32;
            match name.rsplit('.').next().unwrap() {
                "running_mean" => 0.1 * (1.3 * k).sin(),
                "running_var" => 1.0 + 0.5 * (1.7 * k).sin().abs(),
                "weight" => 1.0 + 0.2 * (0.3 * k).sin(),
                "bias" => 0.1 * k.cos(),
                _ => formula,
            }
        },
    )
}

/// ShuffleMixFaceNet-S (64-d) with every value from [`formula_value`].
fn shufflemixfacenet_from_formula(device: &Device, dir: &Path) -> qud_models::AnyBackbone {
    let spec = qud_models::BackboneSpec {
        embedding_dim: 64,
        dropout: 0.0,
    };
    let model = qud_models::create("shufflemixfacenet-s", &spec, device).unwrap();
    rewritten(
        model,
        &dir.join("shufflemixfacenet.safetensors"),
        &formula_value,
    )
}

/// Value `k` of the tensor `name` for the export tests, in place of Burn's shared random
/// generator, which other tests draw from at the same time: the same weights on every run (a
/// random draw put ShuffleMixFaceNet's tract result anywhere from 2.6e-6 to 9e-5 of qud's).
/// Vectors sit near their identity (running variances and BatchNorm/PReLU weights near 1, the
/// rest near 0); weight tensors get a sine of unit-variance size over `sqrt(fan-in)`.
fn formula_value(name: &str, shape: &[usize], k: usize) -> f32 {
    let phase = name.bytes().map(f32::from).sum::<f32>();
    let wave = (0.7 * k as f32 + phase).sin();
    if shape.len() > 1 {
        let fan_in: usize = shape[1..].iter().product();
        return wave * (3.0 / fan_in as f32).sqrt();
    }
    match name.rsplit('.').next().unwrap() {
        "running_var" => 1.0 + 0.5 * wave * wave,
        "weight" => 1.0 + 0.2 * wave,
        _ => 0.1 * wave,
    }
}

/// `model` with each value of its safetensors export replaced by `value(name, shape, index)`,
/// loaded back through `path`.
fn rewritten(
    model: qud_models::AnyBackbone,
    path: &Path,
    value: &dyn Fn(&str, &[usize], usize) -> f32,
) -> qud_models::AnyBackbone {
    qud_models::save_safetensors(&model, path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        let count: usize = view.shape().iter().product();
        let data = (0..count)
            .map(|k| value(&name, view.shape(), k))
            .flat_map(f32::to_le_bytes)
            .collect();
        tensors.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
    qud_models::load_weights(model, path).unwrap().valid()
}

/// The largest of `values`, NaN when any is NaN (`f32::max` would skip it).
fn nan_max(values: impl Iterator<Item = f32>) -> f32 {
    values.fold(0f32, |m, v| if v.is_nan() || v > m { v } else { m })
}

/// Largest difference between `want` and `got`, relative to `want`'s largest magnitude; NaN
/// when either holds a NaN.
fn relative_difference(want: &[f32], got: &[f32]) -> f32 {
    assert_eq!(want.len(), got.len());
    let scale = nan_max(want.iter().map(|v| v.abs()));
    let worst = nan_max(want.iter().zip(got).map(|(a, b)| (a - b).abs()));
    worst / scale.max(f32::MIN_POSITIVE)
}

/// qud's export of a student, run by tract and by the native runtime with the default contract
/// (RGB, NCHW, [-1, 1]): the free batch dimension is detected, and the embeddings are qud's own
/// (BatchNorms unfolded there, folded in the file) within 1e-5 of their scale, for MobileFaceNet
/// and for iResNet, whose pre-activation BatchNorms stay `BatchNormalization` nodes (the native
/// runtime folds those that follow a convolution and runs the others as they are), and for
/// ShuffleMixFaceNet (squeeze-excitation, Swish, mixed kernels, channel shuffle).
#[test]
fn exported_students_run_in_both_engines_as_in_qud() {
    let device = qud_backend_flex::device();
    let dir = tempfile::tempdir().unwrap();
    let models: [fn(&Device, &Path) -> qud_models::AnyBackbone; 3] = [
        |device, _| mobilefacenet_d128(device),
        iresnet18_with_statistics,
        // Mixed kernels exported as one zero-padded convolution, the shuffle as a permutation.
        shufflemixfacenet_from_formula,
    ];
    for build in models {
        let model = build(&device, dir.path());
        let path = dir.path().join(format!("{}.onnx", model.arch()));
        let report = export_onnx(&model, &ExportSource::default(), &path, DEFAULT_OPSET).unwrap();
        assert_eq!(report.bytes as u64, std::fs::metadata(&path).unwrap().len());
        let x = faces(11, &device);
        let want = rows(model.forward(x.clone()));
        for runtime in ENGINES {
            let onnx = OnnxFaceModel::load(&path, &on(runtime, OnnxInput::default())).unwrap();
            assert_eq!(
                onnx.batch(),
                free_batch(runtime),
                "{} on {runtime:?}: a free batch dimension",
                model.arch()
            );
            assert_eq!(onnx.output_dim(), model.embedding_dim());
            let got = rows(onnx.embed_faces(x.clone()));
            let difference = relative_difference(&want, &got);
            // Measured: 8.6e-7 .. 1.2e-6 on both engines for all three.
            assert!(
                difference <= 1e-5,
                "{}: {runtime:?} vs qud {difference}",
                model.arch()
            );
        }
    }
}

/// onnxruntime runs qud's export of the PyTorch MobileFaceNet (the fixture script also has
/// `onnx.checker` accept it) to qud's embeddings within 1e-5, at batch 4 and batch 1; tract
/// and the native runtime agree with onnxruntime too.
#[test]
fn exports_run_in_onnxruntime_as_in_qud() {
    let device = qud_backend_flex::device();
    let bytes = std::fs::read(fixture("export_mfn_d128_ort.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let expected = |name: &str| -> Vec<f32> {
        file.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let model = mobilefacenet_d128(&device);
    let x = faces(4, &device);
    let ours = rows(model.forward(x.clone()));
    for name in ["embedding", "embedding_batch1"] {
        let difference = relative_difference(&expected(name), &ours);
        assert!(
            difference <= 1e-5,
            "{name}: onnxruntime vs qud {difference}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mfn.onnx");
    export_onnx(&model, &ExportSource::default(), &path, DEFAULT_OPSET).unwrap();
    for runtime in ENGINES {
        let engine = rows(
            OnnxFaceModel::load(&path, &on(runtime, OnnxInput::default()))
                .unwrap()
                .embed_faces(x.clone()),
        );
        let difference = relative_difference(&expected("embedding"), &engine);
        assert!(
            difference <= 1e-5,
            "onnxruntime vs {runtime:?} {difference}"
        );
    }
}

/// `qud eval --onnx` on an export gives the table `qud eval --arch --weights` gives; the file
/// states its contract and source, with a named dynamic batch; an opset qud does not write is
/// refused naming the file.
#[test]
fn exports_score_as_qud_does_and_state_their_contract() {
    use prost::Message;
    let device = qud_backend_flex::device();
    let model = mobilefacenet_d128(&device);
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights.bin");
    std::fs::write(&weights, b"stand-in weight file").unwrap();
    let source = ExportSource::file(&weights).unwrap();
    let path = dir.path().join("student.onnx");
    export_onnx(&model, &source, &path, 17).unwrap();

    let (images, issame) = qud_data::synthetic_pairs(4, 5, qud_data::ImageEncoding::Png);
    let bin = dir.path().join("pairs.bin");
    std::fs::write(&bin, qud_eval::pickle::dump_bin(&images, &issame)).unwrap();
    let set = qud_eval::PairSet::load_scorable(&bin).unwrap();
    let onnx = OnnxFaceModel::load(&path, &OnnxInput::default()).unwrap();
    let (a, b) = (
        qud_eval::evaluate(&model, &set, 8, &device),
        qud_eval::evaluate(&onnx, &set, 8, &device),
    );
    assert_eq!(a.scores.fold_accuracies, b.scores.fold_accuracies);
    // VAL is NaN on folds that reach no FAR of 1e-3 (as in NumPy); NaN or not, the same.
    assert_eq!(
        format!("{:?}", (a.scores.val, a.scores.far, &a.tar_at_far)),
        format!("{:?}", (b.scores.val, b.scores.far, &b.tar_at_far))
    );
    assert!(
        (a.xnorm - b.xnorm).abs() <= 1e-5 * a.xnorm,
        "{} vs {}",
        a.xnorm,
        b.xnorm
    );

    let proto =
        tract_onnx::pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    assert_eq!(proto.opset_import[0].version, 17);
    let meta: std::collections::HashMap<_, _> = proto
        .metadata_props
        .iter()
        .map(|p| (p.key.as_str(), p.value.as_str()))
        .collect();
    assert_eq!(meta["mean"], "127.5,127.5,127.5");
    assert_eq!(meta["channel_order"], "RGB");
    assert_eq!(meta["embedding_size"], "128");
    let crc = crc32fast::hash(b"stand-in weight file");
    assert_eq!(
        meta["source_weights_checksum"],
        format!("20 bytes, crc32 {crc:08x}")
    );
    let graph = proto.graph.unwrap();
    assert_eq!(graph.output[0].name, "embedding");
    let Some(tract_onnx::pb::type_proto::Value::TensorType(input)) =
        graph.input[0].r#type.as_ref().and_then(|t| t.value.clone())
    else {
        panic!("a tensor input");
    };
    let batch = &input.shape.unwrap().dim[0];
    assert_eq!(
        batch.value,
        Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimParam("batch".into()))
    );
    assert!(
        graph.node.iter().all(|n| n.op_type != "BatchNormalization"),
        "all folded"
    );

    let err = export_onnx(&model, &source, &dir.path().join("old.onnx"), 12)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("old.onnx") && err.contains("opset 12"),
        "{err}"
    );
}
