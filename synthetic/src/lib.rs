//! Seeded synthetic fundus photographs with exact microaneurysm ground truth.
//!
//! Real annotated fundus images are few, large and licensed, and their ground truth
//! is fuzzy. Tests and demos need many small, reproducible images whose answers are
//! known exactly, so [`generate`] paints a plausible colour fundus photograph and
//! returns it together with the microaneurysms (MAs) and MA look-alikes it drew.
//!
//! # Usage
//!
//! ```
//! use ma_synthetic::{SyntheticParams, generate};
//!
//! // `small()` is 512x448 and fast: use it in unit tests.
//! let fundus = generate(&SyntheticParams::small(), 42);
//! assert_eq!(fundus.image.dimensions(), (512, 448));
//! for ma in &fundus.microaneurysms {
//!     // (x, y) is the MA centre in pixel coordinates, on a pixel centre.
//!     assert!(ma.radius >= 1.5);
//! }
//! // `SyntheticParams::default()` is DiaretDB1-sized (1500x1152, FOV 1400 px).
//! // To look at one: fundus.image.save("/tmp/synthetic.png").unwrap();
//! ```
//!
//! The same seed and parameters always give a byte-identical image: a single
//! ChaCha8 stream is consumed in a fixed order and nothing runs in parallel.
//!
//! # How a picture is built (the order of [`generate`])
//!
//! 1. Scene layout: field of view (FOV), optic disc off-centre on the nasal side,
//!    macula temporal to it, background colours, illumination gradient, texture.
//! 2. Vessels: a vein tree and an artery tree grow from the disc as tapering,
//!    curving, branching polylines.
//! 3. Look-alikes: artery/vein crossings (extra short crossing vessels are drawn
//!    if too few natural ones qualify) and small blotchy haemorrhages.
//! 4. MAs: placed off vessels, off the disc, away from the rim and from each other.
//! 5. Composition: retina colour x (1 - absorption), Gaussian noise, optional blur.
//!
//! Everything dark (vessels, macula, haemorrhages, MAs) is one *absorption* layer
//! with values in [0, 1]; the final colour is `retina * (1 - ABSORPTION * a)` per
//! channel. Blood absorbs green and blue strongly and red weakly; blue is dim to
//! begin with, so, as in real photographs, vessels and MAs show the most contrast
//! in green while the red channel stays bright.

use image::RgbImage;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f64::consts::{PI, TAU};

/// Minimum gap in pixels between the edges of any two placed lesions (MAs and
/// look-alikes): centres are at least `MIN_SEPARATION + r1 + r2` apart, so a
/// detection can be attributed to one object unambiguously.
pub const MIN_SEPARATION: f64 = 40.0;

/// Lesions stay at least this many pixels (plus their radius) inside the FOV rim
/// and the frame edges, so their surroundings are retina, not black surround.
pub const RIM_MARGIN: f64 = 20.0;

/// Smallest MA radius in pixels, whatever the FOV size: MA radii scale with the
/// FOV, and without a floor the dots on small test images would be sub-pixel.
pub const MA_MIN_RADIUS: f64 = 1.5;

/// FOV diameter at which lesion and vessel sizes are "nominal" (DiaretDB1-like).
const REFERENCE_FOV_DIAMETER: f64 = 1400.0;

/// Fraction of the red, green and blue retina colour removed at absorption 1.
const ABSORPTION: [f32; 3] = [0.4, 0.85, 0.8];

/// Relative strength of the background texture per channel.
const TEXTURE: [f32; 3] = [0.03, 0.05, 0.06];

/// Parameters of one synthetic image. Lesion counts are targets: if the generator
/// cannot place them all under the spacing rules it places fewer (see [`generate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticParams {
    pub width: u32,
    pub height: u32,
    /// FOV diameter in pixels; may exceed the frame height (cropped top/bottom).
    pub fov_diameter: f64,
    pub n_microaneurysms: usize,
    /// Look-alikes in total: about half vessel crossings, the rest haemorrhages.
    pub n_lookalikes: usize,
    /// Standard deviation of the per-channel Gaussian noise, in grey levels.
    pub noise_sigma: f32,
    /// Mild 3x3 blur, like the softening of JPEG-compressed camera output.
    pub blur: bool,
}

impl Default for SyntheticParams {
    /// DiaretDB1-like: 1500x1152 with a 1400 px FOV (cropped a little vertically).
    fn default() -> Self {
        Self {
            width: 1500,
            height: 1152,
            fov_diameter: 1400.0,
            n_microaneurysms: 12,
            n_lookalikes: 8,
            noise_sigma: 3.0,
            blur: true,
        }
    }
}

impl SyntheticParams {
    /// A 512x448 image with a 480 px FOV and fewer lesions, for fast tests.
    pub fn small() -> Self {
        Self {
            width: 512,
            height: 448,
            fov_diameter: 480.0,
            n_microaneurysms: 6,
            n_lookalikes: 4,
            ..Self::default()
        }
    }
}

/// One microaneurysm as drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticLesion {
    /// Centre in pixel coordinates (pixel centres at integers; MAs sit on one).
    pub x: f64,
    pub y: f64,
    /// Visible radius in pixels (the Gaussian profile has sigma = radius / 2).
    pub radius: f64,
}

/// What a look-alike is: structures a detector commonly mistakes for an MA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookalikeKind {
    /// Two vessels crossing; `radius` is half the width of the wider vessel.
    VesselCrossing,
    /// A small blotchy dark-red blob, larger than any MA; `radius` is its nominal
    /// radius (the irregular outline reaches about 1.1 radius in places).
    Haemorrhage,
}

/// One look-alike as drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Lookalike {
    pub kind: LookalikeKind,
    pub x: f64,
    pub y: f64,
    pub radius: f64,
}

/// A generated image and its ground truth.
///
/// The look-alike list is what the generator deliberately placed; the image also
/// contains other bifurcations and crossings that are not listed.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticFundus {
    pub image: RgbImage,
    pub fov_centre: (f64, f64),
    pub fov_radius: f64,
    pub microaneurysms: Vec<SyntheticLesion>,
    pub lookalikes: Vec<Lookalike>,
}

/// Generates one synthetic fundus image from `seed`.
///
/// Every listed MA and look-alike is drawn. If one cannot be placed under the
/// spacing rules after many attempts (crowded or tiny images), it is left out and
/// the lists are shorter than requested; nothing is dropped silently after drawing.
pub fn generate(params: &SyntheticParams, seed: u64) -> SyntheticFundus {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scene = Scene::new(params, &mut rng);

    // Vessels: each tree is drawn with `max` so its own overlapping segments do not
    // darken each other, then the trees are combined like two transparent films,
    // which makes artery/vein crossings a little darker, as in real photographs.
    let veins = grow_vessel_tree(&scene, VesselKind::Vein, &mut rng);
    let arteries = grow_vessel_tree(&scene, VesselKind::Artery, &mut rng);
    let mut absorption = Layer::new(scene.width, scene.height);
    for segment in &veins {
        draw_segment(
            &mut absorption,
            segment,
            VesselKind::Vein,
            false,
            Combine::Max,
        );
    }
    let mut artery_layer = Layer::new(scene.width, scene.height);
    for segment in &arteries {
        draw_segment(
            &mut artery_layer,
            segment,
            VesselKind::Artery,
            false,
            Combine::Max,
        );
    }
    absorption.screen_from(&artery_layer);
    drop(artery_layer);

    // Look-alikes, then MAs, each respecting everything already placed.
    let mut occupied: Vec<(Point, f64)> = Vec::new();
    let n_crossings = params.n_lookalikes.div_ceil(2);
    let n_haemorrhages = params.n_lookalikes - n_crossings;
    let mut lookalikes = place_crossings(
        &scene,
        [&veins, &arteries],
        n_crossings,
        &mut absorption,
        &mut occupied,
        &mut rng,
    );
    let haemorrhages =
        place_haemorrhages(&scene, &absorption, n_haemorrhages, &mut occupied, &mut rng);
    let microaneurysms = place_microaneurysms(
        &scene,
        &absorption,
        params.n_microaneurysms,
        &mut occupied,
        &mut rng,
    );

    // Lesions are drawn after the macula so their contrast is set against the
    // final local background.
    draw_macula(&scene, &mut absorption);
    for haemorrhage in &haemorrhages {
        draw_haemorrhage(&scene, &mut absorption, haemorrhage);
        lookalikes.push(Lookalike {
            kind: LookalikeKind::Haemorrhage,
            x: haemorrhage.centre.x,
            y: haemorrhage.centre.y,
            radius: haemorrhage.radius,
        });
    }
    for ma in &microaneurysms {
        draw_microaneurysm(&scene, &mut absorption, ma, params.blur);
    }

    let image = compose(&scene, &absorption, params, &mut rng);
    SyntheticFundus {
        image,
        fov_centre: (scene.fov_centre.x, scene.fov_centre.y),
        fov_radius: scene.fov_radius,
        microaneurysms: microaneurysms
            .iter()
            .map(|ma| SyntheticLesion {
                x: ma.centre.x,
                y: ma.centre.y,
                radius: ma.radius,
            })
            .collect(),
        lookalikes,
    }
}

// ---------------------------------------------------------------------------
// Small geometry and random helpers
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    x: f64,
    y: f64,
}

impl Point {
    fn new(x: f64, y: f64) -> Self {
        Self { x, y }
    }

    fn dist(self, other: Point) -> f64 {
        (self.x - other.x).hypot(self.y - other.y)
    }

    /// The point `len` pixels away in direction `angle` (radians, y down).
    fn step(self, angle: f64, len: f64) -> Point {
        Point::new(self.x + len * angle.cos(), self.y + len * angle.sin())
    }

    fn lerp(self, other: Point, t: f64) -> Point {
        Point::new(
            self.x + (other.x - self.x) * t,
            self.y + (other.y - self.y) * t,
        )
    }
}

/// Uniform in [lo, hi); unlike `random_range` it never panics on an empty range.
fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Standard normal sample (Box-Muller), for the few geometric draws.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (TAU * u2).cos()
}

/// Approximately standard normal sample for pixel noise: the sum of four uniform
/// 16-bit values (Irwin-Hall) needs one `u64` and no transcendental functions,
/// which keeps the noise over millions of pixels cheap.
fn fast_normal(rng: &mut ChaCha8Rng) -> f32 {
    let bits = rng.next_u64();
    let sum = (bits & 0xffff) + ((bits >> 16) & 0xffff) + ((bits >> 32) & 0xffff) + (bits >> 48);
    // Mean 4 * 32767.5; standard deviation 65536 / sqrt(3).
    (sum as f32 - 131_070.0) / 37_837.23
}

fn smoothstep(edge0: f64, edge1: f64, x: f64) -> f64 {
    let t = ((x - edge0) / (edge1 - edge0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// A point uniformly distributed over the disc of `radius` around `centre`.
fn point_in_disc(centre: Point, radius: f64, rng: &mut ChaCha8Rng) -> Point {
    let r = radius.max(0.0) * rng.random::<f64>().sqrt();
    centre.step(uniform(rng, 0.0, TAU), r)
}

/// True if a lesion of `radius` at `p` keeps [`MIN_SEPARATION`] from everything placed.
fn is_separated(occupied: &[(Point, f64)], p: Point, radius: f64) -> bool {
    occupied
        .iter()
        .all(|&(q, r)| p.dist(q) >= MIN_SEPARATION + radius + r)
}

// ---------------------------------------------------------------------------
// Absorption layer
// ---------------------------------------------------------------------------

/// One float per pixel, row-major: the absorption of everything dark.
struct Layer {
    width: usize,
    height: usize,
    data: Vec<f32>,
}

#[derive(Clone, Copy)]
enum Combine {
    /// Keep the larger value: parts of one structure that overlap.
    Max,
    /// `1 - (1 - a)(1 - b)`: independent structures on top of each other.
    Screen,
}

impl Layer {
    fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0.0; width * height],
        }
    }

    /// Value at the pixel nearest to `p`, 0 outside the frame.
    fn at(&self, p: Point) -> f32 {
        let (x, y) = (p.x.round(), p.y.round());
        if x < 0.0 || y < 0.0 || x >= self.width as f64 || y >= self.height as f64 {
            return 0.0;
        }
        self.data[y as usize * self.width + x as usize]
    }

    /// Pixel ranges (inclusive) covering the box, clipped to the frame, or None.
    fn clip(&self, x0: f64, x1: f64, y0: f64, y1: f64) -> Option<(usize, usize, usize, usize)> {
        let max_x = self.width as f64 - 1.0;
        let max_y = self.height as f64 - 1.0;
        let (x0, x1) = (x0.ceil().max(0.0), x1.floor().min(max_x));
        let (y0, y1) = (y0.ceil().max(0.0), y1.floor().min(max_y));
        // `!(a <= b)` is also true for NaN, which must not reach the casts.
        if !(x0 <= x1 && y0 <= y1) {
            return None;
        }
        Some((x0 as usize, x1 as usize, y0 as usize, y1 as usize))
    }

    /// Calls `f(x, y)` for every pixel within `reach` of `centre` (a square box)
    /// and combines the returned absorption into the layer.
    fn paint(&mut self, centre: Point, reach: f64, combine: Combine, f: impl Fn(f64, f64) -> f32) {
        self.paint_box(
            (centre.x - reach, centre.x + reach),
            (centre.y - reach, centre.y + reach),
            combine,
            f,
        );
    }

    fn paint_box(
        &mut self,
        (x0, x1): (f64, f64),
        (y0, y1): (f64, f64),
        combine: Combine,
        f: impl Fn(f64, f64) -> f32,
    ) {
        let Some((x0, x1, y0, y1)) = self.clip(x0, x1, y0, y1) else {
            return;
        };
        for y in y0..=y1 {
            let row = &mut self.data[y * self.width..(y + 1) * self.width];
            for (x, cell) in row.iter_mut().enumerate().take(x1 + 1).skip(x0) {
                let v = f(x as f64, y as f64);
                if v > 0.0 {
                    *cell = match combine {
                        Combine::Max => cell.max(v),
                        Combine::Screen => 1.0 - (1.0 - *cell) * (1.0 - v),
                    };
                }
            }
        }
    }

    fn screen_from(&mut self, other: &Layer) {
        for (a, &b) in self.data.iter_mut().zip(&other.data) {
            *a = 1.0 - (1.0 - *a) * (1.0 - b);
        }
    }

    /// Largest value within `radius` of `centre` (0 outside the frame).
    fn max_in_circle(&self, centre: Point, radius: f64) -> f32 {
        let Some((x0, x1, y0, y1)) = self.clip(
            centre.x - radius,
            centre.x + radius,
            centre.y - radius,
            centre.y + radius,
        ) else {
            return 0.0;
        };
        let mut best = 0.0f32;
        for y in y0..=y1 {
            for x in x0..=x1 {
                if Point::new(x as f64, y as f64).dist(centre) <= radius {
                    best = best.max(self.data[y * self.width + x]);
                }
            }
        }
        best
    }
}

// ---------------------------------------------------------------------------
// Scene layout and retina colour
// ---------------------------------------------------------------------------

/// Smooth random texture: random values on a coarse grid, interpolated. Gives
/// the background the mottled look of the choroid without per-pixel randomness.
struct ValueNoise {
    cell: f64,
    cols: usize,
    values: Vec<f32>,
}

impl ValueNoise {
    fn new(width: usize, height: usize, cell: f64, rng: &mut ChaCha8Rng) -> Self {
        let cols = (width as f64 / cell).ceil() as usize + 2;
        let rows = (height as f64 / cell).ceil() as usize + 2;
        let values = (0..cols * rows)
            .map(|_| uniform(rng, -1.0, 1.0) as f32)
            .collect();
        Self { cell, cols, values }
    }

    /// Grid cell and interpolation weight along one axis, for a coordinate in the frame.
    fn axis(&self, coord: f64) -> (usize, f32) {
        let g = coord.max(0.0) / self.cell;
        (g as usize, smoothstep(0.0, 1.0, g.fract()) as f32)
    }

    /// Value in [-1, 1] from the results of [`Self::axis`] for x and y; splitting
    /// the two lets the full-image pass compute each column's part only once.
    fn sample_axes(&self, (ix, tx): (usize, f32), (iy, ty): (usize, f32)) -> f32 {
        let i = iy * self.cols + ix;
        let v = |k: usize| self.values.get(k).copied().unwrap_or(0.0);
        let top = v(i) + (v(i + 1) - v(i)) * tx;
        let bottom = v(i + self.cols) + (v(i + self.cols + 1) - v(i + self.cols)) * tx;
        top + (bottom - top) * ty
    }
}

/// Where everything is and what the bare retina looks like.
struct Scene {
    width: usize,
    height: usize,
    /// FOV diameter / 1400: sizes of vessels and lesions scale with it.
    scale: f64,
    fov_centre: Point,
    fov_radius: f64,
    /// +1 if the macula (temporal side) is to the right of the disc, else -1.
    temporal: f64,
    disc: Point,
    disc_rx: f64,
    disc_ry: f64,
    disc_colour: [f32; 3],
    cup: Point,
    cup_radius: f64,
    macula: Point,
    /// Vessels stop before entering this radius around the macula centre.
    macula_radius: f64,
    /// Retina colour at the FOV centre before shading.
    base: [f32; 3],
    /// Per-channel brightness loss at the rim (vignetting).
    vignette: [f32; 3],
    /// Linear illumination gradient: brightness change per FOV radius along x, y.
    gradient: (f64, f64),
    coarse: ValueNoise,
    fine: ValueNoise,
}

impl Scene {
    fn new(params: &SyntheticParams, rng: &mut ChaCha8Rng) -> Self {
        let (width, height) = (params.width as usize, params.height as usize);
        let fov_radius = (params.fov_diameter / 2.0).max(1.0);
        let scale = fov_radius * 2.0 / REFERENCE_FOV_DIAMETER;

        // Cameras centre the FOV only roughly; keep a small jitter.
        let jitter = (0.005 * params.width as f64).min(10.0);
        let fov_centre = Point::new(
            (width as f64 - 1.0) / 2.0 + uniform(rng, -jitter, jitter),
            (height as f64 - 1.0) / 2.0 + uniform(rng, -jitter, jitter),
        );

        // Optic disc: diameter about 1/7 of the FOV, on the nasal side; the macula
        // is about 2.5 disc diameters temporal to it, slightly lower.
        let temporal = if rng.random::<bool>() { 1.0 } else { -1.0 };
        let disc_radius = fov_radius / 7.0 * uniform(rng, 0.9, 1.1);
        let disc = Point::new(
            fov_centre.x - temporal * fov_radius * uniform(rng, 0.36, 0.46),
            fov_centre.y + fov_radius * uniform(rng, -0.08, 0.08),
        );
        let disc_rx = disc_radius * uniform(rng, 0.9, 1.0);
        let disc_ry = disc_radius * uniform(rng, 1.0, 1.12);
        let cup = Point::new(
            disc.x + temporal * disc_radius * uniform(rng, 0.05, 0.25),
            disc.y + disc_radius * uniform(rng, -0.1, 0.1),
        );
        let cup_radius = disc_radius * uniform(rng, 0.35, 0.5);
        let macula = Point::new(
            disc.x + temporal * 5.0 * disc_radius * uniform(rng, 0.95, 1.05),
            disc.y + disc_radius * uniform(rng, 0.0, 0.4),
        );

        let tint = |rng: &mut ChaCha8Rng, v: f64, spread: f64| {
            (v * uniform(rng, 1.0 - spread, 1.0 + spread)) as f32
        };
        let base = [
            tint(rng, 212.0, 0.05),
            tint(rng, 92.0, 0.1),
            tint(rng, 28.0, 0.15),
        ];
        let disc_colour = [
            tint(rng, 250.0, 0.02),
            tint(rng, 196.0, 0.06),
            tint(rng, 125.0, 0.1),
        ];
        let vignette = [0.3, 0.45, 0.45];
        let gradient_angle = uniform(rng, 0.0, TAU);
        let gradient_strength = uniform(rng, 0.04, 0.1);
        let gradient = (
            gradient_strength * gradient_angle.cos(),
            gradient_strength * gradient_angle.sin(),
        );
        let coarse = ValueNoise::new(width, height, (90.0 * scale).max(8.0), rng);
        let fine = ValueNoise::new(width, height, (22.0 * scale).max(4.0), rng);

        Self {
            width,
            height,
            scale,
            fov_centre,
            fov_radius,
            temporal,
            disc,
            disc_rx,
            disc_ry,
            disc_colour,
            cup,
            cup_radius,
            macula,
            macula_radius: disc_radius * 1.4,
            base,
            vignette,
            gradient,
            coarse,
            fine,
        }
    }

    fn disc_radius(&self) -> f64 {
        self.disc_rx.max(self.disc_ry)
    }

    /// Thinnest vessel width drawn.
    fn min_vessel_width(&self) -> f64 {
        (3.0 * self.scale).max(1.5)
    }

    /// True if a lesion of `radius` at `p` is at least [`RIM_MARGIN`] inside both
    /// the FOV circle and the frame (the FOV may be cropped by the frame).
    fn inside_field(&self, p: Point, radius: f64) -> bool {
        let m = RIM_MARGIN + radius;
        p.dist(self.fov_centre) <= self.fov_radius - m
            && p.x >= m
            && p.y >= m
            && p.x <= self.width as f64 - 1.0 - m
            && p.y <= self.height as f64 - 1.0 - m
    }

    /// Background texture value in [-1, 1] at pixel (x, y).
    fn texture(&self, x: f64, y: f64) -> f32 {
        0.65 * self
            .coarse
            .sample_axes(self.coarse.axis(x), self.coarse.axis(y))
            + 0.35 * self.fine.sample_axes(self.fine.axis(x), self.fine.axis(y))
    }

    /// Colour of the bare retina (no vessels or lesions) at pixel (x, y).
    fn retina_colour(&self, x: f64, y: f64) -> [f32; 3] {
        self.retina_colour_with_texture(x, y, self.texture(x, y))
    }

    fn retina_colour_with_texture(&self, x: f64, y: f64, texture: f32) -> [f32; 3] {
        let (dx, dy) = (x - self.fov_centre.x, y - self.fov_centre.y);
        let rho2 = ((dx * dx + dy * dy) / (self.fov_radius * self.fov_radius)) as f32;
        let falloff = 0.45 * rho2 + 0.55 * rho2 * rho2;
        let shade = (1.0 + (self.gradient.0 * dx + self.gradient.1 * dy) / self.fov_radius) as f32;
        let mut colour = [0.0f32; 3];
        for (k, c) in colour.iter_mut().enumerate() {
            *c = self.base[k]
                * shade
                * (1.0 - self.vignette[k] * falloff)
                * (1.0 + TEXTURE[k] * texture);
        }
        self.blend_disc(x, y, &mut colour);
        colour
    }

    /// Paints the optic disc (with a pale halo and a brighter cup) over `colour`.
    fn blend_disc(&self, x: f64, y: f64, colour: &mut [f32; 3]) {
        let (ex, ey) = (
            (x - self.disc.x) / self.disc_rx,
            (y - self.disc.y) / self.disc_ry,
        );
        if ex.abs() > 1.8 || ey.abs() > 1.8 {
            return;
        }
        let rho = ex.hypot(ey);
        let disc = 1.0 - smoothstep(0.82, 1.08, rho);
        let halo = 0.15 * (1.0 - smoothstep(1.0, 1.45, rho));
        let w = disc.max(halo) as f32;
        let cup = 0.85
            * (1.0 - smoothstep(0.4, 1.0, Point::new(x, y).dist(self.cup) / self.cup_radius))
                as f32;
        const CUP_COLOUR: [f32; 3] = [255.0, 235.0, 188.0];
        for (k, c) in colour.iter_mut().enumerate() {
            *c += (self.disc_colour[k] - *c) * w;
            *c += (CUP_COLOUR[k] - *c) * cup;
        }
    }
}

// ---------------------------------------------------------------------------
// Vessels
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum VesselKind {
    Vein,
    Artery,
}

impl VesselKind {
    /// Veins are darker than arteries of the same width.
    fn gain(self) -> f64 {
        match self {
            VesselKind::Vein => 1.0,
            VesselKind::Artery => 0.8,
        }
    }
}

/// A straight piece of vessel whose width changes linearly from `a` to `b`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    a: Point,
    b: Point,
    width_a: f64,
    width_b: f64,
}

/// Cross-section sigma: the Gaussian profile's full width at half maximum is
/// about the vessel width. The floor keeps hair-thin vessels anti-aliased.
fn vessel_sigma(width: f64) -> f64 {
    (width / 2.5).max(0.6)
}

/// Absorption at a vessel's centre line: thin vessels are fainter, like real ones.
fn vessel_contrast(width: f64) -> f64 {
    0.32 + 0.4 * ((width - 1.0) / 13.0).clamp(0.0, 1.0)
}

/// A vessel that still has to grow.
struct Sprout {
    pos: Point,
    heading: f64,
    /// The heading drifts towards this one; this makes the arcades curve.
    target: f64,
    /// How fast the heading approaches `target`, per pixel travelled.
    pull: f64,
    width: f64,
}

/// Grows one vessel tree (all veins or all arteries) out of the optic disc.
///
/// Main trunks follow the anatomy: two temporal arcades arching around the macula,
/// two nasal trunks, and thin branches towards the macula and nasally. Each
/// vessel walks in short steps, its heading pulled towards a target plus a random
/// wiggle, its width decaying towards the minimum, and sprouts thinner side
/// branches every 90-200 px (nominal scale) until it leaves the FOV, reaches the
/// macula or has run its length (0.4-1.3 FOV radii, shorter for thinner vessels).
fn grow_vessel_tree(scene: &Scene, kind: VesselKind, rng: &mut ChaCha8Rng) -> Vec<Segment> {
    const MAX_SEGMENTS: usize = 8000;
    let s = scene.scale;
    let step = (5.0 * s).max(1.5);
    let min_width = scene.min_vessel_width();
    let trunk_width = match kind {
        VesselKind::Vein => 14.0 * s,
        VesselKind::Artery => 10.5 * s,
    }
    .max(2.5 * min_width);
    // Widths approach the minimum exponentially, so the arcades stay wide past the
    // macula and thin vessels run on towards the rim. Thinner vessels are shorter.
    let decay_length = 0.9 * scene.fov_radius;
    let max_length = |width: f64| {
        let relative = ((width - min_width) / (trunk_width - min_width)).clamp(0.0, 1.0);
        scene.fov_radius * (0.4 + 0.9 * relative)
    };

    // (start angle, target angle, pull per nominal px, width fraction), in degrees
    // with 0 = temporal and positive = downwards (image y grows downwards).
    const TRUNKS: [(f64, f64, f64, f64); 7] = [
        (-75.0, 20.0, 1.0 / 280.0, 1.0),    // superior temporal arcade
        (75.0, -20.0, 1.0 / 280.0, 0.95),   // inferior temporal arcade
        (-115.0, -165.0, 1.0 / 400.0, 0.7), // superior nasal
        (115.0, 165.0, 1.0 / 400.0, 0.7),   // inferior nasal
        (-32.0, -12.0, 1.0 / 300.0, 0.3),   // towards the macula, above
        (32.0, 12.0, 1.0 / 300.0, 0.3),     // towards the macula, below
        (180.0, 180.0, 1.0 / 300.0, 0.4),   // nasal, horizontal
    ];
    // Mirror angles when the macula is on the left (temporal = -x).
    let orient = |deg: f64| {
        let a = deg.to_radians();
        if scene.temporal > 0.0 { a } else { PI - a }
    };
    let mut stack: Vec<Sprout> = TRUNKS
        .iter()
        .rev()
        .map(|&(start, target, pull, width)| {
            let offset = uniform(rng, -10.0, 10.0);
            Sprout {
                pos: Point::new(
                    scene.disc.x + scene.disc_rx * uniform(rng, -0.25, 0.25),
                    scene.disc.y + scene.disc_ry * uniform(rng, -0.25, 0.25),
                ),
                heading: orient(start + offset),
                target: orient(target + offset),
                pull: pull / s,
                width: trunk_width * width,
            }
        })
        .collect();

    let mut segments = Vec::new();
    while let Some(sprout) = stack.pop() {
        let Sprout {
            mut pos,
            mut heading,
            target,
            pull,
            mut width,
        } = sprout;
        let max_length = max_length(width);
        let mut next_branch = uniform(rng, 40.0, 120.0) * s;
        let mut since_branch = 0.0;
        let mut length = 0.0;
        // Curvature wanders smoothly (a mean-reverting random walk), giving gently
        // tortuous vessels rather than jagged ones.
        let mut curvature = 0.0;
        while segments.len() < MAX_SEGMENTS && length < max_length {
            curvature = 0.85 * curvature + 0.012 * normal(rng);
            heading += (target - heading) * (pull * step).min(1.0) + curvature;
            let new_width = min_width + (width - min_width) * (-step / decay_length).exp();
            let new_pos = pos.step(heading, step);
            if new_pos.dist(scene.fov_centre) > scene.fov_radius + 5.0
                || new_pos.dist(scene.macula) < scene.macula_radius
            {
                break;
            }
            segments.push(Segment {
                a: pos,
                b: new_pos,
                width_a: width,
                width_b: new_width,
            });
            pos = new_pos;
            width = new_width;
            length += step;
            since_branch += step;

            if since_branch >= next_branch && width >= 1.5 * min_width {
                since_branch = 0.0;
                next_branch = uniform(rng, 90.0, 200.0) * s;
                let side = if rng.random::<bool>() { 1.0 } else { -1.0 };
                let child_heading = heading + side * uniform(rng, 0.45, 1.1);
                stack.push(Sprout {
                    pos,
                    heading: child_heading,
                    target: child_heading + side * uniform(rng, -0.2, 0.4),
                    pull: 1.0 / (300.0 * s),
                    width: min_width + (width - min_width) * uniform(rng, 0.25, 0.6),
                });
                // The parent loses some calibre and kinks away from the branch.
                width = min_width + (width - min_width) * uniform(rng, 0.85, 0.95);
                heading -= side * uniform(rng, 0.05, 0.2);
            }
        }
    }
    segments
}

/// Draws a segment with a Gaussian cross-section. `fade_ends` tapers the
/// absorption to zero at both ends, for short stand-alone vessels.
fn draw_segment(
    layer: &mut Layer,
    seg: &Segment,
    kind: VesselKind,
    fade_ends: bool,
    combine: Combine,
) {
    let reach = 3.0 * vessel_sigma(seg.width_a.max(seg.width_b)) + 1.0;
    let (dx, dy) = (seg.b.x - seg.a.x, seg.b.y - seg.a.y);
    let len2 = dx * dx + dy * dy;
    layer.paint_box(
        (seg.a.x.min(seg.b.x) - reach, seg.a.x.max(seg.b.x) + reach),
        (seg.a.y.min(seg.b.y) - reach, seg.a.y.max(seg.b.y) + reach),
        combine,
        |x, y| {
            let (px, py) = (x - seg.a.x, y - seg.a.y);
            let t = if len2 > 0.0 {
                (px * dx + py * dy) / len2
            } else {
                0.0
            };
            let tc = t.clamp(0.0, 1.0);
            let (ex, ey) = (px - tc * dx, py - tc * dy);
            let d2 = ex * ex + ey * ey;
            let width = seg.width_a + (seg.width_b - seg.width_a) * tc;
            let sigma = vessel_sigma(width);
            if d2 > 9.0 * sigma * sigma {
                return 0.0;
            }
            let mut v = kind.gain() * vessel_contrast(width) * (-0.5 * d2 / (sigma * sigma)).exp();
            if fade_ends {
                v *= smoothstep(0.0, 0.3, t) * smoothstep(0.0, 0.3, 1.0 - t);
            }
            v as f32
        },
    );
}

// ---------------------------------------------------------------------------
// Look-alikes
// ---------------------------------------------------------------------------

/// A point where two vessel segments cross, with the widths there.
struct Crossing {
    at: Point,
    width_1: f64,
    width_2: f64,
}

/// All points where a segment of `first` crosses one of `second` at an angle of
/// at least 25 degrees (shallower overlaps look like one wide vessel, not an X).
///
/// Segments are short, so `second` is bucketed by midpoint on a grid with cells at
/// least as large as any segment: a crossing pair then has midpoints in the same
/// or neighbouring cells, and each pair is tested once.
fn find_crossings(first: &[Segment], second: &[Segment]) -> Vec<Crossing> {
    let mut found = Vec::new();
    if first.is_empty() || second.is_empty() {
        return found;
    }
    let mid = |s: &Segment| s.a.lerp(s.b, 0.5);
    let longest = first
        .iter()
        .chain(second)
        .map(|s| s.a.dist(s.b))
        .fold(0.0, f64::max);
    let cell = longest.max(8.0);
    let (min_x, min_y) = second
        .iter()
        .map(mid)
        .fold((f64::MAX, f64::MAX), |(x, y), m| (x.min(m.x), y.min(m.y)));
    let (max_x, max_y) = second
        .iter()
        .map(mid)
        .fold((f64::MIN, f64::MIN), |(x, y), m| (x.max(m.x), y.max(m.y)));
    let cols = ((max_x - min_x) / cell) as usize + 1;
    let rows = ((max_y - min_y) / cell) as usize + 1;
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); cols * rows];
    for (i, s) in second.iter().enumerate() {
        let m = mid(s);
        buckets[((m.y - min_y) / cell) as usize * cols + ((m.x - min_x) / cell) as usize].push(i);
    }

    let min_sin = 25f64.to_radians().sin();
    for p in first {
        let m = mid(p);
        let (cx, cy) = ((m.x - min_x) / cell, (m.y - min_y) / cell);
        if cx < -1.0 || cy < -1.0 || cx >= cols as f64 + 1.0 || cy >= rows as f64 + 1.0 {
            continue;
        }
        let (cx, cy) = (cx.floor() as i64, cy.floor() as i64);
        let (rx, ry) = (p.b.x - p.a.x, p.b.y - p.a.y);
        for gy in (cy - 1).max(0)..=(cy + 1).min(rows as i64 - 1) {
            for gx in (cx - 1).max(0)..=(cx + 1).min(cols as i64 - 1) {
                for &j in &buckets[gy as usize * cols + gx as usize] {
                    let q = &second[j];
                    let (sx, sy) = (q.b.x - q.a.x, q.b.y - q.a.y);
                    let denom = rx * sy - ry * sx;
                    let lengths = rx.hypot(ry) * sx.hypot(sy);
                    if lengths == 0.0 || denom.abs() < min_sin * lengths {
                        continue;
                    }
                    let (qx, qy) = (q.a.x - p.a.x, q.a.y - p.a.y);
                    let t = (qx * sy - qy * sx) / denom;
                    let u = (qx * ry - qy * rx) / denom;
                    if (0.0..=1.0).contains(&t) && (0.0..=1.0).contains(&u) {
                        found.push(Crossing {
                            at: p.a.lerp(p.b, t),
                            width_1: p.width_a + (p.width_b - p.width_a) * t,
                            width_2: q.width_a + (q.width_b - q.width_a) * u,
                        });
                    }
                }
            }
        }
    }
    found
}

/// Picks up to `wanted` artery/vein crossings as look-alikes. If too few natural
/// crossings qualify (inside the field, away from the crowded disc, spaced out),
/// short thin vessels are drawn across existing ones to make more.
fn place_crossings(
    scene: &Scene,
    [veins, arteries]: [&[Segment]; 2],
    wanted: usize,
    absorption: &mut Layer,
    occupied: &mut Vec<(Point, f64)>,
    rng: &mut ChaCha8Rng,
) -> Vec<Lookalike> {
    let mut placed = Vec::new();
    if wanted == 0 {
        return placed;
    }
    let clear_of_disc = 2.0 * scene.disc_radius();
    let accept =
        |at: Point, radius: f64, placed: &mut Vec<Lookalike>, occupied: &mut Vec<(Point, f64)>| {
            placed.push(Lookalike {
                kind: LookalikeKind::VesselCrossing,
                x: at.x,
                y: at.y,
                radius,
            });
            occupied.push((at, radius));
        };

    let mut natural = find_crossings(veins, arteries);
    shuffle(&mut natural, rng);
    for c in &natural {
        if placed.len() == wanted {
            break;
        }
        let radius = 0.5 * c.width_1.max(c.width_2);
        if scene.inside_field(c.at, radius)
            && c.at.dist(scene.disc) > clear_of_disc
            && is_separated(occupied, c.at, radius)
        {
            accept(c.at, radius, &mut placed, occupied);
        }
    }

    // Not enough: cross a visible vessel with a new short one.
    let min_width = scene.min_vessel_width();
    let crossable: Vec<&Segment> = veins
        .iter()
        .chain(arteries)
        .filter(|s| s.width_a.min(s.width_b) >= 1.5 * min_width)
        .collect();
    let mut tries = 0;
    while placed.len() < wanted && tries < 500 && !crossable.is_empty() {
        tries += 1;
        let seg = crossable[rng.random_range(0..crossable.len())];
        let t = rng.random::<f64>();
        let at = seg.a.lerp(seg.b, t);
        let crossed_width = seg.width_a + (seg.width_b - seg.width_a) * t;
        let length = (uniform(rng, 60.0, 100.0) * scene.scale).max(24.0);
        let width = uniform(rng, 1.0, 1.6) * min_width;
        let radius = 0.5 * crossed_width.max(width);
        if !scene.inside_field(at, radius)
            || at.dist(scene.disc) < clear_of_disc + length / 2.0
            || !is_separated(occupied, at, radius)
        {
            continue;
        }
        let seg_angle = (seg.b.y - seg.a.y).atan2(seg.b.x - seg.a.x);
        let side = if rng.random::<bool>() { 1.0 } else { -1.0 };
        let angle = seg_angle + side * uniform(rng, 50f64.to_radians(), 90f64.to_radians());
        let before = length * uniform(rng, 0.35, 0.65);
        let extra = Segment {
            a: at.step(angle, -before),
            b: at.step(angle, length - before),
            width_a: width,
            width_b: width,
        };
        draw_segment(
            absorption,
            &extra,
            VesselKind::Artery,
            true,
            Combine::Screen,
        );
        accept(at, radius, &mut placed, occupied);
    }
    placed
}

/// A haemorrhage's placement and its random shape.
struct Haemorrhage {
    centre: Point,
    radius: f64,
    /// Overlapping flat-topped blobs (offset from the centre, radius, darkness):
    /// their union is an irregular, blotchy outline about `radius` in size.
    blobs: Vec<(Point, f64, f64)>,
    green_drop: f64,
}

/// Places up to `wanted` small haemorrhages off the disc and off large vessels.
fn place_haemorrhages(
    scene: &Scene,
    absorption: &Layer,
    wanted: usize,
    occupied: &mut Vec<(Point, f64)>,
    rng: &mut ChaCha8Rng,
) -> Vec<Haemorrhage> {
    let s = scene.scale;
    // Nominal 7-15 px; on small FOVs keep them clearly larger than any MA.
    let (r_lo, r_hi) = ((7.0 * s).max(5.0), (15.0 * s).max(9.0));
    let mut placed = Vec::new();
    let mut tries = 0;
    while placed.len() < wanted && tries < 500 * wanted {
        tries += 1;
        let radius = uniform(rng, r_lo, r_hi);
        let centre = point_in_disc(scene.fov_centre, scene.fov_radius, rng);
        if !scene.inside_field(centre, radius)
            || centre.dist(scene.disc) < 1.5 * scene.disc_radius() + radius
            || !is_separated(occupied, centre, radius)
            || absorption.max_in_circle(centre, 1.3 * radius) > 0.1
        {
            continue;
        }
        // A central blob (darkest, so the recorded centre is dark) plus satellites.
        let mut blobs = vec![(Point::new(0.0, 0.0), 0.6 * radius, 1.0)];
        for _ in 0..rng.random_range(3..7) {
            let offset = point_in_disc(Point::new(0.0, 0.0), 0.5 * radius, rng);
            blobs.push((
                offset,
                uniform(rng, 0.35, 0.6) * radius,
                uniform(rng, 0.7, 0.95),
            ));
        }
        placed.push(Haemorrhage {
            centre,
            radius,
            blobs,
            green_drop: uniform(rng, 45.0, 70.0),
        });
        occupied.push((centre, radius));
    }
    placed
}

/// Absorption needed at `p` so the green channel drops by `green_drop` levels,
/// given what is already absorbed there. `gain` is how much of the peak survives
/// later blurring.
fn absorption_for_green_drop(
    scene: &Scene,
    layer: &Layer,
    p: Point,
    green_drop: f64,
    gain: f64,
) -> f64 {
    let green = scene.retina_colour(p.x, p.y)[1] as f64;
    let already = layer.at(p) as f64;
    let available = ABSORPTION[1] as f64 * green * (1.0 - already) * gain;
    (green_drop / available.max(1.0)).min(0.95)
}

fn draw_haemorrhage(scene: &Scene, layer: &mut Layer, h: &Haemorrhage) {
    let peak = absorption_for_green_drop(scene, layer, h.centre, h.green_drop, 1.0);
    let reach = h.radius * 1.2 + 2.0;
    layer.paint(h.centre, reach, Combine::Screen, |x, y| {
        let (dx, dy) = (x - h.centre.x, y - h.centre.y);
        let darkness = h
            .blobs
            .iter()
            .map(|&(offset, r, level)| {
                let d = (dx - offset.x).hypot(dy - offset.y);
                level * (1.0 - smoothstep(0.5, 1.0, d / r))
            })
            .fold(0.0, f64::max);
        (peak * darkness) as f32
    });
}

// ---------------------------------------------------------------------------
// Microaneurysms and the macula
// ---------------------------------------------------------------------------

struct Microaneurysm {
    centre: Point,
    radius: f64,
    green_drop: f64,
}

/// Places up to `wanted` MAs on pixel centres, well clear of vessels (so their
/// surroundings are plain background), of the disc, the rim and other lesions.
fn place_microaneurysms(
    scene: &Scene,
    absorption: &Layer,
    wanted: usize,
    occupied: &mut Vec<(Point, f64)>,
    rng: &mut ChaCha8Rng,
) -> Vec<Microaneurysm> {
    let mut placed = Vec::new();
    let mut tries = 0;
    while placed.len() < wanted && tries < 500 * wanted {
        tries += 1;
        // Most MAs are small: skew the nominal 2-6 px radius towards 2.
        let u = rng.random::<f64>();
        let radius = ((2.0 + 4.0 * u * u) * scene.scale).max(MA_MIN_RADIUS);
        let p = point_in_disc(scene.fov_centre, scene.fov_radius, rng);
        let centre = Point::new(p.x.round(), p.y.round());
        if !scene.inside_field(centre, radius)
            || centre.dist(scene.disc) < 1.5 * scene.disc_radius() + 3.0 * radius
            || !is_separated(occupied, centre, radius)
            || absorption.max_in_circle(centre, 3.0 * radius + 3.0) > 0.03
        {
            continue;
        }
        placed.push(Microaneurysm {
            centre,
            radius,
            green_drop: uniform(rng, 22.0, 42.0),
        });
        occupied.push((centre, radius));
    }
    placed
}

/// A round Gaussian dot whose green drop at the centre, after the optional blur,
/// is the MA's `green_drop` (as far as the absorption cap allows).
fn draw_microaneurysm(scene: &Scene, layer: &mut Layer, ma: &Microaneurysm, blur: bool) {
    let sigma = ma.radius / 2.0;
    // The 1-2-1 blur has variance 0.5 per axis; a Gaussian's peak scales with 1/sigma^2.
    let gain = if blur {
        sigma * sigma / (sigma * sigma + 0.5)
    } else {
        1.0
    };
    let peak = absorption_for_green_drop(scene, layer, ma.centre, ma.green_drop, gain);
    layer.paint(ma.centre, 3.0 * sigma + 1.0, Combine::Screen, |x, y| {
        let d2 = (x - ma.centre.x).powi(2) + (y - ma.centre.y).powi(2);
        (peak * (-0.5 * d2 / (sigma * sigma)).exp()) as f32
    });
}

/// The macula: a broad, faint darkening with a darker fovea in the middle.
fn draw_macula(scene: &Scene, layer: &mut Layer) {
    let broad = scene.disc_radius() * 1.6;
    let fovea = scene.disc_radius() * 0.35;
    layer.paint(scene.macula, 3.0 * broad, Combine::Screen, |x, y| {
        let d2 = (x - scene.macula.x).powi(2) + (y - scene.macula.y).powi(2);
        let v =
            0.12 * (-0.5 * d2 / (broad * broad)).exp() + 0.1 * (-0.5 * d2 / (fovea * fovea)).exp();
        v as f32
    });
}

// ---------------------------------------------------------------------------
// Composition
// ---------------------------------------------------------------------------

/// Turns the scene and the absorption layer into the final 8-bit image: retina
/// colour darkened by absorption, noise, an anti-aliased FOV edge, optional blur.
fn compose(
    scene: &Scene,
    absorption: &Layer,
    params: &SyntheticParams,
    rng: &mut ChaCha8Rng,
) -> RgbImage {
    let (w, h) = (scene.width, scene.height);
    let r = scene.fov_radius;
    let inner2 = (r - 1.0).max(0.0).powi(2);
    let outer2 = (r + 1.0).powi(2);
    let sigma = params.noise_sigma.max(0.0);
    let mut buf = vec![0.0f32; w * h * 3];
    // Texture interpolation split per axis: columns computed once, rows per row.
    let coarse_x: Vec<_> = (0..w).map(|x| scene.coarse.axis(x as f64)).collect();
    let fine_x: Vec<_> = (0..w).map(|x| scene.fine.axis(x as f64)).collect();
    for y in 0..h {
        let dy = y as f64 - scene.fov_centre.y;
        let (coarse_y, fine_y) = (scene.coarse.axis(y as f64), scene.fine.axis(y as f64));
        for x in 0..w {
            let dx = x as f64 - scene.fov_centre.x;
            let d2 = dx * dx + dy * dy;
            if d2 >= outer2 {
                continue;
            }
            // Fraction of the pixel inside the FOV circle (1 except at the rim).
            let coverage = if d2 <= inner2 {
                1.0
            } else {
                (r + 0.5 - d2.sqrt()).clamp(0.0, 1.0) as f32
            };
            if coverage <= 0.0 {
                continue;
            }
            let i = y * w + x;
            let a = absorption.data[i];
            let texture = 0.65 * scene.coarse.sample_axes(coarse_x[x], coarse_y)
                + 0.35 * scene.fine.sample_axes(fine_x[x], fine_y);
            let colour = scene.retina_colour_with_texture(x as f64, y as f64, texture);
            for (k, out) in buf[3 * i..3 * i + 3].iter_mut().enumerate() {
                let v = colour[k] * (1.0 - ABSORPTION[k] * a) + sigma * fast_normal(rng);
                *out = v.max(0.0) * coverage;
            }
        }
    }
    if params.blur {
        buf = blur_121(&buf, w, h);
    }
    let bytes = buf
        .iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(params.width, params.height, bytes).expect("buffer matches image size")
}

/// Separable [1 2 1] / 4 blur of an interleaved RGB float buffer, edges clamped.
/// Black stays black where all neighbours are black (the surround).
fn blur_121(src: &[f32], w: usize, h: usize) -> Vec<f32> {
    let mut tmp = vec![0.0f32; src.len()];
    for y in 0..h {
        for x in 0..w {
            let (l, r) = (x.saturating_sub(1), (x + 1).min(w - 1));
            for k in 0..3 {
                let at = |xx: usize| src[(y * w + xx) * 3 + k];
                tmp[(y * w + x) * 3 + k] = 0.25 * at(l) + 0.5 * at(x) + 0.25 * at(r);
            }
        }
    }
    let mut out = vec![0.0f32; src.len()];
    for y in 0..h {
        let (u, d) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            for k in 0..3 {
                let at = |yy: usize| tmp[(yy * w + x) * 3 + k];
                out[(y * w + x) * 3 + k] = 0.25 * at(u) + 0.5 * at(y) + 0.25 * at(d);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn green(img: &RgbImage, x: f64, y: f64) -> f64 {
        img.get_pixel(x as u32, y as u32)[1] as f64
    }

    /// Mean green over pixels whose distance from (x, y) is in [r_in, r_out].
    fn ring_green(img: &RgbImage, x: f64, y: f64, r_in: f64, r_out: f64) -> Vec<f64> {
        let mut values = Vec::new();
        let reach = r_out.ceil() as i64;
        for dy in -reach..=reach {
            for dx in -reach..=reach {
                let d = (dx as f64).hypot(dy as f64);
                let (px, py) = (x as i64 + dx, y as i64 + dy);
                if d >= r_in
                    && d <= r_out
                    && px >= 0
                    && py >= 0
                    && (px as u32) < img.width()
                    && (py as u32) < img.height()
                {
                    values.push(img.get_pixel(px as u32, py as u32)[1] as f64);
                }
            }
        }
        values
    }

    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len() as f64
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    fn in_fov(f: &SyntheticFundus, x: f64, y: f64, margin: f64) -> bool {
        (x - f.fov_centre.0).hypot(y - f.fov_centre.1) <= f.fov_radius - margin
    }

    #[test]
    fn same_seed_gives_identical_output() {
        let p = SyntheticParams::small();
        let a = generate(&p, 7);
        let b = generate(&p, 7);
        assert_eq!(a.image.as_raw(), b.image.as_raw());
        assert_eq!(a, b);
    }

    #[test]
    fn different_seeds_give_different_images() {
        let p = SyntheticParams::small();
        let a = generate(&p, 1);
        let b = generate(&p, 2);
        let differing = a
            .image
            .as_raw()
            .iter()
            .zip(b.image.as_raw())
            .filter(|(x, y)| x != y)
            .count();
        assert!(
            differing > a.image.as_raw().len() / 4,
            "only {differing} bytes differ"
        );
        assert_ne!(a.microaneurysms, b.microaneurysms);
    }

    #[test]
    fn small_params_give_requested_size_and_counts() {
        let p = SyntheticParams::small();
        for seed in 0..6 {
            let f = generate(&p, seed);
            assert_eq!(f.image.dimensions(), (512, 448));
            assert_eq!(f.microaneurysms.len(), p.n_microaneurysms, "seed {seed}");
            assert_eq!(f.lookalikes.len(), p.n_lookalikes, "seed {seed}");
            let crossings = f
                .lookalikes
                .iter()
                .filter(|l| l.kind == LookalikeKind::VesselCrossing)
                .count();
            assert_eq!(crossings, p.n_lookalikes.div_ceil(2), "seed {seed}");
        }
    }

    #[test]
    fn default_params_place_everything_and_black_corners() {
        let p = SyntheticParams::default();
        let f = generate(&p, 3);
        assert_eq!(f.image.dimensions(), (1500, 1152));
        assert_eq!(f.microaneurysms.len(), 12);
        assert_eq!(f.lookalikes.len(), 8);
        assert!((f.fov_radius - 700.0).abs() < 1e-9);
        for (x, y) in [(0, 0), (1499, 0), (0, 1151), (1499, 1151)] {
            assert_eq!(f.image.get_pixel(x, y).0, [0, 0, 0]);
        }
    }

    #[test]
    fn outside_fov_is_black() {
        for seed in 0..3 {
            let f = generate(&SyntheticParams::small(), seed);
            for (x, y, px) in f.image.enumerate_pixels() {
                let d = (x as f64 - f.fov_centre.0).hypot(y as f64 - f.fov_centre.1);
                if d > f.fov_radius + 3.0 {
                    assert_eq!(px.0, [0, 0, 0], "({x}, {y}) seed {seed}");
                }
            }
        }
    }

    #[test]
    fn microaneurysms_are_inside_fov_and_darker_than_surroundings() {
        for seed in 0..8 {
            let f = generate(&SyntheticParams::small(), seed);
            for ma in &f.microaneurysms {
                assert!(
                    in_fov(&f, ma.x, ma.y, RIM_MARGIN + ma.radius),
                    "{ma:?} seed {seed}"
                );
                assert!(ma.radius >= MA_MIN_RADIUS);
                assert_eq!(
                    (ma.x.fract(), ma.y.fract()),
                    (0.0, 0.0),
                    "MA not on a pixel centre"
                );
                let ring = mean(&ring_green(
                    &f.image,
                    ma.x,
                    ma.y,
                    2.0 * ma.radius,
                    3.0 * ma.radius,
                ));
                let drop = ring - green(&f.image, ma.x, ma.y);
                assert!(drop > 10.0, "green drop {drop:.1} at {ma:?}, seed {seed}");
                assert!(drop < 60.0, "green drop {drop:.1} at {ma:?}, seed {seed}");
            }
        }
    }

    #[test]
    fn default_size_microaneurysms_have_target_contrast() {
        let f = generate(&SyntheticParams::default(), 11);
        for ma in &f.microaneurysms {
            assert!((2.0..=6.0).contains(&ma.radius), "{ma:?}");
            let ring = mean(&ring_green(
                &f.image,
                ma.x,
                ma.y,
                2.0 * ma.radius,
                3.0 * ma.radius,
            ));
            let drop = ring - green(&f.image, ma.x, ma.y);
            assert!(
                (12.0..55.0).contains(&drop),
                "green drop {drop:.1} at {ma:?}"
            );
        }
    }

    #[test]
    fn lesions_keep_their_distance() {
        for seed in 0..8 {
            let f = generate(&SyntheticParams::small(), seed);
            let all: Vec<(f64, f64, f64)> = f
                .microaneurysms
                .iter()
                .map(|m| (m.x, m.y, m.radius))
                .chain(f.lookalikes.iter().map(|l| (l.x, l.y, l.radius)))
                .collect();
            for (i, a) in all.iter().enumerate() {
                for b in &all[i + 1..] {
                    let d = (a.0 - b.0).hypot(a.1 - b.1);
                    assert!(
                        d >= MIN_SEPARATION + a.2 + b.2,
                        "{a:?} and {b:?} only {d:.1} apart, seed {seed}"
                    );
                }
            }
        }
    }

    #[test]
    fn lookalikes_are_in_fov_and_visible() {
        for seed in 0..8 {
            let f = generate(&SyntheticParams::small(), seed);
            let max_ma = f
                .microaneurysms
                .iter()
                .map(|m| m.radius)
                .fold(0.0, f64::max);
            for l in &f.lookalikes {
                assert!(
                    in_fov(&f, l.x, l.y, RIM_MARGIN + l.radius),
                    "{l:?} seed {seed}"
                );
                let centre = green(&f.image, l.x.round(), l.y.round());
                match l.kind {
                    LookalikeKind::Haemorrhage => {
                        assert!(l.radius > max_ma, "{l:?} not larger than MAs");
                        // Outside the blotch, but within the margin it keeps from the rim.
                        let (r_in, r_out) = (1.4 * l.radius, l.radius + RIM_MARGIN - 2.0);
                        let ring = mean(&ring_green(&f.image, l.x, l.y, r_in, r_out));
                        assert!(
                            ring - centre > 15.0,
                            "{l:?}: drop {:.1}, seed {seed}",
                            ring - centre
                        );
                    }
                    LookalikeKind::VesselCrossing => {
                        // Most of a ring around a crossing is background; the
                        // crossing itself is on two vessels.
                        let ring = median(ring_green(
                            &f.image,
                            l.x,
                            l.y,
                            l.radius + 8.0,
                            l.radius + 12.0,
                        ));
                        assert!(
                            ring - centre > 8.0,
                            "{l:?}: drop {:.1}, seed {seed}",
                            ring - centre
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn channels_have_fundus_like_levels() {
        let f = generate(&SyntheticParams::small(), 5);
        let mut sums = [0.0f64; 3];
        let mut n = 0.0;
        for (x, y, px) in f.image.enumerate_pixels() {
            if in_fov(&f, x as f64, y as f64, 10.0) {
                for (s, &v) in sums.iter_mut().zip(&px.0) {
                    *s += v as f64;
                }
                n += 1.0;
            }
        }
        let [r, g, b] = sums.map(|s| s / n);
        assert!((150.0..230.0).contains(&r), "red {r:.1}");
        assert!((50.0..110.0).contains(&g), "green {g:.1}");
        assert!((10.0..40.0).contains(&b), "blue {b:.1}");
    }

    #[test]
    fn noiseless_unblurred_variant_works() {
        let p = SyntheticParams {
            noise_sigma: 0.0,
            blur: false,
            ..SyntheticParams::small()
        };
        let f = generate(&p, 9);
        for ma in &f.microaneurysms {
            let ring = mean(&ring_green(
                &f.image,
                ma.x,
                ma.y,
                2.0 * ma.radius,
                3.0 * ma.radius,
            ));
            let drop = ring - green(&f.image, ma.x, ma.y);
            assert!(
                (15.0..50.0).contains(&drop),
                "green drop {drop:.1} at {ma:?}"
            );
        }
    }

    #[test]
    fn degenerate_params_do_not_panic() {
        let cases = [
            SyntheticParams {
                n_microaneurysms: 0,
                n_lookalikes: 0,
                ..SyntheticParams::small()
            },
            SyntheticParams {
                width: 64,
                height: 48,
                fov_diameter: 60.0,
                ..SyntheticParams::small()
            },
            SyntheticParams {
                width: 1,
                height: 1,
                fov_diameter: 0.0,
                ..SyntheticParams::small()
            },
            SyntheticParams {
                width: 0,
                height: 0,
                ..SyntheticParams::small()
            },
            SyntheticParams {
                n_microaneurysms: 500,
                ..SyntheticParams::small()
            },
        ];
        for p in &cases {
            let f = generate(p, 0);
            assert_eq!(f.image.dimensions(), (p.width, p.height));
            assert!(f.microaneurysms.len() <= p.n_microaneurysms);
            assert!(f.lookalikes.len() <= p.n_lookalikes);
        }
    }
}
