use crate::*;
use std::path::Path;

#[global_allocator]
static ALLOCATOR: qud_data::alloc_probe::LargestAllocation =
    qud_data::alloc_probe::LargestAllocation;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

#[test]
fn kfold_matches_sklearn_sizes() {
    let sizes = |n| kfold(n, 10).iter().map(|(a, b)| b - a).collect::<Vec<_>>();
    assert_eq!(sizes(6000), vec![600; 10]);
    assert_eq!(sizes(13), vec![2, 2, 2, 1, 1, 1, 1, 1, 1, 1]);
    let folds = kfold(1003, 10);
    assert_eq!((folds[0], folds[9]), ((0, 101), (903, 1003)));
}

/// Against the protocol as written in fixtures/make_fixtures.py (sklearn KFold, numpy).
#[test]
fn verification_matches_the_reference_to_the_last_digit() {
    let text = std::fs::read_to_string(fixture("verification_reference.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let dim = case["dim"].as_u64().unwrap() as usize;
        let raw = std::fs::read(fixture(case["file"].as_str().unwrap())).unwrap();
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let embeddings: Vec<Vec<f32>> = values.chunks(dim).map(<[f32]>::to_vec).collect();
        let issame: Vec<bool> = case["issame"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        let got = verify(&embeddings, &issame, 10);
        let want = &case["expected"];
        let file = case["file"].as_str().unwrap();
        let close = |a: f64, key: &str| {
            // The reference's 0/0 (a one-class test fold) is NaN, stored as null.
            let b = want[key].as_f64().unwrap_or(f64::NAN);
            assert!(
                (a - b).abs() <= 1e-12 || (a.is_nan() && b.is_nan()),
                "{file}, {key}: {a} vs reference {b}"
            );
            assert_eq!(format!("{a:.5}"), format!("{b:.5}"), "{file}, {key}");
        };
        close(got.accuracy, "accuracy");
        close(got.accuracy_std, "accuracy_std");
        close(got.val, "val");
        close(got.val_std, "val_std");
        close(got.far, "far");
        let thresholds: Vec<f64> = want["fold_thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.fold_thresholds, thresholds);
    }
}

#[test]
fn reads_bins_from_every_python_writer() {
    for name in [
        "tiny_py3_protocol2.bin",
        "tiny_py3_protocol3.bin",
        "tiny_py3_protocol4.bin",
        "tiny_py3_protocol5.bin",
        "tiny_py2_protocol2.bin",
        "tiny_numpy.bin",
    ] {
        let set = PairSet::load(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(set.issame, vec![true, false], "{name}");
        assert_eq!(set.faces.len(), 4, "{name}");
        assert_eq!(&set.faces[0].rgb[..3], &[200, 10, 10], "{name}");
        assert_eq!(&set.faces[2].rgb[..3], &[10, 10, 200], "{name}");
        assert_eq!(
            &set.faces[3].rgb[..3],
            &[90, 90, 90],
            "{name}: 120x120 is resized"
        );
    }
}

#[test]
fn written_bins_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let png = std::fs::read(fixture("tiny_py3_protocol4.bin")).unwrap();
    let set = PairSet::load(&fixture("tiny_py3_protocol4.bin")).unwrap();
    let _ = png;
    let encoded: Vec<Vec<u8>> = set
        .faces
        .iter()
        .map(|f| {
            let mut out = std::io::Cursor::new(Vec::new());
            image::RgbImage::from_raw(112, 112, f.rgb.clone())
                .unwrap()
                .write_to(&mut out, image::ImageFormat::Png)
                .unwrap();
            out.into_inner()
        })
        .collect();
    let path = dir.path().join("mine.bin");
    std::fs::write(&path, pickle::dump_bin(&encoded, &set.issame)).unwrap();
    let back = PairSet::load(&path).unwrap();
    assert_eq!(back.faces, set.faces);
    assert_eq!(back.issame, set.issame);
    assert_eq!(back.name, "mine");
}

#[test]
fn malformed_bins_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let png = {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(112, 112)
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    };
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (write("text.bin", b"hello"), "not a readable pickle"),
        (
            write(
                "odd.bin",
                &pickle::dump_bin(&[png.clone(), png.clone(), png.clone()], &[true]),
            ),
            "even count",
        ),
        (
            write(
                "count.bin",
                &pickle::dump_bin(&[png.clone(), png.clone()], &[true, false]),
            ),
            "2 images for 2 pairs",
        ),
        (
            write(
                "garbage.bin",
                &pickle::dump_bin(&[png.clone(), b"junk".to_vec()], &[true]),
            ),
            "image 1",
        ),
        (
            write(
                "cut.bin",
                &pickle::dump_bin(&[png.clone(), png.clone()], &[true])[..100],
            ),
            "truncated",
        ),
    ];
    for (path, needle) in cases {
        let err = PairSet::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(path.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
        assert!(err.contains(needle), "{}: {err}", path.display());
    }
}

#[test]
fn flip_tta_sums_both_views_and_reports_xnorm() {
    let device = qud_backend_flex::device();
    let spec = qud_models::BackboneSpec {
        embedding_dim: 16,
        dropout: 0.0,
    };
    let model =
        burn::module::Module::valid(&qud_models::create("mobilefacenet", &spec, &device).unwrap());
    let faces: Vec<_> = (0..3)
        .map(|i| {
            qud_data::FaceDataset::get(&qud_data::SyntheticFaces::new(3, 1, 5), i)
                .unwrap()
                .image
        })
        .collect();
    let plain = embed(&model, &faces, 2, false, &device);
    let flipped_faces: Vec<_> = faces.iter().map(qud_data::flip_horizontal).collect();
    let mirror = embed(&model, &flipped_faces, 3, false, &device);
    let both = embed(&model, &faces, 2, true, &device);
    for i in 0..3 {
        let n = |v: &Vec<f32>| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n(&both.normalized[i]) - 1.0).abs() < 1e-5);
        // normalize(a + b) is parallel to normalized(a) * |a| + normalized(b) * |b|; check the
        // direction lies between the two views.
        let dot = |a: &Vec<f32>, b: &Vec<f32>| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let (ab, aa, bb) = (
            dot(&plain.normalized[i], &mirror.normalized[i]),
            dot(&both.normalized[i], &plain.normalized[i]),
            dot(&both.normalized[i], &mirror.normalized[i]),
        );
        assert!(aa >= ab - 1e-5 && bb >= ab - 1e-5, "{aa} {bb} {ab}");
    }
    assert!(
        both.xnorm > 0.0
            && (both.xnorm - (plain.xnorm + mirror.xnorm) / 2.0).abs() < 1e-3 * both.xnorm
    );
}

/// The real LFW set from ../shared (beside the repository in development; users lack it).
#[test]
#[ignore = "needs ../shared/data/lfw.bin: cargo xtask real-check"]
fn real_lfw_bin_reads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/lfw.bin");
    assert!(path.is_file(), "{} is missing", path.display());
    let set = PairSet::load(&path).unwrap();
    assert_eq!(set.issame.len(), 6000);
    assert_eq!(set.faces.len(), 12000);
    assert_eq!(set.issame.iter().filter(|s| **s).count(), 3000);
}

#[test]
fn roc_reads_tar_at_far() {
    // Pair distances 0.0, 0.5, 1.0, 1.5 with labels same, diff, same, diff.
    let e = |x: f32| vec![x.cos(), x.sin()];
    let embeddings: Vec<Vec<f32>> = [0.0f32, 0.5, 1.0, 1.5]
        .iter()
        .flat_map(|d| {
            let angle = 2.0 * (d / 2.0).sqrt().asin(); // |a - b|^2 = d for unit vectors
            vec![e(0.0), e(angle)]
        })
        .collect();
    let (curve, tar) = roc(&embeddings, &[true, false, true, false], &[0.0, 0.5, 1.0]);
    assert_eq!(curve.first(), Some(&(0.0, 0.0)));
    assert_eq!(curve.last(), Some(&(1.0, 1.0)));
    assert_eq!(tar, vec![(0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
}

#[test]
fn npy_files_have_numpys_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emb.npy");
    write_npy(&path, &[vec![1.0, -2.0, 0.5], vec![3.0, 4.0, 5.0]]).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0);
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f4'")
            && header.contains("'shape': (2, 3)")
            && header.ends_with('\n'),
        "{header}"
    );
    let data: Vec<f32> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(data, vec![1.0, -2.0, 0.5, 3.0, 4.0, 5.0]);
}

#[test]
fn embeddings_from_files_score_like_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("verification_reference.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let case = &cases[3];
    let raw = std::fs::read(fixture(case["file"].as_str().unwrap())).unwrap();
    let dim = case["dim"].as_u64().unwrap() as usize;
    // Scale rows: scoring normalises them, and XNorm reports the scale.
    let rows: Vec<Vec<f32>> = raw
        .chunks_exact(4 * dim)
        .map(|r| {
            r.chunks_exact(4)
                .map(|c| 3.0 * f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
        .collect();
    let issame: Vec<bool> = case["issame"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let npy = dir.path().join("emb.npy");
    write_npy(&npy, &rows).unwrap();
    assert_eq!(read_npy_rows(&npy).unwrap(), rows);
    let txt = dir.path().join("issame.txt");
    let lines: Vec<&str> = issame.iter().map(|s| if *s { "1" } else { "0" }).collect();
    std::fs::write(&txt, lines.join("\n")).unwrap();
    assert_eq!(read_issame(&txt).unwrap(), issame);

    let score = score_embeddings("case3", &rows, &issame).unwrap();
    let want = case["expected"]["accuracy"].as_f64().unwrap();
    assert!((score.scores.accuracy - want).abs() < 1e-12);
    assert!((score.xnorm - 3.0).abs() < 1e-5, "xnorm {}", score.xnorm);
    assert_eq!(score.tar_at_far.len(), REPORT_FARS.len());
    assert!(
        score.tar_at_far.windows(2).all(|w| w[0].1 <= w[1].1),
        "TAR grows with FAR"
    );
    let svg = roc_svg("case3 <200 pairs>", &[("model a", &score.roc)]);
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline") && svg.contains("&lt;200 pairs&gt;")
    );

    let odd = score_embeddings("odd", &rows[1..], &issame)
        .unwrap_err()
        .to_string();
    assert!(odd.contains("399 embeddings for 200 pairs"), "{odd}");
    std::fs::write(&txt, "1\nmaybe\n").unwrap();
    let err = read_issame(&txt).unwrap_err().to_string();
    assert!(
        err.contains("issame.txt") && err.contains("line 2"),
        "{err}"
    );
    std::fs::write(&npy, b"not numpy").unwrap();
    let err = read_npy_rows(&npy).unwrap_err().to_string();
    assert!(
        err.contains("emb.npy") && err.contains("not a .npy"),
        "{err}"
    );
}

/// Sets 10-fold verification cannot score are refused, naming the file: fewer than 10 pairs,
/// or pairs of one kind only. They once reported NaN or 0.00 with exit 0.
#[test]
fn degenerate_pair_sets_are_refused() {
    assert!(check_pair_labels(&[true, false].repeat(5)).is_ok());
    let err = check_pair_labels(&[true, false, true, false, true, false, true, false, true])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("9 pairs") && err.contains("at least 10"),
        "{err}"
    );
    for one_kind in [true, false] {
        let err = check_pair_labels(&[one_kind; 12]).unwrap_err().to_string();
        assert!(err.contains("genuine and impostor"), "{err}");
    }
    let rows = vec![vec![1.0f32, 0.0]; 24];
    assert!(score_embeddings("x", &rows, &[true; 12]).is_err());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("few.bin");
    let (images, issame) = qud_data::synthetic_pairs(3, 1, qud_data::ImageEncoding::Png);
    std::fs::write(&path, pickle::dump_bin(&images[..8], &issame[..4])).unwrap();
    assert_eq!(PairSet::load(&path).unwrap().issame.len(), 4, "readable");
    let err = PairSet::load_scorable(&path).unwrap_err().to_string();
    assert!(err.contains("few.bin") && err.contains("4 pairs"), "{err}");
}

/// A pickle that doubles a memoised value with every three bytes, and one that nests lists a
/// million deep: both refused with the byte offset, within a bounded allocation and without
/// overflowing the stack. A 167-byte file of the first kind once grew without bound.
#[test]
fn pickle_bombs_are_refused() {
    let mut doubling = vec![0x80, 4, b']'];
    for round in 0..60u32 {
        doubling.push(0x94); // MEMOIZE the top
        doubling.push(b'j'); // LONG_BINGET it
        doubling.extend_from_slice(&round.to_le_bytes());
        doubling.push(0x86); // TUPLE2: (x, x)
    }
    doubling.push(b'.');
    let (result, largest) = qud_data::alloc_probe::largest_allocation(|| pickle::load(&doubling));
    let err = result.unwrap_err().to_string();
    assert!(err.contains("would copy more than the file holds"), "{err}");
    assert!(largest < 64 << 20, "{largest} bytes in one allocation");

    let depth = 1_000_000;
    let mut nested = vec![0x80, 4];
    nested.extend(std::iter::repeat_n(b']', depth));
    nested.extend(std::iter::repeat_n(b'a', depth - 1));
    nested.push(b'.');
    let err = pickle::load(&nested).unwrap_err().to_string();
    assert!(err.contains("nested more than 64 deep"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// A `.bin` with bytes replaced anywhere (most in the pickle's opcodes and lengths) or cut
    /// short reads or fails with a message; never a panic, never a large allocation.
    #[test]
    fn damaged_bins_read_or_fail_cleanly(
        edits in proptest::collection::vec((0.0f64..1.0, proptest::prelude::any::<u8>()), 1..6),
        cut in proptest::option::of(0.0f64..1.0),
    ) {
        let (images, issame) = qud_data::synthetic_pairs(3, 2, qud_data::ImageEncoding::Jpeg(90));
        let mut bytes = pickle::dump_bin(&images[..4], &issame[..2]);
        for (at, value) in edits {
            let i = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate((bytes.len() as f64 * cut) as usize);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("damaged.bin");
        std::fs::write(&path, &bytes).unwrap();
        let (result, largest) =
            qud_data::alloc_probe::largest_allocation(|| PairSet::load(&path).map(|_| ()));
        if let Err(e) = result {
            proptest::prop_assert!(e.to_string().contains("damaged.bin"), "{}", e);
        }
        proptest::prop_assert!(largest <= 4 * qud_data::MAX_IMAGE_PIXELS, "allocated {}", largest);
    }

    /// `.npy` files with damaged headers and shapes (a shape whose product overflows once
    /// panicked) read or fail with a message.
    #[test]
    fn damaged_npy_files_read_or_fail_cleanly(
        edits in proptest::collection::vec((0usize..128, proptest::prelude::any::<u8>()), 0..4),
        shape in proptest::prop_oneof![
            proptest::prelude::Just("(2, 3)".to_string()),
            proptest::prelude::Just("(4294967296, 4294967296)".to_string()),
            proptest::prelude::Just("(18446744073709551615, 2)".to_string()),
            proptest::prelude::Just("(6, 0)".to_string()),
            proptest::prelude::Just("(3,)".to_string()),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.npy");
        write_npy(&path, &[vec![1.0, -2.0, 0.5], vec![3.0, 4.0, 5.0]]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let at = text.find("(2, 3)").unwrap();
        bytes.splice(at..at + 6, shape.bytes());
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize + shape.len() - 6;
        bytes[8..10].copy_from_slice(&(header_len as u16).to_le_bytes());
        for (i, value) in edits {
            let i = i.min(bytes.len() - 1);
            bytes[i] = value;
        }
        std::fs::write(&path, &bytes).unwrap();
        let (rows, largest) = qud_data::alloc_probe::largest_allocation(|| read_npy_rows(&path));
        if let Err(e) = &rows {
            proptest::prop_assert!(e.to_string().contains("e.npy"), "{}", e);
        }
        let issame = read_issame(&path);
        if let Err(e) = &issame {
            proptest::prop_assert!(e.to_string().contains("e.npy"), "{}", e);
        }
        proptest::prop_assert!(largest < 1 << 20, "allocated {}", largest);
    }
}

/// The text of every `<text>` element of an SVG chart, in order.
fn chart_labels(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

/// Chart ticks sit at round numbers printed with the decimals their step needs: a loss from 17.25
/// down to 4.1 gets whole numbers, a learning rate stepping 0.1 -> 0.01 two decimals, a ROC the
/// FAR decades.
#[test]
fn chart_ticks_are_round_numbers() {
    let numeric = |svg: &str| -> Vec<String> {
        chart_labels(svg)
            .into_iter()
            .filter(|l| l.parse::<f64>().is_ok())
            .collect()
    };
    let loss: Vec<(f64, f64)> = (0..70)
        .map(|i| (i as f64, 17.25 - 13.15 * (i as f64 / 69.0)))
        .collect();
    let ticks = numeric(&line_chart_svg("loss", "step", &[("loss", loss)]));
    assert!(ticks.len() >= 8, "{ticks:?}");
    assert!(ticks.iter().all(|t| !t.contains('.')), "{ticks:?}");
    assert!(ticks.contains(&"10".to_string()), "{ticks:?}");

    let lr: Vec<(f64, f64)> = (0..300)
        .map(|i| (i as f64, if i < 200 { 0.1 } else { 0.01 }))
        .collect();
    let ticks = numeric(&line_chart_svg("learning rate", "step", &[("lr", lr)]));
    let decimals = |t: &String| t.split('.').nth(1).map_or(0, str::len);
    assert!(ticks.iter().any(|t| t == "0.05"), "{ticks:?}");
    assert!(ticks.iter().all(|t| decimals(t) <= 2), "{ticks:?}");

    let roc = vec![(0.0, 0.2), (2e-4, 0.5), (1e-2, 0.9), (1.0, 1.0)];
    let labels = chart_labels(&roc_svg("lfw", &[("student", &roc)]));
    for decade in ["1e-4", "1e-3", "1e-2", "1e-1", "1"] {
        assert!(labels.iter().any(|l| l == decade), "{decade} in {labels:?}");
    }
    assert!(
        labels.iter().any(|l| l == "student"),
        "the legend: {labels:?}"
    );
}
