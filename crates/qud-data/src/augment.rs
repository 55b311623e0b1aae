//! Augmentations beyond the flip, for distillation from small sets: a random zoom into the face
//! and a shift (geometric), brightness, contrast and saturation jitter and grayscale
//! (photometric), applied to the decoded, flipped face.
//!
//! Each draw is a pure function of `(seed, epoch, sample index)`, like the flip, so a resumed
//! run sees the images an uninterrupted one would. The teacher must see the same augmented
//! image as the student (a "consistent" teacher: Beyer et al., "Knowledge distillation: A good
//! teacher is patient and consistent", CVPR 2022), so an augmented run computes the teacher's
//! features every step instead of reading the teacher cache.

use crate::FACE_SIZE;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Augmentation strengths; the default changes nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Smallest side of the random crop, as a fraction of the face (1 = no zoom): the crop is
    /// drawn in [zoom_min, 1] and scaled back to 112 x 112.
    pub zoom_min: f64,
    /// Largest shift of the crop's centre, in pixels, each axis.
    pub max_shift: f64,
    /// Brightness factor drawn in [1 - b, 1 + b].
    pub brightness: f64,
    /// Contrast factor drawn in [1 - c, 1 + c] (around the image's mean gray).
    pub contrast: f64,
    /// Saturation factor drawn in [1 - s, 1 + s] (around each pixel's gray).
    pub saturation: f64,
    /// Probability of turning the face gray.
    pub grayscale_prob: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            zoom_min: 1.0,
            max_shift: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            grayscale_prob: 0.0,
        }
    }
}

/// One sample's draw.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Draw {
    side: f32,
    centre: (f32, f32),
    brightness: f32,
    contrast: f32,
    saturation: f32,
    grayscale: bool,
}

/// An augmentation strength outside its range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {value} is not in {allowed}")]
pub struct AugmentError {
    pub field: &'static str,
    pub value: f64,
    pub allowed: &'static str,
}

impl Augment {
    /// Whether every image passes through unchanged.
    pub fn is_identity(&self) -> bool {
        *self == Self::default()
    }

    /// Why the strengths make no sense, if they do not.
    pub fn check(&self) -> Result<(), AugmentError> {
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        let bad = |field, value, allowed| {
            Err(AugmentError {
                field,
                value,
                allowed,
            })
        };
        if !(self.zoom_min.is_finite() && self.zoom_min > 0.0 && self.zoom_min <= 1.0) {
            return bad("zoom_min", self.zoom_min, "(0, 1]");
        }
        if !(self.max_shift.is_finite() && (0.0..=FACE_SIZE as f64 / 2.0).contains(&self.max_shift))
        {
            return bad("max_shift", self.max_shift, "[0, 56] pixels");
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
            ("grayscale_prob", self.grayscale_prob),
        ] {
            if !unit(v) {
                return bad(name, v, "[0, 1]");
            }
        }
        Ok(())
    }

    fn draw(&self, seed: u64, epoch: usize, index: usize) -> Draw {
        // A stream of its own, apart from the shuffle's and the flip's.
        let key = seed ^ 0xA5A5_5A5A_C3C3_3C3C;
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        rng.set_stream(((epoch as u64) << 40) ^ index as u64);
        let mut uniform = |lo: f64, hi: f64| -> f32 {
            if hi > lo {
                rng.random_range(lo..hi) as f32
            } else {
                lo as f32
            }
        };
        let side = uniform(self.zoom_min, 1.0) * FACE_SIZE as f32;
        let centre = (
            FACE_SIZE as f32 / 2.0 + uniform(-self.max_shift, self.max_shift),
            FACE_SIZE as f32 / 2.0 + uniform(-self.max_shift, self.max_shift),
        );
        let brightness = uniform(1.0 - self.brightness, 1.0 + self.brightness);
        let contrast = uniform(1.0 - self.contrast, 1.0 + self.contrast);
        let saturation = uniform(1.0 - self.saturation, 1.0 + self.saturation);
        let grayscale = f64::from(uniform(0.0, 1.0)) < self.grayscale_prob;
        Draw {
            side,
            centre,
            brightness,
            contrast,
            saturation,
            grayscale,
        }
    }

    /// Augment `image` (`[3, 112, 112]` RGB in [-1, 1], as the loader decodes it) in place, as
    /// sample `index` of `epoch` under `seed`.
    pub fn apply(&self, seed: u64, epoch: usize, index: usize, image: &mut [f32]) {
        let plane = FACE_SIZE * FACE_SIZE;
        assert_eq!(image.len(), 3 * plane, "a [3, 112, 112] face");
        if self.is_identity() {
            return;
        }
        let d = self.draw(seed, epoch, index);
        let geometric = d.side < FACE_SIZE as f32 || d.centre != (56.0, 56.0);
        if geometric {
            let source = image.to_vec();
            let scale = d.side / FACE_SIZE as f32;
            let half = FACE_SIZE as f32 / 2.0;
            for y in 0..FACE_SIZE {
                // Pixel centres of the output, mapped into the crop (half-pixel convention).
                let sy = (y as f32 + 0.5 - half) * scale + d.centre.1 - 0.5;
                for x in 0..FACE_SIZE {
                    let sx = (x as f32 + 0.5 - half) * scale + d.centre.0 - 0.5;
                    for c in 0..3 {
                        image[c * plane + y * FACE_SIZE + x] =
                            bilinear(&source[c * plane..(c + 1) * plane], sx, sy);
                    }
                }
            }
        }
        // Photometric jitter in [0, 1] pixel space, clamped back to the range.
        let to_unit = |v: f32| v * 0.5 + 0.5;
        let mean_gray = {
            let mut sum = 0f32;
            for p in 0..plane {
                sum += gray(
                    to_unit(image[p]),
                    to_unit(image[plane + p]),
                    to_unit(image[2 * plane + p]),
                );
            }
            sum / plane as f32
        };
        for p in 0..plane {
            let mut rgb = [
                to_unit(image[p]) * d.brightness,
                to_unit(image[plane + p]) * d.brightness,
                to_unit(image[2 * plane + p]) * d.brightness,
            ];
            for v in &mut rgb {
                *v = (*v - mean_gray * d.brightness) * d.contrast + mean_gray * d.brightness;
            }
            let g = gray(rgb[0], rgb[1], rgb[2]);
            let saturation = if d.grayscale { 0.0 } else { d.saturation };
            for (c, v) in rgb.into_iter().enumerate() {
                let v = (v - g) * saturation + g;
                image[c * plane + p] = v.clamp(0.0, 1.0) * 2.0 - 1.0;
            }
        }
    }
}

/// ITU-R BT.601 luma, as torchvision's grayscale.
fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

/// `plane` (112 x 112) at `(x, y)`, bilinear, edges extended.
fn bilinear(plane: &[f32], x: f32, y: f32) -> f32 {
    let max = (FACE_SIZE - 1) as f32;
    let (x, y) = (x.clamp(0.0, max), y.clamp(0.0, max));
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(FACE_SIZE - 1), (y0 + 1).min(FACE_SIZE - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let at = |xx: usize, yy: usize| plane[yy * FACE_SIZE + xx];
    let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
    let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
    top * (1.0 - fy) + bottom * fy
}
