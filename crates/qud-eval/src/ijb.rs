//! IJB-B and IJB-C 1:1 template verification as insightface's `recognition/_evaluation_/ijb/
//! ijb_11.py` computes it: 5-landmark similarity alignment, flip-summed unnormalised features
//! times the detector score, media-averaged and summed template features, dot-product scores, and
//! TAR at FAR read off scikit-learn's `roc_curve(drop_intermediate=True)` as the script does
//! (flipped, then the nearest point: [`tar_at_far`]).
//!
//! Reference: <https://github.com/deepinsight/insightface/tree/master/recognition/_evaluation_/ijb>.
//! Floating-point order follows NumPy where it decides bits: per-image features, media means
//! and template sums in float32 (NumPy keeps float32 arrays in float32), template normalisation
//! and scores in float64, scores summed in NumPy's pairwise order.

use crate::metrics::numpy_sum;
use qud_data::FaceImage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// insightface's ArcFace landmark template for 112x112 faces: eyes, nose tip, mouth corners.
pub const ARCFACE_TEMPLATE: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// FARs whose TAR is reported, as insightface's table.
pub const IJB_FARS: [f64; 6] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1];

/// Why an IJB set could not be read; names the file and line.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct IjbError {
    pub path: PathBuf,
    pub reason: String,
}

/// `[[a, -b, tx], [b, a, ty]]`: the least-squares similarity transform (rotation, uniform scale,
/// translation) taking `src` onto `dst`. The closed form of Umeyama's estimate for 2-D points
/// without reflection, equal to scikit-image's `SimilarityTransform.estimate`.
pub fn similarity_transform(src: &[[f64; 2]], dst: &[[f64; 2]]) -> [[f64; 3]; 2] {
    assert_eq!(src.len(), dst.len(), "as many source as target points");
    let n = src.len() as f64;
    let mean = |p: &[[f64; 2]]| {
        let (x, y) = p.iter().fold((0.0, 0.0), |(x, y), q| (x + q[0], y + q[1]));
        [x / n, y / n]
    };
    let (ms, md) = (mean(src), mean(dst));
    let (mut dot, mut cross, mut var) = (0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (sx, sy) = (s[0] - ms[0], s[1] - ms[1]);
        let (dx, dy) = (d[0] - md[0], d[1] - md[1]);
        dot += sx * dx + sy * dy;
        cross += sx * dy - sy * dx;
        var += sx * sx + sy * sy;
    }
    let (a, b) = (dot / var, cross / var);
    let tx = md[0] - (a * ms[0] - b * ms[1]);
    let ty = md[1] - (b * ms[0] + a * ms[1]);
    [[a, -b, tx], [b, a, ty]]
}

/// An RGB image of any size (row major, 3 bytes a pixel).
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// The 112x112 face `matrix` (source -> aligned coordinates) maps out of `image`, as OpenCV's
/// `warpAffine(image, matrix, (112, 112), borderValue=0)`: bilinear, outside pixels black.
pub fn warp_face(image: &RgbImage, matrix: &[[f64; 3]; 2]) -> FaceImage {
    const SIDE: usize = 112;
    let [[a, b, tx], [c, d, ty]] = *matrix;
    let det = a * d - b * c;
    // Inverse: aligned (u, v) -> source (x, y).
    let (ia, ib, ic, id) = (d / det, -b / det, -c / det, a / det);
    let mut out = vec![0u8; SIDE * SIDE * 3];
    let at = |x: isize, y: isize, ch: usize| -> f64 {
        if x < 0 || y < 0 || x as usize >= image.width || y as usize >= image.height {
            0.0
        } else {
            f64::from(image.pixels[(y as usize * image.width + x as usize) * 3 + ch])
        }
    };
    for v in 0..SIDE {
        for u in 0..SIDE {
            let (du, dv) = (u as f64 - tx, v as f64 - ty);
            let x = ia * du + ib * dv;
            let y = ic * du + id * dv;
            let (x0, y0) = (x.floor(), y.floor());
            let (fx, fy) = (x - x0, y - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            for ch in 0..3 {
                let top = at(x0, y0, ch) * (1.0 - fx) + at(x0 + 1, y0, ch) * fx;
                let bottom = at(x0, y0 + 1, ch) * (1.0 - fx) + at(x0 + 1, y0 + 1, ch) * fx;
                let value = top * (1.0 - fy) + bottom * fy;
                out[(v * SIDE + u) * 3 + ch] = value.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    FaceImage::from_rgb(out)
}

/// The metadata of an IJB set: per image its file, template, media, 5 landmarks and detector
/// score; the template pairs and their labels.
#[derive(Clone, Debug, Default)]
pub struct IjbMeta {
    pub images: Vec<String>,
    pub templates: Vec<i64>,
    pub medias: Vec<i64>,
    pub landmarks: Vec<[[f64; 2]; 5]>,
    pub detector_scores: Vec<f32>,
    pub pairs: Vec<(i64, i64)>,
    pub labels: Vec<bool>,
}

impl IjbMeta {
    /// Read `meta/<set>_face_tid_mid.txt`, `meta/<set>_name_5pts_score.txt` and
    /// `meta/<set>_template_pair_label.txt` under `root` (`set` is `ijbb` or `ijbc`).
    pub fn load(root: &Path, set: &str) -> Result<Self, IjbError> {
        let meta = root.join("meta");
        let read = |name: String| -> Result<(PathBuf, String), IjbError> {
            let path = meta.join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| IjbError {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Ok((path, text))
        };
        let fields = |path: &Path, line: usize, text: &str, want: usize| {
            let parts: Vec<String> = text.split_whitespace().map(str::to_string).collect();
            if parts.len() == want {
                Ok(parts)
            } else {
                Err(IjbError {
                    path: path.to_path_buf(),
                    reason: format!(
                        "line {line}: {} fields, expected {want}: `{text}`",
                        parts.len()
                    ),
                })
            }
        };
        let number = |path: &Path, line: usize, field: &str| -> Result<f64, IjbError> {
            field
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| IjbError {
                    path: path.to_path_buf(),
                    reason: format!("line {line}: `{field}` is not a finite number"),
                })
        };
        let int = |path: &Path, line: usize, field: &str| -> Result<i64, IjbError> {
            field.parse::<i64>().map_err(|_| IjbError {
                path: path.to_path_buf(),
                reason: format!("line {line}: `{field}` is not an integer"),
            })
        };

        let mut out = IjbMeta::default();
        let (path, text) = read(format!("{set}_name_5pts_score.txt"))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let f = fields(&path, i + 1, line, 12)?;
            let mut lmk = [[0.0; 2]; 5];
            for (k, point) in lmk.iter_mut().enumerate() {
                *point = [
                    number(&path, i + 1, &f[1 + 2 * k])?,
                    number(&path, i + 1, &f[2 + 2 * k])?,
                ];
            }
            out.images.push(f[0].clone());
            out.landmarks.push(lmk);
            out.detector_scores
                .push(number(&path, i + 1, &f[11])? as f32);
        }
        let (path, text) = read(format!("{set}_face_tid_mid.txt"))?;
        let mut rows = 0;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let f = fields(&path, i + 1, line, 3)?;
            if out.images.get(rows) != Some(&f[0]) {
                return Err(IjbError {
                    path: path.clone(),
                    reason: format!(
                        "line {}: image `{}` where the landmark file's row {} has `{}`",
                        i + 1,
                        f[0],
                        rows + 1,
                        out.images.get(rows).map_or("(nothing)", String::as_str)
                    ),
                });
            }
            out.templates.push(int(&path, i + 1, &f[1])?);
            out.medias.push(int(&path, i + 1, &f[2])?);
            rows += 1;
        }
        if rows != out.images.len() {
            return Err(IjbError {
                path,
                reason: format!(
                    "{rows} rows, but the landmark file has {}",
                    out.images.len()
                ),
            });
        }
        let (path, text) = read(format!("{set}_template_pair_label.txt"))?;
        let known: std::collections::HashSet<i64> = out.templates.iter().copied().collect();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let f = fields(&path, i + 1, line, 3)?;
            let (t1, t2) = (int(&path, i + 1, &f[0])?, int(&path, i + 1, &f[1])?);
            for t in [t1, t2] {
                if !known.contains(&t) {
                    return Err(IjbError {
                        path: path.clone(),
                        reason: format!("line {}: template {t} has no image", i + 1),
                    });
                }
            }
            out.pairs.push((t1, t2));
            out.labels.push(int(&path, i + 1, &f[2])? != 0);
        }
        // TAR at FAR needs both kinds of pair; without one, every number would be 0 or NaN.
        let genuine = out.labels.iter().filter(|&&g| g).count();
        if genuine == 0 || genuine == out.labels.len() {
            return Err(IjbError {
                path,
                reason: format!(
                    "{} template pairs, {genuine} of them genuine: a ROC needs genuine and \
                     impostor pairs",
                    out.labels.len()
                ),
            });
        }
        Ok(out)
    }
}

/// Per-image features as insightface feeds them to pooling: `embeddings` are already flip-summed
/// (or plain); unless `norm_score`, each is L2-normalised; with `detector_score`, each is scaled by
/// its face's detector score. Float32, as NumPy computes it.
pub fn image_features(
    embeddings: &[Vec<f32>],
    detector_scores: &[f32],
    norm_score: bool,
    detector_score: bool,
) -> Vec<Vec<f32>> {
    embeddings
        .iter()
        .zip(detector_scores)
        .map(|(row, &score)| {
            let mut row = row.clone();
            if !norm_score {
                let squares: Vec<f32> = row.iter().map(|v| v * v).collect();
                let norm = numpy_sum(&squares).sqrt();
                row.iter_mut().for_each(|v| *v /= norm);
            }
            if detector_score {
                row.iter_mut().for_each(|v| *v *= score);
            }
            row
        })
        .collect()
}

/// L2-normalised template features, one row per template, templates in ascending id order (as
/// `np.unique` gives them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TemplateFeatures {
    /// Template ids, ascending.
    pub ids: Vec<i64>,
    /// Row length.
    pub dim: usize,
    /// `ids.len() x dim` features, row-major, float64 as insightface's.
    pub rows: Vec<f64>,
}

impl TemplateFeatures {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The `i`-th template's row (in id order).
    pub fn row(&self, i: usize) -> &[f64] {
        &self.rows[i * self.dim..(i + 1) * self.dim]
    }

    /// The row of template `id`, if it has one.
    pub fn get(&self, id: i64) -> Option<&[f64]> {
        self.ids.binary_search(&id).ok().map(|i| self.row(i))
    }
}

/// Template features: per template its images grouped by media (ascending); a media's feature is
/// the mean of its images (float32, rows added in image order), the template's the sum over
/// medias (float32), normalised in float64.
pub fn template_features(
    features: &[Vec<f32>],
    templates: &[i64],
    medias: &[i64],
) -> TemplateFeatures {
    let mut groups: BTreeMap<i64, BTreeMap<i64, Vec<usize>>> = BTreeMap::new();
    for (i, (&t, &m)) in templates.iter().zip(medias).enumerate() {
        groups.entry(t).or_default().entry(m).or_default().push(i);
    }
    let dim = features.first().map_or(0, Vec::len);
    let mut out = TemplateFeatures {
        ids: Vec::with_capacity(groups.len()),
        dim,
        rows: Vec::with_capacity(groups.len() * dim),
    };
    for (template, by_media) in groups {
        let mut sum: Option<Vec<f32>> = None;
        for images in by_media.values() {
            let mut media = features[images[0]].clone();
            for &i in &images[1..] {
                media
                    .iter_mut()
                    .zip(&features[i])
                    .for_each(|(a, b)| *a += b);
            }
            if images.len() > 1 {
                let count = images.len() as f32;
                media.iter_mut().for_each(|v| *v /= count);
            }
            sum = Some(match sum {
                None => media,
                Some(mut s) => {
                    s.iter_mut().zip(&media).for_each(|(a, b)| *a += b);
                    s
                }
            });
        }
        let sum: Vec<f64> = sum
            .unwrap_or_else(|| vec![0.0; dim])
            .into_iter()
            .map(f64::from)
            .collect();
        let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        let norm = if norm == 0.0 { 1.0 } else { norm };
        out.ids.push(template);
        out.rows.extend(sum.into_iter().map(|v| v / norm));
    }
    out
}

/// `np.sum(a * b)` for float64 rows: each product rounded, then summed in NumPy's pairwise order
/// (see `numpy_sum`), without materialising the products.
pub(crate) fn numpy_dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 8 {
        return (0..n).fold(0.0, |acc, i| acc + a[i] * b[i]);
    }
    if n <= 128 {
        let mut r = [0f64; 8];
        for (j, acc) in r.iter_mut().enumerate() {
            *acc = a[j] * b[j];
        }
        let blocks = n - n % 8;
        for (x, y) in a[8..blocks]
            .chunks_exact(8)
            .zip(b[8..blocks].chunks_exact(8))
        {
            for j in 0..8 {
                r[j] += x[j] * y[j];
            }
        }
        let mut sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for i in blocks..n {
            sum += a[i] * b[i];
        }
        return sum;
    }
    let half = n / 2;
    let half = half - half % 8;
    numpy_dot(&a[..half], &b[..half]) + numpy_dot(&a[half..n], &b[half..n])
}

/// Template rows per tile of [`pair_scores`]: two tiles (about 2 MiB at 512-d) stay in a core's L2
/// while every pair between them is scored.
const TILE_BYTES: usize = 1 << 22;

/// Dot-product score of every template pair (`np.sum(feat1 * feat2, -1)` bit for bit), over
/// `threads` threads.
///
/// Pairs are bucketed by the tiles of their two templates, so each template row is read from
/// memory once per bucket instead of once per pair: IJB-C's 23k templates take 95 MB at float64,
/// and 15.7M pairs in file order would read 128 GB.
///
/// Panics if a pair names a template without features (`IjbMeta::load` refuses such files).
pub fn pair_scores(templates: &TemplateFeatures, pairs: &[(i64, i64)], threads: usize) -> Vec<f64> {
    let tile = (TILE_BYTES / (templates.dim.max(1) * 8)).max(1);
    tiled_pair_scores(templates, pairs, threads, tile)
}

fn tiled_pair_scores(
    templates: &TemplateFeatures,
    pairs: &[(i64, i64)],
    threads: usize,
    tile: usize,
) -> Vec<f64> {
    use rayon::prelude::*;
    /// A pair by its two template rows and its place in the pair list.
    #[derive(Clone, Copy, Default)]
    struct Pair {
        first: u32,
        second: u32,
        index: u32,
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .expect("cannot start the IJB scoring threads");
    pool.install(|| {
        let row_of = RowLookup::new(&templates.ids);
        let tiles = templates.len().div_ceil(tile).max(1);
        let bucket = |p: &Pair| p.first as usize / tile * tiles + p.second as usize / tile;
        let indexed: Vec<Pair> = pairs
            .par_iter()
            .enumerate()
            .map(|(k, &(t1, t2))| Pair {
                first: row_of.get(t1),
                second: row_of.get(t2),
                index: k as u32,
            })
            .collect();
        // Counting sort by bucket; the pairs move with their rows, so scoring reads them in order.
        let mut ends = vec![0usize; tiles * tiles];
        for p in &indexed {
            ends[bucket(p)] += 1;
        }
        let mut total = 0;
        for end in &mut ends {
            total += *end;
            *end = total;
        }
        let mut by_bucket = vec![Pair::default(); indexed.len()];
        let mut next: Vec<usize> = std::iter::once(0).chain(ends.iter().copied()).collect();
        for p in &indexed {
            let slot = &mut next[bucket(p)];
            by_bucket[*slot] = *p;
            *slot += 1;
        }
        drop(indexed);
        let mut sorted = vec![0f64; by_bucket.len()];
        let mut buckets = Vec::with_capacity(ends.len());
        let (mut pairs_rest, mut scores_rest) = (by_bucket.as_mut_slice(), sorted.as_mut_slice());
        let mut start = 0;
        for &end in &ends {
            let (p, p_rest) = std::mem::take(&mut pairs_rest).split_at_mut(end - start);
            let (s, s_rest) = std::mem::take(&mut scores_rest).split_at_mut(end - start);
            (pairs_rest, scores_rest, start) = (p_rest, s_rest, end);
            if !p.is_empty() {
                buckets.push((p, s));
            }
        }
        buckets.into_par_iter().for_each(|(bucket_pairs, out)| {
            // Pairs sharing their first template follow each other, so that row stays in L1
            // and only the second is fetched.
            bucket_pairs.sort_unstable_by_key(|p| p.first);
            for (p, score) in bucket_pairs.iter().zip(out) {
                let (a, b) = (p.first as usize, p.second as usize);
                *score = numpy_dot(templates.row(a), templates.row(b));
            }
        });
        let mut scores = vec![0f64; by_bucket.len()];
        for (p, &score) in by_bucket.iter().zip(&sorted) {
            scores[p.index as usize] = score;
        }
        scores
    })
}

/// Template id to row: a table when the ids are dense enough, else a binary search.
enum RowLookup<'a> {
    Table { min: i64, rows: Vec<u32> },
    Search(&'a [i64]),
}

impl<'a> RowLookup<'a> {
    fn new(ids: &'a [i64]) -> Self {
        let (Some(&min), Some(&max)) = (ids.first(), ids.last()) else {
            return RowLookup::Search(ids);
        };
        let span = max.abs_diff(min) as usize + 1;
        if span > (16 * ids.len()).max(1 << 20) {
            return RowLookup::Search(ids);
        }
        let mut rows = vec![u32::MAX; span];
        for (row, &id) in ids.iter().enumerate() {
            rows[(id - min) as usize] = row as u32;
        }
        RowLookup::Table { min, rows }
    }

    fn get(&self, id: i64) -> u32 {
        let found = match self {
            RowLookup::Table { min, rows } => id
                .checked_sub(*min)
                .and_then(|i| rows.get(usize::try_from(i).ok()?))
                .copied()
                .filter(|&r| r != u32::MAX),
            RowLookup::Search(ids) => ids.binary_search(&id).ok().map(|r| r as u32),
        };
        found.unwrap_or_else(|| panic!("template {id} of a pair has no features"))
    }
}

/// A key whose ascending unsigned order is `f64::total_cmp`'s descending order.
fn descending_key(score: f64) -> u64 {
    let bits = score.to_bits() as i64;
    let ascending = bits ^ (((bits >> 63) as u64) >> 1) as i64;
    !((ascending as u64) ^ (1 << 63))
}

fn score_of_key(key: u64) -> f64 {
    let ascending = ((!key) ^ (1 << 63)) as i64;
    f64::from_bits((ascending ^ (((ascending >> 63) as u64) >> 1) as i64) as u64)
}

/// scikit-learn's `roc_curve(labels, scores, drop_intermediate=True)`: `(fpr, tpr, thresholds)`,
/// starting at `(0, 0, +inf)`. Sorts on rayon's current pool.
pub fn roc_curve(labels: &[bool], scores: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use rayon::prelude::*;
    // Scores descending with their labels in the low bit; the order within a tie does not matter,
    // as only the last of equal scores makes a point.
    let mut keyed: Vec<u128> = scores
        .par_iter()
        .zip(labels)
        .map(|(&s, &genuine)| (u128::from(descending_key(s)) << 1) | u128::from(genuine))
        .collect();
    keyed.par_sort_unstable();
    let (mut tps, mut fps, mut thresholds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tp, mut fp) = (0u64, 0u64);
    for (k, &entry) in keyed.iter().enumerate() {
        if entry & 1 == 1 {
            tp += 1;
        } else {
            fp += 1;
        }
        let score = score_of_key((entry >> 1) as u64);
        let last_of_value = keyed
            .get(k + 1)
            .is_none_or(|&next| score_of_key((next >> 1) as u64) != score);
        if last_of_value {
            tps.push(tp as f64);
            fps.push(fp as f64);
            thresholds.push(score);
        }
    }
    drop(keyed);
    if fps.len() > 2 {
        let n = fps.len();
        let keep: Vec<usize> = (0..n)
            .filter(|&i| {
                i == 0
                    || i == n - 1
                    || fps[i + 1] - 2.0 * fps[i] + fps[i - 1] != 0.0
                    || tps[i + 1] - 2.0 * tps[i] + tps[i - 1] != 0.0
            })
            .collect();
        fps = keep.iter().map(|&i| fps[i]).collect();
        tps = keep.iter().map(|&i| tps[i]).collect();
        thresholds = keep.iter().map(|&i| thresholds[i]).collect();
    }
    fps.insert(0, 0.0);
    tps.insert(0, 0.0);
    thresholds.insert(0, f64::INFINITY);
    let (fp_all, tp_all) = (*fps.last().unwrap_or(&0.0), *tps.last().unwrap_or(&0.0));
    let fpr = fps.iter().map(|f| f / fp_all).collect();
    let tpr = tps.iter().map(|t| t / tp_all).collect();
    (fpr, tpr, thresholds)
}

/// TAR at each FAR of `fars` as every insightface IJB script reads it: the ROC flipped
/// (`fpr = np.flipud(fpr)`, "select largest tpr at same fpr"), then the point nearest to the
/// FAR, the first of equally near ones in the flipped order. In ROC order that is the *last* of
/// the nearest points, the one with the largest TPR: scikit-learn's `roc_curve` keeps both ends
/// of every vertical stretch, so the nearest FPR is usually shared by two points, and the lower
/// one would understate the TAR (the TAR at FAR 1e-6 of a set too small to reach it would read 0).
pub fn tar_at_far(fpr: &[f64], tpr: &[f64], fars: &[f64]) -> Vec<f64> {
    fars.iter()
        .map(|&far| {
            let mut best = None;
            for (i, f) in fpr.iter().enumerate() {
                let d = (f - far).abs();
                // `<=`: a later point equally near replaces the earlier one.
                if best.is_none_or(|(_, d_best)| d <= d_best) {
                    best = Some((i, d));
                }
            }
            best.map_or(f64::NAN, |(i, _)| tpr[i])
        })
        .collect()
}

/// Decode one loose crop (JPEG or PNG, any size) to RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage, IjbError> {
    let fail = |reason: String| IjbError {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let rgb = image::load_from_memory(&bytes)
        .map_err(|e| fail(format!("cannot decode image: {e}")))?
        .to_rgb8();
    Ok(RgbImage {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        pixels: rgb.into_raw(),
    })
}

/// Per-image embeddings of an IJB set: each `loose_crop/<image>` under `root` aligned to the
/// ArcFace template by its landmarks, then embedded (`flip`: f(x) + f(flipped x), unnormalised).
/// Images are decoded and aligned by `threads` threads, `batch` at a time, so memory stays at one
/// batch of faces whatever the set's size; progress is logged.
pub fn embed_ijb<M: crate::FaceEmbedder + ?Sized>(
    model: &M,
    root: &Path,
    meta: &IjbMeta,
    batch: usize,
    flip: bool,
    threads: usize,
    device: &burn::tensor::Device,
) -> Result<Vec<Vec<f32>>, IjbError> {
    let crops = root.join("loose_crop");
    let n = meta.images.len();
    let mut out = Vec::with_capacity(n);
    let start = std::time::Instant::now();
    let mut last_log = start;
    let chunk = (batch.max(1) * 8).max(threads);
    for first in (0..n).step_by(chunk) {
        let indices: Vec<usize> = (first..(first + chunk).min(n)).collect();
        let per_thread = indices.len().div_ceil(threads.max(1)).max(1);
        let faces: Vec<Result<Vec<FaceImage>, IjbError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = indices
                .chunks(per_thread)
                .map(|part| {
                    scope.spawn(|| {
                        part.iter()
                            .map(|&i| {
                                let image = load_rgb(&crops.join(&meta.images[i]))?;
                                let m = similarity_transform(&meta.landmarks[i], &ARCFACE_TEMPLATE);
                                Ok(warp_face(&image, &m))
                            })
                            .collect()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("IJB decoding worker panicked"))
                .collect()
        });
        let faces: Vec<FaceImage> = faces
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        out.extend(crate::embed(model, &faces, batch, flip, device).raw);
        if last_log.elapsed().as_secs_f64() > 10.0 || out.len() == n {
            last_log = std::time::Instant::now();
            let rate = out.len() as f64 / start.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                "IJB embeddings: {}/{n} ({rate:.1} images/s, {:.0} s left)",
                out.len(),
                (n - out.len()) as f64 / rate.max(1e-9)
            );
        }
    }
    Ok(out)
}

/// The result of one IJB evaluation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct IjbScore {
    pub set: String,
    pub templates: usize,
    pub pairs: usize,
    /// `(FAR, TAR)` for [`IJB_FARS`].
    pub tar_at_far: Vec<(f64, f64)>,
    #[serde(skip)]
    pub roc: crate::RocPoints,
}

/// Pool, score and read off the ROC: everything after the per-image embeddings.
pub fn score_ijb(
    set: &str,
    meta: &IjbMeta,
    embeddings: &[Vec<f32>],
    norm_score: bool,
    detector_score: bool,
    threads: usize,
) -> IjbScore {
    let features = image_features(
        embeddings,
        &meta.detector_scores,
        norm_score,
        detector_score,
    );
    let templates = template_features(&features, &meta.templates, &meta.medias);
    let scores = pair_scores(&templates, &meta.pairs, threads);
    let (fpr, tpr, _) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .expect("cannot start the IJB scoring threads")
        .install(|| roc_curve(&meta.labels, &scores));
    let tars = tar_at_far(&fpr, &tpr, &IJB_FARS);
    IjbScore {
        set: set.to_string(),
        templates: templates.len(),
        pairs: meta.pairs.len(),
        tar_at_far: IJB_FARS.iter().copied().zip(tars).collect(),
        roc: fpr.into_iter().zip(tpr).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn numpy_dot_is_numpy_sum_of_the_products(
            pairs in proptest::collection::vec((-1e3f64..1e3, -1e3f64..1e3), 0..700)
        ) {
            let (a, b): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
            let products: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
            prop_assert_eq!(numpy_dot(&a, &b).to_bits(), numpy_sum(&products).to_bits());
        }

        #[test]
        fn descending_keys_sort_as_total_cmp_reversed(
            scores in proptest::collection::vec(
                prop_oneof![any::<f64>(), Just(0.0), Just(-0.0), Just(f64::INFINITY)],
                0..50,
            )
        ) {
            let mut by_cmp = scores.clone();
            by_cmp.sort_by(|a, b| b.total_cmp(a));
            let mut keys: Vec<u64> = scores.iter().map(|&s| descending_key(s)).collect();
            keys.sort_unstable();
            let by_key: Vec<u64> = keys.iter().map(|&k| score_of_key(k).to_bits()).collect();
            prop_assert_eq!(by_key, by_cmp.iter().map(|s| s.to_bits()).collect::<Vec<_>>());
        }

        #[test]
        fn tiled_scores_equal_the_pair_by_pair_scores(
            n in 1usize..20,
            dim in 1usize..40,
            tile in 1usize..7,
            threads in 1usize..4,
            // Dense ids are looked up in a table, sparse ones by binary search.
            spread in prop_oneof![Just(3i64), Just(1_000_000_007i64)],
            seed in any::<u64>(),
        ) {
            let mut state = seed;
            let mut next = move || {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            };
            let templates = TemplateFeatures {
                ids: (0..n as i64).map(|i| spread * i - 7).collect(),
                dim,
                rows: (0..n * dim).map(|_| next()).collect(),
            };
            let pairs: Vec<(i64, i64)> = (0..3 * n)
                .map(|_| {
                    let pick = |u: f64| templates.ids[((u + 0.5) * n as f64) as usize % n];
                    (pick(next()), pick(next()))
                })
                .collect();
            let scores = tiled_pair_scores(&templates, &pairs, threads, tile);
            for (&(t1, t2), score) in pairs.iter().zip(&scores) {
                let want = numpy_dot(templates.get(t1).unwrap(), templates.get(t2).unwrap());
                prop_assert_eq!(score.to_bits(), want.to_bits());
            }
        }
    }
}
