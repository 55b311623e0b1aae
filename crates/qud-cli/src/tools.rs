//! The data commands: `qud pack` (image folder -> RecordIO), `qud synth` (synthetic faces and
//! verification pairs), and reading the faces `qud embed` takes.

use anyhow::{bail, Context, Result};
use qud_data::{
    decode_face, encode_face, pack_records, read_file, synthetic_pairs, FaceDataset, FaceImage,
    ImageEncoding, ImageFolder, SyntheticFaces,
};
use std::path::Path;

/// Write `bytes` to `path` through a temporary file in the same folder, so a crash leaves either
/// the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| dir.display().to_string())?;
    std::io::Write::write_all(&mut tmp, bytes).with_context(|| path.display().to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| path.display().to_string())?;
    }
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| path.display().to_string())?;
    Ok(())
}

/// `qud pack`: an image folder (identity sub-folders or flat) to `prefix.rec` + `prefix.idx`.
/// JPEG and PNG files are stored as they are after checking that they decode to 112x112; with
/// `resize` other sizes are resized and re-encoded as JPEG at `quality`.
pub fn pack(folder: &Path, prefix: &Path, resize: bool, quality: u8) -> Result<()> {
    let set = ImageFolder::open(folder, resize)?;
    if set.skipped() > 0 {
        tracing::warn!(
            "{}: {} entries are not images and were skipped",
            folder.display(),
            set.skipped()
        );
    }
    let count = pack_records(prefix, set.len(), set.num_identities(), |i| {
        let path = set.path(i).expect("index within the folder");
        let bytes = read_file(path)?;
        let origin = path.display().to_string();
        let stored = match decode_face(&bytes, &origin, false) {
            Ok(_) => bytes,
            Err(e @ qud_data::DataError::Size { .. }) if resize => {
                tracing::debug!("{e}; resized");
                encode_face(
                    &decode_face(&bytes, &origin, true)?,
                    ImageEncoding::Jpeg(quality),
                )
            }
            Err(e) => return Err(e),
        };
        Ok((stored, set.get(i)?.label))
    })?;
    println!(
        "{count} images{} -> {} + .idx",
        set.num_identities()
            .map_or(String::new(), |n| format!(" of {n} identities")),
        prefix.with_extension("rec").display()
    );
    Ok(())
}

/// `qud synth`: `identities x images` synthetic faces as a folder (`out/<identity>/<n>.jpg`) or,
/// when `out` ends in `.rec`, a RecordIO set; optionally a verification `.bin` of held-out
/// identities (a different seed).
pub fn synth(
    out: &Path,
    identities: usize,
    images: usize,
    seed: u64,
    quality: u8,
    pairs: Option<(&Path, usize)>,
) -> Result<()> {
    let faces = SyntheticFaces::new(identities, images, seed);
    let encoding = ImageEncoding::Jpeg(quality);
    if out.extension().is_some_and(|e| e == "rec") {
        pack_records(out, faces.len(), Some(identities), |i| {
            let sample = faces.get(i)?;
            Ok((encode_face(&sample.image, encoding), sample.label))
        })?;
    } else {
        if out.exists() && std::fs::read_dir(out)?.next().is_some() {
            bail!(
                "{}: exists and is not empty; choose a new folder",
                out.display()
            );
        }
        let width = identities.to_string().len();
        for identity in 0..identities {
            let dir = out.join(format!("{identity:0width$}"));
            std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
            for image in 0..images {
                let bytes = encode_face(&faces.render(identity, image), encoding);
                write_atomic(&dir.join(format!("{image}.jpg")), &bytes)?;
            }
        }
    }
    println!(
        "{} faces of {identities} identities -> {}",
        faces.len(),
        out.display()
    );
    if let Some((path, pair_identities)) = pairs {
        // A seed disjoint from the training faces' so the pairs are held-out identities.
        let (images, issame) =
            synthetic_pairs(pair_identities, seed ^ 0x5EED_0F9A_1E00, ImageEncoding::Png);
        write_atomic(path, &qud_eval::pickle::dump_bin(&images, &issame))?;
        println!("{} verification pairs -> {}", issame.len(), path.display());
    }
    Ok(())
}

/// The faces of an image folder, a RecordIO `.rec` or a verification `.bin`, in input order.
pub fn faces_of(input: &Path, resize: bool) -> Result<Vec<FaceImage>> {
    if input.extension().is_some_and(|e| e == "bin") && !input.is_dir() {
        return Ok(qud_eval::PairSet::load(input)?.faces);
    }
    let dataset = qud_data::open(input, qud_data::SourceFormat::Auto, resize)?;
    tracing::info!("{}", dataset.describe());
    Ok((0..dataset.len())
        .map(|i| dataset.get(i).map(|s| s.image))
        .collect::<Result<Vec<_>, _>>()?)
}
