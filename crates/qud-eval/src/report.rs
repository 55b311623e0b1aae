//! Reading embeddings made elsewhere (`.npy`, issame lists) and drawing ROC and training curves
//! as SVG (plotters' SVG backend).

use crate::metrics::RocPoints;
use crate::BinError;
use plotters::prelude::{
    BindKeyPoints, Cartesian2d, ChartBuilder, ChartContext, Color, IntoDrawingArea, IntoLogRange,
    LineSeries, PathElement, RGBColor, Ranged, SVGBackend, SeriesLabelPosition, BLACK, TRANSPARENT,
    WHITE,
};
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

/// Series colours, in order (matplotlib's first six).
const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

type ChartResult = Result<(), Box<dyn std::error::Error>>;

/// A ROC plot (TAR against FAR on a log axis from the smallest FAR's decade, 1e-4 to 1e-7, to 1) with
/// one curve per model, as a self-contained SVG any browser shows.
pub fn roc_svg(title: &str, curves: &[(&str, &RocPoints)]) -> String {
    // The axis starts at the decade of the smallest positive FAR (1e-4 for .bin sets, down to
    // 1e-7 for IJB-C's 8 million impostor pairs).
    let smallest = curves
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .filter(|far| *far > 0.0)
        .fold(1e-4, f64::min);
    let min_exp = smallest.log10().floor().clamp(-7.0, -4.0) as i32;
    let draw = |svg: &mut String| -> ChartResult {
        let root = SVGBackend::with_string(svg, (640, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let decades: Vec<f64> = (min_exp..=0).map(|e| 10f64.powi(e)).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(
                (decades[0]..1.0).log_scale().with_key_points(decades),
                0.0..1.0,
            )?;
        chart
            .configure_mesh()
            .x_desc("false accept rate (log)")
            .y_desc("true accept rate")
            .x_label_formatter(&|far| match far.log10().round() as i32 {
                0 => "1".into(),
                e => format!("1e{e}"),
            })
            .y_labels(11)
            .y_label_formatter(&|tar| format!("{tar:.1}"))
            .light_line_style(TRANSPARENT)
            .draw()?;
        for (i, (name, points)) in curves.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            // One vertex per pixel: a ROC of millions of points stays small.
            let mut vertices: Vec<(f64, f64)> = Vec::new();
            let mut last = None;
            for &(far, tar) in points
                .iter()
                .filter(|(far, tar)| *far > 0.0 && tar.is_finite())
            {
                let pixel = chart.backend_coord(&(far, tar));
                if last != Some(pixel) {
                    vertices.push((far, tar));
                    last = Some(pixel);
                }
            }
            chart
                .draw_series(LineSeries::new(vertices, color.stroke_width(2)))?
                .label(*name)
                .legend(legend_line(color));
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        root.present()?;
        Ok(())
    };
    svg_or_error(title, draw)
}

/// A line chart (linear axes, ticks at round numbers) with one line per series, as
/// self-contained SVG: the training report's loss, learning-rate and accuracy curves.
pub fn line_chart_svg(title: &str, x_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flat_map(|s| s.1.iter()).filter(finite) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 * y1.abs().max(1.0) {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    // A margin of 5 % keeps a line off the frame.
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let draw = |svg: &mut String| -> ChartResult {
        let root = SVGBackend::with_string(svg, (640, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let (x_tick, y_tick) = (tick_formatter(x1 - x0), tick_formatter(y1 - y0));
        chart
            .configure_mesh()
            .x_desc(x_label)
            .x_label_formatter(&x_tick)
            .y_label_formatter(&y_tick)
            .light_line_style(TRANSPARENT)
            .draw()?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().filter(finite).copied(),
                    color.stroke_width(2),
                ))?
                .label(*name)
                .legend(legend_line(color));
        }
        // One line is named by the title.
        if series.len() > 1 {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        root.present()?;
        Ok(())
    };
    svg_or_error(title, draw)
}

/// A legend entry: a short thick line in the series' colour.
fn legend_line(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
}

/// The series' names in a framed box at `position`.
fn draw_legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> ChartResult {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Tick labels for an axis spanning `span`: as many decimals as its ticks need (plotters puts them
/// at the finest 1, 2 or 5 x 10^k step giving at most ten), in scientific notation below 1e-4.
fn tick_formatter(span: f64) -> impl Fn(&f64) -> String {
    let mut step = 10f64.powf((span / 10.0).log10().floor());
    for factor in [1.0, 2.0, 5.0, 10.0] {
        if span / (step * factor) <= 10.0 {
            step *= factor;
            break;
        }
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    move |v: &f64| {
        if *v == 0.0 {
            "0".into()
        } else if decimals > 4 {
            format!("{v:.1e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
}

/// The chart `draw` makes, or, should plotters fail (it has no fonts or files to miss with the SVG
/// backend), a chart-sized SVG saying why: a report is still written.
fn svg_or_error(title: &str, draw: impl FnOnce(&mut String) -> ChartResult) -> String {
    let mut svg = String::new();
    match draw(&mut svg) {
        Ok(()) => svg,
        Err(e) => format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="60"><text x="10" y="30">{}: the chart could not be drawn: {}</text></svg>"#,
            escape(title),
            escape(&e.to_string())
        ),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
