use crate::*;
use proptest::prelude::*;
use std::sync::Arc;

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
    let all: Vec<Batch> = loader.epoch(2, 0).iter().map(Result::unwrap).collect();
    let tail: Vec<Batch> = loader.epoch(2, 1).iter().map(Result::unwrap).collect();
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
