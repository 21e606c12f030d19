//! The field of view (FOV): the round, lit part of a fundus photograph.
//!
//! Preprocessing needs it twice: its diameter sets the scale at which everything runs,
//! and only pixels inside it take part in background and contrast estimates.

use anyhow::{Result, bail};
use image::RgbImage;

use crate::mask::Mask;

/// Estimate the FOV from the image: the surround of a fundus photo is (near) black.
///
/// Pixels whose red channel (the brightest in fundus photos, even at the dim rim) exceeds
/// the level of the surround, connected to nothing dark from
/// outside, make up the FOV; dark lesions inside it stay inside (holes are filled),
/// bright specks in the surround (text, reflections) are dropped (largest component).
pub fn estimate(img: &RgbImage) -> Result<Mask> {
    let (w, h) = img.dimensions();
    let corners = corner_levels(img);
    // The estimate rests on a dark surround; without one (an all-white or uniform frame)
    // it took the whole frame, padding and all, for the FOV, and detections fell outside
    // the photo.
    if corners.median >= MAX_THRESHOLD {
        bail!(
            "no field of view found: the corners of the image are lit (median red {} of 255), \
             a fundus photograph has a dark surround (overexposed, blank, or not a fundus \
             photograph?)",
            corners.median
        );
    }
    let threshold = corners.threshold();
    let lit = Mask::from_vec(w, h, img.pixels().map(|p| p.0[0] >= threshold).collect())?;
    let filled = lit.fill_holes();
    let mask = filled.largest_component_8();
    check_plausible(&mask)?;
    Ok(mask)
}

/// A mask supplied with the image (e.g. DiaretDB1's `fmask.tif`): non-zero is inside.
pub fn from_mask_image(mask: &image::GrayImage, image_size: (u32, u32)) -> Result<Mask> {
    if mask.dimensions() != image_size {
        bail!(
            "FOV mask is {}x{} but the image is {}x{}",
            mask.width(),
            mask.height(),
            image_size.0,
            image_size.1
        );
    }
    let m = Mask::from_luma(mask, |v| v > 0);
    check_plausible(&m)?;
    Ok(m)
}

/// Diameter of the FOV in pixels: the larger side of its bounding box, since cameras
/// often crop the circle at the top and bottom but rarely on both axes.
pub fn diameter(mask: &Mask) -> f64 {
    match mask.bounding_box() {
        Some((x0, y0, x1, y1)) => (x1 - x0 + 1).max(y1 - y0 + 1) as f64,
        None => 0.0,
    }
}

/// Highest red threshold between surround and FOV.
const MAX_THRESHOLD: u8 = 60;

/// Red levels of the four corners (outside the FOV circle on every fundus camera).
struct CornerLevels {
    median: u8,
    p99: u8,
}

impl CornerLevels {
    /// Just above the surround's own level: the corners' 99th percentile plus 5 levels,
    /// capped at [`MAX_THRESHOLD`].
    ///
    /// A threshold relative to the FOV's brightness would cut off dim parts of unevenly
    /// lit photos (some DiaretDB1 images have a quadrant with red at 9-12 of 255).
    fn threshold(&self) -> u8 {
        (self.p99 as u32 + 5).min(MAX_THRESHOLD as u32) as u8
    }
}

/// The median and 99th percentile of red in the four corners (each 1/20 of the sides).
fn corner_levels(img: &RgbImage) -> CornerLevels {
    let (w, h) = img.dimensions();
    let (cw, ch) = ((w / 20).max(1), (h / 20).max(1));
    let mut hist = [0u64; 256];
    for (x0, y0) in [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)] {
        for y in y0..y0 + ch {
            for x in x0..x0 + cw {
                hist[img.get_pixel(x, y).0[0] as usize] += 1;
            }
        }
    }
    let total: u64 = hist.iter().sum();
    let percentile = |p: u64| {
        let mut acc = 0;
        for (v, &n) in hist.iter().enumerate() {
            acc += n;
            if acc * 100 >= total * p {
                return v as u8;
            }
        }
        255
    };
    CornerLevels {
        median: percentile(50),
        p99: percentile(99),
    }
}

/// A FOV must cover a sizeable part of the frame, or the photo is not a fundus image
/// (or is black): say so instead of running on noise.
fn check_plausible(mask: &Mask) -> Result<()> {
    let area = mask.count() as f64;
    let frame = mask.width() as f64 * mask.height() as f64;
    if area < 0.1 * frame {
        bail!(
            "no field of view found: only {:.1}% of the image is lit (is this a fundus photograph?)",
            100.0 * area / frame
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn disk_image(w: u32, h: u32, r: f64) -> RgbImage {
        let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
        RgbImage::from_fn(w, h, |x, y| {
            let d = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            if d < r {
                Rgb([180, 80, 20])
            } else {
                Rgb([3, 2, 1])
            }
        })
    }

    #[test]
    fn estimates_a_cropped_disk_and_fills_dark_lesions() {
        // Circle of diameter 400 cropped top and bottom by a 300 px high frame.
        let mut img = disk_image(500, 300, 200.0);
        // A dark blob inside (a haemorrhage) must stay inside the FOV.
        for y in 140..160 {
            for x in 240..260 {
                img.put_pixel(x, y, Rgb([5, 2, 1]));
            }
        }
        // A bright speck in the surround is not part of the FOV.
        img.put_pixel(5, 5, Rgb([250, 250, 250]));
        let m = estimate(&img).unwrap();
        assert!(m.get(250, 150));
        assert!(!m.get(5, 5));
        assert!((diameter(&m) - 400.0).abs() <= 2.0, "{}", diameter(&m));
    }

    #[test]
    fn black_image_has_no_fov() {
        let img = RgbImage::from_pixel(300, 300, Rgb([0, 0, 0]));
        let err = estimate(&img).unwrap_err().to_string();
        assert!(err.contains("no field of view"), "{err}");
    }

    #[test]
    fn white_or_uniform_image_has_no_fov() {
        for level in [255, 180, 60] {
            let img = RgbImage::from_pixel(300, 300, Rgb([level, level, level]));
            let err = estimate(&img).unwrap_err().to_string();
            assert!(
                err.contains("no field of view") && err.contains("corners"),
                "{err}"
            );
        }
        // A dim surround just under the limit still gives a FOV.
        let mut img = disk_image(400, 400, 190.0);
        for p in img.pixels_mut() {
            if p.0[0] < 10 {
                *p = Rgb([40, 20, 10]);
            }
        }
        assert!(estimate(&img).is_ok());
    }

    #[test]
    fn supplied_mask_must_match_the_image() {
        let mask = image::GrayImage::from_pixel(10, 10, image::Luma([255]));
        assert!(from_mask_image(&mask, (10, 11)).is_err());
        assert_eq!(from_mask_image(&mask, (10, 10)).unwrap().count(), 100);
    }
}
