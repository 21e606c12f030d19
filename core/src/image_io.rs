//! Reading fundus images from files or bytes, checked before anything large is allocated.
//!
//! Every accepted image becomes 8-bit RGB: 16-bit samples are scaled down, grey is
//! replicated, alpha is dropped. Everything else is a clear error, never a panic.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result, bail};
use image::{ImageFormat, ImageReader, Limits, RgbImage};

/// Smallest accepted side: a fundus photo smaller than this cannot show MAs.
pub const MIN_SIDE: u32 = 256;
/// Largest accepted side, checked from the header before decoding.
pub const MAX_SIDE: u32 = 12_000;
/// File name extensions searched for in folders (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "tif", "tiff", "bmp", "ppm"];

/// True when `path` has one of [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|k| k.eq_ignore_ascii_case(e)))
}

/// Every image file below `dir` (recursively), in sorted path order.
pub fn find_images(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Folders already searched, by canonical path: a symlink back up the tree (or two
    // links to one folder) would otherwise loop forever or list images twice.
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        let canonical = d
            .canonicalize()
            .with_context(|| format!("cannot resolve folder {}", d.display()))?;
        if !seen.insert(canonical) {
            continue;
        }
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot list folder {}", d.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list folder {}", d.display()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .with_context(|| format!("cannot stat {}", path.display()))?;
            // Follow symlinks to folders too: field data is often linked in.
            if kind.is_dir() || (kind.is_symlink() && path.is_dir()) {
                stack.push(path);
            } else if has_image_extension(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Read and decode an image file. Errors name the file.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    Ok(read_image_and_bytes(path)?.0)
}

/// [`read_image`], also returning the file's bytes (to hash them, say).
pub fn read_image_and_bytes(path: &Path) -> Result<(RgbImage, Vec<u8>)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Opening a FIFO or a device named *.png would block or never end.
    if !meta.is_file() {
        bail!(
            "cannot read {}: not a regular file (a folder, FIFO, socket or device)",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let image = decode_image(&bytes).with_context(|| format!("{}", path.display()))?;
    Ok((image, bytes))
}

/// Decode an image from memory (format guessed from its content, not its name).
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        bail!("empty file (0 bytes)");
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot read image header")?;
    // Reading the header reads a PNG's chunks up to the image data, colour profile
    // included: bound that too (the reader's default allows 512 MiB). The size limits
    // are ours to check, with our message.
    let mut header_limits = Limits::no_limits();
    header_limits.max_alloc = Some(METADATA_BUDGET);
    reader.limits(header_limits);
    let Some(format) = reader.format() else {
        bail!("not an image in a supported format (PNG, JPEG, TIFF, BMP, PPM)");
    };
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::Tiff
            | ImageFormat::Bmp
            | ImageFormat::Pnm
    ) {
        bail!("unsupported image format {format:?} (PNG, JPEG, TIFF, BMP, PPM are supported)");
    }
    let (width, height) = reader
        .into_dimensions()
        .context("cannot read image header")?;
    check_size(width, height)?;
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }

    decode_known(bytes, format, width, height)
        .context("cannot decode image (truncated or corrupt?)")
}

/// Decode `bytes` of `format` whose header says `width` x `height`: within the memory
/// that size needs ([`decode_limits`]), and refused unless the decoder produced exactly
/// that size (some report a header size that differs from what they produce). The
/// caller has checked the size ([`check_size`]) and adds what was being decoded.
pub fn decode_known(
    bytes: &[u8],
    format: ImageFormat,
    width: u32,
    height: u32,
) -> Result<RgbImage> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decode_limits(width, height));
    let img = reader
        .decode()
        .map_err(|e| anyhow::anyhow!("{}", one_line(&e.to_string())))?;
    if (img.width(), img.height()) != (width, height) {
        bail!(
            "decoded size {}x{} differs from header size {width}x{height}",
            img.width(),
            img.height()
        );
    }
    Ok(img.to_rgb8())
}

/// Metadata a decoder may hold besides the pixels (colour profile, text chunks).
const METADATA_BUDGET: u64 = 16 << 20;

/// The decoder limits for an image whose header says `width` x `height` (already
/// checked against [`MAX_SIDE`]): memory in proportion to the image, not to what its
/// metadata claims. Twice the picture at its widest layout (16-bit RGBA: the picture,
/// and room for one intermediate buffer as large, e.g. a TIFF strip) plus
/// [`METADATA_BUDGET`], and never more than a 16-bit RGBA picture at the size limit.
///
/// Without a per-image budget, a 512-px PNG whose colour profile (iCCP chunk) inflates
/// to 1 GiB was decoded in 1.07 GB. Over the budget, the PNG decoder drops the profile
/// (nothing here uses it) and decodes the pixels; other decoders fail with a limit
/// error.
pub fn decode_limits(width: u32, height: u32) -> Limits {
    let picture = u64::from(width) * u64::from(height) * 8;
    let cap = u64::from(MAX_SIDE) * u64::from(MAX_SIDE) * 8 + (1 << 20);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some((2 * picture + METADATA_BUDGET).min(cap));
    limits
}

fn check_size(width: u32, height: u32) -> Result<()> {
    if width == 0 || height == 0 {
        bail!("image has zero size ({width}x{height})");
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        bail!("image is {width}x{height}, larger than the {MAX_SIDE} px limit per side");
    }
    if width < MIN_SIDE || height < MIN_SIDE {
        bail!("image is {width}x{height}, smaller than the {MIN_SIDE} px minimum per side");
    }
    Ok(())
}

/// A JPEG file whose scan was cut off decodes "successfully" with grey: refuse it.
fn check_jpeg_complete(bytes: &[u8]) -> Result<()> {
    if !scan_markers(bytes)?.scan_complete(bytes) {
        bail!("JPEG is truncated (no end-of-image marker after the image data)");
    }
    Ok(())
}

const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const DHT: u8 = 0xC4;

/// Where the first scan starts and whether Huffman tables come before it.
#[derive(Debug, PartialEq, Eq)]
pub struct JpegLayout {
    /// Offset of the first start-of-scan marker (FF DA).
    pub sos: usize,
    /// A DHT segment (FF C4) appears before the first scan.
    pub has_dht: bool,
}

impl JpegLayout {
    /// The end-of-image marker follows the scan. Entropy-coded data cannot contain FF D9
    /// (0xFF bytes are stuffed), so finding it after SOS means the scan ended: decoders
    /// fill a truncated scan with grey and report success.
    pub fn scan_complete(&self, bytes: &[u8]) -> bool {
        bytes[self.sos..].windows(2).any(|w| w == [0xFF, EOI])
    }
}

/// Walk the marker segments from SOI to the first SOS.
pub fn scan_markers(bytes: &[u8]) -> Result<JpegLayout> {
    let mut has_dht = false;
    let mut i = 2; // after SOI
    loop {
        if i + 2 > bytes.len() {
            bail!("JPEG ends before its image data (no start-of-scan marker)");
        }
        if bytes[i] != 0xFF {
            bail!("corrupt JPEG header: expected a marker at byte {i}");
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1, // fill byte
            SOS => return Ok(JpegLayout { sos: i, has_dht }),
            EOI => bail!("JPEG ends before its image data (end-of-image before start-of-scan)"),
            0x01 | 0xD0..=0xD8 => i += 2, // markers without a length
            _ => {
                if i + 4 > bytes.len() {
                    bail!("JPEG header is truncated at byte {i}");
                }
                let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
                if len < 2 {
                    bail!("corrupt JPEG header: segment length {len} at byte {i}");
                }
                if marker == DHT {
                    has_dht = true;
                }
                i += 2 + len;
            }
        }
    }
}

/// Error texts go into one-line JSON fields: fold newlines.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb, Rgba};

    fn encode(img: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 40]))
    }

    #[test]
    fn decodes_every_supported_format_to_rgb8() {
        let img = image::DynamicImage::ImageRgb8(gradient(300, 260));
        for format in [
            ImageFormat::Png,
            ImageFormat::Tiff,
            ImageFormat::Bmp,
            ImageFormat::Pnm,
        ] {
            let decoded = decode_image(&encode(&img, format)).unwrap();
            assert_eq!(decoded, *img.as_rgb8().unwrap(), "{format:?}");
        }
        let jpeg = decode_image(&encode(&img, ImageFormat::Jpeg)).unwrap();
        assert_eq!(jpeg.dimensions(), (300, 260));
    }

    #[test]
    fn converts_16_bit_grey_and_alpha() {
        let grey16: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(256, 256, |x, _| Luma([(x * 257) as u16]));
        let out = decode_image(&encode(&grey16.into(), ImageFormat::Png)).unwrap();
        assert_eq!(out.get_pixel(255, 3), &Rgb([255, 255, 255]));
        assert_eq!(out.get_pixel(0, 3), &Rgb([0, 0, 0]));

        let rgba: ImageBuffer<Rgba<u8>, Vec<u8>> =
            ImageBuffer::from_pixel(256, 300, Rgba([10, 20, 30, 0]));
        let out = decode_image(&encode(&rgba.into(), ImageFormat::Png)).unwrap();
        assert_eq!(out.get_pixel(5, 5), &Rgb([10, 20, 30]));
    }

    #[test]
    fn rejects_bad_input_with_clear_errors() {
        let err = |bytes: &[u8]| format!("{:#}", decode_image(bytes).unwrap_err());
        assert!(err(&[]).contains("empty"));
        assert!(err(b"hello, this is not an image at all").contains("not an image"));

        let small = image::DynamicImage::ImageRgb8(gradient(100, 300));
        assert!(err(&encode(&small, ImageFormat::Png)).contains("smaller than"));

        let png = encode(
            &image::DynamicImage::ImageRgb8(gradient(300, 300)),
            ImageFormat::Png,
        );
        assert!(err(&png[..png.len() / 2]).contains("cannot decode"));

        let jpeg = encode(
            &image::DynamicImage::ImageRgb8(gradient(300, 300)),
            ImageFormat::Jpeg,
        );
        assert!(err(&jpeg[..jpeg.len() * 2 / 3]).contains("truncated"));
    }

    #[test]
    fn huge_header_is_rejected_before_decoding() {
        // A valid PNG signature and IHDR claiming 100000 x 100000, and nothing else.
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        png.extend(13u32.to_be_bytes());
        png.extend(&ihdr);
        png.extend(crc32(&ihdr).to_be_bytes());
        // A tiny (invalid) data chunk and the end chunk, so the header parses fully.
        for (kind, data) in [(&b"IDAT"[..], &[0u8; 4][..]), (&b"IEND"[..], &[][..])] {
            let mut chunk = kind.to_vec();
            chunk.extend(data);
            png.extend((data.len() as u32).to_be_bytes());
            png.extend(&chunk);
            png.extend(crc32(&chunk).to_be_bytes());
        }
        let err = format!("{:#}", decode_image(&png).unwrap_err());
        assert!(err.contains("larger than the 12000"), "{err}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn finds_images_recursively_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        for name in ["b/c/z.PNG", "a.jpg", "b/x.tiff", "notes.txt", "b/y.Jpeg"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let found: Vec<_> = find_images(dir.path())
            .unwrap()
            .into_iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(found, ["a.jpg", "b/c/z.PNG", "b/x.tiff", "b/y.Jpeg"]);
    }
}
