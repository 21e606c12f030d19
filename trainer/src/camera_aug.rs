//! Camera augmentation: extra training copies of each photo made to look as if another
//! camera had taken it. Screening camps use whatever camera they have, and the held-out
//! photos of other cameras are where the detector is weakest: lower resolution (a 768 px
//! ROC photo is enlarged 1.87x by the canonical-scale step), heavier JPEG compression,
//! defocus, other colour balance, another field of view.
//!
//! Each effect is applied to the decoded photo *before* preprocessing, so the networks see
//! it through the same preprocessing as on the device. The copies are made once, when the
//! training images are prepared (seeded per image and copy), and only ever trained on:
//! held-out and validation images stay as the camera took them.

use anyhow::{Context, Result};
use image::RgbImage;
use image::imageops::FilterType;
use ma_core::preprocess::PreprocessConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Which effects the copies get, and how many copies each training photo has.
#[derive(Clone, Debug, PartialEq)]
pub struct CameraAugment {
    /// Copies per training photo (0 = off).
    pub copies: usize,
    /// Resolution loss: the photo is shrunk by a factor drawn in `[min_shrink, 1]` before
    /// the other effects (and enlarged back by preprocessing), as a lower-resolution
    /// camera would record it. `None` = off.
    pub min_shrink: Option<f64>,
    /// JPEG re-compression at a quality drawn in this range. `None` = off.
    pub jpeg_quality: Option<(u8, u8)>,
    /// Defocus: Gaussian blur with sigma drawn in `[0, max]` pixels of the (shrunk)
    /// photo. `None` = off.
    pub blur_sigma: Option<f32>,
    /// Canonical-scale jitter: the target FOV diameter is multiplied by a factor drawn in
    /// `[1 - j, 1 + j]` (another field of view, an FOV estimate off by a few percent).
    /// `None` = off.
    pub scale_jitter: Option<f64>,
    /// Colour: gamma drawn in `[1/g, g]` and an independent gain per channel in
    /// `[1 - c, 1 + c]`. `None` = off.
    pub colour: Option<(f64, f64)>,
    /// Red cast: the red channel multiplied by a factor in `[1, max]` and clipped at 255,
    /// as cameras that burn red out over much of the field (the ROC photos). `None` = off.
    pub red_gain: Option<f64>,
    pub seed: u64,
}

impl CameraAugment {
    pub const OFF: CameraAugment = CameraAugment {
        copies: 0,
        min_shrink: None,
        jpeg_quality: None,
        blur_sigma: None,
        scale_jitter: None,
        colour: None,
        red_gain: None,
        seed: 0,
    };

    pub fn is_off(&self) -> bool {
        self.copies == 0
    }

    /// The options in words, for `training-data.json` and the manifest, e.g. "1 camera
    /// copy per photo: shrink to 0.5-1, JPEG quality 40-95"; `None` when off.
    pub fn describe(&self) -> Option<String> {
        if self.is_off() {
            return None;
        }
        let mut effects = Vec::new();
        if let Some(min) = self.min_shrink {
            effects.push(format!("shrink to {min}-1"));
        }
        if let Some((lo, hi)) = self.jpeg_quality {
            effects.push(format!("JPEG quality {lo}-{hi}"));
        }
        if let Some(max) = self.blur_sigma {
            effects.push(format!("blur sigma 0-{max} px"));
        }
        if let Some(j) = self.scale_jitter {
            effects.push(format!("scale jitter +-{j}"));
        }
        if let Some((g, c)) = self.colour {
            effects.push(format!("gamma 1/{g}-{g}, channel gain +-{c}"));
        }
        if let Some(max) = self.red_gain {
            effects.push(format!("red gain 1-{max}"));
        }
        let plural = if self.copies == 1 { "y" } else { "ies" };
        Some(format!(
            "{} camera cop{plural} per photo: {}",
            self.copies,
            effects.join(", ")
        ))
    }

    /// One degraded copy of `rgb` (copy `copy` of training photo `image`) and the
    /// preprocessing settings to prepare it with (the canonical diameter jittered).
    pub fn degrade(
        &self,
        rgb: &RgbImage,
        cfg: &PreprocessConfig,
        image: usize,
        copy: usize,
    ) -> Result<(RgbImage, PreprocessConfig)> {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add((image as u64) << 16 | copy as u64),
        );
        let mut out = match self.min_shrink {
            Some(min) if min < 1.0 => {
                let s = rng.random_range(min..=1.0);
                let (w, h) = rgb.dimensions();
                let (nw, nh) = (
                    ((w as f64 * s).round() as u32).max(1),
                    ((h as f64 * s).round() as u32).max(1),
                );
                image::imageops::resize(rgb, nw, nh, FilterType::Triangle)
            }
            _ => rgb.clone(),
        };
        if let Some((gamma, gain)) = self.colour {
            let g = if gamma > 1.0 {
                rng.random_range(gamma.recip()..=gamma)
            } else {
                1.0
            };
            let gains: [f64; 3] =
                std::array::from_fn(|_| 1.0 + rng.random_range(-gain..=gain.max(0.0)));
            let lut: Vec<[u8; 3]> = (0..=255u32)
                .map(|v| {
                    let x = (v as f64 / 255.0).powf(g);
                    gains.map(|k| (x * k * 255.0).round().clamp(0.0, 255.0) as u8)
                })
                .collect();
            for p in out.pixels_mut() {
                for c in 0..3 {
                    p.0[c] = lut[p.0[c] as usize][c];
                }
            }
        }
        if let Some(max) = self.red_gain {
            let gain = rng.random_range(1.0..=max.max(1.0));
            let lut: Vec<u8> = (0..=255u32)
                .map(|v| (v as f64 * gain).round().min(255.0) as u8)
                .collect();
            for p in out.pixels_mut() {
                p.0[0] = lut[p.0[0] as usize];
            }
        }
        if let Some(max) = self.blur_sigma {
            let sigma = rng.random_range(0.0..=max.max(0.0));
            if sigma > 0.1 {
                out = image::imageops::blur(&out, sigma);
            }
        }
        if let Some((lo, hi)) = self.jpeg_quality {
            let q = rng.random_range(lo.min(hi)..=hi.max(lo)).clamp(1, 100);
            out = jpeg_round_trip(&out, q)?;
        }
        let mut cfg = cfg.clone();
        if let Some(j) = self.scale_jitter {
            cfg.canonical_fov_diameter *= 1.0 + rng.random_range(-j..=j.max(0.0));
        }
        Ok((out, cfg))
    }
}

/// Encode as JPEG at `quality` and decode again: the blocking and ringing a camera's
/// compression leaves.
pub fn jpeg_round_trip(rgb: &RgbImage, quality: u8) -> Result<RgbImage> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(rgb)
        .context("JPEG re-compression (camera augmentation)")?;
    Ok(
        image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
            .context("decoding the re-compressed JPEG (camera augmentation)")?
            .to_rgb8(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo() -> RgbImage {
        RgbImage::from_fn(200, 160, |x, y| {
            image::Rgb([(x % 256) as u8, ((x * y) % 251) as u8, (y % 256) as u8])
        })
    }

    fn all_on() -> CameraAugment {
        CameraAugment {
            copies: 1,
            min_shrink: Some(0.5),
            jpeg_quality: Some((30, 60)),
            blur_sigma: Some(1.5),
            scale_jitter: Some(0.1),
            colour: Some((1.4, 0.15)),
            red_gain: Some(2.0),
            seed: 7,
        }
    }

    #[test]
    fn describes_every_effect_in_words() {
        assert_eq!(CameraAugment::OFF.describe(), None);
        assert_eq!(
            all_on().describe().unwrap(),
            "1 camera copy per photo: shrink to 0.5-1, JPEG quality 30-60, blur sigma 0-1.5 px, \
             scale jitter +-0.1, gamma 1/1.4-1.4, channel gain +-0.15, red gain 1-2"
        );
        let two = CameraAugment {
            copies: 2,
            jpeg_quality: Some((40, 95)),
            ..CameraAugment::OFF
        };
        assert_eq!(
            two.describe().unwrap(),
            "2 camera copies per photo: JPEG quality 40-95"
        );
    }

    #[test]
    fn seeded_per_image_and_copy() {
        let cfg = PreprocessConfig::default();
        let aug = all_on();
        let (a, ca) = aug.degrade(&photo(), &cfg, 3, 0).unwrap();
        let (b, cb) = aug.degrade(&photo(), &cfg, 3, 0).unwrap();
        assert_eq!(a, b);
        assert_eq!(ca, cb);
        let (c, _) = aug.degrade(&photo(), &cfg, 3, 1).unwrap();
        assert_ne!(a, c, "another copy draws other effects");
        assert!(a.width() <= 200 && a.width() >= 100, "{}", a.width());
        let d = ca.canonical_fov_diameter / cfg.canonical_fov_diameter;
        assert!((0.9..=1.1).contains(&d) && d != 1.0, "{d}");
    }

    #[test]
    fn each_effect_changes_the_photo_and_off_changes_nothing() {
        let cfg = PreprocessConfig::default();
        let off = CameraAugment {
            copies: 1,
            ..CameraAugment::OFF
        };
        let (same, c) = off.degrade(&photo(), &cfg, 0, 0).unwrap();
        assert_eq!(same, photo());
        assert_eq!(c, cfg);
        for aug in [
            CameraAugment {
                min_shrink: Some(0.5),
                ..off.clone()
            },
            CameraAugment {
                jpeg_quality: Some((20, 20)),
                ..off.clone()
            },
            CameraAugment {
                blur_sigma: Some(2.0),
                ..off.clone()
            },
            CameraAugment {
                colour: Some((1.5, 0.2)),
                ..off.clone()
            },
            CameraAugment {
                red_gain: Some(2.5),
                ..off.clone()
            },
        ] {
            let (out, _) = aug.degrade(&photo(), &cfg, 1, 0).unwrap();
            assert_ne!(out, photo(), "{aug:?}");
        }
        let (_, c) = CameraAugment {
            scale_jitter: Some(0.2),
            ..off.clone()
        }
        .degrade(&photo(), &cfg, 1, 0)
        .unwrap();
        assert_ne!(c.canonical_fov_diameter, cfg.canonical_fov_diameter);
    }
}
