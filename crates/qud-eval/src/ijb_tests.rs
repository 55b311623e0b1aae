//! IJB parity with `fixtures/make_ijb_fixture.py` (insightface's pooling and scoring with NumPy,
//! scikit-learn's `roc_curve`, scikit-image's `SimilarityTransform`, OpenCV's `warpAffine`).

use crate::ijb::*;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ijb")
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(root().join("expected.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn alignment_matches_scikit_image_similarity_transform() {
    let meta = IjbMeta::load(&root(), "ijbc").unwrap();
    let want = expected();
    let matrices = want["matrices"].as_array().unwrap();
    assert_eq!(matrices.len(), meta.landmarks.len());
    for (lmk, m) in meta.landmarks.iter().zip(matrices) {
        let got = similarity_transform(lmk, &ARCFACE_TEMPLATE);
        for r in 0..2 {
            let row = floats(&m[r]);
            for c in 0..3 {
                assert!(
                    (got[r][c] - row[c]).abs() < 1e-6,
                    "matrix [{r}][{c}]: {} vs scikit-image {}",
                    got[r][c],
                    row[c]
                );
            }
        }
    }
}

#[test]
fn warp_matches_opencv_within_its_fixed_point_rounding() {
    let want = expected();
    let m = &want["warp_matrix"];
    let matrix = [
        <[f64; 3]>::try_from(floats(&m[0])).unwrap(),
        <[f64; 3]>::try_from(floats(&m[1])).unwrap(),
    ];
    // The fixture's formula image: (3x + 5y + 70c) mod 256, 150 x 130.
    let (w, h) = (150, 130);
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                pixels.push(((3 * x + 5 * y + 70 * c) % 256) as u8);
            }
        }
    }
    let image = RgbImage {
        width: w,
        height: h,
        pixels,
    };
    let got = warp_face(&image, &matrix);
    let cv: Vec<f64> = floats(&want["warp_rgb"]);
    let diffs: Vec<f64> = got
        .rgb
        .iter()
        .zip(&cv)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .collect();
    // OpenCV interpolates with 5-bit fixed-point weights; the mod-256 wrap makes a few edge
    // pixels blend across the jump, where that rounding is largest.
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    let close = diffs.iter().filter(|d| **d <= 2.0).count() as f64 / diffs.len() as f64;
    assert!(mean < 1.0, "mean difference to OpenCV {mean}");
    assert!(
        close > 0.98,
        "only {close} of pixels within 2 levels of OpenCV"
    );
}

#[test]
fn pooling_scores_and_roc_match_the_reference_exactly() {
    let meta = IjbMeta::load(&root(), "ijbc").unwrap();
    let features = crate::read_npy_rows(&root().join("features.npy")).unwrap();
    let want = expected();
    let fars = floats(&want["fars"]);
    assert_eq!(fars, IJB_FARS);
    for (case, reference) in want["cases"].as_object().unwrap() {
        let norm_score = case.contains("norm1");
        let detector = case.contains("det1");
        let feats = image_features(&features, &meta.detector_scores, norm_score, detector);
        let templates = template_features(&feats, &meta.templates, &meta.medias);
        let ids: Vec<i64> = reference["templates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(templates.ids, ids, "{case}");
        for (row, want_row) in (0..templates.len())
            .map(|i| templates.row(i))
            .zip(reference["template_features"].as_array().unwrap())
        {
            for (a, b) in row.iter().zip(floats(want_row)) {
                assert!((a - b).abs() < 1e-12, "{case}: template feature {a} vs {b}");
            }
        }
        let scores = pair_scores(&templates, &meta.pairs, 3);
        let want_scores = floats(&reference["scores"]);
        for (a, b) in scores.iter().zip(&want_scores) {
            assert!((a - b).abs() < 1e-12, "{case}: score {a} vs {b}");
        }
        // The ROC from the reference's own scores is identical point for point.
        let (fpr, tpr, _) = roc_curve(&meta.labels, &want_scores);
        assert_eq!(fpr, floats(&reference["fpr"]), "{case}: fpr");
        assert_eq!(tpr, floats(&reference["tpr"]), "{case}: tpr");
        // And the whole chain from features gives the TAR at every FAR that insightface's
        // script prints.
        let score = score_ijb("ijbc", &meta, &features, norm_score, detector, 2);
        let tars: Vec<f64> = score.tar_at_far.iter().map(|p| p.1).collect();
        assert_eq!(tars, floats(&reference["tar"]), "{case}");
    }
}

#[test]
fn roc_of_a_tiny_case_by_hand() {
    // Scores 0.9 (genuine), 0.8 (impostor), 0.8 (genuine), 0.1 (impostor): the tie at 0.8 is one
    // threshold, so the ROC goes (0,0) -> (0, .5) -> (.5, 1) -> (1, 1).
    let (fpr, tpr, thr) = roc_curve(&[true, false, true, false], &[0.9, 0.8, 0.8, 0.1]);
    assert_eq!(fpr, [0.0, 0.0, 0.5, 1.0]);
    assert_eq!(tpr, [0.0, 0.5, 1.0, 1.0]);
    assert_eq!(thr[1..], [0.9, 0.8, 0.1]);
    // FAR 0.01: nearest FPR is 0, reached at TPR 0 and 0.5; insightface's flip takes 0.5.
    assert_eq!(tar_at_far(&fpr, &tpr, &[0.01]), [0.5]);
}

/// insightface's reading, literally: `fpr = np.flipud(fpr); tpr = np.flipud(tpr)`, then
/// `min(zip(abs(fpr - far), range(len(fpr))))`, the first of the smallest distances.
fn flipped_nearest(fpr: &[f64], tpr: &[f64], far: f64) -> f64 {
    let (fpr, tpr): (Vec<f64>, Vec<f64>) = (
        fpr.iter().rev().copied().collect(),
        tpr.iter().rev().copied().collect(),
    );
    let mut best = 0;
    for i in 1..fpr.len() {
        if (fpr[i] - far).abs() < (fpr[best] - far).abs() {
            best = i;
        }
    }
    tpr[best]
}

#[test]
fn vertical_stretches_at_every_far_read_their_top() {
    // A ROC that climbs vertically at each of the six FARs (as scikit-learn keeps both ends of a
    // vertical stretch): the nearest FPR is exactly the FAR, shared by the stretch's foot and top.
    // The top is insightface's TAR; the foot, the rule qud had before, read 0.00 at 1e-6.
    let mut fpr = vec![0.0];
    let mut tpr = vec![0.0];
    for (k, far) in IJB_FARS.iter().enumerate() {
        fpr.extend([*far, *far]);
        tpr.extend([0.1 * k as f64 + 0.01, 0.1 * k as f64 + 0.09]);
    }
    fpr.push(1.0);
    tpr.push(1.0);
    let tars = tar_at_far(&fpr, &tpr, &IJB_FARS);
    let tops: Vec<f64> = (0..6).map(|k| 0.1 * k as f64 + 0.09).collect();
    assert_eq!(tars, tops);
    for (far, tar) in IJB_FARS.iter().zip(&tars) {
        assert_eq!(*tar, flipped_nearest(&fpr, &tpr, *far));
    }
}

proptest::proptest! {
    /// On ROCs of scores with many ties (few distinct values, so long vertical and diagonal
    /// stretches) and FARs on and between its points, `tar_at_far` reads what insightface's
    /// flip-then-nearest reads.
    #[test]
    fn tar_at_far_is_insightfaces_flip_then_nearest(
        pairs in proptest::collection::vec((0u8..6, proptest::bool::ANY), 2..300),
        extra_fars in proptest::collection::vec(0.0f64..1.0, 0..4),
    ) {
        let scores: Vec<f64> = pairs.iter().map(|p| p.0 as f64 / 5.0).collect();
        let labels: Vec<bool> = pairs.iter().map(|p| p.1).collect();
        proptest::prop_assume!(labels.iter().any(|l| *l) && labels.iter().any(|l| !*l));
        let (fpr, tpr, _) = roc_curve(&labels, &scores);
        // Every FPR of the ROC is a FAR with a tie at distance 0 wherever the ROC is vertical;
        // midpoints between neighbours tie on both sides.
        let mut fars: Vec<f64> = fpr.clone();
        fars.extend(fpr.windows(2).map(|w| 0.5 * (w[0] + w[1])));
        fars.extend(extra_fars);
        fars.extend(IJB_FARS);
        let got = tar_at_far(&fpr, &tpr, &fars);
        for (far, tar) in fars.iter().zip(got) {
            proptest::prop_assert_eq!(tar, flipped_nearest(&fpr, &tpr, *far), "FAR {}", far);
        }
    }
}

#[test]
fn bad_metadata_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta");
    std::fs::create_dir_all(&meta).unwrap();
    let lmk = "a.jpg 1 2 3 4 5 6 7 8 9 10 0.9\nb.jpg 1 2 3 4 5 6 7 8 9 10 0.8\n";
    std::fs::write(meta.join("ijbb_name_5pts_score.txt"), lmk).unwrap();
    std::fs::write(meta.join("ijbb_face_tid_mid.txt"), "a.jpg 1 1\nc.jpg 2 2\n").unwrap();
    std::fs::write(meta.join("ijbb_template_pair_label.txt"), "1 2 0\n").unwrap();
    let err = IjbMeta::load(dir.path(), "ijbb").unwrap_err().to_string();
    assert!(
        err.contains("ijbb_face_tid_mid.txt") && err.contains("line 2") && err.contains("c.jpg"),
        "{err}"
    );
    std::fs::write(meta.join("ijbb_face_tid_mid.txt"), "a.jpg 1 1\nb.jpg 2 2\n").unwrap();
    std::fs::write(meta.join("ijbb_template_pair_label.txt"), "1 2 0\n1 9 1\n").unwrap();
    let err = IjbMeta::load(dir.path(), "ijbb").unwrap_err().to_string();
    assert!(
        err.contains("ijbb_template_pair_label.txt") && err.contains("template 9"),
        "{err}"
    );
    // Only impostor pairs: no TAR can be read, where it once reported 0.00 with exit 0.
    std::fs::write(meta.join("ijbb_template_pair_label.txt"), "1 2 0\n2 1 0\n").unwrap();
    let err = IjbMeta::load(dir.path(), "ijbb").unwrap_err().to_string();
    assert!(
        err.contains("ijbb_template_pair_label.txt") && err.contains("0 of them genuine"),
        "{err}"
    );
    std::fs::write(meta.join("ijbb_template_pair_label.txt"), "1 2 0\n1 1 1\n").unwrap();
    IjbMeta::load(dir.path(), "ijbb").unwrap();
    // A NaN detector score would scale a face's feature to NaN.
    let nan = lmk.replace("0.8", "nan");
    std::fs::write(meta.join("ijbb_name_5pts_score.txt"), nan).unwrap();
    let err = IjbMeta::load(dir.path(), "ijbb").unwrap_err().to_string();
    assert!(
        err.contains("line 2") && err.contains("`nan` is not a finite number"),
        "{err}"
    );
    std::fs::write(meta.join("ijbb_name_5pts_score.txt"), "a.jpg 1 2 x\n").unwrap();
    let err = IjbMeta::load(dir.path(), "ijbb").unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("4 fields"), "{err}");
}

/// Write a tiny IJB-style set: `n` canvases of 140x130 random pixels with the face at an integer
/// offset, landmarks exactly the template shifted by it, 2 images per template.
fn tiny_set(dir: &Path, n: usize) -> Vec<Vec<u8>> {
    std::fs::create_dir_all(dir.join("meta")).unwrap();
    std::fs::create_dir_all(dir.join("loose_crop")).unwrap();
    let (mut lmk, mut tid, mut pairs, mut canvases) =
        (String::new(), String::new(), String::new(), Vec::new());
    for i in 0..n {
        let pixels: Vec<u8> = (0..140 * 130 * 3)
            .map(|k| ((k * 31 + i * 17) % 251) as u8)
            .collect();
        image::RgbImage::from_raw(140, 130, pixels.clone())
            .unwrap()
            .save(dir.join(format!("loose_crop/{i}.png")))
            .unwrap();
        let (dx, dy) = (10.0 + i as f64, 5.0 + 2.0 * i as f64);
        let points: Vec<String> = ARCFACE_TEMPLATE
            .iter()
            .flat_map(|p| [format!("{}", p[0] + dx), format!("{}", p[1] + dy)])
            .collect();
        lmk.push_str(&format!("{i}.png {} 0.9\n", points.join(" ")));
        tid.push_str(&format!("{i}.png {} {i}\n", i / 2));
        canvases.push(pixels);
    }
    for a in 0..n / 2 {
        for b in a + 1..n / 2 {
            pairs.push_str(&format!("{a} {b} {}\n", u8::from(a % 2 == b % 2)));
        }
    }
    std::fs::write(dir.join("meta/ijbb_name_5pts_score.txt"), lmk).unwrap();
    std::fs::write(dir.join("meta/ijbb_face_tid_mid.txt"), tid).unwrap();
    std::fs::write(dir.join("meta/ijbb_template_pair_label.txt"), pairs).unwrap();
    canvases
}

/// Landmarks that are the template shifted by whole pixels align to an exact crop, and the whole
/// chain (decode, align, embed with flip, pool, score) runs on a real backbone.
#[test]
fn end_to_end_on_a_tiny_set() {
    let dir = tempfile::tempdir().unwrap();
    let canvases = tiny_set(dir.path(), 8);
    let meta = IjbMeta::load(dir.path(), "ijbb").unwrap();
    for (i, canvas) in canvases.iter().enumerate().take(3) {
        let image = load_rgb(&dir.path().join(format!("loose_crop/{i}.png"))).unwrap();
        let face = warp_face(
            &image,
            &similarity_transform(&meta.landmarks[i], &ARCFACE_TEMPLATE),
        );
        let (dx, dy) = (10 + i, 5 + 2 * i);
        for (v, u) in [(0, 0), (50, 60), (111, 111)] {
            for c in 0..3 {
                assert_eq!(
                    face.rgb[(v * 112 + u) * 3 + c],
                    canvas[((v + dy) * 140 + u + dx) * 3 + c],
                    "image {i} ({v},{u},{c})"
                );
            }
        }
    }
    let device = qud_backend_flex::device();
    let spec = qud_models::BackboneSpec {
        embedding_dim: 16,
        dropout: 0.0,
    };
    use burn::module::Module;
    let model = qud_models::create("mobilefacenet", &spec, &device)
        .unwrap()
        .valid();
    let rows = embed_ijb(&model, dir.path(), &meta, 3, true, 2, &device).unwrap();
    assert_eq!((rows.len(), rows[0].len()), (8, 16));
    let score = score_ijb("ijbb", &meta, &rows, true, true, 2);
    assert_eq!((score.templates, score.pairs), (4, 6));
    assert!(score
        .tar_at_far
        .iter()
        .all(|(_, t)| (0.0..=1.0).contains(t)));

    std::fs::remove_file(dir.path().join("loose_crop/5.png")).unwrap();
    let err = embed_ijb(&model, dir.path(), &meta, 3, true, 2, &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("5.png"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// IJB metadata with characters replaced, lines dropped or cut: read, or an error naming
    /// the file, never a panic.
    #[test]
    fn damaged_ijb_metadata_reads_or_fails_cleanly(
        file in 0usize..3,
        edits in proptest::collection::vec(
            (0.0f64..1.0, proptest::sample::select(b" \n-x9.e\t".to_vec())), 1..6),
        cut in proptest::option::of(0.0f64..1.0),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("meta");
        std::fs::create_dir_all(&meta).unwrap();
        let files = [
            ("ijbb_name_5pts_score.txt", "a.jpg 1 2 3 4 5 6 7 8 9 10 0.9\nb.jpg 1 2 3 4 5 6 7 8 9 10 0.8\n"),
            ("ijbb_face_tid_mid.txt", "a.jpg 1 1\nb.jpg 2 2\n"),
            ("ijbb_template_pair_label.txt", "1 2 0\n1 1 1\n"),
        ];
        for (k, (name, text)) in files.iter().enumerate() {
            let mut bytes = text.as_bytes().to_vec();
            if k == file {
                for &(at, c) in &edits {
                    let i = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
                    bytes[i] = c;
                }
                if let Some(cut) = cut {
                    bytes.truncate((bytes.len() as f64 * cut) as usize);
                }
            }
            std::fs::write(meta.join(name), bytes).unwrap();
        }
        if let Err(e) = IjbMeta::load(dir.path(), "ijbb") {
            proptest::prop_assert!(e.to_string().contains("ijbb_"), "{}", e);
        }
    }
}
