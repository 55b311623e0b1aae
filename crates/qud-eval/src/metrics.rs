//! Verification metrics exactly as insightface's `eval/verification.py` computes them.
//!
//! Embeddings (flip-summed, then L2-normalised by the caller) come in pair order: rows `2p` and
//! `2p + 1` are pair `p`. Distance = squared L2 in f64. Ten contiguous folds over pair indices
//! (sklearn `KFold(shuffle=False)`: the first `P % 10` folds take one extra pair). Accuracy: per
//! fold, the threshold in `i * 0.01, i < 400` with the best train-fold accuracy (the first best),
//! then its test-fold accuracy; a pair is predicted "same" when `dist < threshold`.
//! VAL@FAR: thresholds `i * 0.001, i < 4000`; per fold, the threshold with train-fold FAR 1e-3
//! by linear interpolation of threshold over FAR (scipy `interp1d(kind="slinear")`), or 0 when
//! the train folds never reach FAR 1e-3; then VAL and FAR on the test fold.

use serde::Serialize;

/// Scores of one verification set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verification {
    /// Mean test-fold accuracy, in [0, 1].
    pub accuracy: f64,
    /// Population standard deviation of the fold accuracies.
    pub accuracy_std: f64,
    pub val: f64,
    pub val_std: f64,
    pub far: f64,
    pub fold_accuracies: Vec<f64>,
    pub fold_thresholds: Vec<f64>,
}

/// `[start, end)` of each of `folds` contiguous folds over `n` items, as sklearn's KFold.
pub fn kfold(n: usize, folds: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(folds);
    let mut start = 0;
    for f in 0..folds {
        let size = n / folds + usize::from(f < n % folds);
        out.push((start, start + size));
        start += size;
    }
    out
}

/// NumPy's `pairwise_sum` (`np.sum` along a contiguous axis, accumulating in the array's own float
/// type: f64 for distances and scores, f32 for float32 features): below 8 values a plain
/// loop; up to 128, eight interleaved partial sums combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))
/// plus the remainder; above, the two halves (split at a multiple of 8) recursively. Summing in
/// NumPy's order makes every distance bit-identical to the reference's.
pub(crate) fn numpy_sum<T>(values: &[T]) -> T
where
    T: Copy + Default + std::ops::Add<Output = T> + std::ops::AddAssign,
{
    let n = values.len();
    if n < 8 {
        return values.iter().fold(T::default(), |acc, v| acc + *v);
    }
    if n <= 128 {
        let mut r = [T::default(); 8];
        r.copy_from_slice(&values[..8]);
        let blocks = n - n % 8;
        for chunk in values[8..blocks].chunks_exact(8) {
            for (acc, v) in r.iter_mut().zip(chunk) {
                *acc += *v;
            }
        }
        let mut sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for v in &values[blocks..] {
            sum += *v;
        }
        return sum;
    }
    let half = n / 2;
    let half = half - half % 8;
    numpy_sum(&values[..half]) + numpy_sum(&values[half..])
}

/// Squared L2 distance of each pair of rows `(2p, 2p + 1)`, in f64, summed as NumPy sums.
pub fn pair_distances(embeddings: &[Vec<f32>]) -> Vec<f64> {
    let mut squares = Vec::new();
    embeddings
        .chunks_exact(2)
        .map(|p| {
            squares.clear();
            squares.extend(
                p[0].iter()
                    .zip(&p[1])
                    .map(|(a, b)| (*a as f64 - *b as f64) * (*a as f64 - *b as f64)),
            );
            numpy_sum(&squares)
        })
        .collect()
}

fn accuracy_at(threshold: f64, dist: &[f64], same: &[bool]) -> f64 {
    let correct = dist
        .iter()
        .zip(same)
        .filter(|(d, s)| (**d < threshold) == **s)
        .count();
    correct as f64 / dist.len() as f64
}

/// (VAL, FAR) at a threshold: accepted same pairs / same pairs, accepted different / different.
fn val_far(threshold: f64, dist: &[f64], same: &[bool]) -> (f64, f64) {
    let (mut ta, mut fa, mut n_same, mut n_diff) = (0usize, 0usize, 0usize, 0usize);
    for (d, s) in dist.iter().zip(same) {
        let accept = *d < threshold;
        if *s {
            n_same += 1;
            ta += usize::from(accept);
        } else {
            n_diff += 1;
            fa += usize::from(accept);
        }
    }
    (ta as f64 / n_same as f64, fa as f64 / n_diff as f64)
}

fn train_split<T: Copy>(values: &[T], test: (usize, usize)) -> Vec<T> {
    values[..test.0]
        .iter()
        .chain(&values[test.1..])
        .copied()
        .collect()
}

/// scipy `interp1d(x, y, kind="slinear")(target)` for `target` within `[min x, max x]`: points
/// sorted stably by x; the segment is the one whose right end is the first x above the target
/// (the last non-degenerate segment when the target is the maximum).
fn interpolate(x: &[f64], y: &[f64], target: f64) -> f64 {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let xs: Vec<f64> = order.iter().map(|&i| x[i]).collect();
    let ys: Vec<f64> = order.iter().map(|&i| y[i]).collect();
    let right = match xs.iter().position(|&v| v > target) {
        Some(i) => i,
        None => (1..xs.len())
            .rev()
            .find(|&i| xs[i - 1] < xs[i])
            .unwrap_or(0),
    };
    if right == 0 {
        return ys[0];
    }
    let (x0, x1, y0, y1) = (xs[right - 1], xs[right], ys[right - 1], ys[right]);
    y0 + (target - x0) * (y1 - y0) / (x1 - x0)
}

/// For ascending `thresholds`, how many same-identity and different-identity distances lie
/// strictly below each: `(accepted same, accepted different, same, different)`. One sort and one
/// sweep replace a pass over every pair per threshold; the counts, and so every ratio made from
/// them, are exactly those of the direct count.
fn accept_counts(
    dist: &[f64],
    same: &[bool],
    thresholds: &[f64],
) -> (Vec<usize>, Vec<usize>, usize, usize) {
    let mut genuine: Vec<f64> = Vec::with_capacity(dist.len());
    let mut impostor: Vec<f64> = Vec::with_capacity(dist.len());
    for (d, s) in dist.iter().zip(same) {
        if *s {
            genuine.push(*d);
        } else {
            impostor.push(*d);
        }
    }
    genuine.sort_unstable_by(f64::total_cmp);
    impostor.sort_unstable_by(f64::total_cmp);
    let below = |sorted: &[f64]| -> Vec<usize> {
        let mut k = 0;
        thresholds
            .iter()
            .map(|&t| {
                while k < sorted.len() && sorted[k] < t {
                    k += 1;
                }
                k
            })
            .collect()
    };
    (
        below(&genuine),
        below(&impostor),
        genuine.len(),
        impostor.len(),
    )
}

/// Score normalised embeddings in pair order against the pair labels.
pub fn verify(embeddings: &[Vec<f32>], issame: &[bool], folds: usize) -> Verification {
    assert_eq!(
        embeddings.len(),
        2 * issame.len(),
        "two embeddings per pair"
    );
    let dist = pair_distances(embeddings);
    let splits = kfold(issame.len(), folds);
    let thresholds: Vec<f64> = (0..400).map(|i| i as f64 * 0.01).collect();
    let mut fold_accuracies = Vec::new();
    let mut fold_thresholds = Vec::new();
    for &test in &splits {
        let (train_d, train_s) = (train_split(&dist, test), train_split(issame, test));
        let (ta, fa, _, n_diff) = accept_counts(&train_d, &train_s, &thresholds);
        let mut best = 0;
        let mut best_acc = f64::MIN;
        for i in 0..thresholds.len() {
            // Correct: accepted genuine pairs plus rejected impostor pairs.
            let acc = (ta[i] + n_diff - fa[i]) as f64 / train_d.len() as f64;
            if acc > best_acc {
                (best, best_acc) = (i, acc);
            }
        }
        fold_thresholds.push(thresholds[best]);
        fold_accuracies.push(accuracy_at(
            thresholds[best],
            &dist[test.0..test.1],
            &issame[test.0..test.1],
        ));
    }
    let far_target = 1e-3;
    let fine: Vec<f64> = (0..4000).map(|i| i as f64 * 0.001).collect();
    let (mut vals, mut fars) = (Vec::new(), Vec::new());
    for &test in &splits {
        let (train_d, train_s) = (train_split(&dist, test), train_split(issame, test));
        let (_, fa, _, n_diff) = accept_counts(&train_d, &train_s, &fine);
        let far_train: Vec<f64> = fa.iter().map(|&f| f as f64 / n_diff as f64).collect();
        let reached = far_train.iter().cloned().fold(f64::MIN, f64::max) >= far_target;
        let threshold = if reached {
            interpolate(&far_train, &fine, far_target)
        } else {
            0.0
        };
        let (val, far) = val_far(threshold, &dist[test.0..test.1], &issame[test.0..test.1]);
        vals.push(val);
        fars.push(far);
    }
    let (accuracy, accuracy_std) = mean_std(&fold_accuracies);
    let (val, val_std) = mean_std(&vals);
    let (far, _) = mean_std(&fars);
    Verification {
        accuracy,
        accuracy_std,
        val,
        val_std,
        far,
        fold_accuracies,
        fold_thresholds,
    }
}

/// Mean and population standard deviation (numpy's `std`).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// `(FAR, TAR)` points of a ROC curve.
pub type RocPoints = Vec<(f64, f64)>;

/// ROC over all pairs by distance: `(far, tar)` points from the strictest threshold
/// down, and TAR at each requested FAR (the largest TAR whose FAR does not exceed it).
pub fn roc(embeddings: &[Vec<f32>], issame: &[bool], fars: &[f64]) -> (RocPoints, RocPoints) {
    let dist = pair_distances(embeddings);
    let mut order: Vec<usize> = (0..dist.len()).collect();
    order.sort_by(|&a, &b| dist[a].total_cmp(&dist[b]));
    let n_same = issame.iter().filter(|s| **s).count().max(1) as f64;
    let n_diff = issame.iter().filter(|s| !**s).count().max(1) as f64;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut curve = vec![(0.0, 0.0)];
    for (k, &i) in order.iter().enumerate() {
        if issame[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let tied_with_next = order.get(k + 1).is_some_and(|&j| dist[j] == dist[i]);
        if !tied_with_next {
            curve.push((fp / n_diff, tp / n_same));
        }
    }
    let tar_at = fars
        .iter()
        .map(|&target| {
            let tar = curve
                .iter()
                .filter(|(f, _)| *f <= target)
                .map(|p| p.1)
                .fold(0.0, f64::max);
            (target, tar)
        })
        .collect();
    (curve, tar_at)
}

#[cfg(test)]
mod numpy_order {
    use super::numpy_sum;

    /// Expected values printed by NumPy 2.x for the same formula:
    /// `v = np.array([((i*37)%101 - 50) * 10.0**((i%7)-3) + 0.1*i for i in range(n)]);
    /// repr(float(np.sum(v)))`. A left-to-right sum gives 21122.202999999994 and -42218.588.
    #[test]
    fn sums_in_numpys_pairwise_order() {
        let v = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    ((i * 37 % 101) as f64 - 50.0) * 10f64.powi((i % 7) as i32 - 3) + 0.1 * i as f64
                })
                .collect()
        };
        assert_eq!(numpy_sum(&v(13)), -28114.533);
        assert_eq!(numpy_sum(&v(100)), 21122.202999999998);
        assert_eq!(numpy_sum(&v(300)), -42218.58800000001);
    }
}
