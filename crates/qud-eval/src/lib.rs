//! Face verification as insightface scores it: `.bin` pair sets (LFW, CFP-FP, AgeDB-30, CALFW,
//! CPLFW, ...), flip test-time augmentation, 10-fold accuracy, VAL@FAR=1e-3, XNorm and ROC.
//!
//! The reference is insightface `recognition/arcface_torch/eval/verification.py`: embeddings of
//! each image and of its horizontal flip are summed, L2-normalised, and scored by [`verify`].

pub mod ident;
pub mod ijb;
pub mod metrics;
pub mod pickle;
pub mod report;

pub use metrics::{kfold, mean_std, roc, verify, RocPoints, Verification};
pub use report::{line_chart_svg, read_issame, read_npy_rows, roc_svg, NpyRowReader};

use burn::prelude::*;
use qud_backbone::FaceEmbedder;
use qud_data::{decode_face, normalize_into, FaceImage, FACE_SIZE};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Why a verification set could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct BinError {
    pub path: PathBuf,
    pub reason: String,
}

/// A verification set: `2 * P` faces (pair `p` is faces `2p`, `2p + 1`) and `P` labels.
#[derive(Clone, Debug)]
pub struct PairSet {
    pub name: String,
    pub faces: Vec<FaceImage>,
    pub issame: Vec<bool>,
}

fn as_bytes(value: &pickle::Value) -> Option<Vec<u8>> {
    pickle::bytes_of(value).or_else(|| match pickle::numpy_array(value) {
        Some((code, _, raw)) if code == "u1" || code == "|u1" => Some(raw),
        _ => None,
    })
}

fn as_bools(value: &pickle::Value) -> Option<Vec<bool>> {
    match value {
        pickle::Value::List(items) => items
            .iter()
            .map(|v| match v {
                pickle::Value::Bool(b) => Some(*b),
                pickle::Value::Int(i) => Some(*i != 0),
                _ => None,
            })
            .collect(),
        other => match pickle::numpy_array(other) {
            Some((code, _, raw)) if code == "b1" || code == "?" => {
                Some(raw.iter().map(|b| *b != 0).collect())
            }
            _ => None,
        },
    }
}

impl PairSet {
    /// [`PairSet::load`], refusing a set that 10-fold verification cannot score
    /// ([`check_pair_labels`]): what `eval` and training runs read their sets with.
    pub fn load_scorable(path: &Path) -> Result<Self, BinError> {
        let set = Self::load(path)?;
        check_pair_labels(&set.issame).map_err(|e| BinError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(set)
    }

    /// Read an insightface `.bin`; faces whose short side is not 112 are resized.
    pub fn load(path: &Path) -> Result<Self, BinError> {
        let fail = |reason: String| BinError {
            path: path.to_path_buf(),
            reason,
        };
        let data = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let value = pickle::load(&data).map_err(|e| fail(format!("not a readable pickle: {e}")))?;
        let pickle::Value::Tuple(parts) = value else {
            return Err(fail("expected a pickled (bins, issame_list) tuple".into()));
        };
        let [bins, issame] = parts.as_slice() else {
            return Err(fail(format!(
                "expected a 2-tuple (bins, issame_list), got {} items",
                parts.len()
            )));
        };
        let pickle::Value::List(bins) = bins else {
            return Err(fail("bins is not a list".into()));
        };
        let issame =
            as_bools(issame).ok_or_else(|| fail("issame_list is not a list of bools".into()))?;
        if bins.len() % 2 != 0 {
            return Err(fail(format!(
                "{} images: pairs need an even count",
                bins.len()
            )));
        }
        if bins.len() != 2 * issame.len() {
            return Err(fail(format!(
                "{} images for {} pairs",
                bins.len(),
                issame.len()
            )));
        }
        let faces = bins
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let bytes = as_bytes(v)
                    .ok_or_else(|| fail(format!("element {i} of bins is not image bytes")))?;
                decode_face(&bytes, &format!("{} image {i}", path.display()), true)
                    .map_err(|e| fail(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("set")
            .to_string();
        Ok(Self {
            name,
            faces,
            issame,
        })
    }
}

/// Embeddings of a set plus insightface's XNorm (mean L2 norm of raw embeddings, both flips).
#[derive(Clone, Debug)]
pub struct Embedded {
    /// Flip-summed (or plain) embeddings as the network gives them.
    pub raw: Vec<Vec<f32>>,
    /// The same, L2-normalised.
    pub normalized: Vec<Vec<f32>>,
    pub xnorm: f64,
}

/// Embed faces in eval mode, `batch` at a time; with `flip`, embedding(x) + embedding(flip x).
pub fn embed<M: FaceEmbedder + ?Sized>(
    model: &M,
    faces: &[FaceImage],
    batch: usize,
    flip: bool,
    device: &Device,
) -> Embedded {
    let plane = 3 * FACE_SIZE * FACE_SIZE;
    let mut sums: Vec<Vec<f32>> = Vec::with_capacity(faces.len());
    let (mut norm_total, mut norm_count) = (0f64, 0usize);
    for chunk in faces.chunks(batch.max(1)) {
        let mut acc: Option<Vec<f32>> = None;
        for flipped in [false, true].into_iter().take(if flip { 2 } else { 1 }) {
            let mut input = vec![0f32; chunk.len() * plane];
            for (face, out) in chunk.iter().zip(input.chunks_mut(plane)) {
                normalize_into(face, flipped, out);
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(input, [chunk.len(), 3, FACE_SIZE, FACE_SIZE]),
                device,
            );
            let y = model
                .embed_faces(x)
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 embeddings");
            let dim = y.len() / chunk.len();
            for row in y.chunks(dim) {
                norm_total += row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                norm_count += 1;
            }
            acc = Some(match acc {
                None => y,
                Some(a) => a.iter().zip(&y).map(|(p, q)| p + q).collect(),
            });
        }
        let acc = acc.expect("at least one pass");
        let dim = acc.len() / chunk.len();
        sums.extend(acc.chunks(dim).map(<[f32]>::to_vec));
    }
    let normalized = sums
        .iter()
        .map(|row| {
            let n = row
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            row.iter().map(|v| (*v as f64 / n) as f32).collect()
        })
        .collect();
    Embedded {
        raw: sums,
        normalized,
        xnorm: norm_total / norm_count.max(1) as f64,
    }
}

/// Write `[N, D]` float32 rows as a NumPy `.npy` file (format 1.0), atomically.
pub fn write_npy(path: &Path, rows: &[Vec<f32>]) -> std::io::Result<()> {
    let dim = rows.first().map_or(0, Vec::len);
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}",
        rows.len()
    );
    // magic (6) + version (2) + header length (2) + header, padded with spaces, ends in '\n',
    // total a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + rows.len() * dim * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for row in rows {
        assert_eq!(row.len(), dim, "every row has the same width");
        for v in row {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let tmp = path.with_extension("npy.tmp");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, path)
}

/// One row of an evaluation table.
#[derive(Clone, Debug, Serialize)]
pub struct SetScore {
    pub name: String,
    pub pairs: usize,
    pub xnorm: f64,
    #[serde(flatten)]
    pub scores: Verification,
    /// `(FAR, TAR)` at FAR 1e-4, 1e-3, 1e-2 and 1e-1, over all pairs.
    pub tar_at_far: Vec<(f64, f64)>,
    /// The whole ROC, for plots.
    #[serde(skip)]
    pub roc: RocPoints,
}

/// FARs whose TAR every report lists.
pub const REPORT_FARS: [f64; 4] = [1e-4, 1e-3, 1e-2, 1e-1];

/// Pairs verification can score: at least one per fold of the 10-fold protocol, and both
/// genuine and impostor pairs (a fold's threshold search and VAL/FAR need both); fewer would
/// report NaN or a meaningless 0.00.
pub fn check_pair_labels(issame: &[bool]) -> Result<(), UnscorablePairs> {
    let (pairs, genuine) = (issame.len(), issame.iter().filter(|&&s| s).count());
    if pairs < VERIFICATION_FOLDS {
        return Err(UnscorablePairs::TooFew { pairs });
    }
    if genuine == 0 || genuine == pairs {
        return Err(UnscorablePairs::OneKind { pairs, genuine });
    }
    Ok(())
}

/// Pair labels 10-fold verification cannot score.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnscorablePairs {
    #[error("{pairs} pairs: 10-fold verification needs at least {VERIFICATION_FOLDS}")]
    TooFew { pairs: usize },
    #[error(
        "{pairs} pairs, {genuine} of them genuine: verification needs genuine and impostor pairs"
    )]
    OneKind { pairs: usize, genuine: usize },
}

/// Why embeddings made elsewhere cannot be scored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScoreError {
    #[error("{rows} embeddings for {pairs} pairs: expected {} rows (pairs are consecutive rows)", 2 * pairs)]
    RowCount { rows: usize, pairs: usize },
    #[error(transparent)]
    Pairs(#[from] UnscorablePairs),
}

/// Folds of the verification protocol (insightface's `verification.py`).
pub const VERIFICATION_FOLDS: usize = 10;

/// Score embeddings made anywhere: rows are L2-normalised (XNorm is the mean row norm before),
/// pairs are consecutive rows.
pub fn score_embeddings(
    name: &str,
    rows: &[Vec<f32>],
    issame: &[bool],
) -> Result<SetScore, ScoreError> {
    if rows.len() != 2 * issame.len() {
        return Err(ScoreError::RowCount {
            rows: rows.len(),
            pairs: issame.len(),
        });
    }
    check_pair_labels(issame)?;
    let norms: Vec<f64> = rows
        .iter()
        .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();
    let normalized: Vec<Vec<f32>> = rows
        .iter()
        .zip(&norms)
        .map(|(r, n)| {
            r.iter()
                .map(|v| (*v as f64 / n.max(1e-12)) as f32)
                .collect()
        })
        .collect();
    Ok(scores_of(
        name,
        &normalized,
        issame,
        norms.iter().sum::<f64>() / norms.len().max(1) as f64,
    ))
}

fn scores_of(name: &str, normalized: &[Vec<f32>], issame: &[bool], xnorm: f64) -> SetScore {
    let (roc, tar_at_far) = roc(normalized, issame, &REPORT_FARS);
    SetScore {
        name: name.to_string(),
        pairs: issame.len(),
        xnorm,
        scores: verify(normalized, issame, VERIFICATION_FOLDS),
        tar_at_far,
        roc,
    }
}

/// Embed (with flip TTA) and score one set with an eval-mode model.
pub fn evaluate<M: FaceEmbedder + ?Sized>(
    model: &M,
    set: &PairSet,
    batch: usize,
    device: &Device,
) -> SetScore {
    let embedded = embed(model, &set.faces, batch, true, device);
    scores_of(&set.name, &embedded.normalized, &set.issame, embedded.xnorm)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod ijb_tests;

#[cfg(test)]
mod ident_tests;
