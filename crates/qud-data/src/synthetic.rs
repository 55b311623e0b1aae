//! Procedurally drawn faces: a labelled training set that needs no files, for the embedded demo
//! and for tests.
//!
//! An identity is a set of facial proportions and colours drawn from a seed (face shape, skin,
//! eye spacing and size, brows, nose, mouth, hair). Each image of an identity varies what a
//! photograph varies: position and scale of the face, lighting direction and strength,
//! background, and pixel noise. Identities are told apart by geometry and colour, not by the
//! nuisance factors, so a network has to learn identity-relevant features.

use crate::{DataError, FaceDataset, FaceImage, Sample, FACE_SIZE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `identities x images_per_identity` generated faces; sample `i` is image `i % per` of identity
/// `i / per`.
#[derive(Clone, Debug)]
pub struct SyntheticFaces {
    identities: Vec<Identity>,
    images_per_identity: usize,
    seed: u64,
}

#[derive(Clone, Debug)]
struct Identity {
    face_w: f32,
    face_h: f32,
    skin: [f32; 3],
    hair: [f32; 3],
    hairline: f32,
    eye_dx: f32,
    eye_y: f32,
    eye_r: f32,
    iris: [f32; 3],
    brow_y: f32,
    brow_tilt: f32,
    nose_len: f32,
    nose_w: f32,
    mouth_y: f32,
    mouth_w: f32,
    lip: [f32; 3],
}

fn color(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> [f32; 3] {
    [
        rng.random_range(lo..hi),
        rng.random_range(lo..hi),
        rng.random_range(lo..hi),
    ]
}

impl Identity {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let tone = rng.random_range(0.25f32..0.9);
        Self {
            face_w: rng.random_range(0.52..0.72),
            face_h: rng.random_range(0.68..0.9),
            skin: [
                tone + rng.random_range(0.0..0.1),
                tone * rng.random_range(0.7..0.9),
                tone * rng.random_range(0.55..0.8),
            ],
            hair: color(rng, 0.0, 0.8),
            hairline: rng.random_range(-0.75..-0.45),
            eye_dx: rng.random_range(0.2..0.34),
            eye_y: rng.random_range(-0.22..-0.05),
            eye_r: rng.random_range(0.05..0.1),
            iris: color(rng, 0.0, 0.7),
            brow_y: rng.random_range(0.08..0.18),
            brow_tilt: rng.random_range(-0.25..0.25),
            nose_len: rng.random_range(0.15..0.32),
            nose_w: rng.random_range(0.05..0.12),
            mouth_y: rng.random_range(0.32..0.5),
            mouth_w: rng.random_range(0.14..0.3),
            lip: [
                rng.random_range(0.4..0.9),
                rng.random_range(0.1..0.4),
                rng.random_range(0.1..0.4),
            ],
        }
    }
}

impl SyntheticFaces {
    pub fn new(identities: usize, images_per_identity: usize, seed: u64) -> Self {
        assert!(identities > 0 && images_per_identity > 0);
        let identities = (0..identities)
            .map(|i| {
                Identity::draw(&mut ChaCha8Rng::seed_from_u64(
                    seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ))
            })
            .collect();
        Self {
            identities,
            images_per_identity,
            seed,
        }
    }

    /// Image `image` (any index, not only those in the set) of identity `identity`.
    pub fn render(&self, identity: usize, image: usize) -> FaceImage {
        let id = &self.identities[identity];
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed.wrapping_add(0xA5A5_5A5A)
                ^ ((identity as u64) << 32 | image as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        let cx = 56.0 + rng.random_range(-4.0f32..4.0);
        let cy = 58.0 + rng.random_range(-4.0f32..4.0);
        let scale = 50.0 * rng.random_range(0.92f32..1.08);
        let light_dir = rng.random_range(-1.0f32..1.0);
        let light = rng.random_range(0.75f32..1.2);
        let background = color(&mut rng, 0.1, 0.9);
        let noise = rng.random_range(0.0f32..0.05);
        let mut rgb = vec![0u8; FACE_SIZE * FACE_SIZE * 3];
        for py in 0..FACE_SIZE {
            for px in 0..FACE_SIZE {
                let u = (px as f32 - cx) / scale;
                let v = (py as f32 - cy) / scale;
                let mut c = background;
                let face = (u / id.face_w).powi(2) + (v / id.face_h).powi(2);
                let head =
                    (u / (id.face_w * 1.08)).powi(2) + ((v + 0.06) / (id.face_h * 1.1)).powi(2);
                if head <= 1.0 && v < id.hairline + 0.12 * u.abs() {
                    c = id.hair;
                } else if face <= 1.0 {
                    c = id.skin;
                    for side in [-1.0f32, 1.0] {
                        let ex = u - side * id.eye_dx;
                        let ey = v - id.eye_y;
                        let eye = (ex / (id.eye_r * 1.6)).powi(2) + (ey / id.eye_r).powi(2);
                        if eye <= 1.0 {
                            c = if ex * ex + ey * ey < (id.eye_r * 0.6).powi(2) {
                                id.iris
                            } else {
                                [0.95, 0.95, 0.92]
                            };
                        }
                        let by = v - (id.eye_y - id.brow_y) - side * id.brow_tilt * ex;
                        if ex.abs() < id.eye_r * 1.8 && by.abs() < 0.022 {
                            c = id.hair;
                        }
                    }
                    if u.abs() < id.nose_w * (v - id.eye_y) / id.nose_len
                        && v > id.eye_y
                        && v < id.eye_y + id.nose_len
                    {
                        c = [c[0] * 0.8, c[1] * 0.75, c[2] * 0.75];
                    }
                    let my = v - id.mouth_y - 2.0 * (u / id.mouth_w).powi(2) * 0.03;
                    if u.abs() < id.mouth_w && my.abs() < 0.03 {
                        c = id.lip;
                    }
                    let shade = light * (1.0 + 0.35 * light_dir * u);
                    c = [c[0] * shade, c[1] * shade, c[2] * shade];
                }
                let at = (py * FACE_SIZE + px) * 3;
                for k in 0..3 {
                    let jitter = noise * rng.random_range(-1.0f32..1.0);
                    rgb[at + k] = ((c[k] + jitter).clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
        FaceImage::from_rgb(rgb)
    }

    pub fn images_per_identity(&self) -> usize {
        self.images_per_identity
    }
}

impl FaceDataset for SyntheticFaces {
    fn len(&self) -> usize {
        self.identities.len() * self.images_per_identity
    }

    fn get(&self, index: usize) -> Result<Sample, DataError> {
        if index >= self.len() {
            return Err(DataError::OutOfRange {
                index,
                len: self.len(),
            });
        }
        let identity = index / self.images_per_identity;
        Ok(Sample {
            image: self.render(identity, index % self.images_per_identity),
            label: Some(identity as u32),
        })
    }

    fn num_identities(&self) -> Option<usize> {
        Some(self.identities.len())
    }

    fn describe(&self) -> String {
        format!(
            "synthetic faces: {} identities x {} images (seed {})",
            self.identities.len(),
            self.images_per_identity,
            self.seed
        )
    }
}

/// A verification set of `identities` synthetic identities (4 images each, rendered from `seed`):
/// per identity two genuine and two impostor pairs, so half the pairs are genuine. Returns the
/// encoded images (pairs consecutive, as in an insightface `.bin`) and `issame`.
pub fn synthetic_pairs(
    identities: usize,
    seed: u64,
    encoding: crate::ImageEncoding,
) -> (Vec<Vec<u8>>, Vec<bool>) {
    assert!(identities >= 3, "impostor pairs need at least 3 identities");
    let faces = SyntheticFaces::new(identities, 4, seed);
    let encoded = |identity: usize, image: usize| {
        crate::encode_face(&faces.render(identity, image), encoding)
    };
    let (mut images, mut issame) = (Vec::new(), Vec::new());
    for id in 0..identities {
        let other = (id + 1 + id % (identities - 1)) % identities;
        for (a, b) in [
            ((id, 0), (id, 1)),
            ((id, 2), (other, 3)),
            ((id, 3), (id, 2)),
            ((id, 1), ((other + 1) % identities, 0)),
        ] {
            images.push(encoded(a.0, a.1));
            images.push(encoded(b.0, b.1));
            issame.push(a.0 == b.0);
        }
    }
    (images, issame)
}
