//! FROC curve plot to PNG.
//!
//! Text is drawn with DejaVu Sans embedded from the `dejavu` crate (Bitstream Vera licence,
//! DejaVu changes public domain) through plotters' `ab_glyph` backend, so plotting works on
//! machines without any system fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::froc::{FP_RATES, FrocReport};

/// Width and height of the PNG in pixels.
pub const PLOT_SIZE: (u32, u32) = (900, 640);

/// Font family name the plot registers and uses.
const FONT: &str = "sans-serif";

/// x axis in log2(FP/image): a little room left of 1/16 (where 0 FP/image is drawn) and
/// right of 8.
const X_MIN: f64 = -4.25;
const X_MAX: f64 = 3.5;

static FONTS: Once = Once::new();

fn register_fonts() -> Result<()> {
    let mut ok = true;
    FONTS.call_once(|| {
        ok = register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded DejaVu Sans font could not be parsed"))
    }
}

/// x position of an FP/image rate; 0 (and anything below 1/16) sits at the left edge.
fn x_of(fp_per_image: f64) -> f64 {
    if fp_per_image <= 0.0 {
        X_MIN
    } else {
        fp_per_image.log2().max(X_MIN)
    }
}

fn rate_label(log2: f64) -> String {
    let e = log2.round() as i32;
    if e >= 0 {
        format!("{}", 1 << e)
    } else {
        format!("1/{}", 1 << -e)
    }
}

/// The curve as the step function "best sensitivity at FP/image <= x", in plot coordinates,
/// cut at the right edge.
fn staircase(report: &FrocReport) -> Vec<(f64, f64)> {
    let mut points = vec![(X_MIN, report.curve[0].sensitivity)];
    let mut level = report.curve[0].sensitivity;
    for p in &report.curve[1..] {
        let x = x_of(p.fp_per_image);
        if x > X_MAX {
            break;
        }
        points.push((x, level));
        points.push((x, p.sensitivity));
        level = p.sensitivity;
    }
    points.push((X_MAX, level));
    points
}

/// Draw the FROC curve of `report` with markers at the CPM points and a title naming
/// `dataset` and the CPM, to a PNG of [`PLOT_SIZE`] at `path`.
pub fn write_froc_png(path: &Path, report: &FrocReport, dataset: &str) -> Result<()> {
    register_fonts()?;
    draw(path, report, dataset)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("cannot write FROC plot {}", path.display()))
}

fn draw(
    path: &Path,
    report: &FrocReport,
    dataset: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "FROC, {dataset}: CPM {:.3} ({} images, {} lesions)",
        report.cpm, report.images, report.lesions
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 24).into_font().style(FontStyle::Bold))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(X_MIN..X_MAX, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("false positives per image")
        .y_desc("sensitivity (lesion level)")
        // At most 9 labels over a span of 7.75 makes plotters pick the integers -4..=3.
        .x_labels(9)
        .y_labels(11)
        .x_label_formatter(&|v| rate_label(*v))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .draw()?;

    let curve_colour = RGBColor(31, 119, 180);
    let marker_colour = RGBColor(214, 39, 40);
    chart
        .draw_series(LineSeries::new(
            staircase(report),
            curve_colour.stroke_width(2),
        ))?
        .label("FROC curve")
        .legend(move |(x, y)| {
            PathElement::new([(x, y), (x + 20, y)], curve_colour.stroke_width(2))
        });

    let marks: Vec<(f64, f64)> = FP_RATES
        .iter()
        .zip(&report.sensitivities)
        .map(|(&f, p)| (f.log2(), p.sensitivity))
        .collect();
    chart
        .draw_series(
            marks
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 5, marker_colour.filled())),
        )?
        .label("sensitivity at 1/8 ... 8 FP/image")
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, marker_colour.filled()));
    chart.draw_series(marks.iter().map(|&(x, y)| {
        // Value labels above the markers, kept inside the plot at the top.
        let pos = (x, (y + 0.025).min(0.97));
        let style = (FONT, 14)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        Text::new(format!("{y:.2}"), pos, style)
    }))?;

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Stage-1 candidate recall against candidates per image, one line per named curve, with
/// the target (90% of lesions at 150 candidates) marked.
pub fn write_recall_png(path: &Path, curves: &[(String, Vec<(usize, f64)>)]) -> Result<()> {
    register_fonts()?;
    draw_recall(path, curves)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("cannot write recall plot {}", path.display()))
}

fn draw_recall(
    path: &Path,
    curves: &[(String, Vec<(usize, f64)>)],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|(k, _)| *k))
        .max()
        .unwrap_or(300) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Stage-1 candidate recall (held-out folds)",
            (FONT, 24).into_font().style(FontStyle::Bold),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("candidates per image")
        .y_desc("lesions with a candidate within 5 px")
        .y_labels(11)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .draw()?;
    let target = RGBColor(214, 39, 40);
    chart
        .draw_series(std::iter::once(Circle::new(
            (150.0, 0.9),
            6,
            target.filled(),
        )))?
        .label("target: 0.90 at 150")
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, target.filled()));
    for (i, (name, curve)) in curves.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                curve.iter().map(|&(k, r)| (k as f64, r)),
                colour.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Agreement of two measurements of the same things (Bland and Altman 1986): for each pair
/// `(a, b)`, the difference `a - b` against the mean `(a + b) / 2`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    pub pairs: usize,
    /// Mean difference (bias) and its standard deviation.
    pub bias: f64,
    pub sd: f64,
    /// 95% limits of agreement: bias -/+ 1.96 sd.
    pub lower: f64,
    pub upper: f64,
    /// Largest and mean absolute difference.
    pub max_abs: f64,
    pub mean_abs: f64,
}

impl Agreement {
    pub fn of(pairs: &[(f64, f64)]) -> Self {
        let n = pairs.len();
        if n == 0 {
            return Self::default();
        }
        let diffs: Vec<f64> = pairs.iter().map(|(a, b)| a - b).collect();
        let bias = diffs.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            diffs.iter().map(|d| (d - bias).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        let sd = var.sqrt();
        Self {
            pairs: n,
            bias,
            sd,
            lower: bias - 1.96 * sd,
            upper: bias + 1.96 * sd,
            max_abs: diffs.iter().fold(0.0, |m, d| m.max(d.abs())),
            mean_abs: diffs.iter().map(|d| d.abs()).sum::<f64>() / n as f64,
        }
    }
}

/// A Bland-Altman plot of `pairs` (`(a, b)`: difference a - b against the mean) with the
/// bias and 95% limits of agreement drawn, as PNG bytes of [`PLOT_SIZE`]. `what` names the
/// measure, `a` and `b` the two sides (title and axis).
pub fn bland_altman_png(pairs: &[(f64, f64)], what: &str, a: &str, b: &str) -> Result<Vec<u8>> {
    register_fonts()?;
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw_bland_altman(&mut buf, pairs, what, a, b).map_err(|e| anyhow!("{e}"))?;
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer size")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the plot as PNG")?;
    Ok(png)
}

fn draw_bland_altman(
    buf: &mut [u8],
    pairs: &[(f64, f64)],
    what: &str,
    a: &str,
    b: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let stats = Agreement::of(pairs);
    let root = BitMapBackend::with_buffer(buf, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let span = stats
        .max_abs
        .max(stats.upper.abs())
        .max(stats.lower.abs())
        .max(1e-6)
        * 1.25;
    let title = format!(
        "{what}: {a} - {b}, {} pairs; bias {:+.2e}, limits {:+.2e} .. {:+.2e}",
        stats.pairs, stats.bias, stats.lower, stats.upper
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 20).into_font().style(FontStyle::Bold))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..1.0, -span..span)?;
    chart
        .configure_mesh()
        .x_desc(format!("mean of {a} and {b}"))
        .y_desc(format!("{a} - {b}"))
        .x_labels(11)
        .y_labels(9)
        .x_label_formatter(&|v| format!("{v:.1}"))
        // The middle tick is 0 up to rounding (-1.4e-17 would be printed).
        .y_label_formatter(&|v| {
            if v.abs() < span * 1e-9 {
                "0".into()
            } else {
                format!("{v:.1e}")
            }
        })
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE)
        .bold_line_style(BLACK.mix(0.15))
        .draw()?;
    let dot = RGBColor(31, 119, 180);
    chart.draw_series(
        pairs
            .iter()
            .map(|&(x, y)| Circle::new(((x + y) / 2.0, x - y), 3, dot.mix(0.6).filled())),
    )?;
    for (level, colour, label) in [
        (stats.bias, RGBColor(214, 39, 40), "bias"),
        (stats.lower, RGBColor(120, 120, 120), "lower limit"),
        (stats.upper, RGBColor(120, 120, 120), "upper limit"),
    ] {
        chart
            .draw_series(LineSeries::new(
                [(0.0, level), (1.0, level)],
                colour.stroke_width(2),
            ))?
            .label(format!("{label} {level:+.2e}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::froc::ImageOutcome;
    use crate::ground_truth::{GroundTruth, Lesion};
    use ma_core::detection::Detection;

    fn sample_report() -> FrocReport {
        let truth = GroundTruth {
            width: 200,
            height: 200,
            lesions: (0..10)
                .map(|i| Lesion {
                    pixels: vec![(10 + 18 * i, 20)],
                })
                .collect(),
            uncertain: None,
        };
        // Lesion i found with score 1 - i/20, and FPs interleaved.
        let mut dets: Vec<Detection> = (0..10)
            .map(|i| Detection {
                x: 10.0 + 18.0 * i as f64,
                y: 20.0,
                score: 1.0 - i as f64 / 20.0,
            })
            .collect();
        dets.extend((0..30).map(|k| Detection {
            x: 5.0 + 6.0 * k as f64,
            y: 150.0,
            score: 0.97 - k as f64 / 40.0,
        }));
        let outcomes = vec![
            ImageOutcome::score("a", &truth, &dets).unwrap(),
            ImageOutcome::score("b", &truth, &dets[..5]).unwrap(),
        ];
        FrocReport::from_outcomes(&outcomes).unwrap()
    }

    #[test]
    fn writes_a_non_blank_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("froc.png");
        let report = sample_report();
        write_froc_png(&path, &report, "unit test").unwrap();

        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "not a PNG signature"
        );
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), PLOT_SIZE);
        let white = img.pixels().filter(|p| p.0 == [255, 255, 255]).count();
        let total = (PLOT_SIZE.0 * PLOT_SIZE.1) as usize;
        assert!(white < total * 98 / 100, "plot is (nearly) blank");
        // The curve colour and the marker colour are both present.
        assert!(img.pixels().any(|p| p.0 == [31, 119, 180]));
        assert!(img.pixels().any(|p| p.0 == [214, 39, 40]));
        // Text was rendered: dark pixels in the title band.
        let title_dark = (0..PLOT_SIZE.0)
            .flat_map(|x| (0..40).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count();
        assert!(
            title_dark > 200,
            "no title text drawn ({title_dark} dark pixels)"
        );

        if let Ok(dir) = std::env::var("MA_KEEP_PLOT") {
            std::fs::copy(&path, Path::new(&dir).join("froc-unit.png")).unwrap();
        }
    }

    #[test]
    fn staircase_starts_left_and_ends_right() {
        let report = sample_report();
        let s = staircase(&report);
        assert_eq!(s.first().unwrap().0, X_MIN);
        assert_eq!(s.last().unwrap().0, X_MAX);
        assert!(s.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn rate_labels() {
        assert_eq!(rate_label(-4.0), "1/16");
        assert_eq!(rate_label(0.0), "1");
        assert_eq!(rate_label(3.0), "8");
    }

    #[test]
    fn recall_plot_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recall.png");
        let curve = vec![(10, 0.2), (150, 0.8), (300, 0.9)];
        write_recall_png(&path, &[("fold 1".into(), curve)]).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), PLOT_SIZE);
    }
}
