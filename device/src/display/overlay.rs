//! The operator's view: the frame, a circle around each detection at or above the
//! operating point, and a status bar (MA count and referral, latency, frame number,
//! camera state, model).
//!
//! ```text
//! +--------------------------------------------+
//! |   black |                      | black     |   image area: the frame scaled to fit,
//! |         |   frame   (o)        |           |   aspect kept, centred, letterboxed
//! |         |              (o)     |           |
//! +--------------------------------------------+
//! | MA: 3  REFER  812 ms  #42  camera ok  v1.2 |   status bar, 32 px
//! +--------------------------------------------+
//! ```
//!
//! Everything is integer arithmetic on pixels (the scaling uses fixed-point weights),
//! so the same inputs give the same bytes on every machine: the golden-image tests in
//! `tests/display_golden.rs` rely on it.

use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_9X15, FONT_10X20};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Circle, PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};

use super::palette::{
    BAR_BACKGROUND, BAR_RULE, MARKER_OUTLINE, TEXT_DIM, TEXT_MAIN, TEXT_MARGIN, TEXT_NO_REFER,
    TEXT_REFER, TEXT_WARN,
};
use ma_core::detection::Detection;

/// What the overlay shows besides the frame itself.
#[derive(Clone, Debug, PartialEq)]
pub struct OverlayInfo {
    /// In original frame pixel coordinates (as the detector reports them).
    pub detections: Vec<Detection>,
    /// The operating point: only detections with `score >= threshold` are circled.
    pub threshold: f64,
    /// Shown as "MA: n"; the caller's count (normally the detections at the threshold).
    pub ma_count: usize,
    /// Shown as "REFER" (orange-red) or "no refer" (green).
    pub refer: bool,
    /// The referral network's score, shown after the decision ("REFER 0.82"), when the
    /// model set has a referral network.
    pub refer_score: Option<f64>,
    /// Detection latency; a non-finite value shows as "-- ms".
    pub latency_ms: f64,
    pub frame_number: u64,
    /// Camera / source state in a few words, e.g. "camera ok",
    /// "camera lost, retrying in 4 s".
    pub source_state: String,
    /// `false` shows the source state in amber, to draw the operator's eye.
    pub source_ok: bool,
    pub model_version: Option<String>,
}

/// Height of the status bar at the bottom of the panel (less on panels lower than this).
pub const STATUS_BAR_HEIGHT: u32 = 32;
/// Smallest circle radius on the panel, so marks stay visible on heavily shrunk frames.
pub const MIN_MARKER_RADIUS: u32 = 8;
/// Circle radius in original frame pixels (a large microaneurysm is about this size).
pub const MARKER_RADIUS_ORIGINAL: f64 = 10.0;

/// Draws the whole view onto `target`, which is the panel (its bounding box).
pub fn draw_overlay<D: DrawTarget<Color = Rgb888>>(
    target: &mut D,
    frame: &image::RgbImage,
    view: &OverlayInfo,
) -> Result<(), D::Error> {
    let layout = Layout::new(target.bounding_box(), frame.dimensions());
    for band in layout.letterbox_bands() {
        target.fill_solid(&band, Rgb888::BLACK)?;
    }
    draw_scaled(target, frame, layout.image)?;
    draw_markers(
        &mut target.clipped(&layout.image_area),
        &layout,
        &view.detections,
        view.threshold,
    )?;
    draw_status_bar(target, layout.status_bar, view)
}

/// Where things go on a panel for a frame of a given size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    /// The panel above the status bar.
    pub image_area: Rectangle,
    /// The scaled frame: the largest rectangle of the frame's aspect ratio that fits
    /// `image_area`, centred in it (rounded to whole pixels).
    pub image: Rectangle,
    pub status_bar: Rectangle,
    frame_size: (u32, u32),
}

impl Layout {
    pub fn new(panel: Rectangle, frame_size: (u32, u32)) -> Self {
        let bar_h = STATUS_BAR_HEIGHT.min(panel.size.height);
        let area_size = Size::new(panel.size.width, panel.size.height - bar_h);
        let image_area = Rectangle::new(panel.top_left, area_size);
        let status_bar = Rectangle::new(
            panel.top_left + Point::new(0, area_size.height as i32),
            Size::new(panel.size.width, bar_h),
        );
        let (fw, fh) = frame_size;
        let (aw, ah) = (area_size.width, area_size.height);
        let image = if fw == 0 || fh == 0 || aw == 0 || ah == 0 {
            Rectangle::new(image_area.center(), Size::zero())
        } else {
            let s = (aw as f64 / fw as f64).min(ah as f64 / fh as f64);
            let w = ((fw as f64 * s).round() as u32).clamp(1, aw);
            let h = ((fh as f64 * s).round() as u32).clamp(1, ah);
            let offset = Point::new(((aw - w) / 2) as i32, ((ah - h) / 2) as i32);
            Rectangle::new(panel.top_left + offset, Size::new(w, h))
        };
        Layout {
            image_area,
            image,
            status_bar,
            frame_size,
        }
    }

    /// Panel pixels per frame pixel, horizontally and vertically (equal up to
    /// rounding of the scaled size).
    pub fn scale(&self) -> (f64, f64) {
        let (fw, fh) = self.frame_size;
        (
            self.image.size.width as f64 / fw.max(1) as f64,
            self.image.size.height as f64 / fh.max(1) as f64,
        )
    }

    /// A frame position (pixel centres at integers) on the panel (same convention):
    /// the mapping the scaler uses, so a mark sits on the pixel it names.
    pub fn to_panel(&self, x: f64, y: f64) -> (f64, f64) {
        let (sx, sy) = self.scale();
        (
            self.image.top_left.x as f64 + (x + 0.5) * sx - 0.5,
            self.image.top_left.y as f64 + (y + 0.5) * sy - 0.5,
        )
    }

    /// Circle radius on the panel: [`MARKER_RADIUS_ORIGINAL`] scaled, at least
    /// [`MIN_MARKER_RADIUS`].
    pub fn marker_radius(&self) -> u32 {
        let (sx, sy) = self.scale();
        ((MARKER_RADIUS_ORIGINAL * sx.min(sy)).round() as u32).max(MIN_MARKER_RADIUS)
    }

    /// The parts of the image area the frame does not cover.
    fn letterbox_bands(&self) -> [Rectangle; 4] {
        let (a, i) = (self.image_area, self.image);
        let a_bottom = a.top_left.y + a.size.height as i32;
        let a_right = a.top_left.x + a.size.width as i32;
        let i_bottom = i.top_left.y + i.size.height as i32;
        let i_right = i.top_left.x + i.size.width as i32;
        let rect = |x: i32, y: i32, w: i32, h: i32| {
            Rectangle::new(
                Point::new(x, y),
                Size::new(w.max(0) as u32, h.max(0) as u32),
            )
        };
        [
            rect(
                a.top_left.x,
                a.top_left.y,
                a.size.width as i32,
                i.top_left.y - a.top_left.y,
            ),
            rect(
                a.top_left.x,
                i_bottom,
                a.size.width as i32,
                a_bottom - i_bottom,
            ),
            rect(
                a.top_left.x,
                i.top_left.y,
                i.top_left.x - a.top_left.x,
                i.size.height as i32,
            ),
            rect(
                i_right,
                i.top_left.y,
                a_right - i_right,
                i.size.height as i32,
            ),
        ]
    }
}

/// The circle colour for a detection: yellow (255, 255, 0) at the threshold, turning
/// linearly into red (255, 0, 0) at score 1 (only the green component falls). Yellow
/// and red both stand out on the orange fundus; red means "most certain".
pub fn score_colour(score: f64, threshold: f64) -> Rgb888 {
    let t = if threshold >= 1.0 {
        1.0
    } else {
        ((score - threshold) / (1.0 - threshold)).clamp(0.0, 1.0)
    };
    // A NaN score passes `clamp` unchanged: show it as the threshold colour.
    let t = if t.is_nan() { 0.0 } else { t };
    Rgb888::new(255, (255.0 * (1.0 - t)).round() as u8, 0)
}

/// A ring around each detection at or above `threshold`, most certain drawn last (on
/// top). Each ring is 2 px of [`score_colour`] inside a 1 px black outline on both
/// sides, visible on the bright optic disc and on the dark surround alike.
fn draw_markers<D: DrawTarget<Color = Rgb888>>(
    target: &mut D,
    layout: &Layout,
    detections: &[Detection],
    threshold: f64,
) -> Result<(), D::Error> {
    let mut shown: Vec<&Detection> = detections
        .iter()
        .filter(|d| d.score >= threshold && d.x.is_finite() && d.y.is_finite())
        .collect();
    shown.sort_by(|a, b| a.score.total_cmp(&b.score));
    let diameter = 2 * layout.marker_radius() + 1;
    let outline = PrimitiveStyle::with_stroke(MARKER_OUTLINE, 4);
    for d in shown {
        let (px, py) = layout.to_panel(d.x, d.y);
        // Skip rings that cannot touch the image area (this also keeps wild
        // coordinates away from embedded-graphics' unchecked point arithmetic).
        let area = layout.image_area;
        let reach = diameter as f64;
        let (left, top) = (area.top_left.x as f64, area.top_left.y as f64);
        if px < left - reach
            || py < top - reach
            || px > left + area.size.width as f64 + reach
            || py > top + area.size.height as f64 + reach
        {
            continue;
        }
        let circle =
            Circle::with_center(Point::new(px.round() as i32, py.round() as i32), diameter);
        circle.into_styled(outline).draw(target)?;
        let ring = PrimitiveStyle::with_stroke(score_colour(d.score, threshold), 2);
        circle.into_styled(ring).draw(target)?;
    }
    Ok(())
}

/// Resamples `frame` into `dest` with a triangle filter: bilinear when enlarging,
/// widened to average every covered source pixel when shrinking (plain bilinear would
/// skip pixels and make vessels and microaneurysms flicker in and out). Writes one
/// row at a time with `fill_contiguous`.
fn draw_scaled<D: DrawTarget<Color = Rgb888>>(
    target: &mut D,
    frame: &image::RgbImage,
    dest: Rectangle,
) -> Result<(), D::Error> {
    let (fw, fh) = frame.dimensions();
    let (dw, dh) = (dest.size.width, dest.size.height);
    if fw == 0 || fh == 0 || dw == 0 || dh == 0 {
        return target.fill_solid(&dest, Rgb888::BLACK);
    }
    let columns = Taps::new(fw, dw);
    let rows = Taps::new(fh, dh);
    let src = frame.as_raw();
    let src_row_len = fw as usize * 3;
    let mut acc = vec![0u32; src_row_len];
    let mut out = Vec::with_capacity(dw as usize);
    for dy in 0..dh as usize {
        // Vertical pass over the whole source row: weights sum to 2^WEIGHT_BITS, so
        // `acc` ends at most 255 << 14; shifted to 8 fraction bits (<= 65280) it leaves
        // room for the horizontal pass in u32.
        acc.fill(0);
        let (first, weights) = rows.get(dy);
        for (k, &w) in weights.iter().enumerate() {
            let row = &src[(first + k) * src_row_len..][..src_row_len];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as u32 * w;
            }
        }
        for a in &mut acc {
            *a = (*a + (1 << (WEIGHT_BITS - 9))) >> (WEIGHT_BITS - 8);
        }
        out.clear();
        for dx in 0..dw as usize {
            let (first, weights) = columns.get(dx);
            let mut rgb = [0u32; 3];
            for (k, &w) in weights.iter().enumerate() {
                for (sum, &v) in rgb.iter_mut().zip(&acc[(first + k) * 3..][..3]) {
                    *sum += v * w;
                }
            }
            let round =
                |v: u32| ((v + (1 << (WEIGHT_BITS + 7))) >> (WEIGHT_BITS + 8)).min(255) as u8;
            out.push(Rgb888::new(round(rgb[0]), round(rgb[1]), round(rgb[2])));
        }
        let row = Rectangle::new(dest.top_left + Point::new(0, dy as i32), Size::new(dw, 1));
        target.fill_contiguous(&row, out.iter().copied())?;
    }
    Ok(())
}

/// Fixed-point precision of the resampling weights.
const WEIGHT_BITS: u32 = 14;

/// For each output pixel along one axis: the first source pixel it reads and the
/// integer weights (summing to exactly `1 << WEIGHT_BITS`) of consecutive pixels.
struct Taps {
    /// (first source pixel, start in `weights`, number of weights) per output pixel.
    spans: Vec<(usize, usize, usize)>,
    weights: Vec<u32>,
}

impl Taps {
    fn new(src: u32, dst: u32) -> Self {
        let scale = dst as f64 / src as f64;
        let support = if scale < 1.0 { 1.0 / scale } else { 1.0 };
        let one = (1u32 << WEIGHT_BITS) as f64;
        let mut taps = Taps {
            spans: Vec::with_capacity(dst as usize),
            weights: Vec::new(),
        };
        for o in 0..dst {
            // Pixel-edge coordinates: output pixel o covers [o, o+1) / scale.
            let centre = (o as f64 + 0.5) / scale;
            let lo = (centre - support).floor().max(0.0) as usize;
            let hi = ((centre + support).ceil() as usize).min(src as usize);
            let raw: Vec<f64> = (lo..hi)
                .map(|i| (1.0 - (i as f64 + 0.5 - centre).abs() / support).max(0.0))
                .collect();
            // The source pixel under the centre has weight >= 0.5, so `sum` > 0.
            let sum: f64 = raw.iter().sum();
            // Rounding the running total (not each weight) makes the integer weights
            // sum to exactly `one`, so flat areas keep their exact colour.
            let mut cumulative = 0.0;
            let mut previous = 0u32;
            let w: Vec<u32> = raw
                .iter()
                .map(|r| {
                    cumulative += r;
                    let next = (cumulative / sum * one).round() as u32;
                    let w = next - previous;
                    previous = next;
                    w
                })
                .collect();
            let first = w.iter().position(|&v| v > 0).unwrap_or(0);
            let end = w.iter().rposition(|&v| v > 0).map_or(first, |e| e + 1);
            taps.spans
                .push((lo + first, taps.weights.len(), end - first));
            taps.weights.extend_from_slice(&w[first..end]);
        }
        taps
    }

    fn get(&self, o: usize) -> (usize, &[u32]) {
        let (first, at, len) = self.spans[o];
        (first, &self.weights[at..at + len])
    }
}

/// One piece of status text.
#[derive(Clone, Debug, PartialEq)]
struct Field {
    text: String,
    colour: Rgb888,
    kind: FieldKind,
}

/// Fields in the order they are given up on narrow panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FieldKind {
    Model,
    Frame,
    Latency,
    /// Truncated rather than dropped.
    Source,
    /// "MA: n" and the referral: always shown.
    Result,
}

/// Blank characters between fields.
const FIELD_GAP: usize = 2;

fn status_fields(view: &OverlayInfo) -> Vec<Field> {
    let field = |text: String, colour, kind| Field { text, colour, kind };
    let latency = if view.latency_ms.is_finite() && view.latency_ms >= 0.0 {
        format!("{:.0} ms", view.latency_ms)
    } else {
        "-- ms".to_string()
    };
    let (refer, refer_colour) = if view.refer {
        ("REFER", TEXT_REFER)
    } else {
        ("no refer", TEXT_NO_REFER)
    };
    let refer = match view.refer_score {
        Some(score) if score.is_finite() => format!("{refer} {score:.2}"),
        _ => refer.to_string(),
    };
    let mut fields = vec![
        field(
            format!("MA: {}", view.ma_count),
            TEXT_MAIN,
            FieldKind::Result,
        ),
        field(refer, refer_colour, FieldKind::Result),
        field(latency, TEXT_DIM, FieldKind::Latency),
        field(
            format!("#{}", view.frame_number),
            TEXT_DIM,
            FieldKind::Frame,
        ),
        field(
            view.source_state.clone(),
            if view.source_ok { TEXT_DIM } else { TEXT_WARN },
            FieldKind::Source,
        ),
    ];
    if let Some(model) = view.model_version.as_deref().filter(|m| !m.is_empty()) {
        fields.push(field(model.to_string(), TEXT_DIM, FieldKind::Model));
    }
    fields.retain(|f| !f.text.is_empty());
    fields
}

/// Width in characters of the fields on one line.
fn line_chars(fields: &[Field]) -> usize {
    let chars: usize = fields.iter().map(|f| f.text.chars().count()).sum();
    chars + FIELD_GAP * fields.len().saturating_sub(1)
}

fn char_advance(font: &MonoFont) -> usize {
    (font.character_size.width + font.character_spacing) as usize
}

/// Picks the largest font that shows every field in `width_px`, or every field but
/// the model version (a readable result matters more than the version string). On
/// narrower panels: the smallest font, dropping the model version, then the frame
/// number, then the latency, and finally shortening the source state with "...".
fn fit_status(
    mut fields: Vec<Field>,
    width_px: u32,
    bar_height: u32,
) -> (&'static MonoFont<'static>, Vec<Field>) {
    let fonts: &[&'static MonoFont<'static>] = if width_px >= 1000 {
        &[&FONT_10X20, &FONT_9X15, &FONT_6X10]
    } else {
        &[&FONT_9X15, &FONT_6X10]
    };
    for &font in fonts
        .iter()
        .filter(|f| f.character_size.height <= bar_height)
    {
        let fits = |fields: &[Field]| line_chars(fields) * char_advance(font) <= width_px as usize;
        if fits(&fields) {
            return (font, fields);
        }
        let without_model: Vec<Field> = fields
            .iter()
            .filter(|f| f.kind != FieldKind::Model)
            .cloned()
            .collect();
        if fits(&without_model) {
            return (font, without_model);
        }
    }
    let font = &FONT_6X10;
    let max_chars = width_px as usize / char_advance(font);
    for drop in [FieldKind::Model, FieldKind::Frame, FieldKind::Latency] {
        if line_chars(&fields) <= max_chars {
            return (font, fields);
        }
        fields.retain(|f| f.kind != drop);
    }
    let over = line_chars(&fields).saturating_sub(max_chars);
    if over > 0
        && let Some(i) = fields.iter().position(|f| f.kind == FieldKind::Source)
    {
        let len = fields[i].text.chars().count();
        let keep = len.saturating_sub(over + 3);
        if keep >= 4 {
            fields[i].text = fields[i].text.chars().take(keep).collect::<String>() + "...";
        } else {
            fields.remove(i);
        }
    }
    // Whatever still does not fit (panels under ~100 px) is clipped at the edge.
    (font, fields)
}

fn draw_status_bar<D: DrawTarget<Color = Rgb888>>(
    target: &mut D,
    bar: Rectangle,
    view: &OverlayInfo,
) -> Result<(), D::Error> {
    if bar.is_zero_sized() {
        return Ok(());
    }
    target.fill_solid(&bar, BAR_BACKGROUND)?;
    target.fill_solid(
        &Rectangle::new(bar.top_left, Size::new(bar.size.width, 1)),
        BAR_RULE,
    )?;
    let text_width = bar.size.width.saturating_sub(2 * TEXT_MARGIN);
    let (font, fields) = fit_status(status_fields(view), text_width, bar.size.height);
    let top =
        bar.top_left.y + (bar.size.height.saturating_sub(font.character_size.height) / 2) as i32;
    let mut x = bar.top_left.x + TEXT_MARGIN as i32;
    let mut clipped = target.clipped(&bar);
    for f in &fields {
        let style = MonoTextStyle::new(font, f.colour);
        Text::with_baseline(&f.text, Point::new(x, top), style, Baseline::Top)
            .draw(&mut clipped)?;
        x += ((f.text.chars().count() + FIELD_GAP) * char_advance(font)) as i32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::display::Canvas;

    fn panel(w: u32, h: u32) -> Rectangle {
        Rectangle::new(Point::zero(), Size::new(w, h))
    }

    fn info(detections: Vec<Detection>) -> OverlayInfo {
        OverlayInfo {
            detections,
            threshold: 0.5,
            ma_count: 1,
            refer: true,
            refer_score: None,
            latency_ms: 812.4,
            frame_number: 42,
            source_state: "camera ok".into(),
            source_ok: true,
            model_version: Some("cascade-v1".into()),
        }
    }

    fn flat(w: u32, h: u32, rgb: [u8; 3]) -> image::RgbImage {
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
    }

    fn render(w: u32, h: u32, frame: &image::RgbImage, view: &OverlayInfo) -> Canvas {
        let mut c = Canvas::new(w, h);
        let Ok(()) = draw_overlay(&mut c, frame, view);
        c
    }

    #[test]
    fn frame_centre_lands_on_the_image_area_centre() {
        for (pw, ph, fw, fh) in [
            (800, 480, 1500, 1152),
            (320, 240, 1500, 1152),
            (1920, 1080, 2544, 1696),
            (800, 480, 400, 400),
            (800, 480, 1000, 200),
        ] {
            let l = Layout::new(panel(pw, ph), (fw, fh));
            let (cx, cy) = l.to_panel((fw as f64 - 1.0) / 2.0, (fh as f64 - 1.0) / 2.0);
            let (ax, ay) = (
                (pw as f64 - 1.0) / 2.0,
                (ph - STATUS_BAR_HEIGHT) as f64 / 2.0 - 0.5,
            );
            assert!(
                (cx - ax).abs() <= 0.5 && (cy - ay).abs() <= 0.5,
                "{pw}x{ph} {fw}x{fh}: ({cx}, {cy}) vs ({ax}, {ay})"
            );
            // Aspect kept (to rounding), one side filling the area.
            let (sx, sy) = l.scale();
            let rounding = 0.5 / fw as f64 + 0.5 / fh as f64;
            assert!((sx - sy).abs() <= rounding + 1e-12, "{sx} {sy}");
            assert!(l.image.size.width == pw || l.image.size.height == ph - STATUS_BAR_HEIGHT);
            // Frame corners map to the image rectangle's corner pixels.
            let (x0, y0) = l.to_panel(-0.5, -0.5);
            assert_eq!(
                (x0 + 0.5, y0 + 0.5),
                (l.image.top_left.x as f64, l.image.top_left.y as f64)
            );
        }
    }

    #[test]
    fn centre_detection_is_circled_around_the_centre() {
        let frame = flat(1500, 1152, [90, 40, 20]);
        let view = info(vec![Detection {
            x: 749.5,
            y: 575.5,
            score: 0.99,
        }]);
        let c = render(800, 480, &frame, &view);
        // The red ring's bounding box is centred on the image area's centre.
        let (mut x0, mut y0, mut x1, mut y1) = (i32::MAX, i32::MAX, i32::MIN, i32::MIN);
        for y in 0..448 {
            for x in 0..800 {
                let p = c.pixel(x, y).unwrap();
                if p.r() == 255 && p.b() == 0 && p.g() < 10 {
                    (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                }
            }
        }
        assert!(x0 < x1, "no ring drawn");
        let (cx, cy) = ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0);
        assert!(
            (cx - 399.5).abs() <= 1.0 && (cy - 223.5).abs() <= 1.0,
            "ring centred at ({cx}, {cy})"
        );
        // Radius: MIN_MARKER_RADIUS, since 10 px * 0.39 is smaller.
        assert!(
            ((x1 - x0) / 2).abs_diff(MIN_MARKER_RADIUS as i32) <= 1,
            "{x0}..{x1}"
        );
    }

    #[test]
    fn letterboxes_in_black_both_ways() {
        let grey = [128, 128, 128];
        // Wide frame: black above and below. Tall frame: black left and right.
        for (fw, fh, outside, inside) in [
            (1000, 100, (400, 5), (400, 224)),
            (100, 1000, (5, 224), (400, 224)),
        ] {
            let c = render(800, 480, &flat(fw, fh, grey), &info(vec![]));
            assert_eq!(c.pixel(outside.0, outside.1), Some(Rgb888::BLACK));
            assert_eq!(
                c.pixel(inside.0, inside.1),
                Some(Rgb888::new(128, 128, 128))
            );
        }
    }

    #[test]
    fn scaling_keeps_flat_colours_and_edges() {
        // Exact weights: a flat frame stays exactly its colour, up or down.
        for (fw, fh) in [(1500, 1152), (37, 23), (3, 2)] {
            let c = render(320, 240, &flat(fw, fh, [201, 7, 99]), &info(vec![]));
            let l = Layout::new(panel(320, 240), (fw, fh));
            for p in l.image.points() {
                assert_eq!(
                    c.pixel(p.x, p.y),
                    Some(Rgb888::new(201, 7, 99)),
                    "{fw}x{fh} at {p}"
                );
            }
        }
        // Enlarging a 2x1 frame: the outer columns keep the end colours.
        let mut two = flat(2, 1, [0, 0, 0]);
        two.put_pixel(1, 0, image::Rgb([200, 100, 50]));
        let c = render(320, 240, &two, &info(vec![]));
        let l = Layout::new(panel(320, 240), (2, 1));
        let (left, right, y) = (
            l.image.top_left.x,
            l.image.top_left.x + l.image.size.width as i32 - 1,
            l.image.center().y,
        );
        assert_eq!(c.pixel(left, y), Some(Rgb888::BLACK));
        assert_eq!(c.pixel(right, y), Some(Rgb888::new(200, 100, 50)));
        let mid = c.pixel(l.image.center().x, y).unwrap();
        assert!((90..=110).contains(&mid.r()), "{mid:?}");
    }

    #[test]
    fn colour_goes_from_yellow_to_red_monotonically() {
        for threshold in [0.0, 0.3, 0.5, 0.9] {
            assert_eq!(score_colour(threshold, threshold), Rgb888::new(255, 255, 0));
            assert_eq!(score_colour(1.0, threshold), Rgb888::new(255, 0, 0));
            let mut last = 256;
            for k in 0..=100 {
                let s = threshold + (1.0 - threshold) * k as f64 / 100.0;
                let c = score_colour(s, threshold);
                assert_eq!((c.r(), c.b()), (255, 0));
                assert!((c.g() as u32) <= last, "green rises at score {s}");
                last = c.g() as u32;
            }
        }
        // Out-of-range inputs stay in range.
        assert_eq!(score_colour(0.1, 0.5), Rgb888::new(255, 255, 0));
        assert_eq!(score_colour(f64::NAN, 0.5), Rgb888::new(255, 255, 0));
        assert_eq!(score_colour(0.7, 1.0), Rgb888::new(255, 0, 0));
    }

    #[test]
    fn only_detections_at_or_above_the_threshold_are_drawn() {
        let frame = flat(600, 450, [90, 40, 20]);
        let plain = render(800, 480, &frame, &info(vec![]));
        let below = info(vec![
            Detection {
                x: 300.0,
                y: 200.0,
                score: 0.49,
            },
            Detection {
                x: f64::NAN,
                y: 1.0,
                score: 0.9,
            },
            Detection {
                x: 1e300,
                y: -1e300,
                score: 0.9,
            },
        ]);
        assert_eq!(render(800, 480, &frame, &below), plain);
        let at = info(vec![Detection {
            x: 300.0,
            y: 200.0,
            score: 0.5,
        }]);
        assert_ne!(render(800, 480, &frame, &at), plain);
    }

    #[test]
    fn status_text_fits_every_panel_width() {
        let mut view = info(vec![]);
        view.source_state = "camera lost, retrying in 4 s".into();
        view.source_ok = false;
        view.frame_number = 123_456_789;
        view.model_version = Some("ma-cascade 2025-06-01 int8".into());
        for width in [320u32, 400, 480, 640, 800, 1024, 1280, 1920] {
            let avail = width - 2 * TEXT_MARGIN;
            let (font, fields) = fit_status(status_fields(&view), avail, STATUS_BAR_HEIGHT);
            assert!(
                line_chars(&fields) * char_advance(font) <= avail as usize,
                "{width}: {fields:?}"
            );
            let texts: Vec<&str> = fields.iter().map(|f| f.text.as_str()).collect();
            assert_eq!(texts[..2], ["MA: 1", "REFER"], "{width}");
            assert!(
                texts.iter().any(|t| t.starts_with("camera")),
                "{width}: {texts:?}"
            );
            if width >= 1280 {
                assert_eq!(fields.len(), 6, "{width}: everything shown");
            }
            if width >= 800 {
                assert!(font.character_size.height >= 15, "{width}: small font");
            }
        }
        // A long source text is shortened, keeping its start.
        view.source_state = "camera lost: /dev/video0 disconnected, retrying in 4 s".into();
        let (_, fields) = fit_status(
            status_fields(&view),
            320 - 2 * TEXT_MARGIN,
            STATUS_BAR_HEIGHT,
        );
        let source = fields.iter().find(|f| f.kind == FieldKind::Source).unwrap();
        assert!(
            source.text.starts_with("camera lost") && source.text.ends_with("..."),
            "{source:?}"
        );
    }

    #[test]
    fn odd_sizes_do_not_panic() {
        let view = info(vec![Detection {
            x: 0.0,
            y: 0.0,
            score: 1.0,
        }]);
        for (pw, ph) in [(0, 0), (1, 1), (10, 10), (320, 20), (5, 400), (2000, 33)] {
            for frame in [
                flat(0, 0, [0; 3]),
                flat(1, 1, [9; 3]),
                flat(3000, 2, [9; 3]),
            ] {
                render(pw, ph, &frame, &view);
            }
        }
    }
}
