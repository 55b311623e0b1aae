//! Queue invariants, property-tested on the ndarray CPU device.

use super::*;
use proptest::prelude::*;

fn device() -> Device {
    qud_backend_ndarray::device()
}

fn rows_of(queue: &FeatureQueue) -> Vec<Vec<f32>> {
    let s = queue.state();
    s.rows.chunks(s.dim).map(<[f32]>::to_vec).collect()
}

fn tensor(rows: &[Vec<f32>], dim: usize) -> Tensor<2> {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), dim]), &device())
}

/// Batches of keys: `sizes[i]` rows of `dim` finite values each.
fn batches(
    dim: usize,
    max_batches: usize,
    max_batch: usize,
) -> impl Strategy<Value = Vec<Vec<Vec<f32>>>> {
    prop::collection::vec(
        prop::collection::vec(prop::collection::vec(-1.0f32..1.0, dim), 0..=max_batch),
        0..=max_batches,
    )
}

fn queue_and_batches() -> impl Strategy<Value = (usize, usize, u64, Vec<Vec<Vec<f32>>>)> {
    (1usize..=9, 1usize..=4, any::<u64>())
        .prop_flat_map(|(n, dim, seed)| (Just(n), Just(dim), Just(seed), batches(dim, 6, 20)))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a
        .iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    let nb: f64 = b
        .iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    dot / (na * nb)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Capacity is fixed, rows are the last n keys in FIFO order over untouched initial rows,
    /// the pointer is (total enqueued) mod n, and earlier negatives() are unaffected.
    #[test]
    fn fifo_holds_the_last_n_keys((n, dim, seed, batches) in queue_and_batches()) {
        let mut queue = FeatureQueue::new(n, dim, QueueKind::Fifo, seed, &device());
        let mut model = rows_of(&queue);
        let mut total = 0usize;
        for batch in &batches {
            let before = queue.negatives();
            let before_values = before.to_data();
            queue.enqueue(tensor(batch, dim)).unwrap();
            for key in batch {
                model[total % n] = key.clone();
                total += 1;
            }
            prop_assert_eq!(before.into_data(), before_values, "negatives() changed by a later enqueue");
            prop_assert_eq!(queue.capacity(), n);
            prop_assert_eq!(queue.negatives().dims(), [n, dim]);
            prop_assert_eq!(queue.pointer(), total % n);
            prop_assert_eq!(queue.filled(), total.min(n));
            prop_assert_eq!(queue.total_enqueued(), total as u64);
            prop_assert_eq!(rows_of(&queue), model.clone());
        }
    }

    /// The initial rows are unit Gaussian draws, the same for the same seed on every call.
    #[test]
    fn initial_rows_are_unit_and_seeded(n in 1usize..64, dim in 1usize..16, seed in any::<u64>()) {
        let a = FeatureQueue::new(n, dim, QueueKind::Fifo, seed, &device());
        let b = FeatureQueue::new(n, dim, QueueKind::Fifo, seed, &device());
        prop_assert_eq!(a.state(), b.state());
        for row in rows_of(&a) {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            prop_assert!((norm - 1.0).abs() < 1e-5, "row norm {}", norm);
        }
        // Unit rows of one component are +-1, so two seeds agree with probability 2^-n there;
        // from two components on, rows are continuous and never agree by chance.
        if dim >= 2 {
            let c = FeatureQueue::new(n, dim, QueueKind::Fifo, seed.wrapping_add(1), &device());
            prop_assert_ne!(a.state().rows, c.state().rows);
        }
    }

    /// simq/dissimq: FIFO during the fill phase, then each key replaces the most/least similar
    /// row, rows written earlier in the same batch included. Cases where a choice is within 1e-3
    /// of a tie are skipped, since f32 rounding may legitimately break such ties either way.
    #[test]
    fn similarity_queues_replace_the_extreme_row(
        (n, dim, seed, batches) in (2usize..=7, 2usize..=4, any::<u64>())
            .prop_flat_map(|(n, dim, seed)| (Just(n), Just(dim), Just(seed), batches(dim, 4, 9))),
        most_similar in any::<bool>(),
    ) {
        let kind = if most_similar { QueueKind::Simq } else { QueueKind::Dissimq };
        let mut queue = FeatureQueue::new(n, dim, kind, seed, &device());
        let mut model = rows_of(&queue);
        let (mut filled, mut ptr) = (0usize, 0usize);
        let mut near_tie = false;
        for batch in &batches {
            for key in batch {
                if filled < n {
                    model[ptr] = key.clone();
                    ptr = (ptr + 1) % n;
                    filled += 1;
                    continue;
                }
                let sims: Vec<f64> = model.iter().map(|r| cosine(key, r)).collect();
                let score = |s: f64| if most_similar { s } else { -s };
                let best = (0..n).fold(0, |b, j| if score(sims[j]) > score(sims[b]) { j } else { b });
                near_tie |= (0..n).any(|j| j != best && (score(sims[best]) - score(sims[j])) < 1e-3);
                model[best] = key.clone();
            }
            queue.enqueue(tensor(batch, dim)).unwrap();
        }
        prop_assume!(!near_tie);
        prop_assert_eq!(queue.filled(), filled);
        prop_assert_eq!(queue.pointer(), ptr);
        prop_assert_eq!(rows_of(&queue), model);
    }

    /// Keys containing NaN or infinity are refused and the queue is left exactly as it was.
    #[test]
    fn non_finite_keys_are_rejected(
        (n, dim, seed, batches) in queue_and_batches(),
        rows in 1usize..6,
        bad_at in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        kind in prop::sample::select(vec![QueueKind::Fifo, QueueKind::Simq, QueueKind::Dissimq]),
    ) {
        let mut queue = FeatureQueue::new(n, dim, kind, seed, &device());
        for batch in &batches {
            queue.enqueue(tensor(batch, dim)).unwrap();
        }
        let before = queue.state();
        let mut keys = vec![vec![0.5f32; dim]; rows];
        let at = bad_at.index(rows * dim);
        keys[at / dim][at % dim] = bad;
        let err = queue.enqueue(tensor(&keys, dim)).unwrap_err();
        match err {
            QueueError::NonFinite { rows } => prop_assert_eq!(rows, vec![at / dim]),
            other => prop_assert!(false, "unexpected error {}", other),
        }
        prop_assert_eq!(queue.state(), before);
    }

    /// Save then load, through memory and through a file, gives back the identical queue, which
    /// then behaves identically.
    #[test]
    fn save_load_is_the_identity(
        (n, dim, seed, batches) in queue_and_batches(),
        kind in prop::sample::select(vec![QueueKind::Fifo, QueueKind::Simq, QueueKind::Dissimq]),
    ) {
        let mut queue = FeatureQueue::new(n, dim, kind, seed, &device());
        let (head, tail) = batches.split_at(batches.len() / 2);
        for batch in head {
            queue.enqueue(tensor(batch, dim)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.bin");
        queue.save(&path).unwrap();
        let mut loaded = FeatureQueue::load(&path, &device()).unwrap();
        prop_assert_eq!(loaded.state(), queue.state());
        let state = queue.state();
        prop_assert_eq!(QueueState::from_bytes(&state.to_bytes(), &path).unwrap(), state.clone());
        for batch in tail {
            queue.enqueue(tensor(batch, dim)).unwrap();
            loaded.enqueue(tensor(batch, dim)).unwrap();
        }
        prop_assert_eq!(loaded.state(), queue.state());
        let bits = |s: &QueueState| s.rows.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&loaded.state()), bits(&queue.state()));
    }
}

#[test]
fn batch_larger_than_the_queue_keeps_its_last_rows() {
    let mut queue = FeatureQueue::new(4, 1, QueueKind::Fifo, 0, &device());
    queue.enqueue(tensor(&[vec![100.0]], 1)).unwrap();
    let keys: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32]).collect();
    queue.enqueue(tensor(&keys, 1)).unwrap();
    // 100 took row 0, so key k goes to row (1 + k) % 4 and the last writer of each row wins.
    assert_eq!(
        rows_of(&queue),
        vec![vec![7.0], vec![8.0], vec![9.0], vec![6.0]]
    );
    assert_eq!(queue.pointer(), 11 % 4);
}

#[test]
fn wrong_key_width_is_an_error() {
    let mut queue = FeatureQueue::new(4, 3, QueueKind::Fifo, 0, &device());
    let err = queue.enqueue(tensor(&[vec![1.0, 2.0]], 2)).unwrap_err();
    assert!(err.to_string().contains("[batch, 3]"), "{err}");
}

#[test]
fn corrupted_or_truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.bin");
    let mut queue = FeatureQueue::new(5, 3, QueueKind::Simq, 9, &device());
    queue.enqueue(tensor(&[vec![1.0, 0.0, 0.0]], 3)).unwrap();
    queue.save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();

    let mut flipped = good.clone();
    flipped[70] ^= 0x10;
    let err = QueueState::from_bytes(&flipped, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum") && err.contains("q.bin"), "{err}");

    let err = QueueState::from_bytes(&good[..good.len() - 3], &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");

    let mut magic = good.clone();
    magic[0] = b'X';
    let err = QueueState::from_bytes(&magic, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("magic"), "{err}");

    let err = FeatureQueue::load(&dir.path().join("missing.bin"), &device()).unwrap_err();
    assert!(err.to_string().contains("missing.bin"), "{err}");
}

#[test]
fn enqueue_accepts_autodiff_keys_without_tracking_them() {
    let ad = device().autodiff();
    let keys = Tensor::<2>::from_floats([[0.6, 0.8]], &ad).require_grad();
    let mut queue = FeatureQueue::new(3, 2, QueueKind::Fifo, 1, &device());
    queue.enqueue(keys).unwrap();
    assert!(!queue.negatives().is_autodiff());
    assert_eq!(rows_of(&queue)[0], vec![0.6, 0.8]);
}

#[test]
fn similarity_ties_go_to_the_lowest_row() {
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let basis = vec![
        vec![1.0, 0.0, 0.0],
        vec![0.0, 1.0, 0.0],
        vec![0.0, 0.0, 1.0],
    ];
    // simq: (e1 + e2)/sqrt2 is equally similar to rows 0 and 1.
    let mut queue = FeatureQueue::new(3, 3, QueueKind::Simq, 0, &device());
    queue.enqueue(tensor(&basis, 3)).unwrap();
    queue.enqueue(tensor(&[vec![s, s, 0.0]], 3)).unwrap();
    assert_eq!(
        rows_of(&queue),
        vec![vec![s, s, 0.0], basis[1].clone(), basis[2].clone()]
    );
    // dissimq: e1 is equally dissimilar (0) to rows 1 and 2.
    let mut queue = FeatureQueue::new(3, 3, QueueKind::Dissimq, 0, &device());
    queue.enqueue(tensor(&basis, 3)).unwrap();
    queue.enqueue(tensor(&[vec![1.0, 0.0, 0.0]], 3)).unwrap();
    assert_eq!(
        rows_of(&queue),
        vec![basis[0].clone(), basis[0].clone(), basis[2].clone()]
    );
    assert_eq!(
        queue.pointer(),
        0,
        "replacement does not move the FIFO pointer"
    );
    assert_eq!(queue.total_enqueued(), 4);
}

#[test]
fn inconsistent_states_are_refused() {
    let good = FeatureQueue::new(4, 2, QueueKind::Fifo, 3, &device()).state();
    let cases: Vec<(&str, QueueState)> = vec![
        (
            "pointer",
            QueueState {
                pointer: 4,
                ..good.clone()
            },
        ),
        (
            "filled",
            QueueState {
                filled: 5,
                ..good.clone()
            },
        ),
        (
            "row values",
            QueueState {
                rows: vec![0.0; 7],
                ..good.clone()
            },
        ),
        (
            "capacity",
            QueueState {
                capacity: 0,
                rows: vec![],
                ..good.clone()
            },
        ),
    ];
    for (what, state) in cases {
        let err = FeatureQueue::from_state(state, &device())
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    let ok = QueueState {
        pointer: 3,
        filled: 4,
        ..good
    };
    assert!(FeatureQueue::from_state(ok, &device()).is_ok());
}

#[test]
fn file_header_fields_are_checked() {
    let path = std::path::Path::new("q.bin");
    let state = FeatureQueue::new(2, 2, QueueKind::Dissimq, 1, &device()).state();
    let bytes = state.to_bytes();
    assert_eq!(bytes.len(), 56 + 2 * 2 * 4 + 8);
    assert_eq!(&bytes[..8], b"QUDQUEUE");
    assert_eq!(
        u32::from_le_bytes(bytes[12..16].try_into().unwrap()),
        2,
        "dissimq is kind 2"
    );
    let with_hash = |mut b: Vec<u8>| {
        let n = b.len() - 8;
        let h = state::fnv1a(&b[..n]);
        b[n..].copy_from_slice(&h.to_le_bytes());
        b
    };
    let mut version = bytes.clone();
    version[8] = 9;
    let err = QueueState::from_bytes(&with_hash(version), path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("version 9"), "{err}");
    let mut kind = bytes.clone();
    kind[12] = 7;
    let err = QueueState::from_bytes(&with_hash(kind), path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kind code 7"), "{err}");
    let mut huge = bytes.clone();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = QueueState::from_bytes(&with_hash(huge), path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the file holds"), "{err}");
}

#[test]
fn checksum_is_fnv1a_64() {
    // Reference values of the FNV-1a 64-bit hash (offset basis 0xcbf29ce484222325).
    assert_eq!(state::fnv1a(b""), 0xcbf29ce484222325);
    assert_eq!(state::fnv1a(b"a"), 0xaf63dc4c8601ec8c);
    assert_eq!(state::fnv1a(b"foobar"), 0x85944171f73967e8);
}

proptest! {
    /// Queue files with any header field or byte changed, checksum recomputed so the change
    /// gets past it (a file written by a buggy or hostile tool): loading gives a queue or an
    /// error naming the file, never a panic.
    #[test]
    fn edited_queue_files_load_or_fail_cleanly(
        edits in prop::collection::vec((0usize..56 + 4 * 12, any::<u8>()), 1..5),
        rehash: bool,
        cut in prop::option::of(0usize..104),
    ) {
        let path = std::path::Path::new("edited.bin");
        let mut queue = FeatureQueue::new(4, 3, QueueKind::Fifo, 1, &device());
        queue
            .enqueue(tensor(&[vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]], 3))
            .unwrap();
        let mut bytes = queue.state().to_bytes();
        for (at, value) in edits {
            bytes[at] = value;
        }
        if rehash {
            let n = bytes.len() - 8;
            let h = state::fnv1a(&bytes[..n]);
            bytes[n..].copy_from_slice(&h.to_le_bytes());
        }
        if let Some(cut) = cut {
            bytes.truncate(cut);
        }
        match QueueState::from_bytes(&bytes, path) {
            Ok(state) => {
                if let Err(e) = FeatureQueue::from_state(state, &device()) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("edited.bin"), "{}", e),
        }
    }
}
