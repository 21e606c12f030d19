//! A map over the referral input (attention or S1 sensitivity) blended onto the photo, the
//! picture a clinician looks at: the device's `detect --heatmaps` and the workstation's
//! `ma-trainer heatmap` draw it the same way.

use image::{Rgb, RgbImage};

use crate::referral::{AttentionBox, ReferralView};

/// The heatmap picture: `photo` with `map` blended in ([`blend`]) and `boxes` outlined in
/// white.
pub fn picture(
    photo: &RgbImage,
    view: &ReferralView,
    map: &[f32],
    map_side: usize,
    max: f32,
    boxes: &[AttentionBox],
) -> RgbImage {
    let mut out = blend(photo, view, map, map_side, max);
    for b in boxes {
        outline(&mut out, b.x0, b.y0, b.x1, b.y1, Rgb([255, 255, 255]));
    }
    out
}

/// `photo` with `map` (`map_side` cells a side over the view's input square) blended in:
/// values are scaled by `max` (clamped to 1) and drawn dark blue -> red -> yellow, more
/// opaque where hotter; pixels outside the input square are left as they are.
pub fn blend(
    photo: &RgbImage,
    view: &ReferralView,
    map: &[f32],
    map_side: usize,
    max: f32,
) -> RgbImage {
    let mut out = photo.clone();
    let max = if max > 0.0 && max.is_finite() {
        max
    } else {
        1.0
    };
    for (x, y, px) in out.enumerate_pixels_mut() {
        let Some(v) = view.map_at(map, map_side, x as f64, y as f64) else {
            continue;
        };
        let v = (v / max).clamp(0.0, 1.0);
        let colour = ramp(v);
        let alpha = 0.15 + 0.5 * v;
        for (channel, c) in px.0.iter_mut().zip(colour) {
            *channel = (*channel as f32 * (1.0 - alpha) + c * alpha).round() as u8;
        }
    }
    out
}

/// The value at quantile `q` (0..1) of `map`: a robust maximum for [`blend`] (a few
/// extreme gradients would otherwise wash the rest out).
pub fn quantile(map: &[f32], q: f64) -> f32 {
    if map.is_empty() {
        return 0.0;
    }
    let mut v: Vec<f32> = map.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f32::total_cmp);
    let i = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    v[i]
}

/// Dark blue (0) -> red (0.5) -> yellow (1).
fn ramp(v: f32) -> [f32; 3] {
    if v < 0.5 {
        let t = v * 2.0;
        [255.0 * t, 0.0, 128.0 * (1.0 - t)]
    } else {
        let t = (v - 0.5) * 2.0;
        [255.0, 255.0 * t, 0.0]
    }
}

/// Draw the outline of an original-coordinate box (attention regions) in `colour`.
fn outline(img: &mut RgbImage, x0: f64, y0: f64, x1: f64, y1: f64, colour: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let clamp = |v: f64, hi: i64| (v.round() as i64).clamp(0, hi - 1);
    let (ax, bx) = (clamp(x0, w), clamp(x1, w));
    let (ay, by) = (clamp(y0, h), clamp(y1, h));
    let thickness = (w.max(h) / 500).max(1);
    for t in 0..thickness {
        for x in ax..=bx {
            for y in [ay + t, by - t] {
                if (0..h).contains(&y) {
                    img.put_pixel(x as u32, y as u32, colour);
                }
            }
        }
        for y in ay..=by {
            for x in [ax + t, bx - t] {
                if (0..w).contains(&x) {
                    img.put_pixel(x as u32, y as u32, colour);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Planes, ScaleMap};

    #[test]
    fn hot_cells_colour_the_photo_and_outside_is_untouched() {
        let view = ReferralView {
            planes: Planes::zeros(8, 8),
            origin: (0.0, 0.0),
            step: 2.0,
            scale: ScaleMap::IDENTITY,
        };
        // 2x2 map: top-left hot.
        let map = [1.0f32, 0.0, 0.0, 0.0];
        let photo = RgbImage::from_pixel(20, 20, Rgb([100, 100, 100]));
        let out = blend(&photo, &view, &map, 2, 1.0);
        let hot = out.get_pixel(1, 1).0;
        let cold = out.get_pixel(14, 14).0;
        assert!(hot[0] > 150 && hot[1] > 150 && hot[2] < 60, "{hot:?}");
        assert!(cold[2] > cold[0], "{cold:?}");
        assert_eq!(
            out.get_pixel(18, 18).0,
            [100, 100, 100],
            "outside the square"
        );
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
    }
}
