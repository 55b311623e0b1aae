//! Decoding to 112x112 RGB, horizontal flip, and normalisation to the networks' input.

use crate::DataError;
use image::imageops::FilterType;

/// Side of the aligned face crops every network here takes.
pub const FACE_SIZE: usize = 112;

/// A 112x112 RGB face, row-major HWC bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaceImage {
    pub rgb: Vec<u8>,
}

impl FaceImage {
    pub fn from_rgb(rgb: Vec<u8>) -> Self {
        assert_eq!(
            rgb.len(),
            FACE_SIZE * FACE_SIZE * 3,
            "a face is 112x112x3 bytes"
        );
        Self { rgb }
    }
}

/// Decode JPEG or PNG bytes of any size to RGB: `(width, height, row-major RGB bytes)`.
///
/// JPEGs decode as libjpeg-turbo decodes them with default settings (accurate integer IDCT,
/// fancy upsampling), the decoder behind OpenCV, PIL and MXNet, which insightface's `.bin` sets
/// and pipelines decode with: the pixels are bit-identical to theirs (pure-Rust decoders differ
/// by up to 37 levels on real LFW JPEGs, enough to move LFW accuracy by 0.08 points). The
/// baseline JPEGs face sets are made of take [`crate::jpeg`]'s fast path, which gives the same
/// bits; the rest go through mozjpeg's build of libjpeg-turbo. Other formats, and JPEGs libjpeg
/// refuses (CMYK), go through the `image` crate.
pub fn decode_rgb(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        if let Some(fast) = crate::jpeg::decode(bytes) {
            return Ok((fast.width, fast.height, fast.pixels));
        }
        if let Ok(decoded) = decode_jpeg_libjpeg(bytes) {
            return Ok(decoded);
        }
    }
    let rgb = image::load_from_memory(bytes)
        .map_err(|e| e.to_string())?
        .to_rgb8();
    Ok((rgb.width() as usize, rgb.height() as usize, rgb.into_raw()))
}

/// libjpeg reports errors by unwinding out of its C frames (mozjpeg-sys's `unwinding`); they are
/// caught here and become an `Err`.
pub(crate) fn decode_jpeg_libjpeg(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let decode = || -> std::io::Result<(usize, usize, Vec<u8>)> {
        let mut started = mozjpeg::Decompress::new_mem(bytes)?.rgb()?;
        let (w, h) = (started.width(), started.height());
        let mut rgb = vec![0u8; w * h * 3];
        started.read_scanlines_into(&mut rgb)?;
        started.finish()?;
        Ok((w, h, rgb))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(Ok(decoded)) => Ok(decoded),
        Ok(Err(e)) => Err(e.to_string()),
        Err(payload) => Err(payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "libjpeg error".into())),
    }
}

/// Decode JPEG or PNG bytes (grayscale and RGBA become RGB; see [`decode_rgb`]). Another size
/// than 112x112 is an error naming `origin`, unless `resize` (bilinear, as insightface's
/// `cv2.resize`).
pub fn decode_face(bytes: &[u8], origin: &str, resize: bool) -> Result<FaceImage, DataError> {
    let (w, h, raw) = decode_rgb(bytes).map_err(|reason| DataError::Decode {
        origin: origin.to_string(),
        reason,
    })?;
    let (w, h) = (w as u32, h as u32);
    if (w, h) == (FACE_SIZE as u32, FACE_SIZE as u32) {
        return Ok(FaceImage::from_rgb(raw));
    }
    let mut rgb = image::RgbImage::from_raw(w, h, raw).expect("w * h * 3 bytes");
    if (w as usize, h as usize) != (FACE_SIZE, FACE_SIZE) {
        if !resize {
            return Err(DataError::Size {
                origin: origin.to_string(),
                width: w,
                height: h,
            });
        }
        rgb = image::imageops::resize(
            &rgb,
            FACE_SIZE as u32,
            FACE_SIZE as u32,
            FilterType::Triangle,
        );
    }
    Ok(FaceImage::from_rgb(rgb.into_raw()))
}

/// [`decode_face`] then [`normalize_into`], in one step where it can be: a 112x112 baseline
/// JPEG (what face sets store) decodes straight into `out`'s planes. Same result either way.
pub fn decode_face_into(
    bytes: &[u8],
    origin: &str,
    resize: bool,
    flip: bool,
    out: &mut [f32],
) -> Result<(), DataError> {
    if !crate::jpeg::decode_normalized(bytes, (FACE_SIZE, FACE_SIZE), flip, out) {
        normalize_into(&decode_face(bytes, origin, resize)?, flip, out);
    }
    Ok(())
}

/// Mirror left and right.
pub fn flip_horizontal(face: &FaceImage) -> FaceImage {
    let mut out = vec![0u8; face.rgb.len()];
    for y in 0..FACE_SIZE {
        for x in 0..FACE_SIZE {
            let src = (y * FACE_SIZE + x) * 3;
            let dst = (y * FACE_SIZE + FACE_SIZE - 1 - x) * 3;
            out[dst..dst + 3].copy_from_slice(&face.rgb[src..src + 3]);
        }
    }
    FaceImage { rgb: out }
}

/// `(v / 255 - 0.5) / 0.5` in f32 for every byte `v`: torchvision's `ToTensor` then
/// `Normalize(0.5, 0.5)`, bit for bit, without two divisions per value.
const NORMALIZED_LEVELS: [f32; 256] = {
    let mut levels = [0f32; 256];
    let mut v = 0;
    while v < 256 {
        levels[v] = (v as f32 / 255.0 - 0.5) / 0.5;
        v += 1;
    }
    levels
};

/// [`NORMALIZED_LEVELS`] as arithmetic that vectorises, for the decoder's planar rows:
/// `v / 255` in f32 is `v * (1 / 255)` in f64 rounded to f32 for every byte (a test checks all
/// 256), and dividing by 0.5 is doubling.
#[inline(always)]
pub(crate) fn normalized_level(v: u8) -> f32 {
    ((v as f64 * (1.0 / 255.0)) as f32 - 0.5) * 2.0
}

/// Write `face` (optionally flipped) as CHW floats `(x / 255 - 0.5) / 0.5` into `out`
/// (`3 * 112 * 112` values).
pub fn normalize_into(face: &FaceImage, flip: bool, out: &mut [f32]) {
    let plane = FACE_SIZE * FACE_SIZE;
    assert_eq!(out.len(), 3 * plane);
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    for (y, row) in face.rgb.chunks_exact(3 * FACE_SIZE).enumerate() {
        let span = y * FACE_SIZE..(y + 1) * FACE_SIZE;
        let (r, g, b) = (
            &mut red[span.clone()],
            &mut green[span.clone()],
            &mut blue[span],
        );
        for (x, pixel) in row.chunks_exact(3).enumerate() {
            let x = if flip { FACE_SIZE - 1 - x } else { x };
            r[x] = NORMALIZED_LEVELS[pixel[0] as usize];
            g[x] = NORMALIZED_LEVELS[pixel[1] as usize];
            b[x] = NORMALIZED_LEVELS[pixel[2] as usize];
        }
    }
}

/// How [`encode_face`] stores a face.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageEncoding {
    /// JPEG at a quality (insightface packs its sets at 95).
    Jpeg(u8),
    Png,
}

/// Encode a face as JPEG or PNG bytes.
pub fn encode_face(face: &FaceImage, encoding: ImageEncoding) -> Vec<u8> {
    let mut out = Vec::new();
    let (w, h) = (FACE_SIZE as u32, FACE_SIZE as u32);
    let result = match encoding {
        ImageEncoding::Jpeg(quality) => image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut out, quality,
        )
        .encode(&face.rgb, w, h, image::ExtendedColorType::Rgb8),
        ImageEncoding::Png => image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(&mut out),
            &face.rgb,
            w,
            h,
            image::ExtendedColorType::Rgb8,
        ),
    };
    result.expect("encoding a 112x112 RGB buffer into memory cannot fail");
    out
}
