//! Reading embeddings made elsewhere (`.npy`, issame lists) and drawing ROC curves as SVG.

use crate::metrics::RocPoints;
use crate::BinError;
use std::fmt::Write as _;
use std::path::Path;

fn bad(path: &Path, reason: impl Into<String>) -> BinError {
    BinError {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A NumPy `.npy` array: its dtype descr, shape and raw little-endian data.
fn read_npy_raw(path: &Path) -> Result<(String, Vec<usize>, Vec<u8>), BinError> {
    let bytes = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
    parse_npy(&bytes, path)
}

/// The data bytes an array of `shape` with `width`-byte elements needs; `None` past `usize`.
fn data_len(shape: &[usize], width: usize) -> Option<usize> {
    shape.iter().try_fold(width, |n, &d| n.checked_mul(d))
}

/// [`read_npy_raw`] on bytes already read (`path` names them in errors).
fn parse_npy(bytes: &[u8], path: &Path) -> Result<(String, Vec<usize>, Vec<u8>), BinError> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => {
            return Err(bad(
                path,
                format!(".npy format version {v} is not supported"),
            ))
        }
    };
    let header = bytes
        .get(start..header_len.saturating_add(start))
        .ok_or_else(|| bad(path, "truncated .npy header"))?;
    let header = String::from_utf8_lossy(header);
    let field = |key: &str| -> Option<String> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(if let Some(r) = rest.strip_prefix('(') {
            r[..r.find(')')?].to_string()
        } else if let Some(r) = rest.strip_prefix('\'') {
            r[..r.find('\'')?].to_string()
        } else {
            rest[..rest.find(',')?].trim().to_string()
        })
    };
    let descr = field("descr").ok_or_else(|| bad(path, format!("no dtype in header {header}")))?;
    if field("fortran_order").as_deref() != Some("False") {
        return Err(bad(
            path,
            "Fortran-ordered arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    let shape = field("shape")
        .ok_or_else(|| bad(path, format!("no shape in header {header}")))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(path, format!("bad shape entry {s:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((descr, shape, bytes[start + header_len..].to_vec()))
}

/// `[N, D]` float32 or float64 embeddings from a `.npy` file.
pub fn read_npy_rows(path: &Path) -> Result<Vec<Vec<f32>>, BinError> {
    let mut reader = NpyRowReader::open(path)?;
    let dim = reader.dim;
    let mut rows = Vec::with_capacity(reader.rows);
    while let Some(block) = reader.next_block(1 << 16) {
        rows.extend(block?.chunks(dim).map(<[f32]>::to_vec));
    }
    Ok(rows)
}

/// `[N, D]` float32 or float64 rows of a `.npy` file read a block at a time, for sets too large to
/// hold twice (a million distractors); the same checks as [`read_npy_rows`].
pub struct NpyRowReader {
    path: std::path::PathBuf,
    file: std::io::BufReader<std::fs::File>,
    width: usize,
    pub rows: usize,
    pub dim: usize,
    read: usize,
}

impl NpyRowReader {
    pub fn open(path: &Path) -> Result<Self, BinError> {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
        let size = file.metadata().map_err(|e| bad(path, e.to_string()))?.len();
        let mut prefix = vec![0u8; 12];
        file.read_exact(&mut prefix)
            .map_err(|_| bad(path, "not a .npy file (no \\x93NUMPY magic)"))?;
        if &prefix[..6] != b"\x93NUMPY" {
            return Err(bad(path, "not a .npy file (no \\x93NUMPY magic)"));
        }
        let header_len = match prefix[6] {
            1 => u16::from_le_bytes([prefix[8], prefix[9]]) as usize + 10,
            2 | 3 => u32::from_le_bytes(prefix[8..12].try_into().unwrap()) as usize + 12,
            v => {
                return Err(bad(
                    path,
                    format!(".npy format version {v} is not supported"),
                ))
            }
        };
        // Checked before the header is read into memory: a damaged length cannot allocate.
        if header_len as u64 > size {
            return Err(bad(path, "truncated .npy header"));
        }
        let mut head = prefix;
        if header_len > head.len() {
            let mut rest = vec![0u8; header_len - head.len()];
            file.read_exact(&mut rest)
                .map_err(|_| bad(path, "truncated .npy header"))?;
            head.extend(rest);
        }
        let (descr, shape, _) = parse_npy(&head[..header_len.max(10)], path)?;
        let [rows, dim] = shape[..] else {
            return Err(bad(
                path,
                format!("expected a 2-D [N, D] array, found shape {shape:?}"),
            ));
        };
        let width = match descr.as_str() {
            "<f4" => 4,
            "<f8" => 8,
            other => {
                return Err(bad(
                    path,
                    format!("dtype {other} is not float32 or float64"),
                ))
            }
        };
        if dim == 0 {
            return Err(bad(
                path,
                format!("shape ({rows}, 0): embeddings of no dimensions"),
            ));
        }
        let needed = data_len(&shape, width).map(|n| n as u64 + header_len as u64);
        if needed != Some(size) {
            return Err(bad(
                path,
                format!(
                    "shape ({rows}, {dim}) needs {} bytes with its header, the file has {size}",
                    needed.map_or("more than 2^64".into(), |n| n.to_string()),
                ),
            ));
        }
        // The header was read exactly: the reader is at the first row.
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufReader::with_capacity(1 << 20, file),
            width,
            rows,
            dim,
            read: 0,
        })
    }

    /// The next up to `max_rows` rows, row-major; `None` after the last.
    pub fn next_block(&mut self, max_rows: usize) -> Option<Result<Vec<f32>, BinError>> {
        use std::io::Read;
        let rows = max_rows.max(1).min(self.rows - self.read);
        if rows == 0 {
            return None;
        }
        let mut bytes = vec![0u8; rows * self.dim * self.width];
        if let Err(e) = self.file.read_exact(&mut bytes) {
            return Some(Err(bad(&self.path, format!("row {}: {e}", self.read))));
        }
        let values: Vec<f32> = bytes
            .chunks_exact(self.width)
            .map(|c| match self.width {
                4 => f32::from_le_bytes(c.try_into().unwrap()),
                _ => f64::from_le_bytes(c.try_into().unwrap()) as f32,
            })
            .collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Some(Err(bad(
                &self.path,
                format!("row {} holds a non-finite value", self.read + i / self.dim),
            )));
        }
        self.read += rows;
        Some(Ok(values))
    }
}

/// Pair labels from a `.npy` (bool or integer) or a text file (one `1/0/true/false` per line).
pub fn read_issame(path: &Path) -> Result<Vec<bool>, BinError> {
    if path.extension().is_some_and(|e| e == "npy") {
        let (descr, shape, data) = read_npy_raw(path)?;
        if shape.len() != 1 {
            return Err(bad(
                path,
                format!("expected a 1-D array, found shape {shape:?}"),
            ));
        }
        let width = match descr.as_str() {
            "|b1" | "|u1" | "|i1" => 1,
            "<i4" | "<u4" => 4,
            "<i8" | "<u8" => 8,
            other => return Err(bad(path, format!("dtype {other} is not bool or integer"))),
        };
        if data_len(&shape, width) != Some(data.len()) {
            return Err(bad(
                path,
                format!(
                    "shape {shape:?} does not match its {} data bytes",
                    data.len()
                ),
            ));
        }
        return Ok(data
            .chunks_exact(width)
            .map(|c| c.iter().any(|b| *b != 0))
            .collect());
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, e.to_string()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| match l.trim() {
            "1" | "true" | "True" => Ok(true),
            "0" | "false" | "False" => Ok(false),
            other => Err(bad(
                path,
                format!("line {}: {other:?} is not 1/0/true/false", n + 1),
            )),
        })
        .collect()
}

/// A ROC plot (TAR against FAR on a log axis from the smallest FAR's decade, 1e-4 to 1e-7, to 1) with one curve per model, as a
/// self-contained SVG any browser shows.
pub fn roc_svg(title: &str, curves: &[(&str, &RocPoints)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 480.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 60.0;
    // The axis starts at the decade of the smallest positive FAR (1e-4 for .bin sets, down to
    // 1e-7 for IJB-C's 8 million impostor pairs).
    let smallest = curves
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .filter(|far| *far > 0.0)
        .fold(1e-4, f64::min);
    let min_exp = smallest.log10().floor().clamp(-7.0, -4.0);
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let x = |far: f64| {
        LEFT + (far.max(10f64.powf(min_exp)).log10() - min_exp) / -min_exp * (W - LEFT - RIGHT)
    };
    let y = |tar: f64| TOP + (1.0 - tar) * (H - TOP - BOTTOM);
    let mut svg = svg_canvas(W, H, title);
    for e in (min_exp as i32)..=0 {
        let px = x(10f64.powi(e));
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{}" stroke="#ddd"/><text x="{px:.1}" y="{}" text-anchor="middle">1e{e}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0
        );
    }
    for t in 0..=10 {
        let tar = t as f64 / 10.0;
        let py = y(tar);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{tar:.1}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">false accept rate (log)</text><text transform="translate(18 {}) rotate(-90)" text-anchor="middle">true accept rate</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 20.0,
        (TOP + H - BOTTOM) / 2.0
    );
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // One vertex per distinct tenth of a pixel: a ROC of millions of points stays small.
        let mut path: Vec<String> = points
            .iter()
            .filter(|(far, _)| *far > 0.0)
            .map(|&(far, tar)| format!("{:.1},{:.1}", x(far), y(tar)))
            .collect();
        path.dedup();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 20.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            W - RIGHT - 170.0,
            W - RIGHT - 150.0,
            W - RIGHT - 144.0,
            ly + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The opening of a `width x height` SVG on a white background, with `title` centred on top.
fn svg_canvas(width: f64, height: f64, title: &str) -> String {
    format!(
        concat!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#,
            "\n",
            r#"<rect width="100%" height="100%" fill="white"/>"#,
            "\n",
            r#"<text x="{x}" y="24" text-anchor="middle" font-size="15">{t}</text>"#,
            "\n"
        ),
        w = width,
        h = height,
        x = width / 2.0,
        t = escape(title)
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart (linear axes) with one polyline per series, as self-contained SVG: the training
/// report's loss, learning-rate and accuracy curves.
pub fn line_chart_svg(title: &str, x_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 360.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 50.0;
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let points = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (y1 - y) / (y1 - y0) * (H - TOP - BOTTOM);
    let mut svg = svg_canvas(W, H, title);
    for t in 0..=4 {
        let (fx, fy) = (
            x0 + (x1 - x0) * t as f64 / 4.0,
            y0 + (y1 - y0) * t as f64 / 4.0,
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{:.1}" x2="{}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text><text x="{:.1}" y="{}" text-anchor="middle">{}</text>"##,
            py(fy),
            W - RIGHT,
            py(fy),
            LEFT - 6.0,
            py(fy) + 4.0,
            tick(fy),
            px(fx),
            H - BOTTOM + 16.0,
            tick(fx)
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/><text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        escape(x_label)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><text x="{}" y="{}" fill="{color}" text-anchor="end">{}</text>"#,
            path.join(" "),
            W - RIGHT - 6.0,
            TOP + 16.0 + 16.0 * i as f64,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn tick(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e5) {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}
