//! An in-memory RGB picture that embedded-graphics draws into.

use std::convert::Infallible;

use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;

/// A `width` x `height` RGB8 picture, rows top to bottom, 3 bytes per pixel.
///
/// Stored as packed RGB bytes (not `Vec<Rgb888>`) so that it becomes an
/// [`image::RgbImage`] without conversion and the framebuffer copy reads plain bytes.
/// Drawing outside the picture is clipped, never a panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canvas {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Canvas {
    /// A black canvas.
    pub fn new(width: u32, height: u32) -> Self {
        Canvas {
            width,
            height,
            rgb: vec![0; width as usize * height as usize * 3],
        }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// `(width, height)`, as [`super::Panel::size`] reports it.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Packed RGB bytes, row after row, no padding.
    pub fn as_rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// The colour at `(x, y)`, or `None` outside the canvas.
    pub fn pixel(&self, x: i32, y: i32) -> Option<Rgb888> {
        let i = self.index(Point::new(x, y))?;
        Some(Rgb888::new(self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]))
    }

    pub fn to_image(&self) -> image::RgbImage {
        self.clone().into_image()
    }

    pub fn into_image(self) -> image::RgbImage {
        image::RgbImage::from_raw(self.width, self.height, self.rgb)
            .expect("the buffer holds exactly width * height * 3 bytes")
    }

    /// Byte offset of a point, or `None` outside the canvas.
    fn index(&self, p: Point) -> Option<usize> {
        let (x, y) = (u32::try_from(p.x).ok()?, u32::try_from(p.y).ok()?);
        (x < self.width && y < self.height)
            .then(|| (y as usize * self.width as usize + x as usize) * 3)
    }

    fn put(&mut self, i: usize, c: Rgb888) {
        self.rgb[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Infallible>
    where
        I: IntoIterator<Item = Pixel<Rgb888>>,
    {
        for Pixel(p, c) in pixels {
            if let Some(i) = self.index(p) {
                self.put(i, c);
            }
        }
        Ok(())
    }

    /// Row-wise copy of the visible part; the colours of clipped pixels are skipped
    /// (the iterator runs row-major over the whole `area`, as the trait defines).
    fn fill_contiguous<I>(&mut self, area: &Rectangle, colors: I) -> Result<(), Infallible>
    where
        I: IntoIterator<Item = Rgb888>,
    {
        let visible = area.intersection(&self.bounding_box());
        if visible.is_zero_sized() {
            return Ok(());
        }
        let area_w = area.size.width as usize;
        let skip_left = (visible.top_left.x - area.top_left.x) as usize;
        let vis_w = visible.size.width as usize;
        let skip_right = area_w - skip_left - vis_w;
        let mut colors = colors.into_iter();
        // Rows above the canvas.
        let rows_above = (visible.top_left.y - area.top_left.y) as usize;
        skip(&mut colors, rows_above * area_w);
        for y in visible.rows() {
            skip(&mut colors, skip_left);
            let start = self
                .index(Point::new(visible.top_left.x, y))
                .expect("visible rows lie inside the canvas");
            for (px, c) in self.rgb[start..start + vis_w * 3]
                .chunks_exact_mut(3)
                .zip(colors.by_ref())
            {
                px.copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
            skip(&mut colors, skip_right);
        }
        // Rows below the canvas are never read.
        Ok(())
    }

    fn fill_solid(&mut self, area: &Rectangle, color: Rgb888) -> Result<(), Infallible> {
        let visible = area.intersection(&self.bounding_box());
        if visible.is_zero_sized() {
            return Ok(());
        }
        let vis_w = visible.size.width as usize;
        let px = [color.r(), color.g(), color.b()];
        for y in visible.rows() {
            let start = self
                .index(Point::new(visible.top_left.x, y))
                .expect("visible rows lie inside the canvas");
            for dst in self.rgb[start..start + vis_w * 3].chunks_exact_mut(3) {
                dst.copy_from_slice(&px);
            }
        }
        Ok(())
    }
}

/// Drop the next `n` items.
fn skip<I: Iterator>(iter: &mut I, n: usize) {
    if n > 0 {
        iter.nth(n - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::primitives::{Circle, PrimitiveStyle};

    const RED: Rgb888 = Rgb888::new(255, 0, 0);

    #[test]
    fn drawing_outside_is_clipped() {
        let mut c = Canvas::new(10, 6);
        // Pixels all around and far outside, including extreme coordinates.
        c.draw_iter([
            Pixel(Point::new(-1, 0), RED),
            Pixel(Point::new(10, 0), RED),
            Pixel(Point::new(0, 6), RED),
            Pixel(Point::new(i32::MIN, i32::MAX), RED),
            Pixel(Point::new(9, 5), RED),
        ])
        .unwrap();
        assert_eq!(c.pixel(9, 5), Some(RED));
        assert_eq!(c.as_rgb().iter().filter(|&&b| b != 0).count(), 1);
        // Primitives straddling every edge.
        Circle::new(Point::new(-20, -20), 100)
            .into_styled(PrimitiveStyle::with_fill(RED))
            .draw(&mut c)
            .unwrap();
        assert!(c.as_rgb().chunks(3).all(|p| p == [255, 0, 0]));
        // Entirely above, then overhanging the right edge.
        c.fill_solid(
            &Rectangle::new(Point::new(5, -3), Size::new(100, 3)),
            Rgb888::WHITE,
        )
        .unwrap();
        assert!(c.as_rgb().chunks(3).all(|p| p == [255, 0, 0]));
        c.fill_solid(
            &Rectangle::new(Point::new(8, 5), Size::new(100, 3)),
            Rgb888::WHITE,
        )
        .unwrap();
        assert_eq!(c.pixel(8, 5), Some(Rgb888::WHITE));
        assert_eq!(c.pixel(9, 5), Some(Rgb888::WHITE));
        assert_eq!(c.pixel(7, 5), Some(RED));
        assert_eq!(c.pixel(-1, 0), None);
        assert_eq!(c.pixel(10, 0), None);
    }

    #[test]
    fn fill_contiguous_skips_clipped_colours() {
        // A 4x3 area hanging over the top-left corner by 1 column and 1 row: colour
        // k goes to area position (k % 4, k / 4).
        let mut c = Canvas::new(3, 3);
        let area = Rectangle::new(Point::new(-1, -1), Size::new(4, 3));
        c.fill_contiguous(&area, (0..12u8).map(|k| Rgb888::new(k, 0, 0)))
            .unwrap();
        for y in 0..3 {
            for x in 0..3 {
                let expected = if y < 2 { (y + 1) * 4 + (x + 1) } else { 0 };
                assert_eq!(c.pixel(x, y).unwrap().r() as i32, expected, "({x}, {y})");
            }
        }
        // Entirely outside: nothing happens.
        let far = Rectangle::new(Point::new(50, 50), Size::new(2, 2));
        c.fill_contiguous(&far, std::iter::repeat(RED)).unwrap();
        c.fill_solid(&far, RED).unwrap();
        assert!(c.as_rgb().chunks(3).all(|p| p != [255, 0, 0]));
    }

    #[test]
    fn fill_matches_per_pixel_drawing() {
        let area = Rectangle::new(Point::new(2, -2), Size::new(9, 5));
        let colours = |i: u32| Rgb888::new(i as u8, (i * 3) as u8, 7);
        let mut fast = Canvas::new(8, 4);
        fast.fill_contiguous(&area, (0..45).map(colours)).unwrap();
        let mut slow = Canvas::new(8, 4);
        slow.draw_iter(area.points().zip(0..).map(|(p, i)| Pixel(p, colours(i))))
            .unwrap();
        assert_eq!(fast, slow);
    }

    #[test]
    fn converts_to_an_image() {
        let mut c = Canvas::new(4, 2);
        c.draw_iter([Pixel(Point::new(3, 1), Rgb888::new(1, 2, 3))])
            .unwrap();
        let img = c.into_image();
        assert_eq!(img.dimensions(), (4, 2));
        assert_eq!(img.get_pixel(3, 1).0, [1, 2, 3]);
    }
}
