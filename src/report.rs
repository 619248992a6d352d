//! Results tables of the experiments: Markdown for the terminal and `docs/results/`, CSV and JSON for
//! analysis, and a heatmap (PNG, drawn with plotters). Every file is written
//! atomically.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use crate::error::{Error, Result, write_atomic};

/// A table of numbers (percentages): one row per configuration, one column per setting.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub title: String,
    /// Header of the first column (the row names).
    pub row_header: String,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub values: Vec<f64>,
}

impl Table {
    pub fn new(title: &str, row_header: &str, columns: &[&str]) -> Self {
        Self {
            title: title.to_string(),
            row_header: row_header.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, name: &str, values: Vec<f64>) {
        assert_eq!(values.len(), self.columns.len(), "one value per column");
        self.rows.push(Row {
            name: name.to_string(),
            values,
        });
    }

    /// The table in Markdown, values with two decimals.
    pub fn markdown(&self) -> String {
        let mut out = format!("| {} | {} |\n", self.row_header, self.columns.join(" | "));
        out += &format!("|{}\n", " --- |".repeat(self.columns.len() + 1));
        for row in &self.rows {
            let cells: Vec<String> = row.values.iter().map(|v| format!("{v:.2}")).collect();
            out += &format!("| {} | {} |\n", row.name, cells.join(" | "));
        }
        out
    }

    /// The table as CSV (full precision).
    pub fn csv(&self) -> String {
        let quote = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut out = std::iter::once(quote(&self.row_header))
            .chain(self.columns.iter().map(|c| quote(c)))
            .collect::<Vec<_>>()
            .join(",");
        out.push('\n');
        for row in &self.rows {
            let line = std::iter::once(quote(&row.name))
                .chain(row.values.iter().map(|v| v.to_string()))
                .collect::<Vec<_>>()
                .join(",");
            out += &line;
            out.push('\n');
        }
        out
    }

    /// A heatmap: one row per table row, one column per table column, each cell shaded by its
    /// value and labelled with it. Tables whose values all lie in [0, 100] (percentages) share
    /// one scale, 0 white to 100 dark; others are shaded per column, from its lowest to its
    /// highest value.
    pub fn heatmap_png(&self, path: &Path) -> Result<()> {
        render_png(path, heatmap_size(self), |pixels, size| {
            draw_heatmap(self, pixels, size)
        })
    }

    /// Writes `{stem}.md`, `{stem}.csv`, `{stem}.json` (the table and `details`) and
    /// `{stem}.png` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str, details: &serde_json::Value) -> Result<()> {
        write_atomic(&dir.join(format!("{stem}.md")), self.markdown().as_bytes())?;
        write_atomic(&dir.join(format!("{stem}.csv")), self.csv().as_bytes())?;
        let json = serde_json::json!({ "table": self, "details": details });
        let text = serde_json::to_string_pretty(&json).expect("JSON serializes");
        write_atomic(&dir.join(format!("{stem}.json")), text.as_bytes())?;
        self.heatmap_png(&dir.join(format!("{stem}.png")))
    }
}

/// One panel of a scatter chart: labelled point sets (e.g. positive and negative states).
pub struct ScatterPanel {
    pub title: String,
    pub sets: Vec<(String, Vec<(f64, f64)>)>,
}

/// Panels side by side in one PNG (Figure 5 style), written atomically.
pub fn scatter_png(title: &str, panels: &[ScatterPanel], path: &Path) -> Result<()> {
    let size = (500 * panels.len().max(1) as u32, 520);
    render_png(path, size, |pixels, size| {
        draw_scatter(title, panels, pixels, size)
    })
}

/// Draws into a white RGB buffer of `size` and writes it to `path` as PNG, atomically.
fn render_png(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&mut [u8], (u32, u32)) -> std::result::Result<(), String>,
) -> Result<()> {
    let error = |reason: String| Error::Chart {
        path: path.to_path_buf(),
        reason,
    };
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    draw(&mut pixels, (width, height)).map_err(error)?;
    let image = image::RgbImage::from_raw(width, height, pixels).expect("a full buffer");
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| error(e.to_string()))?;
    write_atomic(path, &png)
}

fn draw_scatter(
    title: &str,
    panels: &[ScatterPanel],
    pixels: &mut [u8],
    size: (u32, u32),
) -> std::result::Result<(), String> {
    register_font()?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    for (area, panel) in root
        .split_evenly((1, panels.len().max(1)))
        .iter()
        .zip(panels)
    {
        let points = panel.sets.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (-1.0, 1.0, -1.0, 1.0);
        }
        let pad = |a: f64, b: f64| 0.05 * (b - a).max(1e-6);
        let (px, py) = (pad(x0, x1), pad(y0, y1));
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(x0 - px..x1 + px, y0 - py..y1 + py)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (label, set)) in panel.sets.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(set.iter().map(|&p| Circle::new(p, 2, color.filled())))
                .map_err(|e| err(&e))?
                .label(label.as_str())
                .legend(move |(x, y)| Circle::new((x + 6, y), 4, color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The rows of `x` (`n` rows of width `d`, row-major) projected on their first two principal
/// components (power iteration with deflation on the covariance).
pub fn pca_2d(x: &[f32], d: usize) -> Vec<(f64, f64)> {
    let n = if d == 0 { 0 } else { x.len() / d };
    if n == 0 {
        return Vec::new();
    }
    let mut mean = vec![0f64; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64 / n as f64;
        }
    }
    let centred: Vec<Vec<f64>> = x
        .chunks_exact(d)
        .map(|row| row.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect())
        .collect();
    let mut cov = vec![vec![0f64; d]; d];
    for row in &centred {
        for i in 0..d {
            for j in 0..d {
                cov[i][j] += row[i] * row[j];
            }
        }
    }
    let mut components: Vec<Vec<f64>> = Vec::new();
    for c in 0..2 {
        let mut v: Vec<f64> = (0..d).map(|i| 1.0 + ((i * 7 + c * 3) % 5) as f64).collect();
        for _ in 0..200 {
            let mut next: Vec<f64> = (0..d)
                .map(|i| (0..d).map(|j| cov[i][j] * v[j]).sum())
                .collect();
            for u in &components {
                let dot: f64 = next.iter().zip(u).map(|(a, b)| a * b).sum();
                next.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = next.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm < 1e-12 {
                break;
            }
            v = next.into_iter().map(|a| a / norm).collect();
        }
        components.push(v);
    }
    centred
        .iter()
        .map(|row| {
            let project = |u: &Vec<f64>| row.iter().zip(u).map(|(a, b)| a * b).sum::<f64>();
            (project(&components[0]), project(&components[1]))
        })
        .collect()
}

/// Font files tried in order for chart text; `MMKE_FONT` overrides.
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a system TrueType font as plotters' "sans-serif" (once per process).
fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let candidates: Vec<String> = std::env::var("MMKE_FONT")
                .into_iter()
                .chain(FONT_CANDIDATES.iter().map(|s| s.to_string()))
                .collect();
            let bytes = candidates
                .iter()
                .find_map(|p| std::fs::read(p).ok())
                .ok_or_else(|| {
                    format!(
                        "no TrueType font for chart labels (tried {}); install fonts-dejavu-core \
                         or set MMKE_FONT",
                        candidates.join(", ")
                    )
                })?;
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
                .map_err(|_| "the chart font is not a valid TrueType font".to_string())
        })
        .clone()
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Layout of [`Table::heatmap_png`]: label column, cell size, title and header heights.
const LABEL_WIDTH: u32 = 230;
const CELL: (u32, u32) = (92, 34);
const TITLE_HEIGHT: u32 = 44;
const HEADER_HEIGHT: u32 = 58;

fn heatmap_size(table: &Table) -> (u32, u32) {
    let (columns, rows) = (table.columns.len() as u32, table.rows.len() as u32);
    let width = (LABEL_WIDTH + CELL.0 * columns.max(1) + 20).max(640);
    (
        width,
        TITLE_HEIGHT + HEADER_HEIGHT + CELL.1 * rows.max(1) + 16,
    )
}

/// The shade of `t` in [0, 1]: white to dark blue (ColorBrewer's Blues).
fn blues(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let (a, b) = ((247.0, 251.0, 255.0), (8.0, 48.0, 107.0));
    let mix = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Where each value of `table` lies on its shading scale, in [0, 1].
fn shades(table: &Table) -> Vec<Vec<f64>> {
    let percent = table
        .rows
        .iter()
        .flat_map(|r| &r.values)
        .all(|v| (0.0..=100.0).contains(v));
    let range = |c: usize| {
        if percent {
            return (0.0, 100.0);
        }
        let column = table.rows.iter().map(|r| r.values[c]);
        let lo = column.clone().fold(f64::INFINITY, f64::min);
        let hi = column.fold(f64::NEG_INFINITY, f64::max);
        (lo, if hi > lo { hi } else { lo + 1.0 })
    };
    table
        .rows
        .iter()
        .map(|r| {
            r.values
                .iter()
                .enumerate()
                .map(|(c, v)| {
                    let (lo, hi) = range(c);
                    (v - lo) / (hi - lo)
                })
                .collect()
        })
        .collect()
}

fn draw_heatmap(
    table: &Table,
    pixels: &mut [u8],
    size: (u32, u32),
) -> std::result::Result<(), String> {
    register_font()?;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let text = |size: u32, color: RGBColor, anchor: (HPos, VPos)| {
        ("sans-serif", size)
            .into_font()
            .color(&color)
            .pos(Pos::new(anchor.0, anchor.1))
    };
    let black = RGBColor(0, 0, 0);
    root.draw(&Text::new(
        table.title.clone(),
        (size.0 as i32 / 2, TITLE_HEIGHT as i32 / 2),
        text(20, black, (HPos::Center, VPos::Center)),
    ))
    .map_err(|e| err(&e))?;
    let top = (TITLE_HEIGHT + HEADER_HEIGHT) as i32;
    let (w, h) = (CELL.0 as i32, CELL.1 as i32);
    let left = LABEL_WIDTH as i32;
    // Column names over their cells, in two lines where they have a space to break at.
    for (c, name) in table.columns.iter().enumerate() {
        let x = left + c as i32 * w + w / 2;
        let lines: Vec<&str> = match name.split_once(' ') {
            Some((a, b)) if name.len() > 11 => vec![a, b],
            _ => vec![name.as_str()],
        };
        for (i, line) in lines.iter().enumerate() {
            let y = top - 8 - 17 * (lines.len() - 1 - i) as i32;
            root.draw(&Text::new(
                line.to_string(),
                (x, y),
                text(14, black, (HPos::Center, VPos::Bottom)),
            ))
            .map_err(|e| err(&e))?;
        }
    }
    let shades = shades(table);
    for (r, row) in table.rows.iter().enumerate() {
        let y = top + r as i32 * h;
        root.draw(&Text::new(
            row.name.clone(),
            (left - 10, y + h / 2),
            text(15, black, (HPos::Right, VPos::Center)),
        ))
        .map_err(|e| err(&e))?;
        for (c, value) in row.values.iter().enumerate() {
            let x = left + c as i32 * w;
            let shade = shades[r][c];
            root.draw(&Rectangle::new(
                [(x, y), (x + w - 2, y + h - 2)],
                blues(shade).filled(),
            ))
            .map_err(|e| err(&e))?;
            let ink = if shade > 0.55 { WHITE } else { black };
            root.draw(&Text::new(
                format!("{value:.2}"),
                (x + w / 2 - 1, y + h / 2 - 1),
                text(14, ink, (HPos::Center, VPos::Center)),
            ))
            .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pca_finds_the_direction_of_largest_spread() {
        // Points spread along (1, 1, 0) with a little noise along (1, -1, 0).
        let mut x = Vec::new();
        for i in 0..20 {
            let t = i as f32 - 10.0;
            let e = if i % 2 == 0 { 0.1 } else { -0.1 };
            x.extend([t + e, t - e, 0.0]);
        }
        let p = pca_2d(&x, 3);
        let spread = |f: fn(&(f64, f64)) -> f64| {
            let v: Vec<f64> = p.iter().map(f).collect();
            v.iter().map(|a| a * a).sum::<f64>()
        };
        assert!(spread(|q| q.0) > 100.0 * spread(|q| q.1));
        // The first point, (-9.9, -10.1, 0), is (-9.4, -9.6, 0) from the mean (-0.5, -0.5, 0).
        assert!(
            (p[0].0.abs() - 19.0 / 2f64.sqrt()).abs() < 1e-3,
            "{:?}",
            p[0]
        );
    }

    fn table() -> Table {
        let mut t = Table::new("Scope accuracy", "fusion", &["clip-tiny", "clip-small"]);
        t.push("concat", vec![63.7, 63.8]);
        t.push("dot, product", vec![64.73, 64.85]);
        t
    }

    #[test]
    fn markdown_and_csv_hold_every_value() {
        let t = table();
        assert_eq!(
            t.markdown(),
            "| fusion | clip-tiny | clip-small |\n| --- | --- | --- |\n\
             | concat | 63.70 | 63.80 |\n| dot, product | 64.73 | 64.85 |\n"
        );
        assert_eq!(
            t.csv(),
            "fusion,clip-tiny,clip-small\nconcat,63.7,63.8\n\"dot, product\",64.73,64.85\n"
        );
    }

    #[test]
    fn the_heatmap_shades_each_cell_by_its_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let t = table();
        match t.heatmap_png(&path) {
            Ok(()) => {
                let image = image::open(&path).unwrap().to_rgb8();
                assert_eq!(image.dimensions(), heatmap_size(&t));
                // The top-left corner of the first cell holds its shade (63.7 % of the way).
                let (x, y) = (LABEL_WIDTH + 1, TITLE_HEIGHT + HEADER_HEIGHT + 1);
                let RGBColor(r, g, b) = blues(0.637);
                assert_eq!(image.get_pixel(x, y).0, [r, g, b]);
            }
            // Machines without a font get a clear error and no file.
            Err(e) => {
                assert!(e.to_string().contains("font"), "{e}");
                assert!(!path.exists());
            }
        }
        // Percentages share one scale; other values are shaded per column.
        assert_eq!(shades(&t)[0][0], 0.637);
        let mut cost = Table::new("cost", "component", &["ms", "MB"]);
        cost.push("a", vec![2.0, 500.0]);
        cost.push("b", vec![4.0, 100.0]);
        assert_eq!(shades(&cost), [[0.0, 1.0], [1.0, 0.0]]);
    }
}
