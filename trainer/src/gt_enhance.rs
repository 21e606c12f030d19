//! Feature enhancement by reusing the ground truth (Li, Zou, Bai et al., "Detecting
//! cerebral microbleeds via deep learning with features enhancement by reusing ground
//! truth", Computer Methods and Programs in Biomedicine 2021), for stage 1, training only.
//!
//! While stage 1 trains, the feature maps of its first layer are re-weighted inside a box
//! round each lesion: `F * (1 + E)`, where `E` is built from the input itself. Per box,
//! with `p` the pixel's intensity, `B = beta * mean(p over the box)`; pixels brighter than
//! `B` get 0, the others `1 - p / B`, so the darker a pixel (an MA is darker than its
//! surroundings), the more its features are strengthened. Outside the boxes `E = 0`:
//! those features pass unchanged. The paper multiplies the features by the map; as
//! written, `F * E` would zero every feature outside the boxes, so `1 + E` is taken: the
//! enhancement of the boxes on top of the plain features.
//!
//! At inference the layer is absent (`E = 0`): the exported network is the plain one
//! ([`crate::nets::Stage::layers`] knows nothing of it).
//!
//! Intensity: our planes are local contrasts, 0 at the background and negative where a
//! pixel is darker, clipped to `-clip..clip` by preprocessing. The green plane shifted by
//! [`INTENSITY_SHIFT`] (so the darkest value preprocessing can give is 0 and the
//! background 1) stands in for the paper's grey level; `E` depends only on ratios, so the
//! scale of the shift does not matter, only where black is.

use ma_core::geometry::{CHANNELS, extract_window};
use tch::Tensor;

use crate::dense::{CROP_SIDE, Crop};
use crate::patches::{brighten, dihedral_plane};
use crate::prepare::PreparedImage;

/// Half side (canonical px) of the box round each lesion centre: 9x9 px, the 3-px
/// positive disk of the labels and a ring of background (MAs are 3-12 px across at
/// canonical scale, mostly under 8).
pub const BOX_HALF: i64 = 4;

/// The preprocessing clip ([`ma_core::preprocess::PreprocessConfig::clip`] of every
/// shipped set): the contrast that maps to black.
pub const INTENSITY_SHIFT: f32 = 10.0;

/// The plane the intensities are read from: green, where MAs have most contrast.
const GREEN: usize = 1;

/// The enhancement map of one `side` x `side` window (CHW planes as the network reads
/// them) with lesion centres `centres` (window coordinates; those outside are fine):
/// `side * side` values in [0, 1). Overlapping boxes take the larger value.
pub fn enhancement_map(window: &[f32], side: usize, centres: &[(i64, i64)], beta: f32) -> Vec<f32> {
    assert_eq!(
        window.len(),
        CHANNELS * side * side,
        "window of the wrong size"
    );
    let green = &window[GREEN * side * side..][..side * side];
    let intensity = |x: usize, y: usize| (green[y * side + x] / INTENSITY_SHIFT + 1.0).max(0.0);
    let mut map = vec![0.0f32; side * side];
    let s = side as i64;
    for &(cx, cy) in centres {
        let (x0, x1) = ((cx - BOX_HALF).max(0), (cx + BOX_HALF).min(s - 1));
        let (y0, y1) = ((cy - BOX_HALF).max(0), (cy + BOX_HALF).min(s - 1));
        if x0 > x1 || y0 > y1 {
            continue;
        }
        let pixels =
            || (y0..=y1).flat_map(move |y| (x0..=x1).map(move |x| (x as usize, y as usize)));
        let n = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
        let mean = pixels().map(|(x, y)| intensity(x, y)).sum::<f32>() / n;
        let bound = beta * mean;
        if bound <= 0.0 {
            continue; // a box of black (outside the FOV): nothing to enhance
        }
        for (x, y) in pixels() {
            let p = intensity(x, y);
            let e = if p > bound { 0.0 } else { 1.0 - p / bound };
            let m = &mut map[y * side + x];
            *m = m.max(e);
        }
    }
    map
}

/// The enhancement maps of the crops [`crate::dense::crop_batch`] cuts (same window,
/// brightness and symmetry): N x 1 x S x S.
pub fn crop_enhancement(images: &[PreparedImage], crops: &[Crop], beta: f32) -> Tensor {
    let side = CROP_SIDE;
    let mut raw = vec![0.0f32; CHANNELS * side * side];
    let mut maps = vec![0.0f32; crops.len() * side * side];
    for (c, out) in crops.iter().zip(maps.chunks_exact_mut(side * side)) {
        let image = &images[c.image];
        extract_window(&image.pre.planes, c.x0, c.y0, side, side, &mut raw);
        brighten(&mut raw, c.gain, c.bias);
        let centres: Vec<(i64, i64)> = image
            .lesion_centres
            .iter()
            .map(|&(x, y)| (x as i64 - c.x0, y as i64 - c.y0))
            .filter(|&(x, y)| {
                let reach = -BOX_HALF..side as i64 + BOX_HALF;
                reach.contains(&x) && reach.contains(&y)
            })
            .collect();
        let map = enhancement_map(&raw, side, &centres, beta);
        dihedral_plane(&map, out, side, c.dihedral);
    }
    let (n, s) = (crops.len() as i64, side as i64);
    Tensor::from_slice(&maps).view([n, 1, s, s])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::tests::synthetic_image;

    /// A window of background (contrast 0) with the green values given at some pixels.
    fn window(side: usize, dark: &[((usize, usize), f32)]) -> Vec<f32> {
        let mut w = vec![0.0f32; CHANNELS * side * side];
        for &((x, y), v) in dark {
            w[GREEN * side * side + y * side + x] = v;
        }
        w
    }

    #[test]
    fn darker_pixels_are_enhanced_more_and_only_inside_the_boxes() {
        let side = 32;
        // An MA at (10, 10): a dark centre, a less dark neighbour; a bright pixel nearby.
        let w = window(side, &[((10, 10), -4.0), ((11, 10), -2.0), ((12, 12), 6.0)]);
        let map = enhancement_map(&w, side, &[(10, 10)], 1.5);
        let at = |x: usize, y: usize| map[y * side + x];
        // Box mean: 78 background pixels at 1, 0.6, 0.8 and 1.6 -> 80/81.
        let bound = 1.5 * (78.0 + 0.6 + 0.8 + 1.6) / 81.0;
        assert!((at(10, 10) - (1.0 - 0.6 / bound)).abs() < 1e-6);
        assert!((at(11, 10) - (1.0 - 0.8 / bound)).abs() < 1e-6);
        assert!(
            (at(9, 9) - (1.0 - 1.0 / bound)).abs() < 1e-6,
            "background in the box"
        );
        assert_eq!(at(12, 12), 0.0, "brighter than beta * mean: dropped");
        assert!(at(10, 10) > at(11, 10) && at(11, 10) > at(9, 9));
        // Outside the 9x9 box, and with no lesion, nothing.
        assert_eq!(at(15, 10), 0.0);
        assert_eq!(at(10, 5), 0.0);
        assert!(
            enhancement_map(&w, side, &[], 1.5)
                .iter()
                .all(|&v| v == 0.0)
        );
        // A lower beta drops the background too.
        let strict = enhancement_map(&w, side, &[(10, 10)], 0.9);
        assert_eq!(strict[9 * side + 9], 0.0);
        assert!(strict[10 * side + 10] > 0.0);
    }

    #[test]
    fn boxes_at_the_edge_are_clipped_and_overlaps_keep_the_larger_value() {
        let side = 16;
        let w = window(side, &[((0, 0), -5.0), ((3, 3), -8.0)]);
        let map = enhancement_map(&w, side, &[(0, 0), (3, 3), (40, 40)], 1.5);
        assert!(map.iter().all(|v| (0.0..1.0).contains(v)));
        let alone = enhancement_map(&w, side, &[(0, 0)], 1.5);
        let other = enhancement_map(&w, side, &[(3, 3)], 1.5);
        for i in 0..side * side {
            assert_eq!(map[i], alone[i].max(other[i]));
        }
        assert!(map[0] > 0.0 && map[3 * side + 3] > 0.0);
    }

    #[test]
    fn crop_maps_mark_the_lesions_under_the_crops_symmetry() {
        let images = [synthetic_image()];
        let (x, y) = images[0].lesion_centres[0];
        let crop = |d| Crop {
            image: 0,
            x0: x as i64 - 20,
            y0: y as i64 - 30,
            dihedral: d,
            gain: 1.0,
            bias: 0.0,
        };
        let maps = crop_enhancement(&images, &[crop(0), crop(5)], 1.5);
        let side = CROP_SIDE;
        assert_eq!(maps.size(), [2, 1, side as i64, side as i64]);
        let plane = |k: i64| Vec::<f32>::try_from(&maps.get(k).flatten(0, -1)).unwrap();
        let plain = plane(0);
        // The lesion centre (20, 30) of the crop is enhanced (a synthetic MA is darker
        // than the background round it); far from every lesion nothing is.
        assert!(plain[30 * side + 20] > 0.0);
        let far: Vec<(i64, i64)> = images[0]
            .lesion_centres
            .iter()
            .map(|&(lx, ly)| (lx as i64 - (x as i64 - 20), ly as i64 - (y as i64 - 30)))
            .collect();
        for (i, &v) in plain.iter().enumerate() {
            let (px, py) = ((i % side) as i64, (i / side) as i64);
            let near = far
                .iter()
                .any(|&(lx, ly)| (px - lx).abs() <= BOX_HALF && (py - ly).abs() <= BOX_HALF);
            if !near {
                assert_eq!(v, 0.0, "({px}, {py}) is in no box");
            }
        }
        let mut want = vec![0.0; side * side];
        dihedral_plane(&plain, &mut want, side, 5);
        assert_eq!(plane(1), want);
    }

    /// The enhancement changes the loss and the gradients stage 1 learns from on a fixed
    /// batch; with a zero map the network is the plain one.
    #[test]
    fn the_enhancement_changes_what_stage_1_learns() {
        use crate::dense::{PixelLabels, balanced_cell_loss, crop_batch};
        use crate::nets::{Net, Stage};
        use tch::{Device, nn};
        let images = [synthetic_image()];
        let labels = [PixelLabels::of(&images[0])];
        let (x, y) = images[0].lesion_centres[0];
        let crops: Vec<Crop> = (0..4u8)
            .map(|d| Crop {
                image: 0,
                x0: x as i64 - 40 - 3 * d as i64,
                y0: y as i64 - 50,
                dihedral: d,
                gain: 1.0,
                bias: 0.0,
            })
            .collect();
        let (xs, ys) = crop_batch(&images, &labels, &crops);
        let maps = crop_enhancement(&images, &crops, 1.5);
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), Stage::Candidates);
        let zero = maps.zeros_like();
        let plain = net.forward_t(&xs, false);
        assert!(net.forward_enhanced(&xs, &zero, false).equal(&plain));
        let grads = |map: Option<&Tensor>| {
            for (_, mut v) in vs.variables() {
                v.zero_grad();
            }
            // Eval mode: no dropout, so both passes see the same network.
            let logits = match map {
                Some(m) => net.forward_enhanced(&xs, m, false),
                None => net.forward_t(&xs, false),
            };
            let loss = balanced_cell_loss(&logits, &ys);
            loss.backward();
            let g = vs.variables().get("conv1.weight").unwrap().grad().copy();
            (loss.double_value(&[]), g)
        };
        let (loss0, g0) = grads(None);
        let (loss1, g1) = grads(Some(&maps));
        assert!((loss1 - loss0).abs() > 1e-6, "loss {loss0} vs {loss1}");
        let change = (&g1 - &g0).abs().max().double_value(&[]);
        assert!(change > 1e-6, "gradients unchanged ({change})");
    }
}
