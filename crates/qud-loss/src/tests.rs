//! Loss properties, property-tested on the ndarray CPU device against a direct f64 formula.

use super::*;
use proptest::prelude::*;

fn device() -> Device {
    qud_backend_ndarray::device()
}

type Rows = Vec<Vec<f64>>;

fn tensor(rows: &[Vec<f64>], device: &Device) -> Tensor<2> {
    let dim = rows[0].len();
    let flat: Vec<f32> = rows.iter().flatten().map(|v| *v as f32).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), dim]), device)
}

fn values(t: Tensor<2>) -> Rows {
    let dim = t.dims()[1];
    let flat: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().unwrap();
    flat.chunks(dim)
        .map(|r| r.iter().map(|v| *v as f64).collect())
        .collect()
}

fn unit(rows: Rows) -> Rows {
    rows.into_iter()
        .map(|r| {
            let n = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            r.into_iter().map(|v| v / n).collect()
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The loss written out directly in f64.
fn reference(q: &Rows, k: &Rows, neg: &Rows, tau: f64) -> f64 {
    let per_sample = q.iter().zip(k).map(|(qi, ki)| {
        let pos = dot(qi, ki) / tau;
        let logits: Vec<f64> = std::iter::once(pos)
            .chain(neg.iter().map(|nj| dot(qi, nj) / tau))
            .collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        lse - pos
    });
    per_sample.sum::<f64>() / q.len() as f64
}

fn loss(q: &Rows, k: &Rows, neg: &Rows, tau: f64) -> f64 {
    let d = device();
    info_nce(tensor(q, &d), tensor(k, &d), tensor(neg, &d), tau).loss_value() as f64
}

/// Random unit features: (q, k, negatives) with N in 1..6, n in 1..24, D in 2..12.
fn features() -> impl Strategy<Value = (Rows, Rows, Rows)> {
    (1usize..6, 1usize..24, 2usize..12).prop_flat_map(|(batch, n, dim)| {
        let rows = move |count| {
            prop::collection::vec(prop::collection::vec(-1.0f64..1.0, dim), count).prop_map(unit)
        };
        (rows(batch), rows(batch), rows(n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn matches_the_f64_formula_and_is_non_negative((q, k, neg) in features(), tau in 0.02f64..1.0) {
        let got = loss(&q, &k, &neg, tau);
        let want = reference(&q, &k, &neg, tau);
        prop_assert!(got >= 0.0, "loss {got} < 0");
        prop_assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "got {got}, want {want}");
    }

    #[test]
    fn equal_similarities_give_log_one_plus_n(
        n in 1usize..300, dim in 1usize..16, tau in 0.01f64..2.0, seed in any::<u64>(),
    ) {
        let v: Vec<f64> = (0..dim).map(|i| ((seed.wrapping_add(i as u64) % 97) as f64) - 48.5).collect();
        let v = unit(vec![v]).remove(0);
        let q = vec![v.clone(); 3];
        let neg = vec![v; n];
        let got = loss(&q, &q, &neg, tau);
        let want = ((1 + n) as f64).ln();
        prop_assert!((got - want).abs() < 1e-4 * want.max(1.0), "got {got}, want ln(1+{n}) = {want}");
    }

    #[test]
    fn strictly_decreasing_in_the_positive_similarity(
        neg in prop::collection::vec(prop::collection::vec(-1.0f64..1.0, 3), 1..20).prop_map(unit),
        angles in prop::collection::vec(0.0f64..3.1, 2..6),
        tau in 0.05f64..1.0,
    ) {
        let q = vec![vec![1.0, 0.0, 0.0]];
        // A negative equal to q keeps the loss above ln 2, away from f32 underflow (with a
        // dominant positive the exact loss, e.g. ln(1 + e^-40), rounds to 0 in f32).
        let mut neg = neg;
        neg.push(q[0].clone());
        let mut angles = angles;
        angles.sort_by(f64::total_cmp);
        angles.dedup_by(|a, b| (*a - *b).abs() < 0.05);
        let losses: Vec<f64> = angles
            .iter()
            .map(|a| loss(&q, &vec![vec![a.cos(), a.sin(), 0.0]], &neg, tau))
            .collect();
        // Growing angle = falling positive similarity = rising loss.
        for (w, a) in losses.windows(2).zip(angles.windows(2)) {
            prop_assert!(w[1] > w[0], "angles {:?}: losses {:?}", a, w);
        }
    }

    #[test]
    fn invariant_to_permuting_the_negatives(
        (q, k, neg) in features(),
        tau in 0.05f64..1.0,
        shuffle_seed in any::<u64>(),
    ) {
        let mut permuted = neg.clone();
        let len = permuted.len();
        for i in (1..len).rev() {
            let j = (shuffle_seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) >> 33) as usize % (i + 1);
            permuted.swap(i, j);
        }
        let a = loss(&q, &k, &neg, tau);
        let b = loss(&q, &k, &permuted, tau);
        prop_assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
    }

    /// d loss / d q from autodiff equals central finite differences of the f64 formula.
    #[test]
    fn gradient_matches_finite_differences((q, k, neg) in features(), tau in 0.1f64..1.0) {
        let ad = device().autodiff();
        let qt = tensor(&q, &ad).require_grad();
        let out = info_nce(qt.clone(), tensor(&k, &device()), tensor(&neg, &device()), tau);
        let grads = out.loss.backward();
        let analytic = values(qt.grad(&grads).expect("q has a gradient"));
        let h = 1e-6;
        for i in 0..q.len() {
            for d in 0..q[0].len() {
                let mut plus = q.clone();
                plus[i][d] += h;
                let mut minus = q.clone();
                minus[i][d] -= h;
                let numeric = (reference(&plus, &k, &neg, tau) - reference(&minus, &k, &neg, tau)) / (2.0 * h);
                prop_assert!(
                    (analytic[i][d] - numeric).abs() <= 2e-3 * numeric.abs().max(0.1),
                    "dL/dq[{i}][{d}]: autodiff {} vs finite differences {numeric}", analytic[i][d]
                );
            }
        }
    }

    #[test]
    fn mse_matches_the_formula((q, k, _neg) in features()) {
        let d = device();
        let got = feature_mse(tensor(&q, &d), tensor(&k, &d)).into_scalar::<f32>() as f64;
        let count = (q.len() * q[0].len()) as f64;
        let want: f64 = q.iter().flatten().zip(k.iter().flatten()).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / count;
        prop_assert!((got - want).abs() <= 1e-5 * want.max(1.0), "{got} vs {want}");
    }
}

#[test]
fn no_gradient_reaches_the_teacher_or_the_queue() {
    let ad = device().autodiff();
    let q = tensor(&unit(vec![vec![0.3, -0.2, 0.9], vec![0.1, 0.5, -0.4]]), &ad).require_grad();
    let k = tensor(&unit(vec![vec![0.2, 0.1, 0.7], vec![-0.3, 0.6, 0.1]]), &ad).require_grad();
    let neg = tensor(&unit(vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 1.0]]), &ad).require_grad();
    let grads = info_nce(q.clone(), k.clone(), neg.clone(), 0.1)
        .loss
        .backward();
    assert!(q.grad(&grads).is_some(), "the student must get a gradient");
    assert!(k.grad(&grads).is_none(), "teacher features got a gradient");
    assert!(neg.grad(&grads).is_none(), "queue got a gradient");

    let grads = feature_mse(q.clone(), k.clone()).backward();
    assert!(q.grad(&grads).is_some());
    assert!(
        k.grad(&grads).is_none(),
        "MSE: teacher features got a gradient"
    );
}

#[test]
fn stable_at_temperatures_where_exp_overflows_f32() {
    // 1/tau = 200: exp(200) is infinite in f32, the shifted form is not.
    let q = unit(vec![vec![1.0, 0.0], vec![0.6, 0.8]]);
    let k = unit(vec![vec![0.8, 0.6], vec![0.6, 0.8]]);
    let neg = unit(vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.2]]);
    let got = loss(&q, &k, &neg, 0.005);
    let want = reference(&q, &k, &neg, 0.005);
    assert!(got.is_finite(), "loss overflowed: {got}");
    assert!((got - want).abs() < 1e-3 * want.max(1.0), "{got} vs {want}");
}

#[test]
fn statistics_read_back_the_logits() {
    let d = device();
    // Sample 0: positive 0.8 beats negatives (0.6, -1.0). Sample 1: positive 0.0 loses to 1.0.
    let q = tensor(&[vec![1.0, 0.0], vec![0.0, 1.0]], &d);
    let k = tensor(&[vec![0.8, 0.6], vec![1.0, 0.0]], &d);
    let neg = tensor(&[vec![0.6, 0.8], vec![-1.0, 0.0]], &d);
    let out = info_nce(q, k, neg, 0.5);
    assert_eq!(out.logits.dims(), [2, 3]);
    assert!((out.positive_similarity() - 0.4).abs() < 1e-6);
    assert!((out.negative_similarity() - (0.6 - 1.0 + 0.8 + 0.0) / 4.0).abs() < 1e-6);
    assert_eq!(out.top1(), 0.5);
}

#[test]
fn l2_normalize_gives_unit_rows_and_keeps_zero_rows_finite() {
    let d = device();
    let x = values(l2_normalize(tensor(
        &[vec![3.0, 4.0], vec![0.0, 0.0], vec![-1e-3, 0.0]],
        &d,
    )));
    assert!((x[0][0] - 0.6).abs() < 1e-6 && (x[0][1] - 0.8).abs() < 1e-6);
    assert_eq!(x[1], vec![0.0, 0.0]);
    assert!((x[2][0] + 1.0).abs() < 1e-6);
}

#[test]
#[should_panic(expected = "temperature must be > 0")]
fn zero_temperature_is_refused() {
    let d = device();
    let x = tensor(&[vec![1.0, 0.0]], &d);
    info_nce(x.clone(), x.clone(), x, 0.0);
}

#[test]
#[should_panic(expected = "queue width")]
fn queue_of_another_width_is_refused() {
    let d = device();
    let x = tensor(&[vec![1.0, 0.0]], &d);
    info_nce(x.clone(), x, tensor(&[vec![1.0, 0.0, 0.0]], &d), 0.1);
}
