//! What the operator sees: the frame, circles around suspected microaneurysms and a
//! status bar, on the board's panel.
//!
//! Drawing and showing are split. Everything is drawn with embedded-graphics into a
//! [`Canvas`] (an in-memory `DrawTarget<Color = Rgb888>`), then handed to a [`Panel`],
//! which only shows finished frames:
//!
//! ```no_run
//! # fn demo(frame: &image::RgbImage, info: &ma_device::display::OverlayInfo) -> anyhow::Result<()> {
//! use ma_device::display::{Canvas, Panel, PngSink, draw_overlay};
//! let mut panel = PngSink::new("out/panel", 800, 480)?;
//! let (w, h) = panel.size();
//! let mut canvas = Canvas::new(w, h);
//! draw_overlay(&mut canvas, frame, info).unwrap_or_else(|never| match never {});
//! panel.present(&canvas)?;
//! # Ok(()) }
//! ```
//!
//! Why this split: one drawing path (and one set of golden images) serves every sink;
//! sinks never see half-drawn frames (no flicker on the framebuffer, no torn PNGs); and
//! the only hardware-specific code is the final copy, a pure function tested on CI.
//!
//! [`overlay`] draws a result (frame, markers, status bar), [`screen`] the device loop's
//! screens around it, both in one [`palette`].
//!
//! Sinks: [`PngSink`] (the simulated board's panel, one PNG per frame) and
//! [`FramebufferSink`] (Linux `/dev/fbN`, 16/24/32 bpp).

pub mod canvas;
pub mod fbdev;
pub mod overlay;
pub mod palette;
pub mod png_sink;
pub mod screen;

pub use canvas::Canvas;
pub use fbdev::{FbPixelFormat, FramebufferSink};
pub use overlay::{OverlayInfo, draw_overlay};
pub use png_sink::PngSink;

/// A display that shows finished frames.
///
/// Callers draw into a [`Canvas`] of exactly [`Panel::size`] and call
/// [`Panel::present`]; a canvas of another size is an error (not silently cropped), so
/// a wrong board configuration shows up at the first frame.
pub trait Panel {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);

    /// Show `canvas` (copy it out; the caller may reuse it for the next frame).
    fn present(&mut self, canvas: &Canvas) -> anyhow::Result<()>;
}

/// The error for a canvas that does not match the panel it is presented on.
fn check_canvas_size(panel: &str, panel_size: (u32, u32), canvas: &Canvas) -> anyhow::Result<()> {
    if canvas.size() != panel_size {
        anyhow::bail!(
            "canvas is {}x{} but {panel} is {}x{}",
            canvas.width(),
            canvas.height(),
            panel_size.0,
            panel_size.1
        );
    }
    Ok(())
}
