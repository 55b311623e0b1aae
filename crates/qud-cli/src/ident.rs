//! `qud eval-ident`: probes, gallery and distractors from image sets or `.npy` embeddings, scored
//! by `qud_eval::ident` (MegaFace's rank-1 and TAR at FAR).

use crate::tools::write_atomic;
use anyhow::{bail, Context, Result};
use burn::tensor::Device;
use qud_backbone::FaceEmbedder;
use qud_data::FaceDataset;
use qud_eval::ident::Embeddings;
use qud_eval::NpyRowReader;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A loaded network, its device and its name.
type Loaded = (Box<dyn FaceEmbedder>, Device, String);

/// Blocks of normalised distractor embeddings, row-major.
type Blocks<'e> = Box<dyn Iterator<Item = Result<Vec<f32>>> + 'e>;

/// The network that embeds image sets, loaded at first use: `.npy` inputs need none.
pub struct Embedder<'a> {
    load: Box<dyn Fn() -> Result<Loaded> + 'a>,
    loaded: Option<(Box<dyn FaceEmbedder>, Device)>,
    pub batch: usize,
    pub flip: bool,
    pub resize: bool,
}

impl<'a> Embedder<'a> {
    pub fn new(
        load: impl Fn() -> Result<Loaded> + 'a,
        batch: usize,
        flip: bool,
        resize: bool,
    ) -> Self {
        Self {
            load: Box::new(load),
            loaded: None,
            batch,
            flip,
            resize,
        }
    }

    /// Normalised embeddings of `set`'s samples `indices`, in that order.
    fn embed(&mut self, set: &dyn FaceDataset, indices: &[usize]) -> Result<Vec<f32>> {
        if self.loaded.is_none() {
            let (model, device, name) =
                (self.load)().context("an image set needs a model (--arch/--weights or --onnx)")?;
            tracing::info!("embedding with {name}");
            self.loaded = Some((model, device));
        }
        let (model, device) = self.loaded.as_ref().expect("loaded above");
        let faces = indices
            .par_iter()
            .map(|&i| set.get(i).map(|s| s.image))
            .collect::<Result<Vec<_>, _>>()?;
        let embedded = qud_eval::embed(&**model, &faces, self.batch, self.flip, device);
        Ok(embedded.normalized.concat())
    }
}

/// Names listed in `--exclude` files: one per line, `#` comments and blank lines ignored.
pub fn read_exclusions(files: &[PathBuf]) -> Result<HashSet<String>> {
    let mut names = HashSet::new();
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        names.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    Ok(names)
}

/// Whether `name` (`identity/file.jpg`, or a row index) is listed, by full name or file name.
fn excluded(list: &HashSet<String>, name: &str) -> bool {
    list.contains(name) || name.rsplit('/').next().is_some_and(|f| list.contains(f))
}

fn is_npy(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "npy") && path.is_file()
}

/// A probe or gallery set with one identity per face: `.npy` rows with a label file (one line
/// per row), or an image set whose identities are its folders, its `.rec` labels, or the label
/// file's lines in the set's order.
pub fn labelled_set(
    what: &str,
    path: &Path,
    labels: Option<&Path>,
    exclude: &HashSet<String>,
    embedder: &mut Embedder,
) -> Result<Embeddings> {
    let read_labels = |file: &Path, rows: usize| -> Result<Vec<String>> {
        let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        let labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
        if labels.len() != rows {
            bail!(
                "{}: {} identities for the {rows} faces of {}",
                file.display(),
                labels.len(),
                path.display()
            );
        }
        Ok(labels)
    };
    let (rows, dim, labels, names) = if is_npy(path) {
        let Some(labels) = labels else {
            bail!(
                "{what} {}: .npy embeddings need --{what}-labels",
                path.display()
            );
        };
        let rows = qud_eval::read_npy_rows(path)?;
        let labels = read_labels(labels, rows.len())?;
        let dim = rows.first().map_or(0, Vec::len);
        let names = (0..rows.len()).map(|i| i.to_string()).collect();
        (rows.concat(), dim, labels, names)
    } else {
        let set = qud_data::open(path, qud_data::SourceFormat::Auto, embedder.resize)?;
        tracing::info!("{what}: {}", set.describe());
        let names: Vec<String> = (0..set.len()).map(|i| set.sample_name(i)).collect();
        let labels = match labels {
            Some(file) => read_labels(file, set.len())?,
            None => names
                .iter()
                .enumerate()
                .map(|(i, name)| match name.split_once('/') {
                    Some((identity, _)) => Ok(identity.to_string()),
                    None => match set.get(i)?.label {
                        Some(label) => Ok(label.to_string()),
                        None => bail!(
                            "{what} {}: sample {name} has no identity (use identity folders, a \
                             labelled .rec or --{what}-labels)",
                            path.display()
                        ),
                    },
                })
                .collect::<Result<_>>()?,
        };
        let indices: Vec<usize> = (0..set.len()).collect();
        let rows = embedder.embed(&*set, &indices)?;
        let dim = rows.len() / set.len().max(1);
        (rows, dim, labels, names)
    };
    let keep: Vec<usize> = (0..names.len())
        .filter(|&i| !excluded(exclude, &names[i]))
        .collect();
    if keep.len() < names.len() {
        tracing::info!("{what}: {} faces excluded", names.len() - keep.len());
    }
    let rows = keep
        .iter()
        .flat_map(|&i| rows[i * dim..(i + 1) * dim].iter().copied())
        .collect();
    let labels = keep.iter().map(|&i| labels[i].clone()).collect();
    Ok(Embeddings::normalized(rows, dim, labels))
}

/// Distractor blocks of `block` faces and how many there are after exclusion.
pub fn distractor_blocks<'e>(
    path: &Path,
    block: usize,
    exclude: &'e HashSet<String>,
    embedder: &'e mut Embedder<'_>,
) -> Result<(usize, Blocks<'e>)> {
    if is_npy(path) {
        let mut reader = NpyRowReader::open(path)?;
        let (rows, dim) = (reader.rows, reader.dim);
        let dropped: HashSet<usize> = exclude
            .iter()
            .filter_map(|n| n.parse::<usize>().ok())
            .filter(|&i| i < rows)
            .collect();
        let count = rows - dropped.len();
        let mut start = 0usize;
        let blocks = std::iter::from_fn(move || {
            let block = reader.next_block(block)?;
            Some(block.map_err(anyhow::Error::from).map(|values| {
                let first = start;
                start += values.len() / dim;
                values
                    .chunks(dim)
                    .enumerate()
                    .filter(|(i, _)| !dropped.contains(&(first + i)))
                    .flat_map(|(_, row)| row.iter().copied())
                    .collect::<Vec<f32>>()
            }))
        });
        return Ok((count, Box::new(blocks)));
    }
    let set = qud_data::open(path, qud_data::SourceFormat::Auto, embedder.resize)?;
    tracing::info!("distractors: {}", set.describe());
    let kept: Vec<usize> = (0..set.len())
        .filter(|&i| !excluded(exclude, &set.sample_name(i)))
        .collect();
    let count = kept.len();
    let mut chunks = kept
        .chunks(block.max(1))
        .map(<[usize]>::to_vec)
        .collect::<Vec<_>>()
        .into_iter();
    let blocks = std::iter::from_fn(move || {
        let indices = chunks.next()?;
        Some(embedder.embed(&*set, &indices))
    });
    Ok((count, Box::new(blocks)))
}

/// Print the scores, and write them as JSON when asked.
pub fn report(score: &qud_eval::ident::IdentScore, json: Option<&Path>) -> Result<()> {
    println!(
        "{} probes ({} with a mate), {} distractors: {} trials, {} impostor pairs",
        score.probes,
        score.probes_with_mates,
        score.distractors,
        score.trials,
        score.impostor_pairs
    );
    println!("rank-1 identification: {:.2} %", 100.0 * score.rank1);
    for point in &score.tar_at_far {
        println!(
            "TAR at FAR {:.0e}: {:.2} % (threshold {:.4})",
            point.far,
            100.0 * point.tar,
            point.threshold
        );
    }
    println!(
        "scored in {:.2} s ({:.1} GFLOP/s for probes x distractors)",
        score.seconds, score.gflops
    );
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(score)?;
        write_atomic(path, text.as_bytes())?;
        println!("scores -> {}", path.display());
    }
    Ok(())
}
