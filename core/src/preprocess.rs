//! Preprocessing: from a decoded photograph to the normalised planes the CNNs read.
//!
//! 1. Field of view: estimated from the image, or a supplied mask.
//! 2. Canonical scale: MAs are 2-4 px wide in a 768-px ROC photo and 6-12 px in a 2544-px
//!    e-ophtha photo, so every image is resampled until its FOV diameter is
//!    [`PreprocessConfig::canonical_fov_diameter`] (DiaretDB1's, on which the models are
//!    trained). Images within [`PreprocessConfig::scale_tolerance`] of it are not
//!    resampled at all: a slight resampling would only blur them.
//! 3. Background: per channel, the median of the FOV pixels in a ~30x30 window (the
//!    papers' window at DiaretDB1 scale; since images are at canonical scale here, the
//!    window follows the FOV diameter for any camera). It is computed on a grid of 3x3
//!    block means (window 11x11 cells = 33x33 px) and interpolated back bilinearly: the
//!    background is smooth, and this keeps preprocessing within its time budget.
//! 4. Contrast: each channel becomes `(value - background) / (background + 10)`, a
//!    contrast relative to local brightness (so MAs at the dim rim look like MAs at the
//!    bright centre), divided by its robust spread inside the FOV (1.4826 x median
//!    absolute value: exposure and noise differ between cameras), clipped to +-10.
//!    Outside the FOV every channel is 0.
//!
//! All three colour channels are kept (R, G, B order): green carries most MA contrast,
//! red and blue help tell MAs from pigment and noise. Everything is plain sequential f32
//! arithmetic (no threads, no fused multiply-add), so the trainer and the device compute
//! the same bytes.

use std::borrow::Cow;

use anyhow::{Result, bail};
use image::RgbImage;
use image::imageops::{self, FilterType};

use crate::fov;
use crate::geometry::{CHANNELS, Planes, ScaleMap};
use crate::mask::Mask;
use crate::median::masked_median;

/// Parameters of preprocessing. Models record the values they were trained with (the
/// `[preprocess]` table of the model manifest).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    /// FOV diameter, in pixels, at which everything runs.
    pub canonical_fov_diameter: f64,
    /// Relative scale change below which images are used as they are.
    pub scale_tolerance: f64,
    /// Side of the background median window, in canonical pixels.
    pub background_window: usize,
    /// Block size of the grid the background median is computed on.
    pub background_subsample: usize,
    /// Added to the background before dividing, in 8-bit levels: keeps the dark blue
    /// channel from exploding.
    pub background_floor: f32,
    /// Normalised values are clipped to +-clip.
    pub clip: f32,
    /// 8-bit levels `(low, high)` at or beyond which a channel is clipped by the camera
    /// (a red channel burnt out at 255, a blue one crushed to 0). Such pixels carry no
    /// contrast: they are normalised to 0 and left out of the channel's spread, whose
    /// median would otherwise collapse to 0 and turn the rest of the channel into noise
    /// at +-clip. `None` (models before 0.4, whose manifests lack the key): every pixel
    /// counts.
    #[serde(default)]
    pub clipped_levels: Option<(u8, u8)>,
    /// Smallest robust spread of each channel (R, G, B): a channel with almost no
    /// variation is not amplified into noise. Absent from manifests before 0.4, which
    /// used 1e-4 for every channel.
    #[serde(default = "legacy_spread_floor")]
    pub spread_floor: [f32; CHANNELS],
}

/// The spread floor of models before 0.4 (see [`PreprocessConfig::spread_floor`]).
fn legacy_spread_floor() -> [f32; CHANNELS] {
    [1e-4; CHANNELS]
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            canonical_fov_diameter: CANONICAL_FOV_DIAMETER,
            scale_tolerance: 0.05,
            background_window: 30,
            background_subsample: 3,
            background_floor: 10.0,
            clip: 10.0,
            clipped_levels: Some((1, 254)),
            // Half the median spread of the DiaretDB1 training photos per channel: no
            // photo with a working channel is near it.
            spread_floor: [0.010, 0.021, 0.084],
        }
    }
}

/// FOV diameter of DiaretDB1 photographs (measured on its `fmask.tif`).
pub const CANONICAL_FOV_DIAMETER: f64 = 1410.0;

/// Where the field of view comes from.
#[derive(Clone, Copy, Debug)]
pub enum FovSource<'a> {
    /// Estimated from the image's dark surround.
    Estimate,
    /// A mask of the original image's size.
    Supplied(&'a Mask),
}

/// A preprocessed image at canonical scale.
#[derive(Clone, Debug)]
pub struct Preprocessed {
    /// Normalised R, G, B planes; 0 outside the FOV.
    pub planes: Planes,
    /// FOV at canonical scale.
    pub fov: Mask,
    /// Original <-> canonical coordinates.
    pub scale: ScaleMap,
    pub original_size: (u32, u32),
    /// FOV diameter measured in the original image.
    pub original_fov_diameter: f64,
}

/// Run the whole preprocessing on a decoded image.
pub fn preprocess(
    img: &RgbImage,
    fov_source: FovSource,
    cfg: &PreprocessConfig,
) -> Result<Preprocessed> {
    let original_size = img.dimensions();
    let fov_original = match fov_source {
        FovSource::Estimate => fov::estimate(img)?,
        FovSource::Supplied(m) => {
            if (m.width(), m.height()) != original_size {
                bail!(
                    "FOV mask is {}x{} but the image is {}x{}",
                    m.width(),
                    m.height(),
                    original_size.0,
                    original_size.1
                );
            }
            m.clone()
        }
    };
    let diameter = fov::diameter(&fov_original);
    let (canonical, fov, scale) = to_canonical_scale(img, &fov_original, diameter, cfg);
    let planes = normalise(&canonical, &fov, cfg);
    Ok(Preprocessed {
        planes,
        fov,
        scale,
        original_size,
        original_fov_diameter: diameter,
    })
}

/// The scale factor preprocessing applies to an image whose FOV has `diameter` pixels.
pub fn scale_factor(diameter: f64, cfg: &PreprocessConfig) -> f64 {
    let s = cfg.canonical_fov_diameter / diameter;
    if (s - 1.0).abs() <= cfg.scale_tolerance {
        1.0
    } else {
        s
    }
}

fn to_canonical_scale<'a>(
    img: &'a RgbImage,
    fov: &Mask,
    diameter: f64,
    cfg: &PreprocessConfig,
) -> (Cow<'a, RgbImage>, Mask, ScaleMap) {
    let s = scale_factor(diameter, cfg);
    if s == 1.0 {
        return (Cow::Borrowed(img), fov.clone(), ScaleMap::IDENTITY);
    }
    let (w, h) = img.dimensions();
    let size = (
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    let scale = ScaleMap::between((w, h), size);
    // Triangle = bilinear when enlarging, area-weighted when shrinking (no aliasing).
    let resized = imageops::resize(img, size.0, size.1, FilterType::Triangle);
    let mut mask = Mask::new(size.0, size.1);
    for y in 0..size.1 {
        for x in 0..size.0 {
            let (ox, oy) = scale.to_original(x as f64, y as f64);
            if fov.get(ox.round() as i64, oy.round() as i64) {
                mask.set(x, y, true);
            }
        }
    }
    (Cow::Owned(resized), mask, scale)
}

fn normalise(img: &RgbImage, fov: &Mask, cfg: &PreprocessConfig) -> Planes {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let inside = fov.as_slice();
    let raw = img.as_raw();
    let k = cfg.background_subsample.max(1);
    let grids = background_grids(raw, inside, w, h, cfg);
    let (gw, gh) = (w.div_ceil(k), h.div_ceil(k));
    let (xt, yt) = (bilinear_taps(w, gw, k), bilinear_taps(h, gh, k));

    let usable = usable_pixels(raw, inside, cfg);
    // Contrast relative to the interpolated background, one row at a time.
    let mut planes = Planes::zeros(w, h);
    let mut row_bg = vec![0.0f32; gw];
    for c in 0..CHANNELS {
        let grid = &grids[c];
        let plane = planes.channel_mut(c);
        for (y, &(y0, y1, ty)) in yt.iter().enumerate() {
            let (r0, r1) = (&grid[y0 * gw..][..gw], &grid[y1 * gw..][..gw]);
            for ((b, &a0), &a1) in row_bg.iter_mut().zip(r0).zip(r1) {
                *b = a0 + (a1 - a0) * ty;
            }
            let row = y * w;
            for (x, &(x0, x1, tx)) in xt.iter().enumerate() {
                let i = row + x;
                if usable[c][i] {
                    let bg = row_bg[x0] + (row_bg[x1] - row_bg[x0]) * tx;
                    plane[i] = (raw[i * CHANNELS + c] as f32 - bg) / (bg + cfg.background_floor);
                }
            }
        }
        let spread = robust_spread(plane, &usable[c]).max(cfg.spread_floor[c]);
        for (v, &usable) in plane.iter_mut().zip(usable[c].iter()) {
            if usable {
                *v = (*v / spread).clamp(-cfg.clip, cfg.clip);
            }
        }
    }
    planes
}

/// Per channel, the FOV pixels whose value the camera did not clip (the FOV itself, not
/// a copy, when `cfg.clipped_levels` is `None`).
fn usable_pixels<'a>(
    raw: &[u8],
    inside: &'a [bool],
    cfg: &PreprocessConfig,
) -> [Cow<'a, [bool]>; CHANNELS] {
    std::array::from_fn(|c| match cfg.clipped_levels {
        None => Cow::Borrowed(inside),
        Some((low, high)) => inside
            .iter()
            .enumerate()
            .map(|(i, &inside)| {
                let v = raw[i * CHANNELS + c];
                inside && v > low && v < high
            })
            .collect(),
    })
}

/// Background of each channel on the `k x k` block grid: the masked median of the
/// FOV-pixel block means around each cell.
fn background_grids(
    raw: &[u8],
    inside: &[bool],
    w: usize,
    h: usize,
    cfg: &PreprocessConfig,
) -> [Vec<f32>; CHANNELS] {
    let k = cfg.background_subsample.max(1);
    let (gw, gh) = (w.div_ceil(k), h.div_ceil(k));
    let mut sums = vec![[0u32; CHANNELS]; gw * gh];
    let mut count = vec![0u32; gw * gh];
    for y in 0..h {
        let cells = (y / k) * gw;
        for x in 0..w {
            let i = y * w + x;
            if inside[i] {
                let cell = cells + x / k;
                let px = &raw[i * CHANNELS..][..CHANNELS];
                for c in 0..CHANNELS {
                    sums[cell][c] += px[c] as u32;
                }
                count[cell] += 1;
            }
        }
    }
    let valid: Vec<bool> = count.iter().map(|&n| n > 0).collect();
    let radius = (cfg.background_window / k) / 2;
    std::array::from_fn(|c| {
        let means: Vec<u8> = sums
            .iter()
            .zip(&count)
            .map(|(s, &n)| {
                // Rounded mean; empty cells (n = 0) are invalid and never read.
                (s[c] + n / 2).checked_div(n).unwrap_or(0) as u8
            })
            .collect();
        // Cells with no FOV pixel in their window lie far outside the FOV, where the
        // output is 0 whatever the background: any value will do.
        masked_median(&means, &valid, gw, gh, radius)
            .iter()
            .map(|m| m.unwrap_or(0) as f32)
            .collect()
    })
}

/// For each of `n` pixels: the two grid cells around it and the weight of the second,
/// with block centres at `i * k + (k - 1) / 2`, clamped at the edges.
fn bilinear_taps(n: usize, cells: usize, k: usize) -> Vec<(usize, usize, f32)> {
    (0..n)
        .map(|x| {
            let u = ((x as f32 - (k as f32 - 1.0) / 2.0) / k as f32).clamp(0.0, (cells - 1) as f32);
            let i0 = u.floor() as usize;
            (i0, (i0 + 1).min(cells - 1), u - i0 as f32)
        })
        .collect()
}

/// 1.4826 x the median absolute value over (every third) FOV pixel: the standard
/// deviation for Gaussian noise, unmoved by lesions and vessels.
fn robust_spread(plane: &[f32], inside: &[bool]) -> f32 {
    let mut abs: Vec<f32> = plane
        .iter()
        .zip(inside)
        .filter(|(_, i)| **i)
        .step_by(3)
        .map(|(v, _)| v.abs())
        .collect();
    if abs.is_empty() {
        return 0.0;
    }
    let mid = abs.len() / 2;
    let (_, median, _) = abs.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    1.4826 * *median
}

/// A picture of the planes for people: each channel mapped from [-4, 4] spreads to
/// [0, 255] (mid-grey = background), so dark lesions show dark.
pub fn preview(planes: &Planes) -> RgbImage {
    let (w, h) = (planes.width, planes.height);
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let v = |c| {
            let t = planes.get(c, x as usize, y as usize);
            (128.0 + t * 32.0).clamp(0.0, 255.0) as u8
        };
        image::Rgb([v(0), v(1), v(2)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A flat orange disk (diameter `d`) with one dark spot at its centre.
    fn fundus(w: u32, h: u32, d: f64, spot_r: f64) -> RgbImage {
        let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
        RgbImage::from_fn(w, h, |x, y| {
            let r = ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt();
            // Mild illumination gradient and a deterministic texture so the spread is not 0.
            let texture = ((x * 7 + y * 13) % 5) as f64;
            if r <= spot_r {
                Rgb([120, 30, 10])
            } else if r < d / 2.0 {
                let g = 70.0 + 20.0 * x as f64 / w as f64 + texture;
                Rgb([190, g as u8, 25])
            } else {
                Rgb([2, 1, 0])
            }
        })
    }

    #[test]
    fn native_scale_images_are_not_resampled() {
        let img = fundus(700, 600, 560.0, 3.0);
        let cfg = PreprocessConfig {
            canonical_fov_diameter: 570.0,
            ..PreprocessConfig::default()
        };
        let p = preprocess(&img, FovSource::Estimate, &cfg).unwrap();
        assert_eq!(p.scale, ScaleMap::IDENTITY);
        assert_eq!((p.planes.width, p.planes.height), (700, 600));
        // The dark spot is strongly negative in green, the background near 0.
        assert!(
            p.planes.get(1, 349, 299) < -3.0,
            "{}",
            p.planes.get(1, 349, 299)
        );
        assert!(p.planes.get(1, 200, 300).abs() < 3.0);
        // Outside the FOV is exactly 0.
        assert_eq!(p.planes.get(0, 2, 2), 0.0);
    }

    #[test]
    fn small_images_are_enlarged_to_canonical_fov_and_coordinates_map_back() {
        let img = fundus(400, 300, 280.0, 2.0);
        let cfg = PreprocessConfig {
            canonical_fov_diameter: 560.0,
            ..PreprocessConfig::default()
        };
        let p = preprocess(&img, FovSource::Estimate, &cfg).unwrap();
        assert_eq!((p.planes.width, p.planes.height), (800, 600));
        assert!((fov::diameter(&p.fov) - 560.0).abs() <= 3.0);
        // The spot at the original centre is found at the mapped canonical position.
        let (cx, cy) = p.scale.to_canonical(199.5, 149.5);
        assert!((cx - 399.5).abs() < 1e-9 && (cy - 299.5).abs() < 1e-9);
        assert!(p.planes.get(1, 399, 299) < -3.0);
        let (ox, oy) = p.scale.to_original(cx, cy);
        assert!((ox - 199.5).abs() < 1e-9 && (oy - 149.5).abs() < 1e-9);
    }

    #[test]
    fn preprocessing_is_deterministic_and_uses_a_supplied_mask() {
        let img = fundus(600, 500, 480.0, 3.0);
        let cfg = PreprocessConfig {
            canonical_fov_diameter: 480.0,
            ..PreprocessConfig::default()
        };
        let a = preprocess(&img, FovSource::Estimate, &cfg).unwrap();
        let b = preprocess(&img, FovSource::Estimate, &cfg).unwrap();
        assert_eq!(a.planes.data, b.planes.data);

        let mut mask = Mask::new(600, 500);
        // 480 px wide, like the image's own FOV, so no resampling happens.
        for y in 100..400 {
            for x in 60..540 {
                mask.set(x, y, true);
            }
        }
        let c = preprocess(&img, FovSource::Supplied(&mask), &cfg).unwrap();
        assert_eq!(c.fov, mask);
        assert_eq!(c.planes.get(1, 30, 250), 0.0);
        let wrong = Mask::new(10, 10);
        assert!(preprocess(&img, FovSource::Supplied(&wrong), &cfg).is_err());
    }

    /// A camera that burns the red channel out over most of the FOV (ROC photos have red
    /// at 255 on 60-70% of it): without the clipped levels the red spread collapses and
    /// the red plane turns into +-clip noise; with them it stays calm, and green is the
    /// same either way.
    #[test]
    fn clipped_channels_do_not_turn_into_noise() {
        let base = fundus(600, 500, 480.0, 3.0);
        let burnt = RgbImage::from_fn(600, 500, |x, y| {
            let p = *base.get_pixel(x, y);
            // Red burnt out on the left two thirds of the FOV, textured on the rest.
            let red = match p.0[0] {
                v if v <= 100 => v,
                _ if x < 380 => 255,
                v => v + ((x * 3 + y * 7) % 5) as u8,
            };
            Rgb([red, p.0[1], p.0[2]])
        });
        let legacy = PreprocessConfig {
            canonical_fov_diameter: 480.0,
            clipped_levels: None,
            spread_floor: legacy_spread_floor(),
            ..PreprocessConfig::default()
        };
        let new = PreprocessConfig {
            clipped_levels: Some((1, 254)),
            ..legacy.clone()
        };
        let fraction_at_clip = |p: &Preprocessed, c: usize| {
            let (mut n, mut at) = (0, 0);
            for (v, &inside) in p.planes.channel(c).iter().zip(p.fov.as_slice()) {
                if inside {
                    n += 1;
                    at += usize::from(v.abs() >= 9.99);
                }
            }
            at as f64 / n as f64
        };
        let old = preprocess(&burnt, FovSource::Estimate, &legacy).unwrap();
        let fixed = preprocess(&burnt, FovSource::Estimate, &new).unwrap();
        assert!(
            fraction_at_clip(&old, 0) > 0.2,
            "{}",
            fraction_at_clip(&old, 0)
        );
        assert!(
            fraction_at_clip(&fixed, 0) < 0.01,
            "{}",
            fraction_at_clip(&fixed, 0)
        );
        // A burnt-out pixel carries no contrast.
        assert_eq!(fixed.planes.get(0, 200, 251), 0.0);
        assert!(
            old.planes.channel(1) == fixed.planes.channel(1),
            "green has no clipped pixel and must not change"
        );
        assert!(fixed.planes.get(1, 299, 249) < -3.0);
    }

    /// A channel with almost no variation (a blue channel crushed to a few levels) is
    /// not amplified into noise once its spread is floored.
    #[test]
    fn spread_floor_keeps_a_flat_channel_flat() {
        let base = fundus(600, 500, 480.0, 3.0);
        // Blue 25 everywhere in the FOV but one pixel in 40 at 26.
        let flat = RgbImage::from_fn(600, 500, |x, y| {
            let p = *base.get_pixel(x, y);
            let b = if p.0[0] > 100 && (x + 3 * y) % 40 == 0 {
                26
            } else {
                p.0[2]
            };
            Rgb([p.0[0], p.0[1], b])
        });
        let legacy = PreprocessConfig {
            canonical_fov_diameter: 480.0,
            clipped_levels: None,
            spread_floor: legacy_spread_floor(),
            ..PreprocessConfig::default()
        };
        let floored = PreprocessConfig {
            spread_floor: PreprocessConfig::default().spread_floor,
            ..legacy.clone()
        };
        let at_clip = |cfg: &PreprocessConfig| {
            let p = preprocess(&flat, FovSource::Estimate, cfg).unwrap();
            p.planes
                .channel(2)
                .iter()
                .filter(|v| v.abs() >= 9.99)
                .count()
        };
        // Without a floor one level up becomes +clip (1 pixel in 40 of the FOV).
        assert!(at_clip(&legacy) > 3000, "{}", at_clip(&legacy));
        assert_eq!(at_clip(&floored), 0);
    }

    /// Manifests written before the clipped levels and spread floors existed read as the
    /// preprocessing those models were trained with.
    #[test]
    fn old_manifest_tables_mean_the_old_preprocessing() {
        let old: PreprocessConfig = toml::from_str(
            "canonical_fov_diameter = 1410.0\nscale_tolerance = 0.05\n\
             background_window = 30\nbackground_subsample = 3\n\
             background_floor = 10.0\nclip = 10.0\n",
        )
        .unwrap();
        assert_eq!(old.clipped_levels, None);
        assert_eq!(old.spread_floor, [1e-4; 3]);
        let new = PreprocessConfig::default();
        let back: PreprocessConfig = toml::from_str(&toml::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }

    #[test]
    fn bilinear_taps_reproduce_a_linear_ramp() {
        // Block centres of k = 3 sit at 1, 4, 7, ...: pixel x lies at cell (x - 1) / 3.
        let taps = bilinear_taps(12, 4, 3);
        for (x, &(i0, i1, t)) in taps.iter().enumerate().take(10).skip(1) {
            let u = i0 as f32 + (i1 - i0) as f32 * t;
            assert!((u - (x as f32 - 1.0) / 3.0).abs() < 1e-6, "x={x}");
        }
        // Clamped beyond the first and last centres.
        assert_eq!(taps[0], (0, 1, 0.0));
        assert_eq!(taps[11], (3, 3, 0.0));
    }
}
