//! The panel's colours and text margin: one palette for the result overlay and the
//! loop's other screens (no result yet, frame not analysed, error banners).

use embedded_graphics::pixelcolor::{Rgb888, RgbColor};

pub const BAR_BACKGROUND: Rgb888 = Rgb888::new(22, 22, 26);
pub const BAR_RULE: Rgb888 = Rgb888::new(70, 70, 76);
pub const TEXT_MAIN: Rgb888 = Rgb888::new(235, 235, 235);
pub const TEXT_DIM: Rgb888 = Rgb888::new(175, 175, 180);
pub const TEXT_REFER: Rgb888 = Rgb888::new(255, 90, 40);
pub const TEXT_NO_REFER: Rgb888 = Rgb888::new(80, 210, 100);
/// Amber: something needs the operator's attention (not saved, camera lost, an error).
pub const TEXT_WARN: Rgb888 = Rgb888::new(255, 190, 0);
/// Behind an error banner's amber text.
pub const BANNER_BACKGROUND: Rgb888 = Rgb888::new(60, 40, 0);
pub const MARKER_OUTLINE: Rgb888 = Rgb888::BLACK;
/// Pixels between text and the edge of its bar or banner.
pub const TEXT_MARGIN: u32 = 6;
