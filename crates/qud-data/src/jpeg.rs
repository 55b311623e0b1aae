//! Fast decoding of the JPEGs face datasets are made of (baseline, 8-bit, Huffman-coded, one
//! interleaved YCbCr scan at 4:2:0, 4:2:2 or 4:4:4), bit-identical to libjpeg-turbo's default
//! decompression, which PIL, OpenCV and MXNet use: the accurate integer IDCT (`jidctint.c`),
//! "fancy" triangle-filter chroma upsampling (`jdsample.c`) and its fixed-point YCbCr to RGB
//! (`jdcolor.c`). Every other JPEG (progressive, arithmetic-coded, restart intervals, grayscale,
//! CMYK, Adobe-transformed, truncated or corrupt) gets `None`, and the caller hands it to libjpeg
//! itself, so this path only ever changes speed, never pixels.
//!
//! Why a decoder of our own: the libjpeg-turbo build the `mozjpeg` crate gives us runs its plain C
//! paths (its x86 SIMD is NASM assembly, absent on a fresh machine), and its IDCT, upsampling and
//! colour conversion were about half of the data loader's time. Here the IDCT runs eight columns
//! (then eight rows) at a time in 32-bit lanes, the same integer arithmetic in the same order as
//! `jidctint.c`, so the bits are the same; compiled for AVX2 where the CPU has it.
//!
//! Format: ITU-T T.81 (<https://www.w3.org/Graphics/JPEG/itu-t81.pdf>).

use std::cell::RefCell;
use std::rc::Rc;

/// Natural (row-major) position of the k-th coefficient in zig-zag order.
const ZIGZAG: [u8; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Bits a Huffman code is looked up with in one step; longer codes take the canonical slow path.
const LOOKAHEAD: u32 = 10;

/// The zero run [`Huffman::coefficient`] gives the end-of-block code.
const END_OF_BLOCK: i32 = 0xFF;

/// A decoded image, RGB interleaved, row-major.
pub(crate) struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decode `bytes` if it is a JPEG of the kind this module handles, else `None` (hand it to
/// libjpeg).
pub(crate) fn decode(bytes: &[u8]) -> Option<Rgb> {
    let frame = Frame::parse(bytes)?;
    // An implausible size goes to libjpeg, which refuses it from the header with the reason.
    crate::image_ops::check_declared_size(frame.width, frame.height, bytes.len(), true).ok()?;
    let planes = dispatch_scan(&frame, bytes)?;
    let mut pixels = vec![0u8; frame.width * frame.height * 3];
    dispatch_interleave(&frame, &planes, &mut pixels);
    Some(Rgb {
        width: frame.width,
        height: frame.height,
        pixels,
    })
}

/// Decode `bytes`, if it is a JPEG of the kind this module handles and `width` x `height`,
/// straight into the networks' input layout: CHW floats `(v / 255 - 0.5) / 0.5` (torchvision's
/// `ToTensor` + `Normalize(0.5, 0.5)`, bit for bit), mirrored when `flip`. `out` holds
/// `3 * width * height` floats. `false`: not decoded, `out` untouched.
pub(crate) fn decode_normalized(
    bytes: &[u8],
    (width, height): (usize, usize),
    flip: bool,
    out: &mut [f32],
) -> bool {
    let Some(frame) = Frame::parse(bytes) else {
        return false;
    };
    if (frame.width, frame.height) != (width, height) || out.len() != 3 * width * height {
        return false;
    }
    let Some(planes) = dispatch_scan(&frame, bytes) else {
        return false;
    };
    dispatch_normalized(&frame, &planes, flip, out);
    true
}

/// Whether the CPU has AVX2 (a cached check).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Canonical Huffman table, as `jdhuff.c` derives it: a one-step lookup for codes of up to
/// [`LOOKAHEAD`] bits, `maxcode`/`valoffset` per length for the rest.
#[derive(Clone)]
struct Huffman {
    /// `(length << 8) | symbol`, or 0 when the code is longer than the lookahead.
    lookup: Box<[u16; 1 << LOOKAHEAD]>,
    /// For AC tables: where a code and the coefficient bits after it both fit in the lookahead,
    /// `(coefficient << 16) | (zero run << 8) | bits used`; for the end-of-block code,
    /// `(END_OF_BLOCK << 8) | bits used`; else 0.
    coefficient: Box<[i32; 1 << LOOKAHEAD]>,
    maxcode: [i32; 18],
    valoffset: [i32; 17],
    values: [u8; 256],
}

impl Huffman {
    /// The table a DHT entry (`counts` then `symbols`) defines, from a small per-thread cache:
    /// a dataset's JPEGs share a handful of tables, and building one costs more than decoding
    /// a block.
    fn cached(spec: &[u8], is_dc: bool) -> Option<Rc<Self>> {
        thread_local! {
            static TABLES: RefCell<Vec<CachedTable>> = const { RefCell::new(Vec::new()) };
        }
        TABLES.with_borrow_mut(|tables| {
            if let Some((_, _, table)) = tables
                .iter()
                .find(|(dc, bytes, _)| *dc == is_dc && bytes == spec)
            {
                return Some(table.clone());
            }
            let counts: &[u8; 16] = spec[..16].try_into().ok()?;
            let table = Rc::new(Huffman::new(counts, &spec[16..], is_dc)?);
            if tables.len() == 16 {
                tables.remove(0);
            }
            tables.push((is_dc, spec.to_vec(), table.clone()));
            Some(table)
        })
    }

    /// `None` for a table libjpeg would refuse (too many symbols, codes that overflow).
    fn new(counts: &[u8; 16], symbols: &[u8], is_dc: bool) -> Option<Self> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total > 256 || symbols.len() != total || (is_dc && symbols.iter().any(|&s| s > 11)) {
            return None;
        }
        let mut values = [0u8; 256];
        values[..total].copy_from_slice(symbols);
        let mut lookup = Box::new([0u16; 1 << LOOKAHEAD]);
        let mut maxcode = [-1i32; 18];
        let mut valoffset = [0i32; 17];
        let (mut code, mut index) = (0i32, 0usize);
        for length in 1..=16usize {
            let count = counts[length - 1] as usize;
            if count > 0 {
                valoffset[length] = index as i32 - code;
                // More codes of this length than it has (T.81 C): libjpeg refuses the table.
                if code + count as i32 > 1 << length {
                    return None;
                }
                for _ in 0..count {
                    if length as u32 <= LOOKAHEAD {
                        let shift = LOOKAHEAD - length as u32;
                        let first = (code as usize) << shift;
                        let entry = ((length as u16) << 8) | values[index] as u16;
                        lookup[first..first + (1 << shift)].fill(entry);
                    }
                    code += 1;
                    index += 1;
                }
                maxcode[length] = code - 1;
            }
            if code >= 1 << length {
                return None;
            }
            code <<= 1;
        }
        maxcode[17] = i32::MAX;
        let mut coefficient = Box::new([0i32; 1 << LOOKAHEAD]);
        for (prefix, slot) in coefficient.iter_mut().enumerate() {
            let entry = lookup[prefix];
            let (length, run, size) = ((entry >> 8) as u32, (entry >> 4) & 15, entry & 15);
            if is_dc || entry == 0 || length + size as u32 > LOOKAHEAD {
                continue;
            }
            if size == 0 {
                if run == 0 {
                    *slot = (END_OF_BLOCK << 8) | length as i32;
                }
                continue;
            }
            let raw = (prefix >> (LOOKAHEAD - length - size as u32)) as i32 & ((1 << size) - 1);
            let value = extend(raw, size as u32);
            *slot = (value << 16) | ((run as i32) << 8) | (length + size as u32) as i32;
        }
        Some(Self {
            lookup,
            coefficient,
            maxcode,
            valoffset,
            values,
        })
    }
}

/// A built table and what built it: `(is DC, the DHT entry's bytes, table)`.
type CachedTable = (bool, Vec<u8>, Rc<Huffman>);

/// One colour component of the frame.
#[derive(Clone, Copy)]
struct Component {
    h: usize,
    v: usize,
    quant: usize,
    dc_table: usize,
    ac_table: usize,
}

/// Everything before the entropy-coded data, checked to be the case this module decodes.
struct Frame {
    width: usize,
    height: usize,
    components: [Component; 3],
    /// Dequantisation multipliers in natural order.
    quant: [[i32; 64]; 4],
    dc: [Option<Rc<Huffman>>; 4],
    ac: [Option<Rc<Huffman>>; 4],
    /// Offset of the first entropy-coded byte.
    scan_start: usize,
}

impl Frame {
    fn parse(bytes: &[u8]) -> Option<Self> {
        if !bytes.starts_with(&[0xFF, 0xD8]) {
            return None;
        }
        let mut frame = Frame {
            width: 0,
            height: 0,
            components: [Component {
                h: 0,
                v: 0,
                quant: 0,
                dc_table: 0,
                ac_table: 0,
            }; 3],
            quant: [[0; 64]; 4],
            dc: [None, None, None, None],
            ac: [None, None, None, None],
            scan_start: 0,
        };
        let (mut pos, mut ids, mut saw_frame, mut saw_jfif) = (2usize, [0u8; 3], false, false);
        let mut quant_defined = [false; 4];
        loop {
            if *bytes.get(pos)? != 0xFF {
                return None;
            }
            while *bytes.get(pos + 1)? == 0xFF {
                pos += 1;
            }
            let marker = bytes[pos + 1];
            let length = u16::from_be_bytes([*bytes.get(pos + 2)?, *bytes.get(pos + 3)?]) as usize;
            let body = bytes.get(pos + 4..pos + 2 + length)?;
            if length < 2 {
                return None;
            }
            match marker {
                0xE0 => saw_jfif |= body.starts_with(b"JFIF\0"),
                // Adobe APP14 carries a colour transform flag; libjpeg honours it.
                0xEE if body.starts_with(b"Adobe") => return None,
                0xE1..=0xEF | 0xFE => {}
                0xDB => {
                    let mut rest = body;
                    while let Some((&pq_tq, tail)) = rest.split_first() {
                        let (precision, slot) = ((pq_tq >> 4) as usize, (pq_tq & 15) as usize);
                        let size = if precision == 0 { 64 } else { 128 };
                        if precision > 1 || slot > 3 || tail.len() < size {
                            return None;
                        }
                        for (k, &natural) in ZIGZAG.iter().enumerate() {
                            frame.quant[slot][natural as usize] = if precision == 0 {
                                tail[k] as i32
                            } else {
                                u16::from_be_bytes([tail[2 * k], tail[2 * k + 1]]) as i32
                            };
                        }
                        quant_defined[slot] = true;
                        rest = &tail[size..];
                    }
                }
                0xC4 => {
                    let mut rest = body;
                    while let Some((&tc_th, tail)) = rest.split_first() {
                        let (class, slot) = (tc_th >> 4, (tc_th & 15) as usize);
                        let counts: &[u8; 16] = tail.get(..16)?.try_into().ok()?;
                        let total: usize = counts.iter().map(|&c| c as usize).sum();
                        if tail.len() < 16 + total {
                            return None;
                        }
                        if class > 1 || slot > 3 {
                            return None;
                        }
                        let table = Some(Huffman::cached(&tail[..16 + total], class == 0)?);
                        if class == 0 {
                            frame.dc[slot] = table;
                        } else {
                            frame.ac[slot] = table;
                        }
                        rest = &tail[16 + total..];
                    }
                }
                0xDD => {
                    // Restart intervals: libjpeg's path handles them.
                    if u16::from_be_bytes([*body.first()?, *body.get(1)?]) != 0 {
                        return None;
                    }
                }
                0xC0 | 0xC1 => {
                    if saw_frame || body.len() != 6 + 3 * 3 || body[0] != 8 || body[5] != 3 {
                        return None;
                    }
                    saw_frame = true;
                    frame.height = u16::from_be_bytes([body[1], body[2]]) as usize;
                    frame.width = u16::from_be_bytes([body[3], body[4]]) as usize;
                    for (c, spec) in body[6..].chunks_exact(3).enumerate() {
                        ids[c] = spec[0];
                        frame.components[c].h = (spec[1] >> 4) as usize;
                        frame.components[c].v = (spec[1] & 15) as usize;
                        frame.components[c].quant = spec[2] as usize;
                        if spec[2] > 3 {
                            return None;
                        }
                    }
                    let [y, cb, cr] = frame.components;
                    let sampling_ok = matches!((y.h, y.v), (1, 1) | (2, 1) | (2, 2))
                        && [cb, cr].iter().all(|c| c.h == 1 && c.v == 1);
                    // Below 3 chroma columns libjpeg upsamples without the triangle filter.
                    if !sampling_ok || frame.width < 6 || frame.height == 0 {
                        return None;
                    }
                    // Without JFIF, components named R, G, B mean libjpeg reads RGB.
                    if !saw_jfif && ids == *b"RGB" {
                        return None;
                    }
                }
                0xDA => {
                    if !saw_frame || body.len() != 1 + 2 * 3 + 3 || body[0] != 3 {
                        return None;
                    }
                    for (c, spec) in body[1..7].chunks_exact(2).enumerate() {
                        if spec[0] != ids[c] {
                            return None;
                        }
                        let (dc, ac) = ((spec[1] >> 4) as usize, (spec[1] & 15) as usize);
                        if dc > 3 || ac > 3 {
                            return None;
                        }
                        frame.components[c].dc_table = dc;
                        frame.components[c].ac_table = ac;
                        if frame.dc[dc].is_none() || frame.ac[ac].is_none() {
                            return None;
                        }
                    }
                    // Spectral selection 0..63, no successive approximation: sequential.
                    if body[7..] != [0, 63, 0] {
                        return None;
                    }
                    if frame.components.iter().any(|c| !quant_defined[c.quant]) {
                        return None;
                    }
                    frame.scan_start = pos + 2 + length;
                    return Some(frame);
                }
                _ => return None,
            }
            pos += 2 + length;
        }
    }

    /// MCUs across and down.
    fn mcus(&self) -> (usize, usize) {
        let y = self.components[0];
        (self.width.div_ceil(8 * y.h), self.height.div_ceil(8 * y.v))
    }
}

/// MSB-first reader of entropy-coded bytes: removes the stuffed zero after each 0xFF and, at a
/// marker or the end of the data, feeds zero bytes and counts them, so that a scan that needed
/// them (a truncated or corrupt one) is noticed afterwards.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    count: u32,
    padding: u32,
}

impl<'a> Bits<'a> {
    /// Top up to at least 56 buffered bits: several bytes in one load when the next eight hold
    /// no 0xFF (no stuffing, no marker), else byte by byte.
    #[inline(always)]
    fn refill(&mut self) {
        if let Some(chunk) = self.data.get(self.pos..self.pos + 8) {
            let word = u64::from_be_bytes(chunk.try_into().expect("eight bytes"));
            let inverted = !word;
            let has_ff =
                inverted.wrapping_sub(0x0101_0101_0101_0101) & !inverted & 0x8080_8080_8080_8080
                    != 0;
            if !has_ff {
                let bytes = (63 - self.count) / 8;
                let count = self.count + 8 * bytes;
                self.acc |= (word >> self.count) & (u64::MAX << (64 - count));
                self.pos += bytes as usize;
                self.count = count;
                return;
            }
        }
        self.refill_bytewise();
    }

    fn refill_bytewise(&mut self) {
        while self.count <= 56 {
            let byte = match self.data.get(self.pos) {
                Some(&0xFF) if self.data.get(self.pos + 1) == Some(&0) => {
                    self.pos += 2;
                    0xFF
                }
                Some(&0xFF) | None => {
                    self.padding += 1;
                    0
                }
                Some(&byte) => {
                    self.pos += 1;
                    byte
                }
            };
            self.acc |= (byte as u64) << (56 - self.count);
            self.count += 8;
        }
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.count -= n;
    }

    /// The next Huffman symbol. The caller guarantees 16 buffered bits.
    #[inline(always)]
    fn symbol(&mut self, table: &Huffman) -> Option<u8> {
        let entry = table.lookup[(self.acc >> (64 - LOOKAHEAD)) as usize];
        if entry != 0 {
            self.consume((entry >> 8) as u32);
            return Some(entry as u8);
        }
        let mut length = LOOKAHEAD as usize + 1;
        let mut code = (self.acc >> (64 - length)) as i32;
        while code > table.maxcode[length] {
            length += 1;
            code = (self.acc >> (64 - length)) as i32;
        }
        if length > 16 {
            return None;
        }
        self.consume(length as u32);
        Some(table.values[(code + table.valoffset[length]) as usize & 255])
    }

    /// `bits` more bits as a signed coefficient. `bits` is 1..=15.
    #[inline(always)]
    fn signed(&mut self, bits: u32) -> i32 {
        let raw = (self.acc >> (64 - bits)) as i32;
        self.consume(bits);
        extend(raw, bits)
    }

    /// The next AC coefficient as `(zero run, value)` when its code and value bits are within
    /// the lookahead (most of them), or `(END_OF_BLOCK, 0)`, consumed; else `None`, nothing
    /// consumed.
    #[inline(always)]
    fn small_coefficient(&mut self, table: &Huffman) -> Option<(usize, i32)> {
        let entry = table.coefficient[(self.acc >> (64 - LOOKAHEAD)) as usize];
        if entry == 0 {
            return None;
        }
        self.consume((entry & 255) as u32);
        Some((((entry >> 8) & 255) as usize, entry >> 16))
    }

    /// Whether every bit used came from the data, none from the padding, and the scan ends at
    /// the end-of-image marker (after which libjpeg reads nothing); other markers there (which
    /// libjpeg may refuse) are left to libjpeg.
    fn ended_cleanly(&self) -> bool {
        let mut at = self.pos;
        while let Some(&byte) = self.data.get(at) {
            if byte == 0xFF && self.data.get(at + 1) != Some(&0) {
                break;
            }
            at += if byte == 0xFF { 2 } else { 1 };
        }
        while self.data.get(at) == Some(&0xFF) && self.data.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        self.count >= 8 * self.padding && self.data.get(at..at + 2) == Some(&[0xFF, 0xD9])
    }
}

/// T.81 F.2.2.1 EXTEND: `bits` raw bits of a coefficient as its signed value.
#[inline(always)]
fn extend(raw: i32, bits: u32) -> i32 {
    if raw < 1 << (bits - 1) {
        raw - (1 << bits) + 1
    } else {
        raw
    }
}

/// Samples of the three components after the IDCT, each padded to whole MCUs.
struct Planes {
    samples: [Vec<u8>; 3],
    strides: [usize; 3],
}

fn dispatch_scan(frame: &Frame, bytes: &[u8]) -> Option<Planes> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2")]
        fn avx2(frame: &Frame, bytes: &[u8]) -> Option<Planes> {
            decode_scan::<true>(frame, bytes)
        }
        // SAFETY: the CPU has AVX2, the only feature `avx2` was compiled for.
        return unsafe { avx2(frame, bytes) };
    }
    decode_scan::<false>(frame, bytes)
}

/// Entropy-decode the scan block by block, dequantise, and inverse-transform each block into its
/// component's plane. `AVX2`: the CPU has AVX2 (the caller checked), use its IDCT.
#[inline(always)]
fn decode_scan<const AVX2: bool>(frame: &Frame, bytes: &[u8]) -> Option<Planes> {
    let (mcus_x, mcus_y) = frame.mcus();
    let strides = frame.components.map(|c| mcus_x * c.h * 8);
    let mut samples = [0, 1, 2].map(|c| {
        let component = frame.components[c];
        vec![0u8; strides[c] * mcus_y * component.v * 8]
    });
    let mut bits = Bits {
        data: bytes.get(frame.scan_start..)?,
        pos: 0,
        acc: 0,
        count: 0,
        padding: 0,
    };
    let mut predictions = [0i32; 3];
    let mut block = [0i32; 64];
    for mcu_y in 0..mcus_y {
        for mcu_x in 0..mcus_x {
            for (c, component) in frame.components.iter().enumerate() {
                let dc_table = frame.dc[component.dc_table].as_ref()?;
                let ac_table = frame.ac[component.ac_table].as_ref()?;
                let quant = &frame.quant[component.quant];
                for v in 0..component.v {
                    for h in 0..component.h {
                        if bits.count < 32 {
                            bits.refill();
                        }
                        let size = bits.symbol(dc_table)? as u32;
                        if size > 0 {
                            predictions[c] += bits.signed(size);
                        }
                        // libjpeg keeps coefficients as 16-bit integers.
                        if i16::try_from(predictions[c]).is_err() {
                            return None;
                        }
                        block[0] = predictions[c].wrapping_mul(quant[0]);
                        let mut k = 1;
                        let mut dc_only = true;
                        while k < 64 {
                            if bits.count < 32 {
                                bits.refill();
                            }
                            if let Some((run, value)) = bits.small_coefficient(ac_table) {
                                if run == END_OF_BLOCK as usize {
                                    break;
                                }
                                k += run;
                                if k > 63 {
                                    return None;
                                }
                                let natural = ZIGZAG[k] as usize & 63;
                                block[natural] = value.wrapping_mul(quant[natural]);
                                dc_only = false;
                                k += 1;
                                continue;
                            }
                            let run_size = bits.symbol(ac_table)?;
                            let (run, size) = ((run_size >> 4) as usize, (run_size & 15) as u32);
                            if size == 0 {
                                if run != 15 {
                                    break;
                                }
                                k += 16;
                                continue;
                            }
                            k += run;
                            if k > 63 {
                                return None;
                            }
                            let natural = ZIGZAG[k] as usize & 63;
                            block[natural] = bits.signed(size).wrapping_mul(quant[natural]);
                            dc_only = false;
                            k += 1;
                        }
                        let (x, y) = ((mcu_x * component.h + h) * 8, (mcu_y * component.v + v) * 8);
                        let stride = strides[c];
                        let out = &mut samples[c][y * stride + x..];
                        if dc_only {
                            if block[0].unsigned_abs() > IDCT_SAFE_INPUT {
                                return None;
                            }
                            // jidctint.c's all-zero-AC shortcuts in both passes, combined.
                            let level = idct_sample(((block[0] << 2) + 16) >> 5);
                            for row in out.chunks_mut(stride).take(8) {
                                row[..8].fill(level);
                            }
                        } else {
                            idct(AVX2, &block, out, stride)?;
                        }
                        block = [0; 64];
                    }
                }
            }
        }
    }
    bits.ended_cleanly().then_some(Planes { samples, strides })
}

#[inline(always)]
fn range_limit(value: i32) -> u8 {
    value.clamp(0, 255) as u8
}

/// An IDCT output (centred on 0) as a sample, the way `jidctint.c` indexes its range-limit
/// table with 10 bits: -128..=127 becomes 0..=255, further out clamps up to 384 away and wraps
/// beyond that. Real images never leave the clamping range; corrupt ones decode as libjpeg's C
/// decodes them.
#[inline(always)]
fn idct_sample(value: i32) -> u8 {
    range_limit((value.wrapping_add(512) & 1023) - 384)
}

/// Eight 32-bit lanes: one row (or, after the transpose, one column) of a block.
#[derive(Clone, Copy)]
struct Lanes([i32; 8]);

impl Lanes {
    #[inline(always)]
    fn map2(self, other: Lanes, f: impl Fn(i32, i32) -> i32) -> Lanes {
        Lanes(std::array::from_fn(|i| f(self.0[i], other.0[i])))
    }
    #[inline(always)]
    fn add(self, other: Lanes) -> Lanes {
        self.map2(other, i32::wrapping_add)
    }
    #[inline(always)]
    fn sub(self, other: Lanes) -> Lanes {
        self.map2(other, i32::wrapping_sub)
    }
    #[inline(always)]
    fn mul(self, constant: i32) -> Lanes {
        self.map2(self, |a, _| a.wrapping_mul(constant))
    }
    #[inline(always)]
    fn shl(self, bits: u32) -> Lanes {
        self.map2(self, |a, _| a.wrapping_shl(bits))
    }
    /// `jidctint.c`'s DESCALE: add half, shift right arithmetically.
    #[inline(always)]
    fn descale(self, bits: u32) -> Lanes {
        self.map2(self, |a, _| a.wrapping_add(1 << (bits - 1)) >> bits)
    }
}

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;

/// `jidctint.c`'s `FIX(x)`: `x` in 13-bit fixed point, rounded.
const fn fix(x: f64) -> i32 {
    (x * (1 << CONST_BITS) as f64 + 0.5) as i32
}

/// The one-dimensional 8-point IDCT of `jidctint.c` (Loeffler, Ligtenberg and Moschytz), on eight
/// lanes at once; `input[k]` holds frequency k, output `[k]` sample k, before descaling.
#[inline(always)]
fn idct_1d(input: &[Lanes; 8]) -> [Lanes; 8] {
    // Even part.
    let (z2, z3) = (input[2], input[6]);
    let z1 = z2.add(z3).mul(fix(0.541196100));
    let tmp2 = z1.add(z3.mul(-fix(1.847759065)));
    let tmp3 = z1.add(z2.mul(fix(0.765366865)));
    let tmp0 = input[0].add(input[4]).shl(CONST_BITS);
    let tmp1 = input[0].sub(input[4]).shl(CONST_BITS);
    let (tmp10, tmp13) = (tmp0.add(tmp3), tmp0.sub(tmp3));
    let (tmp11, tmp12) = (tmp1.add(tmp2), tmp1.sub(tmp2));
    // Odd part.
    let (tmp0, tmp1, tmp2, tmp3) = (input[7], input[5], input[3], input[1]);
    let z1 = tmp0.add(tmp3);
    let z2 = tmp1.add(tmp2);
    let z3 = tmp0.add(tmp2);
    let z4 = tmp1.add(tmp3);
    let z5 = z3.add(z4).mul(fix(1.175875602));
    let tmp0 = tmp0.mul(fix(0.298631336));
    let tmp1 = tmp1.mul(fix(2.053119869));
    let tmp2 = tmp2.mul(fix(3.072711026));
    let tmp3 = tmp3.mul(fix(1.501321110));
    let z1 = z1.mul(-fix(0.899976223));
    let z2 = z2.mul(-fix(2.562915447));
    let z3 = z3.mul(-fix(1.961570560)).add(z5);
    let z4 = z4.mul(-fix(0.390180644)).add(z5);
    let tmp0 = tmp0.add(z1.add(z3));
    let tmp1 = tmp1.add(z2.add(z4));
    let tmp2 = tmp2.add(z2.add(z3));
    let tmp3 = tmp3.add(z1.add(z4));
    [
        tmp10.add(tmp3),
        tmp11.add(tmp2),
        tmp12.add(tmp1),
        tmp13.add(tmp0),
        tmp13.sub(tmp0),
        tmp12.sub(tmp1),
        tmp11.sub(tmp2),
        tmp10.sub(tmp3),
    ]
}

#[inline(always)]
fn transpose(rows: &[Lanes; 8]) -> [Lanes; 8] {
    std::array::from_fn(|c| Lanes(std::array::from_fn(|r| rows[r].0[c])))
}

/// Largest input magnitude for which no step of [`idct_1d`] leaves 32 bits: its worst
/// intermediate sums 61,214 times the largest input (the L1 norm of its rows, computed term by
/// term), plus the rounding half. Within it the 32-bit lanes give exactly `jidctint.c`'s 64-bit
/// results; blocks beyond it (only corrupt or adversarial files have them) go to libjpeg.
const IDCT_SAFE_INPUT: u32 = 35_079;

#[inline(always)]
fn peak_magnitude(lanes: &[Lanes; 8]) -> u32 {
    let mut peak = [0u32; 8];
    for row in lanes {
        for (p, &v) in peak.iter_mut().zip(row.0.iter()) {
            *p = (*p).max(v.unsigned_abs());
        }
    }
    peak.into_iter().max().unwrap_or(0)
}

/// `jpeg_idct_islow` of a dequantised block (natural order) into 8x8 samples at `out`; `None`
/// when the block's values are beyond [`IDCT_SAFE_INPUT`].
#[inline(always)]
fn idct_islow(block: &[i32; 64], out: &mut [u8], stride: usize) -> Option<()> {
    let rows: [Lanes; 8] = std::array::from_fn(|r| {
        let mut lanes = [0; 8];
        lanes.copy_from_slice(&block[r * 8..r * 8 + 8]);
        Lanes(lanes)
    });
    // Pass 1 works down the columns: lane c of every row vector is column c.
    if peak_magnitude(&rows) > IDCT_SAFE_INPUT {
        return None;
    }
    let workspace = idct_1d(&rows).map(|lanes| lanes.descale(CONST_BITS - PASS1_BITS));
    if peak_magnitude(&workspace) > IDCT_SAFE_INPUT {
        return None;
    }
    let columns = transpose(&workspace);
    // Pass 2 along the rows of the workspace: lane r is row r.
    let samples = idct_1d(&columns).map(|lanes| lanes.descale(CONST_BITS + PASS1_BITS + 3));
    let rows = transpose(&samples);
    for (row, lanes) in out.chunks_mut(stride).zip(rows.iter()) {
        for (sample, &value) in row[..8].iter_mut().zip(lanes.0.iter()) {
            *sample = idct_sample(value);
        }
    }
    Some(())
}

/// [`idct_islow`], on AVX2 when `avx2` (which the caller has checked the CPU has).
#[inline(always)]
fn idct(avx2: bool, block: &[i32; 64], out: &mut [u8], stride: usize) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        assert!(out.len() >= 7 * stride + 8, "an 8x8 block inside the plane");
        // SAFETY: the caller passes `avx2` only after checking that the CPU has AVX2; `out`
        // holds the 8 rows of 8 samples the function writes (asserted above).
        return unsafe { avx2_idct::idct_islow(block, out.as_mut_ptr(), stride) };
    }
    let _ = avx2;
    idct_islow(block, out, stride)
}

/// [`idct_islow`] in AVX2 registers: the same operations on the same 32-bit lanes, eight at a
/// time, with register transposes between the passes (the portable version's arrays compile to
/// scalar shuffles).
#[cfg(target_arch = "x86_64")]
mod avx2_idct {
    use super::{fix, CONST_BITS, IDCT_SAFE_INPUT, PASS1_BITS};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2")]
    fn mul(a: __m256i, constant: i32) -> __m256i {
        _mm256_mullo_epi32(a, _mm256_set1_epi32(constant))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn descale<const BITS: i32>(a: __m256i) -> __m256i {
        _mm256_srai_epi32::<BITS>(_mm256_add_epi32(a, _mm256_set1_epi32(1 << (BITS - 1))))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn add(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(a, b)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn sub(a: __m256i, b: __m256i) -> __m256i {
        _mm256_sub_epi32(a, b)
    }

    /// Whether every lane's magnitude is within [`IDCT_SAFE_INPUT`].
    #[inline]
    #[target_feature(enable = "avx2")]
    fn within_safe_range(v: &[__m256i; 8]) -> bool {
        let mut peak = _mm256_abs_epi32(v[0]);
        for &x in &v[1..] {
            peak = _mm256_max_epu32(peak, _mm256_abs_epi32(x));
        }
        let limit = _mm256_set1_epi32(IDCT_SAFE_INPUT as i32);
        _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(peak, limit), limit)) == -1
    }

    /// `super::idct_1d` on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn idct_1d(x: &[__m256i; 8]) -> [__m256i; 8] {
        let (z2, z3) = (x[2], x[6]);
        let z1 = mul(add(z2, z3), fix(0.541196100));
        let tmp2 = add(z1, mul(z3, -fix(1.847759065)));
        let tmp3 = add(z1, mul(z2, fix(0.765366865)));
        let tmp0 = _mm256_slli_epi32::<{ CONST_BITS as i32 }>(add(x[0], x[4]));
        let tmp1 = _mm256_slli_epi32::<{ CONST_BITS as i32 }>(sub(x[0], x[4]));
        let (tmp10, tmp13) = (add(tmp0, tmp3), sub(tmp0, tmp3));
        let (tmp11, tmp12) = (add(tmp1, tmp2), sub(tmp1, tmp2));
        let (tmp0, tmp1, tmp2, tmp3) = (x[7], x[5], x[3], x[1]);
        let z1 = add(tmp0, tmp3);
        let z2 = add(tmp1, tmp2);
        let z3 = add(tmp0, tmp2);
        let z4 = add(tmp1, tmp3);
        let z5 = mul(add(z3, z4), fix(1.175875602));
        let tmp0 = mul(tmp0, fix(0.298631336));
        let tmp1 = mul(tmp1, fix(2.053119869));
        let tmp2 = mul(tmp2, fix(3.072711026));
        let tmp3 = mul(tmp3, fix(1.501321110));
        let z1 = mul(z1, -fix(0.899976223));
        let z2 = mul(z2, -fix(2.562915447));
        let z3 = add(mul(z3, -fix(1.961570560)), z5);
        let z4 = add(mul(z4, -fix(0.390180644)), z5);
        let tmp0 = add(tmp0, add(z1, z3));
        let tmp1 = add(tmp1, add(z2, z4));
        let tmp2 = add(tmp2, add(z2, z3));
        let tmp3 = add(tmp3, add(z1, z4));
        [
            add(tmp10, tmp3),
            add(tmp11, tmp2),
            add(tmp12, tmp1),
            add(tmp13, tmp0),
            sub(tmp13, tmp0),
            sub(tmp12, tmp1),
            sub(tmp11, tmp2),
            sub(tmp10, tmp3),
        ]
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose(r: &[__m256i; 8]) -> [__m256i; 8] {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        [
            _mm256_permute2x128_si256::<0x20>(u0, u4),
            _mm256_permute2x128_si256::<0x20>(u1, u5),
            _mm256_permute2x128_si256::<0x20>(u2, u6),
            _mm256_permute2x128_si256::<0x20>(u3, u7),
            _mm256_permute2x128_si256::<0x31>(u0, u4),
            _mm256_permute2x128_si256::<0x31>(u1, u5),
            _mm256_permute2x128_si256::<0x31>(u2, u6),
            _mm256_permute2x128_si256::<0x31>(u3, u7),
        ]
    }

    /// Four rows of eight IDCT outputs as four rows of eight samples, `super::idct_sample` on
    /// each (wrap to 10 bits, then saturate), written at `out`, `stride` apart.
    ///
    /// # Safety
    /// AVX2; `out` valid for 4 rows of 8 bytes, `stride` apart.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_rows(rows: &[__m256i], out: *mut u8, stride: usize) {
        let wrap = |v: __m256i| {
            _mm256_sub_epi32(
                _mm256_and_si256(
                    _mm256_add_epi32(v, _mm256_set1_epi32(512)),
                    _mm256_set1_epi32(1023),
                ),
                _mm256_set1_epi32(384),
            )
        };
        let words01 = _mm256_packs_epi32(wrap(rows[0]), wrap(rows[1]));
        let words23 = _mm256_packs_epi32(wrap(rows[2]), wrap(rows[3]));
        let bytes = _mm256_packus_epi16(words01, words23);
        let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: a 256-bit vector is 32 plain bytes, as are four u64.
        let quads: [u64; 4] = unsafe { std::mem::transmute::<__m256i, [u64; 4]>(ordered) };
        for (r, quad) in quads.iter().enumerate() {
            // SAFETY: the caller guarantees 4 rows of 8 bytes at `out`, `stride` apart.
            unsafe { std::ptr::write_unaligned(out.add(r * stride) as *mut u64, *quad) };
        }
    }

    /// # Safety
    /// AVX2; `out` valid for 8 rows of 8 bytes, `stride` apart.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn idct_islow(block: &[i32; 64], out: *mut u8, stride: usize) -> Option<()> {
        let rows: [__m256i; 8] = std::array::from_fn(|r| {
            // SAFETY: row r of the 64-entry block, eight i32s.
            unsafe { _mm256_loadu_si256(block.as_ptr().add(8 * r) as *const __m256i) }
        });
        if !within_safe_range(&rows) {
            return None;
        }
        let pass1 = idct_1d(&rows);
        let workspace: [__m256i; 8] =
            std::array::from_fn(|i| descale::<{ (CONST_BITS - PASS1_BITS) as i32 }>(pass1[i]));
        if !within_safe_range(&workspace) {
            return None;
        }
        let pass2 = idct_1d(&transpose(&workspace));
        let samples: [__m256i; 8] =
            std::array::from_fn(|i| descale::<{ (CONST_BITS + PASS1_BITS + 3) as i32 }>(pass2[i]));
        let rows = transpose(&samples);
        // SAFETY: the caller guarantees 8 rows of 8 bytes at `out`, `stride` apart.
        unsafe {
            store_rows(&rows[..4], out, stride);
            store_rows(&rows[4..], out.add(4 * stride), stride);
        }
        Some(())
    }
}

/// `jdcolor.c`'s 16-bit fixed point `FIX(x)`.
const fn fix16(x: f64) -> i32 {
    (x * 65536.0 + 0.5) as i32
}

/// YCbCr to RGB exactly as `jdcolor.c`'s tables compute it (`y`, `cb`, `cr` one row each),
/// written as arithmetic so that it runs in vector lanes.
#[inline(always)]
fn ycc_to_rgb_row(y: &[u8], cb: &[u8], cr: &[u8], rgb: [&mut [u8]; 3]) {
    const HALF: i32 = 1 << 15;
    let [red, green, blue] = rgb;
    let n = y.len();
    let (cb, cr, red, green, blue) = (
        &cb[..n],
        &cr[..n],
        &mut red[..n],
        &mut green[..n],
        &mut blue[..n],
    );
    for x in 0..n {
        let (l, b, r) = (y[x] as i32, cb[x] as i32 - 128, cr[x] as i32 - 128);
        red[x] = range_limit(l + ((fix16(1.40200) * r + HALF) >> 16));
        green[x] = range_limit(l + ((-fix16(0.34414) * b + HALF - fix16(0.71414) * r) >> 16));
        blue[x] = range_limit(l + ((fix16(1.77200) * b + HALF) >> 16));
    }
}

/// Upsample the chroma planes to full resolution (`jdsample.c`'s fancy upsampling), convert
/// each row to RGB and hand it to `emit(row, [red, green, blue])`.
#[inline(always)]
fn rgb_rows(frame: &Frame, planes: &Planes, mut emit: impl FnMut(usize, [&[u8]; 3])) {
    let (width, height) = (frame.width, frame.height);
    let luma = frame.components[0];
    // Chroma samples that carry image, not MCU padding (libjpeg's `downsampled_width/height`).
    let chroma_width = width.div_ceil(luma.h);
    let chroma_height = height.div_ceil(luma.v);
    let mut cb = vec![0u8; width + 1];
    let mut cr = vec![0u8; width + 1];
    let mut sums = vec![0i32; chroma_width];
    let mut rgb = vec![0u8; 3 * width];
    for y in 0..height {
        for (c, upsampled) in [(1, &mut cb), (2, &mut cr)] {
            let stride = planes.strides[c];
            let plane = &planes.samples[c];
            let chroma_row = |row: usize| &plane[row * stride..row * stride + chroma_width];
            match (luma.h, luma.v) {
                (1, 1) => upsampled[..width].copy_from_slice(chroma_row(y)),
                (2, 1) => fancy_h2v1(chroma_row(y), upsampled),
                _ => {
                    // Output row 2i+0 leans on chroma row i-1, row 2i+1 on row i+1; at the
                    // image's edges the edge row stands in (libjpeg's context rows).
                    let nearest = y / 2;
                    let next = if y % 2 == 0 {
                        nearest.saturating_sub(1)
                    } else {
                        (nearest + 1).min(chroma_height - 1)
                    };
                    let (near, far) = (chroma_row(nearest), chroma_row(next));
                    for ((sum, &n), &f) in sums.iter_mut().zip(near).zip(far) {
                        *sum = 3 * n as i32 + f as i32;
                    }
                    fancy_h2v2(&sums, upsampled);
                }
            }
        }
        let luma_row = &planes.samples[0][y * planes.strides[0]..][..width];
        let (red, rest) = rgb.split_at_mut(width);
        let (green, blue) = rest.split_at_mut(width);
        ycc_to_rgb_row(luma_row, &cb, &cr, [red, green, blue]);
        emit(y, [&*red, &*green, &*blue]);
    }
}

/// The image as interleaved RGB rows into `out` (`3 * width * height` bytes).
#[inline(always)]
fn interleave(frame: &Frame, planes: &Planes, out: &mut [u8]) {
    let width = frame.width;
    rgb_rows(frame, planes, |y, [red, green, blue]| {
        let row = &mut out[3 * width * y..3 * width * (y + 1)];
        for (((pixel, &r), &g), &b) in row.chunks_exact_mut(3).zip(red).zip(green).zip(blue) {
            pixel.copy_from_slice(&[r, g, b]);
        }
    });
}

/// The image as the networks' input: CHW planes of `(v / 255 - 0.5) / 0.5`, mirrored left to
/// right when `flip`, into `out` (`3 * width * height` floats).
#[inline(always)]
fn normalized(frame: &Frame, planes: &Planes, flip: bool, out: &mut [f32]) {
    let (width, plane) = (frame.width, frame.width * frame.height);
    rgb_rows(frame, planes, |y, channels| {
        for (c, samples) in channels.iter().enumerate() {
            let row = &mut out[c * plane + y * width..c * plane + (y + 1) * width];
            if flip {
                for (value, &sample) in row.iter_mut().rev().zip(samples.iter()) {
                    *value = crate::image_ops::normalized_level(sample);
                }
            } else {
                for (value, &sample) in row.iter_mut().zip(samples.iter()) {
                    *value = crate::image_ops::normalized_level(sample);
                }
            }
        }
    });
}

fn dispatch_interleave(frame: &Frame, planes: &Planes, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2")]
        fn avx2(frame: &Frame, planes: &Planes, out: &mut [u8]) {
            interleave(frame, planes, out)
        }
        // SAFETY: the CPU has AVX2, the only feature `avx2` was compiled for.
        return unsafe { avx2(frame, planes, out) };
    }
    interleave(frame, planes, out)
}

fn dispatch_normalized(frame: &Frame, planes: &Planes, flip: bool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[target_feature(enable = "avx2")]
        fn avx2(frame: &Frame, planes: &Planes, flip: bool, out: &mut [f32]) {
            normalized(frame, planes, flip, out)
        }
        // SAFETY: the CPU has AVX2, the only feature `avx2` was compiled for.
        return unsafe { avx2(frame, planes, flip, out) };
    }
    normalized(frame, planes, flip, out)
}

/// `h2v1_fancy_upsample`: each chroma sample becomes two, 3/4 itself and 1/4 its neighbour.
/// Writes `2 * input.len()` samples.
#[inline(always)]
fn fancy_h2v1(input: &[u8], out: &mut [u8]) {
    let n = input.len();
    out[0] = input[0];
    out[1] = ((input[0] as i32 * 3 + input[1] as i32 + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let here = input[i] as i32 * 3;
        out[2 * i] = ((here + input[i - 1] as i32 + 1) >> 2) as u8;
        out[2 * i + 1] = ((here + input[i + 1] as i32 + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((input[n - 1] as i32 * 3 + input[n - 2] as i32 + 1) >> 2) as u8;
    out[2 * n - 1] = input[n - 1];
}

/// `h2v2_fancy_upsample` of one output row from its column sums (3 x nearer row + farther row):
/// 9/16, 3/16, 3/16, 1/16. Writes `2 * sums.len()` samples.
#[inline(always)]
fn fancy_h2v2(sums: &[i32], out: &mut [u8]) {
    let n = sums.len();
    out[0] = ((sums[0] * 4 + 8) >> 4) as u8;
    out[1] = ((sums[0] * 3 + sums[1] + 7) >> 4) as u8;
    for i in 1..n - 1 {
        let here = sums[i] * 3;
        out[2 * i] = ((here + sums[i - 1] + 8) >> 4) as u8;
        out[2 * i + 1] = ((here + sums[i + 1] + 7) >> 4) as u8;
    }
    out[2 * n - 2] = ((sums[n - 1] * 3 + sums[n - 2] + 8) >> 4) as u8;
    out[2 * n - 1] = ((sums[n - 1] * 4 + 7) >> 4) as u8;
}

#[cfg(test)]
mod tests {
    use super::decode;
    use crate::image_ops::decode_jpeg_libjpeg;
    use crate::FaceDataset;
    use proptest::prelude::*;

    /// A baseline JPEG as libjpeg-turbo's `cjpeg` writes it by default (mozjpeg's "fastest"
    /// profile is libjpeg-turbo's), at `quality`, chroma blocks of `chroma` pixels.
    fn baseline_jpeg(
        rgb: &[u8],
        (width, height): (usize, usize),
        quality: f32,
        chroma: (u8, u8),
        optimise_huffman: bool,
    ) -> Vec<u8> {
        let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        compress.set_fastest_defaults();
        compress.set_size(width, height);
        compress.set_quality(quality);
        compress.set_chroma_sampling_pixel_sizes(chroma, chroma);
        compress.set_optimize_coding(optimise_huffman);
        let mut started = compress.start_compress(Vec::new()).expect("start");
        started.write_scanlines(rgb).expect("scanlines");
        started.finish().expect("finish")
    }

    /// Face-like test content: smooth ramps (what most blocks of a face are), edges, and noise of
    /// a chosen strength (which fills the high frequencies at high quality).
    fn picture(width: usize, height: usize, noise: u8, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    let base = (x * (40 + 30 * c) / width.max(1) + y * 200 / height.max(1)) as i32
                        + if (x / 7 + y / 5 + c) % 3 == 0 { 60 } else { 0 };
                    let jitter = (next() % (2 * noise as u64 + 1)) as i32 - noise as i32;
                    rgb.push((base + jitter).clamp(0, 255) as u8);
                }
            }
        }
        rgb
    }

    #[test]
    fn decodes_pils_fixture_bit_for_bit() {
        // crates/qud-data/fixtures/libjpeg/make_libjpeg_fixture.py: PIL 12 (libjpeg-turbo 3.2.0,
        // SIMD) wrote a 4:2:0 quality-90 JPEG and its decoding.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/libjpeg");
        let jpeg = std::fs::read(dir.join("face_420.jpg")).unwrap();
        let expected = std::fs::read(dir.join("face_420.rgb")).unwrap();
        let decoded = decode(&jpeg).expect("a baseline 4:2:0 JPEG takes the fast path");
        assert_eq!((decoded.width, decoded.height), (112, 112));
        let differing = decoded
            .pixels
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 0, "samples that differ from PIL's");
    }

    #[test]
    fn takes_the_loaders_own_jpegs() {
        let face = crate::SyntheticFaces::new(2, 2, 5).get(1).unwrap().image;
        let jpeg = crate::encode_face(&face, crate::ImageEncoding::Jpeg(95));
        let fast = decode(&jpeg).expect("encode_face's JPEGs take the fast path");
        assert_eq!(fast.pixels, decode_jpeg_libjpeg(&jpeg).unwrap().2);
    }

    #[test]
    fn declines_what_libjpeg_must_decode() {
        let rgb = picture(40, 24, 20, 3);
        let baseline = baseline_jpeg(&rgb, (40, 24), 90.0, (2, 2), false);
        assert!(decode(&baseline).is_some());
        // Progressive.
        let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        compress.set_size(40, 24);
        compress.set_progressive_mode();
        let mut started = compress.start_compress(Vec::new()).unwrap();
        started.write_scanlines(&rgb).unwrap();
        assert!(decode(&started.finish().unwrap()).is_none(), "progressive");
        // Grayscale.
        let gray: Vec<u8> = rgb.iter().step_by(3).copied().collect();
        let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_GRAYSCALE);
        compress.set_fastest_defaults();
        compress.set_size(40, 24);
        let mut started = compress.start_compress(Vec::new()).unwrap();
        started.write_scanlines(&gray).unwrap();
        assert!(decode(&started.finish().unwrap()).is_none(), "grayscale");
        // Truncated inside the scan: libjpeg pads with gray and warns; we leave it to libjpeg.
        for cut in [baseline.len() / 2, baseline.len() - 40] {
            assert!(decode(&baseline[..cut]).is_none(), "cut at {cut}");
        }
        // Not a JPEG, or only its start.
        assert!(decode(b"\x89PNG\r\n").is_none());
        assert!(decode(&baseline[..20]).is_none());
    }

    /// A DHT entry with more codes of a length than the length has (three 1-bit codes) is a
    /// table libjpeg refuses; it once indexed past the lookup table here.
    #[test]
    fn overfull_huffman_tables_are_declined() {
        let mut counts = [0u8; 16];
        counts[0] = 3;
        assert!(super::Huffman::new(&counts, &[0, 1, 2], true).is_none());
        counts = [0; 16];
        counts[2] = 200;
        assert!(super::Huffman::new(&counts, &[1; 200], false).is_none());
        // In a whole file: the first AC table's 2-bit count raised past what fits.
        let rgb = picture(32, 16, 20, 1);
        let mut jpeg = baseline_jpeg(&rgb, (32, 16), 90.0, (2, 2), false);
        let dht = jpeg.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
        jpeg[dht + 5 + 1] = 9;
        assert!(decode(&jpeg).is_none());
        assert!(crate::image_ops::decode_rgb(&jpeg).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Any baseline JPEG the fast path takes decodes to libjpeg's exact bytes: every size
        /// (odd ones leave partial MCUs and chroma edges), 4:4:4, 4:2:2 and 4:2:0, low to
        /// lossless-like quality, standard and optimised Huffman tables.
        #[test]
        fn matches_libjpeg_bit_for_bit(
            width in 6usize..72,
            height in 1usize..72,
            quality in 20u8..=100,
            chroma in prop::sample::select(vec![(1u8, 1u8), (2, 1), (2, 2)]),
            optimise_huffman: bool,
            noise in 0u8..=120,
            seed: u64,
        ) {
            let rgb = picture(width, height, noise, seed);
            let jpeg = baseline_jpeg(&rgb, (width, height), quality as f32, chroma, optimise_huffman);
            let fast = decode(&jpeg).expect("a baseline JPEG takes the fast path");
            let (w, h, reference) = decode_jpeg_libjpeg(&jpeg).unwrap();
            prop_assert_eq!((fast.width, fast.height), (w, h));
            let differing = fast.pixels.iter().zip(&reference).filter(|(a, b)| a != b).count();
            prop_assert_eq!(differing, 0, "samples that differ from libjpeg's");
        }

        /// The AVX2 IDCT and the portable one (which the end-to-end tests do not reach on an
        /// AVX2 machine) agree on every block, including whether it is beyond the safe range.
        #[test]
        fn avx2_and_portable_idct_agree(
            coefficients in prop::collection::vec((0usize..64, -1_500i32..1_500), 0..40),
            dc in -1_100i32..1_100,
            outlier in prop::option::weighted(0.1, (0usize..64, -60_000i32..60_000)),
        ) {
            // Dequantised coefficients of real images, now and then one far beyond them.
            let mut block = [0i32; 64];
            block[0] = dc;
            for (at, value) in coefficients.into_iter().chain(outlier) {
                block[at] = value;
            }
            let (mut portable, mut wide) = ([0u8; 64], [0u8; 64]);
            let a = super::idct(false, &block, &mut portable, 8);
            let b = super::idct(super::has_avx2(), &block, &mut wide, 8);
            prop_assert_eq!(a, b);
            prop_assert_eq!(portable, wide);
        }

        /// Damaged scan data: the fast path either declines it or agrees with libjpeg.
        #[test]
        fn corrupt_scans_are_declined_or_decoded_as_libjpeg_does(
            flips in prop::collection::vec((0.0f64..1.0, 1u8..=255), 1..4),
            seed: u64,
        ) {
            let rgb = picture(48, 40, 30, seed);
            let mut jpeg = baseline_jpeg(&rgb, (48, 40), 95.0, (2, 2), false);
            let scan = jpeg.len() - 2 - 600.min(jpeg.len() / 2);
            for (at, mask) in flips {
                let i = scan + ((jpeg.len() - 2 - scan) as f64 * at) as usize;
                jpeg[i] ^= mask;
            }
            if let Some(fast) = decode(&jpeg) {
                let reference = decode_jpeg_libjpeg(&jpeg);
                prop_assert!(reference.is_ok(), "libjpeg refused what the fast path decoded: {:?}", reference.as_ref().err());
                prop_assert!(fast.pixels == reference.unwrap().2, "decoded differently from libjpeg");
            }
        }
    }
}
