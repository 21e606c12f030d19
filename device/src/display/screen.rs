//! The device loop's screens: the last result with the source's condition in the status
//! bar, a frame that could not be analysed, "no result yet", and an error banner across
//! the top. The result itself is drawn by [`draw_overlay`]; this adds what the loop needs
//! around it, in the same [`palette`](super::palette), and the referral heatmap blended
//! into the photo when the overlay is on ([`Screen::heatmap`]).

use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_9X15};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;
use embedded_graphics::text::{Baseline, Text};
use image::RgbImage;
use ma_core::image_io::one_line;

use super::Canvas;
use super::overlay::{Layout, OverlayInfo, draw_overlay};
use super::palette::{
    BANNER_BACKGROUND, BAR_BACKGROUND, BAR_RULE, TEXT_DIM, TEXT_MARGIN, TEXT_WARN,
};
use crate::cascade::Referral;

/// What the panel shows besides the status.
pub enum Shown {
    /// No frame yet.
    Nothing,
    /// The last processed frame and its result (`source_state` is filled in per render),
    /// with the referral network's answer when the model set has one.
    Result {
        image: RgbImage,
        info: OverlayInfo,
        /// Boxed so the other variants stay small.
        referral: Option<Box<Referral>>,
    },
    /// The last frame could not be analysed.
    Failed {
        image: RgbImage,
        frame_number: u64,
        reason: String,
    },
}

/// The loop's screen: what it shows, drawn into a canvas of the panel's size.
pub struct Screen {
    pub canvas: Canvas,
    pub shown: Shown,
    /// The operating point's score, for marker colours.
    threshold: f64,
    /// Whether a result is drawn with its referral heatmap blended in.
    pub heatmap: bool,
    /// The status, its colour and the banner of the last render, for [`Screen::rerender`].
    last: (String, bool, Option<String>),
}

/// [`TEXT_MARGIN`] for signed pixel arithmetic.
const MARGIN: i32 = TEXT_MARGIN as i32;

impl Screen {
    /// A screen of `size` (the panel's) that shows nothing yet.
    pub fn new(size: (u32, u32), threshold: f64) -> Self {
        Self {
            canvas: Canvas::new(size.0, size.1),
            shown: Shown::Nothing,
            threshold,
            heatmap: false,
            last: (String::new(), true, None),
        }
    }

    /// Draws again with the last status and banner (after [`Screen::heatmap`] changed).
    pub fn rerender(&mut self) {
        let (status, ok, banner) = self.last.clone();
        self.render(&status, ok, banner.as_deref());
    }

    /// Whether the heatmap overlay would change the current picture: a result with a
    /// referral answer is shown.
    pub fn has_heatmap(&self) -> bool {
        matches!(
            self.shown,
            Shown::Result {
                referral: Some(_),
                ..
            }
        )
    }

    /// Draws the current view with `status` (source condition, saved state) in the
    /// status bar, amber unless `ok`, and `banner` (an error) across the top.
    pub fn render(&mut self, status: &str, ok: bool, banner: Option<&str>) {
        self.last = (status.to_string(), ok, banner.map(str::to_string));
        let canvas = &mut self.canvas;
        let status_colour = if ok { TEXT_DIM } else { TEXT_WARN };
        match &self.shown {
            Shown::Result {
                image,
                info,
                referral,
            } => {
                let info = OverlayInfo {
                    source_state: status.to_string(),
                    source_ok: ok,
                    ..info.clone()
                };
                let blended;
                let image = match referral {
                    Some(r) if self.heatmap => {
                        blended = r.picture(image);
                        &blended
                    }
                    _ => image,
                };
                let Ok(()) = draw_overlay(canvas, image, &info);
            }
            Shown::Failed {
                image,
                frame_number,
                reason,
            } => {
                draw_frame_only(canvas, image, self.threshold);
                draw_plain_bar(
                    canvas,
                    &[
                        ("NOT ANALYSED", TEXT_WARN),
                        (&format!("#{frame_number}"), TEXT_DIM),
                        (status, status_colour),
                    ],
                );
                if banner.is_none() {
                    draw_banner(canvas, reason);
                }
            }
            Shown::Nothing => {
                draw_frame_only(canvas, &RgbImage::new(0, 0), self.threshold);
                draw_plain_bar(
                    canvas,
                    &[("no result yet", TEXT_DIM), (status, status_colour)],
                );
            }
        }
        if let Some(text) = banner {
            draw_banner(canvas, text);
        }
    }
}

/// The frame (letterboxed, no marks) and an empty status bar.
fn draw_frame_only(canvas: &mut Canvas, image: &RgbImage, threshold: f64) {
    let info = OverlayInfo {
        detections: Vec::new(),
        threshold,
        ma_count: 0,
        refer: false,
        refer_score: None,
        latency_ms: f64::NAN,
        frame_number: 0,
        source_state: String::new(),
        source_ok: true,
        model_version: None,
    };
    let Ok(()) = draw_overlay(canvas, image, &info);
}

fn layout(canvas: &Canvas) -> Layout {
    Layout::new(canvas.bounding_box(), (0, 0))
}

/// A status bar of plain fields, for screens without a result (the overlay's bar always
/// shows an MA count and a referral, which would mislead here).
fn draw_plain_bar(canvas: &mut Canvas, fields: &[(&str, Rgb888)]) {
    let bar = layout(canvas).status_bar;
    if bar.is_zero_sized() {
        return;
    }
    let Ok(()) = canvas.fill_solid(&bar, BAR_BACKGROUND);
    let rule = Rectangle::new(bar.top_left, Size::new(bar.size.width, 1));
    let Ok(()) = canvas.fill_solid(&rule, BAR_RULE);
    let font = font_for(bar.size.height);
    let advance = (font.character_size.width + font.character_spacing) as i32;
    let top =
        bar.top_left.y + (bar.size.height.saturating_sub(font.character_size.height) / 2) as i32;
    let right = bar.top_left.x + bar.size.width as i32 - MARGIN;
    let mut x = bar.top_left.x + MARGIN;
    let mut clipped = canvas.clipped(&bar);
    for (text, colour) in fields.iter().filter(|(t, _)| !t.is_empty()) {
        let room = ((right - x) / advance).max(0) as usize;
        if room < 4 {
            break;
        }
        let text = fit(text, room);
        let style = MonoTextStyle::new(font, *colour);
        let Ok(_) =
            Text::with_baseline(&text, Point::new(x, top), style, Baseline::Top).draw(&mut clipped);
        x += (text.chars().count() as i32 + 2) * advance;
    }
}

/// Amber text on a dark band across the top of the image area, wrapped at word
/// boundaries onto at most [`BANNER_LINES`] lines.
fn draw_banner(canvas: &mut Canvas, text: &str) {
    let area = layout(canvas).image_area;
    if area.is_zero_sized() {
        return;
    }
    let font = font_for(area.size.height);
    let advance = (font.character_size.width + font.character_spacing) as i32;
    let room = ((area.size.width as i32 - 2 * MARGIN) / advance).max(0) as usize;
    let lines = wrap(&one_line(text), room, BANNER_LINES);
    let line_height = font.character_size.height + 2;
    let height = (line_height * lines.len() as u32 + 6).min(area.size.height);
    let band = Rectangle::new(area.top_left, Size::new(area.size.width, height));
    let Ok(()) = canvas.fill_solid(&band, BANNER_BACKGROUND);
    let style = MonoTextStyle::new(font, TEXT_WARN);
    let mut clipped = canvas.clipped(&band);
    for (i, line) in lines.iter().enumerate() {
        let origin = band.top_left + Point::new(MARGIN, 4 + (i as u32 * line_height) as i32);
        let Ok(_) = Text::with_baseline(line, origin, style, Baseline::Top).draw(&mut clipped);
    }
}

/// Lines of an error banner at most.
const BANNER_LINES: usize = 3;

/// `text` in lines of at most `room` characters, broken at spaces where possible (long
/// words are cut), at most `max_lines`; the last one ends in "..." if text is left over.
fn wrap(text: &str, room: usize, max_lines: usize) -> Vec<String> {
    let room = room.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut rest = fit(text, usize::MAX);
    while !rest.is_empty() && lines.len() < max_lines {
        if rest.len() <= room {
            lines.push(std::mem::take(&mut rest));
            break;
        }
        // ASCII only after `fit`, so byte indices are character indices.
        let cut = rest[..=room].rfind(' ').filter(|&i| i > 0).unwrap_or(room);
        lines.push(rest[..cut].trim_end().to_string());
        rest = rest[cut..].trim_start().to_string();
    }
    if !rest.is_empty()
        && let Some(last) = lines.last_mut()
    {
        *last = fit(&format!("{last} {rest}"), room);
    }
    lines
}

fn font_for(height: u32) -> &'static MonoFont<'static> {
    if height >= 24 { &FONT_9X15 } else { &FONT_6X10 }
}

/// `text` cut to `room` characters, ending in "..." when cut. ASCII only (the fonts are).
fn fit(text: &str, room: usize) -> String {
    let text: String = text
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().count() <= room {
        text
    } else if room > 3 {
        text.chars()
            .take(room - 3)
            .collect::<String>()
            .trim_end()
            .to_string()
            + "..."
    } else {
        text.chars().take(room).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_breaks_at_spaces_and_marks_the_cut() {
        assert_eq!(wrap("camera lost", 20, 3), ["camera lost"]);
        assert_eq!(
            wrap("skipping image: photos/b.png: not an image", 16, 3),
            ["skipping image:", "photos/b.png:", "not an image"]
        );
        assert_eq!(wrap("aaaaaaaaaa bb", 4, 3), ["aaaa", "aaaa", "a..."]);
        assert_eq!(wrap("one two three four", 9, 2), ["one two", "three..."]);
        assert!(wrap("", 10, 3).is_empty());
    }

    #[test]
    fn fit_cuts_and_keeps_ascii() {
        assert_eq!(fit("camera ok", 20), "camera ok");
        assert_eq!(fit("camera lost: no such device", 10), "camera...");
        assert_eq!(fit("µ", 5), "?");
    }
}
