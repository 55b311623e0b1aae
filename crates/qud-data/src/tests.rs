use crate::*;
use proptest::prelude::*;
use std::sync::Arc;

#[global_allocator]
static ALLOCATOR: alloc_probe::LargestAllocation = alloc_probe::LargestAllocation;

fn write_png(path: &std::path::Path, w: u32, h: u32, gray: bool) {
    if gray {
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([(x + y) as u8]))
            .save(path)
            .unwrap();
    } else {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
            .save(path)
            .unwrap();
    }
}

#[test]
fn synthetic_faces_are_deterministic_and_labelled() {
    let a = SyntheticFaces::new(4, 3, 11);
    let b = SyntheticFaces::new(4, 3, 11);
    assert_eq!(a.len(), 12);
    assert_eq!(a.num_identities(), Some(4));
    let s = a.get(7).unwrap();
    assert_eq!(s.label, Some(2));
    assert_eq!(s, b.get(7).unwrap());
    assert_ne!(
        a.get(6).unwrap().image,
        a.get(7).unwrap().image,
        "images of one identity vary"
    );
    assert_ne!(
        SyntheticFaces::new(4, 3, 12).get(7).unwrap(),
        s,
        "the seed matters"
    );
    assert!(matches!(a.get(12), Err(DataError::OutOfRange { .. })));
}

#[test]
fn flipped_normalisation_equals_normalising_the_flip() {
    let face = SyntheticFaces::new(1, 1, 3).get(0).unwrap().image;
    let n = 3 * FACE_SIZE * FACE_SIZE;
    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
    normalize_into(&face, true, &mut a);
    normalize_into(&flip_horizontal(&face), false, &mut b);
    assert_eq!(a, b);
    assert_ne!(flip_horizontal(&face), face);
    assert_eq!(flip_horizontal(&flip_horizontal(&face)), face);
    // (x/255 - 0.5)/0.5: 0 -> -1, 255 -> 1, channel-major.
    let mut white = FaceImage::from_rgb(vec![255; n]);
    white.rgb[0] = 0;
    normalize_into(&white, false, &mut a);
    assert_eq!((a[0], a[1], a[FACE_SIZE * FACE_SIZE]), (-1.0, 1.0, 1.0));
    // The decoder's vectorised form of the same levels, for every byte.
    for v in 0..=255u8 {
        let want = (v as f32 / 255.0 - 0.5) / 0.5;
        assert_eq!(
            crate::image_ops::normalized_level(v).to_bits(),
            want.to_bits(),
            "{v}"
        );
    }
    // Every byte value, every channel, at its CHW place, as torchvision computes it.
    let ramp = FaceImage::from_rgb((0..n).map(|i| (i * 7 % 256) as u8).collect());
    normalize_into(&ramp, false, &mut a);
    for (i, &value) in ramp.rgb.iter().enumerate() {
        let (pixel, channel) = (i / 3, i % 3);
        let want = (value as f32 / 255.0 - 0.5) / 0.5;
        assert_eq!(
            a[channel * FACE_SIZE * FACE_SIZE + pixel].to_bits(),
            want.to_bits()
        );
    }
}

#[test]
fn image_folders_labelled_flat_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ids");
    for (who, n) in [("bob", 2), ("alice", 1)] {
        std::fs::create_dir_all(root.join(who)).unwrap();
        for i in 0..n {
            write_png(&root.join(who).join(format!("{i}.png")), 112, 112, i == 1);
        }
    }
    std::fs::write(root.join("alice").join("notes.txt"), "x").unwrap();
    let set = ImageFolder::open(&root, false).unwrap();
    assert_eq!(set.len(), 3);
    assert_eq!(set.num_identities(), Some(2));
    assert_eq!(set.skipped(), 1);
    assert_eq!(set.get(0).unwrap().label, Some(0), "alice sorts first");
    assert_eq!(set.get(2).unwrap().label, Some(1));
    assert_eq!(set.sample_name(0), "alice/0.png");
    assert_eq!(set.sample_name(2), "bob/1.png");
    let gray = set.get(2).unwrap().image;
    assert_eq!(&gray.rgb[3..6], &[1, 1, 1], "grayscale becomes RGB");

    let flat = dir.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    write_png(&flat.join("a.png"), 112, 112, false);
    write_png(&flat.join("b.png"), 100, 120, false);
    let set = ImageFolder::open(&flat, false).unwrap();
    assert_eq!((set.len(), set.num_identities()), (2, None));
    let err = set.get(1).unwrap_err().to_string();
    assert!(
        err.contains("b.png") && err.contains("100x120") && err.contains("data.resize"),
        "{err}"
    );
    let resized = ImageFolder::open(&flat, true).unwrap().get(1).unwrap();
    assert_eq!(resized.image.rgb.len(), 112 * 112 * 3);

    std::fs::write(flat.join("c.jpg"), b"not a jpeg").unwrap();
    let set = ImageFolder::open(&flat, false).unwrap();
    let err = set.get(2).unwrap_err().to_string();
    assert!(
        err.contains("c.jpg") && err.contains("cannot decode"),
        "{err}"
    );

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(matches!(
        ImageFolder::open(&empty, false),
        Err(DataError::Empty(_))
    ));
}

proptest! {
    #[test]
    fn epoch_plans_are_seeded_permutations(len in 0usize..200, epoch in 0usize..50, seed in any::<u64>(), p in 0.0f64..1.0) {
        let options = LoaderOptions { seed, flip_prob: p, ..LoaderOptions::default() };
        let plan = epoch_plan(len, epoch, &options);
        let mut seen: Vec<usize> = plan.iter().map(|x| x.0).collect();
        seen.sort();
        prop_assert_eq!(seen, (0..len).collect::<Vec<_>>());
        prop_assert_eq!(&plan, &epoch_plan(len, epoch, &options));
        if len > 20 {
            prop_assert_ne!(&plan, &epoch_plan(len, epoch + 1, &options));
        }
        let none = LoaderOptions { flip_prob: 0.0, shuffle: false, ..options };
        prop_assert!(epoch_plan(len, epoch, &none).iter().enumerate().all(|(i, x)| *x == (i, false)));
    }
}

#[test]
fn resumed_epochs_see_the_same_batches() {
    let set: Arc<dyn FaceDataset> = Arc::new(SyntheticFaces::new(5, 3, 1));
    let options = LoaderOptions {
        batch_size: 4,
        seed: 9,
        workers: 2,
        ..LoaderOptions::default()
    };
    let loader = Loader::new(set, options);
    assert_eq!(loader.batches_per_epoch(), 3);
    let all: Vec<Batch> = loader.epoch(2, 0).map(Result::unwrap).collect();
    let tail: Vec<Batch> = loader.epoch(2, 1).map(Result::unwrap).collect();
    assert_eq!(all.len(), 3);
    assert_eq!(tail.len(), 2);
    for (a, b) in all[1..].iter().zip(&tail) {
        assert_eq!(
            (&a.indices, &a.flips, &a.images),
            (&b.indices, &b.flips, &b.images)
        );
    }
    let b = &all[0];
    assert_eq!(
        b.tensor(&qud_backend_flex::device()).dims(),
        [4, 3, 112, 112]
    );
    assert_eq!(
        b.labels().unwrap(),
        b.indices
            .iter()
            .map(|i| (*i / 3) as u32)
            .collect::<Vec<_>>()
    );
}

#[test]
fn batches_are_identical_whatever_the_worker_count() {
    let set: Arc<dyn FaceDataset> = Arc::new(SyntheticFaces::new(3, 4, 5));
    let batches = |workers| -> Vec<Batch> {
        let options = LoaderOptions {
            batch_size: 5,
            seed: 3,
            workers,
            ..LoaderOptions::default()
        };
        Loader::new(set.clone(), options)
            .epoch(1, 0)
            .map(Result::unwrap)
            .collect()
    };
    let (one, three) = (batches(1), batches(3));
    assert_eq!(one.len(), 2);
    for (a, b) in one.iter().zip(&three) {
        assert_eq!(
            (&a.indices, &a.flips, &a.images),
            (&b.indices, &b.flips, &b.images)
        );
    }
}

#[test]
fn flips_follow_the_sample_not_its_position() {
    let options = LoaderOptions {
        seed: 4,
        ..LoaderOptions::default()
    };
    let plan = epoch_plan(300, 6, &options);
    for &(index, flip) in &plan {
        assert_eq!(flip, flip_for(4, 6, index, 0.5));
    }
    let flipped = plan.iter().filter(|p| p.1).count();
    assert!(
        (100..200).contains(&flipped),
        "p = 0.5 flips {flipped} of 300"
    );
    assert!((0..300).all(|i| !flip_for(4, 6, i, 0.0) && flip_for(4, 6, i, 1.0)));
}

proptest! {
    #[test]
    fn shards_are_disjoint_and_cover_the_epoch(len in 0usize..300, world in 1usize..9, epoch in 0usize..5, seed in any::<u64>(), drop_last in any::<bool>()) {
        let mut all = Vec::new();
        let mut sizes = Vec::new();
        for rank in 0..world {
            let options = LoaderOptions { seed, rank, world, drop_last, batch_size: 1, ..LoaderOptions::default() };
            let plan = epoch_plan(len, epoch, &options);
            let set: Arc<dyn FaceDataset> = Arc::new(SyntheticFaces::new(1, len.max(1), 0));
            if len > 0 {
                prop_assert_eq!(Loader::new(set, options).batches_per_epoch(), plan.len());
            }
            sizes.push(plan.len());
            all.extend(plan.into_iter().map(|p| p.0));
        }
        let total = all.len();
        all.sort_unstable();
        all.dedup();
        prop_assert_eq!(all.len(), total, "shards overlap");
        if drop_last {
            prop_assert!(sizes.iter().all(|&s| s == len / world));
        } else {
            prop_assert_eq!(total, len, "shards do not cover the epoch");
            prop_assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn device_pieces_of_a_batch_concatenate_to_the_batch(len in 0usize..9, parts in 1usize..5, seed in any::<u64>()) {
        let pixels = 3 * FACE_SIZE * FACE_SIZE;
        let batch = Batch {
            images: (0..len * pixels).map(|i| (i as u64 ^ seed) as f32).collect(),
            indices: (0..len).map(|i| i * 7 + 1).collect(),
            flips: (0..len).map(|i| (seed >> i) & 1 == 1).collect(),
            labels: (0..len).map(|i| (i % 2 == 0).then_some(i as u32)).collect(),
            skipped: vec![(99, "broken".into())],
        };
        let pieces = batch.clone().split(parts);
        prop_assert_eq!(pieces.len(), parts);
        let sizes: Vec<usize> = pieces.iter().map(Batch::len).collect();
        prop_assert!(sizes.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1), "{:?}", sizes);
        prop_assert_eq!(pieces.iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>(), batch.indices.clone());
        prop_assert_eq!(pieces.iter().flat_map(|b| b.flips.clone()).collect::<Vec<_>>(), batch.flips.clone());
        prop_assert_eq!(pieces.iter().flat_map(|b| b.labels.clone()).collect::<Vec<_>>(), batch.labels.clone());
        prop_assert!(pieces.iter().flat_map(|b| b.images.clone()).eq(batch.images.iter().copied()));
        prop_assert_eq!(pieces.iter().map(|b| b.skipped.len()).sum::<usize>(), 1);
    }
}

/// A dataset whose sample 2 is a corrupt JPEG.
struct OneBadSample(SyntheticFaces);

impl FaceDataset for OneBadSample {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index == 2 {
            return decode_face(b"\xff\xd8\xff\xe0garbage", "sample 2", false)
                .map(|image| Sample { image, label: None });
        }
        self.0.get(index)
    }
    fn num_identities(&self) -> Option<usize> {
        None
    }
    fn describe(&self) -> String {
        "one bad sample".into()
    }
}

#[test]
fn bad_samples_are_skipped_and_reported_or_fail_the_batch() {
    let set = OneBadSample(SyntheticFaces::new(1, 4, 0));
    let plan: Vec<(usize, bool)> = (0..4).map(|i| (i, false)).collect();
    let batch = decode_batch(&set, &plan, 2, true).unwrap();
    assert_eq!(batch.indices, vec![0, 1, 3]);
    assert_eq!(batch.images.len(), 3 * 3 * FACE_SIZE * FACE_SIZE);
    assert_eq!(batch.skipped.len(), 1);
    assert_eq!(batch.skipped[0].0, 2);
    assert!(
        batch.skipped[0].1.contains("sample 2"),
        "{:?}",
        batch.skipped
    );
    let err = decode_batch(&set, &plan, 2, false).unwrap_err().to_string();
    assert!(err.contains("sample 2: cannot decode image"), "{err}");
}

/// A dataset whose decoder panics on sample 2, as the JPEG fast path once did on a forged
/// Huffman table.
struct PanicsOnSample2(SyntheticFaces);

impl FaceDataset for PanicsOnSample2 {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index == 2 {
            panic!("decoder bug");
        }
        self.0.get(index)
    }
    fn num_identities(&self) -> Option<usize> {
        None
    }
    fn describe(&self) -> String {
        "a set with a decoder bug".into()
    }
}

/// A panicking decoder is that sample's error: skipped and counted with `skip_bad`, else the
/// epoch ends in an error. It once killed the loader thread, and the closed channel read as the
/// end of the epoch: training stopped early with exit 0.
#[test]
fn a_panicking_decoder_is_a_bad_sample_not_an_early_end_of_epoch() {
    let set = PanicsOnSample2(SyntheticFaces::new(1, 6, 0));
    let plan: Vec<(usize, bool)> = (0..4).map(|i| (i, false)).collect();
    let batch = decode_batch(&set, &plan, 2, true).unwrap();
    assert_eq!(batch.indices, vec![0, 1, 3]);
    assert!(
        batch.skipped[0].1.contains("panicked: decoder bug"),
        "{:?}",
        batch.skipped
    );

    for skip_bad_samples in [false, true] {
        let options = LoaderOptions {
            batch_size: 2,
            shuffle: false,
            workers: 1,
            skip_bad_samples,
            ..LoaderOptions::default()
        };
        let loader = Loader::new(
            Arc::new(PanicsOnSample2(SyntheticFaces::new(1, 6, 0))),
            options,
        );
        let results: Vec<_> = loader.epoch(0, 0).collect();
        if skip_bad_samples {
            assert_eq!(results.len(), 3);
            let skipped: usize = results
                .iter()
                .map(|b| b.as_ref().unwrap().skipped.len())
                .sum();
            assert_eq!(skipped, 1);
        } else {
            assert_eq!(results.len(), 2, "the failing batch is the last item");
            let err = results[1].as_ref().unwrap_err().to_string();
            assert!(
                err.contains("sample 2") && err.contains("panicked"),
                "{err}"
            );
        }
    }
}

// ---- RecordIO ----------------------------------------------------------------------------------

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn png_bytes(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(112, 112, |x, y| {
        image::Rgb([x as u8 ^ seed, y as u8, seed.wrapping_mul(7)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Written by MXNet 1.9.1 (`fixtures/make_recordio_fixtures.py`): an insightface-layout set with a
/// header record, identity records and a record MXNet split in three, and a set without header.
#[test]
fn reads_sets_written_by_mxnet() {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("mxnet_expected.json")).unwrap()).unwrap();
    for (name, identities) in [("header", Some(3)), ("noheader", None)] {
        let set = RecordDataset::open(&fixture(&format!("mxnet_{name}.rec")), false).unwrap();
        let cases = expected[name].as_array().unwrap();
        assert_eq!(set.len(), cases.len(), "{name}");
        assert_eq!(set.num_identities(), identities, "{name}");
        for (i, case) in cases.iter().enumerate() {
            let key = case["key"].as_u64().unwrap();
            assert_eq!(set.key(i), Some(key));
            let offset = std::fs::read_to_string(fixture(&format!("mxnet_{name}.idx")))
                .unwrap()
                .lines()
                .find_map(|l| {
                    let (k, o) = l.split_once('\t')?;
                    (k == key.to_string()).then(|| o.parse::<u64>().unwrap())
                })
                .unwrap();
            let record = set.record_at(offset, Some(key)).unwrap();
            assert_eq!(record.data.len() as u64, case["len"].as_u64().unwrap());
            assert_eq!(
                crc32fast::hash(&record.data) as u64,
                case["crc32"].as_u64().unwrap(),
                "{name} key {key}"
            );
            let sample = set.get(i).unwrap();
            assert_eq!(sample.label, Some(case["label"].as_u64().unwrap() as u32));
            if let Some(sum) = case.get("rgb_sum") {
                let got: u64 = sample.image.rgb.iter().map(|&b| b as u64).sum();
                assert_eq!(got, sum.as_u64().unwrap(), "{name} key {key} pixels");
            }
        }
    }
    // The scan without .idx sees the split record whole: 1 header + 6 images + 3 identities.
    let records: Vec<_> = RecordScanner::open(&fixture("mxnet_header.rec"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(records.len(), 10);
    let split = Record::parse(&records[3].1).unwrap();
    assert_eq!(
        crc32fast::hash(&split.data) as u64,
        expected["header"][2]["crc32"].as_u64().unwrap()
    );
}

#[test]
fn written_records_read_back_including_split_ones() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("set");
    let magic = RECORD_MAGIC.to_le_bytes();
    // Payload offsets 24 (start of data) and 28 hold the magic: split into 3 parts, one empty.
    let mut tricky = magic.to_vec();
    tricky.extend_from_slice(&magic);
    tricky.extend_from_slice(b"tail5");
    let records = vec![
        Record::image(1.0, 0, png_bytes(1)),
        Record::image(2.0, 1, tricky.clone()),
        Record::with_labels(vec![3.0, 4.0, 5.0]),
        Record::image(0.0, 3, Vec::new()),
    ];
    let mut writer = RecordWriter::create(&prefix).unwrap();
    for (key, r) in records.iter().enumerate() {
        writer.write(key as u64 + 10, r).unwrap();
    }
    writer.finish().unwrap();
    let scanned: Vec<Record> = RecordScanner::open(&prefix.with_extension("rec"))
        .unwrap()
        .map(|r| Record::parse(&r.unwrap().1).unwrap())
        .collect();
    assert_eq!(scanned, records);
    let raw = std::fs::read(prefix.with_extension("rec")).unwrap();
    assert_eq!(raw.len() % 4, 0);
    let idx = std::fs::read_to_string(prefix.with_extension("idx")).unwrap();
    assert!(idx.starts_with("10\t0\n11\t"), "{idx}");
}

proptest! {
    #[test]
    fn any_payload_round_trips(payloads in proptest::collection::vec(
        proptest::collection::vec(prop_oneof![Just(0x0Au8), Just(0x23), Just(0xD7), Just(0xCE), any::<u8>()], 0..64), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("p");
        let mut writer = RecordWriter::create(&prefix).unwrap();
        for (key, p) in payloads.iter().enumerate() {
            writer.write_payload(key as u64, p).unwrap();
        }
        writer.finish().unwrap();
        let back: Vec<Vec<u8>> = RecordScanner::open(&prefix.with_extension("rec")).unwrap()
            .map(|r| r.unwrap().1).collect();
        prop_assert_eq!(back, payloads);
    }
}

#[test]
fn packs_labelled_and_unlabelled_sets() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<(Vec<u8>, Option<u32>)> = [1, 0, 1, 2, 0]
        .iter()
        .enumerate()
        .map(|(i, &l)| (png_bytes(i as u8), Some(l)))
        .collect();
    let prefix = dir.path().join("labelled");
    pack_records(&prefix, images.len(), Some(3), |i| Ok(images[i].clone())).unwrap();
    let set = RecordDataset::open(&prefix, false).unwrap();
    assert_eq!((set.len(), set.num_identities()), (5, Some(3)));
    let labels: Vec<_> = (0..5).map(|i| set.get(i).unwrap().label).collect();
    assert_eq!(labels, [0, 0, 1, 1, 2].map(Some), "grouped by identity");
    // Identity record 1 (key 7) covers image keys 3..5.
    let idx = std::fs::read_to_string(prefix.with_extension("idx")).unwrap();
    let offset: u64 = idx
        .lines()
        .nth(7)
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(set.record_at(offset, None).unwrap().labels, vec![3.0, 5.0]);

    let flat = dir.path().join("flat");
    pack_records(&flat, 2, None, |i| Ok((png_bytes(i as u8), None))).unwrap();
    let set = RecordDataset::open(&flat.with_extension("rec"), false).unwrap();
    assert_eq!((set.len(), set.num_identities()), (2, None));
    assert_eq!(set.get(1).unwrap().label, None);
    assert_eq!(set.get(1).unwrap().image.rgb[..3], [1, 0, 7]);
}

/// The loader's one-step decode (`get_into`) writes what decoding then normalising writes, for
/// every kind of set and both flips: JPEG records (the fast path), PNG records and files (the
/// fallback), a concatenation (labels renumbered), and a set that only implements `get`.
#[test]
fn decoding_into_the_batch_equals_decoding_then_normalising() {
    let dir = tempfile::tempdir().unwrap();
    let faces = SyntheticFaces::new(3, 2, 9);
    let jpegs = dir.path().join("jpegs");
    pack_records(&jpegs, faces.len(), Some(3), |i| {
        let sample = faces.get(i)?;
        Ok((
            encode_face(&sample.image, ImageEncoding::Jpeg(95)),
            sample.label,
        ))
    })
    .unwrap();
    let pngs = dir.path().join("pngs");
    pack_records(&pngs, 2, None, |i| Ok((png_bytes(i as u8), None))).unwrap();
    let folder = dir.path().join("folder");
    std::fs::create_dir_all(folder.join("a")).unwrap();
    for i in 0..2 {
        let face = faces.get(i).unwrap().image;
        let path = folder.join("a").join(format!("{i}.jpg"));
        std::fs::write(path, encode_face(&face, ImageEncoding::Jpeg(90))).unwrap();
    }
    let jpeg_set: Arc<dyn FaceDataset> = Arc::new(RecordDataset::open(&jpegs, false).unwrap());
    let png_set: Arc<dyn FaceDataset> = Arc::new(RecordDataset::open(&pngs, false).unwrap());
    let sets: Vec<Arc<dyn FaceDataset>> = vec![
        jpeg_set.clone(),
        png_set.clone(),
        Arc::new(ImageFolder::open(&folder, false).unwrap()),
        Arc::new(ConcatDataset::new(vec![png_set, jpeg_set])),
        Arc::new(faces),
    ];
    let n = 3 * FACE_SIZE * FACE_SIZE;
    for set in &sets {
        for index in 0..set.len() {
            for flip in [false, true] {
                let sample = set.get(index).unwrap();
                let mut want = vec![0f32; n];
                normalize_into(&sample.image, flip, &mut want);
                let mut got = vec![f32::NAN; n];
                let label = set.get_into(index, flip, &mut got).unwrap();
                assert_eq!(label, sample.label, "{} sample {index}", set.describe());
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{} sample {index} flip {flip}", set.describe());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Damaged `.rec` and `.idx` files (bytes replaced, lines cut or repeated): opening and
    /// reading every sample gives samples or errors naming the file, never a panic, and never
    /// an allocation beyond the image size limit.
    #[test]
    fn damaged_record_files_read_or_fail_cleanly(
        edits in prop::collection::vec((0.0f64..1.0, any::<u8>()), 0..6),
        idx_edit in 0usize..4,
        seed in 0u8..8,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("set");
        pack_records(&prefix, 3, None, |i| Ok((png_bytes(i as u8 ^ seed), None))).unwrap();
        let mut rec = std::fs::read(prefix.with_extension("rec")).unwrap();
        for (at, value) in edits {
            let i = ((rec.len() as f64 * at) as usize).min(rec.len() - 1);
            rec[i] = value;
        }
        let idx = std::fs::read_to_string(prefix.with_extension("idx")).unwrap();
        let lines: Vec<&str> = idx.lines().collect();
        let idx = match idx_edit {
            0 => idx.clone(),
            1 => lines[..2].join("\n"),
            2 => format!("{idx}{}\n", lines[0]),
            _ => idx.replace('\t', " "),
        };
        std::fs::write(prefix.with_extension("rec"), &rec).unwrap();
        std::fs::write(prefix.with_extension("idx"), idx).unwrap();
        let (_, largest) = alloc_probe::largest_allocation(|| {
            match RecordDataset::open(&prefix, true) {
                Ok(set) => {
                    for i in 0..set.len() {
                        if let Err(e) = set.get(i) {
                            assert!(e.to_string().contains("set."), "{e}");
                        }
                    }
                }
                Err(e) => assert!(e.to_string().contains("set."), "{e}"),
            }
        });
        prop_assert!(largest <= 4 * MAX_IMAGE_PIXELS, "allocated {largest} bytes");
    }
}

/// Every broken-file case names the file, where, and what was wrong.
#[test]
fn broken_record_files_give_precise_errors() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("ok");
    pack_records(&prefix, 3, None, |i| Ok((png_bytes(i as u8), None))).unwrap();
    let rec = std::fs::read(prefix.with_extension("rec")).unwrap();
    let idx = std::fs::read_to_string(prefix.with_extension("idx")).unwrap();
    let second: usize = idx
        .lines()
        .nth(1)
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let broken = |name: &str, rec_bytes: &[u8], idx_text: &str| -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(p.with_extension("rec"), rec_bytes).unwrap();
        std::fs::write(p.with_extension("idx"), idx_text).unwrap();
        p
    };
    let message = |p: &std::path::Path, index: usize| -> String {
        match RecordDataset::open(p, false) {
            Err(e) => e.to_string(),
            Ok(set) => set.get(index).unwrap_err().to_string(),
        }
    };

    let truncated = broken("truncated", &rec[..rec.len() - 100], &idx);
    let m = message(&truncated, 2);
    assert!(
        m.contains("truncated.rec") && m.contains("key 2") && m.contains("truncated record"),
        "{m}"
    );

    let mut bad_magic = rec.clone();
    bad_magic[second] ^= 0xFF;
    let m = message(&broken("magic", &bad_magic, &idx), 1);
    assert!(
        m.contains(&format!("key 1, byte {second}")) && m.contains("bad magic"),
        "{m}"
    );

    let m = message(
        &broken("beyond", &rec, &format!("{idx}3\t{}\n", rec.len() + 4)),
        0,
    );
    assert!(
        m.contains("beyond.idx") && m.contains("line 4") && m.contains("beyond the end"),
        "{m}"
    );

    let m = message(&broken("garbled", &rec, "0\t0\nx\ty\n"), 0);
    assert!(m.contains("line 2") && m.contains("not a number"), "{m}");

    // Key 1 listed twice (the second time with key 2's offset): once read as either image.
    let m = message(&broken("twice", &rec, &format!("{idx}1\t{second}\n")), 0);
    assert!(
        m.contains("twice.idx") && m.contains("line 4") && m.contains("key 1 is already on line 2"),
        "{m}"
    );

    // A header record promising keys 1..4 with key 3 absent from the .idx.
    let header = dir.path().join("header");
    let mut w = RecordWriter::create(&header).unwrap();
    w.write(0, &Record::with_labels(vec![4.0, 4.0])).unwrap();
    for key in [1, 2] {
        w.write(key, &Record::image(0.0, key, png_bytes(key as u8)))
            .unwrap();
    }
    w.finish().unwrap();
    let m = message(&header, 0);
    assert!(
        m.contains("header.idx") && m.contains("key 3") && m.contains("missing"),
        "{m}"
    );

    // A corrupt JPEG inside a record: a decode error naming the record's key.
    let corrupt = dir.path().join("corrupt");
    let mut w = RecordWriter::create(&corrupt).unwrap();
    w.write(
        0,
        &Record::image(0.0, 0, b"\xff\xd8\xff\xe0 not a jpeg".to_vec()),
    )
    .unwrap();
    w.finish().unwrap();
    let set = RecordDataset::open(&corrupt, false).unwrap();
    let e = set.get(0).unwrap_err();
    assert!(e.is_bad_sample());
    assert!(
        e.to_string()
            .contains("corrupt.rec key 0: cannot decode image"),
        "{e}"
    );

    // A record too short for its IRHeader.
    let short = dir.path().join("short");
    let mut w = RecordWriter::create(&short).unwrap();
    w.write_payload(0, b"tiny").unwrap();
    w.finish().unwrap();
    let m = message(&short, 0);
    assert!(
        m.contains("key 0, byte 0") && m.contains("shorter than the 24-byte IRHeader"),
        "{m}"
    );
}

#[test]
fn concatenated_sources_keep_order_and_separate_identities() {
    let a: Arc<dyn FaceDataset> = Arc::new(SyntheticFaces::new(3, 2, 1));
    let b: Arc<dyn FaceDataset> = Arc::new(SyntheticFaces::new(2, 3, 2));
    let both = ConcatDataset::new(vec![a.clone(), b.clone()]);
    assert_eq!(both.len(), 12);
    assert_eq!(both.num_identities(), Some(5));
    assert_eq!(both.get(5).unwrap(), a.get(5).unwrap());
    let from_b = both.get(6).unwrap();
    let own = b.get(0).unwrap();
    assert_eq!(from_b.image, own.image);
    assert_eq!(
        from_b.label,
        own.label.map(|l| l + 3),
        "b's identities follow a's"
    );
    assert!(matches!(
        both.get(12),
        Err(DataError::OutOfRange { index: 12, len: 12 })
    ));

    /// An unlabelled view of a set.
    struct Unlabelled(Arc<dyn FaceDataset>);
    impl FaceDataset for Unlabelled {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn get(&self, index: usize) -> Result<Sample, DataError> {
            let mut s = self.0.get(index)?;
            s.label = None;
            Ok(s)
        }
        fn num_identities(&self) -> Option<usize> {
            None
        }
        fn describe(&self) -> String {
            "unlabelled".into()
        }
    }
    let mixed = ConcatDataset::new(vec![a, Arc::new(Unlabelled(b))]);
    assert_eq!(mixed.num_identities(), None);
    assert_eq!(
        mixed.get(0).unwrap().label,
        None,
        "labels only when every part has them"
    );
}

/// JPEGs decode bit-identically to libjpeg-turbo (PIL, OpenCV, MXNet): the fixture's pixels are
/// PIL 12 / libjpeg-turbo 3.2.0's decoding (`fixtures/libjpeg/make_libjpeg_fixture.py`).
#[test]
fn jpeg_pixels_equal_libjpeg_turbo() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/libjpeg");
    let jpeg = std::fs::read(dir.join("face_420.jpg")).unwrap();
    let want = std::fs::read(dir.join("face_420.rgb")).unwrap();
    let face = decode_face(&jpeg, "face_420.jpg", false).unwrap();
    let differing = face.rgb.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} of {} bytes differ", want.len());
}

/// A truncated or garbled JPEG is an error naming the sample, not a process abort (libjpeg's
/// error exit unwinds and is caught), and not grey blocks either: the corrupt-data warnings
/// libjpeg (and PIL) decode past are errors here.
#[test]
fn broken_jpeg_is_an_error_not_an_abort_nor_grey() {
    let jpeg = std::fs::read(fixture("libjpeg").join("face_420.jpg")).unwrap();
    let mut garbled = jpeg.clone();
    for b in &mut garbled[200..600] {
        *b = 0xFF;
    }
    for (name, bytes) in [("truncated", &jpeg[..300]), ("garbled", &garbled[..])] {
        let err = decode_face(bytes, name, false).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
    let err = decode_face(&jpeg[..jpeg.len() - 200], "cut", false).unwrap_err();
    assert!(err.to_string().contains("libjpeg warning"), "{err}");
    let err = decode_face(&[0xFF, 0xD8, 0xFF, 0x00, 1, 2, 3], "header-only", false).unwrap_err();
    assert!(err.to_string().contains("header-only"), "{err}");
}

/// `jpeg` with its frame header (SOF0) claiming `width` x `height`.
fn with_declared_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    let mut forged = jpeg.to_vec();
    forged[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    forged[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    forged
}

/// A face whose header claims 32000 x 32000 (or 4000 x 4000: 16 M pixels in 5 kB) is refused
/// from the header, with `resize` too, before a buffer of its claimed size exists; so is a PNG
/// claiming 100000 x 100000.
#[test]
fn forged_image_sizes_are_refused_before_decoding() {
    let jpeg = std::fs::read(fixture("libjpeg").join("face_420.jpg")).unwrap();
    for (w, h) in [(32000, 32000), (4000, 4000)] {
        let forged = with_declared_size(&jpeg, w, h);
        for resize in [false, true] {
            let (result, largest) =
                alloc_probe::largest_allocation(|| decode_face(&forged, "forged.jpg", resize));
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains("forged.jpg") && err.contains(&format!("{w}x{h}")),
                "{err}"
            );
            assert!(
                largest < 16 << 20,
                "{largest} bytes allocated for a refused image"
            );
        }
    }
    let mut png = png_bytes(3);
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let (result, largest) =
        alloc_probe::largest_allocation(|| decode_face(&png, "forged.png", true));
    assert!(result.is_err());
    assert!(
        largest < 16 << 20,
        "{largest} bytes allocated for a refused image"
    );
    // The largest honest sizes still decode (a 112x112 face scaled up 4x in each direction).
    let big = image::RgbImage::from_fn(448, 448, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let mut encoded = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, 90)
        .encode_image(&big)
        .unwrap();
    assert!(decode_face(&encoded, "big.jpg", true).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Arbitrary damage to a real JPEG and a PNG (bytes replaced anywhere, most of them in the
    /// headers, and a cut): decoding gives an image or an error, never a panic, and never
    /// allocates more than the largest image the size limits admit.
    #[test]
    fn damaged_images_decode_or_fail_cleanly(
        png: bool,
        edits in prop::collection::vec((0.0f64..1.0, any::<u8>(), any::<bool>()), 1..8),
        cut in prop::option::of(0.0f64..1.0),
    ) {
        let mut bytes = if png {
            png_bytes(5)
        } else {
            std::fs::read(fixture("libjpeg").join("face_420.jpg")).unwrap()
        };
        for (at, value, in_header) in edits {
            let span = if in_header { bytes.len().min(700) } else { bytes.len() };
            let i = ((span as f64 * at) as usize).min(bytes.len() - 1);
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate((bytes.len() as f64 * cut) as usize);
        }
        let (_, largest) = alloc_probe::largest_allocation(|| {
            let mut out = vec![0f32; 3 * FACE_SIZE * FACE_SIZE];
            let _ = decode_face_into(&bytes, "damaged", true, false, &mut out);
            let _ = image_ops::decode_rgb(&bytes);
        });
        prop_assert!(largest <= 4 * MAX_IMAGE_PIXELS, "allocated {largest} bytes");
    }
}

/// The real training faces in ../shared decode, every one (JPEGs from real encoders, through
/// the fast path or libjpeg with its warnings as errors).
#[test]
#[ignore = "needs ../shared/data: cargo xtask real-check"]
fn real_lfw_training_faces_decode() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    for set in ["lfw_train_disjoint", "facescrub_subset"] {
        let folder = ImageFolder::open(&data.join(set), true).unwrap();
        assert!(folder.len() > 100, "{}", folder.describe());
        for i in 0..folder.len() {
            folder.get(i).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The fingerprint the teacher cache is keyed on sees one replaced image anywhere in the set
/// (it once sampled 64 images), ignores where the set lives, and in metadata mode reads sizes
/// and times only.
#[test]
fn fingerprints_see_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("faces");
    for id in 0..3 {
        std::fs::create_dir_all(root.join(format!("id{id}"))).unwrap();
        for k in 0..40 {
            std::fs::write(
                root.join(format!("id{id}/{k:02}.png")),
                png_bytes((id * 40 + k) as u8),
            )
            .unwrap();
        }
    }
    let key = |root: &std::path::Path, mode| {
        ImageFolder::open(root, false)
            .unwrap()
            .fingerprint(mode)
            .unwrap()
    };
    let before = key(&root, FingerprintMode::Content);
    assert_eq!(before, key(&root, FingerprintMode::Content));
    let meta_before = key(&root, FingerprintMode::Metadata);

    // One image among 120 replaced by another of the same size.
    let victim = root.join("id1/17.png");
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    assert_ne!(key(&root, FingerprintMode::Content), before);

    let moved = dir.path().join("elsewhere");
    std::fs::rename(&root, &moved).unwrap();
    assert_eq!(
        key(&moved, FingerprintMode::Content),
        key(&moved, FingerprintMode::Content)
    );
    std::fs::write(moved.join("id1/17.png"), png_bytes(17 + 40)).unwrap();
    assert_eq!(
        key(&moved, FingerprintMode::Content),
        before,
        "moving keeps the key"
    );
    // Metadata mode: the rewrite changed the file's time, so its key moved too.
    assert_ne!(key(&moved, FingerprintMode::Metadata), meta_before);

    // RecordIO: the .rec's bytes.
    let prefix = dir.path().join("set");
    pack_records(&prefix, 3, None, |i| Ok((png_bytes(i as u8), None))).unwrap();
    let rec_key = || {
        RecordDataset::open(&prefix, false)
            .unwrap()
            .fingerprint(FingerprintMode::Content)
            .unwrap()
    };
    let original = rec_key();
    let rec = prefix.with_extension("rec");
    let mut bytes = std::fs::read(&rec).unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 1;
    std::fs::write(&rec, &bytes).unwrap();
    assert_ne!(rec_key(), original);
}

mod augmentation {
    use crate::{Augment, FACE_SIZE};
    use proptest::prelude::*;

    const PLANE: usize = FACE_SIZE * FACE_SIZE;

    /// A face whose red channel ramps left to right from -1 to 1, green top to bottom, blue
    /// constant.
    fn ramps() -> Vec<f32> {
        let mut out = vec![0f32; 3 * PLANE];
        for y in 0..FACE_SIZE {
            for x in 0..FACE_SIZE {
                out[y * FACE_SIZE + x] = x as f32 / 111.0 * 2.0 - 1.0;
                out[PLANE + y * FACE_SIZE + x] = y as f32 / 111.0 * 2.0 - 1.0;
                out[2 * PLANE + y * FACE_SIZE + x] = 0.2;
            }
        }
        out
    }

    #[test]
    fn the_default_changes_nothing_and_strengths_are_checked() {
        let mut face = ramps();
        Augment::default().apply(1, 2, 3, &mut face);
        assert_eq!(face, ramps());
        assert!(Augment::default().check().is_ok());
        for bad in [
            Augment {
                zoom_min: 0.0,
                ..Augment::default()
            },
            Augment {
                zoom_min: 1.5,
                ..Augment::default()
            },
            Augment {
                max_shift: 80.0,
                ..Augment::default()
            },
            Augment {
                brightness: f64::NAN,
                ..Augment::default()
            },
            Augment {
                grayscale_prob: 2.0,
                ..Augment::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    /// A zoom into half the face halves the red ramp's step per pixel (each output pixel spans
    /// half a source pixel); a grayscale face has
    /// equal channels; brightness alone scales a mid-gray face.
    #[test]
    fn each_augmentation_does_what_it_says() {
        let zoom = Augment {
            zoom_min: 0.5,
            ..Augment::default()
        };
        // Find a draw whose crop side is near half the face (the draw is uniform in [0.5, 1]).
        let mut found = false;
        for index in 0..200 {
            let mut face = ramps();
            zoom.apply(0, 0, index, &mut face);
            let slope = face[56 * FACE_SIZE + 57] - face[56 * FACE_SIZE + 56];
            let plain = 2.0 / 111.0;
            if slope < 0.52 * plain {
                assert!(slope > 0.49 * plain, "slope {slope} at most halves");
                found = true;
                break;
            }
        }
        assert!(found, "some draw zooms in to near half the face");

        let gray = Augment {
            grayscale_prob: 1.0,
            ..Augment::default()
        };
        let mut face = ramps();
        gray.apply(0, 0, 0, &mut face);
        for p in (0..PLANE).step_by(97) {
            assert!(
                (face[p] - face[PLANE + p]).abs() < 1e-5
                    && (face[p] - face[2 * PLANE + p]).abs() < 1e-5
            );
        }

        let bright = Augment {
            brightness: 0.5,
            ..Augment::default()
        };
        let mut face = vec![0f32; 3 * PLANE]; // 0.5 in [0, 1]
        bright.apply(4, 1, 7, &mut face);
        let v = face[0];
        assert!(
            face.iter().all(|x| (x - v).abs() < 1e-6),
            "a constant face stays constant"
        );
        assert!(
            v != 0.0 && (-0.5..=0.5).contains(&v),
            "0.5 * [0.5, 1.5] back in [-1, 1]: {v}"
        );
    }

    proptest! {
        /// Any valid strengths give a finite face in [-1, 1], the same for the same
        /// `(seed, epoch, index)` and, with a geometric part, another one in another epoch.
        #[test]
        fn draws_are_pure_and_stay_in_range(
            zoom_min in 0.5f64..=1.0, max_shift in 0.0f64..8.0, brightness in 0.0f64..=1.0,
            contrast in 0.0f64..=1.0, saturation in 0.0f64..=1.0, grayscale_prob in 0.0f64..=1.0,
            seed in any::<u64>(), epoch in 0usize..1000, index in 0usize..100_000,
        ) {
            let a = Augment { zoom_min, max_shift, brightness, contrast, saturation, grayscale_prob };
            prop_assert!(a.check().is_ok());
            let (mut x, mut y, mut z) = (ramps(), ramps(), ramps());
            a.apply(seed, epoch, index, &mut x);
            a.apply(seed, epoch, index, &mut y);
            a.apply(seed, epoch + 1, index, &mut z);
            prop_assert!(x.iter().all(|v| v.is_finite() && (-1.0..=1.0).contains(v)));
            prop_assert_eq!(&x, &y);
            if zoom_min < 0.9 && max_shift > 1.0 {
                prop_assert_ne!(&x, &z);
            }
        }
    }
}

/// `open` recognises a folder and a RecordIO pair (by `.rec`, `.idx` or prefix), reads a named
/// format as named, and refuses anything else naming the path.
#[test]
fn open_recognises_every_format_from_the_path() {
    use crate::{open, SourceFormat};
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("faces");
    std::fs::create_dir_all(folder.join("a")).unwrap();
    std::fs::write(folder.join("a/0.png"), png_bytes(0)).unwrap();
    std::fs::write(folder.join("a/1.png"), png_bytes(1)).unwrap();
    let prefix = dir.path().join("train");
    let mut writer = RecordWriter::create(&prefix).unwrap();
    for key in 0..3u64 {
        writer
            .write(key, &Record::image(key as f32, key, png_bytes(key as u8)))
            .unwrap();
    }
    writer.finish().unwrap();

    assert_eq!(open(&folder, SourceFormat::Auto, false).unwrap().len(), 2);
    for path in [
        prefix.with_extension("rec"),
        prefix.with_extension("idx"),
        prefix.clone(),
    ] {
        let set = open(&path, SourceFormat::Auto, false).unwrap();
        assert_eq!(set.len(), 3, "{}", path.display());
    }
    assert_eq!(
        open(&prefix.with_extension("rec"), SourceFormat::Recordio, false)
            .unwrap()
            .len(),
        3
    );
    let stray = dir.path().join("notes.txt");
    std::fs::write(&stray, b"hello").unwrap();
    for (path, why) in [
        (stray, "neither an image folder nor a RecordIO"),
        (dir.path().join("missing"), "no such file"),
    ] {
        let err = open(&path, SourceFormat::Auto, false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains(why),
            "{err}"
        );
    }
}
