//! Identification against `fixtures/ident/make_ident_fixture.py` (the MegaFace protocol in NumPy,
//! float64, seed 20261207; its docstring states the rules), and the streaming's invariances.

use crate::ident::{identify, Embeddings, IdentError};
use crate::read_npy_rows;
use burn::prelude::*;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/ident")
        .join(name)
}

fn load(npy: &str, labels: Option<&str>) -> Embeddings {
    let rows = read_npy_rows(&fixture(npy)).unwrap();
    let dim = rows[0].len();
    let labels = labels.map_or_else(Vec::new, |l| {
        std::fs::read_to_string(fixture(l))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    });
    Embeddings::normalized(rows.concat(), dim, labels)
}

fn blocks(set: &Embeddings, rows: usize) -> Vec<Result<Vec<f32>, String>> {
    set.rows
        .chunks(rows * set.dim)
        .map(|c| Ok(c.to_vec()))
        .collect()
}

fn device() -> Device {
    qud_backend_flex::device()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

#[test]
fn identification_matches_the_numpy_reference() {
    let probes = load("probes.npy", Some("probe_labels.txt"));
    let gallery = load("gallery.npy", Some("gallery_labels.txt"));
    let distractors = load("distractors.npy", None);
    let expected = expected();
    let fars: Vec<f64> = serde_json::from_value(expected["fars"].clone()).unwrap();
    for (case, gallery) in [("same_set", None), ("separate_gallery", Some(&gallery))] {
        // Uneven blocks, so that the kept impostor scores are cut between blocks.
        let score = identify(
            &probes,
            gallery,
            blocks(&distractors, 333),
            distractors.len(),
            &fars,
            &device(),
        )
        .unwrap();
        let want = &expected[case];
        assert_eq!(
            score.trials as u64,
            want["trials"].as_u64().unwrap(),
            "{case}"
        );
        assert_eq!(
            score.probes_with_mates as u64,
            want["probes_with_mates"].as_u64().unwrap(),
            "{case}"
        );
        assert_eq!(
            score.rank1,
            want["rank1"].as_f64().unwrap(),
            "{case} rank-1"
        );
        for (got, want) in score
            .tar_at_far
            .iter()
            .zip(want["tar_at_far"].as_array().unwrap())
        {
            assert_eq!(got.far, want["far"].as_f64().unwrap());
            assert_eq!(
                got.tar,
                want["tar"].as_f64().unwrap(),
                "{case} TAR at {}",
                got.far
            );
            let threshold = want["threshold"].as_f64().unwrap();
            assert!(
                (got.threshold - threshold).abs() < 1e-5,
                "{case} threshold at {}: {} vs {threshold}",
                got.far,
                got.threshold
            );
        }
        assert_eq!(
            score.impostor_pairs,
            (probes.len() * distractors.len()) as u64
        );
    }
}

#[test]
fn the_distractor_blocks_do_not_change_the_scores() {
    let probes = load("probes.npy", Some("probe_labels.txt"));
    let distractors = load("distractors.npy", None);
    let fars = [1e-4, 1e-3, 0.05];
    let run = |rows: usize| {
        identify(
            &probes,
            None,
            blocks(&distractors, rows),
            distractors.len(),
            &fars,
            &device(),
        )
        .unwrap()
    };
    let whole = run(distractors.len());
    for rows in [1, 7, 500] {
        let blocked = run(rows);
        assert_eq!(blocked.rank1, whole.rank1, "blocks of {rows}");
        for (b, w) in blocked.tar_at_far.iter().zip(&whole.tar_at_far) {
            assert_eq!(b.tar, w.tar, "blocks of {rows}, FAR {}", w.far);
            // A product's summation order follows the block's shape: scores move by rounding.
            assert!(
                (b.threshold - w.threshold).abs() < 1e-6,
                "blocks of {rows}: {b:?} vs {w:?}"
            );
        }
    }
}

#[test]
fn more_distractors_never_raise_rank1() {
    let probes = load("probes.npy", Some("probe_labels.txt"));
    let distractors = load("distractors.npy", None);
    let mut last = f64::INFINITY;
    for n in [0, 10, 200, distractors.len()] {
        let some = Embeddings {
            rows: distractors.rows[..n * distractors.dim].to_vec(),
            dim: distractors.dim,
            labels: Vec::new(),
        };
        let score = identify(&probes, None, blocks(&some, 64), n, &[1e-3], &device()).unwrap();
        assert!(
            score.rank1 <= last,
            "{n} distractors: {} > {last}",
            score.rank1
        );
        last = score.rank1;
        if n == 0 {
            assert_eq!(score.rank1, 1.0, "no distractor: every mate is rank 1");
        }
    }
    assert!(last < 1.0);
}

#[test]
fn bad_inputs_are_refused_with_what_is_wrong() {
    let probes = load("probes.npy", Some("probe_labels.txt"));
    let distractors = load("distractors.npy", None);
    let device = device();
    let short = identify(
        &probes,
        None,
        blocks(&distractors, 100),
        distractors.len() + 1,
        &[1e-3],
        &device,
    )
    .unwrap_err();
    assert!(
        short
            .to_string()
            .contains("2000 embeddings read, 2001 announced"),
        "{short}"
    );

    let loners = Embeddings {
        labels: (0..probes.len()).map(|i| format!("person{i}")).collect(),
        ..probes.clone()
    };
    let none = identify(
        &loners,
        None,
        blocks(&distractors, 100),
        2000,
        &[1e-3],
        &device,
    );
    assert!(matches!(none, Err(IdentError::NoTrials)));

    let wide = Embeddings::normalized(vec![1.0; 2 * 17], 17, vec!["a".into(), "a".into()]);
    let dim = identify(
        &probes,
        Some(&wide),
        blocks(&distractors, 100),
        2000,
        &[1e-3],
        &device,
    );
    assert!(matches!(
        dim,
        Err(IdentError::Dim {
            got: 17,
            expected: 16,
            ..
        })
    ));

    let far = identify(
        &probes,
        None,
        blocks(&distractors, 100),
        2000,
        &[1.5],
        &device,
    );
    assert!(matches!(far, Err(IdentError::Far(_))));
}

#[test]
fn npy_rows_stream_in_blocks_as_they_read_whole() {
    let path = fixture("distractors.npy");
    let whole = read_npy_rows(&path).unwrap().concat();
    let mut reader = crate::NpyRowReader::open(&path).unwrap();
    assert_eq!((reader.rows, reader.dim), (2000, 16));
    let mut streamed = Vec::new();
    while let Some(block) = reader.next_block(333) {
        streamed.extend(block.unwrap());
    }
    assert_eq!(streamed, whole);

    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.npy");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
    let err = crate::NpyRowReader::open(&cut).err().unwrap().to_string();
    assert!(
        err.contains("cut.npy") && err.contains("(2000, 16)"),
        "{err}"
    );
}

/// The vectorised row scan against the plain definition, on rows whose lengths hit the
/// sixteen-lane chunks and the tail, with scores equal to the bound (not above it).
#[test]
fn the_row_scan_finds_the_best_and_the_scores_above_the_bound() {
    for len in [1, 15, 16, 17, 40] {
        let row: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 10.0)
            .collect();
        for bound in [f32::NEG_INFINITY, 0.0, 0.5, 2.0] {
            let (best, above) = crate::ident::scan_row(&row, bound);
            let want_best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want_above: Vec<f32> = row.iter().copied().filter(|&s| s > bound).collect();
            assert_eq!(
                (best, above),
                (want_best, want_above),
                "{len} scores, bound {bound}"
            );
        }
    }
}
