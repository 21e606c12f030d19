//! Camera buffers (YUYV or MJPEG bytes) to RGB: pure functions, no device I/O, so they
//! are tested on recorded buffers.

use std::borrow::Cow;
use std::fmt;
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use image::codecs::jpeg::JpegDecoder;
use image::{ImageDecoder, ImageFormat, RgbImage};

pub use ma_core::image_io::{JpegLayout, scan_markers};
use ma_core::image_io::{MAX_SIDE, decode_known, one_line};

/// The two formats UVC cameras commonly offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// Packed 4:2:2 `Y0 U Y1 V`, 2 bytes per pixel (V4L2 `YUYV`).
    Yuyv,
    /// One JPEG per frame (V4L2 `MJPG`), often without Huffman tables.
    Mjpeg,
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PixelFormat::Yuyv => "YUYV",
            PixelFormat::Mjpeg => "MJPEG",
        })
    }
}

impl FromStr for PixelFormat {
    type Err = anyhow::Error;
    /// "yuyv" or "mjpeg" (also "mjpg"), any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "yuyv" | "yuy2" => Ok(PixelFormat::Yuyv),
            "mjpeg" | "mjpg" => Ok(PixelFormat::Mjpeg),
            _ => bail!("unknown pixel format {s:?} (use yuyv or mjpeg)"),
        }
    }
}

/// One buffer as the camera delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes from the start of one row to the next (V4L2 `bytesperline`); 0 means
    /// "packed" (2 x width for YUYV). Ignored for MJPEG.
    pub stride: u32,
    /// YUYV rows, or the JPEG bytes (only the used part of the buffer).
    pub bytes: Vec<u8>,
}

impl RawFrame {
    /// Load a recorded buffer; the file holds only the bytes, so the caller gives the
    /// format and geometry.
    pub fn read_file(
        path: &Path,
        format: PixelFormat,
        width: u32,
        height: u32,
        stride: u32,
    ) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read recorded frame {}", path.display()))?;
        Ok(Self {
            format,
            width,
            height,
            stride,
            bytes,
        })
    }
}

/// Decode a camera buffer to RGB. Errors say what is wrong with the buffer (size,
/// stride, corrupt JPEG); the caller adds which device it came from.
pub fn decode_raw(frame: &RawFrame) -> Result<RgbImage> {
    let (w, h) = (frame.width, frame.height);
    if w == 0 || h == 0 {
        bail!("{} frame has zero size ({w}x{h})", frame.format);
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        bail!(
            "{} frame is {w}x{h}, larger than the {MAX_SIDE} px limit per side",
            frame.format
        );
    }
    match frame.format {
        PixelFormat::Yuyv => decode_yuyv(&frame.bytes, w, h, frame.stride),
        PixelFormat::Mjpeg => decode_mjpeg(&frame.bytes, w, h),
    }
    .with_context(|| format!("cannot decode {} {w}x{h} frame", frame.format))
}

/// YUYV 4:2:2 with BT.601 limited-range coefficients (what UVC cameras send), in
/// integer arithmetic. Rows are `stride` bytes apart; bytes past the last row's pixels
/// are ignored (drivers may pad the buffer).
fn decode_yuyv(bytes: &[u8], width: u32, height: u32, stride: u32) -> Result<RgbImage> {
    if !width.is_multiple_of(2) {
        bail!("YUYV width must be even (two pixels share U and V), got {width}");
    }
    let row_bytes = width as usize * 2;
    let stride = if stride == 0 {
        row_bytes
    } else {
        stride as usize
    };
    if stride < row_bytes {
        bail!("stride {stride} is less than the {row_bytes} bytes of a row (2 x width)");
    }
    let needed = stride * (height as usize - 1) + row_bytes;
    if bytes.len() < needed {
        bail!(
            "buffer is {} bytes, {width}x{height} YUYV with stride {stride} needs {needed}",
            bytes.len()
        );
    }
    let mut out = vec![0u8; width as usize * height as usize * 3];
    for (y, out_row) in out.chunks_exact_mut(row_bytes / 2 * 3).enumerate() {
        let row = &bytes[y * stride..y * stride + row_bytes];
        for (quad, px) in row.chunks_exact(4).zip(out_row.chunks_exact_mut(6)) {
            let (u, v) = (quad[1], quad[3]);
            px[..3].copy_from_slice(&yuv_to_rgb(quad[0], u, v));
            px[3..].copy_from_slice(&yuv_to_rgb(quad[2], u, v));
        }
    }
    RgbImage::from_raw(width, height, out).context("internal error: RGB buffer size")
}

/// BT.601 limited range (Y 16..235, Cb/Cr 16..240) to full-range RGB, 8-bit fixed point.
pub fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = 298 * (y as i32 - 16);
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clip = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        clip(c + 409 * e),
        clip(c - 100 * d - 208 * e),
        clip(c + 516 * d),
    ]
}

const SOI: u8 = 0xD8;
const DHT: u8 = 0xC4;

/// Decode one MJPEG frame, inserting the standard Huffman tables when it has none.
fn decode_mjpeg(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage> {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != SOI {
        bail!(
            "not a JPEG (no start-of-image marker; {} bytes)",
            bytes.len()
        );
    }
    let layout = scan_markers(bytes)?;
    // A USB transfer error otherwise yields a grey-filled frame.
    if !layout.scan_complete(bytes) {
        bail!("MJPEG frame is truncated (no end-of-image marker after the image data)");
    }
    let jpeg: Cow<[u8]> = if layout.has_dht {
        Cow::Borrowed(bytes)
    } else {
        Cow::Owned(insert_standard_dht(bytes, layout.sos))
    };

    let decoder = JpegDecoder::new(Cursor::new(&jpeg[..]))
        .map_err(|e| anyhow::anyhow!("{}", one_line(&e.to_string())))
        .context("cannot read JPEG header")?;
    let (jw, jh) = decoder.dimensions();
    if (jw, jh) != (width, height) {
        bail!("JPEG inside is {jw}x{jh}, the frame format says {width}x{height}");
    }
    decode_known(&jpeg, ImageFormat::Jpeg, width, height).context("corrupt JPEG data")
}

/// Copy of `jpeg` with the JPEG Annex K (K.3-K.6) Huffman tables inserted before the
/// scan at `sos`: the tables the MJPEG (AVI1) convention leaves out of every frame.
pub fn insert_standard_dht(jpeg: &[u8], sos: usize) -> Vec<u8> {
    let tables: [(u8, &[u8; 16], &[u8]); 4] = [
        (0x00, &LUMA_DC_BITS, &DC_VALUES),
        (0x10, &LUMA_AC_BITS, &LUMA_AC_VALUES),
        (0x01, &CHROMA_DC_BITS, &DC_VALUES),
        (0x11, &CHROMA_AC_BITS, &CHROMA_AC_VALUES),
    ];
    let len: usize = 2 + tables.iter().map(|(_, _, v)| 17 + v.len()).sum::<usize>();
    let mut out = Vec::with_capacity(jpeg.len() + len + 2);
    out.extend_from_slice(&jpeg[..sos]);
    out.extend_from_slice(&[0xFF, DHT]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    for (class_id, bits, values) in tables {
        out.push(class_id);
        out.extend_from_slice(bits);
        out.extend_from_slice(values);
    }
    out.extend_from_slice(&jpeg[sos..]);
    out
}

// JPEG standard (ITU T.81) Annex K.3-K.6: code counts per length 1..16, then symbols.
const LUMA_DC_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
const CHROMA_DC_BITS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
const DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
const LUMA_AC_BITS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D];
const LUMA_AC_VALUES: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7,
    0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5,
    0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2,
    0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];
const CHROMA_AC_BITS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
const CHROMA_AC_VALUES: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33, 0x52, 0xF0,
    0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18, 0x19, 0x1A, 0x26,
    0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5,
    0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3,
    0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA,
    0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, codecs::jpeg::JpegEncoder};

    fn yuyv(width: u32, height: u32, stride: u32, bytes: Vec<u8>) -> RawFrame {
        RawFrame {
            format: PixelFormat::Yuyv,
            width,
            height,
            stride,
            bytes,
        }
    }

    fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
        a.iter()
            .zip(b)
            .all(|(&x, y)| (x as i32 - y as i32).abs() <= tol)
    }

    #[test]
    fn bt601_limited_range_reference_colours() {
        // (Y, Cb, Cr) of 100% colour bars in BT.601 limited range, and their RGB.
        let bars = [
            ((235, 128, 128), [255, 255, 255]),
            ((16, 128, 128), [0, 0, 0]),
            ((81, 90, 240), [255, 0, 0]),
            ((145, 54, 34), [0, 255, 0]),
            ((41, 240, 110), [0, 0, 255]),
            ((210, 16, 146), [255, 255, 0]),
            ((126, 128, 128), [128, 128, 128]),
        ];
        for ((y, u, v), rgb) in bars {
            let got = yuv_to_rgb(y, u, v);
            assert!(
                close(got, rgb, 2),
                "{:?} -> {got:?}, want {rgb:?}",
                (y, u, v)
            );
        }
        // Out-of-range inputs clip instead of wrapping.
        assert_eq!(yuv_to_rgb(255, 255, 255)[0], 255);
        assert_eq!(yuv_to_rgb(0, 0, 0), [0, 135, 0]);
    }

    #[test]
    fn yuyv_pixel_pairs_share_chroma_and_padding_is_skipped() {
        // 2x2 image, stride 6 (2 bytes of padding per row, filled with junk).
        let bytes = vec![
            235, 128, 16, 128, 0xEE, 0xEE, // white, black
            81, 90, 81, 240, 0xEE, 0xEE, // red, red
        ];
        let img = decode_raw(&yuyv(2, 2, 6, bytes)).unwrap();
        assert_eq!(img.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(img.get_pixel(1, 0), &Rgb([0, 0, 0]));
        assert!(close(img.get_pixel(1, 1).0, [255, 0, 0], 2));
        // The last row needs no padding.
        let bytes = vec![235, 128, 16, 128, 0xEE, 0xEE, 81, 90, 81, 240];
        assert!(decode_raw(&yuyv(2, 2, 6, bytes)).is_ok());
    }

    #[test]
    fn bad_yuyv_buffers_are_errors() {
        let err = |f: RawFrame| format!("{:#}", decode_raw(&f).unwrap_err());
        let e = err(yuyv(64, 48, 0, vec![0; 64 * 48 * 2 - 1]));
        assert!(e.contains("6143 bytes") && e.contains("needs 6144"), "{e}");
        assert!(err(yuyv(64, 48, 100, vec![0; 64 * 48 * 2])).contains("stride 100"));
        assert!(err(yuyv(63, 48, 0, vec![0; 63 * 48 * 2])).contains("even"));
        assert!(err(yuyv(0, 48, 0, vec![])).contains("zero size"));
        assert!(err(yuyv(20_000, 2, 0, vec![0; 80_000])).contains("larger than"));
    }

    fn test_jpeg(w: u32, h: u32) -> (RgbImage, Vec<u8>) {
        let img = RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 100])
        });
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 95)
            .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        (img, out)
    }

    /// Drop every DHT segment, as many UVC cameras send their frames.
    fn strip_dht(jpeg: &[u8]) -> Vec<u8> {
        let sos = scan_markers(jpeg).unwrap().sos;
        let mut out = jpeg[..2].to_vec();
        let mut i = 2;
        while i < sos {
            let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
            if jpeg[i + 1] != DHT {
                out.extend_from_slice(&jpeg[i..i + 2 + len]);
            }
            i += 2 + len;
        }
        out.extend_from_slice(&jpeg[sos..]);
        out
    }

    fn mjpeg(w: u32, h: u32, bytes: Vec<u8>) -> RawFrame {
        RawFrame {
            format: PixelFormat::Mjpeg,
            width: w,
            height: h,
            stride: 0,
            bytes,
        }
    }

    #[test]
    fn mjpeg_without_huffman_tables_decodes_like_the_original() {
        let (img, jpeg) = test_jpeg(64, 48);
        let stripped = strip_dht(&jpeg);
        assert!(scan_markers(&jpeg).unwrap().has_dht);
        assert!(!scan_markers(&stripped).unwrap().has_dht);
        // The decoder alone cannot read it (no AVI1 marker to make it assume the tables).
        assert!(image::load_from_memory(&stripped).is_err());

        let with = decode_raw(&mjpeg(64, 48, jpeg)).unwrap();
        let without = decode_raw(&mjpeg(64, 48, stripped)).unwrap();
        assert_eq!(with, without);
        for (a, b) in with.pixels().zip(img.pixels()) {
            assert!(close(a.0, b.0, 12), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn bad_mjpeg_frames_are_errors() {
        let (_, jpeg) = test_jpeg(64, 48);
        let err = |f: RawFrame| format!("{:#}", decode_raw(&f).unwrap_err());
        assert!(err(mjpeg(64, 48, vec![])).contains("not a JPEG"));
        assert!(err(mjpeg(64, 48, b"not a jpeg at all".to_vec())).contains("not a JPEG"));
        assert!(err(mjpeg(64, 48, jpeg[..jpeg.len() - 40].to_vec())).contains("truncated"));
        assert!(err(mjpeg(64, 48, jpeg[..100].to_vec())).contains("JPEG"));
        assert!(err(mjpeg(32, 48, jpeg.clone())).contains("64x48"));
        let mut corrupt = jpeg.clone();
        corrupt[2] = 0x00;
        assert!(err(mjpeg(64, 48, corrupt)).contains("corrupt JPEG header"));
    }

    #[test]
    fn pixel_format_names_parse() {
        assert_eq!("MJPG".parse::<PixelFormat>().unwrap(), PixelFormat::Mjpeg);
        assert_eq!("yuyv".parse::<PixelFormat>().unwrap(), PixelFormat::Yuyv);
        assert!("rgb".parse::<PixelFormat>().is_err());
    }
}
