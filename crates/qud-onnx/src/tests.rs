//! Parity of tract-run ONNX exports with qud's own backbones and with PyTorch; contract errors.
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
    let onnx =
        OnnxFaceModel::load(&fixture("mobilefacenet_d128_bgr_nhwc.onnx"), &bgr_nhwc()).unwrap();
    assert_eq!(
        onnx.batch(),
        PROBE_BATCH,
        "the export has a free batch dimension"
    );
    assert_eq!(onnx.output_dim(), 128);

    // 11 faces: one full run of PROBE_BATCH and a padded one, split over threads.
    let x = faces(11, &device);
    let want = rows(burn_model.forward(x.clone()));
    let got = rows(onnx.embed_faces(x));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = want
        .iter()
        .zip(&got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "tract vs Burn: max difference {worst} (scale {scale})"
    );
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
            ..bgr_nhwc()
        },
    )
    .unwrap();
    let three = OnnxFaceModel::load(
        &path,
        &OnnxInput {
            threads: 3,
            ..bgr_nhwc()
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
    let model = OnnxFaceModel::load(&fixture("tiny_fixed_batch.onnx"), &contract).unwrap();
    assert_eq!(model.batch(), 1, "the Reshape to [1, -1] fixes the batch");
    assert_eq!(model.output_dim(), 16);
    let data: Vec<f32> = io.faces.iter().flat_map(|&i| face(i)).collect();
    let got = model.embed_normalized(&data, io.faces.len()).unwrap();
    for (i, want) in io.outputs.iter().enumerate() {
        for (d, w) in want.iter().enumerate() {
            let g = got[i * 16 + d];
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "face {i} dim {d}: {g} vs PyTorch {w}"
            );
        }
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
