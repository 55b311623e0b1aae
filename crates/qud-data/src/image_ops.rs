//! Decoding to 112x112 RGB, horizontal flip, and normalisation to the networks' input.

use crate::DataError;
use image::imageops::FilterType;
use std::os::raw::c_int;

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

/// Largest image decoded, in pixels (8192 x 8192, 192 MiB as RGB): far above any face crop, and
/// a header that claims more is refused before anything is allocated for it.
pub const MAX_IMAGE_PIXELS: usize = 1 << 26;

/// Most pixels a Huffman-coded JPEG can describe per byte: it spends at least one bit on every
/// 8x8 block of a component, 512 pixels a byte for one component; twice that is allowed. A
/// header declaring more than this (a 5 kB face "of 32000 x 32000") is refused unread.
const MAX_JPEG_PIXELS_PER_BYTE: usize = 1024;

/// `Err` naming the problem when an image of `width` x `height` in `encoded` bytes is beyond
/// what is decoded: over [`MAX_IMAGE_PIXELS`], or (JPEG) more than its bytes can hold.
pub(crate) fn check_declared_size(
    width: usize,
    height: usize,
    encoded: usize,
    jpeg: bool,
) -> Result<(), String> {
    let pixels = width.saturating_mul(height);
    if pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "header declares {width}x{height}, more than the {MAX_IMAGE_PIXELS} pixels decoded"
        ));
    }
    if jpeg && pixels > encoded.saturating_mul(MAX_JPEG_PIXELS_PER_BYTE) {
        return Err(format!(
            "header declares {width}x{height}, more than {encoded} bytes of JPEG can hold \
             (a corrupt or forged header)"
        ));
    }
    Ok(())
}

/// Decode JPEG or PNG bytes of any size to RGB: `(width, height, row-major RGB bytes)`.
///
/// JPEGs decode as libjpeg-turbo decodes them with default settings (accurate integer IDCT,
/// fancy upsampling), the decoder behind OpenCV, PIL and MXNet, which insightface's `.bin` sets
/// and pipelines decode with: the pixels are bit-identical to theirs (pure-Rust decoders differ
/// by up to 37 levels on real LFW JPEGs, enough to move LFW accuracy by 0.08 points). The
/// baseline JPEGs face sets are made of take [`crate::jpeg`]'s fast path, which gives the same
/// bits; the rest go through mozjpeg's build of libjpeg-turbo. libjpeg's corrupt-data warnings
/// are errors here (it would fill what it could not decode with grey). Other formats, and the
/// JPEG colour spaces libjpeg cannot convert to RGB (CMYK), go through the `image` crate. Sizes
/// beyond [`MAX_IMAGE_PIXELS`] are refused from the header.
pub fn decode_rgb(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        if let Some(fast) = crate::jpeg::decode(bytes) {
            return Ok((fast.width, fast.height, fast.pixels));
        }
        match decode_jpeg_libjpeg(bytes) {
            Ok(decoded) => return Ok(decoded),
            Err(e) if !e.contains("color conversion") => return Err(e),
            Err(_) => {}
        }
    }
    let reader = || -> Result<_, String> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?;
        reader.limits(limits_for_decode());
        Ok(reader)
    };
    let (width, height) = reader()?.into_dimensions().map_err(|e| e.to_string())?;
    check_declared_size(width as usize, height as usize, bytes.len(), false)?;
    let rgb = reader()?.decode().map_err(|e| e.to_string())?.to_rgb8();
    Ok((rgb.width() as usize, rgb.height() as usize, rgb.into_raw()))
}

/// What the `image` crate may allocate for one picture: RGBA at [`MAX_IMAGE_PIXELS`].
fn limits_for_decode() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(4 * MAX_IMAGE_PIXELS as u64);
    limits
}

/// libjpeg's message for the error or warning it is reporting.
fn libjpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    let mut buffer = [0u8; 80];
    // SAFETY: `err` is the error manager libjpeg is calling us from; `format_message` writes at
    // most 80 bytes (JMSG_LENGTH_MAX) into the buffer, which mozjpeg-sys declares `&[u8; 80]`.
    unsafe {
        let Some(format) = cinfo.err.as_ref().and_then(|e| e.format_message) else {
            return "libjpeg error".into();
        };
        let format: unsafe extern "C-unwind" fn(
            &mut mozjpeg_sys::jpeg_common_struct,
            &mut [u8; 80],
        ) = std::mem::transmute(format);
        format(cinfo, &mut buffer);
    }
    let text = buffer.split(|&c| c == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

extern "C-unwind" fn libjpeg_error(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    std::panic::resume_unwind(Box::new(libjpeg_message(cinfo)));
}

/// Warnings (level -1: premature end, bad Huffman codes, corrupt data) unwind like errors;
/// trace messages (level >= 0) are dropped, and so are stray bytes before a marker (every
/// pixel was decoded when libjpeg meets them; PIL and OpenCV decode such files alike, and so
/// does the fast path).
extern "C-unwind" fn libjpeg_warning(cinfo: &mut mozjpeg_sys::jpeg_common_struct, level: c_int) {
    if level < 0 {
        let message = libjpeg_message(cinfo);
        if !message.contains("extraneous bytes before marker") {
            std::panic::resume_unwind(Box::new(format!("libjpeg warning: {message}")));
        }
    }
}

/// libjpeg reports errors (and here warnings) by unwinding out of its C frames
/// (mozjpeg-sys's `unwinding`); they are caught here and become an `Err`.
pub(crate) fn decode_jpeg_libjpeg(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let decode = || -> std::io::Result<(usize, usize, Vec<u8>)> {
        // SAFETY: a zeroed jpeg_error_mgr is what jpeg_std_error expects to fill in.
        let mut errors: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
        // SAFETY: `errors` is a live, writable error manager for libjpeg to fill in.
        unsafe { mozjpeg_sys::jpeg_std_error(&mut errors) };
        errors.error_exit = Some(libjpeg_error);
        errors.emit_message = Some(libjpeg_warning);
        let header = mozjpeg::Decompress::with_err(errors).from_mem(bytes)?;
        let (w, h) = (header.width(), header.height());
        check_declared_size(w, h, bytes.len(), true)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut started = header.rgb()?;
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
