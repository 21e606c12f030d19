//! The Linux framebuffer (`/dev/fbN`) as a [`Panel`].
//!
//! The pixel packing ([`pack_pixels`]) is a pure function over plain bytes because CI
//! machines have no framebuffer: it is what the tests cover, and the device-side code
//! around it only reads the screen info and copies rows.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use framebuffer::{Bitfield, FixScreeninfo, Framebuffer, VarScreeninfo};

use super::{Canvas, Panel, check_canvas_size};

/// `FixScreeninfo::visual` values from `linux/fb.h` that hold colours directly in the
/// pixel (the others go through a palette, which we do not program).
const FB_VISUAL_TRUECOLOR: u32 = 2;
const FB_VISUAL_DIRECTCOLOR: u32 = 4;

/// Where one colour channel sits in a framebuffer pixel value (bit offset from the
/// least significant bit, and number of bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Channel {
    pub offset: u32,
    pub length: u32,
}

impl Channel {
    pub const fn new(offset: u32, length: u32) -> Self {
        Channel { offset, length }
    }

    fn mask(self) -> u32 {
        if self.length == 0 {
            0
        } else {
            (u32::MAX >> (32 - self.length)) << self.offset
        }
    }

    /// The pixel bits of 8-bit value `v` (rounded, so 255 is all ones at any length).
    fn encode(self, v: u8) -> u32 {
        let max = (1u32 << self.length) - 1;
        ((v as u32 * max + 127) / 255) << self.offset
    }
}

/// The memory layout of a framebuffer's pixels, from its screen info.
///
/// Pixel values are stored little-endian (framebuffers use the CPU's byte order, and
/// every target this runs on, aarch64 and x86_64, is little-endian), so XRGB8888
/// (`red.offset` 16, `blue.offset` 0) is B, G, R, X in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FbPixelFormat {
    /// 16, 24 or 32.
    pub bits_per_pixel: u32,
    pub red: Channel,
    pub green: Channel,
    pub blue: Channel,
    /// Alpha bits, written as all ones (opaque) so blending hardware shows the frame;
    /// length 0 when there are none.
    pub transp: Channel,
    /// Bytes from the start of one row to the next (`line_length`); rows may be padded.
    pub stride: usize,
}

impl FbPixelFormat {
    /// RGB565, the usual 16-bit panel format.
    pub const fn rgb565(stride: usize) -> Self {
        FbPixelFormat {
            bits_per_pixel: 16,
            red: Channel::new(11, 5),
            green: Channel::new(5, 6),
            blue: Channel::new(0, 5),
            transp: Channel::new(0, 0),
            stride,
        }
    }

    /// XRGB8888 (B, G, R, X in memory), the usual 32-bit format.
    pub const fn xrgb8888(stride: usize) -> Self {
        FbPixelFormat {
            bits_per_pixel: 32,
            red: Channel::new(16, 8),
            green: Channel::new(8, 8),
            blue: Channel::new(0, 8),
            transp: Channel::new(0, 0),
            stride,
        }
    }

    pub fn bytes_per_pixel(&self) -> usize {
        self.bits_per_pixel as usize / 8
    }

    /// The format of a framebuffer, or why we cannot draw on it.
    pub fn from_screen_info(var: &VarScreeninfo, fix: &FixScreeninfo) -> Result<Self> {
        ensure!(
            fix.visual == FB_VISUAL_TRUECOLOR || fix.visual == FB_VISUAL_DIRECTCOLOR,
            "visual type {} is not true colour (palette and monochrome modes are not supported)",
            fix.visual
        );
        ensure!(
            var.grayscale == 0,
            "greyscale/FOURCC mode ({}) is not supported",
            var.grayscale
        );
        let channel = |name: &str, b: &Bitfield| -> Result<Channel> {
            ensure!(
                b.msb_right == 0,
                "{name} channel has its most significant bit on the right"
            );
            Ok(Channel::new(b.offset, b.length))
        };
        let format = FbPixelFormat {
            bits_per_pixel: var.bits_per_pixel,
            red: channel("red", &var.red)?,
            green: channel("green", &var.green)?,
            blue: channel("blue", &var.blue)?,
            transp: channel("transparency", &var.transp)?,
            stride: fix.line_length as usize,
        };
        format.validate(var.xres)?;
        Ok(format)
    }

    /// Checks that rows of `width` pixels fit this layout.
    pub fn validate(&self, width: u32) -> Result<()> {
        ensure!(
            matches!(self.bits_per_pixel, 16 | 24 | 32),
            "{} bits per pixel is not supported (16, 24 or 32 are)",
            self.bits_per_pixel
        );
        let mut used = 0u32;
        for (name, c, min_len) in [
            ("red", self.red, 1),
            ("green", self.green, 1),
            ("blue", self.blue, 1),
            ("transparency", self.transp, 0),
        ] {
            ensure!(
                (min_len..=16).contains(&c.length)
                    && c.offset.saturating_add(c.length) <= self.bits_per_pixel,
                "{name} channel (offset {}, length {}) does not fit a {}-bit pixel",
                c.offset,
                c.length,
                self.bits_per_pixel
            );
            ensure!(
                used & c.mask() == 0,
                "{name} channel overlaps another channel"
            );
            used |= c.mask();
        }
        let row = width as usize * self.bytes_per_pixel();
        ensure!(
            self.stride >= row,
            "line length {} bytes is shorter than {width} pixels ({row} bytes)",
            self.stride
        );
        Ok(())
    }

    /// Bytes from the first pixel of the first row to the end of the last pixel of
    /// the last row (the last row needs no padding).
    pub fn frame_len(&self, width: u32, height: u32) -> usize {
        if width == 0 || height == 0 {
            0
        } else {
            (height as usize - 1) * self.stride + width as usize * self.bytes_per_pixel()
        }
    }
}

/// Converts packed RGB8 rows (`width` x `height`, as [`Canvas::as_rgb`]) into
/// framebuffer pixels in `out`, row `y` starting at `y * format.stride`. Padding bytes
/// between rows are left as they are.
pub fn pack_pixels(
    rgb: &[u8],
    width: u32,
    height: u32,
    format: &FbPixelFormat,
    out: &mut [u8],
) -> Result<()> {
    format.validate(width)?;
    let (w, h) = (width as usize, height as usize);
    ensure!(
        rgb.len() == w * h * 3,
        "{} RGB bytes for a {width}x{height} picture (expected {})",
        rgb.len(),
        w * h * 3
    );
    let needed = format.frame_len(width, height);
    ensure!(
        out.len() >= needed,
        "framebuffer memory is {} bytes, a {width}x{height} frame needs {needed}",
        out.len()
    );
    if needed == 0 {
        return Ok(());
    }
    // One table per channel: a pixel is three lookups and two ORs.
    let table = |c: Channel| -> [u32; 256] { std::array::from_fn(|v| c.encode(v as u8)) };
    let (tr, tg, tb) = (table(format.red), table(format.green), table(format.blue));
    let alpha = format.transp.mask();
    let pixel = |s: &[u8]| tr[s[0] as usize] | tg[s[1] as usize] | tb[s[2] as usize] | alpha;
    // The byte count as a constant, so each pixel's store compiles to one move.
    match format.bytes_per_pixel() {
        2 => pack_rows::<2>(rgb, w, format.stride, out, pixel),
        3 => pack_rows::<3>(rgb, w, format.stride, out, pixel),
        _ => pack_rows::<4>(rgb, w, format.stride, out, pixel),
    }
    Ok(())
}

fn pack_rows<const B: usize>(
    rgb: &[u8],
    width: usize,
    stride: usize,
    out: &mut [u8],
    pixel: impl Fn(&[u8]) -> u32,
) {
    for (src_row, dst_row) in rgb.chunks_exact(width * 3).zip(out.chunks_mut(stride)) {
        let dst_px = dst_row[..width * B].chunks_exact_mut(B);
        for (s, d) in src_row.chunks_exact(3).zip(dst_px) {
            d.copy_from_slice(&pixel(s).to_le_bytes()[..B]);
        }
    }
}

/// A Linux framebuffer device, memory-mapped.
///
/// Frames are packed into a private buffer, then copied row by row into the visible
/// area (at the current pan offset): the screen only ever sees whole rows of the new
/// frame, and padding or off-screen memory is never touched.
pub struct FramebufferSink {
    fb: Framebuffer,
    device: PathBuf,
    format: FbPixelFormat,
    width: u32,
    height: u32,
    /// Byte offset of the visible area's first pixel in the mapping.
    origin: usize,
    scratch: Vec<u8>,
}

impl FramebufferSink {
    /// Opens and maps `device` (e.g. `/dev/fb0`); the panel size is its visible
    /// resolution.
    pub fn open(device: impl AsRef<Path>) -> Result<Self> {
        let device = device.as_ref().to_path_buf();
        let fb = Framebuffer::new(&device)
            .with_context(|| format!("cannot open framebuffer {}", device.display()))?;
        let (var, fix) = (&fb.var_screen_info, &fb.fix_screen_info);
        let format = FbPixelFormat::from_screen_info(var, fix).with_context(|| {
            format!(
                "framebuffer {} ({} bpp) has an unsupported pixel format",
                device.display(),
                var.bits_per_pixel
            )
        })?;
        let (width, height) = (var.xres, var.yres);
        let origin =
            var.yoffset as usize * format.stride + var.xoffset as usize * format.bytes_per_pixel();
        let needed = format.frame_len(width, height);
        if origin + needed > fb.frame.len() {
            bail!(
                "framebuffer {}: the visible {width}x{height} area at offset ({}, {}) lies \
                 outside the {} mapped bytes",
                device.display(),
                var.xoffset,
                var.yoffset,
                fb.frame.len()
            );
        }
        Ok(FramebufferSink {
            fb,
            device,
            format,
            width,
            height,
            origin,
            scratch: vec![0; needed],
        })
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    pub fn format(&self) -> &FbPixelFormat {
        &self.format
    }
}

impl Panel for FramebufferSink {
    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn present(&mut self, canvas: &Canvas) -> Result<()> {
        let name = format!("framebuffer {}", self.device.display());
        check_canvas_size(&name, self.size(), canvas)?;
        pack_pixels(
            canvas.as_rgb(),
            self.width,
            self.height,
            &self.format,
            &mut self.scratch,
        )
        .with_context(|| format!("cannot draw on {name}"))?;
        let row = self.width as usize * self.format.bytes_per_pixel();
        let stride = self.format.stride;
        for y in 0..self.height as usize {
            let start = y * stride;
            let dst = self.origin + start;
            self.fb.frame[dst..dst + row].copy_from_slice(&self.scratch[start..start + row]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2x2 picture: red, green / blue, white.
    const RGB: [u8; 12] = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
    const PAD: u8 = 0xAA;

    fn pack(format: &FbPixelFormat) -> Vec<u8> {
        let mut out = vec![PAD; format.stride * 2];
        pack_pixels(&RGB, 2, 2, format, &mut out).unwrap();
        out
    }

    #[test]
    fn packs_rgb565_with_padded_rows() {
        let out = pack(&FbPixelFormat::rgb565(6));
        // 0xF800, 0x07E0, 2 padding bytes / 0x001F, 0xFFFF, padding.
        assert_eq!(
            out,
            [
                0x00, 0xF8, 0xE0, 0x07, PAD, PAD, //
                0x1F, 0x00, 0xFF, 0xFF, PAD, PAD
            ]
        );
        // Rounded, not truncated: mid grey 128 -> 16/31 red and blue, 32/63 green.
        let mut grey = [0u8; 2];
        pack_pixels(&[128; 3], 1, 1, &FbPixelFormat::rgb565(2), &mut grey).unwrap();
        assert_eq!(u16::from_le_bytes(grey), (16 << 11) | (32 << 5) | 16);
    }

    #[test]
    fn packs_24bpp_in_either_channel_order() {
        let bgr = FbPixelFormat {
            bits_per_pixel: 24,
            red: Channel::new(16, 8),
            green: Channel::new(8, 8),
            blue: Channel::new(0, 8),
            transp: Channel::default(),
            stride: 7,
        };
        assert_eq!(
            pack(&bgr),
            [
                0, 0, 255, 0, 255, 0, PAD, //
                255, 0, 0, 255, 255, 255, PAD
            ]
        );
        let rgb = FbPixelFormat {
            red: Channel::new(0, 8),
            blue: Channel::new(16, 8),
            ..bgr
        };
        assert_eq!(
            pack(&rgb),
            [
                255, 0, 0, 0, 255, 0, PAD, //
                0, 0, 255, 255, 255, 255, PAD
            ]
        );
    }

    #[test]
    fn packs_32bpp_xrgb_argb_and_rgbx() {
        let xrgb = FbPixelFormat::xrgb8888(8);
        assert_eq!(
            pack(&xrgb),
            [
                0, 0, 255, 0, 0, 255, 0, 0, //
                255, 0, 0, 0, 255, 255, 255, 0
            ]
        );
        // With an alpha channel the pixels must be opaque.
        let argb = FbPixelFormat {
            transp: Channel::new(24, 8),
            ..xrgb
        };
        assert_eq!(pack(&argb)[..8], [0, 0, 255, 255, 0, 255, 0, 255]);
        // Red in the lowest byte (R, G, B, X in memory), with row padding.
        let rgbx = FbPixelFormat {
            red: Channel::new(0, 8),
            blue: Channel::new(16, 8),
            stride: 12,
            ..xrgb
        };
        let out = pack(&rgbx);
        assert_eq!(out[..8], [255, 0, 0, 0, 0, 255, 0, 0]);
        assert_eq!(out[8..12], [PAD; 4]);
        assert_eq!(out[12..20], [0, 0, 255, 0, 255, 255, 255, 0]);
    }

    fn screen_info(bpp: u32, line_length: u32) -> (VarScreeninfo, FixScreeninfo) {
        let field = |offset, length| Bitfield {
            offset,
            length,
            msb_right: 0,
        };
        let var = VarScreeninfo {
            xres: 800,
            yres: 480,
            bits_per_pixel: bpp,
            red: field(16, 8),
            green: field(8, 8),
            blue: field(0, 8),
            ..Default::default()
        };
        let fix = FixScreeninfo {
            line_length,
            visual: FB_VISUAL_TRUECOLOR,
            ..Default::default()
        };
        (var, fix)
    }

    #[test]
    fn reads_the_format_from_screen_info() {
        let (var, fix) = screen_info(32, 3200);
        assert_eq!(
            FbPixelFormat::from_screen_info(&var, &fix).unwrap(),
            FbPixelFormat::xrgb8888(3200)
        );
    }

    #[test]
    fn rejects_layouts_we_cannot_draw() {
        let reject = |var: &VarScreeninfo, fix: &FixScreeninfo, why: &str| {
            let err = FbPixelFormat::from_screen_info(var, fix).unwrap_err();
            assert!(format!("{err:#}").contains(why), "{err:#} lacks {why:?}");
        };
        let (var, fix) = screen_info(8, 800);
        reject(&var, &fix, "8 bits per pixel");
        let (var, fix) = screen_info(32, 3000);
        reject(&var, &fix, "line length 3000");
        let (mut var, fix) = screen_info(32, 3200);
        var.green.offset = 12;
        reject(&var, &fix, "overlaps");
        let (mut var, fix) = screen_info(16, 1600);
        var.red.offset = 11;
        reject(&var, &fix, "does not fit a 16-bit pixel");
        let (var, mut fix) = screen_info(32, 3200);
        fix.visual = 3; // pseudocolour
        reject(&var, &fix, "visual type 3");
    }

    #[test]
    fn rejects_wrong_buffer_sizes() {
        let f = FbPixelFormat::xrgb8888(8);
        assert!(pack_pixels(&RGB, 2, 2, &f, &mut [0; 15]).is_err());
        assert!(pack_pixels(&RGB[..9], 2, 2, &f, &mut [0; 16]).is_err());
        // The last row needs no padding.
        assert!(pack_pixels(&RGB, 2, 2, &f, &mut [0; 16]).is_ok());
    }

    #[test]
    fn open_errors_name_the_device() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("fb7");
        let err = FramebufferSink::open(&missing).err().unwrap();
        assert!(
            format!("{err:#}").contains(&*missing.to_string_lossy()),
            "{err:#}"
        );
        // A regular file opens but is no framebuffer (the ioctl fails).
        let plain = tmp.path().join("fb8");
        std::fs::write(&plain, [0u8; 64]).unwrap();
        let err = FramebufferSink::open(&plain).err().unwrap();
        assert!(
            format!("{err:#}").contains(&*plain.to_string_lossy()),
            "{err:#}"
        );
    }
}
