//! 1:N identification with distractors, as the MegaFace challenge scores it: rank-1 identification
//! rate and verification TAR at a FAR, for probes against a gallery padded with N distractors.
//!
//! Protocol (MegaFace, Kemelmacher-Shlizerman et al., CVPR 2016; the QUD paper's Table 3): every
//! probe face `p` and every gallery face `g` of the same identity (never `p` itself) make one
//! trial. The trial's gallery is `g` plus every distractor; it succeeds at rank 1 when
//! `s(p, g) > s(p, d)` for every distractor `d` (a tie fails). Verification scores the same
//! trials as genuine pairs against every probe-distractor pair as impostors; the threshold for a
//! FAR `f` admits at most `floor(f * impostors)` impostors (`score > threshold`), and TAR is the
//! share of genuine pairs above it. Scores are cosine similarities of L2-normalised embeddings.
//!
//! Probes x distractors is one matrix product per block of distractors, on the given device;
//! only each probe's best distractor and the impostor scores that can still decide a threshold
//! are kept, so a million distractors need no P x N matrix.

use burn::prelude::*;
use rayon::prelude::*;
use serde::Serialize;

/// Row-major `[n, dim]` L2-normalised embeddings and, for probes and galleries, their identities.
#[derive(Clone, Debug, Default)]
pub struct Embeddings {
    pub rows: Vec<f32>,
    pub dim: usize,
    /// One identity per row (probes and galleries); empty for distractors.
    pub labels: Vec<String>,
}

impl Embeddings {
    /// `rows` (`[n, dim]`, any norm) normalised to unit length; a zero row stays zero.
    pub fn normalized(mut rows: Vec<f32>, dim: usize, labels: Vec<String>) -> Self {
        for row in rows.chunks_mut(dim.max(1)) {
            let norm = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|v| *v = (*v as f64 / norm) as f32);
            }
        }
        Self { rows, dim, labels }
    }

    pub fn len(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.dim..(i + 1) * self.dim]
    }
}

/// One FAR's operating point.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TarAtFar {
    pub far: f64,
    pub tar: f64,
    /// Scores above this are accepted.
    pub threshold: f64,
}

/// The scores of one identification run.
#[derive(Clone, Debug, Serialize)]
pub struct IdentScore {
    pub probes: usize,
    /// Probes with at least one mate in the gallery (the others take part in no trial).
    pub probes_with_mates: usize,
    pub distractors: usize,
    /// Probe-mate trials: the genuine pairs.
    pub trials: usize,
    pub impostor_pairs: u64,
    /// Share of trials whose mate outscores every distractor.
    pub rank1: f64,
    pub tar_at_far: Vec<TarAtFar>,
    /// Scoring time: the products, the bookkeeping and the thresholds, not the time the
    /// distractor blocks took to arrive (reading a file, embedding images).
    pub seconds: f64,
    /// Probes x distractors x dim x 2 over `seconds`.
    pub gflops: f64,
}

/// Why a run could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum IdentError {
    #[error("{what} has {got}-d embeddings, the probes {expected}-d")]
    Dim {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{what}: {rows} embeddings but {labels} identities")]
    Labels {
        what: &'static str,
        rows: usize,
        labels: usize,
    },
    #[error("no probe has a mate in the gallery: no trial to score")]
    NoTrials,
    #[error("FAR {0} is not in (0, 1)")]
    Far(f64),
    #[error("distractors: {0}")]
    Distractors(String),
}

/// Score `probes` against `gallery` (`None`: the probes are their own gallery) padded with the
/// distractor blocks `distractors` yields (each `[b, dim]`, normalised; `distractor_count` in
/// all), at every FAR in `fars`.
pub fn identify<E: std::fmt::Display>(
    probes: &Embeddings,
    gallery: Option<&Embeddings>,
    distractors: impl IntoIterator<Item = Result<Vec<f32>, E>>,
    distractor_count: usize,
    fars: &[f64],
    device: &Device,
) -> Result<IdentScore, IdentError> {
    let start = std::time::Instant::now();
    let dim = probes.dim;
    check_labels("the probes", probes)?;
    if let Some(gallery) = gallery {
        check_labels("the gallery", gallery)?;
        if gallery.dim != dim {
            return Err(IdentError::Dim {
                what: "the gallery",
                got: gallery.dim,
                expected: dim,
            });
        }
    }
    if let Some(&far) = fars.iter().find(|f| !(**f > 0.0 && **f < 1.0)) {
        return Err(IdentError::Far(far));
    }

    // Genuine pairs: every probe against every gallery face of its identity.
    let same_set = gallery.is_none();
    let gallery = gallery.unwrap_or(probes);
    let mut by_identity: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for (g, label) in gallery.labels.iter().enumerate() {
        by_identity.entry(label).or_default().push(g);
    }
    let genuine: Vec<Vec<f32>> = (0..probes.len())
        .into_par_iter()
        .map(|p| {
            let mates = by_identity
                .get(probes.labels[p].as_str())
                .map_or(&[][..], Vec::as_slice);
            mates
                .iter()
                .filter(|&&g| !(same_set && g == p))
                .map(|&g| dot(probes.row(p), gallery.row(g)))
                .collect()
        })
        .collect();
    let trials: usize = genuine.iter().map(Vec::len).sum();
    if trials == 0 {
        return Err(IdentError::NoTrials);
    }

    // Impostor scores: keep each probe's best distractor, and the impostor scores that can still
    // be at or above the threshold of the largest FAR asked for.
    let total_impostors = (probes.len() * distractor_count) as u64;
    let max_far = fars.iter().copied().fold(0.0, f64::max);
    let keep = (max_far * total_impostors as f64).floor() as usize + 1;
    let mut best = vec![f32::NEG_INFINITY; probes.len()];
    let mut top = TopScores::new(keep);
    let probe_tensor = Tensor::<2>::from_data(
        TensorData::new(probes.rows.clone(), [probes.len(), dim]),
        device,
    );
    let mut seen = 0usize;
    // Time spent producing blocks (reading, or embedding images) is not the scoring's.
    let mut producing = std::time::Duration::ZERO;
    let mut blocks = distractors.into_iter();
    loop {
        let asked = std::time::Instant::now();
        let next = blocks.next();
        producing += asked.elapsed();
        let Some(block) = next else { break };
        let block = block.map_err(|e| IdentError::Distractors(e.to_string()))?;
        if block.len() % dim.max(1) != 0 {
            return Err(IdentError::Dim {
                what: "a distractor block",
                got: block.len(),
                expected: dim,
            });
        }
        let rows = block.len() / dim;
        if rows == 0 {
            continue;
        }
        seen += rows;
        let block = Tensor::<2>::from_data(TensorData::new(block, [rows, dim]), device);
        let scores = probe_tensor
            .clone()
            .matmul(block.transpose())
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 scores");
        let bound = top.bound();
        let (block_best, above): (Vec<f32>, Vec<Vec<f32>>) = scores
            .par_chunks(rows)
            .map(|row| scan_row(row, bound))
            .unzip();
        for (b, new) in best.iter_mut().zip(block_best) {
            *b = b.max(new);
        }
        for scores in above {
            top.extend(scores);
        }
    }
    if seen != distractor_count {
        return Err(IdentError::Distractors(format!(
            "{seen} embeddings read, {distractor_count} announced"
        )));
    }

    let rank1_hits: usize = genuine
        .iter()
        .zip(&best)
        .map(|(scores, &best)| scores.iter().filter(|&&s| s > best).count())
        .sum();
    let top = top.into_sorted();
    let tar_at_far = fars
        .iter()
        .map(|&far| {
            let allowed = (far * total_impostors as f64).floor() as usize;
            let threshold = top.get(allowed).copied().unwrap_or(f32::NEG_INFINITY);
            let accepted: usize = genuine
                .iter()
                .map(|g| g.iter().filter(|&&s| s > threshold).count())
                .sum();
            TarAtFar {
                far,
                tar: accepted as f64 / trials as f64,
                threshold: threshold as f64,
            }
        })
        .collect();
    let seconds = (start.elapsed() - producing).as_secs_f64();
    Ok(IdentScore {
        probes: probes.len(),
        probes_with_mates: genuine.iter().filter(|g| !g.is_empty()).count(),
        distractors: distractor_count,
        trials,
        impostor_pairs: total_impostors,
        rank1: rank1_hits as f64 / trials as f64,
        tar_at_far,
        seconds,
        gflops: 2.0 * total_impostors as f64 * dim as f64 / seconds / 1e9,
    })
}

/// One pass over a probe's scores: its best, and the scores above `bound` (those that can still
/// set a threshold). Sixteen lanes of maxima and a per-chunk test keep the loop vectorised: a
/// plain `f32::max` fold with a branch per score ran at a third of the speed and took a quarter
/// of a million-distractor run.
pub(crate) fn scan_row(row: &[f32], bound: f32) -> (f32, Vec<f32>) {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut above = Vec::new();
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut any = false;
        for (lane, &s) in lanes.iter_mut().zip(chunk) {
            *lane = if s > *lane { s } else { *lane };
            any |= s > bound;
        }
        if any {
            above.extend(chunk.iter().copied().filter(|&s| s > bound));
        }
    }
    let mut best = lanes
        .into_iter()
        .fold(f32::NEG_INFINITY, |m, s| if s > m { s } else { m });
    for &s in tail {
        best = if s > best { s } else { best };
        if s > bound {
            above.push(s);
        }
    }
    (best, above)
}

fn check_labels(what: &'static str, set: &Embeddings) -> Result<(), IdentError> {
    if set.labels.len() != set.len() {
        return Err(IdentError::Labels {
            what,
            rows: set.len(),
            labels: set.labels.len(),
        });
    }
    Ok(())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The `keep` largest scores seen, kept lazily: up to twice as many are held before the excess
/// is cut, so that a block costs one pass plus an occasional selection.
struct TopScores {
    keep: usize,
    scores: Vec<f32>,
    /// No score at or below this can be among the `keep` largest any more.
    bound: f32,
}

impl TopScores {
    fn new(keep: usize) -> Self {
        Self {
            keep,
            scores: Vec::new(),
            bound: f32::NEG_INFINITY,
        }
    }

    fn bound(&self) -> f32 {
        self.bound
    }

    fn extend(&mut self, scores: Vec<f32>) {
        self.scores
            .extend(scores.into_iter().filter(|&s| s > self.bound));
        if self.scores.len() > 2 * self.keep {
            self.cut();
        }
    }

    fn cut(&mut self) {
        let k = self.keep;
        self.scores
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        self.scores.truncate(k);
        self.bound = self.scores.iter().copied().fold(f32::INFINITY, f32::min);
    }

    /// The kept scores, largest first.
    fn into_sorted(mut self) -> Vec<f32> {
        if self.scores.len() > self.keep {
            self.cut();
        }
        self.scores.sort_unstable_by(|a, b| b.total_cmp(a));
        self.scores
    }
}
